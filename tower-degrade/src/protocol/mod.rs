//! Protocols: how a call's outcome is classified and how a degraded call is answered.
//!
//! * [`Generic`] for any service: the outcome comes from a [`ClassifyOutcome`] (by default
//!   `Ok` is a success and `Err` an error), and a degraded call fails with a
//!   [`Degraded`] error inside a [`BoxError`](crate::error::BoxError).
//! * [`Http`] for `http::Response` services: the outcome comes from a
//!   [`tower_http::classify::ClassifyResponse`] (HTTP 5xx by default), and a degraded call is
//!   *answered* with 503 and `Retry-After`, with the [`Degraded`] value
//!   in the response extensions. Response and error types stay the inner service's.
//! * [`Grpc`] for gRPC: the status comes from the headers **or the trailers** (counted when
//!   the body ends; the latency is the time to the headers), and a degraded call gets a
//!   trailers-only `UNAVAILABLE` response.
//!
//! Every answer the layer makes itself carries why (the `x-degrade-reason` header, or the
//! gRPC status message), and every refusal when to come back (`Retry-After`, or
//! `grpc-retry-pushback-ms`); a timeout (`504`, `DEADLINE_EXCEEDED`) was admitted and carries
//! no such hint: see [`Http`] and [`Grpc`].

mod answer;
mod body;
mod generic;
mod grpc;
mod http;

use ::http::StatusCode;
use tower_http::classify::{
    GrpcCode, GrpcFailureClass, ServerErrorsFailureClass, StatusInRangeFailureClass,
};

pub use self::answer::{CLASS_HEADER, DETAIL_HEADER, REASON_HEADER, ROUTE_HEADER, TASK_ID_HEADER};
#[cfg(feature = "fallback")]
pub(crate) use self::answer::{degraded_response, kept_response, key_reused_response};
pub use self::body::DegradeBody;
pub use self::generic::Generic;
pub use self::grpc::Grpc;
pub use self::http::Http;
use crate::error::Degraded;
use crate::window::{Outcome, Recording};

/// How a [`Degrade`](crate::Degrade) service turns results into responses.
pub trait Protocol<Res, E> {
    /// The response type of the wrapped service.
    type Response;
    /// The error type of the wrapped service.
    type Error;

    /// Classify the inner service's result and finish (or hand on) the recording.
    fn on_response(
        &self,
        result: Result<Res, E>,
        recording: Recording,
    ) -> Result<Self::Response, Self::Error>;

    /// Pass through the result of a fallback service.
    fn on_fallback(&self, result: Result<Res, E>) -> Result<Self::Response, Self::Error>;

    /// Answer a call that was not served.
    fn on_degraded(&self, degraded: Degraded) -> Result<Self::Response, Self::Error>;

    /// Convert an error from the inner service's `poll_ready`.
    fn on_ready_error(&self, error: E) -> Self::Error;
}

/// Decides the [`Outcome`] of a result for the [`Generic`] protocol.
///
/// Closures `Fn(&Result<Res, E>) -> Outcome` implement it:
///
/// ```
/// use tower_degrade::{protocol::ClassifyOutcome, window::Outcome};
///
/// let slow_is_error = |r: &Result<u32, &str>| match r {
///     Ok(ms) if *ms > 800 => Outcome::Timeout,
///     Ok(_) => Outcome::Success,
///     Err(_) => Outcome::Error,
/// };
/// assert_eq!(slow_is_error.classify(&Ok(900)), Outcome::Timeout);
/// ```
pub trait ClassifyOutcome<Res, E> {
    /// The outcome of `result`.
    fn classify(&self, result: &Result<Res, E>) -> Outcome;
}

impl<Res, E, F> ClassifyOutcome<Res, E> for F
where
    F: Fn(&Result<Res, E>) -> Outcome,
{
    fn classify(&self, result: &Result<Res, E>) -> Outcome {
        self(result)
    }
}

/// The default outcome classifier: `Ok` is a success, `Err` an error.
#[derive(Debug, Clone, Copy, Default)]
pub struct OkIsSuccess;

impl<Res, E> ClassifyOutcome<Res, E> for OkIsSuccess {
    #[inline]
    fn classify(&self, result: &Result<Res, E>) -> Outcome {
        if result.is_ok() {
            Outcome::Success
        } else {
            Outcome::Error
        }
    }
}

/// Maps a tower-http failure class onto an [`Outcome`].
pub trait FailureOutcome {
    /// The outcome of this failure (`Error` or `Timeout`).
    fn outcome(&self) -> Outcome;
}

impl FailureOutcome for ServerErrorsFailureClass {
    fn outcome(&self) -> Outcome {
        match self {
            ServerErrorsFailureClass::StatusCode(StatusCode::GATEWAY_TIMEOUT) => Outcome::Timeout,
            _ => Outcome::Error,
        }
    }
}

/// For [`StatusInRangeAsFailures`](tower_http::classify::StatusInRangeAsFailures): count 429s
/// or every 4xx as failures with `Http::with_classifier(StatusInRangeAsFailures::new(400..=599))`.
impl FailureOutcome for StatusInRangeFailureClass {
    fn outcome(&self) -> Outcome {
        match self {
            StatusInRangeFailureClass::StatusCode(StatusCode::GATEWAY_TIMEOUT) => Outcome::Timeout,
            _ => Outcome::Error,
        }
    }
}

impl FailureOutcome for GrpcFailureClass {
    fn outcome(&self) -> Outcome {
        match self {
            GrpcFailureClass::Status(s) if s.code() == Some(GrpcCode::DeadlineExceeded) => {
                Outcome::Timeout
            }
            _ => Outcome::Error,
        }
    }
}

/// Whether a request with these headers is a gRPC call, as the layer's fallback router reads
/// one: its content type `application/grpc` (any case; `+proto` and the like, and gRPC-Web's
/// `application/grpc-web`), or none with `te: trailers`, which only gRPC clients send. Steer
/// calls by it to serve a tonic service beside an axum API on one port, each through the
/// layer of its protocol (`.grpc()`, `.http()`; the README's *gRPC (tonic)*):
///
/// ```
/// let call = http::Request::post("/orders.v1.Orders/Pay")
///     .header("content-type", "application/grpc+proto")
///     .body(())
///     .unwrap();
/// assert!(tower_degrade::protocol::is_grpc(call.headers()));
/// let page = http::Request::get("/orders/7").body(()).unwrap();
/// assert!(!tower_degrade::protocol::is_grpc(page.headers()));
/// ```
pub fn is_grpc(headers: &::http::HeaderMap) -> bool {
    grpc_rest(headers).is_some()
}

/// What follows `application/grpc` in a gRPC message's content type (`+proto`, `-web`, or
/// nothing), or `None` if it is not one. Media types are case-insensitive (RFC 9110 8.3.1):
/// `Application/GRPC` is a gRPC call, which tonic serves.
pub(crate) fn grpc_rest(headers: &::http::HeaderMap) -> Option<&[u8]> {
    const GRPC: &[u8] = b"application/grpc";
    let Some(v) = headers.get(::http::header::CONTENT_TYPE) else {
        // No content type, and `te: trailers`, which only gRPC's requests send: tonic
        // serves such a call as gRPC, so it is one here too (it was answered HTTP 202).
        let trailers = headers
            .get(::http::header::TE)
            .is_some_and(|te| te.as_bytes().eq_ignore_ascii_case(b"trailers"));
        return trailers.then_some(&[]);
    };
    let (head, rest) = v.as_bytes().split_at_checked(GRPC.len())?;
    head.eq_ignore_ascii_case(GRPC).then_some(rest)
}
