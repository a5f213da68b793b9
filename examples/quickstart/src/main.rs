//! Run with `cargo run -p example-quickstart` (add `-- --serve` to keep serving afterwards).
//!
//! An axum server with three task classes behind one `DegradeLayer`:
//!
//! | route | class | tier |
//! |---|---|---|
//! | `POST /pay/{id}` | `payment_callback` | gold |
//! | `POST /inventory/{sku}` | `inventory` | silver, depends on the (simulated) database |
//! | `POST /log` | `browse_log` | bronze, depends on a (simulated) third-party API |
//!
//! plus `GET /metrics` (Prometheus) and `GET /status` on 127.0.0.1:3000, and, only when
//! `QUICKSTART_ADMIN_TOKEN` is set, `POST /admin/{class}/{command}` (`force_open`,
//! `force_closed`, `degrade`, `metrics_only`, `reset`) with `Authorization: Bearer <token>`.
//!
//! The shipped policies in `policies/` are loaded and watched (edit one while `--serve` runs and
//! it is reloaded). Diverted calls go to the fallback router, over an embedded durable store
//! (a fresh file under the system's temp dir, or `QUICKSTART_STORE`): browse logs are
//! spooled and backfilled once their class is healthy again, inventory deltas are merged per
//! SKU into batched writes, and what would be retried is retried with backoff.
//!
//! It then plays a short scenario against itself: normal traffic, then the database turns slow
//! (900 ms, 20 % errors) and the third-party API dies, then both recover. Each second it prints
//! every class's breaker state and what happened to its calls (`kept` = answered 202 and
//! stored): payments keep flowing, the inventory class is degraded by the seed's rule and its
//! deltas merged, the log class's breaker opens, its calls are spooled, and after the recovery
//! every spooled browse event is backfilled. It fails if a gold call or a kept call is lost.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::routing::{get, post};
use axum::{Router, body::Body};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tokio::time::{Instant, sleep};
use tower::ServiceExt;
use tower_degrade::fallback::store::EmbeddedStore;
use tower_degrade::fallback::{
    Backfill, Batch, BatchMerge, Capture, FallbackRouter, HttpReplay, Queue, REPLAY_HEADER,
};
use tower_degrade::protocol::TASK_ID_HEADER;
use tower_degrade::{
    ClassConfig, Degrader, Route,
    breaker::{BreakerConfig, Command},
};

/// The simulated world: 0 = healthy, 1 = slow database and dead third-party API.
#[derive(Default)]
struct World {
    phase: AtomicU8,
    calls: AtomicU64,
    /// Browse events the third-party API received, and of them, replays of kept calls.
    logged: AtomicU64,
    backfilled: AtomicU64,
    /// Merged inventory writes, and the deltas in them.
    writes: AtomicU64,
    merged_deltas: AtomicU64,
}

async fn pay() -> StatusCode {
    sleep(Duration::from_millis(5)).await;
    StatusCode::OK
}

async fn inventory(State(world): State<Arc<World>>) -> StatusCode {
    let n = world.calls.fetch_add(1, Ordering::Relaxed);
    if world.phase.load(Ordering::Relaxed) == 1 {
        // Slow database: 900 ms, one call in five fails.
        sleep(Duration::from_millis(900)).await;
        if n % 5 == 0 {
            return StatusCode::INTERNAL_SERVER_ERROR;
        }
    } else {
        sleep(Duration::from_millis(20)).await;
    }
    StatusCode::OK
}

async fn browse_log(State(world): State<Arc<World>>, headers: HeaderMap) -> StatusCode {
    if world.phase.load(Ordering::Relaxed) == 1 {
        // The third-party API is down.
        return StatusCode::BAD_GATEWAY;
    }
    world.logged.fetch_add(1, Ordering::Relaxed);
    if headers.contains_key(REPLAY_HEADER) {
        world.backfilled.fetch_add(1, Ordering::Relaxed);
    }
    StatusCode::ACCEPTED
}

