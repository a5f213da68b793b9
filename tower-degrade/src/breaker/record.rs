//! The predictor's record on a class: how its warnings turned out, so that a user can see on
//! their own service, not only in an evaluation on other data, whether it earns its place.

use super::FALSE_ALARM_TICKS;

/// How a class's predictions turned out, counted by its breaker since the degrader started
/// (a trial's, with [`predict_shadow`](super::BreakerConfig::predict_shadow): the shadow
/// stepped with the predictions while the rules alone act; the shadow machine's in
/// `MetricsOnly`). `ClassStatus` and the admin API show it; `degrade_predictions_total`
/// counts it by `result`.
///
/// A *warning* is the breaker degrading the class for a prediction; warnings that follow one
/// another before a verdict are one, from the first. It is **confirmed** when the class
/// breaches (a window that trips the breaker or breaks the degrade rule) before
/// [`verdict_ticks`](super::verdict_ticks) ticks with calls served have passed (five minutes'
/// worth, at least [`FALSE_ALARM_TICKS`]: a slow leak breaches minutes after the warning), and
/// a **false alarm** otherwise; the **lead** is the ticks from the warning to that first
/// breach. (A warning on a class too quiet to judge, with fewer ticks served than that in
/// [`UNJUDGED_VERDICTS`] times as many ticks, gets no verdict.)
/// A breach that opens or degrades a closed class with no warning before it, while the
/// predictor could warn (answering, its threshold set: fixed, or calibrated), was **missed**; so was one the
/// warning came in the same window as, late. A breach within [`FALSE_ALARM_TICKS`] ticks of
/// one already counted is the same incident. A warning that degraded the class in time may
/// have averted the breach it foresaw, and then counts as a false alarm: the record of a
/// trial (or of a class in `MetricsOnly`) is the unbiased one. A manual command other than
/// `MetricsOnly` drops a warning waiting for its verdict (a trial's too).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PredictionRecord {
    /// Warnings a breach followed.
    pub confirmed: u64,
    /// Warnings no breach followed.
    pub false_alarms: u64,
    /// Breaches of a closed class the predictor could have warned of and did not in time.
    pub missed: u64,
    /// Ticks from the last confirmed warning to its breach.
    pub last_lead_ticks: Option<u32>,
}

/// After this many times its verdict's ticks, a warning still without a verdict (its class
/// served calls in too few of them) is dropped.
pub const UNJUDGED_VERDICTS: u32 = 8;

/// A warning waiting for its verdict: the ticks since it, and those with calls served.
#[derive(Debug, Clone, Copy)]
struct Watch {
    ticks: u32,
    served: u32,
}

/// What a breaker keeps to write its [`PredictionRecord`].
#[derive(Debug, Clone)]
pub(crate) struct Tally {
    /// Ticks with calls served after which a warning with no breach is a false alarm.
    verdict: u32,
    record: PredictionRecord,
    watch: Option<Watch>,
    /// Ticks left in which a breach belongs to the incident last counted (confirmed or
    /// missed), not a new one.
    covered: u32,
}

impl Tally {
    /// A tally judging a warning after `verdict` ticks with calls served.
    pub(crate) fn new(verdict: u32) -> Self {
        Self {
            verdict,
            record: PredictionRecord::default(),
            watch: None,
            covered: 0,
        }
    }

    /// Ticks with calls served after which a warning with no breach is a false alarm
    /// ([`verdict_ticks`](super::verdict_ticks) at the control loop's tick).
    pub(crate) fn verdict(&self) -> u32 {
        self.verdict
    }

    pub(crate) fn record(&self) -> PredictionRecord {
        self.record
    }

    /// One tick, before the breaker steps: judge a warning of earlier ticks.
    pub(crate) fn tick(&mut self, breach: bool, served: bool) {
        self.covered = self.covered.saturating_sub(1);
        let Some(mut watch) = self.watch else {
            return;
        };
        watch.ticks = watch.ticks.saturating_add(1);
        if breach {
            self.record.confirmed += 1;
            self.record.last_lead_ticks = Some(watch.ticks);
            self.watch = None;
            self.covered = FALSE_ALARM_TICKS;
            return;
        }
        watch.served += u32::from(served);
        self.watch = if watch.served >= self.verdict {
            self.record.false_alarms += 1;
            None
        } else if watch.ticks >= self.verdict.saturating_mul(UNJUDGED_VERDICTS) {
            None
        } else {
            Some(watch)
        };
    }

    /// The class was degraded for a prediction. `breach`: this tick breached (after
    /// [`tick`](Self::tick) judged it), so the warning is late.
    pub(crate) fn warned(&mut self, breach: bool) {
        if self.covered > 0 {
            // The incident counted already.
            return;
        }
        if breach {
            self.breached(false);
        } else if let Some(watch) = &mut self.watch {
            // The same warning again, before its verdict: judged from now on, led from the
            // first.
            watch.served = 0;
        } else {
            self.watch = Some(Watch {
                ticks: 0,
                served: 0,
            });
        }
    }

