//! The protocol for HTTP services.

use tower_http::classify::{
    ClassifiedResponse, ClassifyResponse, NeverClassifyEos, ServerErrorsAsFailures,
};

use super::answer::degraded_response;
use super::{FailureOutcome, Protocol};
use crate::error::Degraded;
use crate::window::{Outcome, Recording};

/// The protocol for HTTP services (`http::Response<B>`), built on a tower-http response
/// classifier that decides from the response head (5xx by default). The call's latency and
/// outcome stop at the response head: a streamed body (SSE, a large download), an error in
/// the body after the status, a client gone mid-body and an upgraded connection's life (a
/// `101` is a success) are not seen. A timeout answered `408` by an inner layer is a 4xx, the
/// caller's, so it is not a failure: answer timeouts with `504` (counted as timeouts). The
/// response type is unchanged; calls the layer does not pass to the service are answered with
/// an empty `B::default()` body: 503 (504 for a timeout) with
///
/// * `Retry-After`, in whole seconds rounded up, from the class's state: the open time left,
///   the next tick (for an overload that has lasted longer, up to how long it has lasted, at
///   most 10 s), or a policy's `retry_after`, never sooner than the next tick (not on a
///   `504`: that call was admitted and ran out of its time, which says nothing of when the
///   class takes calls again; the client's own retry policy decides);
/// * [`x-degrade-reason`](super::REASON_HEADER) naming why (`breaker_open`, `degraded`,
///   `shed`...), so a client can tell it from the application's own 503;
/// * the [`Degraded`] value in the response extensions, for layers outside this one.
///
/// Class names are internal: they are not sent to clients unless
/// [`expose_class`](Self::expose_class) is set.
///
/// Over HTTP/2, a call that is not served is answered before its request body is read: when
/// clients send bodies, add [`drain_rejected`](crate::DegradeLayer::drain_rejected) to the
/// layer (see [`Grpc`](super::Grpc#refused-calls-messages) for why).
#[derive(Debug, Clone, Default)]
pub struct Http<C = ServerErrorsAsFailures> {
    classifier: C,
    expose_class: bool,
}

impl Http {
    /// 5xx responses are failures (504 a timeout).
    pub fn new() -> Self {
        Self::with_classifier(ServerErrorsAsFailures::new())
    }
}

impl<C> Http<C> {
    /// Use a custom tower-http classifier that decides from the response head.
    pub fn with_classifier(classifier: C) -> Self {
        Self {
            classifier,
            expose_class: false,
        }
    }

    /// Name the class in the layer's own answers ([`x-degrade-class`](super::CLASS_HEADER)).
    /// Off by default: class names say how a service ranks its work.
    pub fn expose_class(mut self, expose: bool) -> Self {
        self.expose_class = expose;
        self
    }
}

impl<C, B, E> Protocol<http::Response<B>, E> for Http<C>
where
    C: ClassifyResponse<ClassifyEos = NeverClassifyEos<<C as ClassifyResponse>::FailureClass>>
        + Clone,
    C::FailureClass: FailureOutcome,
    B: Default,
{
    type Response = http::Response<B>;
    type Error = E;

    #[inline]
    fn on_response(
        &self,
        result: Result<http::Response<B>, E>,
        rec: Recording,
    ) -> Result<http::Response<B>, E> {
        let mut result = result;
        match &mut result {
            Ok(res) => match self.classifier.clone().classify_response(res) {
                ClassifiedResponse::Ready(Ok(())) => rec.finish(Outcome::Success),
                ClassifiedResponse::Ready(Err(f)) => {
                    #[cfg(feature = "fallback")]
                    failed_read(res, &rec);
                    rec.finish(f.outcome())
                }
                // Unreachable: the bound makes the end-of-stream classifier `NeverClassifyEos`,
                // which cannot be constructed. Use `Grpc` for classifiers that need trailers.
                ClassifiedResponse::RequiresEos(_) => rec.finish(Outcome::Success),
            },
            Err(_) => rec.finish(Outcome::Error),
        }
        result
    }

    fn on_fallback(&self, result: Result<http::Response<B>, E>) -> Result<http::Response<B>, E> {
        result
    }

    fn on_degraded(&self, degraded: Degraded) -> Result<http::Response<B>, E> {
        Ok(degraded_response(
            degraded,
            false,
            self.expose_class,
            B::default(),
        ))
    }

    fn on_ready_error(&self, error: E) -> E {
        error
    }
}

/// A failed answer (5xx) of a class routed to `cached`, marked for a
/// [`LastGoodLayer`](crate::fallback::LastGoodLayer) outside the layer to put its copy in
/// place of (cold: failures of such classes only). Calls it never keeps nor serves (a
/// `POST`, a personalised read) are marked too: the request is not at hand here, and the
/// marker costs only such a failure its extensions map.
#[cfg(feature = "fallback")]
#[cold]
#[inline(never)]
fn failed_read<B>(res: &mut http::Response<B>, rec: &Recording) {
    if rec.route() == crate::class::Route::Cached && res.status().is_server_error() {
        let (service, class) = rec.names();
        res.extensions_mut()
            .insert(crate::fallback::FailedRead { service, class });
    }
}
