//! The [`Degrader`]: shared state, the control loop and the manual handle.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::Notify;
use tokio::time::{Instant, MissedTickBehavior};

use crate::breaker::{Breaker, BreakerConfig, Command, State, Transition};
use crate::class::{ClassConfig, ClassId, ConfigError, Registry, Tier};
use crate::clock::{LatencyClock, Timer};
use crate::directive::{Directive, DirectiveCell};
use crate::metrics::{ClassMetrics, ServiceMetrics};
use crate::window::{
    Gauges, History, Shard, TickContext, WindowReader, WindowSnapshot, shard_count,
};

/// The default tick: one window every 500 ms (seed 2.2).
pub const DEFAULT_TICK: Duration = Duration::from_millis(500);

/// What the data path reads of one class: its directive and the permits it hands out.
#[repr(align(128))]
#[derive(Debug)]
pub(crate) struct ClassCell {
    pub(crate) directive: DirectiveCell,
    /// Per-request policy rules, consulted when the directive carries the overlay bit.
    #[cfg(feature = "rhai")]
    pub(crate) overlay: arc_swap::ArcSwapOption<crate::policy::Overlay>,
    pub(crate) probes: AtomicU32,
    pub(crate) seq: AtomicU32,
    pub(crate) timeout: Option<Duration>,
    pub(crate) gauges: Gauges,
}

/// What the control loop (and a manual command) owns of one class.
#[derive(Debug)]
pub(crate) struct ClassControl {
    pub(crate) breaker: Breaker,
    reader: WindowReader,
    pub(crate) history: Arc<History>,
    features: crate::predict::FeatureHistory,
    prediction: Option<f64>,
    metrics: Option<ClassMetrics>,
    #[cfg(feature = "rhai")]
    policy_state: crate::policy::ClassPolicyState,
}

#[derive(Debug, Default)]
struct Shutdown {
    flag: AtomicBool,
    notify: Notify,
}

impl Shutdown {
    fn trigger(&self) {
        self.flag.store(true, Ordering::Release);
        self.notify.notify_waiters();
        self.notify.notify_one();
    }
}

/// State shared by the degrader handle, every layer and service it produces, and the control
/// loop (which holds it weakly).
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) service: Arc<str>,
    pub(crate) env: Arc<str>,
    pub(crate) registry: Registry,
    pub(crate) names: Arc<[Arc<str>]>,
    pub(crate) cells: Box<[ClassCell]>,
    pub(crate) shards: Box<[Arc<Shard>]>,
    pub(crate) shard_mask: usize,
    pub(crate) period: Duration,
    control: Box<[Mutex<ClassControl>]>,
    status: ArcSwap<Status>,
    tick: AtomicU64,
    shutdown: Arc<Shutdown>,
    service_metrics: Mutex<Option<ServiceMetrics>>,
    predictor: Mutex<Option<crate::predict::Runner>>,
    #[cfg(feature = "rhai")]
    pub(crate) policies: crate::policy::Runtime,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

/// A read-only view of the degrader, published once per tick.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Status {
    /// The service name.
    pub service: Arc<str>,
    /// The tick this status was published at (0 before the first tick).
    pub tick: u64,
    /// `degrade_health_score`, 0–100 (see [`Degrader::health_score`]).
    pub health_score: f64,
    /// Every class, the default class first.
    pub classes: Vec<ClassStatus>,
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
    /// In `MetricsOnly`, what the breaker would do; otherwise `state`.
    pub shadow_state: State,
    /// Whether a manual command is in force.
    pub manual: bool,
    /// The directive published for the data path.
    pub directive: Directive,
    /// The last window.
    pub window: WindowSnapshot,
    /// The failure predictor's last probability for the class, when one is attached.
    pub prediction: Option<f64>,
}

/// Builds a [`Degrader`].
#[derive(Debug)]
pub struct Builder {
    service: String,
    classes: Vec<ClassConfig>,
    breaker: BreakerConfig,
    per_class_breaker: Vec<(String, BreakerConfig)>,
    tick: Duration,
    clock: LatencyClock,
    env: String,
    predictor: Option<(
        Box<dyn crate::predict::Predictor>,
        crate::predict::PredictorConfig,
    )>,
    #[cfg(feature = "rhai")]
    policy_limits: crate::policy::Limits,
}

impl Builder {
    /// Add a class. A class named `default` configures the default class.
    pub fn class(mut self, class: ClassConfig) -> Self {
        self.classes.push(class);
        self
    }

    /// The breaker configuration of every class without its own.
    pub fn breaker(mut self, cfg: BreakerConfig) -> Self {
        self.breaker = cfg;
        self
    }

