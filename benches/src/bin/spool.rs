//! Appends to the durable spool: how many tasks per second are acknowledged (durably stored)
//! and how long each waits for its acknowledgement, with `--writers` callers appending at
//! once (group commit shares each fsync between them).
//!
//! ```text
//! cargo run --release -p tower-degrade-benches --bin spool -- --tasks 200000 --writers 1,16,64,256 \
//!     --rates 20000,50000 --secs 10 [--redis redis://127.0.0.1:6379]
//! ```
//!
//! Prints one Markdown row per store and load: tasks/s, p50, p99 and max acknowledgement time.
//! `--writers`: closed loop, each writer appends its next task when the last is acknowledged.
//! `--rates`: open loop, appends arrive at the rate whatever the store does. With `--redis`,
//! the Redis Streams store is measured beside the embedded one (run the server with
//! `--appendonly yes --appendfsync always` for the same durability).

use std::sync::Arc;
use std::time::Instant;

use tower_degrade::fallback::store::{EmbeddedStore, Op, RedisStore};
use tower_degrade::fallback::{HttpRequest, Payload, Queue, Store, Task};
use tower_degrade_benches::percentile;

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_owned())
}

/// A browse event as the quickstart captures it (~230 bytes stored).
fn event(i: usize) -> Task {
    Task::new(
        "browse_log",
        None,
        Payload::Http(HttpRequest {
            method: "POST".into(),
            uri: format!("/browse/{i}"),
            headers: vec![("content-type".into(), b"application/json".to_vec())],
            body: format!(
                "{{\"user\":\"u-{i}\",\"product\":\"sku-{}\",\"ms\":1732900000000,\"ref\":\"home\"}}",
                i % 997
            )
            .into_bytes()
            .repeat(2),
        }),
    )
}

async fn run(store: Arc<dyn Store>, tasks: usize, writers: usize) -> (f64, Vec<u64>, usize) {
    let per = tasks / writers;
    let start = Instant::now();
    let mut handles = Vec::new();
    for w in 0..writers {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            let (mut lat, mut failed) = (Vec::with_capacity(per), 0);
            for i in 0..per {
                let task = event(w * per + i);
                let t0 = Instant::now();
                match store.commit(vec![Op::Put(Queue::Spool, task)]).await {
                    Ok(()) => lat.push(t0.elapsed().as_micros() as u64),
                    Err(_) => failed += 1,
                }
            }
            (lat, failed)
        }));
    }
    let (mut lat, mut failed) = (Vec::with_capacity(tasks), 0);
    for h in handles {
        let (l, f) = h.await.unwrap();
        lat.extend(l);
        failed += f;
    }
    let rate = lat.len() as f64 / start.elapsed().as_secs_f64();
    lat.sort_unstable();
    (rate, lat, failed)
}

/// Open loop: `rate` appends a second for `secs`, each timed from when it was due (so a
/// stalled store shows in the latency, not in a lower offered rate).
async fn open_loop(store: Arc<dyn Store>, rate: u64, secs: u64) -> (f64, Vec<u64>, usize) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let start = tokio::time::Instant::now();
    let total = rate * secs;
    let per_ms = (rate / 1000).max(1);
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(1));
    let mut sent = 0u64;
    while sent < total {
        tick.tick().await;
        // Every append due by now (a late tick sends what it owes).
        let due = ((start.elapsed().as_micros() as u64 * rate) / 1_000_000 + per_ms).min(total);
        while sent < due {
            let (store, tx) = (store.clone(), tx.clone());
            let at = start + std::time::Duration::from_micros(sent * 1_000_000 / rate);
            let task = event(sent as usize);
            tokio::spawn(async move {
                let stored = store.commit(vec![Op::Put(Queue::Spool, task)]).await;
                let _ = tx.send(stored.map(|()| at.elapsed().as_micros() as u64));
            });
            sent += 1;
        }
    }
    drop(tx);
    let (mut lat, mut failed) = (Vec::with_capacity(total as usize), 0);
    while let Some(l) = rx.recv().await {
        match l {
            Ok(l) => lat.push(l),
            Err(_) => failed += 1,
        }
    }
    let achieved = lat.len() as f64 / start.elapsed().as_secs_f64();
    lat.sort_unstable();
    (achieved, lat, failed)
}

/// Every acknowledged append is in the store (the embedded store's depth is exact; the Redis
/// store's is a cache refreshed in the background).
fn check(kind: &str, store: &dyn Store, acked: usize) {
    if !kind.starts_with("redis") {
        assert_eq!(
            store.depth(Queue::Spool).len as usize,
            acked,
            "every ack is stored"
        );
    }
}

#[tokio::main]
async fn main() {
    let tasks: usize = arg("--tasks", "200000").parse().expect("--tasks N");
    let writers: Vec<usize> = arg("--writers", "1,16,64,256")
        .split(',')
        .filter(|w| !w.trim().is_empty())
        .map(|w| w.trim().parse().expect("--writers a,b,c"))
        .collect();
    let dir = std::path::PathBuf::from(arg("--dir", "target/spool-bench"));
    std::fs::create_dir_all(&dir).expect("--dir is writable");
    println!("| store | load | acked | failed | acked/s | p50 ack | p99 ack | max ack |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    let rates: Vec<u64> = arg("--rates", "")
        .split(',')
        .filter(|r| !r.trim().is_empty())
        .map(|r| r.trim().parse().expect("--rates a,b,c"))
        .collect();
    let secs: u64 = arg("--secs", "5").parse().expect("--secs N");
    let redis = arg("--redis", "");
    let mut kinds = vec!["embedded (redb)"];
    if !redis.is_empty() {
        kinds.push("redis streams");
    }
    let mut fresh = 0u32;
    let mut open = |kind: &str| -> (Arc<dyn Store>, std::path::PathBuf) {
        fresh += 1;
        let path = dir.join(format!("spool-{fresh}.redb"));
        let _ = std::fs::remove_file(&path);
        let store: Arc<dyn Store> = if kind.starts_with("redis") {
            Arc::new(
                RedisStore::builder(redis.as_str())
                    .prefix(format!("bench-{}-{fresh}", std::process::id()))
                    .build()
                    .expect("--redis is a redis:// URL"),
            )
        } else {
            Arc::new(EmbeddedStore::open(&path).expect("store opens"))
        };
        (store, path)
    };
    for kind in &kinds {
        for &rate in &rates {
            let (store, path) = open(kind);
            let (achieved, lat, failed) = open_loop(store.clone(), rate, secs).await;
            check(kind, &*store, lat.len());
            println!(
                "| {kind} | open loop {rate}/s | {} | {failed} | {:.0} | {:.2} ms | {:.2} ms | {:.2} ms |",
                lat.len(),
                achieved,
                percentile(&lat, 0.50),
                percentile(&lat, 0.99),
                percentile(&lat, 1.0),
            );
            drop(store);
            let _ = std::fs::remove_file(&path);
        }
        for &w in &writers {
            let (store, path) = open(kind);
            // One writer alone pays one sync per task: fewer tasks keep the run short.
            let n = if w == 1 { tasks.min(5_000) } else { tasks };
            let (rate, lat, failed) = run(store.clone(), n, w).await;
            check(kind, &*store, lat.len());
            println!(
                "| {kind} | {w} writers | {} | {failed} | {:.0} | {:.2} ms | {:.2} ms | {:.2} ms |",
                lat.len(),
                rate,
                percentile(&lat, 0.50),
                percentile(&lat, 0.99),
                percentile(&lat, 1.0),
            );
            drop(store);
            let _ = std::fs::remove_file(&path);
        }
    }
}
