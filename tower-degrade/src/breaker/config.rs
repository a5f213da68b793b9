//! Breaker thresholds and timings.

use std::time::Duration;

use super::calibrate::{Calibration, PredictThreshold};
use crate::error::ConfigError;
use crate::window::WindowSnapshot;

/// The most half-open probes a breaker takes (`BreakerConfig::half_open_probes`).
const MAX_PROBES: u32 = 10_000;

/// The most ticks a count of ticks may be (`recovery_ticks`, `degraded_recovery_ticks`,
/// `predict_ticks`, `degrade_rule.windows`): 83 minutes at the 500 ms tick. More is a typo
/// or an overflow, and would switch the rule off without a word (a class `recovering` for 68
/// years at `u32::MAX`, in a hostile trial).
const MAX_TICKS: u32 = 10_000;

/// The longest warm-up of a calibrated threshold, in healthy ticks: a class keeps its warm-up's
/// scores (8 MB a class at this length) and sorts them once on the control tick when it ends,
/// the longer the more (a tick that overruns has every class's prediction of it read late and
/// not used).
const MAX_WARM_UP_TICKS: u32 = 1_000_000;

/// The most calls `min_requests` may ask of a tick: more than all but the largest services
/// serve a class in one; `u64::MAX` kept a class whose every call failed closed, in a trial.
const MAX_MIN_REQUESTS: u64 = 1_000_000;

/// The seed's degrade rule: `windows` consecutive windows with success rate below
/// `success_below` **and** p99 above `p99_above` degrade the class.
#[derive(Debug, Clone, Copy, PartialEq)]
#[must_use = "a setting or builder does nothing until it is passed on or built"]
pub struct DegradeRule {
    /// Consecutive windows required (seed: 3; 1 to 10,000).
    pub windows: u32,
    /// Success-rate floor (seed: 0.92).
    pub success_below: f64,
    /// p99 ceiling (seed: 800 ms).
    pub p99_above: Duration,
    /// Completed calls a window needs to count (default 1; at most 1,000,000).
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
    pub(crate) fn breached(&self, w: &WindowSnapshot) -> bool {
        w.assessed() >= self.min_requests
            && w.success_rate() < self.success_below
            && w.p99 > self.p99_above
    }
}

