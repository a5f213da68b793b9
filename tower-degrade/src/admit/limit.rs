//! The adaptive concurrency limit: finds the capacity from latency (gradient family, as in
//! Netflix's concurrency-limits), updated once per control tick, off the request path.
//!
//! Once per tick it gets the calls that finished (how many, the sum of their latencies in the
//! service, not counting admission waits) and whether calls had to queue. With `rtt` the mean
//! latency of the tick and `rtt0` the latency without queueing (the smallest tick mean of a
//! recent window), Little's law says the service completes `limit / rtt` calls a second, which
//! it could do with `limit * rtt0 / rtt` calls in flight. So
//!
//! ```text
//! new = limit * clamp(rtt0 / rtt, 0.5, 1.0) + headroom      (only while saturated)
//! ```
//!
//! settles at the capacity plus `headroom` (about `sqrt(limit) / 2`, at least 1): enough queue
//! in the service to keep it busy, little enough that latency stays near `rtt0`. Until the first
//! sign of queueing it grows by half per tick (slow start). While calls do not fill the limit,
//! it is left alone (the service is not telling us anything about its capacity).
//!
//! A baseline measured with a queue in the service already (a limit that started above the
//! capacity) would keep the limit there, and one never refreshed would drift. So when slow start
//! ends, when no tick has come within 50 % of `rtt0` for half the window, and every window while
//! saturated, one tick runs at three quarters of the limit to measure it again (as
//! BBR's `PROBE_RTT` does).

use std::collections::VecDeque;

/// Settings of the adaptive limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct LimitConfig {
    pub(crate) initial: u32,
    pub(crate) min: u32,
    pub(crate) max: u32,
    /// Ticks over which the no-queueing latency is the minimum.
    pub(crate) window: usize,
    /// Ticks with fewer finished calls than this leave the limit alone.
    pub(crate) min_samples: u64,
}

impl Default for LimitConfig {
    fn default() -> Self {
        Self {
            initial: 10,
            min: 2,
            max: 1000,
            window: 60,
            min_samples: 5,
        }
    }
}

/// What one tick measured.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Sample {
    /// Calls that finished in the service.
    pub(crate) calls: u64,
    /// Their summed latency in the service, µs.
    pub(crate) micros: u64,
    /// Whether calls had to wait for a permit (or were shed) during the tick.
    pub(crate) saturated: bool,
    /// An outside signal (the system rule) asks for less concurrency.
    pub(crate) pressure: bool,
}

/// The limit's state, owned by the control loop.
#[derive(Debug)]
pub(crate) struct Gradient {
    cfg: LimitConfig,
    /// The limit in force (the probe's during a probe tick).
    limit: f64,
    /// Recent tick means, µs (newest last).
    rtts: VecDeque<f64>,
    /// The mean of the last tick before a probe.
    last_rtt: f64,
    /// Ticks since one came within 50 % of the baseline.
    stale: usize,
    /// Ticks since the last probe.
    since_probe: usize,
    slow_start: bool,
    /// The baseline is new: it may have been measured with a queue in the service.
    unproven: bool,
    /// During a probe tick: the limit before it.
    probing: Option<f64>,
}

impl Gradient {
    pub(crate) fn new(cfg: LimitConfig) -> Self {
        Self {
            limit: f64::from(cfg.initial.clamp(cfg.min, cfg.max)),
            cfg,
            rtts: VecDeque::new(),
            last_rtt: 0.0,
            stale: 0,
            since_probe: 0,
            slow_start: true,
            unproven: true,
            probing: None,
        }
    }

    /// The current limit.
    pub(crate) fn limit(&self) -> u32 {
        self.limit.round() as u32
    }

    /// The latency without queueing, µs, once measured.
    pub(crate) fn baseline(&self) -> Option<f64> {
        self.rtts.iter().copied().reduce(f64::min)
    }

    fn clamp(&self, limit: f64) -> f64 {
        limit.clamp(f64::from(self.cfg.min), f64::from(self.cfg.max))
    }

    /// Run the next tick at three quarters of the limit, to see whether latency falls with it.
    fn probe(&mut self) -> u32 {
        self.since_probe = 0;
        self.unproven = false;
        let lower = self.clamp(self.limit * 0.75);
        if lower.round() < self.limit.round() {
            self.probing = Some(self.limit);
            self.limit = lower;
        }
        self.limit()
    }

