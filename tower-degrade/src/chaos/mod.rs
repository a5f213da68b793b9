//! Fault injection (feature `chaos`): latency, errors, aborts and hangs per class, per
//! dependency or per route, at set rates from a seeded stream, switchable at run time.
//!
//! A [`Chaos`] handle holds the faults in force; [`Chaos::layer`] makes a [`ChaosLayer`] that
//! sits **inside** the degrade layer, so the faults it injects are seen by the windows, the
//! breakers, the policies and the predictor exactly like a real dependency's:
//!
//! ```
//! use std::time::Duration;
//! use tower_degrade::chaos::{Chaos, Fault, Target};
//! use tower_degrade::{ClassConfig, Degrader};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let degrader = Degrader::builder("shop")
//!     .class(ClassConfig::gold("payment").depends_on("db"))
//!     .class(ClassConfig::silver("inventory").depends_on("db"))
//!     .build()?;
//! let classify = degrader
//!     .http_classifier()
//!     .route(None, "/pay/{id}", "payment")?
//!     .route(None, "/inventory/{sku}", "inventory")?
//!     .build();
//! let chaos = Chaos::builder(&degrader).seed(7).build();
//! let app: axum::Router = axum::Router::new()
//!     .route("/pay/{id}", axum::routing::post(|| async { "paid" }))
//!     // Inner: the chaos layer. Outer: the degrade layer, which measures what it injects.
//!     .layer(chaos.layer(classify.clone()).http())
//!     .layer(degrader.layer(classify).http());
//!
//! // Later, at run time (from an admin endpoint, a test, a drill): the database turns slow
//! // and fails one call in five, for every class that depends on it.
//! chaos.set(
//!     Target::dependency("db"),
//!     Fault::new().latency(Duration::from_millis(900)).errors(0.2),
//! )?;
//! chaos.clear_all();
//! # drop(app);
//! # Ok(())
//! # }
//! ```
//!
//! **Off unless configured.** Without the `chaos` feature none of this is compiled; with it, a
//! service without a [`ChaosLayer`] is untouched, and a layer with no fault in force costs one
//! lock-free load per call and allocates nothing.
//!
//! **What each fault does** to a call it strikes (see [`Fault`]): *latency* delays the call
//! before the service sees it (a slow dependency); an *error* answers without calling the
//! service (a failing one); an *abort* calls the service and throws its answer away (the
//! connection dropped after the work was done: the case idempotency keys exist for); a
//! *hang* answers nothing until the caller gives up, or [`Fault::hang_for`] passes. How the
//! answer looks is the layer's [`FaultAnswer`]: an error value by default, HTTP 500/502 with
//! [`.http()`](ChaosLayer::http), a gRPC status with [`.grpc()`](ChaosLayer::grpc).
//!
//! **Reproducible.** Every draw is splitmix64 of the seed and a call counter: the same seed and
//! the same order of calls strike the same calls.

mod answer;
mod service;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;

pub use self::answer::{ChaosError, ErrorAnswer, FaultAnswer, GrpcAnswer, HttpAnswer};
pub use self::service::{ChaosFuture, ChaosLayer, ChaosService};
use crate::class::{ClassId, Registry};
use crate::classify::pattern::{Segment, matches, parse_pattern};
use crate::degrader::Degrader;
use crate::error::ConfigError;
use crate::mix;

/// The header on every answer the chaos layer makes itself (`x-chaos-fault: error`, `abort`
/// or `hang`), so an injected failure is never mistaken for a real one in a trace.
pub const FAULT_HEADER: http::HeaderName = http::HeaderName::from_static("x-chaos-fault");

/// What a [`Fault`] did to a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// Answered with an error without calling the service.
    Error,
    /// Called the service and threw its answer away.
    Abort,
    /// Answered nothing until [`Fault::hang_for`] passed (or the caller gave up).
    Hang,
}

