//! Directives: what the control loop tells the data path to do with a class's calls.
//!
//! A directive fits in one `u64`, so the data path reads its class's directive with one atomic
//! load and the control loop publishes a new one with one atomic store.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::class::Route;

/// Why a call was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// The breaker is open.
    BreakerOpen,
    /// The breaker was forced open by hand.
    ForcedOpen,
    /// The breaker is half-open and every probe is taken.
    ProbesExhausted,
    /// The breaker is recovering and admits only a fraction of calls.
    Recovering,
    /// The class is degraded: a share of its calls goes to the fallback route.
    Degraded,
    /// The call exceeded the class timeout.
    Timeout,
    /// A policy shed the call.
    Shed,
    /// A policy diverted the call (open, fallback, degrade, admit a fraction).
    Policy,
    /// The service is saturated: the call waited past its class's queue delay bound (or half
    /// its caller's deadline, when shorter), or was pushed out of its tier's full queue (see
    /// [`admit`](crate::admit)).
    Overload,
    /// The call was to be kept (spooled, retried later, queued for review) but its body is over
    /// the capture limit, or the headers it keeps are over theirs.
    TooLarge,
    /// The call was to be kept but was not: the store refused it (full, or failing), its body
    /// failed or did not arrive in time, it was a protocol upgrade (nobody could be handed
    /// the connection later), a `batch_merge` delta could not be journaled (its `extract`
    /// panicked, or its type cannot be read back), or it came through another degrader's
    /// layer. Worth sending again later (`Retry-After`).
    NotKept,
    /// The call was to be kept but is not a well-formed call (a gRPC body that is not a
    /// sequence of length-prefixed messages, an idempotency key that cannot be one, a call
    /// a `batch_merge`'s `extract` refuses): it would fail every replay, be kept under
    /// another key at each retry, or be refused again, so it is refused rather than kept.
    Malformed,
    /// The class is degraded early, ahead of a failure the predictor foresees: a share of
    /// its calls goes to the fallback route (as [`Reason::Degraded`], which the degrade
    /// rule and an operator's degrade give).
    Predicted,
}

// A reason is packed in 4 bits (`Packed`): one past them would read back as `Shed`.
const _: () = assert!(Reason::ALL.len() <= 16);

impl Reason {
    const ALL: [Reason; 13] = [
        Reason::BreakerOpen,
        Reason::ForcedOpen,
        Reason::ProbesExhausted,
        Reason::Recovering,
        Reason::Degraded,
        Reason::Timeout,
        Reason::Shed,
        Reason::Policy,
        Reason::Overload,
        Reason::TooLarge,
        Reason::NotKept,
        Reason::Malformed,
        Reason::Predicted,
    ];

    /// The reason as used in metrics and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::BreakerOpen => "breaker_open",
            Reason::ForcedOpen => "forced_open",
            Reason::ProbesExhausted => "probes_exhausted",
            Reason::Recovering => "recovering",
            Reason::Degraded => "degraded",
            Reason::Timeout => "timeout",
            Reason::Shed => "shed",
            Reason::Policy => "policy",
            Reason::Overload => "overload",
            Reason::TooLarge => "too_large",
            Reason::NotKept => "not_kept",
            Reason::Malformed => "malformed",
            Reason::Predicted => "predicted",
        }
    }

    /// The reason in words, for people: "circuit breaker open".
    pub const fn describe(self) -> &'static str {
        match self {
            Reason::BreakerOpen => "circuit breaker open",
            Reason::ForcedOpen => "circuit breaker forced open by an operator",
            Reason::ProbesExhausted => "circuit breaker half-open and every probe taken",
            Reason::Recovering => "recovering, only part of the traffic is admitted",
            Reason::Degraded => "degraded, only part of the traffic is admitted",
            Reason::Timeout => "timed out",
            Reason::Shed => "shed by a policy",
            Reason::Policy => "diverted by a policy",
            Reason::Overload => {
                "overloaded: no capacity to admit the call in time (lower tiers give way first)"
            }
            Reason::TooLarge => "diverted, and the request body is over the limit for keeping it",
            Reason::NotKept => "diverted, and the request could not be stored for later",
            Reason::Malformed => {
                "diverted, and the request (its body, its idempotency key, or what a batch merge \
                 reads from it) is malformed, so it cannot be kept"
            }
            Reason::Predicted => {
                "degraded ahead of a predicted failure, only part of the traffic is admitted"
            }
        }
    }

    fn from_bits(bits: u64) -> Reason {
        Reason::ALL
            .get(bits as usize)
            .copied()
            .unwrap_or(Reason::Shed)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the data path does with a class's calls until the next tick.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum Directive {
    /// Admit every call.
    Admit,
    /// Admit no call: send each to `route`.
    Divert {
        /// Why.
        reason: Reason,
        /// Where the calls go.
        route: Route,
        /// When the caller may retry, if known.
        retry_after: Option<Duration>,
    },
    /// Admit `fraction` of calls (spread evenly), send the rest to `route`.
    AdmitFraction {
        /// Share admitted, 0.0..=1.0 (resolution 1/65536).
        fraction: f64,
        /// Why the rest is not admitted.
        reason: Reason,
        /// Where the rest goes.
        route: Route,
        /// When the caller may retry, if known.
        retry_after: Option<Duration>,
    },
    /// Admit every call, after holding it for `by` (policies' `delay(ms)`).
    ///
    /// The call's future is created at once and first polled when the delay has elapsed; a
    /// service that starts work inside `call` rather than when polled starts it at once.
    Delay {
        /// How long each call is held.
        by: Duration,
    },
    /// Admit only calls that take one of the class's reserved probe permits.
    Probe {
        /// Where calls without a permit go.
        route: Route,
        /// When the caller may retry, if known.
        retry_after: Option<Duration>,
    },
}

