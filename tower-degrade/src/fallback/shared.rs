//! What the router, its worker and the review handle share: the store, the capture settings,
//! the retry schedule, the batchers, the wake-up signal and the clock.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

use super::batch::Batcher;
use super::capture::Capture;
use super::record::{Payload, Queue, Task, TaskId};
use super::schedule::{Clock, RetryPolicy};
use super::store::{Op, Store, StoreError, StoreErrorKind};
use crate::class::{Route, Tier};
use crate::every::Every;
use crate::gate::Reason;

/// What the router, its worker and the review handle share.
pub(crate) struct RouterShared {
    pub(crate) service: Arc<str>,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) capture: Capture,
    pub(crate) retry: RetryPolicy,
    pub(crate) batches: HashMap<String, Arc<dyn Batcher>>,
    pub(crate) wake: Notify,
    pub(crate) clock: Clock,
    /// How long a client is told to wait, at least, when its call could not be kept.
    pub(crate) retry_after: Duration,
    /// Idempotency keys being stored now: a second call with the same key waits for the
    /// first, then finds its task.
    pub(crate) storing: Mutex<HashMap<(String, String), Arc<Notify>>>,
    /// One manual-review action at a time: a requeue and a drop of the same task (two
    /// operators, a double click) must not both succeed.
    pub(crate) reviewing: tokio::sync::Mutex<()>,
    /// Calls that could not be kept: logged once every 10 s while the store refuses them
    /// (each is counted in the metrics), not once per call.
    pub(crate) not_kept: Every,
    /// Tasks moved to manual review: each is counted and listed by the review API; the log
    /// says so once every 10 s with how many more, as a client can send thousands a second
    /// there (a policy's hook on a header it sets).
    pub(crate) to_review: Every,
    /// Each class's tier and the share of the store its new tasks may fill
    /// ([`FallbackRouterBuilder::store_share`](super::FallbackRouterBuilder::store_share)).
    pub(crate) shares: HashMap<String, (Tier, f64)>,
    /// A layer of another degrader has sent this router a call (said once).
    pub(crate) foreign_said: std::sync::atomic::AtomicBool,
}

impl RouterShared {
    /// When a call the router could not keep is told to come back: its `retry_after`, or
    /// later (an open breaker's time left: sooner, it would be diverted again and, with the
    /// store full or failing, refused again).
    pub(crate) fn come_back(&self, layer: Option<Duration>) -> Duration {
        layer.unwrap_or_default().max(self.retry_after)
    }

    /// Whether a call diverted by the degrader of `service` (the `Arc` a layer's calls carry)
    /// is this router's: one of another degrader's would be replayed, held back and counted
    /// as this one's classes. Said once, naming both, when it is not.
    pub(crate) fn owns(&self, service: &Arc<str>) -> bool {
        if Arc::ptr_eq(service, &self.service) {
            return true;
        }
        if !self
            .foreign_said
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            let hint = if **service == *self.service {
                " (another degrader of the same name: rebuilt, and the router not?)"
            } else {
                ""
            };
            tracing::error!(
                router = %self.service,
                layer = %service,
                "a layer of another degrader diverted a call to this fallback router{hint}: \
                 not kept (answered `not_kept`); give each degrader's layers a router built \
                 from that degrader"
            );
        }
        false
    }
}

/// The task already kept under a call's idempotency key.
pub(crate) struct Kept {
    pub(crate) id: TaskId,
    /// Whether it is this call's task (the same request): if not, the key is reused.
    pub(crate) same: bool,
}

/// What [`RouterShared::keep`] came to.
pub(crate) enum Stored {
    /// Stored under this id.
    Kept(TaskId),
    /// Another task holds the call's idempotency key.
    Found(Kept),
    /// The store refused it (counted and logged).
    NotKept,
    /// The call could not be read as a task ([`KeptCall::task`] said why, and what is wrong
    /// with it where its client is to be told).
    Unreadable(Reason, Option<String>),
}

/// A call the router keeps (a captured HTTP request, a task-API payload).
pub(crate) trait KeptCall: Send + Sync + 'static {
    /// Whether `kept`, what the call's idempotency key already holds, is this call.
    fn same(&self, shared: &RouterShared, class: &str, kept: &Payload) -> bool;
    /// Its queue and task, or why the call cannot be read as one (`Malformed`, `NotKept`)
    /// and what is wrong with it, for its client.
    fn task(
        self,
        shared: &RouterShared,
        class: &str,
        key: Option<String>,
        route: Route,
        reason: Reason,
    ) -> Result<(Queue, Task), (Reason, Option<String>)>;
}

/// A key being stored; dropping it wakes the calls waiting on the same key.
pub(crate) struct Storing<'a> {
    shared: &'a RouterShared,
    key: (String, String),
    done: Arc<Notify>,
}

impl Drop for Storing<'_> {
    fn drop(&mut self) {
        self.shared.storing().remove(&self.key);
        self.done.notify_waiters();
    }
}

