//! The breaker state machine, driven as a pure function of (state, snapshot, now).

use std::time::Duration;

use proptest::prelude::*;
use tokio::time::Instant;
use tower_degrade::window::WindowSnapshot;
use tower_degrade::{
    Route,
    breaker::{Breaker, BreakerConfig, Calibration, Command, ECHO_TICKS, FALSE_ALARM_TICKS, State},
    gate::{Directive, Reason},
};

/// A window of `successes` and `errors`; in half-open, these calls are the probes (within
/// the SLA unless said otherwise).
fn window(successes: u64, errors: u64, p99_ms: u64) -> WindowSnapshot {
    let mut w = WindowSnapshot::default();
    w.successes = successes;
    w.errors = errors;
    w.probe_successes = successes;
    w.probe_failures = errors;
    w.p99 = Duration::from_millis(p99_ms);
    w.period = Duration::from_millis(500);
    w
}

fn breaker() -> Breaker {
    Breaker::new(BreakerConfig::default(), Route::Reject)
}

const TICK: Duration = Duration::from_millis(500);

/// Open `b` with 20 failures at `t0`, then half-open it at the end of its open duration (5 s
/// later): returns that instant.
fn half_open(b: &mut Breaker, t0: Instant) -> Instant {
    b.step(&window(0, 20, 10), t0).expect("opens");
    let t1 = t0 + Duration::from_secs(5);
    b.step(&window(0, 0, 0), t1).expect("half-opens");
    t1
}

#[test]
fn opens_on_failure_rate_only_with_enough_calls() {
    let now = Instant::now();
    let mut b = breaker();
    // 19 calls, all failing: below min_requests (20).
    assert_eq!(b.step(&window(0, 19, 10), now), None);
    assert_eq!(b.state(), State::Closed);
    // Exactly 50 % is not above the threshold.
    assert_eq!(b.step(&window(10, 10, 10), now), None);
    let t = b.step(&window(9, 11, 10), now).expect("opens");
    assert_eq!((t.from, t.to), (State::Closed, State::Open));
    assert!(t.reason.contains("failure rate 55.0 %"), "{}", t.reason);
    assert!(t.enforced);
    match b.directive(now) {
        Directive::Divert {
            reason: Reason::BreakerOpen,
            retry_after,
            ..
        } => {
            assert_eq!(retry_after, Some(Duration::from_secs(5)));
        }
        d => panic!("unexpected {d:?}"),
    }
}

#[test]
fn an_unchecked_endless_open_duration_opens_for_a_day_not_a_panic() {
    // `Breaker::new` takes its config as given: `Duration::MAX` overflowed the deadline.
    let cfg = BreakerConfig::default()
        .open_duration(Duration::MAX)
        .max_open_duration(Duration::MAX);
    let mut b = Breaker::new(cfg, Route::Reject);
    let now = Instant::now();
    b.step(&window(0, 20, 10), now).expect("opens");
    assert_eq!(b.state(), State::Open);
    let day = Duration::from_secs(86_400);
    assert_eq!(b.step(&window(0, 0, 0), now + day - TICK), None);
    b.step(&window(0, 0, 0), now + day)
        .expect("half-opens after a day");
}

#[test]
fn a_breaker_opened_by_overdue_calls_says_so_and_names_the_sla() {
    // Calls that only ran past the SLA (a 400 ms API under the gold tier's 50 ms) opened the
    // breaker with a reason that read like errors.
    let mut b = breaker();
    let mut w = window(6, 0, 10);
    w.overdue = 19;
    let t = b.step(&w, Instant::now()).expect("opens");
    assert!(
        t.reason
            .contains("76.0 % > 50.0 % over 25 calls (19 of them overdue")
            && t.reason.contains("`ClassConfig::sla`"),
        "{}",
        t.reason
    );
}

#[test]
fn slow_call_rate_opens_when_configured() {
    let mut cfg = BreakerConfig::default();
    cfg.slow_call_rate = Some(0.5);
    let mut b = Breaker::new(cfg, Route::Reject);
    let mut w = window(20, 0, 10);
    w.slow = 11;
    let t = b.step(&w, Instant::now()).expect("opens");
    assert!(t.reason.contains("slow-call rate"), "{}", t.reason);
}

#[test]
fn seed_rule_degrades_after_three_consecutive_windows() {
    let now = Instant::now();
    let mut b = breaker();
    // success 90 % < 92 % and p99 900 ms > 800 ms, failure rate 10 % (not enough to open).
    let bad = window(90, 10, 900);
    assert_eq!(b.step(&bad, now), None);
    assert_eq!(b.step(&bad, now), None);
    // A healthy window in between restarts the count.
    assert_eq!(b.step(&window(100, 0, 900), now), None);
    assert_eq!(b.step(&bad, now), None);
    assert_eq!(b.step(&bad, now), None);
    let t = b.step(&bad, now).expect("degrades");
    assert_eq!((t.from, t.to), (State::Closed, State::Degraded));
    assert!(
        t.reason
            .contains("20 % of calls admitted, the rest to the class's fallback route"),
        "{}",
        t.reason
    );
    match b.directive(now) {
        Directive::AdmitFraction {
            fraction,
            reason: Reason::Degraded,
            ..
        } => {
            assert_eq!(fraction, 0.2);
        }
        d => panic!("unexpected {d:?}"),
    }
    // Only p99 high but success fine: not a breach.
    let mut b = breaker();
    for _ in 0..5 {
        assert_eq!(b.step(&window(100, 0, 2_000), now), None);
    }
}

#[test]
fn degraded_recovers_after_three_healthy_windows_or_opens() {
    let now = Instant::now();
    let mut b = breaker();
    for _ in 0..3 {
        b.step(&window(90, 10, 900), now);
    }
    assert_eq!(b.state(), State::Degraded);
    assert_eq!(b.step(&window(50, 0, 100), now), None);
    assert_eq!(b.step(&window(50, 0, 100), now), None);
    let t = b.step(&window(50, 0, 100), now).expect("closes");
    assert_eq!((t.from, t.to), (State::Degraded, State::Closed));

    for _ in 0..3 {
        b.step(&window(90, 10, 900), now);
    }
    let t = b.step(&window(5, 20, 900), now).expect("opens");
    assert_eq!((t.from, t.to), (State::Degraded, State::Open));
}

