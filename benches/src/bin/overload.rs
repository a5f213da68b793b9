//! The overload benchmark: priority admission and overload visibility, over real HTTP.
//!
//! ```text
//! cargo run --release -p tower-degrade-benches --bin overload -- [--secs 20] [--out DIR]
//!     [--scenarios steady,step,ramp,visibility] [--configs unprotected,tower,admission,before,after]
//!     [--work-ms 10] [--scatter]
//! ```
//!
//! An axum server whose handlers share a fixed capacity (a semaphore of 16 permits held for
//! 10 ms of work by default: about 1,600 requests a second, known here and **not** told to
//! tower-degrade) is driven over loopback by an **open-loop** client: requests are sent at
//! fixed arrival times whatever happens to earlier ones, and latency is measured from the
//! intended send time, so coordinated omission cannot hide queueing. Each client request gives up after 1 s.
//! `--work-ms` sets the work's length (the arrival rates follow the capacity it makes), and
//! `--scatter` draws each call's work from an exponential distribution of that mean (a fixed
//! sequence): a slower service, with few calls a tick whose means scatter. Gold's SLA stays
//! 50 ms (its recovery line reads "never" where the work alone takes longer).
//!
//! Configurations, one after the other in one run:
//! - `unprotected`: the bare server.
//! - `tower`: tower's `load_shed` + `concurrency_limit(16)` around the whole router (told the
//!   capacity; priority-blind).
//! - `admission`: tower-degrade with default classes and [`Admission::adaptive`] (not told).
//! - `before` / `after`: tower-degrade without admission, default breakers; `before` counts
//!   calls the client abandoned as neutral cancellations (`abandon_timeout(None)`, as before
//!   abandoned calls counted as timeouts, and no overdue backlog), `after` as today.
//! - `before-seed` / `after-seed`: the same without the failure-rate trip, so that the seed's
//!   degrade rule (3 windows with success < 92 % and p99 > 800 ms) is what reacts.
//!
//! Scenarios (multiples of the capacity, gold / silver / bronze):
//! - `steady`: 0.5 / 1.0 / 1.5 (3x) for the whole run.
//! - `step`: 1x (1/6, 1/3, 1/2) for the first third, then 3x.
//! - `ramp`: from 0.5x to 3.5x in total, linearly, same mix.
//! - `visibility`: gold 0.57x + bronze 2.8x (the overload-visibility issue's run).
//!
//! Every request is accounted for: served (2xx), rejected (a degraded answer, 503), timed out
//! at the client, or failed. The tables go to stdout; per-100 ms bins go to `DIR/*.csv` for
//! `benches/plot_overload.py`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::routing::get;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tower::ServiceBuilder;
use tower_degrade::admit::Admission;
use tower_degrade::breaker::{BreakerConfig, State as BreakerState};
use tower_degrade::classify::HttpClassifier;
use tower_degrade::{BoxError, ClassConfig, Degrader};
use tower_degrade_benches::percentile;

/// Server permits.
const PERMITS: usize = 16;
/// The work a call holds a permit for (`--work-ms`, `--scatter`), set once at the start.
static WORK_SET: std::sync::OnceLock<Work> = std::sync::OnceLock::new();

#[derive(Debug, Clone, Copy)]
struct Work {
    mean: Duration,
    /// Each call's work drawn from an exponential distribution of mean `mean`.
    scatter: bool,
}

impl Work {
    fn get() -> Work {
        *WORK_SET.get_or_init(|| Work {
            mean: WORK,
            scatter: false,
        })
    }

    /// The work of the `n`th call: `mean`, or an exponential draw (splitmix64 of `n`).
    fn of(self, n: u64) -> Duration {
        if !self.scatter {
            return self.mean;
        }
        let mut z = n.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let u = ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        self.mean.mul_f64(-u.ln())
    }

