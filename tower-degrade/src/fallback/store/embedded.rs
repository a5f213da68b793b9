//! [`EmbeddedStore`]: kept tasks in an embedded fjall database, with group commit.
//!
//! Why fjall: an LSM-tree whose writes go to a checksummed write-ahead journal, so a group of
//! appends is **one sequential journal write and one `fdatasync`** (about 0.17 ms on the disk
//! of the VM the numbers in `docs/benchmarks.md` come from). A torn journal tail is cut off at
//! recovery, so a commit is either whole or absent. Pure Rust, one directory, a lock file
//! that keeps a second process out. redb, tried first, commits a copy-on-write B-tree: about
//! 0.6 ms per commit here (page writes and two syncs), and an open-loop 50,000 appends/s ran
//! at a 6.5 ms p99 acknowledgement; fjall's journal makes that under 2 ms.
//!
//! **Group commit.** One writer thread owns the write side: it takes every commit request
//! waiting in its channel (up to 4,096), applies them in **one** atomic write batch and answers
//! them all after the single sync. Under load, many appends share one sync; alone, an append
//! costs one.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use tokio::sync::oneshot;

use super::index::Index;
use super::{Depth, Op, Store, StoreError, StoreErrorKind, StoreFuture};
use crate::fallback::record::{Queue, Task, TaskId};

const META: &str = "tower-degrade";
const FORMAT: u64 = 1;
const MAX_BATCH: usize = 4096;
const MEMTABLE: u64 = 16 << 20;

fn key(id: TaskId) -> [u8; 16] {
    id.0.to_be_bytes()
}

/// Builds an [`EmbeddedStore`].
#[derive(Debug, Clone)]
pub struct EmbeddedStoreBuilder {
    path: PathBuf,
    capacity: u64,
}

impl EmbeddedStoreBuilder {
    /// At most `tasks` tasks over all queues (default 10,000,000): a commit past it fails with
    /// [`StoreErrorKind::Full`], and the call is answered as rejected.
    pub fn capacity(mut self, tasks: u64) -> Self {
        self.capacity = tasks;
        self
    }

    /// Open (or create) the store. Fails with an error naming the file when it is not a
    /// tower-degrade store, is damaged, or is open in another process.
    pub fn open(self) -> Result<EmbeddedStore, StoreError> {
        let path = self.path;
        let shown = path.display().to_string();
        check_dir(&path, &shown)?;
        let db = Database::builder(&path)
            .manual_journal_persist(true)
            // One background thread for flushes and compaction: the writer and the
            // application keep the other cores.
            .worker_threads(1)
            .open()
            .map_err(|e| {
                let (kind, hint) = match &e {
                    fjall::Error::Locked => (
                        StoreErrorKind::Io,
                        "it is open in another process: give each instance its own \
                         directory, or use the Redis backend to share one queue",
                    ),
                    fjall::Error::Io(io) if io.kind() != std::io::ErrorKind::InvalidData => {
                        (StoreErrorKind::Io, "check the path and its permissions")
                    }
                    _ => (
                        StoreErrorKind::Corrupt,
                        "it is damaged or not a tower-degrade store: move it aside (keep it \
                         for inspection) and start with a new directory",
                    ),
                };
                StoreError::new(kind, format!("store `{shown}`: {e}; {hint}"))
            })?;
        let io =
            |e: fjall::Error| StoreError::new(StoreErrorKind::Io, format!("store `{shown}`: {e}"));
        check_format(&db, &shown)?;
        let mut queues = Vec::with_capacity(Queue::ALL.len());
        for queue in Queue::ALL {
            queues.push(
                db.keyspace(queue.as_str(), || {
                    // 16 MiB memtables (fjall's default is 64): a flush is shorter, and so is
                    // the stall of the journal syncs behind its writes (measured: p99 of
                    // appends at 50,000/s 29 ms against 60 ms with 64 MiB).
                    KeyspaceCreateOptions::default().max_memtable_size(MEMTABLE)
                })
                .map_err(io)?,
            );
        }
        let mut index = Index::default();
        load(&queues, &shown, &mut index)?;
        let shared = Arc::new(Shared {
            db,
            queues,
            index: Mutex::new(index),
            path,
            capacity: self.capacity,
        });
        let (tx, rx) = mpsc::channel();
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

/// The path must be a directory that is empty, missing, or a database (fjall would create one
/// among someone else's files).
fn check_dir(path: &Path, shown: &str) -> Result<(), StoreError> {
    let foreign = |what: String| {
        StoreError::new(
            StoreErrorKind::Corrupt,
            format!(
                "store `{shown}`: {what}, not a tower-degrade store; point the store at a new \
                 or empty directory"
            ),
        )
    };
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::new(
            StoreErrorKind::Io,
            format!("store `{shown}`: {e}; check the path and its permissions"),
        )),
        Ok(m) if !m.is_dir() => Err(foreign("a file".to_owned())),
        Ok(_) => {
            let mut entries = std::fs::read_dir(path).map_err(|e| {
                StoreError::new(StoreErrorKind::Io, format!("store `{shown}`: {e}"))
            })?;
            let empty = entries.next().is_none();
            if empty || path.join("version").is_file() {
                Ok(())
            } else {
                Err(foreign("a directory with other files".to_owned()))
            }
        }
    }
}

