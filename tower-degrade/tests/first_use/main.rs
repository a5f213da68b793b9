//! What a first user tripped on, each pinned by a test: spawning tasks, panics, header names,
//! meaningless configuration, scrapeable metrics, recognisable answers, readable errors,
//! unmatched axum routes, breaker settings.

use std::convert::Infallible;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use tower::{Layer, Service, ServiceBuilder, ServiceExt, service_fn};
use tower_degrade::breaker::{BreakerConfig, State};
use tower_degrade::error::{ConfigError, degraded};
use tower_degrade::gate::Reason;
use tower_degrade::protocol::{CLASS_HEADER, REASON_HEADER};
use tower_degrade::{BoxError, ClassConfig, Degrader, ServiceBuilderExt};

#[path = "../logs.rs"]
mod logs;
#[path = "../support.rs"]
mod support;

use support::{builder, degrader};

// ===== (a) the task API inside tokio::spawn =====

#[tokio::test(start_paused = true)]
async fn tasks_run_inside_tokio_spawn_with_the_crates_own_error_type() {
    let d = degrader([ClassConfig::gold("a")]);
    let t = d.tasks::<u64, String>().build();
    let job = tokio::spawn(async move {
        t.run("a", 1, |id| async move {
            Ok::<String, BoxError>(format!("{id}"))
        })
        .await
    });
    assert_eq!(job.await.unwrap().unwrap(), "1");
}

#[tokio::test(start_paused = true)]
async fn a_task_must_name_a_class_that_exists() {
    let d = degrader([ClassConfig::gold("payment")]);
    let tasks = d.tasks::<u64, u64>().build();
    let err = tasks
        .run("paymnet", 1, |n| async move { Ok::<_, BoxError>(n) })
        .await
        .unwrap_err();
    assert_eq!(
        err.downcast_ref::<ConfigError>(),
        Some(&ConfigError::UnknownClass("paymnet".into()))
    );
    // Or find out once, at start-up, and hold a handle that cannot be wrong.
    assert!(tasks.class("paymnet").is_err());
    let payment = tasks.class("payment").unwrap();
    let out = tokio::spawn(async move {
        payment
            .run(41, |n| async move { Ok::<_, BoxError>(n + 1) })
            .await
    });
    assert_eq!(out.await.unwrap().unwrap(), 42);
}

// ===== (b) panics are failures, whatever the stacking =====

fn panicking()
-> impl Service<Request<String>, Response = Response<String>, Error = Infallible, Future: Send>
+ Clone
+ Send {
    service_fn(|_req: Request<String>| async move {
        if true {
            panic!("handler bug");
        }
        Ok::<_, Infallible>(Response::new(String::new()))
    })
}

fn classify(d: &Degrader) -> tower_degrade::classify::HttpClassifier {
    d.http_classifier()
        .route(None, "/pay", "pay")
        .unwrap()
        .build()
}

fn pay() -> Request<String> {
    Request::post("/pay").body(String::new()).unwrap()
}

