//! The storm: open-loop traffic over real sockets (HTTP/1.1 and gRPC over HTTP/2), the queue
//! and the cron job, through three phases (normal, fault, recovery), every call recorded with
//! its class, its due time, its latency from that due time, and what became of it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;
use tower_degrade::BoxError;
use tower_degrade::breaker::State;
use tower_degrade::fallback::Queue;
use tower_degrade::protocol::{REASON_HEADER, ROUTE_HEADER, TASK_ID_HEADER};

use crate::config::Config;
use crate::queue::EventQueue;
use crate::shop::{self, OrderEvent, Shop, TaskOutcome, proto};

/// The classes in the order the report shows them.
pub(crate) const CLASSES: [&str; 8] = [
    shop::PAYMENT,
    shop::INVENTORY,
    shop::PRODUCT,
    shop::STATUS,
    shop::ASYNC_TASK,
    shop::EVENTS,
    shop::TIMEOUT_CHECK,
    shop::BROWSE,
];

/// Whether a class's calls carry work that must not be lost (writes), or are reads.
pub(crate) fn is_write(class: &str) -> bool {
    !matches!(class, shop::PRODUCT | shop::STATUS | shop::TIMEOUT_CHECK)
}

/// What became of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Served by the service.
    Ok,
    /// Stored durably and acknowledged (`202` with a task id; a kept task).
    Kept,
    /// Answered by a fallback without the service (a cached copy).
    Fallback,
    /// Shed: the layer's reject answer, nothing kept.
    Rejected,
    /// Failed: an error from the service, or the client gave up.
    Failed,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Sample {
    pub(crate) class: u8,
    /// When the call was due, from the start of the run.
    pub(crate) at_ms: u32,
    pub(crate) latency_us: u32,
    pub(crate) outcome: Outcome,
}

/// A class's breaker state, sampled every 50 ms.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StateSample {
    pub(crate) at_ms: u32,
    pub(crate) class: u8,
    pub(crate) state: State,
    /// The control tick the state is from.
    pub(crate) tick: u64,
    /// The failure predictor's probability for the class, when one is attached.
    pub(crate) prediction: Option<f64>,
    /// The predictor only reports for the class: its threshold is still calibrating.
    pub(crate) calibrating: bool,
}

/// The phases' boundaries, in milliseconds from the start.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Phases {
    pub(crate) fault_start: u32,
    pub(crate) fault_end: u32,
    pub(crate) end: u32,
}

/// Everything one run recorded.
#[derive(Debug)]
pub(crate) struct Run {
    pub(crate) protected: bool,
    pub(crate) phases: Phases,
    pub(crate) samples: Vec<Sample>,
    pub(crate) states: Vec<StateSample>,
    /// The effects on the dependencies, and what was left in the queues.
    pub(crate) effects: EffectsSummary,
    pub(crate) drained_ms: u32,
    /// The admission limiters every 500 ms: `name limit/in flight/waiting baseline`.
    pub(crate) limiters: Vec<(u32, String)>,
    /// The failure predictor that ran, or why none did.
    pub(crate) predictor: Result<String, String>,
    /// Each class's SLA in microseconds, in [`CLASSES`]' order (a call served slower is not
    /// served well: the report's recovery waits for calls within it).
    pub(crate) sla_us: Vec<u32>,
}

#[derive(Debug, Default, Clone)]
pub(crate) struct EffectsSummary {
    pub(crate) payments_applied: usize,
    pub(crate) payments_doubled: usize,
    pub(crate) refunds_applied: usize,
    pub(crate) refunds_doubled: usize,
    pub(crate) events_applied: usize,
    pub(crate) events_doubled: usize,
    pub(crate) browse_logged: u64,
    pub(crate) browse_backfilled: u64,
    pub(crate) inventory_writes: u64,
    pub(crate) inventory_merged: u64,
    pub(crate) left: Vec<(Queue, u64)>,
    pub(crate) review: u64,
    /// Where the order events came from, and how many were never acknowledged there.
    pub(crate) event_queue: String,
    pub(crate) events_unacknowledged: u64,
}

#[derive(Default)]
struct Recorder {
    samples: Mutex<Vec<Sample>>,
}

impl Recorder {
    fn record(&self, class: usize, at: Duration, latency: Duration, outcome: Outcome) {
        let s = Sample {
            class: class as u8,
            at_ms: at.as_millis() as u32,
            latency_us: latency.as_micros().min(u32::MAX as u128) as u32,
            outcome,
        };
        self.samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(s);
    }
}

fn class_index(name: &str) -> usize {
    CLASSES
        .iter()
        .position(|c| *c == name)
        .expect("a known class")
}

