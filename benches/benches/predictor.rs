//! Inference latency of the bundled ONNX model through `ort` on the CPU: one tick's batch for
//! 1 class and for 100 classes. Criterion reports the mean; p50 and p99 of single calls are
//! printed after it (and written to `target/criterion/predictor-percentiles.md`).
//!
//! Needs ONNX Runtime's library (`pip install onnxruntime==1.31.1`); without it the bench says
//! so and measures nothing.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use tower_degrade::predict::{N_FEATURES, WINDOW};
use tower_degrade_ai::OnnxPredictor;

fn input(batch: usize) -> Vec<f32> {
    (0..batch * WINDOW * N_FEATURES)
        .map(|i| ((i * 7919) % 97) as f32 / 50.0)
        .collect()
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn bench(c: &mut Criterion) {
    let mut p = match OnnxPredictor::bundled() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("predictor bench skipped: {e}");
            return;
        }
    };
    let mut rows = Vec::new();
    let mut group = c.benchmark_group("onnx_predictor");
    for batch in [1usize, 100] {
        let x = input(batch);
        let mut out = vec![0.0f32; batch];
        group.bench_function(format!("batch {batch}"), |b| {
            b.iter(|| p.run(black_box(&x), &mut out).unwrap())
        });
        // Single calls, timed one by one, for the tail.
        let mut samples: Vec<Duration> = (0..20_000 / batch.max(10) * 10)
            .map(|_| {
                let t = Instant::now();
                p.run(black_box(&x), &mut out).unwrap();
                t.elapsed()
            })
            .collect();
        samples.sort();
        rows.push(format!(
            "| batch {batch} | {} | {:.1} µs | {:.1} µs | {:.1} µs |",
            samples.len(),
            percentile(&samples, 0.5).as_secs_f64() * 1e6,
            percentile(&samples, 0.99).as_secs_f64() * 1e6,
            samples.last().unwrap().as_secs_f64() * 1e6,
        ));
    }
    group.finish();
    let table = format!(
        "| onnx_predictor | calls | p50 | p99 | max |\n|---|---:|---:|---:|---:|\n{}\n",
        rows.join("\n")
    );
    println!("\n{table}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/criterion");
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::write(dir.join("predictor-percentiles.md"), table);
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
