//! Priority admission under overload: an adaptive concurrency limit, and who gets the next
//! permit when it is reached.
//!
//! Breakers react to failure; admission reacts to *too much work*. With [`Admission`] on the
//! [`DegraderBuilder`](crate::DegraderBuilder), every admitted call takes a permit of a
//! concurrency limit that is found from latency ([the gradient](self#the-limit)), so nobody
//! configures the capacity. While permits are free that is one load and one `fetch_add`, no
//! lock. When the limit is reached, the call waits **in its response future** (not in
//! `poll_ready`, which would hold every class behind one), in a queue ordered by
//!
//! 1. tier (gold before silver before bronze; an upstream's propagated priority can raise a
//!    call's tier up to a configured cap, see [`PropagatePriorityLayer`]),
//! 2. the class's dynamic score within the tier (seed 3.1: SLA, rate, p99, burst ratio),
//! 3. a stable hash of the user key within a class (DAGOR): when a tier's queue is full the
//!    lowest users leave it first, so one user's session is treated consistently,
//! 4. age.
//!
//! A tier whose calls left the queue without a permit reserves permits against the tiers
//! below it for a while (the concurrency those calls would have needed), so that the permits
//! that come free after gold gave up waiting do not all go to bronze, which waits longer;
//! and while calls of the tiers below hold more permits than the reservations leave them
//! (long calls that took them before), a tier under its reservation takes permits past the
//! limit, up to its reservation (details in `docs/admission.md`).
//!
//! A call waits at most its class's [queue delay bound](crate::ClassConfig::max_queue_delay)
//! (seed: 50 / 200 / 1000 ms by tier), or half its caller's deadline where that is shorter
//! (gRPC's `grpc-timeout`; [`AdmissionKey::with_deadline`]). Past it, or pushed out of a full
//! queue, it is answered at once like any call its class does not admit (reason `overload`,
//! the class's fallback route), not served late. A tier's queue holds up to `(burst tolerance - 1) x limit` calls
//! (seed: 2.0 / 1.5 / 1.2, so gold may queue a whole limit's worth, bronze a fifth).
//!
//! Permits are cancellation safe: a permit belongs to the call's recording and is given back
//! when the call ends, is dropped (at any point, waiting or running), times out or panics.
//!
//! # The limit
//!
//! Once per control tick the limit moves toward `limit x rtt0 / rtt + headroom` while calls
//! queue, where `rtt` is the tick's mean latency in the service and `rtt0` the latency without
//! queueing: the capacity plus a small queue (details in the source of `admit/limit.rs`). It
//! is bounded by [`min_limit`](Admission::min_limit) and [`max_limit`](Admission::max_limit),
//! exported as `degrade_admission_limit`, and readable in [`Degrader::admission`](
//! crate::Degrader::admission) and in policies (`ctx.admission_limit`).

mod limit;
mod propagate;
mod queue;
mod system;

use std::hash::{Hash, Hasher};
use std::time::Duration;

pub(crate) use self::limit::LimitConfig;
pub use self::propagate::{
    PRIORITY_HEADER, PropagatePriority, PropagatePriorityLayer, current_tier, track_current_tier,
};
pub(crate) use self::propagate::{TierScope, parse_tier};
pub use self::queue::LimiterState;
pub(crate) use self::queue::{Enqueued, Limiter, Priority, WaitEnd, Waiter, rank, sample};
pub(crate) use self::system::CpuSignal;
use crate::class::Tier;
use crate::error::ConfigError;

/// Priority admission with an adaptive concurrency limit; give it to
/// [`DegraderBuilder::admission`](crate::DegraderBuilder::admission). Off unless set.
///
/// ```
/// use tower_degrade::{ClassConfig, Degrader, admit::Admission};
///
/// # fn main() -> Result<(), tower_degrade::error::ConfigError> {
/// let (degrader, _worker) = Degrader::builder("checkout")
///     .class(ClassConfig::gold("payment_callback"))
///     .class(ClassConfig::bronze("browse_log"))
///     .admission(Admission::adaptive().max_limit(500))
///     .build_with_worker()?;
/// assert_eq!(degrader.admission()[0].limit, 10);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq)]
#[must_use = "a setting or builder does nothing until it is passed on or built"]
pub struct Admission {
    pub(crate) limit: LimitConfig,
    pub(crate) per_dependency: bool,
    pub(crate) cpu_threshold: Option<f64>,
}

