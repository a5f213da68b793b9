//! Closed-path cost per call of tower-degrade against a bare service and peer middleware,
//! measured side by side in one run; two-thread contention on one class; the control tick.
//!
//! Run with `cargo bench -p tower-degrade-benches`.
//!
//! Every call is `poll_ready` + `call` + polling the response future to completion with a no-op
//! waker, inside an entered tokio runtime (tower's timeout needs its timer). The inner service
//! answers with a ready future, so what is measured is the middleware.

use std::convert::Infallible;
use std::future::{Future, Ready, ready};
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use http::{Method, Request, Response, Uri};
use http_body_util::{Empty, Full};
use tower::{Layer, Service, ServiceBuilder, service_fn};
use tower_degrade::admit::Admission;
use tower_degrade::fallback::{FallbackRouter, MemoryStore, Replayed, replay_fn};
use tower_degrade::{ClassConfig, Degrader};

/// Drive one call to completion.
#[inline]
fn call<S, Req>(svc: &mut S, req: Req) -> S::Response
where
    S: Service<Req>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    match svc.poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => {}
        other => panic!("not ready: {:?}", other.map(|r| r.err())),
    }
    let mut fut = pin!(svc.call(req));
    for _ in 0..4 {
        if let Poll::Ready(res) = fut.as_mut().poll(&mut cx) {
            return res.expect("closed path succeeds");
        }
    }
    panic!("the inner service is always ready");
}

type Bare = tower::util::ServiceFn<fn(u64) -> Ready<Result<u64, Infallible>>>;

fn bare() -> Bare {
    service_fn((|x: u64| ready(Ok(x.wrapping_add(1)))) as fn(u64) -> _)
}

/// A degrader whose control loop is not running: the closed path does not depend on it.
fn degrader(classes: usize) -> Degrader {
    let mut b = Degrader::builder("bench");
    for i in 0..classes {
        b = b.class(ClassConfig::silver(format!("class-{i}")));
    }
    b.build_with_worker().expect("valid").0
}

/// [`degrader`] with priority admission, its limit far above what one thread keeps in flight.
fn admission_degrader(classes: usize) -> Degrader {
    let mut b = Degrader::builder("bench").admission(Admission::adaptive().initial_limit(1000));
    for i in 0..classes {
        b = b.class(ClassConfig::silver(format!("class-{i}")));
    }
    b.build_with_worker().expect("valid").0
}

