//! Where calls go that their class does not admit: the [`Fallback`] trait, which sees why each
//! call was diverted ([`Diverted`]: class, route, reason), so one fallback can serve several
//! routes.
//!
//! [`DegradeLayer::fallback_service`](crate::DegradeLayer::fallback_service) serves
//! [`Route::Service`] with a tower service; a custom [`Fallback`] given to
//! [`DegradeLayer::fallback_with`](crate::DegradeLayer::fallback_with) may serve any route.
//! A call that no fallback takes is answered as [`Route::Reject`]: a
//! [`Degraded`](crate::error::Degraded) error, or a 503 / `UNAVAILABLE` answer.

#[cfg(all(feature = "fallback", feature = "axum"))]
mod admin;
#[cfg(feature = "fallback")]
mod batch;
#[cfg(feature = "fallback")]
mod cached;
#[cfg(feature = "fallback")]
mod capture;
mod drain;
#[cfg(feature = "fallback")]
mod finite;
#[cfg(feature = "fallback")]
mod record;
#[cfg(feature = "fallback")]
mod replay;
#[cfg(feature = "fallback")]
mod review;
#[cfg(feature = "fallback")]
mod router;
#[cfg(feature = "fallback")]
mod schedule;
#[cfg(feature = "fallback")]
mod shared;
#[cfg(feature = "fallback")]
#[cfg_attr(docsrs, doc(cfg(feature = "fallback")))]
pub mod store;
#[cfg(feature = "fallback")]
mod worker;

use std::sync::Arc;
use std::time::Duration;

#[cfg(feature = "fallback")]
pub(crate) use self::cached::{FailedRead, count_cached};
pub use self::drain::DrainRejected;
#[cfg(feature = "fallback")]
#[cfg_attr(docsrs, doc(cfg(feature = "fallback")))]
pub use self::{
    batch::{Batch, BatchMerge},
    cached::{LastGood, LastGoodFuture, LastGoodLayer, MAX_CACHE_KEY_BYTES},
    capture::{Capture, MAX_KEPT_HEADER_BYTES, MAX_KEY_BYTES, REPLAY_HEADER},
    record::{DecodeError, HttpRequest, InvalidTaskId, Payload, Queue, Task, TaskId},
    replay::{
        HttpReplay, MAX_RETRY_AFTER, Replay, ReplayByClass, ReplayFn, ReplayFuture, Replayed,
        replay_fn, replay_task,
    },
    review::{ManualReview, Page},
    router::{
        Accepted, CannotKeep, CannotKeepKind, FallbackRouter, FallbackRouterBuilder, RouterFuture,
    },
    schedule::{Backfill, RetryPolicy},
    store::{MemoryStore, Store, StoreError},
    worker::FallbackWorker,
};
use tower::util::Oneshot;
use tower::{Service, ServiceExt};

/// What a caught panic said, when it said it with a string.
#[cfg(feature = "fallback")]
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> Option<String> {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
}

/// "the `what` panicked: its message", for a user function's panic caught as a failure.
#[cfg(feature = "fallback")]
pub(crate) fn panicked(what: &str, panic: &(dyn std::any::Any + Send)) -> String {
    match panic_message(panic) {
        Some(said) => format!("the {what} panicked: {said}"),
        None => format!("the {what} panicked"),
    }
}

use crate::class::{ClassId, Route};
use crate::gate::Reason;

/// A call that its class did not admit, with why: what a [`Fallback`] receives.
#[derive(Debug)]
pub struct Diverted<Req> {
    request: Req,
    class: ClassId,
    service: Arc<str>,
    name: Arc<str>,
    route: Route,
    reason: Reason,
    retry_after: Option<Duration>,
}

impl<Req> Diverted<Req> {
    pub(crate) fn new(
        request: Req,
        class: ClassId,
        service: Arc<str>,
        name: Arc<str>,
        route: Route,
        reason: Reason,
        retry_after: Option<Duration>,
    ) -> Self {
        Self {
            request,
            class,
            service,
            name,
            route,
            reason,
            retry_after,
        }
    }

    /// The request.
    pub fn request(&self) -> &Req {
        &self.request
    }

    /// The request, mutably.
    pub fn request_mut(&mut self) -> &mut Req {
        &mut self.request
    }

    /// The request, without the rest (for a fallback service that only wants the request:
    /// `ServiceBuilder::new().map_request(Diverted::into_request).service(svc)`).
    pub fn into_request(self) -> Req {
        self.request
    }

    /// The id of the call's class.
    pub fn class(&self) -> ClassId {
        self.class
    }

    /// The service of the degrader whose layer diverted the call.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The name of the call's class.
    pub fn class_name(&self) -> &str {
        &self.name
    }

    /// The route that diverted the call (the class's, or a policy's).
    pub fn route(&self) -> Route {
        self.route
    }

    /// Why the call was not admitted.
    pub fn reason(&self) -> Reason {
        self.reason
    }

    /// When the layer would have told the caller to come back, had the call been refused
    /// (an open breaker's time left, the next tick, a policy's value; for an overload, longer
    /// the longer it has lasted, at most 10 s): a fallback that cannot
    /// serve the call should not ask for it sooner, when it would be diverted again.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }
}

/// Where calls go that their class does not admit.
///
/// Offered every diverted call whose route is not [`Route::Reject`]; a fallback that does not
/// serve the route gives the call back, and it is rejected.
pub trait Fallback<Req, Res, E> {
    /// The fallback's response future.
    type Future: std::future::Future<Output = Result<Res, E>>;

    /// Serve `call`, or give it back.
    fn call(&mut self, call: Diverted<Req>) -> Result<Self::Future, Diverted<Req>>;

    /// A call the layer answers without its service or a fallback (its route is
    /// [`Route::Reject`], no fallback took it, or the service failed to get ready after its
    /// wait for a permit; for [`Route::Cached`], a cache outside the layer may still answer
    /// it), handed over when its answer is made. The default drops it; [`DrainRejected`]
    /// reads an HTTP request's body to its end first, so that an HTTP/2 server does not close
    /// the connection over the messages that arrive after the answer. A fallback that wraps
    /// another should hand the call on to it.
    fn reject(&mut self, request: Req) {
        drop(request);
    }
}

/// No fallback: every diverted call is rejected.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoFallback;

impl<Req, Res, E> Fallback<Req, Res, E> for NoFallback {
    type Future = std::future::Pending<Result<Res, E>>;

    fn call(&mut self, call: Diverted<Req>) -> Result<Self::Future, Diverted<Req>> {
        Err(call)
    }
}

/// A tower service serving [`Route::Service`]: it receives the [`Diverted`] call.
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
    T: Service<Diverted<Req>> + Clone,
{
    type Future = Oneshot<T, Diverted<Req>>;

    fn call(&mut self, call: Diverted<Req>) -> Result<Self::Future, Diverted<Req>> {
        if call.route != Route::Service {
            return Err(call);
        }
        Ok(self.0.clone().oneshot(call))
    }
}
