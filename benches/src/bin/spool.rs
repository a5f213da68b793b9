//! Appends to the durable spool: how many tasks per second are acknowledged (durably stored)
//! and how long each waits for its acknowledgement, with `--writers` callers appending at
//! once (group commit shares each fsync between them).
//!
//! ```text
//! cargo run --release -p tower-degrade-benches --bin spool -- --tasks 200000 --writers 1,16,64,256
//! ```
//!
//! Prints one Markdown row per writer count: tasks/s, p50, p99 and max acknowledgement time.

use std::sync::Arc;
use std::time::Instant;

use tower_degrade::fallback::store::{EmbeddedStore, Op};
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

async fn run(store: Arc<dyn Store>, tasks: usize, writers: usize) -> (f64, Vec<u64>) {
    let per = tasks / writers;
    let start = Instant::now();
    let mut handles = Vec::new();
    for w in 0..writers {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per);
            for i in 0..per {
                let task = event(w * per + i);
                let t0 = Instant::now();
                store
                    .commit(vec![Op::Put(Queue::Spool, task)])
                    .await
                    .expect("stored");
                lat.push(t0.elapsed().as_micros() as u64);
            }
            lat
        }));
    }
    let mut lat = Vec::with_capacity(tasks);
    for h in handles {
        lat.extend(h.await.unwrap());
    }
    let rate = lat.len() as f64 / start.elapsed().as_secs_f64();
    lat.sort_unstable();
    (rate, lat)
}

/// Open loop: `rate` appends a second for `secs`, each timed from when it was due (so a
/// stalled store shows in the latency, not in a lower offered rate).
async fn open_loop(store: Arc<dyn Store>, rate: u64, secs: u64) -> (f64, Vec<u64>) {
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
                store
                    .commit(vec![Op::Put(Queue::Spool, task)])
                    .await
                    .expect("stored");
                let _ = tx.send(at.elapsed().as_micros() as u64);
            });
            sent += 1;
        }
    }
    drop(tx);
    let mut lat = Vec::with_capacity(total as usize);
    while let Some(l) = rx.recv().await {
        lat.push(l);
    }
    let achieved = lat.len() as f64 / start.elapsed().as_secs_f64();
    lat.sort_unstable();
    (achieved, lat)
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
    println!("| store | load | tasks | tasks/s | p50 ack | p99 ack | max ack |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    let rates: Vec<u64> = arg("--rates", "")
        .split(',')
        .filter(|r| !r.trim().is_empty())
        .map(|r| r.trim().parse().expect("--rates a,b,c"))
        .collect();
    let secs: u64 = arg("--secs", "5").parse().expect("--secs N");
    for &rate in &rates {
        let path = dir.join(format!("spool-open-{rate}"));
        let _ = std::fs::remove_dir_all(&path);
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&path).expect("store opens"));
        let (achieved, lat) = open_loop(store.clone(), rate, secs).await;
        assert_eq!(
            store.depth(Queue::Spool).len as usize,
            lat.len(),
            "every ack is stored"
        );
        println!(
            "| embedded (fjall) | open loop {rate}/s | {} | {:.0} | {:.2} ms | {:.2} ms | {:.2} ms |",
            lat.len(),
            achieved,
            percentile(&lat, 0.50),
            percentile(&lat, 0.99),
            percentile(&lat, 1.0),
        );
        drop(store);
        let _ = std::fs::remove_dir_all(&path);
    }
    for &w in &writers {
        let path = dir.join(format!("spool-{w}"));
        let _ = std::fs::remove_dir_all(&path);
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&path).expect("store opens"));
        // One writer alone pays one fsync per task: fewer tasks keep the run short.
        let n = if w == 1 { tasks.min(5_000) } else { tasks };
        let (rate, lat) = run(store.clone(), n, w).await;
        assert_eq!(
            store.depth(Queue::Spool).len as usize,
            lat.len(),
            "every ack is stored"
        );
        println!(
            "| embedded (fjall) | {w} writers | {} | {:.0} | {:.2} ms | {:.2} ms | {:.2} ms |",
            lat.len(),
            rate,
            percentile(&lat, 0.50),
            percentile(&lat, 0.99),
            percentile(&lat, 1.0),
        );
        drop(store);
        let _ = std::fs::remove_dir_all(&path);
    }
}