fn bench_closed_path(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut g = c.benchmark_group("closed_path");
    g.throughput(Throughput::Elements(1));

    let mut svc = bare();
    g.bench_function("bare service_fn", |b| {
        b.iter(|| call(&mut svc, black_box(1)))
    });

    let mut svc = ServiceBuilder::new()
        .load_shed()
        .concurrency_limit(1_000)
        .service(bare());
    g.bench_function("tower load_shed+concurrency_limit", |b| {
        b.iter(|| call(&mut svc, black_box(1)))
    });

    let mut svc = ServiceBuilder::new()
        .timeout(Duration::from_secs(1))
        .service(bare());
    g.bench_function("tower timeout", |b| b.iter(|| call(&mut svc, black_box(1))));

    let layer = tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
        .failure_rate_threshold(0.5)
        .sliding_window_size(100)
        .build()
        .unwrap();
    let mut svc = layer.layer(bare());
    g.bench_function("tower-resilience circuit breaker", |b| {
        b.iter(|| call(&mut svc, black_box(1)))
    });

    {
        use failsafe::futures::CircuitBreaker as _;
        let cb = failsafe::Config::new().build();
        let mut cx = Context::from_waker(Waker::noop());
        g.bench_function("failsafe circuit breaker", |b| {
            b.iter(|| {
                let fut = pin!(cb.call(ready(Ok::<u64, ()>(black_box(1)))));
                match fut.poll(&mut cx) {
                    Poll::Ready(Ok(v)) => v,
                    _ => panic!("closed path succeeds"),
                }
            })
        });
    }

    let d = degrader(3);
    let class = d.class_id("class-1").unwrap();
    let mut svc = d.layer(class).layer(bare());
    g.bench_function("tower-degrade (fixed class)", |b| {
        b.iter(|| call(&mut svc, black_box(1)))
    });

    // The same with priority admission on, not saturated: one load and one `fetch_add` to take
    // a permit, one `fetch_add` (the latency sample) and one `fetch_sub` to give it back.
    let da = admission_degrader(3);
    let mut svc = da.layer(da.class_id("class-1").unwrap()).layer(bare());
    g.bench_function("tower-degrade (fixed class, admission)", |b| {
        b.iter(|| call(&mut svc, black_box(1)))
    });

    // The same with a policy set in force: policies run on the tick, not per request.
    let dp = degrader(3);
    dp.load_policy_sources([("seed", SEED_POLICY)]).unwrap();
    dp.tick_now();
    let mut svc = dp.layer(dp.class_id("class-1").unwrap()).layer(bare());
    g.bench_function("tower-degrade (fixed class, policies loaded)", |b| {
        b.iter(|| call(&mut svc, black_box(1)))
    });

    let mut svc = d
        .layer(move |x: &u64| {
            if *x == u64::MAX {
                tower_degrade::ClassId::DEFAULT
            } else {
                class
            }
        })
        .layer(bare());
    g.bench_function("tower-degrade (closure classifier)", |b| {
        b.iter(|| call(&mut svc, black_box(1)))
    });

    // HTTP: a route classifier over 3 rules and the tower-http response classifier.
    let classify = d
        .http_classifier()
        .route(Some(Method::GET), "/products/{id}", "class-0")
        .unwrap()
        .route(Some(Method::POST), "/orders/{id}/pay", "class-1")
        .unwrap()
        .route(None, "/log", "class-2")
        .unwrap()
        .build();
    let http_inner =
        || service_fn(|_req: Request<()>| ready(Ok::<_, Infallible>(Response::new(()))));
    let request = || {
        let mut r = Request::new(());
        *r.method_mut() = Method::POST;
        *r.uri_mut() = Uri::from_static("/orders/42/pay");
        r
    };
    let mut svc = http_inner();
    g.bench_function("bare http service_fn", |b| {
        b.iter_batched(request, |r| call(&mut svc, r), BatchSize::SmallInput)
    });
    let mut svc = d.layer(class).http().layer(http_inner());
    g.bench_function("tower-degrade http (fixed class)", |b| {
        b.iter_batched(request, |r| call(&mut svc, r), BatchSize::SmallInput)
    });
    let mut svc = d.layer(classify.clone()).layer(http_inner());
    g.bench_function("tower-degrade generic (route classifier)", |b| {
        b.iter_batched(request, |r| call(&mut svc, r), BatchSize::SmallInput)
    });
    let mut svc = d.layer(classify).http().layer(http_inner());
    g.bench_function("tower-degrade http (route classifier)", |b| {
        b.iter_batched(request, |r| call(&mut svc, r), BatchSize::SmallInput)
    });

    // The fallback router attached to a class that is not diverted: the primary path must
    // cost what it costs without it (same request and response types on both rows).
    let empty_inner =
        || service_fn(|_req: Request<Empty<Bytes>>| ready(Ok::<_, Infallible>(Response::new(()))));
    let empty_request = || {
        Request::post("/orders/42/pay")
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    let mut svc = d.layer(class).http().layer(empty_inner());
    g.bench_function("tower-degrade http (fixed class, no fallback)", |b| {
        b.iter_batched(empty_request, |r| call(&mut svc, r), BatchSize::SmallInput)
    });
    let (router, _worker) = FallbackRouter::builder(&d)
        .store(MemoryStore::default())
        .replay(replay_fn(|_, _| async { Replayed::Done }))
        .build()
        .unwrap();
    let mut svc = d
        .layer(class)
        .http()
        .fallback_with(router)
        .layer(empty_inner());
    g.bench_function(
        "tower-degrade http (fixed class, fallback router, not diverted)",
        |b| b.iter_batched(empty_request, |r| call(&mut svc, r), BatchSize::SmallInput),
    );

    // A trivial `on_request` hook: the cost of a script call per request.
    let dh = degrader(3);
    dh.load_policy_sources([("hook", HOOK_POLICY)]).unwrap();
    dh.tick_now();
    let classify = dh
        .http_classifier()
        .route(Some(Method::POST), "/orders/{id}/pay", "class-1")
        .unwrap()
        .build();
    let mut svc = dh.layer(classify).http().layer(http_inner());
    g.bench_function(
        "tower-degrade http (route classifier, trivial on_request hook)",
        |b| b.iter_batched(request, |r| call(&mut svc, r), BatchSize::SmallInput),
    );

    // A class timeout adds tokio's timer, like tower's timeout.
    let dt = Degrader::builder("bench")
        .class(ClassConfig::silver("timed").timeout(Duration::from_secs(1)))
        .build_with_worker()
        .unwrap()
        .0;
    let mut svc = dt.layer(dt.class_id("timed").unwrap()).layer(bare());
    g.bench_function("tower-degrade (class timeout)", |b| {
        b.iter(|| call(&mut svc, black_box(1)))
    });
    g.finish();
}

/// `iters` calls split over `threads` threads hammering one class; wall time of the slowest.
fn hammer<F, S>(threads: usize, iters: u64, make: &F) -> Duration
where
    F: Fn() -> S + Sync,
    S: Service<u64, Response = u64> + Send,
    S::Error: std::fmt::Debug,
{
    let per = iters / threads as u64;
    let barrier = std::sync::Barrier::new(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let mut svc = make();
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    let start = Instant::now();
                    for i in 0..per {
                        black_box(call(&mut svc, black_box(i)));
                    }
                    start.elapsed()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .max()
            .unwrap()
    })
}

