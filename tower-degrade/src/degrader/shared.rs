//! The state shared by a degrader's handle, every layer and service it produces, and the
//! control loop.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::Notify;

use super::Status;
use crate::admit::{CpuSignal, Limiter, LimiterState};
use crate::breaker::{Breaker, Command, State};
use crate::class::{ClassId, Registry};
use crate::control::Stage;
use crate::gate::Gate;
use crate::metrics::{ClassMetrics, LimiterMetrics, ServiceMetrics};
use crate::predict::{FeatureHistory, PredictStage};
use crate::window::{Gauges, History, Shard, WindowReader};

/// The policy engine's stage: the Rhai runtime, or nothing without the `rhai` feature.
#[cfg(feature = "rhai")]
pub(crate) type PolicyStage = crate::policy::Runtime;
/// The policy engine's stage: the Rhai runtime, or nothing without the `rhai` feature.
#[cfg(not(feature = "rhai"))]
pub(crate) type PolicyStage = ();

/// What the control loop (and a manual command) owns of one class.
#[derive(Debug)]
pub(crate) struct ClassControl {
    pub(crate) breaker: Breaker,
    /// The predictor's trial ([`BreakerConfig::predict_shadow`](crate::breaker::BreakerConfig::predict_shadow)):
    /// a shadow of the breaker in `MetricsOnly`, stepped with the predictions while `breaker`
    /// is stepped without them.
    pub(crate) trial: Option<Breaker>,
    pub(crate) reader: WindowReader,
    pub(crate) history: Arc<History>,
    pub(crate) features: FeatureHistory,
    pub(crate) prediction: Option<f64>,
    pub(crate) metrics: Option<ClassMetrics>,
    /// Manual commands applied so far: a tick whose decision was made before one does not
    /// publish it over the command's (`Shared::publish_decided`).
    pub(crate) commands: u64,
}

impl ClassControl {
    /// The control of a class whose calls began after `built` (a stamp of the shards' timer).
    pub(crate) fn new(breaker: Breaker, trial: Option<Breaker>, built: u64) -> Self {
        Self {
            breaker,
            trial,
            reader: WindowReader::starting(built),
            history: Arc::default(),
            features: FeatureHistory::default(),
            prediction: None,
            metrics: None,
            commands: 0,
        }
    }

    /// The breaker the predictions are used by: the trial where the predictor runs as one,
    /// else the breaker in force (its threshold, calibration and record).
    pub(crate) fn predicting(&self) -> &Breaker {
        self.trial.as_ref().unwrap_or(&self.breaker)
    }

    /// [`predicting`](Self::predicting), to change.
    pub(crate) fn predicting_mut(&mut self) -> &mut Breaker {
        self.trial.as_mut().unwrap_or(&mut self.breaker)
    }

    /// Whether the trial is stepped this tick: not while a manual command other than
    /// `MetricsOnly` holds the class (the breaker in force is not stepped either; a reset
    /// resets both).
    pub(crate) fn trial_running(&self) -> bool {
        self.trial.is_some()
            && (!self.breaker.is_manual() || self.breaker.state() == State::MetricsOnly)
    }

    /// A manual command on the class, as the trial takes it: a reset resets it (back in
    /// `MetricsOnly`); any other but `MetricsOnly` interrupts it, as it does the breaker.
    pub(crate) fn command_trial(&mut self, cmd: Command) {
        let Some(trial) = &mut self.trial else {
            return;
        };
        match cmd {
            Command::Reset => {
                trial.command(Command::Reset);
                trial.command(Command::MetricsOnly);
            }
            Command::MetricsOnly => {}
            _ => trial.interrupt(),
        }
    }

    /// What the class would be in: the trial's state where the predictor runs as one (and is
    /// stepped), else the breaker's own shadow ([`Breaker::shadow_state`]).
    pub(crate) fn shadow_state(&self) -> State {
        if self.trial_running() {
            self.predicting().shadow_state()
        } else {
            self.breaker.shadow_state()
        }
    }
}

