//! The chaos layer: what each fault does to a call, at what rate, to which calls, and that the
//! degrade layer outside it measures injected faults like real ones. All on tokio's paused
//! clock.

#[path = "../support.rs"]
mod support;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Body;
use http::{Request, Response, StatusCode};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_degrade::breaker::{BreakerConfig, State};
use tower_degrade::chaos::{Chaos, ChaosError, FAULT_HEADER, Fault, FaultKind, Target};
use tower_degrade::error::ConfigError;
use tower_degrade::{BoxError, ClassConfig, ClassId, Degrader};

fn shop() -> Degrader {
    support::builder("shop")
        .class(ClassConfig::gold("payment").depends_on("db"))
        .class(
            ClassConfig::silver("inventory")
                .depends_on("db")
                .depends_on("redis"),
        )
        .class(ClassConfig::bronze("browse_log").depends_on("third_party:analytics"))
        .build_with_worker()
        .expect("valid config")
        .0
}

/// The shop's HTTP app: each call counts as work done, then answers 200.
fn app(
    d: &Degrader,
    chaos: &Chaos,
    done: Arc<AtomicU64>,
) -> impl Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone {
    let classify = d
        .http_classifier()
        .route(None, "/pay/{id}", "payment")
        .unwrap()
        .route(None, "/inventory/{sku}", "inventory")
        .unwrap()
        .route(None, "/log", "browse_log")
        .unwrap()
        .build();
    let inner = service_fn(move |_req: Request<Body>| {
        let done = done.clone();
        async move {
            done.fetch_add(1, Ordering::Relaxed);
            Ok::<_, Infallible>(Response::new(Body::empty()))
        }
    });
    chaos.layer(classify).http().layer(inner)
}

async fn post(
    svc: &mut (impl Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone),
    path: &str,
) -> Response<Body> {
    let req = Request::post(path).body(Body::empty()).unwrap();
    svc.ready().await.unwrap().call(req).await.unwrap()
}

fn fault_of(res: &Response<Body>) -> Option<&str> {
    res.headers().get(FAULT_HEADER).map(|v| v.to_str().unwrap())
}

#[tokio::test(start_paused = true)]
async fn nothing_is_injected_until_a_fault_is_set_and_after_it_is_cleared() {
    let d = shop();
    let chaos = Chaos::builder(&d).seed(1).build();
    let done = Arc::new(AtomicU64::new(0));
    let mut svc = app(&d, &chaos, done.clone());
    for path in ["/pay/1", "/inventory/a", "/log"] {
        let res = post(&mut svc, path).await;
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(fault_of(&res), None);
    }
    chaos
        .set(Target::class("payment"), Fault::new().errors(1.0))
        .unwrap();
    let res = post(&mut svc, "/pay/1").await;
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(fault_of(&res), Some("error"));
    // Other classes are untouched.
    assert_eq!(post(&mut svc, "/log").await.status(), StatusCode::OK);
    assert!(chaos.clear(&Target::class("payment")));
    assert!(!chaos.clear(&Target::class("payment")));
    assert_eq!(post(&mut svc, "/pay/1").await.status(), StatusCode::OK);
    // An error never reached the service: 3 + 1 + 1 calls did.
    assert_eq!(done.load(Ordering::Relaxed), 5);
    let injected = chaos.injected();
    assert_eq!(
        (injected.errors, injected.aborts, injected.hangs),
        (1, 0, 0)
    );
}

/// Which of `n` calls of the generic service a fault struck, and how.
async fn strikes(seed: u64, fault: Fault, n: usize) -> Vec<Option<FaultKind>> {
    let d = shop();
    let chaos = Chaos::builder(&d).seed(seed).build();
    chaos.set(Target::class("payment"), fault).unwrap();
    let pay = d.class_id("payment").unwrap();
    let mut svc = chaos
        .layer(pay)
        .layer(service_fn(|x: u64| async move { Ok::<_, BoxError>(x) }));
    let mut out = Vec::with_capacity(n);
    for i in 0..n as u64 {
        let r = svc.ready().await.unwrap().call(i).await;
        out.push(match r {
            Ok(x) => {
                assert_eq!(x, i);
                None
            }
            Err(e) => {
                let e = e.downcast::<ChaosError>().expect("a ChaosError");
                assert_eq!(e.class(), "payment");
                Some(e.fault())
            }
        });
    }
    out
}