pub(crate) const KIND_ADMIT: u64 = 0;
const KIND_DIVERT: u64 = 1;
pub(crate) const KIND_FRACTION: u64 = 2;
pub(crate) const KIND_PROBE: u64 = 3;

/// The packed form, from the lowest bit: kind (bits 0-1) | reason (2-5) | route (6-9) |
/// fraction is exactly 1.0 (10) | per-request rules apply (11) | delayed admit (12) |
/// unused (13-15) | fraction (16-31) | retry-after or delay in ms (32-63, `u32::MAX` = none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Packed(pub(crate) u64);

impl Packed {
    pub(crate) const ADMIT: Packed = Packed(KIND_ADMIT | (NO_RETRY << 32));

    /// Admit at once: the closed path's only check.
    #[inline]
    pub(crate) fn is_admit(self) -> bool {
        self.0 & (0b11 | DELAY_BIT) == KIND_ADMIT
    }

    /// The delay of a delayed admit.
    #[inline]
    pub(crate) fn delay(self) -> Option<Duration> {
        (self.0 & DELAY_BIT != 0).then(|| Duration::from_millis(self.0 >> 32))
    }

    #[inline]
    pub(crate) fn kind(self) -> u64 {
        self.0 & 0b11
    }

    #[inline]
    pub(crate) fn reason(self) -> Reason {
        Reason::from_bits((self.0 >> 2) & 0xF)
    }

    #[inline]
    pub(crate) fn route(self) -> Route {
        Route::from_bits(((self.0 >> 6) & 0xF) as u8)
    }

    /// Admission threshold: a call with a 16-bit ticket below it is admitted.
    #[inline]
    pub(crate) fn threshold(self) -> u32 {
        ((self.0 >> 16) & 0xFFFF) as u32 + u32::from(self.0 & FULL_BIT != 0) * 0x1_0000
    }

    /// Whether per-request rules apply to the class (a control-loop stage's `on_request`).
    #[inline]
    pub(crate) fn has_overlay(self) -> bool {
        self.0 & OVERLAY_BIT != 0
    }

    /// The same directive, flagged (or not) as having per-request rules.
    pub(crate) fn with_overlay(self, on: bool) -> Packed {
        Packed(if on {
            self.0 | OVERLAY_BIT
        } else {
            self.0 & !OVERLAY_BIT
        })
    }

    /// The same directive with `retry` as its retry-after when it turns calls away and says
    /// nothing of when to come back, or sooner than `retry` (the next tick: the directive
    /// holds until then, so a client told to come back sooner, or at once as the last tick of
    /// an open breaker would tell it, is turned away again). A delayed admit keeps its delay.
    pub(crate) fn with_retry_at_least(self, retry: Duration) -> Packed {
        let ms = (retry.as_millis().min(u128::from(NO_RETRY - 1))) as u64;
        let set = self.0 >> 32;
        if self.kind() == KIND_ADMIT || (set != NO_RETRY && set >= ms) {
            return self;
        }
        Packed((self.0 & 0xFFFF_FFFF) | (ms << 32))
    }

    #[inline]
    pub(crate) fn retry_after(self) -> Option<Duration> {
        let ms = self.0 >> 32;
        (ms != NO_RETRY).then(|| Duration::from_millis(ms))
    }
}

const NO_RETRY: u64 = u32::MAX as u64;
/// Bit 10 (in the unused range) marks a fraction of exactly 1.0.
const FULL_BIT: u64 = 1 << 10;
/// Bit 12 turns an admit into a delayed admit; the delay is in the retry-after field.
const DELAY_BIT: u64 = 1 << 12;
/// Bit 11 marks a class with per-request rules (rollouts, `on_request` hooks).
const OVERLAY_BIT: u64 = 1 << 11;

fn pack_common(kind: u64, reason: Reason, route: Route, retry: Option<Duration>) -> u64 {
    let ms = retry.map_or(NO_RETRY, |d| {
        (d.as_millis().min(u128::from(NO_RETRY - 1))) as u64
    });
    kind | ((reason as u64) << 2) | (u64::from(route.to_bits()) << 6) | (ms << 32)
}

