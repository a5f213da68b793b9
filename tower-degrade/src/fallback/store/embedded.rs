//! [`EmbeddedStore`]: kept tasks in one redb file, with group commit (see the type docs).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};
use tokio::sync::oneshot;

use super::index::Index;
use super::{Depth, Op, Store, StoreError, StoreErrorKind, StoreFuture, Usage};
use crate::fallback::record::{Queue, Task, TaskId};

const META: TableDefinition<'_, &str, u64> = TableDefinition::new("tower-degrade");
const FORMAT: u64 = 1;
const MAX_BATCH: usize = 4096;
const QUEUED: usize = 65_536;
/// After a failed commit the writer reopens the file before the next write, then (while
/// commits keep failing) again at least this long after the last try, or ten times what that
/// try took if more, at most 30 s: a reopen may repair, and so read, the whole file.
const REOPEN_AFTER: Duration = Duration::from_secs(1);

fn table(queue: Queue) -> TableDefinition<'static, u128, &'static [u8]> {
    TableDefinition::new(queue.as_str())
}

/// Builds an [`EmbeddedStore`].
#[derive(Debug, Clone)]
#[must_use = "a setting or builder does nothing until it is passed on or built"]
pub struct EmbeddedStoreBuilder {
    path: PathBuf,
    capacity: u64,
}

impl EmbeddedStoreBuilder {
    /// At most `tasks` tasks over all queues, the audit records of dropped tasks not counted
    /// (default 10,000,000): a commit past it fails with [`StoreErrorKind::Full`], and the
    /// call is answered as rejected. The store also holds
    /// an index of its tasks in memory, which grows with them: in a trial, 200,000 tasks with
    /// 255-byte client keys took 191 MB once opened (about 1 KB a task; the default capacity
    /// would be gigabytes): set it to what the host can hold.
    pub fn capacity(mut self, tasks: u64) -> Self {
        self.capacity = tasks;
        self
    }

    /// Open (or create) the store. Fails with an error naming the file when it is not a
    /// tower-degrade store, is damaged, or is already open (in this process or another).
    ///
    /// An existing file is checked whole before anything is read from it (redb's integrity
    /// check: every page against its checksum), so a damaged page is an error here rather than
    /// tasks that silently cannot be listed later; the check reads the file once (a store of a
    /// million 200-byte tasks, 285 MB, opens in 1.5 s on a 2-core VM, 0.6 s without it). A damage redb repairs in place may have dropped
    /// tasks, so it is reported as an error too: opening the file again uses what was kept.
    pub fn open(self) -> Result<EmbeddedStore, StoreError> {
        let shown = self.path.display().to_string();
        // The database engine panics on some damaged pages; a damaged file is input, not a
        // bug of this process, and is answered with an error naming it.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.open_checked()))
            .unwrap_or_else(|panic| {
                let what = crate::fallback::panic_message(&*panic)
                    .unwrap_or_else(|| "the database engine failed".to_owned());
                Err(StoreError::new(
                    StoreErrorKind::Corrupt,
                    format!(
                        "store `{shown}`: it is damaged ({what}): move it aside (keep it for \
                         inspection) and start with a new file"
                    ),
                ))
            })
    }