#[test]
fn a_degraded_class_opens_on_the_failures_of_the_calls_it_admits() {
    // 50 calls a tick offered, 10 admitted while degraded (20 %), every one failing: below
    // the closed class's 20 calls, and the class stayed degraded for good.
    let now = Instant::now();
    let mut b = degraded(breaker(), now);
    assert_eq!(b.state(), State::Degraded);
    let t = b.step(&window(0, 10, 300), now).expect("opens");
    assert_eq!((t.from, t.to), (State::Degraded, State::Open));
    assert!(t.reason.contains("over 10 calls"), "{}", t.reason);
    // The admitted share of `min_requests` (4 of 20) is still needed.
    let mut b = degraded(breaker(), now);
    assert_eq!(b.step(&window(0, 3, 300), now), None);
    assert_eq!(b.state(), State::Degraded);
    assert!(b.step(&window(0, 4, 300), now).is_some());
    // A dry run admits every call: its shadow needs the whole of `min_requests`.
    let mut b = breaker();
    b.command(Command::MetricsOnly);
    let mut b = degraded(b, now);
    assert_eq!(b.shadow_state(), State::Degraded);
    assert_eq!(b.step(&window(0, 10, 300), now), None);
    assert!(b.step(&window(0, 20, 300), now).is_some());
}

/// `b` after the seed rule's three breaching windows (degraded, or its shadow).
fn degraded(mut b: Breaker, now: Instant) -> Breaker {
    for _ in 0..3 {
        b.step(&window(90, 10, 900), now);
    }
    b
}

#[test]
fn quiet_windows_neither_count_nor_reset_a_degraded_class_s_recovery() {
    // A class with a few calls a second, most of them diverted while degraded: many windows
    // see no completed call at all.
    let now = Instant::now();
    let mut b = breaker();
    for _ in 0..3 {
        b.step(&window(90, 10, 900), now);
    }
    assert_eq!(b.state(), State::Degraded);
    for healthy in [
        window(1, 0, 20),
        window(0, 0, 0),
        window(1, 0, 20),
        window(0, 0, 0),
    ] {
        assert_eq!(b.step(&healthy, now), None);
    }
    let t = b.step(&window(1, 0, 20), now).expect("closes");
    assert_eq!((t.from, t.to), (State::Degraded, State::Closed));
}

#[test]
fn open_half_open_probes_recovering_closed() {
    let t0 = Instant::now();
    let mut b = breaker();
    b.step(&window(0, 20, 10), t0).expect("opens");
    // Not yet: 4.5 s later.
    assert_eq!(
        b.step(&window(0, 0, 0), t0 + Duration::from_millis(4_500)),
        None
    );
    let t = b
        .step(&window(0, 0, 0), t0 + Duration::from_secs(5))
        .expect("half-opens");
    assert_eq!(t.to, State::HalfOpen);
    assert!(matches!(b.directive(t0), Directive::Probe { .. }));
    // 3 of 5 probes done: wait.
    let t1 = t0 + Duration::from_secs(5);
    assert_eq!(b.step(&window(3, 0, 10), t1 + TICK), None);
    // 5 of 5, 4 ok = 80 %: recover.
    let t = b.step(&window(1, 1, 10), t1 + TICK * 2).expect("recovers");
    assert_eq!(t.to, State::Recovering);
    let fraction = |b: &Breaker| match b.directive(t1) {
        Directive::AdmitFraction {
            fraction,
            reason: Reason::Recovering,
            ..
        } => fraction,
        d => panic!("unexpected {d:?}"),
    };
    assert_eq!(fraction(&b), 0.25);
    // An idle tick is neither good nor bad.
    assert_eq!(b.step(&window(0, 0, 0), t1 + TICK * 3), None);
    assert_eq!(b.step(&window(10, 0, 10), t1 + TICK * 4), None);
    assert_eq!(fraction(&b), 0.5);
    assert_eq!(b.step(&window(10, 0, 10), t1 + TICK * 5), None);
    assert_eq!(fraction(&b), 0.75);
    let t = b.step(&window(10, 0, 10), t1 + TICK * 6).expect("closes");
    assert_eq!((t.from, t.to), (State::Recovering, State::Closed));
    assert_eq!(b.directive(t1), Directive::Admit);
}

#[test]
fn failed_probes_reopen_with_exponential_capped_duration() {
    let mut now = Instant::now();
    let mut b = breaker();
    b.step(&window(0, 20, 10), now).expect("opens");
    let mut expected = [5u64, 10, 20, 40, 60, 60].into_iter();
    let mut open_for = expected.next().unwrap();
    for _ in 0..5 {
        now += Duration::from_secs(open_for);
        assert_eq!(b.step(&window(0, 0, 0), now).unwrap().to, State::HalfOpen);
        let t = b.step(&window(3, 2, 10), now + TICK).expect("re-opens");
        assert_eq!((t.from, t.to), (State::HalfOpen, State::Open));
        now += TICK;
        open_for = expected.next().unwrap();
        match b.directive(now) {
            Directive::Divert { retry_after, .. } => {
                assert_eq!(retry_after, Some(Duration::from_secs(open_for)))
            }
            d => panic!("unexpected {d:?}"),
        }
    }
}

/// A tick with `n` calls in flight and none finished.
fn hanging(n: i64) -> WindowSnapshot {
    let mut w = window(0, 0, 0);
    w.inflight = n;
    w.probe_permits = 5 - n as u64;
    w
}

/// A half-open tick no call came to: every probe permit (5) left, none finished.
fn idle() -> WindowSnapshot {
    let mut w = window(0, 0, 0);
    w.probe_permits = 5;
    w
}

