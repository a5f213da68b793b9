//! Metrics through the [`metrics`] facade, emitted by the control loop, not per request (the
//! exceptions, off the path of a call served normally, are listed below the table).
//!
//! | name | kind | labels |
//! |---|---|---|
//! | `degrade_requests_total` | counter: the calls of the class's window, the fallback worker's probe replays among them (a kept call replayed as the probe of a class with no live calls counts once `degraded` and once more as it ended) | service, class, tier, outcome |
//! | `degrade_overloaded_total` | counter: of the calls `rejected` or `degraded`, those [admission](crate::admit) turned away for overload (for want of capacity, not by the breaker) | service, class, tier |
//! | `degrade_latency_seconds` | histogram | service, class, tier |
//! | `degrade_inflight` | gauge | service, class, tier |
//! | `degrade_queue_depth` | gauge | service, class, tier |
//! | `degrade_breaker_state` | gauge ([`State::as_gauge`]) | service, class, tier |
//! | `degrade_breaker_transitions_total` | counter | service, class, tier, from, to, enforced |
//! | `degrade_health_score` | gauge, 0–100 | service |
//! | `degrade_control_late_ticks_total` | counter: control-loop ticks that read their windows a whole tick (and 100 ms) or more after the last, so that each spans two ticks or more (a tick that ran long, a stalled process); with a predictor, no prediction whose input holds one is used for 68 ticks | service |
//! | `degrade_prediction` | gauge, 0–1 (only with a predictor; NaN while the predictor fails or has not answered yet) | service, class, tier |
//! | `degrade_predict_threshold` | gauge, 0–1: the probability a prediction must reach (fixed or calibrated; NaN while calibrating) | service, class, tier |
//! | `degrade_predict_calibrating` | gauge, 1 while the class calibrates its threshold (the predictor only reports) | service, class, tier |
//! | `degrade_predictions_total` | counter (only with a predictor): how the class's warnings turned out, `confirmed` or `false_alarm`, and breaches it `missed` ([`PredictionRecord`]) | service, class, tier, result |
//! | `degrade_predictor_overruns_total` | counter (only with a predictor) | service |
//! | `degrade_predictor_failures_total` | counter (only with a predictor): ticks without predictions because the model failed or its thread stopped | service |
//! | `degrade_predictor_invalid_total` | counter (only with a predictor): ticks on which the model's answer for the class was not a probability (NaN, infinite, outside 0..=1), read as no prediction | service, class |
//! | `degrade_policy_reloads_total` | counter (`rhai`) | service, result |
//! | `degrade_policy_version` | gauge (`rhai`) | service |
//! | `degrade_policy_load_failing` | gauge (`rhai`): 1 while the latest load was refused, 0 once one is accepted | service |
//! | `degrade_policy_errors_total` | counter (`rhai`) | service, class, policy |
//! | `degrade_policy_alerts_total` | counter (`rhai`) | service, class, policy |
//! | `degrade_policy_shadow_decisions_total` | counter (`rhai`) | service, class, policy, action |
//! | `degrade_policy_skipped_total` | counter (`rhai`): policy calls skipped, the tick's budget spent (each keeps its last decision) | service, class, policy |
//! | `degrade_policy_log_dropped_total` | counter (`rhai`): `print`/`debug` lines over the rate limit | service |
//! | `degrade_queue_delay_seconds` | gauge | service, class, tier |
//! | `degrade_admission_limit` | gauge (with [admission](crate::admit)) | service, limiter |
//! | `degrade_admission_inflight` | gauge (with admission) | service, limiter |
//! | `degrade_admission_waiting` | gauge (with admission) | service, limiter |
//! | `degrade_priority_header_invalid_total` | counter | service |
//! | `degrade_fallback_kept_total` | counter (`fallback`) | service, class, route, result |
//! | `degrade_fallback_depth` | gauge (`fallback`) | service, queue |
//! | `degrade_fallback_oldest_age_seconds` | gauge (`fallback`) | service, queue |
//! | `degrade_fallback_replays_total` | counter (`fallback`) | service, queue, result |
//! | `degrade_fallback_backfill_rate` | gauge, replays/s (`fallback`) | service |
//! | `degrade_fallback_batch_writes_total` | counter (`fallback`) | service, class, result |
//! | `degrade_fallback_cached_total` | counter (`fallback`) | service, class, result |
//!
//! Every name is defined once, here, with its description (the Prometheus `HELP` text,
//! registered on the first tick). Label values come from configuration only (class names,
//! tiers, fixed enums), so cardinality is bounded whatever clients send. Counted per call
//! rather than per tick, each off the path of a call served normally:
//! `degrade_priority_header_invalid_total`, by the layer, when a waiting call carries a
//! propagated priority that is not a tier; `degrade_fallback_kept_total` and
//! `degrade_fallback_cached_total`, for each call diverted to a keeping route or to `cached`,
//! whatever came of it (and each failed read of a `cached` class served from its copy); and
//! an `on_request` hook's alerts and errors (`degrade_policy_alerts_total`,
//! `degrade_policy_errors_total`) on the calls it ran for. Handles are registered
//! on the first tick; install the recorder (e.g. `metrics-exporter-prometheus`) before that.
//!
//! A counter is there at 0 before its first event, so that `rate()` and `increase()` see
//! that event (a series created at its first increment starts at 1, which they cannot tell
//! from a restart): the class's request and prediction counters and the predictor's
//! `overruns`, `failures` and `invalid` from the first tick, each `result` of the reloads
//! from the first load, a policy's alerts, errors and skipped calls for each class it
//! governs from each load, and each `result` of the fallback router's counters beside the
//! first one counted for its other labels.
//!
//! # Latency buckets
//!
//! Whether `degrade_latency_seconds` is a histogram or a summary is the exporter's choice:
//! `metrics-exporter-prometheus` makes a summary unless given buckets. [`latency_buckets`]
//! derives them from the classes' SLAs:
//!
//! ```
//! use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
//! use tower_degrade::{ClassConfig, Degrader, metrics};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let degrader = Degrader::builder("shop").class(ClassConfig::gold("payment")).build()?;
//! let recorder = PrometheusBuilder::new()
//!     .set_buckets_for_metric(
//!         Matcher::Full(metrics::LATENCY.into()),
//!         &metrics::latency_buckets(degrader.registry()),
//!     )?
//!     .build_recorder();
//! # drop(recorder);
//! # Ok(())
//! # }
//! ```