async fn thirty_panics_open_the_class<S, B>(d: &Degrader, svc: S)
where
    S: Service<Request<String>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug + Send,
    B: Send + 'static,
{
    for _ in 0..30 {
        // Spawned, as a server would: the runtime catches what nothing else does.
        let res = tokio::spawn(svc.clone().oneshot(pay())).await;
        if let Ok(Ok(res)) = res {
            assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
        }
    }
    d.tick_now();
    let w = *d.history("pay").unwrap().latest().unwrap();
    assert_eq!((w.errors, w.cancelled), (30, 0), "{w:?}");
    assert_eq!(d.state("pay").unwrap(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn a_panic_counts_as_a_failure_with_catch_panic_outside_the_layer() {
    use tower_http::catch_panic::CatchPanicLayer;
    let d = degrader([ClassConfig::gold("pay")]);
    let svc = ServiceBuilder::new()
        .layer(CatchPanicLayer::new())
        .degrade_http(&d, classify(&d))
        .service(panicking());
    thirty_panics_open_the_class(&d, svc).await;
}

#[tokio::test(start_paused = true)]
async fn a_panic_counts_as_a_failure_with_catch_panic_inside_the_layer() {
    use tower_http::catch_panic::CatchPanicLayer;
    let d = degrader([ClassConfig::gold("pay")]);
    let svc = ServiceBuilder::new()
        .degrade_http(&d, classify(&d))
        .layer(CatchPanicLayer::new())
        .service(panicking());
    thirty_panics_open_the_class(&d, svc).await;
}

#[tokio::test(start_paused = true)]
async fn a_panic_counts_as_a_failure_without_catch_panic() {
    let d = degrader([ClassConfig::gold("pay")]);
    let svc = ServiceBuilder::new()
        .degrade_http(&d, classify(&d))
        .service(panicking());
    thirty_panics_open_the_class(&d, svc).await;
}

/// A service whose `call` itself panics, before any future exists.
#[derive(Clone)]
struct PanicsInCall;

impl Service<Request<String>> for PanicsInCall {
    type Response = Response<String>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Response<String>, Infallible>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<String>) -> Self::Future {
        panic!("bug in call");
    }
}

#[tokio::test(start_paused = true)]
async fn a_panic_in_call_counts_as_a_failure() {
    use tower_http::catch_panic::CatchPanicLayer;
    let d = degrader([ClassConfig::gold("pay")]);
    let svc = ServiceBuilder::new()
        .layer(CatchPanicLayer::new())
        .degrade_http(&d, classify(&d))
        .service(PanicsInCall);
    thirty_panics_open_the_class(&d, svc).await;
}

// ===== (c) header names in any case =====

#[test]
fn header_names_are_accepted_in_any_case_or_rejected_with_the_field() {
    let (d, _w) = builder("t")
        .class(ClassConfig::gold("pay"))
        .build_with_worker()
        .unwrap();
    use tower_degrade::classify::ClassifyRequest;
    let classify = d
        .http_classifier()
        .override_header("X-Degrade-Class")
        .unwrap()
        .request_key("X-User-Id")
        .unwrap()
        .build();
    let req = Request::get("/")
        .header("x-degrade-class", "pay")
        .body(())
        .unwrap();
    assert_eq!(classify.classify(&req), d.class_id("pay").unwrap());
    let err = d
        .http_classifier()
        .override_header("bad header")
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid `http.override_header`: `bad header` is not a valid HTTP header name"
    );
    assert!(d.http_classifier().start_header("").is_err());
}

#[test]
fn a_route_an_earlier_one_hides_is_rejected_naming_both() {
    let (d, _w) = builder("t")
        .class(ClassConfig::gold("pay"))
        .class(ClassConfig::bronze("browse"))
        .build_with_worker()
        .unwrap();
    let err = d
        .http_classifier()
        .route(None, "/orders/{id}", "pay")
        .unwrap()
        .route(Some(Method::GET), "/orders/:order", "browse")
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid `http.route`: `GET /orders/:order` can never match: \
         `any method /orders/{id}` (class `pay`) is tried first"
    );
    // A GET rule takes HEAD too (axum answers HEAD with the GET handler); not POST.
    use tower_degrade::classify::ClassifyRequest;
    let classify = d
        .http_classifier()
        .route(Some(Method::GET), "/orders/{id}", "browse")
        .unwrap()
        .build();
    let req = |m: Method| {
        Request::builder()
            .method(m)
            .uri("/orders/7")
            .body(())
            .unwrap()
    };
    assert_eq!(
        classify.classify(&req(Method::HEAD)),
        d.class_id("browse").unwrap()
    );
    assert_eq!(
        classify.classify(&req(Method::POST)),
        tower_degrade::ClassId::DEFAULT
    );
    // Another method, or any method after a specific one, still matches something.
    assert!(
        d.http_classifier()
            .route(Some(Method::POST), "/orders/{id}", "pay")
            .and_then(|b| b.route(Some(Method::GET), "/orders/{id}", "browse"))
            .and_then(|b| b.route(None, "/orders/{id}", "browse"))
            .is_ok()
    );
    let err = d
        .http_classifier()
        .grpc("/shop.Pay/Charge", "pay")
        .unwrap()
        .grpc("/shop.Pay/Charge", "browse")
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid `grpc.path`: `/shop.Pay/Charge` is already mapped to class `pay`"
    );
}

// ===== (d) configuration that builds but means nothing =====

fn build_err(b: tower_degrade::DegraderBuilder) -> String {
    b.build_with_worker().map(|_| ()).unwrap_err().to_string()
}

