//! `batch_merge`: deltas acknowledged once journaled, merged in memory by key, flushed as one
//! write every N ms or M items (the seed's "local memory cache + batched merged writes").

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceExt};

use super::record::{HttpRequest, Payload, Queue, Task, TaskId};
use super::replay::{ReplayFuture, Replayed};
use super::schedule::{Clock, RetryPolicy};
use super::store::{Op, Store, StoreError};
use crate::error::BoxError;
use crate::every::{Every, LOG_EVERY};
use crate::gate::Reason;

/// One merged write: every key's merged value, and an id that is the same if the write is
/// retried, even after a restart (a sink can use it to ignore a write it already applied).
#[derive(Debug, Clone, PartialEq)]
pub struct Batch<V> {
    /// The batch id.
    pub id: TaskId,
    /// Each key with its merged value, in no set order. A key is there twice only when a
    /// batch that could not be sealed met newer deltas of its key that the merge panicked
    /// combining with it: the older value first.
    pub items: Vec<(String, V)>,
}

type Extract<V> = Arc<dyn Fn(&HttpRequest) -> Result<(String, V), String> + Send + Sync>;
type Merge<V> = Arc<dyn Fn(&mut V, V) + Send + Sync>;

/// The `batch_merge` route of one class: a key and a delta read from each diverted call, a
/// merge function, and a sink [`Service`] that takes a [`Batch`].
///
/// Each delta is journaled in the store and answered `202 Accepted`; deltas are merged in
/// memory by key and flushed as one write every `flush_every` (default 100 ms) or when
/// `max_items` (default 1,000) deltas wait. Before the write the batch is sealed in the store
/// (its deltas replaced by the merged batch, in one commit), so a crash at any point replays
/// either the deltas or the same batch with the same id. A failed write (an error, a timeout
/// or a panic of the sink) is retried with the router's backoff; after `max_attempts`
/// (default 5) it moves to the spool and is backfilled when the class is healthy. Nothing is
/// dropped.
///
/// `merge` should not panic; one that does (an overflowing `+=`) merged into a copy, so the
/// key's value stays as it was, and the delta it was given, already journaled and answered
/// `202`, goes to manual review with the panic's message instead of being merged (each merge
/// clones the key's value for this). An `extract` that says `Err` refuses its call as
/// `malformed` (400, no `Retry-After`: the same call would be refused again); one that panics
/// refuses it with `not_kept` (503, `Retry-After`).
///
/// ```
/// use tower_degrade::fallback::{Batch, BatchMerge};
/// use tower_degrade::BoxError;
///
/// // Inventory deltas: POST /inventory/{sku} with the delta as the body.
/// let merge = BatchMerge::new(
///     |req| {
///         let sku = req.uri.rsplit('/').next().unwrap_or_default().to_owned();
///         let delta: i64 = std::str::from_utf8(&req.body)
///             .map_err(|e| e.to_string())?
///             .trim()
///             .parse()
///             .map_err(|e: std::num::ParseIntError| e.to_string())?;
///         Ok((sku, delta))
///     },
///     |sum: &mut i64, delta| *sum += delta,
///     tower::service_fn(|batch: Batch<i64>| async move {
///         // UPDATE stock SET qty = qty + $2 WHERE sku = $1, for each item, in one transaction.
///         Ok::<_, BoxError>(())
///     }),
/// );
/// # drop(merge);
/// ```
#[must_use = "a setting or builder does nothing until it is passed on or built"]
pub struct BatchMerge<V> {
    extract: Extract<V>,
    merge: Merge<V>,
    sink: BoxCloneSyncService<Batch<V>, (), BoxError>,
    every: Duration,
    max_items: usize,
    max_attempts: u32,
    write_timeout: Duration,
}

impl<V> fmt::Debug for BatchMerge<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchMerge")
            .field("every", &self.every)
            .field("max_items", &self.max_items)
            .field("max_attempts", &self.max_attempts)
            .finish_non_exhaustive()
    }
}

