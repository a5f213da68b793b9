//! What the two runs measured, side by side: a table per class, the checks the example
//! promises, and the seed design's own claims beside the protected run's numbers.

use std::fmt::Write as _;

use tower_degrade::breaker::State;

use crate::storm::{CLASSES, Outcome, Run, is_write};

/// One class's numbers in one run.
#[derive(Debug, Clone, Default)]
pub(crate) struct ClassStats {
    pub(crate) sent: usize,
    pub(crate) ok: usize,
    pub(crate) kept: usize,
    pub(crate) fallback: usize,
    pub(crate) rejected: usize,
    pub(crate) failed: usize,
    pub p99_ms: f64,
    /// From the fault's onset to the first degrade decision for the class: its breaker
    /// leaving closed, or a call diverted (shed, kept, or served by a fallback).
    pub(crate) decision_ms: Option<u32>,
    /// From the fault's end until the class is served again (99 % of calls served within
    /// its SLA for 2.5 s).
    pub(crate) recovery_ms: Option<u32>,
    /// Decisions in the fault-free first phase: the breaker leaving closed, or calls
    /// diverted.
    pub(crate) false_decisions: usize,
    /// The share of the fault-free phase's calls that were diverted.
    pub(crate) false_share: f64,
    /// Calls in the fault-free phase.
    pub(crate) false_calls: usize,
}

impl ClassStats {
    pub(crate) fn success(&self) -> f64 {
        if self.sent == 0 {
            return 1.0;
        }
        self.ok as f64 / self.sent as f64
    }

    /// Calls of a write class neither served nor kept.
    pub(crate) fn lost(&self) -> usize {
        self.rejected + self.failed
    }
}

fn degrading(s: State) -> bool {
    !matches!(s, State::Closed | State::Disabled | State::MetricsOnly)
}

pub(crate) fn stats(run: &Run, class: usize) -> ClassStats {
    let mut s = ClassStats::default();
    let mut latencies = Vec::new();
    for x in run.samples.iter().filter(|x| usize::from(x.class) == class) {
        s.sent += 1;
        match x.outcome {
            Outcome::Ok => s.ok += 1,
            Outcome::Kept => s.kept += 1,
            Outcome::Fallback => s.fallback += 1,
            Outcome::Rejected => s.rejected += 1,
            Outcome::Failed => s.failed += 1,
        }
        latencies.push(x.latency_us);
    }
    latencies.sort_unstable();
    if !latencies.is_empty() {
        let i = ((latencies.len() as f64) * 0.99).ceil() as usize;
        s.p99_ms = f64::from(latencies[i.clamp(1, latencies.len()) - 1]) / 1000.0;
    }
    let p = run.phases;
    let states: Vec<_> = run
        .states
        .iter()
        .filter(|x| usize::from(x.class) == class)
        .collect();
    let diverted = |o: Outcome| matches!(o, Outcome::Kept | Outcome::Fallback | Outcome::Rejected);
    let mine = || run.samples.iter().filter(|x| usize::from(x.class) == class);
    // A call is decided when it is answered: its due time plus its latency.
    let first_state = states
        .iter()
        .find(|x| x.at_ms >= p.fault_start && degrading(x.state))
        .map(|x| x.at_ms);
    let first_call = mine()
        .filter(|x| x.at_ms >= p.fault_start && diverted(x.outcome))
        .map(|x| x.at_ms + x.latency_us / 1000)
        .min();
    s.decision_ms = [first_state, first_call]
        .into_iter()
        .flatten()
        .min()
        .map(|t| t - p.fault_start);
    let normal: Vec<_> = states.iter().filter(|x| x.at_ms < p.fault_start).collect();
    let transitions = normal
        .windows(2)
        .filter(|w| !degrading(w[0].state) && degrading(w[1].state))
        .count()
        + usize::from(normal.first().is_some_and(|x| degrading(x.state)));
    let normal_calls = mine().filter(|x| x.at_ms < p.fault_start).count();
    let normal_diverted = mine()
        .filter(|x| x.at_ms < p.fault_start && diverted(x.outcome))
        .count();
    s.false_decisions = transitions + normal_diverted;
    s.false_calls = normal_calls;
    if normal_calls > 0 {
        s.false_share = normal_diverted as f64 / normal_calls as f64;
    }
    // Recovery: 500 ms bins from the fault's end.
    const BIN: u32 = 500;
    let bins = ((p.end - p.fault_end) / BIN) as usize;
    let mut served = vec![(0usize, 0usize); bins];
    // Served, and within the class's SLA: a call answered in 1.9 s is not a class recovered.
    let sla_us = run.sla_us.get(class).copied().unwrap_or(u32::MAX);
    for x in run.samples.iter().filter(|x| usize::from(x.class) == class) {
        if x.at_ms >= p.fault_end && x.at_ms < p.end {
            let b = ((x.at_ms - p.fault_end) / BIN) as usize;
            if b < bins {
                served[b].1 += 1;
                if x.outcome == Outcome::Ok && x.latency_us <= sla_us {
                    served[b].0 += 1;
                }
            }
        }
    }
    let good = |b: &(usize, usize)| b.1 == 0 || b.0 as f64 >= 0.99 * b.1 as f64;
    s.recovery_ms = (0..bins)
        .find(|&b| served[b..(b + 5).min(bins)].iter().all(good) && b + 5 <= bins)
        .map(|b| b as u32 * BIN);
    s
}