fn check_format(db: &Database, shown: &str) -> Result<(), StoreError> {
    let io = |e: fjall::Error| StoreError::new(StoreErrorKind::Io, format!("store `{shown}`: {e}"));
    let names: Vec<String> = db
        .list_keyspace_names()
        .iter()
        .map(|n| n.to_string())
        .collect();
    let ours = |n: &str| n == META || Queue::ALL.iter().any(|q| q.as_str() == n);
    if let Some(other) = names.iter().find(|n| !ours(n)) {
        return Err(StoreError::new(
            StoreErrorKind::Corrupt,
            format!(
                "store `{shown}`: a database with other data (keyspace `{other}`), not a \
                 tower-degrade store; point the store at a new directory"
            ),
        ));
    }
    let fresh = names.is_empty();
    let meta = db
        .keyspace(META, KeyspaceCreateOptions::default)
        .map_err(io)?;
    if fresh {
        let mut b = db.batch().durability(Some(PersistMode::SyncAll));
        b.insert(&meta, "format", FORMAT.to_be_bytes());
        return b.commit().map_err(io);
    }
    let format = meta
        .get("format")
        .map_err(io)?
        .and_then(|v| <[u8; 8]>::try_from(&*v).ok())
        .map(u64::from_be_bytes);
    match format {
        Some(FORMAT) => Ok(()),
        other => Err(StoreError::new(
            StoreErrorKind::Corrupt,
            format!(
                "store `{shown}`: written in store format {}, this version reads format \
                 {FORMAT}; replay it with the version that wrote it, or move it aside",
                other.map_or("(none)".to_owned(), |f| f.to_string())
            ),
        )),
    }
}

fn load(queues: &[Keyspace], shown: &str, index: &mut Index) -> Result<(), StoreError> {
    let io = |e: fjall::Error| StoreError::new(StoreErrorKind::Io, format!("store `{shown}`: {e}"));
    for (queue, ks) in Queue::ALL.into_iter().zip(queues) {
        for entry in ks.iter() {
            let (k, v) = entry.into_inner().map_err(io)?;
            let id = <[u8; 16]>::try_from(&*k).map(|b| TaskId(u128::from_be_bytes(b)));
            let task = id
                .map_err(|_| "a key that is not a task id".to_owned())
                .and_then(|_| Task::decode(&v).map_err(|e| e.to_string()))
                .map_err(|e| {
                    StoreError::new(
                        StoreErrorKind::Corrupt,
                        format!("store `{shown}`: queue `{queue}`: {e}; move the store aside"),
                    )
                })?;
            index.put(queue, &task);
        }
    }
    Ok(())
}

/// Kept tasks in an embedded [fjall](https://docs.rs/fjall) database (one directory),
/// committed durably (journal write + sync) in groups by one writer thread; an in-memory index
/// answers `due`, `depth` and idempotency keys. One process per directory (a second one is
/// refused with an error naming it). See the [module docs](self) for why fjall.
///
/// ```no_run
/// use tower_degrade::fallback::store::EmbeddedStore;
///
/// let store = EmbeddedStore::builder("kept").capacity(1_000_000).open()?;
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
    tx: Option<mpsc::Sender<Request>>,
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
    db: Database,
    /// One keyspace per queue, in `Queue::ALL` order.
    queues: Vec<Keyspace>,
    index: Mutex<Index>,
    path: PathBuf,
    capacity: u64,
}

#[derive(Debug)]
struct Request {
    ops: Vec<Op>,
    /// The record of each `Put`, in order: encoded by the caller, off the writer thread.
    records: Vec<Vec<u8>>,
    done: oneshot::Sender<Result<(), StoreError>>,
}

impl EmbeddedStore {
    /// A builder for the store in the directory at `path`.
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

    /// The store's directory.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }
}

impl Shared {
    fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn error(&self, e: fjall::Error) -> StoreError {
        StoreError::new(
            StoreErrorKind::Io,
            format!("store `{}`: {e}", self.path.display()),
        )
    }