/// Breaker thresholds and timings. The defaults are SPEC 3.3's.
///
/// Set fields with the setters of the same name (the struct is `#[non_exhaustive]`, so
/// neither a literal nor struct-update syntax works outside this crate); every value is
/// checked when the degrader is built.
///
/// ```
/// use std::time::Duration;
/// use tower_degrade::breaker::BreakerConfig;
///
/// let cfg = BreakerConfig::default()
///     .min_requests(10)
///     .failure_rate(0.3)
///     .open_duration(Duration::from_secs(2));
/// assert_eq!(cfg.min_requests, 10);
/// assert!(cfg.validate().is_ok());
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
#[must_use = "a setting or builder does nothing until it is passed on or built"]
pub struct BreakerConfig {
    /// Calls a window must have assessed before its failure rate can open the breaker (20):
    /// completed calls and in-flight calls already [overdue](crate::window::WindowSnapshot::overdue)
    /// (a backlog the class cannot clear within its SLA), so a stalled dependency opens the
    /// breaker before any call completes. 1 to 1,000,000.
    pub min_requests: u64,
    /// Failure rate (errors, timeouts and overdue calls over assessed ones) above which the
    /// breaker opens (0.5; 1.0 turns this trip off, as no rate is above it).
    pub failure_rate: f64,
    /// Share of calls slower than the class SLA above which the breaker opens (off). Off, a
    /// dependency that answers slowly but successfully opens the breaker only while its calls
    /// in flight past the SLA (overdue) outnumber the calls completing: a backlog or a stall.
    /// Whether a steady slowness opens it depends on the load and on when the ticks fall, as
    /// each slow call is counted overdue once and completed once (in a trial, a gold class
    /// answering in 400 ms against its 50 ms stayed closed while a silver one at 400 ms
    /// against 200 ms opened at 55 %). Set it (`Some(0.5)`) for a class whose calls are worth
    /// refusing once they are late, so that slowness opens it whatever the timing.
    pub slow_call_rate: Option<f64>,
    /// The seed's degrade rule (on, with the seed's numbers).
    pub degrade_rule: Option<DegradeRule>,
    /// First open duration (5 s); doubled on each re-open, up to `max_open_duration`.
    pub open_duration: Duration,
    /// Cap of the open duration (60 s).
    pub max_open_duration: Duration,
    /// Probe calls admitted while half-open (5).
    pub half_open_probes: u32,
    /// Probe success rate needed to start recovering (0.8; above 0.0, at most 1.0). A probe
    /// that answers slower than the class SLA counts as failed: the dependency answers, but
    /// too late.
    pub probe_success_rate: f64,
    /// Fraction added to the admitted share per good recovering tick (0.25).
    pub recovery_step: f64,
    /// Consecutive good recovering ticks that close the breaker (3). A tick is judged over at
    /// least `half_open_probes` calls: a quieter tick's calls are judged with the next
    /// tick's (good meanwhile if they all succeeded). 1 to 10,000.
    pub recovery_ticks: u32,
    /// Share of a degraded class's calls still sent to the inner service (0.2; above 0.0: they
    /// are what shows the class healthy again).
    pub degraded_admit_fraction: f64,
    /// Consecutive healthy windows that lift an automatic degradation (3; 1 to 10,000).
    pub degraded_recovery_ticks: u32,
    /// The failure probability at or above which a tick counts as predicting: by default
    /// calibrated per class from its own healthy ticks at about one false trip a day, after a
    /// warm-up in which the predictor only reports; or fixed by hand (the seed's 0.87). Only
    /// used when a predictor is attached.
    pub predict_threshold: PredictThreshold,
    /// Consecutive predicting ticks that degrade a closed class early, reason "predicted";
    /// `None` (the default): as many as make up [`PREDICT_HOLD`] at the degrader's tick, 2 at
    /// the default 500 ms tick, 1 at a tick of a second or longer
    /// ([`predict_ticks_at`](Self::predict_ticks_at)). 1 to 10,000.
    pub predict_ticks: Option<u32>,
    /// Whether the predictor only reports for this class (off): a trial of it beside the
    /// breaker's own rules, which stay in force. A shadow of the breaker, stepped with the
    /// predictions, warns, calibrates and keeps the
    /// [`prediction_record`](crate::degrader::ClassStatus::prediction_record) (its state is the
    /// status's `shadow_state`, its transitions are reported as not enforced), while the
    /// class itself is degraded, opened and closed by its rules alone (policies still see
    /// the prediction, `ctx.prediction`). A manual command other than `MetricsOnly` pauses
    /// the trial as it does the breaker; a reset resets both. Only used when a predictor is
    /// attached (a warning is logged at build otherwise).
    pub predict_shadow: bool,
}

/// How long a prediction must hold before it degrades a class, where
/// [`BreakerConfig::predict_ticks`] is not set: a second, 2 ticks at the default 500 ms tick.
/// A 500 ms window of a few calls scores high for a tick now and then for nothing (a slow
/// call or two); a window of a minute's calls does not, and a warning held back a tick
/// there comes a minute late. In the leave-one-dataset-out evaluation (four seeds, minute
/// steps), one tick at the minute step warned of about twice the incidents that two did,
/// within the false-trip budget; at the 500 ms step two ticks warned of one more (17 against
/// 16), at as few or fewer false trips (`docs/predictor-lodo.md`).
pub const PREDICT_HOLD: Duration = Duration::from_secs(1);

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
            predict_threshold: PredictThreshold::default(),
            predict_ticks: None,
            predict_shadow: false,
        }
    }
}

impl BreakerConfig {
    /// Calls (completed, or overdue in flight) a window needs before its failure rate can
    /// open the breaker (20). A window is one tick (500 ms by default), so with the default a
    /// class under 40 calls a second is never opened by errors alone (overdue calls still
    /// open it): give a low-rate class a lower value, such as `min_requests(3)`. While a
    /// degrade is enforced, the share of it the class admits is needed (4 of 20 at the default
    /// 20 %, at least 1): about the offered rate a closed class opens at. 1 to 1,000,000.
    pub fn min_requests(mut self, value: u64) -> Self {
        self.min_requests = value;
        self
    }

    /// Failure rate (errors, timeouts and overdue calls over assessed ones) above which the
    /// breaker opens (0.5; 1.0 turns this trip off, as no rate is above it).
    pub fn failure_rate(mut self, value: f64) -> Self {
        self.failure_rate = value;
        self
    }

    /// Share of calls slower than the class SLA above which the breaker opens (off: a
    /// steady slowness then opens it only as a backlog, the field's docs say when).
    pub fn slow_call_rate(mut self, value: Option<f64>) -> Self {
        self.slow_call_rate = value;
        self
    }

