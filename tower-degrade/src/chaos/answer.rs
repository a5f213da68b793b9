//! How an injected fault answers: an error value, an HTTP status, a gRPC status.

use std::fmt;

use http::{HeaderValue, StatusCode, header};

use super::{FAULT_HEADER, FaultKind};

/// Makes the answer to a call a fault struck, in the wrapped service's response and error
/// types. The answer must fail the way the protocol's classifier counts as a failure, so that
/// the degrade layer outside sees an injected fault like a real one.
pub trait FaultAnswer<Res, E> {
    /// The answer to a call of `class` that `fault` struck.
    fn answer(&self, fault: FaultKind, class: &str) -> Result<Res, E>;
}

/// The error an [`ErrorAnswer`] fails calls with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChaosError {
    fault: FaultKind,
    class: String,
}

impl ChaosError {
    /// What struck the call.
    pub fn fault(&self) -> FaultKind {
        self.fault
    }

    /// The call's class.
    pub fn class(&self) -> &str {
        &self.class
    }
}

impl fmt::Display for ChaosError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "chaos: injected {} in class `{}`",
            self.fault, self.class
        )
    }
}

impl std::error::Error for ChaosError {}

/// Fails struck calls with a [`ChaosError`], converted into the service's error type (a
/// [`BoxError`](crate::BoxError), or any `E: From<ChaosError>`). The default: for the task
/// API and other non-HTTP services.
#[derive(Debug, Clone, Copy, Default)]
pub struct ErrorAnswer;

impl<Res, E: From<ChaosError>> FaultAnswer<Res, E> for ErrorAnswer {
    fn answer(&self, fault: FaultKind, class: &str) -> Result<Res, E> {
        Err(E::from(ChaosError {
            fault,
            class: class.to_owned(),
        }))
    }
}

/// Answers struck HTTP calls with a 5xx, which the HTTP protocol's default classifier counts
/// as a failure: 500 for an error, 502 for an abort (the upstream's answer was lost), 504 for
/// a hang; with [`FAULT_HEADER`](super::FAULT_HEADER) and an empty body.
#[derive(Debug, Clone, Copy, Default)]
pub struct HttpAnswer;

impl<B: Default, E> FaultAnswer<http::Response<B>, E> for HttpAnswer {
    fn answer(&self, fault: FaultKind, _class: &str) -> Result<http::Response<B>, E> {
        let mut res = http::Response::new(B::default());
        *res.status_mut() = match fault {
            FaultKind::Error => StatusCode::INTERNAL_SERVER_ERROR,
            FaultKind::Abort => StatusCode::BAD_GATEWAY,
            FaultKind::Hang => StatusCode::GATEWAY_TIMEOUT,
        };
        res.headers_mut()
            .insert(FAULT_HEADER, HeaderValue::from_static(fault.as_str()));
        Ok(res)
    }
}

/// Answers struck gRPC calls with a trailers-only response: `grpc-status` 14 (`UNAVAILABLE`)
/// for an error or an abort, 4 (`DEADLINE_EXCEEDED`) for a hang, with a `grpc-message` naming
/// the fault (not the class) and [`FAULT_HEADER`](super::FAULT_HEADER).
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcAnswer;

impl<B: Default, E> FaultAnswer<http::Response<B>, E> for GrpcAnswer {
    fn answer(&self, fault: FaultKind, _class: &str) -> Result<http::Response<B>, E> {
        let mut res = http::Response::new(B::default());
        let headers = res.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        let code = if fault == FaultKind::Hang { "4" } else { "14" };
        headers.insert("grpc-status", HeaderValue::from_static(code));
        // Not the class: class names reach clients only with `expose_class(true)`, and the
        // chaos layer's answer does not know the degrade layer's setting (the HTTP answer
        // names none either).
        let message = match fault {
            FaultKind::Error => "chaos: injected error",
            FaultKind::Abort => "chaos: injected abort",
            FaultKind::Hang => "chaos: injected hang",
        };
        headers.insert("grpc-message", HeaderValue::from_static(message));
        headers.insert(FAULT_HEADER, HeaderValue::from_static(fault.as_str()));
        Ok(res)
    }
}
