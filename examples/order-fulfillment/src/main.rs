//! The flagship example: an order-fulfillment service on axum and tonic, protected by
//! tower-degrade, through the seed design's Double-11 storm.
//!
//! ```text
//! cargo run --release -p example-order-fulfillment [-- --config FILE] [--serve] [--trace]
//! ```
//!
//! `--serve` then serves the protected configuration afresh (a new degrader and store: its
//! `/status` starts again at tick 0, while the Prometheus counters, one recorder for the
//! process, go on from the storm's) on `ORDER_FULFILLMENT_ADDR` (default `127.0.0.1:3000`),
//! which the protected run also listens on: `GET /metrics` (Prometheus),
//! `GET /status`. With `ORDER_FULFILLMENT_ADMIN_TOKEN` set (16 bytes or more), it also serves
//! the admin API (`tower_degrade::admin`) on `ORDER_FULFILLMENT_ADMIN_ADDR` (default
//! `127.0.0.1:3001`, loopback only), during the protected run and after it: the status page,
//! status, breaker commands and the HTTP layer's faults. `--trace` prints each class's outcomes
//! per second. The picture of the storm
//! goes to the system's temp dir (`order-fulfillment-storm.png`) unless `--png FILE` says
//! where.
//!
//! One binary serves, on one set of classes (`order-fulfillment.toml`):
//!
//! | call | class | tier | dependencies | when it cannot be served |
//! |---|---|---|---|---|
//! | `POST /payments/{order_id}/callback` | `payment_callback` | gold | db | delayed retry, then manual review |
//! | `POST /inventory/{sku}/deduct` | `inventory` | silver | db, redis | merged per SKU into batched writes |
//! | `GET /products/{id}` | `product_detail` | silver | db | the last good copy |
//! | `GET /orders/{id}/status` | `order_status` | silver | db | shed |
//! | gRPC `SubmitAsyncTask` | `async_task` | silver | payment API | delayed retry |
//! | queue consumer (task API) | `order_events` | silver | db | delayed retry |
//! | cron job (task API) | `order_timeout_check` | silver | db | skipped until the next run |
//! | `POST /events/browse` | `browse_log` | bronze | analytics API | spooled, backfilled off-peak |
//!
//! The dependencies are simulated: a database with a connection pool, Redis, and two
//! third-party APIs, each behind a `ChaosLayer` handle. The storm plays normal traffic, then a
//! slow database, both third-party APIs down and three times the traffic at once, then
//! recovery; twice with the same seed, unprotected and then protected. It prints a table per
//! class and checks what the example promises: protected, payment success of at least 99.9 %
//! with no payment callback lost, and every browse event spooled during the fault backfilled.

mod config;
mod plot;
mod predictor;
mod queue;
mod report;
mod shop;
mod storm;
mod world;

use std::net::SocketAddr;
use std::path::PathBuf;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tower_degrade::BoxError;

const USAGE: &str = "cargo run --release -p example-order-fulfillment [-- --config FILE] \
    [--png FILE] [--serve] [--trace]";