impl FaultKind {
    /// `error`, `abort` or `hang`.
    pub const fn as_str(self) -> &'static str {
        match self {
            FaultKind::Error => "error",
            FaultKind::Abort => "abort",
            FaultKind::Hang => "hang",
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What to do to the calls a [`Target`] names.
///
/// Latency strikes every call (plus a uniform jitter); then each call is, independently, an
/// error with probability `errors`, an abort with `aborts`, a hang with `hangs`, or passed on.
///
/// ```
/// use std::time::Duration;
/// use tower_degrade::chaos::Fault;
///
/// // A third-party API that is down: every call fails after a 2 s connect timeout.
/// let outage = Fault::new().latency(Duration::from_secs(2)).errors(1.0);
/// // A flaky network: 5 % of answers lost after the work was done, 1 % of calls hang.
/// let flaky = Fault::new().aborts(0.05).hangs(0.01);
/// # let _ = (outage, flaky);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[must_use = "a setting or builder does nothing until it is passed on or built"]
pub struct Fault {
    latency: Duration,
    jitter: Duration,
    errors: f64,
    aborts: f64,
    hangs: f64,
    hang_for: Duration,
}

impl Default for Fault {
    fn default() -> Self {
        Self::new()
    }
}

impl Fault {
    /// No latency, no failures; hangs last at most 60 s.
    pub const fn new() -> Self {
        Self {
            latency: Duration::ZERO,
            jitter: Duration::ZERO,
            errors: 0.0,
            aborts: 0.0,
            hangs: 0.0,
            hang_for: Duration::from_secs(60),
        }
    }

    /// Delay every call by `latency` before the service sees it.
    pub const fn latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// Add a uniform extra delay in `[0, jitter)` to every call.
    pub const fn jitter(mut self, jitter: Duration) -> Self {
        self.jitter = jitter;
        self
    }

    /// Answer this share of calls (0 to 1) with an error, without calling the service.
    pub const fn errors(mut self, rate: f64) -> Self {
        self.errors = rate;
        self
    }

    /// Call the service for this share of calls (0 to 1) and throw its answer away.
    pub const fn aborts(mut self, rate: f64) -> Self {
        self.aborts = rate;
        self
    }

    /// Answer nothing for this share of calls (0 to 1), until the caller gives up or
    /// [`hang_for`](Self::hang_for) passes.
    pub const fn hangs(mut self, rate: f64) -> Self {
        self.hangs = rate;
        self
    }

    /// How long a hung call waits before it is answered as a hang (default 60 s), so a
    /// forgotten fault cannot hold calls for ever.
    pub const fn hang_for(mut self, limit: Duration) -> Self {
        self.hang_for = limit;
        self
    }

    /// The delay before every call, without jitter.
    pub const fn delay(&self) -> Duration {
        self.latency
    }

    /// The most jitter added to the delay.
    pub const fn max_jitter(&self) -> Duration {
        self.jitter
    }

    /// How long a hung call waits before it is answered.
    pub const fn hang_limit(&self) -> Duration {
        self.hang_for
    }

    /// The rates of errors, aborts and hangs.
    pub const fn rates(&self) -> (f64, f64, f64) {
        (self.errors, self.aborts, self.hangs)
    }

    /// Check the values, as [`Chaos::set`] does: rates between 0 and 1 that add up to at most
    /// 1, durations up to a day, a hang that lasts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (field, rate) in [
            ("chaos.errors", self.errors),
            ("chaos.aborts", self.aborts),
            ("chaos.hangs", self.hangs),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(ConfigError::InvalidValue {
                    field,
                    reason: format!("{rate} is not a share between 0 and 1"),
                });
            }
        }
        if self.hangs > 0.0 && self.hang_for.is_zero() {
            return Err(ConfigError::InvalidValue {
                field: "chaos.hang_for",
                reason: "is 0 with hangs set: a hung call would be answered at once, not hang \
                         (give it how long a hang lasts, 60 s by default)"
                    .into(),
            });
        }
        let sum = self.errors + self.aborts + self.hangs;
        if sum > 1.0 + 1e-9 {
            return Err(ConfigError::InvalidValue {
                field: "chaos.errors",
                reason: format!(
                    "errors + aborts + hangs is {sum}: the shares of calls they strike cannot \
                     exceed 1"
                ),
            });
        }
        for (field, d) in [
            ("chaos.latency", self.latency),
            ("chaos.jitter", self.jitter),
            ("chaos.hang_for", self.hang_for),
        ] {
            if d > DAY {
                return Err(ConfigError::InvalidValue {
                    field,
                    reason: format!("{d:?} is longer than a day"),
                });
            }
        }
        let delay = self.latency.saturating_add(self.jitter);
        if delay > DAY {
            return Err(ConfigError::InvalidValue {
                field: "chaos.jitter",
                reason: format!(
                    "latency + jitter is {delay:?}: a call's delay cannot be longer than a day"
                ),
            });
        }
        Ok(())
    }

    /// Two faults striking the same call: latencies add up (to a day at most, as one fault's
    /// may), failures strike independently.
    fn and(self, other: Fault) -> Fault {
        let either = |a: f64, b: f64| 1.0 - (1.0 - a) * (1.0 - b);
        let day = |d: Duration| d.min(DAY);
        let mut f = Fault {
            latency: day(self.latency + other.latency),
            jitter: day(self.jitter + other.jitter),
            errors: either(self.errors, other.errors),
            aborts: either(self.aborts, other.aborts),
            hangs: either(self.hangs, other.hangs),
            hang_for: self.hang_for.max(other.hang_for),
        };
        let sum = f.errors + f.aborts + f.hangs;
        if sum > 1.0 {
            f.errors /= sum;
            f.aborts /= sum;
            f.hangs /= sum;
        }
        f
    }

    fn is_noop(&self) -> bool {
        self.latency.is_zero()
            && self.jitter.is_zero()
            && self.errors == 0.0
            && self.aborts == 0.0
            && self.hangs == 0.0
    }
}