/// What the failure predictor reported for one class in a run: scored at `alarm_at`, 2 ticks
/// in a row, as the breaker would with that fixed threshold.
#[derive(Debug, Clone, Default)]
pub(crate) struct Alarms {
    /// From the fault's onset to the first alarm during the fault.
    pub(crate) first_ms: Option<u32>,
    /// Alarms raised in the fault-free first phase.
    pub(crate) before_fault: usize,
    /// The highest probability in the fault-free phase, and during the fault.
    pub(crate) peak_normal: Option<f64>,
    pub(crate) peak_fault: Option<f64>,
}

pub(crate) fn alarms(run: &Run, class: usize, alarm_at: f64) -> Alarms {
    let p = run.phases;
    // One probability per tick: the last sample of each.
    let mut ticks: Vec<(u64, u32, f64)> = Vec::new();
    for x in run.states.iter().filter(|x| usize::from(x.class) == class) {
        let Some(prob) = x.prediction else { continue };
        match ticks.last_mut() {
            Some(last) if last.0 == x.tick => last.2 = prob,
            _ => ticks.push((x.tick, x.at_ms, prob)),
        }
    }
    let mut a = Alarms::default();
    let peak = |v: Option<f64>, x: f64| Some(v.map_or(x, |v: f64| v.max(x)));
    let mut run_len = 0;
    for &(_, at_ms, prob) in &ticks {
        if at_ms < p.fault_start {
            a.peak_normal = peak(a.peak_normal, prob);
        } else if at_ms < p.fault_end {
            a.peak_fault = peak(a.peak_fault, prob);
        }
        run_len = if prob >= alarm_at { run_len + 1 } else { 0 };
        if run_len == 2 {
            if at_ms < p.fault_start {
                a.before_fault += 1;
            } else if at_ms < p.fault_end && a.first_ms.is_none() {
                a.first_ms = Some(at_ms - p.fault_start);
            }
        }
    }
    a
}

/// The predictor's lead over the first decision the reactive rules took (positive: it
/// warned earlier).
fn lead(alarm: Option<u32>, decision: Option<u32>) -> String {
    match (alarm, decision) {
        (Some(a), Some(d)) => format!("{:+.1} s", (f64::from(d) - f64::from(a)) / 1000.0),
        (Some(a), None) => format!("alarm at {}", ms(Some(a))),
        (None, _) => "no alarm".into(),
    }
}