    /// Nominal capacity, requests per second (the arrival rates are multiples of it).
    fn capacity(self) -> f64 {
        PERMITS as f64 / self.mean.as_secs_f64()
    }
}
/// Work per request, holding a permit.
const WORK: Duration = Duration::from_millis(10);
const CLIENT_TIMEOUT: Duration = Duration::from_secs(1);
const BIN_MS: u64 = 100;
const TICK: Duration = Duration::from_millis(500);
const CLASSES: [&str; 3] = ["gold", "silver", "bronze"];
const SLA_MS: [f64; 3] = [50.0, 200.0, 1000.0];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Config {
    Unprotected,
    Tower,
    Admission,
    Before,
    After,
    BeforeSeed,
    AfterSeed,
}

impl Config {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "unprotected" => Config::Unprotected,
            "tower" => Config::Tower,
            "admission" => Config::Admission,
            "before" => Config::Before,
            "after" => Config::After,
            "before-seed" => Config::BeforeSeed,
            "after-seed" => Config::AfterSeed,
            _ => return None,
        })
    }

    fn label(self) -> &'static str {
        match self {
            Config::Unprotected => "(a) unprotected",
            Config::Tower => "(b) tower load_shed + concurrency_limit(16), told the capacity",
            Config::Admission => "(c) tower-degrade, adaptive admission, not told",
            Config::Before => "tower-degrade breakers, abandoned = cancelled (before)",
            Config::After => "tower-degrade breakers, abandoned past SLA = timeout (after)",
            Config::BeforeSeed => "tower-degrade, seed rule only, before",
            Config::AfterSeed => "tower-degrade, seed rule only, after",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Config::Unprotected => "unprotected",
            Config::Tower => "tower",
            Config::Admission => "admission",
            Config::Before => "before",
            Config::After => "after",
            Config::BeforeSeed => "before-seed",
            Config::AfterSeed => "after-seed",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Steady,
    Step,
    Ramp,
    Visibility,
}