/// The longest delay, jitter or hang of a fault (and of faults striking one call together).
const DAY: Duration = Duration::from_secs(86_400);

/// The most faults one [`Chaos`] handle holds at once.
pub const MAX_FAULTS: usize = 256;

/// Which calls a [`Fault`] strikes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// Every call of a class.
    Class(String),
    /// Every call of every class that [depends on](crate::ClassConfig::depends_on) a
    /// resource (`db`, `redis`, `third_party:payments` ...).
    Dependency(String),
    /// Every call whose path matches a route pattern (`/inventory/{sku}`, axum's syntax; a
    /// gRPC method is `/pkg.Service/Method`). Needs a classifier that
    /// [describes](crate::classify::ClassifyRequest::describe) paths, as the HTTP classifier
    /// does.
    Route(String),
}

impl Target {
    /// Every call of the class `name`.
    pub fn class(name: impl Into<String>) -> Self {
        Target::Class(name.into())
    }

    /// Every call of the classes that depend on `resource`.
    pub fn dependency(resource: impl Into<String>) -> Self {
        Target::Dependency(resource.into())
    }

    /// Every call whose path matches `pattern`.
    pub fn route(pattern: impl Into<String>) -> Self {
        Target::Route(pattern.into())
    }
}

impl Target {
    /// The target as configuration files and the admin API write it: `class:<name>`,
    /// `dependency:<name>` or `route:<pattern>` (what [`FromStr`](std::str::FromStr) reads).
    pub fn spec(&self) -> String {
        match self {
            Target::Class(c) => format!("class:{c}"),
            Target::Dependency(d) => format!("dependency:{d}"),
            Target::Route(r) => format!("route:{r}"),
        }
    }
}

/// Reads `class:<name>`, `dependency:<name>` (the name may hold colons:
/// `dependency:third_party:payments`) or `route:<pattern>`.
impl std::str::FromStr for Target {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s.split_once(':') {
            Some(("class", c)) if !c.is_empty() => Ok(Target::class(c)),
            Some(("dependency", d)) if !d.is_empty() => Ok(Target::dependency(d)),
            Some(("route", r)) if !r.is_empty() => Ok(Target::route(r)),
            _ => Err(ConfigError::InvalidValue {
                field: "chaos.target",
                reason: format!(
                    "`{s}` is not a target: write `class:<name>`, `dependency:<name>` or \
                     `route:<pattern>`"
                ),
            }),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Class(c) => write!(f, "class `{c}`"),
            Target::Dependency(d) => write!(f, "dependency `{d}`"),
            Target::Route(r) => write!(f, "route `{r}`"),
        }
    }
}

