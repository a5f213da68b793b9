//! [`DegradeLayer`], the one data-path layer, and the [`Degrade`] service it produces (in
//! `service`), with its response future (in `future`).

mod divert;
mod future;
// `queued::Queued` appears in `Degrade`'s future type; it and its trait stay unnameable
// outside the crate (not re-exported).
mod queued;
mod service;

use std::sync::Arc;

use tower::Layer;

pub use self::future::ResponseFuture;
pub(crate) use self::queued::Queued;
pub use self::service::Degrade;
use crate::degrader::Shared;
use crate::fallback::{DrainRejected, FallbackService, NoFallback};
use crate::protocol::{Generic, Grpc, Http};

/// Applies task-aware degradation to a service: classify, read the class directive with one
/// atomic load, admit / divert, time the call, record the outcome.
///
/// Every service this layer produces shares the [`Degrader`](crate::Degrader)'s state, however
/// many times [`Layer::layer`] is called (axum calls it once per route): there is one breaker
/// per class.
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
    shared: Arc<Shared>,
    classifier: C,
    protocol: P,
    fallback: F,
}

impl<C> DegradeLayer<C> {
    pub(crate) fn new(shared: Arc<Shared>, classifier: C) -> Self {
        DegradeLayer {
            shared,
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

    /// Serve calls diverted to [`Route::Service`](crate::Route::Service) with `service`, which
    /// receives each call as a [`Diverted`](crate::fallback::Diverted) request: the request with
    /// its class, route and reason. (Which route a class's calls take is
    /// [`ClassConfig::fallback_route`](crate::ClassConfig::fallback_route).)
    pub fn fallback_service<T>(self, service: T) -> DegradeLayer<C, P, FallbackService<T>> {
        DegradeLayer {
            shared: self.shared,
            classifier: self.classifier,
            protocol: self.protocol,
            fallback: FallbackService(service),
        }
    }

    /// Serve diverted calls with a custom [`Fallback`](crate::fallback::Fallback), offered every route but
    /// [`Route::Reject`](crate::Route::Reject).
    pub fn fallback_with<F2>(self, fallback: F2) -> DegradeLayer<C, P, F2> {
        DegradeLayer {
            shared: self.shared,
            classifier: self.classifier,
            protocol: self.protocol,
            fallback,
        }
    }

    /// Read the request body of each call answered as not served to its end, bounded, rather
    /// than drop it: over HTTP/2 the messages of refused calls that arrive after their answer
    /// otherwise make h2 close the connection, and every call in flight on it fails
    /// ([`DrainRejected`] says why and how much). For HTTP and gRPC servers that take request
    /// bodies; it wraps the fallback set so far, so call it after
    /// [`fallback_service`](Self::fallback_service) or [`fallback_with`](Self::fallback_with).
    pub fn drain_rejected(self) -> DegradeLayer<C, P, DrainRejected<F>> {
        DegradeLayer {
            shared: self.shared,
            classifier: self.classifier,
            protocol: self.protocol,
            fallback: DrainRejected::wrap(self.fallback),
        }
    }
}

impl<S, C: Clone, P: Clone, F: Clone> Layer<S> for DegradeLayer<C, P, F> {
    type Service = Degrade<S, C, P, F>;

    fn layer(&self, inner: S) -> Self::Service {
        Degrade::new(
            inner,
            self.shared.clone(),
            self.classifier.clone(),
            self.protocol.clone(),
            self.fallback.clone(),
        )
    }
}
