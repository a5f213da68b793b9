//! Overload must be visible: a service with a fixed capacity under 3x load, its callers giving
//! up, opens or degrades its class; callers that cancel early do not. Paused clock.

use std::time::Duration;

use tower::{Layer, Service, ServiceExt};
use tower_degrade::breaker::State;
use tower_degrade::{BoxError, ClassConfig, Degrader};

#[path = "../support.rs"]
mod support;

/// Open-loop load: `per_step` calls every 10 ms for `ticks` ticks of 500 ms, each abandoned by
/// its caller after `patience`. Returns the class's state after each tick.
async fn drive(
    d: &Degrader,
    svc: impl Service<(), Response = (), Error = BoxError, Future: Send> + Clone + Send + 'static,
    per_step: usize,
    patience: Duration,
    ticks: usize,
) -> Vec<State> {
    let svc = d.layer(d.class_id("pay").unwrap()).layer(svc);
    let mut states = Vec::new();
    for step in 1..=ticks * 50 {
        for _ in 0..per_step {
            let call = svc.clone().oneshot(());
            tokio::spawn(async move {
                let _ = tokio::time::timeout(patience, call).await;
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        if step % 50 == 0 {
            d.tick_now();
            states.push(d.state("pay").unwrap());
        }
    }
    states
}

/// 3x overload for `ticks` ticks: 16 workers x 10 ms serve 1,600 calls/s; offered 48 calls
/// every 10 ms (4,800/s), each caller giving up after 1 s.
async fn three_times_the_capacity(d: &Degrader, ticks: usize) -> Vec<State> {
    let capacity = support::fixed_capacity(16, Duration::from_millis(10));
    drive(d, capacity, 48, Duration::from_secs(1), ticks).await
}

#[tokio::test(start_paused = true)]
async fn three_times_the_capacity_with_callers_giving_up_leaves_closed_within_a_few_ticks() {
    let d = support::degrader([ClassConfig::gold("pay")]);
    let states = three_times_the_capacity(&d, 8).await;
    let left = states.iter().position(|s| *s != State::Closed);
    assert!(
        matches!(left, Some(t) if t < 3),
        "the class must leave Closed within 3 ticks of the overload: {states:?}"
    );
    let w = *d
        .history("pay")
        .unwrap()
        .iter()
        .find(|w| w.timeouts > 0)
        .expect("timeouts recorded");
    // At the time they were abandoned, within the histogram's 3.125 %.
    assert!(
        w.p99 >= Duration::from_millis(960),
        "abandoned calls count in p99: {w:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_backlog_the_service_cannot_clear_in_time_is_seen_before_callers_give_up() {
    let d = support::degrader([ClassConfig::gold("pay")]);
    // Callers never give up here: only the backlog can tell.
    let states = drive(
        &d,
        support::fixed_capacity(16, Duration::from_millis(10)),
        48,
        Duration::from_secs(3600),
        2,
    )
    .await;
    let w = *d.history("pay").unwrap().get(1).unwrap();
    // After the first 500 ms: ~2,400 calls offered, ~800 done, the rest in flight; at 1,600
    // calls/s only 80 of them finish within the 50 ms SLA.
    assert_eq!(w.timeouts, 0);
    assert!(w.overdue > 1000, "{w:?}");
    assert!(w.failure_rate() > 0.5, "{w:?}");
    assert_eq!(states[0], State::Open, "{states:?}");
}

#[tokio::test(start_paused = true)]
async fn many_calls_in_flight_that_finish_in_time_are_not_overdue() {
    let d = support::degrader([ClassConfig::gold("pay")]);
    // 400 calls in flight at any time, each done in 40 ms: within the 50 ms SLA.
    let states = drive(
        &d,
        support::fixed_capacity(1000, Duration::from_millis(40)),
        100,
        Duration::from_secs(1),
        4,
    )
    .await;
    assert!(states.iter().all(|s| *s == State::Closed), "{states:?}");
    let w = *d.history("pay").unwrap().latest().unwrap();
    assert!(w.inflight >= 300, "{w:?}");
    assert_eq!(w.overdue, 0, "{w:?}");
}

#[tokio::test(start_paused = true)]
async fn callers_cancelling_before_the_sla_leave_a_healthy_class_closed() {
    let d = support::degrader([ClassConfig::gold("pay")]);
    // Ample capacity, 10 ms of work, but every caller gives up after 5 ms: well inside the
    // 50 ms SLA, so these are cancellations, not failures.
    let states = drive(
        &d,
        support::fixed_capacity(64, Duration::from_millis(10)),
        8,
        Duration::from_millis(5),
        6,
    )
    .await;
    assert!(states.iter().all(|s| *s == State::Closed), "{states:?}");
    let w = *d.history("pay").unwrap().latest().unwrap();
    assert_eq!((w.timeouts, w.successes), (0, 0));
    assert!(w.cancelled > 0);
}

#[tokio::test(start_paused = true)]
async fn the_abandon_threshold_is_configurable_per_class() {
    let d = support::degrader([ClassConfig::gold("pay").abandon_timeout(None)]);
    let states = three_times_the_capacity(&d, 6).await;
    assert!(
        states.iter().all(|s| *s == State::Closed),
        "abandoned calls are never failures: {states:?}"
    );
    assert!(d.history("pay").unwrap().iter().all(|w| w.timeouts == 0));
}

#[tokio::test(start_paused = true)]
async fn waiting_for_readiness_is_queueing_delay_and_part_of_the_latency() {
    use tower::limit::ConcurrencyLimitLayer;

    let d = support::degrader([ClassConfig::silver("stock")]);
    // One call at a time, 100 ms each: the second caller waits for readiness.
    let svc = d
        .layer(d.class_id("stock").unwrap())
        .layer(ConcurrencyLimitLayer::new(1).layer(support::failing_after(100)));
    let first = tokio::spawn(svc.clone().oneshot(false));
    tokio::task::yield_now().await;
    let second = tokio::spawn(svc.oneshot(false));
    first.await.unwrap().unwrap();
    second.await.unwrap().unwrap();
    d.tick_now();
    let w = *d.history("stock").unwrap().latest().unwrap();
    assert_eq!(w.successes, 2);
    // Only the second call queued: 100 ms, and its latency includes the wait.
    assert_eq!(w.queue_delay, Duration::from_millis(100));
    assert_eq!(w.max, Duration::from_millis(200));
    // The next window saw no queueing.
    d.tick_now();
    assert_eq!(
        d.history("stock").unwrap().latest().unwrap().queue_delay,
        Duration::ZERO
    );
}

#[tokio::test(start_paused = true)]
async fn a_clone_does_not_inherit_the_originals_wait() {
    use std::task::{Context, Waker};
    use tower::limit::ConcurrencyLimitLayer;

    let d = support::degrader([ClassConfig::silver("stock")]);
    let mut svc = d
        .layer(d.class_id("stock").unwrap())
        .layer(ConcurrencyLimitLayer::new(1).layer(support::failing_after(100)));
    let busy = tokio::spawn(svc.clone().oneshot(false));
    tokio::task::yield_now().await;
    // The original starts waiting for readiness; a clone taken now has not waited.
    let mut cx = Context::from_waker(Waker::noop());
    assert!(svc.poll_ready(&mut cx).is_pending());
    let clone = svc.clone();
    // The original gives up its place in the queue (it would take the next permit).
    drop(svc);
    busy.await.unwrap().unwrap();
    clone.oneshot(false).await.unwrap();
    d.tick_now();
    assert_eq!(
        d.history("stock").unwrap().latest().unwrap().queue_delay,
        Duration::ZERO
    );
}

/// `n` calls of `pay` taking `ms` each, started now.
async fn burst(d: &Degrader, n: usize, ms: u64) -> Vec<tokio::task::JoinHandle<()>> {
    let svc = d
        .layer(d.class_id("pay").unwrap())
        .layer(support::failing_after(ms));
    let calls = (0..n)
        .map(|_| {
            let call = svc.clone().oneshot(false);
            tokio::spawn(async move {
                let _ = call.await;
            })
        })
        .collect();
    // Let them start before the clock moves on.
    for _ in 0..4 {
        tokio::task::yield_now().await;
    }
    calls
}

#[tokio::test(start_paused = true)]
async fn a_burst_that_began_just_before_a_tick_is_not_overdue() {
    // 200 ms calls against a 1 s SLA, arriving together 50 ms before a tick, after a quiet
    // spell: nothing completed in the window, yet none of them can be overdue.
    let d = support::degrader([ClassConfig::gold("pay").sla(Duration::from_secs(1))]);
    for _ in 0..3 {
        tokio::time::advance(Duration::from_millis(500)).await;
        d.tick_now();
    }
    for round in 0..3 {
        tokio::time::advance(Duration::from_millis(450)).await;
        let calls = burst(&d, 25, 200).await;
        tokio::time::advance(Duration::from_millis(50)).await;
        d.tick_now();
        let w = *d.history("pay").unwrap().latest().unwrap();
        assert_eq!((w.inflight, w.overdue), (25, 0), "round {round}: {w:?}");
        assert_eq!(d.state("pay").unwrap(), State::Closed, "round {round}");
        for c in calls {
            c.await.unwrap();
        }
        tokio::time::advance(Duration::from_millis(300)).await;
        d.tick_now();
        assert_eq!(d.history("pay").unwrap().latest().unwrap().successes, 25);
    }
}

#[tokio::test(start_paused = true)]
async fn calls_that_never_finish_are_overdue_once_past_the_threshold() {
    let d = support::degrader([ClassConfig::gold("pay").sla(Duration::from_secs(1))]);
    tokio::time::advance(Duration::from_millis(100)).await;
    let _hung = burst(&d, 25, u64::MAX / 2).await;
    let mut overdue = Vec::new();
    for _ in 0..8 {
        tokio::time::advance(Duration::from_millis(500)).await;
        d.tick_now();
        overdue.push(d.history("pay").unwrap().latest().unwrap().overdue);
    }
    // 0.5 s old at the first tick, 1 s at the second: none past the 1 s threshold yet,
    // though none completed. All 25 are counted at the third, once: a call that hangs is
    // one failure, not one per window while it hangs.
    assert_eq!(overdue, [0, 0, 25, 0, 0, 0, 0, 0]);
    assert_ne!(d.state("pay").unwrap(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_burst_in_flight_at_a_tick_shorter_than_the_sla_is_not_overdue() {
    // Gold's SLA (50 ms) is shorter than a tick: 25 calls of 20 ms, 10 ms into them when the
    // tick lands, after a quiet spell. Nothing has completed; none is near the SLA.
    let d = support::degrader([ClassConfig::gold("pay")]);
    tokio::time::advance(Duration::from_millis(490)).await;
    let calls = burst(&d, 25, 20).await;
    tokio::time::advance(Duration::from_millis(10)).await;
    d.tick_now();
    let w = *d.history("pay").unwrap().latest().unwrap();
    assert_eq!((w.inflight, w.overdue, w.completed()), (25, 0, 0), "{w:?}");
    assert_eq!(d.state("pay").unwrap(), State::Closed);
    for c in calls {
        c.await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn callers_replacing_their_calls_do_not_make_the_rest_overdue() {
    // Search as you type: 30 queries of 150 ms (SLA 200 ms) every 100 ms, each dropped by its
    // caller after 100 ms. At the tick: 30 in flight, 120 cancelled, none completed.
    let d = support::degrader([ClassConfig::silver("search")]);
    let svc = d
        .layer(d.class_id("search").unwrap())
        .layer(support::slow_failing());
    for round in 0..5 {
        for _ in 0..30 {
            let call = svc.clone().oneshot((150, false));
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_millis(100), call).await;
            });
        }
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
        tokio::time::advance(Duration::from_millis(if round < 4 { 100 } else { 50 })).await;
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
    }
    d.tick_now();
    let w = *d.history("search").unwrap().latest().unwrap();
    assert_eq!((w.inflight, w.cancelled, w.overdue), (30, 120, 0), "{w:?}");
    assert_eq!(d.state("search").unwrap(), State::Closed);
}
