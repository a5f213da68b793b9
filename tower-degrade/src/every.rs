//! [`Every`]: at most one log line per period for a condition that repeats.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// How often a repeating condition is logged.
pub(crate) const LOG_EVERY: Duration = Duration::from_secs(10);

/// Lets one log line through per period and counts the ones held back, so that a condition
/// met on every step or every call (a store that cannot be reached: the worker steps ten
/// times a second, and every diverted call tries to keep its task) says so once, then once a
/// period with how many it held back, rather than flood the log. Lock-free: a call path may
/// ask it.
///
/// A condition that flaps (a store at its memory limit, refusing one write and taking the
/// next) is still said at most once a period: an end ([`reset`](Self::reset)) does not let
/// the next occurrence through before the period is over.
#[derive(Debug)]
pub(crate) struct Every {
    period_ms: u64,
    /// When the next line may go, in ms since [`epoch`]; 0 at first.
    next_ms: AtomicU64,
    held: AtomicU64,
    /// A line went since the last reset (so the end is worth saying).
    said: AtomicBool,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Every {
    pub(crate) const fn new(period: Duration) -> Self {
        Self {
            period_ms: period.as_millis() as u64,
            next_ms: AtomicU64::new(0),
            held: AtomicU64::new(0),
            said: AtomicBool::new(false),
        }
    }

    /// `Some(lines held back since the last)` when a line may go now; `None` (counted) when not.
    pub(crate) fn ready(&self) -> Option<u64> {
        let now = epoch().elapsed().as_millis() as u64;
        let next = self.next_ms.load(Relaxed);
        if now >= next
            && self
                .next_ms
                .compare_exchange(next, now + self.period_ms, Relaxed, Relaxed)
                .is_ok()
        {
            self.said.store(true, Relaxed);
            Some(self.held.swap(0, Relaxed))
        } else {
            self.held.fetch_add(1, Relaxed);
            None
        }
    }

    /// The condition ended. `Some(lines held back since the last)` if a line was let through
    /// since the last reset (the end is then worth saying, with that count), `None` if not.
    /// Its next occurrence is logged once the period since the last line is over.
    pub(crate) fn reset(&self) -> Option<u64> {
        // Called on every success (each kept call, each read of the store): a load when
        // nothing was said, no write to a line the callers share.
        if !self.said.load(Relaxed) {
            return None;
        }
        self.said
            .swap(false, Relaxed)
            .then(|| self.held.swap(0, Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_period_with_the_count_held_back() {
        let every = Every::new(Duration::from_secs(3600));
        assert_eq!(every.ready(), Some(0));
        assert_eq!(every.ready(), None);
        assert_eq!(every.ready(), None);
        assert_eq!(every.reset(), Some(2), "a line went, two held back since");
        assert_eq!(every.reset(), None, "none since");
        // A condition that flaps is said once a period, not once per flip.
        assert_eq!(every.ready(), None, "within the period of the last line");
        assert_eq!(every.reset(), None, "no line went since the last end");
        let every = Every::new(Duration::ZERO);
        assert_eq!(every.ready(), Some(0));
        assert_eq!(every.ready(), Some(0));
        assert_eq!(every.reset(), Some(0));
        assert_eq!(
            every.ready(),
            Some(0),
            "a new occurrence after the period is said"
        );
    }
}
