//! Protocols: how a call's outcome is classified and how a degraded call is answered.
//!
//! * [`Generic`] for any service: the outcome comes from a [`ClassifyOutcome`] (by default
//!   `Ok` is a success and `Err` an error), and a degraded call fails with a
//!   [`Degraded`] error inside a [`BoxError`].
//! * [`Http`] for `http::Response` services: the outcome comes from a
//!   [`tower_http::classify::ClassifyResponse`] (HTTP 5xx by default), and a degraded call is
//!   *answered* with 503 and `Retry-After`, with the [`Degraded`] value
//!   in the response extensions. Response and error types stay the inner service's.
//! * [`Grpc`] for gRPC: the status comes from the headers **or the trailers** (recorded when
//!   the body ends), and a degraded call gets a trailers-only `UNAVAILABLE` response.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderMap, HeaderValue, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower_http::classify::{
    ClassifiedResponse, ClassifyEos, ClassifyResponse, GrpcCode, GrpcErrorsAsFailures,
    GrpcFailureClass, NeverClassifyEos, ServerErrorsAsFailures, ServerErrorsFailureClass,
};

use crate::BoxError;
use crate::degrader::Inner;
use crate::directive::Reason;
use crate::error::Degraded;
use crate::window::{Outcome, Shard};

// ===== Recording =====

/// The accounting of one admitted call: it holds the call's in-flight slot and records the
/// outcome and latency when finished. Dropped unfinished (the call was cancelled), it records
/// `cancelled`, frees the slot and gives back a half-open probe permit.
pub struct Recording {
    shard: Arc<Shard>,
    class: u16,
    start: u64,
    probe: Option<Arc<Inner>>,
    done: bool,
}

impl std::fmt::Debug for Recording {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recording")
            .field("class", &self.class)
            .field("probe", &self.probe.is_some())
            .finish()
    }
}

impl Recording {
    #[inline]
    pub(crate) fn start(shard: Arc<Shard>, class: u16, probe: Option<Arc<Inner>>) -> Self {
        shard.begin(usize::from(class));
        Self {
            start: shard.timer.start(),
            shard,
            class,
            probe,
            done: false,
        }
    }

    /// Time the call from now (after a policy's delay, so the delay is not its latency).
    pub(crate) fn restart(&mut self) {
        self.start = self.shard.timer.start();
    }

    /// Record the call's outcome and latency, and free its in-flight slot.
    #[inline]
    pub fn finish(mut self, outcome: Outcome) {
        self.done = true;
        let latency = self.shard.timer.elapsed(self.start);
        self.shard.end(usize::from(self.class), outcome, latency);
    }

    /// The class name (for errors on cold paths).
    pub(crate) fn class_name(&self) -> Arc<str> {
        self.shard.name(usize::from(self.class))
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        if !self.done {
            self.shard
                .end(usize::from(self.class), Outcome::Cancelled, Duration::ZERO);
            if let Some(inner) = &self.probe {
                inner.cells[usize::from(self.class)]
                    .probes
                    .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            }
        }
    }
}

// ===== Protocol =====

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

/// The protocol for any service: errors become [`BoxError`], degraded calls fail with
/// [`Degraded`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Generic<C = OkIsSuccess> {
    classify: C,
}

impl Generic {
    /// `Ok` is a success, `Err` an error.
    pub const fn new() -> Self {
        Self {
            classify: OkIsSuccess,
        }
    }
}

impl<C> Generic<C> {
    /// Classify outcomes with `classify`.
    pub const fn with_classifier(classify: C) -> Self {
        Self { classify }
    }
}

