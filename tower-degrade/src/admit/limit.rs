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
//! new = limit * clamp(rtt0 * tolerance / rtt, 0.5, 1.0) + headroom      (only while saturated)
//! ```
//!
//! settles at the capacity plus `headroom` (about `sqrt(limit) / 2`, at least 1): enough queue
//! in the service to keep it busy, little enough that latency stays near `rtt0`. `tolerance`
//! is how far the tick means scatter (1 where they hold still, at most 1.5): the least of a
//! window of scattered means lies under the service's latency, and each tick's own scatter
//! would read as a queue, holding the limit under the capacity (a service of 100 ms calls at
//! 155 a second over real sockets: the limit 10.6 for 16 permits, half the capacity unused;
//! [`Gradient::tolerance`] says how it is read). Until the first
//! sign of queueing it grows by half per tick (slow start). While calls do not fill the limit,
//! it is left alone (the service is not telling us anything about its capacity), unless its
//! callers gave up on more admitted calls than finished in the tick, each after longer in the
//! service than it waited for its permit: those calls queue in the service past their
//! callers' patience, with no latency sample, and the limit loses a fifth.
//!
//! A baseline measured with a queue in the service already (a limit that started above the
//! capacity) would keep the limit there, and one never refreshed would drift. So when slow start
//! ends, when no tick has come within 50 % of `rtt0` (times the tolerance) for half the
//! window, after a tick faster
//! by a third than the whole window, once it holds 16 ticks (a dependency fast again after a
//! slow spell, the limit raised for it), and every window while saturated, one tick runs at
//! three quarters of the limit to measure it again (as BBR's `PROBE_RTT` does).
//!
//! A probe is judged by what the service did with fewer permits. Above its capacity it
//! completes as many calls with fewer in flight (those taken away were queueing in it); below,
//! fewer in proportion. Latency falls with the queue too, but late: the calls that finish in
//! the probe tick were admitted under the limit before it, and when the queue's wait is a
//! sizeable share of the tick their mean barely moves (judged by latency alone, a limit started
//! at 12 times the capacity stayed at 14 times it over real sockets). So calls shorter than
//! half a tick are judged by how many finished, provided the probe's permits were all in use
//! (bursts that reach a mostly idle limit complete as many calls whatever it is); longer calls
//! by their latency, once those that finish were admitted under the probe (a tick later per
//! tick of latency, at most 4). Each probe takes a quarter off, so the limit never goes below
//! three quarters of a limit that was all queue: a deeper step was tried, and starved gold
//! for a tick when a storm's database turned slow.
//!
//! A dependency that turns slow (a database at four times its latency) raises `rtt` with no
//! queue at all; the gradient would halve the limit tick after tick for latency that does not
//! fall with it. So the first tick that latency rises half again above the baseline (times the
//! tolerance) is followed by a probe
//! tick at three quarters of the limit: if it is no queue, the service got slower, its latency
//! now is the baseline and the limit stays. As a backstop, when latency
//! has stayed above the baseline for three ticks while the limit fell to half of what it was
//! when latency rose, and latency fell by less than a fifth, the baseline is measured again and
//! the limit goes back to where it was: latency that does not follow the limit is not queueing.

use std::collections::VecDeque;

/// Abandoned calls per finished call over which a tick takes the limit down: more than half
/// of the admitted calls that ended, more than hedged requests give (a caller that sends a
/// call twice and drops the slower abandons at most one per call finished).
const ABANDONED_PER_CALL: u64 = 1;

/// A tick whose mean latency is under this share of the baseline shows a service that got
/// faster: the baseline is probed again.
const FASTER: f64 = 2.0 / 3.0;
/// Ticks the window must hold for [`FASTER`] to read: right after a probe it holds one.
const FASTER_SAMPLES: usize = 16;

