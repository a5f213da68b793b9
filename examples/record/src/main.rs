//! Records 500 ms traces of a running tower-degrade stack under injected faults, in the CSV
//! format the evaluation harness reads.
//!
//! ```sh
//! cargo run --release -p example-record -- traces/recorded 30   # 30 minutes of service time
//! cargo run --release -p example-record -- traces/unseen 240 unseen  # faults it was not trained on
//! python tower-degrade-ai/training/evaluate.py --model tower-degrade-ai/models/p_anomaly.onnx \
//!     --traces traces/recorded
//! ```
//!
//! Three classes take traffic with a daily swing and bursts; every few minutes one of them
//! gets a fault: a database that slows down, errors that creep up and then burst, or a
//! dependency that stalls until calls time out (`trained`, the default: the kinds the training
//! simulator has). With `unseen`, the faults are kinds the model was not trained on: a pool
//! that falls off a saturation knee, a noisy neighbour's growing spikes, a leak's collector
//! pauses, and a bad deploy rolled out as a widening canary. Time is tokio's paused clock, so half an hour
//! of service time records in seconds, and the same run gives the same trace. The features
//! are computed by the library itself (the same code a production control loop runs); when
//! ONNX Runtime is installed, the bundled model's probability is recorded beside them.

use std::time::Duration;

use tower::{Layer, Service, ServiceExt, service_fn};
use tower_degrade::predict::PredictorConfig;
use tower_degrade::{BoxError, ClassConfig, Degrader, clock::LatencyClock};
use tower_degrade_ai::{Fault, OnnxPredictor, Recorder};

const TICK: Duration = Duration::from_millis(500);

/// What a call to one class's backend does at a given moment.
#[derive(Clone, Copy, Debug)]
struct Call {
    latency_ms: f64,
    fail: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    SlowDatabase,
    ErrorBurst,
    StalledDependency,
    // Faults unlike any of the training simulator's (training/simulate.py), for an honest
    // estimate of how the model does on what it has not seen:
    /// A pool that holds until it is nearly full, then falls off a cliff: latency barely
    /// moves for most of the ramp, then grows with the square of the overload.
    SaturationKnee,
    /// Another tenant's batch job: latency spikes for 4 ticks in every 20, each taller than
    /// the last.
    NoisyNeighbour,
    /// A memory leak: collector pauses that come more often and last longer as the heap
    /// fills, with a few calls failing on allocation at the end.
    GcThrash,
    /// A bad deploy rolled out as a widening canary: a small step in latency at once, then
    /// a share of failing calls growing with the rollout.
    BadDeploy,
}

impl Kind {
    const TRAINED: [Kind; 3] = [
        Kind::SlowDatabase,
        Kind::ErrorBurst,
        Kind::StalledDependency,
    ];
    const UNSEEN: [Kind; 4] = [
        Kind::SaturationKnee,
        Kind::NoisyNeighbour,
        Kind::GcThrash,
        Kind::BadDeploy,
    ];
}

/// One injected fault: onset tick, ramp and hold in ticks.
#[derive(Clone, Copy, Debug)]
struct Injection {
    class: usize,
    kind: Kind,
    start: u64,
    ramp: u64,
    hold: u64,
}

impl Injection {
    fn active(&self, tick: u64) -> Option<f64> {
        let end = self.start + self.ramp + self.hold;
        (tick >= self.start && tick < end)
            .then(|| ((tick - self.start) as f64 / self.ramp.max(1) as f64).min(1.0))
    }
}

/// A small deterministic generator (xorshift), so runs repeat.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn call(base_ms: f64, injection: Option<(Kind, f64, u64)>, rng: &mut Rng) -> Call {
    let jitter = 0.7 + 0.6 * rng.next();
    let tail = if rng.next() < 0.02 { 1.8 } else { 1.0 };
    let mut latency_ms = base_ms * jitter * tail;
    let mut fail = rng.next() < 0.002;
    match injection {
        Some((Kind::SlowDatabase, x, _)) => latency_ms *= 1.0 + 9.0 * x * x,
        Some((Kind::ErrorBurst, x, _)) => {
            let share = if x < 1.0 { 0.03 * x } else { 0.4 };
            fail |= rng.next() < share;
        }
        Some((Kind::StalledDependency, x, _)) => {
            latency_ms *= 1.0 + 2.0 * x;
            if x >= 1.0 && rng.next() < 0.6 {
                latency_ms = 10_000.0; // past the class timeout
            }
        }
        Some((Kind::SaturationKnee, x, _)) => {
            let over = (x - 0.75).max(0.0);
            latency_ms *= 1.0 + 0.2 * x + 60.0 * over * over;
        }
        Some((Kind::NoisyNeighbour, x, since)) if since % 20 < 4 => {
            latency_ms *= 1.0 + (1.5 + 0.5 * (since / 20) as f64) * x;
        }
        Some((Kind::GcThrash, x, _)) => {
            if rng.next() < 0.02 + 0.3 * x * x {
                latency_ms += base_ms * (2.0 + 6.0 * x);
            }
            fail |= x > 0.9 && rng.next() < 0.05;
        }
        Some((Kind::BadDeploy, x, _)) => {
            latency_ms *= 1.3;
            fail |= rng.next() < 0.25 * x;
        }
        Some((Kind::NoisyNeighbour, ..)) | None => {}
    }
    Call { latency_ms, fail }
}

