//! Lock-free sliding-window metrics: per-class counters and latency histograms.
//!
//! # Recording (the data path)
//!
//! Every request records into the shard of the thread it started on: a few relaxed `fetch_add`s
//! on cache-padded counters and one histogram bucket. Counters are *cumulative*, never reset by
//! the reader, so a record racing with a tick is never lost: it lands in this tick or the next.
//! Shards remove cross-core contention: two threads hammering one class touch different cache
//! lines (see the `contention` benchmark).
//!
//! # Snapshots (the control loop)
//!
//! Once per tick the control loop sums the shards and subtracts the previous sums, which yields
//! the tick's [`WindowSnapshot`]: counts by outcome, p50/p90/p99/max latency (relative error at
//! most 3.125 %), in-flight, queue depth and queueing delay. A [`History`] keeps the last
//! [`HISTORY_LEN`] snapshots per class.

pub(crate) mod histogram;

use std::cell::Cell;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use self::histogram::BUCKETS;

/// Number of ticks of history kept per class.
pub const HISTORY_LEN: usize = 64;

/// How a call that reached the degradation layer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// The inner service answered and the answer was classified as a success.
    Success,
    /// The inner service failed (an error, an HTTP 5xx, a failing gRPC status).
    Error,
    /// The call exceeded its class timeout, or the inner service reported a deadline failure.
    Timeout,
    /// The call was not admitted and was answered with a degraded error or response.
    Rejected,
    /// The call was not admitted and was served by a fallback route.
    Degraded,
    /// The caller dropped the call before it finished.
    Cancelled,
}

impl Outcome {
    pub(crate) const ALL: [Outcome; 6] = [
        Outcome::Success,
        Outcome::Error,
        Outcome::Timeout,
        Outcome::Rejected,
        Outcome::Degraded,
        Outcome::Cancelled,
    ];

    /// The label used for this outcome in metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Error => "error",
            Outcome::Timeout => "timeout",
            Outcome::Rejected => "rejected",
            Outcome::Degraded => "degraded",
            Outcome::Cancelled => "cancelled",
        }
    }

    #[inline]
    const fn index(self) -> usize {
        self as usize
    }

    /// Whether the call reached the inner service and finished (success, error or timeout).
    pub const fn is_completed(self) -> bool {
        matches!(self, Outcome::Success | Outcome::Error | Outcome::Timeout)
    }
}

// ===== recording =====

/// Counters of one class within one shard.
#[repr(align(128))]
pub(crate) struct ClassCounters {
    outcomes: [AtomicU64; 6],
    /// Wrapping: incremented on one shard, possibly decremented on another.
    inflight: AtomicU64,
    max_micros: AtomicU64,
    hist: [AtomicU32; BUCKETS],
}

impl ClassCounters {
    fn new() -> Self {
        Self {
            outcomes: Default::default(),
            inflight: AtomicU64::new(0),
            max_micros: AtomicU64::new(0),
            hist: [const { AtomicU32::new(0) }; BUCKETS],
        }
    }
}

/// One shard: the counters of every class, written mostly by the threads mapped to it.
///
/// Each shard is its own `Arc` allocation, so a request's future holds a clone of its shard
/// only: threads on different shards never touch a shared reference count.
pub(crate) struct Shard {
    classes: Box<[ClassCounters]>,
    names: std::sync::Arc<[std::sync::Arc<str>]>,
    pub(crate) timer: crate::clock::Timer,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("classes", &self.classes.len())
            .finish()
    }
}

impl Shard {
    pub(crate) fn new(
        names: std::sync::Arc<[std::sync::Arc<str>]>,
        timer: crate::clock::Timer,
    ) -> Self {
        Self {
            classes: (0..names.len()).map(|_| ClassCounters::new()).collect(),
            names,
            timer,
        }
    }

    /// The name of `class` (cold paths only: it clones an `Arc`).
    pub(crate) fn name(&self, class: usize) -> std::sync::Arc<str> {
        self.names[class].clone()
    }

    /// A call of `class` started.
    #[inline]
    pub(crate) fn begin(&self, class: usize) {
        self.classes[class].inflight.fetch_add(1, Relaxed);
    }

