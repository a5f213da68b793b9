//! The fallback router: every diverted call that a route keeps is stored before it is
//! answered, replayed later, and never lost.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceExt, service_fn};
use tower_degrade::admit::Admission;
use tower_degrade::fallback::store::{EmbeddedStore, Op, StoreErrorKind};
use tower_degrade::fallback::{
    Backfill, Batch, BatchMerge, CannotKeep, CannotKeepKind, Capture, FallbackRouter,
    FallbackRouterBuilder, FallbackWorker, HttpReplay, LastGoodLayer, MemoryStore, Payload, Queue,
    REPLAY_HEADER, ReplayByClass, Replayed, RetryPolicy, Store, Task, TaskId, replay_fn,
    replay_task,
};
use tower_degrade::protocol::{DETAIL_HEADER, REASON_HEADER, ROUTE_HEADER, TASK_ID_HEADER};
use tower_degrade::{BoxError, ClassConfig, Degrader, Route};

#[path = "../late.rs"]
mod late;
#[path = "../logs.rs"]
mod logs;
#[path = "../support.rs"]
mod support;

use support::degrader;

type Req = Request<Full<Bytes>>;
type Res = Response<Full<Bytes>>;
type Svc = BoxCloneSyncService<Req, Res, Infallible>;

/// The application behind the layer, and the replay target: records every request it gets
/// (method, URI, idempotency key, replay attempt, body) and answers with `status` while
/// `fail` is above zero (counting down), 200 after.
/// A request the app saw: URI, idempotency key, replay attempt, body.
type Seen = (String, Option<String>, Option<String>, Bytes);

#[derive(Clone, Default)]
struct App {
    seen: Arc<Mutex<Vec<Seen>>>,
    fail: Arc<AtomicUsize>,
    status: Arc<Mutex<u16>>,
    /// A body answered `status` always (a task that fails on its own account).
    poison: Arc<Mutex<Option<Bytes>>>,
    /// The next call is served, whatever `fail` says (a dependency that flaps).
    serve_next: Arc<std::sync::atomic::AtomicBool>,
}

impl App {
    fn service(&self) -> Svc {
        let app = self.clone();
        BoxCloneSyncService::new(service_fn(move |req: Req| {
            let app = app.clone();
            async move {
                let h = |n: &str| req.headers().get(n).map(|v| v.to_str().unwrap().to_owned());
                let (key, attempt) = (h("idempotency-key"), h(REPLAY_HEADER.as_str()));
                let uri = req.uri().to_string();
                let body = req.into_body().collect().await.unwrap().to_bytes();
                app.seen
                    .lock()
                    .unwrap()
                    .push((uri, key, attempt, body.clone()));
                let poisoned = app.poison.lock().unwrap().as_ref() == Some(&body);
                let served = app.serve_next.swap(false, Ordering::SeqCst);
                let failing = !served
                    && (poisoned
                        || app
                            .fail
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                            .is_ok());
                let status = if failing {
                    *app.status.lock().unwrap()
                } else {
                    200
                };
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(status)
                        .body(Full::new(Bytes::from("ok")))
                        .unwrap(),
                )
            }
        }))
    }

    fn failing(self, n: usize, status: u16) -> Self {
        self.fail.store(n, Ordering::SeqCst);
        *self.status.lock().unwrap() = status;
        self
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn post(uri: &str, body: &'static str) -> Req {
    Request::post(uri)
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

fn replay(app: &App) -> HttpReplay<Svc, Full<Bytes>> {
    HttpReplay::new(app.service(), Capture::new().idempotency().clone())
}

/// The class's calls through the degrade layer with `router` as the fallback.
fn layered(d: &Degrader, class: &str, router: FallbackRouter, app: &App) -> Svc {
    let id = d.class_id(class).unwrap();
    BoxCloneSyncService::new(
        d.layer(move |_: &Req| id)
            .http()
            .fallback_with(router)
            .layer(app.service()),
    )
}

/// Keep `n` calls of `class` (`POST /{class}/{i}` with the body `body(i)`) while it is forced
/// open, then reset it: closed with no live call, as after a restart. Their task ids.
async fn kept_then_closed(
    d: &Degrader,
    class: &str,
    svc: &Svc,
    n: usize,
    body: impl Fn(usize) -> &'static str,
) -> Vec<String> {
    d.force_open(class).unwrap();
    let mut ids = Vec::new();
    for i in 0..n {
        let res = call(svc, post(&format!("/{class}/{i}"), body(i))).await;
        assert_eq!(res.status(), StatusCode::ACCEPTED);
        ids.push(task_id(&res).to_string());
    }
    d.reset(class).unwrap();
    ids
}

/// A fallback router over `store`, replaying into `app`; its worker is not started.
fn unstarted(d: &Degrader, store: Arc<MemoryStore>, app: &App) -> FallbackRouter {
    let (router, _worker) = FallbackRouter::builder(d)
        .shared_store(store)
        .replay(replay(app))
        .build()
        .unwrap();
    router
}

/// `class`'s calls through the layer with a fallback router over a memory store, replaying
/// into `app`, set up further by `with`; its worker is not started.
fn router_for(
    d: &Degrader,
    class: &str,
    app: &App,
    with: impl FnOnce(FallbackRouterBuilder) -> FallbackRouterBuilder,
) -> (Arc<MemoryStore>, FallbackRouter, FallbackWorker, Svc) {
    let store = Arc::new(MemoryStore::default());
    let builder = FallbackRouter::builder(d)
        .shared_store(store.clone())
        .replay(replay(app));
    let (router, worker) = with(builder).build().unwrap();
    let svc = layered(d, class, router.clone(), app);
    (store, router, worker, svc)
}

/// `class`'s calls through the layer with the default fallback router over a memory store,
/// replayed into `app` by a running worker.
fn kept(d: &Degrader, class: &str, app: &App) -> (Arc<MemoryStore>, Svc) {
    let (store, _, worker, svc) = router_for(d, class, app, |b| b);
    tokio::spawn(worker.run());
    (store, svc)
}

async fn call(svc: &Svc, req: Req) -> Res {
    svc.clone().oneshot(req).await.unwrap()
}

fn task_id(res: &Res) -> TaskId {
    res.headers()[TASK_ID_HEADER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// `other` was refused as another request under `first`'s idempotency key, naming its task.
fn assert_key_reused(other: &Res, first: &Res, what: &str) {
    assert_eq!(other.status(), StatusCode::UNPROCESSABLE_ENTITY, "{what}");
    assert_eq!(other.headers()[REASON_HEADER], "key_reused", "{what}");
    assert_eq!(task_id(other), task_id(first), "{what}");
    // Said to the client too (it had no word of it: an adopter's trial).
    let told = format!(
        "idempotency key already used by task {} for a different request (method, target or \
         body)",
        task_id(first)
    );
    assert_eq!(other.headers()[DETAIL_HEADER], told.as_str(), "{what}");
}

/// Let the worker run for `ms` of (paused) time.
async fn run_for(ms: u64) {
    for _ in 0..ms / 10 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ===== spool and backfill =====

#[tokio::test(start_paused = true)]
async fn spooled_calls_are_stored_then_accepted_and_backfilled_once_when_healthy() {
    let d = degrader([ClassConfig::bronze("browse").fallback_route(Route::Spool)]);
    let app = App::default();
    let (store, svc) = kept(&d, "browse", &app);
    d.force_open("browse").unwrap();
    d.tick_now();

    let mut ids = Vec::new();
    for i in 0..20 {
        let res = call(&svc, post(&format!("/log/{i}"), "viewed")).await;
        assert_eq!(res.status(), StatusCode::ACCEPTED);
        assert_eq!(res.headers()[ROUTE_HEADER], "spool");
        assert_eq!(res.headers()[REASON_HEADER], "forced_open");
        // As the layer's other answers, for a client that checks it (an outbound call's
        // caller telling the layer's 202 from the provider's).
        let degraded = res.extensions().get::<tower_degrade::Degraded>().unwrap();
        assert_eq!(
            (degraded.class(), degraded.route(), degraded.reason()),
            (
                "browse",
                Route::Spool,
                tower_degrade::gate::Reason::ForcedOpen
            )
        );
        let id = task_id(&res);
        // Answered only after it was stored.
        assert!(store.get(Queue::Spool, id).await.unwrap().is_some());
        ids.push(id);
    }
    assert_eq!(store.depth(Queue::Spool).len, 20);

    // Still open: nothing is replayed.
    run_for(2_000).await;
    assert!(app.seen().is_empty());

    d.reset("browse").unwrap();
    d.tick_now();
    run_for(2_000).await;
    let seen = app.seen();
    assert_eq!(seen.len(), 20, "each kept call replayed once");
    for (i, (uri, key, attempt, body)) in seen.iter().enumerate() {
        assert_eq!(uri, &format!("/log/{i}"));
        assert_eq!(key.as_deref(), Some(ids[i].to_string().as_str()));
        assert_eq!(attempt.as_deref(), Some("1"));
        assert_eq!(&body[..], b"viewed");
    }
    assert_eq!(store.depth(Queue::Spool).len, 0);
}

#[tokio::test(start_paused = true)]
async fn a_class_without_live_calls_is_probed_with_its_spool_and_drains_once_recovered() {
    use tower_degrade::breaker::State;
    let d = degrader([ClassConfig::bronze("browse").fallback_route(Route::Spool)]);
    // The dependency fails the 25 live calls and the first replay, then recovers.
    let app = App::default().failing(26, 503);
    let (store, svc) = kept(&d, "browse", &app);
    for _ in 0..25 {
        call(&svc, post("/log", "live")).await;
    }
    d.tick_now();
    let state = |d: &Degrader| {
        d.status()
            .classes
            .iter()
            .find(|c| &*c.name == "browse")
            .unwrap()
            .state
    };
    assert_eq!(state(&d), State::Open);
    let mut kept = Vec::new();
    for i in 0..10 {
        let res = call(&svc, post(&format!("/log/{i}"), "kept")).await;
        assert_eq!(res.status(), StatusCode::ACCEPTED);
        kept.push(task_id(&res).to_string());
    }
    // Then no live call at all (a queue consumer that stopped): only the control loop ticks.
    let (logs, guard) = logs::Logs::capture();
    let mut states = Vec::new();
    for _ in 0..80 {
        run_for(500).await;
        d.tick_now();
        states.push(state(&d));
    }
    drop(guard);
    assert!(states.contains(&State::HalfOpen), "{states:?}");
    // The failed probe is said with what it answered: with no live calls, the only sign of
    // a replay that cannot reach its service.
    let text = logs.text();
    assert!(
        text.contains("a probe replay failed") && text.contains("503"),
        "{text}"
    );
    assert_eq!(store.depth(Queue::Spool).len, 0, "states: {states:?}");
    let replays: Vec<_> = app
        .seen()
        .into_iter()
        .filter(|s| &s.3[..] == b"kept")
        .collect();
    // Every kept call served once, plus the probe that failed; no attempt was spent on it.
    assert_eq!(replays.len(), 11);
    assert!(
        replays
            .iter()
            .all(|(_, _, attempt, _)| attempt.as_deref() == Some("1"))
    );
    let mut served: Vec<_> = replays[1..]
        .iter()
        .map(|(_, k, _, _)| k.clone().unwrap())
        .collect();
    served.sort();
    kept.sort();
    assert_eq!(served, kept);
}

#[tokio::test(start_paused = true)]
async fn a_spool_whose_replays_fail_in_a_closed_class_waits_for_its_dependency() {
    // A restart during an outage: the class starts closed and has no live call to open its
    // breaker, so only the replays tell that its dependency is down. The spool must wait for
    // it, not spend every task's attempts and move them all to manual review.
    let d = degrader([ClassConfig::bronze("browse").fallback_route(Route::Spool)]);
    let app = App::default().failing(usize::MAX, 503);
    let (store, _, worker, svc) = router_for(&d, "browse", &app, |b| {
        b.retry(RetryPolicy::default().max_attempts(3))
    });
    tokio::spawn(worker.run());
    let mut kept = kept_then_closed(&d, "browse", &svc, 10, |_| "kept").await;
    for _ in 0..1_200 {
        run_for(500).await;
        d.tick_now();
    }
    // Ten minutes down: nothing given up on, and the dependency was not hammered: the first
    // replays, then one probe at a time on the retry policy's backoff (at most 30 s).
    assert_eq!(store.depth(Queue::Review).len, 0);
    assert_eq!(store.depth(Queue::Spool).len, 10);
    let tried = app.seen().len();
    assert!((11..=60).contains(&tried), "{tried} replays in 10 minutes");
    for id in &kept {
        let t = store
            .get(Queue::Spool, id.parse().unwrap())
            .await
            .unwrap()
            .unwrap();
        assert!(t.attempts() <= 1, "{id}: {} attempts spent", t.attempts());
        assert_eq!(t.last_answer(), Some("HTTP 503 Service Unavailable"));
    }

    // The dependency is back: the next probe is served and the backfill goes on.
    app.fail.store(0, Ordering::SeqCst);
    for _ in 0..80 {
        run_for(500).await;
        d.tick_now();
    }
    assert_eq!(store.depth(Queue::Spool).len, 0);
    assert_eq!(store.depth(Queue::Review).len, 0);
    let mut served: Vec<_> = app.seen()[tried..]
        .iter()
        .map(|(_, k, _, _)| k.clone().unwrap())
        .collect();
    served.sort();
    kept.sort();
    assert_eq!(served, kept, "each served once");
}

#[tokio::test(start_paused = true)]
async fn a_class_forced_closed_by_an_operator_is_backfilled() {
    let d = degrader([ClassConfig::bronze("browse").fallback_route(Route::Spool)]);
    let app = App::default();
    let (store, svc) = kept(&d, "browse", &app);
    d.force_open("browse").unwrap();
    d.tick_now();
    for i in 0..5 {
        let res = call(&svc, post(&format!("/log/{i}"), "kept")).await;
        assert_eq!(res.status(), StatusCode::ACCEPTED);
    }
    d.force_closed("browse").unwrap();
    d.tick_now();
    run_for(2_000).await;
    assert_eq!(store.depth(Queue::Spool).len, 0);
    assert_eq!(app.seen().len(), 5);
}

#[tokio::test(start_paused = true)]
async fn backfill_waits_for_the_off_peak_window_and_keeps_to_its_rate() {
    let d = degrader([ClassConfig::bronze("browse").fallback_route(Route::Spool)]);
    let app = App::default();
    let store = Arc::new(MemoryStore::default());
    // A window that opens one to two minutes from now.
    let now_min = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 60)
        % (24 * 60);
    let hhmm = |m: u64| format!("{:02}:{:02}", (m / 60) % 24, m % 60);
    let (start, end) = (hhmm(now_min + 2), hhmm(now_min + 30));
    let (router, worker) = FallbackRouter::builder(&d)
        .shared_store(store.clone())
        .replay(replay(&app))
        .backfill(Backfill::default().window(&start, &end).unwrap().rate(10.0))
        .build()
        .unwrap();
    let svc = layered(&d, "browse", router, &app);
    tokio::spawn(worker.run());
    d.force_open("browse").unwrap();
    d.tick_now();
    for _ in 0..500 {
        assert_eq!(
            call(&svc, post("/log", "x")).await.status(),
            StatusCode::ACCEPTED
        );
    }
    d.reset("browse").unwrap();
    d.tick_now();
    // Healthy, but not yet off-peak: nothing for the first minute.
    run_for(55_000).await;
    assert!(app.seen().is_empty());
    let mut waited = 0;
    while app.seen().is_empty() {
        run_for(1_000).await;
        waited += 1;
        assert!(waited < 130, "the window opened");
    }
    // In the window: 10 replays/s.
    let first = app.seen().len();
    run_for(3_000).await;
    let grown = app.seen().len() - first;
    assert!(
        (25..=35).contains(&grown),
        "about 10 replays/s: {grown} in 3 s"
    );
}

#[tokio::test(start_paused = true)]
async fn the_backfill_rate_gauge_reads_the_replays_a_second() {
    // The worker steps whenever a replay ends as well as every period: the gauge is over a
    // second of steps, not the last step's (0 where it found no replay free to start, though
    // 20 a second are replayed; a burst over a few milliseconds, hundreds).
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);
    let d = degrader([ClassConfig::bronze("browse").fallback_route(Route::Spool)]);
    let store = Arc::new(MemoryStore::default());
    let (router, worker) = FallbackRouter::builder(&d)
        .shared_store(store.clone())
        // Four replays at a time, each 200 ms: 20 a second, under the rate of 50; the four
        // started together end together, each a step of its own.
        .replay(replay_fn(|_, _| async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            Replayed::Done
        }))
        .concurrency(4)
        .backfill(Backfill::default().rate(50.0))
        .build()
        .unwrap();
    let svc = layered(&d, "browse", router, &App::default());
    tokio::spawn(worker.run());
    d.force_open("browse").unwrap();
    d.tick_now();
    for _ in 0..400 {
        call(&svc, post("/log", "x")).await;
    }
    d.reset("browse").unwrap();
    d.tick_now();
    // The recorder's reads take the value (a gauge reads 0 until set again): those set.
    let mut set = Vec::new();
    run_for(1_500).await;
    for _ in 0..50 {
        run_for(100).await;
        let rate = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .find(|(k, _, _, _)| k.key().name() == tower_degrade::metrics::FALLBACK_BACKFILL_RATE)
            .map(|(_, _, _, v)| match v {
                metrics_util::debugging::DebugValue::Gauge(g) => g.into_inner(),
                other => panic!("{other:?}"),
            })
            .unwrap();
        if rate != 0.0 {
            set.push(rate);
        }
    }
    assert!(
        set.len() >= 4 && set.iter().all(|r| (16.0..=24.0).contains(r)),
        "about 20 replays a second: {set:?}"
    );
    assert!(store.depth(Queue::Spool).len > 0, "still replaying");
}

#[tokio::test(start_paused = true)]
async fn backfill_stops_the_moment_the_class_degrades_again() {
    let d = degrader([ClassConfig::bronze("browse").fallback_route(Route::Spool)]);
    let app = App::default();
    let (store, _, worker, svc) = router_for(&d, "browse", &app, |b| {
        b.backfill(Backfill::default().rate(10.0))
    });
    tokio::spawn(worker.run());
    d.force_open("browse").unwrap();
    d.tick_now();
    for _ in 0..100 {
        call(&svc, post("/log", "x")).await;
    }
    d.reset("browse").unwrap();
    d.tick_now();
    run_for(1_000).await;
    let before = app.seen().len();
    assert!(before > 0);
    d.degrade("browse").unwrap();
    d.tick_now();
    run_for(5_000).await;
    assert_eq!(app.seen().len(), before, "no replay while degraded");
    d.reset("browse").unwrap();
    d.tick_now();
    run_for(20_000).await;
    assert_eq!(app.seen().len(), 100, "every task replayed once in the end");
    assert_eq!(store.depth(Queue::Spool).len, 0);
}

// ===== delayed retry and manual review =====

#[tokio::test(start_paused = true)]
async fn delayed_retries_back_off_then_succeed_with_the_same_key() {
    let d = degrader([ClassConfig::gold("pay").fallback_route(Route::DelayedRetry)]);
    let app = App::default().failing(3, 503);
    let (store, svc) = kept(&d, "pay", &app);
    d.force_open("pay").unwrap();
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let local = metrics::set_default_local_recorder(&recorder);
    let res = call(
        &svc,
        Request::post("/pay/7")
            .header("idempotency-key", "order-7")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap(),
    )
    .await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    // The same key again: the same task, nothing kept twice.
    let again = call(
        &svc,
        Request::post("/pay/7")
            .header("idempotency-key", "order-7")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap(),
    )
    .await;
    assert_eq!(task_id(&again), task_id(&res));
    assert_eq!(store.depth(Queue::Retry).len, 1);
    // The same key on another request is refused, not taken for the first (nor kept).
    for (uri, body) in [("/pay/8", "{}"), ("/pay/7", "{\"amount\":999999}")] {
        let other = call(
            &svc,
            Request::post(uri)
                .header("idempotency-key", "order-7")
                .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
                .unwrap(),
        )
        .await;
        assert_key_reused(&other, &res, &format!("{uri} {body}"));
    }
    assert_eq!(store.depth(Queue::Retry).len, 1);
    // Each call its result: the gold refusal alert reads the two refused.
    drop(local);
    let kept = kept_results(&snapshotter);
    let counter = metrics_util::debugging::DebugValue::Counter;
    assert_eq!(kept.get("kept"), Some(&counter(1)), "{kept:?}");
    assert_eq!(kept.get("already_kept"), Some(&counter(1)), "{kept:?}");
    assert_eq!(kept.get("key_reused"), Some(&counter(2)), "{kept:?}");

    // Nothing is replayed into a class that cannot take it (here forced open).
    run_for(5_000).await;
    assert!(app.seen().is_empty(), "{:?}", app.seen());
    // Healthy again: the first attempt (long due), then waits of [0.5, 1] s, [1, 2] s, [2, 4] s.
    d.reset("pay").unwrap();
    run_for(200).await;
    assert_eq!(app.seen().len(), 1);
    run_for(7_500).await;
    let seen = app.seen();
    assert_eq!(seen.len(), 4, "three failures, then success");
    let attempts: Vec<_> = seen.iter().map(|s| s.2.clone().unwrap()).collect();
    assert_eq!(attempts, ["1", "2", "3", "4"]);
    assert!(seen.iter().all(|s| s.1.as_deref() == Some("order-7")));
    assert_eq!(store.depth(Queue::Retry).len, 0);
    assert_eq!(store.depth(Queue::Review).len, 0);
}

#[tokio::test(start_paused = true)]
async fn a_quiet_class_s_delayed_retries_wait_out_an_outage_its_breaker_never_sees() {
    // A user's trial: a queue consumer restarted during a database outage, with no live call
    // to open its breaker; its 650 kept tasks spent their five attempts in 15 s, and every
    // one went to manual review.
    let d = degrader([ClassConfig::silver("events").fallback_route(Route::DelayedRetry)]);
    let app = App::default().failing(usize::MAX, 503);
    // One task the database refuses whatever its state (a constraint it breaks).
    *app.poison.lock().unwrap() = Some(Bytes::from_static(b"poison"));
    let (store, _router, worker, svc) = router_for(&d, "events", &app, |b| {
        b.retry(RetryPolicy::default().max_attempts(5))
            .concurrency(4)
    });
    tokio::spawn(worker.run());
    // Closed, and no live call: as after a restart.
    kept_then_closed(
        &d,
        "events",
        &svc,
        40,
        |i| if i == 20 { "poison" } else { "x" },
    )
    .await;
    run_for(60_000).await;
    assert_eq!(
        store.depth(Queue::Review).len,
        0,
        "none sent to review by the outage"
    );
    let spent = app.seen().len();
    assert!(
        spent <= 16,
        "{spent} replays in a minute: the first round, then one at a time, backing off"
    );
    // The database is back: every task is served once; the poisoned one, failing on its own
    // account again and again (a probe the first time, no attempt spent), goes to review
    // with its attempts spent, and holds nothing back meanwhile (in a trial, due again each
    // time the hold let a probe go, it held the others parked for ever).
    app.fail.store(0, Ordering::SeqCst);
    run_for(120_000).await;
    assert_eq!(store.depth(Queue::Retry).len, 0);
    assert_eq!(store.depth(Queue::Review).len, 1);
    let after = &app.seen()[spent..];
    let served: std::collections::HashSet<_> = after
        .iter()
        .filter(|s| s.3 != "poison")
        .map(|s| s.0.clone())
        .collect();
    let others = after.iter().filter(|s| s.3 != "poison").count();
    assert_eq!((served.len(), others), (39, 39), "each once");
}

#[tokio::test(start_paused = true)]
async fn a_dependency_that_fails_again_as_a_hold_lifts_holds_it_again() {
    // The probe served just before is in the class's windows for a while, and is not a live
    // call: taken for one, it let the replays that failed next spend their attempts.
    let d = degrader([ClassConfig::silver("events").fallback_route(Route::DelayedRetry)]);
    let app = App::default().failing(usize::MAX, 503);
    let (store, _router, worker, svc) = router_for(&d, "events", &app, |b| {
        b.retry(RetryPolicy::default().max_attempts(3))
    });
    tokio::spawn(worker.run());
    kept_then_closed(&d, "events", &svc, 10, |_| "x").await;
    run_for(30_000).await;
    // One call served, the next probe's; the dependency fails again at once.
    app.serve_next.store(true, Ordering::SeqCst);
    for _ in 0..120 {
        run_for(500).await;
        d.tick_now();
    }
    assert_eq!(store.depth(Queue::Retry).len, 9);
    assert_eq!(
        store.depth(Queue::Review).len,
        0,
        "held again, no attempt run out"
    );
}

#[tokio::test(start_paused = true)]
async fn tasks_failing_on_their_own_in_a_quiet_class_go_to_review_at_their_deadline() {
    // Two tasks the dependency refuses whatever its state, in a class with no live calls:
    // they cannot be told from an outage and hold the class, each failed probe spending none
    // of its attempts; their deadline still ends it (the last of them is never parked, where
    // a task's deadline was checked, and was replayed every 30 s for good).
    let d = degrader([ClassConfig::silver("events").fallback_route(Route::DelayedRetry)]);
    let app = App::default().failing(0, 503);
    *app.poison.lock().unwrap() = Some(Bytes::from_static(b"poison"));
    let (store, _router, worker, svc) = router_for(&d, "events", &app, |b| {
        b.retry(RetryPolicy::default().deadline(Some(Duration::from_secs(120))))
    });
    tokio::spawn(worker.run());
    kept_then_closed(&d, "events", &svc, 2, |_| "poison").await;
    // (A probe whose next turn, at most 30 s on, lands past the deadline goes to review
    // then: from 90 s on.)
    run_for(85_000).await;
    assert_eq!(
        store.depth(Queue::Review).len,
        0,
        "held, within the deadline"
    );
    run_for(75_000).await;
    assert_eq!(store.depth(Queue::Retry).len, 0);
    assert_eq!(store.depth(Queue::Review).len, 2);
}

#[tokio::test(start_paused = true)]
async fn exhausted_retries_and_refusals_go_to_manual_review_with_the_answer() {
    let d = degrader([ClassConfig::gold("pay").fallback_route(Route::DelayedRetry)]);
    let app = App::default().failing(usize::MAX, 503);
    let (store, router, worker, svc) = router_for(&d, "pay", &app, |b| {
        b.retry(RetryPolicy::default().max_attempts(3))
    });
    let review = router.review();
    tokio::spawn(worker.run());
    d.force_open("pay").unwrap();
    let id = task_id(&call(&svc, post("/pay/1", "a")).await);
    d.reset("pay").unwrap();
    run_for(10_000).await;
    assert_eq!(app.seen().len(), 3);
    let t = review.show(id).await.unwrap().expect("in review");
    assert_eq!(t.attempts(), 3);
    assert_eq!(t.last_answer(), Some("HTTP 503 Service Unavailable"));

    // A 4xx answer goes to review after its first attempt.
    *app.status.lock().unwrap() = 422;
    d.force_open("pay").unwrap();
    let id2 = task_id(&call(&svc, post("/pay/2", "b")).await);
    d.reset("pay").unwrap();
    run_for(1_200).await;
    let t2 = review.show(id2).await.unwrap().expect("in review at once");
    assert_eq!(t2.attempts(), 1);
    assert!(t2.last_answer().unwrap().contains("422"));

    // List (paged), requeue (replays now and succeeds), drop (audited).
    let page = review.list(None, 1).await.unwrap();
    assert_eq!(page.tasks.len(), 1);
    let page2 = review.list(page.next, 10).await.unwrap();
    assert_eq!(page2.tasks.len(), 1);
    app.fail.store(0, Ordering::SeqCst);
    assert!(review.requeue(id).await.unwrap());
    run_for(500).await;
    assert_eq!(app.seen().len(), 5);
    assert!(review.show(id).await.unwrap().is_none());
    assert_eq!(store.depth(Queue::Retry).len, 0);
    // Who and why, as the admin API checks them: an empty `by` was kept as "dropped by : ".
    let long = "x".repeat(1_025);
    for (by, reason) in [
        ("", "dup"),
        ("ops", " "),
        (long.as_str(), "dup"),
        ("ops", &long),
    ] {
        let err = review.drop_task(id2, by, reason).await.unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Invalid, "{err}");
    }
    assert!(review.show(id2).await.unwrap().is_some(), "nothing dropped");
    assert!(
        review
            .drop_task(id2, "ops@shop", "duplicate order")
            .await
            .unwrap()
    );
    assert!(!review.drop_task(id2, "ops@shop", "again").await.unwrap());
    let audit = review.audit(None, 10).await.unwrap();
    assert_eq!(
        audit.tasks[0].last_answer(),
        Some("dropped by ops@shop: duplicate order")
    );
    assert_eq!(review.depth().len, 0);
}

/// A delayed retry whose first replay panics (or, with `hang`, never ends and times out):
/// that is a failed attempt, and the second replay is done.
async fn first_replay_misbehaves(hang: bool) {
    let d = degrader([ClassConfig::gold("pay").fallback_route(Route::DelayedRetry)]);
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let store = Arc::new(MemoryStore::default());
    let (router, worker) = FallbackRouter::builder(&d)
        .shared_store(store.clone())
        .replay_timeout(Duration::from_secs(2))
        .replay(replay_fn(move |_task, _attempt| {
            let first = c.fetch_add(1, Ordering::SeqCst) == 0;
            async move {
                match (first, hang) {
                    (true, true) => std::future::pending::<()>().await,
                    (true, false) => panic!("the handler panicked"),
                    _ => {}
                }
                Replayed::Done
            }
        }))
        .build()
        .unwrap();
    let svc = layered(&d, "pay", router, &App::default());
    tokio::spawn(worker.run());
    d.force_open("pay").unwrap();
    call(&svc, post("/pay", "x")).await;
    d.reset("pay").unwrap();
    run_for(6_000).await;
    assert_eq!(calls.load(Ordering::SeqCst), 2, "retried once, then done");
    assert_eq!(store.depth(Queue::Retry).len, 0);
}

#[tokio::test(start_paused = true)]
async fn a_hung_replay_holds_back_only_its_own_task() {
    // One payment's replay hangs (a dependency that never answers, 10 s replay timeout);
    // another payment and a spooled log kept after it are replayed at once all the same.
    let d = degrader([
        ClassConfig::gold("pay").fallback_route(Route::DelayedRetry),
        ClassConfig::bronze("browse").fallback_route(Route::Spool),
    ]);
    let t0 = tokio::time::Instant::now();
    let replayed = Arc::new(Mutex::new(Vec::new()));
    let r = replayed.clone();
    let (router, worker) = FallbackRouter::builder(&d)
        .store(MemoryStore::default())
        .replay_timeout(Duration::from_secs(10))
        .replay(replay_fn(move |task, _| {
            let uri = match task.payload() {
                Payload::Http(req) => req.uri.clone(),
                _ => String::new(),
            };
            let r = r.clone();
            async move {
                if uri == "/pay/hang" {
                    std::future::pending::<()>().await;
                }
                r.lock().unwrap().push((uri, t0.elapsed()));
                Replayed::Done
            }
        }))
        .build()
        .unwrap();
    let pay = layered(&d, "pay", router.clone(), &App::default());
    let browse = layered(&d, "browse", router, &App::default());
    tokio::spawn(worker.run());
    d.force_open("pay").unwrap();
    d.force_open("browse").unwrap();
    d.tick_now();
    call(&pay, post("/pay/hang", "x")).await;
    d.reset("pay").unwrap();
    // Its first attempt starts within the first wait (at most 1 s), and hangs.
    run_for(1_100).await;
    d.force_open("pay").unwrap();
    call(&pay, post("/pay/ok", "x")).await;
    call(&browse, post("/log", "x")).await;
    d.reset("pay").unwrap();
    d.reset("browse").unwrap();
    d.tick_now();
    run_for(1_200).await;
    let seen = replayed.lock().unwrap().clone();
    let uris: Vec<&str> = seen.iter().map(|(u, _)| u.as_str()).collect();
    assert_eq!(uris.len(), 2, "{seen:?}");
    assert!(
        uris.contains(&"/pay/ok") && uris.contains(&"/log"),
        "{seen:?}"
    );
    // Long before the hung replay's 10 s timeout.
    assert!(
        seen.iter()
            .all(|(_, at)| *at < Duration::from_millis(2_400)),
        "{seen:?}"
    );
}

/// A memory store whose commits fail while `down` is set (a Redis that went away), and land
/// 100 ms after they are handed over while `slow` is set, whether or not anyone still waits
/// for them (as the embedded store's writer thread commits).
#[derive(Clone, Default)]
struct Flaky {
    inner: Arc<MemoryStore>,
    down: Arc<std::sync::atomic::AtomicBool>,
    slow: Arc<std::sync::atomic::AtomicBool>,
}

impl Store for Flaky {
    fn commit(&self, ops: Vec<Op>) -> tower_degrade::fallback::store::StoreFuture<'_, ()> {
        if self.slow.load(Ordering::SeqCst) {
            let inner = self.inner.clone();
            let landed = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                inner.commit(ops).await
            });
            return Box::pin(async move { landed.await.unwrap() });
        }
        if self.down.load(Ordering::SeqCst) {
            return Box::pin(async {
                Err(tower_degrade::fallback::StoreError::new(
                    tower_degrade::fallback::store::StoreErrorKind::Io,
                    "connection refused",
                ))
            });
        }
        self.inner.commit(ops)
    }
    fn due(
        &self,
        queue: Queue,
        now_ms: u64,
        limit: usize,
    ) -> tower_degrade::fallback::store::StoreFuture<'_, Vec<Task>> {
        self.inner.due(queue, now_ms, limit)
    }
    fn release(&self, queue: Queue, id: TaskId) {
        self.inner.release(queue, id)
    }
    fn list(
        &self,
        queue: Queue,
        after: Option<TaskId>,
        limit: usize,
    ) -> tower_degrade::fallback::store::StoreFuture<'_, Vec<Task>> {
        self.inner.list(queue, after, limit)
    }
    fn get(
        &self,
        queue: Queue,
        id: TaskId,
    ) -> tower_degrade::fallback::store::StoreFuture<'_, Option<Task>> {
        self.inner.get(queue, id)
    }
    fn find_key<'a>(
        &'a self,
        class: &'a str,
        key: &'a str,
    ) -> tower_degrade::fallback::store::StoreFuture<'a, Option<(Queue, TaskId)>> {
        self.inner.find_key(class, key)
    }
    fn depth(&self, queue: Queue) -> tower_degrade::fallback::store::Depth {
        self.inner.depth(queue)
    }
    fn kind(&self) -> &'static str {
        "flaky"
    }
}

