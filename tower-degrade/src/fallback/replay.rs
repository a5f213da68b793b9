//! Replaying a kept task: the [`Replay`] trait, the HTTP / gRPC replay through a tower service
//! ([`HttpReplay`]), and a replay from a closure ([`replay_fn`]) for the task API.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use http::HeaderName;
use http_body::Body;
use http_body_util::BodyExt;
use tower::{Service, ServiceExt};

use super::record::{Payload, Task};
use crate::error::BoxError;

/// How a replay went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replayed {
    /// Served: the task is done and removed.
    Done,
    /// Failed in a way that may pass later (5xx, 408, 429, gRPC `UNAVAILABLE`, an error, a
    /// panic): retried with backoff. The answer is recorded.
    Retry(String),
    /// Refused in a way a retry will not change (other 4xx, gRPC `INVALID_ARGUMENT`...): the
    /// task moves to manual review at once with the answer recorded.
    Reject(String),
}

/// The future of a [`Replay`].
pub type ReplayFuture = Pin<Box<dyn Future<Output = Replayed> + Send>>;

/// Sends a kept task again. `attempt` counts from 1.
pub trait Replay: Send + Sync + 'static {
    /// Replay `task`.
    fn replay(&self, task: &Task, attempt: u32) -> ReplayFuture;

    /// The classes this replay names, if it names any ([`ReplayByClass`]): the router's
    /// builder checks that the degrader knows each. None by default.
    fn classes(&self) -> Vec<&str> {
        Vec::new()
    }
}

/// Replays captured HTTP and gRPC requests through a tower service: give it the application
/// **without** the degrade layer (a replay must not be diverted again; the backfill worker
/// already waits for the class to be healthy). Each replay carries the idempotency key and
/// the attempt number ([`REPLAY_HEADER`](super::REPLAY_HEADER)).
///
/// HTTP 2xx and 3xx are done; 408, 429 and 5xx are retried; other 4xx go to manual review.
/// For gRPC (`content-type: application/grpc`) the `grpc-status` is read from the headers or
/// the trailers: `OK` is done; `CANCELLED`, `UNKNOWN`, `DEADLINE_EXCEEDED`,
/// `RESOURCE_EXHAUSTED`, `ABORTED`, `INTERNAL` and `UNAVAILABLE` are retried; the rest go to
/// manual review.
pub struct HttpReplay<S, B> {
    service: S,
    key_header: HeaderName,
    _body: std::marker::PhantomData<fn() -> B>,
}

impl<S: Clone, B> Clone for HttpReplay<S, B> {
    fn clone(&self) -> Self {
        Self::new(self.service.clone(), self.key_header.clone())
    }
}

impl<S, B> fmt::Debug for HttpReplay<S, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpReplay")
            .field("key_header", &self.key_header)
            .finish_non_exhaustive()
    }
}

impl<S, B> HttpReplay<S, B> {
    /// Replay through `service`, with the idempotency key in `key_header` (use the capture's,
    /// [`Capture::idempotency`](super::Capture::idempotency)).
    pub fn new(service: S, key_header: HeaderName) -> Self {
        Self {
            service,
            key_header,
            _body: std::marker::PhantomData,
        }
    }
}

impl<S, B, RB> Replay for HttpReplay<S, B>
where
    S: Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + Sync + 'static,
    S::Future: Send,
    S::Error: Into<BoxError> + Send,
    B: From<Bytes> + Send + 'static,
    RB: Body + Send + 'static,
    RB::Data: Send,
    RB::Error: Into<BoxError>,
{
    fn replay(&self, task: &Task, attempt: u32) -> ReplayFuture {
        let Payload::Http(rec) = task.payload() else {
            return Box::pin(std::future::ready(Replayed::Reject(
                "not an HTTP task: replay it with the task API's handler".to_owned(),
            )));
        };
        let req = match rec.to_request::<B>(&self.key_header, &task.key(), attempt) {
            Ok(r) => r,
            Err(e) => {
                let answer = format!("the kept request cannot be rebuilt: {e}");
                return Box::pin(std::future::ready(Replayed::Reject(answer)));
            }
        };
        let svc = self.service.clone();
        Box::pin(async move {
            match svc.oneshot(req).await {
                Ok(res) => judge(res).await,
                Err(e) => Replayed::Retry(format!("error: {}", e.into())),
            }
        })
    }
}

/// A `grpc-message` as a person reads it: percent-decoded (the gRPC wire format encodes
/// bytes outside printable ASCII, and `%`), invalid UTF-8 replaced.
fn grpc_message(v: &http::HeaderValue) -> String {
    percent_encoding::percent_decode(v.as_bytes())
        .decode_utf8_lossy()
        .into_owned()
}