use metrics::{
    Counter, Gauge, Histogram, Label, Unit, counter, describe_counter, describe_gauge,
    describe_histogram, gauge, histogram,
};

use crate::breaker::{PredictionRecord, State, Transition};
use crate::class::{Registry, Tier};
use crate::window::{Outcome, WindowSnapshot};

/// Requests by outcome.
pub const REQUESTS: &str = "degrade_requests_total";
/// Of the requests shed or diverted, those admission turned away for overload.
pub const OVERLOADED: &str = "degrade_overloaded_total";
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
/// The probability at or above which a class's prediction counts (fixed or calibrated).
pub const PREDICT_THRESHOLD: &str = "degrade_predict_threshold";
/// 1 while a class calibrates its prediction threshold (the predictor only reports), else 0.
pub const PREDICT_CALIBRATING: &str = "degrade_predict_calibrating";
/// How a class's predictions turned out, by `result`: `confirmed`, `false_alarm`, `missed`
/// ([`PredictionRecord`]).
pub const PREDICTIONS: &str = "degrade_predictions_total";
/// Control-loop ticks that read their windows a tick or more late.
pub const LATE_TICKS: &str = "degrade_control_late_ticks_total";
/// Ticks where the predictor did not answer within its budget.
pub const PREDICTOR_OVERRUNS: &str = "degrade_predictor_overruns_total";
/// Ticks where the predictor failed (an inference error, or its thread stopped): no class has
/// a prediction then.
pub const PREDICTOR_FAILURES: &str = "degrade_predictor_failures_total";
/// Ticks on which the model's answer for a class was not a probability.
pub const PREDICTOR_INVALID: &str = "degrade_predictor_invalid_total";
/// Policy reload attempts, by `result` (`ok` or `error`).
pub const POLICY_RELOADS: &str = "degrade_policy_reloads_total";
/// The version of the policy set in force.
pub const POLICY_VERSION: &str = "degrade_policy_version";
/// 1 while the latest policy load was refused (the files differ from the set in force), 0
/// once one is accepted.
pub const POLICY_LOAD_FAILING: &str = "degrade_policy_load_failing";
/// Run-time policy failures, by `policy` and `class`.
pub const POLICY_ERRORS: &str = "degrade_policy_errors_total";
/// Alerts raised by policies, by `policy` and `class`.
pub const POLICY_ALERTS: &str = "degrade_policy_alerts_total";
/// Decisions of shadow-mode policies, by `policy`, `class` and `action`.
pub const POLICY_SHADOW_DECISIONS: &str = "degrade_policy_shadow_decisions_total";
/// Policy calls skipped: the tick's budget was spent, or the last tick's policies still ran.
pub const POLICY_SKIPPED: &str = "degrade_policy_skipped_total";
/// `print` / `debug` lines from policies dropped by the rate limit.
pub const POLICY_LOG_DROPPED: &str = "degrade_policy_log_dropped_total";