/// The batches [`inventory`] wrote.
type Writes = Arc<Mutex<Vec<Batch<i64>>>>;

/// A router over a [`Flaky`] store with `inv` merged into [`inventory`]: the store, the
/// inventory's writes, the router and its worker (not spawned).
fn on_flaky_with_inventory(d: &Degrader) -> (Flaky, Writes, FallbackRouter, FallbackWorker) {
    let store = Flaky::default();
    let writes = Arc::new(Mutex::new(Vec::new()));
    let (router, worker) = FallbackRouter::builder(d)
        .store(store.clone())
        .replay(replay(&App::default()))
        .batch_merge("inv", inventory(writes.clone(), Arc::default()))
        .build()
        .unwrap();
    (store, writes, router, worker)
}

#[tokio::test(start_paused = true)]
async fn a_call_its_client_gave_up_on_mid_commit_still_holds_its_key() {
    // The client goes away while its call's commit is in flight (a disconnect, an outer
    // timeout), then sends the call again with its key: the same task, not a second one; a
    // batch_merge delta is merged, not left in the journal until a restart.
    let d = degrader([
        ClassConfig::gold("pay").fallback_route(Route::DelayedRetry),
        ClassConfig::silver("inv").fallback_route(Route::BatchMerge),
    ]);
    let (store, writes, router, worker) = on_flaky_with_inventory(&d);
    tokio::spawn(worker.run());
    let app = App::default();
    let pay = layered(&d, "pay", router.clone(), &app);
    let inv = layered(&d, "inv", router.clone(), &app);
    d.force_open("pay").unwrap();
    d.force_open("inv").unwrap();
    store.slow.store(true, Ordering::SeqCst);
    let req = |uri: &str, body: &'static str| {
        Request::post(uri)
            .header("idempotency-key", "k-1")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    };
    for (svc, uri, body) in [(&pay, "/pay/1", "{}"), (&inv, "/inv/sku-a", "1")] {
        let gave_up =
            tokio::time::timeout(Duration::from_millis(10), call(svc, req(uri, body))).await;
        assert!(gave_up.is_err(), "{uri}: answered before its commit landed");
        let again = call(svc, req(uri, body)).await;
        assert_eq!(again.status(), StatusCode::ACCEPTED, "{uri}");
    }
    run_for(1_000).await;
    assert_eq!(
        store.inner.depth(Queue::Retry).len,
        1,
        "the payment kept once"
    );
    let writes = writes.lock().unwrap();
    assert_eq!(
        totals(&writes).get("sku-a"),
        Some(&1),
        "the delta merged once"
    );
    assert_eq!(
        store.inner.depth(Queue::Journal).len,
        0,
        "and its journal emptied"
    );
}

#[tokio::test(start_paused = true)]
async fn a_store_down_under_batch_merge_is_said_once_not_at_every_flush() {
    // A flush runs every 100 ms: a batch it cannot seal was a warning each time, ten lines
    // a second for as long as the store was down. Now at most one every 10 s (of the
    // machine's time: this test's paused seconds take milliseconds of it), and its end once.
    let d = degrader([ClassConfig::silver("inv").fallback_route(Route::BatchMerge)]);
    let (store, writes, router, worker) = on_flaky_with_inventory(&d);
    let inv = layered(&d, "inv", router, &App::default());
    d.force_open("inv").unwrap();
    for sku in ["sku-a", "sku-b", "sku-a"] {
        let res = call(&inv, post(&format!("/inv/{sku}"), "2")).await;
        assert_eq!(res.status(), StatusCode::ACCEPTED);
    }
    let (logs, guard) = logs::Logs::capture();
    store.down.store(true, Ordering::SeqCst);
    tokio::spawn(worker.run());
    run_for(5_000).await;
    store.down.store(false, Ordering::SeqCst);
    run_for(500).await;
    drop(guard);
    let text = logs.text();
    let said = text.matches("the batch cannot be sealed").count();
    assert!((1..=2).contains(&said), "{said} lines: {text}");
    assert_eq!(
        text.matches("the store takes the batches again").count(),
        1,
        "{text}"
    );
    // Nothing lost meanwhile: the deltas stayed journaled, and were written once.
    let t = totals(&writes.lock().unwrap());
    assert_eq!((t.get("sku-a"), t.get("sku-b")), (Some(&4), Some(&2)));
}

#[tokio::test(start_paused = true)]
async fn a_replay_done_while_the_store_is_down_is_acknowledged_later_not_replayed_again() {
    // The store goes away while a replay runs: its outcome cannot be stored. It is stored
    // once the store is back; the replay is not done a second time meanwhile.
    let d = degrader([ClassConfig::gold("pay").fallback_route(Route::DelayedRetry)]);
    let store = Flaky::default();
    let done = Arc::new(AtomicUsize::new(0));
    let n = done.clone();
    let (router, worker) = FallbackRouter::builder(&d)
        .store(store.clone())
        .replay(replay_fn(move |_, _| {
            n.fetch_add(1, Ordering::SeqCst);
            async { Replayed::Done }
        }))
        .build()
        .unwrap();
    let pay = layered(&d, "pay", router, &App::default());
    d.force_open("pay").unwrap();
    call(&pay, post("/pay/1", "x")).await;
    d.reset("pay").unwrap();
    store.down.store(true, Ordering::SeqCst);
    tokio::spawn(worker.run());
    run_for(5_000).await;
    assert_eq!(done.load(Ordering::SeqCst), 1, "replayed once, not again");
    assert_eq!(store.depth(Queue::Retry).len, 1, "not acknowledged yet");
    store.down.store(false, Ordering::SeqCst);
    run_for(500).await;
    assert_eq!(
        store.depth(Queue::Retry).len,
        0,
        "acknowledged once the store is back"
    );
    assert_eq!(done.load(Ordering::SeqCst), 1);
}

