//! What is kept: a [`Task`] (id, idempotency key, class, attempts, schedule) and its
//! [`Payload`] (a captured HTTP or gRPC request, or a serialized task-API value), encoded as a
//! compact binary record.

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::class::Route;

/// The version byte that starts every encoded record.
const FORMAT: u8 = 1;

/// A kept task's id: 128 bits, ordered by creation time (48 bits of milliseconds since the Unix
/// epoch, a 32-bit per-process sequence, 48 random bits), written as 32 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TaskId(pub u128);

/// `TaskId(` and the 32 hex digits of its [`Display`](fmt::Display), so a logged `{:?}` (a
/// [`CannotKeepKind`](super::CannotKeepKind), say) reads as the id the review API shows.
impl fmt::Debug for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TaskId({self})")
    }
}

impl TaskId {
    /// A new id, later than every id this process made before in the same millisecond.
    pub fn generate() -> TaskId {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let ms = u128::from(now_ms()) & ((1 << 48) - 1);
        let seq = u128::from(SEQ.fetch_add(1, Ordering::Relaxed));
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(ms << 32 | seq);
        let random = u128::from(h.finish()) & ((1 << 48) - 1);
        TaskId(ms << 80 | seq << 48 | random)
    }

    /// When the id was made, in milliseconds since the Unix epoch.
    pub fn created_ms(self) -> u64 {
        (self.0 >> 80) as u64
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// The error for a string that is not a [`TaskId`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidTaskId(String);

impl fmt::Display for InvalidTaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` is not a task id (32 hex digits)", self.0)
    }
}

impl std::error::Error for InvalidTaskId {}

impl FromStr for TaskId {
    type Err = InvalidTaskId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Exactly 32 hex digits: `u128::from_str_radix` would also take a leading `+`.
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(InvalidTaskId(s.chars().take(40).collect()));
        }
        u128::from_str_radix(s, 16)
            .map(TaskId)
            .map_err(|_| InvalidTaskId(s.to_owned()))
    }
}

/// Milliseconds since the Unix epoch, by the wall clock.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64
}

/// The durable queues a task can be in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Queue {
    /// `delayed_retry`: replayed with backoff, then moved to [`Queue::Review`].
    Retry,
    /// `spool`: replayed by the backfill worker when the class is healthy and off-peak.
    Spool,
    /// `manual_review`: drained by a person.
    Review,
    /// `batch_merge`: deltas journaled until the merged write that includes them succeeds.
    Journal,
    /// Tasks dropped from manual review, with who dropped them and why.
    Audit,
}

impl Queue {
    /// Every queue.
    pub const ALL: [Queue; 5] = [
        Queue::Retry,
        Queue::Spool,
        Queue::Review,
        Queue::Journal,
        Queue::Audit,
    ];

    /// The queue's name, as in metrics and store keys.
    pub const fn as_str(self) -> &'static str {
        match self {
            Queue::Retry => "delayed_retry",
            Queue::Spool => "spool",
            Queue::Review => "manual_review",
            Queue::Journal => "batch_merge",
            Queue::Audit => "audit",
        }
    }

    /// The queue a route keeps its calls in, if it keeps them.
    pub const fn for_route(route: Route) -> Option<Queue> {
        match route {
            Route::DelayedRetry => Some(Queue::Retry),
            Route::Spool => Some(Queue::Spool),
            Route::ManualReview => Some(Queue::Review),
            Route::BatchMerge => Some(Queue::Journal),
            _ => None,
        }
    }
}

impl fmt::Display for Queue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A captured HTTP (or gRPC) request: what a replay sends again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpRequest {
    /// The method.
    pub method: String,
    /// The URI (path and query, or absolute).
    pub uri: String,
    /// The captured headers, in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body.
    pub body: Vec<u8>,
}

/// What a kept task replays.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Payload {
    /// A captured HTTP or gRPC request.
    Http(HttpRequest),
    /// A task-API value, serialized by the application (JSON by default).
    Bytes(Vec<u8>),
}

/// A kept task: a diverted call stored durably before it was answered, replayed later.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    id: TaskId,
    key: Option<String>,
    class: String,
    reason: String,
    attempts: u32,
    due_ms: u64,
    deadline_ms: Option<u64>,
    last_answer: Option<String>,
    payload: Payload,
}

impl Task {
    /// A new task with a fresh id, due at once.
    pub fn new(class: impl Into<String>, key: Option<String>, payload: Payload) -> Task {
        let id = TaskId::generate();
        Task {
            id,
            key,
            class: class.into(),
            reason: String::new(),
            attempts: 0,
            due_ms: id.created_ms(),
            deadline_ms: None,
            last_answer: None,
            payload,
        }
    }

    /// The task id.
    pub fn id(&self) -> TaskId {
        self.id
    }

    /// The idempotency key every replay carries: the client's, or the task id.
    pub fn key(&self) -> std::borrow::Cow<'_, str> {
        match &self.key {
            Some(k) => std::borrow::Cow::Borrowed(k),
            None => std::borrow::Cow::Owned(self.id.to_string()),
        }
    }

    /// The idempotency key the client sent, if it sent one.
    pub fn client_key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// The class the call belonged to.
    pub fn class(&self) -> &str {
        &self.class
    }

    /// Why the call was diverted (`breaker_open`, `overload`, ...). A task keeps it when it
    /// is moved to manual review: why it was moved is its [`last_answer`](Self::last_answer())
    /// (the replay's last answer, or that its deadline passed).
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// Replays tried so far.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// When the task was kept, in milliseconds since the Unix epoch.
    pub fn created_ms(&self) -> u64 {
        self.id.created_ms()
    }

    /// When the next replay is due, in milliseconds since the Unix epoch.
    pub fn due_ms(&self) -> u64 {
        self.due_ms
    }

    /// The time after which a delayed retry gives up, if any.
    pub fn deadline_ms(&self) -> Option<u64> {
        self.deadline_ms
    }

    /// The last answer a replay got (or a person's reason for dropping it).
    pub fn last_answer(&self) -> Option<&str> {
        self.last_answer.as_deref()
    }

    /// What the task replays.
    pub fn payload(&self) -> &Payload {
        &self.payload
    }

    pub(crate) fn with_reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = reason.into();
        self
    }

    /// Due at `due_ms` (by the router's clock, which the worker compares against).
    pub(crate) fn with_due(mut self, due_ms: u64) -> Self {
        self.due_ms = due_ms;
        self
    }

    pub(crate) fn with_deadline(mut self, deadline_ms: Option<u64>) -> Self {
        self.deadline_ms = deadline_ms;
        self
    }

    /// A replay failed with `answer`: count it and set when the next is due.
    pub(crate) fn failed(&mut self, answer: String, next_due_ms: u64) {
        self.attempts = self.attempts.saturating_add(1);
        self.last_answer = Some(answer);
        self.due_ms = next_due_ms;
    }

    pub(crate) fn set_answer(&mut self, answer: String) {
        self.last_answer = Some(answer);
    }

    /// A person asked for a replay now: attempts start again.
    pub(crate) fn requeued(&mut self, now_ms: u64) {
        self.attempts = 0;
        self.due_ms = now_ms;
    }

    /// The record as stored: a version byte, then the fields (postcard).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.payload_len());
        out.push(FORMAT);
        // Serializing plain owned data into a Vec cannot fail.
        postcard::to_io(self, &mut out).expect("a task serializes");
        out
    }

    fn payload_len(&self) -> usize {
        match &self.payload {
            Payload::Http(r) => {
                r.uri.len()
                    + r.body.len()
                    + r.headers
                        .iter()
                        .map(|(n, v)| n.len() + v.len() + 2)
                        .sum::<usize>()
            }
            Payload::Bytes(b) => b.len(),
        }
    }

    /// Read a stored record.
    pub fn decode(bytes: &[u8]) -> Result<Task, DecodeError> {
        match bytes.split_first() {
            Some((&FORMAT, rest)) => {
                postcard::from_bytes(rest).map_err(|e| DecodeError(e.to_string()))
            }
            Some((v, _)) => Err(DecodeError(format!(
                "record format {v}, this version reads format {FORMAT}"
            ))),
            None => Err(DecodeError("empty record".to_owned())),
        }
    }
}

/// A stored record that could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(String);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unreadable task record: {}", self.0)
    }
}

impl std::error::Error for DecodeError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_ordered_by_creation_and_round_trip_as_hex() {
        let a = TaskId::generate();
        let b = TaskId::generate();
        assert!(a < b);
        assert_eq!(a.to_string().parse::<TaskId>(), Ok(a));
        assert!("xyz".parse::<TaskId>().is_err());
        // Debug shows the same hex, as logs and the review API do.
        assert_eq!(
            format!("{:?}", TaskId(0xab)),
            "TaskId(000000000000000000000000000000ab)"
        );
        assert!(a.created_ms().abs_diff(now_ms()) < 60_000);
    }

    #[test]
    fn a_task_round_trips_and_a_foreign_record_is_an_error() {
        let t = Task::new(
            "browse",
            Some("k-1".into()),
            Payload::Http(HttpRequest {
                method: "POST".into(),
                uri: "/log?x=1".into(),
                headers: vec![("content-type".into(), b"application/json".to_vec())],
                body: b"{}".to_vec(),
            }),
        );
        let bytes = t.encode();
        assert_eq!(Task::decode(&bytes), Ok(t));
        assert!(
            Task::decode(&[9, 1, 2])
                .unwrap_err()
                .to_string()
                .contains("format 9")
        );
        assert!(Task::decode(&[]).is_err());
        assert!(Task::decode(&[FORMAT, 0xff]).is_err());
    }
}