#[test]
fn hanging_probes_give_up_after_the_open_duration_which_says_how_long_it_waited() {
    let t0 = Instant::now();
    let mut b = breaker();
    let t1 = half_open(&mut b, t0);
    let mut now = t1;
    let t = loop {
        now += TICK;
        if let Some(t) = b.step(&hanging(2), now) {
            break t;
        }
    };
    assert_eq!((t.from, t.to), (State::HalfOpen, State::Open));
    // The time it waited half-open (5 s), not the next open duration (10 s).
    assert_eq!(
        t.reason,
        "probes unfinished after 5000 ms half-open (0/0 succeeded within the SLA)"
    );
}

/// No call comes to a half-open class (a cron job slower than the open duration, traffic
/// gone for the night): it is idle, not failing, and waits half-open for its next call to be
/// the probe. It reopened at the open duration, for longer each time, and an idle class stayed
/// open or half-open for good (the status page and the open-too-long alert said so).
#[test]
fn an_idle_half_open_class_waits_for_its_next_call_to_probe() {
    let t0 = Instant::now();
    let mut b = breaker();
    let t1 = half_open(&mut b, t0);
    for i in 1..=600 {
        assert_eq!(b.step(&idle(), t1 + TICK * i), None, "tick {i}");
    }
    assert_eq!(b.state(), State::HalfOpen);
    assert!(matches!(b.directive(t1), Directive::Probe { .. }));
    // Its first call comes, a job of 4 s: the probe has the open duration (5 s) to finish in,
    // counted from when it came, not from the start of the wait.
    let came = t1 + TICK * 601;
    for i in 0..8 {
        assert_eq!(b.step(&hanging(1), came + TICK * i), None, "tick {i}");
    }
    // It and the next four succeed: the class recovers.
    let t = b
        .step(&window(5, 0, 10), came + TICK * 8)
        .expect("recovers");
    assert_eq!((t.from, t.to), (State::HalfOpen, State::Recovering));

    // A probe that hangs still reopens it, once it has had the open duration.
    let mut b = breaker();
    let t1 = half_open(&mut b, t0);
    for i in 1..=20 {
        assert_eq!(b.step(&idle(), t1 + TICK * i), None);
    }
    let came = t1 + TICK * 21;
    // (The open duration counts from the last tick that saw the class idle, half a tick
    // before the call came at most.)
    for i in 0..9 {
        assert_eq!(b.step(&hanging(1), came + TICK * i), None, "tick {i}");
    }
    let t = b.step(&hanging(1), came + TICK * 9).expect("gives up");
    assert_eq!((t.from, t.to), (State::HalfOpen, State::Open));
    assert!(
        t.reason.starts_with("probes unfinished after 5000 ms"),
        "{}",
        t.reason
    );

    // Calls admitted before it opened that still run (a long job, a hung dependency with no
    // timeout) are not probes: with no permit taken, it is idle all the same.
    let mut b = breaker();
    let t1 = half_open(&mut b, t0);
    let mut old_calls = idle();
    old_calls.inflight = 3;
    for i in 1..=40 {
        assert_eq!(b.step(&old_calls, t1 + TICK * i), None, "tick {i}");
    }
    assert_eq!(b.state(), State::HalfOpen);
}

#[test]
fn probes_that_can_no_longer_reach_the_success_rate_reopen_at_once() {
    let t0 = Instant::now();
    let mut b = breaker();
    let t1 = half_open(&mut b, t0);
    // One failure of five: the other four would still make 80 %. Wait for them.
    assert_eq!(b.step(&window(0, 1, 10), t1 + TICK), None);
    // Two: at most 3/5 now. Reopen, rather than turn calls away as probes_exhausted for the
    // rest of the open duration.
    let t = b.step(&window(0, 1, 10), t1 + TICK * 2).expect("reopens");
    assert_eq!((t.from, t.to), (State::HalfOpen, State::Open));
    assert_eq!(t.reason, "probes 0/2 succeeded within the SLA");
    match b.directive(t1 + TICK * 2) {
        Directive::Divert { retry_after, .. } => {
            assert_eq!(retry_after, Some(Duration::from_secs(10)))
        }
        d => panic!("unexpected {d:?}"),
    }
}

#[test]
fn probes_slower_than_the_sla_do_not_recover() {
    let t0 = Instant::now();
    let mut b = breaker();
    let t1 = half_open(&mut b, t0);
    // Every probe answers, but 2 of 5 past the class SLA: 3/5 = 60 % < 80 %.
    let mut slow = window(5, 0, 600);
    slow.slow = 2;
    (slow.probe_successes, slow.probe_failures) = (3, 2);
    let t = b.step(&slow, t1 + TICK).expect("re-opens");
    assert_eq!((t.from, t.to), (State::HalfOpen, State::Open));
    assert!(
        t.reason.contains("3/5 succeeded within the SLA"),
        "{}",
        t.reason
    );
    // An abandoned probe is slow and a timeout: counted once.
    let t2 = t1 + TICK + Duration::from_secs(10);
    b.step(&window(0, 0, 0), t2).expect("half-opens again");
    let mut late = window(4, 0, 100);
    late.timeouts = 1;
    late.slow = 1;
    late.probe_failures = 1;
    let t = b.step(&late, t2 + TICK).expect("recovers");
    assert_eq!(t.to, State::Recovering, "{}", t.reason);
    assert!(t.reason.contains("4/5"), "{}", t.reason);
}

#[test]
fn calls_admitted_before_the_breaker_opened_do_not_decide_the_probes() {
    // A stalled dependency: the calls admitted before the breaker opened finish seconds late,
    // while it is half-open, slow or failed; the five probes all succeed. Counted as probes,
    // those calls reopened the class ("probes 6/16") and doubled its open time.
    let t0 = Instant::now();
    let mut b = breaker();
    let t1 = half_open(&mut b, t0);
    let mut w = window(0, 10, 5_200);
    w.slow = 10;
    (w.probe_successes, w.probe_failures) = (5, 0);
    let t = b.step(&w, t1 + TICK).expect("recovers");
    assert_eq!(
        (t.from, t.to),
        (State::HalfOpen, State::Recovering),
        "{}",
        t.reason
    );
    assert!(t.reason.contains("5/5"), "{}", t.reason);

    // A dry run hands out no probe: its shadow judges the window's calls.
    let mut b = breaker();
    b.command(Command::MetricsOnly);
    assert_eq!(half_open(&mut b, t0), t1, "the shadow half-opens");
    let mut calls = window(5, 0, 10);
    (calls.probe_successes, calls.probe_failures) = (0, 0);
    let t = b.step(&calls, t1 + TICK).expect("recovers (shadow)");
    assert_eq!((t.from, t.to), (State::HalfOpen, State::Recovering));
    assert!(!t.enforced);
}