/// The queueing delay the layer measured for the class (readiness, policy delays, admission).
pub const QUEUE_DELAY: &str = "degrade_queue_delay_seconds";
/// The admission limiter's concurrency limit.
pub const ADMISSION_LIMIT: &str = "degrade_admission_limit";
/// Calls holding an admission permit.
pub const ADMISSION_INFLIGHT: &str = "degrade_admission_inflight";
/// Calls waiting for an admission permit.
pub const ADMISSION_WAITING: &str = "degrade_admission_waiting";
/// Propagated priority headers that were not a tier.
pub const PRIORITY_INVALID: &str = "degrade_priority_header_invalid_total";

/// Register every metric's description and unit with the installed recorder.
pub(crate) fn describe() {
    describe_counter!(
        REQUESTS,
        Unit::Count,
        "Calls that reached the degradation layer, by how they ended, and the fallback worker's probe replays."
    );
    describe_counter!(
        OVERLOADED,
        Unit::Count,
        "Of the calls rejected or degraded, those admission turned away for overload (they \
         waited past their class's bound, or were pushed out of a full queue)."
    );
    describe_histogram!(
        LATENCY,
        Unit::Seconds,
        "Latency of calls that reached the inner service and finished."
    );
    describe_gauge!(
        INFLIGHT,
        Unit::Count,
        "Calls in flight at the end of the tick."
    );
    describe_gauge!(
        QUEUE_DEPTH,
        Unit::Count,
        "Queue depth last reported for the class."
    );
    describe_gauge!(
        BREAKER_STATE,
        "Breaker state: 0 closed, 1 open, 2 half_open, 3 recovering, 4 degraded, \
         5 forced_open, 6 disabled, 7 metrics_only."
    );
    describe_counter!(
        TRANSITIONS,
        Unit::Count,
        "Breaker state transitions; enforced=false in dry-run (metrics_only) mode and for a \
         predictor's trial (predict_shadow): transitions the class would have made."
    );
    describe_gauge!(
        HEALTH_SCORE,
        "Service health, 0-100: 60 % served share, 25 % breaker states, 15 % no manual override."
    );
    describe_gauge!(
        PREDICTION,
        "The failure predictor's probability of an SLO breach within the next few ticks."
    );
    describe_gauge!(
        PREDICT_THRESHOLD,
        "The probability at or above which the class's prediction counts (fixed, or calibrated at the false-trip budget)."
    );
    describe_gauge!(
        PREDICT_CALIBRATING,
        "1 while the class is still learning its healthy scores: the predictor only reports."
    );
    describe_counter!(
        PREDICTIONS,
        Unit::Count,
        "How the class's predicted failures turned out: warnings a breach followed (confirmed) or not (false_alarm), and breaches with no warning while the predictor could warn (missed)."
    );
    describe_counter!(
        LATE_TICKS,
        Unit::Count,
        "Control-loop ticks that read their windows a whole tick or more after the last (a tick \
         that ran long, a stalled process): their rates are overstated, and no prediction whose \
         input holds one is used for 68 ticks."
    );
    describe_counter!(
        PREDICTOR_OVERRUNS,
        Unit::Count,
        "Ticks where the predictor did not answer within its budget."
    );
    describe_counter!(
        PREDICTOR_FAILURES,
        Unit::Count,
        "Ticks where the predictor failed (an inference error, or its thread stopped)."
    );
    describe_counter!(
        PREDICTOR_INVALID,
        Unit::Count,
        "Ticks where the model's answer for the class was not a probability (NaN, infinite, outside 0..=1): no prediction for it."
    );
    describe_counter!(
        POLICY_RELOADS,
        Unit::Count,
        "Policy reload attempts, by result."
    );
    describe_gauge!(POLICY_VERSION, "The version of the policy set in force.");
    describe_gauge!(
        POLICY_LOAD_FAILING,
        "1 while the latest policy load was refused (the files on disk differ from the set in force), 0 once one is accepted."
    );
    describe_counter!(
        POLICY_ERRORS,
        Unit::Count,
        "Policy run-time failures; the policy is quarantined for the class until the next load."
    );
    describe_counter!(POLICY_ALERTS, Unit::Count, "Alerts raised by policies.");
    describe_counter!(
        POLICY_SHADOW_DECISIONS,
        Unit::Count,
        "Decisions of shadow-mode policies (recorded, not enforced)."
    );
    describe_counter!(
        POLICY_SKIPPED,
        Unit::Count,
        "Policy calls skipped: the tick's budget was spent before their turn. Each kept its last decision."
    );
    describe_counter!(
        POLICY_LOG_DROPPED,
        Unit::Count,
        "Lines policies printed (`print`, `debug`) beyond the rate limit, not written."
    );
    describe_gauge!(
        QUEUE_DELAY,
        Unit::Seconds,
        "Mean time the class's calls waited before they ran (readiness, policy delay, admission)."
    );
    describe_gauge!(
        ADMISSION_LIMIT,
        Unit::Count,
        "The adaptive concurrency limit of the admission limiter."
    );
    describe_gauge!(
        ADMISSION_INFLIGHT,
        Unit::Count,
        "Calls holding a permit of the admission limiter."
    );
    describe_gauge!(
        ADMISSION_WAITING,
        Unit::Count,
        "Calls waiting for a permit of the admission limiter."
    );
    describe_counter!(
        PRIORITY_INVALID,
        Unit::Count,
        "Propagated priority headers whose value was not gold, silver or bronze (ignored)."
    );
}