async fn judge<RB>(res: http::Response<RB>) -> Replayed
where
    RB: Body,
    RB::Error: Into<BoxError>,
{
    let grpc = super::capture::grpc_rest(res.headers()).is_some();
    let status = res.status();
    if !grpc {
        return if status.is_success() || status.is_redirection() {
            Replayed::Done
        } else if status.is_server_error() || status.as_u16() == 408 || status.as_u16() == 429 {
            Replayed::Retry(format!("HTTP {status}"))
        } else {
            Replayed::Reject(format!("HTTP {status}"))
        };
    }
    let mut code = res
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok()?.parse::<u16>().ok());
    let mut message = res.headers().get("grpc-message").map(grpc_message);
    if code.is_none() {
        match res.into_body().collect().await {
            Ok(c) => {
                if let Some(t) = c.trailers() {
                    code = t
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok()?.parse::<u16>().ok());
                    message = t.get("grpc-message").map(grpc_message);
                }
            }
            Err(e) => return Replayed::Retry(format!("gRPC body error: {}", e.into())),
        }
    }
    let answer = |c: u16| match &message {
        Some(m) => format!("grpc-status {c}: {m}"),
        None => format!("grpc-status {c}"),
    };
    match code {
        Some(0) => Replayed::Done,
        Some(c @ (1 | 2 | 4 | 8 | 10 | 13 | 14)) => Replayed::Retry(answer(c)),
        Some(c) => Replayed::Reject(answer(c)),
        None => Replayed::Retry(format!("HTTP {status} without a grpc-status")),
    }
}

/// A [`Replay`] from a closure: for task-API payloads ([`Payload::Bytes`]) or any custom
/// transport.
///
/// ```
/// use tower_degrade::fallback::{Payload, Replayed, replay_fn};
///
/// let replay = replay_fn(|task, _attempt| {
///     let ok = matches!(task.payload(), Payload::Bytes(b) if !b.is_empty());
///     async move { if ok { Replayed::Done } else { Replayed::Reject("empty".into()) } }
/// });
/// # drop(replay);
/// ```
pub fn replay_fn<F, Fut>(f: F) -> ReplayFn<F>
where
    F: Fn(&Task, u32) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Replayed> + Send + 'static,
{
    ReplayFn(f)
}

/// See [`replay_fn`].
#[derive(Clone)]
pub struct ReplayFn<F>(F);

impl<F> fmt::Debug for ReplayFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplayFn").finish_non_exhaustive()
    }
}

impl<F, Fut> Replay for ReplayFn<F>
where
    F: Fn(&Task, u32) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Replayed> + Send + 'static,
{
    fn replay(&self, task: &Task, attempt: u32) -> ReplayFuture {
        Box::pin((self.0)(task, attempt))
    }
}

/// A [`Replay`] for task-API payloads kept by
/// [`TasksBuilder::keep`](crate::task::TasksBuilder::keep): each kept value is read back
/// (JSON) and given to `handler`; `Ok` is done, `Err` is retried. A payload that does not
/// read back as a `T` goes to manual review.
///
/// It reads *every* task it is given as a `T`. When a router keeps tasks of more than one
/// type (or HTTP calls beside tasks), give each class its own replay with [`ReplayByClass`]:
/// JSON of one type can read back as another (serde skips fields it does not know), and a
/// stock sync would be replayed as an email.
///
/// ```
/// use tower_degrade::BoxError;
/// use tower_degrade::fallback::replay_task;
///
/// #[derive(serde::Deserialize)]
/// struct Refund { order: u64, cents: i64 }
///
/// let replay = replay_task(|refund: Refund| async move {
///     // Call the payment provider with the idempotency key `refund-{order}`.
///     Ok::<_, BoxError>(())
/// });
/// # drop(replay);
/// ```
pub fn replay_task<T, F, Fut, E>(
    handler: F,
) -> ReplayFn<impl Fn(&Task, u32) -> ReplayFuture + Send + Sync + 'static>
where
    T: serde::de::DeserializeOwned + Send + 'static,
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: fmt::Display,
{
    ReplayFn(move |task: &Task, _attempt: u32| -> ReplayFuture {
        let value = match task.payload() {
            Payload::Bytes(b) => serde_json::from_slice::<T>(b)
                .map_err(|e| format!("the kept task does not read back: {e}")),
            Payload::Http(_) => Err("an HTTP task: replay it with HttpReplay".to_owned()),
        };
        match value {
            Ok(v) => {
                let fut = handler(v);
                Box::pin(async move {
                    match fut.await {
                        Ok(()) => Replayed::Done,
                        Err(e) => Replayed::Retry(e.to_string()),
                    }
                })
            }
            Err(e) => Box::pin(std::future::ready(Replayed::Reject(e))),
        }
    })
}

