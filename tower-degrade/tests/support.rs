//! Helpers shared by the integration tests, as tower's `tests/support.rs`: each test crate
//! includes it with `#[path = "../support.rs"] mod support;`.

#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use tower::{Layer, Service, ServiceExt, service_fn};
use tower_degrade::clock::LatencyClock;
use tower_degrade::{BoxError, ClassConfig, Degrader, DegraderBuilder};

/// A builder timed on tokio's clock, so latencies follow `tokio::time::pause()`.
pub fn builder(service: &str) -> DegraderBuilder {
    Degrader::builder(service).latency_clock(LatencyClock::Tokio)
}

/// A degrader with `classes` whose control loop is not spawned: tests tick it with
/// `tick_now`.
pub fn degrader(classes: impl IntoIterator<Item = ClassConfig>) -> Degrader {
    named_degrader("test", classes)
}

/// [`degrader`] with another service name (a second degrader in the process).
pub fn named_degrader(service: &str, classes: impl IntoIterator<Item = ClassConfig>) -> Degrader {
    let mut b = builder(service);
    for c in classes {
        b = b.class(c);
    }
    b.build_with_worker().expect("valid config").0
}

/// The dependency the tests drive: a call `(ms, fail)` takes `ms` of tokio time, then fails
/// with "dependency down" when `fail`, else succeeds.
pub fn slow_failing()
-> impl Service<(u64, bool), Response = (), Error = BoxError, Future: Send> + Clone + Send + Sync {
    service_fn(|(ms, fail): (u64, bool)| async move {
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if fail {
            Err::<(), BoxError>("dependency down".into())
        } else {
            Ok(())
        }
    })
}

/// [`slow_failing`] with every call taking `ms`: a call is just `fail`.
pub fn failing_after(
    ms: u64,
) -> impl Service<bool, Response = (), Error = BoxError, Future: Send> + Clone + Send + Sync {
    slow_failing().map_request(move |fail: bool| (ms, fail))
}

/// One window of `n` calls of `class`, every `fail_every`-th failing (none when 0), each
/// taking `ms`; then one tick.
pub async fn window(d: &Degrader, class: &str, n: usize, fail_every: usize, ms: u64) {
    let mut svc = d.layer(d.class_id(class).unwrap()).layer(failing_after(ms));
    for i in 0..n {
        let _ = svc
            .ready()
            .await
            .unwrap()
            .call(fail_every != 0 && i % fail_every == 0)
            .await;
    }
    d.tick_now();
}

/// `workers` workers, each call holding one for `work`: capacity `workers / work`. Calls wait
/// for a worker inside the service, as they wait for a database connection.
pub fn fixed_capacity(
    workers: usize,
    work: Duration,
) -> impl Service<(), Response = (), Error = BoxError, Future: Send> + Clone + Send + 'static {
    let pool = std::sync::Arc::new(tokio::sync::Semaphore::new(workers));
    service_fn(move |()| {
        let pool = pool.clone();
        async move {
            let _worker = pool.acquire_owned().await?;
            tokio::time::sleep(work).await;
            Ok::<_, BoxError>(())
        }
    })
}

/// splitmix64: a small seedable generator for tests that pick at random (kill points, policy
/// grammar branches) and must replay a failing seed.
#[derive(Debug)]
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// One of `items`.
    pub fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}