#[test]
fn unfinished_probes_reopen_and_a_bad_recovering_tick_reopens() {
    let t0 = Instant::now();
    let mut b = breaker();
    b.step(&window(0, 20, 10), t0);
    b.step(&window(0, 0, 0), t0 + Duration::from_secs(5));
    assert_eq!(b.state(), State::HalfOpen);
    // No probe finishes within the open duration: they hang.
    assert_eq!(b.step(&hanging(5), t0 + Duration::from_secs(6)), None);
    let t = b
        .step(&hanging(5), t0 + Duration::from_secs(10))
        .expect("gives up");
    assert!(t.reason.contains("unfinished"), "{}", t.reason);
    assert_eq!(t.to, State::Open);

    let t1 = t0 + Duration::from_secs(20);
    b.step(&window(0, 0, 0), t1);
    b.step(&window(5, 0, 10), t1);
    assert_eq!(b.state(), State::Recovering);
    let t = b.step(&window(7, 3, 10), t1).expect("bad tick");
    assert_eq!((t.from, t.to), (State::Recovering, State::Open));
}

#[test]
fn a_quiet_recovering_class_is_judged_over_enough_calls() {
    // After the probes, a class with 3 calls a tick: one failure among them (33 %) is too
    // few calls to reopen on; it is judged with the next tick's (1 of 6 failed: good).
    let t0 = Instant::now();
    let mut b = breaker();
    b.step(&window(0, 20, 10), t0);
    let t1 = t0 + Duration::from_secs(5);
    b.step(&window(0, 0, 0), t1).expect("half-opens");
    b.step(&window(5, 0, 10), t1 + TICK).expect("recovers");
    assert_eq!(b.state(), State::Recovering);
    let fraction = |b: &Breaker| match b.directive(t1) {
        Directive::AdmitFraction { fraction, .. } => fraction,
        d => panic!("unexpected {d:?}"),
    };
    assert_eq!(b.step(&window(2, 1, 10), t1 + TICK * 2), None);
    assert_eq!(b.state(), State::Recovering);
    assert_eq!(fraction(&b), 0.25, "not judged yet: no step up");
    assert_eq!(b.step(&window(3, 0, 10), t1 + TICK * 3), None);
    assert_eq!(fraction(&b), 0.5, "1 of 6 failed: a good tick");
    assert_eq!(b.step(&window(3, 0, 10), t1 + TICK * 4), None);
    let t = b.step(&window(3, 0, 10), t1 + TICK * 5).expect("closes");
    assert_eq!((t.from, t.to), (State::Recovering, State::Closed));

    // A quiet class that keeps failing still reopens, once enough calls have been seen.
    let mut b = breaker();
    b.step(&window(0, 20, 10), t0);
    b.step(&window(0, 0, 0), t1).expect("half-opens");
    b.step(&window(5, 0, 10), t1 + TICK).expect("recovers");
    assert_eq!(b.step(&window(1, 1, 10), t1 + TICK * 2), None);
    assert_eq!(b.step(&window(1, 1, 10), t1 + TICK * 3), None);
    let mut hung = window(0, 0, 0);
    hung.overdue = 1;
    let t = b.step(&hung, t1 + TICK * 4).expect("reopens");
    assert_eq!((t.from, t.to), (State::Recovering, State::Open));
    assert!(t.reason.contains("60.0 % over 5 calls"), "{}", t.reason);
}

#[test]
fn a_quiet_class_s_probes_may_take_longer_than_the_open_duration() {
    // One call every 1.5 s after the outage: five probes take 7.5 s, more than the 5 s open
    // duration. All succeeding, the breaker waits for them rather than reopening for 10 s.
    let t0 = Instant::now();
    let mut b = breaker();
    b.step(&window(0, 20, 10), t0);
    let t1 = t0 + Duration::from_secs(5);
    b.step(&window(0, 0, 0), t1);
    assert_eq!(b.state(), State::HalfOpen);
    let mut at = t1;
    for probe in 1..=4 {
        at += Duration::from_millis(1_500);
        assert_eq!(b.step(&window(1, 0, 10), at), None, "probe {probe}");
        assert_eq!(b.state(), State::HalfOpen);
    }
    at += Duration::from_millis(1_500);
    let t = b.step(&window(1, 0, 10), at).expect("recovers");
    assert_eq!((t.from, t.to), (State::HalfOpen, State::Recovering));

    // A failed probe among them still gives up at the open duration.
    let mut b = breaker();
    b.step(&window(0, 20, 10), t0);
    b.step(&window(0, 0, 0), t1);
    b.step(&window(1, 0, 10), t1 + Duration::from_secs(1));
    b.step(&window(0, 1, 10), t1 + Duration::from_secs(2));
    let t = b
        .step(&window(0, 0, 0), t1 + Duration::from_secs(5))
        .expect("gives up");
    assert_eq!(t.to, State::Open);

    // So does a probe still running past the abandon threshold.
    let mut b = breaker();
    b.step(&window(0, 20, 10), t0);
    b.step(&window(0, 0, 0), t1);
    b.step(&window(1, 0, 10), t1 + Duration::from_secs(1));
    let mut hung = window(0, 0, 0);
    hung.overdue = 1;
    b.step(&hung, t1 + Duration::from_secs(2));
    let t = b
        .step(&window(0, 0, 0), t1 + Duration::from_secs(5))
        .expect("gives up");
    assert_eq!(t.to, State::Open);
}

