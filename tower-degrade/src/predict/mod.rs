//! The failure predictor's plug-in point: features per class per tick, and a [`Predictor`] run
//! once per tick over every class in one batch, off the request path, within a time budget.
//!
//! # Features
//!
//! Eight per class per tick, normalised so that a model trained on one service transfers to
//! another ([`FEATURES`] names them, in order):
//!
//! | # | feature | normalisation |
//! |---|---|---|
//! | 0 | request rate | requests per second over the mean of the class's history, clipped to 0..10 |
//! | 1 | success rate | 0..1 over completed and overdue calls (1 when there are none) |
//! | 2 | error rate | 0..1 |
//! | 3 | timeout rate | 0..1 |
//! | 4 | p50 | over the class SLA, clipped to 0..20 |
//! | 5 | p99 | over the class SLA, clipped to 0..20 |
//! | 6 | in-flight | over what the SLA implies by Little's law (rps × SLA + 1), clipped to 0..20 |
//! | 7 | queueing delay | over the class SLA, clipped to 0..20 |
//!
//! A model sees the last [`WINDOW`] ticks of them: input `[n_classes, 64, 8]` float32, oldest
//! tick first, zero-padded at the start while history is short. It answers `p_anomaly
//! [n_classes, 1]`: the probability of an SLO breach within the next few ticks. Zeros read as
//! an outage (a success rate of 0), so the breaker and the policies use a class's predictions
//! only once it has a whole window of history, and a batch that overran can no longer stand
//! for one made before (from its 68th tick, 34 s at the default tick): before that they are
//! shown (`ClassStatus::prediction`), neither acted on nor learnt by the
//! calibrated threshold. The bundled model and `tower-degrade-ai`'s `ScanPredictor`, which
//! leave the padding out, lose nothing but those first ticks.

mod features;
mod runner;
mod stage;

pub(crate) use self::features::FeatureHistory;
pub use self::features::features;
pub(crate) use self::runner::{Runner, STALE_TICKS};
pub(crate) use self::stage::PredictStage;
use std::time::Duration;

use crate::error::BoxError;

/// Features per tick.
pub const N_FEATURES: usize = 8;
/// Ticks a model sees.
pub const WINDOW: usize = 64;
/// The features' names, in input order.
pub const FEATURES: [&str; N_FEATURES] = [
    "rate_ratio",
    "success_rate",
    "error_rate",
    "timeout_rate",
    "p50_over_sla",
    "p99_over_sla",
    "inflight_over_little",
    "queue_delay_over_sla",
];