#[test]
fn meaningless_configuration_is_rejected_naming_the_field() {
    let class = |c: ClassConfig| build_err(Degrader::builder("shop").class(c));
    assert_eq!(
        class(ClassConfig::gold("pay").sla(Duration::ZERO)),
        "class `pay`: invalid `sla`: must be greater than zero: every call would be slow"
    );
    assert_eq!(
        class(ClassConfig::gold("pay").timeout(Duration::ZERO)),
        "class `pay`: invalid `timeout`: must be greater than zero: every call would time out"
    );
    assert!(class(ClassConfig::bronze("default")).contains("`default` is reserved"));
    // A policy's `governs: ["gold"]` is the tier: a bronze class named `gold` would have a
    // policy written for it shed the gold tier (found by a hostile-input trial).
    assert_eq!(
        class(ClassConfig::bronze("gold")),
        "class `gold`: invalid `name`: `gold` is a tier's name, which a policy's `governs` reads \
         as every class of that tier: a class so named must be of it (this one is bronze); \
         rename it"
    );
    assert!(
        Degrader::builder("shop")
            .class(ClassConfig::silver("silver"))
            .build_with_worker()
            .is_ok()
    );
    assert_eq!(
        build_err(Degrader::builder(" ")),
        "invalid `service`: must not be empty: it labels every metric"
    );
    assert!(
        build_err(Degrader::builder("shop\nlevel=ERROR"))
            .starts_with("invalid `service`: \"shop\\nlevel=ERROR\" holds a control character")
    );
    let breaker = |c: BreakerConfig| build_err(Degrader::builder("shop").breaker(c));
    assert!(
        breaker(BreakerConfig::default().min_requests(0))
            .starts_with("invalid `breaker.min_requests`")
    );
    assert!(
        breaker(BreakerConfig::default().recovery_ticks(0))
            .starts_with("invalid `breaker.recovery_ticks`")
    );
    assert!(
        build_err(
            Degrader::builder("shop")
                .class(ClassConfig::gold("pay"))
                .class_breaker("pay", BreakerConfig::default().degraded_recovery_ticks(0))
        )
        .starts_with("class `pay`: invalid `breaker.degraded_recovery_ticks`"),
        "a class's own breaker names the class"
    );
    let twice = build_err(
        Degrader::builder("shop")
            .class(ClassConfig::gold("pay"))
            .class_breaker("pay", BreakerConfig::default().min_requests(5))
            .class_breaker("pay", BreakerConfig::default().min_requests(50)),
    );
    assert!(
        twice.starts_with("class `pay`: invalid `class_breaker`"),
        "the second replaced the first without a word: {twice}"
    );
    // The default class is configured on purpose, through its own setter.
    let (d, _w) = Degrader::builder("shop")
        .default_class(ClassConfig::silver("unclassified"))
        .build_with_worker()
        .unwrap();
    let default = d.registry().class(tower_degrade::ClassId::DEFAULT);
    assert_eq!(
        (default.name(), default.tier()),
        ("default", tower_degrade::Tier::Silver)
    );
}

#[test]
fn absurd_values_are_rejected_naming_the_field_not_panicking_later() {
    // Each of these was accepted, then panicked on a tick, on a call or on a load
    // (`Duration::MAX` added to a clock), or turned a limit off (a 0).
    let class = |c: ClassConfig| build_err(Degrader::builder("shop").class(c));
    for (c, field) in [
        (ClassConfig::gold("pay").timeout(Duration::MAX), "`timeout`"),
        (
            ClassConfig::gold("pay").sla(Duration::from_secs(1 << 45)),
            "`sla`",
        ),
        (
            ClassConfig::gold("pay").max_queue_delay(Duration::MAX),
            "`max_queue_delay`",
        ),
    ] {
        let e = class(c);
        assert!(e.starts_with("class `pay`") && e.contains(field), "{e}");
    }
    let b = || Degrader::builder("shop").class(ClassConfig::gold("pay"));
    let cases: Vec<(tower_degrade::DegraderBuilder, &str)> = vec![
        (b().tick(Duration::MAX), "`tick`"),
        (
            b().breaker(
                BreakerConfig::default()
                    .open_duration(Duration::MAX)
                    .max_open_duration(Duration::MAX),
            ),
            "`breaker.max_open_duration`",
        ),
        (
            b().breaker(BreakerConfig::default().half_open_probes(u32::MAX)),
            "`breaker.half_open_probes`",
        ),
        (
            b().admission(tower_degrade::admit::Admission::adaptive().max_limit(0)),
            "`admission.max_limit`",
        ),
    ];
    for (builder, field) in cases {
        let e = build_err(builder);
        assert!(e.contains(field), "{field}: {e}");
    }
    #[cfg(feature = "rhai")]
    policy_limits_are_bounds(b);
    let mut predictor = tower_degrade::predict::PredictorConfig::default();
    for (budget, ok) in [
        (Duration::MAX, false),
        (Duration::from_nanos(999), false),
        (Duration::from_micros(1), true),
        (Duration::from_secs(10), true),
    ] {
        predictor.budget = budget;
        match predictor.validate() {
            Ok(()) => assert!(ok, "{budget:?}"),
            Err(e) => assert!(!ok && e.to_string().contains("predictor.budget"), "{e}"),
        }
    }
    // Errors quote what they were given escaped and cut: a name with a newline cannot forge a
    // log line, nor a megabyte-long one fill it.
    let e = class(ClassConfig::gold("pay\nFAKE LINE"));
    assert!(!e.contains('\n') && e.contains("\\u{a}"), "{e}");
    let e = class(ClassConfig::gold("x".repeat(1 << 20)));
    assert!(
        e.len() < 300 && e.contains("1048576 bytes"),
        "{} bytes",
        e.len()
    );
}