/// The arrival times of one class's calls: Poisson at its rate, times `spike` in the fault.
fn arrivals(rate: f64, spike: f64, phases: Phases, rng: &mut SmallRng) -> Vec<u32> {
    let mut out = Vec::new();
    let mut t = 0.0f64;
    loop {
        let in_fault = t >= f64::from(phases.fault_start) && t < f64::from(phases.fault_end);
        let r = if in_fault { rate * spike } else { rate };
        let u: f64 = rng.random::<f64>().max(1e-12);
        t += -u.ln() / r * 1000.0;
        if t >= f64::from(phases.end) {
            return out;
        }
        out.push(t as u32);
    }
}

/// Play the storm against a new instance of the service listening on `addr`, serving
/// `metrics` at `/metrics` if given.
pub(crate) async fn play(
    config: &Config,
    protected: bool,
    addr: std::net::SocketAddr,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    admin: Option<&crate::shop::AdminConfig>,
) -> Result<Run, BoxError> {
    let storm = &config.storm;
    let ms = |s: f64| (s * 1000.0) as u32;
    let phases = Phases {
        fault_start: ms(storm.normal_secs),
        fault_end: ms(storm.normal_secs + storm.fault_secs),
        end: ms(storm.normal_secs + storm.fault_secs + storm.recovery_secs),
    };
    let mut shop = Shop::start(config, protected, addr, metrics).await?;
    if let Some(admin) = admin {
        shop.serve_admin(admin).await?;
    }
    let shop = Arc::new(shop);
    let base = format!("http://{}", shop.addr);
    let http: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build_http();
    let grpc = proto::async_tasks_client::AsyncTasksClient::connect(base.clone()).await?;
    let timeout = Duration::from_millis(storm.client_timeout_ms);
    let recorder = Arc::new(Recorder::default());
    let start = Instant::now();

    // The breaker states, every 50 ms.
    let states = Arc::new(Mutex::new(Vec::new()));
    let limiters = Arc::new(Mutex::new(Vec::new()));
    let sampler = {
        let shop = shop.clone();
        let states = states.clone();
        let limiters = limiters.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(50));
            loop {
                every.tick().await;
                let at_ms = start.elapsed().as_millis() as u32;
                let status = shop.degrader.status();
                if at_ms % 500 < 50 {
                    let now: Vec<String> = shop
                        .degrader
                        .admission()
                        .iter()
                        .filter(|l| l.inflight + l.waiting > 0 || l.limit != 10)
                        .map(|l| {
                            format!(
                                "{} {}/{}/{} {:.0}ms",
                                l.name,
                                l.limit,
                                l.inflight,
                                l.waiting,
                                l.baseline_micros.unwrap_or(0.0) / 1000.0
                            )
                        })
                        .collect();
                    limiters
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((at_ms, now.join(", ")));
                }
                let mut out = states.lock().unwrap_or_else(|e| e.into_inner());
                for c in status.classes.iter() {
                    if let Some(class) = CLASSES.iter().position(|n| *n == &*c.name) {
                        out.push(StateSample {
                            at_ms,
                            class: class as u8,
                            state: c.state,
                            tick: status.tick,
                            prediction: c.prediction,
                            calibrating: c.calibrating,
                        });
                    }
                }
            }
        })
    };

    // The cron job: every second while traffic runs.
    let cron = {
        let shop = shop.clone();
        let recorder = recorder.clone();
        let end = Duration::from_millis(u64::from(phases.end));
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            let class = class_index(shop::TIMEOUT_CHECK);
            while start.elapsed() < end {
                every.tick().await;
                let due = start.elapsed();
                let outcome = task_outcome(shop.check_timeouts().await);
                recorder.record(class, due, start.elapsed() - due, outcome);
            }
        })
    };

    // The queue: a producer at the events' rate, eight consumers on the task API.
    let run = format!(
        "{}-{}-{}",
        std::process::id(),
        if protected {
            "protected"
        } else {
            "unprotected"
        },
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis()
    );
    let mut queue = EventQueue::open(&config.queue, &run).await?;
    let mut consumers = Vec::new();
    for i in 0..8 {
        let shop = shop.clone();
        let recorder = recorder.clone();
        let mut consumer = queue.consumer(i).await?;
        consumers.push(tokio::spawn(async move {
            let class = class_index(shop::EVENTS);
            loop {
                let delivery = match consumer.next().await {
                    Ok(Some(d)) => d,
                    Ok(None) => return,
                    Err(e) => {
                        tracing::error!(error = %e, "the queue consumer cannot read");
                        return;
                    }
                };
                let outcome = shop.consume(delivery.event.clone()).await;
                // Applied or kept: the queue may forget it. A failed event stays there for
                // another attempt.
                if matches!(outcome, TaskOutcome::Done | TaskOutcome::Kept)
                    && let Err(e) = consumer.ack(&delivery).await
                {
                    tracing::error!(error = %e, "the queue consumer cannot acknowledge");
                }
                // Each event is counted once, by its first delivery.
                if delivery.first {
                    let due = delivery.due;
                    recorder.record(
                        class,
                        due,
                        start.elapsed().saturating_sub(due),
                        task_outcome(outcome),
                    );
                }
            }
        }));
    }

    // Every arrival, merged in time order.
    let mut rng = SmallRng::seed_from_u64(storm.seed);
    let mut schedule: Vec<(u32, usize)> = Vec::new();
    for (name, rate) in &storm.rates {
        let class = class_index(name);
        if *name == shop::TIMEOUT_CHECK {
            continue;
        }
        for at in arrivals(*rate, storm.spike, phases, &mut rng) {
            schedule.push((at, class));
        }
    }
    schedule.sort_unstable();

    let seq = Arc::new(AtomicU64::new(0));
    let mut in_flight = tokio::task::JoinSet::new();
    let mut fault_on = false;
    for (at, class) in schedule {
        let due = Duration::from_millis(u64::from(at));
        if !fault_on && at >= phases.fault_start {
            set_faults(&shop, config, true)?;
            fault_on = true;
        }
        if fault_on && at >= phases.fault_end {
            set_faults(&shop, config, false)?;
            fault_on = false;
        }
        tokio::time::sleep_until(start + due).await;
        let n = seq.fetch_add(1, Ordering::Relaxed);
        let name = CLASSES[class];
        if name == shop::EVENTS {
            if let Err(e) = queue.push(OrderEvent { seq: n }, due).await {
                tracing::error!(error = %e, "the queue refused an event");
                recorder.record(class, due, Duration::ZERO, Outcome::Failed);
            }
            continue;
        }
        let recorder = recorder.clone();
        let (http, mut grpc, base) = (http.clone(), grpc.clone(), base.clone());
        in_flight.spawn(async move {
            let outcome = if name == shop::ASYNC_TASK {
                let mut req = tonic::Request::new(proto::SubmitAsyncTaskRequest {
                    task_type: "refund".into(),
                    order_id: format!("o{n}"),
                    amount_cents: 1999,
                });
                req.metadata_mut()
                    .insert("idempotency-key", format!("refund-{n}").parse().unwrap());
                match tokio::time::timeout(timeout, grpc.submit_async_task(req)).await {
                    Ok(Ok(_)) => Outcome::Ok,
                    Ok(Err(status)) => grpc_outcome(&status),
                    Err(_) => Outcome::Failed,
                }
            } else {
                let req = request(name, n, &base);
                match tokio::time::timeout(timeout, http.request(req)).await {
                    Ok(Ok(res)) => {
                        let outcome = http_outcome(&res);
                        // Read the body: the call is over when its answer is.
                        let _ = res.into_body().collect().await;
                        outcome
                    }
                    _ => Outcome::Failed,
                }
            };
            recorder.record(class, due, start.elapsed().saturating_sub(due), outcome);
        });
        // Reap finished calls as we go.
        while in_flight.try_join_next().is_some() {}
    }
    if fault_on {
        set_faults(&shop, config, false)?;
    }
    queue.close();
    while in_flight.join_next().await.is_some() {}
    for c in consumers {
        let _ = c.await;
    }
    let event_queue = queue.describe();
    let events_unacknowledged = queue.remove().await?;
    cron.abort();
    // An aborted task is dropped later, with the shop it holds: waited for.
    let _ = cron.await;

    // Drain: kept calls are replayed once their classes are healthy.
    let drain_until = start.elapsed() + Duration::from_secs_f64(storm.drain_secs);
    let left = |shop: &Shop| -> Vec<(Queue, u64)> {
        let Some(store) = &shop.store else {
            return Vec::new();
        };
        [Queue::Retry, Queue::Spool, Queue::Journal]
            .into_iter()
            .map(|q| (q, store.depth(q).len))
            .filter(|(_, n)| *n > 0)
            .collect()
    };
    while !left(&shop).is_empty() && start.elapsed() < drain_until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drained_ms = start.elapsed().as_millis() as u32;
    sampler.abort();
    let _ = sampler.await;

    let e = &shop.world.effects;
    use crate::world::Effects;
    let applied = |m: &Mutex<std::collections::HashMap<String, u32>>| {
        m.lock().unwrap_or_else(|e| e.into_inner()).len()
    };
    let events_applied = e.events.lock().unwrap_or_else(|e| e.into_inner()).len();
    let effects = EffectsSummary {
        payments_applied: applied(&e.payments),
        payments_doubled: Effects::doubled(&e.payments),
        refunds_applied: applied(&e.refunds),
        refunds_doubled: Effects::doubled(&e.refunds),
        events_applied,
        events_doubled: Effects::doubled(&e.events),
        browse_logged: Effects::count(&e.browse_logged),
        browse_backfilled: Effects::count(&e.browse_backfilled),
        inventory_writes: Effects::count(&e.inventory_writes),
        inventory_merged: Effects::count(&e.inventory_merged),
        left: left(&shop),
        review: shop.review.as_ref().map_or(0, |r| r.depth().len),
        event_queue,
        events_unacknowledged,
    };
    let samples = std::mem::take(&mut *recorder.samples.lock().unwrap_or_else(|e| e.into_inner()));
    let states = std::mem::take(&mut *states.lock().unwrap_or_else(|e| e.into_inner()));
    let limiters = std::mem::take(&mut *limiters.lock().unwrap_or_else(|e| e.into_inner()));
    let predictor = shop.predictor.clone();
    let registry = shop.degrader.registry();
    let sla_us = CLASSES
        .iter()
        .map(|name| {
            let sla = registry
                .get(name)
                .map_or(Duration::MAX, |id| registry.class(id).sla_target());
            u32::try_from(sla.as_micros()).unwrap_or(u32::MAX)
        })
        .collect();
    // Every task of the run that held the shop has ended: stopped, so that its port and its
    // store are free for the next shop (`--serve`, or the protected run after the other).
    let shop = Arc::try_unwrap(shop)
        .map_err(|_| "the storm's shop is still held by one of its tasks: it cannot be stopped")?;
    shop.stop(config.storage.path.is_some()).await;
    Ok(Run {
        protected,
        phases,
        samples,
        states,
        effects,
        drained_ms,
        limiters,
        predictor,
        sla_us,
    })
}