#[test]
fn manual_commands() {
    let now = Instant::now();
    let mut b = breaker();
    let t = b.command(Command::ForceOpen).unwrap();
    assert_eq!((t.from, t.to), (State::Closed, State::ForcedOpen));
    assert!(b.is_manual());
    assert!(matches!(
        b.directive(now),
        Directive::Divert {
            reason: Reason::ForcedOpen,
            retry_after: None,
            ..
        }
    ));
    // Forced states do not step.
    assert_eq!(b.step(&window(100, 0, 1), now), None);
    assert_eq!(b.command(Command::ForceClosed).unwrap().to, State::Disabled);
    assert_eq!(b.step(&window(0, 100, 1), now), None);
    assert_eq!(b.directive(now), Directive::Admit);
    assert_eq!(b.command(Command::Degrade).unwrap().to, State::Degraded);
    assert!(matches!(b.directive(now), Directive::AdmitFraction { .. }));
    // Stays degraded whatever the signals say, until reset.
    for _ in 0..5 {
        assert_eq!(b.step(&window(100, 0, 1), now), None);
    }
    let t = b.command(Command::Reset).unwrap();
    assert_eq!((t.from, t.to), (State::Degraded, State::Closed));
    assert!(!b.is_manual());
}

#[test]
fn metrics_only_decides_but_enforces_nothing() {
    let now = Instant::now();
    let mut b = breaker();
    b.command(Command::MetricsOnly);
    let t = b.step(&window(0, 30, 10), now).expect("shadow opens");
    assert_eq!(
        (t.from, t.to, t.enforced),
        (State::Closed, State::Open, false)
    );
    assert_eq!(b.state(), State::MetricsOnly);
    assert_eq!(b.shadow_state(), State::Open);
    assert_eq!(b.directive(now), Directive::Admit);
}

#[test]
fn config_errors_name_the_field() {
    let mut cfg = BreakerConfig::default();
    cfg.failure_rate = 1.5;
    assert!(
        cfg.validate()
            .unwrap_err()
            .to_string()
            .contains("breaker.failure_rate")
    );
    let mut cfg = BreakerConfig::default();
    cfg.half_open_probes = 0;
    assert!(
        cfg.validate()
            .unwrap_err()
            .to_string()
            .contains("breaker.half_open_probes")
    );
}

fn arb_window() -> impl Strategy<Value = WindowSnapshot> {
    (0u64..60, 0u64..60, 0u64..10, 0u64..2_000).prop_map(|(s, e, t, p99)| {
        let mut w = window(s, e, p99);
        w.timeouts = t;
        w
    })
}

proptest! {
    /// Whatever the traffic: the directive always matches the state, open means a retry-after
    /// no longer than the cap, and Closed is only left for Open or Degraded.
    #[test]
    fn directive_always_matches_state(
        windows in prop::collection::vec((arb_window(), 0u64..20_000), 1..200)
    ) {
        let mut now = Instant::now();
        let mut b = breaker();
        for (w, advance_ms) in windows {
            now += Duration::from_millis(advance_ms);
            let before = b.state();
            if let Some(t) = b.step(&w, now) {
                prop_assert_eq!(t.from, before);
                prop_assert_ne!(t.from, t.to);
                if t.from == State::Closed {
                    prop_assert!(matches!(t.to, State::Open | State::Degraded));
                }
                if t.to == State::Closed {
                    prop_assert!(matches!(t.from, State::Recovering | State::Degraded));
                }
            }
            match (b.state(), b.directive(now)) {
                (State::Closed, d) => prop_assert_eq!(d, Directive::Admit),
                (State::Open, Directive::Divert { retry_after: Some(ra), .. }) => {
                    prop_assert!(ra <= Duration::from_secs(60));
                }
                (State::HalfOpen, Directive::Probe { .. }) => {}
                (State::Recovering, Directive::AdmitFraction { fraction, .. }) => {
                    prop_assert!(fraction > 0.0 && fraction <= 1.0);
                }
                (State::Degraded, Directive::AdmitFraction { .. }) => {}
                (s, d) => prop_assert!(false, "state {:?} with directive {:?}", s, d),
            }
        }
    }
}

#[test]
fn a_reset_starts_the_run_of_predicting_ticks_again() {
    // A prediction held a tick, then a manual command and a reset: the run held before
    // degraded the class on the first predicting tick after the reset.
    let now = Instant::now();
    let mut b = Breaker::new(
        BreakerConfig::default()
            .predict_threshold(0.87)
            .predict_ticks(2),
        Route::Reject,
    );
    let healthy = window(20, 0, 10);
    assert_eq!(b.step_predicted(&healthy, Some(0.95), now), None);
    b.command(Command::ForceOpen);
    b.command(Command::Reset);
    assert_eq!(b.step_predicted(&healthy, Some(0.95), now + TICK), None);
    assert_eq!(b.state(), State::Closed);
    let t = b
        .step_predicted(&healthy, Some(0.95), now + TICK * 2)
        .expect("held two ticks");
    assert_eq!((t.from, t.to), (State::Closed, State::Degraded));
    assert!(t.reason.contains("for 2 ticks"), "{}", t.reason);
    // The data path says the predictor degraded it, where the degrade rule's says `degraded`.
    assert!(matches!(
        b.directive(now + TICK * 2),
        Directive::AdmitFraction {
            reason: Reason::Predicted,
            ..
        }
    ));
}

/// A breaker on the calibrated default (the shortest warm-up), armed on 2,700 healthy ticks
/// whose scores spread about 0.05 (logit -3, sd 0.3, near normal: a fixed sequence), and the
/// instant after them. Returns the breaker, that instant and a score of the class's tail (3 sd
/// over its usual ones, under the threshold).
fn armed_on_usual_scores() -> (Breaker, Instant, f64) {
    let mut b = Breaker::new(
        BreakerConfig::default().predict_calibrated(Calibration::default().warm_up_ticks(1)),
        Route::Reject,
    );
    let mut now = Instant::now();
    for i in 0..2_700 {
        assert_eq!(
            b.step_predicted(&window(20, 0, 10), Some(usual(i)), now),
            None
        );
        now += TICK;
    }
    let threshold = b.predict_threshold().expect("armed");
    let tail = sigmoid(-3.0 + 3.0 * 0.3);
    assert!(tail < threshold && threshold < 0.9, "{tail} {threshold}");
    (b, now, tail)
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// The `i`th of a class's usual scores: logit -3 plus 0.3 times a near-normal draw (the sum
/// of 12 uniform ones, less 6, each from SplitMix64).
fn usual(i: usize) -> f64 {
    about(-3.0, i)
}

/// [`usual`] about another logit.
fn about(centre: f64, i: usize) -> f64 {
    let uniform = |n: u64| {
        let mut z = n.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) as f64 / u64::MAX as f64
    };
    let z: f64 = (0..12).map(|k| uniform(i as u64 * 12 + k)).sum::<f64>() - 6.0;
    sigmoid(centre + 0.3 * z)
}