/// Diverted calls the fallback router kept (`result="kept"`), answered with the task already
/// kept for them (`already_kept`: the same call again under its idempotency key, a retry),
/// could not keep (`too_large`, `malformed`, `not_kept`, and `key_reused`: its idempotency key
/// is kept for another request or value), or whose caller went away before they were stored
/// (`cancelled`: a client that cancelled its call or stream, or closed its connection, while
/// its body was read, or a deadline that passed meanwhile; a caller still there is answered
/// `not_kept`): one result for each call, HTTP, gRPC or task, diverted to a keeping route.
/// The class's window counts each of them as `degraded` when it is diverted.
pub const FALLBACK_KEPT: &str = "degrade_fallback_kept_total";
/// Calls of a class diverted to `cached` that `LastGoodLayer` answered with its copy
/// (`result="served"`) or left to the layer's answer (`miss`: none kept, kept for other `Vary`
/// values, or past its TTL; or no `LastGoodLayer` looked for one: none outside the degrade
/// layer, or a call it does not serve from a copy, which is also logged once per class), and
/// admitted calls of such a class that failed (a `5xx`, or
/// timed out by the layer) and were answered with their copy (`served_for_error`,
/// [`stale_if_error`](crate::fallback::LastGoodLayer::stale_if_error)); labelled by the `service` and `class` of the answer it read
/// (the layer sits outside the degrader).
pub const FALLBACK_CACHED: &str = "degrade_fallback_cached_total";
/// Tasks in a fallback queue (`delayed_retry`, `spool`, `manual_review`, `batch_merge`).
pub const FALLBACK_DEPTH: &str = "degrade_fallback_depth";
/// Age of the oldest task in a fallback queue.
pub const FALLBACK_OLDEST: &str = "degrade_fallback_oldest_age_seconds";
/// Replays of kept tasks by result (`ok`, `retry`, `review`).
pub const FALLBACK_REPLAYS: &str = "degrade_fallback_replays_total";
/// Backfill replays per second, over the last second or so (0 while the spool is empty).
pub const FALLBACK_BACKFILL_RATE: &str = "degrade_fallback_backfill_rate";
/// Merged writes of the batch-merge route by result (`ok`, `failed`, `spooled`).
pub const FALLBACK_BATCH_WRITES: &str = "degrade_fallback_batch_writes_total";