/// A router whose replays each take a second, counting those started and those finished.
fn one_second_replays(
    d: &Degrader,
) -> (
    Arc<MemoryStore>,
    FallbackRouter,
    FallbackWorker,
    Arc<AtomicUsize>,
    Arc<AtomicUsize>,
) {
    let (started, finished) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (s, f) = (started.clone(), finished.clone());
    let store = Arc::new(MemoryStore::default());
    let (router, worker) = FallbackRouter::builder(d)
        .shared_store(store.clone())
        .replay(replay_fn(move |_, _| {
            let (s, f) = (s.clone(), f.clone());
            async move {
                s.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(1)).await;
                f.fetch_add(1, Ordering::SeqCst);
                Replayed::Done
            }
        }))
        .build()
        .unwrap();
    (store, router, worker, started, finished)
}

#[tokio::test(start_paused = true)]
async fn stopping_the_worker_stops_its_replays_and_keeps_their_tasks() {
    let d = degrader([ClassConfig::gold("pay").fallback_route(Route::DelayedRetry)]);
    let (store, router, worker, started, finished) = one_second_replays(&d);
    let pay = layered(&d, "pay", router, &App::default());
    let running = tokio::spawn(worker.run());
    d.force_open("pay").unwrap();
    call(&pay, post("/pay/1", "x")).await;
    d.reset("pay").unwrap();
    // Started within the first wait (at most 1 s); it takes 1 s.
    run_for(1_100).await;
    assert_eq!(started.load(Ordering::SeqCst), 1);
    running.abort();
    run_for(3_000).await;
    assert_eq!(
        finished.load(Ordering::SeqCst),
        0,
        "the replay stopped with its worker"
    );
    assert_eq!(store.depth(Queue::Retry).len, 1, "its task is still kept");
}

#[tokio::test(start_paused = true)]
async fn a_worker_stopped_gracefully_lets_its_replays_end_and_records_them() {
    // Dropped, a worker drops a replay that reached the application before its
    // acknowledgement, and the next worker replays it again (a trial on a slow link to Redis:
    // a batch of 32 at every deploy). Stopped with `run_until`, the replay ends and is stored.
    for (grace_ms, finished_then, kept_then) in [(5_000, 1, 0), (200, 0, 1)] {
        let d = degrader([ClassConfig::gold("pay").fallback_route(Route::DelayedRetry)]);
        let (store, router, worker, started, finished) = one_second_replays(&d);
        let pay = layered(&d, "pay", router, &App::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(worker.run_until(
            async move {
                let _ = stopped.await;
            },
            Duration::from_millis(grace_ms),
        ));
        d.force_open("pay").unwrap();
        call(&pay, post("/pay/1", "x")).await;
        d.reset("pay").unwrap();
        run_for(1_100).await;
        assert_eq!(started.load(Ordering::SeqCst), 1, "grace {grace_ms}");
        assert_eq!(finished.load(Ordering::SeqCst), 0);
        // Kept after the stop: not replayed by this worker.
        d.force_open("pay").unwrap();
        call(&pay, post("/pay/2", "y")).await;
        d.reset("pay").unwrap();
        stop.send(()).unwrap();
        run_for(3_000).await;
        assert!(
            running.is_finished(),
            "grace {grace_ms}: the worker returned"
        );
        assert_eq!(
            started.load(Ordering::SeqCst),
            1,
            "grace {grace_ms}: none started after"
        );
        assert_eq!(
            finished.load(Ordering::SeqCst),
            finished_then,
            "grace {grace_ms}"
        );
        assert_eq!(
            store.depth(Queue::Retry).len,
            1 + kept_then,
            "grace {grace_ms}: the second task kept, the first acknowledged only if it ended"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn the_backoff_runs_from_the_end_of_a_failed_attempt() {
    // A dependency that takes 1 s to answer 503: each wait (400 ms doubling, drawn from
    // [d/2, d]) is counted from the failed answer, not lost in the attempt's own second.
    let d = degrader([ClassConfig::gold("pay").fallback_route(Route::DelayedRetry)]);
    let t0 = tokio::time::Instant::now();
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let a = attempts.clone();
    let (router, worker) = FallbackRouter::builder(&d)
        .store(MemoryStore::default())
        .retry(
            RetryPolicy::default()
                .initial(Duration::from_millis(400))
                .max_interval(Duration::from_secs(4))
                .max_attempts(4),
        )
        .replay(replay_fn(move |_, _| {
            let a = a.clone();
            async move {
                let start = t0.elapsed();
                tokio::time::sleep(Duration::from_secs(1)).await;
                a.lock().unwrap().push((start, t0.elapsed()));
                Replayed::Retry("HTTP 503 Service Unavailable".into())
            }
        }))
        .build()
        .unwrap();
    let review = router.review();
    let pay = layered(&d, "pay", router, &App::default());
    tokio::spawn(worker.run());
    d.force_open("pay").unwrap();
    call(&pay, post("/pay/1", "x")).await;
    d.reset("pay").unwrap();
    run_for(20_000).await;
    let attempts = attempts.lock().unwrap().clone();
    assert_eq!(attempts.len(), 4, "{attempts:?}");
    // The first attempt after the first wait, not at once: the call was diverted because
    // the class could not take it then.
    assert!(
        attempts[0].0 >= Duration::from_millis(200) && attempts[0].0 <= Duration::from_millis(550),
        "{attempts:?}"
    );
    for n in 1..4 {
        let wait = attempts[n].0 - attempts[n - 1].1;
        let d = Duration::from_millis(400 * (1 << (n - 1)));
        // Drawn from [d/2, d], started by the worker's next look (every 100 ms).
        assert!(
            wait >= d / 2 && wait <= d + Duration::from_millis(150),
            "wait {n}: {wait:?} for d = {d:?} ({attempts:?})"
        );
    }
    assert_eq!(review.depth().len, 1, "out of attempts: in review");
}

/// A provider the replays go to: the n-th replay (from 1) is answered `answer(n)`, a status
/// and a `Retry-After`; when each began, from `t0`, is pushed onto `seen`.
fn provider(
    t0: tokio::time::Instant,
    seen: &Arc<Mutex<Vec<Duration>>>,
    answer: fn(usize) -> (u16, Option<&'static str>),
) -> Svc {
    let seen = seen.clone();
    BoxCloneSyncService::new(service_fn(move |_: Req| {
        let mut seen = seen.lock().unwrap();
        seen.push(t0.elapsed());
        let (status, after) = answer(seen.len());
        let mut res = Response::builder().status(status);
        if let Some(after) = after {
            res = res.header("retry-after", after);
        }
        std::future::ready(Ok::<_, Infallible>(
            res.body(Full::new(Bytes::new())).unwrap(),
        ))
    }))
}

/// `pay`, a delayed retry, replayed into `provider` under `retry` by a running worker, one
/// call kept; the store and the manual review.
async fn kept_for(
    d: &Degrader,
    provider: Svc,
    retry: RetryPolicy,
) -> (Arc<MemoryStore>, tower_degrade::fallback::ManualReview) {
    let store = Arc::new(MemoryStore::default());
    let (router, worker) = FallbackRouter::builder(d)
        .shared_store(store.clone())
        .retry(retry)
        .replay(HttpReplay::new(
            provider,
            Capture::new().idempotency().clone(),
        ))
        .build()
        .unwrap();
    let review = router.review();
    let pay = layered(d, "pay", router, &App::default());
    tokio::spawn(worker.run());
    d.force_open("pay").unwrap();
    call(&pay, post("/pay/1", "x")).await;
    d.reset("pay").unwrap();
    (store, review)
}

#[tokio::test(start_paused = true)]
async fn a_replay_asked_to_wait_by_retry_after_is_not_retried_sooner() {
    // A provider rate-limiting the replays: 429 with `Retry-After: 10`, then 200. The backoff
    // alone (400 ms doubling) came back within half a second, into the same 429.
    let d = degrader([ClassConfig::gold("pay").fallback_route(Route::DelayedRetry)]);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let limited = provider(tokio::time::Instant::now(), &seen, |n| match n {
        1 => (429, Some("10")),
        _ => (200, None),
    });
    let retry = RetryPolicy::default()
        .initial(Duration::from_millis(400))
        .max_interval(Duration::from_secs(4))
        .max_attempts(4);
    let (store, review) = kept_for(&d, limited, retry).await;
    run_for(5_000).await;
    assert_eq!(
        seen.lock().unwrap().len(),
        1,
        "retried within the 10 s asked"
    );
    let kept = store.list(Queue::Retry, None, 10).await.unwrap();
    let answer = kept[0].last_answer().unwrap();
    assert!(
        answer.contains("HTTP 429") && answer.contains("asked to wait 10"),
        "{answer}"
    );
    run_for(10_000).await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    let wait = seen[1] - seen[0];
    // Started by the worker's next look (every 100 ms).
    assert!(
        wait >= Duration::from_secs(10) && wait <= Duration::from_millis(10_150),
        "{seen:?}"
    );
    assert_eq!(
        store.depth(Queue::Retry).len,
        0,
        "served on the second attempt"
    );
    assert_eq!(review.depth().len, 0);
}

#[tokio::test(start_paused = true)]
async fn a_wait_asked_for_past_the_deadline_sends_the_task_to_review_at_once() {
    // `Retry-After: 3600` and a deadline of a minute: the task waited the hour and was
    // replayed 59 minutes past its deadline.
    let d = degrader([ClassConfig::gold("pay").fallback_route(Route::DelayedRetry)]);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let limited = provider(tokio::time::Instant::now(), &seen, |_| (429, Some("3600")));
    let retry = RetryPolicy::default().deadline(Some(Duration::from_secs(60)));
    let (_, review) = kept_for(&d, limited, retry).await;
    run_for(5_000).await;
    assert_eq!(seen.lock().unwrap().len(), 1);
    let page = review.list(None, 10).await.unwrap();
    assert_eq!(page.tasks.len(), 1, "in review at once");
    let answer = page.tasks[0].last_answer().unwrap();
    assert!(answer.contains("asked to wait 3600"), "{answer}");
}

/// A degrader of `class` under admission held at `limit` permits.
fn limited(class: ClassConfig, limit: u32) -> Degrader {
    support::builder("test")
        .class(class)
        .admission(
            Admission::adaptive()
                .initial_limit(limit)
                .min_limit(limit)
                .max_limit(limit),
        )
        .build_with_worker()
        .unwrap()
        .0
}

/// The application over a stuck database: each call holds until `db` gives it a permit.
fn stuck(
    db: Arc<tokio::sync::Semaphore>,
) -> impl tower::Service<Req, Response = Res, Error = Infallible, Future: Send> + Clone + Send + Sync
{
    service_fn(move |_: Req| {
        let db = db.clone();
        async move {
            let _held = db.acquire().await.unwrap();
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("ok"))))
        }
    })
}

#[tokio::test(start_paused = true)]
async fn delayed_retries_hold_an_admission_permit_and_never_take_a_class_over_its_limit() {
    // A limit of 2, both held by live calls to a stuck database: the delayed retries of the
    // same class wait for permits instead of piling 5 more calls onto it.
    let d = limited(
        ClassConfig::gold("pay").fallback_route(Route::DelayedRetry),
        2,
    );
    let db = Arc::new(tokio::sync::Semaphore::new(0));
    let (now, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let done = Arc::new(AtomicUsize::new(0));
    let (n, m, dn) = (now.clone(), most.clone(), done.clone());
    let store = Arc::new(MemoryStore::default());
    let (router, worker) = FallbackRouter::builder(&d)
        .shared_store(store.clone())
        .replay(replay_fn(move |_, _| {
            let (n, m, dn) = (n.clone(), m.clone(), dn.clone());
            async move {
                let running = n.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(running, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(300)).await;
                n.fetch_sub(1, Ordering::SeqCst);
                dn.fetch_add(1, Ordering::SeqCst);
                Replayed::Done
            }
        }))
        .build()
        .unwrap();
    let id = d.class_id("pay").unwrap();
    let svc = d
        .layer(move |_: &Req| id)
        .http()
        .fallback_with(router)
        .layer(stuck(db.clone()));
    let live: Vec<_> = (0..2)
        .map(|i| tokio::spawn(svc.clone().oneshot(post(&format!("/pay/{i}"), "x"))))
        .collect();
    run_for(100).await;
    assert_eq!(d.admission()[0].inflight, 2);
    let ops = (0..5)
        .map(|i| {
            let t = Task::new("pay", Some(format!("retry-{i}")), Payload::Bytes(vec![i]));
            Op::Put(Queue::Retry, t)
        })
        .collect();
    store.commit(ops).await.unwrap();
    tokio::spawn(worker.run());
    run_for(2_000).await;
    assert_eq!(
        done.load(Ordering::SeqCst),
        0,
        "no permit free: none replayed"
    );
    db.add_permits(2);
    for call in live {
        call.await.unwrap().unwrap();
    }
    run_for(3_000).await;
    assert_eq!(done.load(Ordering::SeqCst), 5);
    assert_eq!(most.load(Ordering::SeqCst), 2, "at most the limit at once");
    assert_eq!(d.admission()[0].inflight, 0, "every permit given back");
    assert_eq!(store.depth(Queue::Retry).len, 0);
}

#[tokio::test(start_paused = true)]
async fn a_delayed_retry_whose_class_stays_unhealthy_goes_to_review_at_its_deadline() {
    let d = degrader([ClassConfig::gold("pay").fallback_route(Route::DelayedRetry)]);
    let app = App::default();
    let (store, router, worker, svc) = router_for(&d, "pay", &app, |b| {
        b.retry(RetryPolicy::default().deadline(Some(Duration::from_secs(3))))
    });
    let review = router.review();
    tokio::spawn(worker.run());
    d.force_open("pay").unwrap();
    let id = task_id(&call(&svc, post("/pay/1", "a")).await);
    run_for(2_500).await;
    assert_eq!(store.depth(Queue::Retry).len, 1, "waiting for its class");
    run_for(1_000).await;
    let t = review
        .show(id)
        .await
        .unwrap()
        .expect("in review at its deadline");
    assert_eq!(t.attempts(), 0);
    assert!(t.last_answer().unwrap().contains("deadline"), "{t:?}");
    assert_eq!(store.depth(Queue::Retry).len, 0);
    assert!(app.seen().is_empty(), "never replayed into the open class");
}

#[tokio::test(start_paused = true)]
async fn a_class_in_a_dry_run_has_its_kept_calls_replayed() {
    // `metrics_only`: the breaker decides and reports but admits every call, so what was kept
    // before may go too (it waited for ever: a dry run is not a healthy state by name).
    let d = degrader([ClassConfig::gold("pay").fallback_route(Route::DelayedRetry)]);
    let app = App::default();
    let (store, svc) = kept(&d, "pay", &app);
    d.force_open("pay").unwrap();
    call(&svc, post("/pay/1", "x")).await;
    run_for(2_000).await;
    assert!(app.seen().is_empty(), "not while forced open");
    d.metrics_only("pay").unwrap();
    run_for(1_200).await;
    assert_eq!(app.seen().len(), 1);
    assert_eq!(store.depth(Queue::Retry).len, 0);
}

#[tokio::test(start_paused = true)]
async fn a_replay_that_panics_is_a_failed_attempt() {
    first_replay_misbehaves(false).await;
}

#[tokio::test(start_paused = true)]
async fn a_replay_that_hangs_times_out_and_is_retried() {
    first_replay_misbehaves(true).await;
}

#[tokio::test(start_paused = true)]
async fn a_policy_route_to_manual_review_is_stored_for_a_person() {
    let d = degrader([ClassConfig::gold("refund").fallback_route(Route::ManualReview)]);
    let app = App::default();
    let (router, worker) = FallbackRouter::builder(&d)
        .store(MemoryStore::default())
        .replay(replay(&app))
        .build()
        .unwrap();
    let review = router.review();
    let svc = layered(&d, "refund", router, &app);
    tokio::spawn(worker.run());
    d.force_open("refund").unwrap();
    let id = task_id(&call(&svc, post("/refund/9", "{}")).await);
    run_for(5_000).await;
    assert!(
        app.seen().is_empty(),
        "manual review is not replayed by itself"
    );
    let t = review.show(id).await.unwrap().unwrap();
    assert_eq!(t.class(), "refund");
    assert!(matches!(t.payload(), Payload::Http(r) if r.uri == "/refund/9"));
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Refund {
    order: u64,
    cents: i64,
}

/// A router over a memory store whose worker replays task-API values of type `T` into the
/// list it returns.
fn task_router<T>(
    d: &Degrader,
) -> (
    Arc<MemoryStore>,
    FallbackRouter,
    tower_degrade::fallback::FallbackWorker,
    Arc<Mutex<Vec<T>>>,
)
where
    T: serde::de::DeserializeOwned + Send + 'static,
{
    let done = Arc::new(Mutex::new(Vec::new()));
    let seen = done.clone();
    let store = Arc::new(MemoryStore::default());
    let (router, worker) = FallbackRouter::builder(d)
        .shared_store(store.clone())
        .replay(replay_task(move |t: T| {
            seen.lock().unwrap().push(t);
            async { Ok::<_, BoxError>(()) }
        }))
        .build()
        .unwrap();
    (store, router, worker, done)
}

#[tokio::test(start_paused = true)]
async fn a_diverted_task_is_kept_as_json_and_replayed_by_its_handler() {
    let d = degrader([ClassConfig::gold("refund").fallback_route(Route::DelayedRetry)]);
    let (store, router, worker, done) = task_router::<Refund>(&d);
    let tasks = d
        .tasks::<Refund, String>()
        .keep(&router, |a| format!("kept as {} ({})", a.id, a.route))
        .build();
    tokio::spawn(worker.run());
    let refund = Refund {
        order: 42,
        cents: 1999,
    };
    let paid = tasks
        .run("refund", refund.clone(), |_| async {
            Ok::<_, BoxError>("paid".to_owned())
        })
        .await
        .unwrap();
    assert_eq!(paid, "paid");
    d.force_open("refund").unwrap();
    let kept = tasks
        .run("refund", refund.clone(), |_| async {
            Ok::<_, BoxError>("paid".to_owned())
        })
        .await
        .unwrap();
    assert!(
        kept.starts_with("kept as ") && kept.ends_with("(delayed_retry)"),
        "{kept}"
    );
    let stored = store.list(Queue::Retry, None, 10).await.unwrap();
    assert!(
        matches!(stored[0].payload(), Payload::Bytes(b) if b == br#"{"order":42,"cents":1999}"#)
    );
    d.reset("refund").unwrap();
    run_for(1_200).await;
    assert_eq!(*done.lock().unwrap(), [refund]);
    assert_eq!(store.depth(Queue::Retry).len, 0);
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Email {
    order: u64,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct StockSync {
    order: u64,
    sku: String,
    quantity: i64,
}

#[tokio::test(start_paused = true)]
async fn tasks_of_two_types_on_one_router_are_each_replayed_by_their_class_s_handler() {
    // A stock sync's JSON reads back as an Email (serde skips the fields it does not know):
    // with one `replay_task` for the router it was sent as an email and never synced.
    let d = degrader([
        ClassConfig::gold("order_email").fallback_route(Route::DelayedRetry),
        ClassConfig::silver("stock_sync").fallback_route(Route::DelayedRetry),
        ClassConfig::bronze("recommend").fallback_route(Route::DelayedRetry),
    ]);
    let emails = Arc::new(Mutex::new(Vec::new()));
    let syncs = Arc::new(Mutex::new(Vec::new()));
    let (e, s) = (emails.clone(), syncs.clone());
    let (router, worker) = FallbackRouter::builder(&d)
        .store(MemoryStore::default())
        .replay(
            ReplayByClass::new()
                .class(
                    "order_email",
                    replay_task(move |m: Email| {
                        e.lock().unwrap().push(m);
                        async { Ok::<_, BoxError>(()) }
                    }),
                )
                .class(
                    "stock_sync",
                    replay_task(move |m: StockSync| {
                        s.lock().unwrap().push(m);
                        async { Ok::<_, BoxError>(()) }
                    }),
                ),
        )
        .build()
        .unwrap();
    let review = router.review();
    let email = d.tasks::<Email, ()>().keep(&router, |_| ()).build();
    let sync = d.tasks::<StockSync, ()>().keep(&router, |_| ()).build();
    tokio::spawn(worker.run());
    for class in ["order_email", "stock_sync", "recommend"] {
        d.force_open(class).unwrap();
    }
    let never = |_| async { Ok::<_, BoxError>(()) };
    email
        .run("order_email", Email { order: 1 }, never)
        .await
        .unwrap();
    let stock = StockSync {
        order: 2,
        sku: "sku-9".into(),
        quantity: -1,
    };
    sync.run("stock_sync", stock.clone(), |_| async {
        Ok::<_, BoxError>(())
    })
    .await
    .unwrap();
    // A class the replay does not name: kept, then sent to review, not to another handler.
    email
        .run("recommend", Email { order: 3 }, never)
        .await
        .unwrap();
    for class in ["order_email", "stock_sync", "recommend"] {
        d.reset(class).unwrap();
    }
    run_for(1_200).await;
    assert_eq!(*emails.lock().unwrap(), [Email { order: 1 }]);
    assert_eq!(*syncs.lock().unwrap(), [stock]);
    let page = review.list(None, 10).await.unwrap();
    assert_eq!(page.tasks.len(), 1);
    assert_eq!(page.tasks[0].class(), "recommend");
    assert!(
        page.tasks[0]
            .last_answer()
            .unwrap()
            .contains("no replay for class `recommend`"),
        "{:?}",
        page.tasks[0].last_answer()
    );

    // A class the degrader does not have is a configuration error.
    let err = FallbackRouter::builder(&d)
        .store(MemoryStore::default())
        .replay(
            ReplayByClass::new().class("order_emial", replay_fn(|_, _| async { Replayed::Done })),
        )
        .build()
        .unwrap_err();
    assert!(
        err.to_string().contains("fallback.replay") && err.to_string().contains("order_emial"),
        "{err}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_redelivered_task_with_its_idempotency_key_is_kept_once() {
    // A queue that delivers at least once hands the same message over twice while the class
    // is open: with the message id as the key, one task is kept and replayed once.
    let d = degrader([ClassConfig::gold("order_email").fallback_route(Route::DelayedRetry)]);
    let (store, router, worker, sent) = task_router::<Email>(&d);
    let tasks = d
        .tasks::<Email, TaskId>()
        .keep(&router, |a| a.id)
        .idempotency_key(|m: &Email| format!("email-{}", m.order))
        .build();
    d.force_open("order_email").unwrap();
    let never = |_| async { Ok::<_, BoxError>(TaskId::generate()) };
    let first = tasks
        .run("order_email", Email { order: 5 }, never)
        .await
        .unwrap();
    let again = tasks
        .run("order_email", Email { order: 5 }, never)
        .await
        .unwrap();
    assert_eq!(first, again);
    assert_eq!(store.depth(Queue::Retry).len, 1);
    let kept = store.get(Queue::Retry, first).await.unwrap().unwrap();
    assert_eq!(kept.client_key(), Some("email-5"));
    tokio::spawn(worker.run());
    d.reset("order_email").unwrap();
    run_for(1_200).await;
    assert_eq!(*sent.lock().unwrap(), [Email { order: 5 }]);
    d.force_open("order_email").unwrap();

    // The same key on another value is refused, not taken for the first.
    let tasks = d
        .tasks::<Email, TaskId>()
        .keep(&router, |a| a.id)
        .idempotency_key(|_: &Email| "same".to_owned())
        .build();
    let first_same = tasks
        .run("order_email", Email { order: 6 }, never)
        .await
        .unwrap();
    let err = tasks
        .run("order_email", Email { order: 7 }, never)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("kept for another"), "{err}");
    let cannot = err.downcast_ref::<CannotKeep>().expect("a CannotKeep");
    assert_eq!(cannot.kind(), CannotKeepKind::KeyInUse(first_same));
    assert_eq!(
        (cannot.class(), cannot.route()),
        ("order_email", Route::DelayedRetry)
    );
    // A key that is not one (too long, control bytes) is an error, not silently dropped.
    let tasks = d
        .tasks::<Email, TaskId>()
        .keep(&router, |a| a.id)
        .idempotency_key(|_: &Email| "\n".to_owned())
        .build();
    let err = tasks
        .run("order_email", Email { order: 8 }, never)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("idempotency key"), "{err}");
    let cannot = err.downcast_ref::<CannotKeep>().expect("a CannotKeep");
    assert_eq!(cannot.kind(), CannotKeepKind::InvalidKey);
}

#[tokio::test(start_paused = true)]
async fn every_task_diverted_to_a_keeping_route_has_one_result_in_the_kept_counter() {
    // As an HTTP call's: what the router kept, found kept already, or refused (which the gold
    // refusal alert reads), each counted once.
    #[derive(serde::Serialize)]
    struct Receipt {
        order: u64,
        note: String,
        amount: f64,
    }
    let receipt = |order, note: &str, amount| Receipt {
        order,
        note: note.to_owned(),
        amount,
    };
    let d = degrader([ClassConfig::gold("receipt").fallback_route(Route::DelayedRetry)]);
    let store = Arc::new(MemoryStore::default());
    let (router, _worker) = FallbackRouter::builder(&d)
        .shared_store(store.clone())
        .capture(Capture::new().body_limit(64))
        .replay(replay_fn(|_, _| async { Replayed::Done }))
        .build()
        .unwrap();
    let tasks = d
        .tasks::<Receipt, TaskId>()
        .keep(&router, |a| a.id)
        .idempotency_key(|r: &Receipt| {
            // A tab is no key.
            if r.order == 0 {
                "\t".to_owned()
            } else {
                format!("receipt-{}", r.order)
            }
        })
        .build();
    d.force_open("receipt").unwrap();
    let never = |_: Receipt| async { Ok::<_, BoxError>(TaskId::generate()) };
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);
    let mut refused = 0;
    for r in [
        receipt(1, "", 1.0),               // kept
        receipt(1, "", 1.0),               // the same again: already_kept
        receipt(1, "another", 1.0),        // its key on another value: key_reused
        receipt(0, "", 1.0),               // no key: malformed
        receipt(2, "", f64::NAN),          // no JSON number: malformed
        receipt(3, &"x".repeat(100), 1.0), // over the body limit: too_large
    ] {
        refused += usize::from(tasks.run("receipt", r, never).await.is_err());
    }
    assert_eq!(refused, 4);
    assert_eq!(store.depth(Queue::Retry).len, 1);
    assert_kept_results(
        &snapshotter,
        [
            ("already_kept", 1),
            ("kept", 1),
            ("key_reused", 1),
            ("malformed", 2),
            ("too_large", 1),
        ],
    );
    // Each of them `degraded` in the class's window, as the layer counts a diverted call.
    d.tick_now();
    let status = d.status();
    let class = status
        .classes
        .iter()
        .find(|c| &*c.name == "receipt")
        .unwrap();
    assert_eq!(class.window.degraded, 6);
}

#[tokio::test(start_paused = true)]
async fn a_task_that_does_not_serialize_says_so_and_is_not_told_to_retry() {
    let d = degrader([ClassConfig::bronze("recommend").fallback_route(Route::Spool)]);
    let (router, _worker) = FallbackRouter::builder(&d)
        .store(MemoryStore::default())
        .replay(replay_fn(|_, _| async { Replayed::Done }))
        .build()
        .unwrap();
    // JSON object keys must be strings: a map keyed by tuples does not serialize.
    let tasks = d
        .tasks::<HashMap<(u32, u32), u32>, ()>()
        .keep(&router, |_| ())
        .build();
    d.force_open("recommend").unwrap();
    let err = tasks
        .run("recommend", HashMap::from([((1, 2), 3)]), |_| async {
            Ok::<_, BoxError>(())
        })
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("does not serialize as JSON"),
        "{err}"
    );
    assert!(
        err.downcast_ref::<tower_degrade::error::Degraded>()
            .is_none()
    );
}

#[tokio::test(start_paused = true)]
async fn a_task_holding_a_nan_or_an_infinity_is_refused_not_kept_as_null() {
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Refund {
        order: u64,
        amount: f64,
    }
    let d = degrader([ClassConfig::silver("refund").fallback_route(Route::Spool)]);
    let store = Arc::new(MemoryStore::default());
    let (router, _worker) = FallbackRouter::builder(&d)
        .shared_store(store.clone())
        .replay(replay_fn(|_, _| async { Replayed::Done }))
        .build()
        .unwrap();
    let tasks = d.tasks::<Refund, TaskId>().keep(&router, |a| a.id).build();
    d.force_open("refund").unwrap();
    let never = |_: Refund| async { Ok::<_, BoxError>(TaskId::generate()) };
    // JSON has no NaN or infinity: serde_json would write `null`, which reads back as no f64.
    for (amount, shown) in [(f64::NAN, "NaN"), (f64::NEG_INFINITY, "-inf")] {
        let err = tasks
            .run("refund", Refund { order: 1, amount }, never)
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&format!("`amount` is {shown}")) && text.contains("cannot be kept"),
            "{text}"
        );
        let cannot = err.downcast_ref::<CannotKeep>().expect("a CannotKeep");
        assert_eq!(cannot.kind(), CannotKeepKind::Value);
        assert_eq!(cannot.route(), Route::Spool);
    }
    assert_eq!(store.depth(Queue::Spool).len, 0, "nothing kept");
    // A finite amount is kept.
    tasks
        .run(
            "refund",
            Refund {
                order: 1,
                amount: 2.5,
            },
            never,
        )
        .await
        .unwrap();
    assert_eq!(store.depth(Queue::Spool).len, 1);
}

#[tokio::test(start_paused = true)]
async fn a_task_handler_that_panics_before_its_future_fails_that_task_not_the_worker() {
    // A `replay_task` handler that parses its task before its `async` block: the panic was
    // raised on the worker's own task, which ended, and no task of any class was replayed
    // again while new ones were still answered "kept".
    let d = degrader([ClassConfig::gold("order").fallback_route(Route::DelayedRetry)]);
    let done = Arc::new(Mutex::new(Vec::new()));
    let seen = done.clone();
    let store = Arc::new(MemoryStore::default());
    let (router, worker) = FallbackRouter::builder(&d)
        .shared_store(store.clone())
        .retry(RetryPolicy::default().max_attempts(2))
        .replay(replay_task(move |n: String| {
            let order: u64 = n.parse().unwrap();
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(order);
                Ok::<_, BoxError>(())
            }
        }))
        .build()
        .unwrap();
    let tasks = d.tasks::<String, TaskId>().keep(&router, |a| a.id).build();
    let worker = tokio::spawn(worker.run());
    d.force_open("order").unwrap();
    let never = |_: String| async { Ok::<_, BoxError>(TaskId::generate()) };
    let mut ids = Vec::new();
    for n in ["1", "not-a-number", "2"] {
        ids.push(tasks.run("order", n.to_owned(), never).await.unwrap());
    }
    d.reset("order").unwrap();
    run_for(10_000).await;
    // Kept after the panic, and replayed too: the worker is still there.
    d.force_open("order").unwrap();
    tasks.run("order", "3".to_owned(), never).await.unwrap();
    d.reset("order").unwrap();
    run_for(10_000).await;
    assert!(!worker.is_finished());
    let mut replayed = done.lock().unwrap().clone();
    replayed.sort_unstable();
    assert_eq!(replayed, [1, 2, 3]);
    let bad = store.get(Queue::Review, ids[1]).await.unwrap().unwrap();
    let answer = bad.last_answer().unwrap_or_default();
    assert!(
        answer.starts_with("the replay panicked: ") && answer.contains("ParseIntError"),
        "{answer}"
    );
    assert_eq!(store.depth(Queue::Retry).len, 0);
}

#[tokio::test(start_paused = true)]
async fn a_task_too_deep_to_read_back_or_too_large_is_refused_not_kept() {
    let d = degrader([ClassConfig::silver("report").fallback_route(Route::Spool)]);
    let store = Arc::new(MemoryStore::default());
    let (router, _worker) = FallbackRouter::builder(&d)
        .shared_store(store.clone())
        .capture(Capture::new().body_limit(1024))
        .replay(replay_fn(|_, _| async { Replayed::Done }))
        .build()
        .unwrap();
    let tasks = d
        .tasks::<serde_json::Value, TaskId>()
        .keep(&router, |a| a.id)
        .build();
    d.force_open("report").unwrap();
    let never = |_: serde_json::Value| async { Ok::<_, BoxError>(TaskId::generate()) };
    let nested =
        |depth: usize| (0..depth).fold(serde_json::json!(1), |v, _| serde_json::json!([v]));
    // serde_json reads 128 levels: 200 were kept, and then failed every replay.
    let err = tasks.run("report", nested(200), never).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("cannot be kept") && text.contains("would not read back"),
        "{text}"
    );
    let err = tasks
        .run("report", serde_json::json!("x".repeat(2_000)), never)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("2002 bytes") && text.contains("limit of 1024"),
        "{text}"
    );
    assert_eq!(store.depth(Queue::Spool).len, 0, "nothing kept");
    // Within both: kept.
    tasks.run("report", nested(100), never).await.unwrap();
    tasks
        .run("report", serde_json::json!("x".repeat(1_000)), never)
        .await
        .unwrap();
    assert_eq!(store.depth(Queue::Spool).len, 2);
}