/// A failure predictor: one batched inference per tick.
///
/// ```
/// use tower_degrade::predict::{Predictor, N_FEATURES, WINDOW};
///
/// /// Alarm when the newest tick's success rate is below 0.5.
/// struct LastSuccess;
///
/// impl Predictor for LastSuccess {
///     fn predict(&mut self, input: &[f32], out: &mut [f32]) -> Result<(), tower_degrade::BoxError> {
///         for (class, p) in out.iter_mut().enumerate() {
///             let newest = (class * WINDOW + WINDOW - 1) * N_FEATURES;
///             *p = if input[newest + 1] < 0.5 { 1.0 } else { 0.0 };
///         }
///         Ok(())
///     }
/// }
/// ```
pub trait Predictor: Send + 'static {
    /// `input` is `[out.len(), WINDOW, N_FEATURES]` row-major; write each class's probability of
    /// an imminent SLO breach (0.0..=1.0) into `out`.
    fn predict(&mut self, input: &[f32], out: &mut [f32]) -> Result<(), BoxError>;

    /// Called once, before [`warm_up`](Self::warm_up) and on the same thread, with the
    /// degrader's tick, the interval between batches (`DegraderBuilder::tick`). Nothing by
    /// default; a predictor that keeps time in ticks checks it here (the recorder of
    /// `tower-degrade-ai` refuses a tick other than the one it was made for, whose `time_s`
    /// would be off), and one that wraps another passes it on. An error fails the build as a
    /// failed warm-up does.
    fn tick_interval(&mut self, tick: Duration) -> Result<(), BoxError> {
        let _ = tick;
        Ok(())
    }

    /// Called once before the first tick with the classes' names in batch order (load,
    /// allocate, run a dummy batch), on the predictor's thread; building the degrader waits
    /// for it at most [`PredictorConfig::warm_up_timeout`].
    fn warm_up(&mut self, classes: &[&str]) -> Result<(), BoxError> {
        let input = vec![0.0; classes.len() * WINDOW * N_FEATURES];
        let mut out = vec![0.0; classes.len()];
        self.predict(&input, &mut out)
    }

    /// A handle that stops a run in progress from another thread, if the predictor can be
    /// stopped (`None` by default); asked for once, before the warm-up. The runtime stops a
    /// warm-up that runs past [`PredictorConfig::warm_up_timeout`], and a batch still running
    /// once its input is more than a few ticks old (its answer would not be used): the run
    /// should then return an error soon. It is asked again on each later tick while the run
    /// goes on, and when the degrader is dropped with a batch still running; a stop may come
    /// after the run it was meant for ended: clear it when a run begins, so that it does not
    /// stop the next. Without one, such a run keeps its thread busy until it ends, the ticks
    /// going on without predictions meanwhile.
    fn stop_handle(&mut self) -> Option<StopHandle> {
        None
    }

    /// What the runtime's own messages about this predictor call it (a model's file, say):
    /// a warm-up that times out or panics is reported under it. `None` by default.
    fn name(&self) -> Option<String> {
        None
    }

    /// What the classes' calibrated thresholds, learnt from this predictor's scores, are tied
    /// to: a model's identity (`tower-degrade-ai`'s `OnnxPredictor` gives its file's length
    /// and CRC-32), a version. Saved calibrations
    /// ([`Calibrations`](crate::breaker::Calibrations)) are restored only into a degrader whose
    /// predictor gives the same one: another model's scores are another distribution. `None`
    /// by default, which restores what was saved with `None`: give one if what the predictor
    /// scores with can change between runs.
    fn fingerprint(&self) -> Option<String> {
        None
    }
}

/// Stops a predictor's run in progress from another thread ([`Predictor::stop_handle`]).
pub type StopHandle = Box<dyn Fn() + Send + Sync>;

impl std::fmt::Debug for dyn Predictor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("dyn Predictor")
    }
}

/// How the predictor is run. What a prediction does to a class is the breaker's
/// [`BreakerConfig::predict_threshold`](crate::breaker::BreakerConfig::predict_threshold) and
/// [`predict_ticks`](crate::breaker::BreakerConfig::predict_ticks).
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct PredictorConfig {
    /// Time a tick waits for the batch (default 8 ms); past it, the tick keeps the last
    /// predictions and counts `degrade_predictor_overruns_total`. One not shorter than the
    /// tick is logged as a warning when the degrader is built: a slow batch makes every tick
    /// late.
    pub budget: Duration,
    /// Time building the degrader waits for the predictor's warm-up (loading, a dummy batch;
    /// default 30 s); past it, the build fails with an error saying so, rather than hang on a
    /// model or runtime that never answers. (Loading an ONNX file into a session, in
    /// `tower-degrade-ai`'s `OnnxPredictor::load`, happens before, on the caller's thread,
    /// with no limit: ONNX Runtime folds a model's constants then, which a hostile file of a
    /// few hundred bytes can make take minutes and gigabytes. Load models you trust.)
    pub warm_up_timeout: Duration,
}

impl PredictorConfig {
    /// Check the values, as building the degrader does: a budget of 1 µs to 10 s (a tick
    /// waits for it), a warm-up timeout of at most a day.
    pub fn validate(&self) -> Result<(), crate::error::ConfigError> {
        let bad = |field: &'static str, reason: &str| {
            Err(crate::error::ConfigError::InvalidValue {
                field,
                reason: reason.to_owned(),
            })
        };
        if self.budget < Duration::from_micros(1) || self.budget > Duration::from_secs(10) {
            return bad(
                "predictor.budget",
                "must be 1 µs to 10 s: every tick waits for it",
            );
        }
        if self.warm_up_timeout.is_zero() || self.warm_up_timeout > crate::error::MAX_DURATION {
            return bad(
                "predictor.warm_up_timeout",
                "must be non-zero and at most a day",
            );
        }
        Ok(())
    }
}

impl Default for PredictorConfig {
    fn default() -> Self {
        Self {
            budget: Duration::from_millis(8),
            warm_up_timeout: Duration::from_secs(30),
        }
    }
}