    fn write_loop(&self, rx: mpsc::Receiver<Request>) {
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
                    let grows = index.len_after(&req.ops) as i64 - index.len() as i64;
                    if grows > 0 && (len + grows) as u64 > self.capacity {
                        let _ = req.done.send(Err(StoreError::new(
                            StoreErrorKind::Full,
                            format!(
                                "store `{}` is full ({} tasks)",
                                self.path.display(),
                                self.capacity
                            ),
                        )));
                        continue;
                    }
                    len += grows;
                    accepted.push(req);
                }
            }
            if accepted.is_empty() {
                continue;
            }
            match self.write(&accepted) {
                Ok(()) => {
                    let mut index = self.index();
                    for req in &accepted {
                        for op in &req.ops {
                            index.apply(op);
                        }
                    }
                    drop(index);
                    for req in accepted {
                        let _ = req.done.send(Ok(()));
                    }
                }
                Err(e) => {
                    tracing::error!(store = %self.path.display(), error = %e, "store commit failed");
                    for req in accepted {
                        let _ = req.done.send(Err(e.clone()));
                    }
                }
            }
        }
    }

    fn write(&self, batch: &[Request]) -> Result<(), StoreError> {
        let mut b = self.db.batch().durability(Some(PersistMode::SyncData));
        for req in batch {
            let mut records = req.records.iter();
            for op in &req.ops {
                match op {
                    Op::Put(q, task) => {
                        let record = records.next().map(Vec::as_slice).unwrap_or_default();
                        b.insert(&self.queues[*q as usize], key(task.id()), record);
                    }
                    Op::Remove(q, id) => b.remove(&self.queues[*q as usize], key(*id)),
                }
            }
        }
        b.commit().map_err(|e| self.error(e))
    }

    fn read(&self, queue: Queue, ids: &[TaskId]) -> Result<Vec<Task>, StoreError> {
        let ks = &self.queues[queue as usize];
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(v) = ks.get(key(*id)).map_err(|e| self.error(e))? {
                let task = Task::decode(&v).map_err(|e| {
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
        self.queues[queue as usize].len().unwrap() as u64
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
            Some(tx) => tx.send(Request { ops, records, done }).map_err(drop),
            None => Err(()),
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
            sent.map_err(|_| closed())?;
            rx.await.map_err(|_| closed())?
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fallback::record::Payload;

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("td-store-{}", TaskId::generate()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn task(n: u8) -> Task {
        Task::new("browse", None, Payload::Bytes(vec![n]))
    }

    #[tokio::test]
    async fn what_is_committed_is_there_after_reopening() {
        let path = dir().join("kept");
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
    async fn a_full_store_refuses_the_batch_and_keeps_the_rest() {
        let path = dir().join("kept");
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
    }

    #[test]
    fn a_foreign_file_or_directory_is_an_error_naming_it() {
        let d = dir();
        let junk = d.join("notes.txt");
        std::fs::write(&junk, b"hello, this is not a database at all").unwrap();
        let err = EmbeddedStore::open(&junk).unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Corrupt, "{err}");
        assert!(err.to_string().contains("notes.txt"), "{err}");

        let docs = d.join("docs");
        std::fs::create_dir_all(&docs).unwrap();
        std::fs::write(docs.join("README"), b"mine").unwrap();
        let err = EmbeddedStore::open(&docs).unwrap_err();
        assert!(err.to_string().contains("other files"), "{err}");
        assert!(docs.join("README").exists(), "nothing of theirs is touched");

        let other = d.join("other");
        {
            let db = Database::builder(&other).open().unwrap();
            let ks = db
                .keyspace("accounts", KeyspaceCreateOptions::default)
                .unwrap();
            ks.insert("1", "2").unwrap();
        }
        let err = EmbeddedStore::open(&other).unwrap_err();
        assert!(err.to_string().contains("accounts"), "{err}");
        assert!(err.to_string().contains("other"), "{err}");
    }

    #[test]
    fn a_damaged_record_is_an_error_naming_the_store_and_queue() {
        let path = dir().join("kept");
        {
            let db = Database::builder(&path).open().unwrap();
            let meta = db.keyspace(META, KeyspaceCreateOptions::default).unwrap();
            meta.insert("format", FORMAT.to_be_bytes()).unwrap();
            let spool = db
                .keyspace("spool", KeyspaceCreateOptions::default)
                .unwrap();
            spool
                .insert(7u128.to_be_bytes(), [1u8, 0xff, 0xff])
                .unwrap();
            db.persist(PersistMode::SyncAll).unwrap();
        }
        let err = EmbeddedStore::open(&path).unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Corrupt, "{err}");
        assert!(err.to_string().contains("queue `spool`"), "{err}");
        assert!(err.to_string().contains("kept"), "{err}");
    }

    #[test]
    fn a_second_process_or_handle_is_refused() {
        let path = dir().join("kept");
        let _first = EmbeddedStore::open(&path).unwrap();
        let err = EmbeddedStore::open(&path).unwrap_err();
        assert!(err.to_string().contains("another process"), "{err}");
    }
}
