//! [`DegraderBuilder`]: classes, breaker settings, stages and the tick, validated once.

use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;

use super::shared::{AdmissionControl, ClassControl, PolicyStage, Shared};
use super::{Degrader, Status};
use crate::admit::{Admission, CpuSignal, Limiter};
use crate::breaker::{Breaker, BreakerConfig, Calibrations, Command};
use crate::class::{ClassConfig, ClassId, Registry, Tier};
use crate::clock::{LatencyClock, Timer};
use crate::error::{ConfigError, escape_cut};
use crate::gate::Gate;
use crate::predict::{PredictStage, Predictor, PredictorConfig, Runner};
use crate::window::{Gauges, Shard, Slots, shard_count};

/// Log the class settings that are valid but seldom what was meant, once, at build.
fn warn_doubtful(service: &str, registry: &Registry) {
    for (id, c) in registry.iter() {
        if id == ClassId::DEFAULT && c.tier() == Tier::Gold {
            tracing::warn!(
                service = %service,
                "the `default` class is gold: every call no rule classifies (a path no route \
                 names, a scanner's 404s) is admitted with gold's priority and counts in gold's \
                 breaker; give it a lower tier unless all of this service's work is gold"
            );
        }
        if let Some(timeout) = c.call_timeout().filter(|&t| t < c.sla_target()) {
            tracing::warn!(
                service = %service,
                class = %c.name(),
                timeout_ms = timeout.as_secs_f64() * 1e3,
                sla_ms = c.sla_target().as_secs_f64() * 1e3,
                "the class's timeout is shorter than its SLA: its calls are cut before they can \
                 be slow, so its breaker sees slowness only as timeouts and its latency never \
                 breaches; set the SLA to what the work takes at worst when healthy, at most \
                 the timeout"
            );
        }
    }
}

/// Restore the classes' calibrations from `saved` where it was learnt by this service at
/// `tick` from the predictor `fingerprint` names (`DegraderBuilder::restore_calibrations`).
fn restore(
    service: &str,
    registry: &Registry,
    control: &[Mutex<ClassControl>],
    saved: Calibrations,
    tick: Duration,
    fingerprint: Option<&str>,
) {
    let shown = |text: Option<&str>| text.map_or("none".into(), |t| escape_cut(t, 120));
    if saved.service != service {
        tracing::warn!(
            service,
            saved = %escape_cut(&saved.service, 120),
            "calibrations saved by another service are not restored: every class calibrates \
             afresh"
        );
        return;
    }
    if saved.tick != tick {
        tracing::warn!(
            service,
            saved_tick_ms = saved.tick.as_secs_f64() * 1e3,
            tick_ms = tick.as_secs_f64() * 1e3,
            "calibrations saved at another tick are not restored: every class calibrates afresh"
        );
        return;
    }
    if saved.predictor.as_deref() != fingerprint {
        tracing::warn!(
            service,
            saved = %shown(saved.predictor.as_deref()),
            predictor = %shown(fingerprint),
            "calibrations learnt from another predictor (or with none attached) are not \
             restored: every class calibrates afresh"
        );
        return;
    }
    let (mut restored, mut fixed, mut left_out) = (0, 0, Vec::new());
    for (name, learnt) in saved.classes {
        match registry.require(&name) {
            Ok(id) => {
                let mut ctl = control[id.index()]
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if ctl.predicting_mut().restore(learnt, tick) {
                    restored += 1;
                } else {
                    fixed += 1;
                }
            }
            Err(_) => left_out.push(name),
        }
    }
    let first_left_out: Vec<String> = left_out.iter().take(8).map(|n| escape_cut(n, 64)).collect();
    tracing::info!(
        service,
        restored,
        fixed_threshold = fixed,
        left_out = left_out.len(),
        ?first_left_out,
        "calibrations restored (classes with a fixed threshold now, or not in this degrader, \
         left out)"
    );
}

/// The default tick: one window every 500 ms (seed 2.2).
pub const DEFAULT_TICK: Duration = Duration::from_millis(500);

/// Builds a [`Degrader`]; start with [`Degrader::builder`].
#[derive(Debug)]
#[must_use = "a setting or builder does nothing until it is passed on or built"]
pub struct DegraderBuilder {
    service: String,
    classes: Vec<ClassConfig>,
    default_class: Option<ClassConfig>,
    breaker: BreakerConfig,
    per_class_breaker: Vec<(String, BreakerConfig)>,
    tick: Duration,
    clock: LatencyClock,
    env: String,
    predictor: Option<(Box<dyn Predictor>, PredictorConfig)>,
    admission: Option<Admission>,
    restore: Option<Calibrations>,
    #[cfg(feature = "rhai")]
    policy_limits: crate::policy::Limits,
    #[cfg(feature = "rhai")]
    policy_overlap: crate::policy::Overlap,
}