    /// A breach opened or degraded the closed class while the predictor could warn: a miss,
    /// unless a warning foresaw this incident.
    pub(crate) fn breached(&mut self, warned_before: bool) {
        if !warned_before && self.covered == 0 {
            self.record.missed += 1;
            self.covered = FALSE_ALARM_TICKS;
        }
    }

    /// Whether a warning waits for its verdict.
    pub(crate) fn watching(&self) -> bool {
        self.watch.is_some()
    }

    /// A manual command took the class out of automatic control: the warning waiting gets no
    /// verdict.
    pub(crate) fn forget(&mut self) {
        self.watch = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_warning_is_confirmed_by_a_breach_within_its_ticks_with_its_lead() {
        let mut t = Tally::new(FALSE_ALARM_TICKS);
        t.warned(false);
        for _ in 0..3 {
            t.tick(false, true);
        }
        t.tick(true, true);
        assert_eq!(
            t.record(),
            PredictionRecord {
                confirmed: 1,
                last_lead_ticks: Some(4),
                ..PredictionRecord::default()
            }
        );
        // The same incident tripping the class a few ticks later is not a miss; one after
        // the incident's cover is.
        t.tick(true, true);
        t.breached(false);
        assert_eq!(t.record().missed, 0);
        for _ in 0..FALSE_ALARM_TICKS {
            t.tick(false, true);
        }
        t.breached(false);
        assert_eq!(t.record().missed, 1);
    }

    #[test]
    fn a_breach_minutes_after_the_warning_confirms_it_within_the_verdict() {
        // At 500 ms the verdict is five minutes' ticks: a slow leak's breach 250 ticks after
        // its warning confirms it (judged at FALSE_ALARM_TICKS, it was a false alarm and a
        // miss); none in 600 is a false alarm.
        let verdict = super::super::verdict_ticks(std::time::Duration::from_millis(500));
        let mut t = Tally::new(verdict);
        t.warned(false);
        for _ in 0..249 {
            t.tick(false, true);
        }
        t.tick(true, true);
        let r = t.record();
        assert_eq!((r.confirmed, r.false_alarms, r.missed), (1, 0, 0), "{r:?}");
        assert_eq!(r.last_lead_ticks, Some(250));
        let mut t = Tally::new(verdict);
        t.warned(false);
        for _ in 0..verdict {
            t.tick(false, true);
        }
        assert!(!t.watching());
        assert_eq!(t.record().false_alarms, 1);
    }

    #[test]
    fn a_warning_no_breach_follows_is_a_false_alarm_once_calls_were_served() {
        let mut t = Tally::new(FALSE_ALARM_TICKS);
        t.warned(false);
        // Ticks without calls show nothing either way.
        for _ in 0..100 {
            t.tick(false, false);
        }
        assert!(t.watching());
        for _ in 0..FALSE_ALARM_TICKS - 1 {
            t.tick(false, true);
        }
        // Warned again before the verdict: the same warning, judged from now on.
        t.warned(false);
        for _ in 0..FALSE_ALARM_TICKS - 1 {
            t.tick(false, true);
        }
        assert!(t.watching());
        t.tick(false, true);
        assert!(!t.watching());
        assert_eq!(t.record().false_alarms, 1, "one warning, one verdict");
        assert_eq!(t.record().confirmed, 0);
        // A breach after the verdict is an incident of its own.
        t.tick(true, true);
        t.breached(t.watching());
        assert_eq!(t.record().missed, 1);
    }

    #[test]
    fn a_warning_in_a_breaching_window_is_late_and_one_breach_confirms_one_warning() {
        // The breaker ticks the tally, then warns in the same tick.
        let mut t = Tally::new(FALSE_ALARM_TICKS);
        t.tick(true, true);
        t.warned(true);
        assert!(!t.watching());
        assert_eq!((t.record().confirmed, t.record().missed), (0, 1), "late");
        // The rule trips on the same incident two ticks later: counted once.
        t.tick(true, true);
        t.tick(true, true);
        t.breached(false);
        assert_eq!(t.record().missed, 1);

        // A waiting warning confirmed by a breach, and the predictor warning again in that
        // tick: one incident, one confirmed warning.
        let mut t = Tally::new(FALSE_ALARM_TICKS);
        t.warned(false);
        t.tick(false, true);
        t.tick(true, true);
        t.warned(true);
        assert_eq!((t.record().confirmed, t.record().missed), (1, 0));
        assert_eq!(t.record().last_lead_ticks, Some(2));
    }

    #[test]
    fn a_warning_on_a_class_too_quiet_to_judge_or_taken_out_of_control_gets_no_verdict() {
        let mut t = Tally::new(FALSE_ALARM_TICKS);
        t.warned(false);
        for _ in 0..UNJUDGED_VERDICTS * FALSE_ALARM_TICKS {
            assert!(t.watching());
            t.tick(false, false);
        }
        assert!(!t.watching());
        let mut t2 = Tally::new(FALSE_ALARM_TICKS);
        t2.warned(false);
        t2.forget();
        t2.tick(true, true);
        for t in [t, t2] {
            let r = t.record();
            assert_eq!((r.confirmed, r.false_alarms, r.missed), (0, 0, 0), "{r:?}");
        }
    }
}