/// How many deviations of the tick means' scatter above the baseline a tick's mean may be
/// before the gradient reads a queue (see [`Gradient::tolerance`]).
const NOISE_K: f64 = 1.5;
/// The most the scatter of the tick means lets latency stand above the baseline unread: half
/// again, as Netflix's Gradient2 tolerates over its long-term average by default (a quarter
/// was tried, with the scatter read from the successive changes alone: over real sockets,
/// 100 ms calls of exponential length kept 88-90 % of the capacity in use, against 92-95 %).
const MAX_TOLERANCE: f64 = 1.5;
/// Moves of the tick means (ticks after the first of a window) read before their scatter is.
const NOISE_SAMPLES: usize = 8;

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
    /// Calls given a permit that their callers gave up on before they finished (no latency
    /// of theirs is in `micros`).
    pub(crate) abandoned: u64,
    /// An outside signal (the system rule) asks for less concurrency.
    pub(crate) pressure: bool,
    /// The tick's length, µs (0: unknown, and a probe is judged by latency alone).
    pub(crate) period_micros: u64,
}

impl Sample {
    /// Whether the calls kept about `limit` permits in use through the tick (Little's law:
    /// their summed latency over the tick's length is the mean number in flight).
    fn busy(&self, limit: f64) -> bool {
        self.micros as f64 >= 0.8 * limit * self.period_micros as f64
    }
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
    /// The calls the service completed in that tick.
    last_calls: u64,
    /// Ticks since one came within 50 % of the baseline (times the tolerance).
    stale: usize,
    /// The limit and the latency when latency first rose past that.
    stale_from: Option<(f64, f64)>,
    /// Ticks since the last probe.
    since_probe: usize,
    slow_start: bool,
    /// The baseline is new: it may have been measured with a queue in the service.
    unproven: bool,
    /// During a probe tick: the limit before it.
    probing: Option<f64>,
    /// Ticks of the probe left before it is judged: calls longer than half a tick that finish
    /// in its first ticks were admitted under the limit before it.
    probe_wait: u32,
    /// The last tick's length, µs.
    period_micros: u64,
    /// For the last `window` ticks that followed one in the window, how far the tick's mean
    /// moved from the one before it (`|ln(rtt[i] / rtt[i - 1])|`,
    /// [`tolerance`](Self::tolerance)); kept when the window starts again.
    moves: VecDeque<f64>,
    /// Scratch for the median of `moves`, kept so that a tick does not allocate.
    steps: Vec<f64>,
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
            last_calls: 0,
            stale: 0,
            stale_from: None,
            since_probe: 0,
            slow_start: true,
            unproven: true,
            probing: None,
            probe_wait: 0,
            period_micros: 0,
            moves: VecDeque::with_capacity(cfg.window + 1),
            steps: Vec::with_capacity(cfg.window),
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

    /// How far above the baseline a tick's mean may be from noise alone: the lesser of
    /// `exp(NOISE_K * noise)` and how far the window's least mean lies under its lower
    /// quartile, at most [`MAX_TOLERANCE`]. `noise` is the scatter of the tick means, read
    /// from their successive changes (the upper median of `moves`, scaled to a standard
    /// deviation: a level that moves, a queue building or a dependency turning slow, changes
    /// few successive pairs). Each alone is fooled: the scatter by a pattern the means
    /// repeat tick after tick (lockstep calls, ticks in turn saturated and not), whose least
    /// is its low phase and no outlier; the quartile by the limit's own queue (the window's
    /// least a probe's tick, the rest at the queue the limit keeps, which a tolerance would
    /// lengthen, tick after tick, to the maximum). Means that scatter show both: the least of
    /// 60 lies about two deviations under the service's latency, 1.6 under the quartile.
    /// Both are fooled at once by a pattern with a probe's tick in the window (a slow tick
    /// every second to fourth one): the tolerance then lets the limit's own queue stand, up
    /// to [`MAX_TOLERANCE`] (about 1.5 times the capacity plus the headroom), until the
    /// window's probe finds the queue. 1 until [`NOISE_SAMPLES`] ticks have given their
    /// moves, and while the window holds fewer than 4 ticks.
    fn tolerance(&mut self) -> f64 {
        let Some(least) = self.baseline() else {
            return 1.0;
        };
        if self.moves.len() < NOISE_SAMPLES {
            return 1.0;
        }
        self.steps.clear();
        self.steps.extend(self.moves.iter().copied());
        let mid = self.steps.len() / 2;
        let (_, median, _) = self.steps.select_nth_unstable_by(mid, f64::total_cmp);
        // The median of |x - y| for two normal draws of deviation s is 0.6745 * sqrt(2) * s.
        let noise = *median / (0.6745 * std::f64::consts::SQRT_2);
        self.steps.clear();
        self.steps.extend(self.rtts.iter().copied());
        let quarter = self.steps.len() / 4;
        let (_, quartile, _) = self.steps.select_nth_unstable_by(quarter, f64::total_cmp);
        (NOISE_K * noise)
            .exp()
            .min(*quartile / least)
            .min(MAX_TOLERANCE)
    }

