//! Task classes: what a request is, how much it matters and where it goes when it cannot be served.

mod registry;

use std::fmt;
use std::time::Duration;

pub use self::registry::{ClassId, DEFAULT_CLASS, Registry};

/// The most classes a degrader has, its `default` class included. Each class has counters in
/// every shard of the sliding windows (about 2.5 KiB a shard; twice the cores, at most 64
/// shards) besides its windows' history and breaker (about 26 KiB), all visited on every
/// control tick: 35-38 KiB a class measured on 2 cores (4 shards), so by that sum about
/// 190 KiB on 32 cores or more. 50,000 classes in a
/// configuration file took 7.65 s and 1.8 GB to build on 2 cores, in a hostile trial. A class
/// is a kind of work (payments, stock reads, browse logs), not a tenant or an id: group
/// endpoints into classes rather than give each its own.
pub const MAX_CLASSES: usize = 1024;

/// Business importance of a class: payment callbacks before inventory before browse logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Tier {
    /// Core work that must not be lost (payment callbacks).
    Gold,
    /// Sub-core work that may be delayed or merged (inventory deductions).
    Silver,
    /// Edge work that may be spooled or dropped first (browse logs).
    Bronze,
}

impl Tier {
    /// A class config of this tier named `name`, with the tier's defaults
    /// ([`ClassConfig::gold`], [`silver`](ClassConfig::silver), [`bronze`](ClassConfig::bronze)).
    pub fn class(self, name: impl Into<String>) -> ClassConfig {
        match self {
            Tier::Gold => ClassConfig::gold(name),
            Tier::Silver => ClassConfig::silver(name),
            Tier::Bronze => ClassConfig::bronze(name),
        }
    }

    /// Gold 0, silver 1, bronze 2: where a tier's entry sits in a per-tier array.
    pub(crate) const fn index(self) -> usize {
        match self {
            Tier::Gold => 0,
            Tier::Silver => 1,
            Tier::Bronze => 2,
        }
    }

    /// The label used for this tier in metrics and policies.
    pub const fn as_str(self) -> &'static str {
        match self {
            Tier::Gold => "gold",
            Tier::Silver => "silver",
            Tier::Bronze => "bronze",
        }
    }

    /// The tier's base weight in the dynamic priority score (seed 3.1): 0.45 / 0.35 / 0.20.
    pub const fn base_weight(self) -> f64 {
        match self {
            Tier::Gold => 0.45,
            Tier::Silver => 0.35,
            Tier::Bronze => 0.20,
        }
    }

    /// The tier's default SLA latency target (seed 3.1): 50 / 200 / 1000 ms.
    pub const fn default_sla(self) -> Duration {
        match self {
            Tier::Gold => Duration::from_millis(50),
            Tier::Silver => Duration::from_millis(200),
            Tier::Bronze => Duration::from_millis(1000),
        }
    }

    /// The tier's maximum queueing delay under admission (seed 3.1): 50 / 200 / 1000 ms.
    pub const fn max_queue_delay(self) -> Duration {
        match self {
            Tier::Gold => Duration::from_millis(50),
            Tier::Silver => Duration::from_millis(200),
            Tier::Bronze => Duration::from_millis(1000),
        }
    }

    /// The tier's burst tolerance (seed 3.1): 2.0 / 1.5 / 1.2. Under
    /// [admission](crate::admit), a tier may queue `(tolerance - 1) x limit` calls beyond the
    /// concurrency limit.
    pub const fn burst_tolerance(self) -> f64 {
        match self {
            Tier::Gold => 2.0,
            Tier::Silver => 1.5,
            Tier::Bronze => 1.2,
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How long a class's work may wait before it is useless (seed: ms / s / min).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LatencyTolerance {
    /// Interactive: answer within milliseconds or not at all.
    Milliseconds,
    /// May wait seconds (a delayed retry is acceptable).
    Seconds,
    /// May wait minutes (spool and backfill is acceptable).
    Minutes,
}

impl LatencyTolerance {
    const fn for_tier(tier: Tier) -> Self {
        match tier {
            Tier::Gold => LatencyTolerance::Milliseconds,
            Tier::Silver => LatencyTolerance::Seconds,
            Tier::Bronze => LatencyTolerance::Minutes,
        }
    }
}

/// Where a call goes when its class does not admit it.
///
/// `Reject` and `Service` are served by [`DegradeLayer`](crate::DegradeLayer) itself. The other
/// routes are served by the fallback router; a layer with no handler for a route answers with
/// a [`Degraded`](crate::error::Degraded) error that names the route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Route {
    /// Answer with a degraded error (503 + `Retry-After`, or gRPC `UNAVAILABLE`).
    Reject,
    /// Send the call to the fallback service given to the layer.
    Service,
    /// Re-run the call later with backoff, then hand it to manual review.
    DelayedRetry,
    /// Buffer and merge by key, flush as one write.
    BatchMerge,
    /// Append to a durable spool and replay when healthy.
    Spool,
    /// Append to a durable queue drained by a person.
    ManualReview,
    /// Serve the last good response.
    Cached,
}