    /// The breaker configuration of one class.
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

    /// Attach a failure predictor: run once per tick over every class, off the request path
    /// (see [`predict`](crate::predict)). It is warmed up when the degrader is built.
    pub fn predictor(
        mut self,
        predictor: impl crate::predict::Predictor,
        config: crate::predict::PredictorConfig,
    ) -> Self {
        self.predictor = Some((Box::new(predictor), config));
        self
    }

    /// The deployment environment (`prod`, `staging`), visible to policies as `ctx.env`.
    pub fn env(mut self, env: impl Into<String>) -> Self {
        self.env = env.into();
        self
    }

    /// The clock that times calls (default: the TSC; see [`LatencyClock`]).
    pub fn latency_clock(mut self, clock: LatencyClock) -> Self {
        self.clock = clock;
        self
    }

    /// The window length and control-loop period (default 500 ms).
    pub fn tick(mut self, tick: Duration) -> Self {
        self.tick = tick;
        self
    }

    fn build_inner(self) -> Result<Arc<Inner>, ConfigError> {
        if self.tick < Duration::from_millis(1) {
            return Err(ConfigError::InvalidValue {
                field: "tick",
                reason: "must be at least 1 ms".into(),
            });
        }
        self.breaker.validate()?;
        let registry = Registry::new(self.classes)?;
        let mut breakers = vec![self.breaker; registry.len()];
        for (name, cfg) in self.per_class_breaker {
            cfg.validate()?;
            breakers[registry.require(&name)?.index()] = cfg;
        }
        let shard_n = shard_count();
        let names: Arc<[Arc<str>]> = registry.iter().map(|(_, c)| Arc::from(c.name())).collect();
        let cells = registry
            .iter()
            .map(|(_, c)| ClassCell {
                directive: DirectiveCell::new(),
                #[cfg(feature = "rhai")]
                overlay: arc_swap::ArcSwapOption::empty(),
                probes: AtomicU32::new(0),
                seq: AtomicU32::new(0),
                timeout: c.call_timeout(),
                gauges: Gauges::default(),
            })
            .collect();
        let control = registry
            .iter()
            .zip(breakers)
            .map(|((_, c), b)| {
                Mutex::new(ClassControl {
                    breaker: Breaker::new(b, c.route()),
                    reader: WindowReader::default(),
                    history: Arc::default(),
                    features: Default::default(),
                    prediction: None,
                    metrics: None,
                    #[cfg(feature = "rhai")]
                    policy_state: Default::default(),
                })
            })
            .collect();
        #[cfg(feature = "rhai")]
        let service_name = self.service.clone();
        let predictor = match self.predictor {
            None => None,
            Some((p, cfg)) => Some(
                crate::predict::Runner::start(
                    p,
                    &registry.iter().map(|(_, c)| c.name()).collect::<Vec<_>>(),
                    cfg,
                )
                .map_err(|e| ConfigError::InvalidValue {
                    field: "predictor",
                    reason: format!("warm-up failed: {e}"),
                })?,
            ),
        };
        let service: Arc<str> = Arc::from(self.service);
        let timer = Timer::new(self.clock);
        let shards = (0..shard_n)
            .map(|_| Arc::new(Shard::new(names.clone(), timer.clone())))
            .collect();
        let inner = Inner {
            status: ArcSwap::from_pointee(Status {
                service: service.clone(),
                tick: 0,
                health_score: 100.0,
                classes: Vec::new(),
            }),
            service,
            env: Arc::from(self.env.as_str()),
            names,
            cells,
            shards,
            shard_mask: shard_n - 1,
            period: self.tick,
            control,
            tick: AtomicU64::new(0),
            shutdown: Arc::default(),
            service_metrics: Mutex::new(None),
            predictor: Mutex::new(predictor),
            #[cfg(feature = "rhai")]
            policies: crate::policy::Runtime::new(
                &registry,
                &service_name,
                &self.env,
                self.policy_limits,
            ),
            registry,
        };
        let inner = Arc::new(inner);
        inner.publish_status();
        Ok(inner)
    }

    /// Build the degrader and spawn its control loop on the current tokio runtime.
    ///
    /// # Panics
    ///
    /// When called outside a tokio runtime (use [`Builder::build_with_worker`] to run the loop
    /// on an executor of your choice).
    pub fn build(self) -> Result<Degrader, ConfigError> {
        let (degrader, worker) = self.build_with_worker()?;
        tokio::spawn(worker);
        Ok(degrader)
    }

