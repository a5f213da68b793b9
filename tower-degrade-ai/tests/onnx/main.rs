//! The ONNX predictor against a real ONNX Runtime: the bundled model, the contract checks
//! (shapes, and the features named in the model's metadata), the errors, Rust against Python,
//! and the predictor degrading a class before the threshold rule.
//!
//! These tests need ONNX Runtime's library, which `scripts/test` installs (the
//! `onnxruntime==1.31.1` wheel). Without it they say so and pass, unless
//! `TOWER_DEGRADE_AI_REQUIRE_ORT` is set (`scripts/test` and CI set it), in which case its
//! absence fails them.

use std::path::PathBuf;
use std::time::Duration;

use tower::{Layer, Service, ServiceExt};
use tower_degrade::predict::{N_FEATURES, Predictor, PredictorConfig, WINDOW};
use tower_degrade::{
    ClassConfig, Degrader, breaker::Calibration, breaker::PredictionRecord, breaker::State,
    clock::LatencyClock,
};
use tower_degrade_ai::{Error, OnnxPredictor, ScanPredictor};

#[path = "../../../tower-degrade/tests/support.rs"]
mod support;

fn runtime_present() -> bool {
    match tower_degrade_ai::locate_library() {
        Ok(_) => true,
        Err(e) if std::env::var_os("TOWER_DEGRADE_AI_REQUIRE_ORT").is_some() => {
            panic!("TOWER_DEGRADE_AI_REQUIRE_ORT is set but: {e}")
        }
        Err(e) => {
            eprintln!("skipped: {e}");
            false
        }
    }
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(name)
}

/// The formula `training/reference.py` uses: a healthy class whose latency, in-flight and
/// queueing channels ramp from tick 48 on, faster with each batch row, plus a ripple.
fn fixed_input(batch: usize) -> Vec<f32> {
    const LEVEL: [f32; N_FEATURES] = [1.0, 1.0, 0.0, 0.0, 0.15, 0.5, 0.2, 0.03];
    let mut v = Vec::with_capacity(batch * WINDOW * N_FEATURES);
    for b in 0..batch {
        for t in 0..WINDOW {
            for (f, level) in LEVEL.iter().enumerate() {
                let ramp = if f >= 4 {
                    1.0 + b as f32 * t.saturating_sub(48) as f32 / 8.0
                } else {
                    1.0
                };
                let ripple = ((131 * b + 17 * t + 7 * f) % 23) as f32 / 200.0;
                v.push(level * ramp + ripple);
            }
        }
    }
    v
}

/// `input` (`batch` windows) with each window shifted so that its tick `t` is the newest (the
/// ticks before it padded with its first): what a class that had seen ticks `..=t` is fed.
fn newest_tick_at(input: &[f32], batch: usize, t: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(input.len());
    for b in 0..batch {
        let window = &input[b * WINDOW * N_FEATURES..][..WINDOW * N_FEATURES];
        for i in 0..WINDOW {
            let tick = (i + t + 1).saturating_sub(WINDOW);
            v.extend_from_slice(&window[tick * N_FEATURES..][..N_FEATURES]);
        }
    }
    v
}

/// `p_anomaly` from `models/p_anomaly.reference.json`, written by Python onnxruntime.
fn python_reference() -> Vec<f32> {
    let text = std::fs::read_to_string(fixture("models/p_anomaly.reference.json")).unwrap();
    let list = text.split("\"p_anomaly\"").nth(1).unwrap();
    let list = &list[list.find('[').unwrap() + 1..list.find(']').unwrap()];
    list.split(',').map(|v| v.trim().parse().unwrap()).collect()
}

#[test]
fn rust_and_python_onnxruntime_agree() {
    if !runtime_present() {
        return;
    }
    let mut p = OnnxPredictor::bundled().unwrap();
    let want = python_reference();
    let mut got = vec![0.0; want.len()];
    let input = fixed_input(want.len());
    if p.takes_baseline() {
        // Python feeds each row the quantiles of its own window (`reference.fixed_baseline`):
        // here each row's baseline learns the window's ticks one run at a time, as a class's
        // would, the last of them in the run compared below.
        for t in 0..WINDOW - 1 {
            p.run(&newest_tick_at(&input, want.len(), t), &mut got)
                .unwrap();
        }
    }
    p.run(&input, &mut got).unwrap();
    let max_abs = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0f32, f32::max);
    eprintln!("Rust {got:?} vs Python {want:?}: max abs diff {max_abs:e}");
    assert!(max_abs < 1e-5, "max abs diff {max_abs}");
}

#[test]
fn answers_one_probability_per_class_whatever_the_batch() {
    if !runtime_present() {
        return;
    }
    let mut p = OnnxPredictor::bundled().unwrap();
    for batch in [1, 3, 100] {
        let input = fixed_input(batch);
        let mut out = vec![f32::NAN; batch];
        p.run(&input, &mut out).unwrap();
        assert!(out.iter().all(|v| (0.0..=1.0).contains(v)), "{out:?}");
        // one class's answer does not depend on the others in its batch
        let mut alone = [0.0];
        p.run(&input[..WINDOW * N_FEATURES], &mut alone).unwrap();
        assert!((alone[0] - out[0]).abs() < 1e-6);
    }
    let err = p.run(&[0.0; 10], &mut [0.0]).unwrap_err();
    assert!(matches!(err, Error::Inference(_)), "{err}");
    // An empty batch is nothing to run (ONNX Runtime failed it, printing its own error).
    p.run(&[], &mut []).unwrap();
    let err = p.run(&[0.0; 10], &mut []).unwrap_err();
    assert!(matches!(err, Error::Inference(_)), "{err}");
}