impl<Res, E, C> Protocol<Res, E> for Generic<C>
where
    E: Into<BoxError>,
    C: ClassifyOutcome<Res, E>,
{
    type Response = Res;
    type Error = BoxError;

    #[inline]
    fn on_response(&self, result: Result<Res, E>, rec: Recording) -> Result<Res, BoxError> {
        rec.finish(self.classify.classify(&result));
        result.map_err(Into::into)
    }

    fn on_fallback(&self, result: Result<Res, E>) -> Result<Res, BoxError> {
        result.map_err(Into::into)
    }

    fn on_degraded(&self, degraded: Degraded) -> Result<Res, BoxError> {
        Err(Box::new(degraded))
    }

    fn on_ready_error(&self, error: E) -> BoxError {
        error.into()
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

/// The protocol for HTTP services (`http::Response<B>`), built on a tower-http response
/// classifier that decides from the response head (5xx by default). The response type is
/// unchanged; degraded calls are answered with an empty `B::default()` body: 503 +
/// `Retry-After` (504 for a timeout).
#[derive(Debug, Clone, Default)]
pub struct Http<C = ServerErrorsAsFailures> {
    classifier: C,
}

impl Http {
    /// 5xx responses are failures (504 a timeout).
    pub fn new() -> Self {
        Self {
            classifier: ServerErrorsAsFailures::new(),
        }
    }
}

impl<C> Http<C> {
    /// Use a custom tower-http classifier that decides from the response head.
    pub fn with_classifier(classifier: C) -> Self {
        Self { classifier }
    }
}

/// Build the degraded answer: 503 / 504 with `Retry-After`, or a gRPC trailers-only response
/// with `grpc-status` 14 / 4, the [`Degraded`] value in the extensions.
fn degraded_response<T>(d: Degraded, grpc: bool, body: T) -> http::Response<T> {
    let timeout = d.reason() == Reason::Timeout;
    let mut res = http::Response::new(body);
    if !grpc {
        *res.status_mut() = if timeout {
            StatusCode::GATEWAY_TIMEOUT
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
    }
    let headers = res.headers_mut();
    if grpc {
        let code = if timeout { "4" } else { "14" };
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", HeaderValue::from_static(code));
        if let Ok(v) = HeaderValue::from_str(&d.to_string()) {
            headers.insert("grpc-message", v);
        }
        if let Some(ra) = d.retry_after() {
            headers.insert(
                "grpc-retry-pushback-ms",
                HeaderValue::from(ra.as_millis() as u64),
            );
        }
    } else if let Some(ra) = d.retry_after() {
        let secs = ra.as_secs() + u64::from(ra.subsec_nanos() > 0);
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    }
    res.extensions_mut().insert(d);
    res
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
        match &result {
            Ok(res) => match self.classifier.clone().classify_response(res) {
                ClassifiedResponse::Ready(Ok(())) => rec.finish(Outcome::Success),
                ClassifiedResponse::Ready(Err(f)) => rec.finish(f.outcome()),
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
        Ok(degraded_response(degraded, false, B::default()))
    }

    fn on_ready_error(&self, error: E) -> E {
        error
    }
}

/// The protocol for gRPC services (and any classifier that needs the end of the stream): the
/// status is read from the headers or, when absent there, from the **trailers**, so the outcome
/// is recorded when the response body ends ([`DegradeBody`]).
///
/// By default `UNAVAILABLE`, `DEADLINE_EXCEEDED` (a timeout), `RESOURCE_EXHAUSTED`, `INTERNAL`
/// and `UNKNOWN` are failures and every other status a success (they are the caller's fault);
/// degraded calls get a trailers-only `grpc-status: 14` (`UNAVAILABLE`, or 4 for a timeout).
#[derive(Debug, Clone)]
pub struct Grpc<C = GrpcErrorsAsFailures> {
    classifier: C,
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
        Grpc { classifier: c }
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
        Self { classifier }
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
            ClassifiedResponse::RequiresEos(eos) => Some((rec, eos)),
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
        Ok(degraded_response(degraded, true, DegradeBody::empty()))
    }

    fn on_ready_error(&self, error: E) -> E {
        error
    }
}

pin_project! {
    /// The response body of an [`Http`] service: the inner body, or empty for a degraded
    /// answer. When the outcome depends on trailers (gRPC), it is recorded at end of stream.
    pub struct DegradeBody<B, C: ClassifyResponse> {
        #[pin]
        inner: Option<B>,
        eos: Option<(Recording, C::ClassifyEos)>,
    }
}

impl<B, C: ClassifyResponse> std::fmt::Debug for DegradeBody<B, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DegradeBody")
            .field("empty", &self.inner.is_none())
            .field("awaiting_eos", &self.eos.is_some())
            .finish()
    }
}

impl<B, C: ClassifyResponse> DegradeBody<B, C> {
    fn empty() -> Self {
        Self {
            inner: None,
            eos: None,
        }
    }

    /// Whether this body belongs to a degraded answer.
    pub fn is_degraded(&self) -> bool {
        self.inner.is_none()
    }
}

impl<B, C> Body for DegradeBody<B, C>
where
    B: Body,
    C: ClassifyResponse,
    C::FailureClass: FailureOutcome,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let Some(inner) = this.inner.as_pin_mut() else {
            return Poll::Ready(None);
        };
        let frame = std::task::ready!(inner.poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(trailers) = f.trailers_ref() {
                    finish_eos(this.eos, Some(trailers));
                }
            }
            Some(Err(_)) => {
                if let Some((rec, _)) = this.eos.take() {
                    rec.finish(Outcome::Error);
                }
            }
            None => finish_eos(this.eos, None),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or(SizeHint::with_exact(0), |b| b.size_hint())
    }
}

/// Classify the end of stream and finish the recording, if it still waits for it.
fn finish_eos<E: ClassifyEos>(eos: &mut Option<(Recording, E)>, trailers: Option<&HeaderMap>)
where
    E::FailureClass: FailureOutcome,
{
    if let Some((rec, classify)) = eos.take() {
        rec.finish(match classify.classify_eos(trailers) {
            Ok(()) => Outcome::Success,
            Err(f) => f.outcome(),
        });
    }
}