    fn open_checked(self) -> Result<EmbeddedStore, StoreError> {
        let path = self.path;
        let shown = path.display().to_string();
        if self.capacity == 0 {
            return Err(StoreError::new(
                StoreErrorKind::Invalid,
                format!("store `{shown}`: capacity 0 would refuse every task: give it at least 1"),
            ));
        }
        let meta = std::fs::metadata(&path);
        let existed = meta.as_ref().is_ok_and(|m| m.len() > 0);
        if meta.is_ok_and(|m| m.is_file() && m.len() == 0) {
            // As a new store: but a store cut to nothing (a copy cut short, a `>` redirect)
            // would otherwise lose its tasks without a word.
            tracing::warn!(store = %shown, "the store's file is empty: it is taken as a new \
                store (if it held tasks, they are not in it)");
        }
        let mut db = Database::create(&path).map_err(|e| {
            let e = redb::Error::from(e);
            let (kind, hint) = match e {
                redb::Error::DatabaseAlreadyOpen => (
                    StoreErrorKind::Io,
                    "it is already open (in this process or another; a process being killed \
                     holds it until it has exited, so a supervisor restarting at once should \
                     wait for that or retry): open it once and share the handle \
                     (`EmbeddedStore` is cheap to clone), give each instance its own file, or \
                     use the Redis backend to share one queue",
                ),
                // A file too short for its header reads as an early end, not a path problem.
                redb::Error::Io(ref io)
                    if !matches!(
                        io.kind(),
                        std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
                    ) =>
                {
                    (StoreErrorKind::Io, "check the path and its permissions")
                }
                _ => (
                    StoreErrorKind::Corrupt,
                    "it is not a tower-degrade store or it is damaged: move it aside (keep it \
                     for inspection) and start with a new file",
                ),
            };
            StoreError::new(kind, format!("store `{shown}`: {e}; {hint}"))
        })?;
        if existed {
            let damaged = |what: String| {
                StoreError::new(
                    StoreErrorKind::Corrupt,
                    format!(
                        "store `{shown}`: it is damaged ({what}): move it aside (keep it for \
                         inspection) and start with a new file"
                    ),
                )
            };
            match db.check_integrity() {
                Ok(true) => {}
                Ok(false) => {
                    return Err(StoreError::new(
                        StoreErrorKind::Corrupt,
                        format!(
                            "store `{shown}`: it failed its integrity check and was repaired in \
                             place, which may have dropped tasks: keep a copy for inspection; \
                             opening it again uses what was kept"
                        ),
                    ));
                }
                Err(e) => return Err(damaged(format!("its integrity check failed: {e}"))),
            }
        }
        check_format(&db, &shown)?;
        let mut index = Index::default();
        load(&db, &shown, &mut index)?;
        let shared = Arc::new(Shared {
            db: RwLock::new(Some(db)),
            index: Mutex::new(index),
            path,
            capacity: self.capacity,
            #[cfg(test)]
            fail_next: Mutex::default(),
        });
        // Bounded: past this many waiting commits, a call is refused (`Full`) rather than queued.
        let (tx, rx) = mpsc::sync_channel(QUEUED);
        let owner = shared.clone();
        let thread = std::thread::Builder::new()
            .name("tower-degrade-store".into())
            .spawn(move || owner.write_loop(rx))
            .map_err(|e| {
                StoreError::new(
                    StoreErrorKind::Io,
                    format!("store `{shown}`: cannot start its writer thread: {e}"),
                )
            })?;
        let writer = Arc::new(Writer {
            tx: Some(tx),
            thread: Some(thread),
        });
        Ok(EmbeddedStore { writer, shared })
    }
}

fn check_format(db: &Database, shown: &str) -> Result<(), StoreError> {
    let io = |e: redb::Error| StoreError::new(StoreErrorKind::Io, format!("store `{shown}`: {e}"));
    let read = db.begin_read().map_err(|e| io(e.into()))?;
    let tables: Vec<String> = read
        .list_tables()
        .map_err(|e| io(e.into()))?
        .map(|t| t.name().to_owned())
        .collect();
    if tables.iter().any(|t| t == META.name()) {
        let meta = read.open_table(META).map_err(|e| io(e.into()))?;
        let format = meta
            .get("format")
            .map_err(|e| io(e.into()))?
            .map(|v| v.value());
        return match format {
            Some(FORMAT) => Ok(()),
            other => Err(StoreError::new(
                StoreErrorKind::Corrupt,
                format!(
                    "store `{shown}`: written in store format {}, this version reads format \
                     {FORMAT}; replay it with the version that wrote it, or move it aside",
                    other.map_or("(none)".to_owned(), |f| f.to_string())
                ),
            )),
        };
    }
    if !tables.is_empty() {
        return Err(StoreError::new(
            StoreErrorKind::Corrupt,
            format!(
                "store `{shown}`: a redb file with other tables ({}), not a tower-degrade \
                 store; point the store at another path",
                tables.join(", ")
            ),
        ));
    }
    drop(read);
    let write = db.begin_write().map_err(|e| io(e.into()))?;
    {
        let mut meta = write.open_table(META).map_err(|e| io(e.into()))?;
        meta.insert("format", FORMAT).map_err(|e| io(e.into()))?;
    }
    write.commit().map_err(|e| io(e.into()))
}

