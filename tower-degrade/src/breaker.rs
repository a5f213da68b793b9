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

use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

use crate::class::Route;
use crate::directive::{Directive, Reason};
use crate::window::WindowSnapshot;

/// A breaker state. *Closed* means traffic flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum State {
    /// Every call is admitted.
    Closed,
    /// No call is admitted until the open duration elapses.
    Open,
    /// A fixed number of probe calls is admitted.
    HalfOpen,
    /// A growing fraction of calls is admitted (slow start).
    Recovering,
    /// A share of calls goes to the fallback route while the rest stays observable.
    Degraded,
    /// Open, set by hand; stays until reset.
    ForcedOpen,
    /// The breaker is off: every call is admitted, metrics are still recorded.
    Disabled,
    /// Dry run: the breaker decides and reports, but every call is admitted.
    MetricsOnly,
}

impl State {
    const ALL: [State; 8] = [
        State::Closed,
        State::Open,
        State::HalfOpen,
        State::Recovering,
        State::Degraded,
        State::ForcedOpen,
        State::Disabled,
        State::MetricsOnly,
    ];

    /// The state's name as used in metrics and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
            State::Recovering => "recovering",
            State::Degraded => "degraded",
            State::ForcedOpen => "forced_open",
            State::Disabled => "disabled",
            State::MetricsOnly => "metrics_only",
        }
    }

    /// The numeric value exported by the `degrade_breaker_state` gauge (the index in the
    /// declaration order: closed = 0 … metrics_only = 7).
    pub fn as_gauge(self) -> f64 {
        State::ALL.iter().position(|s| *s == self).unwrap_or(0) as f64
    }

    /// The breaker component of the health score, 0.0 (not serving) to 1.0 (healthy).
    pub const fn health(self) -> f64 {
        match self {
            State::Closed | State::Disabled | State::MetricsOnly => 1.0,
            State::Recovering => 0.75,
            State::Degraded | State::HalfOpen => 0.5,
            State::Open | State::ForcedOpen => 0.0,
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The seed's degrade rule: `windows` consecutive windows with success rate below
/// `success_below` **and** p99 above `p99_above` degrade the class.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DegradeRule {
    /// Consecutive windows required (seed: 3).
    pub windows: u32,
    /// Success-rate floor (seed: 0.92).
    pub success_below: f64,
    /// p99 ceiling (seed: 800 ms).
    pub p99_above: Duration,
    /// Completed calls a window needs to count (default 1).
    pub min_requests: u64,
}

impl Default for DegradeRule {
    fn default() -> Self {
        Self {
            windows: 3,
            success_below: 0.92,
            p99_above: Duration::from_millis(800),
            min_requests: 1,
        }
    }
}

impl DegradeRule {
    fn breached(&self, w: &WindowSnapshot) -> bool {
        w.completed() >= self.min_requests
            && w.success_rate() < self.success_below
            && w.p99 > self.p99_above
    }
}

/// Breaker thresholds and timings. The defaults are SPEC 3.3's.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct BreakerConfig {
    /// Completed calls a window needs before its failure rate can open the breaker (20).
    pub min_requests: u64,
    /// Failure rate (errors + timeouts over completed) above which the breaker opens (0.5).
    pub failure_rate: f64,
    /// Share of calls slower than the class SLA above which the breaker opens (off).
    pub slow_call_rate: Option<f64>,
    /// The seed's degrade rule (on, with the seed's numbers).
    pub degrade_rule: Option<DegradeRule>,
    /// First open duration (5 s); doubled on each re-open, up to `max_open_duration`.
    pub open_duration: Duration,
    /// Cap of the open duration (60 s).
    pub max_open_duration: Duration,
    /// Probe calls admitted while half-open (5).
    pub half_open_probes: u32,
    /// Probe success rate needed to start recovering (0.8).
    pub probe_success_rate: f64,
    /// Fraction added to the admitted share per good recovering tick (0.25).
    pub recovery_step: f64,
    /// Consecutive good recovering ticks that close the breaker (3).
    pub recovery_ticks: u32,
    /// Share of a degraded class's calls still sent to the inner service (0.2).
    pub degraded_admit_fraction: f64,
    /// Consecutive healthy windows that lift an automatic degradation (3).
    pub degraded_recovery_ticks: u32,
    /// Predicted failure probability at or above which a tick counts as predicting (0.87, the
    /// seed's threshold). Only used when a predictor is attached.
    pub predict_threshold: f64,
    /// Consecutive predicting ticks that degrade a closed class early, reason "predicted" (2).
    pub predict_ticks: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            min_requests: 20,
            failure_rate: 0.5,
            slow_call_rate: None,
            degrade_rule: Some(DegradeRule::default()),
            open_duration: Duration::from_secs(5),
            max_open_duration: Duration::from_secs(60),
            half_open_probes: 5,
            probe_success_rate: 0.8,
            recovery_step: 0.25,
            recovery_ticks: 3,
            degraded_admit_fraction: 0.2,
            degraded_recovery_ticks: 3,
            predict_threshold: 0.87,
            predict_ticks: 2,
        }
    }
}