#[test]
fn the_fingerprint_is_the_models_bytes_wherever_it_lies() {
    // Saved calibrations are restored only for the same fingerprint: the same model from
    // another path, or the bundled bytes, is the same model; another model is not.
    if !runtime_present() {
        return;
    }
    use tower_degrade::predict::Predictor;
    let bundled = OnnxPredictor::bundled().unwrap().fingerprint().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("copy.onnx");
    std::fs::copy(fixture("models/p_anomaly.onnx"), &copy).unwrap();
    let file = OnnxPredictor::load(&copy).unwrap().fingerprint().unwrap();
    assert_eq!(file, bundled);
    assert!(bundled.starts_with("onnx model, "), "{bundled}");
    let other = OnnxPredictor::load(fixture("tests/fixtures/nan_above.onnx"))
        .unwrap()
        .fingerprint()
        .unwrap();
    assert_ne!(other, bundled);
}

#[test]
fn a_missing_model_is_an_error_naming_the_file() {
    let err = OnnxPredictor::load("no/such/model.onnx").unwrap_err();
    assert_eq!(
        err,
        Error::ModelNotFound {
            path: "no/such/model.onnx".into()
        }
    );
    assert!(err.to_string().contains("no/such/model.onnx"));
    // A directory is there, but is not a model file.
    let err = OnnxPredictor::load(fixture("tests/fixtures")).unwrap_err();
    assert!(
        matches!(&err, Error::Model { reason, .. } if reason.contains("a directory")),
        "{err}"
    );
    // There, but not a regular file; and no path at all.
    let err = OnnxPredictor::load("/dev/null").unwrap_err();
    assert!(
        matches!(&err, Error::Model { reason, .. } if reason.contains("not a regular file")),
        "{err}"
    );
    let err = OnnxPredictor::load("").unwrap_err();
    assert!(
        matches!(&err, Error::Model { reason, .. } if reason.contains("an empty path")),
        "{err}"
    );
}

#[test]
fn a_file_that_is_not_a_model_is_an_error_naming_the_file() {
    if !runtime_present() {
        return;
    }
    let err = OnnxPredictor::load(fixture("Cargo.toml")).unwrap_err();
    assert!(matches!(err, Error::Model { .. }), "{err}");
    assert!(err.to_string().contains("Cargo.toml"), "{err}");
}

#[test]
fn a_model_with_another_window_is_refused_with_the_shapes() {
    if !runtime_present() {
        return;
    }
    let err = OnnxPredictor::load(fixture("tests/fixtures/window_32.onnx")).unwrap_err();
    let Error::Contract { reason, .. } = &err else {
        panic!("{err}")
    };
    assert!(
        reason.contains("has shape [dynamic, 32, 8], expected [batch, 64, 8]"),
        "{err}"
    );
}

#[test]
fn a_model_of_another_element_type_or_a_fixed_batch_is_refused_at_load() {
    if !runtime_present() {
        return;
    }
    // Both loaded before, and failed only at their first batch.
    let err = OnnxPredictor::load(fixture("tests/fixtures/window_f64.onnx")).unwrap_err();
    let Error::Contract { reason, .. } = &err else {
        panic!("{err}")
    };
    assert!(
        reason.contains("input `window` holds f64, expected f32"),
        "{err}"
    );
    assert!(err.to_string().contains("window_f64.onnx"), "{err}");
    let err = OnnxPredictor::load(fixture("tests/fixtures/batch_1.onnx")).unwrap_err();
    let Error::Contract { reason, .. } = &err else {
        panic!("{err}")
    };
    assert!(
        reason.contains("has shape [1, 64, 8]")
            && reason.contains("batch dimension must be dynamic"),
        "{err}"
    );
}

#[test]
fn a_model_that_does_not_answer_probabilities_is_refused_at_build_naming_its_file() {
    if !runtime_present() {
        return;
    }
    // It loads (its inputs and outputs are the contract's), but answers 5.0: a broken model,
    // not one certain of a failure. It was clamped to 1.0 and tripped every class.
    let p = OnnxPredictor::load(fixture("tests/fixtures/out_of_range.onnx")).unwrap();
    let Err(err) = Degrader::builder("shop")
        .class(ClassConfig::silver("stock"))
        .predictor(p, PredictorConfig::default())
        .build_with_worker()
    else {
        panic!("built with a model answering 5.0");
    };
    let err = err.to_string();
    assert!(
        err.contains("out_of_range.onnx") && err.contains("not a probability"),
        "{err}"
    );
}

#[test]
fn a_model_whose_answer_is_a_probability_only_for_zeros_is_refused_at_build() {
    if !runtime_present() {
        return;
    }
    // 0.3 + 2 x mean(window): 0.3 for the all-zero warm-up, which passed it; then every live
    // tick failed ("not a probability") and the class never had a prediction.
    let p = OnnxPredictor::load(fixture("tests/fixtures/logit.onnx")).unwrap();
    let Err(err) = Degrader::builder("shop")
        .class(ClassConfig::silver("stock"))
        .predictor(p, PredictorConfig::default())
        .build_with_worker()
    else {
        panic!("built with a model answering 1.275 on a healthy window");
    };
    let err = err.to_string();
    assert!(
        err.contains("logit.onnx: on a healthy window") && err.contains("not a probability"),
        "{err}"
    );
}

/// The default, but a budget the tick never gives up on under paused time (the host may be
/// slow).
fn paused_time_config() -> PredictorConfig {
    let mut config = PredictorConfig::default();
    config.budget = Duration::from_secs(10);
    config
}