// ===== what is not kept gets the reject answer =====

#[tokio::test(start_paused = true)]
async fn a_body_over_the_limit_or_a_full_store_gets_the_reject_answer_never_a_202() {
    let d = degrader([ClassConfig::bronze("browse").fallback_route(Route::Spool)]);
    let app = App::default();
    let store = Arc::new(MemoryStore::new(2));
    let (router, worker) = FallbackRouter::builder(&d)
        .shared_store(store.clone())
        .capture(Capture::new().body_limit(8))
        .replay(replay(&app))
        .build()
        .unwrap();
    drop(worker);
    let svc = layered(&d, "browse", router, &app);
    d.force_open("browse").unwrap();
    let big = call(&svc, post("/log", "0123456789abcdef")).await;
    assert_eq!(big.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(big.headers()[REASON_HEADER], "too_large");
    // Which limit, so the client can tell what to mend.
    assert_eq!(big.headers()[DETAIL_HEADER], "body over 8 bytes");
    assert!(
        !big.headers().contains_key("retry-after"),
        "it will not be kept later either"
    );
    assert_eq!(store.depth(Queue::Spool).len, 0);

    assert_eq!(
        call(&svc, post("/log", "a")).await.status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(
        call(&svc, post("/log", "b")).await.status(),
        StatusCode::ACCEPTED
    );
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let full = {
        let _local = metrics::set_default_local_recorder(&recorder);
        call(&svc, post("/log", "c")).await
    };
    // Counted once (the store's refusal), whoever answers it; the other results' series are
    // there at 0, so that the first of each is an increase an alert sees.
    assert_kept_results(&snapshotter, [("not_kept", 1)]);
    assert_eq!(full.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(full.headers()[REASON_HEADER], "not_kept");
    assert!(full.headers().contains_key("retry-after"));
    assert!(!full.headers().contains_key(TASK_ID_HEADER));
    assert_eq!(store.depth(Queue::Spool).len, 2);
}

/// `degrade_fallback_kept_total` as `snapshotter` read it, by result.
/// Every result of `degrade_fallback_kept_total` is there, each at its count in `counts`,
/// the others at 0.
fn assert_kept_results<const N: usize>(
    snapshotter: &metrics_util::debugging::Snapshotter,
    counts: [(&str, u64); N],
) {
    let results = [
        "already_kept",
        "cancelled",
        "kept",
        "key_reused",
        "malformed",
        "not_kept",
        "too_large",
    ];
    let want: BTreeMap<String, metrics_util::debugging::DebugValue> = results
        .iter()
        .map(|r| {
            let n = counts.iter().find(|(c, _)| c == r).map_or(0, |(_, n)| *n);
            (
                r.to_string(),
                metrics_util::debugging::DebugValue::Counter(n),
            )
        })
        .collect();
    assert_eq!(kept_results(snapshotter), want);
}

fn kept_results(
    snapshotter: &metrics_util::debugging::Snapshotter,
) -> BTreeMap<String, metrics_util::debugging::DebugValue> {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(k, _, _, _)| k.key().name() == tower_degrade::metrics::FALLBACK_KEPT)
        .map(|(k, _, _, v)| {
            let result = k.key().labels().find(|l| l.key() == "result").unwrap();
            (result.value().to_owned(), v)
        })
        .collect()
}

/// `browse`'s calls with bodies of type `B` through the layer, diverted to `router`: the class
/// is forced open (behind it, a service that would answer `200`).
fn browse_forced_open<B>(
    d: &Degrader,
    router: FallbackRouter,
) -> BoxCloneSyncService<Request<B>, Res, Infallible>
where
    B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    let id = d.class_id("browse").unwrap();
    d.force_open("browse").unwrap();
    BoxCloneSyncService::new(
        d.layer(move |_: &Request<B>| id)
            .http()
            .fallback_with(router)
            .layer(service_fn(|_: Request<B>| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
            })),
    )
}

#[tokio::test(start_paused = true)]
async fn a_call_whose_caller_goes_away_while_its_body_is_read_is_counted_cancelled() {
    // A client stream cancelled before it half-closes (or a deadline that passes meanwhile):
    // the router's future is dropped while it reads the body. Nothing is kept, and the call,
    // counted `degraded` by the layer when it was diverted, has its result in
    // degrade_fallback_kept_total as every diverted call does (a trial found it in none).
    let d = degrader([ClassConfig::bronze("browse").fallback_route(Route::Spool)]);
    let app = App::default();
    let store = Arc::new(MemoryStore::default());
    let router = unstarted(&d, store.clone(), &app);
    struct Endless;
    impl http_body::Body for Endless {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
            std::task::Poll::Pending
        }
    }
    let svc = browse_forced_open::<Endless>(&d, router);
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    {
        let _local = metrics::set_default_local_recorder(&recorder);
        let req = Request::post("/log").body(Endless).unwrap();
        let gave_up = tokio::time::timeout(Duration::from_secs(2), svc.oneshot(req)).await;
        assert!(gave_up.is_err(), "answered a body that never ended");
    }
    let kept = kept_results(&snapshotter);
    let counter = metrics_util::debugging::DebugValue::Counter;
    assert_eq!(kept.get("cancelled"), Some(&counter(1)), "{kept:?}");
    assert_eq!(kept.get("kept"), Some(&counter(0)), "{kept:?}");
    assert_eq!(kept.get("not_kept"), Some(&counter(0)), "{kept:?}");
    assert_eq!(store.depth(Queue::Spool).len, 0);
    d.tick_now();
    let status = d.status();
    let browse = status
        .classes
        .iter()
        .find(|c| &*c.name == "browse")
        .unwrap();
    assert_eq!(browse.window.degraded, 1, "diverted");
}

#[tokio::test(start_paused = true)]
async fn a_body_that_fails_on_its_way_is_counted_cancelled_and_one_that_stalls_not_kept() {
    // An HTTP/1.1 client that closes its connection mid-body: the body fails, the future is
    // not dropped. Its caller went away as surely as one that cancels (a trial counted five
    // such payments `not_kept`, which the gold refusal alert reads as a store failing). A body
    // that stalls past `Capture::body_timeout` is the router's own refusal: `not_kept`.
    let d = degrader([ClassConfig::bronze("browse").fallback_route(Route::Spool)]);
    let app = App::default();
    let store = Arc::new(MemoryStore::default());
    let (router, _worker) = FallbackRouter::builder(&d)
        .shared_store(store.clone())
        .replay(replay(&app))
        .capture(Capture::new().body_timeout(Duration::from_secs(1)))
        .build()
        .unwrap();
    /// Its frames, then nothing ever again.
    struct Scripted(std::collections::VecDeque<Result<Bytes, std::io::Error>>);
    impl http_body::Body for Scripted {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
            match self.0.pop_front() {
                Some(frame) => std::task::Poll::Ready(Some(frame.map(http_body::Frame::data))),
                None => std::task::Poll::Pending,
            }
        }
    }
    let svc = browse_forced_open::<Scripted>(&d, router);
    let closed = Scripted(
        [
            Ok(Bytes::from_static(b"half")),
            Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)),
        ]
        .into(),
    );
    let stalled = Scripted([Ok(Bytes::from_static(b"half"))].into());
    for (body, counted) in [(closed, "cancelled"), (stalled, "not_kept")] {
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let res = {
            let _local = metrics::set_default_local_recorder(&recorder);
            let req = Request::post("/log").body(body).unwrap();
            svc.clone().oneshot(req).await.unwrap()
        };
        // Answered alike, for a caller still there.
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE, "{counted}");
        assert_eq!(res.headers()[REASON_HEADER], "not_kept", "{counted}");
        let mut results = kept_results(&snapshotter);
        results.retain(|_, v| *v != metrics_util::debugging::DebugValue::Counter(0));
        assert_eq!(
            results,
            BTreeMap::from([(
                counted.to_owned(),
                metrics_util::debugging::DebugValue::Counter(1)
            )]),
            "{counted}"
        );
    }
    assert_eq!(store.depth(Queue::Spool).len, 0);
}

