//! The closed path (admitted, recorded) allocates nothing per call.

use std::convert::Infallible;
use std::future::{Future, Ready, ready};
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use http::{Method, Request, Response, Uri};
use tower::{Layer, Service, service_fn};
use tower_degrade::{ClassConfig, Degrader};

fn call_once<S, Req>(svc: &mut S, req: Req)
where
    S: Service<Req>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    assert!(svc.poll_ready(&mut cx).is_ready());
    let fut = pin!(svc.call(req));
    match fut.poll(&mut cx) {
        Poll::Ready(res) => drop(res.expect("admitted")),
        Poll::Pending => panic!("the inner service is always ready"),
    }
}

type Bare = tower::util::ServiceFn<fn(u64) -> Ready<Result<u64, Infallible>>>;

/// A degrader with the generic layer over a ready service, its first call already made (the
/// first use assigns this thread's shard).
fn fixed_class() -> (
    Degrader,
    tower_degrade::Degrade<Bare, tower_degrade::ClassId>,
) {
    let d = degrader();
    let pay = d.class_id("pay").unwrap();
    let inner: Bare = service_fn((|x: u64| ready(Ok(x + 1))) as fn(u64) -> _);
    let mut svc = d.layer(pay).layer(inner);
    call_once(&mut svc, 0);
    (d, svc)
}

fn degrader() -> Degrader {
    Degrader::builder("alloc")
        .class(ClassConfig::gold("pay"))
        .class(ClassConfig::bronze("log"))
        .build_with_worker()
        .unwrap()
        .0
}

#[test]
fn generic_closed_path_allocates_nothing() {
    let (d, mut svc) = fixed_class();
    assert_allocates_nothing(&d, || {
        for i in 0..10_000 {
            call_once(&mut svc, i);
        }
    });
}

/// `calls` (10,000 calls of `pay`, after one warm-up call) allocate nothing, and all were served.
fn assert_allocates_nothing(d: &Degrader, calls: impl FnOnce()) {
    let info = allocation_counter::measure(calls);
    assert_eq!(info.count_total, 0, "{info:?}");
    d.tick_now();
    let served = d.history("pay").unwrap().latest().unwrap().successes;
    assert_eq!(served, 10_001);
}

#[test]
fn http_closed_path_with_route_classifier_allocates_nothing() {
    let d = degrader();
    let classify = d
        .http_classifier()
        .route(Some(Method::POST), "/pay/{id}", "pay")
        .unwrap()
        .route(None, "/log", "log")
        .unwrap()
        .override_header("x-degrade-class")
        .unwrap()
        .build();
    let inner = service_fn(
        |_req: Request<()>| -> Ready<Result<Response<()>, Infallible>> {
            ready(Ok(Response::new(())))
        },
    );
    let mut svc = d.layer(classify).http().layer(inner);
    let request = || {
        let mut req = Request::new(());
        *req.method_mut() = Method::POST;
        *req.uri_mut() = Uri::from_static("/pay/42");
        req
    };
    call_once(&mut svc, request());
    let requests: Vec<_> = (0..10_000).map(|_| request()).collect();
    // The Vec's buffer is freed inside: frees are not allocations.
    assert_allocates_nothing(&d, || {
        for req in requests {
            call_once(&mut svc, req);
        }
    });
}

#[test]
fn the_counter_sees_the_rejection_path_allocate() {
    let (d, mut svc) = fixed_class();
    d.force_open("pay").unwrap();
    let mut cx = Context::from_waker(Waker::noop());
    let info = allocation_counter::measure(|| {
        let fut = pin!(svc.call(1));
        assert!(matches!(fut.poll(&mut cx), Poll::Ready(Err(_))));
    });
    assert!(
        info.count_total >= 1,
        "the degraded error is boxed: {info:?}"
    );
}

/// A chaos layer with nothing in force, or with faults on other classes only, adds no
/// allocation to a call.
#[cfg(feature = "chaos")]
#[test]
fn a_chaos_layer_that_strikes_nothing_allocates_nothing() {
    use tower_degrade::BoxError;
    use tower_degrade::chaos::{Chaos, Fault, Target};
    type Fallible = tower::util::ServiceFn<fn(u64) -> Ready<Result<u64, BoxError>>>;
    let d = degrader();
    let pay = d.class_id("pay").unwrap();
    let chaos = Chaos::builder(&d).seed(1).build();
    let inner: Fallible = service_fn((|x: u64| ready(Ok(x + 1))) as fn(u64) -> _);
    let mut svc = d.layer(pay).layer(chaos.layer(pay).layer(inner));
    call_once(&mut svc, 0);
    let calls = |svc: &mut _| {
        allocation_counter::measure(|| {
            for i in 0..5_000 {
                call_once(svc, i);
            }
        })
    };
    let info = calls(&mut svc);
    assert_eq!(info.count_total, 0, "nothing in force: {info:?}");
    chaos
        .set(Target::class("log"), Fault::new().errors(1.0))
        .unwrap();
    let info = calls(&mut svc);
    assert_eq!(info.count_total, 0, "a fault on another class: {info:?}");
    d.tick_now();
    let served = d.history("pay").unwrap().latest().unwrap().successes;
    assert_eq!(served, 10_001);
}