/// The predictor's reports beside the reactive rules', per class (protected run).
pub(crate) fn predictor(run: &Run, alarm_at: f64) -> String {
    let mut out = String::new();
    let what = match &run.predictor {
        Ok(what) => what,
        Err(why) => {
            let _ = writeln!(out, "the failure predictor: none ({why})");
            return out;
        }
    };
    let acting = run
        .states
        .iter()
        .any(|x| x.prediction.is_some() && !x.calibrating);
    let _ = writeln!(
        out,
        "the failure predictor: {what}; {}\n",
        if acting {
            "calibrated for some classes, so it may have degraded them itself"
        } else {
            "reporting only (every class in its calibration's warm-up), scored here"
        }
    );
    let _ = writeln!(
        out,
        "| class | first alarm after fault onset | first decision | lead | alarms before the fault | highest p before / during the fault |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|");
    let p2 = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}"));
    for (i, name) in CLASSES.iter().enumerate() {
        let a = alarms(run, i, alarm_at);
        let s = stats(run, i);
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {} | {} | {} / {} |",
            ms(a.first_ms),
            ms(s.decision_ms),
            lead(a.first_ms, s.decision_ms),
            a.before_fault,
            p2(a.peak_normal),
            p2(a.peak_fault),
        );
    }
    out
}

fn ms(v: Option<u32>) -> String {
    v.map_or("-".into(), |v| format!("{:.1} s", f64::from(v) / 1000.0))
}

/// The side-by-side table, in Markdown.
///
/// With `alarm_at` and a predictor in the protected run, a column gives the predictor's lead
/// over the reactive rules' first decision.
pub(crate) fn table(unprotected: &Run, protected: &Run, alarm_at: Option<f64>) -> String {
    let alarm_at = alarm_at.filter(|_| protected.predictor.is_ok());
    let mut out = String::new();
    let (extra, extra_align) = if alarm_at.is_some() {
        (" predictor lead |", "---:|")
    } else {
        ("", "")
    };
    let _ = writeln!(
        out,
        "| class | run | calls | success | p99 | served by a fallback | kept | shed | failed | lost | first decision | recovery | false decisions |{extra}"
    );
    let _ = writeln!(
        out,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|{extra_align}"
    );
    for (i, name) in CLASSES.iter().enumerate() {
        for run in [unprotected, protected] {
            let s = stats(run, i);
            let lost = if is_write(name) {
                s.lost().to_string()
            } else {
                "(read)".into()
            };
            let (decision, false_decisions) = if run.protected {
                (
                    ms(s.decision_ms),
                    format!("{} ({:.1} %)", s.false_decisions, 100.0 * s.false_share),
                )
            } else {
                ("-".into(), "-".into())
            };
            let lead_cell = match alarm_at {
                Some(at) if run.protected => {
                    format!(" {} |", lead(alarms(run, i, at).first_ms, s.decision_ms))
                }
                Some(_) => " - |".into(),
                None => String::new(),
            };
            let _ = writeln!(
                out,
                "| {name} | {} | {} | {:.2} % | {:.0} ms | {} | {} | {} | {} | {lost} | {decision} | {} | {false_decisions} |{lead_cell}",
                if run.protected {
                    "protected"
                } else {
                    "unprotected"
                },
                s.sent,
                100.0 * s.success(),
                s.p99_ms,
                s.fallback,
                s.kept,
                s.rejected,
                s.failed,
                ms(s.recovery_ms),
            );
        }
    }
    out
}

/// What happened to kept work in a run.
pub(crate) fn kept_work(run: &Run) -> String {
    let e = &run.effects;
    let browse = stats(
        run,
        CLASSES
            .iter()
            .position(|c| *c == crate::shop::BROWSE)
            .unwrap(),
    );
    let inventory = stats(
        run,
        CLASSES
            .iter()
            .position(|c| *c == crate::shop::INVENTORY)
            .unwrap(),
    );
    let mut out = String::new();
    let _ = writeln!(
        out,
        "- browse events: {} spooled, {} backfilled; {} delivered in all",
        browse.kept, e.browse_backfilled, e.browse_logged
    );
    let _ = writeln!(
        out,
        "- inventory: {} deltas merged into {} writes",
        e.inventory_merged, e.inventory_writes
    );
    let _ = writeln!(
        out,
        "- payments applied {} (doubled {}), refunds {} (doubled {}), order events {} (doubled {})",
        e.payments_applied,
        e.payments_doubled,
        e.refunds_applied,
        e.refunds_doubled,
        e.events_applied,
        e.events_doubled
    );
    let _ = writeln!(
        out,
        "- order events came through {}; {} left unacknowledged there",
        e.event_queue, e.events_unacknowledged
    );
    let _ = writeln!(out, "- manual review: {} tasks", e.review);
    if run.protected {
        let _ = writeln!(
            out,
            "- kept calls replayed by {:.1} s after the start ({:.1} s after the recovery phase)",
            f64::from(run.drained_ms) / 1000.0,
            f64::from(run.drained_ms.saturating_sub(run.phases.end)) / 1000.0
        );
    }
    if !e.left.is_empty() {
        let left: Vec<String> = e.left.iter().map(|(q, n)| format!("{n} in {q}")).collect();
        let _ = writeln!(out, "- left when the run ended: {}", left.join(", "));
    }
    let _ = inventory;
    out
}