/// Every policy limit is a bound: a 0 turned it off, `Duration::MAX` panicked the tick.
#[cfg(feature = "rhai")]
fn policy_limits_are_bounds(b: impl Fn() -> tower_degrade::DegraderBuilder) {
    let limits = |f: fn(&mut tower_degrade::policy::Limits)| {
        let mut l = tower_degrade::policy::Limits::default();
        f(&mut l);
        build_err(b().policy_limits(l))
    };
    for (e, field) in [
        (limits(|l| l.max_operations = 0), "policy.max_operations"),
        (limits(|l| l.max_string_size = 0), "policy.max_string_size"),
        (
            limits(|l| l.max_tick_time = Duration::MAX),
            "policy.max_tick_time",
        ),
        (
            limits(|l| l.max_call_time = Duration::MAX),
            "policy.max_call_time",
        ),
        (
            limits(|l| l.max_request_time = Duration::ZERO),
            "policy.max_request_time",
        ),
        (
            limits(|l| l.max_expr_depth = usize::MAX),
            "policy.max_expr_depth",
        ),
    ] {
        assert!(e.contains(field), "{field}: {e}");
    }
}

// ===== (i) breaker settings without struct literals =====

#[test]
fn breaker_config_has_setters() {
    let cfg = BreakerConfig::default()
        .min_requests(5)
        .failure_rate(0.25)
        .slow_call_rate(Some(0.5))
        .open_duration(Duration::from_secs(1));
    assert_eq!(
        (
            cfg.min_requests,
            cfg.failure_rate,
            cfg.slow_call_rate,
            cfg.open_duration
        ),
        (5, 0.25, Some(0.5), Duration::from_secs(1))
    );
}

// ===== (h) unmatched axum requests =====

#[tokio::test(start_paused = true)]
async fn axum_unmatched_requests_reach_the_default_class_through_router_layer() {
    use axum::Router;
    use axum::routing::get;

    let d = degrader([ClassConfig::gold("orders")]);
    let classify = d
        .http_classifier()
        .route(None, "/orders", "orders")
        .unwrap()
        .build();
    let get_ = |uri: &str| Request::get(uri).body(axum::body::Body::empty()).unwrap();
    // `Router::layer` wraps the routes and the fallback: a 404 is counted in `default`.
    let app = Router::new()
        .route("/orders", get(|| async { "ok" }))
        .layer(d.layer(classify.clone()).http());
    assert_eq!(
        app.clone().oneshot(get_("/orders")).await.unwrap().status(),
        200
    );
    assert_eq!(app.oneshot(get_("/nope")).await.unwrap().status(), 404);
    d.tick_now();
    let default = *d.history("default").unwrap().latest().unwrap();
    let orders = *d.history("orders").unwrap().latest().unwrap();
    assert_eq!((orders.successes, default.successes), (1, 1));
    // `Router::route_layer` wraps matched routes only: the 404 never reaches the layer.
    let app = Router::new()
        .route("/orders", get(|| async { "ok" }))
        .route_layer(d.layer(classify).http());
    assert_eq!(app.oneshot(get_("/nope")).await.unwrap().status(), 404);
    d.tick_now();
    assert_eq!(
        d.history("default").unwrap().latest().unwrap().requests(),
        0
    );
}

