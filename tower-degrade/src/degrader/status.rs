//! The read-only view of a degrader published once per tick, and its health score.

use std::sync::Arc;

use crate::breaker::{PredictionRecord, State};
use crate::class::Tier;
use crate::gate::Directive;
use crate::window::WindowSnapshot;

/// A read-only view of the degrader, published once per tick.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Status {
    /// The service name.
    pub service: Arc<str>,
    /// Ticks run when this status was published (0 before the first tick): one more than
    /// the [`tick`](crate::window::WindowSnapshot::tick) of the window that tick closed, which
    /// counts from 0.
    pub tick: u64,
    /// The control loop has stopped for good ([`Degrader::shutdown`](super::Degrader::shutdown)):
    /// `tick` no longer moves, and every class admits its calls.
    pub stopped: bool,
    /// `degrade_health_score`, 0–100 (see [`Degrader::health_score`](super::Degrader::health_score)).
    pub health_score: f64,
    /// Every class, the default class first.
    pub classes: Vec<ClassStatus>,
    /// Every admission limiter after the last tick, the service's first (empty without
    /// [admission](crate::admit)).
    pub admission: Vec<crate::admit::LimiterState>,
    /// What the failure predictor did on the last tick; `None` without one. A class's
    /// `prediction` of `None` reads the same whether the model has not answered yet, fails or
    /// is stalled: this says which.
    pub predictor: Option<PredictorStatus>,
}

/// The failure predictor in a [`Status`].
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct PredictorStatus {
    /// What the last tick's batch did (`None` before the first tick).
    pub last_batch: Option<PredictorBatch>,
    /// While the predictor fails: its last error (cleared when it answers again).
    pub error: Option<Arc<str>>,
    /// The classes whose last answer from the model was not a probability (NaN, infinite,
    /// outside 0..=1), and so have no prediction (`degrade_predictor_invalid_total`).
    pub not_probabilities: Vec<Arc<str>>,
    /// Batches that failed since the degrader started (`degrade_predictor_failures_total`):
    /// with [`last_error`](Self::last_error), a model that fails on some ticks and answers on
    /// others shows here when the last tick's batch looks fine.
    pub failed_batches: u64,
    /// Batches over the budget since the degrader started (`degrade_predictor_overruns_total`).
    pub overrun_batches: u64,
    /// The last error the predictor failed with, kept after it answers again.
    pub last_error: Option<Arc<str>>,
    /// Ticks since the degrader started that read their windows a whole tick (and 100 ms) or
    /// more after the last (the tick before ran long, or the process stalled): their windows
    /// span two ticks or more, and no prediction whose input holds one is used
    /// (`degrade_control_late_ticks_total`).
    pub late_ticks: u64,
    /// Ticks until every class's predictions are used again, from this one: its input is
    /// still zero-padded (a class's first ticks) or holds a window read late (0 once none
    /// does).
    pub unused_ticks_left: u32,
}

/// What one tick's batch of predictions did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PredictorBatch {
    /// It answered within its budget: new predictions.
    Fresh,
    /// Over its budget, or still busy with an earlier batch: the last predictions stand while
    /// they are at most a few ticks old (`degrade_predictor_overruns_total`).
    Overrun,
    /// The model failed or its thread stopped: no prediction
    /// (`degrade_predictor_failures_total`).
    Failed,
}

impl PredictorBatch {
    /// `fresh`, `overrun` or `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fresh => "fresh",
            Self::Overrun => "overrun",
            Self::Failed => "failed",
        }
    }
}

/// One class in a [`Status`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClassStatus {
    /// The class name.
    pub name: Arc<str>,
    /// The class tier.
    pub tier: Tier,
    /// The breaker state in force.
    pub state: State,
    /// What the breaker would do: for a class whose predictor runs as a trial
    /// ([`BreakerConfig::predict_shadow`](crate::breaker::BreakerConfig::predict_shadow)),
    /// the trial's state (the state with the predictor acting, in `MetricsOnly` too); in
    /// `MetricsOnly` otherwise, its shadow's; otherwise (under another manual command, or
    /// with neither) `state`.
    pub shadow_state: State,
    /// Whether a manual command is in force.
    pub manual: bool,
    /// The directive published for the data path.
    pub directive: Directive,
    /// The last window.
    pub window: WindowSnapshot,
    /// The failure predictor's last probability for the class, when one is attached.
    pub prediction: Option<f64>,
    /// The probability at or above which a prediction counts (fixed, or calibrated for the
    /// class); `None` without a predictor or while [`calibrating`](Self::calibrating). A
    /// calibrated one above 0.999999 is beyond every probability (they are compared clamped
    /// to 1 - 1e-6): the model scores this class's healthy ticks at 1, or a few healthy scores
    /// far above the rest lifted the fitted tail until newer ones replace them, and it cannot
    /// warn of the class meanwhile (logged once as a warning).
    pub prediction_threshold: Option<f64>,
    /// A predictor is attached and the class's threshold does not hold yet (it is warming
    /// up, or a restored calibration settles): the predictor only reports, it does not
    /// degrade the class.
    pub calibrating: bool,
    /// While [`calibrating`](Self::calibrating): the healthy scores still to come before its
    /// threshold holds (the warm-up's, learnt, or the settling of a calibration restored with
    /// [`DegraderBuilder::restore_calibrations`](crate::DegraderBuilder::restore_calibrations),
    /// passed unlearnt), each taken 40 healthy ticks after its own.
    pub calibration_left: Option<u32>,
    /// With a predictor attached: the class's calibrated threshold started from saved
    /// calibrations
    /// ([`DegraderBuilder::restore_calibrations`](crate::DegraderBuilder::restore_calibrations))
    /// rather than a warm-up in this process. A class the saved file did not hold, or saved by
    /// another service, at another tick or from another predictor (refused, with a warning
    /// in the log), warms up afresh and reads `false`.
    pub calibration_restored: bool,
    /// With a predictor attached: how the class's predictions turned out so far (warnings
    /// confirmed, false alarms, breaches missed, the last lead).
    pub prediction_record: Option<PredictionRecord>,
    /// The class's predictor runs as a trial
    /// ([`BreakerConfig::predict_shadow`](crate::breaker::BreakerConfig::predict_shadow)):
    /// it warns and keeps its record in [`shadow_state`](Self::shadow_state), and the rules
    /// alone act on the class.
    pub predict_trial: bool,
}

/// `degrade_health_score` (seed 4.4): per class, 60 % SLI (share of requests served, by the
/// inner service or a fallback), 25 % breaker state ([`State::health`]) and 15 % manual override
/// (0 while a manual command is in force); classes weighted by their tier's base weight.
pub(crate) fn health_score(classes: &[ClassStatus]) -> f64 {
    let (mut sum, mut weights) = (0.0, 0.0);
    for c in classes {
        let w = c.tier.base_weight();
        let manual = if c.manual { 0.0 } else { 1.0 };
        sum += w * (0.60 * c.window.served_rate() + 0.25 * c.state.health() + 0.15 * manual);
        weights += w;
    }
    if weights == 0.0 {
        100.0
    } else {
        (100.0 * sum / weights).clamp(0.0, 100.0)
    }
}
