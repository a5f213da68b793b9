//! [`Failover`]: a shared store, and a local one for when the shared one cannot be reached.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{Depth, Op, Store, StoreErrorKind, StoreFuture};
use crate::fallback::record::{Queue, Task, TaskId};

/// Keeps tasks in `primary` (say a [`RedisStore`](super::RedisStore)) and, while it cannot be
/// reached, in `local` (an [`EmbeddedStore`](super::EmbeddedStore)) instead of refusing the
/// calls; each switch is logged (at most one warning per 10 s). The worker replays from both,
/// what the local store kept first. Without it, a store that cannot be reached means the
/// diverted call gets the reject answer (`not_kept`): choose by wrapping the store or not.
///
/// A task stays in the store that kept it: its replays, moves and removal go there. Only new
/// tasks fail over: a removal or a move of a task the shared store holds fails while it cannot
/// be reached (the worker stores it again later, the task not replayed meanwhile), so nothing
/// is dropped or replayed twice for it. An idempotency key sent again while the shared store
/// cannot be reached is not found there: the call is kept locally as a second task, replayed
/// with the same key (the effect is once for an application that applies each key once).
pub struct Failover {
    primary: Arc<dyn Store>,
    local: Arc<dyn Store>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Tasks kept in the local store.
    local_ids: HashSet<TaskId>,
    last_warning: Option<Instant>,
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
    /// Keep tasks in `primary`, and in `local` while `primary` fails.
    pub fn new(primary: impl Store, local: impl Store) -> Self {
        Self {
            primary: Arc::new(primary),
            local: Arc::new(local),
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn mark_local(&self, tasks: &[Task]) {
        let mut s = self.state();
        s.local_ids.extend(tasks.iter().map(Task::id));
    }

    fn is_local(&self, op: &Op) -> bool {
        let id = match op {
            Op::Put(_, t) => t.id(),
            Op::Remove(_, id) => *id,
        };
        self.state().local_ids.contains(&id)
    }
}

impl Store for Failover {
    fn commit(&self, ops: Vec<Op>) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let (local, shared): (Vec<Op>, Vec<Op>) =
                ops.into_iter().partition(|op| self.is_local(op));
            // The shared store's part first: if it fails, nothing of the commit is applied.
            if !shared.is_empty() {
                match self.primary.commit(shared.clone()).await {
                    Ok(()) => {}
                    // Only new tasks (appends of calls just kept) move to the local store:
                    // a removal, a move or a reschedule of a task the shared store holds must
                    // happen there, so it fails and is tried again.
                    Err(e)
                        if matches!(e.kind(), StoreErrorKind::Io | StoreErrorKind::Closed)
                            && shared
                                .iter()
                                .all(|op| matches!(op, Op::Put(_, t) if t.attempts() == 0)) =>
                    {
                        {
                            let mut s = self.state();
                            if s.last_warning
                                .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
                            {
                                s.last_warning = Some(Instant::now());
                                tracing::warn!(primary = self.primary.kind(), local = self.local.kind(),
                                    error = %e, "the shared store cannot be reached: keeping tasks in the local store");
                            }
                        }
                        let ids: Vec<TaskId> = shared
                            .iter()
                            .filter_map(|op| match op {
                                Op::Put(_, t) => Some(t.id()),
                                Op::Remove(..) => None,
                            })
                            .collect();
                        self.local.commit(shared).await?;
                        self.state().local_ids.extend(ids);
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
            if tasks.len() < limit {
                match self.primary.due(queue, now_ms, limit - tasks.len()).await {
                    Ok(more) => {
                        let local: HashSet<TaskId> = tasks.iter().map(Task::id).collect();
                        for t in more {
                            // A task in both stores (a crash between the two parts of a
                            // commit) is replayed from the local one only.
                            if local.contains(&t.id()) {
                                self.primary.release(queue, t.id());
                            } else {
                                tasks.push(t);
                            }
                        }
                    }
                    Err(e) if tasks.is_empty() => return Err(e),
                    Err(_) => {}
                }
            }
            Ok(tasks)
        })
    }

    fn release(&self, queue: Queue, id: TaskId) {
        if self.state().local_ids.contains(&id) {
            self.local.release(queue, id);
        } else {
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
                tasks.extend(self.primary.list(queue, None, limit - tasks.len()).await?);
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
            Ok(self.primary.find_key(class, key).await.unwrap_or(None))
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
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::fallback::record::Payload;
    use crate::fallback::store::{MemoryStore, StoreError};

    /// A memory store that can be made unreachable.
    #[derive(Default)]
    struct Flaky {
        inner: MemoryStore,
        down: AtomicBool,
    }

    impl Flaky {
        fn check(&self) -> Result<(), StoreError> {
            if self.down.load(Ordering::SeqCst) {
                Err(StoreError::new(StoreErrorKind::Io, "unreachable"))
            } else {
                Ok(())
            }
        }
    }

    impl Store for Arc<Flaky> {
        fn commit(&self, ops: Vec<Op>) -> StoreFuture<'_, ()> {
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

    #[tokio::test]
    async fn only_new_tasks_fail_over_and_nothing_is_dropped() {
        let primary = Arc::new(Flaky::default());
        let f = Failover::new(primary.clone(), MemoryStore::default());
        let held = task();
        f.commit(vec![Op::Put(Queue::Retry, held.clone())])
            .await
            .unwrap();
        let due = f.due(Queue::Retry, u64::MAX, 10).await.unwrap();
        assert_eq!(due.len(), 1);
        primary.down.store(true, Ordering::SeqCst);
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
}