impl<V: Send + 'static> BatchMerge<V> {
    /// `extract` reads the key and the delta of a call (an `Err` refuses the call as
    /// `malformed`, its message logged at debug and sent to the client in
    /// [`DETAIL_HEADER`](crate::protocol::DETAIL_HEADER) or the `grpc-message`: write it for
    /// the client), `merge` folds a delta into the key's value,
    /// `sink` writes a batch.
    ///
    /// Deltas are journaled with postcard, which is not self-describing: a `V` whose values
    /// it cannot read back (`serde_json::Value`, untagged or internally tagged enums,
    /// `#[serde(flatten)]`, `skip_serializing_if`) has each such call refused with `not_kept`
    /// (and an error logged once), never acknowledged and dropped.
    pub fn new<X, M, S>(extract: X, merge: M, sink: S) -> Self
    where
        X: Fn(&HttpRequest) -> Result<(String, V), String> + Send + Sync + 'static,
        M: Fn(&mut V, V) + Send + Sync + 'static,
        S: Service<Batch<V>, Response = ()> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
    {
        Self {
            extract: Arc::new(extract),
            merge: Arc::new(merge),
            sink: BoxCloneSyncService::new(sink.map_err(Into::into)),
            every: Duration::from_millis(100),
            max_items: 1000,
            max_attempts: 5,
            write_timeout: Duration::from_secs(30),
        }
    }

    /// Flush at least this often (default 100 ms; more than zero, at most an hour).
    pub fn flush_every(mut self, every: Duration) -> Self {
        self.every = every;
        self
    }

    /// Flush when this many deltas wait (default 1,000; at least 1).
    pub fn max_items(mut self, n: usize) -> Self {
        self.max_items = n;
        self
    }

    /// How long one write may take before it counts as failed (default 30 s; more than zero).
    pub fn write_timeout(mut self, d: Duration) -> Self {
        self.write_timeout = d;
        self
    }

    /// Failed writes of one batch before it is spooled (default 5; at least 1).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }

    pub(crate) fn into_batcher(self, class: &str) -> MergeBatcher<V> {
        MergeBatcher {
            class: class.to_owned(),
            config: self,
            state: Mutex::new(State {
                pending: HashMap::new(),
                ids: Vec::new(),
                since_ms: None,
                sealed: Vec::new(),
                recovered: HashSet::new(),
                live: Some(HashSet::new()),
                poisoned: Vec::new(),
                carry: Vec::new(),
            }),
            flushing: tokio::sync::Mutex::new(()),
            unreadable_said: std::sync::atomic::AtomicBool::new(false),
            refused: Every::new(LOG_EVERY),
        }
    }
}

/// A journal record: one delta, or a sealed batch.
#[derive(Serialize, Deserialize)]
enum Entry<V> {
    Delta(String, V),
    Batch(Vec<(String, V)>),
}

fn encode<V: Serialize>(entry: &Entry<V>) -> Result<Vec<u8>, String> {
    postcard::to_stdvec(entry).map_err(|e| format!("the delta cannot be journaled: {e}"))
}

/// [`encode`], then read back and written again to the same bytes. The journal's format
/// (postcard) is not self-describing: a value it writes but cannot read back
/// (`serde_json::Value`, an untagged or internally tagged enum, `flatten`,
/// `skip_serializing_if`) would be acknowledged and never merged, or, inside a batch, read
/// back as other values.
fn encode_checked<V: Serialize + DeserializeOwned>(entry: &Entry<V>) -> Result<Vec<u8>, String> {
    let bytes = encode(entry)?;
    match postcard::from_bytes::<Entry<V>>(&bytes).map(|back| postcard::to_stdvec(&back)) {
        Ok(Ok(again)) if again == bytes => Ok(bytes),
        Ok(_) => Err("it is read back from the journal as another value".to_owned()),
        Err(e) => Err(format!("it cannot be read back from the journal: {e}")),
    }
}

/// The error logged once per class when a value cannot be journaled faithfully.
const UNREADABLE: &str = "batch_merge: a value cannot be journaled so as to be read back: the \
     delta's type uses a serde shape the journal (postcard) cannot read, such as \
     `serde_json::Value`, an untagged or internally tagged enum, `flatten` or \
     `skip_serializing_if`; said once";