#[tokio::test(start_paused = true)]
async fn a_call_not_kept_while_its_breaker_is_open_is_told_to_come_back_once_it_may_close() {
    let d = degrader([ClassConfig::bronze("browse").fallback_route(Route::Spool)]);
    let app = App::default().failing(40, 500);
    let store = Arc::new(MemoryStore::new(1));
    let router = unstarted(&d, store.clone(), &app);
    let svc = layered(&d, "browse", router, &app);
    for _ in 0..40 {
        assert_eq!(
            call(&svc, post("/log", "x")).await.status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
    d.tick_now();
    let kept = call(&svc, post("/log", "a")).await;
    assert_eq!(kept.status(), StatusCode::ACCEPTED);
    assert_eq!(kept.headers()[REASON_HEADER], "breaker_open");
    // The store is full: refused, and told to come back when the breaker's five seconds are
    // up, not in a second, when it would be diverted and refused again.
    let full = call(&svc, post("/log", "b")).await;
    assert_eq!(full.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(full.headers()[REASON_HEADER], "not_kept");
    assert_eq!(full.headers()["retry-after"], "5");
    // Forced open, no time is known: the router's own second.
    d.force_open("browse").unwrap();
    let forced = call(&svc, post("/log", "c")).await;
    assert_eq!(forced.headers()[REASON_HEADER], "not_kept");
    assert_eq!(forced.headers()["retry-after"], "1");
    assert_eq!(store.depth(Queue::Spool).len, 1);
}

#[tokio::test(start_paused = true)]
async fn a_bronze_class_fills_its_share_of_the_store_and_leaves_the_rest_to_gold() {
    let d = degrader([
        ClassConfig::gold("pay").fallback_route(Route::DelayedRetry),
        ClassConfig::silver("stock").fallback_route(Route::Spool),
        ClassConfig::bronze("browse").fallback_route(Route::Spool),
    ]);
    let app = App::default();
    let store = Arc::new(MemoryStore::new(20));
    let router = unstarted(&d, store.clone(), &app);
    let [pay, stock, browse] =
        ["pay", "stock", "browse"].map(|c| layered(&d, c, router.clone(), &app));
    for class in ["pay", "stock", "browse"] {
        d.force_open(class).unwrap();
    }
    // How many of `n` calls were kept (the others refused `not_kept`).
    let kept_of = async |svc: &Svc, n: usize| {
        let mut kept = 0;
        for _ in 0..n {
            let res = call(svc, post("/x", "x")).await;
            if res.status() == StatusCode::ACCEPTED {
                kept += 1;
            } else {
                assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
                assert_eq!(res.headers()[REASON_HEADER], "not_kept");
                assert!(res.headers().contains_key("retry-after"));
            }
        }
        kept
    };
    // An outage's browse events: the default shares keep bronze to 80 % of the store.
    assert_eq!(kept_of(&browse, 30).await, 16, "bronze: 80 % of 20");
    assert_eq!(kept_of(&stock, 30).await, 2, "silver: up to 90 % of 20");
    assert_eq!(
        kept_of(&pay, 30).await,
        2,
        "gold: the rest, up to the capacity"
    );
    assert_eq!(store.usage().unwrap().held, 20);

    // Moving a task between queues takes no new room; removing one frees it for gold only
    // while the lower tiers are past their shares.
    let first = store.list(Queue::Spool, None, 1).await.unwrap().remove(0);
    store
        .commit(vec![Op::Remove(Queue::Spool, first.id())])
        .await
        .unwrap();
    assert_eq!(kept_of(&browse, 1).await, 0);
    assert_eq!(kept_of(&stock, 1).await, 0);
    assert_eq!(kept_of(&pay, 1).await, 1);

    // The first tier present keeps no room for another: without a gold class, silver fills
    // it all, bronze 80 %.
    let d = degrader([
        ClassConfig::silver("stock").fallback_route(Route::Spool),
        ClassConfig::bronze("browse").fallback_route(Route::Spool),
    ]);
    let store = Arc::new(MemoryStore::new(10));
    let (router, _worker) = FallbackRouter::builder(&d)
        .shared_store(store.clone())
        .replay(replay(&app))
        .build()
        .unwrap();
    let [stock, browse] = ["stock", "browse"].map(|c| layered(&d, c, router.clone(), &app));
    for class in ["stock", "browse"] {
        d.force_open(class).unwrap();
    }
    assert_eq!(kept_of(&browse, 12).await, 8, "bronze: 80 %");
    assert_eq!(kept_of(&stock, 12).await, 2, "silver: the rest");

    // Shares are set per tier, and checked when the router is built.
    let store = Arc::new(MemoryStore::new(10));
    let (router, _worker) = FallbackRouter::builder(&d)
        .shared_store(store.clone())
        .replay(replay(&app))
        .store_share(tower_degrade::Tier::Bronze, 1.0)
        .build()
        .unwrap();
    let browse = layered(&d, "browse", router, &app);
    assert_eq!(kept_of(&browse, 12).await, 10, "bronze may fill it all");
    for share in [0.0, -0.5, 1.5, f64::NAN] {
        let err = FallbackRouter::builder(&d)
            .store(MemoryStore::default())
            .replay(replay(&app))
            .store_share(tower_degrade::Tier::Silver, share)
            .build()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("fallback.store_share") && err.contains("silver"),
            "{share}: {err}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_protocol_upgrade_is_refused_not_kept() {
    let d = degrader([ClassConfig::bronze("feed").fallback_route(Route::DelayedRetry)]);
    let app = App::default();
    let (store, _, _worker, svc) = router_for(&d, "feed", &app, |b| b);
    d.force_open("feed").unwrap();
    // A WebSocket's handshake, kept, would be replayed as a plain GET its handler refuses:
    // not kept, and to be tried again once the class serves.
    let ws = |method: http::Method, upgrade: Option<&str>| {
        let mut b = Request::builder().method(method).uri("/feed");
        if let Some(u) = upgrade {
            b = b.header("connection", "upgrade").header("upgrade", u);
        }
        b.body(Full::new(Bytes::new())).unwrap()
    };
    for req in [
        ws(http::Method::GET, Some("websocket")),
        ws(http::Method::GET, Some("h2c, WebSocket")),
        ws(http::Method::CONNECT, None),
    ] {
        let what = format!("{} {:?}", req.method(), req.headers().get("upgrade"));
        let res = call(&svc, req).await;
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE, "{what}");
        assert_eq!(res.headers()[REASON_HEADER], "not_kept", "{what}");
        assert!(res.headers().contains_key("retry-after"), "{what}");
        assert!(!res.headers().contains_key(TASK_ID_HEADER), "{what}");
    }
    // An upgrade to h2c (curl's --http2 over plain HTTP) may be answered as it is: kept.
    let res = call(&svc, ws(http::Method::POST, Some("h2c"))).await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    assert_eq!(store.depth(Queue::Retry).len, 1, "the h2c call alone");
}

#[tokio::test(start_paused = true)]
async fn a_call_whose_idempotency_key_is_not_one_is_refused_not_kept_again_and_again() {
    // A key too long or with a tab was dropped and the call kept under its task id: each
    // retry another task, each replayed with another key, so applied twice (found by a
    // hostile-input trial). Now refused, as a request the client must fix.
    let d = degrader([ClassConfig::bronze("orders").fallback_route(Route::Spool)]);
    let app = App::default();
    let (store, svc) = kept(&d, "orders", &app);
    d.force_open("orders").unwrap();
    let with_key = |key: &[u8]| {
        Request::post("/orders")
            .header(
                "idempotency-key",
                http::HeaderValue::from_bytes(key).unwrap(),
            )
            .body(Full::new(Bytes::from_static(b"order")))
            .unwrap()
    };
    // Each told what is wrong with its key (the answer had no word of it: found by a
    // hostile-input trial).
    for (key, why) in [
        (&b"x".repeat(256)[..], "longer than 255 bytes"),
        (
            b"order\t42",
            "byte 6 is not visible ASCII or a space (0x09)",
        ),
        (b"   ", "blank"),
    ] {
        for _ in 0..2 {
            let res = call(&svc, with_key(key)).await;
            assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{key:?}");
            assert_eq!(res.headers()[REASON_HEADER], "malformed");
            assert!(!res.headers().contains_key("retry-after"));
            let told = format!("header `idempotency-key`: {why}");
            assert_eq!(res.headers()[DETAIL_HEADER], told.as_str());
            let d = res.extensions().get::<tower_degrade::Degraded>().unwrap();
            assert_eq!(d.detail(), Some(told.as_str()));
        }
    }
    let grpc = Request::post("/shop.Orders/Place")
        .header("content-type", "application/grpc")
        .header("idempotency-key", "order\t42")
        .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 1, 8])))
        .unwrap();
    let res = call(&svc, grpc).await;
    assert_eq!(res.headers()["grpc-status"], "3");
    let message = res.headers()["grpc-message"].to_str().unwrap();
    assert!(
        message.ends_with("(fallback route `spool`): header `idempotency-key`: byte 6 is not visible ASCII or a space (0x09)"),
        "{message}"
    );
    // Two keys: which one is meant is not for the server to guess.
    let two = Request::post("/orders")
        .header("idempotency-key", "order 42")
        .header("idempotency-key", "order 43")
        .body(Full::new(Bytes::from_static(b"order")))
        .unwrap();
    let res = call(&svc, two).await;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    assert_eq!(res.headers()[REASON_HEADER], "malformed");
    assert_eq!(
        res.headers()[DETAIL_HEADER],
        "header `idempotency-key`: given more than once, with different values"
    );
    assert_eq!(store.depth(Queue::Spool).len, 0, "nothing kept");
    // A key of 255 visible bytes and spaces is one: kept once, however often sent.
    let key = format!("order 42 {}", "x".repeat(246));
    let first = call(&svc, with_key(key.as_bytes())).await;
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    let again = call(&svc, with_key(key.as_bytes())).await;
    assert_eq!(task_id(&again), task_id(&first));
    assert_eq!(store.depth(Queue::Spool).len, 1);
}

#[tokio::test(start_paused = true)]
async fn a_kept_grpc_call_is_answered_with_a_documented_status_and_the_task_id() {
    let d = degrader([ClassConfig::bronze("events").fallback_route(Route::Spool)]);
    let app = App::default();
    let (store, _, _worker, svc) = router_for(&d, "events", &app, |b| b);
    d.force_open("events").unwrap();
    let req = Request::post("/shop.Events/Record")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 1, 8])))
        .unwrap();
    let res = call(&svc, req).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["grpc-status"], "6");
    assert!(
        res.headers()["grpc-message"]
            .to_str()
            .unwrap()
            .contains("kept as task")
    );
    task_id(&res);

    // A body that is not length-prefixed messages would fail every replay: refused, not
    // kept, and not to be retried as is.
    for body in [&b"garbage"[..], &[0, 0, 0, 0, 9, 8][..]] {
        let req = Request::post("/shop.Events/Record")
            .header("content-type", "application/grpc")
            .body(Full::new(Bytes::copy_from_slice(body)))
            .unwrap();
        let res = call(&svc, req).await;
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()["grpc-status"], "3", "{body:?}");
        assert_eq!(res.headers()[REASON_HEADER], "malformed");
        // What is wrong with it, in the message.
        let message = res.headers()["grpc-message"].to_str().unwrap();
        assert!(
            message.contains("(fallback route `spool`): message 0: "),
            "{message}"
        );
        assert!(!res.headers().contains_key("grpc-retry-pushback-ms"));
        assert!(!res.headers().contains_key(TASK_ID_HEADER));
    }
    // No content type but gRPC's `te: trailers`, which tonic serves as gRPC: answered as
    // gRPC too (it got HTTP 202), its framing checked.
    let bare = |body: &'static [u8]| {
        Request::post("/shop.Events/Record")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(body)))
            .unwrap()
    };
    let res = call(&svc, bare(b"garbage")).await;
    assert_eq!(res.headers()["grpc-status"], "3");
    let res = call(&svc, bare(&[0, 0, 0, 0, 1, 8])).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["grpc-status"], "6");
    assert_eq!(
        store.depth(Queue::Spool).len,
        2,
        "only the well-formed calls"
    );
}

#[tokio::test(start_paused = true)]
async fn a_grpc_call_waiting_for_a_permit_is_kept_before_its_deadline() {
    // Admission at one permit, held by a call to a stuck database. A client that gives its
    // call 300 ms waited in the queue for the class's 1 s and gave up, the call neither served
    // nor kept; now it leaves the queue at 150 ms and its spooled class keeps it.
    let d = limited(
        ClassConfig::bronze("events").fallback_route(Route::Spool),
        1,
    );
    let store = Arc::new(MemoryStore::default());
    let app = App::default();
    let (router, _worker) = FallbackRouter::builder(&d)
        .shared_store(store.clone())
        .replay(replay(&app))
        .build()
        .unwrap();
    let classify = d
        .http_classifier()
        .grpc("/shop.Events/Record", "events")
        .unwrap()
        .build();
    let db = Arc::new(tokio::sync::Semaphore::new(0));
    let svc = d
        .layer(classify)
        .http()
        .fallback_with(router)
        .layer(stuck(db.clone()));
    let record = || {
        Request::post("/shop.Events/Record")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("grpc-timeout", "300m")
            .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 1, 8])))
            .unwrap()
    };
    let stuck = tokio::spawn(svc.clone().oneshot(record()));
    run_for(10).await;
    assert_eq!(d.admission()[0].inflight, 1);
    let start = tokio::time::Instant::now();
    let res = tokio::time::timeout(Duration::from_millis(300), svc.clone().oneshot(record()))
        .await
        .expect("answered within the caller's deadline")
        .unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(150));
    assert_eq!(res.headers()["grpc-status"], "6", "kept");
    assert_eq!(res.headers()[REASON_HEADER], "overload");
    task_id(&res);
    assert_eq!(store.depth(Queue::Spool).len, 1);
    db.add_permits(1);
    stuck.await.unwrap().unwrap();
}

#[tokio::test]
async fn the_store_must_be_given_and_errors_name_the_field() {
    let d = degrader([ClassConfig::bronze("browse")]);
    let err = FallbackRouter::builder(&d)
        .replay(replay_fn(|_, _| async { Replayed::Done }))
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("fallback.store"), "{err}");
    let err = FallbackRouter::builder(&d)
        .store(MemoryStore::default())
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("fallback.replay"), "{err}");
    // A zero period would panic in the worker and an endless one never look (kept tasks
    // never replayed); a zero replay timeout would fail every replay, a zero deadline send
    // every task to review unreplayed; a first wait past the longest names both.
    for (field, builder) in [
        (
            "fallback.period",
            FallbackRouter::builder(&d).period(Duration::ZERO),
        ),
        (
            "fallback.period",
            FallbackRouter::builder(&d).period(Duration::MAX),
        ),
        (
            "fallback.replay_timeout",
            FallbackRouter::builder(&d).replay_timeout(Duration::ZERO),
        ),
        (
            "fallback.retry.deadline",
            FallbackRouter::builder(&d)
                .retry(RetryPolicy::default().deadline(Some(Duration::ZERO))),
        ),
        (
            "initial 18446744073709551615.999999999s",
            FallbackRouter::builder(&d).retry(RetryPolicy::default().initial(Duration::MAX)),
        ),
        // An endless longest wait wrapped when read in milliseconds.
        (
            "fallback.retry.max_interval",
            FallbackRouter::builder(&d).retry(
                RetryPolicy::default()
                    .initial(Duration::MAX)
                    .max_interval(Duration::MAX),
            ),
        ),
        // A zero flush_every flushed at every step, an endless one wrapped when read in ms;
        // a zero write_timeout failed every write.
        (
            "batch_merge.flush_every",
            FallbackRouter::builder(&d).batch_merge(
                "browse",
                inventory(Arc::default(), Arc::default()).flush_every(Duration::ZERO),
            ),
        ),
        (
            "batch_merge.flush_every",
            FallbackRouter::builder(&d).batch_merge(
                "browse",
                inventory(Arc::default(), Arc::default()).flush_every(Duration::MAX),
            ),
        ),
        (
            "batch_merge.write_timeout",
            FallbackRouter::builder(&d).batch_merge(
                "browse",
                inventory(Arc::default(), Arc::default()).write_timeout(Duration::ZERO),
            ),
        ),
        // Taken as 1 without a word before, as a second batch_merge of a class replaced the
        // first (found by a trial of the fallback router).
        (
            "batch_merge.max_items",
            FallbackRouter::builder(&d).batch_merge(
                "browse",
                inventory(Arc::default(), Arc::default()).max_items(0),
            ),
        ),
        (
            "batch_merge.max_attempts",
            FallbackRouter::builder(&d).batch_merge(
                "browse",
                inventory(Arc::default(), Arc::default()).max_attempts(0),
            ),
        ),
        (
            "class `browse` is given two",
            FallbackRouter::builder(&d)
                .batch_merge("browse", inventory(Arc::default(), Arc::default()))
                .batch_merge("browse", inventory(Arc::default(), Arc::default())),
        ),
    ] {
        let err = builder
            .store(MemoryStore::default())
            .replay(replay_fn(|_, _| async { Replayed::Done }))
            .build()
            .unwrap_err();
        assert!(err.to_string().contains(field), "{err}");
    }
    // Never replayed: a replay has its own.
    let err = Capture::new().header("Content-Length").unwrap_err();
    assert!(err.to_string().contains("capture.header"), "{err}");
    assert!(err.to_string().contains("content-length"), "{err}");
    let err = MemoryStore::new(0)
        .commit(vec![Op::Put(
            Queue::Spool,
            Task::new("browse", None, Payload::Bytes(b"{}".to_vec())),
        )])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("capacity is 0"), "{err}");
    let (_dir, path) = temp("capacity-0");
    // An empty file is a new store, said (a store cut to nothing has lost its tasks).
    std::fs::write(&path, b"").unwrap();
    let (logs, guard) = logs::Logs::capture();
    drop(EmbeddedStore::open(&path).unwrap());
    drop(guard);
    assert!(
        logs.text().contains("the store's file is empty"),
        "{}",
        logs.text()
    );
    std::fs::remove_file(&path).unwrap();
    let err = EmbeddedStore::builder(&path)
        .capacity(0)
        .open()
        .unwrap_err();
    assert!(err.to_string().contains("capacity 0"), "{err}");
    // Too short for its header: damaged, not a path problem.
    std::fs::write(&path, [0u8; 100]).unwrap();
    let err = EmbeddedStore::open(&path).unwrap_err();
    assert_eq!(
        err.kind(),
        tower_degrade::fallback::store::StoreErrorKind::Corrupt,
        "{err}"
    );
    std::fs::remove_file(&path).unwrap();
}

// ===== batch merge =====

/// An inventory delta: the SKU is the path's last segment, the delta the body.
fn sku_delta(req: &tower_degrade::fallback::HttpRequest) -> Result<(String, i64), String> {
    let sku = req.uri.rsplit('/').next().unwrap_or_default().to_owned();
    let delta = std::str::from_utf8(&req.body)
        .map_err(|e| e.to_string())?
        .parse::<i64>()
        .map_err(|e| e.to_string())?;
    Ok((sku, delta))
}

fn inventory(writes: Arc<Mutex<Vec<Batch<i64>>>>, failures: Arc<AtomicUsize>) -> BatchMerge<i64> {
    BatchMerge::new(
        sku_delta,
        |sum: &mut i64, d| *sum += d,
        service_fn(move |batch: Batch<i64>| {
            let (writes, failures) = (writes.clone(), failures.clone());
            async move {
                if failures
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
                {
                    return Err::<(), BoxError>("database down".into());
                }
                writes.lock().unwrap().push(batch);
                Ok(())
            }
        }),
    )
    .flush_every(Duration::from_millis(100))
    .max_items(1000)
}

fn totals(writes: &[Batch<i64>]) -> HashMap<String, i64> {
    let mut t = HashMap::new();
    for b in writes {
        for (k, v) in &b.items {
            *t.entry(k.clone()).or_default() += v;
        }
    }
    t
}