impl DegraderBuilder {
    pub(super) fn new(service: String) -> Self {
        Self {
            service,
            classes: Vec::new(),
            default_class: None,
            breaker: BreakerConfig::default(),
            per_class_breaker: Vec::new(),
            tick: DEFAULT_TICK,
            clock: LatencyClock::default(),
            env: String::new(),
            predictor: None,
            admission: None,
            restore: None,
            #[cfg(feature = "rhai")]
            policy_limits: crate::policy::Limits::default(),
            #[cfg(feature = "rhai")]
            policy_overlap: crate::policy::Overlap::default(),
        }
    }

    /// Start each class's calibrated prediction threshold where `saved` left it (from
    /// [`Degrader::calibrations`] in an earlier process, through [`Calibrations::save`] and
    /// [`Calibrations::load`]) rather than warm up again: a restored class reports only for
    /// its first [`RESTORED_SETTLE_TICKS`](crate::breaker::RESTORED_SETTLE_TICKS) healthy
    /// scores, while the predictor's window of it fills, in place of the warm-up's 3,600, and
    /// learns none of its first
    /// [`RESTORED_UNLEARNT_TICKS`](crate::breaker::RESTORED_UNLEARNT_TICKS), while the
    /// predictor's long baseline of it fills. Its settings are this build's (a new
    /// false-trip budget applies at once).
    ///
    /// Nothing is restored, with a warning, where `saved` was learnt by another service, at
    /// another tick or from another predictor ([`Predictor::fingerprint`]): the scores it learnt are not those the
    /// classes will get. A class `saved` does not have warms up; one this degrader does not
    /// have is left out.
    pub fn restore_calibrations(mut self, saved: Calibrations) -> Self {
        self.restore = Some(saved);
        self
    }

    /// Add a class. The name `default` is reserved for the class of unclassified calls: set
    /// that one with [`default_class`](Self::default_class).
    pub fn class(mut self, class: ClassConfig) -> Self {
        self.classes.push(class);
        self
    }

    /// Configure the class that receives every call no classifier rule matched (default: a
    /// bronze class with the `reject` route). Its name is always `default`, whatever `class`
    /// is called. A gold one is logged as a warning at build: every unclassified call (a path
    /// no route names, a scanner's 404s) would then have gold's priority.
    pub fn default_class(mut self, class: ClassConfig) -> Self {
        self.default_class = Some(class);
        self
    }

    /// The breaker configuration of every class without its own.
    pub fn breaker(mut self, cfg: BreakerConfig) -> Self {
        self.breaker = cfg;
        self
    }

    /// The breaker configuration of one class (once per class: a second is an error at build,
    /// rather than one silently replacing the other).
    pub fn class_breaker(mut self, class: impl Into<String>, cfg: BreakerConfig) -> Self {
        self.per_class_breaker.push((class.into(), cfg));
        self
    }

    /// The limits applied to every policy call.
    #[cfg(feature = "rhai")]
    #[cfg_attr(docsrs, doc(cfg(feature = "rhai")))]
    pub fn policy_limits(mut self, limits: crate::policy::Limits) -> Self {
        self.policy_limits = limits;
        self
    }

    /// What a load does when two policy files govern the same class at the same priority
    /// (a stale `good.old.rhai` beside `good.rhai`): a warning (the default) or an error.
    #[cfg(feature = "rhai")]
    #[cfg_attr(docsrs, doc(cfg(feature = "rhai")))]
    pub fn policy_overlap(mut self, overlap: crate::policy::Overlap) -> Self {
        self.policy_overlap = overlap;
        self
    }

    /// Attach a failure predictor: run once per tick over every class, off the request path
    /// (see [`predict`](crate::predict)). It is warmed up when the degrader is built.
    pub fn predictor(mut self, predictor: impl Predictor, config: PredictorConfig) -> Self {
        self.predictor = Some((Box::new(predictor), config));
        self
    }

    /// The deployment environment (`prod`, `staging`), visible to policies as `ctx.env`: at
    /// most 128 bytes, no control character.
    pub fn env(mut self, env: impl Into<String>) -> Self {
        self.env = env.into();
        self
    }

