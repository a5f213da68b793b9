//! Metrics through the [`metrics`] facade, emitted by the control loop (never per request).
//!
//! | name | kind | labels |
//! |---|---|---|
//! | `degrade_requests_total` | counter | service, class, tier, outcome |
//! | `degrade_latency_seconds` | histogram | service, class, tier |
//! | `degrade_inflight` | gauge | service, class, tier |
//! | `degrade_queue_depth` | gauge | service, class, tier |
//! | `degrade_breaker_state` | gauge ([`State::as_gauge`]) | service, class, tier |
//! | `degrade_breaker_transitions_total` | counter | service, class, tier, from, to, enforced |
//! | `degrade_health_score` | gauge, 0–100 | service |
//! | `degrade_prediction` | gauge, 0–1 (with a predictor) | service, class, tier |
//! | `degrade_predictor_overruns_total` | counter | service |
//!
//! Label values come from configuration only (class names, tiers, fixed enums), so cardinality
//! is bounded whatever clients send. Handles are registered on the first tick; install the
//! recorder (e.g. `metrics-exporter-prometheus`) before that.

use metrics::{Counter, Gauge, Histogram, Label, counter, gauge, histogram};

use crate::breaker::{State, Transition};
use crate::class::Tier;
use crate::window::{Outcome, WindowSnapshot};

/// Requests by outcome.
pub const REQUESTS: &str = "degrade_requests_total";
/// Latency of completed calls.
pub const LATENCY: &str = "degrade_latency_seconds";
/// Calls in flight.
pub const INFLIGHT: &str = "degrade_inflight";
/// Reported queue depth.
pub const QUEUE_DEPTH: &str = "degrade_queue_depth";
/// Breaker state as a number.
pub const BREAKER_STATE: &str = "degrade_breaker_state";
/// Breaker transitions.
pub const TRANSITIONS: &str = "degrade_breaker_transitions_total";
/// The service health score.
pub const HEALTH_SCORE: &str = "degrade_health_score";
/// The failure predictor's probability per class.
pub const PREDICTION: &str = "degrade_prediction";
/// Ticks where the predictor did not answer within its budget.
pub const PREDICTOR_OVERRUNS: &str = "degrade_predictor_overruns_total";

fn labels(service: &str, class: &str, tier: Tier) -> Vec<Label> {
    vec![
        Label::new("service", service.to_owned()),
        Label::new("class", class.to_owned()),
        Label::new("tier", tier.as_str()),
    ]
}

/// The handles of one class.
pub(crate) struct ClassMetrics {
    outcomes: Vec<Counter>,
    latency: Histogram,
    inflight: Gauge,
    queue_depth: Gauge,
    state: Gauge,
    prediction: Gauge,
}

impl std::fmt::Debug for ClassMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClassMetrics").finish_non_exhaustive()
    }
}

impl ClassMetrics {
    pub(crate) fn new(service: &str, class: &str, tier: Tier) -> Self {
        let base = labels(service, class, tier);
        let outcomes = Outcome::ALL
            .iter()
            .map(|o| {
                let mut l = base.clone();
                l.push(Label::new("outcome", o.as_str()));
                counter!(REQUESTS, l)
            })
            .collect();
        Self {
            outcomes,
            latency: histogram!(LATENCY, base.clone()),
            inflight: gauge!(INFLIGHT, base.clone()),
            queue_depth: gauge!(QUEUE_DEPTH, base.clone()),
            state: gauge!(BREAKER_STATE, base.clone()),
            prediction: gauge!(PREDICTION, base),
        }
    }

    pub(crate) fn record_tick(
        &self,
        w: &WindowSnapshot,
        buckets: impl Iterator<Item = (u64, u32)>,
        state: State,
        prediction: Option<f64>,
    ) {
        let counts = [
            w.successes,
            w.errors,
            w.timeouts,
            w.rejected,
            w.degraded,
            w.cancelled,
        ];
        for (c, n) in self.outcomes.iter().zip(counts) {
            if n != 0 {
                c.increment(n);
            }
        }
        for (micros, n) in buckets {
            self.latency.record_many(micros as f64 / 1e6, n as usize);
        }
        self.inflight.set(w.inflight as f64);
        self.queue_depth.set(w.queue_depth as f64);
        self.state.set(state.as_gauge());
        if let Some(p) = prediction {
            self.prediction.set(p);
        }
    }
}

/// The service-wide handles.
pub(crate) struct ServiceMetrics {
    health: Gauge,
}

impl std::fmt::Debug for ServiceMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceMetrics").finish_non_exhaustive()
    }
}

impl ServiceMetrics {
    pub(crate) fn new(service: &str) -> Self {
        Self {
            health: gauge!(HEALTH_SCORE, "service" => service.to_owned()),
        }
    }

    pub(crate) fn health(&self, score: f64) {
        self.health.set(score);
    }
}

/// Count a tick where the predictor overran its budget.
pub(crate) fn predictor_overrun(service: &str) {
    counter!(PREDICTOR_OVERRUNS, "service" => service.to_owned()).increment(1);
}

/// Count a transition and log it: at `warn` when calls are diverted, `info` otherwise.
pub(crate) fn transition(service: &str, class: &str, tier: Tier, t: &Transition) {
    let mut l = labels(service, class, tier);
    l.push(Label::new("from", t.from.as_str()));
    l.push(Label::new("to", t.to.as_str()));
    l.push(Label::new(
        "enforced",
        if t.enforced { "true" } else { "false" },
    ));
    counter!(TRANSITIONS, l).increment(1);
    let diverting = matches!(t.to, State::Open | State::ForcedOpen | State::Degraded);
    if diverting && t.enforced {
        tracing::warn!(
            service, class, tier = tier.as_str(), from = %t.from, to = %t.to,
            reason = %t.reason, enforced = t.enforced, "breaker transition"
        );
    } else {
        tracing::info!(
            service, class, tier = tier.as_str(), from = %t.from, to = %t.to,
            reason = %t.reason, enforced = t.enforced, "breaker transition"
        );
    }
}