#[tokio::test(start_paused = true)]
async fn a_class_the_model_answers_nan_for_has_no_prediction_and_the_others_keep_theirs() {
    if !runtime_present() {
        return;
    }
    // sigmoid(mean) while a window's values are at most 10, NaN past: `stock`, at 12.5x its
    // SLA, gets NaN every tick; `browse` a probability. One class's NaN failed the whole
    // batch, and no class had a prediction.
    let path = fixture("tests/fixtures/nan_above.onnx");
    let mut strict = OnnxPredictor::load(&path).unwrap();
    let mut input = vec![0.0; 2 * WINDOW * N_FEATURES];
    input[(2 * WINDOW - 1) * N_FEATURES + 5] = 12.0;
    let err = strict.run(&input, &mut [0.0; 2]).unwrap_err().to_string();
    assert!(err.contains("batch row 1") && err.contains("NaN"), "{err}");

    let (d, _worker) = Degrader::builder("shop")
        .latency_clock(LatencyClock::Tokio)
        .class(ClassConfig::silver("stock").sla(Duration::from_millis(200)))
        .class(ClassConfig::bronze("browse").sla(Duration::from_millis(200)))
        // Degraded, not opened: its few calls a tick, each overdue, stay in its window.
        .class_breaker(
            "stock",
            tower_degrade::breaker::BreakerConfig::default().min_requests(1_000),
        )
        .predictor(OnnxPredictor::load(&path).unwrap(), paused_time_config())
        .build_with_worker()
        .unwrap();
    let mut stock = d
        .layer(d.class_id("stock").unwrap())
        .layer(support::slow_failing());
    let mut browse = d
        .layer(d.class_id("browse").unwrap())
        .layer(support::slow_failing());
    for _ in 0..80 {
        // (`stock` degrades on its latency: some of its calls are refused.)
        let _ = stock.ready().await.unwrap().call((2_500, false)).await;
        browse
            .ready()
            .await
            .unwrap()
            .call((40, false))
            .await
            .unwrap();
        d.tick_now();
    }
    let status = d.status();
    let class = |name: &str| status.classes.iter().find(|c| &*c.name == name).unwrap();
    assert_eq!(class("stock").prediction, None);
    let p = class("browse")
        .prediction
        .expect("browse keeps its prediction");
    assert!(p > 0.5 && p < 1.0, "{p}");
    let predictor = status.predictor.as_ref().unwrap();
    assert_eq!(
        predictor.last_batch,
        Some(tower_degrade::degrader::PredictorBatch::Fresh)
    );
    assert_eq!(predictor.error, None);
}

#[test]
fn more_intra_op_threads_than_the_most_is_refused_naming_the_setting() {
    if !runtime_present() {
        return;
    }
    for n in [tower_degrade_ai::MAX_THREADS + 1, (1 << 32) + 1, usize::MAX] {
        let err = OnnxPredictor::builder(fixture("tests/fixtures/nan_above.onnx"))
            .threads(n)
            .build()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!(
                "OnnxPredictorBuilder::threads: {n} intra-op threads"
            )),
            "{err}"
        );
    }
    OnnxPredictor::builder(fixture("tests/fixtures/nan_above.onnx"))
        .threads(0)
        .build()
        .expect("0 is 1");
}

