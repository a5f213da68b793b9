//! The per-class breaker state machine.
//!
//! [`Breaker::step`] is a pure function of (state, snapshot, now): the control loop calls it once
//! per tick with the class's [`WindowSnapshot`] and publishes [`Breaker::directive`]. Nothing here
//! reads a clock or touches shared memory, so every transition is unit- and property-testable.
//!
//! ```text
//!            failure rate > 50 %                 open duration elapsed
//!  Closed ───────────────────────────► Open ──────────────────────────► HalfOpen
//!    │ ▲                                ▲ ▲   probes < 80 % / timed out     │ probes >= 80 %
//!    │ │ 3 good ticks                   │ └──────────────────────────────────┤
//!    │ └──────────────── Recovering ◄───┼──────────────────────────────────────┘
//!    │                   (ramp)  └──────┘ a bad tick
//!    │ 3 windows: success < 92 % and p99 > 800 ms        3 healthy windows
//!    └──────────────────────────────────────► Degraded ───────────────────────► Closed
//! ```
//!
//! `ForcedOpen`, `Disabled`, `MetricsOnly` and a manual `Degraded` are set by hand through
//! [`Breaker::command`]; `MetricsOnly` keeps stepping a shadow machine whose transitions are
//! reported but never enforced.
//!
//! A class degraded for a calibrated prediction stays degraded while the prediction's scores
//! stay above the class's usual ones (the 98th percentile of its healthy scores, as the
//! calibration fits them), not only while they are over the threshold, so that a score
//! hovering about the threshold does not degrade the class in bursts. One that stays healthy
//! for [`FALSE_ALARM_TICKS`] closes, its threshold raised above the false alarm's scores; so
//! does one whose warnings come and go for as long with no breach. A breach within
//! [`VERDICT`] of the first warning still confirms it: the raised threshold comes down again.
//!
//! The file is long because the machine is one piece: every phase's transitions read the
//! same counters, and splitting them would scatter one table.

mod calibrate;
mod command;
mod config;
mod record;
mod saved;
mod state;

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use self::calibrate::Calibrator;
pub(crate) use self::calibrate::Learnt;
pub use self::calibrate::{Calibration, PredictThreshold};
pub use self::command::Command;
pub use self::config::{BreakerConfig, DegradeRule, PREDICT_HOLD};
use self::record::Tally;
pub use self::record::{PredictionRecord, UNJUDGED_VERDICTS};
pub use self::saved::{Calibrations, CalibrationsError};
pub use self::state::{State, Transition};
use crate::class::Route;
use crate::gate::{Directive, Reason};
use crate::window::WindowSnapshot;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Closed,
    Open {
        until: Instant,
    },
    HalfOpen {
        since: Instant,
        ok: u64,
        failed: u64,
    },
    Recovering {
        fraction: f64,
        good: u32,
        /// Calls not yet judged: too few (under `half_open_probes`) for a verdict so far.
        ok: u64,
        failed: u64,
    },
    Degraded {
        healthy: u32,
        /// Put there by the predictor (the data path's reason `predicted`), not the degrade
        /// rule.
        predicted: bool,
    },
}

