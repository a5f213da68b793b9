//! The Redis Streams store against real `redis-server` processes on free ports (Debian's
//! `redis-server`; `scripts/test` installs it): instances sharing a queue, takeover from a
//! stopped instance, a server killed and restarted with `appendfsync always`, and an
//! unreachable server.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tempfile::TempDir;

use tower_degrade::fallback::store::{EmbeddedStore, Failover, Op, RedisStore, StoreErrorKind};
use tower_degrade::fallback::{
    FallbackRouter, Payload, Queue, Replayed, RetryPolicy, Store, Task, TaskId, replay_fn,
};
use tower_degrade::{ClassConfig, Degrader, Route};
use tracing::instrument::WithSubscriber;

#[path = "../logs.rs"]
mod logs;
use logs::Logs;

/// Every port a test of this binary was given (`reserve_port`): kept, so that a stopped
/// server's port stays its own for a restart.
static PORTS: Mutex<std::collections::BTreeSet<u16>> =
    Mutex::new(std::collections::BTreeSet::new());

/// A free port no other test of this binary has had (bound at 0 and let go, then recorded in
/// PORTS).
fn reserve_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if PORTS.lock().unwrap().insert(port) {
            return port;
        }
    }
}

/// A directory of its own for a server's append-only file.
fn redis_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("td-redis-")
        .tempdir()
        .unwrap()
}

/// A `redis-server` with its append-only file synced on every write, in its own directory.
struct Server {
    child: Child,
    port: u16,
    /// Removed when the server is dropped (after it is stopped), unless `kill` handed it on.
    dir: Option<TempDir>,
}

impl Server {
    /// A server on a free port. The port is found by binding port 0 and letting it go, so a
    /// test running alongside may be handed the same one, or the port of a server another
    /// test stopped and is about to restart: then one server fails to bind and exits, and
    /// both tests would talk to the other. So no port is used twice in this process (PORTS),
    /// and the server answering must be this child (`INFO`'s `process_id`), or another port is
    /// tried.
    fn start() -> Server {
        for _ in 0..20 {
            let port = reserve_port();
            if let Some(server) = Self::try_on(port, redis_dir()) {
                return server;
            }
        }
        panic!("no free port for redis-server in 20 tries");
    }

    /// A server on `port` (a stopped one's, to restart it), which must be this process.
    fn on(port: u16, dir: TempDir) -> Server {
        Self::try_on(port, dir)
            .unwrap_or_else(|| panic!("redis-server did not start on port {port}"))
    }