/// What the control loop owns of admission: the system signal, the limiters' gauges, and
/// their state after the last tick.
#[derive(Debug, Default)]
pub(crate) struct AdmissionControl {
    pub(crate) cpu: Option<(CpuSignal, f64)>,
    pub(crate) metrics: Vec<LimiterMetrics>,
    pub(crate) states: Vec<LimiterState>,
}

/// Stops the control loop.
#[derive(Debug, Default)]
pub(crate) struct Shutdown {
    pub(crate) flag: AtomicBool,
    pub(crate) notify: Notify,
}

impl Shutdown {
    pub(crate) fn trigger(&self) {
        self.flag.store(true, Ordering::Release);
        self.notify.notify_waiters();
        self.notify.notify_one();
    }
}

/// State shared by the degrader handle, every layer and service it produces, and the control
/// loop (which holds it weakly).
pub(crate) struct Shared {
    pub(crate) service: Arc<str>,
    pub(crate) env: Arc<str>,
    pub(crate) registry: Registry,
    pub(crate) names: Arc<[Arc<str>]>,
    /// Per class, what the data path reads.
    pub(crate) gates: Arc<[Gate]>,
    /// Per class, what queue consumers report.
    pub(crate) gauges: Box<[Gauges]>,
    pub(crate) shards: Box<[Arc<Shard>]>,
    /// Admission limiters (empty without admission); the service's first.
    pub(crate) limiters: Arc<[Limiter]>,
    pub(crate) admission: Mutex<AdmissionControl>,
    pub(crate) shard_mask: usize,
    pub(crate) period: Duration,
    /// The predictor's fingerprint (`Predictor::fingerprint`), saved with the calibrations.
    pub(crate) fingerprint: Option<String>,
    pub(crate) control: Box<[Mutex<ClassControl>]>,
    pub(crate) status: ArcSwap<Status>,
    pub(crate) tick: AtomicU64,
    pub(crate) shutdown: Arc<Shutdown>,
    pub(crate) service_metrics: Mutex<Option<ServiceMetrics>>,
    pub(crate) predictor: PredictStage,
    pub(crate) policies: PolicyStage,
    /// A layer has been given a class id of another degrader's (said once).
    pub(crate) foreign_said: std::sync::atomic::AtomicBool,
}

/// What `{:?}` of a degrader, a layer or a service shows: the service and its classes, not
/// every class's history (a derived `Debug` printed 64 windows a class, in every
/// `#[tracing::instrument]`ed function that takes one).
impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Degrader")
            .field("service", &self.service)
            .field("env", &self.env)
            .field("classes", &self.names)
            .field("tick", &self.period)
            .field("ticks", &self.tick.load(Ordering::Relaxed))
            .field("admission", &!self.limiters.is_empty())
            .finish_non_exhaustive()
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.shutdown.trigger();
        live_services(|live| {
            if let Some(n) = live.get_mut(&*self.service) {
                *n -= 1;
                if *n == 0 {
                    live.remove(&*self.service);
                }
            }
        });
    }
}

/// The service names of the degraders alive in this process, with how many have each.
static LIVE: Mutex<Option<std::collections::HashMap<String, usize>>> = Mutex::new(None);

fn live_services<R>(f: impl FnOnce(&mut std::collections::HashMap<String, usize>) -> R) -> R {
    let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    f(live.get_or_insert_with(Default::default))
}

/// Count a new degrader's service name; a name another live degrader has is said once per
/// such degrader: their metrics carry the same labels, so each overwrites the other's gauges.
pub(crate) fn register_service(service: &str) {
    let before = live_services(|live| {
        let n = live.entry(service.to_owned()).or_default();
        *n += 1;
        *n - 1
    });
    if before > 0 {
        tracing::warn!(
            service,
            "another degrader in this process has this service name: their metrics carry the \
             same labels, so each overwrites the other's gauges (breaker state, health score); \
             give each its own name"
        );
    }
}

impl Shared {
    pub(crate) fn control(&self, class: ClassId) -> MutexGuard<'_, ClassControl> {
        // A panic while holding this lock can only come from a bug in this crate; the state it
        // protects stays consistent field by field, so keep serving.
        self.control[class.index()]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The control-loop stages, in the order they run.
    pub(crate) fn stages(&self) -> [&dyn Stage; 2] {
        [&self.predictor, &self.policies]
    }
}