impl fmt::Debug for RouterShared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouterShared")
            .field("service", &self.service)
            .field("store", &self.store.kind())
            .field("batches", &self.batches.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl RouterShared {
    fn storing(&self) -> MutexGuard<'_, HashMap<(String, String), Arc<Notify>>> {
        self.storing.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The task already kept for `class` under `key`, or the right to store one (other calls
    /// with the same key wait until it is stored or refused).
    pub(crate) async fn claim_key(
        &self,
        class: &str,
        key: &str,
    ) -> Result<Storing<'_>, (Queue, TaskId)> {
        loop {
            if let Ok(Some(kept)) = self.store.find_key(class, key).await {
                return Err(kept);
            }
            let k = (class.to_owned(), key.to_owned());
            let done = {
                let mut storing = self.storing();
                match storing.get(&k) {
                    Some(n) => n.clone(),
                    None => {
                        let done = Arc::new(Notify::new());
                        storing.insert(k.clone(), done.clone());
                        return Ok(Storing {
                            shared: self,
                            key: k,
                            done,
                        });
                    }
                }
            };
            let wait = done.notified();
            tokio::pin!(wait);
            wait.as_mut().enable();
            // Stored (or refused) meanwhile: look again rather than wait.
            if self
                .storing()
                .get(&k)
                .is_some_and(|n| Arc::ptr_eq(n, &done))
            {
                wait.await;
            }
        }
    }

    /// With an idempotency `key`: the right to store the call's task (other calls with the
    /// key wait meanwhile), or the task already kept under it, and whether that task is this
    /// call's (`same`, given the kept payload). Without a key: nothing to claim.
    async fn claim_or_find(
        &self,
        class: &str,
        key: Option<&str>,
        same: impl FnOnce(&Payload) -> bool,
    ) -> Result<Option<Storing<'_>>, Kept> {
        let Some(key) = key else { return Ok(None) };
        match self.claim_key(class, key).await {
            Ok(storing) => Ok(Some(storing)),
            Err((queue, id)) => Err(self.kept(queue, id, same).await),
        }
    }

    /// Claim the call's idempotency key, make its task, store it and, for a journaled
    /// `batch_merge` delta, merge it, in a task of its own. Once the call is captured this
    /// runs to its end whether or not the caller waits for it: a caller that goes away (a
    /// client disconnect, an outer timeout) would otherwise free its key while the commit is
    /// in flight, so that a retry claims the key and keeps a second task, or leave a journaled
    /// delta unmerged until a restart. A task stored for a caller that went away is kept, and
    /// a retry with its key gets it.
    pub(crate) async fn keep(
        self: &Arc<Self>,
        (class, key, route, reason): (String, Option<String>, Route, Reason),
        call: impl KeptCall,
    ) -> Stored {
        let shared = self.clone();
        let labels = crate::metrics::kept_labels(&self.service, &class, route);
        let counted = labels.clone();
        let work = async move {
            let stored = async {
                let same = |kept: &Payload| call.same(&shared, &class, kept);
                let _storing = match shared.claim_or_find(&class, key.as_deref(), same).await {
                    Ok(storing) => storing,
                    Err(kept) => return Stored::Found(kept),
                };
                let (queue, task) = match call.task(&shared, &class, key, route, reason) {
                    Ok(task) => task,
                    Err((why, detail)) => return Stored::Unreadable(why, detail),
                };
                let merged = (queue == Queue::Journal).then(|| task.clone());
                let stored = shared.put_kept(queue, task, route, reason).await;
                if let (Stored::Kept(_), Some(task), Some(batcher)) =
                    (&stored, merged, shared.batches.get(&class))
                {
                    batcher.merge(task, shared.clock.now_ms());
                }
                stored
            }
            .await;
            // Counted here, whether or not the caller still waits (`put_kept` counts what it
            // stored or could not): a retry whose caller gave up behind the first's commit.
            let count = |result| crate::metrics::count_kept(&counted, result);
            match &stored {
                Stored::Found(kept) if kept.same => count("already_kept"),
                Stored::Found(_) => count("key_reused"),
                Stored::Unreadable(why, _) => count(why.as_str()),
                Stored::Kept(_) | Stored::NotKept => {}
            }
            stored
        };
        tokio::spawn(work).await.unwrap_or_else(|e| {
            tracing::error!(service = %self.service, error = %e, "storing a kept call failed");
            crate::metrics::count_kept(&labels, Reason::NotKept.as_str());
            Stored::NotKept
        })
    }

    /// The kept task `id` as a call's idempotency key found it: whether it is this call's
    /// (a kept task that cannot be read counts as the same).
    async fn kept(&self, queue: Queue, id: TaskId, same: impl FnOnce(&Payload) -> bool) -> Kept {
        let same = match self.store.get(queue, id).await {
            Ok(Some(kept)) => same(kept.payload()),
            _ => true,
        };
        Kept { id, same }
    }

    /// A full store's error if `class`'s tier has filled its share of the store
    /// ([`FallbackRouterBuilder::store_share`](super::FallbackRouterBuilder::store_share)).
    fn over_share(&self, class: &str) -> Option<StoreError> {
        let &(tier, share) = self.shares.get(class)?;
        if share >= 1.0 {
            return None;
        }
        let usage = self.store.usage()?;
        let room = (usage.capacity as f64 * share).ceil() as u64;
        (usage.held >= room).then(|| {
            StoreError::new(
                StoreErrorKind::Full,
                format!(
                    "the {} store holds {} tasks of its {}: {tier} classes may fill {} % of it \
                     (`FallbackRouterBuilder::store_share`), the rest is kept for higher tiers",
                    self.store.kind(),
                    usage.held,
                    usage.capacity,
                    share * 100.0
                ),
            )
        })
    }

    /// Store a kept task; count it, wake the worker. `Stored::NotKept` (logged) if the store
    /// refused it; `Stored::Found` if another instance sharing the store kept a task under its
    /// idempotency key since [`claim_or_find`](Self::claim_or_find) looked (the same call if
    /// it kept the same request).
    async fn put_kept(&self, queue: Queue, task: Task, route: Route, reason: Reason) -> Stored {
        let (id, class) = (task.id(), task.class().to_owned());
        let key = task.client_key().map(str::to_owned);
        let mut result = match self.over_share(&class) {
            Some(full) => Err(full),
            None => self.store.commit(vec![Op::Put(queue, task.clone())]).await,
        };
        if let (Err(e), Some(key)) = (&result, &key)
            && e.kind() == StoreErrorKind::KeyTaken
        {
            if let Ok(Some((q, other))) = self.store.find_key(&class, key).await {
                let same = |kept: &Payload| same_call(kept, task.payload());
                return Stored::Found(self.kept(q, other, same).await);
            }
            // Replayed and gone by the time this instance looked: the key is free again.
            result = self.store.commit(vec![Op::Put(queue, task)]).await;
        }
        match result {
            Ok(()) => {
                let labels = crate::metrics::kept_labels(&self.service, &class, route);
                crate::metrics::count_kept(&labels, "kept");
                if route == Route::ManualReview
                    && let Some(held) = self.to_review.ready()
                {
                    tracing::warn!(service = %self.service, class = %class, task = %id,
                        reason = %reason, also_moved = held,
                        "task moved to manual review (said at most every 10 s; `also_moved`: \
                         tasks moved since the last line, each listed by the review API)");
                }
                self.wake.notify_one();
                if let Some(held) = self.not_kept.reset() {
                    tracing::info!(service = %self.service, class = %class, also_not_kept = held,
                        "diverted calls are kept again (`also_not_kept`: calls not kept since \
                         the last warning)");
                }
                Stored::Kept(id)
            }
            Err(e) => {
                let labels = crate::metrics::kept_labels(&self.service, &class, route);
                crate::metrics::count_kept(&labels, Reason::NotKept.as_str());
                if let Some(held) = self.not_kept.ready() {
                    tracing::warn!(service = %self.service, class = %class, error = %e,
                        also_not_kept = held,
                        "a diverted call could not be kept (said at most every 10 s; \
                         `also_not_kept`: calls not kept since the last line)");
                }
                Stored::NotKept
            }
        }
    }

    /// The task of a call kept on `route`: its queue and deadline.
    pub(crate) fn new_task(
        &self,
        route: Route,
        class: &str,
        key: Option<String>,
        reason: Reason,
        payload: Payload,
    ) -> (Queue, Task) {
        let now = self.clock.now_ms();
        let queue = Queue::for_route(route).unwrap_or(Queue::Spool);
        let task = Task::new(class, key, payload).with_reason(reason.as_str());
        let task = match route {
            // The first replay after the first wait, not at once: the call was diverted
            // because the class could not take it now. The jitter is drawn from the task id's
            // random bits, so calls diverted together are not replayed together.
            Route::DelayedRetry => {
                let unit = crate::mix::unit(crate::mix::mix64(task.id().0 as u64));
                let wait = self.retry.backoff(0, unit);
                let deadline = self.retry.deadline.map(|d| super::schedule::after(now, d));
                task.with_deadline(deadline)
                    .with_due(super::schedule::after(now, wait))
            }
            _ => task.with_due(now),
        };
        (queue, task)
    }
}

/// Whether two kept payloads are the same call: the same method, URI and body, or the same
/// bytes (a task-API value, a journaled delta).
fn same_call(a: &Payload, b: &Payload) -> bool {
    match (a, b) {
        (Payload::Http(a), Payload::Http(b)) => a.same_call(b),
        (Payload::Bytes(a), Payload::Bytes(b)) => a == b,
        _ => false,
    }
}