fn load(db: &Database, shown: &str, index: &mut Index) -> Result<(), StoreError> {
    let io = |e: redb::Error| StoreError::new(StoreErrorKind::Io, format!("store `{shown}`: {e}"));
    let read = db.begin_read().map_err(|e| io(e.into()))?;
    for queue in Queue::ALL {
        let t = match read.open_table(table(queue)) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => continue,
            Err(e) => return Err(io(e.into())),
        };
        for entry in t.iter().map_err(|e| io(e.into()))? {
            let (k, v) = entry.map_err(|e| io(e.into()))?;
            let task = Task::decode(v.value()).map_err(|e| {
                StoreError::new(
                    StoreErrorKind::Corrupt,
                    format!(
                        "store `{shown}`: queue `{queue}`, task {}: {e}; move the file aside",
                        TaskId(k.value())
                    ),
                )
            })?;
            index.put(queue, &task);
        }
    }
    Ok(())
}

/// Kept tasks in one [redb](https://docs.rs/redb) file, committed durably (one sync) in groups
/// by one writer thread; an in-memory index answers `due`, `depth` and idempotency keys. One
/// process per file (a second one is refused with an error naming the file).
///
/// Why redb: a pure-Rust ACID B-tree in a single file, whose commits are crash-safe by design
/// (copy-on-write pages and a checksummed commit slot, one sync per commit), and which detects
/// a file it did not write. Nothing writes in the background: a commit's sync waits only for
/// that commit's own pages. fjall (an LSM-tree with a journal) was measured too: its
/// median acknowledgement is lower (one journal append per commit), but its memtable flushes
/// write megabytes in the background and delay the journal syncs queued behind them by
/// 20-100 ms, which put its p99 at 21 ms at 10,000 appends/s against redb's 7 ms
/// (`docs/benchmarks.md`).
///
/// **Group commit.** One writer thread owns the write side: it takes every commit request
/// waiting in its channel (up to 4,096), applies them in **one** write transaction and answers
/// them all after the single sync. Under load, many appends share one sync; alone, an append
/// costs one.
///
/// ```no_run
/// use tower_degrade::fallback::store::EmbeddedStore;
///
/// let store = EmbeddedStore::builder("kept.redb").capacity(1_000_000).open()?;
/// # Ok::<_, tower_degrade::fallback::store::StoreError>(())
/// ```
#[derive(Debug, Clone)]
pub struct EmbeddedStore {
    // Dropped first: the last handle stops and joins the writer, which holds the file.
    writer: Arc<Writer>,
    shared: Arc<Shared>,
}

/// The writer thread and its channel; dropping it drains the channel and joins the thread, so
/// the file is closed when the last store handle is gone.
#[derive(Debug)]
struct Writer {
    tx: Option<mpsc::SyncSender<Request>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Shared {
    /// `None` while the writer reopens the file after a failed commit.
    db: RwLock<Option<Database>>,
    index: Mutex<Index>,
    path: PathBuf,
    capacity: u64,
    /// Test hook: the next commit fails (after writing, when `Some(true)`: a commit that
    /// reached the disk though its caller was told it failed).
    #[cfg(test)]
    fail_next: Mutex<Option<bool>>,
}

#[derive(Debug)]
struct Request {
    ops: Vec<Op>,
    /// The record of each `Put`, in order: encoded by the caller, off the writer thread.
    records: Vec<Vec<u8>>,
    done: oneshot::Sender<Reply>,
}

/// The answer to a commit, with the request's operations and records handed back: the caller
/// frees them on its own thread (freeing on the writer thread what another thread allocated
/// cost the writer a quarter of its time, measured).
#[derive(Debug)]
struct Reply {
    result: Result<(), StoreError>,
    _spent: (Vec<Op>, Vec<Vec<u8>>),
}

impl Request {
    fn answer(self, result: Result<(), StoreError>) {
        let Request { ops, records, done } = self;
        let _ = done.send(Reply {
            result,
            _spent: (ops, records),
        });
    }
}

impl EmbeddedStore {
    /// A builder for the store in the file at `path`.
    pub fn builder(path: impl AsRef<Path>) -> EmbeddedStoreBuilder {
        EmbeddedStoreBuilder {
            path: path.as_ref().to_owned(),
            capacity: 10_000_000,
        }
    }

