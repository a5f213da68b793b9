//! When kept tasks are replayed: the `delayed_retry` schedule ([`RetryPolicy`]) and the spool's
//! backfill conditions ([`Backfill`]).

use std::time::Duration;

use crate::error::ConfigError;

/// `Err` for a setting out of range.
fn bad(field: &'static str, reason: &str) -> Result<(), ConfigError> {
    Err(ConfigError::InvalidValue {
        field,
        reason: reason.into(),
    })
}

/// `now_ms` plus `d`, in milliseconds, saturating (a deadline of `Duration::MAX` is never).
pub(crate) fn after(now_ms: u64, d: Duration) -> u64 {
    now_ms.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The `delayed_retry` schedule: exponential backoff with jitter, capped (the seed's "retry
/// interval stretched up to 30 s"), until the task succeeds or its attempts or deadline run
/// out; then it moves to manual review.
///
/// The n-th wait is drawn uniformly from `[d/2, d]` with `d = min(initial x 2^(n-1), max)`.
#[derive(Debug, Clone, PartialEq)]
#[must_use = "a setting or builder does nothing until it is passed on or built"]
pub struct RetryPolicy {
    pub(crate) initial: Duration,
    pub(crate) max_interval: Duration,
    pub(crate) max_attempts: u32,
    pub(crate) deadline: Option<Duration>,
}

impl Default for RetryPolicy {
    /// 1 s, doubling, at most 30 s apart, 12 attempts, within 1 hour.
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            max_interval: Duration::from_secs(30),
            max_attempts: 12,
            deadline: Some(Duration::from_secs(3600)),
        }
    }
}

impl RetryPolicy {
    /// The first wait (default 1 s).
    pub fn initial(mut self, d: Duration) -> Self {
        self.initial = d;
        self
    }

    /// The longest wait between attempts (default 30 s; at most a day).
    pub fn max_interval(mut self, d: Duration) -> Self {
        self.max_interval = d;
        self
    }

    /// Replays before the task moves to manual review (default 12). Spooled tasks that keep
    /// failing when replayed move there after as many attempts.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }

    /// How long after it was kept a task is retried at most (default 1 hour; `None`: no
    /// deadline, only `max_attempts`).
    pub fn deadline(mut self, d: Option<Duration>) -> Self {
        self.deadline = d;
        self
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.initial.is_zero() {
            return bad("fallback.retry.initial", "must be greater than zero");
        }
        if self.max_interval < self.initial {
            return bad(
                "fallback.retry.max_interval",
                &format!(
                    "must be at least the initial wait (max_interval {:?}, initial {:?})",
                    self.max_interval, self.initial
                ),
            );
        }
        if self.max_interval > crate::error::MAX_DURATION {
            return bad(
                "fallback.retry.max_interval",
                &format!(
                    "must be at most a day, not {:?} (the longest wait between two attempts)",
                    self.max_interval
                ),
            );
        }
        if self.max_attempts == 0 {
            return bad("fallback.retry.max_attempts", "must be at least 1");
        }
        if self.deadline.is_some_and(|d| d.is_zero()) {
            return bad(
                "fallback.retry.deadline",
                "must be greater than zero (every task would go to manual review unreplayed); \
                 None for no deadline",
            );
        }
        Ok(())
    }

    /// The wait before attempt `attempts + 1`, with `unit` in `[0, 1)` drawing the jitter.
    pub(crate) fn backoff(&self, attempts: u32, unit: f64) -> Duration {
        let exp = attempts.saturating_sub(1).min(31);
        let d = self
            .initial
            .saturating_mul(1u32 << exp)
            .min(self.max_interval);
        d.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0))
    }
}

/// When and how fast the spool is backfilled.
///
/// A class's spooled tasks are replayed only while the class is **healthy** (breaker closed and
/// no policy diverting it, or recovering with no live calls at all; its p99 under `headroom` x
/// its SLA) **and** the service is
/// **off-peak**: inside the configured daily window, or below the configured request rate
/// (either is enough; with neither configured, health alone decides). Replays are
/// rate-limited; the rate halves whenever the class's p99 passes the headroom and grows back
/// by a tenth per period while it stays under, and backfill of a class stops the moment it
/// degrades again.
#[derive(Debug, Clone, PartialEq)]
#[must_use = "a setting or builder does nothing until it is passed on or built"]
pub struct Backfill {
    pub(crate) rate: f64,
    pub(crate) window: Option<(u32, u32)>,
    pub(crate) below_rps: Option<f64>,
    pub(crate) headroom: f64,
}

impl Default for Backfill {
    /// 100 replays/s, health alone decides, headroom 0.8.
    fn default() -> Self {
        Self {
            rate: 100.0,
            window: None,
            below_rps: None,
            headroom: 0.8,
        }
    }
}

impl Backfill {
    /// The most replays per second (default 100).
    pub fn rate(mut self, per_second: f64) -> Self {
        self.rate = per_second;
        self
    }

