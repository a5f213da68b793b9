//! [`Failover`]: a shared store, and a local one for when the shared one cannot be reached.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use super::{Depth, Op, Store, StoreError, StoreErrorKind, StoreFuture, Usage};
use crate::every::{Every, LOG_EVERY};
use crate::fallback::record::{Queue, Task, TaskId};

/// Keeps tasks in `primary` (say a [`RedisStore`](super::RedisStore)) and, while it cannot be
/// reached, in `local` (an [`EmbeddedStore`](super::EmbeddedStore)) instead of refusing the
/// calls; each switch is logged (at most one warning per 10 s). The worker replays from both,
/// what the local store kept first.
///
/// A shared store that failed is left alone for [`Failover::RETRY`]: new tasks go straight to
/// the local store and the worker reads the local one only, then one call tries the shared
/// store again (the others carry on without it). Without that, a hung Redis made every kept
/// call wait for its timeout twice (4 s with the defaults) before failing over. Without it, a store that cannot be reached means the
/// diverted call gets the reject answer (`not_kept`): choose by wrapping the store or not.
///
/// A task stays in the store that kept it: its replays, moves and removal go there. Only new
/// tasks fail over: a removal or a move of a task the shared store holds fails while it cannot
/// be reached (the worker stores it again later, the task not replayed meanwhile), so nothing
/// is dropped or replayed twice for it when the shared store refuses or errs, or hangs: a
/// [`RedisStore`](super::RedisStore) commit run after its deadline changes nothing. A copy the
/// shared store kept anyway (an append it ran in time, whose answer was lost) is removed there
/// when it hands the copy out to this instance, not replayed (`docs/fallback.md`, *Stores*).
/// An idempotency key sent again while the shared store
/// cannot be reached is not found there: the call is kept locally as a second task, replayed
/// with the same key (the effect is once for an application that applies each key once).
pub struct Failover {
    primary: Arc<dyn Store>,
    local: Arc<dyn Store>,
    state: Mutex<State>,
    /// Kept in the local store: said at most once every 10 s.
    switched: Every,
}

#[derive(Default)]
struct State {
    /// Tasks kept in the local store.
    local_ids: HashSet<TaskId>,
    /// Tasks kept locally because the shared store failed on their append in a way that may
    /// still have applied it (a timeout, not a refusal), the most recent
    /// [`Failover::REMEMBERED`]: a copy the shared store hands out later is removed there
    /// rather than replayed again.
    doubtful: Recent,
    /// Tasks the shared store handed out to this instance and not yet stored back, removed or
    /// released (the most recent [`Failover::REMEMBERED`]): storing one again is a reschedule
    /// there, never a new task for the local store, whatever its attempts (a failed probe
    /// stores its task again with its attempts as they were: kept locally as well, it was
    /// replayed twice, once from each store).
    handed_out: Recent,
    /// Until when the shared store is left alone, having failed.
    down_until: Option<Instant>,
}

/// Task ids, forgetting the oldest past a bound.
#[derive(Default)]
struct Recent {
    /// Each id with the sequence number it was last inserted at.
    ids: HashMap<TaskId, u64>,
    /// Ids in the order inserted: an entry whose number is not the id's in `ids` any more
    /// (removed, or inserted again since) is passed over.
    order: VecDeque<(TaskId, u64)>,
    next: u64,
}

impl Recent {
    fn insert(&mut self, id: TaskId, bound: usize) {
        self.next += 1;
        self.ids.insert(id, self.next);
        self.order.push_back((id, self.next));
        while self.order.len() > bound {
            if let Some((old, n)) = self.order.pop_front()
                && self.ids.get(&old) == Some(&n)
            {
                self.ids.remove(&old);
            }
        }
    }

    fn contains(&self, id: &TaskId) -> bool {
        self.ids.contains_key(id)
    }

    fn remove(&mut self, id: &TaskId) {
        self.ids.remove(id);
        if self.ids.is_empty() {
            self.order.clear();
        }
    }
}

impl std::fmt::Debug for Failover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Failover")
            .field("primary", &self.primary.kind())
            .field("local", &self.local.kind())
            .finish_non_exhaustive()
    }
}

impl Failover {
    /// How long a shared store that failed is left alone before a call tries it again.
    pub const RETRY: Duration = Duration::from_secs(5);

    /// How many tasks kept locally after a failed append to the shared store are remembered
    /// (so that a copy the shared store applied anyway is removed there, not replayed), and
    /// how many tasks the shared store handed out (so that storing one again is never taken
    /// for a new task).
    const REMEMBERED: usize = 65_536;