#[test]
fn a_run_that_never_ends_is_stopped_by_its_stop_handle_and_the_next_one_runs() {
    if !runtime_present() {
        return;
    }
    // A Loop of 2^62 trips: the runtime stops a warm-up past its timeout, or a batch too old
    // to use, through the handle; without it the run held its thread (and a core) for good.
    let mut p = OnnxPredictor::load(fixture("tests/fixtures/endless.onnx")).unwrap();
    let stop = p.stop_handle().expect("an ONNX run can be stopped");
    let running = std::thread::spawn(move || {
        let input = vec![0.0; WINDOW * N_FEATURES];
        let res = p.run(&input, &mut [0.0]);
        (p, res)
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !running.is_finished() {
        assert!(std::time::Instant::now() < deadline, "never stopped");
        // (Set before the run began, the flag is cleared by it: set until it ends.)
        stop();
        std::thread::yield_now();
    }
    let (_, res) = running.join().unwrap();
    let err = res.unwrap_err().to_string();
    assert!(err.contains("terminate"), "{err}");
    // A stop asked for one run does not stop the next.
    let mut p = OnnxPredictor::load(fixture("tests/fixtures/nan_above.onnx")).unwrap();
    let stop = p.stop_handle().unwrap();
    stop();
    let mut out = [0.0];
    p.run(&vec![0.0; WINDOW * N_FEATURES], &mut out).unwrap();
    assert_eq!(out[0], 0.5);

    // Building with it: the warm-up's timeout, said; its run is stopped.
    let mut config = PredictorConfig::default();
    config.warm_up_timeout = Duration::from_millis(300);
    let Err(err) = Degrader::builder("shop")
        .class(ClassConfig::silver("stock"))
        .predictor(
            OnnxPredictor::load(fixture("tests/fixtures/endless.onnx")).unwrap(),
            config,
        )
        .build_with_worker()
    else {
        panic!("built with a model that never answers");
    };
    assert!(err.to_string().contains("warm-up did not finish"), "{err}");
    // Naming the model (in a trial, only the wrapped runtime's words).
    assert!(err.to_string().contains("endless.onnx: "), "{err}");
}

#[test]
fn the_shipped_model_file_names_the_features_it_was_trained_on() {
    if !runtime_present() {
        return;
    }
    let p = OnnxPredictor::load(fixture("models/p_anomaly.onnx")).unwrap();
    assert!(p.model_path().ends_with("models/p_anomaly.onnx"));
}

#[test]
fn a_model_trained_on_the_features_in_another_order_is_refused_with_both_lists() {
    if !runtime_present() {
        return;
    }
    use tower_degrade::predict::FEATURES;
    let path = fixture("tests/fixtures/features_reordered.onnx");
    let err = OnnxPredictor::load(&path).unwrap_err();
    // p50 and p99 swapped
    let mut reordered = FEATURES.map(str::to_owned).to_vec();
    reordered.swap(4, 5);
    assert_eq!(
        err,
        Error::Features {
            path,
            expected: FEATURES.map(str::to_owned).to_vec(),
            found: Some(reordered.clone()),
        }
    );
    let msg = err.to_string();
    assert!(msg.contains(&FEATURES.join(", ")), "{msg}");
    assert!(msg.contains(&reordered.join(", ")), "{msg}");
    assert!(msg.contains("features_reordered.onnx"), "{msg}");
}

#[test]
fn a_model_without_the_features_metadata_is_refused_naming_the_key() {
    if !runtime_present() {
        return;
    }
    use tower_degrade::predict::FEATURES;
    use tower_degrade_ai::FEATURES_KEY;
    let err = OnnxPredictor::load(fixture("tests/fixtures/features_missing.onnx")).unwrap_err();
    let Error::Features { found: None, .. } = &err else {
        panic!("{err}")
    };
    let msg = err.to_string();
    assert!(msg.contains(FEATURES_KEY), "{msg}");
    assert!(msg.contains(&FEATURES.join(", ")), "{msg}");
    assert!(msg.contains("features.py"), "{msg}");
    assert!(msg.contains("features_missing.onnx"), "{msg}");
}

#[test]
fn a_newest_tick_that_is_not_finite_is_an_error_and_no_baseline_learns_it() {
    if !runtime_present() {
        return;
    }
    use tower_degrade_ai::baseline::Baseline;
    let mut p = OnnxPredictor::load(fixture("tests/fixtures/baseline.onnx")).unwrap();
    let per_class = WINDOW * N_FEATURES;
    let mut window = vec![0.5f32; 2 * per_class];
    window[2 * per_class - 3] = f32::NAN; // row 1's newest tick
    let err = p.run(&window, &mut [0.0; 2]).unwrap_err();
    assert!(err.to_string().contains("batch row 1"), "{err}");
    // Row 0's tick was fine, but a refused batch changes nothing: a NaN learnt would have
    // stayed in the quantiles for 4,096 healthy ticks.
    assert!(p.baseline(0).is_none_or(Baseline::is_empty));
    assert!(p.baseline(1).is_none_or(Baseline::is_empty));
    window[2 * per_class - 3] = 0.5;
    p.run(&window, &mut [0.0; 2]).unwrap();
    assert!(!p.baseline(1).unwrap().is_empty());
}

#[test]
fn a_model_that_takes_the_long_baseline_is_fed_each_class_its_own() {
    if !runtime_present() {
        return;
    }
    use tower_degrade_ai::baseline::Baseline;
    // tests/fixtures/baseline.onnx: p = sigmoid(mean(window) - mean(baseline)).
    let mut p = OnnxPredictor::load(fixture("tests/fixtures/baseline.onnx")).unwrap();
    assert!(p.takes_baseline());
    // The dummy warm-up batch is not a tick: nothing is learnt from it.
    p.warm_up(&["steady", "ramping"]).unwrap();
    assert!(p.baseline(0).is_none_or(Baseline::is_empty));
    // Batch row i refreshes at its own phase, i.
    let mut expected = [Baseline::with_phase(0), Baseline::with_phase(1)];
    let per_class = WINDOW * N_FEATURES;
    let mut window = vec![0.0f32; 2 * per_class];
    let mean = |v: &[f32]| v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
    for tick in 0..300u32 {
        for (class, b) in expected.iter_mut().enumerate() {
            let v = if class == 0 { 0.2 } else { tick as f32 / 100.0 };
            let row = [v, 1.0, 0.0, 0.0, v, v, v, v];
            let w = &mut window[class * per_class..][..per_class];
            w.copy_within(N_FEATURES.., 0);
            w[per_class - N_FEATURES..].copy_from_slice(&row);
            b.observe(&row);
        }
        let mut out = [0.0; 2];
        p.run(&window, &mut out).unwrap();
        for (class, b) in expected.iter().enumerate() {
            let q: Vec<f32> = b.quantiles().iter().flatten().copied().collect();
            let d = mean(&window[class * per_class..][..per_class]) - mean(&q);
            let want = 1.0 / (1.0 + (-d).exp());
            assert!(
                (f64::from(out[class]) - want).abs() < 1e-5,
                "tick {tick}, class {class}: {} vs {want}",
                out[class]
            );
        }
    }
    assert_eq!(p.baseline(1).unwrap().quantiles(), expected[1].quantiles());
    assert_eq!(p.baseline(1).unwrap().len(), 300);
}

#[test]
fn a_second_input_without_the_baseline_declared_is_refused_naming_the_key() {
    if !runtime_present() {
        return;
    }
    use tower_degrade_ai::baseline::{BASELINE_KEY, BASELINE_VALUE};
    let err = OnnxPredictor::load(fixture("tests/fixtures/baseline_undeclared.onnx")).unwrap_err();
    let Error::Contract { reason, .. } = &err else {
        panic!("{err}")
    };
    assert!(
        reason.contains(BASELINE_KEY) && reason.contains(BASELINE_VALUE),
        "{err}"
    );
    assert!(
        err.to_string().contains("baseline_undeclared.onnx"),
        "{err}"
    );
}

#[test]
fn cuda_requested_without_a_gpu_falls_back_to_the_cpu_with_a_reason() {
    if !runtime_present() {
        return;
    }
    let p = OnnxPredictor::bundled_builder()
        .device(tower_degrade_ai::Device::Cuda { device_id: 0 })
        .build()
        .unwrap();
    if p.device() == tower_degrade_ai::Device::Cpu {
        assert!(p.fallback_reason().is_some_and(|r| !r.is_empty()));
    } else {
        assert_eq!(p.fallback_reason(), None);
    }
}

/// On a GPU, the bundled model through ONNX Runtime's CUDA provider answers as it does on the
/// CPU: batches of 1, 100 and 1,000 classes, each window entering one tick at a time so that
/// the long baseline learns as a class's would. Run where a GPU and the `onnxruntime-gpu`
/// wheel's library are (`ORT_DYLIB_PATH` naming its `libonnxruntime.so.1.31.1`):
/// `cargo test -p tower-degrade-ai --features cuda --test onnx -- --ignored on_a_gpu`.
#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs a CUDA GPU and the onnxruntime-gpu wheel's library"]
fn on_a_gpu_the_bundled_model_answers_as_on_the_cpu() {
    use tower_degrade_ai::Device;
    assert!(runtime_present(), "no ONNX Runtime library");
    let mut gpu = OnnxPredictor::bundled_builder()
        .device(Device::Cuda { device_id: 0 })
        .build()
        .unwrap();
    assert_eq!(
        gpu.device(),
        Device::Cuda { device_id: 0 },
        "fell back to the CPU: {:?}",
        gpu.fallback_reason()
    );
    let mut cpu = OnnxPredictor::bundled().unwrap();
    let (mut worst, mut compared) = (0.0f32, 0usize);
    for batch in [1, 100, 1000] {
        let input = fixed_input(batch);
        let (mut on_gpu, mut on_cpu) = (vec![f32::NAN; batch], vec![f32::NAN; batch]);
        for t in 0..WINDOW {
            let x = newest_tick_at(&input, batch, t);
            gpu.run(&x, &mut on_gpu).unwrap();
            cpu.run(&x, &mut on_cpu).unwrap();
            for (g, c) in on_gpu.iter().zip(&on_cpu) {
                worst = worst.max((g - c).abs());
            }
            compared += batch;
        }
    }
    eprintln!("CUDA against the CPU, {compared} answers: max abs diff {worst:e}");
    assert!(worst < 1e-4, "max abs diff {worst}");
}

#[test]
fn the_scan_predictor_is_the_bundled_model_with_its_head_at_zero() {
    if !runtime_present() {
        return;
    }
    // tests/fixtures/anchor.onnx: the bundled model with its learnt head's weights at 0
    // (training/make_fixtures.py). Four classes over 400 ticks, each window zero-padded while
    // its history is short: one steady, one with a spike every 37 ticks and a failure burst,
    // one whose latency and queue channels step up at tick 200 and keep rising, one whose
    // traffic falls to a third from tick 250 (a deviation downwards only).
    const CLASSES: [&str; 4] = ["steady", "spiky", "leaking", "deserted"];
    let mut onnx = OnnxPredictor::load(fixture("tests/fixtures/anchor.onnx")).unwrap();
    let mut scan = ScanPredictor::new();
    onnx.warm_up(&CLASSES).unwrap();
    scan.warm_up(&CLASSES).unwrap();
    let per_class = WINDOW * N_FEATURES;
    let mut window = vec![0.0f32; CLASSES.len() * per_class];
    let (mut lowest, mut highest) = (1.0f32, 0.0f32);
    for tick in 0..400usize {
        for class in 0..CLASSES.len() {
            let ripple = ((31 * class + 17 * tick) % 13) as f32 / 100.0;
            let mut row = [1.0, 1.0, 0.0, 0.0, 0.2 + ripple, 0.5 + ripple, 0.3, 0.05];
            if class == 1 && tick % 37 == 0 {
                row[5] *= 6.0;
            }
            if class == 1 && (300..306).contains(&tick) {
                (row[1], row[2]) = (0.7, 0.3);
            }
            if class == 2 && tick >= 200 {
                let up = 1.0 + (tick - 200) as f32 / 40.0;
                for f in [4, 5, 7] {
                    row[f] *= up;
                }
            }
            if class == 3 && tick >= 250 {
                row[0] = 0.3;
            }
            let w = &mut window[class * per_class..][..per_class];
            w.copy_within(N_FEATURES.., 0);
            w[per_class - N_FEATURES..].copy_from_slice(&row);
        }
        let (mut a, mut b) = ([0.0; CLASSES.len()], [0.0; CLASSES.len()]);
        onnx.run(&window, &mut a).unwrap();
        scan.run(&window, &mut b).unwrap();
        for (x, y) in a.iter().zip(&b) {
            // Relative to the nearer end, so that p near 0 or 1 is held as tightly as p = 0.5.
            let (x, y) = (f64::from(*x), f64::from(*y));
            assert!(
                (x - y).abs() <= 1e-4 * x.min(1.0 - x) + 1e-7,
                "tick {tick}: ONNX {a:?}, Rust {b:?}"
            );
            lowest = lowest.min(y as f32);
            highest = highest.max(y as f32);
        }
    }
    // The scores spanned the range, tail included.
    assert!(lowest < 0.01 && highest > 0.9, "{lowest} {highest}");
    for class in 0..CLASSES.len() {
        assert_eq!(
            scan.baseline(class).unwrap().quantiles(),
            onnx.baseline(class).unwrap().quantiles()
        );
    }
}

#[tokio::test(start_paused = true)]
async fn the_scan_predictor_degrades_before_the_threshold_rule_without_onnx_runtime() {
    // Needs no ONNX Runtime: runs everywhere.
    leads_the_threshold_rule(ScanPredictor::new(), "the scan predictor").await;
}

/// The slow database from tick SLOW_FROM, `predictor` at the fixed 0.87: it must degrade the
/// class at least 2 ticks before the threshold rule alone does, and not on healthy traffic.
/// Returns the degrader and the predictor's and the rule's ticks.
async fn leads_the_threshold_rule(
    predictor: impl Predictor,
    name: &str,
) -> (Degrader, usize, usize) {
    let (rule_tick, _) = slow_database(&shop(None::<OnnxPredictor>), SLOW_FROM).await;
    let predicted = shop(Some(predictor));
    let (tick, state) = slow_database(&predicted, SLOW_FROM).await;
    eprintln!(
        "slow database from tick {SLOW_FROM}: threshold rule degraded at tick {rule_tick}, \
         {name} at tick {tick}: lead {} ticks",
        rule_tick as i64 - tick as i64
    );
    assert!(tick > SLOW_FROM, "tripped on healthy traffic at {tick}");
    assert_eq!(state, State::Degraded);
    assert!(tick + 2 <= rule_tick, "{name} {tick}, rule {rule_tick}");
    (predicted, tick, rule_tick)
}

/// The healthy ticks before the database slows down, in the fixed-threshold lead tests.
const SLOW_FROM: usize = 80;

/// Twenty calls a tick to `stock` (SLA 200 ms): `healthy` ticks at 40-55 ms, then a database
/// that slows 15 % a tick; past twice the SLA, calls start failing. Returns the tick at which
/// the class left Closed, and its state then.
async fn slow_database(d: &Degrader, healthy: usize) -> (usize, State) {
    let tick =
        slow_database_until(d, healthy, |d| d.state("stock").unwrap() != State::Closed).await;
    (tick, d.state("stock").unwrap())
}

/// The same traffic until `done` holds after a tick; returns that tick.
async fn slow_database_until(
    d: &Degrader,
    healthy: usize,
    done: impl Fn(&Degrader) -> bool,
) -> usize {
    let mut svc = d
        .layer(d.class_id("stock").unwrap())
        .layer(support::slow_failing());
    for tick in 1..=healthy + 60 {
        let slow = 1.15f64.powi(tick.saturating_sub(healthy) as i32);
        for i in 0..20u64 {
            let ms = ((40 + (i * 7 + tick as u64 * 3) % 16) as f64 * slow) as u64;
            let fail_share = ((ms as f64 - 400.0) / 400.0).clamp(0.0, 1.0);
            let fail = (i as f64) < fail_share * 20.0;
            let _ = svc.ready().await.unwrap().call((ms, fail)).await;
        }
        d.tick_now();
        if done(d) {
            return tick;
        }
    }
    panic!("the database recovered first");
}

fn shop(predictor: Option<impl Predictor>) -> Degrader {
    // The seed's fixed threshold: this test is about the model's lead, not the calibration.
    shop_with(
        predictor,
        tower_degrade::breaker::BreakerConfig::default().predict_threshold(0.87),
    )
}

fn shop_with(
    predictor: Option<impl Predictor>,
    breaker: tower_degrade::breaker::BreakerConfig,
) -> Degrader {
    let mut b = Degrader::builder("shop")
        .latency_clock(LatencyClock::Tokio)
        .breaker(breaker)
        .class(ClassConfig::silver("stock").sla(Duration::from_millis(200)));
    if let Some(p) = predictor {
        b = b.predictor(p, paused_time_config());
    }
    b.build_with_worker().unwrap().0
}

#[tokio::test(start_paused = true)]
async fn the_bundled_model_degrades_before_the_threshold_rule() {
    if !runtime_present() {
        return;
    }
    let (predicted, model_tick, rule_tick) =
        leads_the_threshold_rule(OnnxPredictor::bundled().unwrap(), "the ONNX predictor").await;
    let status = predicted.status();
    let stock = status.classes.iter().find(|c| &*c.name == "stock").unwrap();
    assert!(stock.prediction.unwrap() >= 0.87, "{:?}", stock.prediction);

    // Its record, in a trial that changes nothing (MetricsOnly): one warning, confirmed by the
    // breach that followed it, with its lead.
    let trial = shop(Some(OnnxPredictor::bundled().unwrap()));
    trial.metrics_only("stock").unwrap();
    let record = |d: &Degrader| {
        let status = d.status();
        let stock = status.classes.iter().find(|c| &*c.name == "stock").unwrap();
        stock.prediction_record.unwrap()
    };
    let breach_tick = slow_database_until(&trial, SLOW_FROM, |d| record(d).confirmed > 0).await;
    let r = record(&trial);
    eprintln!("MetricsOnly trial: confirmed at tick {breach_tick}: {r:?}");
    assert_eq!((r.confirmed, r.false_alarms, r.missed), (1, 0, 0), "{r:?}");
    // Nothing enforced: the breach is the one the rule alone tripped on, and the lead the
    // enforcing run had over it.
    assert_eq!(breach_tick, rule_tick);
    assert_eq!(r.last_lead_ticks, Some((rule_tick - model_tick) as u32));
}

#[tokio::test(start_paused = true)]
async fn the_calibrated_default_warns_of_a_slow_database_after_its_warm_up() {
    // The same slow database once the class has calibrated its threshold (the shortest
    // warm-up). Its healthy traffic repeats every 16 ticks, so the model's healthy scores take
    // a few values; and the score climbs over several ticks before the breach. A threshold
    // that learnt each climbing score as healthy lifted itself ahead of them, to 0.99999, and
    // never warned; one fitted to 8 tied excesses ran away with the first new one.
    if !runtime_present() {
        return;
    }
    calibrated_slow_database(OnnxPredictor::bundled().unwrap()).await;
}

#[tokio::test(start_paused = true)]
async fn the_scan_predictor_warns_of_a_slow_database_at_the_calibrated_default() {
    // Needs no ONNX Runtime: runs everywhere.
    calibrated_slow_database(ScanPredictor::new()).await;
}

/// The slow database after the shortest warm-up, `predictor` at the calibrated default: it
/// must degrade the class before the threshold rule, and not on healthy traffic.
async fn calibrated_slow_database(predictor: impl Predictor) {
    const HEALTHY: usize = 2_600;
    let (rule_tick, _) = slow_database_at_once(&shop(None::<OnnxPredictor>), HEALTHY).await;
    let d = shop_with(
        Some(predictor),
        tower_degrade::breaker::BreakerConfig::default()
            .predict_calibrated(Calibration::default().warm_up_ticks(2_500)),
    );
    let (tick, state) = slow_database_at_once(&d, HEALTHY).await;
    let status = d.status();
    let stock = status.classes.iter().find(|c| &*c.name == "stock").unwrap();
    eprintln!(
        "calibrated: threshold {:?}, degraded at tick {tick} ({state:?}), the rule at {rule_tick}",
        stock.prediction_threshold
    );
    assert!(!stock.calibrating);
    assert!(tick > HEALTHY, "tripped on healthy traffic at {tick}");
    assert_eq!(state, State::Degraded, "predicted, not the rule");
    assert!(tick + 2 <= rule_tick, "calibrated {tick}, rule {rule_tick}");
}

#[tokio::test(start_paused = true)]
async fn a_benign_latency_rise_costs_the_calibrated_default_one_false_alarm_at_most() {
    // A deploy that makes the service 12 % slower for good, far under its SLA (p99 62 ms of
    // 200, no failure), after the class calibrated on traffic so regular that its p99 is the
    // same every tick. The long baseline's spread is then next to nothing, and the model,
    // anchored on a z-score against it, reads the change as many spreads: the class is
    // degraded on a prediction no breach confirms (a known limit, `docs/predictor.md`). What
    // bounds it is the false-alarm exit: after FALSE_ALARM_TICKS healthy ticks the alarm is
    // taken for a false one, the class closes, and its threshold holds above the level it
    // misread, so the same change does not trip it again.
    if !runtime_present() {
        return;
    }
    let (trips, degraded_ticks, r) =
        benign_rise(OnnxPredictor::bundled().unwrap(), Traffic::Regular).await;
    assert!(trips <= 1, "{trips} trips");
    assert_eq!((r.confirmed, r.missed), (0, 0), "{r:?}");
    assert_eq!(r.false_alarms as usize, trips, "{r:?}");
    assert!(
        degraded_ticks <= tower_degrade::breaker::FALSE_ALARM_TICKS as usize + 2,
        "degraded for {degraded_ticks} ticks"
    );
}

#[tokio::test(start_paused = true)]
async fn a_benign_latency_rise_on_noisy_traffic_costs_one_false_alarm_at_most() {
    // The same deploy on traffic whose calls take 40-80 ms, so that a tick's p99 varies: the
    // scores flap about the threshold (a few short warnings), and the warnings that come and
    // go for FALSE_ALARM_TICKS healthy ticks are one false alarm, which lifts the threshold
    // above them. (It tripped nothing while the calibration learnt a class's first, zero-
    // padded ticks as healthy, which lifted its threshold; once their excesses slid out of
    // the fit, hours later, each warning was shorter than the false-alarm exit and the class
    // flapped for good: 26 trips in 400 ticks.)
    if !runtime_present() {
        return;
    }
    let (_, degraded_ticks, r) =
        benign_rise(OnnxPredictor::bundled().unwrap(), Traffic::Noisy).await;
    assert_eq!((r.confirmed, r.missed), (0, 0), "{r:?}");
    assert!(r.false_alarms <= 1, "{r:?}");
    assert!(
        degraded_ticks <= tower_degrade::breaker::FALSE_ALARM_TICKS as usize + 2,
        "degraded for {degraded_ticks} ticks"
    );
}

#[tokio::test(start_paused = true)]
async fn a_benign_latency_rise_costs_the_scan_predictor_what_it_costs_the_bundled_model() {
    // Needs no ONNX Runtime: runs everywhere. The same bounds as the two tests above.
    let (trips, degraded_ticks, r) = benign_rise(ScanPredictor::new(), Traffic::Regular).await;
    assert!(trips <= 1, "{trips} trips");
    assert_eq!((r.confirmed, r.missed), (0, 0), "{r:?}");
    assert!(
        degraded_ticks <= tower_degrade::breaker::FALSE_ALARM_TICKS as usize + 2,
        "degraded for {degraded_ticks} ticks"
    );
    let (_, degraded_ticks, r) = benign_rise(ScanPredictor::new(), Traffic::Noisy).await;
    assert!(r.false_alarms <= 1, "{r:?}");
    assert!(
        degraded_ticks <= tower_degrade::breaker::FALSE_ALARM_TICKS as usize + 2,
        "degraded for {degraded_ticks} ticks"
    );
}

/// A class calibrated on 2,600 healthy ticks of `traffic`, then 12 % slower for 400 ticks
/// and the record's verdict after them (`breaker::verdict_ticks`: 600 at 500 ms), so that
/// every warning of the 400 is judged: how many times it left Closed after the change, for
/// how many ticks in all, and its record.
async fn benign_rise(
    predictor: impl Predictor,
    traffic: Traffic,
) -> (usize, usize, PredictionRecord) {
    const HEALTHY: usize = 2_600;
    let after = 400 + tower_degrade::breaker::verdict_ticks(Duration::from_millis(500)) as usize;
    let d = shop_with(
        Some(predictor),
        tower_degrade::breaker::BreakerConfig::default()
            .predict_calibrated(Calibration::default().warm_up_ticks(2_500)),
    );
    let svc = d
        .layer(d.class_id("stock").unwrap())
        .layer(support::slow_failing());
    let (mut trips, mut degraded_ticks, mut was_closed) = (0, 0, true);
    for tick in 1..=HEALTHY + after {
        let slower = if tick > HEALTHY { 1.12 } else { 1.0 };
        one_tick_at_once(&svc, tick, slower, traffic).await;
        d.tick_now();
        let closed = d.state("stock").unwrap() == State::Closed;
        assert!(
            closed || tick > HEALTHY,
            "tripped on healthy traffic at {tick}"
        );
        trips += usize::from(was_closed && !closed);
        degraded_ticks += usize::from(!closed);
        was_closed = closed;
    }
    let status = d.status();
    let stock = status.classes.iter().find(|c| &*c.name == "stock").unwrap();
    let r = stock.prediction_record.unwrap();
    eprintln!(
        "benign rise, {traffic:?} traffic: {trips} trip(s), {degraded_ticks} ticks degraded, \
         {r:?}, p {:?}, threshold {:?}",
        stock.prediction, stock.prediction_threshold
    );
    assert!(!stock.calibrating);
    assert!(was_closed, "closed at the end");
    (trips, degraded_ticks, r)
}

#[derive(Debug, Clone, Copy)]
enum Traffic {
    /// [`slow_database`]'s: 40-55 ms in a pattern, the same p99 every tick.
    Regular,
    /// 40-80 ms, spread by a hash of the call and the tick.
    Noisy,
}

/// One tick of `traffic`, its twenty calls sent at once with their latency scaled by `slow`
/// (failing past twice the SLA), then the rest of the 500 ms tick.
async fn one_tick_at_once<S>(svc: &S, tick: usize, slow: f64, traffic: Traffic)
where
    S: tower::Service<(u64, bool)> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug,
{
    let start = tokio::time::Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..20u64 {
        let base = match traffic {
            Traffic::Regular => 40 + (i * 7 + tick as u64 * 3) % 16,
            Traffic::Noisy => {
                let h = (i.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    ^ (tick as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F))
                .wrapping_mul(0x1656_67B1_9E37_79F9);
                40 + (h >> 40) % 40
            }
        };
        let ms = (base as f64 * slow) as u64;
        let fail = (i as f64) < ((ms as f64 - 400.0) / 400.0).clamp(0.0, 1.0) * 20.0;
        let mut svc = svc.clone();
        calls.spawn(async move {
            let _ = svc.ready().await.unwrap().call((ms, fail)).await;
        });
    }
    while calls.join_next().await.is_some() {}
    tokio::time::sleep_until(start + Duration::from_millis(500)).await;
}

/// [`slow_database`]'s traffic with each tick's twenty calls sent at once, a tick every
/// 500 ms. Returns the tick at which the class left Closed, and its state then.
async fn slow_database_at_once(d: &Degrader, healthy: usize) -> (usize, State) {
    let svc = d
        .layer(d.class_id("stock").unwrap())
        .layer(support::slow_failing());
    for tick in 1..=healthy + 60 {
        let slow = 1.15f64.powi(tick.saturating_sub(healthy) as i32);
        one_tick_at_once(&svc, tick, slow, Traffic::Regular).await;
        d.tick_now();
        let state = d.state("stock").unwrap();
        if state != State::Closed {
            return (tick, state);
        }
    }
    panic!("never left Closed");
}

#[tokio::test(start_paused = true)]
async fn a_restored_calibration_keeps_its_threshold_through_the_young_baseline_of_a_restart() {
    // Needs no ONNX Runtime: runs everywhere. On every 60th tick one call more is in flight
    // when the tick is read, a healthy tick like the others. The long baseline of a
    // class that has run a while holds some of them; the one that fills again after a
    // restart holds none at first, and reads them as far out. Learnt as they came in a
    // restored calibration's 128 settling scores and after, those scores lifted the
    // threshold from 0.13 to 0.89 by the restart's 1,200th tick, out of the model's reach for
    // hours (a user's trial: 0.99999999 after restarts of a calibration learnt at 0.115), and
    // the next save kept it.
    let build = |saved: Option<tower_degrade::breaker::Calibrations>| {
        let mut b = Degrader::builder("shop")
            .latency_clock(LatencyClock::Tokio)
            .breaker(
                tower_degrade::breaker::BreakerConfig::default()
                    .predict_calibrated(Calibration::default().warm_up_ticks(2_500)),
            )
            .class(ClassConfig::silver("stock").sla(Duration::from_millis(200)))
            .predictor(ScanPredictor::new(), paused_time_config());
        if let Some(saved) = saved {
            b = b.restore_calibrations(saved);
        }
        b.build_with_worker().unwrap().0
    };
    let restored_flag = |d: &Degrader| {
        let status = d.status();
        let stock = status.classes.iter().find(|c| &*c.name == "stock").unwrap();
        stock.calibration_restored
    };
    let threshold = |d: &Degrader| {
        let status = d.status();
        let stock = status.classes.iter().find(|c| &*c.name == "stock").unwrap();
        (stock.prediction_threshold, stock.prediction_record.unwrap())
    };
    let logit = |p: f64| (p / (1.0 - p)).ln();
    let fresh = build(None);
    run_with_blips(&fresh, 2_700, 1).await;
    let learnt = threshold(&fresh).0.expect("calibrated");
    assert!(!restored_flag(&fresh), "warmed up in this process");
    assert!(learnt < 0.9, "within reach: {learnt}");
    let saved = fresh.calibrations();
    fresh.shutdown();
    // The restarted process's blips start once the model's window is whole, and its young
    // baseline reads them far over the threshold learnt.
    let restored = build(Some(saved));
    assert!(restored_flag(&restored), "the status says it was restored");
    let highest = run_with_blips(&restored, 1_200, 100).await;
    eprintln!("the restart's highest prediction {highest}, against {learnt}");
    assert!(
        logit(highest) > logit(learnt) + 1.5,
        "{highest} against {learnt}"
    );
    // Its threshold holds where it was, and once it learns again (the baseline whole, past
    // RESTORED_UNLEARNT_TICKS) it follows the class as the uninterrupted one would. (Blips
    // this frequent are taken in by the young baseline within the settling; the calibrator's
    // own tests pin the RESTORED_UNLEARNT_TICKS it passes after that.)
    for ticks in [0, 4_000] {
        run_with_blips(&restored, ticks, 1).await;
        let (after, record) = threshold(&restored);
        eprintln!("learnt {learnt}, restored {after:?} by now, {record:?}");
        let after = after.expect("settled");
        assert!(
            (logit(after) - logit(learnt)).abs() < 0.5,
            "learnt {learnt}, restored {after}"
        );
        assert_eq!(record.false_alarms, 0, "{record:?}");
    }
}

/// `ticks` of [`Traffic::Noisy`] to `stock` where, from tick `from` on, every 60th tick has
/// one more call in flight when the tick is read (150 ms, within the SLA). Returns the
/// highest prediction read.
async fn run_with_blips(d: &Degrader, ticks: usize, from: usize) -> f64 {
    let svc = d
        .layer(d.class_id("stock").unwrap())
        .layer(support::slow_failing());
    let mut highest = 0.0f64;
    for tick in 1..=ticks {
        one_tick_at_once(&svc, tick, 1.0, Traffic::Noisy).await;
        if tick >= from && (tick - from).is_multiple_of(60) {
            let mut svc = svc.clone();
            tokio::spawn(async move {
                let _ = svc.ready().await.unwrap().call((150, false)).await;
            });
            tokio::task::yield_now().await;
        }
        d.tick_now();
        let status = d.status();
        let stock = status.classes.iter().find(|c| &*c.name == "stock").unwrap();
        highest = highest.max(stock.prediction.unwrap_or(0.0));
    }
    highest
}