#[tokio::test(start_paused = true)]
async fn failures_strike_the_shares_set_and_the_same_seed_strikes_the_same_calls() {
    let fault = Fault::new().errors(0.2).aborts(0.1);
    let n = 10_000;
    let a = strikes(42, fault, n).await;
    let count = |k| a.iter().filter(|s| **s == Some(k)).count();
    // Binomial: 2,000 ± 40 and 1,000 ± 30 (one standard deviation); four of them allowed.
    let (errors, aborts) = (count(FaultKind::Error), count(FaultKind::Abort));
    assert!((1_840..=2_160).contains(&errors), "{errors} errors");
    assert!((880..=1_120).contains(&aborts), "{aborts} aborts");
    assert_eq!(count(FaultKind::Hang), 0);
    assert_eq!(
        strikes(42, fault, n).await,
        a,
        "the same seed strikes the same calls"
    );
    assert_ne!(
        strikes(43, fault, n).await,
        a,
        "another seed strikes others"
    );
}

#[tokio::test(start_paused = true)]
async fn latency_delays_the_call_before_the_service_sees_it() {
    let d = shop();
    let chaos = Chaos::builder(&d).build();
    chaos
        .set(
            Target::class("inventory"),
            Fault::new()
                .latency(Duration::from_millis(900))
                .jitter(Duration::from_millis(100)),
        )
        .unwrap();
    let start = Instant::now();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let inv = d.class_id("inventory").unwrap();
    let mut svc = chaos.layer(inv).layer(service_fn({
        let seen = seen.clone();
        move |()| {
            seen.lock().unwrap().push(start.elapsed());
            async { Ok::<_, BoxError>(()) }
        }
    }));
    let mut delays = Vec::new();
    for _ in 0..50 {
        let before = Instant::now();
        svc.ready().await.unwrap().call(()).await.unwrap();
        delays.push(before.elapsed());
    }
    for d in &delays {
        assert!(
            *d >= Duration::from_millis(900) && *d < Duration::from_millis(1000),
            "{d:?}"
        );
    }
    // Jittered: not all the same.
    assert!(delays.iter().any(|d| *d != delays[0]));
    // The service saw each call only after its delay.
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 50);
    assert!(seen[0] >= Duration::from_millis(900));
    assert_eq!(chaos.injected().delayed, 50);
}