/// The inventory class's `batch_merge`: the SKU from the path, the delta from the body (1 when
/// empty), summed per SKU and written as one batch.
fn inventory_batches(world: Arc<World>) -> BatchMerge<i64> {
    BatchMerge::new(
        |req| {
            let sku = req.uri.rsplit('/').next().unwrap_or_default().to_owned();
            let body = std::str::from_utf8(&req.body).map_err(|e| e.to_string())?;
            let delta = match body.trim() {
                "" => 1,
                n => n.parse().map_err(|e| format!("delta `{n}`: {e}"))?,
            };
            Ok((sku, delta))
        },
        |sum: &mut i64, delta| *sum += delta,
        tower::service_fn(move |batch: Batch<i64>| {
            let world = world.clone();
            async move {
                // One `UPDATE ... WHERE sku IN (...)` for the whole batch.
                sleep(Duration::from_millis(20)).await;
                world.writes.fetch_add(1, Ordering::Relaxed);
                let n: i64 = batch.items.iter().map(|(_, d)| d).sum();
                world.merged_deltas.fetch_add(n as u64, Ordering::Relaxed);
                Ok::<_, std::convert::Infallible>(())
            }
        }),
    )
    .flush_every(Duration::from_millis(200))
}

/// `POST /admin/{class}/{command}`: a manual breaker command, behind a bearer token.
async fn admin(
    State((degrader, token)): State<(Degrader, Arc<str>)>,
    Path((class, command)): Path<(String, String)>,
    headers: HeaderMap,
) -> (StatusCode, String) {
    let authorized = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| t.as_bytes() == token.as_bytes());
    if !authorized {
        return (
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token\n".into(),
        );
    }
    let command: Command = match command.parse() {
        Ok(c) => c,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    match degrader.command(&class, command) {
        Ok(state) => (StatusCode::OK, format!("{class}: {state}\n")),
        Err(e) => (StatusCode::NOT_FOUND, format!("{e}\n")),
    }
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    degraded: AtomicU64,
    kept: AtomicU64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "tower_degrade=warn".into()),
        )
        .init();
    // Short open durations so the scenario shows a full open → half-open → recovery cycle.
    let breaker = BreakerConfig::default()
        .open_duration(Duration::from_secs(2))
        .min_requests(10);
    let degrader = Degrader::builder("quickstart")
        .breaker(breaker)
        .class(ClassConfig::gold("payment_callback").depends_on("db"))
        .class(
            ClassConfig::silver("inventory")
                .depends_on("db")
                .fallback_route(Route::BatchMerge),
        )
        .class(
            ClassConfig::bronze("browse_log")
                .depends_on("third_party:analytics")
                .fallback_route(Route::Spool),
        )
        .build()?;
    // Latency as a Prometheus histogram, with buckets around the classes' SLAs.
    let prometheus = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(tower_degrade::metrics::LATENCY.into()),
            &tower_degrade::metrics::latency_buckets(degrader.registry()),
        )?
        .install_recorder()?;
    // The shipped policies (policies/*.rhai), hot-reloaded: edit one while `--serve` runs.
    let policy_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../policies");
    let _policies = degrader.watch_policies(policy_dir, Duration::from_millis(200))?;
    println!(
        "policies: {}",
        degrader
            .policies()
            .map(|p| p.names().join(", "))
            .unwrap_or_default()
    );
    let classify = degrader
        .http_classifier()
        .route(
            Some(axum::http::Method::POST),
            "/pay/{id}",
            "payment_callback",
        )?
        .route(
            Some(axum::http::Method::POST),
            "/inventory/{sku}",
            "inventory",
        )?
        .route(Some(axum::http::Method::POST), "/log", "browse_log")?
        .build();

    let world = Arc::new(World::default());
    let app_routes = Router::new()
        .route("/pay/{id}", post(pay))
        .route("/inventory/{sku}", post(inventory))
        .route("/log", post(browse_log))
        .with_state(world.clone());
    // The fallback router keeps diverted calls in an embedded store; its worker replays them
    // through the application *without* the degrade layer.
    let store_path = match std::env::var("QUICKSTART_STORE") {
        Ok(dir) => std::path::PathBuf::from(dir),
        Err(_) => {
            std::env::temp_dir().join(format!("tower-degrade-quickstart-{}", std::process::id()))
        }
    };
    let capture = Capture::new();
    let (router, worker) = FallbackRouter::builder(&degrader)
        .store(EmbeddedStore::open(&store_path)?)
        .capture(capture.clone())
        .replay(HttpReplay::<_, Body>::new(
            app_routes.clone(),
            capture.idempotency().clone(),
        ))
        .batch_merge("inventory", inventory_batches(world.clone()))
        .backfill(Backfill::default().rate(200.0))
        .build()?;
    let store = router.store().clone();
    // Stopped gracefully at the end: replays under way end and are recorded (a worker dropped
    // midway leaves them kept, to be replayed again by the next one).
    let (stop_worker, worker_stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(worker.run_until(
        async move {
            let _ = worker_stopped.await;
        },
        Duration::from_secs(10),
    ));
    println!("kept calls are stored in {}", store_path.display());
    let protected = app_routes
        .clone()
        // `Router::layer` (not `route_layer`): unmatched requests reach the layer too, and
        // count in the `default` class.
        .layer(
            degrader
                .layer(classify)
                .http()
                .fallback_with(router)
                .drain_rejected(),
        );
    let status_degrader = degrader.clone();
    let mut app = protected
        .clone()
        .route("/metrics", get(move || async move { prometheus.render() }))
        .route(
            "/status",
            get(move || async move { format!("{:#?}\n", status_degrader.status()) }),
        );
    // The admin endpoint exists only when a token is configured.
    if let Ok(token) = std::env::var("QUICKSTART_ADMIN_TOKEN") {
        if token.len() < 16 {
            return Err("QUICKSTART_ADMIN_TOKEN must be at least 16 characters".into());
        }
        let admin_routes = Router::new()
            .route("/admin/{class}/{command}", post(admin))
            .with_state((degrader.clone(), Arc::<str>::from(token)));
        app = app.merge(admin_routes);
        println!("admin endpoint enabled: POST /admin/{{class}}/{{command}}");
    }

    let addr: SocketAddr = match std::env::var("QUICKSTART_ADDR") {
        Ok(a) => a
            .parse()
            .map_err(|e| format!("QUICKSTART_ADDR `{a}`: {e}"))?,
        Err(_) => SocketAddr::from(([127, 0, 0, 1], 3000)),
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr} ({e}); set QUICKSTART_ADDR"))?;
    let addr = listener.local_addr()?;
    println!("serving on http://{addr} (GET /metrics, GET /status)");
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let tallies: Arc<[Tally; 3]> = Arc::new(Default::default());
    let routes = ["/pay/1", "/inventory/sku-1", "/log"];
    let started = Instant::now();
    let scenario_end = Duration::from_secs(11);
    let driver = {
        let tallies = tallies.clone();
        let app = protected.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            while started.elapsed() < scenario_end {
                tick.tick().await;
                for (i, route) in routes.iter().enumerate() {
                    let app = app.clone();
                    let tallies = tallies.clone();
                    let req = Request::post(*route).body(Body::empty()).unwrap();
                    tokio::spawn(async move {
                        let res = app.oneshot(req).await.unwrap();
                        let t = &tallies[i];
                        if res.headers().contains_key(TASK_ID_HEADER) {
                            t.kept.fetch_add(1, Ordering::Relaxed);
                        } else if res.extensions().get::<tower_degrade::Degraded>().is_some() {
                            t.degraded.fetch_add(1, Ordering::Relaxed);
                        } else if res.status().is_server_error() {
                            t.failed.fetch_add(1, Ordering::Relaxed);
                        } else {
                            t.ok.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                }
            }
        })
    };

    println!(
        "\n{:>4}  {:<9} {:<40} {:<40} {:<40}",
        "t(s)", "world", "payment_callback (gold)", "inventory (silver)", "browse_log (bronze)"
    );
    let mut seen = [Vec::new(), Vec::new(), Vec::new()];
    let mut gold_lost = 0;
    let mut kept = [0u64; 3];
    for second in 1..=scenario_end.as_secs() {
        match second {
            3 => world.phase.store(1, Ordering::Relaxed),
            7 => world.phase.store(0, Ordering::Relaxed),
            _ => {}
        }
        sleep(Duration::from_secs(1)).await;
        let status = degrader.status();
        let mut row = format!(
            "{second:>4}  {:<9}",
            if world.phase.load(Ordering::Relaxed) == 1 {
                "faulty"
            } else {
                "healthy"
            }
        );
        for (i, name) in ["payment_callback", "inventory", "browse_log"]
            .iter()
            .enumerate()
        {
            let class = status.classes.iter().find(|c| &*c.name == *name).unwrap();
            let t = &tallies[i];
            let (ok, failed, degraded, k) = (
                t.ok.swap(0, Ordering::Relaxed),
                t.failed.swap(0, Ordering::Relaxed),
                t.degraded.swap(0, Ordering::Relaxed),
                t.kept.swap(0, Ordering::Relaxed),
            );
            kept[i] += k;
            if i == 0 {
                gold_lost += failed + degraded;
            }
            if !seen[i].contains(&class.state) {
                seen[i].push(class.state);
            }
            let cell = format!(
                "{} ok={ok} fail={failed} degr={degraded} kept={k}",
                class.state
            );
            row.push_str(&format!(" {cell:<40}"));
        }
        println!("{row}");
    }
    driver.await?;
    // Every kept call is replayed: browse logs backfilled once the class is healthy, inventory
    // deltas written in merged batches.
    let drained = Instant::now();
    let left = || {
        [Queue::Spool, Queue::Retry, Queue::Journal]
            .iter()
            .map(|q| store.depth(*q).len)
            .sum::<u64>()
    };
    while left() > 0 && drained.elapsed() < Duration::from_secs(30) {
        sleep(Duration::from_millis(100)).await;
    }
    println!("\nhealth score: {:.1}", degrader.health_score());
    let states = |i: usize| {
        seen[i]
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(" -> ")
    };
    println!("payment_callback: {}, {gold_lost} calls lost", states(0));
    println!("inventory:        {}", states(1));
    println!("browse_log:       {}", states(2));
    println!(
        "browse_log:       {} kept while the class was diverted, {} backfilled once it was healthy, \
         {} left in the spool",
        kept[2],
        world.backfilled.load(Ordering::Relaxed),
        store.depth(Queue::Spool).len
    );
    println!(
        "inventory:        {} deltas kept, merged into {} writes ({} units)",
        kept[1],
        world.writes.load(Ordering::Relaxed),
        world.merged_deltas.load(Ordering::Relaxed)
    );
    let review = store.depth(Queue::Review).len;
    if review > 0 {
        println!("manual review:    {review} tasks wait for a person");
    }
    if gold_lost > 0 {
        return Err(format!("{gold_lost} gold calls were lost").into());
    }
    if left() > 0 {
        return Err(format!("{} kept calls were not replayed", left()).into());
    }
    if std::env::args().any(|a| a == "--serve") {
        println!("still serving on http://{addr}; Ctrl-C to stop");
        tokio::signal::ctrl_c().await?;
    } else {
        println!("(run with `-- --serve` to keep the server up and curl /metrics)");
    }
    // The server first, so that no call is kept while the worker stops.
    server.abort();
    let _ = server.await;
    let _ = stop_worker.send(());
    let _ = worker.await;
    if std::env::var_os("QUICKSTART_STORE").is_none() {
        drop(store);
        let _ = std::fs::remove_file(&store_path);
    }
    Ok(())
}
