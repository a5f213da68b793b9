//! [`MemoryStore`]: kept tasks in memory.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use super::index::Index;
use super::{Depth, Op, Store, StoreError, StoreErrorKind, StoreFuture, Usage};
use crate::fallback::record::{Queue, Task, TaskId};

/// Kept tasks in memory, bounded: for tests, and for work that may be lost with the process.
/// What it keeps does **not** survive a restart; use
/// [`EmbeddedStore`](super::EmbeddedStore) (feature `embedded`) for that.
#[derive(Debug)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    capacity: u64,
}

#[derive(Debug, Default)]
struct Inner {
    index: Index,
    tasks: HashMap<(Queue, TaskId), Task>,
}

impl MemoryStore {
    /// A store holding at most `capacity` tasks over all queues, the audit records of dropped
    /// tasks not counted (at least 1 to keep any: at 0 it refuses every task, and says so in
    /// each refusal).
    pub fn new(capacity: u64) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            capacity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The critical sections do not panic; a poisoned lock still holds consistent data.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new(100_000)
    }
}

impl Store for MemoryStore {
    fn commit(&self, ops: Vec<Op>) -> StoreFuture<'_, ()> {
        let mut inner = self.lock();
        let result = if inner.index.len_after(&ops) > self.capacity.max(inner.index.len()) {
            Err(StoreError::new(
                StoreErrorKind::Full,
                if self.capacity == 0 {
                    "the memory store's capacity is 0: it refuses every task (`MemoryStore::new(0)`)"
                        .to_owned()
                } else {
                    format!("the memory store is full ({} tasks)", self.capacity)
                },
            ))
        } else {
            for op in ops {
                inner.index.apply(&op);
                match op {
                    Op::Put(q, t) => {
                        inner.tasks.insert((q, t.id()), t);
                    }
                    Op::Remove(q, id) => {
                        inner.tasks.remove(&(q, id));
                    }
                }
            }
            Ok(())
        };
        Box::pin(std::future::ready(result))
    }

    fn due(&self, queue: Queue, now_ms: u64, limit: usize) -> StoreFuture<'_, Vec<Task>> {
        let mut inner = self.lock();
        let ids = inner.index.claim_due(queue, now_ms, limit);
        let tasks = ids
            .iter()
            .filter_map(|id| inner.tasks.get(&(queue, *id)).cloned())
            .collect();
        Box::pin(std::future::ready(Ok(tasks)))
    }

    fn release(&self, queue: Queue, id: TaskId) {
        self.lock().index.release(queue, id);
    }

    fn list(
        &self,
        queue: Queue,
        after: Option<TaskId>,
        limit: usize,
    ) -> StoreFuture<'_, Vec<Task>> {
        let inner = self.lock();
        let tasks = inner
            .index
            .page(queue, after, limit)
            .iter()
            .filter_map(|id| inner.tasks.get(&(queue, *id)).cloned())
            .collect();
        Box::pin(std::future::ready(Ok(tasks)))
    }

    fn get(&self, queue: Queue, id: TaskId) -> StoreFuture<'_, Option<Task>> {
        let task = self.lock().tasks.get(&(queue, id)).cloned();
        Box::pin(std::future::ready(Ok(task)))
    }

    fn find_key<'a>(
        &'a self,
        class: &'a str,
        key: &'a str,
    ) -> StoreFuture<'a, Option<(Queue, TaskId)>> {
        let found = self.lock().index.find_key(class, key);
        Box::pin(std::future::ready(Ok(found)))
    }

    fn depth(&self, queue: Queue) -> Depth {
        self.lock().index.depth(queue)
    }

    fn kind(&self) -> &'static str {
        "memory"
    }

    fn usage(&self) -> Option<Usage> {
        Some(Usage {
            held: self.lock().index.len(),
            capacity: self.capacity,
        })
    }
}