impl Scenario {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "steady" => Scenario::Steady,
            "step" => Scenario::Step,
            "ramp" => Scenario::Ramp,
            "visibility" => Scenario::Visibility,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Scenario::Steady => "steady",
            Scenario::Step => "step",
            Scenario::Ramp => "ramp",
            Scenario::Visibility => "visibility",
        }
    }

    /// Arrival rates at `t` seconds into a run of `secs`, as multiples of the capacity.
    fn rates(self, t: f64, secs: f64) -> [f64; 3] {
        const MIX: [f64; 3] = [1.0 / 6.0, 1.0 / 3.0, 1.0 / 2.0];
        match self {
            Scenario::Steady => [0.5, 1.0, 1.5],
            Scenario::Step => {
                let total = if t < self.step_at(secs).unwrap_or(0.0) {
                    1.0
                } else {
                    3.0
                };
                MIX.map(|m| m * total)
            }
            Scenario::Ramp => MIX.map(|m| m * (0.5 + 3.0 * t / secs)),
            Scenario::Visibility => [0.57, 0.0, 2.8],
        }
    }

    fn step_at(self, secs: f64) -> Option<f64> {
        (self == Scenario::Step).then_some(secs / 3.0)
    }

    /// Where the steady-state statistics start.
    fn steady_from(self, secs: f64) -> f64 {
        match self {
            Scenario::Step => self.step_at(secs).unwrap_or(0.0),
            Scenario::Ramp => 0.0,
            _ => (secs / 4.0).min(5.0),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    Rejected,
    Timeout,
    Failed,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    class: usize,
    /// Intended send time, µs from the start.
    at_us: u64,
    latency_us: u64,
    outcome: Outcome,
}

#[derive(Default)]
struct ServerStats {
    started: AtomicU64,
    done: AtomicU64,
    hold_us: AtomicU64,
}

struct ServerState {
    permits: Semaphore,
    stats: ServerStats,
}

async fn work(State(s): State<Arc<ServerState>>) -> StatusCode {
    let Ok(_permit) = s.permits.acquire().await else {
        return StatusCode::INTERNAL_SERVER_ERROR;
    };
    let start = Instant::now();
    let n = s.stats.started.fetch_add(1, Relaxed);
    tokio::time::sleep(Work::get().of(n)).await;
    s.stats
        .hold_us
        .fetch_add(start.elapsed().as_micros() as u64, Relaxed);
    s.stats.done.fetch_add(1, Relaxed);
    StatusCode::OK
}

struct Server {
    addr: SocketAddr,
    state: Arc<ServerState>,
    degrader: Option<Degrader>,
    task: tokio::task::JoinHandle<()>,
}

async fn serve(config: Config) -> Result<Server, BoxError> {
    let state = Arc::new(ServerState {
        permits: Semaphore::new(PERMITS),
        stats: ServerStats::default(),
    });
    let router = Router::new()
        .route("/gold", get(work))
        .route("/silver", get(work))
        .route("/bronze", get(work))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let mut degrader = None;
    let task = match config {
        Config::Unprotected => tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        }),
        Config::Tower => {
            let svc = ServiceBuilder::new()
                .layer(HandleErrorLayer::new(|_: BoxError| async {
                    StatusCode::SERVICE_UNAVAILABLE
                }))
                .load_shed()
                .concurrency_limit(PERMITS)
                .service(router);
            tokio::spawn(async move {
                let _ = axum::serve(
                    listener,
                    axum::ServiceExt::<axum::extract::Request>::into_make_service(svc),
                )
                .await;
            })
        }
        Config::Admission
        | Config::Before
        | Config::After
        | Config::BeforeSeed
        | Config::AfterSeed => {
            let class = |c: ClassConfig| {
                if matches!(config, Config::Before | Config::BeforeSeed) {
                    c.abandon_timeout(None)
                } else {
                    c
                }
            };
            let mut b = Degrader::builder("overload")
                .tick(TICK)
                .class(class(ClassConfig::gold("gold")))
                .class(class(ClassConfig::silver("silver")))
                .class(class(ClassConfig::bronze("bronze")));
            match config {
                Config::Admission => b = b.admission(Admission::adaptive()),
                // Without the failure-rate trip, the seed's degrade rule (3 windows with
                // success < 92 % and p99 > 800 ms) is what reacts.
                Config::BeforeSeed | Config::AfterSeed => {
                    b = b.breaker(BreakerConfig::default().failure_rate(1.0));
                }
                _ => {}
            }
            let d = b.build()?;
            let classify = HttpClassifier::builder(d.registry())
                .route(None, "/gold", "gold")?
                .route(None, "/silver", "silver")?
                .route(None, "/bronze", "bronze")?
                .user_key("x-user-id")?
                .build();
            let app = router.layer(d.layer(classify).http());
            degrader = Some(d);
            tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            })
        }
    };
    Ok(Server {
        addr,
        state,
        degrader,
        task,
    })
}