    /// Open (or create) the store at `path` with the default capacity.
    pub fn open(path: impl AsRef<Path>) -> Result<EmbeddedStore, StoreError> {
        Self::builder(path).open()
    }

    /// The store's file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }
}

impl Shared {
    fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The open database (`Err` while the writer reopens it).
    fn db(&self) -> Result<DbGuard<'_>, StoreError> {
        let reopening = || {
            StoreError::new(
                StoreErrorKind::Io,
                format!(
                    "store `{}`: reopening the file after a failed commit",
                    self.path.display()
                ),
            )
        };
        // Not waiting for a reopen (it may repair the whole file): the caller is told to retry.
        let db = match self.db.try_read() {
            Ok(db) => db,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Err(reopening()),
        };
        if db.is_none() {
            return Err(reopening());
        }
        Ok(DbGuard(db))
    }

    /// Close the file and open it again (redb refuses every transaction after an I/O error,
    /// such as a full disk, until then), and bring the index in line with what it holds: a
    /// commit whose sync failed may have reached the disk all the same.
    fn reopen(&self) -> Result<(), StoreError> {
        let mut slot = self.db.write().unwrap_or_else(|e| e.into_inner());
        drop(slot.take());
        let db = Database::create(&self.path).map_err(|e| self.error(e))?;
        self.reconcile(&db)?;
        *slot = Some(db);
        tracing::warn!(store = %self.path.display(), "store reopened after a failed commit");
        Ok(())
    }

    /// Put in the index the tasks the file holds that it lacks, and take out those it holds
    /// that the file does not (claims on the others are kept).
    fn reconcile(&self, db: &Database) -> Result<(), StoreError> {
        let read = db.begin_read().map_err(|e| self.error(e))?;
        let mut index = self.index();
        for queue in Queue::ALL {
            let t = match read.open_table(table(queue)) {
                Ok(t) => Some(t),
                Err(redb::TableError::TableDoesNotExist(_)) => None,
                Err(e) => return Err(self.error(e)),
            };
            let mut in_file = std::collections::HashSet::new();
            for entry in t.iter().flat_map(|t| t.iter()).flatten() {
                let (k, v) = entry.map_err(|e| self.error(e))?;
                let id = TaskId(k.value());
                in_file.insert(id);
                if !index.contains(queue, id)
                    && let Ok(task) = Task::decode(v.value())
                {
                    index.put(queue, &task);
                }
            }
            for id in index.page(queue, None, usize::MAX) {
                if !in_file.contains(&id) {
                    index.remove(queue, id);
                }
            }
        }
        Ok(())
    }

    fn error(&self, e: impl Into<redb::Error>) -> StoreError {
        StoreError::new(
            StoreErrorKind::Io,
            format!("store `{}`: {}", self.path.display(), e.into()),
        )
    }

