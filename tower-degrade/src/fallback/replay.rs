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

/// How a replay went. Non-exhaustive: a `match` on it needs a wildcard arm (read a failure
/// to retry as [`Retry`](Self::Retry)).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Replayed {
    /// Served: the task is done and removed.
    Done,
    /// Failed in a way that may pass later (5xx, 408, 429, gRPC `UNAVAILABLE`, an error, a
    /// panic): retried with backoff. The answer is recorded.
    Retry(String),
    /// Failed as [`Retry`](Self::Retry), and the answer said how long to wait (HTTP
    /// `Retry-After`, gRPC `grpc-retry-pushback-ms`): retried no sooner than that nor than
    /// the backoff would, and at most [`MAX_RETRY_AFTER`] later. The answer is recorded.
    RetryAfter(String, std::time::Duration),
    /// Refused in a way a retry will not change (other 4xx, gRPC `INVALID_ARGUMENT`...): the
    /// task moves to manual review at once with the answer recorded.
    Reject(String),
}

/// The longest wait a replay's answer may ask for ([`Replayed::RetryAfter`]): a day, as
/// [`RetryPolicy::max_interval`](super::RetryPolicy::max_interval).
pub const MAX_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(86_400);

impl Replayed {
    /// A failure to retry: its answer and the least wait it asked for (zero for
    /// [`Retry`](Self::Retry)); `None` for done and rejected.
    pub(crate) fn retried(&self) -> Option<(&str, std::time::Duration)> {
        match self {
            Self::Retry(answer) => Some((answer, std::time::Duration::ZERO)),
            Self::RetryAfter(answer, after) => Some((answer, (*after).min(MAX_RETRY_AFTER))),
            Self::Done | Self::Reject(_) => None,
        }
    }
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
/// HTTP 2xx (and 304) are done; 408, 429 and 5xx are retried; other 4xx and the other 3xx go
/// to manual review (a replay follows no redirect: a login page's is not the work done).
/// For gRPC (`content-type: application/grpc`) the `grpc-status` is read from the headers or
/// the trailers: `OK` is done; `CANCELLED`, `UNKNOWN`, `DEADLINE_EXCEEDED`,
/// `RESOURCE_EXHAUSTED`, `ABORTED`, `INTERNAL` and `UNAVAILABLE` are retried; the rest go to
/// manual review. A retried answer that says when to come back is heeded
/// ([`Replayed::RetryAfter`]): HTTP `Retry-After` in seconds or as a date, gRPC
/// `grpc-retry-pushback-ms`; one that cannot be read is ignored (plain backoff).
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
    let grpc = crate::protocol::is_grpc(res.headers());
    let status = res.status();
    if !grpc {
        return if status.is_success() || status == http::StatusCode::NOT_MODIFIED {
            Replayed::Done
        } else if status.is_redirection() {
            // Not followed, and not known done: an app sends a replay without the caller's
            // session to its login page, and a redirect after a write may or may not mean it
            // was made. A person decides, with where it pointed.
            let to = res.headers().get(http::header::LOCATION);
            let to = to.map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
            Replayed::Reject(match to {
                Some(to) => format!("HTTP {status} to {to} (a replay does not follow redirects)"),
                None => format!("HTTP {status} (a replay does not follow redirects)"),
            })
        } else if status.is_server_error() || status.as_u16() == 408 || status.as_u16() == 429 {
            let answer = format!("HTTP {status}");
            match res.headers().get(http::header::RETRY_AFTER) {
                Some(v) => retry_after(answer, v, retry_after_http(v)),
                None => Replayed::Retry(answer),
            }
        } else {
            Replayed::Reject(format!("HTTP {status}"))
        };
    }
    let status_of = |h: &http::HeaderMap| {
        h.get("grpc-status")
            .and_then(|v| v.to_str().ok()?.parse::<u16>().ok())
    };
    let mut code = status_of(res.headers());
    let mut message = res.headers().get("grpc-message").map(grpc_message);
    let mut pushback = res.headers().get(PUSHBACK).cloned();
    if code.is_none() {
        // The status is in the trailers: read up to them, dropping the messages as they come
        // (a streaming method's replay may answer without end, until the replay's timeout).
        let mut body = std::pin::pin!(res.into_body());
        let mut frames = 0u32;
        loop {
            // Each frame is dropped here, a message as it comes (the body's error and data
            // types need not be `Send`: nothing of them is held across the yield below).
            let trailers = match body.as_mut().frame().await {
                None => break,
                Some(Ok(frame)) => frame.into_trailers().ok(),
                Some(Err(e)) => return Replayed::Retry(format!("gRPC body error: {}", e.into())),
            };
            if let Some(t) = trailers {
                code = status_of(&t);
                message = t.get("grpc-message").map(grpc_message);
                pushback = t.get(PUSHBACK).cloned().or(pushback);
                break;
            }
            // A body that is always ready (an in-process server's endless stream) would never
            // let the replay's timeout, or any other task of this thread, run.
            frames = frames.wrapping_add(1);
            if frames.is_multiple_of(32) {
                tokio::task::yield_now().await;
            }
        }
    }
    let answer = |c: u16| match &message {
        Some(m) => format!("grpc-status {c}: {m}"),
        None => format!("grpc-status {c}"),
    };
    match code {
        Some(0) => Replayed::Done,
        Some(c @ (1 | 2 | 4 | 8 | 10 | 13 | 14)) => match &pushback {
            Some(v) => retry_after(answer(c), v, pushback_ms(v)),
            None => Replayed::Retry(answer(c)),
        },
        Some(c) => Replayed::Reject(answer(c)),
        None => Replayed::Retry(format!("HTTP {status} without a grpc-status")),
    }
}