/// How many calls the faults struck since the handle was built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Injected {
    /// Calls delayed.
    pub delayed: u64,
    /// Calls answered with an error.
    pub errors: u64,
    /// Calls whose answer was thrown away.
    pub aborts: u64,
    /// Calls that hung.
    pub hangs: u64,
}

/// The faults in force, resolved to what the hot path reads: a fault per class, and the route
/// faults to match.
#[derive(Debug)]
pub(crate) struct Plan {
    classes: Box<[Option<Fault>]>,
    routes: Box<[(Box<[Segment]>, Fault)]>,
    empty: bool,
    /// The clears counted when this plan was published, its own included: a call struck by
    /// it waits until the count is past this.
    epoch: u64,
}

impl Default for Plan {
    fn default() -> Self {
        Self {
            classes: Box::new([]),
            routes: Box::new([]),
            empty: true,
            epoch: 0,
        }
    }
}

impl Plan {
    /// No fault in force: every call passes untouched.
    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.empty
    }

    /// The clears counted when the plan was published (see [`ChaosShared::cleared_count`]).
    #[inline]
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether a call's path is needed: route faults are in force.
    #[inline]
    pub(crate) fn has_routes(&self) -> bool {
        !self.routes.is_empty()
    }

    /// The fault striking a call of `class` on `path`.
    #[inline]
    pub(crate) fn fault(&self, class: ClassId, path: &str) -> Option<Fault> {
        let mut fault = self.classes.get(class.index()).copied().flatten();
        for (segments, f) in self.routes.iter() {
            if matches(segments, path) {
                fault = Some(fault.map_or(*f, |g| g.and(*f)));
            }
        }
        fault
    }
}

pub(crate) struct ChaosShared {
    registry: Registry,
    seed: u64,
    plan: ArcSwap<Plan>,
    /// Mirrors `plan`, as set: written under the lock, read by [`Chaos::faults`].
    faults: Mutex<Vec<(Target, Fault)>>,
    draws: AtomicU64,
    delayed: AtomicU64,
    errors: AtomicU64,
    aborts: AtomicU64,
    hangs: AtomicU64,
    /// Bumped, and its waiters woken, when faults are cleared: the calls they delayed or hung
    /// go on at once.
    cleared: Arc<tokio::sync::Notify>,
    clears: AtomicU64,
}

impl ChaosShared {
    /// Two uniform draws in `[0, 1)` for the next call that a fault strikes.
    #[inline]
    pub(crate) fn draw(&self) -> (f64, f64) {
        let n = self.draws.fetch_add(1, Ordering::Relaxed);
        let base = self.seed ^ n.wrapping_mul(2).wrapping_mul(mix::GAMMA);
        (
            mix::unit(mix::mix64(base)),
            mix::unit(mix::mix64(base.wrapping_add(mix::GAMMA))),
        )
    }

    #[inline]
    pub(crate) fn plan(&self) -> arc_swap::Guard<Arc<Plan>> {
        self.plan.load()
    }

    /// A future that is ready at the next clear.
    pub(crate) fn cleared(&self) -> tokio::sync::futures::OwnedNotified {
        self.cleared.clone().notified_owned()
    }

    /// How many clears so far.
    pub(crate) fn cleared_count(&self) -> u64 {
        self.clears.load(Ordering::Acquire)
    }

    /// `class` if it is one of this degrader's, the default class if another degrader's
    /// classifier handed it out (as the degrade layer counts it).
    #[inline]
    pub(crate) fn own(&self, class: ClassId, from: Option<&Registry>) -> ClassId {
        if class.index() < self.registry.len() && from.is_none_or(|r| r.same_ids(&self.registry)) {
            class
        } else {
            ClassId::DEFAULT
        }
    }

    pub(crate) fn class_name(&self, class: ClassId) -> &str {
        self.registry.class(class).name()
    }