    fn write_loop(&self, rx: mpsc::Receiver<Request>) {
        // After a failed commit: the file needs reopening ([`REOPEN_AFTER`]), not before.
        let mut broken = false;
        let mut next_reopen = Instant::now();
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            // Admit requests in order while the store has room.
            let mut accepted = Vec::with_capacity(batch.len());
            {
                let index = self.index();
                let mut len = index.len() as i64;
                for req in batch {
                    let puts = req
                        .ops
                        .iter()
                        .filter(|op| matches!(op, Op::Put(..)))
                        .count();
                    // At most `puts` new tasks: the exact count only near the capacity.
                    let grows = if (len as u64).saturating_add(puts as u64) <= self.capacity {
                        puts as i64
                    } else {
                        index.len_after(&req.ops) as i64 - index.len() as i64
                    };
                    if grows > 0 && (len + grows) as u64 > self.capacity {
                        let full = StoreError::new(
                            StoreErrorKind::Full,
                            format!(
                                "store `{}` is full ({} tasks)",
                                self.path.display(),
                                self.capacity
                            ),
                        );
                        req.answer(Err(full));
                        continue;
                    }
                    len += grows;
                    accepted.push(req);
                }
            }
            if accepted.is_empty() {
                continue;
            }
            if broken {
                let reopened = if Instant::now() < next_reopen {
                    Err(self.error(redb::StorageError::PreviousIo))
                } else {
                    let start = Instant::now();
                    let reopened = self.reopen();
                    let wait = (start.elapsed() * 10).clamp(REOPEN_AFTER, 30 * REOPEN_AFTER);
                    next_reopen = Instant::now() + wait;
                    reopened
                };
                if let Err(e) = reopened {
                    for req in accepted {
                        req.answer(Err(e.clone()));
                    }
                    continue;
                }
                broken = false;
            }
            match self.write(&accepted) {
                Ok(()) => {
                    // The next failure reopens at once.
                    next_reopen = Instant::now();
                    let mut index = self.index();
                    for req in &accepted {
                        for op in &req.ops {
                            index.apply(op);
                        }
                    }
                    drop(index);
                    for req in accepted {
                        req.answer(Ok(()));
                    }
                }
                Err(e) => {
                    tracing::error!(store = %self.path.display(), error = %e, "store commit failed");
                    broken = true;
                    for req in accepted {
                        req.answer(Err(e.clone()));
                    }
                }
            }
        }
    }

    fn write(&self, batch: &[Request]) -> Result<(), StoreError> {
        let txn = self.db()?.begin_write().map_err(|e| self.error(e))?;
        {
            let mut tables: [Option<redb::Table<'_, u128, &[u8]>>; Queue::ALL.len()] =
                Default::default();
            for req in batch {
                let mut records = req.records.iter();
                for op in &req.ops {
                    let queue = match op {
                        Op::Put(q, _) | Op::Remove(q, _) => *q,
                    };
                    let slot = &mut tables[queue as usize];
                    if slot.is_none() {
                        *slot = Some(txn.open_table(table(queue)).map_err(|e| self.error(e))?);
                    }
                    let t = slot.as_mut().expect("opened above");
                    match op {
                        Op::Put(_, task) => {
                            let record = records.next().map(Vec::as_slice).unwrap_or_default();
                            t.insert(task.id().0, record).map_err(|e| self.error(e))?;
                        }
                        Op::Remove(_, id) => {
                            t.remove(id.0).map_err(|e| self.error(e))?;
                        }
                    }
                }
            }
        }
        #[cfg(test)]
        if let Some(after) = self.fail_next.lock().unwrap().take() {
            if after {
                txn.commit().map_err(|e| self.error(e))?;
            }
            return Err(self.error(redb::StorageError::Io(std::io::Error::other(
                "no space left on device (test)",
            ))));
        }
        txn.commit().map_err(|e| self.error(e))
    }

    fn read(&self, queue: Queue, ids: &[TaskId]) -> Result<Vec<Task>, StoreError> {
        let read = self.db()?.begin_read().map_err(|e| self.error(e))?;
        let t = match read.open_table(table(queue)) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.error(e)),
        };
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(v) = t.get(id.0).map_err(|e| self.error(e))? {
                let task = Task::decode(v.value()).map_err(|e| {
                    StoreError::new(
                        StoreErrorKind::Corrupt,
                        format!("store `{}`: task {id}: {e}", self.path.display()),
                    )
                })?;
                out.push(task);
            }
        }
        Ok(out)
    }

    /// The number of records stored, for tests: the index must agree.
    #[cfg(test)]
    fn stored(&self, queue: Queue) -> u64 {
        use redb::ReadableTableMetadata;
        let read = self.db().unwrap().begin_read().unwrap();
        read.open_table(table(queue))
            .map(|t| t.len().unwrap())
            .unwrap_or(0)
    }
}

/// A read lock on the open database.
struct DbGuard<'a>(RwLockReadGuard<'a, Option<Database>>);

