//! [`OnnxPredictor`]: a [`Predictor`] running an ONNX model through ONNX Runtime.

use std::path::{Path, PathBuf};

use ort::session::{RunOptions, Session};
use ort::value::{TensorElementType, TensorRef};
use tower_degrade::BoxError;
use tower_degrade::predict::{FEATURES, N_FEATURES, Predictor, WINDOW};

use crate::baseline::{
    BASELINE_INPUT, BASELINE_KEY, BASELINE_VALUE, Baseline, N_QUANTILES, check_batch, learn_batch,
};
use crate::{Error, runtime};

/// The conventional name of the model's input, `[batch, 64, 8]` float32 (a model with
/// another name is used by position: its first input). A model may take a second,
/// [`BASELINE_INPUT`](crate::baseline::BASELINE_INPUT) (see [`crate::baseline`]).
pub const INPUT_NAME: &str = "window";
/// The conventional name of the model's output, `[batch, 1]` float32 probabilities (used by
/// position under another name).
pub const OUTPUT_NAME: &str = "p_anomaly";
/// The ONNX metadata key (`metadata_props`) under which a model names its input features: the
/// names of [`FEATURES`] in input order, joined by commas (`rate_ratio,success_rate,...`;
/// blanks around a name are ignored). The training pipeline writes it on export; a model
/// without it, or naming other features or another order, is refused with
/// [`Error::Features`]. `python training/features.py MODEL.onnx` stamps a model trained
/// elsewhere on these features.
pub const FEATURES_KEY: &str = "tower_degrade.features";

/// Where inference runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Device {
    /// ONNX Runtime's CPU execution provider.
    #[default]
    Cpu,
    /// ONNX Runtime's CUDA execution provider (cargo feature `cuda`, and the library from the
    /// `onnxruntime-gpu` wheel). Falls back to the CPU, with the reason logged and kept in
    /// [`OnnxPredictor::fallback_reason`], when no GPU can be used. TF32 is off, so the GPU
    /// answers as the CPU does. For the bundled model the CPU is the faster.
    Cuda {
        /// The CUDA device's ordinal.
        device_id: i32,
    },
}

#[derive(Debug, Clone)]
enum Source {
    File,
    Bytes(&'static [u8]),
}

/// The model shipped with this crate (`models/p_anomaly.onnx`; its card is
/// `models/MODEL_CARD.md`).
pub const BUNDLED_MODEL: &[u8] = include_bytes!("../models/p_anomaly.onnx");

/// Builds an [`OnnxPredictor`].
#[derive(Debug, Clone)]
#[must_use = "a setting or builder does nothing until it is passed on or built"]
pub struct OnnxPredictorBuilder {
    model: PathBuf,
    source: Source,
    device: Device,
    threads: usize,
}

/// The most intra-op threads [`OnnxPredictorBuilder::threads`] takes.
pub const MAX_THREADS: usize = 64;

impl OnnxPredictorBuilder {
    /// Where inference runs (default: CPU).
    pub fn device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// ONNX Runtime's intra-op threads (default 1: the model is small and the control loop
    /// should not compete with the service for cores); 1 to [`MAX_THREADS`], else `build`
    /// refuses it (0 is read as 1).
    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = threads.max(1);
        self
    }