impl Route {
    pub(crate) const ALL: [Route; 7] = [
        Route::Reject,
        Route::Service,
        Route::DelayedRetry,
        Route::BatchMerge,
        Route::Spool,
        Route::ManualReview,
        Route::Cached,
    ];

    /// The route's name as used in configuration, policies and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            Route::Reject => "reject",
            Route::Service => "service",
            Route::DelayedRetry => "delayed_retry",
            Route::BatchMerge => "batch_merge",
            Route::Spool => "spool",
            Route::ManualReview => "manual_review",
            Route::Cached => "cached",
        }
    }

    pub(crate) const fn to_bits(self) -> u8 {
        self as u8
    }

    pub(crate) fn from_bits(bits: u8) -> Route {
        Route::ALL
            .get(usize::from(bits))
            .copied()
            .unwrap_or(Route::Reject)
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not a [`Route`] or a [`Tier`]: says what was given and what is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseNameError(String);

impl fmt::Display for ParseNameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ParseNameError {}

/// Parses a route's name as [`Route::as_str`] writes it (`delayed_retry`, `spool` ...), for
/// configuration files.
impl std::str::FromStr for Route {
    type Err = ParseNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Route::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                ParseNameError(format!(
                    "`{s}` is not a route: use one of {}",
                    Route::ALL.map(Route::as_str).join(", ")
                ))
            })
    }
}

/// Parses a tier's name (`gold`, `silver`, `bronze`), for configuration files.
impl std::str::FromStr for Tier {
    type Err = ParseNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Tier::Gold, Tier::Silver, Tier::Bronze]
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| {
                ParseNameError(format!("`{s}` is not a tier: use gold, silver or bronze"))
            })
    }
}

/// When a call its caller abandoned counts as a timeout.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Abandon {
    AfterSla,
    After(Duration),
    Never,
}

/// A task class: its name, tier, SLA, dependencies, timeout and fallback route.
///
/// ```
/// use std::time::Duration;
/// use tower_degrade::{ClassConfig, Route, Tier};
///
/// let payment = ClassConfig::gold("payment_callback")
///     .depends_on("db")
///     .timeout(Duration::from_secs(5))
///     .fallback_route(Route::Service);
/// assert_eq!(payment.tier(), Tier::Gold);
/// assert_eq!(payment.sla_target(), Duration::from_millis(50));
/// ```
#[derive(Debug, Clone, PartialEq)]
#[must_use = "a setting or builder does nothing until it is passed on or built"]
pub struct ClassConfig {
    name: String,
    tier: Tier,
    sla: Duration,
    tolerance: LatencyTolerance,
    dependencies: Vec<String>,
    timeout: Option<Duration>,
    abandon: Abandon,
    route: Route,
    queue_delay: Duration,
    tags: Vec<(String, String)>,
}

impl ClassConfig {
    /// A class of `tier` with the tier's defaults: SLA (50 / 200 / 1000 ms), latency tolerance
    /// (ms / s / min), no timeout, and the `reject` route.
    pub fn new(name: impl Into<String>, tier: Tier) -> Self {
        Self {
            name: name.into(),
            tier,
            sla: tier.default_sla(),
            tolerance: LatencyTolerance::for_tier(tier),
            dependencies: Vec::new(),
            timeout: None,
            abandon: Abandon::AfterSla,
            route: Route::Reject,
            queue_delay: tier.max_queue_delay(),
            tags: Vec::new(),
        }
    }

    /// A gold (core) class.
    pub fn gold(name: impl Into<String>) -> Self {
        Self::new(name, Tier::Gold)
    }

