//! The predictor's record on a class: how its warnings turned out, so that a user can see on
//! their own service, not only in an evaluation on other data, whether it earns its place.

use super::FALSE_ALARM_TICKS;

/// How a class's predictions turned out, counted by its breaker since the degrader started
/// (the shadow machine's in `MetricsOnly`, which makes a class a trial of the predictor that
/// changes nothing). `Status` and the admin API show it; `degrade_predictions_total` counts it
/// by `result`.
///
/// A *warning* is the breaker degrading the class for a prediction. It is **confirmed** when
/// the class breaches (a window that trips the breaker or breaks the degrade rule) within
/// [`FALSE_ALARM_TICKS`] ticks with calls served, and a **false alarm** otherwise; the
/// **lead** is the ticks from the warning to that first breach. A breach that opens or
/// degrades a closed class with no warning before it, while the predictor could warn
/// (answering, its threshold calibrated), was **missed**. A warning that degraded the class
/// in time may have averted the breach it foresaw, and then counts as a false alarm: the
/// record of a class in `MetricsOnly` is the unbiased one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PredictionRecord {
    /// Warnings a breach followed.
    pub confirmed: u64,
    /// Warnings no breach followed.
    pub false_alarms: u64,
    /// Breaches of a closed class the predictor could have warned of and did not.
    pub missed: u64,
    /// Ticks from the last confirmed warning to its breach.
    pub last_lead_ticks: Option<u32>,
}

/// A warning waiting for its verdict: the ticks since it, and those with calls served.
#[derive(Debug, Clone, Copy)]
struct Watch {
    ticks: u32,
    served: u32,
}

/// What a breaker keeps to write its [`PredictionRecord`].
#[derive(Debug, Clone, Default)]
pub(crate) struct Tally {
    record: PredictionRecord,
    watch: Option<Watch>,
    /// Ticks left in which a breach belongs to the last confirmed warning's incident (not a
    /// miss when it trips the class later).
    covered: u32,
}

impl Tally {
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
            self.confirm(watch.ticks);
            return;
        }
        watch.served += u32::from(served);
        if watch.served >= FALSE_ALARM_TICKS {
            self.record.false_alarms += 1;
            self.watch = None;
        } else {
            self.watch = Some(watch);
        }
    }

    /// The class was degraded for a prediction (a warning already waiting keeps its start).
    /// `breach`: the tick it came in breached already, which confirms it with no lead.
    pub(crate) fn warned(&mut self, breach: bool) {
        if self.watch.is_some() {
            return;
        }
        if breach {
            self.confirm(0);
        } else {
            self.watch = Some(Watch {
                ticks: 0,
                served: 0,
            });
        }
    }

    fn confirm(&mut self, lead: u32) {
        self.record.confirmed += 1;
        self.record.last_lead_ticks = Some(lead);
        self.watch = None;
        self.covered = FALSE_ALARM_TICKS;
    }

    /// A breach opened or degraded the closed class while the predictor could warn: a miss,
    /// unless a warning foresaw this incident.
    pub(crate) fn breached(&mut self, warned_before: bool) {
        if !warned_before && self.covered == 0 {
            self.record.missed += 1;
        }
    }

    /// Whether a warning waits for its verdict.
    pub(crate) fn watching(&self) -> bool {
        self.watch.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_warning_is_confirmed_by_a_breach_within_its_ticks_with_its_lead() {
        let mut t = Tally::default();
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
    fn a_warning_no_breach_follows_is_a_false_alarm_once_calls_were_served() {
        let mut t = Tally::default();
        t.warned(false);
        // Ticks without calls show nothing either way.
        for _ in 0..100 {
            t.tick(false, false);
        }
        assert!(t.watching());
        for _ in 0..FALSE_ALARM_TICKS - 1 {
            t.tick(false, true);
        }
        assert!(t.watching());
        t.warned(true);
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
    fn a_warning_in_a_breaching_tick_is_confirmed_with_no_lead() {
        let mut t = Tally::default();
        t.warned(true);
        assert!(!t.watching());
        assert_eq!(t.record().confirmed, 1);
        assert_eq!(t.record().last_lead_ticks, Some(0));
    }
}