    /// Start the window again from one tick's mean, `rtt`. The moves are kept: the scatter
    /// is the service's, not the baseline's (cleared, the tolerance was 1 for the next ticks
    /// after each probe, and the bias it corrects back).
    fn restart_window(&mut self, rtt: f64) {
        self.rtts.clear();
        self.rtts.push_back(rtt);
    }

    /// Add a tick's mean, `rtt`, to the window, and how far it moved from the last one.
    fn push_window(&mut self, rtt: f64) {
        if let Some(&last) = self.rtts.back() {
            self.moves.push_back((rtt / last).ln().abs());
            if self.moves.len() > self.cfg.window {
                self.moves.pop_front();
            }
        }
        self.rtts.push_back(rtt);
        if self.rtts.len() > self.cfg.window {
            self.rtts.pop_front();
        }
    }

    fn clamp(&self, limit: f64) -> f64 {
        limit.clamp(f64::from(self.cfg.min), f64::from(self.cfg.max))
    }

    /// Run the next tick at three quarters of the limit, to see whether the service completes
    /// as many calls and whether latency falls with it.
    fn probe(&mut self) -> u32 {
        self.since_probe = 0;
        self.unproven = false;
        let lower = self.clamp(self.limit * 0.75);
        if lower.round() < self.limit.round() {
            self.probing = Some(self.limit);
            self.limit = lower;
            // Calls longer than half a tick: judged once those that finish were admitted
            // under it (about a latency later), at most 4 ticks on.
            let period = self.period_micros as f64;
            self.probe_wait = if period > 0.0 && 2.0 * self.last_rtt >= period {
                (self.last_rtt / period).ceil().min(4.0) as u32
            } else {
                0
            };
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
        if s.abandoned >= self.cfg.min_samples && s.abandoned > ABANDONED_PER_CALL * s.calls {
            // Callers gave up on most of the calls the service was given: they queue in the
            // service (a connection pool) past what their callers wait, finish too late to be
            // samples, and need not fill the limit to do so. The limit is above what the
            // service can do within its callers' patience: take a fifth off per tick until
            // enough calls finish in time to be measured.
            self.slow_start = false;
            if let Some(before) = self.probing.take() {
                self.limit = before;
            }
            self.limit = self.clamp(self.limit * 0.8);
            return self.limit();
        }
        if s.calls < self.cfg.min_samples || s.micros == 0 {
            return self.limit();
        }
        let rtt = s.micros as f64 / s.calls as f64;
        self.period_micros = s.period_micros;
        if self.probing.is_some() && self.probe_wait > 0 {
            self.probe_wait -= 1;
            return self.limit();
        }
        if let Some(before) = self.probing.take() {
            let fell_by = 1.0 - self.limit.round() / before.round();
            // With every permit of the probe in use, the service completes as many calls with
            // fewer in flight above its capacity (those taken away were queueing in it), and
            // fewer, in proportion, below it. Latency falls with the queue too, but not within
            // the probe tick: the calls that finish in it were admitted under the limit before
            // it. So calls shorter than half a tick (most of those that finish in it started
            // under the probe) are judged by how many finished; permits that were not all in
            // use say nothing of a queue (the calls are as many whatever the limit). Longer
            // calls, or a tick of unknown length, by their latency once those that finish
            // were admitted under the probe (`probe_wait`).
            let short = s.period_micros > 0 && rtt * 2.0 < s.period_micros as f64;
            let queue = if short {
                s.busy(self.limit)
                    && s.saturated
                    && s.calls as f64 >= self.last_calls as f64 * (1.0 - 0.5 * fell_by)
            } else {
                rtt < self.last_rtt * (1.0 - 0.75 * fell_by)
            };
            if std::mem::take(&mut self.stale_probe) && !queue {
                // Latency rose and the probe found no queue: the service got slower. Its
                // latency at the lower limit is the baseline; the limit goes back to where it
                // was.
                self.limit = before;
                self.restart_window(rtt);
                self.last_rtt = rtt;
                self.last_calls = s.calls;
                self.stale = 0;
                self.stale_from = None;
                self.stale_probed = false;
                self.since_probe = 0;
                return self.limit();
            }
            // A queue: calls were queueing in the service and the baseline was measured with
            // them. Stay here, take this as the baseline, and look again lower.
            if queue {
                self.slow_start = false;
                self.restart_window(rtt);
                self.last_rtt = rtt;
                self.last_calls = s.calls;
                self.stale = 0;
                return self.probe();
            }
            self.limit = before;
        }
        self.since_probe += 1;
        if self.rtts.len() >= FASTER_SAMPLES
            && self.baseline().is_some_and(|rtt0| rtt < rtt0 * FASTER)
        {
            // Faster by a third than every tick of a window of 16 at least: the service got
            // faster (a dependency recovered from a slow spell). A limit raised to carry the
            // slower calls now makes a queue in it, whose latency would pass for the baseline
            // until the window's probe: probe it at the next saturated tick.
            self.unproven = true;
        }
        self.push_window(rtt);
        let rtt0 = self.baseline().unwrap_or(rtt);
        // The limit's headroom alone keeps latency up to about a quarter above the baseline.
        let tolerance = self.tolerance();
        if rtt <= rtt0 * 1.5 * tolerance {
            self.stale = 0;
            self.stale_from = None;
            self.stale_probed = false;
        } else {
            self.stale += 1;
            self.stale_from.get_or_insert((self.limit, rtt));
        }
        self.last_rtt = rtt;
        self.last_calls = s.calls;
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
        let gradient = (rtt0 * tolerance / rtt).clamp(0.5, 1.0);
        // Slow start ends at the first sign of queueing, or at the maximum (a limit started
        // there would otherwise never be probed). Calls that hold permits without finishing
        // (a hung dependency) make it grow too: the permits they hold are not the service's
        // capacity in use, and the calls that do finish need the others.
        if self.slow_start && gradient > 0.9 && self.limit < f64::from(self.cfg.max) {
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

    const TICK_MICROS: u64 = 500_000;

    /// A service with `capacity` slots and `rtt0` µs per call, always given more work than the
    /// limit: the latency of a tick grows with the queue in the service.
    fn saturated(capacity: f64, rtt0: f64, limit: u32) -> Sample {
        let l = f64::from(limit);
        served(capacity, rtt0, l, l)
    }

    /// A tick of a service with `capacity` slots and `rtt0` µs per call under `limit`, whose
    /// finishing calls queued behind `queued_under` calls in flight: it completes
    /// `min(limit, capacity) / rtt0` calls a second however long the queue (Little's law).
    fn served(capacity: f64, rtt0: f64, queued_under: f64, limit: f64) -> Sample {
        let rtt = rtt0 * (queued_under / capacity).max(1.0);
        let calls = (limit.min(capacity) / rtt0 * 500_000.0) as u64;
        Sample {
            calls,
            micros: (rtt * calls as f64) as u64,
            saturated: true,
            abandoned: 0,
            pressure: false,
            period_micros: TICK_MICROS,
        }
    }

    /// The limits `g` sets over `ticks` ticks of `serve` (given the limit in force), after
    /// the one it starts with.
    fn run(g: &mut Gradient, ticks: usize, mut serve: impl FnMut(u32) -> Sample) -> Vec<u32> {
        let mut path = vec![g.limit()];
        for _ in 0..ticks {
            let limit = g.update(serve(path[path.len() - 1]));
            path.push(limit);
        }
        path
    }

    #[test]
    fn converges_near_the_capacity_from_below_and_above() {
        for (capacity, initial) in [(16.0, 10), (16.0, 200), (100.0, 10), (4.0, 50)] {
            let mut g = Gradient::new(LimitConfig {
                initial,
                ..LimitConfig::default()
            });
            let path = run(&mut g, 40, |limit| saturated(capacity, 10_000.0, limit));
            let limit = path[path.len() - 1];
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
            abandoned: 0,
            pressure: false,
            period_micros: TICK_MICROS,
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
    fn callers_giving_up_on_most_admitted_calls_take_the_limit_down() {
        // Calls queueing in the service (a pool of 4) past their callers' deadline: few
        // finish, so few samples, and the limit is not filled; it stayed at 15 while 13 of
        // 13,487 queries finished (found by a trial over gRPC).
        let mut g = Gradient::new(LimitConfig {
            initial: 15,
            ..LimitConfig::default()
        });
        let abandoning = Sample {
            calls: 1,
            micros: 20_000,
            saturated: false,
            abandoned: 60,
            pressure: false,
            period_micros: TICK_MICROS,
        };
        let path: Vec<u32> = (0..10).map(|_| g.update(abandoning)).collect();
        assert!(path.windows(2).all(|w| w[1] <= w[0]), "{path:?}");
        assert_eq!(path[0], 12, "a fifth off");
        assert_eq!(path[9], 2, "down to the minimum while it lasts: {path:?}");
        // A handful, or as many as finished (every call hedged, the slower copy dropped once
        // the other answered): not a sign.
        let mut g = Gradient::new(LimitConfig::default());
        for abandoned in [4, 50] {
            let some = Sample {
                calls: 50,
                micros: 50 * 10_000,
                abandoned,
                ..abandoning
            };
            assert_eq!(g.update(some), 10, "{abandoned} abandoned");
        }
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
            abandoned: 0,
            pressure: false,
            period_micros: TICK_MICROS,
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
        let before = run(&mut g, 40, |limit| saturated(16.0, 10_000.0, limit));
        assert!((16..=20).contains(&before[40]), "{before:?}");
        let path = run(&mut g, 12, |limit| saturated(16.0, 40_000.0, limit));
        let lowest = *path.iter().min().unwrap();
        assert!(lowest >= 12, "fell to {lowest}: {path:?}");
        assert!(
            (16..=20).contains(&path[12]),
            "back near the capacity: {path:?}"
        );
        assert_eq!(g.baseline(), Some(40_000.0), "{path:?}");
        // And it still follows the capacity down when the slots go.
        let path = run(&mut g, 30, |limit| saturated(8.0, 40_000.0, limit));
        assert!((8..=11).contains(&path[30]), "{path:?}");
    }

    /// What a real service reports: the calls that finish in a tick were admitted under the
    /// limit of the tick before, so their latency is the queue that limit made (it lags the
    /// limit by a tick), while the service completes `min(limit, capacity) / rtt0` calls a
    /// second under the limit in force (it drains the queue within the tick).
    struct Lagged {
        capacity: f64,
        rtt0: f64,
        before: f64,
    }

    impl Lagged {
        /// The service, its last tick run under `g`'s limit.
        fn under(g: &Gradient, capacity: f64, rtt0: f64) -> Self {
            Self {
                capacity,
                rtt0,
                before: f64::from(g.limit()),
            }
        }

        fn tick(&mut self, limit: u32) -> Sample {
            let l = f64::from(limit);
            let before = std::mem::replace(&mut self.before, l);
            served(self.capacity, self.rtt0, before, l)
        }
    }

    #[test]
    fn starting_far_above_the_capacity_probes_down_when_latency_lags_the_limit() {
        // A probe tick's latency is still the queue of the limit before it: the calls the
        // service completes tell the queue apart (as many with fewer in flight).
        for (capacity, initial) in [(16.0, 200), (8.0, 50), (8.0, 100), (100.0, 1000)] {
            let mut g = Gradient::new(LimitConfig {
                initial,
                ..LimitConfig::default()
            });
            let mut s = Lagged::under(&g, capacity, 10_000.0);
            let path = run(&mut g, 25, |limit| s.tick(limit));
            let l = f64::from(path[25]);
            assert!(
                l >= capacity * 0.8 && l <= capacity * 1.25 + 1.0,
                "capacity {capacity}, from {initial}: {path:?}"
            );
        }
    }

    #[test]
    fn bursts_that_reach_the_limit_with_permits_mostly_idle_do_not_lower_it() {
        // Calls arrive in bursts that find the limit reached, but on average 2 of its 20
        // permits are in use: as many calls finish with fewer permits, which is no queue.
        let mut g = Gradient::new(LimitConfig {
            initial: 20,
            ..LimitConfig::default()
        });
        let bursty = Sample {
            calls: 100,
            micros: 100 * 10_000,
            saturated: true,
            abandoned: 0,
            pressure: false,
            period_micros: TICK_MICROS,
        };
        let path: Vec<u32> = (0..40).map(|_| g.update(bursty)).collect();
        assert!(path.iter().rev().take(10).all(|&l| l >= 20), "{path:?}");
    }

    #[test]
    fn a_limit_raised_by_hung_calls_comes_down_at_the_next_peak() {
        // Hung calls hold permits: the limit is reached while the few calls that finish are
        // fast, so slow start raises it far above the capacity.
        let mut g = Gradient::new(LimitConfig::default());
        let hung = Sample {
            calls: 10,
            micros: 10 * 20_000,
            saturated: true,
            abandoned: 0,
            pressure: false,
            period_micros: TICK_MICROS,
        };
        let path = run(&mut g, 8, |_| hung);
        assert!(path[8] > 40, "{path:?}");
        // Light traffic: the limit is left alone.
        let light = Sample {
            calls: 50,
            micros: 50 * 20_000,
            saturated: false,
            abandoned: 0,
            ..hung
        };
        run(&mut g, 10, |_| light);
        // A peak on a service of 8 slots at 20 ms.
        let mut s = Lagged::under(&g, 8.0, 20_000.0);
        let path = run(&mut g, 16, |limit| s.tick(limit));
        assert!((7..=11).contains(&path[16]), "{path:?}");
    }

    /// A dependency slow for a while (its latency the baseline, the limit raised to carry the
    /// same traffic) and then fast again under a peak: the queue the raised limit makes in the
    /// service is not taken for the fast service's latency (found by a trial over gRPC: the
    /// limit stayed at twice the capacity for 20 s, until the window's probe).
    #[test]
    fn a_dependency_fast_again_after_a_slow_spell_is_probed_at_the_next_peak() {
        let mut g = Gradient::new(LimitConfig::default());
        let mut fast = Lagged::under(&g, 10.0, 50_000.0);
        let path = run(&mut g, 40, |limit| fast.tick(limit));
        assert!((10..=13).contains(&path[40]), "{path:?}");
        // 450 ms a call with no queue (a delay outside the pool), 150 calls a second wanted:
        // more than the limit in flight, so every tick is saturated.
        let slow = |limit: u32| {
            let calls = (f64::from(limit) / 0.45 * 0.5) as u64;
            Sample {
                calls,
                micros: calls * 450_000,
                saturated: true,
                period_micros: TICK_MICROS,
                ..Sample::default()
            }
        };
        let path = run(&mut g, 20, slow);
        assert!(path[20] >= 18, "raised to carry the slow calls: {path:?}");
        assert_eq!(g.baseline(), Some(450_000.0), "{path:?}");
        // Fast again, under a peak.
        fast.before = f64::from(g.limit());
        let path = run(&mut g, 10, |limit| fast.tick(limit));
        assert!((9..=13).contains(&path[10]), "{path:?}");
    }

    /// `Lagged` under a limit for `ticks` ticks, each tick's mean latency times a log-normal
    /// factor of deviation `spread` (the scatter of a mean of few calls; a fixed sequence,
    /// Box-Muller over an LCG): the mean limit and the mean share of the capacity in use,
    /// after the first 100 ticks.
    fn scattered(spread: f64, capacity: f64, rtt0: f64, ticks: usize) -> (f64, f64) {
        let mut g = Gradient::new(LimitConfig::default());
        let mut s = Lagged::under(&g, capacity, rtt0);
        let mut seed: u64 = 7;
        let mut uniform = || {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((seed >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        let mut limit = g.limit();
        let (mut sum, mut used) = (0.0, 0.0);
        for t in 0..ticks {
            let mut tick = s.tick(limit);
            let z = (-2.0 * uniform().ln()).sqrt() * (2.0 * std::f64::consts::PI * uniform()).cos();
            tick.micros = (tick.micros as f64 * (spread * z).exp()) as u64;
            limit = g.update(tick);
            if t >= 100 {
                sum += f64::from(limit);
                used += f64::from(limit).min(capacity) / capacity;
            }
        }
        let n = (ticks - 100) as f64;
        (sum / n, used / n)
    }

    /// Tick means that scatter (few calls a tick) must not set the faster-than-the-window
    /// probe off: right after a probe the window holds one tick, which the next noisy one
    /// undercuts by a third often enough to chain probes under the capacity (mean limit 11.1
    /// and 4.6 for 16 permits at the two spreads below, against 15.3 and 15.2 without it).
    #[test]
    fn scattered_tick_means_do_not_chain_probes_under_the_capacity() {
        for spread in [0.3, 0.5] {
            let (mean, _) = scattered(spread, 16.0, 10_000.0, 2000);
            assert!(mean >= 14.4, "spread {spread}: mean limit {mean:.2}");
        }
    }

    /// The baseline is the least tick mean of the window: with scattered tick means it lies
    /// under the service's latency by about two deviations, and each tick's own scatter
    /// reads as a queue, so the gradient held the limit under the capacity (at a spread of
    /// 0.1, 10.5 for 16 permits on average, 66 % of them in use; 81 % at 0.15). The gradient
    /// now tolerates latency over the baseline by as much as the tick means scatter.
    #[test]
    fn scattered_tick_means_do_not_hold_the_limit_under_the_capacity() {
        for (capacity, rtt0) in [(16.0, 10_000.0), (10.0, 50_000.0), (10.0, 200_000.0)] {
            for spread in [0.0, 0.05, 0.1, 0.15] {
                let (mean, used) = scattered(spread, capacity, rtt0, 4000);
                assert!(
                    used >= 0.95 && mean <= capacity * 1.25,
                    "capacity {capacity}, {rtt0} µs, spread {spread}: mean limit {mean:.2}, \
                     {:.1} % in use",
                    used * 100.0
                );
            }
        }
    }

    /// Tick means in a pattern that repeats (here every other tick 30 % slower, at any
    /// limit) are no scatter the baseline is biased by: its least is their low phase. Taken
    /// for scatter (the successive changes alone), the pattern let a queue stand, the limit at
    /// 22-23 for 16 permits (what the first assertion catches), and from there a dependency
    /// turning 1.6 times slower took it to 11. The baseline then follows the slower
    /// dependency.
    #[test]
    fn a_pattern_in_the_tick_means_does_not_hide_a_dependency_turning_slow() {
        let mut g = Gradient::new(LimitConfig::default());
        let mut t = 0u32;
        let mut pattern = |rtt0: f64, limit: u32| {
            t += 1;
            let mut tick = saturated(16.0, rtt0, limit);
            if t.is_multiple_of(2) {
                tick.micros = (tick.micros as f64 * 1.3) as u64;
            }
            tick
        };
        let before = run(&mut g, 60, |limit| pattern(10_000.0, limit));
        assert!((14..=21).contains(&before[60]), "{before:?}");
        let path = run(&mut g, 40, |limit| pattern(16_000.0, limit));
        let lowest = *path.iter().min().unwrap();
        assert!(lowest >= 12, "fell to {lowest}: {path:?}");
        assert_eq!(g.baseline(), Some(16_000.0), "{path:?}");
        assert!((14..=21).contains(&path[40]), "{path:?}");
    }

    #[test]
    fn starting_far_above_the_capacity_probes_down() {
        let mut g = Gradient::new(LimitConfig {
            initial: 200,
            ..LimitConfig::default()
        });
        let path = run(&mut g, 20, |limit| saturated(16.0, 10_000.0, limit));
        assert!((16..=20).contains(&path[20]), "{path:?}");
    }
}
