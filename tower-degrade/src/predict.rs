//! The failure predictor's plug-in point: features per class per tick, and a [`Predictor`] run
//! once per tick over every class in one batch, off the request path, within a time budget.
//!
//! # Features
//!
//! Eight per class per tick, normalised so that a model trained on one service transfers to
//! another ([`FEATURES`] names them, in order):
//!
//! | # | feature | normalisation |
//! |---|---|---|
//! | 0 | request rate | requests per second over the mean of the class's history, clipped to 0..10 |
//! | 1 | success rate | 0..1 over completed calls (1 when none completed) |
//! | 2 | error rate | 0..1 |
//! | 3 | timeout rate | 0..1 |
//! | 4 | p50 | over the class SLA, clipped to 0..20 |
//! | 5 | p99 | over the class SLA, clipped to 0..20 |
//! | 6 | in-flight | over what the SLA implies by Little's law (rps × SLA + 1), clipped to 0..20 |
//! | 7 | queueing delay | over the class SLA, clipped to 0..20 |
//!
//! A model sees the last [`WINDOW`] ticks of them: input `[n_classes, 64, 8]` float32, oldest
//! tick first, zero-padded at the start while history is short. It answers `p_anomaly
//! [n_classes, 1]`: the probability of an SLO breach within the next few ticks.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::BoxError;
use crate::window::{Ring, WindowSnapshot};

/// Features per tick.
pub const N_FEATURES: usize = 8;
/// Ticks a model sees.
pub const WINDOW: usize = 64;
/// The features' names, in input order.
pub const FEATURES: [&str; N_FEATURES] = [
    "rate_ratio",
    "success_rate",
    "error_rate",
    "timeout_rate",
    "p50_over_sla",
    "p99_over_sla",
    "inflight_over_little",
    "queue_delay_over_sla",
];

/// A failure predictor: one batched inference per tick.
///
/// ```
/// use tower_degrade::predict::{Predictor, N_FEATURES, WINDOW};
///
/// /// Alarm when the newest tick's success rate is below 0.5.
/// struct LastSuccess;
///
/// impl Predictor for LastSuccess {
///     fn predict(&mut self, input: &[f32], out: &mut [f32]) -> Result<(), tower_degrade::BoxError> {
///         for (class, p) in out.iter_mut().enumerate() {
///             let newest = (class * WINDOW + WINDOW - 1) * N_FEATURES;
///             *p = if input[newest + 1] < 0.5 { 1.0 } else { 0.0 };
///         }
///         Ok(())
///     }
/// }
/// ```
pub trait Predictor: Send + 'static {
    /// `input` is `[out.len(), WINDOW, N_FEATURES]` row-major; write each class's probability of
    /// an imminent SLO breach (0.0..=1.0) into `out`.
    fn predict(&mut self, input: &[f32], out: &mut [f32]) -> Result<(), BoxError>;

    /// Called once before the first tick with the classes' names in batch order (load,
    /// allocate, run a dummy batch).
    fn warm_up(&mut self, classes: &[&str]) -> Result<(), BoxError> {
        let input = vec![0.0; classes.len() * WINDOW * N_FEATURES];
        let mut out = vec![0.0; classes.len()];
        self.predict(&input, &mut out)
    }
}

impl std::fmt::Debug for dyn Predictor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("dyn Predictor")
    }
}

/// How the predictor is run. What a prediction does to a class is the breaker's
/// [`BreakerConfig::predict_threshold`](crate::BreakerConfig::predict_threshold) and
/// [`predict_ticks`](crate::BreakerConfig::predict_ticks).
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct PredictorConfig {
    /// Time a tick waits for the batch (default 8 ms); past it, the tick keeps the last
    /// predictions and counts `degrade_predictor_overruns_total`.
    pub budget: Duration,
}

impl Default for PredictorConfig {
    fn default() -> Self {
        Self {
            budget: Duration::from_millis(8),
        }
    }
}

/// The 8 features of one window.
pub fn features(w: &WindowSnapshot, sla: Duration, mean_rps: f64) -> [f32; N_FEATURES] {
    let sla_s = sla.as_secs_f64().max(1e-6);
    let over_sla = |d: Duration| (d.as_secs_f64() / sla_s).clamp(0.0, 20.0);
    let rps = w.rps();
    let little = rps * sla_s + 1.0;
    [
        (rps / mean_rps.max(1.0)).clamp(0.0, 10.0),
        w.success_rate(),
        w.error_rate(),
        w.timeout_rate(),
        over_sla(w.p50),
        over_sla(w.p99),
        (w.inflight.max(0) as f64 / little).clamp(0.0, 20.0),
        over_sla(w.queue_delay),
    ]
    .map(|v| v as f32)
}

/// Per class, the features of the last [`WINDOW`] ticks, each with its window's rate (for the
/// rate baseline).
#[derive(Debug, Clone, Default)]
pub(crate) struct FeatureHistory {
    ring: Ring<([f32; N_FEATURES], f64), WINDOW>,
    rps_sum: f64,
}

impl FeatureHistory {
    pub(crate) fn push(&mut self, w: &WindowSnapshot, sla: Duration) {
        // The rate's baseline is the mean of the held windows before this one.
        let len = self.ring.len();
        let mean = if len == 0 {
            w.rps()
        } else {
            self.rps_sum / len as f64
        };
        if let Some((_, evicted)) = self.ring.push((features(w, sla, mean), w.rps())) {
            self.rps_sum -= evicted;
        }
        self.rps_sum += w.rps();
    }

