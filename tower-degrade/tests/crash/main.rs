//! The crash harness: a writer process keeps calls through the degrade layer and the fallback
//! router (`delayed_retry` into the embedded store) and prints every `202` it gets; it is
//! killed with SIGKILL at random points and started again, and its worker replays what was
//! kept into an effect store that applies each idempotency key once. At the end a last
//! process drains everything, and every acknowledged task must have taken effect, once.
//!
//! `TD_CRASH_POINTS` sets the number of kills (100 by default; the closing note of the
//! fallback issue reports a run with 1,000).
//!
//! The child processes are this test binary run again with `TD_CRASH_ROLE` set: the test
//! `child_process` is what they run (it does nothing in a normal test run).

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tower::{Layer, ServiceExt, service_fn};
use tower_degrade::fallback::store::{EmbeddedStore, Op};
use tower_degrade::fallback::{
    FallbackRouter, Payload, Queue, Replayed, RetryPolicy, Store, Task, replay_fn,
};
use tower_degrade::{ClassConfig, Degrader, Route};

#[path = "../support.rs"]
mod support;

use support::Rng;

const ROLE: &str = "TD_CRASH_ROLE";

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

fn spawn(role: &str, dir: &Path, from: u64) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "child_process",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE, role)
        .env("TD_CRASH_DIR", dir)
        .env("TD_CRASH_FROM", from.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Complete lines starting with `prefix` (a line cut by the kill is not counted).
fn lines(out: &str, prefix: &str) -> Vec<String> {
    let complete = match out.rfind('\n') {
        Some(i) => &out[..=i],
        None => "",
    };
    complete
        .lines()
        .filter_map(|l| l.strip_prefix(prefix).map(str::to_owned))
        .collect()
}

#[test]
fn every_acknowledged_task_survives_kill_9_and_takes_effect_once() {
    if env(ROLE).is_some() {
        return;
    }
    let points: usize = env("TD_CRASH_POINTS")
        .and_then(|p| p.parse().ok())
        .unwrap_or(100);
    let dir = std::env::temp_dir().join(format!(
        "td-crash-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let mut rng = Rng(dir.as_os_str().len() as u64 ^ Instant::now().elapsed().as_nanos() as u64);
    rng.0 ^= std::process::id() as u64;
    let mut acked: HashSet<String> = HashSet::new();
    let mut replays = 0usize;
    for point in 0..points {
        let mut child = spawn("writer", &dir, point as u64 * 1_000_000);
        // Once it acknowledges calls (the store is open and recovered), kill it at a random
        // point in the next 50 ms.
        let stdout = child.stdout.take().unwrap();
        let (first_ack, acking) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut out = String::new();
            let mut stdout = std::io::BufReader::new(stdout);
            let mut line = String::new();
            while std::io::BufRead::read_line(&mut stdout, &mut line).unwrap_or(0) > 0 {
                if line.starts_with("ACK ") {
                    let _ = first_ack.send(());
                }
                out.push_str(&line);
                line.clear();
            }
            out
        });
        let _ = acking.recv_timeout(Duration::from_secs(30));
        std::thread::sleep(Duration::from_micros(rng.next_u64() % 50_000));
        child.kill().unwrap();
        child.wait().unwrap();
        let out = reader.join().unwrap();
        acked.extend(lines(&out, "ACK "));
        replays += lines(&out, "REPLAY ").len();
    }
    assert!(
        acked.len() >= points,
        "the writers acknowledged only {} tasks in {points} runs",
        acked.len()
    );
    // Drain: replay everything left, then list the effects.
    let mut check = spawn("check", &dir, 0);
    let mut out = String::new();
    check
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(
        check.wait().unwrap().success(),
        "the check process failed:\n{out}"
    );
    let effects = lines(&out, "EFFECT ");
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for e in &effects {
        *counts.entry(e.as_str()).or_default() += 1;
    }
    let lost: Vec<_> = acked
        .iter()
        .filter(|k| !counts.contains_key(k.as_str()))
        .collect();
    let doubled: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    println!(
        "crash points: {points}; acknowledged: {}; effects: {}; replays seen before the kills: \
         {replays}; lost: {}; double effects: {}",
        acked.len(),
        counts.len(),
        lost.len(),
        doubled.len()
    );
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    assert!(doubled.is_empty(), "applied twice: {doubled:?}");
    assert!(
        lines(&out, "LEFT ").iter().all(|l| l == "0"),
        "the drain left tasks behind"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// What the child processes run (see the module docs); nothing without `TD_CRASH_ROLE`.
#[test]
fn child_process() {
    let Some(role) = env(ROLE) else { return };
    let dir = PathBuf::from(env("TD_CRASH_DIR").unwrap());
    let from: u64 = env("TD_CRASH_FROM").unwrap().parse().unwrap();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(async move {
            match role.as_str() {
                "writer" => writer(&dir, from).await,
                _ => check(&dir).await,
            }
        });
}

/// The effect of a task: recorded once per idempotency key in a second store (what an
/// application does with the key: "insert if absent" in its own database).
fn effect_replay(
    effects: Arc<EmbeddedStore>,
    fail_one_in: u64,
) -> impl tower_degrade::fallback::Replay {
    let n = Arc::new(AtomicU64::new(0));
    replay_fn(move |task: &Task, _attempt| {
        let (effects, key, n) = (effects.clone(), task.key().into_owned(), n.clone());
        async move {
            println!("REPLAY {key}");
            if fail_one_in > 0 && n.fetch_add(1, Ordering::Relaxed) % fail_one_in == 0 {
                return Replayed::Retry("the dependency failed".into());
            }
            if matches!(effects.find_key("effect", &key).await, Ok(Some(_))) {
                return Replayed::Done;
            }
            let effect = Task::new("effect", Some(key), Payload::Bytes(Vec::new()));
            match effects.commit(vec![Op::Put(Queue::Review, effect)]).await {
                Ok(()) => Replayed::Done,
                Err(e) => Replayed::Retry(e.to_string()),
            }
        }
    })
}

fn open(dir: &Path) -> (EmbeddedStore, Arc<EmbeddedStore>, Degrader) {
    let kept = EmbeddedStore::open(dir.join("kept")).expect("the kept store opens");
    let effects = Arc::new(EmbeddedStore::open(dir.join("effects")).expect("effects open"));
    let d = Degrader::builder("crash")
        .class(ClassConfig::gold("pay").fallback_route(Route::DelayedRetry))
        .build()
        .unwrap();
    (kept, effects, d)
}

fn retry() -> RetryPolicy {
    RetryPolicy::default()
        .initial(Duration::from_millis(5))
        .max_interval(Duration::from_millis(20))
        .max_attempts(1_000)
        .deadline(None)
}

async fn writer(dir: &Path, from: u64) {
    let (kept, effects, d) = open(dir);
    let (router, worker) = FallbackRouter::builder(&d)
        .store(kept)
        .retry(retry())
        .period(Duration::from_millis(5))
        .replay(effect_replay(effects, 5))
        .build()
        .unwrap();
    tokio::spawn(worker.run());
    d.force_open("pay").unwrap();
    let id = d.class_id("pay").unwrap();
    let svc = d
        .layer(move |_: &Request<Full<Bytes>>| id)
        .http()
        .fallback_with(router)
        .layer(service_fn(|_req: Request<Full<Bytes>>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
        }));
    let mut callers = Vec::new();
    for c in 0..8u64 {
        let svc = svc.clone();
        callers.push(tokio::spawn(async move {
            for i in 0.. {
                let n = from + i * 8 + c;
                let key = format!("k-{n}");
                let req = Request::post(format!("/pay/{n}"))
                    .header("idempotency-key", &key)
                    .body(Full::new(Bytes::from(n.to_string())))
                    .unwrap();
                let res = svc.clone().oneshot(req).await.unwrap();
                if res.status() == StatusCode::ACCEPTED {
                    println!("ACK {key}");
                }
            }
        }));
    }
    for c in callers {
        let _ = c.await;
    }
}

async fn check(dir: &Path) {
    let (kept, effects, d) = open(dir);
    let kept: Arc<dyn Store> = Arc::new(kept);
    let (_router, worker) = FallbackRouter::builder(&d)
        .shared_store(kept.clone())
        .retry(retry())
        .period(Duration::from_millis(5))
        .replay(effect_replay(effects.clone(), 0))
        .build()
        .unwrap();
    let w = tokio::spawn(worker.run());
    let start = Instant::now();
    while kept.depth(Queue::Retry).len > 0 && start.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    w.abort();
    println!(
        "LEFT {}",
        kept.depth(Queue::Retry).len + kept.depth(Queue::Review).len
    );
    let mut after = None;
    loop {
        let page = effects.list(Queue::Review, after, 1000).await.unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.id());
        for t in &page {
            println!("EFFECT {}", t.key());
        }
    }
}