// axum's `MatchedPath` and `OriginalUri` are read with the `axum` feature only.
#[cfg(feature = "axum")]
#[tokio::test(start_paused = true)]
async fn axum_routes_are_classified_whatever_their_parameters_are_called_and_when_nested() {
    use axum::Router;
    use axum::routing::{get, post};

    let d = degrader([ClassConfig::gold("payment"), ClassConfig::silver("product")]);
    // `:id` where the route says `{id}`, `{product_id}` where it says `{id}`: the same routes.
    // Under `nest`, rules name the full path, for matched routes and for a 404 alike.
    let classify = d
        .http_classifier()
        .route(Some(http::Method::POST), "/pay/:id", "payment")
        .unwrap()
        .route(
            Some(http::Method::GET),
            "/api/products/{product_id}",
            "product",
        )
        .unwrap()
        .route(None, "/api/products/{product_id}/{*rest}", "product")
        .unwrap()
        .build();
    let layer = d.layer(classify).http();
    let shop = Router::new()
        .route("/products/{id}", get(|| async { "product" }))
        .layer(layer.clone());
    let app = Router::new()
        .route("/pay/{id}", post(|| async { "paid" }))
        .layer(layer)
        .nest("/api", shop);
    let call = |method: http::Method, uri: &str| {
        Request::builder()
            .method(method)
            .uri(uri)
            .body(axum::body::Body::empty())
            .unwrap()
    };
    for (method, uri, status) in [
        (http::Method::POST, "/pay/1", 200),
        (http::Method::GET, "/api/products/1", 200),
        (http::Method::GET, "/api/products/1/reviews", 404),
    ] {
        let res = app.clone().oneshot(call(method, uri)).await.unwrap();
        assert_eq!(res.status().as_u16(), status, "{uri}");
    }
    d.tick_now();
    let served = |class: &str| {
        let w = d.history(class).unwrap().latest().copied().unwrap();
        w.successes
    };
    assert_eq!(
        (served("payment"), served("product"), served("default")),
        (1, 2, 0),
        "nothing in default"
    );
}

// ===== (e) metrics a Prometheus scrape accepts =====

/// Every family in `text` with its `# TYPE`, checking each has `# HELP` text.
fn families(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(
                text.lines()
                    .any(|l| l.starts_with(&format!("# HELP {name} ")) && l.len() > name.len() + 8),
                "{name} has no HELP text"
            );
            out.push((name.to_owned(), kind.to_owned()));
        }
    }
    out
}

#[tokio::test(start_paused = true)]
async fn every_family_has_help_latency_is_a_histogram_and_prediction_needs_a_predictor() {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    use tower_degrade::metrics;

    let d = degrader([ClassConfig::gold("pay"), ClassConfig::bronze("log")]);
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(metrics::LATENCY.into()),
            &metrics::latency_buckets(d.registry()),
        )
        .unwrap()
        .build_recorder();
    let handle = recorder.handle();
    let svc = d
        .layer(d.class_id("pay").unwrap())
        .layer(support::failing_after(30));
    ::metrics::with_local_recorder(&recorder, || {
        d.force_open("log").unwrap();
    });
    svc.clone().oneshot(false).await.unwrap();
    svc.oneshot(true).await.unwrap_err();
    ::metrics::with_local_recorder(&recorder, || d.tick_now());
    let text = handle.render();
    let families = families(&text);
    let kind = |name: &str| {
        families
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, k)| k.as_str())
    };
    assert_eq!(kind(metrics::LATENCY), Some("histogram"), "{text}");
    assert_eq!(kind(metrics::REQUESTS), Some("counter"));
    assert_eq!(kind(metrics::HEALTH_SCORE), Some("gauge"));
    assert_eq!(kind(metrics::TRANSITIONS), Some("counter"));
    assert_eq!(
        kind(metrics::PREDICTION),
        None,
        "no predictor, no prediction gauge"
    );
    // SLA-derived buckets: gold's 50 ms SLA is a bucket bound.
    assert!(
        text.contains(
            r#"degrade_latency_seconds_bucket{service="test",class="pay",tier="gold",le="0.05"}"#
        ),
        "{text}"
    );
}