    /// The seed's degrade rule (on, with the seed's numbers).
    pub fn degrade_rule(mut self, value: Option<DegradeRule>) -> Self {
        self.degrade_rule = value;
        self
    }

    /// First open duration (5 s); doubled on each re-open, up to `max_open_duration`.
    pub fn open_duration(mut self, value: Duration) -> Self {
        self.open_duration = value;
        self
    }

    /// Cap of the open duration (60 s).
    pub fn max_open_duration(mut self, value: Duration) -> Self {
        self.max_open_duration = value;
        self
    }

    /// Probe calls admitted while half-open (5). The verdict waits for all of them; if the
    /// open duration passes with none finished but some running, or one failed (an error, a
    /// timeout, slower than the SLA, or still running past the abandon threshold), the
    /// breaker opens again. A class no call comes to (no probe taken) waits half-open: its
    /// next call is the probe, with the open duration to finish in. With a
    /// fallback router (`fallback::FallbackRouter`) keeping the class's calls, its worker
    /// replays one kept task a tick as a probe besides these, counted in the verdict (a log's
    /// "probes 0/3" of a class of 2: `docs/fallback.md`, *Spool and backfill*).
    pub fn half_open_probes(mut self, value: u32) -> Self {
        self.half_open_probes = value;
        self
    }

    /// Probe success rate needed to start recovering (0.8; above 0.0, at most 1.0); a probe
    /// slower than the class SLA counts as failed.
    pub fn probe_success_rate(mut self, value: f64) -> Self {
        self.probe_success_rate = value;
        self
    }

    /// Fraction added to the admitted share per good recovering tick (0.25).
    pub fn recovery_step(mut self, value: f64) -> Self {
        self.recovery_step = value;
        self
    }

    /// Consecutive good recovering ticks that close the breaker (3). A tick is judged over at
    /// least `half_open_probes` calls: a quieter tick's calls are judged with the next
    /// tick's (good meanwhile if they all succeeded), so one failure among three calls does
    /// not reopen the breaker. 1 to 10,000.
    pub fn recovery_ticks(mut self, value: u32) -> Self {
        self.recovery_ticks = value;
        self
    }

    /// Share of a degraded class's calls still sent to the inner service (0.2; above 0.0: they
    /// are what shows the class healthy again).
    pub fn degraded_admit_fraction(mut self, value: f64) -> Self {
        self.degraded_admit_fraction = value;
        self
    }

    /// Consecutive healthy windows that lift an automatic degradation (3; 1 to 10,000).
    pub fn degraded_recovery_ticks(mut self, value: u32) -> Self {
        self.degraded_recovery_ticks = value;
        self
    }

    /// A fixed failure probability at or above which a tick counts as predicting, the same
    /// for every class (the seed's 0.87), instead of the calibrated default. Only used when a
    /// predictor is attached.
    pub fn predict_threshold(mut self, value: f64) -> Self {
        self.predict_threshold = PredictThreshold::Fixed(value);
        self
    }

    /// Calibrate the threshold per class with these settings (the default, with
    /// `Calibration::default()`: one false trip a day, 3,600 healthy scores learnt as warm-up).
    pub fn predict_calibrated(mut self, calibration: Calibration) -> Self {
        self.predict_threshold = PredictThreshold::Calibrated(calibration);
        self
    }

    /// Consecutive predicting ticks that degrade a closed class early, reason "predicted"
    /// (by default those of [`PREDICT_HOLD`]: 2 at the default 500 ms tick). The seed's
    /// operating point is `predict_threshold(0.87).predict_ticks(2)`. 1 to 10,000.
    pub fn predict_ticks(mut self, value: u32) -> Self {
        self.predict_ticks = Some(value);
        self
    }

    /// Run the predictor as a trial for this class (`true`): it warns, calibrates and keeps
    /// its record in a shadow of the breaker, and degrades nothing; the breaker's own rules
    /// stay in force (the `predict_shadow` field says how). The first step
    /// `docs/predictor.md` suggests, before letting it degrade a class.
    pub fn predict_shadow(mut self, value: bool) -> Self {
        self.predict_shadow = value;
        self
    }

