//! The prediction threshold a class calibrates from its own history.
//!
//! A fixed probability (the seed's 0.87) means something different for every service: a model
//! that scores a healthy service at 0.3 and another at 0.9 trips the second all day. So by
//! default each class learns where its own healthy scores lie and keeps its threshold at a
//! false-trip budget (about one a day), with SPOT (Siffer et al., "Anomaly detection in streams
//! with extreme value theory", KDD 2017): the tail of the healthy scores above a high quantile
//! follows a generalized Pareto distribution, whose fit gives the score exceeded with the
//! budget's probability, even beyond the highest score seen so far.
//!
//! The budget is in false *trips*, and a model's scores are not independent from one tick to
//! the next: a healthy class whose score drifts up stays up for a few ticks, one trip for
//! several ticks over the threshold. So the per-tick risk is the budget over the ticks in a
//! day divided by the extremal index θ (Leadbetter's; estimated by runs: the runs of healthy
//! ticks over the tail's start per tick over it, at least 1/32). A class whose scores are
//! tick-to-tick noise keeps θ near 1 and its threshold where it was; one whose excesses come
//! in runs of 8 gets a threshold its ticks cross 8 times as often, and trips as often.
//!
//! A healthy tick's score is learnt once [`FALSE_ALARM_TICKS`](super::FALSE_ALARM_TICKS)
//! more healthy ticks have passed with no breach, and no warning waits for its
//! [`VERDICT`](super::VERDICT) (the breaker holds it until then): the ticks before a breach are
//! its precursors, and a score that climbs towards a breach, learnt tick by tick, lifts the
//! threshold ahead of itself.
//!
//! Until it has learnt `warm_up_ticks` healthy scores the class only reports its predictions
//! (`ClassStatus`: calibrating, no threshold; no early degradation). The fit works on the logit
//! of the probability, whose tail is not cut at 1.0.

use std::collections::VecDeque;
use std::time::Duration;

/// How the breaker turns a failure probability into a predicting tick.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum PredictThreshold {
    /// A probability fixed by hand (the seed's 0.87), the same for every class.
    Fixed(f64),
    /// A threshold each class keeps from its own healthy ticks (the default).
    Calibrated(Calibration),
}

impl Default for PredictThreshold {
    fn default() -> Self {
        Self::Calibrated(Calibration::default())
    }
}

/// The settings of [`PredictThreshold::Calibrated`].
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
#[must_use = "a setting or builder does nothing until it is passed on or built"]
pub struct Calibration {
    /// False trips per day the threshold is kept at (1.0): the chance that a healthy tick
    /// scores above it is this many over the ticks in a day, times how many ticks a run of
    /// healthy ticks over the tail's start lasts on average (divided by the extremal index,
    /// module docs).
    pub false_trips_per_day: f64,
    /// Healthy scores learnt before the predictor may degrade a class (3,600: 30 minutes at
    /// the default 500 ms tick, and a score is learnt 40 healthy ticks after its own; at least
    /// 2,500, so the first fit has 50 excesses). Until then it only reports.
    pub warm_up_ticks: u32,
}

impl Default for Calibration {
    fn default() -> Self {
        Self {
            false_trips_per_day: 1.0,
            warm_up_ticks: 3_600,
        }
    }
}

impl Calibration {
    /// Keep the threshold at this many false trips per day. The threshold never goes below
    /// the tail's start (the 98th percentile of the healthy scores, lower where they repeat):
    /// a budget past a few thousand a day at the 500 ms tick sets it there.
    pub fn false_trips_per_day(mut self, value: f64) -> Self {
        self.false_trips_per_day = value;
        self
    }

    /// Healthy scores to learn before the predictor may degrade a class (at least 2,500 are,
    /// so that the first fit has 50 excesses: a smaller value from 1 is raised to it, and 0 is
    /// refused; at most
    /// 1,000,000, each kept until the warm-up ends, 8 bytes a score).
    pub fn warm_up_ticks(mut self, value: u32) -> Self {
        self.warm_up_ticks = value;
        self
    }
}

/// The quantile of the warm-up scores above which the tail is fitted (SPOT's initial
/// threshold).
const TAIL_QUANTILE: f64 = 0.98;
/// The lowest quantile the tail may start at when scores repeat (`MIN_PEAKS`).
const LOWEST_START: f64 = 0.8;
/// The excesses kept for the fit (a sliding window: the newest).
const MAX_PEAKS: usize = 2_048;
/// The most healthy ticks a saved calibration may say it has seen ([`Learnt::check`]): far
/// under `u64::MAX`, so that the ticks counted after a restore never reach a count refused
/// when saved again (2^52 ticks is 70 million years at 500 ms).
const MAX_SEEN: u64 = 1 << 52;
/// The fewest excesses a first fit takes, whatever the warm-up: fewer give a tail that trips
/// far over its budget (on the harness's simulated traces, 20 gave 40 false trips a day, 50
/// gave 6). So the warm-up learns at least 50 / 2 % = 2,500 healthy scores, and where scores
/// repeat the tail starts below the 98th percentile, at the highest score with 50 above it
/// (down to the 80th).
const MIN_PEAKS: usize = 50;
/// Probabilities are clamped this far from 0 and 1 before their logit is taken.
const EPS: f64 = 1e-6;
/// The highest probability a prediction is compared at: a threshold above it is never met.
const HIGHEST: f64 = 1.0 - EPS;
/// How far above a false alarm's highest score (in logit) the threshold is put.
const FALSE_ALARM_MARGIN: f64 = 0.25;
/// The least extremal index the risk is divided by: excesses in runs longer than this many
/// ticks on average still count one trip per 32 of them. (At the tail's start the runs are
/// longer than at the threshold far above it, so an unbounded estimate would overspend.)
const MIN_THETA: f64 = 1.0 / 32.0;
/// How long a false alarm's floor holds, in healthy ticks' time (7,200 ticks at the 500 ms
/// tick): a change the model reads as trouble for longer trips the class again, once an hour
/// at most, whatever the tick.
const FALSE_ALARM_HOLD: Duration = Duration::from_secs(3_600);