impl std::ops::Deref for DbGuard<'_> {
    type Target = Database;

    fn deref(&self) -> &Database {
        self.0.as_ref().expect("checked by Shared::db")
    }
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("path", &self.path)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl Store for EmbeddedStore {
    fn commit(&self, ops: Vec<Op>) -> StoreFuture<'_, ()> {
        let (done, rx) = oneshot::channel();
        let records = ops
            .iter()
            .filter_map(|op| match op {
                Op::Put(_, task) => Some(task.encode()),
                Op::Remove(..) => None,
            })
            .collect();
        let sent = match &self.writer.tx {
            Some(tx) => tx
                .try_send(Request { ops, records, done })
                .map_err(|e| matches!(e, mpsc::TrySendError::Full(_))),
            None => Err(false),
        };
        Box::pin(async move {
            let closed = || {
                StoreError::new(
                    StoreErrorKind::Closed,
                    format!(
                        "store `{}`: its writer thread is gone",
                        self.path().display()
                    ),
                )
            };
            sent.map_err(|full| {
                if full {
                    StoreError::new(
                        StoreErrorKind::Full,
                        format!(
                            "store `{}`: {QUEUED} commits are waiting for the disk",
                            self.path().display()
                        ),
                    )
                } else {
                    closed()
                }
            })?;
            rx.await.map_err(|_| closed())?.result
        })
    }

    fn due(&self, queue: Queue, now_ms: u64, limit: usize) -> StoreFuture<'_, Vec<Task>> {
        Box::pin(async move {
            let ids = self.shared.index().claim_due(queue, now_ms, limit);
            let tasks = self.shared.read(queue, &ids);
            if tasks.is_err() {
                let mut index = self.shared.index();
                for id in ids {
                    index.release(queue, id);
                }
            }
            tasks
        })
    }

    fn release(&self, queue: Queue, id: TaskId) {
        self.shared.index().release(queue, id);
    }

    fn list(
        &self,
        queue: Queue,
        after: Option<TaskId>,
        limit: usize,
    ) -> StoreFuture<'_, Vec<Task>> {
        Box::pin(async move {
            let ids = self.shared.index().page(queue, after, limit);
            self.shared.read(queue, &ids)
        })
    }

    fn get(&self, queue: Queue, id: TaskId) -> StoreFuture<'_, Option<Task>> {
        Box::pin(async move { Ok(self.shared.read(queue, &[id])?.pop()) })
    }

    fn find_key<'a>(
        &'a self,
        class: &'a str,
        key: &'a str,
    ) -> StoreFuture<'a, Option<(Queue, TaskId)>> {
        let found = self.shared.index().find_key(class, key);
        Box::pin(std::future::ready(Ok(found)))
    }

    fn depth(&self, queue: Queue) -> Depth {
        self.shared.index().depth(queue)
    }

    fn kind(&self) -> &'static str {
        "embedded"
    }

    fn usage(&self) -> Option<Usage> {
        Some(Usage {
            held: self.shared.index().len(),
            capacity: self.shared.capacity,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fallback::record::Payload;

    /// A directory of its own, removed when dropped.
    fn dir() -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("td-store-")
            .tempdir()
            .unwrap()
    }

    fn task(n: u8) -> Task {
        Task::new("browse", None, Payload::Bytes(vec![n]))
    }

    #[tokio::test]
    async fn what_is_committed_is_there_after_reopening() {
        let d = dir();
        let path = d.path().join("kept.redb");
        let a = Task::new("browse", Some("k-a".into()), Payload::Bytes(vec![1]));
        let b = task(2);
        {
            let store = EmbeddedStore::open(&path).unwrap();
            store
                .commit(vec![
                    Op::Put(Queue::Spool, a.clone()),
                    Op::Put(Queue::Spool, b.clone()),
                ])
                .await
                .unwrap();
            store
                .commit(vec![
                    Op::Remove(Queue::Spool, a.id()),
                    Op::Put(Queue::Review, a.clone()),
                ])
                .await
                .unwrap();
            assert_eq!(store.shared.stored(Queue::Spool), 1);
        }
        let store = EmbeddedStore::open(&path).unwrap();
        assert_eq!(store.depth(Queue::Spool).len, 1);
        assert_eq!(
            store.get(Queue::Spool, b.id()).await.unwrap(),
            Some(b.clone())
        );
        assert_eq!(
            store.list(Queue::Review, None, 10).await.unwrap(),
            vec![a.clone()]
        );
        assert_eq!(
            store.find_key("browse", "k-a").await.unwrap(),
            Some((Queue::Review, a.id()))
        );
        let due = store.due(Queue::Spool, u64::MAX, 10).await.unwrap();
        assert_eq!(due, vec![b]);
        assert!(
            store
                .due(Queue::Spool, u64::MAX, 10)
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn a_failed_commit_reopens_the_file_and_the_index_follows_what_reached_it() {
        // redb refuses every transaction after an I/O error (a full disk) until the file is
        // opened again: the writer reopens it before the next batch, and takes from the file
        // what a failed commit may have written after all.
        let d = dir();
        let store = EmbeddedStore::open(d.path().join("kept.redb")).unwrap();
        let t: Vec<Task> = (0..9).map(task).collect();
        let put = |i: usize| Op::Put(Queue::Spool, t[i].clone());
        store.commit(vec![put(1), put(5)]).await.unwrap();
        // Replays hold both.
        let claimed = store.due(Queue::Spool, u64::MAX, 10).await.unwrap();
        assert_eq!(claimed, vec![t[1].clone(), t[5].clone()]);
        let fail = |after_writing| *store.shared.fail_next.lock().unwrap() = Some(after_writing);
        fail(false);
        assert!(store.commit(vec![put(2)]).await.is_err());
        store.commit(vec![put(6)]).await.unwrap();
        // Reported failed, but on the disk.
        fail(true);
        let e = store
            .commit(vec![put(3), Op::Remove(Queue::Spool, t[1].id())])
            .await
            .unwrap_err();
        assert_eq!(e.kind(), StoreErrorKind::Io);
        store.commit(vec![put(4)]).await.unwrap();
        let listed = store.list(Queue::Spool, None, 10).await.unwrap();
        let ids: Vec<TaskId> = listed.iter().map(Task::id).collect();
        let mut expected: Vec<TaskId> = [3, 4, 5, 6].iter().map(|&i| t[i].id()).collect();
        expected.sort();
        assert_eq!(
            ids, expected,
            "1 removed and 3 put by a failed commit; 2 never"
        );
        assert_eq!(store.shared.stored(Queue::Spool), 4);
        // 5's claim survived the reopens: only the new ones are handed out.
        let due = store.due(Queue::Spool, u64::MAX, 10).await.unwrap();
        assert_eq!(due, vec![t[3].clone(), t[4].clone(), t[6].clone()]);
        // A commit failing again right after a reopen: the next reopen waits a second (it
        // may read the whole file), and commits meanwhile are refused at once.
        fail(false);
        assert!(store.commit(vec![put(7)]).await.is_err());
        fail(false);
        assert!(store.commit(vec![put(7)]).await.is_err());
        let e = store.commit(vec![put(8)]).await.unwrap_err();
        assert!(e.to_string().contains("Previous I/O error"), "{e}");
        assert_eq!(store.depth(Queue::Spool).len, 4);
    }

    #[tokio::test]
    async fn a_full_store_refuses_the_batch_and_keeps_the_rest() {
        let d = dir();
        let path = d.path().join("kept.redb");
        let store = EmbeddedStore::builder(&path).capacity(2).open().unwrap();
        let ok = store
            .commit(vec![
                Op::Put(Queue::Spool, task(1)),
                Op::Put(Queue::Spool, task(2)),
            ])
            .await;
        assert!(ok.is_ok());
        let full = store.commit(vec![Op::Put(Queue::Spool, task(3))]).await;
        assert_eq!(full.unwrap_err().kind(), StoreErrorKind::Full);
        assert_eq!(store.depth(Queue::Spool).len, 2);
        let usage = Usage {
            held: 2,
            capacity: 2,
        };
        assert_eq!(store.usage(), Some(usage));
    }

    #[test]
    fn a_foreign_file_is_an_error_naming_it() {
        let d = dir();
        let junk = d.path().join("notes.txt");
        std::fs::write(&junk, b"hello, this is not a database at all".repeat(200)).unwrap();
        let err = EmbeddedStore::open(&junk).unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Corrupt, "{err}");
        assert!(err.to_string().contains("notes.txt"), "{err}");
        assert!(err.to_string().contains("move it aside"), "{err}");

        let other = d.path().join("other.redb");
        {
            let db = Database::create(&other).unwrap();
            let w = db.begin_write().unwrap();
            {
                let def: TableDefinition<'_, u64, u64> = TableDefinition::new("accounts");
                w.open_table(def).unwrap().insert(1, 2).unwrap();
            }
            w.commit().unwrap();
        }
        let err = EmbeddedStore::open(&other).unwrap_err();
        assert!(err.to_string().contains("accounts"), "{err}");
        assert!(err.to_string().contains("other.redb"), "{err}");
    }

    #[test]
    fn a_damaged_record_is_an_error_naming_the_store_and_queue() {
        let d = dir();
        let path = d.path().join("kept.redb");
        {
            let db = Database::create(&path).unwrap();
            let w = db.begin_write().unwrap();
            {
                w.open_table(META)
                    .unwrap()
                    .insert("format", FORMAT)
                    .unwrap();
                w.open_table(table(Queue::Spool))
                    .unwrap()
                    .insert(7u128, [1u8, 0xff, 0xff].as_slice())
                    .unwrap();
            }
            w.commit().unwrap();
        }
        let err = EmbeddedStore::open(&path).unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Corrupt, "{err}");
        assert!(err.to_string().contains("queue `spool`"), "{err}");
        assert!(err.to_string().contains("kept.redb"), "{err}");
    }

    #[tokio::test]
    async fn a_damaged_page_is_an_error_never_a_panic_or_tasks_that_cannot_be_listed() {
        let d = dir();
        let path = d.path().join("kept.redb");
        {
            let store = EmbeddedStore::open(&path).unwrap();
            for chunk in 0..6u8 {
                let ops = (0..100u8)
                    .map(|i| {
                        let payload = Payload::Bytes(vec![chunk ^ i; 120]);
                        Op::Put(Queue::Spool, Task::new("browse", None, payload))
                    })
                    .collect();
                store.commit(ops).await.unwrap();
            }
        }
        let len = std::fs::metadata(&path).unwrap().len();
        let mut refused = 0;
        // Pages of the B-trees and of their data, 64 bytes overwritten in each copy.
        for at in (4096..len - 64)
            .step_by(4096)
            .chain([66_000, 70_000, 78_000])
        {
            if at + 64 > len {
                continue;
            }
            let copy = d.path().join(format!("damaged-{at}.redb"));
            let mut bytes = std::fs::read(&path).unwrap();
            for (i, b) in bytes[at as usize..at as usize + 64].iter_mut().enumerate() {
                *b = 0x9b ^ (i as u8);
            }
            std::fs::write(&copy, bytes).unwrap();
            match EmbeddedStore::open(&copy) {
                Err(e) => {
                    assert_eq!(e.kind(), StoreErrorKind::Corrupt, "{e}");
                    assert!(e.to_string().contains(&format!("damaged-{at}.redb")), "{e}");
                    refused += 1;
                }
                // Bytes no committed page uses: every task is still there.
                Ok(store) => {
                    assert_eq!(store.depth(Queue::Spool).len, 600, "damage at {at}");
                    let listed = store.list(Queue::Spool, None, 1000).await.unwrap();
                    assert_eq!(listed.len(), 600, "damage at {at}");
                }
            }
        }
        assert!(refused > 0, "some damage hit a committed page");
    }

    #[test]
    fn a_second_process_or_handle_is_refused() {
        let d = dir();
        let path = d.path().join("kept.redb");
        let _first = EmbeddedStore::open(&path).unwrap();
        let err = EmbeddedStore::open(&path).unwrap_err();
        assert!(err.to_string().contains("already open"), "{err}");
    }
}
