//! Inference latency of the bundled ONNX model through `ort` on the CPU: one tick's batch for
//! 1 class and for 100 classes. Criterion reports the mean; p50 and p99 of single calls are
//! printed after it (and written to `target/criterion/predictor-percentiles.md`).
//!
//! Also, for 100 classes, a model that takes the long baseline (`tower_degrade_ai::baseline`):
//! the test fixture `baseline.onnx`, whose graph is two means, so what is measured is the
//! baseline's upkeep (each class's newest tick learnt, the quantiles reselected every 64 ticks
//! over a full history of 4,096) and the second input, beside the same tiny graph's cost.
//!
//! And `ScanPredictor`, the bundled model's anchor computed in Rust (no ONNX Runtime), for 1
//! and 100 classes. Every tick of the input is healthy (success rate 1), so every class's
//! baseline learns each tick, and each predictor runs 4,096 ticks before it is timed, so that
//! its baselines are full.
//!
//! The ONNX rows need ONNX Runtime's library (`pip install onnxruntime==1.31.1`); without it
//! the bench says so and measures `ScanPredictor` alone. With the `cuda` feature (and the
//! `onnxruntime-gpu` wheel's library and a GPU), the bundled model is also timed on the GPU.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, criterion_group, criterion_main};
use tower_degrade::predict::{N_FEATURES, Predictor, WINDOW};
use tower_degrade_ai::baseline::{Baseline, HISTORY};
use tower_degrade_ai::{OnnxPredictor, ScanPredictor};

/// `[batch, 64, 8]` of varied values, every tick healthy (success rate 1), so that every
/// class's long baseline learns each tick.
fn input(batch: usize) -> Vec<f32> {
    (0..batch * WINDOW * N_FEATURES)
        .map(|i| {
            if i % N_FEATURES == 1 {
                1.0
            } else {
                ((i * 7919) % 97) as f32 / 50.0
            }
        })
        .collect()
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// One row of the percentile table: `calls` single calls of `p` on `x`, timed one by one.
fn tail(name: &str, p: &mut dyn Predictor, x: &[f32], calls: usize) -> String {
    let mut out = vec![0.0f32; x.len() / (WINDOW * N_FEATURES)];
    let mut samples: Vec<Duration> = (0..calls)
        .map(|_| {
            let t = Instant::now();
            p.predict(black_box(x), &mut out).unwrap();
            t.elapsed()
        })
        .collect();
    samples.sort();
    format!(
        "| {name} | {} | {:.1} µs | {:.1} µs | {:.1} µs |",
        samples.len(),
        percentile(&samples, 0.5).as_secs_f64() * 1e6,
        percentile(&samples, 0.99).as_secs_f64() * 1e6,
        samples.last().unwrap().as_secs_f64() * 1e6,
    )
}

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tower-degrade-ai/tests/fixtures")
        .join(name)
}

/// `p` on a batch of `batch` classes: criterion's mean (as "batch N" in `group`), then single
/// calls timed one by one (`tail`), whose row, labelled `label`, is returned.
fn time_batch(
    group: &mut BenchmarkGroup<'_, WallTime>,
    label: &str,
    p: &mut dyn Predictor,
    batch: usize,
) -> String {
    let x = input(batch);
    let mut out = vec![0.0f32; batch];
    // Each class's long baseline full first, as after an hour's ticks.
    for _ in 0..HISTORY {
        p.predict(&x, &mut out).unwrap();
    }
    group.bench_function(format!("batch {batch}"), |b| {
        b.iter(|| p.predict(black_box(&x), &mut out).unwrap())
    });
    tail(
        &format!("{label}, batch {batch}"),
        p,
        &x,
        20_000 / batch.max(10) * 10,
    )
}

/// The bundled model on ONNX Runtime's CUDA provider (GPU 0), batches of 1 and 100, as a group
/// of its own; skipped, saying why, where the predictor would fall back to the CPU.
#[cfg(feature = "cuda")]
fn on_cuda(c: &mut Criterion, rows: &mut Vec<String>) {
    use tower_degrade_ai::Device;
    let mut p = match OnnxPredictor::bundled_builder()
        .device(Device::Cuda { device_id: 0 })
        .build()
    {
        Ok(p) if p.device() != Device::Cpu => p,
        Ok(p) => {
            eprintln!("the CUDA rows skipped: {:?}", p.fallback_reason());
            return;
        }
        Err(e) => {
            eprintln!("the CUDA rows skipped: {e}");
            return;
        }
    };
    let mut group = c.benchmark_group("onnx_predictor_cuda");
    for batch in [1usize, 100] {
        rows.push(time_batch(
            &mut group,
            "bundled model on CUDA",
            &mut p,
            batch,
        ));
    }
    group.finish();
}

/// The percentile table, printed and written to `target/criterion/predictor-percentiles.md`.
fn write_table(rows: &[String]) {
    let table = format!(
        "| predictor | calls | p50 | p99 | max |\n|---|---:|---:|---:|---:|\n{}\n",
        rows.join("\n")
    );
    println!("\n{table}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/criterion");
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::write(dir.join("predictor-percentiles.md"), table);
    }
}

fn bench(c: &mut Criterion) {
    let mut rows = Vec::new();
    let x100 = input(100);
    // The anchor in Rust, each class's baseline full first.
    let mut group = c.benchmark_group("scan_predictor");
    for batch in [1usize, 100] {
        rows.push(time_batch(
            &mut group,
            "scan",
            &mut ScanPredictor::new(),
            batch,
        ));
    }
    group.finish();
    let mut p = match OnnxPredictor::bundled() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("the ONNX predictor's rows skipped: {e}");
            write_table(&rows);
            return;
        }
    };
    let mut group = c.benchmark_group("onnx_predictor");
    for batch in [1usize, 100] {
        rows.push(time_batch(&mut group, "bundled model", &mut p, batch));
    }
    // The long baseline: its upkeep alone (100 classes' baselines learning one tick, staggered
    // as OnnxPredictor staggers them), and a two-input model end to end (the fixture's graph
    // is two means).
    let rows_of = |b: usize| -> [f32; N_FEATURES] {
        x100[(b * WINDOW + WINDOW - 1) * N_FEATURES..][..N_FEATURES]
            .try_into()
            .unwrap()
    };
    let newest: Vec<[f32; N_FEATURES]> = (0..100).map(rows_of).collect();
    let mut baselines: Vec<Baseline> = (0..100).map(Baseline::with_phase).collect();
    for _ in 0..HISTORY {
        for (b, r) in baselines.iter_mut().zip(&newest) {
            b.observe(r);
        }
    }
    group.bench_function("long baseline upkeep, 100 classes", |bench| {
        bench.iter(|| {
            for (b, r) in baselines.iter_mut().zip(&newest) {
                b.observe(black_box(r));
            }
        })
    });
    if let Ok(mut m) = OnnxPredictor::load(fixture("baseline.onnx")) {
        let mut out = vec![0.0f32; 100];
        for _ in 0..HISTORY {
            m.run(&x100, &mut out).unwrap();
        }
        let name = "two-means graph + long baseline, batch 100";
        group.bench_function(name, |b| {
            b.iter(|| m.run(black_box(&x100), &mut out).unwrap())
        });
        rows.push(tail(name, &mut m, &x100, 6_400));
    }
    group.finish();
    #[cfg(feature = "cuda")]
    on_cuda(c, &mut rows);
    write_table(&rows);
}

criterion_group!(benches, bench);
criterion_main!(benches);