#[tokio::test(start_paused = true)]
async fn an_abort_does_the_work_and_loses_the_answer() {
    let d = shop();
    let chaos = Chaos::builder(&d).build();
    chaos
        .set(Target::route("/inventory/{sku}"), Fault::new().aborts(1.0))
        .unwrap();
    let done = Arc::new(AtomicU64::new(0));
    let mut svc = app(&d, &chaos, done.clone());
    let res = post(&mut svc, "/inventory/sku-1").await;
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(fault_of(&res), Some("abort"));
    assert_eq!(done.load(Ordering::Relaxed), 1, "the work was done");
    // The route's other paths are not struck.
    assert_eq!(post(&mut svc, "/pay/1").await.status(), StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn a_route_target_strikes_inside_a_nested_router() {
    // Under `Router::nest` the layer sees the path stripped of the prefix: a full-path route
    // target (as classification reads it) never struck.
    let d = shop();
    let chaos = Chaos::builder(&d).build();
    chaos
        .set(
            Target::route("/api/inventory/{sku}"),
            Fault::new().errors(1.0),
        )
        .unwrap();
    let classify = d
        .http_classifier()
        .route(None, "/api/inventory/{sku}", "inventory")
        .unwrap()
        .build();
    let api = axum::Router::new()
        .route("/inventory/{sku}", axum::routing::post(|| async { "ok" }))
        .layer(chaos.layer(classify).http());
    let app = axum::Router::new().nest("/api", api);
    let req = || {
        Request::post("/api/inventory/sku-1")
            .body(Body::empty())
            .unwrap()
    };
    let res = app.clone().oneshot(req()).await.unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(fault_of(&res), Some("error"));
    chaos.clear(&Target::route("/api/inventory/{sku}"));
    assert_eq!(app.oneshot(req()).await.unwrap().status(), StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn a_hang_answers_nothing_until_the_caller_gives_up_or_its_limit() {
    let d = shop();
    let chaos = Chaos::builder(&d).build();
    chaos
        .set(
            Target::class("browse_log"),
            Fault::new().hangs(1.0).hang_for(Duration::from_secs(5)),
        )
        .unwrap();
    let done = Arc::new(AtomicU64::new(0));
    let mut svc = app(&d, &chaos, done.clone());
    let req = Request::post("/log").body(Body::empty()).unwrap();
    let given_up =
        tokio::time::timeout(Duration::from_secs(1), svc.ready().await.unwrap().call(req)).await;
    assert!(given_up.is_err(), "still hanging after 1 s");
    let start = Instant::now();
    let res = post(&mut svc, "/log").await;
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(fault_of(&res), Some("hang"));
    assert_eq!(done.load(Ordering::Relaxed), 0);
    assert_eq!(chaos.injected().hangs, 2);
}

#[tokio::test(start_paused = true)]
async fn a_dependency_strikes_every_class_that_depends_on_it() {
    let d = shop();
    let chaos = Chaos::builder(&d).build();
    let done = Arc::new(AtomicU64::new(0));
    let mut svc = app(&d, &chaos, done.clone());
    chaos
        .set(Target::dependency("db"), Fault::new().errors(1.0))
        .unwrap();
    assert_eq!(
        post(&mut svc, "/pay/1").await.status(),
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(
        post(&mut svc, "/inventory/a").await.status(),
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(post(&mut svc, "/log").await.status(), StatusCode::OK);
    // A slow redis on top: inventory (db + redis) is slow and failing, payment only failing.
    chaos
        .set(
            Target::dependency("redis"),
            Fault::new().latency(Duration::from_millis(300)),
        )
        .unwrap();
    let start = Instant::now();
    post(&mut svc, "/pay/1").await;
    assert_eq!(start.elapsed(), Duration::ZERO);
    let start = Instant::now();
    let res = post(&mut svc, "/inventory/a").await;
    assert_eq!(start.elapsed(), Duration::from_millis(300));
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(chaos.faults().len(), 2);
    chaos.clear_all();
    assert!(chaos.faults().is_empty());
    assert_eq!(
        post(&mut svc, "/inventory/a").await.status(),
        StatusCode::OK
    );
}

#[tokio::test(start_paused = true)]
async fn grpc_calls_get_a_status_the_grpc_protocol_counts_as_a_failure() {
    let d = shop();
    let chaos = Chaos::builder(&d).build();
    chaos
        .set(Target::class("payment"), Fault::new().errors(1.0))
        .unwrap();
    let classify = d
        .http_classifier()
        .grpc("/shop.Payments/Callback", "payment")
        .unwrap()
        .build();
    let inner = service_fn(|_req: Request<Body>| async {
        Ok::<_, Infallible>(Response::new(Body::empty()))
    });
    let mut svc = chaos.layer(classify).grpc().layer(inner);
    let req = Request::post("/shop.Payments/Callback")
        .header("content-type", "application/grpc")
        .body(Body::empty())
        .unwrap();
    let res = svc.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["grpc-status"], "14");
    assert_eq!(res.headers()["grpc-message"], "chaos: injected error");
}

#[test]
fn bad_faults_and_targets_are_refused_naming_what_is_wrong() {
    let d = shop();
    let chaos = Chaos::builder(&d).build();
    let field = |r: Result<(), ConfigError>| match r.unwrap_err() {
        ConfigError::InvalidValue { field, reason } => format!("{field}: {reason}"),
        other => other.to_string(),
    };
    let msg = field(chaos.set(Target::class("payment"), Fault::new().errors(1.5)));
    assert!(msg.starts_with("chaos.errors: 1.5"), "{msg}");
    let msg = field(chaos.set(Target::class("payment"), Fault::new().hangs(f64::NAN)));
    assert!(msg.starts_with("chaos.hangs: NaN"), "{msg}");
    let msg = field(chaos.set(
        Target::class("payment"),
        Fault::new().errors(0.6).aborts(0.6),
    ));
    assert!(msg.contains("cannot exceed 1"), "{msg}");
    // Each at a day, their sum two: taken before.
    let day = Duration::from_secs(86_400);
    let msg = field(chaos.set(
        Target::class("payment"),
        Fault::new().latency(day).jitter(day),
    ));
    assert!(msg.starts_with("chaos.jitter: latency + jitter"), "{msg}");
    let msg = field(chaos.set(Target::class("nope"), Fault::new().errors(0.1)));
    assert!(msg.contains("unknown class `nope`"), "{msg}");
    let msg = field(chaos.set(Target::dependency("kafka"), Fault::new().errors(0.1)));
    assert!(msg.contains("no class depends on `kafka`"), "{msg}");
    let msg = field(chaos.set(Target::route("no-slash{"), Fault::new().errors(0.1)));
    assert!(msg.starts_with("chaos.target: "), "the field given: {msg}");
    // A target with no name is none.
    for empty in ["class:", "dependency:", "route:"] {
        assert!(empty.parse::<Target>().is_err(), "{empty}");
    }
    // An empty fault names its target too: it was accepted for any class.
    let msg = field(chaos.set(Target::class("nope"), Fault::new()));
    assert!(msg.contains("unknown class `nope`"), "{msg}");
    // Nothing was set by the refused calls.
    assert!(chaos.faults().is_empty());
}

/// Inside the degrade layer, injected errors open the breaker as a failing dependency would.
#[tokio::test(start_paused = true)]
async fn the_degrade_layer_measures_injected_faults_like_real_ones() {
    let (d, _worker) = support::builder("shop")
        .breaker(BreakerConfig::default().min_requests(10))
        .class(ClassConfig::silver("inventory").depends_on("db"))
        .build_with_worker()
        .unwrap();
    let chaos = Chaos::builder(&d).seed(3).build();
    let inv: ClassId = d.class_id("inventory").unwrap();
    let mut svc = d.layer(inv).layer(
        chaos
            .layer(inv)
            .layer(service_fn(|()| async { Ok::<_, BoxError>(()) })),
    );
    for _ in 0..20 {
        svc.ready().await.unwrap().call(()).await.unwrap();
    }
    d.tick_now();
    assert_eq!(d.state("inventory").unwrap(), State::Closed);
    chaos
        .set(Target::dependency("db"), Fault::new().errors(0.8))
        .unwrap();
    let mut failed = 0;
    for _ in 0..40 {
        if svc.ready().await.unwrap().call(()).await.is_err() {
            failed += 1;
        }
    }
    d.tick_now();
    assert!(failed > 20, "{failed}");
    assert_eq!(d.state("inventory").unwrap(), State::Open);
    let window = *d.history("inventory").unwrap().latest().unwrap();
    assert_eq!(window.errors as usize, failed);
}

#[tokio::test(start_paused = true)]
async fn clearing_the_faults_ends_the_waits_they_started() {
    // A day's hang and a day's latency were cleared, and the calls already struck still
    // waited out their day.
    let d = shop();
    let chaos = Chaos::builder(&d).build();
    let day = Duration::from_secs(86_400);
    chaos
        .set(
            Target::class("browse_log"),
            Fault::new().hangs(1.0).hang_for(day),
        )
        .unwrap();
    chaos
        .set(Target::class("payment"), Fault::new().latency(day))
        .unwrap();
    let done = Arc::new(AtomicU64::new(0));
    let svc = app(&d, &chaos, done.clone());
    let call = |path: &'static str| {
        let mut svc = svc.clone();
        async move {
            let req = Request::post(path).body(Body::empty()).unwrap();
            svc.ready().await.unwrap().call(req).await.unwrap()
        }
    };
    let (hung, slow) = (call("/log"), call("/pay/1"));
    tokio::pin!(hung, slow);
    let waited = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(&mut hung, &mut slow)
    })
    .await;
    assert!(waited.is_err(), "both still wait after a minute");
    chaos.clear_all();
    let start = Instant::now();
    let (hung, slow) = tokio::join!(hung, slow);
    assert_eq!(start.elapsed(), Duration::ZERO, "at once");
    assert_eq!(
        fault_of(&hung),
        Some("hang"),
        "answered as its hang would have been"
    );
    assert_eq!(slow.status(), StatusCode::OK, "the delayed call goes on");
    assert_eq!(done.load(Ordering::Relaxed), 1);
}

#[tokio::test(start_paused = true)]
async fn replacing_a_hang_or_setting_it_to_nothing_ends_the_waits_too() {
    // Replaced (or "cleared" with an empty fault, which `GET /chaos` then showed as gone),
    // the hang held its calls for the rest of its `hang_for`.
    let d = shop();
    let chaos = Chaos::builder(&d).build();
    let svc = app(&d, &chaos, Arc::new(AtomicU64::new(0)));
    for replacement in [Fault::new().errors(0.1), Fault::new()] {
        chaos
            .set(
                Target::class("browse_log"),
                Fault::new().hangs(1.0).hang_for(Duration::from_secs(60)),
            )
            .unwrap();
        let mut svc = svc.clone();
        let hung = async move {
            let req = Request::post("/log").body(Body::empty()).unwrap();
            svc.ready().await.unwrap().call(req).await.unwrap()
        };
        tokio::pin!(hung);
        assert!(
            tokio::time::timeout(Duration::from_secs(1), &mut hung)
                .await
                .is_err()
        );
        chaos.set(Target::class("browse_log"), replacement).unwrap();
        let start = Instant::now();
        assert_eq!(fault_of(&hung.await), Some("hang"));
        assert_eq!(start.elapsed(), Duration::ZERO, "at once: {replacement:?}");
    }
    assert!(chaos.faults().is_empty(), "the empty fault cleared it");
}

#[tokio::test(start_paused = true)]
async fn a_clear_while_a_call_is_being_struck_ends_its_wait() {
    // A clear between the call reading the faults and its wait starting was missed: the call
    // hung for the whole `hang_for` after every fault was cleared. The classifier, which runs
    // in between, clears them here.
    let d = shop();
    let chaos = Chaos::builder(&d).build();
    chaos
        .set(
            Target::class("payment"),
            Fault::new().hangs(1.0).hang_for(Duration::from_secs(30)),
        )
        .unwrap();
    let pay = d.class_id("payment").unwrap();
    let clearing = chaos.clone();
    let classify = move |_: &u64| {
        clearing.clear_all();
        pay
    };
    let mut svc = chaos
        .layer(classify)
        .layer(service_fn(|x: u64| async move { Ok::<_, BoxError>(x) }));
    let start = Instant::now();
    let err = svc.ready().await.unwrap().call(1).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO, "at once, not after 30 s");
    let err = err.downcast::<ChaosError>().expect("a ChaosError");
    assert_eq!(
        err.fault(),
        FaultKind::Hang,
        "answered as its hang would have been"
    );
    assert!(chaos.faults().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_classifier_of_another_degrader_is_struck_as_the_default_class() {
    // Its class ids index the classes of the chaos handle's degrader: a class fault struck
    // whichever class had the index, and an id past them panicked naming the struck class.
    let d = shop();
    let bigger = support::named_degrader(
        "bigger",
        ["a", "b", "c", "d", "payment"].map(ClassConfig::gold),
    );
    let chaos = Chaos::builder(&d).build();
    chaos
        .set(Target::class("payment"), Fault::new().errors(1.0))
        .unwrap();
    chaos
        .set(Target::route("/x/{id}"), Fault::new().errors(1.0))
        .unwrap();
    let classify = |path| {
        bigger
            .http_classifier()
            .route(None, path, "a")
            .unwrap()
            .route(None, "/x/{id}", "payment")
            .unwrap()
            .build()
    };
    let ok =
        service_fn(|_: Request<Body>| async { Ok::<_, BoxError>(Response::new(Body::empty())) });
    // The error answer names the struck class.
    let svc = chaos.layer(classify("/pay/{id}")).layer(ok);
    let post = |path: &'static str| Request::post(path).body(Body::empty()).unwrap();
    // `a` has `payment`'s index in `shop`: not struck.
    assert!(svc.clone().oneshot(post("/pay/1")).await.is_ok());
    // `payment` of `bigger` has no class here: the route fault strikes it as `default`.
    let err = svc.oneshot(post("/x/1")).await.unwrap_err();
    let err = err.downcast::<ChaosError>().expect("a ChaosError");
    assert_eq!(err.fault(), FaultKind::Error);
    assert_eq!(err.class(), "default");
}