fn decode<V: DeserializeOwned>(task: &Task) -> Result<Entry<V>, String> {
    match task.payload() {
        Payload::Bytes(b) => postcard::from_bytes(b).map_err(|e| e.to_string()),
        Payload::Http(_) => Err("not a batch_merge record".to_owned()),
    }
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The reason every `batch_merge` record is kept with (the journaled deltas, the sealed
/// batches, the spooled ones).
const REASON: &str = "batch_merge";

/// Whether `task` is a `batch_merge` record rather than a task-API value, both bytes: a
/// record's first byte is its [`Entry`] variant (postcard writes it as a varint: 0 or 1), and
/// JSON text never starts with a control byte. (Not by its reason, which a requeue from
/// manual review replaces.)
pub(crate) fn is_record(task: &Task) -> bool {
    matches!(task.payload(), Payload::Bytes(b) if matches!(b.first(), Some(0 | 1)))
}

/// The longest `flush_every`.
const MAX_EVERY: Duration = Duration::from_secs(3600);

/// The type-erased `batch_merge` of one class, as the router and worker use it.
pub(crate) trait Batcher: Send + Sync {
    /// Its settings, checked when the router is built.
    fn validate(&self) -> Result<(), crate::error::ConfigError>;
    /// The journal record of a call's delta, or why the call is refused: `Malformed` where
    /// the `extract` said `Err` (the call is not one it can read, now or later), `NotKept`
    /// where the `extract` panicked or the delta cannot be journaled.
    fn journal(
        &self,
        class: &str,
        key: Option<String>,
        rec: &HttpRequest,
    ) -> Result<Task, (Reason, String)>;
    /// Merge a journaled delta, kept at `now_ms`.
    fn merge(&self, task: Task, now_ms: u64);
    /// Read the journal back at start-up.
    fn recover<'a>(&'a self, store: &'a dyn Store) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Seal and write what is due; a failed write's backoff runs from when it failed.
    fn flush<'a>(
        &'a self,
        store: &'a dyn Store,
        service: &'a str,
        retry: &'a RetryPolicy,
        clock: &'a Clock,
    ) -> BoxFuture<'a, ()>;
    /// Write a spooled batch.
    fn replay(&self, task: &Task) -> ReplayFuture;
}

struct Sealed {
    task: Task,
    attempts: u32,
    next_ms: u64,
}

struct State<V> {
    pending: HashMap<String, V>,
    ids: Vec<TaskId>,
    since_ms: Option<u64>,
    sealed: Vec<Sealed>,
    /// Deltas read back from the journal at start-up: a call kept while the journal was being
    /// read is merged once, whichever of the two sees it first.
    recovered: HashSet<TaskId>,
    /// Deltas merged by live calls while the journal is read back (`None` once it is).
    live: Option<HashSet<TaskId>>,
    /// Deltas the merge panicked on, for manual review at the next flush.
    poisoned: Vec<Task>,
    /// Values of a batch that could not be sealed and that the merge would not fold into the
    /// newer value of their key: sealed beside it at the next flush.
    carry: Vec<(String, V)>,
}

pub(crate) struct MergeBatcher<V> {
    class: String,
    config: BatchMerge<V>,
    state: Mutex<State<V>>,
    /// One flush at a time.
    flushing: tokio::sync::Mutex<()>,
    /// Whether a delta the journal could not read back was logged (once).
    unreadable_said: std::sync::atomic::AtomicBool,
    /// The store refusing a flush's commits: said at most every 10 s while it lasts (a flush
    /// runs every few hundred ms), and once when it ends.
    refused: Every,
}

impl<V> MergeBatcher<V> {
    fn state(&self) -> MutexGuard<'_, State<V>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<V> MergeBatcher<V>
where
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    /// Fold `delta` into `acc` with the user's merge, run on a copy: a merge that panics
    /// leaves `acc` as it was, and its message is the error.
    fn fold(&self, acc: &mut V, delta: V) -> Result<(), String> {
        let mut next = acc.clone();
        let merge = &self.config.merge;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| merge(&mut next, delta))) {
            Ok(()) => {
                *acc = next;
                Ok(())
            }
            Err(panic) => Err(super::panicked("merge function", &*panic)),
        }
    }

    fn add(&self, key: String, delta: V, task: &Task, now_ms: u64, recovering: bool) {
        let id = task.id();
        let mut s = self.state();
        let first = if recovering {
            !s.live.as_ref().is_some_and(|l| l.contains(&id)) && s.recovered.insert(id)
        } else {
            let fresh = !s.recovered.contains(&id);
            if let (true, Some(live)) = (fresh, s.live.as_mut()) {
                live.insert(id);
            }
            fresh
        };
        if !first {
            return;
        }
        match s.pending.get_mut(&key) {
            Some(v) => {
                if let Err(why) = self.fold(v, delta) {
                    tracing::error!(class = %self.class, task = %id, key = %key, error = %why,
                        "batch_merge: the delta goes to manual review unmerged; the key's value stays as it was");
                    let mut poisoned = task.clone();
                    poisoned.set_answer(why);
                    s.poisoned.push(poisoned);
                    return;
                }
            }
            None => {
                s.pending.insert(key, delta);
            }
        }
        s.ids.push(id);
        s.since_ms.get_or_insert(now_ms);
    }

    /// One write through the sink, in a task of its own: a sink that panics (in `call` or in
    /// its future) fails this write like an error, and the flush of the other batches and
    /// classes goes on.
    async fn write(&self, batch: Batch<V>) -> Result<(), BoxError> {
        let limit = self.config.write_timeout;
        let sink = self.config.sink.clone();
        // A set, so that dropping the flush (the worker stopped) cancels the write, as before.
        let mut write = tokio::task::JoinSet::new();
        write.spawn(async move { tokio::time::timeout(limit, sink.oneshot(batch)).await });
        match write.join_next().await {
            Some(Ok(Ok(done))) => done,
            Some(Ok(Err(_))) => Err(format!("the merged write timed out after {limit:?}").into()),
            Some(Err(e)) if e.is_panic() => Err(super::panicked("sink", &*e.into_panic()).into()),
            Some(Err(_)) | None => Err("the merged write was cancelled".into()),
        }
    }

    async fn flush_inner(
        &self,
        store: &dyn Store,
        service: &str,
        retry: &RetryPolicy,
        clock: &Clock,
    ) {
        let _one = self.flushing.lock().await;
        let now = clock.now_ms();
        let service = service.to_owned();
        // 0. Deltas the merge panicked on: out of the journal, into manual review.
        let poisoned = std::mem::take(&mut self.state().poisoned);
        if !poisoned.is_empty() {
            let ops = poisoned
                .iter()
                .flat_map(|t| {
                    [
                        Op::Remove(Queue::Journal, t.id()),
                        Op::Put(Queue::Review, t.clone()),
                    ]
                })
                .collect();
            if let Err(e) = store.commit(ops).await {
                self.commit_failed(
                    &e,
                    "deltas the merge panicked on cannot be moved to manual review yet; they \
                     stay journaled",
                );
                self.state().poisoned.extend(poisoned);
            }
        }
        // 1. Seal the pending deltas when due.
        let seal = {
            let mut s = self.state();
            let due = s.ids.len() >= self.config.max_items
                || s.since_ms
                    .is_some_and(|t| now.saturating_sub(t) >= self.config.every.as_millis() as u64);
            if due && !s.ids.is_empty() {
                s.since_ms = None;
                // The carried values are older than the pending ones of their key: first.
                let mut items = std::mem::take(&mut s.carry);
                items.extend(std::mem::take(&mut s.pending));
                Some((items, std::mem::take(&mut s.ids)))
            } else {
                None
            }
        };
        if let Some((items, ids)) = seal {
            // A merged value the journal cannot read back (a field skipped once the deltas
            // cancel out): not sealed, its deltas stay journaled, said once.
            let sealed = encode_checked(&Entry::Batch(items.clone()));
            match sealed.inspect_err(|e| self.unreadable(e)) {
                Ok(bytes) => {
                    let task = Task::new(self.class.clone(), None, Payload::Bytes(bytes))
                        .with_reason(REASON);
                    let mut ops = vec![Op::Put(Queue::Journal, task.clone())];
                    ops.extend(ids.iter().map(|id| Op::Remove(Queue::Journal, *id)));
                    match store.commit(ops).await {
                        Ok(()) => {
                            self.committed();
                            self.state().sealed.push(Sealed {
                                task,
                                attempts: 0,
                                next_ms: now,
                            });
                        }
                        Err(e) => {
                            self.commit_failed(
                                &e,
                                "the batch cannot be sealed; its deltas stay journaled",
                            );
                            self.restore(items, ids, now);
                        }
                    }
                }
                Err(_) => self.restore(items, ids, now),
            }
        }
        // 2. Write the sealed batches that are due.
        let due: Vec<(Task, u32)> = {
            let s = self.state();
            s.sealed
                .iter()
                .filter(|b| b.next_ms <= now)
                .map(|b| (b.task.clone(), b.attempts))
                .collect()
        };
        for (task, attempts) in due {
            let Ok(Entry::Batch(items)) = decode::<V>(&task) else {
                self.unreadable(&format!(
                    "the sealed batch {} cannot be read back",
                    task.id()
                ));
                continue;
            };
            let id = task.id();
            let result = self.write(Batch { id, items }).await;
            let (ops, outcome) = match result {
                Ok(()) => (vec![Op::Remove(Queue::Journal, id)], "ok"),
                Err(e) if attempts + 1 >= self.config.max_attempts => {
                    let mut spooled = task.clone().with_reason(format!("{REASON} write failed"));
                    spooled.set_answer(e.to_string());
                    (
                        vec![
                            Op::Remove(Queue::Journal, id),
                            Op::Put(Queue::Spool, spooled),
                        ],
                        "spooled",
                    )
                }
                Err(e) => {
                    tracing::debug!(class = %self.class, error = %e, "batch_merge: write failed");
                    let mut s = self.state();
                    if let Some(b) = s.sealed.iter_mut().find(|b| b.task.id() == id) {
                        b.attempts += 1;
                        b.next_ms =
                            super::schedule::after(clock.now_ms(), retry.backoff(b.attempts, 0.5));
                    }
                    self.written(&service, "failed");
                    continue;
                }
            };
            if store.commit(ops).await.is_ok() {
                self.state().sealed.retain(|b| b.task.id() != id);
            }
            self.written(&service, outcome);
        }
    }

    /// Count a merged write of this class by `result` (`ok`, `failed`, `spooled`).
    fn written(&self, service: &str, result: &'static str) {
        crate::metrics::count_result(
            crate::metrics::FALLBACK_BATCH_WRITES,
            &[
                metrics::Label::new("service", service.to_owned()),
                metrics::Label::new("class", self.class.clone()),
            ],
            &crate::metrics::BATCH_WRITE_RESULTS,
            result,
        );
    }

    /// A value the journal cannot read back: logged once per class.
    /// The store refused a flush's commit: `what` is said at most every 10 s.
    fn commit_failed(&self, error: &StoreError, what: &str) {
        if let Some(held) = self.refused.ready() {
            tracing::warn!(class = %self.class, error = %error, also_failed = held,
                "batch_merge: {what} (said at most every 10 s; `also_failed`: commits refused \
                 since the last line)");
        }
    }

    /// A flush's commit went through: the end of a refusal said, if one was.
    fn committed(&self) {
        if let Some(held) = self.refused.reset() {
            tracing::info!(class = %self.class, also_failed = held,
                "batch_merge: the store takes the batches again (`also_failed`: commits refused \
                 since the last warning)");
        }
    }

    fn unreadable(&self, error: &str) {
        if !self
            .unreadable_said
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::error!(class = %self.class, error, "{UNREADABLE}");
        }
    }

    /// Put deltas that could not be sealed back in front of the new ones.
    fn restore(&self, items: Vec<(String, V)>, ids: Vec<TaskId>, now: u64) {
        let mut s = self.state();
        for (k, v) in items {
            match s.pending.remove(&k) {
                Some(newer) => {
                    let mut merged = v;
                    match self.fold(&mut merged, newer.clone()) {
                        Ok(()) => {
                            s.pending.insert(k, merged);
                        }
                        Err(why) => {
                            // Both values stand for journaled deltas: keep both, sealed side
                            // by side in the next batch.
                            tracing::error!(class = %self.class, key = %k, error = %why,
                                "batch_merge: two values of one key not merged; both are written");
                            s.carry.push((k.clone(), merged));
                            s.pending.insert(k, newer);
                        }
                    }
                }
                None => {
                    s.pending.insert(k, v);
                }
            }
        }
        s.ids.extend(ids);
        s.since_ms = Some(now);
    }
}