    /// Loads the library (once per process) and the model, and checks the model's contract:
    /// its input and output shapes ([`Error::Contract`]), then the features its metadata names
    /// ([`FEATURES_KEY`], [`Error::Features`]).
    pub fn build(self) -> Result<OnnxPredictor, Error> {
        if self.threads > MAX_THREADS {
            // Passed on as a C int: 2^32 + 1 became 1 and usize::MAX -1, silently; 5,000
            // took over a minute to load.
            return Err(Error::Setting {
                setting: "threads",
                reason: format!(
                    "{} intra-op threads: at most {MAX_THREADS} (a batch of a few hundred \
                     classes gains nothing past a handful)",
                    self.threads
                ),
            });
        }
        let path = self.model;
        if matches!(self.source, Source::File) && path.is_dir() {
            return Err(Error::Model {
                path,
                reason: "a directory: name the model file in it".into(),
            });
        }
        if matches!(self.source, Source::File) && path.as_os_str().is_empty() {
            return Err(Error::Model {
                path,
                reason: "an empty path: name the model file".into(),
            });
        }
        if matches!(self.source, Source::File) && path.exists() && !path.is_file() {
            return Err(Error::Model {
                path,
                reason: "not a regular file (a device or a socket, say): name the model file"
                    .into(),
            });
        }
        if matches!(self.source, Source::File) && !path.is_file() {
            return Err(Error::ModelNotFound { path });
        }
        let env = runtime::environment()?;
        let model_err = |e: ort::Error| Error::Model {
            path: path.clone(),
            reason: e.to_string(),
        };
        let builder = Session::builder(env)
            .map_err(model_err)?
            .with_intra_threads(self.threads)
            .map_err(|e| model_err(e.into()))?;
        let (mut builder, device, fallback_reason) = with_device(builder, self.device);
        // Read before the session is: a file replaced meanwhile is fingerprinted as it was
        // when loading began, not as it is after.
        let fingerprint = match &self.source {
            Source::File => file_fingerprint(&path).map_err(|e| Error::Model {
                path: path.clone(),
                reason: format!("cannot be read: {e}"),
            })?,
            Source::Bytes(bytes) => fingerprint(bytes.len() as u64, crc32fast::hash(bytes)),
        };
        let session = match &self.source {
            Source::File => builder.commit_from_file(&path),
            Source::Bytes(bytes) => builder.commit_from_memory(bytes),
        }
        .map_err(model_err)?;
        let takes_baseline = check_contract(&session, &path)?;
        check_features(&session, &path, takes_baseline)?;
        let run_options = RunOptions::new().map_err(model_err)?;
        Ok(OnnxPredictor {
            session,
            run_options: std::sync::Arc::new(run_options),
            path,
            device,
            fallback_reason,
            baselines: takes_baseline.then(Vec::new),
            baseline_input: Vec::new(),
            fingerprint,
        })
    }
}

/// A model's identity ([`Predictor::fingerprint`]): its length and CRC-32, wherever the file
/// lies (a copy of the same model elsewhere is the same model). Of the `.onnx` file only: a
/// model whose weights lie in a separate external-data file is not told apart by them.
fn fingerprint(len: u64, crc: u32) -> String {
    format!("onnx model, {len} bytes, crc32 {crc:08x}")
}

