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
/// A task stays in the store that kept it: its replays, moves and removal go there.
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
            if shared.is_empty() {
                return Ok(());
            }
            match self.primary.commit(shared.clone()).await {
                Ok(()) => Ok(()),
                Err(e) if matches!(e.kind(), StoreErrorKind::Io | StoreErrorKind::Closed) => {
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
                    let puts: Vec<Op> = shared
                        .into_iter()
                        .filter(|op| matches!(op, Op::Put(..)))
                        .collect();
                    self.local.commit(puts).await?;
                    self.state().local_ids.extend(ids);
                    Ok(())
                }
                Err(e) => Err(e),
            }
        })
    }

    fn due(&self, queue: Queue, now_ms: u64, limit: usize) -> StoreFuture<'_, Vec<Task>> {
        Box::pin(async move {
            let mut tasks = self.local.due(queue, now_ms, limit).await?;
            self.mark_local(&tasks);
            if tasks.len() < limit {
                match self.primary.due(queue, now_ms, limit - tasks.len()).await {
                    Ok(more) => tasks.extend(more),
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