/// Arrival times (s) and classes, merged and sorted.
fn schedule(scenario: Scenario, secs: f64) -> Vec<(f64, usize)> {
    let mut out = Vec::new();
    for class in 0..3 {
        let mut t = 0.0;
        while t < secs {
            let rate = scenario.rates(t, secs)[class] * Work::get().capacity();
            if rate <= 0.0 {
                t += 0.01;
                continue;
            }
            out.push((t, class));
            t += 1.0 / rate;
        }
    }
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// One tick of the degrader's state, for the breaker and limit columns.
#[derive(Debug, Clone)]
struct Observed {
    at: f64,
    /// Degrader ticks since the run started.
    tick: u64,
    states: [BreakerState; 3],
    policy: [bool; 3],
    limit: Option<u32>,
}

async fn drive(server: &Server, scenario: Scenario, secs: f64) -> (Vec<Sample>, Vec<Observed>) {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(8192)
        .build_http();
    let plan = schedule(scenario, secs);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let start = Instant::now() + Duration::from_millis(50);
    // The degrader's view, once per tick.
    let monitor = server.degrader.clone().map(|d| {
        tokio::spawn(async move {
            let mut seen = Vec::new();
            tokio::time::sleep_until(start).await;
            let first = d.status().tick;
            // Finer than the tick, to see when a tick changed something.
            let mut t = tokio::time::interval(Duration::from_millis(50));
            loop {
                t.tick().await;
                let at = start.elapsed().as_secs_f64();
                if at > secs + 1.0 {
                    return seen;
                }
                let status = d.status();
                if seen
                    .last()
                    .is_some_and(|o: &Observed| o.tick == status.tick - first)
                {
                    continue;
                }
                let state = |i: usize| status.classes[i + 1].state;
                let policy = |i: usize| state(i) == BreakerState::Degraded;
                seen.push(Observed {
                    at,
                    tick: status.tick - first,
                    states: [state(0), state(1), state(2)],
                    policy: [policy(0), policy(1), policy(2)],
                    limit: status.admission.first().map(|l| l.limit),
                });
            }
        })
    });
    for (i, &(t, class)) in plan.iter().enumerate() {
        let at = start + Duration::from_secs_f64(t);
        tokio::time::sleep_until(at).await;
        let req = Request::get(format!("http://{}/{}", server.addr, CLASSES[class]))
            .header("x-user-id", format!("user-{}", i % 1000))
            .body(Empty::new())
            .expect("a valid request");
        let (client, tx) = (client.clone(), tx.clone());
        tokio::spawn(async move {
            let call = async {
                let res = client.request(req).await?;
                let status = res.status();
                res.into_body().collect().await?;
                Ok::<_, BoxError>(status)
            };
            let outcome = match tokio::time::timeout_at(at + CLIENT_TIMEOUT, call).await {
                Err(_) => Outcome::Timeout,
                Ok(Err(_)) => Outcome::Failed,
                Ok(Ok(s)) if s.is_success() => Outcome::Ok,
                Ok(Ok(_)) => Outcome::Rejected,
            };
            let _ = tx.send(Sample {
                class,
                at_us: (t * 1e6) as u64,
                latency_us: at.elapsed().as_micros() as u64,
                outcome,
            });
        });
    }
    drop(tx);
    let mut samples = Vec::with_capacity(plan.len());
    while let Some(s) = rx.recv().await {
        samples.push(s);
    }
    assert_eq!(samples.len(), plan.len(), "every request is accounted for");
    let observed = match monitor {
        Some(m) => m.await.unwrap_or_default(),
        None => Vec::new(),
    };
    (samples, observed)
}

struct ClassStats {
    sent: usize,
    ok: usize,
    rejected: usize,
    timeout: usize,
    failed: usize,
    p50: f64,
    p99: f64,
    goodput: f64,
}

fn class_stats(samples: &[Sample], class: usize, from: f64, to: f64) -> ClassStats {
    let mine: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.class == class)
        .filter(|s| (from * 1e6..to * 1e6).contains(&(s.at_us as f64)))
        .collect();
    let count = |o: Outcome| mine.iter().filter(|s| s.outcome == o).count();
    let mut lat: Vec<u64> = mine.iter().map(|s| s.latency_us).collect();
    lat.sort_unstable();
    let ok = count(Outcome::Ok);
    ClassStats {
        sent: mine.len(),
        ok,
        rejected: count(Outcome::Rejected),
        timeout: count(Outcome::Timeout),
        failed: count(Outcome::Failed),
        p50: percentile(&lat, 0.50),
        p99: percentile(&lat, 0.99),
        goodput: ok as f64 / (to - from),
    }
}

/// The first bin start (s, from the step) after which gold's p99 stays within its SLA.
fn recovery(samples: &[Sample], step: f64, secs: f64) -> Option<f64> {
    let bins = ((secs - step) * 1000.0 / BIN_MS as f64) as usize;
    let p99s: Vec<f64> = (0..bins)
        .map(|b| {
            let from = step + (b as u64 * BIN_MS) as f64 / 1000.0;
            class_stats(samples, 0, from, from + BIN_MS as f64 / 1000.0).p99
        })
        .collect();
    // A bin with no gold call (NaN) is not a bad one.
    let last_bad = p99s.iter().rposition(|p| *p > SLA_MS[0]);
    match last_bad {
        None => Some(0.0),
        Some(b) if b + 1 < bins => Some(((b + 1) as u64 * BIN_MS) as f64 / 1000.0),
        Some(_) => None,
    }
}