    /// Take one tick's sample; returns the limit for the next tick.
    pub(crate) fn update(&mut self, s: Sample) -> u32 {
        if s.pressure {
            self.slow_start = false;
            if let Some(before) = self.probing.take() {
                self.limit = before;
            }
            self.limit = self.clamp(self.limit * 0.9);
            return self.limit();
        }
        if s.calls < self.cfg.min_samples || s.micros == 0 {
            return self.limit();
        }
        let rtt = s.micros as f64 / s.calls as f64;
        if let Some(before) = self.probing.take() {
            // Above the capacity, latency falls in proportion to the limit; below, it holds.
            // Falling nearly as much as the limit did, calls were queueing in the service and
            // the baseline was measured with them: stay here, take this as the baseline, and
            // look again lower.
            let fell_by = 1.0 - self.limit.round() / before.round();
            if rtt < self.last_rtt * (1.0 - 0.75 * fell_by) {
                self.slow_start = false;
                self.rtts.clear();
                self.rtts.push_back(rtt);
                self.last_rtt = rtt;
                self.stale = 0;
                return self.probe();
            }
            self.limit = before;
        }
        self.since_probe += 1;
        self.rtts.push_back(rtt);
        if self.rtts.len() > self.cfg.window {
            self.rtts.pop_front();
        }
        let rtt0 = self.baseline().unwrap_or(rtt);
        // The limit's headroom alone keeps latency up to about a quarter above the baseline.
        if rtt <= rtt0 * 1.5 {
            self.stale = 0;
        } else {
            self.stale += 1;
        }
        self.last_rtt = rtt;
        if self.stale >= self.cfg.window / 2 {
            // No tick near the baseline for half a window: the service got slower. Measure
            // the baseline again rather than let the window forget it for an inflated one.
            self.rtts.clear();
            self.stale = 0;
            self.unproven = true;
        }
        if !s.saturated {
            // The limit was not reached: the tick says nothing about the capacity.
            return self.limit();
        }
        let gradient = (rtt0 / rtt).clamp(0.5, 1.0);
        if self.slow_start && gradient > 0.9 {
            self.limit = self.clamp(self.limit * 1.5);
            return self.limit();
        }
        self.slow_start = false;
        // Probe a baseline that may have been measured with a queue in the service (a new
        // one, once slow start is over), or an old one, from the limit the tick ran with.
        if self.unproven || self.since_probe >= self.cfg.window {
            return self.probe();
        }
        let headroom = (self.limit.sqrt() / 2.0).max(1.0);
        let target = self.limit * gradient + headroom;
        // Half way there each tick: one noisy tick moves it a little.
        self.limit = 0.5 * self.limit + 0.5 * target;
        self.limit = self.clamp(self.limit);
        self.limit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A service with `capacity` slots and `rtt0` µs per call, always given more work than the
    /// limit: the latency of a tick grows with the queue in the service.
    fn saturated(capacity: f64, rtt0: f64, limit: u32) -> Sample {
        let l = f64::from(limit);
        let rtt = rtt0 * (l / capacity).max(1.0);
        let calls = (l.min(capacity) / rtt * 500_000.0) as u64;
        Sample {
            calls,
            micros: (rtt * calls as f64) as u64,
            saturated: true,
            pressure: false,
        }
    }

    #[test]
    fn converges_near_the_capacity_from_below_and_above() {
        for (capacity, initial) in [(16.0, 10), (16.0, 200), (100.0, 10), (4.0, 50)] {
            let mut g = Gradient::new(LimitConfig {
                initial,
                ..LimitConfig::default()
            });
            let mut limit = g.limit();
            let mut path = vec![limit];
            for _ in 0..40 {
                limit = g.update(saturated(capacity, 10_000.0, limit));
                path.push(limit);
            }
            let l = f64::from(limit);
            assert!(
                l >= capacity && l <= capacity * 1.2 + 1.0,
                "capacity {capacity}, from {initial}: limit {limit}: {path:?}"
            );
        }
    }

    #[test]
    fn an_idle_or_app_limited_service_keeps_its_limit() {
        let mut g = Gradient::new(LimitConfig::default());
        let before = g.limit();
        assert_eq!(g.update(Sample::default()), before);
        let light = Sample {
            calls: 100,
            micros: 100 * 10_000,
            saturated: false,
            pressure: false,
        };
        assert_eq!(g.update(light), before);
    }

    #[test]
    fn pressure_lowers_the_limit_down_to_the_minimum() {
        let mut g = Gradient::new(LimitConfig {
            initial: 100,
            min: 8,
            ..LimitConfig::default()
        });
        let pressure = Sample {
            pressure: true,
            ..Sample::default()
        };
        assert_eq!(g.update(pressure), 90);
        for _ in 0..100 {
            g.update(pressure);
        }
        assert_eq!(g.limit(), 8);
    }

    #[test]
    fn a_stale_baseline_is_measured_again() {
        let mut g = Gradient::new(LimitConfig {
            initial: 20,
            window: 10,
            ..LimitConfig::default()
        });
        let fast = Sample {
            calls: 100,
            micros: 100 * 10_000,
            saturated: false,
            pressure: false,
        };
        assert_eq!(g.update(fast), 20, "not saturated: no probe, no change");
        // The service got slower for good: every later tick is twice the old baseline.
        let slow = Sample {
            micros: 100 * 20_000,
            ..fast
        };
        for _ in 0..5 {
            assert_eq!(g.update(slow), 20);
        }
        assert_eq!(g.baseline(), None, "forgotten after half a window");
        g.update(slow);
        assert_eq!(
            g.baseline(),
            Some(20_000.0),
            "the new latency is the baseline"
        );
        let busy = Sample {
            saturated: true,
            ..slow
        };
        // Latency holds: slow start grows the limit; once calls queue, slow start ends and the
        // new baseline is probed at three quarters.
        assert_eq!(g.update(busy), 30);
        let queueing = Sample {
            micros: 100 * 40_000,
            ..busy
        };
        assert_eq!(g.update(queueing), 23);
    }

    #[test]
    fn starting_far_above_the_capacity_probes_down() {
        let mut g = Gradient::new(LimitConfig {
            initial: 200,
            ..LimitConfig::default()
        });
        let mut limit = g.limit();
        let mut path = vec![limit];
        for _ in 0..20 {
            limit = g.update(saturated(16.0, 10_000.0, limit));
            path.push(limit);
        }
        assert!((16..=20).contains(&limit), "{path:?}");
    }
}