    /// Keep tasks in `primary`, and in `local` while `primary` fails.
    pub fn new(primary: impl Store, local: impl Store) -> Self {
        Self {
            primary: Arc::new(primary),
            local: Arc::new(local),
            state: Mutex::new(State::default()),
            switched: Every::new(LOG_EVERY),
        }
    }

    /// Whether to ask the shared store now: yes unless it failed within [`Self::RETRY`]; once
    /// that has passed, yes for this caller only (the next ones wait another `RETRY`).
    fn try_primary(&self) -> bool {
        let mut s = self.state();
        let now = Instant::now();
        match s.down_until {
            Some(until) if now < until => false,
            Some(_) => {
                s.down_until = Some(now + Self::RETRY);
                true
            }
            None => true,
        }
    }

    /// What the shared store's answer says of it: a failure to reach it leaves it alone for
    /// [`Self::RETRY`]; any other answer means it is back.
    fn primary_answered<T>(&self, r: &Result<T, StoreError>) {
        let unreachable =
            matches!(r, Err(e) if matches!(e.kind(), StoreErrorKind::Io | StoreErrorKind::Closed));
        let mut s = self.state();
        if unreachable {
            s.down_until = Some(Instant::now() + Self::RETRY);
        } else if s.down_until.take().is_some() {
            // Said once per warning let through: a store that flaps (reads answered, commits
            // refused) is not said on every answer.
            let Some(held) = self.switched.reset() else {
                return;
            };
            tracing::info!(
                primary = self.primary.kind(),
                also_kept_locally = held,
                "the shared store answers again (`also_kept_locally`: commits kept locally \
                 since the last warning)"
            );
        }
    }