/// Errors as sentences (`main` returning `Err` would print their `Debug` form).
fn main() -> std::process::ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "tower_degrade=error".into()),
        )
        .init();
    let mut args = std::env::args().skip(1);
    let mut path = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/order-fulfillment.toml"
    ));
    let mut png = std::env::temp_dir().join("order-fulfillment-storm.png");
    let (mut serve, mut trace) = (false, false);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--config" => path = args.next().ok_or("--config needs a file")?.into(),
            "--png" => png = args.next().ok_or("--png needs a file")?.into(),
            "--serve" => serve = true,
            "--trace" => trace = true,
            "--help" | "-h" => {
                println!("{USAGE}\n\nSee docs/order-fulfillment.md for what it plays and prints.");
                return Ok(());
            }
            other => {
                return Err(format!("unknown argument `{other}`; usage: {USAGE}").into());
            }
        }
    }
    let mut config = config::Config::load(&path)?;
    if let Ok(url) = std::env::var("ORDER_FULFILLMENT_REDIS_URL") {
        config.queue.redis_url = Some(url);
    }
    let addr: SocketAddr = match std::env::var("ORDER_FULFILLMENT_ADDR") {
        Ok(a) => a
            .parse()
            .map_err(|e| format!("ORDER_FULFILLMENT_ADDR `{a}`: {e}"))?,
        Err(_) => SocketAddr::from(([127, 0, 0, 1], 3000)),
    };
    // What the protected run needs from the machine, checked before the storm rather than
    // after its first run: the port it serves on, and a configured store file.
    std::net::TcpListener::bind(addr)
        .map_err(|e| format!("cannot listen on {addr} (ORDER_FULFILLMENT_ADDR): {e}"))?;
    if let Some(store) = &config.storage.path {
        tower_degrade::fallback::store::EmbeddedStore::open(store)
            .map_err(|e| config.file.error("storage.path", e))?;
    }
    predictor::check(&config)?;
    // Latency as a Prometheus histogram, with buckets around the classes' SLAs (the file's
    // settings were checked when it was read).
    let registry = config
        .degrader()
        .build_with_worker()
        .map_err(|e| format!("{}: {e}", path.display()))?
        .0;
    let metrics = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(tower_degrade::metrics::LATENCY.into()),
            &tower_degrade::metrics::latency_buckets(registry.registry()),
        )?
        .install_recorder()?;
    drop(registry);

    let s = &config.storm;
    println!(
        "the storm ({}): {} s normal, {} s with a slow database, both third-party APIs down and \
         {}x the traffic, {} s of recovery; unprotected, then protected, seed {}",
        path.display(),
        s.normal_secs,
        s.fault_secs,
        s.spike,
        s.recovery_secs,
        s.seed
    );
    let admin = shop::AdminConfig::from_env()?;
    println!("run 1/2: unprotected ...");
    let unprotected = storm::play(
        &config,
        false,
        SocketAddr::from(([127, 0, 0, 1], 0)),
        None,
        None,
    )
    .await?;
    println!("run 2/2: protected, on http://{addr} (GET /metrics, GET /status as text) ...");
    if let Some(a) = &admin {
        println!("  the status page: http://{}/", a.addr);
    }
    let protected = storm::play(&config, true, addr, Some(metrics.clone()), admin.as_ref()).await?;
    println!();
    let alarm_at = config.predictor.as_ref().map(|p| p.alarm_at);
    print!("{}", report::table(&unprotected, &protected, alarm_at));
    println!();
    print!(
        "{}",
        report::predictor(&protected, alarm_at.unwrap_or(0.87))
    );
    println!("\nunprotected:");
    print!("{}", report::kept_work(&unprotected));
    println!("protected:");
    print!("{}", report::kept_work(&protected));
    println!("\nthe seed design's claims beside the protected run:\n");
    print!("{}", report::claims(&protected));
    plot::draw(&unprotected, &protected, &png)?;
    println!("\nthe storm, per second: {}", png.display());
    if trace {
        println!(
            "\nunprotected, per second:\n{}",
            report::timeline(&unprotected)
        );
        println!("protected, per second:\n{}", report::timeline(&protected));
    }
    let failures = report::check(&unprotected, &protected);
    if failures.is_empty() {
        println!(
            "\nchecks passed: payment success >= 99.9 % and no payment callback lost, every \
             spooled browse event backfilled, and the unprotected run lost work"
        );
    } else {
        println!("\nchecks FAILED:");
        for f in &failures {
            println!("- {f}");
        }
    }

    if serve {
        // A store of its own unless one is configured: the protected run's may still be
        // closing (its tasks are aborted, not yet dropped).
        let keep_store = config.storage.path.is_some();
        let mut serving = config.clone();
        if !keep_store {
            serving.storage.path = Some(std::env::temp_dir().join(format!(
                "order-fulfillment-{}-serve.redb",
                std::process::id()
            )));
        }
        let mut shop = shop::Shop::start(&serving, true, addr, Some(metrics)).await?;
        println!(
            "\nserving on http://{} (GET /metrics, GET /status as text; JSON from the admin API); Ctrl-C to stop",
            shop.addr
        );
        // The admin API, only when a token is configured, and on loopback only.
        if let Some(a) = &admin {
            shop.serve_admin(a).await?;
            println!(
                "admin API on http://{}: the status page at /, GET /status, GET /chaos; with the \
                 token, POST /classes/{{class}}/{{command}}, PUT and DELETE /chaos",
                a.addr
            );
        }
        tokio::signal::ctrl_c().await?;
        shop.stop(keep_store).await;
    } else {
        println!("(run with `-- --serve` to serve the protected configuration afterwards)");
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("{} check(s) failed", failures.len()).into())
    }
}