impl Directive {
    pub(crate) fn pack(self) -> Packed {
        Packed(match self {
            Directive::Admit => Packed::ADMIT.0,
            Directive::Divert {
                reason,
                route,
                retry_after,
            } => pack_common(KIND_DIVERT, reason, route, retry_after),
            Directive::AdmitFraction {
                fraction,
                reason,
                route,
                retry_after,
            } => {
                let f = if fraction.is_nan() {
                    0.0
                } else {
                    fraction.clamp(0.0, 1.0)
                };
                let bits = if f >= 1.0 {
                    FULL_BIT
                } else {
                    ((f * 65536.0) as u64).min(0xFFFF) << 16
                };
                pack_common(KIND_FRACTION, reason, route, retry_after) | bits
            }
            Directive::Probe { route, retry_after } => {
                pack_common(KIND_PROBE, Reason::ProbesExhausted, route, retry_after)
            }
            Directive::Delay { by } => {
                pack_common(KIND_ADMIT, Reason::Policy, Route::Reject, Some(by)) | DELAY_BIT
            }
        })
    }

    pub(crate) fn unpack(p: Packed) -> Directive {
        match p.kind() {
            KIND_ADMIT => match p.delay() {
                Some(by) => Directive::Delay { by },
                None => Directive::Admit,
            },
            KIND_DIVERT => Directive::Divert {
                reason: p.reason(),
                route: p.route(),
                retry_after: p.retry_after(),
            },
            KIND_FRACTION => Directive::AdmitFraction {
                fraction: f64::from(p.threshold()) / 65536.0,
                reason: p.reason(),
                route: p.route(),
                retry_after: p.retry_after(),
            },
            _ => Directive::Probe {
                route: p.route(),
                retry_after: p.retry_after(),
            },
        }
    }
}

/// A class's published directive.
#[derive(Debug)]
pub(crate) struct DirectiveCell(AtomicU64);

impl DirectiveCell {
    pub(crate) fn new() -> Self {
        Self(AtomicU64::new(Packed::ADMIT.0))
    }

    #[inline]
    pub(crate) fn load(&self) -> Packed {
        Packed(self.0.load(Ordering::Acquire))
    }

    pub(crate) fn store_packed(&self, p: Packed) {
        self.0.store(p.0, Ordering::Release);
    }
}

/// The 16-bit admission ticket of the `seq`-th call: a golden-ratio (Weyl) sequence, so any run
/// of consecutive calls is admitted in proportion to the fraction, evenly spread.
#[inline]
pub(crate) fn ticket(seq: u32) -> u32 {
    seq.wrapping_mul(0x9E37_79B9) >> 16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let cases = [
            Directive::Admit,
            Directive::Divert {
                reason: Reason::BreakerOpen,
                route: Route::Spool,
                retry_after: Some(Duration::from_millis(1500)),
            },
            Directive::AdmitFraction {
                fraction: 0.25,
                reason: Reason::Recovering,
                route: Route::Service,
                retry_after: None,
            },
            Directive::AdmitFraction {
                fraction: 1.0,
                reason: Reason::Degraded,
                route: Route::DelayedRetry,
                retry_after: None,
            },
            Directive::Probe {
                route: Route::Reject,
                retry_after: Some(Duration::ZERO),
            },
        ];
        for d in cases {
            assert_eq!(Directive::unpack(d.pack()), d);
        }
        for reason in Reason::ALL {
            let d = Directive::AdmitFraction {
                fraction: 0.5,
                reason,
                route: Route::Cached,
                retry_after: None,
            };
            assert_eq!(Directive::unpack(d.pack()), d, "{reason}");
        }
    }

    #[test]
    fn a_retry_after_sooner_than_the_next_tick_is_the_next_tick() {
        let tick = Duration::from_millis(500);
        let open = |left: Option<u64>| {
            Directive::Divert {
                reason: Reason::BreakerOpen,
                route: Route::Reject,
                retry_after: left.map(Duration::from_millis),
            }
            .pack()
            .with_retry_at_least(tick)
            .retry_after()
        };
        // The open breaker's last tick: "0.0 s" told clients to come back at once.
        assert_eq!(open(Some(0)), Some(tick));
        assert_eq!(open(Some(120)), Some(tick));
        assert_eq!(open(None), Some(tick));
        assert_eq!(open(Some(4_500)), Some(Duration::from_millis(4_500)));
        // A delayed admit keeps its delay.
        let delayed = Directive::Delay {
            by: Duration::from_millis(5),
        }
        .pack()
        .with_retry_at_least(tick);
        assert_eq!(delayed.retry_after(), Some(Duration::from_millis(5)));
    }

    #[test]
    fn only_a_plain_admit_takes_the_closed_path() {
        assert!(Directive::Admit.pack().is_admit());
        let delayed = Directive::Delay {
            by: Duration::from_millis(5),
        }
        .pack();
        assert!(!delayed.is_admit());
        assert_eq!(delayed.delay(), Some(Duration::from_millis(5)));
        assert_eq!(Directive::Admit.pack().delay(), None);
    }

    #[test]
    fn tickets_spread_evenly() {
        let threshold = (0.3 * 65536.0) as u32;
        let admitted = (0..1000u32).filter(|&s| ticket(s) < threshold).count();
        assert!((290..=310).contains(&admitted), "{admitted}");
    }
}