    fn left_alone(&self) -> StoreError {
        let e = StoreError::new(
            StoreErrorKind::Io,
            format!(
                "the shared {} store failed and is tried again at most every {:?}",
                self.primary.kind(),
                Self::RETRY
            ),
        );
        e.unapplied()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn mark_local(&self, tasks: &[Task]) {
        let mut s = self.state();
        s.local_ids.extend(tasks.iter().map(Task::id));
    }

    /// Tasks the shared store handed out that the local one keeps or kept (an append there
    /// that timed out and was applied when it resumed, or a crash between the two parts of a
    /// commit): replayed from the local store only, so removed from the shared one. One that
    /// cannot be removed now is released, and removed when handed out again.
    async fn remove_copies(&self, queue: Queue, copies: Vec<Task>) {
        if copies.is_empty() {
            return;
        }
        let ids: Vec<TaskId> = copies.iter().map(Task::id).collect();
        let ops = ids.iter().map(|id| Op::Remove(queue, *id)).collect();
        let removed = self.primary.commit(ops).await;
        self.primary_answered(&removed);
        match removed {
            Ok(()) => {
                tracing::info!(primary = self.primary.kind(), queue = %queue, removed = ids.len(),
                    "removed from the shared store tasks the local store keeps or kept \
                     (appended there after their commit had failed)");
                let mut s = self.state();
                for id in &ids {
                    s.doubtful.remove(id);
                }
            }
            Err(e) => {
                tracing::warn!(primary = self.primary.kind(), queue = %queue, error = %e,
                    "could not remove from the shared store tasks the local store keeps or \
                     kept: they are released and removed when handed out again");
                for id in ids {
                    self.primary.release(queue, id);
                }
            }
        }
    }

    fn is_local(&self, op: &Op) -> bool {
        self.state().local_ids.contains(&op_id(op))
    }

    /// Whether a commit the shared store failed on only appends new tasks (calls just kept),
    /// which may go to the local store instead: every op a put of a task never attempted
    /// that the shared store did not hand out. A removal, a move or a reschedule of a task it
    /// holds must happen there.
    fn only_new(&self, ops: &[Op]) -> bool {
        let s = self.state();
        ops.iter().all(|op| {
            matches!(op, Op::Put(_, t) if t.attempts() == 0 && !s.handed_out.contains(&t.id()))
        })
    }
}

fn op_id(op: &Op) -> TaskId {
    match op {
        Op::Put(_, t) => t.id(),
        Op::Remove(_, id) => *id,
    }
}

impl Store for Failover {
    fn commit(&self, ops: Vec<Op>) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let (local, shared): (Vec<Op>, Vec<Op>) =
                ops.into_iter().partition(|op| self.is_local(op));
            // The shared store's part first: if it fails, nothing of the commit is applied.
            if !shared.is_empty() {
                let result = if self.try_primary() {
                    let r = self.primary.commit(shared.clone()).await;
                    self.primary_answered(&r);
                    r
                } else {
                    Err(self.left_alone())
                };
                match result {
                    Ok(()) => {
                        let mut s = self.state();
                        for op in &shared {
                            s.handed_out.remove(&op_id(op));
                        }
                    }
                    // Only new tasks (appends of calls just kept) move to the local store:
                    // a removal, a move or a reschedule of a task the shared store holds must
                    // happen there, so it fails and is tried again.
                    Err(e)
                        if matches!(e.kind(), StoreErrorKind::Io | StoreErrorKind::Closed)
                            && self.only_new(&shared) =>
                    {
                        if let Some(held) = self.switched.ready() {
                            tracing::warn!(primary = self.primary.kind(), local = self.local.kind(),
                                error = %e, also_kept_locally = held,
                                "the shared store cannot be reached: keeping tasks in the local store");
                        }
                        let ids: Vec<TaskId> = shared
                            .iter()
                            .filter_map(|op| match op {
                                Op::Put(_, t) => Some(t.id()),
                                Op::Remove(..) => None,
                            })
                            .collect();
                        self.local.commit(shared).await?;
                        let mut s = self.state();
                        for id in ids {
                            s.local_ids.insert(id);
                            // A commit that may still be applied there (a timeout).
                            if !e.surely_unapplied() {
                                s.doubtful.insert(id, Self::REMEMBERED);
                            }
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
            if !local.is_empty() {
                let removed: Vec<TaskId> = local
                    .iter()
                    .filter_map(|op| match op {
                        Op::Remove(_, id) => Some(*id),
                        Op::Put(..) => None,
                    })
                    .collect();
                let kept: HashSet<TaskId> = local
                    .iter()
                    .filter_map(|op| match op {
                        Op::Put(_, t) => Some(t.id()),
                        Op::Remove(..) => None,
                    })
                    .collect();
                self.local.commit(local).await?;
                let mut s = self.state();
                for id in removed.into_iter().filter(|id| !kept.contains(id)) {
                    s.local_ids.remove(&id);
                }
            }
            Ok(())
        })
    }

    fn due(&self, queue: Queue, now_ms: u64, limit: usize) -> StoreFuture<'_, Vec<Task>> {
        Box::pin(async move {
            let mut tasks = self.local.due(queue, now_ms, limit).await?;
            self.mark_local(&tasks);
            // Asked even for none: a shared store heartbeats the tasks this instance holds.
            let more = if self.try_primary() {
                let r = self
                    .primary
                    .due(queue, now_ms, limit.saturating_sub(tasks.len()))
                    .await;
                self.primary_answered(&r);
                r
            } else {
                Err(self.left_alone())
            };
            match more {
                Ok(more) => {
                    let (copies, more): (Vec<Task>, Vec<Task>) = {
                        let s = self.state();
                        more.into_iter().partition(|t| {
                            s.local_ids.contains(&t.id()) || s.doubtful.contains(&t.id())
                        })
                    };
                    {
                        let mut s = self.state();
                        for t in &more {
                            s.handed_out.insert(t.id(), Self::REMEMBERED);
                        }
                    }
                    tasks.extend(more);
                    self.remove_copies(queue, copies).await;
                }
                Err(e) if tasks.is_empty() => return Err(e),
                Err(_) => {}
            }
            Ok(tasks)
        })
    }

    fn release(&self, queue: Queue, id: TaskId) {
        if self.state().local_ids.contains(&id) {
            self.local.release(queue, id);
        } else {
            self.state().handed_out.remove(&id);
            self.primary.release(queue, id);
        }
    }

    fn list(
        &self,
        queue: Queue,
        after: Option<TaskId>,
        limit: usize,
    ) -> StoreFuture<'_, Vec<Task>> {
        Box::pin(async move {
            // The local store's page first, then the shared one's.
            let in_local = after.is_none_or(|a| self.state().local_ids.contains(&a));
            if !in_local {
                return self.primary.list(queue, after, limit).await;
            }
            let mut tasks = self.local.list(queue, after, limit).await?;
            self.mark_local(&tasks);
            if tasks.len() < limit {
                // While the shared store cannot be reached, the local store's tasks are
                // listed alone (a review API answered 503 for the whole of an outage, the
                // tasks kept locally there to see); with none, its error.
                let more = if self.try_primary() {
                    let r = self.primary.list(queue, None, limit - tasks.len()).await;
                    self.primary_answered(&r);
                    r
                } else {
                    Err(self.left_alone())
                };
                match more {
                    Ok(more) => tasks.extend(more),
                    Err(e) if tasks.is_empty() => return Err(e),
                    Err(e) => tracing::warn!(primary = self.primary.kind(), queue = %queue,
                        error = %e, listed = tasks.len(),
                        "the shared store cannot be reached: listing the local store's tasks alone"),
                }
            }
            Ok(tasks)
        })
    }

