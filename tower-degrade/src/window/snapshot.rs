//! Turning the shards' cumulative counters into one tick's [`WindowSnapshot`] per class.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use super::histogram::{self, BUCKETS};
use super::{Outcome, Shard};

/// Cumulative sums of one class over all shards, as read by the control loop.
#[derive(Clone)]
pub(crate) struct Cumulative {
    outcomes: [u64; 6],
    inflight: u64,
    queued: u64,
    queued_micros: u64,
    hist: Box<[u32; BUCKETS]>,
}

impl std::fmt::Debug for Cumulative {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cumulative")
            .field("outcomes", &self.outcomes)
            .finish_non_exhaustive()
    }
}

impl Default for Cumulative {
    fn default() -> Self {
        Self {
            outcomes: [0; 6],
            inflight: 0,
            queued: 0,
            queued_micros: 0,
            hist: Box::new([0; BUCKETS]),
        }
    }
}

/// How many past reads' in-flight counts a reader keeps ([`InflightSamples`]).
const SAMPLES: usize = 16;

/// The in-flight count of a class at its last reads, with when each was taken (a stamp of
/// the shards' timer): a call in flight for longer than `a` now was in flight at every read
/// since `a` ago, so the fewest calls in flight at any of them bounds how many can be overdue.
#[derive(Debug, Default)]
struct InflightSamples {
    at: [(u64, u64); SAMPLES],
    len: usize,
    next: usize,
}

impl InflightSamples {
    /// The fewest calls in flight at `now` (`inflight`) and at the reads within `within` of
    /// it; then remember this read.
    fn bound(
        &mut self,
        timer: &crate::clock::Timer,
        now: u64,
        inflight: u64,
        within: Duration,
    ) -> u64 {
        let mut least = inflight;
        for k in 1..=self.len {
            let (stamp, count) = self.at[(self.next + SAMPLES - k) % SAMPLES];
            if timer.delta(stamp, now) > within {
                break;
            }
            least = least.min(count);
        }
        self.at[self.next] = (now, inflight);
        self.next = (self.next + 1) % SAMPLES;
        self.len = (self.len + 1).min(SAMPLES);
        least
    }
}

/// What the control loop keeps per class between ticks to turn cumulative sums into deltas.
#[derive(Debug)]
pub(crate) struct WindowReader {
    prev: Cumulative,
    cur: Cumulative,
    delta_hist: Box<[u32; BUCKETS]>,
    inflight_at: InflightSamples,
}

impl Default for WindowReader {
    fn default() -> Self {
        Self {
            prev: Cumulative::default(),
            cur: Cumulative::default(),
            delta_hist: Box::new([0; BUCKETS]),
            inflight_at: InflightSamples::default(),
        }
    }
}

impl WindowReader {
    /// A reader of a class with no call in flight at `stamp` (a stamp of the shards' timer).
    pub(crate) fn starting(stamp: u64) -> Self {
        let mut r = Self::default();
        r.inflight_at.at[0] = (stamp, 0);
        r.inflight_at.len = 1;
        r.inflight_at.next = 1;
        r
    }
}

/// Gauges a class reports outside the request path (queue consumers, admission queues).
#[derive(Debug, Default)]
pub(crate) struct Gauges {
    pub(crate) queue_depth: AtomicU64,
    pub(crate) queue_delay_micros: AtomicU64,
    /// Whether the log already said that the class's route has no fallback to serve it.
    pub(crate) unserved_route_logged: std::sync::atomic::AtomicBool,
}

/// Inputs to one tick's snapshot that are not counters.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TickContext {
    pub(crate) tick: u64,
    pub(crate) period: Duration,
    pub(crate) sla_micros: u64,
    /// The class's abandon threshold (`u64::MAX`: never), for [`WindowSnapshot::overdue`].
    pub(crate) abandon_micros: u64,
}