impl Admission {
    /// An adaptive limit starting at 10, between 2 and 1000, one for the whole service.
    pub fn adaptive() -> Self {
        Self {
            limit: LimitConfig::default(),
            per_dependency: false,
            cpu_threshold: None,
        }
    }

    /// The limit before anything was measured (it grows by half per tick while calls queue and
    /// latency holds, so a low start costs a few ticks, a high one a burst of queueing).
    pub fn initial_limit(mut self, n: u32) -> Self {
        self.limit.initial = n;
        self
    }

    /// The lowest the limit goes.
    pub fn min_limit(mut self, n: u32) -> Self {
        self.limit.min = n;
        self
    }

    /// The highest the limit goes (at most 1,000,000).
    pub fn max_limit(mut self, n: u32) -> Self {
        self.limit.max = n;
        self
    }

    /// One limiter per dependency named by the classes' [`depends_on`](
    /// crate::ClassConfig::depends_on) (a class with several uses the first), in place of
    /// the service's for those classes: a slow database fills its own limit, not the one of
    /// classes that do not use it. Classes without a dependency share the service's limiter.
    pub fn per_dependency(mut self, on: bool) -> Self {
        self.per_dependency = on;
        self
    }

    /// The system rule (as Sentinel's): while the host's CPU usage over the last tick is above
    /// `threshold` (0.0..=1.0), the limit shrinks by a tenth per tick and does not grow. Read
    /// from `/proc/stat`, so Linux only; elsewhere the build fails with a clear error. Off by
    /// default.
    pub fn cpu_threshold(mut self, threshold: f64) -> Self {
        self.cpu_threshold = Some(threshold);
        self
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        /// The highest `max_limit` (and so `initial_limit`): `u32::MAX` was taken, in a trial.
        const MAX_LIMIT: u32 = 1_000_000;
        let l = &self.limit;
        let invalid =
            |field: &'static str, reason: String| Err(ConfigError::InvalidValue { field, reason });
        if l.min == 0 {
            return invalid("admission.min_limit", "must be at least 1".into());
        }
        if l.max == 0 {
            return invalid("admission.max_limit", "must be at least 1".into());
        }
        if l.max > MAX_LIMIT {
            return invalid(
                "admission.max_limit",
                format!(
                    "{} is over 1,000,000 calls in flight: a limit no service reaches limits \
                     nothing (leave admission off instead)",
                    l.max
                ),
            );
        }
        if l.min > l.max {
            return invalid(
                "admission.min_limit",
                format!("{} is above max_limit {}", l.min, l.max),
            );
        }
        if !(l.min..=l.max).contains(&l.initial) {
            return invalid(
                "admission.initial_limit",
                format!("{} is outside {}..={}", l.initial, l.min, l.max),
            );
        }
        if let Some(t) = self.cpu_threshold {
            if !(t > 0.0 && t <= 1.0) {
                return invalid("admission.cpu_threshold", format!("{t} is not in (0, 1]"));
            }
            CpuSignal::check().map_err(|reason| ConfigError::InvalidValue {
                field: "admission.cpu_threshold",
                reason,
            })?;
        }
        Ok(())
    }
}

/// What admission may know of a request besides its class, from
/// [`ClassifyRequest::admission_key`](crate::classify::ClassifyRequest::admission_key). Only
/// asked for when the call has to wait for a permit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AdmissionKey {
    tier: Option<Tier>,
    user: Option<u16>,
    invalid_tier: bool,
    deadline: Option<Duration>,
}

/// Calls without a user key are in the middle bucket: behind half the users, ahead of the rest.
pub const DEFAULT_USER_BUCKET: u16 = 32_768;

impl AdmissionKey {
    /// Nothing known: the class's tier, the default user bucket.
    pub const fn none() -> Self {
        Self {
            tier: None,
            user: None,
            invalid_tier: false,
            deadline: None,
        }
    }