    /// A call of `class` that was counted by [`Shard::begin`] ended.
    #[inline]
    pub(crate) fn end(&self, class: usize, outcome: Outcome, latency: Duration) {
        let c = &self.classes[class];
        c.inflight.fetch_sub(1, Relaxed);
        self.record(class, outcome, latency);
    }

    /// Count an outcome; completed calls also record their latency.
    #[inline]
    pub(crate) fn record(&self, class: usize, outcome: Outcome, latency: Duration) {
        let c = &self.classes[class];
        c.outcomes[outcome.index()].fetch_add(1, Relaxed);
        if outcome.is_completed() {
            let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
            c.hist[histogram::bucket_of(micros)].fetch_add(1, Relaxed);
            if micros > c.max_micros.load(Relaxed) {
                c.max_micros.fetch_max(micros, Relaxed);
            }
        }
    }
}

/// The shard index of the current thread, assigned round-robin on first use.
#[inline]
pub(crate) fn shard_index(mask: usize) -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    INDEX.with(|i| {
        let mut v = i.get();
        if v == usize::MAX {
            v = NEXT.fetch_add(1, Relaxed);
            i.set(v);
        }
        v & mask
    })
}

/// The number of shards for this machine: twice the parallelism, a power of two, at most 64.
pub(crate) fn shard_count() -> usize {
    let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
    (cores * 2).next_power_of_two().clamp(2, 64)
}

/// Cumulative sums of one class over all shards, as read by the control loop.
#[derive(Clone)]
pub(crate) struct Cumulative {
    outcomes: [u64; 6],
    inflight: u64,
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
            hist: Box::new([0; BUCKETS]),
        }
    }
}

/// What the control loop keeps per class between ticks to turn cumulative sums into deltas.
#[derive(Debug)]
pub(crate) struct WindowReader {
    prev: Cumulative,
    cur: Cumulative,
    delta_hist: Box<[u32; BUCKETS]>,
}

impl Default for WindowReader {
    fn default() -> Self {
        Self {
            prev: Cumulative::default(),
            cur: Cumulative::default(),
            delta_hist: Box::new([0; BUCKETS]),
        }
    }
}

/// Gauges a class reports outside the request path (queue consumers, admission queues).
#[derive(Debug, Default)]
pub(crate) struct Gauges {
    pub(crate) queue_depth: AtomicU64,
    pub(crate) queue_delay_micros: AtomicU64,
}