#[test]
fn a_calibrated_warning_holds_while_its_scores_stay_in_the_class_s_tail() {
    // A score hovering about the threshold (a slow leak's, in a user's trial): the warning
    // degraded the class, the next ticks under the threshold closed it after 3 healthy
    // windows, the next over it degraded it again, seven times in two minutes. Now a warning
    // holds while its scores stay over the class's usual ones.
    let (mut b, mut now, tail) = armed_on_usual_scores();
    let healthy = window(20, 0, 10);
    let mut step = |b: &mut Breaker, p: f64| {
        let t = b.step_predicted(&healthy, Some(p), now);
        now += TICK;
        t
    };
    assert_eq!(step(&mut b, 0.9), None);
    let t = step(&mut b, 0.9).expect("warned");
    assert!(t.reason.starts_with("predicted"), "{}", t.reason);
    for i in 0..30 {
        let p = if i % 6 == 5 { 0.9 } else { tail };
        assert_eq!(step(&mut b, p), None, "tick {i} of the hover");
        assert_eq!(b.state(), State::Degraded, "tick {i} of the hover");
    }
    // Back among its usual scores: closed after `degraded_recovery_ticks` healthy windows.
    assert_eq!(step(&mut b, usual(0)), None);
    assert_eq!(step(&mut b, usual(1)), None);
    let t = step(&mut b, usual(2)).expect("recovered");
    assert_eq!(
        (t.to, t.reason.as_str()),
        (State::Closed, "3 healthy windows")
    );

    // Held for as long as the false-alarm exit allows, no longer: a warning whose scores stay
    // in the tail with no breach is still a false alarm after FALSE_ALARM_TICKS healthy ticks.
    let (mut b, mut now, tail) = armed_on_usual_scores();
    let mut step = |b: &mut Breaker, p: f64| {
        let t = b.step_predicted(&healthy, Some(p), now);
        now += TICK;
        t
    };
    step(&mut b, 0.9);
    step(&mut b, 0.9).expect("warned");
    let mut held = 0;
    let t = loop {
        if let Some(t) = step(&mut b, tail) {
            break t;
        }
        held += 1;
        assert!(held < 200, "held for good");
    };
    assert!(t.reason.contains("a false alarm"), "{}", t.reason);
    // Degraded on the warning's tick and the `held` after it: FALSE_ALARM_TICKS healthy ticks.
    assert_eq!(
        held + 1,
        tower_degrade::breaker::FALSE_ALARM_TICKS,
        "{}",
        t.reason
    );
    assert_eq!(step(&mut b, tail), None);
    assert_eq!(b.state(), State::Closed);
}

/// Steps `b` a healthy window (or `w`) a tick after `now` with the score `p`.
fn tick(b: &mut Breaker, now: &mut Instant, p: f64, w: Option<WindowSnapshot>) -> Option<String> {
    let t = b.step_predicted(&w.unwrap_or_else(|| window(20, 0, 10)), Some(p), *now);
    *now += TICK;
    t.map(|t| t.reason)
}

#[test]
fn a_warning_holds_over_the_usual_scores_the_class_has_now() {
    // The healthy scores shift for good (logit -3 to -1.5, four hours, learnt): the warm-up's
    // tail start is then below every usual score, and a hold over it lasted to the false-alarm
    // exit. The level a warning holds over is the fit's 98th percentile, which moves with the
    // class (the harness's port: `test_a_hold_follows_the_class_s_usual_scores_...`).
    let (mut b, mut now, _) = armed_on_usual_scores();
    for i in 0..28_800 {
        let t = tick(&mut b, &mut now, about(-1.5, i), None);
        assert!(i < 21_600 || t.is_none(), "tick {i} of the shift: {t:?}");
    }
    assert_eq!(tick(&mut b, &mut now, 0.95, None), None);
    let t = tick(&mut b, &mut now, 0.95, None).expect("warned");
    assert!(t.starts_with("predicted"), "{t}");
    let mut ticks = 0;
    while b.state() == State::Degraded {
        assert!(ticks < 10, "held at the class's usual scores");
        tick(&mut b, &mut now, about(-1.5, ticks), None);
        ticks += 1;
    }
}

#[test]
fn a_warning_holds_over_a_false_alarm_s_scores_not_at_them() {
    // A false alarm at 0.6 puts the threshold above it for an hour. A warning over that
    // floor, then 0.6 again: held at 0.6 (over the usual scores), it cost 40 ticks more for a
    // level already judged benign; it ends with it now.
    let (mut b, mut now, _) = armed_on_usual_scores();
    let mut exit = None;
    for _ in 0..45 {
        exit = exit.or(tick(&mut b, &mut now, 0.6, None).filter(|r| r.contains("false alarm")));
    }
    assert!(exit.is_some(), "the false alarm");
    assert_eq!(b.state(), State::Closed);
    tick(&mut b, &mut now, 0.99, None);
    assert!(
        tick(&mut b, &mut now, 0.99, None).is_some(),
        "a warning over its floor"
    );
    assert_eq!(tick(&mut b, &mut now, 0.6, None), None);
    assert_eq!(tick(&mut b, &mut now, 0.6, None), None);
    let t = tick(&mut b, &mut now, 0.6, None).expect("closed");
    assert_eq!(t, "3 healthy windows");
}