#[tokio::test(start_paused = true)]
async fn ten_thousand_deltas_on_fifty_skus_become_a_few_merged_writes() {
    let d = degrader([ClassConfig::silver("inventory").fallback_route(Route::BatchMerge)]);
    let writes = Arc::new(Mutex::new(Vec::new()));
    let store = Arc::new(MemoryStore::new(1_000_000));
    let (router, worker) = FallbackRouter::builder(&d)
        .shared_store(store.clone())
        .replay(replay_fn(|_, _| async { Replayed::Done }))
        .batch_merge("inventory", inventory(writes.clone(), Arc::default()))
        .build()
        .unwrap();
    let svc = layered(&d, "inventory", router, &App::default());
    tokio::spawn(worker.run());
    d.force_open("inventory").unwrap();
    for i in 0..10_000u32 {
        let uri = format!("/inventory/sku-{}", i % 50);
        let delta = if i % 3 == 0 { "-2" } else { "1" };
        let res = call(&svc, post(&uri, delta)).await;
        assert_eq!(res.status(), StatusCode::ACCEPTED);
        if i % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    run_for(500).await;
    let writes = writes.lock().unwrap();
    let t = totals(&writes);
    assert_eq!(t.len(), 50);
    let expected: i64 = (0..10_000).map(|i| if i % 3 == 0 { -2 } else { 1 }).sum();
    assert_eq!(t.values().sum::<i64>(), expected);
    println!("10,000 deltas on 50 SKUs -> {} merged writes", writes.len());
    assert!(
        writes.len() <= 12,
        "10,000 deltas -> {} writes",
        writes.len()
    );
    assert_eq!(store.depth(Queue::Journal).len, 0, "journal emptied");
}

#[tokio::test(start_paused = true)]
async fn another_delta_under_a_journaled_delta_s_key_is_refused_not_dropped() {
    let d = degrader([ClassConfig::silver("inventory").fallback_route(Route::BatchMerge)]);
    let writes = Arc::new(Mutex::new(Vec::new()));
    let store = Arc::new(MemoryStore::default());
    let (router, worker) = FallbackRouter::builder(&d)
        .shared_store(store.clone())
        .replay(replay_fn(|_, _| async { Replayed::Done }))
        .batch_merge(
            "inventory",
            inventory(writes.clone(), Arc::default()).flush_every(Duration::from_secs(10)),
        )
        .build()
        .unwrap();
    let svc = layered(&d, "inventory", router, &App::default());
    tokio::spawn(worker.run());
    d.force_open("inventory").unwrap();
    let keyed = |uri: &str, body: &'static str| {
        Request::post(uri)
            .header("idempotency-key", "inv-1")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    };
    let first = call(&svc, keyed("/inventory/sku1", "5")).await;
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    // The same delta again is the same task.
    let again = call(&svc, keyed("/inventory/sku1", "5")).await;
    assert_eq!(again.status(), StatusCode::ACCEPTED);
    assert_eq!(task_id(&again), task_id(&first));
    // Another delta, another SKU, or a body the extractor cannot read, under the same key:
    // refused, where it was acknowledged and never applied.
    for (uri, body) in [
        ("/inventory/sku1", "40"),
        ("/inventory/sku2", "5"),
        ("/inventory/sku1", "five"),
    ] {
        let other = call(&svc, keyed(uri, body)).await;
        assert_key_reused(&other, &first, &format!("{uri} {body}"));
    }
    assert_eq!(store.depth(Queue::Journal).len, 1);
    run_for(11_000).await;
    let w = writes.lock().unwrap();
    assert_eq!(totals(&w), HashMap::from([("sku1".to_owned(), 5)]));
}

/// An `inventory` class forced open onto a `batch_merge` of `V` (`extract`, `merge`) over a
/// memory store with its worker running; the items of each write the sink got.
#[allow(clippy::type_complexity)]
fn merged_inventory<V>(
    extract: impl Fn(&tower_degrade::fallback::HttpRequest) -> Result<(String, V), String>
    + Send
    + Sync
    + 'static,
    merge: impl Fn(&mut V, V) + Send + Sync + 'static,
) -> (
    Degrader,
    Svc,
    Arc<MemoryStore>,
    Arc<Mutex<Vec<Vec<(String, V)>>>>,
)
where
    V: serde::Serialize + serde::de::DeserializeOwned + Clone + Send + Sync + 'static,
{
    let d = degrader([ClassConfig::silver("inventory").fallback_route(Route::BatchMerge)]);
    let writes = Arc::new(Mutex::new(Vec::new()));
    let store = Arc::new(MemoryStore::default());
    let sink = {
        let writes = writes.clone();
        service_fn(move |batch: Batch<V>| {
            writes.lock().unwrap().push(batch.items);
            async { Ok::<_, BoxError>(()) }
        })
    };
    let (router, worker) = FallbackRouter::builder(&d)
        .shared_store(store.clone())
        .replay(replay_fn(|_, _| async { Replayed::Done }))
        .batch_merge("inventory", BatchMerge::new(extract, merge, sink))
        .build()
        .unwrap();
    let svc = layered(&d, "inventory", router, &App::default());
    tokio::spawn(worker.run());
    d.force_open("inventory").unwrap();
    (d, svc, store, writes)
}

#[tokio::test(start_paused = true)]
async fn a_delta_the_journal_cannot_read_back_is_refused_not_acknowledged() {
    // The journal's format is not self-describing: a field skipped when empty was written,
    // answered 202 and never merged (found by a hostile-input trial).
    #[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
    struct Delta {
        qty: i64,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        note: Option<String>,
    }
    let (_d, svc, store, writes) = merged_inventory(
        |req| {
            let body = std::str::from_utf8(&req.body).map_err(|e| e.to_string())?;
            let (qty, note) = body
                .split_once(' ')
                .map_or((body, None), |(q, n)| (q, Some(n)));
            let qty = qty
                .parse()
                .map_err(|e: std::num::ParseIntError| e.to_string())?;
            Ok((
                req.uri.clone(),
                Delta {
                    qty,
                    note: note.map(str::to_owned),
                },
            ))
        },
        |v: &mut Delta, d: Delta| v.qty += d.qty,
    );
    // With a note, every field is written and read back: kept. Without, refused.
    let kept = call(&svc, post("/inventory/sku1", "4 restock")).await;
    assert_eq!(kept.status(), StatusCode::ACCEPTED);
    let refused = call(&svc, post("/inventory/sku2", "3")).await;
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.headers()[REASON_HEADER], "not_kept");
    run_for(1_000).await;
    let w = writes.lock().unwrap();
    assert_eq!(w.len(), 1);
    assert_eq!(w[0].len(), 1);
    assert_eq!((w[0][0].0.as_str(), w[0][0].1.qty), ("/inventory/sku1", 4));
    assert_eq!(store.depth(Queue::Journal).len, 0);
}

#[tokio::test(start_paused = true)]
async fn a_call_the_extract_refuses_is_malformed_and_one_it_panics_on_is_not_kept() {
    // An `Err` from `extract` was answered `503 not_kept` with `Retry-After: 1`: the client
    // retried a call that could never be kept (found by a trial of the fallback router).
    let (_d, svc, store, writes) = merged_inventory(
        |req| match &req.body[..] {
            b"boom" => panic!("the extractor's bug"),
            _ => sku_delta(req),
        },
        |sum: &mut i64, d| *sum += d,
    );
    let refused = call(&svc, post("/inventory/sku1", "abc")).await;
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    assert_eq!(refused.headers()[REASON_HEADER], "malformed");
    assert!(!refused.headers().contains_key(http::header::RETRY_AFTER));
    // The extractor's words go to the client; a panic's stay in the server's log.
    assert_eq!(
        refused.headers()[DETAIL_HEADER],
        "invalid digit found in string"
    );
    let panicked = call(&svc, post("/inventory/sku1", "boom")).await;
    assert_eq!(panicked.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(panicked.headers()[REASON_HEADER], "not_kept");
    assert!(!panicked.headers().contains_key(DETAIL_HEADER));
    assert!(panicked.headers().contains_key(http::header::RETRY_AFTER));
    let kept = call(&svc, post("/inventory/sku1", "5")).await;
    assert_eq!(kept.status(), StatusCode::ACCEPTED);
    run_for(1_000).await;
    assert_eq!(*writes.lock().unwrap(), vec![vec![("sku1".to_owned(), 5)]]);
    assert_eq!(store.depth(Queue::Journal).len, 0);
}

#[tokio::test(start_paused = true)]
async fn kept_work_of_a_class_renamed_between_runs_is_said_not_silently_stranded() {
    // A class renamed with deltas journaled and retries kept: the deltas stayed unwritten
    // and the retries were replayed past the renamed class's open breaker, with no line
    // logged (found by a trial of the fallback router).
    let store = Arc::new(MemoryStore::default());
    let app = App::default();
    let writes = Arc::new(Mutex::new(Vec::new()));
    // One run's degrader and router, its two classes named as given.
    let run = |inv: &str, pay: &str| {
        let d = degrader([
            ClassConfig::silver(inv).fallback_route(Route::BatchMerge),
            ClassConfig::gold(pay).fallback_route(Route::DelayedRetry),
        ]);
        let (router, worker) = FallbackRouter::builder(&d)
            .shared_store(store.clone())
            .replay(replay(&app))
            .batch_merge(inv, inventory(writes.clone(), Arc::default()))
            .build()
            .unwrap();
        (d, router, worker)
    };
    {
        let (d, router, _worker) = run("inv", "pay");
        let inv = layered(&d, "inv", router.clone(), &app);
        let pay = layered(&d, "pay", router, &app);
        d.force_open("inv").unwrap();
        d.force_open("pay").unwrap();
        for i in 0..3 {
            let res = call(&inv, post(&format!("/inv/sku{i}"), "1")).await;
            assert_eq!(res.status(), StatusCode::ACCEPTED);
        }
        for i in 0..2 {
            let res = call(&pay, post(&format!("/pay/{i}"), "paid")).await;
            assert_eq!(res.status(), StatusCode::ACCEPTED);
        }
        // The process ends here, its worker never run.
    }
    assert_eq!(store.depth(Queue::Journal).len, 3);
    let (d, _router, worker) = run("inventory", "payment");
    d.force_open("payment").unwrap();
    let (logs, guard) = logs::Logs::capture();
    tokio::spawn(worker.run());
    run_for(40_000).await;
    drop(guard);
    let text = logs.text();
    let stranded = text
        .lines()
        .find(|l| l.contains("journaled batch_merge records of a class with no batch_merge now"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        stranded.contains("class=inv") && stranded.contains("records=3"),
        "{stranded}"
    );
    let unconfigured: Vec<_> = text
        .lines()
        .filter(|l| l.contains("kept tasks of a class the degrader does not configure"))
        .collect();
    assert_eq!(unconfigured.len(), 1, "once per class: {text}");
    assert!(unconfigured[0].contains("class=pay"), "{}", unconfigured[0]);
    // Nothing lost: the deltas are still journaled, the retries replayed.
    assert_eq!(store.depth(Queue::Journal).len, 3);
    assert!(writes.lock().unwrap().is_empty());
    assert_eq!(app.seen().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_merged_value_the_journal_cannot_read_back_is_not_sealed_and_its_deltas_stay() {
    // Each delta reads back; their sum, 0, is skipped when written, so the sealed batch could
    // not be read, and was never written nor kept (found by a review).
    #[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
    struct Delta {
        #[serde(skip_serializing_if = "is_zero", default)]
        qty: i64,
    }
    fn is_zero(q: &i64) -> bool {
        *q == 0
    }
    let (_d, svc, store, writes) = merged_inventory(
        |req| {
            let body = std::str::from_utf8(&req.body).map_err(|e| e.to_string())?;
            let qty = body
                .parse()
                .map_err(|e: std::num::ParseIntError| e.to_string())?;
            Ok((req.uri.clone(), Delta { qty }))
        },
        |v: &mut Delta, d: Delta| v.qty += d.qty,
    );
    for qty in ["5", "-5"] {
        let res = call(&svc, post("/inventory/sku1", qty)).await;
        assert_eq!(res.status(), StatusCode::ACCEPTED, "{qty}");
    }
    run_for(1_000).await;
    assert!(writes.lock().unwrap().is_empty(), "nothing written");
    assert_eq!(
        store.depth(Queue::Journal).len,
        2,
        "both deltas still journaled"
    );
    // One more delta: a sum that reads back is sealed and written, every delta in it.
    call(&svc, post("/inventory/sku1", "3")).await;
    run_for(1_000).await;
    let w = writes.lock().unwrap();
    assert_eq!((w.len(), w[0].len()), (1, 1));
    assert_eq!(w[0][0].1.qty, 3);
    assert_eq!(store.depth(Queue::Journal).len, 0);
}

#[tokio::test(start_paused = true)]
async fn a_failing_merged_write_is_retried_then_spooled_and_backfilled_never_dropped() {
    let d = degrader([ClassConfig::silver("inventory").fallback_route(Route::BatchMerge)]);
    let writes = Arc::new(Mutex::new(Vec::new()));
    let failures = Arc::new(AtomicUsize::new(usize::MAX));
    let store = Arc::new(MemoryStore::default());
    let (router, worker) = FallbackRouter::builder(&d)
        .shared_store(store.clone())
        .replay(replay_fn(|_, _| async { Replayed::Done }))
        .batch_merge(
            "inventory",
            inventory(writes.clone(), failures.clone()).max_attempts(3),
        )
        .build()
        .unwrap();
    let svc = layered(&d, "inventory", router, &App::default());
    tokio::spawn(worker.run());
    d.force_open("inventory").unwrap();
    d.tick_now();
    for i in 0..30 {
        call(&svc, post(&format!("/inventory/sku-{}", i % 3), "5")).await;
    }
    run_for(10_000).await;
    assert!(writes.lock().unwrap().is_empty());
    assert_eq!(store.depth(Queue::Spool).len, 1, "the batch is spooled");
    assert_eq!(store.depth(Queue::Journal).len, 0);
    // The database is back and the class healthy: the backfill writes it.
    failures.store(0, Ordering::SeqCst);
    d.reset("inventory").unwrap();
    d.tick_now();
    run_for(2_000).await;
    let w = writes.lock().unwrap();
    assert_eq!(totals(&w).values().sum::<i64>(), 150);
    assert_eq!(store.depth(Queue::Spool).len, 0);
}

/// Inventory deltas whose merge panics on overflow (`checked_add(..).expect(..)`).
fn overflowing(writes: Arc<Mutex<Vec<Batch<i64>>>>) -> BatchMerge<i64> {
    BatchMerge::new(
        sku_delta,
        |sum: &mut i64, d| *sum = sum.checked_add(d).expect("stock overflow"),
        service_fn(move |batch: Batch<i64>| {
            let writes = writes.clone();
            async move {
                writes.lock().unwrap().push(batch);
                Ok::<_, BoxError>(())
            }
        }),
    )
}

#[tokio::test(start_paused = true)]
async fn a_merge_that_panics_sends_its_delta_to_review_and_the_key_keeps_its_value() {
    // The panic came after the delta was journaled: the call was answered 503 `not_kept`
    // (a client's retry then counted it twice), the delta stayed in the journal unmerged, and
    // at the next start-up the journal's read-back panicked and stopped the worker.
    let d = degrader([ClassConfig::silver("inventory").fallback_route(Route::BatchMerge)]);
    let writes = Arc::new(Mutex::new(Vec::new()));
    let store = Arc::new(MemoryStore::default());
    let (router, worker) = FallbackRouter::builder(&d)
        .shared_store(store.clone())
        .replay(replay_fn(|_, _| async { Replayed::Done }))
        .batch_merge("inventory", overflowing(writes.clone()))
        .build()
        .unwrap();
    let review = router.review();
    let svc = layered(&d, "inventory", router, &App::default());
    let worker = tokio::spawn(worker.run());
    d.force_open("inventory").unwrap();
    let max = i64::MAX.to_string().leak();
    let mut answers = Vec::new();
    for (uri, body) in [
        ("/inventory/sku1", &*max),
        ("/inventory/sku1", "1"),
        ("/inventory/sku1", "-5"),
        ("/inventory/sku2", "3"),
    ] {
        answers.push(call(&svc, post(uri, body)).await);
    }
    for res in &answers {
        assert_eq!(res.status(), StatusCode::ACCEPTED, "{:?}", res.headers());
    }
    run_for(1_000).await;
    assert!(!worker.is_finished());
    let t = totals(&writes.lock().unwrap());
    assert_eq!(
        t,
        HashMap::from([("sku1".to_owned(), i64::MAX - 5), ("sku2".to_owned(), 3)])
    );
    let poisoned = store
        .get(Queue::Review, task_id(&answers[1]))
        .await
        .unwrap()
        .unwrap();
    let answer = poisoned.last_answer().unwrap_or_default();
    assert!(
        answer.starts_with("the merge function panicked: stock overflow"),
        "{answer}"
    );
    assert_eq!(store.depth(Queue::Journal).len, 0);
    // A person requeues it (the reason becomes "requeued"): written alone, through the sink,
    // not handed to the router's replay as if it were a task-API value.
    assert!(review.requeue(task_id(&answers[1])).await.unwrap());
    d.reset("inventory").unwrap();
    d.tick_now();
    run_for(3_000).await;
    assert!(
        writes
            .lock()
            .unwrap()
            .iter()
            .any(|b| b.items == [("sku1".to_owned(), 1)]),
        "{:?}",
        writes.lock().unwrap()
    );
    assert_eq!(store.depth(Queue::Review).len, 0);
    assert_eq!(store.depth(Queue::Retry).len, 0);

    // Read back from the journal at start-up: the first router kept both and died unflushed.
    d.force_open("inventory").unwrap();
    let writes = Arc::new(Mutex::new(Vec::new()));
    let store = Arc::new(MemoryStore::default());
    let build = |writes: &Arc<Mutex<Vec<Batch<i64>>>>| {
        FallbackRouter::builder(&d)
            .shared_store(store.clone())
            .replay(replay_fn(|_, _| async { Replayed::Done }))
            .batch_merge("inventory", overflowing(writes.clone()))
            .build()
            .unwrap()
    };
    let (first, _not_run) = build(&Arc::default());
    let svc = layered(&d, "inventory", first, &App::default());
    for body in [&*max, "1"] {
        assert_eq!(
            call(&svc, post("/inventory/sku1", body)).await.status(),
            StatusCode::ACCEPTED
        );
    }
    assert_eq!(store.depth(Queue::Journal).len, 2);
    let (_second, worker) = build(&writes);
    let worker = tokio::spawn(worker.run());
    run_for(1_000).await;
    assert!(!worker.is_finished());
    // Whichever of the two was read first is written, the other is in review.
    let review = store.list(Queue::Review, None, 10).await.unwrap();
    assert_eq!(review.len(), 1);
    let written = totals(&writes.lock().unwrap())["sku1"];
    assert!(written == i64::MAX || written == 1, "{written}");
    assert_eq!(store.depth(Queue::Journal).len, 0);
}

#[tokio::test(start_paused = true)]
async fn a_sink_that_panics_is_a_failed_write_and_the_other_classes_still_write() {
    // The panic unwound through the flush: the write was retried every step with no backoff,
    // never spooled, and the classes flushed after it in the same loop not at all.
    let d = degrader([
        ClassConfig::silver("inventory").fallback_route(Route::BatchMerge),
        ClassConfig::silver("points").fallback_route(Route::BatchMerge),
    ]);
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let panicking = BatchMerge::new(
        |req| Ok((req.uri.clone(), 1i64)),
        |sum: &mut i64, d| *sum += d,
        service_fn(move |_: Batch<i64>| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            async move {
                assert!(n == usize::MAX, "the driver panicked");
                Ok::<(), BoxError>(())
            }
        }),
    )
    .max_attempts(3);
    let writes = Arc::new(Mutex::new(Vec::new()));
    let store = Arc::new(MemoryStore::default());
    let (router, worker) = FallbackRouter::builder(&d)
        .shared_store(store.clone())
        .replay(replay_fn(|_, _| async { Replayed::Done }))
        .batch_merge("inventory", panicking)
        .batch_merge("points", inventory(writes.clone(), Arc::default()))
        .build()
        .unwrap();
    let inv = layered(&d, "inventory", router.clone(), &App::default());
    let points = layered(&d, "points", router, &App::default());
    tokio::spawn(worker.run());
    d.force_open("inventory").unwrap();
    d.force_open("points").unwrap();
    d.tick_now();
    for _ in 0..5 {
        call(&inv, post("/inventory/sku1", "1")).await;
        call(&points, post("/points/user1", "2")).await;
    }
    run_for(10_000).await;
    assert_eq!(
        totals(&writes.lock().unwrap()),
        HashMap::from([("user1".to_owned(), 10)])
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "three attempts, with backoff"
    );
    let spooled = store.list(Queue::Spool, None, 10).await.unwrap();
    assert_eq!(spooled.len(), 1, "then spooled");
    let answer = spooled[0].last_answer().unwrap_or_default();
    assert!(
        answer.contains("the sink panicked: the driver panicked"),
        "{answer}"
    );
    assert_eq!(store.depth(Queue::Journal).len, 0);
}

#[tokio::test(start_paused = true)]
async fn a_task_api_value_kept_by_a_class_that_also_merges_is_replayed_by_its_handler() {
    // Both are bytes: the task-API value went to the batch decoder ("unreadable batch") and
    // to manual review, unreplayed.
    let d = degrader([ClassConfig::silver("inventory").fallback_route(Route::Spool)]);
    let writes = Arc::new(Mutex::new(Vec::new()));
    let done = Arc::new(Mutex::new(Vec::new()));
    let seen = done.clone();
    let store = Arc::new(MemoryStore::default());
    let (router, worker) = FallbackRouter::builder(&d)
        .shared_store(store.clone())
        .replay(replay_task(move |t: Refund| {
            seen.lock().unwrap().push(t);
            async { Ok::<_, BoxError>(()) }
        }))
        .batch_merge("inventory", inventory(writes.clone(), Arc::default()))
        .build()
        .unwrap();
    let tasks = d.tasks::<Refund, TaskId>().keep(&router, |a| a.id).build();
    tokio::spawn(worker.run());
    d.force_open("inventory").unwrap();
    let refund = Refund {
        order: 7,
        cents: 250,
    };
    tasks
        .run("inventory", refund.clone(), |_| async {
            Ok::<_, BoxError>(TaskId::generate())
        })
        .await
        .unwrap();
    d.reset("inventory").unwrap();
    d.tick_now();
    run_for(5_000).await;
    assert_eq!(*done.lock().unwrap(), [refund]);
    assert_eq!(store.depth(Queue::Review).len, 0);
    assert!(writes.lock().unwrap().is_empty());
}

// ===== the embedded store across a restart =====

/// A file name in a directory of its own, removed when the directory is dropped.
fn temp(name: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let d = tempfile::Builder::new()
        .prefix("td-fallback-")
        .tempdir()
        .unwrap();
    let path = d.path().join(name);
    (d, path)
}

#[tokio::test]
async fn journaled_deltas_and_spooled_calls_survive_a_restart() {
    let (_dir, path) = temp("kept");
    let writes = Arc::new(Mutex::new(Vec::new()));
    let d = degrader([
        ClassConfig::silver("inventory").fallback_route(Route::BatchMerge),
        ClassConfig::bronze("browse").fallback_route(Route::Spool),
    ]);
    d.force_open("inventory").unwrap();
    d.force_open("browse").unwrap();
    d.tick_now();
    {
        // No worker runs: the process "dies" with everything journaled or spooled.
        let (router, _worker) = FallbackRouter::builder(&d)
            .store(EmbeddedStore::open(&path).unwrap())
            .replay(replay_fn(|_, _| async { Replayed::Done }))
            .batch_merge("inventory", inventory(writes.clone(), Arc::default()))
            .build()
            .unwrap();
        let inv = layered(&d, "inventory", router.clone(), &App::default());
        let browse = layered(&d, "browse", router, &App::default());
        for i in 0..40 {
            call(&inv, post(&format!("/inventory/sku-{}", i % 4), "1")).await;
            call(&browse, post("/log", "x")).await;
        }
    }
    let app = App::default();
    let (_router, worker) = FallbackRouter::builder(&d)
        .store(EmbeddedStore::open(&path).unwrap())
        .replay(replay(&app))
        .batch_merge("inventory", inventory(writes.clone(), Arc::default()))
        .build()
        .unwrap();
    d.reset("inventory").unwrap();
    d.reset("browse").unwrap();
    d.tick_now();
    let w = tokio::spawn(worker.run());
    for _ in 0..200 {
        if app.seen().len() == 40 && totals(&writes.lock().unwrap()).values().sum::<i64>() == 40 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    w.abort();
    assert_eq!(app.seen().len(), 40, "every spooled call replayed once");
    assert_eq!(totals(&writes.lock().unwrap()).values().sum::<i64>(), 40);
}

#[tokio::test]
async fn a_requeue_and_a_drop_of_the_same_task_at_once_do_not_both_succeed() {
    // Two operators (or a double click) act on each of 20 tasks in review at the same
    // moment: one of the two wins, and a dropped task is never replayed as well.
    let d = degrader([ClassConfig::gold("pay").fallback_route(Route::ManualReview)]);
    let (_dir, review) = temp("review");
    let (router, _worker) = FallbackRouter::builder(&d)
        .store(EmbeddedStore::open(&review).unwrap())
        .replay(replay_fn(|_, _| async { Replayed::Done }))
        .build()
        .unwrap();
    let review = router.review();
    let svc = layered(&d, "pay", router.clone(), &App::default());
    d.force_open("pay").unwrap();
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(task_id(&call(&svc, post(&format!("/pay/{i}"), "x")).await));
    }
    let store = router.store();
    for id in ids {
        let (requeued, dropped) = tokio::join!(
            review.requeue(id),
            review.drop_task(id, "op2", "refund issued by hand")
        );
        let (requeued, dropped) = (requeued.unwrap(), dropped.unwrap());
        assert!(
            requeued != dropped,
            "{id}: requeued {requeued}, dropped {dropped}"
        );
        let replayed = store.get(Queue::Retry, id).await.unwrap().is_some();
        let audited = store.get(Queue::Audit, id).await.unwrap().is_some();
        assert_eq!((replayed, audited), (requeued, dropped), "{id}");
    }
    assert_eq!(review.depth().len, 0);
}

#[tokio::test]
async fn the_store_applies_batches_atomically() {
    let (_dir, path) = temp("kept");
    let store = EmbeddedStore::open(&path).unwrap();
    let t = Task::new("c", None, Payload::Bytes(vec![1]));
    store
        .commit(vec![Op::Put(Queue::Retry, t.clone())])
        .await
        .unwrap();
    store
        .commit(vec![
            Op::Remove(Queue::Retry, t.id()),
            Op::Put(Queue::Review, t.clone()),
        ])
        .await
        .unwrap();
    assert_eq!(store.depth(Queue::Retry).len, 0);
    assert_eq!(store.depth(Queue::Review).len, 1);
}

// ===== cached =====

#[tokio::test(start_paused = true)]
async fn a_diverted_read_is_served_the_last_good_copy_with_its_age() {
    let d = degrader([ClassConfig::silver("product").fallback_route(Route::Cached)]);
    let id = d.class_id("product").unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = service_fn(move |req: Req| {
        let n = h.fetch_add(1, Ordering::SeqCst);
        async move {
            Ok::<_, Infallible>(
                Response::builder()
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(format!("{} v{n}", req.uri()))))
                    .unwrap(),
            )
        }
    });
    let degrade = d.layer(move |_: &Req| id).http();
    let svc = LastGoodLayer::new()
        .ttl(Duration::from_secs(60))
        .layer(degrade.layer(app));
    let get = |uri: &str| Request::get(uri).body(Full::new(Bytes::new())).unwrap();
    let body = |r: Res| async move { r.into_body().collect().await.unwrap().to_bytes() };

    let fresh = svc.clone().oneshot(get("/p/1")).await.unwrap();
    assert_eq!(body(fresh).await, "/p/1 v0");
    d.force_open("product").unwrap();
    tokio::time::sleep(Duration::from_secs(7)).await;
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);
    let copy = svc.clone().oneshot(get("/p/1")).await.unwrap();
    assert_eq!(copy.status(), StatusCode::OK);
    assert_eq!(copy.headers()["age"], "7");
    assert_eq!(copy.headers()[ROUTE_HEADER], "cached");
    assert_eq!(copy.headers()[REASON_HEADER], "forced_open");
    assert_eq!(copy.headers()["content-type"], "application/json");
    assert_eq!(body(copy).await, "/p/1 v0");
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    // Never seen: the layer's 503.
    let miss = svc.clone().oneshot(get("/p/2")).await.unwrap();
    assert_eq!(miss.status(), StatusCode::SERVICE_UNAVAILABLE);
    // Past the TTL: the 503 too.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let stale = svc.clone().oneshot(get("/p/1")).await.unwrap();
    assert_eq!(stale.status(), StatusCode::SERVICE_UNAVAILABLE);
    // Diverted to `cached`, whoever answered: not rejected; what the copy did is counted.
    d.tick_now();
    let history = d.history("product").unwrap();
    let (degraded, rejected) = history
        .iter()
        .fold((0, 0), |(d, r), w| (d + w.degraded, r + w.rejected));
    assert_eq!((degraded, rejected), (3, 0));
    let mut cached: Vec<(String, String, String, u64)> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(k, ..)| k.key().name() == tower_degrade::metrics::FALLBACK_CACHED)
        .map(|(k, _, _, v)| {
            let label = |name| {
                let l = k.key().labels().find(|l| l.key() == name).unwrap();
                l.value().to_owned()
            };
            let n = match v {
                metrics_util::debugging::DebugValue::Counter(n) => n,
                other => panic!("{other:?}"),
            };
            (label("service"), label("class"), label("result"), n)
        })
        .collect();
    cached.sort();
    let count = |result: &str, n| {
        (
            "test".to_owned(),
            "product".to_owned(),
            result.to_owned(),
            n,
        )
    };
    assert_eq!(
        cached,
        [
            count("miss", 2),
            count("served", 1),
            count("served_for_error", 0)
        ]
    );
}

