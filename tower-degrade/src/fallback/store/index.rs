//! The in-memory index every single-process store keeps beside its data: tasks per queue in id
//! order and in due order, the claims workers hold, and idempotency keys.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use super::{Depth, Op};
use crate::fallback::record::{Queue, Task, TaskId};

#[derive(Debug, Default)]
struct QueueIndex {
    /// Every task, and when it is due.
    due: BTreeMap<TaskId, u64>,
    /// The tasks not claimed, in due order: a claim takes a task out, a release or a put puts
    /// it back. (With the claimed ones left in, every claim walked past all of them: the
    /// tasks a worker parks while their class is unhealthy made each kept call's step cost
    /// as much as the parked tasks, and 70,000 parked slowed every class's calls.)
    by_due: BTreeSet<(u64, TaskId)>,
    claimed: HashSet<TaskId>,
}

type Key = (Arc<str>, Arc<str>);

/// See the [module docs](self).
#[derive(Debug, Default)]
pub(super) struct Index {
    queues: [QueueIndex; Queue::ALL.len()],
    keys: HashMap<Key, (Queue, TaskId)>,
    key_of: HashMap<TaskId, Key>,
    len: u64,
}

/// Queues whose tasks a client's retry with the same idempotency key finds again.
fn keyed(queue: Queue) -> bool {
    matches!(
        queue,
        Queue::Retry | Queue::Spool | Queue::Review | Queue::Journal
    )
}

impl Index {
    fn q(&self, queue: Queue) -> &QueueIndex {
        &self.queues[queue as usize]
    }

    fn q_mut(&mut self, queue: Queue) -> &mut QueueIndex {
        &mut self.queues[queue as usize]
    }

    /// Tasks held, the audit records of dropped tasks not counted (they are not work).
    pub(super) fn len(&self) -> u64 {
        self.len
    }

    pub(super) fn contains(&self, queue: Queue, id: TaskId) -> bool {
        self.q(queue).due.contains_key(&id)
    }

    /// How many tasks the store holds after `ops`.
    pub(super) fn len_after(&self, ops: &[Op]) -> u64 {
        let mut len = self.len as i64;
        let mut seen = HashSet::new();
        for op in ops {
            match op {
                Op::Put(Queue::Audit, _) | Op::Remove(Queue::Audit, _) => {}
                Op::Put(q, t) if !self.contains(*q, t.id()) && seen.insert((*q, t.id())) => {
                    len += 1
                }
                Op::Remove(q, id) if self.contains(*q, *id) && seen.insert((*q, *id)) => len -= 1,
                _ => {}
            }
        }
        len.max(0) as u64
    }

    pub(super) fn apply(&mut self, op: &Op) {
        match op {
            Op::Put(queue, task) => self.put(*queue, task),
            Op::Remove(queue, id) => self.remove(*queue, *id),
        }
    }

    pub(super) fn put(&mut self, queue: Queue, task: &Task) {
        let id = task.id();
        let q = self.q_mut(queue);
        q.claimed.remove(&id);
        // (A claimed task's old entry is not in `by_due`: removing it is then nothing.)
        match q.due.insert(id, task.due_ms()) {
            Some(old) => {
                q.by_due.remove(&(old, id));
            }
            None if queue != Queue::Audit => self.len += 1,
            None => {}
        }
        self.q_mut(queue).by_due.insert((task.due_ms(), id));
        if let (true, Some(key)) = (keyed(queue), task.client_key()) {
            let key: Key = (task.class().into(), key.into());
            self.keys.insert(key.clone(), (queue, id));
            self.key_of.insert(id, key);
        }
    }

    pub(super) fn remove(&mut self, queue: Queue, id: TaskId) {
        let q = self.q_mut(queue);
        q.claimed.remove(&id);
        // (A claimed task is not in `by_due`: removing it from there is then nothing.)
        if let Some(due) = q.due.remove(&id) {
            q.by_due.remove(&(due, id));
            if queue != Queue::Audit {
                self.len -= 1;
            }
            if keyed(queue)
                && let Some(key) = self.key_of.get(&id)
                && self.keys.get(key) == Some(&(queue, id))
            {
                self.keys.remove(key);
                self.key_of.remove(&id);
            }
        }
    }