    fn get(&self, queue: Queue, id: TaskId) -> StoreFuture<'_, Option<Task>> {
        Box::pin(async move {
            if let Some(t) = self.local.get(queue, id).await? {
                self.mark_local(std::slice::from_ref(&t));
                return Ok(Some(t));
            }
            self.primary.get(queue, id).await
        })
    }

    fn find_key<'a>(
        &'a self,
        class: &'a str,
        key: &'a str,
    ) -> StoreFuture<'a, Option<(Queue, TaskId)>> {
        Box::pin(async move {
            if let Some(found) = self.local.find_key(class, key).await? {
                return Ok(Some(found));
            }
            // The shared store unreachable: not found (the call is then kept locally).
            if !self.try_primary() {
                return Ok(None);
            }
            let found = self.primary.find_key(class, key).await;
            self.primary_answered(&found);
            Ok(found.unwrap_or(None))
        })
    }

    fn depth(&self, queue: Queue) -> Depth {
        let (a, b) = (self.primary.depth(queue), self.local.depth(queue));
        Depth {
            len: a.len + b.len,
            oldest_ms: match (a.oldest_ms, b.oldest_ms) {
                (Some(x), Some(y)) => Some(x.min(y)),
                (x, y) => x.or(y),
            },
        }
    }

    fn kind(&self) -> &'static str {
        "failover"
    }

    /// The store new tasks go to now: the local one while the shared one is left alone.
    fn usage(&self) -> Option<Usage> {
        let down = self
            .state()
            .down_until
            .is_some_and(|until| Instant::now() < until);
        if down {
            self.local.usage()
        } else {
            self.primary.usage()
        }
    }

    fn claim_timeout(&self) -> Option<Duration> {
        self.primary.claim_timeout()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;
    use crate::fallback::record::Payload;
    use crate::fallback::store::{MemoryStore, StoreError};

    /// A memory store that can be made unreachable.
    #[derive(Default)]
    struct Flaky {
        inner: MemoryStore,
        down: AtomicBool,
        /// Commits are applied, then answered with a failure (a timed-out append that ran).
        late: AtomicBool,
        /// Calls that reached it (commits and reads).
        asked: AtomicUsize,
    }

    impl Flaky {
        fn check(&self) -> Result<(), StoreError> {
            self.asked.fetch_add(1, Ordering::SeqCst);
            if self.down.load(Ordering::SeqCst) {
                Err(StoreError::new(StoreErrorKind::Io, "unreachable"))
            } else {
                Ok(())
            }
        }
    }

    impl Store for Arc<Flaky> {
        fn commit(&self, ops: Vec<Op>) -> StoreFuture<'_, ()> {
            if self.late.load(Ordering::SeqCst) {
                let this = self.clone();
                return Box::pin(async move {
                    this.inner.commit(ops).await?;
                    Err(StoreError::new(StoreErrorKind::Io, "timed out"))
                });
            }
            match self.check() {
                Ok(()) => self.inner.commit(ops),
                Err(e) => Box::pin(std::future::ready(Err(e))),
            }
        }
        fn due(&self, queue: Queue, now_ms: u64, limit: usize) -> StoreFuture<'_, Vec<Task>> {
            match self.check() {
                Ok(()) => self.inner.due(queue, now_ms, limit),
                Err(e) => Box::pin(std::future::ready(Err(e))),
            }
        }
        fn release(&self, queue: Queue, id: TaskId) {
            self.inner.release(queue, id)
        }
        fn list(&self, q: Queue, a: Option<TaskId>, l: usize) -> StoreFuture<'_, Vec<Task>> {
            self.inner.list(q, a, l)
        }
        fn get(&self, queue: Queue, id: TaskId) -> StoreFuture<'_, Option<Task>> {
            self.inner.get(queue, id)
        }
        fn find_key<'a>(
            &'a self,
            class: &'a str,
            key: &'a str,
        ) -> StoreFuture<'a, Option<(Queue, TaskId)>> {
            self.inner.find_key(class, key)
        }
        fn depth(&self, queue: Queue) -> Depth {
            self.inner.depth(queue)
        }
        fn kind(&self) -> &'static str {
            "flaky"
        }
    }

    fn task() -> Task {
        Task::new("c", None, Payload::Bytes(vec![1]))
    }

    /// A failover whose shared store holds one task, handed out to it, and then cannot be
    /// reached.
    async fn handed_out_then_down() -> (Arc<Flaky>, Failover, Task) {
        let primary = Arc::new(Flaky::default());
        let f = Failover::new(primary.clone(), MemoryStore::default());
        f.commit(vec![Op::Put(Queue::Retry, task())]).await.unwrap();
        let mut due = f.due(Queue::Retry, u64::MAX, 10).await.unwrap();
        assert_eq!(due.len(), 1);
        primary.down.store(true, Ordering::SeqCst);
        (primary, f, due.remove(0))
    }

    #[tokio::test(start_paused = true)]
    async fn only_new_tasks_fail_over_and_nothing_is_dropped() {
        let (primary, f, held) = handed_out_then_down().await;
        // A new task is kept locally.
        let new = task();
        f.commit(vec![Op::Put(Queue::Spool, new.clone())])
            .await
            .unwrap();
        assert_eq!(f.local.depth(Queue::Spool).len, 1);
        // Acknowledging or moving the task the shared store holds fails: it is not dropped.
        let err = f.commit(vec![Op::Remove(Queue::Retry, held.id())]).await;
        assert!(err.is_err());
        let mut again = held.clone();
        again.failed("HTTP 503".into(), 0);
        assert!(f.commit(vec![Op::Put(Queue::Retry, again)]).await.is_err());
        primary.down.store(false, Ordering::SeqCst);
        // Tried again once the shared store has been left alone for `RETRY`.
        assert!(
            f.commit(vec![Op::Remove(Queue::Retry, held.id())])
                .await
                .is_err()
        );
        tokio::time::advance(Failover::RETRY).await;
        f.commit(vec![Op::Remove(Queue::Retry, held.id())])
            .await
            .unwrap();
        assert_eq!(primary.depth(Queue::Retry).len, 0);
        // The local task is removed from the local store.
        f.commit(vec![Op::Remove(Queue::Spool, new.id())])
            .await
            .unwrap();
        assert_eq!(f.depth(Queue::Spool).len, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_the_shared_store_handed_out_is_never_kept_locally_as_new() {
        // A failed probe stores its task again with its attempts as they were (0): taken for
        // a new task while Redis was down, it was kept locally too and replayed twice (a
        // user's trial: once from the local copy, once when another instance took over the
        // Redis entry, still claimed).
        let (primary, f, mut probed) = handed_out_then_down().await;
        probed.set_answer("HTTP 503".into());
        assert_eq!(probed.attempts(), 0);
        let err = f.commit(vec![Op::Put(Queue::Retry, probed.clone())]).await;
        assert!(err.is_err(), "stored again where it is held, or not at all");
        assert_eq!(f.local.depth(Queue::Retry).len, 0, "no local copy");
        // Once the shared store answers, the reschedule goes there; a new task after it still
        // fails over when it is down.
        primary.down.store(false, Ordering::SeqCst);
        tokio::time::advance(Failover::RETRY).await;
        f.commit(vec![Op::Put(Queue::Retry, probed)]).await.unwrap();
        assert_eq!(primary.depth(Queue::Retry).len, 1);
        primary.down.store(true, Ordering::SeqCst);
        f.commit(vec![Op::Put(Queue::Retry, task())]).await.unwrap();
        assert_eq!(f.local.depth(Queue::Retry).len, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_local_tasks_are_listed_while_the_shared_store_cannot_be_reached() {
        let primary = Arc::new(Flaky::default());
        let f = Failover::new(primary.clone(), MemoryStore::default());
        primary.down.store(true, Ordering::SeqCst);
        let kept = task();
        f.commit(vec![Op::Put(Queue::Review, kept.clone())])
            .await
            .unwrap();
        let listed = f.list(Queue::Review, None, 10).await.unwrap();
        assert_eq!(listed.iter().map(Task::id).collect::<Vec<_>>(), [kept.id()]);
        // None kept locally: the shared store's error, not an empty page.
        assert!(f.list(Queue::Spool, None, 10).await.is_err());
    }

    #[test]
    fn the_remembered_ids_forget_the_oldest_and_nothing_inserted_again() {
        let mut r = Recent::default();
        let ids: Vec<TaskId> = (0..4).map(|_| task().id()).collect();
        for id in &ids[..3] {
            r.insert(*id, 3);
        }
        r.remove(&ids[0]);
        r.insert(ids[0], 3); // again: its first entry is passed over, not taken for it
        r.insert(ids[3], 3);
        assert!(!r.contains(&ids[1]), "the oldest forgotten");
        assert!(r.contains(&ids[0]) && r.contains(&ids[2]) && r.contains(&ids[3]));
    }

    #[tokio::test(start_paused = true)]
    async fn an_append_the_shared_store_applied_after_failing_is_replayed_once() {
        // A hung Redis ran a timed-out append when it resumed: the call, kept locally too, was
        // replayed from both stores, and the shared store's copy stayed pending there.
        let primary = Arc::new(Flaky::default());
        let f = Failover::new(primary.clone(), MemoryStore::default());
        primary.late.store(true, Ordering::SeqCst);
        let (first, second) = (task(), task());
        for t in [&first, &second] {
            f.commit(vec![Op::Put(Queue::Spool, t.clone())])
                .await
                .unwrap();
            tokio::time::advance(Failover::RETRY).await;
        }
        primary.late.store(false, Ordering::SeqCst);
        assert_eq!(f.local.depth(Queue::Spool).len, 2);
        assert_eq!(primary.depth(Queue::Spool).len, 2);
        // The first is replayed from the local store and acknowledged before the shared
        // store is read again.
        let due = f.due(Queue::Spool, u64::MAX, 1).await.unwrap();
        assert_eq!(due.iter().map(Task::id).collect::<Vec<_>>(), [first.id()]);
        f.commit(vec![Op::Remove(Queue::Spool, first.id())])
            .await
            .unwrap();
        let mut replayed = vec![first.id()];
        for _ in 0..3 {
            for t in f.due(Queue::Spool, u64::MAX, 10).await.unwrap() {
                replayed.push(t.id());
                f.commit(vec![Op::Remove(Queue::Spool, t.id())])
                    .await
                    .unwrap();
            }
        }
        assert_eq!(replayed, [first.id(), second.id()]);
        // Neither copy is left in the shared store.
        assert_eq!(primary.depth(Queue::Spool).len, 0);
        assert_eq!(f.depth(Queue::Spool).len, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_shared_store_that_failed_is_left_alone_then_tried_by_one_call() {
        // A hung Redis made every kept call wait for its timeout before failing over.
        let primary = Arc::new(Flaky::default());
        let f = Failover::new(primary.clone(), MemoryStore::default());
        primary.down.store(true, Ordering::SeqCst);
        f.commit(vec![Op::Put(Queue::Spool, task())]).await.unwrap();
        assert_eq!(primary.asked.load(Ordering::SeqCst), 1);
        // Left alone: kept locally, read locally, without asking it.
        for _ in 0..5 {
            f.commit(vec![Op::Put(Queue::Spool, task())]).await.unwrap();
        }
        assert_eq!(f.due(Queue::Spool, u64::MAX, 10).await.unwrap().len(), 6);
        assert_eq!(f.find_key("c", "k").await.unwrap(), None);
        assert_eq!(primary.asked.load(Ordering::SeqCst), 1);
        assert_eq!(f.local.depth(Queue::Spool).len, 6);
        // Back, and tried again after `RETRY`: one call asks it, and new tasks go there.
        primary.down.store(false, Ordering::SeqCst);
        tokio::time::advance(Failover::RETRY).await;
        f.commit(vec![Op::Put(Queue::Spool, task())]).await.unwrap();
        assert_eq!(primary.asked.load(Ordering::SeqCst), 2);
        assert_eq!(primary.depth(Queue::Spool).len, 1);
        assert_eq!(f.local.depth(Queue::Spool).len, 6);
        // Still down when tried: left alone for another `RETRY`.
        primary.down.store(true, Ordering::SeqCst);
        tokio::time::advance(Failover::RETRY).await;
        f.commit(vec![Op::Put(Queue::Spool, task())]).await.unwrap();
        f.commit(vec![Op::Put(Queue::Spool, task())]).await.unwrap();
        assert_eq!(primary.asked.load(Ordering::SeqCst), 3);
        assert_eq!(f.local.depth(Queue::Spool).len, 8);
    }
}