impl WindowReader {
    /// Sum every shard for `class`, take the delta since the last read and build the snapshot.
    pub(crate) fn read(
        &mut self,
        shards: &[std::sync::Arc<Shard>],
        class: usize,
        gauges: &Gauges,
        ctx: TickContext,
    ) -> WindowSnapshot {
        let cur = &mut self.cur;
        cur.outcomes = [0; 6];
        cur.inflight = 0;
        cur.queued = 0;
        cur.queued_micros = 0;
        cur.hist.fill(0);
        let mut max_micros = 0u64;
        for shard in shards {
            let c = &shard.classes[class];
            for (sum, counter) in cur.outcomes.iter_mut().zip(&c.outcomes) {
                *sum = sum.wrapping_add(counter.load(Relaxed));
            }
            cur.inflight = cur.inflight.wrapping_add(c.inflight.load(Relaxed));
            cur.queued = cur.queued.wrapping_add(c.queued.load(Relaxed));
            cur.queued_micros = cur
                .queued_micros
                .wrapping_add(c.queued_micros.load(Relaxed));
            // The max is the only value reset by the reader; `swap` loses nothing.
            if c.max_micros.load(Relaxed) != 0 {
                max_micros = max_micros.max(c.max_micros.swap(0, Relaxed));
            }
            for (sum, bucket) in cur.hist.iter_mut().zip(&c.hist) {
                let v = bucket.load(Relaxed);
                if v != 0 {
                    *sum = sum.wrapping_add(v);
                }
            }
        }
        let mut counts = [0u64; 6];
        for (i, c) in counts.iter_mut().enumerate() {
            *c = cur.outcomes[i].wrapping_sub(self.prev.outcomes[i]);
        }
        let mut latency_samples = 0u64;
        for ((d, c), p) in self
            .delta_hist
            .iter_mut()
            .zip(cur.hist.iter())
            .zip(self.prev.hist.iter())
        {
            *d = c.wrapping_sub(*p);
            latency_samples += u64::from(*d);
        }
        let queued = cur.queued.wrapping_sub(self.prev.queued);
        let queued_micros = cur.queued_micros.wrapping_sub(self.prev.queued_micros);
        let measured_delay = queued_micros.checked_div(queued).unwrap_or(0);
        std::mem::swap(&mut self.prev, &mut self.cur);
        let hist = &*self.delta_hist;
        let slow = if ctx.sla_micros == 0 {
            0
        } else {
            histogram::count_above(hist, ctx.sla_micros)
        };
        let inflight = self.prev.inflight as i64;
        let completed = counts[Outcome::Success.index()]
            + counts[Outcome::Error.index()]
            + counts[Outcome::Timeout.index()];
        let mut overdue = overdue(inflight, completed, ctx.period, ctx.abandon_micros);
        if let Some(shard) = shards.first() {
            let now = shard.timer.start();
            let within = Duration::from_micros(ctx.abandon_micros);
            let bound = self
                .inflight_at
                .bound(&shard.timer, now, inflight.max(0) as u64, within);
            overdue = overdue.min(bound);
        }
        WindowSnapshot {
            tick: ctx.tick,
            overdue,
            period: ctx.period,
            successes: counts[Outcome::Success.index()],
            errors: counts[Outcome::Error.index()],
            timeouts: counts[Outcome::Timeout.index()],
            rejected: counts[Outcome::Rejected.index()],
            degraded: counts[Outcome::Degraded.index()],
            cancelled: counts[Outcome::Cancelled.index()],
            slow,
            p50: micros(histogram::quantile(hist, latency_samples, 0.50)),
            p90: micros(histogram::quantile(hist, latency_samples, 0.90)),
            p99: micros(histogram::quantile(hist, latency_samples, 0.99)),
            max: micros(max_micros),
            inflight,
            queue_depth: gauges.queue_depth.load(Relaxed),
            queue_delay: micros(measured_delay.max(gauges.queue_delay_micros.load(Relaxed))),
        }
    }

    /// The bucket counts of the last snapshot, for exporting a latency histogram.
    pub(crate) fn last_histogram(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.delta_hist
            .iter()
            .enumerate()
            .filter(|(_, c)| **c != 0)
            .map(|(b, c)| (histogram::bucket_value(b), *c))
    }
}

/// In-flight calls that will wait past the abandon threshold at the rate calls complete
/// (Little's law: `inflight - completion rate x threshold`, at least 0). The reader caps it
/// with the calls that can be that old ([`InflightSamples`]): a burst that began just before
/// a tick with no call completed yet is not overdue.
fn overdue(inflight: i64, completed: u64, period: Duration, abandon_micros: u64) -> u64 {
    if abandon_micros == u64::MAX || inflight <= 0 || period.is_zero() {
        return 0;
    }
    let rate = completed as f64 / period.as_secs_f64();
    let within = rate * abandon_micros as f64 / 1e6;
    (inflight as f64 - within).max(0.0) as u64
}

fn micros(v: u64) -> Duration {
    Duration::from_micros(v)
}

