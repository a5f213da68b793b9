//! Turning the shards' cumulative counters into one tick's [`WindowSnapshot`] per class.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use super::histogram::{self, BUCKETS};
use super::{Outcome, SLOTS, Shard, Slots};

/// Cumulative sums of one class over all shards, as read by the control loop.
#[derive(Clone)]
pub(crate) struct Cumulative {
    outcomes: [u64; 6],
    inflight: u64,
    queued: u64,
    queued_micros: u64,
    overloaded: u64,
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
            overloaded: 0,
            hist: Box::new([0; BUCKETS]),
        }
    }
}

/// The reader's side of [`Slots`]: which slots of a class's calls in flight have been
/// counted as overdue and which retired, and the calls in flight from retired slots.
#[derive(Debug, Default)]
struct Ages {
    /// A stamp of the shards' timer before which no call of the class started.
    origin: u64,
    /// The first slot not yet counted as overdue, and the first not yet retired (`None`
    /// before the first read).
    next: Option<(u64, u64)>,
    /// Calls in flight from retired slots, as moved there (wrapping; the calls of those
    /// slots that ended since are in the shards' `retired_ends`).
    retired: u64,
}

impl Ages {
    /// The calls in flight that have run past `abandon` since the last read (each counted
    /// once, at the first read at which its whole start slot is past it), from the slot
    /// counts `by_slot` summed over `shards`; then retire the slots whose counters the next
    /// slots need.
    fn step(
        &mut self,
        shards: &[std::sync::Arc<Shard>],
        class: usize,
        by_slot: &[u64; SLOTS],
        abandon: Option<Duration>,
        period: Duration,
    ) -> u64 {
        let Some(first) = shards.first() else {
            return 0;
        };
        let slots = first.slot_of[class];
        let now = slots.slot(first.timer.start());
        let origin = slots.slot(self.origin);
        let (next, retire_next) = self.next.get_or_insert((origin, origin));
        // Older slots share their counter with a newer one.
        let own = now.saturating_sub(SLOTS as u64 - 1);
        let mut overdue = 0i64;
        if let Some(a) = abandon {
            // A call of slot s has run at least (now - s - 1) slots.
            let past = a.as_nanos().div_ceil(slots.width.as_nanos().max(1));
            let past = u64::try_from(past).unwrap_or(u64::MAX).saturating_add(1);
            if let Some(hi) = now.checked_sub(past) {
                for s in (*next).max(*retire_next).max(own)..=hi {
                    overdue += by_slot[s as usize % SLOTS] as i64;
                }
                *next = (*next).max(hi + 1);
            }
        }
        if let Some(hi) = now.checked_sub(Slots::retire_age(slots.width, period)) {
            for s in (*retire_next).max(own)..=hi {
                for shard in shards {
                    let moved = shard.classes[class].slots[s as usize % SLOTS].swap(0, Relaxed);
                    self.retired = self.retired.wrapping_add(moved);
                }
            }
            *retire_next = (*retire_next).max(hi + 1);
        }
        overdue.max(0) as u64
    }
}

/// What the control loop keeps per class between ticks to turn cumulative sums into deltas.
#[derive(Debug)]
pub(crate) struct WindowReader {
    prev: Cumulative,
    cur: Cumulative,
    delta_hist: Box<[u32; BUCKETS]>,
    ages: Ages,
}

impl Default for WindowReader {
    fn default() -> Self {
        Self {
            prev: Cumulative::default(),
            cur: Cumulative::default(),
            delta_hist: Box::new([0; BUCKETS]),
            ages: Ages::default(),
        }
    }
}