/// Describe the fallback router's metrics (when a router is built).
#[cfg(feature = "fallback")]
pub(crate) fn describe_fallback() {
    describe_counter!(
        FALLBACK_KEPT,
        Unit::Count,
        "Calls and tasks diverted to a route the fallback router keeps, by result: kept, \
         already_kept (a retry under its idempotency key), too_large, malformed, not_kept, \
         key_reused (refused), cancelled (the caller went away before it was kept)."
    );
    describe_counter!(
        FALLBACK_CACHED,
        Unit::Count,
        "Calls diverted to cached that LastGoodLayer served a copy for (result=served) or not \
         (miss, also when no LastGoodLayer looked), and failed reads it served one for \
         (served_for_error)."
    );
    describe_gauge!(FALLBACK_DEPTH, Unit::Count, "Tasks in a fallback queue.");
    describe_gauge!(
        FALLBACK_OLDEST,
        Unit::Seconds,
        "Age of the oldest task in a fallback queue."
    );
    describe_counter!(
        FALLBACK_REPLAYS,
        Unit::Count,
        "Replays of kept tasks by result (ok, retry, review)."
    );
    describe_gauge!(
        FALLBACK_BACKFILL_RATE,
        "Spooled tasks replayed per second by the backfill worker."
    );
    describe_counter!(
        FALLBACK_BATCH_WRITES,
        Unit::Count,
        "Merged writes of the batch-merge route by result (ok, failed, spooled)."
    );
}

/// Results of [`FALLBACK_KEPT`].
#[cfg(feature = "fallback")]
pub(crate) const KEPT_RESULTS: [&str; 7] = [
    "kept",
    "already_kept",
    "too_large",
    "malformed",
    "not_kept",
    "key_reused",
    "cancelled",
];
/// Results of [`FALLBACK_REPLAYS`].
#[cfg(feature = "fallback")]
pub(crate) const REPLAY_RESULTS: [&str; 3] = ["ok", "retry", "review"];
/// Results of [`FALLBACK_BATCH_WRITES`].
#[cfg(feature = "fallback")]
pub(crate) const BATCH_WRITE_RESULTS: [&str; 3] = ["ok", "failed", "spooled"];
/// Results of [`FALLBACK_CACHED`].
#[cfg(feature = "fallback")]
pub(crate) const CACHED_RESULTS: [&str; 3] = ["served", "miss", "served_for_error"];

/// The labels of [`FALLBACK_KEPT`] but its `result`.
#[cfg(feature = "fallback")]
pub(crate) fn kept_labels(service: &str, class: &str, route: crate::class::Route) -> [Label; 3] {
    [
        Label::new("service", service.to_owned()),
        Label::new("class", class.to_owned()),
        Label::new("route", route.as_str()),
    ]
}

/// Count one diverted call's `result` (one of [`KEPT_RESULTS`]) in [`FALLBACK_KEPT`], its other
/// labels `labels` ([`kept_labels`]).
#[cfg(feature = "fallback")]
pub(crate) fn count_kept(labels: &[Label; 3], result: &'static str) {
    count_result(FALLBACK_KEPT, labels, &KEPT_RESULTS, result);
}

