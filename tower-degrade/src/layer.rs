//! [`DegradeLayer`] and the [`Degrade`] service.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use tower::util::Oneshot;
use tower::{Layer, Service, ServiceExt};

use crate::class::{ClassId, Route};
use crate::classify::ClassifyRequest;
use crate::degrader::{Degrader, Inner};
use crate::directive::{self, KIND_ADMIT, KIND_FRACTION, KIND_PROBE, Packed};
use crate::error::Degraded;
use crate::future::ResponseFuture;
use crate::protocol::{Generic, Grpc, Http, Protocol, Recording};
use crate::window::{Outcome, shard_index};

/// Where a call goes when its class's directive sends it to [`Route::Service`].
///
/// Implemented by [`NoFallback`] (the call is rejected instead) and [`FallbackService`].
pub trait Fallback<Req, Res, E> {
    /// The fallback's response future.
    type Future: std::future::Future<Output = Result<Res, E>>;

    /// Hand `req` to the fallback, or give it back when there is none.
    fn call(&mut self, req: Req) -> Result<Self::Future, Req>;
}

/// No fallback service: calls routed to [`Route::Service`] are rejected.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoFallback;

impl<Req, Res, E> Fallback<Req, Res, E> for NoFallback {
    type Future = std::future::Pending<Result<Res, E>>;

    fn call(&mut self, req: Req) -> Result<Self::Future, Req> {
        Err(req)
    }
}

/// A tower service used as the fallback route.
///
/// # Readiness
///
/// The fallback's readiness is awaited inside the diverted call's future (a clone of the
/// service is driven with `oneshot`), so a busy fallback slows the diverted calls only; the
/// primary path's `poll_ready` never waits for it.
#[derive(Debug, Clone)]
pub struct FallbackService<T>(pub T);

impl<T, Req> Fallback<Req, T::Response, T::Error> for FallbackService<T>
where
    T: Service<Req> + Clone,
{
    type Future = Oneshot<T, Req>;

    fn call(&mut self, req: Req) -> Result<Self::Future, Req> {
        Ok(self.0.clone().oneshot(req))
    }
}

/// Applies task-aware degradation to a service: classify, read the class directive with one
/// atomic load, admit / divert, time the call, record the outcome.
///
/// Every service this layer produces shares the [`Degrader`]'s state, however many times
/// [`Layer::layer`] is called (axum calls it once per route): there is one breaker per class.
///
/// ```
/// use std::convert::Infallible;
/// use tower::{Layer, Service, ServiceExt, service_fn};
/// use tower_degrade::{ClassConfig, Degrader};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_degrade::BoxError> {
/// let degrader = Degrader::builder("checkout")
///     .class(ClassConfig::gold("payment"))
///     .build()?;
/// let payment = degrader.class_id("payment")?;
/// let svc = degrader
///     .layer(move |_req: &String| payment)
///     .layer(service_fn(|req: String| async move { Ok::<_, Infallible>(req.len()) }));
/// assert_eq!(svc.oneshot("hello".to_owned()).await?, 5);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct DegradeLayer<C, P = Generic, F = NoFallback> {
    shared: Arc<Inner>,
    classifier: C,
    protocol: P,
    fallback: F,
}

impl Degrader {
    /// A layer classifying requests with `classifier`, using the [`Generic`] protocol (errors
    /// become [`BoxError`](crate::BoxError)) and no fallback service.
    pub fn layer<C>(&self, classifier: C) -> DegradeLayer<C> {
        DegradeLayer {
            shared: self.inner.clone(),
            classifier,
            protocol: Generic::new(),
            fallback: NoFallback,
        }
    }
}

impl<C, P, F> DegradeLayer<C, P, F> {
    /// Use another protocol.
    pub fn protocol<P2>(self, protocol: P2) -> DegradeLayer<C, P2, F> {
        DegradeLayer {
            shared: self.shared,
            classifier: self.classifier,
            protocol,
            fallback: self.fallback,
        }
    }

    /// HTTP: 5xx responses are failures, degraded calls are answered with 503 + `Retry-After`.
    pub fn http(self) -> DegradeLayer<C, Http, F> {
        self.protocol(Http::new())
    }

    /// gRPC: failing statuses in headers or trailers are failures, degraded calls are answered
    /// with `grpc-status: 14`.
    pub fn grpc(self) -> DegradeLayer<C, Grpc, F> {
        self.protocol(Grpc::new())
    }

    /// Send calls routed to [`Route::Service`] to `service`.
    pub fn fallback<T>(self, service: T) -> DegradeLayer<C, P, FallbackService<T>> {
        DegradeLayer {
            shared: self.shared,
            classifier: self.classifier,
            protocol: self.protocol,
            fallback: FallbackService(service),
        }
    }

    /// Use a custom [`Fallback`].
    pub fn fallback_with<F2>(self, fallback: F2) -> DegradeLayer<C, P, F2> {
        DegradeLayer {
            shared: self.shared,
            classifier: self.classifier,
            protocol: self.protocol,
            fallback,
        }
    }
}