impl BreakerConfig {
    /// Check every field, naming the first bad one.
    pub fn validate(&self) -> Result<(), crate::ConfigError> {
        let bad = |field: &'static str, reason: &str| {
            Err(crate::ConfigError::InvalidValue {
                field,
                reason: reason.to_owned(),
            })
        };
        let unit = |v: f64| (0.0..=1.0).contains(&v);
        if !unit(self.failure_rate) {
            return bad("breaker.failure_rate", "must be within 0.0..=1.0");
        }
        if self.slow_call_rate.is_some_and(|v| !unit(v)) {
            return bad("breaker.slow_call_rate", "must be within 0.0..=1.0");
        }
        if !unit(self.probe_success_rate) {
            return bad("breaker.probe_success_rate", "must be within 0.0..=1.0");
        }
        if !(self.recovery_step > 0.0 && self.recovery_step <= 1.0) {
            return bad("breaker.recovery_step", "must be within (0.0, 1.0]");
        }
        if !unit(self.degraded_admit_fraction) {
            return bad(
                "breaker.degraded_admit_fraction",
                "must be within 0.0..=1.0",
            );
        }
        if !unit(self.predict_threshold) {
            return bad("breaker.predict_threshold", "must be within 0.0..=1.0");
        }
        if self.predict_ticks == 0 {
            return bad("breaker.predict_ticks", "must be at least 1");
        }
        if self.half_open_probes == 0 {
            return bad("breaker.half_open_probes", "must be at least 1");
        }
        if self.open_duration.is_zero() || self.max_open_duration < self.open_duration {
            return bad(
                "breaker.open_duration",
                "must be non-zero and at most max_open_duration",
            );
        }
        if let Some(rule) = &self.degrade_rule {
            if rule.windows == 0 {
                return bad("breaker.degrade_rule.windows", "must be at least 1");
            }
            if !unit(rule.success_below) {
                return bad(
                    "breaker.degrade_rule.success_below",
                    "must be within 0.0..=1.0",
                );
            }
        }
        Ok(())
    }
}

/// A manual command, from an admin endpoint or an operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Command {
    /// Admit nothing until reset.
    ForceOpen,
    /// Admit everything until reset (the breaker is disabled).
    ForceClosed,
    /// Degrade the class until reset.
    Degrade,
    /// Decide and report, enforce nothing, until reset.
    MetricsOnly,
    /// Back to automatic control, closed, with counters cleared.
    Reset,
}

impl Command {
    const ALL: [(Command, &'static str); 5] = [
        (Command::ForceOpen, "force_open"),
        (Command::ForceClosed, "force_closed"),
        (Command::Degrade, "degrade"),
        (Command::MetricsOnly, "metrics_only"),
        (Command::Reset, "reset"),
    ];

    /// The command's name, as parsed by [`str::parse`].
    pub fn as_str(self) -> &'static str {
        Command::ALL
            .iter()
            .find(|(c, _)| *c == self)
            .map_or("reset", |(_, n)| n)
    }
}

/// Parses `force_open`, `force_closed`, `degrade`, `metrics_only` or `reset` (for admin
/// endpoints).
///
/// ```
/// use tower_degrade::Command;
///
/// assert_eq!("force_open".parse::<Command>(), Ok(Command::ForceOpen));
/// assert!("explode".parse::<Command>().unwrap_err().to_string().contains("force_open"));
/// ```
impl std::str::FromStr for Command {
    type Err = UnknownCommand;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Command::ALL
            .iter()
            .find(|(_, n)| *n == s)
            .map(|(c, _)| *c)
            .ok_or_else(|| UnknownCommand(s.chars().take(64).collect()))
    }
}

/// A string that names no [`Command`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownCommand(String);

impl fmt::Display for UnknownCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown command `{}`: expected one of ", self.0)?;
        let names: Vec<_> = Command::ALL.iter().map(|(_, n)| *n).collect();
        f.write_str(&names.join(", "))
    }
}

impl std::error::Error for UnknownCommand {}

/// A state change and why it happened.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    /// The state before.
    pub from: State,
    /// The state after.
    pub to: State,
    /// Why, in words (with the numbers that decided it).
    pub reason: String,
    /// False when the transition happened in the shadow machine of a `MetricsOnly` breaker.
    pub enforced: bool,
}

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
    },
    Degraded {
        healthy: u32,
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
}