/// Count one event of the counter `name` labelled `labels` and `result`, one of `results`;
/// the series of the other results are created beside it at 0. A series created at its first
/// increment starts at 1, which `rate()` and `increase()` never see: without this, the first
/// refusal after a run of kept calls, say, would not be seen by an alert (cold paths only: a
/// registry lookup per result).
#[cfg(any(feature = "fallback", feature = "rhai"))]
pub(crate) fn count_result(
    name: &'static str,
    labels: &[Label],
    results: &[&'static str],
    result: &'static str,
) {
    debug_assert!(
        results.contains(&result),
        "{name}: {result} not in {results:?}"
    );
    for &r in results {
        let mut l = labels.to_vec();
        l.push(Label::new("result", r));
        counter!(name, l).increment(u64::from(r == result));
    }
}

/// Count a propagated priority that was not a tier (cold: only waiting calls).
#[cold]
pub(crate) fn priority_header_invalid(service: &str) {
    counter!(PRIORITY_INVALID, "service" => service.to_owned()).increment(1);
}

/// The gauges of one admission limiter.
pub(crate) struct LimiterMetrics {
    limit: Gauge,
    inflight: Gauge,
    waiting: Gauge,
}

impl std::fmt::Debug for LimiterMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LimiterMetrics").finish_non_exhaustive()
    }
}

impl LimiterMetrics {
    pub(crate) fn new(service: &str, limiter: &str) -> Self {
        let l = || {
            vec![
                Label::new("service", service.to_owned()),
                Label::new("limiter", limiter.to_owned()),
            ]
        };
        Self {
            limit: gauge!(ADMISSION_LIMIT, l()),
            inflight: gauge!(ADMISSION_INFLIGHT, l()),
            waiting: gauge!(ADMISSION_WAITING, l()),
        }
    }

    pub(crate) fn record(&self, s: &crate::admit::LimiterState) {
        self.limit.set(f64::from(s.limit));
        self.inflight.set(f64::from(s.inflight));
        self.waiting.set(f64::from(s.waiting));
    }
}

/// Histogram buckets (seconds) for [`LATENCY`], from the classes' SLAs: for each SLA, a
/// sixteenth, an eighth, a quarter, a half, 1x, 1.25x, 1.5x, 2x and 4x of it, plus the seed
/// rule's 800 ms, and the steps of a ladder from 1 ms to 10 s (1, 2.5, 5 per decade) that no
/// such bucket is within a quarter of; sorted, without duplicates. A quantile read from the buckets
/// (`histogram_quantile`) is interpolated within the bucket it falls in: fine near each SLA,
/// where it matters, and within a decade's steps from 1 ms to 10 s elsewhere.
pub fn latency_buckets(registry: &Registry) -> Vec<f64> {
    const PER_SLA: [f64; 9] = [0.0625, 0.125, 0.25, 0.5, 1.0, 1.25, 1.5, 2.0, 4.0];
    const LADDER: [f64; 13] = [
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];
    let mut b: Vec<f64> = registry
        .iter()
        .flat_map(|(_, c)| {
            let sla = c.sla_target().as_secs_f64();
            // To the nanosecond: 0.05 * 1.5 is 0.07500000000000001, a label nobody wants.
            PER_SLA.map(|f| (sla * f * 1e9).round() / 1e9)
        })
        .chain([0.8])
        .collect();
    let near = |x: f64, y: f64| x.max(y) <= 1.25 * x.min(y) * (1.0 + 1e-9);
    let ladder: Vec<f64> = LADDER
        .into_iter()
        .filter(|&l| !b.iter().any(|&x| near(x, l)))
        .collect();
    b.extend(ladder);
    b.sort_by(f64::total_cmp);
    b.dedup_by(|a, b| (*a - *b).abs() <= f64::EPSILON * b.abs().max(1.0));
    b
}

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
    overloaded: Counter,
    latency: Histogram,
    inflight: Gauge,
    queue_depth: Gauge,
    queue_delay: Gauge,
    state: Gauge,
    /// With a predictor.
    prediction: Option<PredictionMetrics>,
}

/// A class's predictor handles: the prediction, the threshold, whether it is still
/// calibrating, and the record's three counters with the counts they were last given.
struct PredictionMetrics {
    gauges: [Gauge; 3],
    record: [Counter; 3],
    counted: [u64; 3],
}

impl std::fmt::Debug for ClassMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClassMetrics").finish_non_exhaustive()
    }
}