impl Phase {
    fn state(self) -> State {
        match self {
            Phase::Closed => State::Closed,
            Phase::Open { .. } => State::Open,
            Phase::HalfOpen { .. } => State::HalfOpen,
            Phase::Recovering { .. } => State::Recovering,
            Phase::Degraded { .. } => State::Degraded,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Auto,
    ForcedOpen,
    Disabled,
    MetricsOnly,
    ManualDegraded,
}

/// The breaker of one class.
#[derive(Debug, Clone)]
pub struct Breaker {
    cfg: BreakerConfig,
    route: Route,
    phase: Phase,
    mode: Mode,
    opens: u32,
    breached: u32,
    predicted: u32,
    /// Consecutive predicting ticks that degrade the class (`BreakerConfig::predict_ticks_at`
    /// the control loop's tick).
    predict_ticks: u32,
    /// With a calibrated prediction threshold: what the class learned of its healthy scores.
    calibrator: Option<Calibrator>,
    /// A calibrated prediction that degraded the class and that the class has not confirmed
    /// yet: healthy ticks since, and the highest score among them. It outlives the class's
    /// closing again for [`MERGE_GAP`] ticks: a warning back within them is the same alarm
    /// (a score flapping about the threshold was never taken for a false alarm, each warning
    /// shorter than [`FALSE_ALARM_TICKS`]); one back later is a new alarm, judged on its own.
    alarm: Option<Alarm>,
    /// An alarm whose warnings ended more than [`MERGE_GAP`] ticks ago, waiting for the
    /// false-alarm exit ([`FALSE_ALARM_TICKS`] healthy ticks after its first warning with no
    /// breach: a false alarm, whose scores the threshold goes above). A score that flaps slowly was
    /// never judged, each warning ending before the exit.
    ended: Option<Alarm>,
    /// How the predictions turned out.
    tally: Tally,
    /// With a calibrated threshold: the scores of the last healthy ticks, learnt once
    /// [`FALSE_ALARM_TICKS`] more have passed without a breach, and none while a warning
    /// waits for its verdict (`holds_scores`): those before a breach are its precursors, what the
    /// threshold is for, not healthy scores.
    /// Each with whether it is an echo ([`ECHO_TICKS`]).
    unlearnt: VecDeque<(f64, bool)>,
    /// Ticks to come whose score still reads the last tick the class was not healthy on (a
    /// breach, the class open, half-open or recovering, or out of automatic control) in the
    /// model's window ([`ECHO_TICKS`]): they do not predict, and their scores are learnt no
    /// higher than the tail's start ([`Calibrator::observe_echo`]).
    echo: u32,
    /// The run of breaches now began in an earlier incident's echo.
    relapse: bool,
    /// The calibrated threshold was last seen beyond every probability (`reach_changed`).
    out_of_reach: bool,
    /// With a calibrated threshold, while a warning waits for its verdict (the tally
    /// watches it): the floor the false-alarm exit replaced when it first put one meanwhile,
    /// put back if a breach confirms the warning (`Some(None)`: none; an earlier false
    /// alarm's, still holding). A warning waiting for its verdict also holds back every
    /// healthy score from the calibration ([`Breaker::holds_scores`]).
    floored: Option<Option<Floor>>,
}

/// A false alarm's floor as the calibration keeps it (`Tail::floor`).
type Floor = (f64, u64);

#[derive(Debug, Clone, Copy, PartialEq)]
struct Alarm {
    /// Healthy ticks with calls served since its first warning.
    unconfirmed: u32,
    highest: f64,
    /// Ticks since its last warning ended (0 while it warns).
    quiet: u32,
}

/// Ticks after a warning ends within which the next one is the same alarm (5 s at the 500 ms
/// tick): a flapping score's warnings are a few ticks apart. A warning back later starts an
/// alarm of its own, so a real precursor some way after a false alarm gets its whole
/// [`FALSE_ALARM_TICKS`] before the false-alarm exit.
const MERGE_GAP: u32 = FALSE_ALARM_TICKS / 4;

/// Healthy scores a restored calibration passes before its threshold holds
/// ([`Calibrations`]): until then the class is calibrating and the predictor only reports,
/// while the predictor's own history of the class (a model's window of 64 ticks, the long
/// baseline it reads against) fills again after the restart. 512, each passed
/// [`FALSE_ALARM_TICKS`] after its own, once the class's window is whole (its 68th tick):
/// about five minutes after the start at the 500 ms tick with calls on every tick, in place
/// of the warm-up's 3,600 scores. Not learnt (nor, with a fitted tail, the next ones, up to
/// [`RESTORED_UNLEARNT_TICKS`]); a restored warm-up goes on once they have passed.
pub const RESTORED_SETTLE_TICKS: u32 = 512;

/// Healthy scores a restored calibration with a fitted tail passes without learning them,
/// its [`RESTORED_SETTLE_TICKS`] included: the long baseline of the bundled predictors (its
/// last 4,096 healthy ticks, 34 minutes at the 500 ms tick with calls on every tick; longer
/// where ticks pass with no call, which teach nothing) fills again after the restart,
/// and until it holds the class's rarer healthy ticks (one call more in flight now and then)
/// it reads one as far out. Learnt, such scores lifted a restored threshold out of the
/// model's reach (0.13 to 0.89 by the restart's 1,200th tick in
/// `a_restored_calibration_keeps_its_threshold_through_the_young_baseline_of_a_restart`, run
/// on the code before; a user's trial, 0.115 to 0.99999999), and the next save kept them.
/// That test's blips are taken in by the baseline within the settling; rarer ones (near one
/// tick in 100) take it longer, which the 4,096 are for. Meanwhile the
/// restored threshold holds, and a false alarm's floor runs its hour as before.
pub const RESTORED_UNLEARNT_TICKS: u32 = 4_096;

/// Healthy ticks after which a calibrated prediction that degraded a class is taken for a
/// false alarm (20 s at the 500 ms tick): twice the horizon the bundled model warns over, so
/// a warning of a failure that does come is never undone. Also how long, at least, a healthy
/// score is held back before the calibration learns it (a breach within drops it; longer
/// while a warning waits for its [`VERDICT`]), the shortest verdict, and the ticks after an
/// incident in which a breach is the same incident in the [`PredictionRecord`].
pub const FALSE_ALARM_TICKS: u32 = 40;

/// How long after a prediction's warning a breach still confirms it: five minutes' ticks with
/// calls served ([`verdict_ticks`]: longer in time on a class idle for some of them). A slow
/// leak is warned of minutes before it breaches (a user's trial: 124 s ahead, at a dependency
/// slowing 2 ms a second); judged at [`FALSE_ALARM_TICKS`] alone, the warning was a false
/// alarm, its floor lifted the threshold above the leak's scores, the scores were learnt as
/// healthy, and the breach was counted as missed. The false-alarm exit still closes the class
/// after [`FALSE_ALARM_TICKS`] (a false alarm costs 20 s of degradation at 500 ms, not five
/// minutes). A breach within the verdict confirms the warning in the [`PredictionRecord`]
/// (a fixed threshold's too) and, with a calibrated threshold, lifts the floor the exit put
/// and keeps the scores since the warning out of the calibration. At a tick of 7.5 s or more
/// the verdict is the exit's [`FALSE_ALARM_TICKS`] and no score waits for it (a breach can
/// still lift a floor, where a second warning within the first's verdict judged it anew).
pub const VERDICT: Duration = Duration::from_secs(300);

/// The ticks [`VERDICT`] spans at a control loop ticking every `tick`, rounded up, at least
/// [`FALSE_ALARM_TICKS`] and at most [`MAX_VERDICT_TICKS`].
///
/// ```
/// use std::time::Duration;
/// use tower_degrade::breaker::verdict_ticks;
///
/// assert_eq!(verdict_ticks(Duration::from_millis(500)), 600);
/// assert_eq!(verdict_ticks(Duration::from_secs(1)), 300);
/// assert_eq!(verdict_ticks(Duration::from_secs(60)), 40);
/// ```
pub fn verdict_ticks(tick: Duration) -> u32 {
    let ticks = VERDICT.as_nanos().div_ceil(tick.as_nanos().max(1));
    u32::try_from(ticks)
        .unwrap_or(u32::MAX)
        .clamp(FALSE_ALARM_TICKS, MAX_VERDICT_TICKS)
}

/// The most ticks a verdict spans: a class holds back up to this many healthy scores (and
/// [`FALSE_ALARM_TICKS`] more) while a warning waits, about 116 KB. A warning raised again
/// before its verdict is judged from then on, so a score that keeps warning anew holds them
/// back for up to [`UNJUDGED_VERDICTS`] times as many ticks (then the warning is dropped
/// unjudged and they are learnt): about 0.9 MB. [`VERDICT`] at a tick of about 42 ms; a
/// shorter tick's verdict is shorter than five minutes.
pub const MAX_VERDICT_TICKS: u32 = 7_200;

/// The ticks after a breach, or after the class was open, half-open, recovering or out of
/// automatic control (forced open, disabled, degraded by hand), whose prediction may still read
/// that tick: the model's window ([`WINDOW`](crate::predict::WINDOW), 64 ticks: 63 after it)
/// and a batch that overran, used for up to 4 ticks more. A high score then is the incident's
/// echo, not a precursor, nor a healthy tick's usual score. With a calibrated threshold, an
/// echo does not predict, and it is learnt as a healthy tick (counted against the false-trip
/// budget) whose score is no higher than the tail's start, so it does not shape the tail
/// (`Calibrator::observe_echo`); a breach in it is not counted as missed in the
/// [`PredictionRecord`] (nothing could warn of it). Learnt as it was, a short incident's echo
/// (scores near 1 for a few ticks after the class recovered) lifted the threshold near 1 for
/// as long as those excesses stayed among the fit's 2,048 (about 14 hours of healthy ticks at
/// the 500 ms tick); warned of, it was taken for a false alarm, whose floor went above it for
/// an hour; either way a relapse went unwarned. The price: no calibrated warning for 67 ticks
/// after any breach (34 s at the 500 ms tick, 67 minutes at a minute's), and a class the
/// degrade rule degraded closes after its healthy windows even while the echo's scores are
/// high. While warming up an echo is learnt as it is (there is no tail yet); left out there
/// as well, the simulator's classes, an incident every quarter of an hour, tripped well over
/// their budget (`docs/predictor-lodo.md`).
pub const ECHO_TICKS: u32 = crate::predict::WINDOW as u32 - 1 + crate::predict::STALE_TICKS;

/// The false-alarm exit's floor; while a warning waits for its verdict (`watching`), the
/// floor it replaced is noted in `floored` (the first it replaced, for several), so that a
/// breach lifts it.
fn put_floor(
    c: &mut Calibrator,
    floored: &mut Option<Option<Floor>>,
    watching: bool,
    highest: f64,
) {
    let before = c.floor();
    c.false_alarm(highest);
    if watching && floored.is_none() {
        *floored = Some(before);
    }
}

impl Breaker {
    /// A closed breaker sending calls it does not admit to `route`. `cfg` is taken as it is:
    /// check it first ([`BreakerConfig::validate`], which the
    /// [`DegraderBuilder`](crate::DegraderBuilder) does for its classes).
    pub fn new(cfg: BreakerConfig, route: Route) -> Self {
        let cfg_threshold = cfg.predict_threshold;
        let tick = Duration::from_millis(500);
        let predict_ticks = cfg.predict_ticks_at(tick);
        Self {
            cfg,
            route,
            phase: Phase::Closed,
            mode: Mode::Auto,
            opens: 0,
            breached: 0,
            predicted: 0,
            predict_ticks,
            calibrator: Self::calibrator(&cfg_threshold, tick),
            alarm: None,
            ended: None,
            tally: Tally::new(verdict_ticks(tick)),
            unlearnt: VecDeque::with_capacity(match cfg_threshold {
                PredictThreshold::Calibrated(_) => FALSE_ALARM_TICKS as usize + 1,
                PredictThreshold::Fixed(_) => 0,
            }),
            echo: 0,
            relapse: false,
            out_of_reach: false,
            floored: None,
        }
    }

    /// `Some(true)` when the calibrated threshold has just gone beyond the highest probability
    /// a prediction is compared at (the model's scores on this class's healthy ticks reach 1,
    /// so no score can warn), `Some(false)` when it has come back within reach; `None` when
    /// nothing changed.
    pub(crate) fn reach_changed(&mut self) -> Option<bool> {
        let out = self
            .calibrator
            .as_ref()
            .is_some_and(Calibrator::beyond_reach);
        (out != self.out_of_reach).then(|| {
            self.out_of_reach = out;
            out
        })
    }

    fn calibrator(threshold: &PredictThreshold, tick: Duration) -> Option<Calibrator> {
        match threshold {
            PredictThreshold::Calibrated(c) => Some(Calibrator::new(c, tick)),
            PredictThreshold::Fixed(_) => None,
        }
    }

    /// The same breaker for a control loop ticking every `period` (a calibrated threshold
    /// counts its false-trip budget in ticks, and a warning's verdict: [`verdict_ticks`];
    /// 500 ms unless set).
    pub fn with_tick(mut self, period: Duration) -> Self {
        self.calibrator = Self::calibrator(&self.cfg.predict_threshold, period);
        self.predict_ticks = self.cfg.predict_ticks_at(period);
        self.tally = Tally::new(verdict_ticks(period));
        self.floored = None;
        self
    }

    /// Healthy scores still to come before its calibrated threshold holds (the warm-up's, or
    /// a restored calibration's settling); `None` once it holds, or with a fixed one.
    pub fn calibration_left(&self) -> Option<u32> {
        self.calibrator.as_ref()?.left()
    }

    /// Whether its calibrated threshold started from saved calibrations
    /// ([`DegraderBuilder::restore_calibrations`](crate::DegraderBuilder::restore_calibrations))
    /// rather than a warm-up of its own (`false` with a fixed threshold).
    pub fn calibration_restored(&self) -> bool {
        self.calibrator
            .as_ref()
            .is_some_and(Calibrator::is_restored)
    }

    /// What its calibrated threshold has learnt (`None` with a fixed threshold).
    pub(crate) fn learnt(&self) -> Option<Learnt> {
        self.calibrator.as_ref().map(Calibrator::learnt)
    }

    /// Start its calibrated threshold where `learnt` left off, at a control loop ticking
    /// every `period`; `false` (nothing changed) with a fixed threshold.
    pub(crate) fn restore(&mut self, learnt: Learnt, period: Duration) -> bool {
        match &self.cfg.predict_threshold {
            PredictThreshold::Calibrated(c) => {
                self.calibrator = Some(Calibrator::restored(c, period, learnt));
                true
            }
            PredictThreshold::Fixed(_) => false,
        }
    }

    /// The probability at or above which a prediction counts: the fixed one, or the class's
    /// calibrated one; `None` while the class is still calibrating (the predictor only
    /// reports).
    pub fn predict_threshold(&self) -> Option<f64> {
        match &self.cfg.predict_threshold {
            PredictThreshold::Fixed(t) => Some(*t),
            PredictThreshold::Calibrated(_) => self.calibrator.as_ref()?.threshold(),
        }
    }

    /// How the class's predictions turned out so far ([`PredictionRecord`]).
    pub fn prediction_record(&self) -> PredictionRecord {
        self.tally.record()
    }

    /// The state in force.
    pub fn state(&self) -> State {
        match self.mode {
            Mode::Auto => self.phase.state(),
            Mode::ForcedOpen => State::ForcedOpen,
            Mode::Disabled => State::Disabled,
            Mode::MetricsOnly => State::MetricsOnly,
            Mode::ManualDegraded => State::Degraded,
        }
    }

    /// In `MetricsOnly`, the state the breaker would be in; otherwise the state in force.
    pub fn shadow_state(&self) -> State {
        match self.mode {
            Mode::MetricsOnly => self.phase.state(),
            _ => self.state(),
        }
    }

    /// Whether a manual command is in force.
    pub fn is_manual(&self) -> bool {
        self.mode != Mode::Auto
    }

    /// The configuration.
    pub fn config(&self) -> &BreakerConfig {
        &self.cfg
    }

    /// The directive the data path should follow now.
    pub fn directive(&self, now: Instant) -> Directive {
        let route = self.route;
        match self.mode {
            Mode::Disabled | Mode::MetricsOnly => return Directive::Admit,
            Mode::ForcedOpen => {
                return Directive::Divert {
                    reason: Reason::ForcedOpen,
                    route,
                    retry_after: None,
                };
            }
            Mode::ManualDegraded => {
                return Directive::AdmitFraction {
                    fraction: self.cfg.degraded_admit_fraction,
                    reason: Reason::Degraded,
                    route,
                    retry_after: None,
                };
            }
            Mode::Auto => {}
        }
        match self.phase {
            Phase::Closed => Directive::Admit,
            Phase::Open { until } => Directive::Divert {
                reason: Reason::BreakerOpen,
                route,
                retry_after: Some(until.saturating_duration_since(now)),
            },
            Phase::HalfOpen { .. } => Directive::Probe {
                route,
                retry_after: None,
            },
            Phase::Recovering { fraction, .. } => Directive::AdmitFraction {
                fraction,
                reason: Reason::Recovering,
                route,
                retry_after: None,
            },
            Phase::Degraded { predicted, .. } => Directive::AdmitFraction {
                fraction: self.cfg.degraded_admit_fraction,
                reason: if predicted {
                    Reason::Predicted
                } else {
                    Reason::Degraded
                },
                route,
                retry_after: None,
            },
        }
    }

    /// Out of automatic control (or back from it): ticks the breaker does not step cannot
    /// tell the scores held back from precursors, nor judge a warning; both are dropped, and
    /// a run of predicting ticks starts again (one held before a reset degraded the class
    /// on the first predicting tick after it).
    pub(crate) fn interrupt(&mut self) {
        self.unlearnt.clear();
        // The model's window holds ticks the breaker did not see, and an alarm cannot be
        // judged across them (a shadow stepping on from a degraded phase took the echo's
        // scores for the alarm's).
        self.echo = ECHO_TICKS;
        self.relapse = true;
        self.alarm = None;
        self.ended = None;
        self.floored = None;
        self.tally.forget();
        self.predicted = 0;
    }

    /// Whether healthy scores are held back from the calibration: a warning waits for its
    /// verdict (the tally watches it) and the verdict is longer than the false-alarm exit.
    /// Its scores and the [`FALSE_ALARM_TICKS`] before it may be a breach's precursors (a
    /// slow leak warned of minutes ahead); at a verdict of [`FALSE_ALARM_TICKS`] (a tick of
    /// 7.5 s or more) a score is learnt [`FALSE_ALARM_TICKS`] after its own, as ever.
    fn holds_scores(&self) -> bool {
        self.calibrator.is_some()
            && self.tally.verdict() > FALSE_ALARM_TICKS
            && self.tally.watching()
    }

    /// Apply a manual command.
    pub fn command(&mut self, cmd: Command) -> Option<Transition> {
        let from = self.state();
        if cmd != Command::MetricsOnly {
            self.interrupt();
        }
        self.mode = match cmd {
            Command::ForceOpen => Mode::ForcedOpen,
            Command::ForceClosed => Mode::Disabled,
            Command::Degrade => Mode::ManualDegraded,
            Command::MetricsOnly => Mode::MetricsOnly,
            Command::Reset => {
                self.phase = Phase::Closed;
                self.opens = 0;
                self.breached = 0;
                self.alarm = None;
                self.ended = None;
                Mode::Auto
            }
        };
        let to = self.state();
        (from != to || cmd == Command::Reset).then(|| Transition {
            from,
            to,
            reason: format!("manual: {cmd:?}"),
            enforced: true,
        })
    }

    fn open_for(&self) -> Duration {
        let exp = self.opens.saturating_sub(1).min(16);
        self.cfg
            .open_duration
            .saturating_mul(1u32 << exp)
            .min(self.cfg.max_open_duration)
            // What `build` validates; `Breaker::new` takes a config unchecked, and
            // `Duration::MAX` would overflow the deadline.
            .min(crate::error::MAX_DURATION)
    }

    fn open(&mut self, now: Instant) -> Phase {
        self.opens = self.opens.saturating_add(1);
        self.breached = 0;
        Phase::Open {
            until: now + self.open_for(),
        }
    }

    /// Whether `w` trips the breaker open, and why.
    fn trips(&self, w: &WindowSnapshot) -> Option<String> {
        if w.assessed() < self.min_assessed() {
            return None;
        }
        let fr = w.failure_rate();
        if fr > self.cfg.failure_rate {
            // Calls that are only slow (the SLA set below the work's normal time, an outbound
            // call given the gold tier's 50 ms) open a breaker too: say so.
            let overdue = if w.overdue > 0 {
                format!(
                    " ({} of them overdue: still running past the class's SLA, \
                     `ClassConfig::sla`, or its abandon threshold)",
                    w.overdue
                )
            } else {
                String::new()
            };
            return Some(format!(
                "failure rate {:.1} % > {:.1} % over {} calls{overdue}",
                fr * 100.0,
                self.cfg.failure_rate * 100.0,
                w.assessed()
            ));
        }
        if let Some(limit) = self.cfg.slow_call_rate {
            let sr = w.slow_rate();
            if sr > limit {
                return Some(format!(
                    "slow-call rate {:.1} % > {:.1} % over {} calls",
                    sr * 100.0,
                    limit * 100.0,
                    w.assessed()
                ));
            }
        }
        None
    }

    /// Calls a window needs before its failure rate can open the breaker: `min_requests`,
    /// or, while a degrade is enforced, the share of it the class admits (at least 1), so that
    /// a degraded class opens at about the offered rate a closed one does (overdue calls in
    /// flight count in every window they are overdue in, admitted or not, so a slow class
    /// with few calls opens sooner degraded than closed). With the whole of it, a
    /// class degraded to 20 % of 100 calls a second (10 a tick against 20) never opened: in a
    /// user's trial every admitted call failed for 80 s while it stayed degraded, and the
    /// predicted degrade that put it there was judged a false alarm.
    fn min_assessed(&self) -> u64 {
        if self.mode == Mode::Auto && matches!(self.phase, Phase::Degraded { .. }) {
            let share = self.cfg.min_requests as f64 * self.cfg.degraded_admit_fraction;
            (share.ceil() as u64).clamp(1, self.cfg.min_requests.max(1))
        } else {
            self.cfg.min_requests
        }
    }

    /// Advance one tick with the window that just closed.
    ///
    /// Returns the transition, if the state changed. Manual modes other than `MetricsOnly` do
    /// not step; `MetricsOnly` steps the shadow machine and reports its transitions with
    /// `enforced = false`.
    pub fn step(&mut self, w: &WindowSnapshot, now: Instant) -> Option<Transition> {
        self.step_predicted(w, None, now)
    }

    /// [`step`](Self::step) with the failure predictor's probability for this tick: while
    /// closed, `predict_ticks` consecutive ticks at or above `predict_threshold` degrade the
    /// class early, with the reason "predicted"; while degraded, a predicting tick is not a
    /// healthy one.
    pub fn step_predicted(
        &mut self,
        w: &WindowSnapshot,
        prediction: Option<f64>,
        now: Instant,
    ) -> Option<Transition> {
        if matches!(
            self.mode,
            Mode::ForcedOpen | Mode::Disabled | Mode::ManualDegraded
        ) {
            return None;
        }
        // A probability or nothing: a value that is not one (NaN, infinite, outside 0..=1
        // beyond a rounding error) is no prediction, as the predictor stage takes it.
        let prediction = prediction
            .filter(|p| (-1e-6..=1.0 + 1e-6).contains(p))
            .map(|p| p.clamp(0.0, 1.0));
        let from = self.phase.state();
        let threshold = self.predict_threshold();
        // A warning of earlier ticks is judged by this one.
        let watching = self.tally.watching();
        let breach = self.breach(w);
        self.tally.tick(breach, w.completed() > 0);
        if breach {
            self.unlearnt.clear();
            if watching
                && let Some(before) = self.floored.take()
                && let Some(c) = &mut self.calibrator
            {
                c.lift_floor(before);
                tracing::info!(
                    threshold = c.threshold().unwrap_or(1.0),
                    "a breach followed a predicted failure judged a false alarm: the floor put \
                     above its scores is lifted"
                );
            }
        }
        if !self.tally.watching() {
            // Confirmed, judged false, or dropped unjudged.
            self.floored = None;
        }
        let holds = self.holds_scores();
        // Whether this tick's score still reads an incident (ECHO_TICKS).
        let healthy_phase = matches!(self.phase, Phase::Closed | Phase::Degraded { .. });
        let echo = self.echo > 0 && !breach;
        // A run of breaches that began in an earlier incident's echo (the tick before it
        // healthy): a relapse, which a calibrated threshold could not warn of.
        if breach && self.echo != ECHO_TICKS {
            self.relapse = self.echo > 0;
        }
        self.echo = if breach || !healthy_phase {
            ECHO_TICKS
        } else {
            self.echo.saturating_sub(1)
        };
        // A calibrated warning that degraded the class, not confirmed yet, holds while its
        // scores stay above the class's usual ones (the 98th percentile of its healthy scores
        // as the calibration fits them, and a false alarm's scores while its floor holds),
        // not only over the threshold: a score hovering about the threshold (a slow leak's,
        // a user's trial) degraded the class in bursts of a few seconds, seven in two
        // minutes. It ends when the scores are back among the usual ones (or there is no
        // prediction), at a breach (which confirms it), or at the false-alarm exit.
        let warning = self.predicted >= self.predict_ticks
            && self.alarm.is_some()
            && matches!(
                self.phase,
                Phase::Degraded {
                    predicted: true,
                    ..
                }
            );
        // An echo does not predict with a calibrated threshold: its warning would be taken
        // for a false alarm, whose floor kept the class from being warned of a relapse for
        // an hour.
        let predicts = |p: f64| match &self.cfg.predict_threshold {
            PredictThreshold::Fixed(t) => p >= *t,
            PredictThreshold::Calibrated(_) => {
                !echo
                    && self
                        .calibrator
                        .as_ref()
                        .is_some_and(|c| c.exceeds(p) || (warning && c.above_usual(p)))
            }
        };
        self.predicted = match prediction {
            Some(p) if predicts(p) => self.predicted.saturating_add(1),
            _ => 0,
        };
        // A class serving calls without a breach, closed or degraded: a healthy tick, whose
        // score the calibrated threshold learns from, once no breach has followed it for
        // FALSE_ALARM_TICKS healthy ticks, and no warning waits for its verdict. Learnt at
        // once, a score that climbs towards a breach over a few ticks (a slow leak) lifts the
        // threshold ahead of itself tick by tick, and the class is never warned of it. A
        // warning's ticks are learnt too, once no breach confirmed it, the
        // one that raises it among them: no breach followed them, so they are the healthy
        // scores the threshold was crossed by, and a calibration that left them out would
        // learn a tail lighter than the class's and trip it over its budget (about twice,
        // measured: `docs/predictor-lodo.md`).
        if let (Some(c), Some(p)) = (&mut self.calibrator, prediction)
            && healthy_phase
            && !breach
            && w.completed() > 0
        {
            self.unlearnt.push_back((p, echo));
            while !holds
                && self.unlearnt.len() > FALSE_ALARM_TICKS as usize
                && let Some((p, echo)) = self.unlearnt.pop_front()
            {
                if echo {
                    c.observe_echo(p);
                } else {
                    c.observe(p);
                }
            }
        }
        if let Some(t) = self.false_alarm(w, breach, prediction) {
            return Some(t);
        }
        let (next, reason) = match self.next_phase(w, now) {
            Some(t) => {
                // A breach in an incident's echo, where a calibrated threshold cannot warn, is no
                // miss.
                let calibrated =
                    matches!(self.cfg.predict_threshold, PredictThreshold::Calibrated(_));
                if from == State::Closed
                    && prediction.is_some()
                    && threshold.is_some()
                    && !(calibrated && self.relapse)
                {
                    self.tally.breached(watching);
                }
                t
            }
            None if self.phase == Phase::Closed && self.predicted >= self.predict_ticks => {
                self.tally.warned(breach);
                // A warning in a breaching window came with the breach (late, in the record):
                // not a false alarm for the calibration to take back.
                if self.calibrator.is_some() && !breach {
                    let p = prediction.unwrap_or(0.0);
                    // Back within MERGE_GAP of the last warning: the same alarm, counted on.
                    self.alarm = Some(match self.alarm {
                        Some(a) => Alarm {
                            highest: a.highest.max(p),
                            quiet: 0,
                            ..a
                        },
                        None => Alarm {
                            unconfirmed: 0,
                            highest: p,
                            quiet: 0,
                        },
                    });
                }
                (
                    Phase::Degraded {
                        healthy: 0,
                        predicted: true,
                    },
                    {
                        let (p, t) =
                            probabilities(prediction.unwrap_or(0.0), threshold.unwrap_or(0.0));
                        format!("predicted: p = {p} >= {t} for {} ticks", self.predicted)
                    },
                )
            }
            None => return None,
        };
        self.phase = next;
        if next.state() == State::Closed {
            self.opens = 0;
        } else {
            // The degrade rule counts breaching windows in a row while closed: those before
            // the class left Closed (for a prediction, or opened) are not in a row with the
            // first after it closes again.
            self.breached = 0;
        }
        if !matches!(next.state(), State::Degraded | State::Closed) {
            self.alarm = None;
            self.ended = None;
        }
        Some(Transition {
            from,
            to: next.state(),
            reason,
            enforced: self.mode == Mode::Auto,
        })
    }

    /// A class degraded by a calibrated prediction that has stayed healthy for
    /// [`FALSE_ALARM_TICKS`] ticks since, degraded or closed again: a false alarm. The
    /// calibration puts its threshold above the alarm's scores and the class closes (if it
    /// has not); a breach or a trip on the way confirms the alarm.
    fn false_alarm(
        &mut self,
        w: &WindowSnapshot,
        breach: bool,
        prediction: Option<f64>,
    ) -> Option<Transition> {
        self.judge_ended(w, breach);
        let alarm = self.alarm?;
        let degraded = match self.phase {
            Phase::Degraded { .. } => true,
            Phase::Closed => false,
            _ => {
                self.alarm = None;
                return None;
            }
        };
        if breach {
            self.alarm = None;
            return None;
        }
        let quiet = if degraded { 0 } else { alarm.quiet + 1 };
        if quiet >= MERGE_GAP {
            // Its warnings ended and did not come back: it waits for its verdict apart, and a
            // later warning is an alarm of its own.
            self.ended = Some(match self.ended {
                Some(e) => Alarm {
                    unconfirmed: e.unconfirmed.max(alarm.unconfirmed),
                    highest: e.highest.max(alarm.highest),
                    quiet: 0,
                },
                None => alarm,
            });
            self.alarm = None;
            return None;
        }
        if w.completed() == 0 {
            // Nothing served, nothing shown either way.
            self.alarm = Some(Alarm { quiet, ..alarm });
            return None;
        }
        let alarm = Alarm {
            unconfirmed: alarm.unconfirmed + 1,
            highest: alarm.highest.max(prediction.unwrap_or(0.0)),
            quiet,
        };
        self.alarm = Some(alarm);
        if alarm.unconfirmed < FALSE_ALARM_TICKS {
            return None;
        }
        let c = self.calibrator.as_mut()?;
        put_floor(c, &mut self.floored, self.tally.watching(), alarm.highest);
        self.alarm = None;
        self.predicted = 0;
        if !degraded {
            // Closed already (between two of its warnings): its threshold is above the scores
            // it flapped at.
            tracing::info!(
                threshold = c.threshold().unwrap_or(1.0),
                highest = alarm.highest,
                "predicted failures not seen in {} healthy ticks of warnings that came and \
                 went: taken for a false alarm (a breach within the verdict still confirms \
                 it); the threshold is now above their scores",
                alarm.unconfirmed
            );
            return None;
        }
        let from = self.phase.state();
        self.phase = Phase::Closed;
        Some(Transition {
            from,
            to: State::Closed,
            reason: format!(
                "predicted failure not seen in {} healthy ticks: taken for a false alarm (a \
                 breach within the verdict still confirms it); the threshold is now {:.3}, \
                 above its p = {:.3}",
                alarm.unconfirmed,
                c.threshold().unwrap_or(1.0),
                alarm.highest
            ),
            enforced: self.mode == Mode::Auto,
        })
    }

    /// The verdict on an alarm whose warnings ended (`ended`): a breach confirms
    /// it; [`FALSE_ALARM_TICKS`] healthy ticks with calls after its first warning make it a
    /// false one, whose scores the threshold goes above.
    fn judge_ended(&mut self, w: &WindowSnapshot, breach: bool) {
        let Some(mut e) = self.ended.take() else {
            return;
        };
        if breach || !matches!(self.phase, Phase::Closed | Phase::Degraded { .. }) {
            return;
        }
        if w.completed() > 0 {
            e.unconfirmed += 1;
        }
        if e.unconfirmed < FALSE_ALARM_TICKS {
            self.ended = Some(e);
            return;
        }
        if let Some(c) = self.calibrator.as_mut() {
            put_floor(c, &mut self.floored, self.tally.watching(), e.highest);
            tracing::info!(
                threshold = c.threshold().unwrap_or(1.0),
                highest = e.highest,
                "predicted failure not seen in {} healthy ticks after its warning: taken for a \
                 false alarm (a breach within the verdict still confirms it); the threshold is \
                 now above its scores",
                e.unconfirmed
            );
        }
    }

    /// Whether the window breached: it trips the breaker or breaks the degrade rule.
    fn breach(&self, w: &WindowSnapshot) -> bool {
        self.trips(w).is_some() || self.cfg.degrade_rule.is_some_and(|r| r.breached(w))
    }

    fn next_phase(&mut self, w: &WindowSnapshot, now: Instant) -> Option<(Phase, String)> {
        let cfg = &self.cfg;
        match self.phase {
            Phase::Closed => {
                if let Some(why) = self.trips(w) {
                    return Some((self.open(now), why));
                }
                let rule = cfg.degrade_rule?;
                if rule.breached(w) {
                    self.breached += 1;
                } else {
                    self.breached = 0;
                }
                (self.breached >= rule.windows).then(|| {
                    self.breached = 0;
                    (
                        Phase::Degraded {
                            healthy: 0,
                            predicted: false,
                        },
                        format!(
                            "{} consecutive windows with success < {:.0} % and p99 > {} ms \
                             (last: {:.1} %, {} ms): {:.0} % of calls admitted, the rest to the \
                             class's fallback route",
                            rule.windows,
                            rule.success_below * 100.0,
                            rule.p99_above.as_millis(),
                            w.success_rate() * 100.0,
                            w.p99.as_millis(),
                            cfg.degraded_admit_fraction * 100.0
                        ),
                    )
                })
            }
            Phase::Open { until } => (now >= until).then(|| {
                (
                    Phase::HalfOpen {
                        since: now,
                        ok: 0,
                        failed: 0,
                    },
                    format!("open for {} ms", self.open_for().as_millis()),
                )
            }),
            Phase::HalfOpen { since, ok, failed } => {
                // The probes decide: calls admitted before the breaker opened that finish now
                // (a stalled dependency's, seconds late) say nothing of its recovery, and
                // once counted, reopened a class whose every probe had succeeded. A probe
                // answered slower than the class SLA has not shown a recovery (the
                // dependency answers, but too late for the callers).
                let (served, failures) = if self.mode == Mode::MetricsOnly {
                    // A dry run admits every call and hands out no probe: its shadow judges
                    // the window's calls. `slow` also counts abandoned calls, which are
                    // timeouts already.
                    let slow_ok = w.slow.saturating_sub(w.timeouts).min(w.successes);
                    (w.successes - slow_ok, w.errors + w.timeouts + slow_ok)
                } else {
                    (w.probe_successes, w.probe_failures)
                };
                let ok = ok + served;
                // A probe still running past the class's abandon threshold (overdue) has
                // failed to show a recovery as surely as one that timed out.
                let failed = failed + failures + w.overdue;
                let done = ok + failed;
                let probes = u64::from(cfg.half_open_probes);
                // Too many failed for the rest to make up, were they all to succeed: reopen
                // now, telling callers the open time, rather than turn them away as
                // `probes_exhausted` until the open duration (up to a minute) runs out.
                let hopeless = done < probes
                    && ((ok + probes - done) as f64 / probes as f64) < cfg.probe_success_rate;
                if done >= probes || hopeless {
                    let rate = ok as f64 / done as f64;
                    let verdict = format!("probes {ok}/{done} succeeded within the SLA");
                    if rate >= cfg.probe_success_rate {
                        let step = cfg.recovery_step;
                        return Some((
                            Phase::Recovering {
                                fraction: step,
                                good: 0,
                                ok: 0,
                                failed: 0,
                            },
                            verdict,
                        ));
                    }
                    return Some((self.open(now), verdict));
                }
                // Probes that have all succeeded so far, too few yet for a verdict, are a
                // quiet class (a call every few seconds), not a failing one: wait for the
                // rest. So is a class no call has come to (no probe finished or taken): idle,
                // not failing, its next call the probe. Giving up reopened it for longer each
                // time, so a class slower than the open duration missed every half-open
                // window, and an idle one stayed open for good. With none finished but some
                // running (they hang), or one failed, give up at the open duration. A dry run
                // hands out no probe: no call in flight is its idle.
                let untaken = if self.mode == Mode::MetricsOnly {
                    w.inflight <= 0
                } else {
                    w.probe_permits >= u64::from(cfg.half_open_probes)
                };
                let idle = done == 0 && untaken;
                // Idle, the open duration is counted from its first probe, not from the start
                // of the wait: that probe has it all to finish in.
                let since = if idle { now } else { since };
                let waiting = idle || (ok > 0 && failed == 0);
                let waited = now.saturating_duration_since(since);
                if !waiting && waited >= self.open_for() {
                    // Said before `open` lengthens the open duration.
                    let why = format!(
                        "probes unfinished after {} ms half-open ({ok}/{done} succeeded within \
                         the SLA)",
                        waited.as_millis()
                    );
                    return Some((self.open(now), why));
                }
                self.phase = Phase::HalfOpen { since, ok, failed };
                None
            }
            Phase::Recovering {
                fraction,
                good,
                ok,
                failed,
            } => {
                if w.assessed() == 0 {
                    return None;
                }
                // A tick is judged over at least `half_open_probes` calls: a quiet class's
                // tick with one failure among three calls is too little to reopen on, so its
                // calls are judged with the next tick's.
                let ok = ok + w.successes;
                let failed = failed + w.errors + w.timeouts + w.overdue;
                let done = ok + failed;
                let judged = done >= u64::from(cfg.half_open_probes);
                let fr = failed as f64 / done as f64;
                if judged && fr > 1.0 - cfg.probe_success_rate {
                    return Some((
                        self.open(now),
                        format!(
                            "recovering tick failed: failure rate {:.1} % over {done} calls",
                            fr * 100.0
                        ),
                    ));
                }
                let (good, fraction, ok, failed) = if judged {
                    (good + 1, fraction + cfg.recovery_step, 0, 0)
                } else if failed == 0 {
                    // Every call so far succeeded: a good tick, its calls kept for a verdict
                    // should a failure follow.
                    (good + 1, fraction + cfg.recovery_step, ok, failed)
                } else {
                    (good, fraction, ok, failed)
                };
                if good >= cfg.recovery_ticks {
                    return Some((Phase::Closed, format!("{good} good recovering ticks")));
                }
                self.phase = Phase::Recovering {
                    fraction: fraction.min(1.0),
                    good,
                    ok,
                    failed,
                };
                None
            }
            Phase::Degraded { healthy, predicted } => {
                if let Some(why) = self.trips(w) {
                    return Some((self.open(now), why));
                }
                let breached = cfg.degrade_rule.is_some_and(|r| r.breached(w));
                // A tick still predicted to fail is not a healthy one; a tick in which no
                // call completed (a quiet class, most of its calls diverted) shows nothing
                // either way: it neither counts nor starts the count again.
                let healthy = if breached || self.predicted > 0 {
                    0
                } else if w.completed() == 0 {
                    healthy
                } else {
                    healthy + 1
                };
                if healthy >= cfg.degraded_recovery_ticks {
                    return Some((Phase::Closed, format!("{healthy} healthy windows")));
                }
                self.phase = Phase::Degraded { healthy, predicted };
                None
            }
        }
    }
}

/// `p` and `threshold` with the decimals that tell them apart (at least 2, at most 6): a
/// calibrated threshold of 0.0046 read `0.02 >= 0.00`, one of 0.9995 `1.00 >= 1.00`.
fn probabilities(p: f64, threshold: f64) -> (String, String) {
    let mut digits = 2;
    loop {
        let (a, b) = (format!("{p:.digits$}"), format!("{threshold:.digits$}"));
        let significant = |s: &str| s.trim_start_matches(['0', '.']).len() >= 2;
        if digits == 6 || (a != b && significant(&b)) {
            return (a, b);
        }
        digits += 1;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_degrade_reason_s_probabilities_are_told_apart() {
        let shown = |p, t| super::probabilities(p, t);
        assert_eq!(shown(0.95, 0.87), ("0.95".into(), "0.87".into()));
        assert_eq!(shown(0.02, 0.0046), ("0.0200".into(), "0.0046".into()));
        assert_eq!(shown(0.9999, 0.9995), ("0.9999".into(), "0.9995".into()));
        assert_eq!(shown(0.5, 0.5), ("0.500000".into(), "0.500000".into()));
    }
}