#[test]
fn a_route_the_router_cannot_serve_is_said_when_it_is_built() {
    // A configuration file's `fallback = "batch_merge"` with no `batch_merge` in code.
    let (logs, _guard) = logs::Logs::capture();
    let d = degrader([
        ClassConfig::silver("stock").fallback_route(Route::BatchMerge),
        ClassConfig::silver("refund").fallback_route(Route::Service),
        ClassConfig::bronze("browse").fallback_route(Route::Spool),
    ]);
    let router = |b: FallbackRouterBuilder| {
        b.store(MemoryStore::default())
            .replay(replay(&App::default()))
    };
    let _built = router(FallbackRouter::builder(&d)).build().unwrap();
    let text = logs.text();
    assert_eq!(
        text.matches("this router does not serve").count(),
        2,
        "{text}"
    );
    assert!(
        text.contains("class=stock") && text.contains("class=refund"),
        "{text}"
    );
    // Given a fallback service, it serves both.
    let _served = router(FallbackRouter::builder(&d))
        .service(service_fn(
            |_: tower_degrade::fallback::Diverted<Req>| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
            },
        ))
        .build()
        .unwrap();
    assert_eq!(logs.text().matches("this router does not serve").count(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_cached_call_no_last_good_layer_looks_at_is_a_miss_and_said_once() {
    // A class routed to `cached` with nothing to serve its copies (no `LastGoodLayer`, or a
    // call that is not a read): its clients get the layer's 503, which the cached counter
    // and the log say, not a "diverted" that reads as served.
    let d = degrader([ClassConfig::bronze("clicks").fallback_route(Route::Cached)]);
    let id = d.class_id("clicks").unwrap();
    let app =
        service_fn(|_: Req| async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::new()))) });
    let bare = d.layer(move |_: &Req| id).http().layer(app);
    let wrapped = LastGoodLayer::new().layer(d.layer(move |_: &Req| id).http().layer(app));
    d.force_open("clicks").unwrap();
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);
    let (logs, _guard) = logs::Logs::capture();
    for _ in 0..2 {
        let get = Request::get("/clicks")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let res = bare.clone().oneshot(get).await.unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        let res = wrapped.clone().oneshot(post("/clicks", "x")).await.unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    let misses: u64 = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(k, ..)| {
            k.key().name() == tower_degrade::metrics::FALLBACK_CACHED
                && k.key()
                    .labels()
                    .any(|l| l.key() == "result" && l.value() == "miss")
        })
        .map(|(_, _, _, v)| match v {
            metrics_util::debugging::DebugValue::Counter(n) => n,
            other => panic!("{other:?}"),
        })
        .sum();
    assert_eq!(misses, 4);
    let text = logs.text();
    assert_eq!(
        text.matches("answered 503 with no copy looked for").count(),
        1,
        "{text}"
    );
    assert!(text.contains("class=clicks"), "{text}");
}