    /// Build the degrader and return its control loop as a future for the caller to spawn
    /// (the `Buffer::pair` shape). The loop ends when every handle, layer and service of the
    /// degrader is dropped, or on [`Degrader::shutdown`].
    pub fn build_with_worker(
        self,
    ) -> Result<(Degrader, impl Future<Output = ()> + Send + 'static), ConfigError> {
        let inner = self.build_inner()?;
        let worker = control_loop(Arc::downgrade(&inner), inner.shutdown.clone(), inner.period);
        Ok((Degrader { inner }, worker))
    }
}

async fn control_loop(inner: Weak<Inner>, shutdown: Arc<Shutdown>, period: Duration) {
    let mut interval = tokio::time::interval_at(Instant::now() + period, period);
    interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        if shutdown.flag.load(Ordering::Acquire) {
            return;
        }
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.notify.notified() => return,
        }
        let Some(inner) = inner.upgrade() else { return };
        inner.tick(Instant::now());
    }
}

impl Inner {
    pub(crate) fn control(&self, class: ClassId) -> MutexGuard<'_, ClassControl> {
        // A panic while holding this lock can only come from a bug in this crate; the state it
        // protects stays consistent field by field, so keep serving.
        self.control[class.index()]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// One control-loop tick: snapshot every class, step its breaker, publish its directive.
    pub(crate) fn tick(&self, now: Instant) {
        let tick = self.tick.fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "rhai")]
        let policies = self.policies.current();
        // Pass 1: every class's window, history and features.
        for (id, class) in self.registry.iter() {
            let cell = &self.cells[id.index()];
            let mut ctl = self.control(id);
            let ctl = &mut *ctl;
            let snap = ctl.reader.read(
                &self.shards,
                id.index(),
                &cell.gauges,
                TickContext {
                    tick,
                    period: self.period,
                    sla_micros: class.sla_target().as_micros() as u64,
                },
            );
            Arc::make_mut(&mut ctl.history).push(snap);
            ctl.features.push(&snap, class.sla_target());
        }
        // One batched prediction over every class, within its budget.
        let predictions = self.predict();
        // Pass 2: breakers, policies, directives, metrics.
        for (id, class) in self.registry.iter() {
            let cell = &self.cells[id.index()];
            let mut ctl = self.control(id);
            let ctl = &mut *ctl;
            let snap = ctl.history.latest().copied().unwrap_or_default();
            let prediction = predictions.as_ref().map(|p| f64::from(p[id.index()]));
            ctl.prediction = prediction;
            let transition = ctl.breaker.step_predicted(&snap, prediction, now);
            if let Some(t) = &transition {
                self.on_transition(id, class.tier(), ctl, t);
            }
            #[allow(unused_mut)]
            let mut directive = ctl.breaker.directive(now).pack();
            #[cfg(feature = "rhai")]
            {
                let mut overlay = None;
                // A manual command always wins over policies.
                if let Some(set) = policies.as_ref().filter(|_| !ctl.breaker.is_manual()) {
                    let (d, o) = self.policies.apply(
                        set,
                        id,
                        crate::policy::ClassTick {
                            history: &ctl.history,
                            state: ctl.breaker.state(),
                            prediction,
                        },
                        Directive::unpack(directive),
                        &mut ctl.policy_state,
                    );
                    directive = d.pack().with_overlay(o.is_some());
                    overlay = o.map(Arc::new);
                }
                // The overlay first: a directive with the bit set always finds it.
                cell.overlay.store(overlay);
            }
            cell.directive.store_packed(directive);
            let metrics = ctl.metrics.get_or_insert_with(|| {
                ClassMetrics::new(&self.service, &self.names[id.index()], class.tier())
            });
            metrics.record_tick(
                &snap,
                ctl.reader.last_histogram(),
                ctl.breaker.state(),
                prediction,
            );
        }
        // Registered on the first tick, like the class handles, so a recorder installed after
        // the degrader was built is used.
        self.service_metrics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(|| ServiceMetrics::new(&self.service));
        self.publish_status();
    }

    /// Run the predictor, if any, on every class's feature history; `None` without one.
    fn predict(&self) -> Option<Vec<f32>> {
        let mut guard = self.predictor.lock().unwrap_or_else(|e| e.into_inner());
        let runner = guard.as_mut()?;
        let per_class = crate::predict::WINDOW * crate::predict::N_FEATURES;
        let (outcome, error) = runner.run(|buf| {
            for (id, _) in self.registry.iter() {
                let i = id.index();
                self.control(id)
                    .features
                    .write(&mut buf[i * per_class..(i + 1) * per_class]);
            }
        });
        match outcome {
            crate::predict::Outcome::Fresh => {}
            crate::predict::Outcome::Overrun => {
                crate::metrics::predictor_overrun(&self.service);
            }
            crate::predict::Outcome::Failed => {
                tracing::warn!(service = %self.service, error = error.as_deref().unwrap_or(""), "predictor failed; keeping the last predictions");
            }
        }
        Some(runner.last.clone())
    }

    fn on_transition(&self, id: ClassId, tier: Tier, ctl: &mut ClassControl, t: &Transition) {
        if t.enforced && t.to == State::HalfOpen {
            self.cells[id.index()]
                .probes
                .store(ctl.breaker.config().half_open_probes, Ordering::Release);
        }
        crate::metrics::transition(&self.service, &self.names[id.index()], tier, t);
    }

    fn publish_status(&self) {
        let classes: Vec<ClassStatus> = self
            .registry
            .iter()
            .map(|(id, c)| {
                let ctl = self.control(id);
                ClassStatus {
                    name: self.names[id.index()].clone(),
                    tier: c.tier(),
                    state: ctl.breaker.state(),
                    shadow_state: ctl.breaker.shadow_state(),
                    manual: ctl.breaker.is_manual(),
                    directive: Directive::unpack(self.cells[id.index()].directive.load()),
                    window: ctl.history.latest().copied().unwrap_or_default(),
                    prediction: ctl.prediction,
                }
            })
            .collect();
        let health_score = health_score(&classes);
        if let Some(sm) = &*self
            .service_metrics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
        {
            sm.health(health_score);
        }
        self.status.store(Arc::new(Status {
            service: self.service.clone(),
            tick: self.tick.load(Ordering::Relaxed),
            health_score,
            classes,
        }));
    }
}