    /// The consecutive predicting ticks that degrade a class at a control loop ticking every
    /// `tick`: [`predict_ticks`](Self::predict_ticks) where set, else the ticks that make up
    /// [`PREDICT_HOLD`], rounded up, at least 1.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_degrade::breaker::BreakerConfig;
    ///
    /// let cfg = BreakerConfig::default();
    /// assert_eq!(cfg.predict_ticks_at(Duration::from_millis(500)), 2);
    /// assert_eq!(cfg.predict_ticks_at(Duration::from_secs(60)), 1);
    /// assert_eq!(cfg.predict_ticks(3).predict_ticks_at(Duration::from_secs(60)), 3);
    /// ```
    pub fn predict_ticks_at(&self, tick: Duration) -> u32 {
        self.predict_ticks.unwrap_or_else(|| {
            let tick = tick.as_nanos().max(1);
            let ticks = PREDICT_HOLD.as_nanos().div_ceil(tick).max(1);
            u32::try_from(ticks).unwrap_or(u32::MAX)
        })
    }

    /// Check every field, naming the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field: &'static str, reason: &str| {
            Err(ConfigError::InvalidValue {
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
        if !(self.probe_success_rate > 0.0 && self.probe_success_rate <= 1.0) {
            return bad(
                "breaker.probe_success_rate",
                "must be above 0.0 and at most 1.0: at 0.0 a class whose probes all fail \
                 recovers, and closes again on a dependency that is still down",
            );
        }
        if !(self.recovery_step > 0.0 && self.recovery_step <= 1.0) {
            return bad("breaker.recovery_step", "must be within (0.0, 1.0]");
        }
        if !(self.degraded_admit_fraction > 0.0 && self.degraded_admit_fraction <= 1.0) {
            return bad(
                "breaker.degraded_admit_fraction",
                "must be above 0.0 and at most 1.0: a degraded class that admits none of its \
                 calls has none to show it healthy again, and stays degraded until reset by \
                 hand (divert a whole class with a policy's `fallback(..)` or `force_open`)",
            );
        }
        match self.predict_threshold {
            PredictThreshold::Fixed(t) if !(unit(t) && t > 0.0) => {
                return bad(
                    "breaker.predict_threshold",
                    if unit(t) {
                        "must be above 0.0: at 0.0 every tick predicts failure, and every class is \
                         degraded for good"
                    } else {
                        "must be above 0.0 and at most 1.0: it is compared with a probability"
                    },
                );
            }
            PredictThreshold::Calibrated(c)
                if !(c.false_trips_per_day.is_finite() && c.false_trips_per_day > 0.0) =>
            {
                return bad(
                    "breaker.predict_threshold.false_trips_per_day",
                    "must be a positive number",
                );
            }
            PredictThreshold::Calibrated(c) if c.warm_up_ticks == 0 => {
                return bad(
                    "breaker.predict_threshold.warm_up_ticks",
                    "must be at least 1 (a value below 2,500 is raised to 2,500, so that the \
                     first fit has 50 excesses)",
                );
            }
            PredictThreshold::Calibrated(c) if c.warm_up_ticks > MAX_WARM_UP_TICKS => {
                return bad(
                    "breaker.predict_threshold.warm_up_ticks",
                    "must be at most 1,000,000 (5.8 days at the 500 ms tick): the predictor \
                     only reports until the warm-up is over, and it keeps the warm-up's \
                     scores",
                );
            }
            _ => {}
        }
        if self.min_requests == 0 {
            return bad(
                "breaker.min_requests",
                "must be at least 1: one failed call would open the breaker",
            );
        }
        if self.min_requests > MAX_MIN_REQUESTS {
            return bad(
                "breaker.min_requests",
                "must be at most 1,000,000: a class that never serves as many calls in a \
                 tick is never opened by its failures",
            );
        }
        let ticks = |v: u32| (1..=MAX_TICKS).contains(&v);
        const TICKS: &str = "must be 1 to 10,000 ticks";
        if !ticks(self.recovery_ticks) {
            return bad("breaker.recovery_ticks", TICKS);
        }
        if !ticks(self.degraded_recovery_ticks) {
            return bad("breaker.degraded_recovery_ticks", TICKS);
        }
        if self.predict_ticks.is_some_and(|v| !ticks(v)) {
            return bad("breaker.predict_ticks", TICKS);
        }
        if self.half_open_probes == 0 || self.half_open_probes > MAX_PROBES {
            return bad(
                "breaker.half_open_probes",
                "must be 1 to 10,000: probes decide within a tick or two",
            );
        }
        if self.open_duration.is_zero() || self.max_open_duration < self.open_duration {
            return bad(
                "breaker.open_duration",
                "must be non-zero and at most max_open_duration",
            );
        }
        if self.max_open_duration > crate::error::MAX_DURATION {
            return bad("breaker.max_open_duration", "must be at most a day");
        }
        if let Some(rule) = &self.degrade_rule {
            if !ticks(rule.windows) {
                return bad("breaker.degrade_rule.windows", TICKS);
            }
            if rule.min_requests > MAX_MIN_REQUESTS {
                return bad(
                    "breaker.degrade_rule.min_requests",
                    "must be at most 1,000,000: a class that never completes as many calls in \
                     a tick is never degraded by the rule",
                );
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

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(cfg: BreakerConfig) -> (&'static str, String) {
        match cfg.validate() {
            Err(ConfigError::InvalidValue { field, reason }) => (field, reason),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn counts_that_would_switch_a_rule_off_are_refused() {
        // Each was taken, in a hostile trial, and quietly turned a rule off: probes that all
        // fail "succeeding", a class never opened, one recovering for 68 years.
        let cases = [
            (
                BreakerConfig::default().probe_success_rate(0.0),
                "breaker.probe_success_rate",
            ),
            (
                BreakerConfig::default().min_requests(u64::MAX),
                "breaker.min_requests",
            ),
            (
                BreakerConfig::default().recovery_ticks(u32::MAX),
                "breaker.recovery_ticks",
            ),
            (
                BreakerConfig::default().degraded_recovery_ticks(10_001),
                "breaker.degraded_recovery_ticks",
            ),
            (
                BreakerConfig::default().predict_ticks(u32::MAX),
                "breaker.predict_ticks",
            ),
            (
                BreakerConfig::default().degrade_rule(Some(DegradeRule {
                    windows: u32::MAX,
                    ..DegradeRule::default()
                })),
                "breaker.degrade_rule.windows",
            ),
            (
                BreakerConfig::default().degrade_rule(Some(DegradeRule {
                    min_requests: u64::MAX,
                    ..DegradeRule::default()
                })),
                "breaker.degrade_rule.min_requests",
            ),
            (
                BreakerConfig::default().degraded_admit_fraction(0.0),
                "breaker.degraded_admit_fraction",
            ),
            (
                BreakerConfig::default().predict_calibrated(
                    crate::breaker::Calibration::default().warm_up_ticks(u32::MAX),
                ),
                "breaker.predict_threshold.warm_up_ticks",
            ),
        ];
        for (cfg, field) in cases {
            assert_eq!(refused(cfg).0, field);
        }
        let most = BreakerConfig::default()
            .probe_success_rate(1e-3)
            .min_requests(1_000_000)
            .recovery_ticks(10_000)
            .degraded_recovery_ticks(10_000)
            .predict_ticks(10_000);
        assert!(most.validate().is_ok());
    }

    #[test]
    fn a_fixed_threshold_that_every_tick_meets_is_refused() {
        for t in [0.0, -0.1, 1.5, f64::NAN] {
            let (field, reason) = refused(BreakerConfig::default().predict_threshold(t));
            assert_eq!(field, "breaker.predict_threshold", "{t}");
            // Each told of the bound it is past (1.5 was told what 0.0 does).
            let why = if t == 0.0 {
                "must be above 0.0: at 0.0 every tick predicts failure"
            } else {
                "must be above 0.0 and at most 1.0: it is compared with a probability"
            };
            assert!(reason.starts_with(why), "{t}: {reason}");
        }
        for t in [1e-3, 0.87, 1.0] {
            assert!(
                BreakerConfig::default()
                    .predict_threshold(t)
                    .validate()
                    .is_ok()
            );
        }
    }

    #[test]
    fn the_calibrations_settings_are_checked_and_the_warm_ups_least_is_said() {
        let cal = |c: Calibration| BreakerConfig::default().predict_calibrated(c);
        for v in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let (field, _) = refused(cal(Calibration::default().false_trips_per_day(v)));
            assert_eq!(
                field, "breaker.predict_threshold.false_trips_per_day",
                "{v}"
            );
        }
        let (field, reason) = refused(cal(Calibration::default().warm_up_ticks(0)));
        assert_eq!(field, "breaker.predict_threshold.warm_up_ticks");
        assert!(reason.contains("raised to 2,500"), "{reason}");
        assert!(
            cal(Calibration::default().warm_up_ticks(1))
                .validate()
                .is_ok()
        );
        assert_eq!(
            refused(BreakerConfig::default().predict_ticks(0)).0,
            "breaker.predict_ticks"
        );
    }
}
