//! [`ManualReview`]: the durable queue a person drains.

use std::sync::Arc;

use super::record::{Queue, Task, TaskId};
use super::shared::RouterShared;
use super::store::{Depth, Op, StoreError, StoreErrorKind};

/// The longest `by` or `reason` of a drop, in bytes.
const MAX_AUDIT_TEXT: usize = 1024;

/// Whether a drop's `by` and `reason`, kept in its audit record and logged, are a person's
/// name and a sentence: not blank, no control characters (a line break or a terminal escape
/// would forge lines of the log and the record), at most [`MAX_AUDIT_TEXT`] bytes each.
pub(crate) fn audit_text(by: &str, reason: &str) -> Result<(), String> {
    for (field, text) in [("by", by), ("reason", reason)] {
        if text.trim().is_empty() {
            return Err(format!(
                "`{field}` is missing or blank: it is kept in the audit record, and must say \
                 something"
            ));
        }
        if let Some(c) = text.chars().find(|c| c.is_control()) {
            return Err(format!(
                "`{field}` holds a control character ({:?}): it is kept in the audit record \
                 and logged, as one line of text",
                c
            ));
        }
        if text.len() > MAX_AUDIT_TEXT {
            return Err(format!(
                "`{field}` is kept in the audit record: at most {MAX_AUDIT_TEXT} bytes, not {}",
                text.len()
            ));
        }
    }
    Ok(())
}

/// One page of a queue, in the order tasks were kept.
#[derive(Debug, Clone)]
pub struct Page {
    /// The tasks.
    pub tasks: Vec<Task>,
    /// Where the next page starts (`after`), if there may be one.
    pub next: Option<TaskId>,
}

/// The manual-review queue: tasks whose retries ran out, that got a non-retryable answer, or
/// that a policy sent to `manual_review`. A person lists them, looks at one, replays it now
/// ([`requeue`](Self::requeue)) or drops it with a reason, which is kept in an audit record.
/// Get it from [`FallbackRouter::review`](super::FallbackRouter::review); see
/// [`admin_router`](Self::admin_router) (feature `axum`) for an HTTP front.
///
/// Actions on one router are taken one at a time, so of a requeue and a drop of the same
/// task (two operators, a double click) only the first succeeds; the second finds the task
/// gone and returns `false`. With a store shared by several instances, the store refuses the
/// second (`RedisStore` does, with [`StoreErrorKind::Gone`]), and it returns `false` too.
#[derive(Debug, Clone)]
pub struct ManualReview {
    shared: Arc<RouterShared>,
}

impl ManualReview {
    pub(crate) fn new(shared: Arc<RouterShared>) -> Self {
        Self { shared }
    }

    /// Up to `limit` tasks (at most 1,000) after `after`, oldest first.
    pub async fn list(&self, after: Option<TaskId>, limit: usize) -> Result<Page, StoreError> {
        self.page(Queue::Review, after, limit).await
    }

    /// Dropped tasks with who dropped them and why, oldest first.
    pub async fn audit(&self, after: Option<TaskId>, limit: usize) -> Result<Page, StoreError> {
        self.page(Queue::Audit, after, limit).await
    }

    async fn page(
        &self,
        queue: Queue,
        after: Option<TaskId>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let limit = limit.clamp(1, 1000);
        let tasks = self.shared.store.list(queue, after, limit).await?;
        let next = (tasks.len() == limit)
            .then(|| tasks.last().map(Task::id))
            .flatten();
        Ok(Page { tasks, next })
    }

    /// One task.
    pub async fn show(&self, id: TaskId) -> Result<Option<Task>, StoreError> {
        self.shared.store.get(Queue::Review, id).await
    }

    /// Replay the task now: it moves to `delayed_retry`, due at once, with its attempts reset
    /// (and a new deadline). `false` if it is not in the queue.
    pub async fn requeue(&self, id: TaskId) -> Result<bool, StoreError> {
        let _one = self.shared.reviewing.lock().await;
        let Some(task) = self.show(id).await? else {
            return Ok(false);
        };
        let deadline = self
            .shared
            .retry
            .deadline
            .map(|d| super::schedule::after(self.shared.clock.now_ms(), d));
        let mut task = task.with_deadline(deadline).with_reason("requeued");
        task.requeued(self.shared.clock.now_ms());
        if !self
            .act(vec![
                Op::Remove(Queue::Review, id),
                Op::Put(Queue::Retry, task),
            ])
            .await?
        {
            return Ok(false);
        }
        tracing::info!(service = %self.shared.service, task = %id, "manual review: requeued");
        self.shared.wake.notify_one();
        Ok(true)
    }

    /// Drop the task, keeping `by` and `reason` in an audit record. `false` if it is not in
    /// the queue. Both must say something (not blank), without control characters, in at most
    /// 1,024 bytes: an error of kind [`StoreErrorKind::Invalid`] otherwise, and nothing is
    /// dropped.
    pub async fn drop_task(&self, id: TaskId, by: &str, reason: &str) -> Result<bool, StoreError> {
        audit_text(by, reason).map_err(|why| StoreError::new(StoreErrorKind::Invalid, why))?;
        let _one = self.shared.reviewing.lock().await;
        let Some(mut task) = self.show(id).await? else {
            return Ok(false);
        };
        task.set_answer(format!("dropped by {by}: {reason}"));
        if !self
            .act(vec![
                Op::Remove(Queue::Review, id),
                Op::Put(Queue::Audit, task),
            ])
            .await?
        {
            return Ok(false);
        }
        tracing::info!(service = %self.shared.service, task = %id, by, reason,
            "manual review: dropped");
        // The worker's next step reports the queues' depth gauges.
        self.shared.wake.notify_one();
        Ok(true)
    }

    /// Commit a review action: `false` when the store says another instance acted on the
    /// task first (`Gone`).
    async fn act(&self, ops: Vec<Op>) -> Result<bool, StoreError> {
        match self.shared.store.commit(ops).await {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == StoreErrorKind::Gone => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// How many tasks wait for review, and the oldest's age.
    pub fn depth(&self) -> Depth {
        self.shared.store.depth(Queue::Review)
    }
}