/// `degrade_health_score` (seed 4.4): per class, 60 % SLI (share of requests served, by the
/// inner service or a fallback), 25 % breaker state ([`State::health`]) and 15 % manual override
/// (0 while a manual command is in force); classes weighted by their tier's base weight.
fn health_score(classes: &[ClassStatus]) -> f64 {
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

/// The handle to one service's degradation state: build layers from it, run tasks through it,
/// and control and read its breakers.
///
/// Cloning is cheap and every clone, layer and service shares one state (one breaker per class,
/// whatever number of times `Layer::layer` is called).
#[derive(Debug, Clone)]
pub struct Degrader {
    pub(crate) inner: Arc<Inner>,
}

impl Degrader {
    /// Start building a degrader for the service `name`.
    pub fn builder(service: impl Into<String>) -> Builder {
        Builder {
            service: service.into(),
            classes: Vec::new(),
            breaker: BreakerConfig::default(),
            per_class_breaker: Vec::new(),
            tick: DEFAULT_TICK,
            clock: LatencyClock::default(),
            env: String::new(),
            predictor: None,
            #[cfg(feature = "rhai")]
            policy_limits: crate::policy::Limits::default(),
        }
    }

    /// The service name.
    pub fn service(&self) -> &str {
        &self.inner.service
    }

    /// The deployment environment given to the builder (empty by default).
    pub fn env(&self) -> &str {
        &self.inner.env
    }

    /// The configured classes.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// The id of a class by name.
    pub fn class_id(&self, name: &str) -> Result<ClassId, ConfigError> {
        self.inner.registry.require(name)
    }

    /// The status published at the last tick (or after the last manual command).
    pub fn status(&self) -> Arc<Status> {
        self.inner.status.load_full()
    }

    /// `degrade_health_score` at the last tick, 0–100.
    pub fn health_score(&self) -> f64 {
        self.inner.status.load().health_score
    }

    /// The breaker state of a class now.
    pub fn state(&self, class: &str) -> Result<State, ConfigError> {
        let id = self.class_id(class)?;
        Ok(self.inner.control(id).breaker.state())
    }

    /// The last [`HISTORY_LEN`](crate::window::HISTORY_LEN) windows of a class.
    pub fn history(&self, class: &str) -> Result<History, ConfigError> {
        let id = self.class_id(class)?;
        Ok((*self.inner.control(id).history).clone())
    }

    /// Apply a manual command to a class's breaker; it takes effect at once.
    pub fn command(&self, class: &str, cmd: Command) -> Result<State, ConfigError> {
        let id = self.class_id(class)?;
        let now = Instant::now();
        let tier = self.inner.registry.class(id).tier();
        {
            let mut ctl = self.inner.control(id);
            if let Some(t) = ctl.breaker.command(cmd) {
                tracing::warn!(
                    service = %self.inner.service, class, from = %t.from, to = %t.to,
                    reason = %t.reason, "manual breaker command"
                );
                self.inner.on_transition(id, tier, &mut ctl, &t);
            }
            self.inner.cells[id.index()]
                .directive
                .store(ctl.breaker.directive(now));
        }
        self.inner.publish_status();
        self.state(class)
    }

    /// Force a class open: nothing is admitted until [`Degrader::reset`].
    pub fn force_open(&self, class: &str) -> Result<State, ConfigError> {
        self.command(class, Command::ForceOpen)
    }

    /// Force a class closed (breaker disabled): everything is admitted until reset.
    pub fn force_closed(&self, class: &str) -> Result<State, ConfigError> {
        self.command(class, Command::ForceClosed)
    }

    /// Degrade a class by hand until reset.
    pub fn degrade(&self, class: &str) -> Result<State, ConfigError> {
        self.command(class, Command::Degrade)
    }

    /// Put a class in dry-run mode: its breaker decides and reports but enforces nothing.
    pub fn metrics_only(&self, class: &str) -> Result<State, ConfigError> {
        self.command(class, Command::MetricsOnly)
    }

    /// Return a class to automatic control, closed.
    pub fn reset(&self, class: &str) -> Result<State, ConfigError> {
        self.command(class, Command::Reset)
    }

    /// Report a class's queue depth and queueing delay (for queue consumers and admission
    /// queues); it appears in the next window.
    pub fn report_queue(
        &self,
        class: &str,
        depth: u64,
        delay: Duration,
    ) -> Result<(), ConfigError> {
        let id = self.class_id(class)?;
        let g = &self.inner.cells[id.index()].gauges;
        g.queue_depth.store(depth, Ordering::Relaxed);
        g.queue_delay_micros
            .store(delay.as_micros() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Load every `*.rhai` policy in `dir` (once; see [`policy`](crate::policy)) and put the set
    /// in force atomically from the next tick. A bad file rejects the whole load with an error
    /// naming the file, line and reason; the set in force keeps serving. Returns the version.
    #[cfg(feature = "rhai")]
    #[cfg_attr(docsrs, doc(cfg(feature = "rhai")))]
    pub fn load_policies(
        &self,
        dir: impl AsRef<std::path::Path>,
    ) -> Result<u64, crate::policy::PolicyError> {
        let sources = crate::policy::read_dir(dir.as_ref());
        self.install_policies(sources)
    }

    /// Like [`load_policies`](Self::load_policies), from `(name, source text)` pairs.
    #[cfg(feature = "rhai")]
    #[cfg_attr(docsrs, doc(cfg(feature = "rhai")))]
    pub fn load_policy_sources<'a>(
        &self,
        sources: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<u64, crate::policy::PolicyError> {
        let sources = sources
            .into_iter()
            .map(|(name, text)| (name.to_owned(), format!("{name}.rhai"), text.to_owned()))
            .collect();
        self.install_policies(Ok(sources))
    }

    #[cfg(feature = "rhai")]
    fn install_policies(
        &self,
        sources: Result<Vec<(String, String, String)>, crate::policy::PolicyError>,
    ) -> Result<u64, crate::policy::PolicyError> {
        let rt = &self.inner.policies;
        let compiled = sources.and_then(|s| rt.compile(&self.inner.registry, &s));
        rt.count_reload(compiled.is_ok());
        match compiled {
            Ok(set) => {
                let names = set.names().join(", ");
                let version = rt.install(set);
                tracing::info!(service = %self.inner.service, version, policies = %names, "policies loaded");
                Ok(version)
            }
            Err(e) => {
                tracing::warn!(service = %self.inner.service, error = %e, "policy load rejected; the previous set keeps serving");
                Err(e)
            }
        }
    }

    /// Put the previous policy set back in force (from the next tick). Returns its version,
    /// or `None` when there is nothing to roll back to.
    #[cfg(feature = "rhai")]
    #[cfg_attr(docsrs, doc(cfg(feature = "rhai")))]
    pub fn rollback_policies(&self) -> Option<u64> {
        self.inner.policies.rollback()
    }

    /// The policy set in force, if any.
    #[cfg(feature = "rhai")]
    #[cfg_attr(docsrs, doc(cfg(feature = "rhai")))]
    pub fn policies(&self) -> Option<Arc<crate::policy::PolicySet>> {
        self.inner.policies.current()
    }

    /// Stop the control loop now. Directives stay as last published.
    pub fn shutdown(&self) {
        self.inner.shutdown.trigger();
    }

    /// Run one control-loop tick now, as the loop would. For tests and benchmarks that drive
    /// the loop by hand (with [`Builder::build_with_worker`] and the worker not spawned).
    pub fn tick_now(&self) {
        self.inner.tick(Instant::now());
    }
}