    /// The clock that times calls (default: the TSC; see [`LatencyClock`]).
    pub fn latency_clock(mut self, clock: LatencyClock) -> Self {
        self.clock = clock;
        self
    }

    /// Turn on priority admission under overload (off by default): an adaptive concurrency
    /// limit, and a priority queue for calls that find it reached. See [`admit`](crate::admit).
    pub fn admission(mut self, admission: Admission) -> Self {
        self.admission = Some(admission);
        self
    }

    /// The window length and control-loop period (default 500 ms; 10 ms to an hour).
    pub fn tick(mut self, tick: Duration) -> Self {
        self.tick = tick;
        self
    }

    fn build_shared(self) -> Result<Arc<Shared>, ConfigError> {
        check_service_and_tick(&self.service, self.tick)?;
        check_env(&self.env)?;
        #[cfg(feature = "rhai")]
        self.policy_limits.validate()?;
        if let Some((_, config)) = &self.predictor {
            config.validate()?;
            if config.budget >= self.tick {
                tracing::warn!(service = %self.service, budget_ms = config.budget.as_secs_f64() * 1e3,
                    tick_ms = self.tick.as_secs_f64() * 1e3,
                    "the predictor's budget is not shorter than the tick: a slow batch makes every \
                     tick late (a budget of a few ms is what the bundled model needs)");
            }
        }
        self.breaker.validate()?;
        let registry = Registry::new(self.default_class, self.classes)?;
        let mut breakers = vec![self.breaker; registry.len()];
        let mut given = vec![false; registry.len()];
        for (name, cfg) in self.per_class_breaker {
            // Which class's breaker is wrong, not only which field.
            cfg.validate().map_err(|e| match e {
                ConfigError::InvalidValue { field, reason } => ConfigError::InvalidClass {
                    class: name.clone(),
                    field,
                    reason,
                },
                other => other,
            })?;
            let i = registry.require(&name)?.index();
            if std::mem::replace(&mut given[i], true) {
                return Err(ConfigError::InvalidClass {
                    class: name,
                    field: "class_breaker",
                    reason: "is given twice: which one was meant?".into(),
                });
            }
            breakers[i] = cfg;
        }
        let names: Arc<[Arc<str>]> = registry.iter().map(|(_, c)| Arc::from(c.name())).collect();
        let (limiters, class_limiter, cpu) = match &self.admission {
            None => (Vec::new(), vec![NO_LIMITER; registry.len()], None),
            Some(a) => {
                a.validate()?;
                check_dependency_limiters(a, &registry)?;
                let mut limiters = vec![Limiter::new(Arc::from(SERVICE_LIMITER), a.limit)];
                let mut class_limiter = Vec::with_capacity(registry.len());
                for (_, c) in registry.iter() {
                    let dependency = c.dependencies().first().filter(|_| a.per_dependency);
                    let i = match dependency {
                        None => 0,
                        Some(d) => match limiters.iter().position(|l| &*l.name == d.as_str()) {
                            Some(i) => i,
                            None => {
                                limiters.push(Limiter::new(Arc::from(d.as_str()), a.limit));
                                limiters.len() - 1
                            }
                        },
                    };
                    // Below the "no limiter" mark (check_dependency_limiters).
                    let l = u8::try_from(i).ok().filter(|&l| l != NO_LIMITER);
                    class_limiter.push(l.ok_or_else(|| ConfigError::InvalidValue {
                        field: "admission.per_dependency",
                        reason: "too many dependencies".into(),
                    })?);
                }
                let cpu = a.cpu_threshold.map(|t| (CpuSignal::default(), t));
                (limiters, class_limiter, cpu)
            }
        };
        let limiters: Arc<[Limiter]> = limiters.into();
        let class_limiter: Arc<[u8]> = class_limiter.into();
        let gates: Arc<[Gate]> = registry
            .iter()
            .map(|(id, c)| {
                let l = class_limiter[id.index()];
                Gate::new(c, (l != NO_LIMITER).then_some(l))
            })
            .collect();
        let timer = Timer::new(self.clock);
        // Nothing is in flight before the degrader exists.
        let built = timer.start();
        let attached = self.predictor.is_some();
        let control: Box<[Mutex<ClassControl>]> = registry
            .iter()
            .zip(breakers)
            .map(|((_, c), b)| {
                // A class whose predictor runs as a trial: its shadow, stepped with the
                // predictions in `MetricsOnly`, beside the breaker in force.
                if b.predict_shadow && !attached {
                    tracing::warn!(
                        class = c.name(),
                        "predict_shadow is set but no predictor is attached: there is nothing \
                         to run as a trial"
                    );
                }
                let trial = (attached && b.predict_shadow).then(|| {
                    let mut t = Breaker::new(b.clone(), c.route()).with_tick(self.tick);
                    t.command(Command::MetricsOnly);
                    t
                });
                Mutex::new(ClassControl::new(
                    Breaker::new(b, c.route()).with_tick(self.tick),
                    trial,
                    built,
                ))
            })
            .collect();
        let fingerprint = self.predictor.as_ref().and_then(|(p, _)| p.fingerprint());
        if let Some(saved) = self.restore {
            restore(
                &self.service,
                &registry,
                &control,
                saved,
                self.tick,
                fingerprint.as_deref(),
            );
        }
        let runner = match self.predictor {
            None => None,
            Some((p, cfg)) => {
                let classes: Vec<&str> = registry.iter().map(|(_, c)| c.name()).collect();
                Some(Runner::start(p, &classes, cfg, self.tick).map_err(|e| {
                    ConfigError::InvalidValue {
                        field: "predictor",
                        reason: format!("warm-up failed: {e}"),
                    }
                })?)
            }
        };
        #[cfg(feature = "rhai")]
        let policies: PolicyStage = crate::policy::Runtime::new(
            &registry,
            &self.service,
            &self.env,
            self.policy_limits,
            self.policy_overlap,
        );
        #[cfg(not(feature = "rhai"))]
        let policies: PolicyStage = ();
        let service: Arc<str> = Arc::from(self.service);
        let shard_n = shard_count();
        let abandon: Arc<[u64]> = registry
            .iter()
            .map(|(_, c)| {
                c.abandon_after().map_or(u64::MAX, |d| {
                    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
                })
            })
            .collect();
        let slots: Arc<[Slots]> = registry
            .iter()
            .map(|(_, c)| Slots::new(&timer, self.tick, c.abandon_after()))
            .collect();
        let shards = (0..shard_n)
            .map(|_| {
                Arc::new(Shard::new(
                    service.clone(),
                    names.clone(),
                    abandon.clone(),
                    timer.clone(),
                    slots.clone(),
                    limiters.clone(),
                    class_limiter.clone(),
                    gates.clone(),
                ))
            })
            .collect();
        let shared = Shared {
            status: ArcSwap::from_pointee(Status {
                service: service.clone(),
                tick: 0,
                stopped: false,
                health_score: 100.0,
                classes: Vec::new(),
                admission: Vec::new(),
                predictor: runner.is_some().then(Default::default),
            }),
            predictor: PredictStage::new(runner, service.clone()),
            service,
            env: Arc::from(self.env.as_str()),
            gauges: registry.iter().map(|_| Gauges::default()).collect(),
            names,
            gates,
            shards,
            admission: Mutex::new(AdmissionControl {
                cpu,
                ..AdmissionControl::default()
            }),
            limiters,
            shard_mask: shard_n - 1,
            period: self.tick,
            fingerprint,
            control,
            tick: AtomicU64::new(0),
            shutdown: Arc::default(),
            service_metrics: Mutex::new(None),
            policies,
            registry,
            foreign_said: std::sync::atomic::AtomicBool::new(false),
        };
        // Once nothing can refuse the build.
        warn_doubtful(&shared.service, &shared.registry);
        let shared = Arc::new(shared);
        super::shared::register_service(&shared.service);
        shared.publish_status();
        Ok(shared)
    }