    /// Write the `[WINDOW, N_FEATURES]` block, oldest first, zero-padded at the start.
    pub(crate) fn write(&self, out: &mut [f32]) {
        out.fill(0.0);
        let len = self.ring.len();
        let pad = WINDOW - len;
        for (i, ago) in (0..len).rev().enumerate() {
            let (features, _) = self.ring.get(ago).expect("ago < len");
            out[(pad + i) * N_FEATURES..(pad + i + 1) * N_FEATURES].copy_from_slice(features);
        }
    }
}

/// The worker's answer: the input buffer back, and the predictions or the error.
type Answer = (Vec<f32>, Result<Vec<f32>, String>);

/// Runs a [`Predictor`] on its own thread, so a slow model never holds the tick past its
/// budget.
pub(crate) struct Runner {
    requests: mpsc::SyncSender<Vec<f32>>,
    results: mpsc::Receiver<Answer>,
    /// The input buffer, when not lent to the worker.
    buffer: Option<Vec<f32>>,
    pub(crate) last: Vec<f32>,
    pub(crate) config: PredictorConfig,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("config", &self.config)
            .finish()
    }
}

/// What one tick got from the predictor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// New predictions.
    Fresh,
    /// Over budget (or still busy with an earlier batch): the last predictions stand.
    Overrun,
    /// The model failed: the last predictions stand.
    Failed,
}

impl Runner {
    pub(crate) fn start(
        mut predictor: Box<dyn Predictor>,
        classes: &[&str],
        config: PredictorConfig,
    ) -> Result<Self, BoxError> {
        let n = classes.len();
        predictor.warm_up(classes)?;
        let (requests, inbox) = mpsc::sync_channel::<Vec<f32>>(1);
        let (outbox, results) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("degrade-predictor".into())
            .spawn(move || {
                let mut out = vec![0.0f32; n];
                // Ends when the runner (and so the sender) is dropped.
                while let Ok(input) = inbox.recv() {
                    let res = predictor
                        .predict(&input, &mut out)
                        .map(|()| out.clone())
                        .map_err(|e| e.to_string());
                    if outbox.send((input, res)).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Self {
            requests,
            results,
            buffer: Some(vec![0.0; n * WINDOW * N_FEATURES]),
            last: vec![0.0; n],
            config,
        })
    }

    /// Run one batch: `fill` writes the input; waits at most the budget.
    pub(crate) fn run(&mut self, fill: impl FnOnce(&mut [f32])) -> (Outcome, Option<String>) {
        // A batch that overran its budget may have finished since.
        if self.buffer.is_none() {
            match self.results.try_recv() {
                Ok((buf, res)) => {
                    self.buffer = Some(buf);
                    if let Ok(p) = res {
                        self.last = p;
                    }
                }
                Err(_) => return (Outcome::Overrun, None),
            }
        }
        let mut buf = self.buffer.take().expect("returned above");
        fill(&mut buf);
        let deadline = Instant::now() + self.config.budget;
        if self.requests.send(buf).is_err() {
            return (Outcome::Failed, Some("the predictor thread stopped".into()));
        }
        match self
            .results
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            Ok((buf, res)) => {
                self.buffer = Some(buf);
                match res {
                    Ok(p) => {
                        self.last = p;
                        (Outcome::Fresh, None)
                    }
                    Err(e) => (Outcome::Failed, Some(e)),
                }
            }
            Err(_) => (Outcome::Overrun, None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_is_oldest_first_and_zero_padded() {
        let mut h = FeatureHistory::default();
        for s in [10u64, 20, 30] {
            let w = WindowSnapshot {
                successes: s,
                period: Duration::from_millis(500),
                ..Default::default()
            };
            h.push(&w, Duration::from_millis(100));
        }
        let mut out = vec![1.0; WINDOW * N_FEATURES];
        h.write(&mut out);
        assert!(out[..(WINDOW - 3) * N_FEATURES].iter().all(|v| *v == 0.0));
        // rate ratios: 20 rps over itself, 40 over 20, 60 over 30.
        let rate = |i: usize| out[(WINDOW - 3 + i) * N_FEATURES];
        assert_eq!((rate(0), rate(1), rate(2)), (1.0, 2.0, 2.0));
        assert_eq!(out[(WINDOW - 1) * N_FEATURES + 1], 1.0, "success rate");
    }

    #[test]
    fn features_are_normalised_by_the_sla() {
        let w = WindowSnapshot {
            successes: 8,
            errors: 1,
            timeouts: 1,
            p50: Duration::from_millis(50),
            p99: Duration::from_secs(10),
            period: Duration::from_millis(500),
            inflight: 5,
            ..Default::default()
        };
        let f = features(&w, Duration::from_millis(100), 20.0);
        assert_eq!(f[0], 1.0);
        assert!(
            (f[1] - 0.8).abs() < 1e-6 && (f[2] - 0.1).abs() < 1e-6 && (f[3] - 0.1).abs() < 1e-6
        );
        assert_eq!((f[4], f[5]), (0.5, 20.0), "p99 clipped at 20x the SLA");
        assert!(
            (f[6] - 5.0 / 3.0).abs() < 1e-6,
            "5 in flight over 20 rps x 0.1 s + 1"
        );
    }
}