fn logit(p: f64) -> f64 {
    let p = p.clamp(EPS, 1.0 - EPS);
    (p / (1.0 - p)).ln()
}

/// The least `f64` above `x` (`f64::next_up`, stable only since Rust 1.86).
fn next_up(x: f64) -> f64 {
    if x.is_nan() || x == f64::INFINITY {
        return x;
    }
    if x == 0.0 {
        return f64::from_bits(1);
    }
    let bits = x.to_bits();
    f64::from_bits(if x > 0.0 { bits + 1 } else { bits - 1 })
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// One class's calibration: warm-up scores, then the fitted tail.
#[derive(Debug, Clone)]
pub(crate) struct Calibrator {
    /// The risk per tick: false trips per day over ticks per day.
    risk: f64,
    warm_up: usize,
    /// The healthy ticks a false alarm's floor holds: [`FALSE_ALARM_HOLD`] in ticks.
    hold: u64,
    /// Warm-up scores (logits), until the first fit.
    init: Vec<f64>,
    /// After the first fit: the tail's start (logit), the excesses over it, their sum and sum
    /// of squares, and the healthy ticks seen.
    tail: Option<Tail>,
    /// Healthy scores still to pass before a restored calibration holds its threshold
    /// ([`RESTORED_SETTLE_TICKS`](super::RESTORED_SETTLE_TICKS); 0 for a new one).
    settle: u32,
    /// Healthy scores a restored calibration with a fitted tail still passes without learning
    /// them ([`RESTORED_UNLEARNT_TICKS`](super::RESTORED_UNLEARNT_TICKS); 0 for a new one).
    unlearnt: u32,
    /// Started from saved calibrations ([`restored`](Self::restored)).
    restored: bool,
}

/// What a calibration has learnt, as [`Calibrations`](super::Calibrations) saves it: the
/// warm-up's scores, or the fitted tail. The rest (the risk per tick, the warm-up's length,
/// the fit) follows from these and the settings it is restored with.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Learnt {
    /// Still warming up: the healthy scores' logits so far, oldest first.
    WarmingUp(Vec<f64>),
    Fitted(Fitted),
}

/// A fitted tail's state ([`Tail`], less what follows from it).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Fitted {
    pub(crate) start: f64,
    /// The excesses kept, oldest first.
    pub(crate) peaks: Vec<f64>,
    pub(crate) seen: u64,
    pub(crate) exceeded: u64,
    pub(crate) over: u64,
    pub(crate) runs: u64,
    pub(crate) was_over: bool,
    /// A false alarm's floor (logit) and the healthy tick (`seen`) it holds until.
    pub(crate) floor: Option<(f64, u64)>,
}

