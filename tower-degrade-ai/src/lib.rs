//! The ONNX failure predictor for [`tower_degrade`]: early warning of SLO breaches.
//!
//! [`OnnxPredictor`] plugs into the control loop through
//! [`DegraderBuilder::predictor`](tower_degrade::DegraderBuilder::predictor). Once per tick it runs one batched
//! inference over every class (`window [n_classes, 64, 8]` float32 ->
//! `p_anomaly [n_classes, 1]`) off the request path, within the loop's time budget; a class
//! whose probability stays at or above the breaker's threshold (calibrated per class by
//! default, or fixed) for the configured ticks is degraded early, with reason `predicted`. The features are
//! [`tower_degrade::predict::FEATURES`]; a model names the ones it was trained on, in order, in
//! its ONNX metadata ([`FEATURES_KEY`]), and a model that names others, or none, is refused
//! when it loads ([`Error::Features`]).
//!
//! A model may also take each class's long baseline, quantiles of its last 4,096 healthy ticks
//! that the predictor keeps on its own thread, once a tick, as a second input ([`baseline`]).
//!
//! [`ScanPredictor`] needs neither ONNX Runtime nor a model file: it computes the bundled
//! model's anchor (a scan of robust z-scores against each class's long baseline) in Rust,
//! which on services the model was not trained on warns of about as many incidents as the
//! model does (`docs/predictor.md`, *Without ONNX Runtime*).
//!
//! [`Recorder`] writes the same features per tick to CSV, so traces of a running service under
//! fault injection can be evaluated (`training/evaluate.py`) and trained on.
//!
//! # ONNX Runtime
//!
//! Inference goes through ONNX Runtime with [`ort`], loaded at run time (`load-dynamic`):
//! nothing is downloaded at build. The library is found at [`ORT_DYLIB_PATH`], else at the
//! path found when this crate was built, else in the `onnxruntime` Python package
//! (`pip install onnxruntime==1.31.1`, which ships `capi/libonnxruntime.so.1.31.1`). A missing
//! library or model is an [`Error`] from the predictor's build, never a panic, and the rest of
//! the stack runs without a predictor. One ort environment serves the whole process.
//!
//! With the `cuda` feature and the `onnxruntime-gpu` wheel's library,
//! [`Device::Cuda`] runs on the GPU, falling back to the CPU with the reason logged. The
//! bundled model is faster on the CPU (it is all kernel launches on a GPU: `docs/benchmarks.md`).
//!
//! # Dependencies
//!
//! - `ort`: the maintained Rust binding to ONNX Runtime, the inference engine the design
//!   chose; used without default features so the build never downloads binaries.
//! - `tracing`: where the library was loaded from, and why a GPU was not used.
//! - `crc32fast`: a model's fingerprint (its bytes' CRC-32), which the classes' saved
//!   calibrations are tied to (`tower_degrade::breaker::Calibrations`).

pub mod baseline;
mod error;
mod onnx;
mod recorder;
mod runtime;
mod scan;

pub use error::Error;
pub use onnx::{
    BUNDLED_MODEL, Device, FEATURES_KEY, INPUT_NAME, MAX_THREADS, OUTPUT_NAME, OnnxPredictor,
    OnnxPredictorBuilder,
};
pub use recorder::{Fault, Recorder};
pub use runtime::{ORT_DYLIB_PATH, loaded_library, locate_library};
pub use scan::ScanPredictor;

/// `docs/predictor.md`'s code, compiled as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../../docs/predictor.md")]
struct PredictorGuide;