    /// Build the degrader and spawn its control loop on the current tokio runtime. The loop
    /// lives as long as that runtime: a degrader that outlives it (a `static` shared by
    /// `#[tokio::test]`s, each with a runtime of its own) stops ticking, so its breakers no
    /// longer move. Build one per runtime, or spawn [`build_with_worker`](Self::build_with_worker)'s
    /// loop on the runtime that lasts.
    ///
    /// # Blocking
    ///
    /// With a [predictor](Self::predictor), `build` waits on the calling thread for its
    /// warm-up batches (up to `PredictorConfig::warm_up_timeout`, 30 s by default; a model
    /// loads in milliseconds to a few seconds): from async code, build before serving, or in
    /// `spawn_blocking`.
    ///
    /// # Panics
    ///
    /// When called outside a tokio runtime (use [`build_with_worker`](Self::build_with_worker)
    /// to run the loop yourself: it needs tokio's timers and `spawn_blocking`).
    pub fn build(self) -> Result<Degrader, ConfigError> {
        let (degrader, worker) = self.build_with_worker()?;
        tokio::spawn(worker);
        Ok(degrader)
    }

    /// Build the degrader and return its control loop as a future for the caller to spawn
    /// (the `Buffer::pair` shape). The loop ends when every handle, layer and service of the
    /// degrader is dropped, or on [`Degrader::shutdown`]. Spawn it on a tokio runtime: it
    /// ticks on tokio's timers and runs each tick in `spawn_blocking`. Blocks like
    /// [`build`](Self::build) with a predictor.
    ///
    /// Dropped without being spawned, nothing ticks: no window closes, no breaker opens, and
    /// nothing says so (a user's copy of an example that dropped it served 350 straight 500s
    /// at tick 0), unless the caller ticks by hand with [`Degrader::tick_now`], as tests that
    /// drive time themselves do. Use [`build`](Self::build) unless you spawn it yourself.
    pub fn build_with_worker(
        self,
    ) -> Result<(Degrader, impl Future<Output = ()> + Send + 'static), ConfigError> {
        let shared = self.build_shared()?;
        let worker = crate::control::run(
            Arc::downgrade(&shared),
            shared.shutdown.clone(),
            shared.period,
        );
        Ok((Degrader { shared }, worker))
    }
}