/// Switch the storm's faults on or off.
fn set_faults(shop: &Shop, config: &Config, on: bool) -> Result<(), BoxError> {
    for f in &config.storm.faults {
        let target = f.target.clone();
        let chaos = match shop.world.dependency(&target) {
            Some(dep) => &dep.chaos,
            None => &shop.app_chaos,
        };
        if on {
            chaos.set(target, f.fault())?;
        } else {
            chaos.clear(&target);
        }
    }
    Ok(())
}

fn request(class: &str, n: u64, base: &str) -> hyper::Request<Full<Bytes>> {
    let (method, path, body) = match class {
        shop::PAYMENT => ("POST", format!("/payments/o{n}/callback"), ""),
        shop::INVENTORY => ("POST", format!("/inventory/sku-{}/deduct", n % 50), "1"),
        shop::PRODUCT => ("GET", format!("/products/p{}", n % 40), ""),
        shop::STATUS => ("GET", format!("/orders/o{}/status", n % 500), ""),
        _ => ("POST", "/events/browse".to_owned(), "{\"page\":\"/home\"}"),
    };
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(format!("{base}{path}"));
    if method == "POST" {
        req = req.header("idempotency-key", format!("{class}-{n}"));
    }
    req.body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("a valid request")
}

fn http_outcome<B>(res: &hyper::Response<B>) -> Outcome {
    let h = res.headers();
    let status = res.status();
    if status == hyper::StatusCode::ACCEPTED && h.contains_key(TASK_ID_HEADER) {
        Outcome::Kept
    } else if status.is_success() && h.contains_key(ROUTE_HEADER) {
        Outcome::Fallback
    } else if status.is_success() {
        Outcome::Ok
    } else if h.contains_key(REASON_HEADER) {
        Outcome::Rejected
    } else {
        Outcome::Failed
    }
}