    /// Off-peak every day between `start` and `end`, as `"HH:MM"` in UTC (`"22:00"` to
    /// `"06:00"` wraps past midnight).
    pub fn window(mut self, start: &str, end: &str) -> Result<Self, ConfigError> {
        let parse = |field: &'static str, s: &str| -> Result<u32, ConfigError> {
            let bad = || ConfigError::InvalidValue {
                field,
                reason: format!("`{s}` is not a time of day as HH:MM (UTC)"),
            };
            let (h, m) = s.trim().split_once(':').ok_or_else(bad)?;
            // Digits only (`u32::from_str` would take `+1`), one or two for the hour, two for
            // the minute.
            let digits = |part: &str, lengths: std::ops::RangeInclusive<usize>| {
                lengths.contains(&part.len()) && part.bytes().all(|b| b.is_ascii_digit())
            };
            if !(digits(h, 1..=2) && digits(m, 2..=2)) {
                return Err(bad());
            }
            let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
            if h > 23 || m > 59 {
                return Err(bad());
            }
            Ok(h * 60 + m)
        };
        let (start, end) = (
            parse("fallback.backfill.window.start", start)?,
            parse("fallback.backfill.window.end", end)?,
        );
        if start == end {
            return Err(ConfigError::InvalidValue {
                field: "fallback.backfill.window",
                reason: "start and end are the same time: an empty window would never open".into(),
            });
        }
        self.window = Some((start, end));
        Ok(self)
    }

    /// Off-peak whenever the class receives fewer than `rps` requests per second (measured
    /// over its last window).
    pub fn below_rps(mut self, rps: f64) -> Self {
        self.below_rps = Some(rps);
        self
    }

    /// The share of the class's SLA its p99 may reach while backfilling (default 0.8).
    pub fn headroom(mut self, share: f64) -> Self {
        self.headroom = share;
        self
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if !(self.rate.is_finite() && self.rate > 0.0) {
            return bad("fallback.backfill.rate", "must be a positive number");
        }
        if !(self.headroom.is_finite() && self.headroom > 0.0) {
            return bad("fallback.backfill.headroom", "must be a positive number");
        }
        if self.below_rps.is_some_and(|r| !(r.is_finite() && r >= 0.0)) {
            return bad("fallback.backfill.below_rps", "must be a number >= 0");
        }
        Ok(())
    }

    pub(crate) fn in_window(&self, now_ms: u64) -> Option<bool> {
        let (start, end) = self.window?;
        let minute = ((now_ms / 60_000) % (24 * 60)) as u32;
        Some(if start <= end {
            (start..end).contains(&minute)
        } else {
            minute >= start || minute < end
        })
    }
}

/// Wall-clock milliseconds that advance with tokio's clock (so that paused-clock tests see
/// backoff and off-peak windows pass).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    wall0: u64,
    start: tokio::time::Instant,
}

impl Clock {
    pub(crate) fn new() -> Self {
        Self {
            wall0: super::record::now_ms(),
            start: tokio::time::Instant::now(),
        }
    }

    pub(crate) fn now_ms(&self) -> u64 {
        self.wall0 + self.start.elapsed().as_millis() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_in_the_upper_half() {
        let p = RetryPolicy::default();
        assert_eq!(p.backoff(1, 1.0), Duration::from_secs(1));
        assert_eq!(p.backoff(2, 1.0), Duration::from_secs(2));
        assert_eq!(p.backoff(6, 1.0), Duration::from_secs(30));
        assert_eq!(p.backoff(60, 1.0), Duration::from_secs(30));
        assert_eq!(p.backoff(3, 0.0), Duration::from_secs(2));
        assert!(RetryPolicy::default().max_attempts(0).validate().is_err());
    }

    #[test]
    fn windows_wrap_past_midnight() {
        let b = Backfill::default().window("22:00", "06:00").unwrap();
        let at = |h: u64, m: u64| (h * 60 + m) * 60_000 + 86_400_000 * 3;
        assert_eq!(b.in_window(at(23, 0)), Some(true));
        assert_eq!(b.in_window(at(5, 59)), Some(true));
        assert_eq!(b.in_window(at(6, 0)), Some(false));
        assert_eq!(b.in_window(at(12, 0)), Some(false));
        let err = Backfill::default().window("25:00", "01:00").unwrap_err();
        assert!(
            err.to_string().contains("fallback.backfill.window.start"),
            "{err}"
        );
        assert_eq!(Backfill::default().in_window(0), None);
        for odd in [
            "+1:+5", "1:5", "-1:00", "01:005", " 1 :05", "١:٠٥", "0x1:00", "1:",
        ] {
            let err = Backfill::default().window(odd, "06:00").unwrap_err();
            assert!(err.to_string().contains("HH:MM"), "{odd}: {err}");
        }
        assert!(Backfill::default().window("7:30", " 08:00 ").is_ok());
    }
}