#[test]
fn latency_buckets_come_from_the_slas() {
    let (d, _w) = builder("t")
        .class(ClassConfig::gold("pay"))
        .build_with_worker()
        .unwrap();
    // default (bronze, 1 s) and pay (gold, 50 ms): 1/16, 1/8, 1/4, 1/2, 1, 1.25, 1.5, 2, 4 x
    // SLA, 0.8 s, and of the ladder from 1 ms to 10 s the steps no bucket is within a quarter
    // of (1 ms and 10 s: 2.5 ms is within a quarter of 3.125 ms, 5 s of 4 s...).
    assert_eq!(
        tower_degrade::metrics::latency_buckets(d.registry()),
        [
            0.001, 0.003125, 0.00625, 0.0125, 0.025, 0.05, 0.0625, 0.075, 0.1, 0.125, 0.2, 0.25,
            0.5, 0.8, 1.0, 1.25, 1.5, 2.0, 4.0, 10.0
        ]
    );
}

// ===== (f) answers a client can recognise, with when to come back =====

/// Answers 500 for `/fail`, hangs for `/hang`, else 200.
fn app()
-> impl Service<Request<String>, Response = Response<String>, Error = Infallible, Future: Send>
+ Clone
+ Send {
    service_fn(|req: Request<String>| async move {
        let mut res = Response::new(String::new());
        match req.uri().path() {
            "/fail" => *res.status_mut() = StatusCode::INTERNAL_SERVER_ERROR,
            "/hang" => std::future::pending::<()>().await,
            _ => {}
        }
        Ok::<_, Infallible>(res)
    })
}

fn post(path: &str) -> Request<String> {
    Request::post(path).body(String::new()).unwrap()
}