impl<V> Batcher for MergeBatcher<V>
where
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    fn journal(
        &self,
        class: &str,
        key: Option<String>,
        rec: &HttpRequest,
    ) -> Result<Task, (Reason, String)> {
        let extract = &self.config.extract;
        let (k, delta) =
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| extract(rec))) {
                Ok(Ok(read)) => read,
                // The call is not one the extractor can read: sent again, it would not be either.
                Ok(Err(why)) => return Err((Reason::Malformed, why)),
                Err(panic) => {
                    return Err((
                        Reason::NotKept,
                        super::panicked("extract function", &*panic),
                    ));
                }
            };
        // A delta the journal cannot read back is refused (`not_kept`), not acknowledged.
        let bytes = encode_checked(&Entry::Delta(k, delta))
            .inspect_err(|e| self.unreadable(e))
            .map_err(|e| (Reason::NotKept, e))?;
        Ok(Task::new(class, key, Payload::Bytes(bytes)).with_reason(REASON))
    }

    fn validate(&self) -> Result<(), crate::error::ConfigError> {
        let invalid =
            |field, reason: String| Err(crate::error::ConfigError::InvalidValue { field, reason });
        let every = self.config.every;
        if every.is_zero() || every > MAX_EVERY {
            return invalid(
                "batch_merge.flush_every",
                format!(
                    "must be more than zero and at most {MAX_EVERY:?} (class `{}`), not {every:?}",
                    self.class
                ),
            );
        }
        for (field, n) in [
            ("batch_merge.max_items", self.config.max_items),
            (
                "batch_merge.max_attempts",
                self.config.max_attempts as usize,
            ),
        ] {
            if n == 0 {
                return invalid(
                    field,
                    format!("must be at least 1 (class `{}`)", self.class),
                );
            }
        }
        if self.config.write_timeout.is_zero() {
            return invalid(
                "batch_merge.write_timeout",
                format!(
                    "must be more than zero: every write would time out (class `{}`)",
                    self.class
                ),
            );
        }
        Ok(())
    }

    fn merge(&self, task: Task, now_ms: u64) {
        if let Ok(Entry::Delta(k, v)) = decode::<V>(&task) {
            self.add(k, v, &task, now_ms, false);
        }
    }

    fn recover<'a>(&'a self, store: &'a dyn Store) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut after = None;
            loop {
                let page = store.list(Queue::Journal, after, 1000).await?;
                let Some(last) = page.last() else { break };
                after = Some(last.id());
                for task in page {
                    if task.class() != self.class {
                        continue;
                    }
                    match decode::<V>(&task) {
                        Ok(Entry::Delta(k, v)) => self.add(k, v, &task, 0, true),
                        Ok(Entry::Batch(_)) => {
                            let mut s = self.state();
                            // Batches this process sealed are already in the list.
                            if !s.sealed.iter().any(|b| b.task.id() == task.id()) {
                                s.sealed.push(Sealed {
                                    task,
                                    attempts: 0,
                                    next_ms: 0,
                                });
                            }
                        }
                        Err(e) => tracing::error!(class = %self.class, task = %task.id(),
                            error = %e, "batch_merge: an unreadable journal record is left in place"),
                    }
                }
            }
            self.state().live = None;
            Ok(())
        })
    }

    fn flush<'a>(
        &'a self,
        store: &'a dyn Store,
        service: &'a str,
        retry: &'a RetryPolicy,
        clock: &'a Clock,
    ) -> BoxFuture<'a, ()> {
        Box::pin(self.flush_inner(store, service, retry, clock))
    }

    fn replay(&self, task: &Task) -> ReplayFuture {
        let batch = match decode::<V>(task) {
            Ok(Entry::Batch(items)) => Batch {
                id: task.id(),
                items,
            },
            Ok(Entry::Delta(k, v)) => Batch {
                id: task.id(),
                items: vec![(k, v)],
            },
            Err(e) => {
                return Box::pin(std::future::ready(Replayed::Reject(format!(
                    "unreadable batch: {e}"
                ))));
            }
        };
        let sink = self.config.sink.clone();
        Box::pin(async move {
            match sink.oneshot(batch).await {
                Ok(()) => Replayed::Done,
                Err(e) => Replayed::Retry(e.to_string()),
            }
        })
    }
}