impl<S, C: Clone, P: Clone, F: Clone> Layer<S> for DegradeLayer<C, P, F> {
    type Service = Degrade<S, C, P, F>;

    fn layer(&self, inner: S) -> Self::Service {
        Degrade {
            inner,
            shared: self.shared.clone(),
            classifier: self.classifier.clone(),
            protocol: self.protocol.clone(),
            fallback: self.fallback.clone(),
        }
    }
}

/// The service produced by [`DegradeLayer`].
///
/// `poll_ready` only passes the inner service's readiness through: calls that are not admitted
/// are answered from `call` (a ready degraded error or response, or the fallback), never by an
/// `Err` from `poll_ready`, so `Buffer`-based stacks are not torn down.
#[derive(Debug, Clone)]
pub struct Degrade<S, C, P = Generic, F = NoFallback> {
    inner: S,
    shared: Arc<Inner>,
    classifier: C,
    protocol: P,
    fallback: F,
}

impl<S, C, P, F> Degrade<S, C, P, F> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consume this service, returning the inner one.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, C, P, F, Req> Service<Req> for Degrade<S, C, P, F>
where
    S: Service<Req>,
    C: ClassifyRequest<Req>,
    P: Protocol<S::Response, S::Error> + Clone,
    F: Fallback<Req, S::Response, S::Error>,
{
    type Response = P::Response;
    type Error = P::Error;
    type Future = ResponseFuture<S::Future, F::Future, P>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner
            .poll_ready(cx)
            .map_err(|e| self.protocol.on_ready_error(e))
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        let class = self.classifier.classify(&req);
        let idx = class.index().min(self.shared.cells.len() - 1);
        let cell = &self.shared.cells[idx];
        #[allow(unused_mut)]
        let mut d = cell.directive.load();
        #[cfg(feature = "rhai")]
        if d.has_overlay() {
            d = self.per_request(idx, d, &req);
        }
        let (mut probe, mut delay) = (None, None);
        if !d.is_admit() {
            let admitted = match d.kind() {
                KIND_ADMIT => {
                    delay = d.delay();
                    true
                }
                KIND_FRACTION => {
                    directive::ticket(cell.seq.fetch_add(1, Ordering::Relaxed)) < d.threshold()
                }
                KIND_PROBE => {
                    let took = cell
                        .probes
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| p.checked_sub(1))
                        .is_ok();
                    if took {
                        probe = Some(self.shared.clone());
                    }
                    took
                }
                _ => false,
            };
            if !admitted {
                return self.divert(req, idx, d);
            }
        }
        let shard = self.shared.shards[shard_index(self.shared.shard_mask)].clone();
        let recording = Recording::start(shard, idx as u16, probe);
        let fut = self.inner.call(req);
        ResponseFuture::called(fut, recording, cell.timeout, delay, self.protocol.clone())
    }
}

impl<S, C, P, F> Degrade<S, C, P, F> {
    /// Apply the class's per-request policy rules (rollouts, `on_request` hooks).
    #[cfg(feature = "rhai")]
    #[cold]
    fn per_request<Req>(&self, idx: usize, d: Packed, req: &Req) -> Packed
    where
        C: ClassifyRequest<Req>,
    {
        match self.shared.cells[idx].overlay.load().as_deref() {
            Some(overlay) => {
                let view = self.classifier.describe(req);
                self.shared.policies.per_request(overlay, d, &view)
            }
            None => d.with_overlay(false),
        }
    }

    #[cold]
    fn divert<Req>(
        &mut self,
        req: Req,
        idx: usize,
        d: Packed,
    ) -> ResponseFuture<S::Future, F::Future, P>
    where
        S: Service<Req>,
        P: Protocol<S::Response, S::Error> + Clone,
        F: Fallback<Req, S::Response, S::Error>,
    {
        let shard = &self.shared.shards[shard_index(self.shared.shard_mask)];
        let route = d.route();
        if route == Route::Service {
            if let Ok(fut) = self.fallback.call(req) {
                shard.record(idx, Outcome::Degraded, std::time::Duration::ZERO);
                return ResponseFuture::fallback(fut, self.protocol.clone());
            }
        }
        shard.record(idx, Outcome::Rejected, std::time::Duration::ZERO);
        let name = self.shared.names[idx].clone();
        tracing::debug!(
            service = %self.shared.service, class = %name, reason = %d.reason(), route = %route,
            "call not admitted"
        );
        let degraded = Degraded::new(name, d.reason(), route, d.retry_after());
        ResponseFuture::degraded(degraded, self.protocol.clone())
    }
}

/// A fixed class is a classifier: every request belongs to it.
impl<Req> ClassifyRequest<Req> for ClassId {
    #[inline]
    fn classify(&self, _req: &Req) -> ClassId {
        *self
    }
}