impl WindowReader {
    /// A reader of a class none of whose calls started before `stamp` (a stamp of the
    /// shards' timer).
    pub(crate) fn starting(stamp: u64) -> Self {
        let mut r = Self::default();
        r.ages.origin = stamp;
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
    /// Whether the log already said that a call of the class diverted to `cached` was
    /// answered with no copy looked for (shared with the answers' claims).
    pub(crate) unclaimed_logged: std::sync::Arc<std::sync::atomic::AtomicBool>,
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
        cur.overloaded = 0;
        cur.hist.fill(0);
        let mut max_micros = 0u64;
        let mut by_slot = [0u64; SLOTS];
        let mut retired_ends = 0u64;
        for shard in shards {
            let c = &shard.classes[class];
            for (sum, counter) in cur.outcomes.iter_mut().zip(&c.outcomes) {
                *sum = sum.wrapping_add(counter.load(Relaxed));
            }
            for (sum, counter) in by_slot.iter_mut().zip(&c.slots) {
                *sum = sum.wrapping_add(counter.load(Relaxed));
            }
            retired_ends = retired_ends.wrapping_add(c.retired_ends.load(Relaxed));
            cur.queued = cur.queued.wrapping_add(c.queued.load(Relaxed));
            cur.queued_micros = cur
                .queued_micros
                .wrapping_add(c.queued_micros.load(Relaxed));
            cur.overloaded = cur.overloaded.wrapping_add(c.overloaded.load(Relaxed));
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
        cur.inflight = by_slot
            .iter()
            .fold(self.ages.retired, |a, &b| a.wrapping_add(b))
            .wrapping_add(retired_ends);
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
        let overloaded = cur.overloaded.wrapping_sub(self.prev.overloaded);
        let measured_delay = queued_micros.checked_div(queued).unwrap_or(0);
        std::mem::swap(&mut self.prev, &mut self.cur);
        let hist = &*self.delta_hist;
        let slow = if ctx.sla_micros == 0 {
            0
        } else {
            histogram::count_above(hist, ctx.sla_micros)
        };
        let inflight = self.prev.inflight as i64;
        let abandon =
            (ctx.abandon_micros != u64::MAX).then(|| Duration::from_micros(ctx.abandon_micros));
        let overdue = self.ages.step(shards, class, &by_slot, abandon, ctx.period);
        // A bucket's value may lie above the largest call in it (within its 3.125 %): then
        // the exact maximum, so that `p99 <= max` holds as a reader expects. Not further: a
        // call recorded while this was read may be in this tick's histogram and the next
        // tick's maximum.
        let quantile = |q| {
            let v = histogram::quantile(hist, latency_samples, q);
            micros(if v > max_micros && v - max_micros <= v / 32 {
                max_micros
            } else {
                v
            })
        };
        WindowSnapshot {
            tick: ctx.tick,
            overdue,
            // The control loop takes them from the class's gate.
            probe_successes: 0,
            probe_failures: 0,
            probe_permits: 0,
            period: ctx.period,
            successes: counts[Outcome::Success.index()],
            errors: counts[Outcome::Error.index()],
            timeouts: counts[Outcome::Timeout.index()],
            rejected: counts[Outcome::Rejected.index()],
            degraded: counts[Outcome::Degraded.index()],
            cancelled: counts[Outcome::Cancelled.index()],
            overloaded,
            slow,
            p50: quantile(0.50),
            p90: quantile(0.90),
            p99: quantile(0.99),
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
    /// The control-loop tick this window closed at, counted from 0 (so the
    /// [`Status::tick`](crate::degrader::Status::tick) published after it is one more).
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
    /// Of the `rejected` and `degraded` calls, those [admission](crate::admit) turned away
    /// for overload (they waited past their bound, or were pushed out of a full queue),
    /// whatever the breaker's state (a closed class's calls, a recovering one's admitted
    /// share, a half-open one's probes): a class shed for want of capacity, not by its breaker.
    pub overloaded: u64,
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
    /// Calls still in flight that ran past the class's abandon threshold (its SLA by default)
    /// during this window: each counted once, at the first tick at which it has certainly run
    /// that long (calls are counted by the slot of the clock they started in, a slot being
    /// the larger of a fifteenth of the tick and a twenty-ninth of the threshold, rounded up
    /// to a power of two of clock units: at most two slots and a tick late). A backlog the service cannot clear in time is failing its callers before
    /// they give up, so the rates count these calls as failed and slow; a burst of calls that
    /// are younger than the threshold is not, however few calls have completed yet, and a
    /// call that hangs is one failure, not one per window. 0 for a class with
    /// `abandon_timeout(None)`.
    pub overdue: u64,
    /// Half-open probes that finished this window served within the class SLA: calls admitted
    /// as probes only (and a fallback worker's probe replays), so that calls admitted before
    /// the breaker opened and finishing late do not decide whether it recovers.
    pub probe_successes: u64,
    /// Half-open probes that finished this window failed: an error, a timeout, slower than
    /// the class SLA, or abandoned past its abandon threshold.
    pub probe_failures: u64,
    /// Half-open probe permits no call holds at the window's end: all of them
    /// ([`half_open_probes`](crate::breaker::BreakerConfig::half_open_probes)) while no call
    /// has come to take one (a permit comes back when its call is cancelled). Read only while
    /// half-open; 0, as if every permit were taken, where not set.
    pub probe_permits: u64,
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

    /// Requests per second over the window, taken as [`period`](Self::period) long (the
    /// configured tick, also for a tick that ran late or one driven by hand).
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