/// gRPC's retry pushback (gRFC A6): the milliseconds the server asks a client to wait.
const PUSHBACK: &str = "grpc-retry-pushback-ms";

/// A retry that waits `after` when it could be read, with the header in the answer
/// either way (an operator reading manual review sees what the dependency asked).
fn retry_after(
    answer: String,
    value: &http::HeaderValue,
    after: Option<std::time::Duration>,
) -> Replayed {
    let shown = String::from_utf8_lossy(value.as_bytes());
    let shown = shown.trim();
    match after {
        Some(after) => Replayed::RetryAfter(format!("{answer} (asked to wait {shown})"), after),
        None => Replayed::Retry(format!("{answer} (an unreadable wait: {shown:?})")),
    }
}

/// `Retry-After`: delay-seconds, or an HTTP date (a date past is no wait).
fn retry_after_http(v: &http::HeaderValue) -> Option<std::time::Duration> {
    let s = v.to_str().ok()?.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        // Digits past u64 are more than a day: capped.
        return Some(
            s.parse::<u64>()
                .map_or(MAX_RETRY_AFTER, std::time::Duration::from_secs)
                .min(MAX_RETRY_AFTER),
        );
    }
    let at = httpdate::parse_http_date(s).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default()
            .min(MAX_RETRY_AFTER),
    )
}

