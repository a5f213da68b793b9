//! Task classes: what a request is, how much it matters and where it goes when it cannot be served.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

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

    /// The tier's burst tolerance (seed 3.1): 2.0 / 1.5 / 1.2.
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

/// A task class: its name, tier, SLA, dependencies, timeout and fallback route.
///
/// ```
/// use std::time::Duration;
/// use tower_degrade::{ClassConfig, Route, Tier};
///
/// let payment = ClassConfig::gold("payment_callback")
///     .depends_on("db")
///     .timeout(Duration::from_secs(5))
///     .fallback(Route::Service);
/// assert_eq!(payment.tier(), Tier::Gold);
/// assert_eq!(payment.sla_target(), Duration::from_millis(50));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ClassConfig {
    name: String,
    tier: Tier,
    sla: Duration,
    tolerance: LatencyTolerance,
    dependencies: Vec<String>,
    timeout: Option<Duration>,
    route: Route,
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
            route: Route::Reject,
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

    /// Set the SLA latency target: calls slower than this count as slow.
    pub fn sla(mut self, sla: Duration) -> Self {
        self.sla = sla;
        self
    }

    /// Set the latency tolerance.
    pub fn tolerance(mut self, tolerance: LatencyTolerance) -> Self {
        self.tolerance = tolerance;
        self
    }

    /// Add a resource dependency (`db`, `redis`, `third_party:<name>`).
    pub fn depends_on(mut self, dependency: impl Into<String>) -> Self {
        self.dependencies.push(dependency.into());
        self
    }

    /// Fail calls that run longer than `timeout` (outcome `timeout`).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Where calls go when the class does not admit them.
    pub fn fallback(mut self, route: Route) -> Self {
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

    /// The fallback route.
    pub fn route(&self) -> Route {
        self.route
    }
}

/// The index of a class in its [`Registry`]. Index 0 is always the default class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClassId(pub(crate) u16);

impl ClassId {
    /// The default class, which receives all traffic no rule matched.
    pub const DEFAULT: ClassId = ClassId(0);

    /// The index of this class in the registry.
    pub const fn index(self) -> usize {
        self.0 as usize
    }
}

/// An error in the class configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// Two classes share a name.
    DuplicateClass(String),
    /// A class name is empty or has characters other than `[A-Za-z0-9_.:-]`.
    InvalidName(String),
    /// A rule or strategy names a class that is not configured.
    UnknownClass(String),
    /// More classes than a `u16` can index.
    TooManyClasses,
    /// A field has a value out of range.
    InvalidValue {
        /// The field, e.g. `breaker.failure_rate`.
        field: &'static str,
        /// Why it is rejected.
        reason: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::DuplicateClass(n) => write!(f, "class `{n}` is configured twice"),
            ConfigError::InvalidName(n) => write!(
                f,
                "class name `{n}` is invalid: use 1-64 characters from [A-Za-z0-9_.:-]"
            ),
            ConfigError::UnknownClass(n) => write!(f, "unknown class `{n}`"),
            ConfigError::TooManyClasses => f.write_str("too many classes (at most 65535)"),
            ConfigError::InvalidValue { field, reason } => write!(f, "invalid `{field}`: {reason}"),
        }
    }
}

impl std::error::Error for ConfigError {}

/// The set of configured classes, fixed when the degrader is built.
///
/// Class names are the only values that reach metric labels, so label cardinality is bounded
/// by configuration, whatever clients send.
#[derive(Debug, Clone)]
pub struct Registry {
    classes: Vec<ClassConfig>,
    by_name: HashMap<String, ClassId>,
}

/// The name of the default class.
pub const DEFAULT_CLASS: &str = "default";

impl Registry {
    /// Build a registry. A class named [`DEFAULT_CLASS`] may be given to configure the default
    /// class; otherwise it is a bronze class with the `reject` route.
    pub(crate) fn new(classes: Vec<ClassConfig>) -> Result<Self, ConfigError> {
        let mut default = ClassConfig::bronze(DEFAULT_CLASS);
        let mut rest = Vec::with_capacity(classes.len());
        for class in classes {
            if class.name == DEFAULT_CLASS {
                default = class;
            } else {
                rest.push(class);
            }
        }
        let mut all = Vec::with_capacity(rest.len() + 1);
        all.push(default);
        all.extend(rest);
        if all.len() > usize::from(u16::MAX) {
            return Err(ConfigError::TooManyClasses);
        }
        let mut by_name = HashMap::with_capacity(all.len());
        for (i, class) in all.iter().enumerate() {
            let valid = !class.name.is_empty()
                && class.name.len() <= 64
                && class
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b));
            if !valid {
                return Err(ConfigError::InvalidName(class.name.clone()));
            }
            if by_name
                .insert(class.name.clone(), ClassId(i as u16))
                .is_some()
            {
                return Err(ConfigError::DuplicateClass(class.name.clone()));
            }
        }
        Ok(Self {
            classes: all,
            by_name,
        })
    }

    /// Look a class up by name (no allocation).
    pub fn get(&self, name: &str) -> Option<ClassId> {
        self.by_name.get(name).copied()
    }

    /// Look a class up by name, or fail with [`ConfigError::UnknownClass`].
    pub fn require(&self, name: &str) -> Result<ClassId, ConfigError> {
        self.get(name)
            .ok_or_else(|| ConfigError::UnknownClass(name.to_owned()))
    }

    /// The class with this id.
    ///
    /// # Panics
    ///
    /// If `id` does not come from this registry.
    pub fn class(&self, id: ClassId) -> &ClassConfig {
        &self.classes[id.index()]
    }

    /// Number of classes, the default class included.
    pub fn len(&self) -> usize {
        self.classes.len()
    }

    /// Always false: the default class exists.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Every class with its id, the default class first.
    pub fn iter(&self) -> impl Iterator<Item = (ClassId, &ClassConfig)> + '_ {
        self.classes
            .iter()
            .enumerate()
            .map(|(i, c)| (ClassId(i as u16), c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_class_is_first_and_overridable() {
        let r = Registry::new(vec![ClassConfig::gold("pay")]).unwrap();
        assert_eq!(r.get(DEFAULT_CLASS), Some(ClassId::DEFAULT));
        assert_eq!(r.class(ClassId::DEFAULT).tier(), Tier::Bronze);
        let r = Registry::new(vec![
            ClassConfig::gold("pay"),
            ClassConfig::silver(DEFAULT_CLASS),
        ])
        .unwrap();
        assert_eq!(r.class(ClassId::DEFAULT).tier(), Tier::Silver);
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn bad_names_and_duplicates_are_rejected() {
        assert_eq!(
            Registry::new(vec![ClassConfig::gold("a"), ClassConfig::gold("a")]).unwrap_err(),
            ConfigError::DuplicateClass("a".into())
        );
        assert!(matches!(
            Registry::new(vec![ClassConfig::gold("a b")]).unwrap_err(),
            ConfigError::InvalidName(_)
        ));
    }

    #[test]
    fn tier_defaults_follow_the_seed() {
        assert_eq!(Tier::Gold.base_weight(), 0.45);
        assert_eq!(Tier::Silver.default_sla(), Duration::from_millis(200));
        assert_eq!(Tier::Bronze.burst_tolerance(), 1.2);
    }
}