#[tokio::test(start_paused = true)]
async fn reads_that_differ_only_by_ignored_query_parameters_share_a_copy() {
    let d = degrader([ClassConfig::silver("product").fallback_route(Route::Cached)]);
    let id = d.class_id("product").unwrap();
    let app = service_fn(move |req: Req| async move {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(req.uri().to_string()))))
    });
    let degrade = d.layer(move |_: &Req| id).http();
    let svc = LastGoodLayer::new()
        .ignore_query(["utm_*", "gclid"])
        .unwrap()
        .layer(degrade.layer(app));
    let get = |uri: &str| Request::get(uri).body(Full::new(Bytes::new())).unwrap();
    let read = |uri: &'static str| {
        let svc = svc.clone();
        async move {
            let res = svc.oneshot(get(uri)).await.unwrap();
            let status = res.status();
            let body = res.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8(body.to_vec()).unwrap())
        }
    };

    read("/p/1?utm_source=ad&color=red&gclid=A1&utm_medium=cpc").await;
    read("/p/2?gclid=B2").await;
    d.force_open("product").unwrap();
    let kept = |uri: &str| (StatusCode::OK, uri.to_owned());
    // Another click of the same ad, or none: the copy of the read they share.
    let red = "/p/1?utm_source=ad&color=red&gclid=A1&utm_medium=cpc";
    assert_eq!(read("/p/1?color=red&gclid=C3").await, kept(red));
    assert_eq!(read("/p/1?color=red").await, kept(red));
    assert_eq!(read("/p/2").await, kept("/p/2?gclid=B2"));
    // The other parameters are still the key, and a name is matched whole (or by its prefix).
    for other in [
        "/p/1?color=blue&gclid=A1",
        "/p/1",
        "/p/1?color=red&gclid_x=1",
    ] {
        assert_eq!(
            read(other).await.0,
            StatusCode::SERVICE_UNAVAILABLE,
            "{other}"
        );
    }

    // What names no parameter is refused, naming the setting.
    for bad in ["*", "", "a&b", "a=b", "ut*m", "x\n"] {
        let err = LastGoodLayer::new().ignore_query([bad]).unwrap_err();
        assert!(err.to_string().contains("last_good.ignore_query"), "{err}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_read_gone_or_not_to_be_served_stale_has_no_copy_in_an_outage() {
    // A trial on product pages: a delisted product (404 after a 200) came back as the old
    // 200 once the class opened, and a price answered `must-revalidate` was served stale.
    let d = degrader([ClassConfig::silver("product").fallback_route(Route::Cached)]);
    let id = d.class_id("product").unwrap();
    let status = Arc::new(std::sync::Mutex::new(StatusCode::OK));
    let private = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (s, p) = (status.clone(), private.clone());
    let app = service_fn(move |req: Req| {
        let code = *s.lock().unwrap();
        let private = p.load(Ordering::SeqCst);
        async move {
            let mut r = Response::builder().status(code);
            if req.uri().path().starts_with("/price") {
                r = r.header("cache-control", "max-age=60, Must-Revalidate");
            }
            if private {
                r = r.header("cache-control", "private");
            }
            Ok::<_, Infallible>(
                r.body(Full::new(Bytes::from(req.uri().to_string())))
                    .unwrap(),
            )
        }
    });
    let svc = LastGoodLayer::new().layer(d.layer(move |_: &Req| id).http().layer(app));
    let get = |uri: &str| Request::get(uri).body(Full::new(Bytes::new())).unwrap();
    for uri in ["/p/1", "/p/2", "/p/3", "/p/4", "/price/1"] {
        let r = svc.clone().oneshot(get(uri)).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    // A newer answer not kept: the older copy goes too.
    private.store(true, Ordering::SeqCst);
    let now_private = svc.clone().oneshot(get("/p/3")).await.unwrap();
    assert_eq!(now_private.status(), StatusCode::OK);
    private.store(false, Ordering::SeqCst);
    // A transient refusal: the copy stays, for the outage it may be the start of.
    *status.lock().unwrap() = StatusCode::TOO_MANY_REQUESTS;
    assert_eq!(
        svc.clone().oneshot(get("/p/4")).await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    *status.lock().unwrap() = StatusCode::NOT_FOUND;
    assert_eq!(
        svc.clone().oneshot(get("/p/1")).await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    *status.lock().unwrap() = StatusCode::INTERNAL_SERVER_ERROR;
    let failed = svc.clone().oneshot(get("/p/2")).await.unwrap();
    assert_eq!(
        (
            failed.status(),
            failed.headers()[ROUTE_HEADER].to_str().unwrap()
        ),
        (StatusCode::OK, "cached"),
        "a failure is what the copy is for, before the class opens too"
    );
    d.force_open("product").unwrap();
    let served = |uri: &'static str| {
        let svc = svc.clone();
        async move {
            let r = svc.oneshot(get(uri)).await.unwrap();
            (r.status(), r.headers().get(ROUTE_HEADER).cloned())
        }
    };
    assert_eq!(
        served("/p/1").await.0,
        StatusCode::SERVICE_UNAVAILABLE,
        "gone: no copy"
    );
    assert_eq!(
        served("/p/2").await,
        (
            StatusCode::OK,
            Some(http::HeaderValue::from_static("cached"))
        ),
        "a failure is what the copy is for"
    );
    assert_eq!(
        served("/price/1").await.0,
        StatusCode::SERVICE_UNAVAILABLE,
        "must-revalidate: never served stale"
    );
    assert_eq!(
        served("/p/3").await.0,
        StatusCode::SERVICE_UNAVAILABLE,
        "answered private since: no copy"
    );
    assert_eq!(
        served("/p/4").await.0,
        StatusCode::OK,
        "429: the copy stays"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_or_timed_out_read_of_a_cached_class_is_answered_with_its_copy() {
    // A trial on product pages: a half-open probe's 500 reached its caller though a copy was
    // kept, as did every failure before the breaker opened.
    let d = degrader([
        ClassConfig::silver("product")
            .fallback_route(Route::Cached)
            .timeout(Duration::from_millis(300)),
        ClassConfig::silver("search")
            .fallback_route(Route::Reject)
            .timeout(Duration::from_millis(300)),
    ]);
    let (product, search) = (
        d.class_id("product").unwrap(),
        d.class_id("search").unwrap(),
    );
    // 0: healthy; 1: failing with a 500; 2: hanging.
    let mode = Arc::new(AtomicUsize::new(0));
    let m = mode.clone();
    let app = service_fn(move |req: Req| {
        let mode = m.load(Ordering::SeqCst);
        async move {
            if mode == 2 {
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
            let status = if mode == 1 { 500 } else { 200 };
            Ok::<_, Infallible>(
                Response::builder()
                    .status(status)
                    .body(Full::new(Bytes::from(format!("{} {status}", req.uri()))))
                    .unwrap(),
            )
        }
    });
    let class = move |req: &Req| {
        if req.uri().path().starts_with("/search") {
            search
        } else {
            product
        }
    };
    let layer = |stale: bool| -> Svc {
        BoxCloneSyncService::new(
            LastGoodLayer::new()
                .stale_if_error(stale)
                .layer(d.layer(class).http().layer(app.clone())),
        )
    };
    let (svc, plain) = (layer(true), layer(false));
    let get = |uri: &str| Request::get(uri).body(Full::new(Bytes::new())).unwrap();
    let answer = |svc: &Svc, uri: &'static str| {
        let svc = svc.clone();
        async move {
            let r = svc.oneshot(get(uri)).await.unwrap();
            let header = |h| {
                r.headers()
                    .get(h)
                    .map(|v: &http::HeaderValue| v.to_str().unwrap().to_owned())
            };
            let (status, route, reason) = (r.status(), header(ROUTE_HEADER), header(REASON_HEADER));
            let body = r.into_body().collect().await.unwrap().to_bytes();
            (status.as_u16(), route, reason, body)
        }
    };
    for uri in ["/p/1", "/search/1"] {
        assert_eq!(answer(&svc, uri).await.0, 200);
    }
    for uri in ["/p/1", "/search/1"] {
        assert_eq!(answer(&plain, uri).await.0, 200);
    }
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);
    mode.store(1, Ordering::SeqCst);
    assert_eq!(
        answer(&svc, "/p/1").await,
        (200, Some("cached".into()), None, Bytes::from("/p/1 200")),
        "the copy, with no reason: the call was admitted, and failed"
    );
    assert_eq!(answer(&plain, "/p/1").await.0, 500, "stale_if_error(false)");
    assert_eq!(answer(&svc, "/p/2").await.0, 500, "no copy: the failure");
    assert_eq!(answer(&svc, "/search/1").await.0, 500, "not a cached class");
    // Timed out by the layer: the copy, saying why.
    mode.store(2, Ordering::SeqCst);
    assert_eq!(
        answer(&svc, "/p/1").await,
        (
            200,
            Some("cached".into()),
            Some("timeout".into()),
            Bytes::from("/p/1 200")
        )
    );
    assert_eq!(answer(&plain, "/p/1").await.0, 504);
    assert_eq!(answer(&svc, "/search/1").await.0, 504);
    // The failures count against the class, the copies served for them apart.
    d.tick_now();
    let history = d.history("product").unwrap();
    let (errors, timeouts) = history
        .iter()
        .fold((0, 0), |(e, t), w| (e + w.errors, t + w.timeouts));
    assert_eq!((errors, timeouts), (3, 2));
    let served_for_error: u64 = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(k, ..)| k.key().name() == tower_degrade::metrics::FALLBACK_CACHED)
        .filter(|(k, ..)| {
            k.key()
                .labels()
                .any(|l| l.key() == "result" && l.value() == "served_for_error")
        })
        .map(|(_, _, _, v)| match v {
            metrics_util::debugging::DebugValue::Counter(n) => n,
            other => panic!("{other:?}"),
        })
        .sum();
    assert_eq!(served_for_error, 2, "the 500's copy and the timeout's");
}

// ===== the admin router =====

#[cfg(feature = "axum")]
#[tokio::test(start_paused = true)]
async fn the_review_queue_over_http_needs_the_token_and_keeps_an_audit() {
    let d = degrader([ClassConfig::gold("refund").fallback_route(Route::ManualReview)]);
    let app = App::default();
    let (router, _worker) = FallbackRouter::builder(&d)
        .store(MemoryStore::default())
        .replay(replay(&app))
        .build()
        .unwrap();
    let review = router.review();
    let svc = layered(&d, "refund", router, &app);
    d.force_open("refund").unwrap();
    let a = task_id(&call(&svc, post("/refund/1", "{\"cents\":5}")).await);
    let b = task_id(&call(&svc, post("/refund/2", "{}")).await);

    assert!(review.admin_router("short").is_err());
    let token = "0123456789abcdef-token";
    let admin = review.admin_router(token).unwrap();
    let send = |method: &str, uri: String, auth: Option<&str>| {
        let mut r = Request::builder().method(method).uri(uri);
        if let Some(t) = auth {
            r = r.header("authorization", format!("Bearer {t}"));
        }
        let admin = admin.clone();
        let req = r.body(axum::body::Body::empty()).unwrap();
        async move {
            let res = admin.oneshot(req).await.unwrap();
            let status = res.status();
            let body = res.into_body().collect().await.unwrap().to_bytes();
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            (status, json)
        }
    };
    let (s, _) = send("GET", "/review".into(), None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = send("GET", "/review".into(), Some("0123456789abcdef-wrong")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // A method the path does not take: JSON like every other answer (axum's had no body).
    let (s, err) = send("DELETE", format!("/review/{a}"), Some(token)).await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    assert!(err["error"].is_string(), "{err}");

    let (s, page) = send("GET", "/review?limit=1".into(), Some(token)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(page["tasks"][0]["id"], a.to_string());
    assert_eq!(page["tasks"][0]["payload"]["uri"], "/refund/1");
    assert_eq!(page["tasks"][0]["payload"]["body"], "{\"cents\":5}");
    let next = page["next"].as_str().unwrap().to_owned();
    let (_, page2) = send("GET", format!("/review?after={next}"), Some(token)).await;
    assert_eq!(page2["tasks"][0]["id"], b.to_string());
    for bad in ["x", "-1", "1.5", "+2", ""] {
        let (s, err) = send("GET", format!("/review?limit={bad}"), Some(token)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "limit={bad}");
        assert!(
            err["error"]
                .as_str()
                .unwrap()
                .contains("not a count of tasks"),
            "{err}"
        );
    }
    // A count past any integer is still a count: the largest page.
    let (s, page) = send(
        "GET",
        format!("/review?limit={}", "9".repeat(40)),
        Some(token),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(page["tasks"].as_array().unwrap().len(), 2);

    let (s, one) = send("GET", format!("/review/{b}"), Some(token)).await;
    assert_eq!((s, one["class"].as_str()), (StatusCode::OK, Some("refund")));
    let (s, _) = send("GET", "/review/nope".into(), Some(token)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // Exactly 32 hex digits: a signed form of the id was taken for it.
    let signed = format!("+{}", &b.to_string()[1..]);
    let (s, _) = send("GET", format!("/review/{signed}"), Some(token)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{signed}");
    let (s, err) = send("GET", "/review/%FF".into(), Some(token)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(err["error"].is_string(), "a JSON error: {err}");

    let (s, _) = send("POST", format!("/review/{a}/drop"), Some(token)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "a reason is required");
    let long = "x".repeat(2_000);
    let (s, _) = send(
        "POST",
        format!("/review/{a}/drop?by={long}&reason=dup"),
        Some(token),
    )
    .await;
    assert_eq!(
        s,
        StatusCode::BAD_REQUEST,
        "the audit record's text is bounded"
    );
    // Nothing that would forge a line of the log or the audit record, and no doubt about
    // who: refused, and nothing dropped.
    for forged in [
        "by=ops&reason=x%0A2026-12-06%20INFO%20dropped%20by%20ceo",
        "by=%1B%5B2J&reason=x",
        "by=ops&by=ceo&reason=x",
        "by=ops&reason=x&reason=y",
    ] {
        let (s, err) = send("POST", format!("/review/{a}/drop?{forged}"), Some(token)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{forged}");
        assert!(err["error"].is_string(), "a JSON error: {err}");
    }
    let (s, _) = send(
        "POST",
        format!("/review/{a}/drop?by=ops&reason=customer%20cancelled"),
        Some(token),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = send("POST", format!("/review/{a}/drop?reason=x"), Some(token)).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (_, audit) = send("GET", "/review/audit".into(), Some(token)).await;
    assert_eq!(
        audit["tasks"][0]["last_answer"],
        "dropped by ops: customer cancelled"
    );
    let (s, _) = send("POST", format!("/review/{b}/requeue"), Some(token)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(review.depth().len, 0);
}

#[tokio::test(start_paused = true)]
async fn a_recovering_class_without_live_calls_is_backfilled_one_with_them_waits() {
    use tower_degrade::breaker::{BreakerConfig, State};
    let d = support::builder("test")
        .breaker(
            BreakerConfig::default()
                .min_requests(5)
                .open_duration(Duration::from_secs(1)),
        )
        .class(ClassConfig::bronze("browse").fallback_route(Route::Spool))
        .build_with_worker()
        .unwrap()
        .0;
    let app = App::default();
    let (router, worker) = FallbackRouter::builder(&d)
        .store(MemoryStore::default())
        .replay(replay(&app))
        .build()
        .unwrap();
    let svc = layered(&d, "browse", router, &app);
    tokio::spawn(worker.run());
    // Failing calls open the breaker; diverted ones are spooled.
    app.fail.store(20, Ordering::SeqCst);
    *app.status.lock().unwrap() = 500;
    for _ in 0..20 {
        call(&svc, post("/log", "x")).await;
    }
    d.tick_now();
    assert_eq!(d.state("browse").unwrap(), State::Open);
    for _ in 0..10 {
        assert_eq!(
            call(&svc, post("/log", "x")).await.status(),
            StatusCode::ACCEPTED
        );
    }
    // Past the open time, probes pass: recovering.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    d.tick_now();
    for _ in 0..5 {
        call(&svc, post("/log", "probe")).await;
    }
    d.tick_now();
    assert_eq!(d.state("browse").unwrap(), State::Recovering);
    let before = app.seen().len();
    // Live calls in the window: the spool waits.
    let live = call(&svc, post("/log", "live")).await;
    let kept = 10 + usize::from(live.status() == StatusCode::ACCEPTED);
    d.tick_now();
    run_for(300).await;
    let replays = |app: &App| {
        app.seen()[before..]
            .iter()
            .filter(|s| s.2.is_some())
            .count()
    };
    assert_eq!(
        replays(&app),
        0,
        "no backfill beside live calls while recovering"
    );
    // No live calls: backfilled.
    d.tick_now();
    assert_eq!(d.state("browse").unwrap(), State::Recovering);
    run_for(2_000).await;
    assert_eq!(replays(&app), kept);
}

#[tokio::test(start_paused = true)]
async fn calls_with_the_same_key_at_once_keep_one_task() {
    let d = degrader([ClassConfig::gold("pay").fallback_route(Route::DelayedRetry)]);
    let app = App::default();
    let (store, _, _worker, svc) = router_for(&d, "pay", &app, |b| b);
    d.force_open("pay").unwrap();
    let calls = (0..8).map(|_| {
        let svc = svc.clone();
        tokio::spawn(async move {
            let req = Request::post("/pay/9")
                .header("idempotency-key", "order-9")
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap();
            task_id(&svc.oneshot(req).await.unwrap())
        })
    });
    let mut ids = Vec::new();
    for c in calls.collect::<Vec<_>>() {
        ids.push(c.await.unwrap());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "one task for one key");
    assert_eq!(store.depth(Queue::Retry).len, 1);
}

/// Request headers, by name and raw value.
type Headers<'a> = &'a [(&'a str, &'a [u8])];
/// A path, the request its copy is kept for, one it must not be served to, one it is.
type Case<'a> = (&'a str, Headers<'a>, Headers<'a>, Option<Headers<'a>>);

#[tokio::test(start_paused = true)]
async fn a_copy_is_served_only_to_a_request_it_answers() {
    // Each case keeps a copy for one request, then asks for it, degraded, as another that
    // the copy does not answer: another user by split cookies or a non-UTF-8 id, another
    // host, another language the answer varied on, a private answer in capitals, a range.
    let d = degrader([ClassConfig::silver("product").fallback_route(Route::Cached)]);
    let id = d.class_id("product").unwrap();
    let app = service_fn(|req: Req| async move {
        let h = |n: &str| {
            req.headers()
                .get_all(n)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect::<Vec<_>>()
                .join(";")
        };
        let body = format!(
            "{} {} {} {}",
            req.uri(),
            h("cookie"),
            h("host"),
            h("accept-language")
        );
        let mut res = Response::new(Full::new(Bytes::from(body)));
        if req.headers().contains_key("range") {
            *res.status_mut() = StatusCode::PARTIAL_CONTENT;
        }
        for (from, to) in [("x-cc", "cache-control"), ("x-vary", "vary")] {
            if let Some(v) = req.headers().get(from) {
                res.headers_mut().insert(to, v.clone());
            }
        }
        Ok::<_, Infallible>(res)
    });
    let svc = LastGoodLayer::new()
        .vary("cookie")
        .unwrap()
        .vary("x-user-id")
        .unwrap()
        .layer(d.layer(move |_: &Req| id).http().layer(app));
    let get = |uri: &str, headers: &[(&str, &[u8])]| {
        let mut r = Request::get(uri);
        for (n, v) in headers {
            r = r.header(*n, http::HeaderValue::from_bytes(v).unwrap());
        }
        r.body(Full::new(Bytes::new())).unwrap()
    };
    let alice: Headers<'_> = &[("cookie", b"theme=dark"), ("cookie", b"session=alice")];
    let bob: Headers<'_> = &[("cookie", b"theme=dark"), ("cookie", b"session=bob")];
    let e_acute: Headers<'_> = &[("x-user-id", b"\xe9mile")];
    let e_grave: Headers<'_> = &[("x-user-id", b"\xe8mile")];
    let shop_a: Headers<'_> = &[("host", b"shop-a.example")];
    let shop_b: Headers<'_> = &[("host", b"shop-b.example")];
    let de: Headers<'_> = &[("accept-language", b"de"), ("x-vary", b"Accept-Language")];
    let ja: Headers<'_> = &[("accept-language", b"ja")];
    let private: Headers<'_> = &[("x-cc", b"max-age=60, Private")];
    let range: Headers<'_> = &[("range", b"bytes=0-1")];
    // (kept for, asked by: not served, asked by: served)
    let cases: [Case<'_>; 6] = [
        ("/split", alice, bob, Some(alice)),
        ("/id", e_acute, e_grave, Some(e_acute)),
        ("/host", shop_a, shop_b, Some(shop_a)),
        ("/lang", de, ja, Some(&[("accept-language", b"de")])),
        ("/private", private, &[], None),
        ("/range", range, &[], None),
    ];
    for (uri, kept_for, _, _) in &cases {
        let res = svc.clone().oneshot(get(uri, kept_for)).await.unwrap();
        assert!(res.status().is_success(), "{uri}");
    }
    d.force_open("product").unwrap();
    for (uri, _, other, same) in &cases {
        let res = svc.clone().oneshot(get(uri, other)).await.unwrap();
        assert_eq!(
            res.status(),
            StatusCode::SERVICE_UNAVAILABLE,
            "{uri}: not served"
        );
        if let Some(same) = same {
            let res = svc.clone().oneshot(get(uri, same)).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK, "{uri}: served to its own");
            assert_eq!(res.headers()[ROUTE_HEADER], "cached");
        }
    }
    // A range is not served from a copy either.
    d.reset("product").unwrap();
    svc.clone().oneshot(get("/whole", &[])).await.unwrap();
    d.force_open("product").unwrap();
    let res = svc.clone().oneshot(get("/whole", range)).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let res = svc.clone().oneshot(get("/whole", &[])).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    // A key over 4 KiB is neither kept nor served: a client's 30 KB query strings made the
    // 10,000 entries take 340 MB.
    d.reset("product").unwrap();
    let long = format!(
        "/long?pad={}",
        "x".repeat(tower_degrade::fallback::MAX_CACHE_KEY_BYTES)
    );
    let just = format!("/long?pad={}", "x".repeat(3_000));
    for uri in [&long, &just] {
        svc.clone().oneshot(get(uri, &[])).await.unwrap();
    }
    d.force_open("product").unwrap();
    let res = svc.clone().oneshot(get(&long, &[])).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE, "not kept");
    let res = svc.clone().oneshot(get(&just, &[])).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK, "under the bound: kept");
}

#[tokio::test(start_paused = true)]
async fn a_personal_read_is_never_served_to_someone_else() {
    let d = degrader([ClassConfig::silver("account").fallback_route(Route::Cached)]);
    let id = d.class_id("account").unwrap();
    let app = service_fn(|req: Req| async move {
        let who = req
            .headers()
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let mut res = Response::new(Full::new(Bytes::from(format!("account of {who}"))));
        if req.uri() == "/session" {
            res.headers_mut()
                .insert("set-cookie", "s=1".parse().unwrap());
        }
        Ok::<_, Infallible>(res)
    });
    let svc = LastGoodLayer::new().layer(d.layer(move |_: &Req| id).http().layer(app));
    let get = |uri: &str, auth: Option<&str>| {
        let mut r = Request::get(uri);
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        r.body(Full::new(Bytes::new())).unwrap()
    };
    svc.clone()
        .oneshot(get("/me", Some("alice")))
        .await
        .unwrap();
    svc.clone().oneshot(get("/session", None)).await.unwrap();
    d.force_open("account").unwrap();
    let other = svc.clone().oneshot(get("/me", Some("bob"))).await.unwrap();
    assert_eq!(other.status(), StatusCode::SERVICE_UNAVAILABLE);
    let anonymous = svc.clone().oneshot(get("/me", None)).await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::SERVICE_UNAVAILABLE);
    let session = svc.clone().oneshot(get("/session", None)).await.unwrap();
    assert_eq!(
        session.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "Set-Cookie is not kept"
    );
}

#[tokio::test(start_paused = true)]
async fn a_deadline_of_never_and_a_framing_header_as_key_are_handled() {
    // `deadline(Some(Duration::MAX))` panicked (overflow) on the first call kept.
    let d = degrader([ClassConfig::gold("pay").fallback_route(Route::DelayedRetry)]);
    let app = App::default();
    let (store, _, _worker, svc) = router_for(&d, "pay", &app, |b| {
        b.retry(RetryPolicy::default().deadline(Some(Duration::MAX)))
    });
    d.force_open("pay").unwrap();
    let res = call(&svc, post("/pay/1", "x")).await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    let kept = store
        .get(Queue::Retry, task_id(&res))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(kept.deadline_ms(), Some(u64::MAX), "never");
    // `content-length` as the idempotency header made every request of one length one task.
    for framing in [
        "content-length",
        "Transfer-Encoding",
        "host",
        "content-type",
        // The header replays carry their attempt number in.
        "X-Degrade-Replay",
    ] {
        let e = Capture::new()
            .idempotency_header(framing)
            .unwrap_err()
            .to_string();
        assert!(e.contains("capture.idempotency_header"), "{framing}: {e}");
    }
    assert!(Capture::new().idempotency_header("x-request-id").is_ok());
    // A name that is not one is shown escaped, not as a blank.
    let e = Capture::new()
        .idempotency_header("\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("`\\n` is not a valid HTTP header name"), "{e}");
}

#[tokio::test(start_paused = true)]
async fn a_router_keeps_nothing_for_another_degraders_layer() {
    // A layer given another degrader's router had its calls kept there: replayed into the
    // other's app, held back by the other's breaker and counted as its classes.
    let app = App::default();
    let ours = degrader([ClassConfig::gold("pay").fallback_route(Route::DelayedRetry)]);
    let theirs = support::named_degrader(
        "theirs",
        [ClassConfig::gold("pay").fallback_route(Route::DelayedRetry)],
    );
    let (store, router, _worker, own) = router_for(&ours, "pay", &app, |b| b);
    let wired_wrong = layered(&theirs, "pay", router.clone(), &app);
    theirs.force_open("pay").unwrap();
    let res = call(&wired_wrong, post("/pay", "x")).await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()[REASON_HEADER], "not_kept");
    let tasks = theirs
        .tasks::<Refund, String>()
        .keep(&router, |a| a.id.to_string())
        .build();
    let refund = Refund { order: 1, cents: 1 };
    let err = tasks
        .run("pay", refund, |_| async {
            Ok::<_, BoxError>(String::new())
        })
        .await
        .unwrap_err();
    let not_kept = tower_degrade::error::degraded(&*err).map(|d| d.reason());
    assert_eq!(
        not_kept,
        Some(tower_degrade::gate::Reason::NotKept),
        "{err}"
    );
    assert_eq!(store.depth(Queue::Retry).len, 0, "nothing kept");
    // The router's own degrader's calls are kept.
    ours.force_open("pay").unwrap();
    assert_eq!(
        call(&own, post("/pay", "x")).await.status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(store.depth(Queue::Retry).len, 1);
}

#[tokio::test(start_paused = true)]
async fn a_call_refused_for_its_key_has_its_late_message_read_before_the_answer() {
    // Over HTTP/2 a message that comes after the answer, unread, counts against the client's
    // connection (see `DrainRejected`): the router reads the body of a call it refuses before
    // reading it.
    let d = degrader([ClassConfig::bronze("orders").fallback_route(Route::Spool)]);
    let (router, _worker) = FallbackRouter::builder(&d)
        .store(MemoryStore::default())
        .replay(replay_fn(|_, _| async { Replayed::Done }))
        .build()
        .unwrap();
    let app = service_fn(|_req: Request<late::LateMessage>| async {
        Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
    });
    let orders = d.class_id("orders").unwrap();
    let svc = d.layer(orders).http().fallback_with(router).layer(app);
    d.force_open("orders").unwrap();

    let (body, client) = late::late_message();
    let req = Request::post("/orders")
        .header("idempotency-key", "order\t42")
        .body(body)
        .unwrap();
    let answer = tokio::spawn(svc.oneshot(req));
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert!(!answer.is_finished(), "answered before the body ended");
    client.send.send(Bytes::from_static(b"order 7")).unwrap();
    let res = answer.await.unwrap().unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    assert_eq!(res.headers()[REASON_HEADER], "malformed");
    assert_eq!(client.read.load(Ordering::SeqCst), 7);
}