#[test]
fn a_breach_confirms_a_held_warning_and_the_class_recovers_as_from_any() {
    // A warning held, then a breach (a window that breaks the degrade rule: 90 % served, p99
    // 900 ms): confirmed, no longer held, and no false alarm to take; the class closes after 3
    // healthy windows and warns again at the same level once the breach's echo is over (no
    // floor was put). The harness's port: `test_a_breach_ends_a_hold_...`.
    let (mut b, mut now, tail) = armed_on_usual_scores();
    tick(&mut b, &mut now, 0.9, None);
    tick(&mut b, &mut now, 0.9, None).expect("warned");
    for _ in 0..9 {
        assert_eq!(tick(&mut b, &mut now, tail, None), None);
    }
    assert_eq!(
        tick(&mut b, &mut now, tail, Some(window(18, 2, 900))),
        None,
        "the breach"
    );
    // The scores of the model's window after it still read the breach (ECHO_TICKS): they do
    // not predict, and the class closes after 3 healthy windows, at 0.9 or not.
    assert_eq!(tick(&mut b, &mut now, 0.9, None), None);
    assert_eq!(tick(&mut b, &mut now, 0.9, None), None);
    let t = tick(&mut b, &mut now, 0.9, None).expect("closed");
    assert_eq!(t, "3 healthy windows");
    for i in 3..ECHO_TICKS {
        assert_eq!(tick(&mut b, &mut now, 0.9, None), None, "tick {i} after it");
    }
    // Past the echo, the same level warns again (no floor was put; the echo, learnt no higher
    // than the tail's start, did not lift it).
    assert_eq!(tick(&mut b, &mut now, 0.9, None), None);
    let t = tick(&mut b, &mut now, 0.9, None).expect("warned again");
    assert!(t.starts_with("predicted"), "{t}");
}

