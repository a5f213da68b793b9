//! The predictor as a control-loop stage: one batched run per tick, within its budget.

use std::sync::{Arc, Mutex};

use super::runner::{Batch as BatchOutcome, Runner};
use super::{N_FEATURES, WINDOW};
use crate::control::{Batch, Stage};
use crate::every::{Every, LOG_EVERY};

/// The attached predictor, if any.
#[derive(Debug)]
pub(crate) struct PredictStage {
    runner: Option<Mutex<Runner>>,
    service: Arc<str>,
    /// Whether the predictor is failing (logged when it starts and when it ends).
    failing: std::sync::atomic::AtomicBool,
    /// Per class (by index), whether its last answer was not a probability (NaN, infinite,
    /// or outside 0..=1): logged when that starts and when it ends.
    invalid: Mutex<Vec<bool>>,
    /// The last tick's outcome and, while failing, the last error (for the status).
    last: Mutex<crate::degrader::PredictorStatus>,
    /// Each kind of trouble is said at most once a period, with a count of what was held
    /// back: a model that fails (or answers NaN, or overruns) on every other tick logged
    /// two lines a tick.
    failed_log: Every,
    invalid_log: Every,
    valid_again_log: Every,
    overrun_log: Every,
}

impl PredictStage {
    pub(crate) fn new(runner: Option<Runner>, service: Arc<str>) -> Self {
        Self {
            runner: runner.map(Mutex::new),
            service,
            failing: Default::default(),
            invalid: Mutex::default(),
            last: Mutex::default(),
            failed_log: Every::new(LOG_EVERY),
            invalid_log: Every::new(LOG_EVERY),
            valid_again_log: Every::new(LOG_EVERY),
            overrun_log: Every::new(LOG_EVERY),
        }
    }

    /// What the last tick's batch did; `None` without a predictor.
    pub(crate) fn status(&self) -> Option<crate::degrader::PredictorStatus> {
        self.runner.as_ref()?;
        Some(self.last.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// This tick's windows: whether they were read late, and the most ticks any class's
    /// predictions stay unused from this one.
    pub(crate) fn inputs(&self, read_late: bool, unused_ticks_left: u32) {
        if self.runner.is_none() {
            return;
        }
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        last.late_ticks += u64::from(read_late);
        last.unused_ticks_left = unused_ticks_left;
    }

    /// Whether a predictor is attached.
    pub(crate) fn is_attached(&self) -> bool {
        self.runner.is_some()
    }
}

impl Stage for PredictStage {
    fn observe(&self, batch: &mut Batch<'_>) {
        let Some(runner) = &self.runner else { return };
        // Only the control loop takes this lock.
        let mut runner = runner.lock().unwrap_or_else(|e| e.into_inner());
        let per_class = WINDOW * N_FEATURES;
        let (outcome, error) = runner.run(|buf| {
            for i in 0..batch.classes {
                (batch.features)(i, &mut buf[i * per_class..(i + 1) * per_class]);
            }
        });
        use std::sync::atomic::Ordering::Relaxed;
        {
            use crate::degrader::PredictorBatch;
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            last.last_batch = Some(match outcome {
                BatchOutcome::Fresh => PredictorBatch::Fresh,
                BatchOutcome::Overrun => PredictorBatch::Overrun,
                BatchOutcome::Failed => PredictorBatch::Failed,
            });
            match outcome {
                BatchOutcome::Fresh => last.error = None,
                BatchOutcome::Failed => {
                    last.error = error.as_deref().map(Arc::from);
                    last.last_error = last.error.clone();
                    last.failed_batches += 1;
                }
                BatchOutcome::Overrun => last.overrun_batches += 1,
            }
        }
        match outcome {
            BatchOutcome::Fresh => {
                if self.failing.swap(false, Relaxed)
                    && let Some(held) = self.failed_log.reset()
                {
                    tracing::info!(
                        service = %self.service, episodes_not_logged = held,
                        "the predictor answers again"
                    );
                }
                if let Some(held) = self.overrun_log.reset() {
                    tracing::info!(
                        service = %self.service, episodes_not_logged = held,
                        "the predictor answers within its budget again"
                    );
                }
            }
            BatchOutcome::Overrun => {
                crate::metrics::predictor_overrun(&self.service);
                if let Some(held) = self.overrun_log.ready() {
                    tracing::warn!(
                        service = %self.service, budget_ms = runner.config.budget.as_millis(),
                        episodes_not_logged = held,
                        "the predictor's batch is over its budget: the last predictions stand for \
                         a few ticks, then no class has one until it answers in time; a model this \
                         slow runs back to back and keeps a core busy (counted in \
                         degrade_predictor_overruns_total)"
                    );
                }
            }
            BatchOutcome::Failed => {
                crate::metrics::predictor_failure(&self.service);
                if !self.failing.swap(true, Relaxed)
                    && let Some(held) = self.failed_log.ready()
                {
                    tracing::error!(
                        service = %self.service, error = error.as_deref().unwrap_or(""),
                        episodes_not_logged = held,
                        "predictor failed: no prediction until it answers again \
                         (counted in degrade_predictor_failures_total)"
                    );
                }
            }
        }
        let Some(current) = runner.current() else {
            // Failed, or stalled past its last answer: no class has a prediction.
            return;
        };
        let mut invalid = self.invalid.lock().unwrap_or_else(|e| e.into_inner());
        invalid.resize(batch.classes, false);
        for (class, (p, &last)) in batch.predictions.iter_mut().zip(current).enumerate() {
            let v = f64::from(last);
            let name = runner.classes.get(class).map_or("", String::as_str);
            let valid = (-1e-6..=1.0 + 1e-6).contains(&v);
            // The contract is a probability; a value that is not one (NaN, or outside 0..=1
            // beyond a rounding error) is no prediction for this class, not a certain failure,
            // and the other classes keep theirs.
            if !valid {
                crate::metrics::predictor_invalid(&self.service, name);
            }
            if valid == invalid[class] {
                invalid[class] = !valid;
                if valid {
                    if let Some(held) = self.valid_again_log.ready() {
                        tracing::info!(service = %self.service, class = name, lines_not_logged = held,
                            "the predictor answers a probability for this class again");
                    }
                } else if let Some(held) = self.invalid_log.ready() {
                    tracing::warn!(
                        service = %self.service, class = name, value = v, lines_not_logged = held,
                        "the predictor answered a value that is not a probability in 0..=1: \
                         no prediction for this class until it answers one again (counted in \
                         degrade_predictor_invalid_total)"
                    );
                }
            }
            *p = valid.then(|| v.clamp(0.0, 1.0));
        }
        let names = || invalid.iter().zip(&runner.classes).filter(|(bad, _)| **bad);
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        // Allocated only when the set changes.
        if !last
            .not_probabilities
            .iter()
            .map(|n| &**n)
            .eq(names().map(|(_, n)| n.as_str()))
        {
            last.not_probabilities = names().map(|(_, n)| Arc::from(n.as_str())).collect();
        }
    }
}