impl ClassMetrics {
    pub(crate) fn new(service: &str, class: &str, tier: Tier, predicted: bool) -> Self {
        let base = labels(service, class, tier);
        if predicted {
            // The predictor's counters exist from its first tick, at 0: one created at its
            // first increment starts at 1, and `rate()` or `increase()` never sees that one.
            counter!(PREDICTOR_INVALID, "service" => service.to_owned(), "class" => class.to_owned())
                .increment(0);
            for name in [PREDICTOR_OVERRUNS, PREDICTOR_FAILURES] {
                counter!(name, "service" => service.to_owned()).increment(0);
            }
        }
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
            overloaded: counter!(OVERLOADED, base.clone()),
            latency: histogram!(LATENCY, base.clone()),
            inflight: gauge!(INFLIGHT, base.clone()),
            queue_depth: gauge!(QUEUE_DEPTH, base.clone()),
            queue_delay: gauge!(QUEUE_DELAY, base.clone()),
            state: gauge!(BREAKER_STATE, base.clone()),
            prediction: predicted.then(|| PredictionMetrics {
                gauges: [
                    gauge!(PREDICTION, base.clone()),
                    gauge!(PREDICT_THRESHOLD, base.clone()),
                    gauge!(PREDICT_CALIBRATING, base.clone()),
                ],
                record: ["confirmed", "false_alarm", "missed"].map(|result| {
                    let mut l = base.clone();
                    l.push(Label::new("result", result));
                    counter!(PREDICTIONS, l)
                }),
                counted: [0; 3],
            }),
        }
    }

    pub(crate) fn record_tick(
        &mut self,
        w: &WindowSnapshot,
        buckets: impl Iterator<Item = (u64, u32)>,
        state: State,
        prediction: Option<f64>,
        threshold: Option<f64>,
        record: PredictionRecord,
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
        if w.overloaded != 0 {
            self.overloaded.increment(w.overloaded);
        }
        for (micros, n) in buckets {
            self.latency.record_many(micros as f64 / 1e6, n as usize);
        }
        self.inflight.set(w.inflight as f64);
        self.queue_depth.set(w.queue_depth as f64);
        self.queue_delay.set(w.queue_delay.as_secs_f64());
        self.state.set(state.as_gauge());
        if let Some(PredictionMetrics {
            gauges: [p_gauge, t_gauge, calibrating],
            record: counters,
            counted,
        }) = &mut self.prediction
        {
            // The record counts since the degrader started: the counters take what it added.
            let counts = [record.confirmed, record.false_alarms, record.missed];
            for ((c, was), n) in counters.iter().zip(counted.iter_mut()).zip(counts) {
                if n > *was {
                    c.increment(n - *was);
                    *was = n;
                }
            }
            // NaN, not a stale or made-up number, when there is none: no comparison with it
            // holds, so an alert on `prediction >= threshold` cannot fire on it.
            p_gauge.set(prediction.unwrap_or(f64::NAN));
            match threshold {
                Some(t) => {
                    t_gauge.set(t);
                    calibrating.set(0.0);
                }
                None => {
                    t_gauge.set(f64::NAN);
                    calibrating.set(1.0);
                }
            }
        }
    }
}

/// The service-wide handles.
pub(crate) struct ServiceMetrics {
    health: Gauge,
    late_ticks: Counter,
}

impl std::fmt::Debug for ServiceMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceMetrics").finish_non_exhaustive()
    }
}

impl ServiceMetrics {
    /// The service's handles; registers every metric's description first.
    pub(crate) fn new(service: &str) -> Self {
        describe();
        Self {
            health: gauge!(HEALTH_SCORE, "service" => service.to_owned()),
            late_ticks: counter!(LATE_TICKS, "service" => service.to_owned()),
        }
    }

    pub(crate) fn health(&self, score: f64) {
        self.health.set(score);
    }

    /// Count a tick that read its windows late.
    pub(crate) fn late_tick(&self) {
        self.late_ticks.increment(1);
    }
}

/// Count a tick where the predictor overran its budget.
pub(crate) fn predictor_overrun(service: &str) {
    counter!(PREDICTOR_OVERRUNS, "service" => service.to_owned()).increment(1);
}

pub(crate) fn predictor_failure(service: &str) {
    counter!(PREDICTOR_FAILURES, "service" => service.to_owned()).increment(1);
}

pub(crate) fn predictor_invalid(service: &str, class: &str) {
    counter!(PREDICTOR_INVALID, "service" => service.to_owned(), "class" => class.to_owned())
        .increment(1);
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
