//! The clock that times calls on the data path.
//!
//! Timing a call takes two clock reads, and on a typical x86 VM two `Instant::now()` calls cost
//! about 49 ns: more than the rest of the closed path together. The default clock reads the
//! TSC through [`quanta`] (about 19 ns a pair on the same machine). Tests that run with
//! `tokio::time::pause()` and want latencies to follow the paused clock select
//! [`LatencyClock::Tokio`].
//!
//! Only per-call latency uses this clock. Everything else that depends on time (ticks, open
//! durations, timeouts) runs on tokio time.

use std::time::Duration;

/// Which clock times calls; see the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum LatencyClock {
    /// The CPU's time-stamp counter through `quanta` (falls back to the OS clock where the TSC
    /// is unusable). The default.
    #[default]
    Tsc,
    /// `tokio::time::Instant`: follows `tokio::time::pause()` and `advance()`. For tests.
    Tokio,
}

#[derive(Debug, Clone)]
pub(crate) enum Timer {
    Tsc(quanta::Clock),
    Tokio(tokio::time::Instant),
}

impl Timer {
    pub(crate) fn new(clock: LatencyClock) -> Self {
        match clock {
            LatencyClock::Tsc => Timer::Tsc(quanta::Clock::new()),
            LatencyClock::Tokio => Timer::Tokio(tokio::time::Instant::now()),
        }
    }

    /// An opaque start stamp.
    #[inline]
    pub(crate) fn start(&self) -> u64 {
        match self {
            Timer::Tsc(c) => c.raw(),
            Timer::Tokio(epoch) => epoch.elapsed().as_nanos() as u64,
        }
    }

    /// Time from stamp `a` to the later stamp `b`.
    #[inline]
    pub(crate) fn delta(&self, a: u64, b: u64) -> Duration {
        Duration::from_nanos(match self {
            Timer::Tsc(c) => c.delta_as_nanos(a, b),
            Timer::Tokio(_) => b.saturating_sub(a),
        })
    }

    /// Time since `start`.
    #[inline]
    pub(crate) fn elapsed(&self, start: u64) -> Duration {
        Duration::from_nanos(match self {
            Timer::Tsc(c) => c.delta_as_nanos(start, c.raw()),
            Timer::Tokio(epoch) => (epoch.elapsed().as_nanos() as u64).saturating_sub(start),
        })
    }
}