impl Learnt {
    /// Why these cannot be what a calibration learnt (a file edited or damaged), if they
    /// cannot: every logit within the clamped probabilities', excesses over the start, at
    /// most [`MAX_PEAKS`] of them, and counts that agree.
    pub(crate) fn check(&self) -> Result<(), String> {
        let (lo, hi) = (logit(EPS), logit(1.0 - EPS));
        let within = |x: f64| x.is_finite() && (lo..=hi).contains(&x);
        // An excess is stored as `x - start`: `start + excess` can round a step past `x`,
        // the clamp itself for a model that answers 1.0.
        let slack = 1e-9;
        match self {
            Self::WarmingUp(scores) => match scores.iter().position(|&x| !within(x)) {
                Some(i) => Err(format!(
                    "warm-up score {i} is {}, not the logit of a probability",
                    scores[i]
                )),
                None => Ok(()),
            },
            Self::Fitted(f) => {
                if !within(f.start) {
                    return Err(format!("the tail's start is {}", f.start));
                }
                if f.peaks.len() > MAX_PEAKS {
                    return Err(format!(
                        "{} excesses: at most {MAX_PEAKS} are kept",
                        f.peaks.len()
                    ));
                }
                if let Some(i) = f
                    .peaks
                    .iter()
                    .position(|&e| !(e > 0.0 && e.is_finite() && f.start + e <= hi + slack))
                {
                    return Err(format!(
                        "excess {i} is {}: not over the tail's start",
                        f.peaks[i]
                    ));
                }
                if f.seen > MAX_SEEN {
                    return Err(format!("{} healthy ticks seen", f.seen));
                }
                if !(f.peaks.len() as u64 <= f.exceeded
                    && f.exceeded <= f.seen
                    && f.over <= f.seen
                    && f.runs <= f.over)
                {
                    return Err(format!(
                        "counts that do not agree: {} excesses kept of {} seen over the \
                         start in {} runs of {} ticks over it, {} healthy ticks in all",
                        f.peaks.len(),
                        f.exceeded,
                        f.runs,
                        f.over,
                        f.seen
                    ));
                }
                match f.floor {
                    Some((x, _)) if !x.is_finite() => Err(format!("a false alarm's floor of {x}")),
                    _ => Ok(()),
                }
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Tail {
    start: f64,
    peaks: VecDeque<f64>,
    sum: f64,
    sum_sq: f64,
    seen: u64,
    /// Total excesses seen (the peaks kept are the newest of them).
    exceeded: u64,
    /// Healthy ticks over `start` (every one, kept as a peak or not), the runs they came in,
    /// and whether the last one seen was over: the extremal index is `runs / over`.
    over: u64,
    runs: u64,
    was_over: bool,
    /// The fitted threshold (logit), refitted after every new peak.
    fit: f64,
    /// The score (logit) the fit puts 2 % of healthy ticks above, at least the start: the top
    /// of the class's usual scores, which a warning holds over (refitted with `fit`; the
    /// start is the warm-up's and does not move with the class).
    usual: f64,
    /// The threshold in force (logit): the fit, or a false alarm's floor above it.
    threshold: f64,
    /// The least threshold (logit) a false alarm set, and the healthy tick (`passed`) it
    /// holds until: the level the model misread does not trip the class again meanwhile,
    /// while its scores, learnt, lift the fit if it lasts.
    floor: Option<(f64, u64)>,
    /// Healthy ticks passed: `seen`, and those a restored calibration passes without learning
    /// them. A floor's hour runs on it; the budget's rate on `seen` alone.
    passed: u64,
}

impl Calibrator {
    pub(crate) fn new(c: &Calibration, tick: Duration) -> Self {
        let ticks_per_day = 86_400.0 / tick.as_secs_f64().max(1e-3);
        let min_ticks = (MIN_PEAKS as f64 / (1.0 - TAIL_QUANTILE)).ceil() as usize;
        Self {
            risk: (c.false_trips_per_day / ticks_per_day).clamp(1e-12, 0.5),
            warm_up: (c.warm_up_ticks as usize).max(min_ticks),
            hold: (FALSE_ALARM_HOLD.as_secs_f64() / tick.as_secs_f64().max(1e-3))
                .round()
                .max(1.0) as u64,
            init: Vec::new(),
            tail: None,
            settle: 0,
            unlearnt: 0,
            restored: false,
        }
    }

    /// A calibration that starts where `learnt` left off (checked: [`Learnt::check`]), with
    /// these settings and tick, and reports only for its first
    /// [`RESTORED_SETTLE_TICKS`](super::RESTORED_SETTLE_TICKS) healthy scores, which it does
    /// not learn; a fitted one learns none of its first
    /// [`RESTORED_UNLEARNT_TICKS`](super::RESTORED_UNLEARNT_TICKS).
    pub(crate) fn restored(c: &Calibration, tick: Duration, learnt: Learnt) -> Self {
        let mut cal = Self::new(c, tick);
        cal.settle = super::RESTORED_SETTLE_TICKS;
        cal.restored = true;
        match learnt {
            Learnt::WarmingUp(scores) => {
                cal.init = scores;
                if cal.init.len() >= cal.warm_up {
                    cal.tail = Some(Tail::fit(std::mem::take(&mut cal.init), cal.risk));
                }
            }
            Learnt::Fitted(f) => {
                let mut tail = Tail {
                    start: f.start,
                    peaks: VecDeque::with_capacity(f.peaks.len()),
                    sum: 0.0,
                    sum_sq: 0.0,
                    seen: f.seen,
                    exceeded: 0,
                    over: f.over,
                    runs: f.runs,
                    was_over: f.was_over,
                    fit: f.start,
                    usual: f.start,
                    threshold: f.start,
                    // A floor holds an hour of healthy ticks from its false alarm, at most.
                    floor: f
                        .floor
                        .map(|(x, until)| (x, until.min(f.seen.saturating_add(cal.hold)))),
                    passed: f.seen,
                };
                for e in f.peaks {
                    tail.push(e);
                }
                tail.exceeded = f.exceeded;
                tail.refit(cal.risk);
                cal.tail = Some(tail);
            }
        }
        if cal.tail.is_some() {
            cal.unlearnt = super::RESTORED_UNLEARNT_TICKS;
        }
        cal
    }

    /// Whether it started from saved calibrations ([`restored`](Self::restored)) rather than
    /// a warm-up of its own.
    pub(crate) fn is_restored(&self) -> bool {
        self.restored
    }

    /// What it has learnt, to be restored ([`restored`](Self::restored)).
    pub(crate) fn learnt(&self) -> Learnt {
        match &self.tail {
            None => Learnt::WarmingUp(self.init.clone()),
            Some(t) => Learnt::Fitted(Fitted {
                start: t.start,
                peaks: t.peaks.iter().copied().collect(),
                seen: t.seen,
                exceeded: t.exceeded,
                over: t.over,
                runs: t.runs,
                was_over: t.was_over,
                // Saved as the healthy tick `seen` it holds until.
                floor: t
                    .floor
                    .map(|(x, until)| (x, t.seen.saturating_add(until.saturating_sub(t.passed)))),
            }),
        }
    }

    /// Healthy scores still to come before the threshold holds (the warm-up's, learnt, and a
    /// restored calibration's settling, passed); `None` once it holds.
    pub(crate) fn left(&self) -> Option<u32> {
        let warming = match &self.tail {
            None => self.warm_up.saturating_sub(self.init.len()),
            Some(_) => 0,
        };
        // A restored warm-up goes on once it has settled.
        let left = u32::try_from(warming)
            .unwrap_or(u32::MAX)
            .saturating_add(self.settle);
        (left > 0).then_some(left)
    }

    /// The tail whose threshold is in force: none while warming up, or while a restored
    /// calibration settles.
    fn armed(&self) -> Option<&Tail> {
        self.tail.as_ref().filter(|_| self.settle == 0)
    }

    /// Whether the threshold is beyond every probability: no score can meet it (compared as
    /// [`exceeds`](Self::exceeds) compares, on the clamped logit).
    pub(crate) fn beyond_reach(&self) -> bool {
        self.armed().is_some_and(|t| t.threshold > logit(HIGHEST))
    }

    /// The probability at or above which a tick predicts failure; `None` while warming up
    /// (or settling, restored).
    pub(crate) fn threshold(&self) -> Option<f64> {
        self.armed().map(|t| sigmoid(t.threshold))
    }

    /// Whether `p` is at or above the threshold, compared as the threshold was fitted: on the
    /// logit of `p` clamped to `[1e-6, 1 - 1e-6]`, so that a model that answers 1.0 (or a
    /// value that rounds to it in `f32`) on healthy ticks does not beat a threshold fitted
    /// beyond every such score. `false` while warming up (or settling, restored).
    pub(crate) fn exceeds(&self, p: f64) -> bool {
        p.is_finite() && self.armed().is_some_and(|t| logit(p) >= t.threshold)
    }

    /// Whether `p` is above the class's usual scores: over the score the fitted tail puts 2 %
    /// of its healthy ticks above (the 98th percentile, at least the tail's start; it moves
    /// with the class as the fit does), and while a false alarm's floor holds, over that
    /// alarm's highest score; compared as [`exceeds`](Self::exceeds) compares. A warning
    /// holds while its scores stay there (`Breaker::step_predicted`). `false` while warming
    /// up (or settling, restored).
    pub(crate) fn above_usual(&self, p: f64) -> bool {
        p.is_finite()
            && self.armed().is_some_and(|t| {
                let x = logit(p);
                // While a false alarm's floor holds, its scores were judged benign too (the
                // floor is its highest score's logit plus the margin, summed as here).
                x > t.usual && t.floor.is_none_or(|(f, _)| x + FALSE_ALARM_MARGIN > f)
            })
    }

    /// A predicted failure that did not come: the class stayed healthy for the alarm's
    /// length with scores up to `highest`. The threshold is put above them for the next
    /// [`FALSE_ALARM_HOLD`] of healthy ticks, so that the same level does not trip the class
    /// again meanwhile: a calibration learns from its false alarms.
    pub(crate) fn false_alarm(&mut self, highest: f64) {
        if let (Some(t), true) = (&mut self.tail, highest.is_finite()) {
            let floor = logit(highest) + FALSE_ALARM_MARGIN;
            t.floor = Some((floor, t.passed + self.hold));
            t.hold_floor();
        }
    }

    /// A false alarm's floor in force (logit) and the healthy tick it holds until.
    pub(crate) fn floor(&self) -> Option<(f64, u64)> {
        self.tail.as_ref()?.floor
    }

    /// A breach confirmed the alarm a false alarm's floor was put above: the floor it
    /// replaced (`before`, [`floor`](Self::floor) when it was put) holds again, if its time
    /// is not over, or the fitted threshold.
    pub(crate) fn lift_floor(&mut self, before: Option<(f64, u64)>) {
        if let Some(t) = &mut self.tail {
            t.floor = before;
            t.hold_floor();
        }
    }

    /// Learn from a healthy tick's score (one that counts against the false-trip budget).
    pub(crate) fn observe(&mut self, p: f64) {
        self.learn(p, false);
    }

    /// Learn from a healthy tick whose score still reads an incident in the model's window
    /// ([`ECHO_TICKS`](super::ECHO_TICKS)): a healthy tick all the same, counted against the
    /// false-trip budget, but its score no more than the tail's start, so that it does not
    /// shape the tail. While warming up, with no tail yet, as it is.
    pub(crate) fn observe_echo(&mut self, p: f64) {
        self.learn(p, true);
    }

    fn learn(&mut self, p: f64, echo: bool) {
        if !p.is_finite() {
            return;
        }
        // A restored calibration's first scores are read against the predictor's history of
        // the class as it fills again after the restart: a long baseline that has not yet
        // seen the class's rarer healthy ticks reads one as far out. Passed, not learnt.
        if self.settle > 0 || self.unlearnt > 0 {
            self.settle = self.settle.saturating_sub(1);
            self.unlearnt = self.unlearnt.saturating_sub(1);
            if let Some(t) = &mut self.tail {
                t.pass();
            }
            return;
        }
        let x = logit(p);
        match &mut self.tail {
            None => {
                self.init.push(x);
                if self.init.len() >= self.warm_up {
                    self.tail = Some(Tail::fit(std::mem::take(&mut self.init), self.risk));
                }
            }
            Some(t) => {
                let x = if echo { x.min(t.start) } else { x };
                t.observe(x, self.risk);
            }
        }
    }
}

impl Tail {
    fn fit(init: Vec<f64>, risk: f64) -> Self {
        let mut sorted = init.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let mut at = ((n as f64 * TAIL_QUANTILE) as usize).min(n - 1);
        // At least MIN_PEAKS scores strictly above the start: a model whose scores take a few
        // values can put most of the top 2 % on the quantile itself (8 excesses were seen),
        // and a fit of so few runs away with the first new one. Not below LOWEST_START,
        // where most ticks would be over the start and θ would mean nothing.
        let lowest = (n as f64 * LOWEST_START) as usize;
        while n - sorted.partition_point(|x| *x <= sorted[at]) < MIN_PEAKS {
            match sorted.partition_point(|x| *x < sorted[at]) {
                first if first > lowest => at = first - 1,
                _ => break,
            }
        }
        let start = sorted[at];
        let mut tail = Self {
            start,
            peaks: VecDeque::new(),
            sum: 0.0,
            sum_sq: 0.0,
            seen: init.len() as u64,
            passed: init.len() as u64,
            exceeded: 0,
            over: 0,
            runs: 0,
            was_over: false,
            fit: start,
            usual: start,
            threshold: start,
            floor: None,
        };
        // the runs, and the excesses, in the warm-up's order (the peaks kept are the newest)
        for &x in &init {
            tail.count_run(x);
            if x > start {
                tail.push(x - start);
            }
        }
        tail.refit(risk);
        tail
    }

    fn push(&mut self, excess: f64) {
        self.peaks.push_back(excess);
        self.sum += excess;
        self.sum_sq += excess * excess;
        self.exceeded += 1;
        if self.peaks.len() > MAX_PEAKS
            && let Some(old) = self.peaks.pop_front()
        {
            self.sum -= old;
            self.sum_sq -= old * old;
        }
    }

    /// Count `x` towards the runs of ticks over the tail's start.
    fn count_run(&mut self, x: f64) {
        let over = x > self.start;
        if over {
            self.over += 1;
            self.runs += u64::from(!self.was_over);
        }
        self.was_over = over;
    }

    /// The extremal index: runs of ticks over the tail's start per tick over it (1 without
    /// any), at least [`MIN_THETA`].
    fn theta(&self) -> f64 {
        if self.over == 0 {
            return 1.0;
        }
        (self.runs as f64 / self.over as f64).clamp(MIN_THETA, 1.0)
    }

    /// A healthy tick passed without learning its score: a floor's hour runs on.
    fn pass(&mut self) {
        self.passed += 1;
        self.hold_floor();
    }

    fn observe(&mut self, x: f64, risk: f64) {
        self.seen += 1;
        self.passed += 1;
        self.count_run(x);
        // Every healthy score over the tail's start is the tail's, those past the threshold
        // too: they are how often a healthy tick crosses it, what the budget counts. Left out
        // (as SPOT leaves out the scores it flags), the tail learnt is cut at the threshold,
        // lighter than the class's, and the threshold trips the class over its budget.
        if x > self.start {
            self.push(x - self.start);
            self.refit(risk);
        } else {
            self.hold_floor();
        }
    }

    /// The generalized Pareto fit of the excesses by the method of moments, and the score
    /// exceeded with probability `risk / θ`: `start + σ/γ ((risk n / (θ N))^-γ - 1)`.
    fn refit(&mut self, risk: f64) {
        let risk = (risk / self.theta()).min(0.5);
        let n = self.peaks.len() as f64;
        if n < 2.0 {
            // Too few excesses to fit a tail: the highest healthy score seen, and a margin.
            let highest = self.peaks.iter().copied().fold(0.0, f64::max);
            self.fit = self.start + 2.0 * highest.max(1.0);
            self.usual = self.start;
            self.hold_floor();
            return;
        }
        let mean = self.sum / n;
        let var = (self.sum_sq / n - mean * mean).max(1e-12);
        // Method of moments; the shape is bounded to where it is defined and not absurd, and
        // the scale follows from it and the mean (the mean is σ / (1 - γ): the moments'
        // scale where the shape is not bounded; bounded, the scale of excesses that are all
        // alike, from a model whose scores take a few values, stays that of their mean and
        // does not grow without end as their variance goes to 0).
        let gamma = (0.5 * (1.0 - mean * mean / var)).clamp(-0.5, 0.45);
        let sigma = (mean * (1.0 - gamma)).max(1e-9);
        // The excess exceeded by a share `risk` of the healthy ticks: that share over the
        // share of healthy ticks with an excess.
        let excess = |risk: f64| {
            let ratio = (risk * self.seen as f64 / self.exceeded.max(1) as f64).min(1.0);
            if gamma.abs() < 1e-6 {
                -sigma * ratio.ln()
            } else {
                sigma / gamma * (ratio.powf(-gamma) - 1.0)
            }
        };
        let over = excess(risk);
        self.usual = self.start + excess(1.0 - TAIL_QUANTILE).max(0.0);
        // Never the start itself: where the healthy scores repeat, the start is the class's
        // usual score (most of the warm-up's can equal it), and a threshold there, compared
        // with `>=`, tripped on it about once an hour (a flat series whose excesses were
        // within the budget: `ratio` 1, `over` 0).
        self.fit = (self.start + over.max(0.0)).max(next_up(self.start));
        self.hold_floor();
    }

    /// The threshold in force: the fit, no lower than a false alarm's floor while it holds.
    fn hold_floor(&mut self) {
        if self.floor.is_some_and(|(_, until)| self.passed >= until) {
            self.floor = None;
        }
        self.threshold = match self.floor {
            Some((floor, _)) => self.fit.max(floor),
            None => self.fit,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic uniform numbers in [0, 1).
    fn uniform(seed: &mut u64) -> f64 {
        *seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (*seed >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Scores whose logit is logistic noise around `centre` (what a model's healthy output
    /// looks like: mostly low, with a long tail).
    fn healthy(seed: &mut u64, centre: f64) -> f64 {
        let u = uniform(seed).clamp(1e-9, 1.0 - 1e-9);
        sigmoid(centre + 0.5 * (u / (1.0 - u)).ln())
    }

    fn calibrated(centre: f64, ticks: usize) -> (Calibrator, u64) {
        calibrated_at(Duration::from_millis(500), centre, ticks)
    }

    /// [`calibrated`] at another tick.
    fn calibrated_at(tick: Duration, centre: f64, ticks: usize) -> (Calibrator, u64) {
        let cal = Calibration::default();
        let mut c = Calibrator::new(&cal, tick);
        let mut seed = 7;
        for _ in 0..ticks {
            c.observe(healthy(&mut seed, centre));
        }
        (c, seed)
    }

    /// `c` restored as a new process would, through the saved record's checks.
    fn restore(c: &Calibrator, cal: &Calibration) -> Calibrator {
        let learnt = c.learnt();
        learnt.check().unwrap();
        Calibrator::restored(cal, Duration::from_millis(500), learnt)
    }

    #[test]
    fn a_restored_calibration_settles_then_holds_the_threshold_it_would_have() {
        // Past the first 2,048 excesses, so that the oldest have been let go.
        let (mut c, mut seed) = calibrated(-3.0, 150_000);
        c.false_alarm(0.97);
        let had = c.threshold().unwrap();
        let mut r = restore(&c, &Calibration::default());
        let settle = super::super::RESTORED_SETTLE_TICKS;
        for i in 0..settle {
            assert_eq!(r.threshold(), None, "score {i}: still settling");
            assert_eq!(r.left(), Some(settle - i));
            assert!(!r.exceeds(0.999_999));
            let p = healthy(&mut seed, -3.0);
            c.observe(p);
            r.observe(p);
        }
        // The threshold it had, the false alarm's floor with it: above its score.
        assert_eq!(r.left(), None);
        assert_eq!(r.threshold(), Some(had));
        assert!(had > 0.97, "{had}");
        // Passed, not learnt, until the long baseline is whole again; then learnt as the
        // uninterrupted calibration learns them, and the floor's hour ran meanwhile.
        for _ in settle..super::super::RESTORED_UNLEARNT_TICKS {
            let p = healthy(&mut seed, -3.0);
            c.observe(p);
            r.observe(p);
            assert_eq!(r.threshold(), Some(had));
        }
        for _ in 0..20_000 {
            let p = healthy(&mut seed, -3.0);
            c.observe(p);
            r.observe(p);
        }
        let (a, b) = (c.threshold().unwrap(), r.threshold().unwrap());
        assert!((logit(a) - logit(b)).abs() < 0.05, "{a} restored as {b}");
        assert!(b < 0.97, "the floor's hour is over: {b}");
        let (Learnt::Fitted(fc), Learnt::Fitted(fr)) = (c.learnt(), r.learnt()) else {
            panic!("fitted")
        };
        assert_eq!(
            fr.seen + u64::from(super::super::RESTORED_UNLEARNT_TICKS),
            fc.seen
        );
    }

    #[test]
    fn what_a_model_that_answers_1_teaches_reads_back() {
        // A healthy score at the clamp is stored as its excess over the tail's start, and
        // the start plus that excess can round a step past the clamp: the check allows it
        // (it refused a record the calibration had just given, for one start in ten).
        for i in 0..40 {
            let centre = -4.0 + 0.1 * f64::from(i);
            let mut c = Calibrator::new(&Calibration::default(), Duration::from_millis(500));
            let mut seed = 11 + u64::from(i as u32);
            for t in 0..5_000 {
                c.observe(if t % 40 == 0 {
                    1.0
                } else {
                    healthy(&mut seed, centre)
                });
            }
            assert!(c.threshold().is_some());
            c.learnt()
                .check()
                .unwrap_or_else(|e| panic!("centre {centre}: {e}"));
        }
    }

    #[test]
    fn a_floor_saved_while_restored_scores_pass_unlearnt_keeps_its_time() {
        // The floor's hour runs on every healthy tick, learnt or passed; saved, it is told in
        // the ticks learnt (`seen`), and restored again it ends on the same healthy tick.
        let (mut c, mut seed) = calibrated(-3.0, 20_000);
        c.false_alarm(0.97);
        let hold = c.hold;
        let mut r = restore(&c, &Calibration::default());
        for _ in 0..1_000 {
            r.observe(healthy(&mut seed, -3.0));
        }
        let Learnt::Fitted(f) = r.learnt() else {
            panic!("fitted")
        };
        assert_eq!(f.floor.unwrap().1, f.seen + hold - 1_000);
        let mut again = restore(&r, &Calibration::default());
        for _ in 0..hold - 1_001 {
            again.observe(healthy(&mut seed, -3.0));
        }
        assert!(again.threshold().unwrap() > 0.97, "{:?}", again.threshold());
        again.observe(healthy(&mut seed, -3.0));
        assert!(again.threshold().unwrap() < 0.97, "{:?}", again.threshold());
    }

    #[test]
    fn a_restored_floor_holds_an_hour_at_most_whatever_the_file_says() {
        let (c, mut seed) = calibrated(-3.0, 10_000);
        let Learnt::Fitted(mut f) = c.learnt() else {
            panic!("fitted")
        };
        f.floor = Some((logit(0.999), u64::MAX));
        let mut r = Calibrator::restored(
            &Calibration::default(),
            Duration::from_millis(500),
            Learnt::Fitted(f),
        );
        for _ in 0..7_200 {
            r.observe(healthy(&mut seed, -3.0));
        }
        assert!(r.threshold().unwrap() < 0.99, "{:?}", r.threshold());
    }

    #[test]
    fn a_restored_warm_up_goes_on_from_where_it_was() {
        let (mut c, mut seed) = calibrated(-3.0, 1_000);
        let mut r = restore(&c, &Calibration::default());
        // Its settling scores are passed, not learnt: then the warm-up goes on.
        let settle = super::super::RESTORED_SETTLE_TICKS;
        assert_eq!(r.left(), Some(2_600 + settle));
        for _ in 0..settle {
            r.observe(healthy(&mut seed, -3.0));
        }
        assert_eq!(r.left(), Some(2_600));
        for _ in 0..2_600 {
            let p = healthy(&mut seed, -3.0);
            c.observe(p);
            r.observe(p);
        }
        // 3,600 scores in all: the warm-up is over in both, and the fits are the same.
        assert_eq!(r.threshold(), c.threshold());
        assert!(r.threshold().is_some());
    }

    #[test]
    fn a_restored_calibration_keeps_the_budget_it_is_restored_with() {
        let (c, mut seed) = calibrated(-3.0, 20_000);
        let tighter = Calibration::default().false_trips_per_day(0.1);
        let mut r = restore(&c, &tighter);
        for _ in 0..super::super::RESTORED_SETTLE_TICKS {
            r.observe(healthy(&mut seed, -3.0));
        }
        // A tenth of the budget puts the threshold higher than the one saved.
        let (saved, now) = (c.threshold().unwrap(), r.threshold().unwrap());
        assert!(logit(now) > logit(saved) + 0.1, "{saved} -> {now}");
    }

    #[test]
    fn warms_up_then_reports_a_threshold() {
        let (c, _) = calibrated(-3.0, 3_599);
        assert_eq!(c.threshold(), None, "still warming up");
        assert_eq!(c.left(), Some(1));
        assert_eq!(calibrated(-3.0, 0).0.left(), Some(3_600));
        let (c, _) = calibrated(-3.0, 3_600);
        assert!(c.threshold().is_some());
    }

    #[test]
    fn the_threshold_follows_the_class_and_keeps_the_budget() {
        // Two services the same model scores differently when healthy: each gets its own
        // threshold, and over a further day of healthy ticks each trips about once.
        for centre in [-4.0, 0.0, 2.0] {
            let (mut c, mut seed) = calibrated(centre, 3_600);
            let day = 172_800;
            let mut trips = 0;
            let mut above = false;
            for _ in 0..day {
                let p = healthy(&mut seed, centre);
                let t = c.threshold().unwrap();
                // A trip is an episode of ticks at or above the threshold.
                if p >= t && !above {
                    trips += 1;
                }
                above = p >= t;
                c.observe(p);
            }
            assert!(trips <= 5, "centre {centre}: {trips} false trips in a day");
            assert!(
                c.threshold().unwrap() > sigmoid(centre),
                "above the healthy median"
            );
        }
    }

    #[test]
    fn scores_that_move_in_runs_get_a_lower_threshold_and_keep_the_budget() {
        // The same healthy scores, each held for 8 ticks (a model whose score drifts rather
        // than jitters): a tick over the threshold comes with 7 more, one trip for 8 ticks.
        let cal = Calibration::default();
        let tick = Duration::from_millis(500);
        // Feeds `ticks` such ticks; returns the trips (episodes at or above the threshold).
        let held = |seed: &mut u64, ticks: usize, c: &mut Calibrator| {
            let (mut trips, mut above) = (0u32, false);
            for _ in 0..ticks / 8 {
                let p = healthy(seed, -3.0);
                for _ in 0..8 {
                    if let Some(t) = c.threshold() {
                        trips += u32::from(p >= t && !above);
                        above = p >= t;
                    }
                    c.observe(p);
                }
            }
            trips
        };
        let (mut jitter, mut runs) = (Calibrator::new(&cal, tick), Calibrator::new(&cal, tick));
        let (mut a, mut b) = (7, 7);
        for _ in 0..28_800 {
            jitter.observe(healthy(&mut a, -3.0));
        }
        held(&mut b, 28_800, &mut runs);
        let (j, r) = (jitter.threshold().unwrap(), runs.threshold().unwrap());
        // Its excesses' runs are 8 ticks long (the extremal index about 1/8): its threshold is
        // the score a tick exceeds about 8 times as often, lower in logit (1.50 here; ln 8 / 2
        // for this logistic tail alone).
        assert!(logit(j) - logit(r) > 0.5, "jitter {j}, runs {r}");
        // The Python port agrees (test_harness.py, Calibration).
        assert!((r - 0.845_950_969_309_266_2).abs() < 1e-9, "{r:.16}");
        // And over a further day it trips about once, as the jittering class does.
        let trips = held(&mut b, 172_800, &mut runs);
        assert!(trips <= 5, "{trips} false trips in a day");
    }

    #[test]
    fn a_failing_score_crosses_a_threshold_fitted_on_low_healthy_scores() {
        let (c, _) = calibrated(-4.0, 3_600);
        let t = c.threshold().unwrap();
        assert!(t < 0.87, "a model that scores healthy ticks near 0.02: {t}");
        assert!(0.9 >= t);
    }

    #[test]
    fn a_false_alarm_puts_the_threshold_above_its_scores_for_an_hour_of_healthy_ticks() {
        let (mut c, mut seed) = calibrated(-3.0, 5_000);
        let before = c.threshold().unwrap();
        assert!(c.exceeds(0.97), "{before}");
        c.false_alarm(0.97);
        let after = c.threshold().unwrap();
        assert!(!c.exceeds(0.97) && after > 0.97, "{after}");
        // The Python port agrees (test_harness.py, Calibration).
        assert!(
            (after - 0.976_479_897_661_275_6).abs() < 1e-9,
            "{after:.16}"
        );
        // Healthy ticks go on refitting the tail; the floor holds for an hour of them. (A
        // higher false alarm: an hour of this noise, learnt whole, lifts the fit to about
        // 0.975, above 0.97.)
        c.false_alarm(0.995);
        for _ in 0..7_000 {
            c.observe(healthy(&mut seed, -3.0));
        }
        assert!(!c.exceeds(0.995), "held: {:?}", c.threshold());
        for _ in 0..200 {
            c.observe(healthy(&mut seed, -3.0));
        }
        assert!(c.exceeds(0.995), "released: {:?}", c.threshold());
    }

    #[test]
    fn a_false_alarm_holds_an_hour_whatever_the_tick() {
        // With a 1 s tick, the hour is 3,600 healthy ticks (it was 7,200 ticks at any tick:
        // two hours here, five days on minute steps).
        let (mut c, mut seed) = calibrated_at(Duration::from_secs(1), -3.0, 5_000);
        c.false_alarm(0.995);
        for _ in 0..3_500 {
            c.observe(healthy(&mut seed, -3.0));
        }
        assert!(!c.exceeds(0.995), "held: {:?}", c.threshold());
        for _ in 0..150 {
            c.observe(healthy(&mut seed, -3.0));
        }
        assert!(c.exceeds(0.995), "released: {:?}", c.threshold());
    }

    #[test]
    fn the_python_port_agrees() {
        // `tower-degrade-ai/training/test_harness.py` (Calibration) computes the same
        // threshold with `calibrate.py`, the port the evaluation harness scores the model with.
        let (c, _) = calibrated(-3.0, 5_000);
        let t = c.threshold().unwrap();
        assert!((t - 0.864_045_280_529_102_3).abs() < 1e-9, "{t:.16}");
    }

    /// A model whose healthy scores take three values (75 %, 12 %, 12 %) and a few more.
    fn tied(c: &mut Calibrator, ticks: usize) {
        for i in 0..ticks {
            c.observe(match (i * 37) % 100 {
                0..75 => 0.0046,
                75..87 => 0.0265,
                87..99 => 0.0043,
                _ => 0.03 + 0.004 * ((i / 100) % 10) as f64,
            });
        }
    }

    #[test]
    fn tied_scores_still_give_the_first_fit_its_fifty_excesses_and_a_bounded_threshold() {
        let mut c = Calibrator::new(&Calibration::default(), Duration::from_millis(500));
        tied(&mut c, 3_600);
        let tail = c.tail.as_ref().unwrap();
        // The 98th percentile is the second value, with 36 scores above it: the start moves
        // down to the value below, with the 12 % of the second value above it too.
        assert!(
            tail.peaks.len() >= MIN_PEAKS,
            "{} excesses",
            tail.peaks.len()
        );
        assert_eq!(tail.start, logit(0.0046));
        let t = c.threshold().unwrap();
        // Beyond every healthy score (the highest is 0.066), and not at 1: excesses mostly
        // alike bound the tail, they do not stretch it without end.
        assert!(t > 0.066 && t < 0.9, "{t}");
        // One new score a little above the rest does not carry it off.
        c.observe(0.07);
        let after = c.threshold().unwrap();
        assert!((logit(after) - logit(t)).abs() < 0.5, "{t} -> {after}");
        assert!(
            (t - TIED_THRESHOLD).abs() < 1e-9,
            "{t:.16}: the Python port's value"
        );
    }

    /// The threshold `tied` gives (training/calibrate.py's test asserts the same).
    const TIED_THRESHOLD: f64 = 0.508_774_034_388_744_8;

    #[test]
    fn next_up_is_the_least_float_above() {
        for x in [-3.5, -1e-300, -0.0, 0.0, 1e-300, 0.25, 4.6e18] {
            let up = next_up(x);
            assert!(up > x, "{x}");
            // Nothing between: their midpoint rounds to one of them.
            let mid = x / 2.0 + up / 2.0;
            assert!(mid == x || mid == up, "{x} {up} {mid}");
        }
    }

    #[test]
    fn a_class_whose_healthy_score_never_moves_is_never_tripped_by_it() {
        // A flat series (regular traffic the model scores alike each tick) with one run of
        // high healthy scores in its warm-up: the tail starts at the usual score, whose
        // excesses stay within the budget, and the fit fell on the start itself. Compared
        // with `>=`, the usual score then tripped the class about once an hour (in a trial,
        // on 500 ms ticks after a day; on minute steps at arming).
        for tick in [Duration::from_millis(500), Duration::from_secs(60)] {
            let mut c = Calibrator::new(&Calibration::default(), tick);
            for i in 0..400_000 {
                let p = if (1_000..1_020).contains(&i) {
                    0.5
                } else {
                    0.01
                };
                if c.threshold().is_some() {
                    assert!(!c.exceeds(0.01), "{tick:?}, tick {i}: {:?}", c.threshold());
                }
                c.observe(p);
            }
            assert!(c.threshold().is_some(), "{tick:?}");
            // A score well over the usual one and the warm-up's run is still over it.
            assert!(c.exceeds(0.9999), "{tick:?}: {:?}", c.threshold());
        }
    }
}