fn write_bins(
    path: &std::path::Path,
    config: Config,
    samples: &[Sample],
    secs: f64,
    obs: &[Observed],
) {
    let mut out = String::new();
    let bins = (secs * 1000.0 / BIN_MS as f64) as usize;
    for b in 0..bins {
        let from = (b as u64 * BIN_MS) as f64 / 1000.0;
        for (class, name) in CLASSES.iter().enumerate() {
            let s = class_stats(samples, class, from, from + BIN_MS as f64 / 1000.0);
            if s.sent > 0 {
                let _ = writeln!(
                    out,
                    "{},{},{from:.1},{},{},{:.2}",
                    config.short(),
                    name,
                    s.sent,
                    s.ok,
                    s.p99
                );
            }
        }
    }
    for o in obs {
        if let Some(l) = o.limit {
            let _ = writeln!(out, "{},limit,{:.1},{l},0,0", config.short(), o.at);
        }
    }
    let mut existing = std::fs::read_to_string(path).unwrap_or_default();
    if existing.is_empty() {
        existing.push_str("config,class,t,sent,ok,p99_ms\n");
    }
    existing.push_str(&out);
    let _ = std::fs::write(path, existing);
}

fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let secs: f64 = arg("--secs").map_or(Ok(20.0), |s| s.parse())?;
    let work_ms: f64 = arg("--work-ms").map_or(Ok(WORK.as_secs_f64() * 1e3), |s| s.parse())?;
    // From a tenth of a millisecond (16,000 calls a second at capacity, 3.5 times that sent)
    // to a minute.
    if !(0.1..=60_000.0).contains(&work_ms) {
        return Err(format!("--work-ms {work_ms}: not within 0.1..=60000 milliseconds").into());
    }
    // A flag, not the value of the option before it (`--out --scatter` names a directory).
    let takes_value = ["--secs", "--out", "--scenarios", "--configs", "--work-ms"];
    let scatter = args
        .iter()
        .enumerate()
        .any(|(i, a)| a == "--scatter" && i > 0 && !takes_value.contains(&args[i - 1].as_str()));
    let work = Work {
        mean: Duration::from_secs_f64(work_ms / 1e3),
        scatter,
    };
    WORK_SET.set(work).map_err(|_| "the work was set twice")?;
    let out = std::path::PathBuf::from(arg("--out").unwrap_or_else(|| "target/overload".into()));
    std::fs::create_dir_all(&out)?;
    let list = |name: &str, default: &str| -> Vec<String> {
        arg(name)
            .unwrap_or_else(|| default.into())
            .split(',')
            .map(str::to_owned)
            .collect()
    };
    let scenarios: Vec<Scenario> = list("--scenarios", "steady,step,ramp,visibility")
        .iter()
        .map(|s| Scenario::parse(s).ok_or(format!("unknown scenario `{s}`")))
        .collect::<Result<_, _>>()?;
    let configs: Vec<Config> = list(
        "--configs",
        "unprotected,tower,admission,before,after,before-seed,after-seed",
    )
    .iter()
    .map(|s| Config::parse(s).ok_or(format!("unknown config `{s}`")))
    .collect::<Result<_, _>>()?;
    // Server and client on separate runtimes, as separate processes would be.
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    println!(
        "capacity: {PERMITS} permits x {} ms of work{} = {:.0} req/s nominal; client \
         timeout {} ms; {secs} s per run",
        work.mean.as_secs_f64() * 1e3,
        if work.scatter {
            " (mean, exponential)"
        } else {
            ""
        },
        work.capacity(),
        CLIENT_TIMEOUT.as_millis()
    );
    for scenario in scenarios {
        let csv = out.join(format!("{}.csv", scenario.name()));
        let _ = std::fs::remove_file(&csv);
        let which: Vec<Config> = configs
            .iter()
            .copied()
            .filter(|c| {
                let visibility = matches!(
                    c,
                    Config::Before | Config::After | Config::BeforeSeed | Config::AfterSeed
                );
                visibility == (scenario == Scenario::Visibility)
            })
            .collect();
        if which.is_empty() {
            continue;
        }
        let from = scenario.steady_from(secs);
        println!(
            "\n## {} (statistics from {from:.1} s to {secs} s)\n",
            scenario.name()
        );
        println!(
            "| configuration | class | sent | success | rejected | timed out | failed | p50 ms | p99 ms | goodput/s |"
        );
        println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        let mut extra = String::new();
        for config in which {
            let server = server_rt.block_on(serve(config))?;
            let (samples, observed) = client_rt.block_on(drive(&server, scenario, secs));
            let done = server.state.stats.done.load(Relaxed);
            let hold = server.state.stats.hold_us.load(Relaxed) as f64 / done.max(1) as f64;
            let capacity = PERMITS as f64 / (hold / 1e6);
            let mut total = 0.0;
            for (class, name) in CLASSES.iter().enumerate() {
                let s = class_stats(&samples, class, from, secs);
                if s.sent == 0 {
                    continue;
                }
                total += s.goodput;
                let pct = |n: usize| 100.0 * n as f64 / s.sent as f64;
                println!(
                    "| {} | {} | {} | {:.1} % | {:.1} % | {:.1} % | {:.1} % | {:.1} | {:.1} | {:.0} |",
                    config.label(),
                    name,
                    s.sent,
                    pct(s.ok),
                    pct(s.rejected),
                    pct(s.timeout),
                    pct(s.failed),
                    s.p50,
                    s.p99,
                    s.goodput
                );
            }
            let _ = writeln!(
                extra,
                "- {}: goodput {total:.0}/s = {:.1} % of the measured capacity ({capacity:.0}/s: \
                 {PERMITS} permits / {:.2} ms mean hold)",
                config.label(),
                100.0 * total / capacity,
                hold / 1000.0
            );
            if let Some(step) = scenario.step_at(secs) {
                let r = recovery(&samples, step, secs);
                let _ = writeln!(
                    extra,
                    "  - gold p99 within its {} ms SLA {} after the 1x -> 3x step",
                    SLA_MS[0],
                    r.map_or("never".into(), |r| format!("{:.0} ms", r * 1000.0))
                );
            }
            let limits: Vec<u32> = observed
                .iter()
                .filter(|o| o.at >= from)
                .filter_map(|o| o.limit)
                .collect();
            if !limits.is_empty() {
                let mean = limits.iter().map(|&l| f64::from(l)).sum::<f64>() / limits.len() as f64;
                let _ = writeln!(
                    extra,
                    "  - admission limit: mean {mean:.1} (min {}, max {}) against the {PERMITS} \
                     permits of the server ({:+.0} %)",
                    limits.iter().min().unwrap_or(&0),
                    limits.iter().max().unwrap_or(&0),
                    100.0 * (mean - PERMITS as f64) / PERMITS as f64
                );
            }
            if scenario == Scenario::Visibility {
                for class in [0, 2] {
                    let left = observed
                        .iter()
                        .position(|o| o.states[class] != BreakerState::Closed);
                    let policy = observed.iter().position(|o| o.policy[class]);
                    let _ = writeln!(
                        extra,
                        "  - {}: breaker left Closed {}; the seed rule fired {}",
                        CLASSES[class],
                        left.map_or("never".into(), |t| format!(
                            "{} ticks after the overload began ({:.2} s; {})",
                            observed[t].tick,
                            observed[t].at,
                            observed[t].states[class].as_str()
                        )),
                        policy.map_or("never".into(), |t| format!(
                            "{} ticks after ({:.2} s)",
                            observed[t].tick, observed[t].at
                        )),
                    );
                }
            }
            write_bins(&csv, config, &samples, secs, &observed);
            server.task.abort();
            // Let the sockets of this run close before the next.
            client_rt.block_on(async { tokio::time::sleep(Duration::from_secs(2)).await });
        }
        println!("\n{extra}");
    }
    Ok(())
}