/// A [`Replay`] that hands each kept task to the replay of its class: one router for tasks of
/// several types, or for HTTP calls and tasks. A task of a class with no replay (and no
/// [`otherwise`](Self::otherwise)) goes to manual review, never to another class's handler.
/// The router's builder refuses a class the degrader does not know.
///
/// ```
/// use tower_degrade::BoxError;
/// use tower_degrade::fallback::{ReplayByClass, replay_task};
///
/// #[derive(serde::Deserialize)]
/// struct Email { order: u64 }
/// #[derive(serde::Deserialize)]
/// struct StockSync { sku: String, quantity: i64 }
///
/// let replay = ReplayByClass::new()
///     .class("order_email", replay_task(|e: Email| async move { Ok::<_, BoxError>(()) }))
///     .class("stock_sync", replay_task(|s: StockSync| async move { Ok::<_, BoxError>(()) }));
/// # drop(replay);
/// ```
#[derive(Clone, Default)]
pub struct ReplayByClass {
    classes: std::collections::HashMap<String, std::sync::Arc<dyn Replay>>,
    otherwise: Option<std::sync::Arc<dyn Replay>>,
}

impl fmt::Debug for ReplayByClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplayByClass")
            .field("classes", &self.classes.keys().collect::<Vec<_>>())
            .field("otherwise", &self.otherwise.is_some())
            .finish()
    }
}

impl ReplayByClass {
    /// No class yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replay `class`'s tasks with `replay`.
    pub fn class(mut self, class: &str, replay: impl Replay) -> Self {
        self.classes
            .insert(class.to_owned(), std::sync::Arc::new(replay));
        self
    }

    /// Replay the tasks of every other class with `replay` (an [`HttpReplay`] for the HTTP
    /// routes, say).
    pub fn otherwise(mut self, replay: impl Replay) -> Self {
        self.otherwise = Some(std::sync::Arc::new(replay));
        self
    }
}

impl Replay for ReplayByClass {
    fn replay(&self, task: &Task, attempt: u32) -> ReplayFuture {
        match self.classes.get(task.class()).or(self.otherwise.as_ref()) {
            Some(replay) => replay.replay(task, attempt),
            None => Box::pin(std::future::ready(Replayed::Reject(format!(
                "no replay for class `{}` (ReplayByClass)",
                task.class()
            )))),
        }
    }

    fn classes(&self) -> Vec<&str> {
        let mut out: Vec<&str> = self.classes.keys().map(String::as_str).collect();
        out.sort_unstable();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    fn res(status: u16, grpc: Option<&str>) -> http::Response<Full<Bytes>> {
        let mut b = http::Response::builder().status(status);
        if let Some(code) = grpc {
            b = b
                .header("content-type", "application/grpc")
                .header("grpc-status", code);
        }
        b.body(Full::new(Bytes::new())).unwrap()
    }

    #[tokio::test]
    async fn answers_are_judged_done_retry_or_review() {
        assert_eq!(judge(res(200, None)).await, Replayed::Done);
        assert_eq!(judge(res(302, None)).await, Replayed::Done);
        assert!(matches!(judge(res(503, None)).await, Replayed::Retry(a) if a.contains("503")));
        assert!(matches!(judge(res(429, None)).await, Replayed::Retry(_)));
        assert!(matches!(judge(res(422, None)).await, Replayed::Reject(a) if a.contains("422")));
        assert_eq!(judge(res(200, Some("0"))).await, Replayed::Done);
        assert!(matches!(
            judge(res(200, Some("14"))).await,
            Replayed::Retry(_)
        ));
        assert!(matches!(
            judge(res(200, Some("3"))).await,
            Replayed::Reject(_)
        ));
    }

    #[tokio::test]
    async fn a_grpc_message_is_recorded_decoded() {
        let mut r = res(200, Some("13"));
        r.headers_mut().insert(
            "grpc-message",
            http::HeaderValue::from_static("Unexpected%20EOF%20decoding%20stream%2E %E2%9C%93 %ZZ"),
        );
        assert_eq!(
            judge(r).await,
            Replayed::Retry("grpc-status 13: Unexpected EOF decoding stream. \u{2713} %ZZ".into())
        );
    }
}