impl Breaker {
    /// A closed breaker sending calls it does not admit to `route`.
    pub fn new(cfg: BreakerConfig, route: Route) -> Self {
        Self {
            cfg,
            route,
            phase: Phase::Closed,
            mode: Mode::Auto,
            opens: 0,
            breached: 0,
            predicted: 0,
        }
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
            Phase::Degraded { .. } => Directive::AdmitFraction {
                fraction: self.cfg.degraded_admit_fraction,
                reason: Reason::Degraded,
                route,
                retry_after: None,
            },
        }
    }

    /// Apply a manual command.
    pub fn command(&mut self, cmd: Command) -> Option<Transition> {
        let from = self.state();
        self.mode = match cmd {
            Command::ForceOpen => Mode::ForcedOpen,
            Command::ForceClosed => Mode::Disabled,
            Command::Degrade => Mode::ManualDegraded,
            Command::MetricsOnly => Mode::MetricsOnly,
            Command::Reset => {
                self.phase = Phase::Closed;
                self.opens = 0;
                self.breached = 0;
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
        if w.completed() < self.cfg.min_requests {
            return None;
        }
        let fr = w.failure_rate();
        if fr > self.cfg.failure_rate {
            return Some(format!(
                "failure rate {:.1} % > {:.1} % over {} calls",
                fr * 100.0,
                self.cfg.failure_rate * 100.0,
                w.completed()
            ));
        }
        if let Some(limit) = self.cfg.slow_call_rate {
            let sr = w.slow_rate();
            if sr > limit {
                return Some(format!(
                    "slow-call rate {:.1} % > {:.1} % over {} calls",
                    sr * 100.0,
                    limit * 100.0,
                    w.completed()
                ));
            }
        }
        None
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
        let from = self.phase.state();
        self.predicted = match prediction {
            Some(p) if p >= self.cfg.predict_threshold => self.predicted.saturating_add(1),
            _ => 0,
        };
        let (next, reason) = match self.next_phase(w, now) {
            Some(t) => t,
            None if self.phase == Phase::Closed && self.predicted >= self.cfg.predict_ticks => (
                Phase::Degraded { healthy: 0 },
                format!(
                    "predicted: p = {:.2} >= {:.2} for {} ticks",
                    prediction.unwrap_or(0.0),
                    self.cfg.predict_threshold,
                    self.predicted
                ),
            ),
            None => return None,
        };
        self.phase = next;
        if next.state() == State::Closed {
            self.opens = 0;
        }
        Some(Transition {
            from,
            to: next.state(),
            reason,
            enforced: self.mode == Mode::Auto,
        })
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
                        Phase::Degraded { healthy: 0 },
                        format!(
                            "{} consecutive windows with success < {:.0} % and p99 > {} ms \
                             (last: {:.1} %, {} ms): delayed retry + alert",
                            rule.windows,
                            rule.success_below * 100.0,
                            rule.p99_above.as_millis(),
                            w.success_rate() * 100.0,
                            w.p99.as_millis()
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
                let ok = ok + w.successes;
                let failed = failed + w.errors + w.timeouts;
                let done = ok + failed;
                if done >= u64::from(cfg.half_open_probes) {
                    let rate = ok as f64 / done as f64;
                    if rate >= cfg.probe_success_rate {
                        let step = cfg.recovery_step;
                        return Some((
                            Phase::Recovering {
                                fraction: step,
                                good: 0,
                            },
                            format!("probes {ok}/{done} succeeded"),
                        ));
                    }
                    return Some((self.open(now), format!("probes {ok}/{done} succeeded")));
                }
                if now.saturating_duration_since(since) >= self.open_for() {
                    return Some((
                        self.open(now),
                        format!(
                            "probes unfinished after {} ms ({ok}/{done})",
                            self.open_for().as_millis()
                        ),
                    ));
                }
                self.phase = Phase::HalfOpen { since, ok, failed };
                None
            }
            Phase::Recovering { fraction, good } => {
                if w.completed() == 0 {
                    return None;
                }
                let fr = w.failure_rate();
                if fr > 1.0 - cfg.probe_success_rate {
                    return Some((
                        self.open(now),
                        format!("recovering tick failed: failure rate {:.1} %", fr * 100.0),
                    ));
                }
                let good = good + 1;
                if good >= cfg.recovery_ticks {
                    return Some((Phase::Closed, format!("{good} good recovering ticks")));
                }
                self.phase = Phase::Recovering {
                    fraction: (fraction + cfg.recovery_step).min(1.0),
                    good,
                };
                None
            }
            Phase::Degraded { healthy } => {
                if let Some(why) = self.trips(w) {
                    return Some((self.open(now), why));
                }
                let breached = cfg.degrade_rule.is_some_and(|r| r.breached(w));
                // A tick still predicted to fail is not a healthy one.
                let healthy = if breached || self.predicted > 0 || w.completed() == 0 {
                    0
                } else {
                    healthy + 1
                };
                if healthy >= cfg.degraded_recovery_ticks {
                    return Some((Phase::Closed, format!("{healthy} healthy windows")));
                }
                self.phase = Phase::Degraded { healthy };
                None
            }
        }
    }
}