#[test]
fn the_python_port_takes_the_breakers_steps() {
    // The evaluation harness scores the model as the breaker uses it by default through a
    // port of the breaker (`tower-degrade-ai/training/calibrate.py`'s `alarms`). Its
    // `port_fixture.py` wrote what the port makes of two series (`port.json`, at 500 ms and at
    // minute steps: the scores, the steps that breach, the steps it warns at, those a false
    // alarm closes the class at, the steps the class is degraded, its threshold after each
    // step); the breaker must take the same steps. A breaching step is a window that breaks
    // the degrade rule without tripping the breaker (90 % served, p99 900 ms).
    let f: serde_json::Value = serde_json::from_str(include_str!("port.json")).unwrap();
    for series in f["series"].as_array().unwrap() {
        let numbers = |key: &str| -> Vec<u64> {
            series[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect()
        };
        let step = Duration::from_millis(series["step_ms"].as_u64().unwrap());
        let quantum = series["quantum"].as_f64().unwrap();
        let warm_up = u32::try_from(series["warm_up"].as_u64().unwrap()).unwrap();
        let breach = numbers("breach");
        let thresholds: Vec<(u64, Option<f64>)> = series["thresholds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| (v[0].as_u64().unwrap(), v[1].as_f64()))
            .collect();
        let degraded_at = |t: u64| {
            series["degraded"]
                .as_array()
                .unwrap()
                .iter()
                .any(|span| (span[0].as_u64().unwrap()..span[1].as_u64().unwrap()).contains(&t))
        };
        let mut b = Breaker::new(
            BreakerConfig::default()
                .predict_calibrated(Calibration::default().warm_up_ticks(warm_up)),
            Route::Reject,
        )
        .with_tick(step);
        let mut now = Instant::now();
        let (mut warned, mut closed) = (Vec::new(), Vec::new());
        let (mut port, mut next) = (None, 0);
        for (t, q) in series["scores"].as_array().unwrap().iter().enumerate() {
            let t = t as u64;
            let mut w = if breach.contains(&t) {
                window(18, 2, 900)
            } else {
                window(20, 0, 10)
            };
            w.period = step;
            if let Some(tr) = b.step_predicted(&w, q.as_f64().map(|q| q / quantum), now) {
                if tr.to == State::Degraded && tr.reason.starts_with("predicted") {
                    warned.push(t);
                }
                if tr.reason.contains("a false alarm") {
                    closed.push(t);
                }
            }
            let at = format!("{} ms steps, step {t}", step.as_millis());
            assert_eq!(
                b.state() == State::Degraded,
                degraded_at(t),
                "{at}: degraded"
            );
            while next < thresholds.len() && thresholds[next].0 <= t {
                port = thresholds[next].1;
                next += 1;
            }
            match (b.predict_threshold(), port) {
                (None, None) => {}
                (Some(ours), Some(port)) => {
                    assert!(
                        (ours - port).abs() < 1e-9,
                        "{at}: {ours} against the port's {port}"
                    )
                }
                (ours, port) => panic!("{at}: {ours:?} against the port's {port:?}"),
            }
            now += step;
        }
        let at = format!("{} ms steps", step.as_millis());
        assert_eq!(warned, numbers("warned"), "{at}: the steps warned at");
        assert_eq!(
            closed,
            numbers("false_alarm_closed"),
            "{at}: the false alarms' exits"
        );
    }
}

#[test]
fn the_degrade_rule_counts_breaching_windows_in_a_row_since_the_class_last_closed() {
    // Two breaching windows, the second with a prediction that degrades the class; it closes
    // again; then one breaching window. The rule asks for three in a row: the two from before
    // the class left Closed counted with the third, and it degraded on that one window.
    let now = Instant::now();
    let mut b = Breaker::new(
        BreakerConfig::default()
            .predict_threshold(0.87)
            .predict_ticks(1),
        Route::Reject,
    );
    let (healthy, breaching) = (window(20, 0, 10), window(18, 2, 900));
    assert_eq!(b.step_predicted(&breaching, Some(0.1), now), None);
    let t = b
        .step_predicted(&breaching, Some(0.95), now + TICK)
        .expect("predicted");
    assert!(t.reason.starts_with("predicted"), "{}", t.reason);
    for i in 2..5 {
        b.step_predicted(&healthy, Some(0.1), now + TICK * i);
    }
    assert_eq!(b.state(), State::Closed);
    assert_eq!(
        b.step_predicted(&breaching, Some(0.1), now + TICK * 5),
        None
    );
    assert_eq!(
        b.state(),
        State::Closed,
        "one breaching window since it closed"
    );
    assert_eq!(
        b.step_predicted(&breaching, Some(0.1), now + TICK * 6),
        None
    );
    let t = b
        .step_predicted(&breaching, Some(0.1), now + TICK * 7)
        .expect("three in a row");
    assert_eq!(t.to, State::Degraded);
}

#[test]
fn an_incident_s_echo_does_not_lift_the_threshold_over_a_relapse() {
    // For ECHO_TICKS after an incident a score may still read it: high on healthy ticks after
    // the class recovered. Learnt as they were, seven such scores from a short incident lifted
    // a class's threshold from about 0.01 to 0.99 (a review's stylised replay), for as long as
    // they stayed among the fit's excesses (hours), and warned of, they were taken for a false
    // alarm whose floor went above them for an hour: a relapse went unwarned. Now an echo does
    // not warn, and it is learnt no higher than the tail's start. `incident` steps one and
    // returns the ticks it stepped after its last unhealthy one (a breach, or the class not
    // closed nor degraded): the echo runs from there.
    let relapse = |incident: &dyn Fn(&mut Breaker, &mut Instant) -> u32| {
        let (mut b, mut now, _) = armed_on_usual_scores();
        let before = b.predict_threshold().expect("armed");
        let since = incident(&mut b, &mut now);
        assert_eq!(b.state(), State::Closed);
        // The echo's every tick at 0.98, the class closed: no warning.
        for i in since..ECHO_TICKS {
            assert_eq!(tick(&mut b, &mut now, 0.98, None), None, "echo tick {i}");
        }
        for i in 0..300 {
            assert_eq!(tick(&mut b, &mut now, usual(i), None), None);
        }
        let after = b.predict_threshold().expect("armed");
        assert!(after < 0.3, "the threshold went from {before} to {after}");
        // A relapse at 0.9 (over the threshold the class had) is warned of.
        tick(&mut b, &mut now, 0.9, None);
        let t = tick(&mut b, &mut now, 0.9, None).expect("warned");
        assert!(t.starts_with("predicted"), "{t}");
    };
    // A breach that breaks the degrade rule three windows in a row, then recovery: the echo
    // runs from the last of them.
    relapse(&|b: &mut Breaker, now: &mut Instant| {
        for _ in 0..3 {
            tick(b, now, usual(0), Some(window(18, 2, 900)));
        }
        assert_eq!(b.state(), State::Degraded);
        for i in 0..3 {
            tick(b, now, usual(i), None);
        }
        3
    });
    // An outage that opened the class, then its probes and recovery: the echo runs from the
    // last tick it was not closed (its probes' and recovery's are not healthy ticks' either).
    relapse(&|b: &mut Breaker, now: &mut Instant| {
        tick(b, now, usual(0), Some(window(0, 20, 10)));
        assert_eq!(b.state(), State::Open);
        let mut ticks = 0;
        while b.state() != State::Closed {
            tick(b, now, usual(1), Some(window(10, 0, 10)));
            ticks += 1;
        }
        assert!(
            ticks > 10,
            "{ticks} ticks to close: the echo would not outlast the trip's"
        );
        0
    });
}

#[test]
fn a_breach_in_an_incident_s_echo_is_no_miss() {
    // A calibrated threshold cannot warn in an echo, so the record does not count a breach
    // there as missed; a fixed threshold can, and it does.
    let (mut b, mut now, _) = armed_on_usual_scores();
    let incident = |b: &mut Breaker, now: &mut Instant| {
        for _ in 0..3 {
            tick(b, now, usual(0), Some(window(18, 2, 900)));
        }
        assert_eq!(b.state(), State::Degraded);
        for i in 0..3 {
            tick(b, now, usual(i), None);
        }
        assert_eq!(b.state(), State::Closed);
        for i in 0..FALSE_ALARM_TICKS {
            tick(b, now, usual(i as usize), None);
        }
    };
    incident(&mut b, &mut now);
    assert_eq!(b.prediction_record().missed, 1);
    incident(&mut b, &mut now);
    assert_eq!(
        b.prediction_record().missed,
        1,
        "the relapse came in the echo"
    );
    let mut b = Breaker::new(
        BreakerConfig::default().predict_threshold(0.87),
        Route::Reject,
    );
    incident(&mut b, &mut now);
    incident(&mut b, &mut now);
    assert_eq!(b.prediction_record().missed, 2);
}

#[test]
fn a_value_that_is_not_a_probability_is_no_prediction() {
    // The predictor stage takes NaN, infinities and values outside 0..=1 for no prediction;
    // a breaker stepped directly took `inf` or 1.5 for one over any fixed threshold (and a
    // calibrated alarm's highest score of `inf` put no floor).
    for bad in [f64::NAN, f64::INFINITY, 1.5, -0.5] {
        let mut b = Breaker::new(
            BreakerConfig::default()
                .predict_threshold(0.87)
                .predict_ticks(1),
            Route::Reject,
        );
        let now = Instant::now();
        assert_eq!(
            b.step_predicted(&window(20, 0, 10), Some(bad), now),
            None,
            "{bad}"
        );
        assert_eq!(b.state(), State::Closed, "{bad}");
        // A probability still predicts (1.0 plus a rounding error is taken as 1).
        let t = b
            .step_predicted(&window(20, 0, 10), Some(1.0 + 1e-9), now + TICK)
            .expect("predicted");
        assert!(t.reason.starts_with("predicted"), "{}", t.reason);
        // The calibrated default as well: no warning, so no alarm whose highest score is one.
        let (mut b, mut now, _) = armed_on_usual_scores();
        for _ in 0..3 {
            assert_eq!(tick(&mut b, &mut now, bad, None), None, "{bad}");
        }
        assert_eq!(b.state(), State::Closed, "{bad}");
    }
}