fn bench_contention(c: &mut Criterion) {
    let mut g = c.benchmark_group("contention_one_class");
    let d = degrader(3);
    let class = d.class_id("class-1").unwrap();
    for threads in [1usize, 2] {
        // Throughput in calls: criterion reports calls/s for each thread count.
        g.throughput(Throughput::Elements(1));
        g.bench_function(format!("tower-degrade {threads} thread(s)"), |b| {
            b.iter_custom(|iters| {
                let iters = iters.max(threads as u64);
                let make = || d.layer(class).layer(bare());
                // Report the time per call of the whole machine: total wall / calls.
                hammer(threads, iters, &make)
            })
        });
    }
    let da = admission_degrader(3);
    let class = da.class_id("class-1").unwrap();
    for threads in [1usize, 2] {
        g.bench_function(
            format!("tower-degrade admission {threads} thread(s)"),
            |b| {
                b.iter_custom(|iters| {
                    let iters = iters.max(threads as u64);
                    let make = || da.layer(class).layer(bare());
                    hammer(threads, iters, &make)
                })
            },
        );
    }
    // The peer with a shared limit: tower's semaphore, one per service and its clones.
    let limited = ServiceBuilder::new()
        .load_shed()
        .concurrency_limit(1_000)
        .service(bare());
    for threads in [1usize, 2] {
        g.bench_function(
            format!("tower load_shed+concurrency_limit {threads} thread(s)"),
            |b| {
                b.iter_custom(|iters| {
                    let make = || limited.clone();
                    hammer(threads, iters.max(threads as u64), &make)
                })
            },
        );
    }
    for threads in [1usize, 2] {
        g.bench_function(format!("bare service_fn {threads} thread(s)"), |b| {
            b.iter_custom(|iters| hammer(threads, iters.max(threads as u64), &bare))
        });
    }
    g.finish();
}

