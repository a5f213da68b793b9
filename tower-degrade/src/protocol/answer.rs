//! The answers the layer makes itself, for HTTP and gRPC clients.

use http::{HeaderName, HeaderValue, StatusCode, header};

use crate::error::Degraded;
use crate::gate::Reason;

/// The header on every answer the layer makes itself, naming why the service was not called:
/// `x-degrade-reason: breaker_open` (see [`Reason::as_str`]). It tells a degraded answer from
/// the application's own 503.
pub const REASON_HEADER: HeaderName = HeaderName::from_static("x-degrade-reason");

/// The header naming the call's class, on the layer's own answers, when the protocol is told
/// to expose class names (`Http::expose_class`, `Grpc::expose_class`; off by default).
pub const CLASS_HEADER: HeaderName = HeaderName::from_static("x-degrade-class");

/// The header saying what was wrong with the client's own request, on the layer's HTTP
/// answers that refuse it for that (`400` `malformed`, `413` `too_large`, `422`
/// `key_reused`): `header
/// \`idempotency-key\`: longer than 255 bytes` ([`Degraded::detail`]). gRPC clients get it in
/// the `grpc-message`.
pub const DETAIL_HEADER: HeaderName = HeaderName::from_static("x-degrade-detail");

const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
const GRPC_PUSHBACK: HeaderName = HeaderName::from_static("grpc-retry-pushback-ms");