    /// The priority an upstream asked for (already capped by the caller's configuration): it
    /// can raise the call's tier in the queue, never lower it.
    pub fn with_tier(mut self, tier: Option<Tier>) -> Self {
        self.tier = tier;
        self
    }

    /// The call carried a priority that is not a tier: counted in
    /// `degrade_priority_header_invalid_total`, labelled with the layer's service. It sets no
    /// tier: without [`with_tier`](Self::with_tier) the call waits in its class's.
    pub fn with_invalid_tier(mut self) -> Self {
        self.invalid_tier = true;
        self
    }

    /// The user key: hashed (stably: the same key lands in the same bucket in every process
    /// and release) into one of 65,536 buckets.
    pub fn with_user(mut self, key: &[u8]) -> Self {
        self.user = Some(user_bucket(key));
        self
    }

    /// How long the caller waits for the answer at most (gRPC's `grpc-timeout`, which
    /// [`HttpClassifier`](crate::classify::HttpClassifier) reads): the call waits for a permit
    /// at most half of it when that is shorter than its class's bound
    /// ([`ClassConfig::max_queue_delay`](crate::ClassConfig::max_queue_delay)), and is then
    /// answered as any call its class does not admit (reason `overload`, the class's
    /// fallback route), so that a route that keeps calls keeps it while its caller still
    /// waits for the answer, rather than the caller giving up in the queue.
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// The longest the call waits for a permit: its class's bound, or half its caller's
    /// deadline when shorter.
    pub(crate) fn wait_bound(&self, class: Duration) -> Duration {
        self.deadline.map_or(class, |d| class.min(d / 2))
    }

    /// The tier the call waits in: the class's, or the upstream's when higher.
    pub(crate) fn tier(&self, class: Tier) -> Tier {
        match self.tier {
            Some(t) if t < class => t,
            _ => class,
        }
    }

    pub(crate) fn invalid_tier(&self) -> bool {
        self.invalid_tier
    }

    pub(crate) fn user(&self) -> u16 {
        self.user.unwrap_or(DEFAULT_USER_BUCKET)
    }
}

