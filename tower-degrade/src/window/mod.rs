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

mod histogram;
mod history;
mod recording;
mod shard;
mod snapshot;

pub(crate) use self::history::Ring;
pub use self::history::{HISTORY_LEN, History};
pub use self::recording::Recording;
pub(crate) use self::shard::{SLOTS, Shard, Slots, shard_count, shard_index};
pub use self::snapshot::WindowSnapshot;
pub(crate) use self::snapshot::{Gauges, TickContext, WindowReader};

/// How a call that reached the degradation layer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// The inner service answered and the answer was classified as a success.
    Success,
    /// The inner service failed (an error, an HTTP 5xx, a failing gRPC status).
    Error,
    /// The call exceeded its class timeout, the inner service reported a deadline failure, or
    /// the caller gave up on it after the class's abandon threshold (its SLA by default).
    Timeout,
    /// The call was not admitted and was answered with a degraded error or response.
    Rejected,
    /// The call was not admitted and was served by a fallback route.
    Degraded,
    /// The caller dropped the call before it finished, and before the class's abandon threshold
    /// (see [`ClassConfig::abandon_timeout`](crate::ClassConfig::abandon_timeout)); past it,
    /// an abandoned call is a `Timeout`.
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
    pub(crate) const fn index(self) -> usize {
        self as usize
    }

    /// Whether the call reached the inner service and finished (success, error or timeout).
    pub const fn is_completed(self) -> bool {
        matches!(self, Outcome::Success | Outcome::Error | Outcome::Timeout)
    }

    /// Whether the call reached the inner service, so its latency is recorded: completed, or
    /// abandoned by its caller (`cancelled`, at the time it was abandoned).
    pub const fn has_latency(self) -> bool {
        self.is_completed() || matches!(self, Outcome::Cancelled)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;

    use std::time::Duration;

    use super::*;

    fn shards(n: usize) -> Vec<Arc<Shard>> {
        let names: Arc<[Arc<str>]> = vec![Arc::from("a"), Arc::from("b")].into();
        let timer = crate::clock::Timer::new(crate::clock::LatencyClock::Tokio);
        let slots = Slots::new(&timer, Duration::from_millis(500), None);
        (0..n)
            .map(|_| {
                Arc::new(Shard::new(
                    Arc::from("svc"),
                    names.clone(),
                    vec![u64::MAX; names.len()].into(),
                    timer.clone(),
                    vec![slots; names.len()].into(),
                    Arc::new([]),
                    vec![u8::MAX; names.len()].into(),
                    Arc::new([]),
                ))
            })
            .collect()
    }

    fn ctx(tick: u64) -> TickContext {
        TickContext {
            tick,
            period: Duration::from_millis(500),
            sla_micros: 50_000,
            abandon_micros: u64::MAX,
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
                        if o.has_latency() {
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
                        // Never above the largest call (a bucket's value may be).
                        prop_assert!(got <= snap.max, "q={} {:?} > max {:?}", q, got, snap.max);
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
                shards[i % 2].begin(1, 0);
            }
            for i in 0..ends {
                // Ended on another shard than it started on: sums must still balance.
                let ms = Duration::from_millis(1);
                shards[(i + 1) % 2].end(1, 0, ms, Outcome::Success, ms);
            }
            let mut reader = WindowReader::default();
            let snap = reader.read(&shards, 1, &Gauges::default(), ctx(0));
            prop_assert_eq!(snap.inflight, (starts - ends) as i64);
            prop_assert_eq!(snap.successes, ends as u64);
        }
    }

    #[test]
    fn slots_are_a_power_of_two_of_clock_units_no_shorter_than_asked() {
        // The TSC clock is what production uses; the integration tests run on tokio's.
        for clock in [
            crate::clock::LatencyClock::Tsc,
            crate::clock::LatencyClock::Tokio,
        ] {
            let timer = crate::clock::Timer::new(clock);
            let tick = Duration::from_millis(500);
            for abandon in [
                None,
                Some(Duration::from_millis(50)),
                Some(Duration::from_secs(10)),
            ] {
                let s = Slots::new(&timer, tick, abandon);
                let want = (tick / 15).max(abandon.map_or(Duration::ZERO, |a| a / 29));
                // Rounded up to a power of two of clock units: between want and twice it.
                assert!(
                    s.width >= want && s.width <= want * 2 + Duration::from_micros(1),
                    "{clock:?} {abandon:?}: {s:?}"
                );
                assert_eq!(timer.delta(0, 1 << s.shift), s.width);
                // Retired well after the threshold is passed, and while the slots of a
                // tick still have counters of their own.
                let age = Slots::retire_age(s.width, tick);
                let past =
                    abandon.map_or(0, |a| a.as_nanos().div_ceil(s.width.as_nanos()) as u64 + 1);
                assert!(
                    past < age && age < SLOTS as u64,
                    "{clock:?} {abandon:?}: {past} {age}"
                );
                assert_eq!(s.retired_after, s.width * age as u32);
            }
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