/// Build the layer's own answer: HTTP 503 (504 for a timeout, 413 for a call too large to
/// keep) with `Retry-After`, or a gRPC trailers-only response with `grpc-status` 14 (4 for a
/// timeout, 8 `RESOURCE_EXHAUSTED` for a call too large to keep) and
/// `grpc-retry-pushback-ms`; both with [`REASON_HEADER`], and the [`Degraded`] value in the
/// extensions.
pub(crate) fn degraded_response<T>(
    d: Degraded,
    grpc: bool,
    expose_class: bool,
    body: T,
) -> http::Response<T> {
    let mut res = http::Response::new(body);
    let headers = res.headers_mut();
    headers.insert(REASON_HEADER, HeaderValue::from_static(d.reason().as_str()));
    if expose_class && let Ok(v) = HeaderValue::from_str(d.class()) {
        headers.insert(CLASS_HEADER, v);
    }
    if grpc {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        let code = match d.reason() {
            Reason::Timeout => "4",
            Reason::TooLarge => "8",
            Reason::Malformed => "3",
            _ => "14",
        };
        headers.insert(GRPC_STATUS, HeaderValue::from_static(code));
        // gRPC percent-encodes its message: a `%` of the message's own is `%25`.
        let mut message = d.client_message(expose_class);
        if message.contains('%') {
            message = message.replace('%', "%25");
        }
        if let Ok(v) = HeaderValue::from_str(&message) {
            headers.insert(GRPC_MESSAGE, v);
        }
        if let Some(ra) = d.retry_after() {
            headers.insert(GRPC_PUSHBACK, HeaderValue::from(ra.as_millis() as u64));
        }
    } else {
        *res.status_mut() = match d.reason() {
            Reason::Timeout => StatusCode::GATEWAY_TIMEOUT,
            // The client's own request: a 4xx, which no client retries as is.
            Reason::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Reason::Malformed => StatusCode::BAD_REQUEST,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        if let Some(v) = d.detail().and_then(|d| HeaderValue::from_str(d).ok()) {
            res.headers_mut().insert(DETAIL_HEADER, v);
        }
        if let Some(ra) = d.retry_after() {
            // Whole seconds, rounded up: a client told "0" would come back at once.
            let secs = ra.as_secs() + u64::from(ra.subsec_nanos() > 0);
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
    }
    res.extensions_mut().insert(d);
    res
}

/// The header naming the id of a kept task, on the `202 Accepted` answer of a call that was
/// stored to be replayed later (see [`fallback`](crate::fallback)).
pub const TASK_ID_HEADER: HeaderName = HeaderName::from_static("x-degrade-task-id");

/// The header naming the route that kept a call (`spool`, `delayed_retry`, ...).
pub const ROUTE_HEADER: HeaderName = HeaderName::from_static("x-degrade-route");

/// The answer to a call that was kept durably: HTTP `202 Accepted`, or for gRPC a
/// trailers-only response with `grpc-status` 6 (`ALREADY_EXISTS`: the work now exists on the
/// server; no standard retry policy retries it) and a message naming the task; both with
/// [`TASK_ID_HEADER`], [`ROUTE_HEADER`] and [`REASON_HEADER`].
#[cfg(feature = "fallback")]
pub(crate) fn kept_response<T>(
    id: &str,
    route: crate::class::Route,
    reason: Reason,
    grpc: bool,
    body: T,
) -> http::Response<T> {
    let mut res = task_answer(
        id,
        reason.as_str(),
        StatusCode::ACCEPTED,
        grpc.then(|| {
            (
                "6",
                format!("accepted: kept as task {id} ({route}); it will be replayed"),
            )
        }),
        body,
    );
    res.headers_mut()
        .insert(ROUTE_HEADER, HeaderValue::from_static(route.as_str()));
    res
}

/// The answer to a call whose idempotency key is already the key of a kept task made from a
/// different request (method, target or body): HTTP `422 Unprocessable Content`, or for gRPC
/// `grpc-status` 9 (`FAILED_PRECONDITION`), with the kept task's id in [`TASK_ID_HEADER`] and
/// `x-degrade-reason: key_reused` (draft-ietf-httpapi-idempotency-key-header: a key reused
/// with another payload is refused, not taken for the first call).
#[cfg(feature = "fallback")]
pub(crate) fn key_reused_response<T>(id: &str, grpc: bool, body: T) -> http::Response<T> {
    let why = format!(
        "idempotency key already used by task {id} for a different request (method, target or \
         body)"
    );
    let mut res = task_answer(
        id,
        "key_reused",
        StatusCode::UNPROCESSABLE_ENTITY,
        grpc.then(|| ("9", why.clone())),
        body,
    );
    if !grpc && let Ok(v) = HeaderValue::from_str(&why) {
        res.headers_mut().insert(DETAIL_HEADER, v);
    }
    res
}

/// An answer about a kept task: [`TASK_ID_HEADER`] and [`REASON_HEADER`], and either the HTTP
/// `status` or, given `grpc` = (status code, message), a trailers-only gRPC answer.
#[cfg(feature = "fallback")]
fn task_answer<T>(
    id: &str,
    reason: &'static str,
    status: StatusCode,
    grpc: Option<(&'static str, String)>,
    body: T,
) -> http::Response<T> {
    let mut res = http::Response::new(body);
    let headers = res.headers_mut();
    if let Ok(v) = HeaderValue::from_str(id) {
        headers.insert(TASK_ID_HEADER, v);
    }
    headers.insert(REASON_HEADER, HeaderValue::from_static(reason));
    match grpc {
        Some((code, message)) => {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            headers.insert(GRPC_STATUS, HeaderValue::from_static(code));
            if let Ok(v) = HeaderValue::from_str(&message) {
                headers.insert(GRPC_MESSAGE, v);
            }
        }
        None => *res.status_mut() = status,
    }
    res
}

#[cfg(all(test, feature = "fallback"))]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::class::Route;

    #[test]
    fn a_refusal_for_the_request_itself_says_what_is_wrong_and_grpc_escapes_its_percent() {
        let d = Degraded::new(
            Arc::from("shop"),
            Arc::from("orders"),
            Reason::Malformed,
            Route::BatchMerge,
            None,
        )
        .with_detail("qty: 50% off is not a number");
        let http = degraded_response(d.clone(), false, false, ());
        assert_eq!(http.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            http.headers()[DETAIL_HEADER],
            "qty: 50% off is not a number"
        );
        let grpc = degraded_response(d, true, false, ());
        assert_eq!(grpc.headers()[GRPC_STATUS], "3");
        let message = grpc.headers()[GRPC_MESSAGE].to_str().unwrap();
        assert!(
            message.ends_with("(fallback route `batch_merge`): qty: 50%25 off is not a number"),
            "{message}"
        );
        assert!(!grpc.headers().contains_key(DETAIL_HEADER));
    }
}