/// The seed's rule, over every class.
const SEED_POLICY: &str = r#"
fn policy() { #{ governs: ["*"] } }
fn on_tick(ctx) {
    if ctx.consecutive(3, |w| w.success_rate < 0.92 && w.p99_ms > 800.0) {
        return degrade(1.0).via("delayed_retry").alert("seed rule");
    }
}
"#;

/// A per-request hook that decides nothing.
const HOOK_POLICY: &str = r#"
fn policy() { #{ governs: ["class-1"] } }
fn on_tick(ctx) { }
fn on_request(ctx, req) { }
"#;

/// A policy that decides nothing.
const TRIVIAL_POLICY: &str = r#"
fn policy() { #{ governs: ["*"] } }
fn on_tick(ctx) { }
"#;

/// The worst policy of each kind, as `(name, source)`: each does its damage only on a window of
/// 7 calls, which validation never shows, so all load and all strike on the same tick.
fn hostile_policies() -> Vec<(String, String)> {
    let kinds = [
        ("spin", "loop { }"),
        ("copier", "let a = []; for i in 0..1020 { a = [a]; }"),
        (
            "printer",
            r#"let m = "x"; for i in 0..12 { m += m; } for i in 0..12000 { print(m); }"#,
        ),
        (
            "alerter",
            r#"let m = "x"; for i in 0..12 { m += m; } let d = admit(); for i in 0..4000 { d = d.alert(m); } return d;"#,
        ),
        ("strings", r#"let s = "x"; loop { s += s; }"#),
        ("recursion", "fn f(n) { f(n + 1) } f(0);"),
    ];
    kinds
        .iter()
        .enumerate()
        .map(|(i, (name, body))| {
            let (helpers, body) = match body.split_once(" } f(0);") {
                Some((f, _)) => (format!("{f} }}"), "f(0);"),
                None => (String::new(), *body),
            };
            let src = format!(
                "fn policy() {{ #{{ governs: [\"*\"], priority: {i} }} }}\n{helpers}\n\
                 fn on_tick(ctx) {{ if ctx.requests == 7 {{ {body} }} }}"
            );
            ((*name).to_owned(), src)
        })
        .collect()
}

fn bench_control_tick(c: &mut Criterion) {
    let mut g = c.benchmark_group("control_tick");
    let d = degrader(99); // + the default class = 100 classes
    let classes: Vec<_> = d.registry().iter().map(|(id, _)| id).collect();
    assert_eq!(classes.len(), 100);
    let mut services: Vec<_> = classes
        .iter()
        .map(|&id| d.layer(id).layer(bare()))
        .collect();
    g.bench_function("tick 100 classes (10 calls each per tick)", |b| {
        b.iter_batched(
            || {
                for svc in &mut services {
                    for i in 0..10 {
                        call(svc, i);
                    }
                }
            },
            |()| d.tick_now(),
            BatchSize::PerIteration,
        )
    });
    g.bench_function("tick 100 idle classes", |b| b.iter(|| d.tick_now()));
    for (name, src) in [("trivial", TRIVIAL_POLICY), ("seed rule", SEED_POLICY)] {
        let dp = degrader(99);
        dp.load_policy_sources([(name, src)]).unwrap();
        for _ in 0..64 {
            dp.tick_now(); // a full history, so `consecutive(3, ..)` reads 3 windows
        }
        g.bench_function(format!("tick 100 classes with a {name} policy each"), |b| {
            b.iter(|| dp.tick_now())
        });
    }
    // Containment on the real clock: every hostile policy strikes on every class on this tick
    // (reloaded before each, so none is quarantined yet); the tick stops them at its budget
    // (250 ms) and must stay well inside the 500 ms period.
    let dw = degrader(2); // + the default class = 3 classes
    let hostile = hostile_policies();
    let mut hs: Vec<_> = dw
        .registry()
        .iter()
        .map(|(id, _)| dw.layer(id).layer(bare()))
        .collect();
    g.sample_size(10);
    g.bench_function(
        "tick 3 classes with the worst policy of each kind striking",
        |b| {
            b.iter_batched(
                || {
                    dw.load_policy_sources(hostile.iter().map(|(n, s)| (n.as_str(), s.as_str())))
                        .unwrap();
                    dw.tick_now(); // a fresh window
                    for svc in &mut hs {
                        for i in 0..7 {
                            call(svc, i);
                        }
                    }
                },
                |()| dw.tick_now(),
                BatchSize::PerIteration,
            )
        },
    );
    g.finish();
}

/// A call its class does not serve (the breaker forced open), with a request body that is not
/// at its end (a POST's): answered 503 with the body dropped, or with `drain_rejected`: a body
/// whose message is there is read at once, a late one in a task on the runtime's one worker
/// thread (the cost measured is the caller's, the spawn; the reading runs on the worker).
fn bench_refused_path(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    let d = degrader(1);
    let class = d.class_id("class-0").unwrap();
    d.force_open("class-0").unwrap();
    let inner =
        || service_fn(|_req: Request<Full<Bytes>>| ready(Ok::<_, Infallible>(Response::new(()))));
    let request = || {
        Request::post("/orders/42/pay")
            .body(Full::new(Bytes::from_static(b"{\"amount_cents\":1999}")))
            .unwrap()
    };
    let mut g = c.benchmark_group("refused path");
    g.throughput(Throughput::Elements(1));
    let mut svc = d.layer(class).http().layer(inner());
    g.bench_function("tower-degrade http (refused, body dropped)", |b| {
        b.iter_batched(request, |r| call(&mut svc, r), BatchSize::SmallInput)
    });
    let layer = d.layer(class).http().drain_rejected();
    let mut svc = layer.layer(inner());
    g.bench_function(
        "tower-degrade http (refused, drain_rejected, body already there)",
        |b| b.iter_batched(request, |r| call(&mut svc, r), BatchSize::SmallInput),
    );
    let late_inner =
        || service_fn(|_req: Request<Late>| ready(Ok::<_, Infallible>(Response::new(()))));
    let late_request = || {
        Request::post("/orders/42/pay")
            .body(Late(
                Some(Bytes::from_static(b"{\"amount_cents\":1999}")),
                false,
            ))
            .unwrap()
    };
    let mut svc = d.layer(class).http().layer(late_inner());
    g.bench_function("tower-degrade http (refused, late body dropped)", |b| {
        b.iter_batched(late_request, |r| call(&mut svc, r), BatchSize::SmallInput)
    });
    let mut svc = layer.layer(late_inner());
    g.bench_function(
        "tower-degrade http (refused, drain_rejected, late body: a task)",
        |b| b.iter_batched(late_request, |r| call(&mut svc, r), BatchSize::SmallInput),
    );
    g.finish();
}

/// A request body whose message is not there at the first poll (it wakes its reader at
/// once), as an HTTP/2 message that arrives after its call's answer.
struct Late(Option<Bytes>, bool);

impl hyper::body::Body for Late {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        if !self.1 {
            self.1 = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(self.0.take().map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

criterion_group!(
    benches,
    bench_closed_path,
    bench_refused_path,
    bench_contention,
    bench_control_tick
);
criterion_main!(benches);