/// Inputs to one tick's snapshot that are not counters.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TickContext {
    pub(crate) tick: u64,
    pub(crate) period: Duration,
    pub(crate) sla_micros: u64,
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
        cur.hist.fill(0);
        let mut max_micros = 0u64;
        for shard in shards {
            let c = &shard.classes[class];
            for (sum, counter) in cur.outcomes.iter_mut().zip(&c.outcomes) {
                *sum = sum.wrapping_add(counter.load(Relaxed));
            }
            cur.inflight = cur.inflight.wrapping_add(c.inflight.load(Relaxed));
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
        std::mem::swap(&mut self.prev, &mut self.cur);
        let hist = &*self.delta_hist;
        let slow = if ctx.sla_micros == 0 {
            0
        } else {
            histogram::count_above(hist, ctx.sla_micros)
        };
        WindowSnapshot {
            tick: ctx.tick,
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
            inflight: self.prev.inflight as i64,
            queue_depth: gauges.queue_depth.load(Relaxed),
            queue_delay: micros(gauges.queue_delay_micros.load(Relaxed)),
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

// ===== snapshots =====

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
    /// Calls dropped by the caller before they finished.
    pub cancelled: u64,
    /// Completed calls slower than the class SLA.
    pub slow: u64,
    /// Median latency of completed calls.
    pub p50: Duration,
    /// 90th percentile latency of completed calls.
    pub p90: Duration,
    /// 99th percentile latency of completed calls.
    pub p99: Duration,
    /// Largest latency of a completed call (exact).
    pub max: Duration,
    /// Calls in flight at the end of the window.
    pub inflight: i64,
    /// Queue depth last reported for the class.
    pub queue_depth: u64,
    /// Queueing delay last reported for the class.
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

    /// Successes over completed calls; 1.0 when nothing completed.
    pub fn success_rate(&self) -> f64 {
        Self::ratio(self.successes, self.completed(), 1.0)
    }

    /// Errors and timeouts over completed calls; 0.0 when nothing completed.
    pub fn failure_rate(&self) -> f64 {
        Self::ratio(self.errors + self.timeouts, self.completed(), 0.0)
    }

    /// Errors over completed calls.
    pub fn error_rate(&self) -> f64 {
        Self::ratio(self.errors, self.completed(), 0.0)
    }

    /// Timeouts over completed calls.
    pub fn timeout_rate(&self) -> f64 {
        Self::ratio(self.timeouts, self.completed(), 0.0)
    }

    /// Completed calls slower than the class SLA, over completed calls.
    pub fn slow_rate(&self) -> f64 {
        Self::ratio(self.slow, self.completed(), 0.0)
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

/// The last `N` values pushed, newest at `get(0)`: the ring behind [`History`] and the
/// predictor's feature history.
#[derive(Debug, Clone)]
pub(crate) struct Ring<T, const N: usize> {
    slots: Box<[T; N]>,
    len: usize,
    next: usize,
}

impl<T: Copy + Default, const N: usize> Default for Ring<T, N> {
    fn default() -> Self {
        Self {
            slots: Box::new([T::default(); N]),
            len: 0,
            next: 0,
        }
    }
}

impl<T: Copy, const N: usize> Ring<T, N> {
    /// Push a value; returns the oldest one when it falls out.
    pub(crate) fn push(&mut self, value: T) -> Option<T> {
        let evicted = (self.len == N).then(|| self.slots[self.next]);
        self.slots[self.next] = value;
        self.next = (self.next + 1) % N;
        self.len = (self.len + 1).min(N);
        evicted
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The value `ago` pushes back: 0 is the newest.
    pub(crate) fn get(&self, ago: usize) -> Option<&T> {
        (ago < self.len).then(|| &self.slots[(self.next + N - 1 - ago) % N])
    }
}

/// The last [`HISTORY_LEN`] snapshots of one class, newest last.
#[derive(Debug, Clone, Default)]
pub struct History {
    ring: Ring<WindowSnapshot, HISTORY_LEN>,
}

impl History {
    pub(crate) fn push(&mut self, snap: WindowSnapshot) {
        self.ring.push(snap);
    }

    /// Number of snapshots held (at most [`HISTORY_LEN`]).
    pub fn len(&self) -> usize {
        self.ring.len()
    }

    /// Whether no tick has completed yet.
    pub fn is_empty(&self) -> bool {
        self.ring.len() == 0
    }

    /// The snapshot `ago` ticks back: 0 is the newest.
    pub fn get(&self, ago: usize) -> Option<&WindowSnapshot> {
        self.ring.get(ago)
    }

    /// The newest snapshot.
    pub fn latest(&self) -> Option<&WindowSnapshot> {
        self.get(0)
    }

    /// Snapshots newest first.
    pub fn iter(&self) -> impl Iterator<Item = &WindowSnapshot> + '_ {
        (0..self.len()).filter_map(|i| self.get(i))
    }

    /// Whether the newest `n` snapshots exist and all satisfy `pred`.
    pub fn consecutive(&self, n: usize, mut pred: impl FnMut(&WindowSnapshot) -> bool) -> bool {
        n <= self.len() && (0..n).all(|i| self.get(i).is_some_and(&mut pred))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;

    fn shards(n: usize) -> Vec<Arc<Shard>> {
        let names: Arc<[Arc<str>]> = vec![Arc::from("a"), Arc::from("b")].into();
        (0..n)
            .map(|_| {
                Arc::new(Shard::new(
                    names.clone(),
                    crate::clock::Timer::new(crate::clock::LatencyClock::Tokio),
                ))
            })
            .collect()
    }

    fn ctx(tick: u64) -> TickContext {
        TickContext {
            tick,
            period: Duration::from_millis(500),
            sla_micros: 50_000,
        }
    }

    /// Nearest-rank percentile of exact values.
    fn naive_quantile(sorted: &[u64], q: f64) -> u64 {
        let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1]
    }

    fn outcome(i: u8) -> Outcome {
        Outcome::ALL[usize::from(i) % Outcome::ALL.len()]
    }

    proptest! {
        #[test]
        fn snapshot_matches_naive_reference(
            ticks in prop::collection::vec(
                prop::collection::vec((0u8..6, 0u64..5_000_000, 0usize..4, 0usize..2), 0..300),
                1..4,
            )
        ) {
            let shards = shards(4);
            let gauges = Gauges::default();
            let mut reader = WindowReader::default();
            for (t, records) in ticks.iter().enumerate() {
                let mut counts = [0u64; 6];
                let mut lat = Vec::new();
                for &(o, micros, shard, class) in records {
                    let o = outcome(o);
                    shards[shard].record(class, o, Duration::from_micros(micros));
                    if class == 0 {
                        counts[o.index()] += 1;
                        if o.is_completed() {
                            lat.push(micros);
                        }
                    }
                }
                let snap = reader.read(&shards, 0, &gauges, ctx(t as u64));
                prop_assert_eq!(snap.successes, counts[0]);
                prop_assert_eq!(snap.errors, counts[1]);
                prop_assert_eq!(snap.timeouts, counts[2]);
                prop_assert_eq!(snap.rejected, counts[3]);
                prop_assert_eq!(snap.degraded, counts[4]);
                prop_assert_eq!(snap.cancelled, counts[5]);
                lat.sort_unstable();
                let slow = lat.iter().filter(|&&v| v > 50_000).count() as u64;
                // Bucket resolution: a sample in the SLA's bucket may count either way.
                let sla_bucket = lat.iter().filter(|&&v| histogram::bucket_of(v) == histogram::bucket_of(50_000)).count() as u64;
                prop_assert!(snap.slow <= slow && slow <= snap.slow + sla_bucket);
                if lat.is_empty() {
                    prop_assert_eq!(snap.p99, Duration::ZERO);
                    prop_assert_eq!(snap.max, Duration::ZERO);
                } else {
                    prop_assert_eq!(snap.max, Duration::from_micros(*lat.last().unwrap()));
                    for (q, got) in [(0.5, snap.p50), (0.9, snap.p90), (0.99, snap.p99)] {
                        let exact = naive_quantile(&lat, q) as f64;
                        let got = got.as_micros() as f64;
                        let err = if exact == 0.0 { got } else { (got - exact).abs() / exact };
                        prop_assert!(err <= 1.0 / 32.0, "q={} exact={} got={}", q, exact, got);
                    }
                }
            }
        }

        #[test]
        fn inflight_balances_across_shards(starts in 0usize..50, ends in 0usize..50) {
            let shards = shards(2);
            let ends = ends.min(starts);
            for i in 0..starts {
                shards[i % 2].begin(1);
            }
            for i in 0..ends {
                // Ended on another shard than it started on: sums must still balance.
                shards[(i + 1) % 2].end(1, Outcome::Success, Duration::from_millis(1));
            }
            let mut reader = WindowReader::default();
            let snap = reader.read(&shards, 1, &Gauges::default(), ctx(0));
            prop_assert_eq!(snap.inflight, (starts - ends) as i64);
            prop_assert_eq!(snap.successes, ends as u64);
        }
    }

    #[test]
    fn history_keeps_the_last_64_newest_first() {
        let mut h = History::default();
        for tick in 0..100u64 {
            h.push(WindowSnapshot {
                tick,
                ..Default::default()
            });
        }
        assert_eq!(h.len(), HISTORY_LEN);
        assert_eq!(h.latest().unwrap().tick, 99);
        assert_eq!(h.get(63).unwrap().tick, 36);
        assert!(h.get(64).is_none());
        assert!(h.consecutive(3, |w| w.tick >= 97));
        assert!(!h.consecutive(4, |w| w.tick >= 97));
    }

    #[test]
    fn rates_of_an_idle_window_are_healthy() {
        let w = WindowSnapshot::default();
        assert_eq!(w.success_rate(), 1.0);
        assert_eq!(w.failure_rate(), 0.0);
        assert_eq!(w.served_rate(), 1.0);
    }
}