/// The statistics of one class over one tick.
///
/// Rates are over *completed* calls (success, error or timeout): calls that were rejected or
/// served by a fallback never reached the inner service and say nothing about its health.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[non_exhaustive]
pub struct WindowSnapshot {
    /// The control-loop tick this window closed at (0 for the first tick).
    pub tick: u64,
    /// The window's length.
    pub period: Duration,
    /// Calls that completed successfully.
    pub successes: u64,
    /// Calls that failed with an error.
    pub errors: u64,
    /// Calls that timed out.
    pub timeouts: u64,
    /// Calls rejected with a degraded error or response.
    pub rejected: u64,
    /// Calls served by a fallback route.
    pub degraded: u64,
    /// Calls their caller dropped before they finished and before the class's abandon
    /// threshold (later ones are `timeouts`).
    pub cancelled: u64,
    /// Calls that reached the service (completed or abandoned) slower than the class SLA.
    pub slow: u64,
    /// Median latency of the calls that reached the service; an abandoned call counts at the
    /// time it was abandoned (a lower bound), so percentiles cannot look healthy while callers
    /// give up.
    pub p50: Duration,
    /// 90th percentile latency, as `p50`.
    pub p90: Duration,
    /// 99th percentile latency, as `p50`.
    pub p99: Duration,
    /// Largest latency, as `p50` (exact).
    pub max: Duration,
    /// Calls in flight at the end of the window.
    pub inflight: i64,
    /// In-flight calls that, at the rate this window's calls completed, will have run past
    /// the class's abandon threshold (its SLA by default) before they finish: `inflight -
    /// completion rate x threshold` (Little's law), at least 0, and at most the calls that can
    /// have been in flight that long (no more than were in flight at any tick within the
    /// threshold), so a burst that began just before the tick, with nothing completed yet, is
    /// not overdue. A backlog the service cannot clear in time is failing its callers before
    /// they give up, so the rates count these calls as failed and slow. 0 for a class with
    /// `abandon_timeout(None)`.
    pub overdue: u64,
    /// Queue depth last reported for the class
    /// ([`Degrader::report_queue`](crate::Degrader::report_queue)).
    pub queue_depth: u64,
    /// Queueing delay: the mean wait of this window's calls that queued before they ran (for
    /// the inner service to become ready, or for a policy's `delay`), or the delay last
    /// reported with [`Degrader::report_queue`](crate::Degrader::report_queue), whichever is
    /// larger. A wait for readiness is also part of the call's latency (the caller waited);
    /// a policy's delay is not (the class chose it).
    pub queue_delay: Duration,
}

impl WindowSnapshot {
    /// Calls that reached the inner service and finished.
    pub fn completed(&self) -> u64 {
        self.successes + self.errors + self.timeouts
    }

    /// Every call resolved in this window, whatever its outcome.
    pub fn requests(&self) -> u64 {
        self.completed() + self.rejected + self.degraded + self.cancelled
    }

    /// Requests per second over the window.
    pub fn rps(&self) -> f64 {
        let secs = self.period.as_secs_f64();
        if secs == 0.0 {
            0.0
        } else {
            self.requests() as f64 / secs
        }
    }

    fn ratio(part: u64, whole: u64, empty: f64) -> f64 {
        if whole == 0 {
            empty
        } else {
            part as f64 / whole as f64
        }
    }

    /// Completed calls and [overdue](Self::overdue) ones: what the rates are over.
    pub fn assessed(&self) -> u64 {
        self.completed() + self.overdue
    }

    /// Successes over [assessed](Self::assessed) calls; 1.0 when there are none.
    pub fn success_rate(&self) -> f64 {
        Self::ratio(self.successes, self.assessed(), 1.0)
    }

    /// Errors, timeouts and overdue calls over assessed calls; 0.0 when there are none.
    pub fn failure_rate(&self) -> f64 {
        Self::ratio(
            self.errors + self.timeouts + self.overdue,
            self.assessed(),
            0.0,
        )
    }

    /// Errors over assessed calls.
    pub fn error_rate(&self) -> f64 {
        Self::ratio(self.errors, self.assessed(), 0.0)
    }

    /// Timeouts (and overdue calls) over assessed calls.
    pub fn timeout_rate(&self) -> f64 {
        Self::ratio(self.timeouts + self.overdue, self.assessed(), 0.0)
    }

    /// Calls slower than the class SLA (and overdue calls) over assessed calls (abandoned slow
    /// calls are counted as timeouts, so they are in both).
    pub fn slow_rate(&self) -> f64 {
        Self::ratio(
            self.slow.min(self.completed()) + self.overdue,
            self.assessed(),
            0.0,
        )
    }

    /// Calls served (successes and fallback-served calls) over all requests; 1.0 when idle.
    pub fn served_rate(&self) -> f64 {
        Self::ratio(
            self.successes + self.degraded,
            self.requests() - self.cancelled,
            1.0,
        )
    }
}