    fn try_on(port: u16, dir: TempDir) -> Option<Server> {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "redis-server must be installed (Debian's redis-server; scripts/test installs it)",
            );
        // Waited for when the server is dropped (or killed).
        let mut server = Server {
            child,
            port,
            dir: Some(dir),
        };
        for _ in 0..200 {
            if let Some(pid) = serving_pid(port) {
                return (pid == server.child.id()).then_some(server);
            }
            if server.child.try_wait().ok().flatten().is_some() {
                return None; // it exited: the port was taken
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Send the server a signal (`-STOP` hangs it, `-CONT` resumes it).
    fn signal(&self, sig: &str) {
        let done = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(done.success());
    }

    /// SIGKILL: no shutdown, no final save.
    fn kill(mut self) -> (u16, TempDir) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        (
            self.port,
            self.dir.take().expect("a server has its directory"),
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_port_another_server_holds_is_not_taken_for_a_new_ones() {
    // What `Server::start` guards against when two tests are handed the same free port.
    let first = Server::start();
    assert!(Server::try_on(first.port, redis_dir()).is_none());
    assert_eq!(serving_pid(first.port), Some(first.child.id()));
}

/// The process id of the redis-server answering on `port` (`INFO server`), if one answers.
fn serving_pid(port: u16) -> Option<u32> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    conn.write_all(b"INFO server\r\n").ok()?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    while !reply.ends_with(b"\r\n\r\n") {
        let n = conn.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&reply)
        .lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|v| v.trim().parse().ok())
}

fn store(server: &Server, consumer: &str) -> RedisStore {
    RedisStore::builder(server.url())
        .prefix("test")
        .consumer(consumer)
        .claim_timeout(Duration::from_millis(600))
        .build()
        .unwrap()
}

fn task(n: u32) -> Task {
    Task::new(
        "browse",
        Some(format!("key-{n}")),
        Payload::Bytes(n.to_be_bytes().to_vec()),
    )
}

async fn put_all(store: &dyn Store, tasks: &[Task]) {
    for chunk in tasks.chunks(50) {
        let ops = chunk
            .iter()
            .map(|t| Op::Put(Queue::Retry, t.clone()))
            .collect();
        store.commit(ops).await.unwrap();
    }
}

/// Replays recorded by instance.
type Log = Arc<Mutex<Vec<(String, String)>>>;

fn worker_for(
    d: &Degrader,
    store: RedisStore,
    name: &str,
    log: Log,
) -> tower_degrade::fallback::FallbackWorker {
    let name = name.to_owned();
    FallbackRouter::builder(d)
        .store(store)
        .retry(RetryPolicy::default().initial(Duration::from_millis(20)))
        .period(Duration::from_millis(20))
        .replay(replay_fn(move |t: &Task, _| {
            log.lock()
                .unwrap()
                .push((name.clone(), t.key().into_owned()));
            async { Replayed::Done }
        }))
        .build()
        .unwrap()
        .1
}

fn degrader() -> Degrader {
    Degrader::builder("redis-test")
        .class(ClassConfig::bronze("browse").fallback_route(Route::Spool))
        .build()
        .unwrap()
}

async fn until(mut done: impl FnMut() -> bool) {
    for _ in 0..500 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_one_queue_and_each_task_is_replayed_once() {
    let server = Server::start();
    let d = degrader();
    let tasks: Vec<Task> = (0..300).map(task).collect();
    put_all(&store(&server, "writer"), &tasks).await;
    let log: Log = Arc::default();
    let a = tokio::spawn(worker_for(&d, store(&server, "a"), "a", log.clone()).run());
    let b = tokio::spawn(worker_for(&d, store(&server, "b"), "b", log.clone()).run());
    let check = store(&server, "check");
    until(|| log.lock().unwrap().len() >= 300).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.abort();
    b.abort();
    let log = log.lock().unwrap().clone();
    let mut keys: Vec<&str> = log.iter().map(|(_, k)| k.as_str()).collect();
    keys.sort_unstable();
    keys.dedup();
    assert_eq!(keys.len(), 300, "every task replayed");
    assert_eq!(log.len(), 300, "none replayed twice");
    assert!(log.iter().any(|(w, _)| w == "a") && log.iter().any(|(w, _)| w == "b"));
    // Acknowledged: gone from the stream and the index.
    assert!(check.list(Queue::Retry, None, 10).await.unwrap().is_empty());
    assert_eq!(check.find_key("browse", "key-7").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_warns_of_a_server_without_its_append_only_file() {
    // Nothing checked it: a Redis restarted without persistence lost every kept task, with
    // one log line after the fact.
    let server = Server::start();
    let (logs, _guard) = Logs::capture();
    let s = store(&server, "a");
    async { s.ping().await.unwrap() }
        .with_current_subscriber()
        .await;
    assert!(
        !logs.text().contains("append-only file is off"),
        "{}",
        logs.text()
    );
    cli(&server, &["CONFIG", "SET", "appendonly", "no"]);
    async { s.ping().await.unwrap() }
        .with_current_subscriber()
        .await;
    assert!(
        logs.text().contains("append-only file is off"),
        "{}",
        logs.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_lost_its_streams_gets_its_consumer_group_back() {
    // Redis replaced by an empty one (or the stream deleted) under a running worker: its
    // reads failed with NOGROUP for ever and new tasks were kept but never replayed.
    let server = Server::start();
    let d = degrader();
    let log: Log = Arc::default();
    let (logs, _guard) = Logs::capture();
    let w = tokio::spawn(
        worker_for(&d, store(&server, "a"), "a", log.clone())
            .run()
            .with_current_subscriber(),
    );
    let writer = store(&server, "writer");
    put_all(&writer, &[task(1)]).await;
    assert!(
        !logs.text().contains("consumer groups are gone"),
        "{}",
        logs.text()
    );
    until(|| log.lock().unwrap().len() == 1).await;
    let deleted = Command::new("redis-cli")
        .args(["-p", &server.port.to_string(), "DEL", "test:delayed_retry"])
        .output()
        .expect("redis-cli (Debian's redis-tools, with redis-server)");
    assert!(deleted.status.success());
    put_all(&writer, &[task(2)]).await;
    until(|| log.lock().unwrap().len() == 2).await;
    w.abort();
    assert_eq!(log.lock().unwrap()[1].1, "key-2");
    // The loss is said once, not on every failed read until the group is back.
    let text = logs.text();
    assert_eq!(
        text.matches("consumer groups are gone").count(),
        1,
        "{text}"
    );
    assert!(text.contains("appendfsync always"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_left_pending_by_a_stopped_instance_are_taken_over() {
    let server = Server::start();
    let d = degrader();
    let tasks: Vec<Task> = (0..40).map(task).collect();
    let first = store(&server, "first");
    put_all(&first, &tasks).await;
    // The first instance takes every task, then stops without acknowledging any.
    let taken = first.due(Queue::Retry, u64::MAX, 100).await.unwrap();
    assert_eq!(taken.len(), 40);
    drop(first);
    let log: Log = Arc::default();
    let second =
        tokio::spawn(worker_for(&d, store(&server, "second"), "second", log.clone()).run());
    until(|| log.lock().unwrap().len() >= 40).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    second.abort();
    assert_eq!(log.lock().unwrap().len(), 40, "each taken over once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_appends_survive_a_killed_server() {
    let server = Server::start();
    let s = store(&server, "w");
    let tasks: Vec<Task> = (0..200).map(task).collect();
    put_all(&s, &tasks).await;
    let (port, dir) = server.kill();
    // Down: a commit fails (the call would get the reject answer, never a 202).
    let err = s
        .commit(vec![Op::Put(Queue::Retry, task(999))])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Io, "{err}");
    let server = Server::on(port, dir);
    let mut listed = Vec::new();
    let mut after = None;
    let fresh = store(&server, "reader");
    loop {
        let page = fresh.list(Queue::Retry, after, 64).await.unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.id());
        listed.extend(page);
    }
    assert_eq!(
        listed.len(),
        200,
        "every acknowledged task is there after the restart"
    );
    assert_eq!(
        fresh.find_key("browse", "key-150").await.unwrap(),
        Some((Queue::Retry, tasks[150].id()))
    );
    // The first handle reconnects by itself.
    let mut ok = false;
    for _ in 0..100 {
        if s.commit(vec![Op::Put(Queue::Retry, task(1000))])
            .await
            .is_ok()
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "the store reconnected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_means_reject_or_the_local_spool_as_configured() {
    // Reserved, so that no server of a test alongside starts on it.
    let port = reserve_port();
    let unreachable = || {
        RedisStore::builder(format!("redis://127.0.0.1:{port}"))
            .timeout(Duration::from_millis(300))
            .build()
            .unwrap()
    };
    let alone = unreachable();
    // Said at startup by `ping`, with the address.
    let err = alone.ping().await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Io);
    assert!(err.to_string().contains(&port.to_string()), "{err}");
    let err = alone
        .commit(vec![Op::Put(Queue::Spool, task(1))])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Io);
    assert!(err.to_string().contains(&port.to_string()), "{err}");
    // Refused: certainly not kept there.
    assert!(err.surely_unapplied());

    let dir = tempfile::Builder::new()
        .prefix("td-failover-")
        .tempdir()
        .unwrap();
    let failover = Failover::new(
        unreachable(),
        EmbeddedStore::open(dir.path().join("kept")).unwrap(),
    );
    failover
        .commit(vec![Op::Put(Queue::Spool, task(1))])
        .await
        .unwrap();
    assert_eq!(failover.depth(Queue::Spool).len, 1);
    // While the shared store is left alone, new tasks go to the local one: its room is what
    // the router's tier shares look at.
    let usage = failover.usage().unwrap();
    assert_eq!((usage.held, usage.capacity), (1, 10_000_000));
    let due = failover.due(Queue::Spool, u64::MAX, 10).await.unwrap();
    assert_eq!(due.len(), 1);
    failover
        .commit(vec![Op::Remove(Queue::Spool, due[0].id())])
        .await
        .unwrap();
    assert_eq!(failover.depth(Queue::Spool).len, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_one_instance_kept_is_refused_to_another() {
    // Two instances that both found a key free stored a task each: a client's retry sent to
    // the other instance while the first was storing ran twice.
    let server = Server::start();
    let (a, b) = (store(&server, "a"), store(&server, "b"));
    let first = task(1);
    let second = Task::new("browse", Some("key-1".into()), Payload::Bytes(vec![9]));
    a.commit(vec![Op::Put(Queue::Retry, first.clone())])
        .await
        .unwrap();
    let err = b
        .commit(vec![Op::Put(Queue::Spool, second.clone())])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::KeyTaken, "{err}");
    assert!(b.list(Queue::Spool, None, 10).await.unwrap().is_empty());
    assert_eq!(
        b.find_key("browse", "key-1").await.unwrap(),
        Some((Queue::Retry, first.id()))
    );
    // The task itself moves under its key; another class's key of the same name is another key.
    b.commit(vec![
        Op::Remove(Queue::Retry, first.id()),
        Op::Put(Queue::Review, first.clone()),
    ])
    .await
    .unwrap();
    let other_class = Task::new("search", Some("key-1".into()), Payload::Bytes(vec![]));
    b.commit(vec![Op::Put(Queue::Spool, other_class)])
        .await
        .unwrap();
    // Once the first task is done, the key is free.
    a.commit(vec![Op::Remove(Queue::Review, first.id())])
        .await
        .unwrap();
    b.commit(vec![Op::Put(Queue::Spool, second.clone())])
        .await
        .unwrap();
    assert_eq!(
        a.find_key("browse", "key-1").await.unwrap(),
        Some((Queue::Spool, second.id()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_call_at_two_instances_is_kept_once() {
    let server = Server::start();
    let d = degrader();
    let router = |name: &str| {
        FallbackRouter::builder(&d)
            .store(store(&server, name))
            .replay(replay_fn(|_, _| async { Replayed::Done }))
            .build()
            .unwrap()
            .0
    };
    let (ra, rb) = (router("a"), router("b"));
    let tasks = |r: &FallbackRouter| {
        d.tasks::<u32, TaskId>()
            .keep(r, |a| a.id)
            .idempotency_key(|_: &u32| "refund-42".to_owned())
            .build()
    };
    let (ta, tb) = (tasks(&ra), tasks(&rb));
    d.force_open("browse").unwrap();
    let never = |_| async { Ok::<_, tower_degrade::BoxError>(TaskId::generate()) };
    for round in 0..20u32 {
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..4 {
            let t = if i % 2 == 0 { ta.clone() } else { tb.clone() };
            calls.spawn(async move { t.run("browse", round, never).await.unwrap() });
        }
        let ids = calls.join_all().await;
        assert!(ids.iter().all(|id| *id == ids[0]), "round {round}: {ids:?}");
        let kept = store(&server, "check").list(Queue::Spool, None, 10).await;
        assert_eq!(kept.unwrap().len(), 1, "round {round}");
        // Done: the next round's calls are new work under the same key.
        ra.store()
            .commit(vec![Op::Remove(Queue::Spool, ids[0])])
            .await
            .unwrap();
    }
}

/// `redis-cli` against `server`, its arguments as given; its output, trimmed.
fn cli(server: &Server, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &server.port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli (Debian's redis-tools, with redis-server)");
    assert!(out.status.success(), "redis-cli {args:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_of_earlier_starts_that_hold_nothing_are_removed() {
    // Each start adds a consumer to the group: a fleet restarted often listed thousands.
    let server = Server::start();
    let consumers = |server: &Server| {
        let mut names: Vec<String> = cli(
            server,
            &["XINFO", "CONSUMERS", "test:delayed_retry", "replay"],
        )
        .lines()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "name")
        .map(|w| w[1].to_owned())
        .collect();
        names.sort();
        names
    };
    // `earlier` replayed a task and acknowledged it; `holder` holds one.
    let earlier = store(&server, "earlier");
    put_all(&earlier, &[task(1)]).await;
    let done = earlier.due(Queue::Retry, u64::MAX, 10).await.unwrap();
    earlier
        .commit(vec![Op::Remove(Queue::Retry, done[0].id())])
        .await
        .unwrap();
    let holder = store(&server, "holder");
    put_all(&holder, &[task(2)]).await;
    assert_eq!(
        holder.due(Queue::Retry, u64::MAX, 10).await.unwrap().len(),
        1
    );
    // The default (a day): nothing is that idle yet.
    let next = store(&server, "next");
    assert!(
        next.due(Queue::Retry, u64::MAX, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(consumers(&server)[..2], ["earlier", "holder"]);
    // Forgotten at once: `earlier` holds nothing and goes; `holder` holds a task and stays.
    let last = RedisStore::builder(server.url())
        .prefix("test")
        .consumer("last")
        .forget_consumers_after(Duration::ZERO)
        .build()
        .unwrap();
    assert!(
        last.due(Queue::Retry, u64::MAX, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let left = consumers(&server);
    assert!(
        !left.iter().any(|c| c == "earlier") && left.iter().any(|c| c == "holder"),
        "{left:?}"
    );
    // The held task is still pending, the holder's to acknowledge.
    assert_eq!(
        cli(&server, &["XPENDING", "test:delayed_retry", "replay"])
            .lines()
            .next(),
        Some("1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_of_a_kept_entry_is_replayed_once_and_deleted() {
    // A stream entry copied by hand (same record) was never acknowledged (a commit
    // acknowledges the indexed entry), handed from instance to instance every claim timeout,
    // and replayed each time.
    let server = Server::start();
    let d = degrader();
    put_all(&store(&server, "writer"), &[task(1)]).await;
    let copy = "local e = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1] \
                return redis.call('XADD', KEYS[1], '*', unpack(e[2]))";
    cli(&server, &["EVAL", copy, "1", "test:delayed_retry"]);
    assert_eq!(cli(&server, &["XLEN", "test:delayed_retry"]), "2");
    let log: Log = Arc::default();
    let a = tokio::spawn(worker_for(&d, store(&server, "a"), "a", log.clone()).run());
    let b = tokio::spawn(worker_for(&d, store(&server, "b"), "b", log.clone()).run());
    until(|| !log.lock().unwrap().is_empty()).await;
    // Several claim timeouts (600 ms) later, still once.
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    a.abort();
    b.abort();
    let log = log.lock().unwrap().clone();
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(cli(&server, &["XLEN", "test:delayed_retry"]), "0");
    assert_eq!(cli(&server, &["HLEN", "test:delayed_retry:ids"]), "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_restored_without_its_index_is_replayed() {
    // The only copy of a task, its index lost (a stream restored by hand): indexed when
    // delivered, replayed, acknowledged.
    let server = Server::start();
    let d = degrader();
    put_all(&store(&server, "writer"), &[task(1)]).await;
    cli(&server, &["DEL", "test:delayed_retry:ids"]);
    let log: Log = Arc::default();
    let a = tokio::spawn(worker_for(&d, store(&server, "a"), "a", log.clone()).run());
    until(|| !log.lock().unwrap().is_empty()).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    a.abort();
    assert_eq!(log.lock().unwrap().len(), 1);
    assert_eq!(cli(&server, &["XLEN", "test:delayed_retry"]), "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_entry_does_not_hide_the_others_from_a_listing() {
    // One entry not written by this library failed every listing of manual review: no kept
    // task could be shown or dropped through the review API.
    let server = Server::start();
    let s = store(&server, "a");
    s.ping().await.unwrap();
    let review = |n| Op::Put(Queue::Review, task(n));
    s.commit(vec![review(1), review(2)]).await.unwrap();
    cli(
        &server,
        &["XADD", "test:manual_review", "*", "k", "", "t", "garbage"],
    );
    cli(
        &server,
        &["XADD", "test:manual_review", "*", "x", "no record"],
    );
    s.commit(vec![review(3), review(4), review(5)])
        .await
        .unwrap();
    let keys = |page: &[Task]| {
        page.iter()
            .map(|t| t.key().into_owned())
            .collect::<Vec<_>>()
    };
    let all = s.list(Queue::Review, None, 10).await.unwrap();
    assert_eq!(keys(&all), ["key-1", "key-2", "key-3", "key-4", "key-5"]);
    // Pages of two are full pages: the unreadable entries do not cut one short.
    let first = s.list(Queue::Review, None, 2).await.unwrap();
    let second = s.list(Queue::Review, Some(first[1].id()), 2).await.unwrap();
    assert_eq!(keys(&second), ["key-3", "key-4"]);
    // The one task asked for is read as before.
    assert_eq!(
        s.get(Queue::Review, all[2].id())
            .await
            .unwrap()
            .map(|t| t.id()),
        Some(all[2].id())
    );
}

#[tokio::test]
async fn a_url_that_is_not_one_is_a_setting_refused_not_a_failure_to_retry() {
    // It was `Io`, the kind a caller retries; the password is not shown either way.
    for url in [
        "not a url",
        "http://127.0.0.1:6379",
        "redis://127.0.0.1:6379/abc",
        "redis://:hunter2@127.0.0.1:6379/abc",
    ] {
        let err = RedisStore::builder(url).build().unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Invalid, "{url}: {err}");
        assert!(err.to_string().contains("not a Redis URL"), "{err}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }
}

#[tokio::test]
async fn a_claim_timeout_the_heartbeats_cannot_keep_is_refused() {
    // A claim timeout of 0 (or 1 ms) was accepted: every instance took the others' tasks and
    // replayed them again (228 of 276 kept calls twice).
    for short in [Duration::ZERO, Duration::from_millis(1)] {
        let err = RedisStore::builder("redis://127.0.0.1:1")
            .claim_timeout(short)
            .build()
            .unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Invalid);
        assert!(err.to_string().contains("claim_timeout"), "{err}");
    }
    let err = RedisStore::builder("redis://127.0.0.1:1")
        .timeout(Duration::ZERO)
        .build()
        .unwrap_err();
    assert!(
        err.to_string().contains("timeout must be more than zero"),
        "{err}"
    );
    // The worker heartbeats when it steps: a period over a third of the claim timeout is
    // refused, naming both.
    let store = RedisStore::builder("redis://127.0.0.1:1")
        .claim_timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    let err = FallbackRouter::builder(&degrader())
        .store(Failover::new(
            store,
            tower_degrade::fallback::store::MemoryStore::default(),
        ))
        .replay(replay_fn(|_, _| async { Replayed::Done }))
        .period(Duration::from_millis(1_500))
        .build()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("fallback.period") && err.contains("3s") && err.contains("1.5s"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_redis_was_unreachable_no_instance_takes_the_others_tasks() {
    // While Redis is unreachable no instance can heartbeat, so every entry pending then looks
    // abandoned when it answers again: the first instance back took the others' entries and
    // replayed them a second time (23-46 % of a backfill after an 8 s outage).
    let server = Server::start();
    let quick = |name: &str| {
        RedisStore::builder(server.url())
            .prefix("test")
            .consumer(name)
            .claim_timeout(Duration::from_millis(600))
            .timeout(Duration::from_millis(200))
            .build()
            .unwrap()
    };
    let (a, b) = (quick("a"), quick("b"));
    put_all(&a, &(0..20).map(task).collect::<Vec<_>>()).await;
    let mine_a = a.due(Queue::Retry, u64::MAX, 10).await.unwrap();
    let mine_b = b.due(Queue::Retry, u64::MAX, 10).await.unwrap();
    assert_eq!((mine_a.len(), mine_b.len()), (10, 10));
    server.signal("-STOP");
    let stopped = std::time::Instant::now();
    assert!(a.due(Queue::Retry, u64::MAX, 10).await.is_err());
    assert!(b.due(Queue::Retry, u64::MAX, 10).await.is_err());
    tokio::time::sleep(Duration::from_millis(1_200).saturating_sub(stopped.elapsed())).await;
    server.signal("-CONT");
    // Both step as workers do (every 100 ms) for three claim timeouts.
    let b_ids: Vec<TaskId> = mine_b.iter().map(Task::id).collect();
    let mut taken_by_a = Vec::new();
    for _ in 0..18 {
        if let Ok(got) = a.due(Queue::Retry, u64::MAX, 10).await {
            taken_by_a.extend(got.iter().map(Task::id).filter(|id| b_ids.contains(id)));
        }
        let _ = b.due(Queue::Retry, u64::MAX, 10).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        taken_by_a.is_empty(),
        "a took {} of b's tasks",
        taken_by_a.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_delivered_while_their_answer_was_lost_are_read_back_at_once() {
    // A read sent to a hung Redis times out, and Redis runs it when it resumes: the entries
    // are delivered to this instance, pending, and it never saw them. They waited for the
    // claim timeout to be taken over, and were then said to be an abandoned instance's (a
    // trial: one task replayed 66 s after Redis, stalled and restarted, answered again).
    let server = Server::start();
    let a = RedisStore::builder(server.url())
        .prefix("test")
        .consumer("a")
        .claim_timeout(Duration::from_secs(60))
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    // The group first (a read of nothing), then the tasks.
    assert!(a.due(Queue::Retry, u64::MAX, 0).await.unwrap().is_empty());
    let tasks: Vec<Task> = (0..5).map(task).collect();
    put_all(&a, &tasks).await;
    server.signal("-STOP");
    assert!(a.due(Queue::Retry, u64::MAX, 10).await.is_err());
    server.signal("-CONT");
    // Redis ran the read it had waiting: the five are a's, pending, unseen.
    until(|| {
        cli(&server, &["XPENDING", "test:delayed_retry", "replay"])
            .lines()
            .next()
            == Some("5")
    })
    .await;
    let mut got = Vec::new();
    for _ in 0..20 {
        if let Ok(due) = a.due(Queue::Retry, u64::MAX, 10).await {
            got.extend(due.iter().map(Task::id));
        }
        if got.len() >= tasks.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    got.sort_unstable();
    let mut want: Vec<TaskId> = tasks.iter().map(Task::id).collect();
    want.sort_unstable();
    assert_eq!(
        got, want,
        "read back within a second, not after the claim timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_a_hung_redis_runs_late_changes_nothing() {
    // Against a hung Redis an append that timed out ran when it resumed: `Failover` had kept
    // the call locally meanwhile, so it was kept twice and replayed twice (61 of 273 calls
    // without an idempotency key, Redis paused 8 s), and another instance could take the
    // Redis copy.
    let server = Server::start();
    let redis = RedisStore::builder(server.url())
        .prefix("test")
        .consumer("a")
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let dir = tempfile::Builder::new()
        .prefix("td-failover-")
        .tempdir()
        .unwrap();
    let failover = Failover::new(
        redis.clone(),
        EmbeddedStore::open(dir.path().join("kept")).unwrap(),
    );
    let (before, during) = (task(1), task(2));
    failover
        .commit(vec![Op::Put(Queue::Spool, before.clone())])
        .await
        .unwrap();
    server.signal("-STOP");
    // Sent, not answered within the timeout: an error that does not say nothing was kept.
    let err = redis
        .commit(vec![Op::Put(Queue::Spool, task(3))])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Io);
    assert!(!err.surely_unapplied(), "{err}");
    // Then not sent: after a failure the server's clock is read again first, which times
    // out. Kept locally.
    failover
        .commit(vec![Op::Put(Queue::Spool, during.clone())])
        .await
        .unwrap();
    let err = redis
        .commit(vec![Op::Put(Queue::Spool, task(4))])
        .await
        .unwrap_err();
    assert!(err.surely_unapplied(), "{err}");
    server.signal("-CONT");
    // Asked on the same connection, after the appends the server had waiting.
    redis.ping().await.unwrap();
    assert_eq!(cli(&server, &["HLEN", "test:spool:ids"]), "1");
    assert_eq!(cli(&server, &["XLEN", "test:spool"]), "1");
    // The local store keeps the other (read alone while the shared store is left alone).
    let due = failover.due(Queue::Spool, u64::MAX, 10).await.unwrap();
    assert_eq!(due.iter().map(Task::id).collect::<Vec<_>>(), [during.id()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_instances_review_actions_on_one_task_the_second_is_refused() {
    // A requeue on one instance and a drop on another both answered 200: the task was
    // replayed and recorded as dropped.
    let server = Server::start();
    let (a, b) = (store(&server, "a"), store(&server, "b"));
    let t = task(1);
    a.commit(vec![Op::Put(Queue::Review, t.clone())])
        .await
        .unwrap();
    // Both found it, then each acts.
    assert!(a.get(Queue::Review, t.id()).await.unwrap().is_some());
    assert!(b.get(Queue::Review, t.id()).await.unwrap().is_some());
    a.commit(vec![
        Op::Remove(Queue::Review, t.id()),
        Op::Put(Queue::Retry, t.clone()),
    ])
    .await
    .unwrap();
    let err = b
        .commit(vec![
            Op::Remove(Queue::Review, t.id()),
            Op::Put(Queue::Audit, t.clone()),
        ])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Gone);
    assert!(err.to_string().contains(&t.id().to_string()), "{err}");
    // Nothing of the second was applied.
    assert_eq!(cli(&server, &["HLEN", "test:delayed_retry:ids"]), "1");
    assert_eq!(cli(&server, &["XLEN", "test:audit"]), "0");
    // A removal from another queue of a task already gone is still no error.
    b.commit(vec![Op::Remove(Queue::Spool, t.id())])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_held_tasks_are_heartbeated_and_not_taken_over() {
    // The heartbeat is one script per queue, its claims in chunks (Lua unpacks a few
    // thousand values at most), and runs on a timer of its own as well as with the reads.
    let server = Server::start();
    let (a, b) = (store(&server, "a"), store(&server, "b"));
    let tasks: Vec<Task> = (0..2_500).map(task).collect();
    put_all(&a, &tasks).await;
    assert_eq!(
        a.due(Queue::Retry, u64::MAX, 2_500).await.unwrap().len(),
        2_500
    );
    // Two claim timeouts (600 ms) with no read by `a`: its timer keeps them.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert!(
        b.due(Queue::Retry, u64::MAX, 2_500)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        cli(&server, &["XPENDING", "test:delayed_retry", "replay"])
            .lines()
            .next()
            .unwrap(),
        "2500"
    );
}