/// Per second: each class's state and what became of its calls (`--trace`).
pub(crate) fn timeline(run: &Run) -> String {
    let mut out = String::new();
    let secs = run.phases.end / 1000;
    for sec in 0..secs {
        let (lo, hi) = (sec * 1000, (sec + 1) * 1000);
        let _ = write!(out, "{sec:>3}s");
        for (i, name) in CLASSES.iter().enumerate() {
            let mut n = [0usize; 5];
            for x in run
                .samples
                .iter()
                .filter(|x| usize::from(x.class) == i && x.at_ms >= lo && x.at_ms < hi)
            {
                n[x.outcome as usize] += 1;
            }
            let state = run
                .states
                .iter()
                .filter(|x| usize::from(x.class) == i && x.at_ms >= lo && x.at_ms < hi)
                .map(|x| x.state)
                .find(|s| degrading(*s))
                .unwrap_or(State::Closed);
            let short: String = name.chars().take(7).collect();
            let _ = write!(
                out,
                " | {short} {} ok{} k{} f{} r{} x{}",
                &state.as_str()[..4.min(state.as_str().len())],
                n[0],
                n[1],
                n[2],
                n[3],
                n[4]
            );
        }
        let _ = writeln!(out);
        for (_, l) in run.limiters.iter().filter(|(t, _)| *t >= lo && *t < hi) {
            if !l.is_empty() {
                let _ = writeln!(out, "      admission: {l}");
            }
        }
    }
    out
}

/// The seed design's claims for the same quantities, beside the protected run.
pub(crate) fn claims(run: &Run) -> String {
    let all: Vec<ClassStats> = (0..CLASSES.len()).map(|i| stats(run, i)).collect();
    let decisions: Vec<u32> = all.iter().filter_map(|s| s.decision_ms).collect();
    // Over the classes the protection acted on, as the seed's figure is of degraded classes
    // coming back: one never diverted has nothing to recover from.
    let recoveries: Vec<u32> = all
        .iter()
        .filter(|s| s.decision_ms.is_some())
        .filter_map(|s| s.recovery_ms)
        .collect();
    let (calls, diverted) = all.iter().fold((0.0, 0.0), |(c, d), s| {
        (
            c + s.false_calls as f64,
            d + s.false_share * s.false_calls as f64,
        )
    });
    let mean = |v: &[u32]| {
        if v.is_empty() {
            "-".to_owned()
        } else {
            format!(
                "{:.1} s",
                v.iter().map(|x| f64::from(*x)).sum::<f64>() / v.len() as f64 / 1000.0
            )
        }
    };
    let payment = &all[CLASSES
        .iter()
        .position(|c| *c == crate::shop::PAYMENT)
        .unwrap()];
    let mut out = String::new();
    let _ = writeln!(out, "| quantity | the seed's claim | this run, protected |");
    let _ = writeln!(out, "|---|---|---|");
    let _ = writeln!(
        out,
        "| time from fault onset to the first degrade decision | <= 800 ms (static thresholds >= 90 s) | {} to {} (by class; mean {}) |",
        ms(decisions.iter().min().copied()),
        ms(decisions.iter().max().copied()),
        mean(&decisions)
    );
    let _ = writeln!(
        out,
        "| false degradation (calls diverted in the fault-free phase) | 3.7 % (static 23 %) | {:.2} % |",
        if calls > 0.0 {
            100.0 * diverted / calls
        } else {
            0.0
        }
    );
    let _ = writeln!(
        out,
        "| mean recovery after the fault clears | 4.2 s | {} (the classes it diverted) |",
        mean(&recoveries)
    );
    let _ = writeln!(
        out,
        "| core payment success | 99.997 % | {:.3} % ({} of {}, {} lost) |",
        100.0 * payment.success(),
        payment.ok,
        payment.sent,
        payment.lost()
    );
    out
}