/// The layer's own answer: 503, `Retry-After` in seconds, and the reason header.
fn assert_answer(res: &Response<String>, reason: Reason, retry_after: &str) {
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()[REASON_HEADER], reason.as_str());
    assert_eq!(res.headers()["retry-after"], retry_after, "{reason}");
    assert!(
        res.headers().get(CLASS_HEADER).is_none(),
        "class names stay internal"
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_route_the_layer_cannot_serve_is_rejected_and_logged_once() {
    let (logs, _guard) = logs::Logs::capture();
    let d =
        degrader([ClassConfig::silver("inventory").fallback_route(tower_degrade::Route::Service)]);
    let classify = d
        .http_classifier()
        .route(None, "/{*any}", "inventory")
        .unwrap()
        .build();
    // A class routed to `Service`, on a layer given no fallback service.
    let svc = ServiceBuilder::new()
        .degrade_http(&d, classify)
        .service(app());
    d.force_open("inventory").unwrap();
    for _ in 0..3 {
        let res = svc.clone().oneshot(post("/sku/1")).await.unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    let log = logs.text();
    assert_eq!(
        log.matches("nothing behind this layer serves").count(),
        1,
        "warned once for the class: {log}"
    );
    assert!(
        log.contains("fallback_service") && log.contains("inventory"),
        "{log}"
    );
}

#[tokio::test(start_paused = true)]
async fn every_http_answer_carries_retry_after_and_the_reason() {
    let d = degrader([ClassConfig::gold("pay")]);
    let classify = d
        .http_classifier()
        .route(None, "/{*any}", "pay")
        .unwrap()
        .build();
    let svc = ServiceBuilder::new()
        .degrade_http(&d, classify)
        .service(app());
    let call = |path: &'static str| svc.clone().oneshot(post(path));
    for _ in 0..30 {
        call("/fail").await.unwrap();
    }
    d.tick_now();
    // Open: the open time left.
    assert_answer(&call("/pay").await.unwrap(), Reason::BreakerOpen, "5");
    tokio::time::advance(Duration::from_millis(2_500)).await;
    d.tick_now();
    assert_answer(&call("/pay").await.unwrap(), Reason::BreakerOpen, "3");
    tokio::time::advance(Duration::from_millis(2_500)).await;
    d.tick_now();
    assert_eq!(d.state("pay").unwrap(), State::HalfOpen);
    // Half-open, every probe taken: the next tick.
    let hung: Vec<_> = (0..5).map(|_| tokio::spawn(call("/hang"))).collect();
    tokio::task::yield_now().await;
    assert_answer(&call("/pay").await.unwrap(), Reason::ProbesExhausted, "1");
    hung.into_iter().for_each(|h| h.abort());
    tokio::task::yield_now().await;
    for _ in 0..5 {
        assert_eq!(call("/pay").await.unwrap().status(), 200);
    }
    d.tick_now();
    assert_eq!(d.state("pay").unwrap(), State::Recovering);
    // Recovering, a fraction admitted: the next tick.
    let mut answers = Vec::new();
    for _ in 0..8 {
        answers.push(call("/pay").await.unwrap());
    }
    let turned_away: Vec<_> = answers.iter().filter(|r| r.status() == 503).collect();
    assert!(
        (5..=7).contains(&turned_away.len()),
        "about a quarter admitted"
    );
    for res in turned_away {
        assert_answer(res, Reason::Recovering, "1");
    }
    // Degraded by hand: the next tick.
    d.degrade("pay").unwrap();
    let res = loop {
        let res = call("/pay").await.unwrap();
        if res.status() != 200 {
            break res;
        }
    };
    assert_answer(&res, Reason::Degraded, "1");
    // An application's own 503 is not marked.
    d.reset("pay").unwrap();
    let own = service_fn(|_req: Request<String>| async {
        let mut res = Response::new(String::new());
        *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        Ok::<_, Infallible>(res)
    });
    let res = d
        .layer(d.class_id("pay").unwrap())
        .http()
        .layer(own)
        .oneshot(post("/pay"))
        .await
        .unwrap();
    assert!(res.headers().get(REASON_HEADER).is_none());
}

#[cfg(feature = "rhai")]
#[tokio::test(start_paused = true)]
async fn a_policy_shed_carries_the_next_tick_or_the_policys_retry_after() {
    let d = degrader([ClassConfig::bronze("log"), ClassConfig::silver("stock")]);
    let policy = |governs: &str, decision: &str| {
        format!(
            "fn policy() {{ #{{ governs: [\"{governs}\"] }} }}\nfn on_tick(ctx) {{ {decision} }}"
        )
    };
    d.load_policy_sources([
        ("a", policy("log", "shed()").as_str()),
        ("b", policy("stock", "shed().retry_after(30000)").as_str()),
    ])
    .unwrap();
    d.tick_now();
    let answer = |class: &str| {
        d.layer(d.class_id(class).unwrap())
            .http()
            .layer(app())
            .oneshot(post("/"))
    };
    assert_answer(&answer("log").await.unwrap(), Reason::Shed, "1");
    assert_answer(&answer("stock").await.unwrap(), Reason::Shed, "30");
}

#[tokio::test(start_paused = true)]
async fn grpc_answers_carry_pushback_and_a_readable_message() {
    use tower_degrade::protocol::Grpc;
    let d = degrader([ClassConfig::gold("pay")]);
    d.force_open("pay").unwrap();
    let grpc = |expose: bool| {
        d.layer(d.class_id("pay").unwrap())
            .protocol(Grpc::new().expose_class(expose))
            .layer(app())
            .oneshot(post("/pkg.Pay/Charge"))
    };
    let res = grpc(false).await.unwrap();
    let h = res.headers();
    assert_eq!(h["grpc-status"], "14");
    assert_eq!(h["grpc-retry-pushback-ms"], "500");
    assert_eq!(h[REASON_HEADER], "forced_open");
    assert_eq!(
        h["grpc-message"],
        "not served: circuit breaker forced open by an operator; retry after 0.5 s"
    );
    assert!(h.get(CLASS_HEADER).is_none());
    let res = grpc(true).await.unwrap();
    assert_eq!(res.headers()[CLASS_HEADER], "pay");
    assert!(
        res.headers()["grpc-message"]
            .to_str()
            .unwrap()
            .starts_with("class `pay`: ")
    );
}

// ===== (g) error texts a person can read =====

#[tokio::test(start_paused = true)]
async fn error_texts_read_as_sentences() {
    let d = degrader([ClassConfig::bronze("log")]);
    d.degrade("log").unwrap();
    let svc = d
        .layer(d.class_id("log").unwrap())
        .layer(support::failing_after(0));
    let err = loop {
        if let Err(e) = svc.clone().oneshot(false).await {
            break e;
        }
    };
    assert_eq!(degraded(&*err).unwrap().reason(), Reason::Degraded);
    assert_eq!(
        err.to_string(),
        "class `log`: not served: degraded, only part of the traffic is admitted; \
         retry after 0.5 s"
    );
}

#[tokio::test(start_paused = true)]
async fn two_live_degraders_of_one_service_name_are_warned_of() {
    // Their metrics carry the same labels: one's forced-open class read 5, 0, 5, 0 as each
    // ticked in turn, and the health score was the last one's.
    let (logs, _guard) = logs::Logs::capture();
    let said = || {
        logs.text()
            .matches("another degrader in this process")
            .count()
    };
    let http = Degrader::builder("dup-svc").build().unwrap();
    assert_eq!(said(), 0);
    let grpc = Degrader::builder("dup-svc").build().unwrap();
    assert_eq!(said(), 1, "{}", logs.text());
    let other = Degrader::builder("dup-svc-grpc").build().unwrap();
    drop((http, grpc, other));
    tokio::task::yield_now().await;
    // Both gone: the name is free again.
    let again = Degrader::builder("dup-svc").build().unwrap();
    assert_eq!(said(), 1, "{}", logs.text());
    drop(again);
}

#[tokio::test(start_paused = true)]
async fn a_classifier_built_on_another_degraders_classes_counts_in_default_and_is_warned_of() {
    // Another degrader's class ids were counted in whichever class had the same index: `pay`
    // of one degrader counted as the gold `zeta` of the other, silently.
    let (logs, _guard) = logs::Logs::capture();
    let shop = degrader([ClassConfig::gold("pay")]);
    let other = support::named_degrader(
        "other",
        [ClassConfig::gold("zeta"), ClassConfig::bronze("pay")],
    );
    let ok = service_fn(|_req: Request<String>| async {
        Ok::<_, Infallible>(Response::new(String::new()))
    });
    let wired_wrong = other.layer(classify(&shop)).http().layer(ok);
    for _ in 0..3 {
        let res = wired_wrong.clone().oneshot(pay()).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    other.tick_now();
    let requests = |d: &Degrader, class| d.history(class).unwrap().latest().unwrap().requests();
    assert_eq!(
        (
            requests(&other, "zeta"),
            requests(&other, "pay"),
            requests(&other, "default")
        ),
        (0, 0, 3)
    );
    let said = || logs.text().matches("did not hand out").count();
    assert_eq!(said(), 1, "said once: {}", logs.text());
    // Said once per degrader, not once per process.
    let third = support::named_degrader("third", [ClassConfig::bronze("log")]);
    let wired_wrong = third.layer(classify(&shop)).http().layer(ok);
    wired_wrong.oneshot(pay()).await.unwrap();
    assert_eq!(said(), 2, "{}", logs.text());

    // A degrader with the same classes in the same order, or more after them, hands out the
    // same ids for the classes both have: classifiers are shared (an HTTP and a gRPC
    // degrader configured alike).
    let twin = degrader([ClassConfig::gold("pay")]);
    let shared = twin.layer(classify(&shop)).http().layer(ok);
    shared.oneshot(pay()).await.unwrap();
    twin.tick_now();
    assert_eq!(requests(&twin, "pay"), 1);
    let more = support::named_degrader(
        "more",
        [ClassConfig::gold("pay"), ClassConfig::bronze("log")],
    );
    let shared = more.layer(classify(&shop)).http().layer(ok);
    shared.oneshot(pay()).await.unwrap();
    more.tick_now();
    assert_eq!(requests(&more, "pay"), 1);
    assert_eq!(said(), 2, "{}", logs.text());
}

#[test]
fn settings_that_are_valid_but_seldom_meant_are_warned_of_at_build() {
    // Both were accepted without a word in an adopter's trial: a gold `default` gives every
    // unclassified call (404 scans included) gold's priority, and a timeout under the SLA
    // cuts every call before its latency can breach.
    let (logs, _guard) = logs::Logs::capture();
    let said = |what: &str| logs.text().matches(what).count();
    let _fine = Degrader::builder("fine")
        .default_class(ClassConfig::bronze("x"))
        .class(ClassConfig::gold("pay").timeout(Duration::from_millis(50)))
        .build_with_worker()
        .unwrap();
    assert_eq!(said("the `default` class is gold"), 0, "{}", logs.text());
    assert_eq!(said("shorter than its SLA"), 0, "{}", logs.text());
    let _doubtful = Degrader::builder("doubtful")
        .default_class(ClassConfig::gold("x"))
        .class(
            ClassConfig::silver("stock")
                .sla(Duration::from_millis(200))
                .timeout(Duration::from_millis(100)),
        )
        .build_with_worker()
        .unwrap();
    assert_eq!(said("the `default` class is gold"), 1, "{}", logs.text());
    let log = logs.text();
    let line = log
        .lines()
        .find(|l| l.contains("shorter than its SLA"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        line.contains("class=stock")
            && line.contains("timeout_ms=100")
            && line.contains("sla_ms=200"),
        "{line}"
    );
}