    /// Claim up to `limit` unclaimed tasks due at `now_ms`: as many steps as it claims,
    /// however many tasks are claimed already.
    pub(super) fn claim_due(&mut self, queue: Queue, now_ms: u64, limit: usize) -> Vec<TaskId> {
        let q = &mut self.queues[queue as usize];
        let mut out = Vec::new();
        while out.len() < limit {
            match q.by_due.first() {
                Some(&(due, id)) if due <= now_ms => {
                    q.by_due.pop_first();
                    q.claimed.insert(id);
                    out.push(id);
                }
                _ => break,
            }
        }
        out
    }

    pub(super) fn release(&mut self, queue: Queue, id: TaskId) {
        let q = self.q_mut(queue);
        if q.claimed.remove(&id)
            && let Some(&due) = q.due.get(&id)
        {
            q.by_due.insert((due, id));
        }
    }

    pub(super) fn page(&self, queue: Queue, after: Option<TaskId>, limit: usize) -> Vec<TaskId> {
        let q = self.q(queue);
        let ids: Box<dyn Iterator<Item = &TaskId>> = match after {
            Some(a) => Box::new(
                q.due
                    .range((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded))
                    .map(|(id, _)| id),
            ),
            None => Box::new(q.due.keys()),
        };
        ids.take(limit).copied().collect()
    }

    pub(super) fn find_key(&self, class: &str, key: &str) -> Option<(Queue, TaskId)> {
        self.keys.get(&(Arc::from(class), Arc::from(key))).copied()
    }

    pub(super) fn depth(&self, queue: Queue) -> Depth {
        let q = self.q(queue);
        Depth {
            len: q.due.len() as u64,
            oldest_ms: q.due.keys().next().map(|id| id.created_ms()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fallback::record::Payload;

    fn task(key: &str) -> Task {
        Task::new("c", Some(key.into()), Payload::Bytes(vec![]))
    }

    #[test]
    fn claims_hide_tasks_until_put_back_or_released() {
        let mut ix = Index::default();
        let (a, b) = (task("a"), task("b"));
        ix.put(Queue::Spool, &a);
        ix.put(Queue::Spool, &b);
        let now = a.due_ms().max(b.due_ms());
        assert_eq!(ix.claim_due(Queue::Spool, now, 1), vec![a.id()]);
        assert_eq!(ix.claim_due(Queue::Spool, now, 10), vec![b.id()]);
        assert!(ix.claim_due(Queue::Spool, now, 10).is_empty());
        ix.release(Queue::Spool, b.id());
        assert_eq!(ix.claim_due(Queue::Spool, now, 10), vec![b.id()]);
        ix.put(Queue::Spool, &a);
        assert_eq!(ix.claim_due(Queue::Spool, now, 10), vec![a.id()]);
        assert_eq!(ix.len(), 2);
    }

    #[test]
    fn keys_follow_a_task_that_moves_and_go_when_it_is_done() {
        let mut ix = Index::default();
        let a = task("k");
        ix.put(Queue::Retry, &a);
        assert_eq!(ix.find_key("c", "k"), Some((Queue::Retry, a.id())));
        let generated = Task::new("c", None, Payload::Bytes(vec![]));
        ix.put(Queue::Retry, &generated);
        assert_eq!(
            ix.find_key("c", &generated.key()),
            None,
            "only client keys are looked up"
        );
        ix.remove(Queue::Retry, generated.id());
        ix.put(Queue::Review, &a);
        ix.remove(Queue::Retry, a.id());
        assert_eq!(ix.find_key("c", "k"), Some((Queue::Review, a.id())));
        ix.remove(Queue::Review, a.id());
        assert_eq!(ix.find_key("c", "k"), None);
        assert_eq!(ix.len(), 0);
        let ops = [
            Op::Put(Queue::Spool, a.clone()),
            Op::Put(Queue::Spool, a.clone()),
        ];
        assert_eq!(ix.len_after(&ops), 1);
    }
}