/// `grpc-retry-pushback-ms`: a non-negative number of milliseconds (a negative one asks not
/// to retry at all, which a kept task cannot do without losing it: read as no wait asked).
fn pushback_ms(v: &http::HeaderValue) -> Option<std::time::Duration> {
    let s = v.to_str().ok()?.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(
        s.parse::<u64>()
            .map_or(MAX_RETRY_AFTER, std::time::Duration::from_millis)
            .min(MAX_RETRY_AFTER),
    )
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
/// `handler` is given the value alone: a replay is at least once, so make its work
/// idempotent by something in the value (as below), or read the task's
/// [idempotency key](crate::task::TasksBuilder::idempotency_key) ([`Task::client_key`]) and
/// the attempt in a [`replay_fn`] of your own, which is given the [`Task`].
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
        // A redirect is not followed, nor taken for the work done (a login page's): review,
        // with where it pointed. A 304 (a conditional request answered) is done.
        assert_eq!(judge(res(304, None)).await, Replayed::Done);
        let login = http::Response::builder()
            .status(303)
            .header("location", "/login")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let judged = judge(login).await;
        assert!(
            matches!(&judged, Replayed::Reject(a) if a.contains("303") && a.contains("/login")),
            "{judged:?}"
        );
        assert!(matches!(judge(res(302, None)).await, Replayed::Reject(a) if a.contains("302")));
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

    /// A gRPC answer of `messages` 1 MiB messages, then trailers with `code`; `live` counts
    /// the messages not yet dropped, and each message asserts, when it is made, that no
    /// earlier one is still held.
    struct Streamed {
        messages: usize,
        size: usize,
        code: &'static str,
        live: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    struct Message(std::sync::Arc<std::sync::atomic::AtomicUsize>, Vec<u8>);

    impl AsRef<[u8]> for Message {
        fn as_ref(&self) -> &[u8] {
            &self.1
        }
    }

    impl Drop for Message {
        fn drop(&mut self) {
            self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    impl Body for Streamed {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            use std::sync::atomic::Ordering::SeqCst;
            if self.messages == usize::MAX {
                return std::task::Poll::Ready(None);
            }
            let frame = if self.messages == 0 {
                self.messages = usize::MAX;
                let mut t = http::HeaderMap::new();
                t.insert("grpc-status", http::HeaderValue::from_static(self.code));
                http_body::Frame::trailers(t)
            } else {
                self.messages -= 1;
                assert_eq!(
                    self.live.fetch_add(1, SeqCst),
                    0,
                    "an earlier message is held"
                );
                let m = Message(self.live.clone(), vec![0; self.size]);
                http_body::Frame::data(Bytes::from_owner(m))
            };
            std::task::Poll::Ready(Some(Ok(frame)))
        }
    }

    #[tokio::test]
    async fn a_grpc_answer_is_read_to_its_trailers_without_keeping_its_messages() {
        // A streaming method's replay: messages, then the status in the trailers. Each
        // message is dropped as it comes (they were all buffered: an endless stream took the
        // host's memory within a second).
        for (code, done) in [("0", true), ("14", false)] {
            let live = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let body = Streamed {
                messages: 64,
                size: 1 << 20,
                code,
                live: live.clone(),
            };
            let res = http::Response::builder()
                .header("content-type", "application/grpc")
                .body(body)
                .unwrap();
            let judged = judge(res).await;
            assert_eq!(judged == Replayed::Done, done, "{judged:?}");
            assert_eq!(live.load(std::sync::atomic::Ordering::SeqCst), 0);
        }
    }

    #[tokio::test]
    async fn an_endless_grpc_answer_lets_the_replay_time_out() {
        // An in-process server's endless stream is always ready: the read never gave the
        // replay's timeout a chance, and held its thread for good. (Real time: a task that is
        // always ready never lets a paused clock advance.)
        let body = Streamed {
            messages: usize::MAX - 1,
            size: 16,
            code: "0",
            live: std::sync::Arc::default(),
        };
        let res = http::Response::builder()
            .header("content-type", "application/grpc")
            .body(body)
            .unwrap();
        let judged = tokio::time::timeout(std::time::Duration::from_millis(50), judge(res)).await;
        assert!(judged.is_err(), "timed out");
    }

    #[tokio::test]
    async fn a_wait_asked_for_is_read_from_retry_after_or_the_grpc_pushback() {
        use std::time::{Duration, SystemTime};
        let with = |status: u16, grpc: Option<&str>, name: &'static str, v: &str| {
            let mut r = res(status, grpc);
            r.headers_mut()
                .insert(name, http::HeaderValue::from_str(v).unwrap());
            r
        };
        let waits = |r: Replayed| match r {
            Replayed::RetryAfter(answer, after) => Some((answer, after)),
            _ => None,
        };
        let (answer, after) = waits(judge(with(429, None, "retry-after", " 120 ")).await).unwrap();
        assert_eq!(after, Duration::from_secs(120));
        assert!(
            answer.contains("429") && answer.contains("asked to wait 120"),
            "{answer}"
        );
        // A date: what is left of it (a second's rounding); one past is no wait.
        let at = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(90));
        let (_, after) = waits(judge(with(503, None, "retry-after", &at)).await).unwrap();
        // (Seconds a loaded host loses between the two are no failure.)
        assert!(
            after > Duration::from_secs(30) && after <= Duration::from_secs(90),
            "{after:?}"
        );
        let past = "Sun, 06 Nov 1994 08:49:37 GMT";
        let (_, after) = waits(judge(with(503, None, "retry-after", past)).await).unwrap();
        assert_eq!(after, Duration::ZERO);
        // More than a day (or than a u64) is a day.
        let huge = "99999999999999999999999";
        let (_, after) = waits(judge(with(429, None, "retry-after", huge)).await).unwrap();
        assert_eq!(after, MAX_RETRY_AFTER);
        // Unreadable: a plain retry, the value in the answer.
        assert!(matches!(
            judge(with(429, None, "retry-after", "soon")).await,
            Replayed::Retry(a) if a.contains("unreadable") && a.contains("soon")
        ));
        // Not on an answer that is not retried.
        assert!(matches!(
            judge(with(400, None, "retry-after", "5")).await,
            Replayed::Reject(_)
        ));
        let (_, after) =
            waits(judge(with(200, Some("14"), "grpc-retry-pushback-ms", "1500")).await).unwrap();
        assert_eq!(after, Duration::from_millis(1500));
        // A negative pushback asks not to retry: a kept task is retried, with no wait asked.
        assert!(matches!(
            judge(with(200, Some("8"), "grpc-retry-pushback-ms", "-1")).await,
            Replayed::Retry(a) if a.contains("unreadable")
        ));
        assert!(matches!(
            judge(with(200, Some("3"), "grpc-retry-pushback-ms", "100")).await,
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