/// [`fingerprint`] of the file at `path`, read a block at a time: a file of gigabytes (not a
/// model, most likely) is not held in memory for it.
fn file_fingerprint(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = crc32fast::Hasher::new();
    let mut block = vec![0u8; 64 * 1024];
    let mut len = 0u64;
    loop {
        match file.read(&mut block) {
            Ok(0) => return Ok(fingerprint(len, hasher.finalize())),
            Ok(n) => {
                hasher.update(&block[..n]);
                len += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

use ort::session::builder::SessionBuilder;

/// The builder set up for `device`, the device it will really use, and why that differs.
fn with_device(
    builder: SessionBuilder,
    device: Device,
) -> (SessionBuilder, Device, Option<String>) {
    let Device::Cuda { device_id } = device else {
        return (builder, Device::Cpu, None);
    };
    match cuda(builder, device_id) {
        (builder, None) => (builder, device, None),
        (builder, Some(reason)) => {
            tracing::warn!(%reason, "CUDA unavailable, the predictor runs on the CPU");
            (builder, Device::Cpu, Some(reason))
        }
    }
}

/// The builder with the CUDA provider registered, or unchanged with the reason it could not be.
#[cfg(feature = "cuda")]
fn cuda(builder: SessionBuilder, device_id: i32) -> (SessionBuilder, Option<String>) {
    // TF32 matrix products off: the model is far too small to gain from them, and they would
    // move the GPU's answers away from the CPU's, on which the thresholds were calibrated.
    let ep = ort::ep::CUDA::default()
        .with_device_id(device_id)
        .with_tf32(false);
    match builder.with_execution_providers([ep.build().error_on_failure()]) {
        Ok(builder) => (builder, None),
        Err(e) => {
            let reason = e.to_string();
            (e.recover(), Some(reason))
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda(builder: SessionBuilder, _device_id: i32) -> (SessionBuilder, Option<String>) {
    (builder, Some("built without the `cuda` feature".to_owned()))
}

/// Checks the shapes; whether the model takes the long baseline as a second input.
fn check_contract(session: &Session, path: &Path) -> Result<bool, Error> {
    let fail = |reason: String| Error::Contract {
        path: path.to_path_buf(),
        reason,
    };
    let (input, second) = match session.inputs() {
        [input] => (input, None),
        [input, second] => (input, Some(second)),
        more => {
            return Err(fail(format!(
                "{} inputs, expected one (window) or two (window, baseline)",
                more.len()
            )));
        }
    };
    let [output] = session.outputs() else {
        return Err(fail(format!(
            "{} outputs, expected one",
            session.outputs().len()
        )));
    };
    let dims = |outlet: &ort::value::Outlet| -> Option<Vec<i64>> {
        outlet
            .dtype()
            .tensor_shape()
            .map(|s| s.iter().copied().collect())
    };
    // As the error says it: `[dynamic, 64, 4]`, or what else the outlet is.
    let shown = |d: &Option<Vec<i64>>| match d {
        Some(d) => format!(
            "[{}]",
            d.iter()
                .map(|n| if *n < 0 {
                    "dynamic".to_owned()
                } else {
                    n.to_string()
                })
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => "none (not a tensor)".to_owned(),
    };
    // -1 is a dynamic dimension. The batch must be one: every class is a row, and a model
    // exported for a fixed batch loads, then fails every tick with another number of classes.
    let fits = |got: &[i64], want: &[i64]| {
        got.len() == want.len()
            && got.iter().zip(want).all(|(g, w)| {
                if *w == -1 {
                    *g == -1
                } else {
                    *g == -1 || g == w
                }
            })
    };
    let batch_hint = |d: &Option<Vec<i64>>| match d {
        Some(d) if d.first().is_some_and(|b| *b >= 0) => {
            " (the batch dimension must be dynamic: each class is a row)"
        }
        _ => "",
    };
    // Every tensor is f32: a model that takes or answers another type loads, then fails its
    // first batch.
    let f32_or = |outlet: &ort::value::Outlet, what: &str| -> Result<(), Error> {
        match outlet.dtype().tensor_type() {
            Some(TensorElementType::Float32) | None => Ok(()),
            Some(other) => Err(fail(format!(
                "{what} `{}` holds {other}, expected f32",
                outlet.name()
            ))),
        }
    };
    let want_in = [-1, WINDOW as i64, N_FEATURES as i64];
    match dims(input) {
        Some(d) if fits(&d, &want_in) => {}
        other => {
            return Err(fail(format!(
                "input `{}` has shape {}, expected [batch, {WINDOW}, {N_FEATURES}]{}",
                input.name(),
                shown(&other),
                batch_hint(&other)
            )));
        }
    }
    f32_or(input, "input")?;
    match dims(output) {
        Some(d) if fits(&d, &[-1, 1]) => {}
        other => {
            return Err(fail(format!(
                "output `{}` has shape {}, expected [batch, 1]{}",
                output.name(),
                shown(&other),
                batch_hint(&other)
            )));
        }
    }
    f32_or(output, "output")?;
    if let Some(second) = second {
        let want = [-1, N_QUANTILES as i64, N_FEATURES as i64];
        match dims(second) {
            Some(d) if fits(&d, &want) => {}
            other => {
                return Err(fail(format!(
                    "second input `{}` has shape {}, expected the long baseline \
                     [batch, {N_QUANTILES}, {N_FEATURES}]{}",
                    second.name(),
                    shown(&other),
                    batch_hint(&other)
                )));
            }
        }
        f32_or(second, "second input")?;
        if second.name() != BASELINE_INPUT {
            tracing::info!(
                input = second.name(),
                "model's second input is not named baseline; feeding it the baseline by position"
            );
        }
    }
    if input.name() != INPUT_NAME || output.name() != OUTPUT_NAME {
        tracing::info!(
            input = input.name(),
            output = output.name(),
            "model's names differ from window/p_anomaly; using them by position"
        );
    }
    Ok(second.is_some())
}

/// The model's [`FEATURES_KEY`] metadata must name [`FEATURES`], in order; a model with a
/// second input must declare the baseline it takes ([`BASELINE_KEY`]).
fn check_features(session: &Session, path: &Path, takes_baseline: bool) -> Result<(), Error> {
    let metadata = session.metadata().map_err(|e| Error::Model {
        path: path.to_path_buf(),
        reason: format!("reading its metadata: {e}"),
    })?;
    let baseline = takes_baseline.then(|| metadata.custom(BASELINE_KEY));
    check_metadata(path, baseline, metadata.custom(FEATURES_KEY))
}

/// [`check_features`] on the values read: `baseline` is `None` for a model with one input,
/// else its [`BASELINE_KEY`] entry. Both entries are judged, so that one error names every
/// entry to mend: a model missing both says so at once.
fn check_metadata(
    path: &Path,
    baseline: Option<Option<String>>,
    features: Option<String>,
) -> Result<(), Error> {
    let found = features.map(|v| parse_features(&v));
    let features_ok = found.as_ref().is_some_and(|f| f.iter().eq(FEATURES.iter()));
    if let Some(declared) = baseline
        && declared.as_deref() != Some(BASELINE_VALUE)
    {
        let also = match &found {
            _ if features_ok => String::new(),
            None => format!(
                ". Its `{FEATURES_KEY}` metadata is missing too; a model trained on the \
                 features [{}] and on the baseline `training/baseline.py` computes is stamped \
                 with both by `python tower-degrade-ai/training/features.py MODEL.onnx`",
                FEATURES.join(", ")
            ),
            Some(found) => format!(
                ". Its `{FEATURES_KEY}` metadata names [{}] too, but the predictor feeds [{}]",
                found.join(", "),
                FEATURES.join(", ")
            ),
        };
        return Err(Error::Contract {
            path: path.to_path_buf(),
            reason: format!(
                "it takes a second input, so its `{BASELINE_KEY}` metadata must be \
                 `{BASELINE_VALUE}` (the long baseline this runtime feeds); found {}{also}",
                declared.map_or("none".to_owned(), |v| format!("`{v}`"))
            ),
        });
    }
    if features_ok {
        return Ok(());
    }
    Err(Error::Features {
        path: path.to_path_buf(),
        expected: FEATURES.iter().map(|&f| f.to_owned()).collect(),
        found,
    })
}

/// The names in a [`FEATURES_KEY`] value.
fn parse_features(value: &str) -> Vec<String> {
    value.split(',').map(|f| f.trim().to_owned()).collect()
}

/// A [`Predictor`] running an ONNX model: once per control tick, one batched inference over
/// every class (`window [n_classes, 64, 8]` -> `p_anomaly [n_classes, 1]`).
///
/// ```no_run
/// use tower_degrade::{ClassConfig, Degrader, predict::PredictorConfig};
/// use tower_degrade_ai::OnnxPredictor;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let predictor = OnnxPredictor::bundled()?;
/// let degrader = Degrader::builder("shop")
///     .class(ClassConfig::gold("payment"))
///     .predictor(predictor, PredictorConfig::default())
///     .build()?;
/// # Ok(()) }
/// ```
pub struct OnnxPredictor {
    session: Session,
    /// Every run's options: their termination flag is how a run is stopped from another
    /// thread ([`Predictor::stop_handle`]).
    run_options: std::sync::Arc<RunOptions>,
    path: PathBuf,
    device: Device,
    fallback_reason: Option<String>,
    /// Per batch row, the class's long baseline, when the model takes it.
    baselines: Option<Vec<Baseline>>,
    /// The `baseline` input, `[batch, N_QUANTILES, N_FEATURES]`.
    baseline_input: Vec<f32>,
    /// [`Predictor::fingerprint`].
    fingerprint: String,
}

impl std::fmt::Debug for OnnxPredictor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxPredictor")
            .field("model", &self.path)
            .field("device", &self.device)
            .field("takes_baseline", &self.takes_baseline())
            .finish_non_exhaustive()
    }
}

impl OnnxPredictor {
    /// A builder for the model at `model`.
    pub fn builder(model: impl Into<PathBuf>) -> OnnxPredictorBuilder {
        OnnxPredictorBuilder {
            model: model.into(),
            source: Source::File,
            device: Device::Cpu,
            threads: 1,
        }
    }

    /// A builder for the model shipped with this crate ([`BUNDLED_MODEL`]).
    pub fn bundled_builder() -> OnnxPredictorBuilder {
        OnnxPredictorBuilder {
            model: PathBuf::from("<bundled p_anomaly.onnx>"),
            source: Source::Bytes(BUNDLED_MODEL),
            device: Device::Cpu,
            threads: 1,
        }
    }

    /// The model shipped with this crate, on the CPU.
    pub fn bundled() -> Result<Self, Error> {
        Self::bundled_builder().build()
    }

    /// Loads the model at `model` to run on the CPU.
    pub fn load(model: impl Into<PathBuf>) -> Result<Self, Error> {
        Self::builder(model).build()
    }

    /// The model file.
    pub fn model_path(&self) -> &Path {
        &self.path
    }

    /// Where inference actually runs.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Why a requested GPU is not used, if it is not.
    pub fn fallback_reason(&self) -> Option<&str> {
        self.fallback_reason.as_deref()
    }

    /// Whether the model takes the long baseline as a second input ([`crate::baseline`]).
    pub fn takes_baseline(&self) -> bool {
        self.baselines.is_some()
    }

    /// The long baseline of batch row `class`, when the model takes it and the row has been
    /// run.
    pub fn baseline(&self, class: usize) -> Option<&Baseline> {
        self.baselines.as_ref()?.get(class)
    }

    /// One batched inference: `input` is `[out.len(), 64, 8]` row-major, one tick of each
    /// class (batch row) in the same order every call. A model that takes the long baseline
    /// learns each row's newest tick into that row's baseline first.
    ///
    /// A row the model answers with something that is not a probability fails the call
    /// ([`Error::Inference`]); as a [`Predictor`], the row's class has no prediction that tick
    /// and the others keep theirs.
    pub fn run(&mut self, input: &[f32], out: &mut [f32]) -> Result<(), Error> {
        self.resume()?;
        self.infer(input, out, true, Rows::Strict)
    }

    /// Clear a stop asked for a run before this one (it was asked while the run ended).
    fn resume(&self) -> Result<(), Error> {
        self.run_options
            .unterminate()
            .map_err(|e| Error::Inference(e.to_string()))
    }

    fn infer(
        &mut self,
        input: &[f32],
        out: &mut [f32],
        learn: bool,
        rows: Rows,
    ) -> Result<(), Error> {
        let batch = out.len();
        if batch == 0 {
            // Nothing to run: ONNX Runtime fails an empty batch, and writes its own error line
            // to stderr first.
            return check_batch(input, 0);
        }
        if self.baselines.is_none() {
            check_batch(input, batch)?;
        }
        let inference = |e: ort::Error| Error::Inference(e.to_string());
        let tensor =
            TensorRef::from_array_view(([batch, WINDOW, N_FEATURES], input)).map_err(inference)?;
        let outputs = match &mut self.baselines {
            None => self
                .session
                .run_with_options(ort::inputs![tensor], &*self.run_options),
            Some(baselines) => {
                learn_batch(baselines, input, batch, learn)?;
                let per_class = N_QUANTILES * N_FEATURES;
                self.baseline_input.resize(batch * per_class, 0.0);
                for (class, b) in baselines.iter().take(batch).enumerate() {
                    b.write(&mut self.baseline_input[class * per_class..][..per_class]);
                }
                let base = TensorRef::from_array_view((
                    [batch, N_QUANTILES, N_FEATURES],
                    &self.baseline_input[..],
                ))
                .map_err(inference)?;
                self.session
                    .run_with_options(ort::inputs![tensor, base], &*self.run_options)
            }
        }
        .map_err(inference)?;
        let (_, p) = outputs[0].try_extract_tensor::<f32>().map_err(inference)?;
        if p.len() != batch {
            return Err(Error::Inference(format!(
                "model answered {} values for a batch of {batch}",
                p.len()
            )));
        }
        for (row, (o, &p)) in out.iter_mut().zip(p).enumerate() {
            *o = if p.is_finite() && (-1e-6..=1.0 + 1e-6).contains(&p) {
                p.clamp(0.0, 1.0)
            } else if rows == Rows::Strict {
                return Err(Error::Inference(format!(
                    "model answered {p} for batch row {row}, not a probability in 0..=1"
                )));
            } else {
                // The runtime reads it as no prediction for this row's class, and says so.
                p
            };
        }
        Ok(())
    }
}

/// What [`OnnxPredictor::infer`] does with a row whose answer is not a probability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rows {
    /// Fail the batch (the public [`OnnxPredictor::run`], and the warm-up: a model that
    /// answers so on a dummy batch is refused).
    Strict,
    /// Pass the value on (a live tick: the runtime reads it as that class's no prediction).
    PassOn,
}

impl Predictor for OnnxPredictor {
    /// One batch, as [`run`](Self::run), except that a row the model answers with something
    /// that is not a probability (a NaN from one class's odd window, say) is passed on as it
    /// is: the runtime reads it as no prediction for that class alone, rather than every
    /// class losing its prediction.
    fn predict(&mut self, input: &[f32], out: &mut [f32]) -> Result<(), BoxError> {
        self.resume()?;
        // Named, as the warm-up's are: the status's `error` and the log say which model.
        self.infer(input, out, true, Rows::PassOn)
            .map_err(|e| format!("{}: {e}", self.path.display()).into())
    }

    /// A dummy batch, which the classes' long baselines do not learn from. Its error names
    /// the model file.
    /// Two batches: every class's window zero-padded (a class's first tick), then a healthy
    /// one (all served within the SLA). A model whose answers are not probabilities is refused
    /// here even when the zeros happen to map into 0..1 (a logit near 0 did, and then failed
    /// on every live tick).
    fn warm_up(&mut self, classes: &[&str]) -> Result<(), BoxError> {
        let mut input = vec![0.0; classes.len() * WINDOW * N_FEATURES];
        let mut out = vec![0.0; classes.len()];
        self.infer(&input, &mut out, false, Rows::Strict)
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        // rate_ratio, success_rate, error_rate, timeout_rate, p50_over_sla, p99_over_sla,
        // inflight_over_little, queue_delay_over_sla
        const HEALTHY: [f32; N_FEATURES] = [1.0, 1.0, 0.0, 0.0, 0.3, 0.6, 1.0, 0.0];
        for tick in input.chunks_exact_mut(N_FEATURES) {
            tick.copy_from_slice(&HEALTHY);
        }
        self.infer(&input, &mut out, false, Rows::Strict)
            .map_err(|e| format!("{}: on a healthy window: {e}", self.path.display()).into())
    }

    /// Sets the runs' termination flag: ONNX Runtime ends the run in progress with an error
    /// at its next check, between operators (a model stuck in one long operator ends with
    /// it). The next batch clears it.
    fn stop_handle(&mut self) -> Option<tower_degrade::predict::StopHandle> {
        let options = self.run_options.clone();
        Some(Box::new(move || {
            let _ = options.terminate();
        }))
    }

    /// The model's file.
    fn name(&self) -> Option<String> {
        Some(self.path.display().to_string())
    }

    /// The model's length and CRC-32: calibrations saved with another model are not restored.
    fn fingerprint(&self) -> Option<String> {
        Some(self.fingerprint.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_features_value_is_the_names_joined_by_commas() {
        assert_eq!(parse_features(&FEATURES.join(",")), FEATURES);
        assert_eq!(parse_features(&FEATURES.join(", ")), FEATURES);
        assert_eq!(parse_features("a,,b"), ["a", "", "b"]);
    }

    #[test]
    fn one_error_names_every_metadata_entry_to_mend() {
        let path = Path::new("m.onnx");
        let features = Some(FEATURES.join(","));
        let baseline = || Some(Some(BASELINE_VALUE.to_owned()));
        // One input: only the features are read.
        assert_eq!(check_metadata(path, None, features.clone()), Ok(()));
        assert_eq!(check_metadata(path, baseline(), features.clone()), Ok(()));
        let Err(Error::Features { found: None, .. }) = check_metadata(path, baseline(), None)
        else {
            panic!("a missing features entry alone is a Features error")
        };
        let reason = |r: Result<(), Error>| match r {
            Err(Error::Contract { reason, .. }) => reason,
            other => panic!("{other:?}"),
        };
        // The baseline alone.
        let alone = reason(check_metadata(path, Some(None), features.clone()));
        assert!(
            alone.contains(BASELINE_KEY) && alone.ends_with("found none"),
            "{alone}"
        );
        // Both missing: one error names both, and the command that stamps both.
        let both = reason(check_metadata(path, Some(None), None));
        assert!(
            both.contains(BASELINE_KEY) && both.contains(FEATURES_KEY),
            "{both}"
        );
        assert!(both.contains("training/features.py MODEL.onnx"), "{both}");
        // Other features: named, and no advice to stamp them over.
        let other = reason(check_metadata(
            path,
            Some(Some("x".into())),
            Some("a,b".into()),
        ));
        assert!(
            other.contains("found `x`") && other.contains("names [a, b]"),
            "{other}"
        );
        assert!(!other.contains("features.py"), "{other}");
    }
}
