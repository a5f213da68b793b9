//! The protocol for gRPC services: the status from the headers or the trailers.

use tower_http::classify::{ClassifiedResponse, ClassifyResponse, GrpcCode, GrpcErrorsAsFailures};

use super::answer::degraded_response;
use super::body::DegradeBody;
use super::{FailureOutcome, Protocol};
use crate::error::Degraded;
use crate::window::{Outcome, Recording};

/// The protocol for gRPC services (and any classifier that needs the end of the stream): the
/// status is read from the headers or, when absent there, from the **trailers**, so the outcome
/// is recorded when the response body ends ([`DegradeBody`]).
///
/// # Streaming RPCs
///
/// A call's latency is the time to its response headers (as for any HTTP response), and its
/// outcome is counted when the stream ends, with the status in the trailers. So a server
/// stream (a watch, a feed) that stays open for minutes is neither a slow call nor an overdue
/// one, and does not hold an in-flight slot or an admission permit while it streams; a stream
/// that ends with a failure status counts as failed when it ends. A stream that its client
/// drops after the headers is `cancelled`: the service had answered. For unary calls the
/// headers come back when the handler has answered, with the trailers right after them. A
/// half-open probe is judged when its response headers come: within the class's SLA, a
/// success, later, a failure (a watch that takes a probe does not hold it, and its class
/// half-open, for as long as it streams); its stream's end is then counted as any call's.
/// The class `timeout` covers the time to the response headers.
///
/// A client stream (an upload) is different: tonic sends the headers when the handler
/// returns, after the client's last message, so the whole upload is the call's latency, and
/// an upload longer than the abandon threshold is overdue. Give long uploads a class of their
/// own with [`abandon_timeout(None)`](crate::ClassConfig::abandon_timeout) and an SLA that
/// fits them.
///
/// tonic answers a request it cannot decode (an empty or garbled message; tonic 0.14 serves
/// a wrong or missing content type) with `INTERNAL` before any handler runs, and `INTERNAL` is a failure: keep
/// authentication outside the layer, and untrusted clients on classes of their own
/// (`docs/architecture.md`, *Where the layer goes among the others*, has timeouts and health
/// checks too).
///
/// By default `UNAVAILABLE`, `DEADLINE_EXCEEDED` (a timeout), `RESOURCE_EXHAUSTED`, `INTERNAL`
/// and `UNKNOWN` are failures and every other status a success (they are the caller's fault).
/// Calls the layer does not pass to the service get a trailers-only `grpc-status: 14`
/// (`UNAVAILABLE`; 4, `DEADLINE_EXCEEDED`, for a timeout) with
///
/// * `grpc-retry-pushback-ms` from the class's state: the open time left, the next tick (for
///   an overload that has lasted longer, up to how long it has lasted, at most 10 s), or a
///   policy's `retry_after`, never sooner than the next tick (gRPC clients with retry
///   policies honour it; not on a `DEADLINE_EXCEEDED`, a call admitted that ran out of its
///   time);
/// * a `grpc-message` a person can read ("not served: circuit breaker open"), and
///   [`x-degrade-reason`](super::REASON_HEADER) with the machine-readable reason;
/// * the [`Degraded`] value in the response extensions.
///
/// Class names are internal: they are not sent to clients unless
/// [`expose_class`](Self::expose_class) is set.
///
/// # Refused calls' messages
///
/// A call that is not served is answered before its request message is read, and the
/// message then reaches a stream nobody reads. h2 (0.4.16 and later) charges every such small
/// DATA frame to a budget of the connection (half its window since h2 0.4.19) and closes the
/// connection with `GOAWAY ENHANCE_YOUR_CALM` when it is spent, failing every call in flight
/// on it: with hyper's 1 MiB window, after at least 2,048 late small messages (half of 1 MiB,
/// at most 256 bytes charged each), or sooner by hyper's limit of 1,024 resets for messages to
/// streams h2 has already forgotten ([`DrainRejected`](crate::fallback::DrainRejected) has
/// the details).
/// Add [`drain_rejected`](crate::DegradeLayer::drain_rejected) to the layer so that refused
/// calls' messages are read (and thrown away) instead, as `examples/grpc` does.
#[derive(Debug, Clone)]
pub struct Grpc<C = GrpcErrorsAsFailures> {
    classifier: C,
    expose_class: bool,
}

impl Grpc {
    /// The default gRPC failure codes (see the type docs).
    pub fn new() -> Self {
        let mut c = GrpcErrorsAsFailures::new();
        for code in [
            GrpcCode::Cancelled,
            GrpcCode::InvalidArgument,
            GrpcCode::NotFound,
            GrpcCode::AlreadyExists,
            GrpcCode::PermissionDenied,
            GrpcCode::FailedPrecondition,
            GrpcCode::Aborted,
            GrpcCode::OutOfRange,
            GrpcCode::Unimplemented,
            GrpcCode::DataLoss,
            GrpcCode::Unauthenticated,
        ] {
            c = c.with_success(code);
        }
        Self::with_classifier(c)
    }
}

impl Default for Grpc {
    fn default() -> Self {
        Self::new()
    }
}

impl<C> Grpc<C> {
    /// Use a custom tower-http classifier.
    pub fn with_classifier(classifier: C) -> Self {
        Self {
            classifier,
            expose_class: false,
        }
    }

    /// Name the class in the layer's own answers (in `grpc-message` and
    /// [`x-degrade-class`](super::CLASS_HEADER)). Off by default: class names say how a service
    /// ranks its work.
    pub fn expose_class(mut self, expose: bool) -> Self {
        self.expose_class = expose;
        self
    }
}

impl<C, B, E> Protocol<http::Response<B>, E> for Grpc<C>
where
    C: ClassifyResponse + Clone,
    C::FailureClass: FailureOutcome,
{
    type Response = http::Response<DegradeBody<B, C>>;
    type Error = E;

    fn on_response(
        &self,
        result: Result<http::Response<B>, E>,
        rec: Recording,
    ) -> Result<Self::Response, E> {
        let res = match result {
            Ok(res) => res,
            Err(e) => {
                rec.finish(Outcome::Error);
                return Err(e);
            }
        };
        let eos = match self.classifier.clone().classify_response(&res) {
            ClassifiedResponse::Ready(Ok(())) => {
                rec.finish(Outcome::Success);
                None
            }
            ClassifiedResponse::Ready(Err(f)) => {
                rec.finish(f.outcome());
                None
            }
            ClassifiedResponse::RequiresEos(eos) => {
                // The response head is the answer's latency; the status waits for the trailers.
                let mut rec = rec;
                rec.answered();
                Some((rec, eos))
            }
        };
        Ok(res.map(|body| DegradeBody {
            inner: Some(body),
            eos,
        }))
    }

    fn on_fallback(&self, result: Result<http::Response<B>, E>) -> Result<Self::Response, E> {
        result.map(|res| {
            res.map(|body| DegradeBody {
                inner: Some(body),
                eos: None,
            })
        })
    }

    fn on_degraded(&self, degraded: Degraded) -> Result<Self::Response, E> {
        Ok(degraded_response(
            degraded,
            true,
            self.expose_class,
            DegradeBody::empty(),
        ))
    }

    fn on_ready_error(&self, error: E) -> E {
        error
    }
}
