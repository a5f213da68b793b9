//! Where kept tasks live: the [`Store`] trait (governor's `StateStore` shape: the router and its
//! workers only see the trait), the in-memory [`MemoryStore`] (tests, and work that may be
//! lost with the process), the durable `EmbeddedStore` (feature `embedded`), Redis Streams
//! shared by several instances (`RedisStore`, feature `redis`), and [`Failover`] from a shared
//! store to a local one.
//!
//! A store applies a batch of [`Op`]s atomically and durably: when [`Store::commit`] resolves
//! `Ok`, the batch survives a crash. Workers take due tasks with [`Store::due`], which *claims*
//! them: a claimed task is not handed out again until it is removed, put back (rescheduled or
//! moved), or [released](Store::release).

mod failover;
mod index;
mod memory;

#[cfg(feature = "embedded")]
mod embedded;
#[cfg(feature = "redis")]
mod redis;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

#[cfg(feature = "embedded")]
#[cfg_attr(docsrs, doc(cfg(feature = "embedded")))]
pub use self::embedded::{EmbeddedStore, EmbeddedStoreBuilder};
pub use self::failover::Failover;
pub use self::memory::MemoryStore;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use self::redis::{RedisStore, RedisStoreBuilder};
use super::record::{Queue, Task, TaskId};

/// The future of a store operation.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// One change in a [`Store::commit`] batch.
// Ops live for one commit; boxing the task would cost an allocation per append.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Op {
    /// Insert or replace the task in the queue (and release its claim).
    Put(Queue, Task),
    /// Remove the task from the queue (and release its claim). Removing a missing task is not
    /// an error, but from [`Queue::Review`] in a store several instances share
    /// ([`Store::commit`]).
    Remove(Queue, TaskId),
}

/// How many tasks a queue holds and how old the oldest is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Depth {
    /// Tasks in the queue.
    pub len: u64,
    /// The oldest task's creation time, milliseconds since the Unix epoch.
    pub oldest_ms: Option<u64>,
}

/// How full a store is: the tasks it holds against its capacity (the manual-review audit
/// records are in neither: they are not work).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Tasks held, every queue but the audit together.
    pub held: u64,
    /// The most it holds.
    pub capacity: u64,
}

/// Storage for kept tasks. See the [module docs](self).
pub trait Store: Send + Sync + 'static {
    /// Apply `ops` atomically and durably. A batch that would take the store over its
    /// capacity fails with [`StoreErrorKind::Full`] and changes nothing. A store shared by
    /// several instances should also refuse, with [`StoreErrorKind::KeyTaken`], a put under a
    /// client's idempotency key that another kept task holds (one process's router already
    /// lets one call at a time store a key), and, with [`StoreErrorKind::Gone`], a removal
    /// from [`Queue::Review`] of a task it no longer holds (a review action another instance
    /// took first; one process's router takes them one at a time).
    fn commit(&self, ops: Vec<Op>) -> StoreFuture<'_, ()>;

    /// Claim up to `limit` tasks of `queue` due at `now_ms` (earliest due first) that no
    /// worker holds.
    fn due(&self, queue: Queue, now_ms: u64, limit: usize) -> StoreFuture<'_, Vec<Task>>;

    /// Give back a claim without changing the task.
    fn release(&self, queue: Queue, id: TaskId);

    /// Up to `limit` tasks of `queue` in id (creation) order, after `after`: a page.
    fn list(&self, queue: Queue, after: Option<TaskId>, limit: usize)
    -> StoreFuture<'_, Vec<Task>>;

    /// One task.
    fn get(&self, queue: Queue, id: TaskId) -> StoreFuture<'_, Option<Task>>;

    /// The task kept for `class` under the client's idempotency `key`, if one is still kept
    /// in `delayed_retry`, `spool` or `manual_review`, or journaled by `batch_merge`.
    fn find_key<'a>(
        &'a self,
        class: &'a str,
        key: &'a str,
    ) -> StoreFuture<'a, Option<(Queue, TaskId)>>;

    /// How many tasks `queue` holds and how old the oldest is.
    fn depth(&self, queue: Queue) -> Depth;

    /// A name for logs and metrics (`memory`, `embedded`, `redis`).
    fn kind(&self) -> &'static str;

    /// How full the store is, as far as it knows without waiting (a shared store's count may
    /// be a moment old): the router keeps the last part of it for the higher tiers' calls
    /// (`FallbackRouterBuilder::store_share`). `None` (the default): not known, and no share
    /// is kept (the store's own capacity still holds).
    fn usage(&self) -> Option<Usage> {
        None
    }

    /// How long a task this instance claimed stays its own without a heartbeat, for a store
    /// shared by several instances that hands an instance's tasks to another after that
    /// ([`RedisStore`]'s `claim_timeout`); `None` (the default) for a store one process owns.
    /// The worker heartbeats when it steps, so the router refuses a `period` too long for it.
    fn claim_timeout(&self) -> Option<Duration> {
        None
    }
}

/// What went wrong in a [`Store`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// The store is at its capacity.
    Full,
    /// Reading or writing failed (disk, network).
    Io,
    /// The store's file or data is not what this library wrote.
    Corrupt,
    /// The store's worker is gone.
    Closed,
    /// Another task is kept under the put task's idempotency key (a store shared by several
    /// instances, when two took the same key at once); nothing was changed.
    KeyTaken,
    /// A setting of the store is out of range (the message names it); nothing was opened.
    Invalid,
    /// The task a commit removes from manual review is no longer there: another instance
    /// sharing the store acted on it first (a store shared by several instances); nothing
    /// was changed.
    Gone,
}

/// An error from a [`Store`]: its kind and a message that says where and what to do.
#[derive(Debug, Clone)]
pub struct StoreError {
    kind: StoreErrorKind,
    message: String,
    unapplied: bool,
}

impl StoreError {
    /// A new error.
    pub fn new(kind: StoreErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            unapplied: false,
        }
    }

    /// Says that the failed commit certainly changed nothing (an error reply, a refused
    /// connection, a commit never sent), unlike one whose outcome is unknown (a timeout: the
    /// store may still apply it). [`Failover`] keeps an eye on the tasks it kept locally after
    /// a failure of the other kind, in case the shared store applied them too.
    #[must_use]
    pub fn unapplied(mut self) -> Self {
        self.unapplied = true;
        self
    }

    /// Whether the failed commit certainly changed nothing ([`Self::unapplied`]).
    pub fn surely_unapplied(&self) -> bool {
        self.unapplied
    }

    /// What went wrong.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for StoreError {}