    pub(crate) fn count(&self, delayed: bool, kind: Option<FaultKind>) {
        if delayed {
            self.delayed.fetch_add(1, Ordering::Relaxed);
        }
        let counter = match kind {
            Some(FaultKind::Error) => &self.errors,
            Some(FaultKind::Abort) => &self.aborts,
            Some(FaultKind::Hang) => &self.hangs,
            None => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn faults(&self) -> MutexGuard<'_, Vec<(Target, Fault)>> {
        self.faults.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Resolve `faults` against the classes and publish it.
    /// Put `faults` in force. With `release`, the calls that the faults before delayed or hung
    /// go on at once: the plan carries the clear's count, published before the count moves,
    /// so a call struck by the new plan is never released by that clear, and one struck by an
    /// older plan always is. (Callers hold the faults' lock: one publish at a time.)
    fn publish(&self, faults: &[(Target, Fault)], release: bool) -> Result<(), ConfigError> {
        let mut classes = vec![None::<Fault>; self.registry.len()];
        let mut routes = Vec::new();
        let mut strike = |id: ClassId, f: Fault| {
            let slot = &mut classes[id.index()];
            *slot = Some(slot.map_or(f, |g| g.and(f)));
        };
        for (target, fault) in faults {
            match target {
                Target::Class(name) => strike(self.registry.require(name)?, *fault),
                Target::Dependency(dep) => {
                    let mut any = false;
                    for (id, class) in self.registry.iter() {
                        if class.dependencies().iter().any(|d| d == dep) {
                            strike(id, *fault);
                            any = true;
                        }
                    }
                    if !any {
                        return Err(ConfigError::InvalidValue {
                            field: "chaos.target",
                            reason: format!("no class depends on `{dep}`"),
                        });
                    }
                }
                Target::Route(pattern) => {
                    // The pattern's errors name the classifier's field: here it is the target.
                    let segments = parse_pattern(pattern).map_err(|e| match e {
                        ConfigError::InvalidValue { reason, .. } => ConfigError::InvalidValue {
                            field: "chaos.target",
                            reason,
                        },
                        other => other,
                    })?;
                    routes.push((segments, *fault));
                }
            }
        }
        let empty = routes.is_empty() && classes.iter().all(Option::is_none);
        let epoch = self.cleared_count() + u64::from(release);
        self.plan.store(Arc::new(Plan {
            classes: classes.into(),
            routes: routes.into(),
            empty,
            epoch,
        }));
        if release {
            self.clears.store(epoch, Ordering::Release);
            self.cleared.notify_waiters();
        }
        Ok(())
    }
}

impl fmt::Debug for ChaosShared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chaos")
            .field("seed", &self.seed)
            .field("faults", &*self.faults())
            .finish_non_exhaustive()
    }
}

/// Builds a [`Chaos`] handle.
#[derive(Debug)]
pub struct ChaosBuilder {
    registry: Registry,
    seed: u64,
}

impl ChaosBuilder {
    /// The seed of the draws (default 0): the same seed strikes the same calls.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// A handle with no fault in force.
    pub fn build(self) -> Chaos {
        Chaos {
            shared: Arc::new(ChaosShared {
                registry: self.registry,
                seed: mix::mix64(self.seed),
                plan: ArcSwap::from_pointee(Plan::default()),
                faults: Mutex::new(Vec::new()),
                draws: AtomicU64::new(0),
                delayed: AtomicU64::new(0),
                errors: AtomicU64::new(0),
                aborts: AtomicU64::new(0),
                hangs: AtomicU64::new(0),
                cleared: Arc::default(),
                clears: AtomicU64::new(0),
            }),
        }
    }
}

/// The faults in force, shared by every [`ChaosLayer`] made from it. Cloning is cheap; a
/// change through any clone applies to the next call of every layer. See the
/// [module docs](self).
#[derive(Debug, Clone)]
pub struct Chaos {
    shared: Arc<ChaosShared>,
}

impl Chaos {
    /// A handle for `degrader`'s classes.
    pub fn builder(degrader: &Degrader) -> ChaosBuilder {
        ChaosBuilder {
            registry: degrader.registry().clone(),
            seed: 0,
        }
    }