    /// A silver (sub-core) class.
    pub fn silver(name: impl Into<String>) -> Self {
        Self::new(name, Tier::Silver)
    }

    /// A bronze (edge) class.
    pub fn bronze(name: impl Into<String>) -> Self {
        Self::new(name, Tier::Bronze)
    }

    /// Set the SLA latency target: calls slower than this count as slow, a call still running
    /// past it at a tick counts as overdue (a failure for the breaker, unless
    /// [`abandon_timeout`](Self::abandon_timeout) says otherwise), and half-open probes must
    /// finish within it. Set it to what the work takes at worst when healthy: the tier defaults
    /// (50 / 200 / 1000 ms) suit in-process work and a local database; a gold class calling a
    /// payment provider that answers in 400 ms, left at 50 ms, opens its breaker on a healthy
    /// provider (the transition's reason counts the overdue calls).
    pub fn sla(mut self, sla: Duration) -> Self {
        self.sla = sla;
        self
    }

    /// How long a call of this class may wait for an [admission](crate::admit) permit before
    /// it is answered as not admitted (reason `overload`) instead of served late. Default: the
    /// tier's [`max_queue_delay`](Tier::max_queue_delay). `Duration::ZERO` is allowed: the
    /// class never waits, a call that finds no free permit is answered at once.
    pub fn max_queue_delay(mut self, bound: Duration) -> Self {
        self.queue_delay = bound;
        self
    }

    /// The longest a call of this class waits for an admission permit.
    pub fn queue_delay_bound(&self) -> Duration {
        self.queue_delay
    }

    /// Set the latency tolerance.
    pub fn tolerance(mut self, tolerance: LatencyTolerance) -> Self {
        self.tolerance = tolerance;
        self
    }

    /// Add a resource dependency (`db`, `redis`, `third_party:<name>`; at most 64 a class).
    pub fn depends_on(mut self, dependency: impl Into<String>) -> Self {
        self.dependencies.push(dependency.into());
        self
    }

    /// Fail calls that run longer than `timeout` (outcome `timeout`). A timeout shorter than
    /// the [SLA](Self::sla) is logged as a warning at build: calls are then cut before they
    /// can be slow, and the breaker sees slowness only as timeouts.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// How long a call may run before its caller giving up on it (dropping the response
    /// future) counts as a **timeout**; a call abandoned earlier is `cancelled`, which counts
    /// neither way. The default is the class's SLA: callers that give up on calls slower than
    /// the SLA are what overload looks like, and the breaker, the seed rule and the predictor
    /// must see it. `None`: abandoned calls are always `cancelled`.
    pub fn abandon_timeout(mut self, after: Option<Duration>) -> Self {
        self.abandon = after.map_or(Abandon::Never, Abandon::After);
        self
    }

    /// Where calls go when the class does not admit them (default [`Route::Reject`]).
    ///
    /// This names a *route*; the service that serves [`Route::Service`] is given to the layer
    /// with [`DegradeLayer::fallback_service`](crate::DegradeLayer::fallback_service).
    pub fn fallback_route(mut self, route: Route) -> Self {
        self.route = route;
        self
    }

    /// Attach a tag (team, owner, ...), visible to policies as `ctx.tag(key)`.
    pub fn tag(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.tags.push((key.into(), value.into()));
        self
    }

    /// The tags.
    pub fn tags(&self) -> &[(String, String)] {
        &self.tags
    }

    /// The class name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The class tier.
    pub fn tier(&self) -> Tier {
        self.tier
    }

    /// The SLA latency target.
    pub fn sla_target(&self) -> Duration {
        self.sla
    }

    /// The latency tolerance.
    pub fn latency_tolerance(&self) -> LatencyTolerance {
        self.tolerance
    }

    /// The resource dependencies.
    pub fn dependencies(&self) -> &[String] {
        &self.dependencies
    }

    /// The per-call timeout, if any.
    pub fn call_timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// How long a call may run before its caller abandoning it counts as a timeout (see
    /// [`abandon_timeout`](Self::abandon_timeout)); `None` when it never does.
    pub fn abandon_after(&self) -> Option<Duration> {
        match self.abandon {
            Abandon::AfterSla => Some(self.sla),
            Abandon::After(d) => Some(d),
            Abandon::Never => None,
        }
    }

    /// The fallback route.
    pub fn route(&self) -> Route {
        self.route
    }
}