fn grpc_outcome(status: &tonic::Status) -> Outcome {
    let meta = status.metadata();
    if status.code() == tonic::Code::AlreadyExists && meta.contains_key(TASK_ID_HEADER.as_str()) {
        Outcome::Kept
    } else if meta.contains_key(REASON_HEADER.as_str()) {
        Outcome::Rejected
    } else {
        Outcome::Failed
    }
}

fn task_outcome(t: TaskOutcome) -> Outcome {
    match t {
        TaskOutcome::Done => Outcome::Ok,
        TaskOutcome::Kept => Outcome::Kept,
        TaskOutcome::Skipped => Outcome::Rejected,
        TaskOutcome::Failed => Outcome::Failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_run_frees_its_port_for_the_next_shop() {
        // `--serve` starts a shop on the port the protected run served on, once it is over.
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("order-fulfillment.toml");
        let mut config = Config::load(&path).unwrap();
        let s = &mut config.storm;
        (s.normal_secs, s.fault_secs, s.recovery_secs, s.drain_secs) = (0.5, 0.5, 0.5, 0.5);
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        play(&config, true, addr, None, None).await.unwrap();
        // At once: the shop of the run is gone, not left serving.
        std::net::TcpListener::bind(addr).expect("the run's port is free");
    }
}