/// A `grpc-timeout` value (gRPC over HTTP/2: at most 8 digits and a unit, `H`, `M`, `S`, `m`,
/// `u` or `n`); `None` for anything else, which the call then waits as if it had none (tonic's
/// server ignores such a value too).
pub(crate) fn parse_grpc_timeout(v: &[u8]) -> Option<Duration> {
    let (&unit, digits) = v.split_last()?;
    let n = whole_number(digits, 8)?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A deadline header's whole number of milliseconds (at most 12 digits, about 31 years).
pub(crate) fn parse_millis(v: &[u8]) -> Option<Duration> {
    whole_number(v, 12).map(Duration::from_millis)
}

/// 1 to `most` ASCII digits, nothing else (no sign, no space): a client's value, checked.
fn whole_number(v: &[u8], most: usize) -> Option<u64> {
    if v.is_empty() || v.len() > most || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
}

/// FNV-1a and splitmix64's finaliser: stable across processes and releases (unlike `std`'s
/// `RandomState`).
fn user_bucket(key: &[u8]) -> u16 {
    struct Fnv(u64);
    impl Hasher for Fnv {
        fn finish(&self) -> u64 {
            self.0
        }
        fn write(&mut self, bytes: &[u8]) {
            for b in bytes {
                self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
            }
        }
    }
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    key.hash(&mut h);
    // FNV's high bits mix poorly for short keys: finish with splitmix64's mixer.
    (crate::mix::mix64(h.finish()) >> 48) as u16
}

/// The class's dynamic score within its tier (seed 3.1), 0..=65535:
/// `w1 / SLA + w2 * log(QPS + 1) - w3 * P99 + w4 * BurstRatio`, each term normalised to
/// 0..=1 (SLA against 50 ms, QPS against 10,000/s, P99 against the SLA, the burst ratio
/// against the tier's tolerance), weights 0.4 / 0.2 / 0.2 / 0.2, the result shifted into
/// 0..=1. Tighter SLAs and busier classes first; a class already missing its SLA last, as
/// its callers are likely gone.
pub(crate) fn score(tier: Tier, sla_secs: f64, qps: f64, p99_secs: f64, burst: f64) -> u16 {
    let sla = (0.05 / sla_secs.max(1e-6)).min(1.0);
    let rate = ((qps.max(0.0) + 1.0).ln() / 10_001f64.ln()).min(1.0);
    let p99 = (p99_secs / sla_secs.max(1e-6)).min(1.0);
    let burst = (burst.max(0.0) / tier.burst_tolerance()).min(1.0);
    let s = 0.4 * sla + 0.2 * rate - 0.2 * p99 + 0.2 * burst;
    ((s + 0.2).clamp(0.0, 1.0) * f64::from(u16::MAX)) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_buckets_are_stable_and_spread() {
        assert_eq!(user_bucket(b"alice"), user_bucket(b"alice"));
        let buckets: std::collections::HashSet<u16> = (0..1000)
            .map(|i| user_bucket(format!("user-{i}").as_bytes()))
            .collect();
        assert!(buckets.len() > 980, "{} buckets", buckets.len());
    }

    #[test]
    fn grpc_timeouts_are_read_as_the_protocol_writes_them() {
        let ms = Duration::from_millis;
        for (v, want) in [
            (&b"300m"[..], Some(ms(300))),
            (b"2S", Some(ms(2_000))),
            (b"1M", Some(ms(60_000))),
            (b"1H", Some(ms(3_600_000))),
            (b"1500u", Some(Duration::from_micros(1_500))),
            (b"99999999n", Some(Duration::from_nanos(99_999_999))),
            (b"0m", Some(Duration::ZERO)),
            // Garbage, or more than 8 digits: as if there were none.
            (b"123456789m", None),
            (b"m", None),
            (b"", None),
            (b"10", None),
            (b"10s", None),
            (b"+10m", None),
            (b"1.5S", None),
            ("10\u{00b5}".as_bytes(), None),
        ] {
            assert_eq!(
                parse_grpc_timeout(v),
                want,
                "{:?}",
                String::from_utf8_lossy(v)
            );
        }
        assert_eq!(parse_millis(b"15000"), Some(Duration::from_secs(15)));
        for bad in [
            &b""[..],
            b" 15",
            b"15 ",
            b"-1",
            b"1e3",
            b"1.5",
            b"1234567890123",
        ] {
            assert_eq!(
                parse_millis(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn a_call_waits_at_most_half_its_deadline() {
        let ms = Duration::from_millis;
        let key = AdmissionKey::none();
        assert_eq!(key.wait_bound(ms(1_000)), ms(1_000));
        assert_eq!(key.with_deadline(ms(300)).wait_bound(ms(1_000)), ms(150));
        assert_eq!(
            key.with_deadline(ms(5_000)).wait_bound(ms(1_000)),
            ms(1_000)
        );
        assert_eq!(key.with_deadline(ms(0)).wait_bound(ms(50)), ms(0));
    }

    #[test]
    fn an_upstream_tier_raises_never_lowers() {
        let up = AdmissionKey::none().with_tier(Some(Tier::Gold));
        assert_eq!(up.tier(Tier::Bronze), Tier::Gold);
        let down = AdmissionKey::none().with_tier(Some(Tier::Bronze));
        assert_eq!(down.tier(Tier::Gold), Tier::Gold);
        assert_eq!(AdmissionKey::none().user(), DEFAULT_USER_BUCKET);
    }

    #[test]
    fn scores_prefer_tight_slas_and_penalise_missed_ones() {
        let fast = score(Tier::Silver, 0.05, 100.0, 0.01, 1.0);
        let slow = score(Tier::Silver, 1.0, 100.0, 0.01, 1.0);
        let missing = score(Tier::Silver, 0.05, 100.0, 0.2, 1.0);
        assert!(fast > slow && fast > missing, "{fast} {slow} {missing}");
    }

    #[test]
    fn bad_settings_name_the_field() {
        let e = Admission::adaptive().min_limit(0).validate().unwrap_err();
        assert!(e.to_string().contains("admission.min_limit"), "{e}");
        let e = Admission::adaptive()
            .initial_limit(5000)
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("admission.initial_limit"), "{e}");
        let e = Admission::adaptive()
            .cpu_threshold(1.5)
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("admission.cpu_threshold"), "{e}");
    }
}