#[tokio::main(flavor = "current_thread", start_paused = true)]
async fn main() -> Result<(), BoxError> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().unwrap_or_else(|| "traces/recorded".into());
    let minutes: u64 = args.next().map(|m| m.parse()).transpose()?.unwrap_or(30);
    let kinds: &[Kind] = match args.next().as_deref() {
        None | Some("trained") => &Kind::TRAINED,
        Some("unseen") => &Kind::UNSEEN,
        Some(other) => {
            return Err(format!(
                "unknown fault set `{other}`: `trained` (the simulator's kinds) or `unseen`"
            )
            .into());
        }
    };
    let ticks = minutes * 120;

    let classes = [
        // name, class (SLA 50 / 200 / 1000 ms), base latency (a p99 near half the SLA), calls a tick
        ("payment", ClassConfig::gold("payment"), 10.0, 30),
        ("stock", ClassConfig::silver("stock"), 40.0, 40),
        ("browse", ClassConfig::bronze("browse"), 200.0, 60),
    ];
    let mut recorder = Recorder::new(&dir, TICK)?;
    let faults: Vec<Fault> = classes.iter().map(|c| recorder.fault(c.0)).collect();
    let recorder = match OnnxPredictor::bundled() {
        Ok(model) => recorder.wrap(model),
        Err(e) => {
            eprintln!("recording features only: {e}");
            recorder
        }
    };
    let mut builder = Degrader::builder("record").latency_clock(LatencyClock::Tokio);
    for (_, config, ..) in &classes {
        let sla = config.sla_target();
        builder = builder.class(config.clone().timeout(sla * 4));
    }
    let mut config = PredictorConfig::default();
    config.budget = Duration::from_secs(5); // the clock is paused: never skip a tick's row
    let (degrader, _worker) = builder.predictor(recorder, config).build_with_worker()?;

    // A fault every 4 minutes or so, rotating over classes and kinds.
    let mut rng = Rng(0x5eed);
    let mut injections = Vec::new();
    let mut start = 600;
    let mut i = 0;
    while start + 600 < ticks {
        injections.push(Injection {
            class: i % 3,
            kind: kinds[(i / 3 + i) % kinds.len()],
            start,
            ramp: 40 + (rng.next() * 200.0) as u64,
            hold: 60 + (rng.next() * 120.0) as u64,
        });
        start += 400 + (rng.next() * 200.0) as u64;
        i += 1;
    }

    let services: Vec<_> = classes
        .iter()
        .map(|(name, ..)| {
            degrader
                .layer(degrader.class_id(name).expect("configured"))
                .layer(service_fn(|c: Call| async move {
                    tokio::time::sleep(Duration::from_secs_f64(c.latency_ms / 1000.0)).await;
                    if c.fail {
                        Err::<(), BoxError>("backend error".into())
                    } else {
                        Ok(())
                    }
                }))
        })
        .collect();

    let t0 = tokio::time::Instant::now();
    for tick in 0..ticks {
        let day = (tick as f64 / 2400.0 * std::f64::consts::TAU).sin();
        let burst = if tick % 997 < 40 { 1.8 } else { 1.0 };
        for (c, (_, _, base_ms, per_tick)) in classes.iter().enumerate() {
            // The class's injection in force at this tick, if any.
            let injection = injections
                .iter()
                .filter(|inj| inj.class == c)
                .find_map(|inj| inj.active(tick).map(|x| (inj.kind, x, tick - inj.start)));
            faults[c].set(injection.is_some());
            let n = (*per_tick as f64 * (1.0 + 0.3 * day) * burst) as usize;
            for _ in 0..n {
                let call = call(*base_ms, injection, &mut rng);
                let mut svc = services[c].clone();
                tokio::spawn(async move {
                    if let Ok(svc) = svc.ready().await {
                        let _ = svc.call(call).await;
                    }
                });
            }
        }
        tokio::time::sleep_until(t0 + TICK * (tick as u32 + 1)).await;
        degrader.tick_now();
    }
    println!(
        "recorded {ticks} ticks ({minutes} min) of {} classes with {} injected faults into {dir}",
        classes.len(),
        injections.len()
    );
    Ok(())
}