/// What the example promises; each failure as a sentence.
pub(crate) fn check(unprotected: &Run, protected: &Run) -> Vec<String> {
    let mut failures = Vec::new();
    let at = |name| CLASSES.iter().position(|c| *c == name).unwrap();
    let payment = stats(protected, at(crate::shop::PAYMENT));
    if payment.success() < 0.999 {
        failures.push(format!(
            "protected payment success {:.2} % < 99.9 %",
            100.0 * payment.success()
        ));
    }
    if payment.lost() > 0 {
        failures.push(format!("{} payment callbacks lost", payment.lost()));
    }
    let e = &protected.effects;
    let accepted = payment.ok + payment.kept;
    if (e.payments_applied as u64) + e.review < accepted as u64 {
        failures.push(format!(
            "{accepted} payment callbacks accepted, {} applied and {} in manual review",
            e.payments_applied, e.review
        ));
    }
    let browse = stats(protected, at(crate::shop::BROWSE));
    if e.browse_backfilled < browse.kept as u64 {
        failures.push(format!(
            "{} browse events spooled, {} backfilled",
            browse.kept, e.browse_backfilled
        ));
    }
    if e.payments_doubled + e.refunds_doubled + e.events_doubled > 0 {
        failures.push("an accepted task took effect twice".into());
    }
    let lost: usize = (0..CLASSES.len())
        .filter(|&i| is_write(CLASSES[i]))
        .map(|i| stats(unprotected, i).lost())
        .sum();
    if lost == 0 {
        failures.push(
            "the unprotected run lost no work: the storm is too mild to show anything".into(),
        );
    }
    failures
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storm::{Phases, StateSample};

    /// A run whose only data is class 0's predictions, one per 500 ms tick.
    fn run(predictions: &[f64]) -> Run {
        let states = predictions
            .iter()
            .enumerate()
            .flat_map(|(tick, p)| {
                // Two samples a tick, as the sampler takes them every 50 ms or so.
                [0, 250].map(|off| StateSample {
                    at_ms: tick as u32 * 500 + off,
                    class: 0,
                    state: State::Closed,
                    tick: tick as u64,
                    prediction: Some(*p),
                    calibrating: true,
                })
            })
            .collect();
        Run {
            protected: true,
            phases: Phases {
                fault_start: 2_000,
                fault_end: 4_000,
                end: 5_000,
            },
            samples: Vec::new(),
            states,
            effects: Default::default(),
            drained_ms: 0,
            limiters: Vec::new(),
            predictor: Ok("test".into()),
            sla_us: vec![50_000; 8],
        }
    }

    #[test]
    fn an_alarm_is_two_ticks_at_the_threshold_and_counted_by_phase() {
        // Ticks 0-3 before the fault (one alarm: ticks 1-2), 4-7 during it (alarm on tick 6,
        // the second in a row), then after it.
        let r = run(&[0.1, 0.9, 0.95, 0.2, 0.5, 0.9, 0.88, 0.99, 0.99, 0.99]);
        let a = alarms(&r, 0, 0.87);
        assert_eq!(a.before_fault, 1);
        assert_eq!(a.first_ms, Some(1_000), "tick 6 is 1 s into the fault");
        assert_eq!(a.peak_normal, Some(0.95));
        assert_eq!(a.peak_fault, Some(0.99));
        // One tick at the threshold is not an alarm.
        let a = alarms(&run(&[0.1, 0.1, 0.1, 0.1, 0.9, 0.1, 0.9, 0.1]), 0, 0.87);
        assert_eq!((a.before_fault, a.first_ms), (0, None));
    }

    #[test]
    fn the_lead_is_how_much_earlier_the_alarm_came_than_the_first_decision() {
        assert_eq!(lead(Some(500), Some(2_000)), "+1.5 s");
        assert_eq!(lead(Some(2_000), Some(500)), "-1.5 s");
        assert_eq!(lead(Some(700), None), "alarm at 0.7 s");
        assert_eq!(lead(None, Some(700)), "no alarm");
    }
}