    /// Strike the calls `target` names with `fault`, replacing what was set for the same
    /// target. Fails, changing nothing, on an unknown class, a dependency no class has, a
    /// route pattern that does not parse, or a rate outside 0 to 1. A fault that injects
    /// nothing clears the target's, as [`clear`](Self::clear) does; replacing a fault, like
    /// clearing one, lets the calls that faults delayed or hung go on at once. A route
    /// pattern is not checked against the application's routes: one that matches none
    /// strikes nothing.
    ///
    /// Where several targets name one call (its class, a dependency of it, its route),
    /// their faults strike it together: the latencies and jitters add up (to a day at
    /// most), each failure strikes as if drawn apart (errors of 0.5 from two targets strike
    /// three calls in four), the longest `hang_for` holds, and where the shares of errors,
    /// aborts and hangs then add up past 1 they are scaled down to 1 in proportion (errors
    /// of 1.0 on a class and aborts of 1.0 on its dependency strike each call with one or
    /// the other, about half each).
    pub fn set(&self, target: Target, fault: Fault) -> Result<(), ConfigError> {
        fault.validate()?;
        let spec = target.to_string();
        let mut faults = self.shared.faults();
        let mut next = faults.clone();
        next.retain(|(t, _)| *t != target);
        let replaced = next.len() < faults.len();
        if next.len() >= MAX_FAULTS {
            // Every call of a layer matches its path against the route faults.
            return Err(ConfigError::InvalidValue {
                field: "chaos.target",
                reason: format!("{MAX_FAULTS} faults are set: clear one first"),
            });
        }
        // The target is checked with the fault in the plan, an empty one too (an unknown
        // class is an error however little is asked of it).
        next.push((target, fault));
        self.shared.publish(&next, replaced && !fault.is_noop())?;
        if fault.is_noop() {
            next.pop();
            let _ = self.shared.publish(&next, replaced);
        }
        // Faults change what calls get: logged, as breaker commands are.
        if fault.is_noop() {
            tracing::info!(target = %spec, "chaos: fault cleared (set to nothing)");
        } else {
            tracing::info!(target = %spec, ?fault, "chaos: fault set");
        }
        *faults = next;
        Ok(())
    }

    /// Stop striking the calls `target` names; `false` if nothing was set for it. Calls that
    /// faults delayed or hung and that still wait go on at once (those of every fault: a clear
    /// is the end of an experiment); a hung call is answered as its hang would have been.
    pub fn clear(&self, target: &Target) -> bool {
        let mut faults = self.shared.faults();
        let before = faults.len();
        faults.retain(|(t, _)| t != target);
        if faults.len() == before {
            return false;
        }
        // What was published before still resolves without the removed fault.
        let _ = self.shared.publish(&faults, true);
        tracing::info!(%target, "chaos: fault cleared");
        true
    }

    /// Stop every fault (for the calls made from now on, as [`clear`](Self::clear)).
    pub fn clear_all(&self) {
        let mut faults = self.shared.faults();
        faults.clear();
        let _ = self.shared.publish(&faults, true);
        tracing::info!("chaos: every fault cleared");
    }

    /// The faults in force, in the order they were set.
    pub fn faults(&self) -> Vec<(Target, Fault)> {
        self.shared.faults().clone()
    }

    /// How many calls the faults struck so far.
    pub fn injected(&self) -> Injected {
        let s = &self.shared;
        Injected {
            delayed: s.delayed.load(Ordering::Relaxed),
            errors: s.errors.load(Ordering::Relaxed),
            aborts: s.aborts.load(Ordering::Relaxed),
            hangs: s.hangs.load(Ordering::Relaxed),
        }
    }

    /// A layer that injects this handle's faults into the calls of the service it wraps,
    /// classifying each call with `classify` (the degrade layer's classifier). Its answers
    /// are [`ChaosError`]s until [`.http()`](ChaosLayer::http) or
    /// [`.grpc()`](ChaosLayer::grpc).
    pub fn layer<C>(&self, classify: C) -> ChaosLayer<C> {
        ChaosLayer::new(self.shared.clone(), classify, ErrorAnswer)
    }
}