/// The service's name and the tick, as [`DegraderBuilder::build`] checks them (the
/// configuration file checks them before building).
pub(crate) fn check_service_and_tick(service: &str, tick: Duration) -> Result<(), ConfigError> {
    if service.trim().is_empty() {
        return Err(ConfigError::InvalidValue {
            field: "service",
            reason: "must not be empty: it labels every metric".into(),
        });
    }
    if service.len() > 128 {
        return Err(ConfigError::InvalidValue {
            field: "service",
            reason: format!(
                "is {} bytes: at most 128, as it labels every metric and log line",
                service.len()
            ),
        });
    }
    if service.chars().any(char::is_control) {
        return Err(ConfigError::InvalidValue {
            field: "service",
            reason: format!(
                "{:?} holds a control character: it labels every metric and log line, \
                     where a newline would start a forged one",
                service
            ),
        });
    }
    if tick < MIN_TICK || tick > Duration::from_secs(3600) {
        return Err(ConfigError::InvalidValue {
            field: "tick",
            reason: "must be 10 ms to an hour: a shorter tick runs the control loop (every \
                     class's window, breaker and policies) more often than it keeps up with"
                .into(),
        });
    }
    Ok(())
}

/// The shortest tick: at 1 ms, 200 classes pinned a core and ticked 191 times a second (a
/// hostile trial, a debug build).
const MIN_TICK: Duration = Duration::from_millis(10);

/// The deployment environment, as [`DegraderBuilder::build`] checks it: a short line of text
/// that policies read and log (`ctx.env`), as the service's name.
pub(crate) fn check_env(env: &str) -> Result<(), ConfigError> {
    if env.len() > 128 || env.chars().any(char::is_control) {
        return Err(ConfigError::InvalidValue {
            field: "env",
            reason: format!(
                "{:?} must be at most 128 bytes with no control character: policies read it \
                 and write it into log lines, where a newline would start a forged one",
                crate::error::escape_cut(env, 64)
            ),
        });
    }
    Ok(())
}

/// The name of the service-wide admission limiter.
const SERVICE_LIMITER: &str = "service";

/// A class's limiter index meaning "no limiter" (admission off).
const NO_LIMITER: u8 = u8::MAX;

/// With one limiter per dependency, at most 254 dependencies (the service's limiter is the
/// first, and the index after the last marks a class with none).
pub(crate) fn check_dependency_limiters(
    admission: &Admission,
    registry: &Registry,
) -> Result<(), ConfigError> {
    if !admission.per_dependency {
        return Ok(());
    }
    let firsts: std::collections::HashSet<&String> = registry
        .iter()
        .filter_map(|(_, c)| c.dependencies().first())
        .collect();
    if firsts.iter().any(|d| d.as_str() == SERVICE_LIMITER) {
        return Err(ConfigError::InvalidValue {
            field: "admission.per_dependency",
            reason: format!(
                "a dependency called `{SERVICE_LIMITER}` would share the service's own limiter \
                 (and its name): rename it"
            ),
        });
    }
    if firsts.len() >= usize::from(NO_LIMITER) {
        return Err(ConfigError::InvalidValue {
            field: "admission.per_dependency",
            reason: format!(
                "{} dependencies are the first of a class: one limiter each is at most {}",
                firsts.len(),
                NO_LIMITER - 1
            ),
        });
    }
    Ok(())
}
