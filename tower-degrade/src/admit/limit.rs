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
//!
//! A dependency that turns slow (a database at four times its latency) raises `rtt` with no
//! queue at all; the gradient would halve the limit tick after tick for latency that does not
//! fall with it. So the first tick that latency rises above the baseline is followed by a probe
//! tick at three quarters of the limit: if latency does not fall with it, the service got
//! slower, its latency now is the baseline and the limit stays. As a backstop, when latency
//! has stayed above the baseline for three ticks while the limit fell to half of what it was
//! when latency rose, and latency fell by less than a fifth, the baseline is measured again and
//! the limit goes back to where it was: latency that does not follow the limit is not queueing.

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
    /// The limit and the latency when latency first rose above the baseline.
    stale_from: Option<(f64, f64)>,
    /// Ticks since the last probe.
    since_probe: usize,
    slow_start: bool,
    /// The baseline is new: it may have been measured with a queue in the service.
    unproven: bool,
    /// During a probe tick: the limit before it.
    probing: Option<f64>,
    /// The probe runs because latency rose above the baseline: it tells a queue from a
    /// service that got slower.
    stale_probe: bool,
    /// This rise above the baseline has had its probe.
    stale_probed: bool,
}

impl Gradient {
    pub(crate) fn new(cfg: LimitConfig) -> Self {
        Self {
            limit: f64::from(cfg.initial.clamp(cfg.min, cfg.max)),
            cfg,
            rtts: VecDeque::new(),
            last_rtt: 0.0,
            stale: 0,
            stale_from: None,
            since_probe: 0,
            slow_start: true,
            unproven: true,
            probing: None,
            stale_probe: false,
            stale_probed: false,
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
            let fell_by = 1.0 - self.limit.round() / before.round();
            let queue = rtt < self.last_rtt * (1.0 - 0.75 * fell_by);
            if std::mem::take(&mut self.stale_probe) && !queue {
                // Latency rose and did not fall nearly as much as the limit: not a queue, the
                // service got slower. Its latency at the lower limit is the baseline; the limit
                // goes back to where it was.
                self.limit = before;
                self.rtts.clear();
                self.rtts.push_back(rtt);
                self.last_rtt = rtt;
                self.stale = 0;
                self.stale_from = None;
                self.stale_probed = false;
                self.since_probe = 0;
                return self.limit();
            }
            // Above the capacity, latency falls in proportion to the limit; below, it holds.
            // Falling nearly as much as the limit did, calls were queueing in the service and
            // the baseline was measured with them: stay here, take this as the baseline, and
            // look again lower.
            if queue {
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
            self.stale_from = None;
            self.stale_probed = false;
        } else {
            self.stale += 1;
            self.stale_from.get_or_insert((self.limit, rtt));
        }
        self.last_rtt = rtt;
        // Latency that did not fall while the limit halved is the service's own, not a queue.
        let unmoved = self.stale_from.filter(|&(limit, was)| {
            self.stale >= 3 && self.limit <= 0.5 * limit && rtt >= 0.8 * was
        });
        if self.stale >= self.cfg.window / 2 || unmoved.is_some() {
            // No tick near the baseline for half a window, or latency that does not follow the
            // limit: the service got slower. Measure the baseline again rather than let the
            // window forget it for an inflated one, and undo what the stale one took away.
            if let Some((limit, _)) = unmoved {
                self.limit = limit;
            }
            self.rtts.clear();
            self.stale = 0;
            self.stale_from = None;
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
        if self.stale > 0 && !self.stale_probed && !self.unproven {
            // Latency rose above the baseline: a queue, or a slower service? One tick at
            // three quarters of the limit tells them apart.
            self.stale_probe = true;
            self.stale_probed = true;
            return self.probe();
        }
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

    /// The database turns four times slower with no queue in the service: the limit must not
    /// sit at its minimum for half a window, starving every class that needs it.
    #[test]
    fn a_dependency_turning_slow_is_not_mistaken_for_a_queue() {
        let mut g = Gradient::new(LimitConfig::default());
        let mut limit = g.limit();
        for _ in 0..40 {
            limit = g.update(saturated(16.0, 10_000.0, limit));
        }
        assert!((16..=20).contains(&limit), "{limit}");
        let mut path = vec![limit];
        for _ in 0..12 {
            limit = g.update(saturated(16.0, 40_000.0, limit));
            path.push(limit);
        }
        let lowest = *path.iter().min().unwrap();
        assert!(lowest >= 12, "fell to {lowest}: {path:?}");
        assert!(
            (16..=20).contains(&limit),
            "back near the capacity: {path:?}"
        );
        assert_eq!(g.baseline(), Some(40_000.0), "{path:?}");
        // And it still follows the capacity down when the slots go.
        for _ in 0..30 {
            limit = g.update(saturated(8.0, 40_000.0, limit));
            path.push(limit);
        }
        assert!((8..=11).contains(&limit), "{path:?}");
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
