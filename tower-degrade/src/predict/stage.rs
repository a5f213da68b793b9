//! The predictor as a control-loop stage: one batched run per tick, within its budget.

use std::sync::{Arc, Mutex};

use super::runner::{Batch as BatchOutcome, Runner};
use super::{N_FEATURES, WINDOW};
use crate::control::{Batch, Stage};

/// The attached predictor, if any.
#[derive(Debug, Default)]
pub(crate) struct PredictStage {
    runner: Option<Mutex<Runner>>,
    service: Arc<str>,
    /// Whether the predictor is failing (logged when it starts and when it ends).
    failing: std::sync::atomic::AtomicBool,
    /// Whether a value that is not a probability (NaN, or outside 0..=1) was logged.
    out_of_range: std::sync::atomic::AtomicBool,
    /// The last tick's outcome and, while failing, the last error (for the status).
    last: Mutex<crate::degrader::PredictorStatus>,
}

impl PredictStage {
    pub(crate) fn new(runner: Option<Runner>, service: Arc<str>) -> Self {
        Self {
            runner: runner.map(Mutex::new),
            service,
            failing: Default::default(),
            out_of_range: Default::default(),
            last: Mutex::default(),
        }
    }

    /// What the last tick's batch did; `None` without a predictor.
    pub(crate) fn status(&self) -> Option<crate::degrader::PredictorStatus> {
        self.runner.as_ref()?;
        Some(self.last.lock().unwrap_or_else(|e| e.into_inner()).clone())
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
                BatchOutcome::Failed => last.error = error.as_deref().map(Arc::from),
                BatchOutcome::Overrun => {}
            }
        }
        match outcome {
            BatchOutcome::Fresh => {
                if self.failing.swap(false, Relaxed) {
                    tracing::info!(service = %self.service, "the predictor answers again");
                }
            }
            BatchOutcome::Overrun => crate::metrics::predictor_overrun(&self.service),
            BatchOutcome::Failed => {
                crate::metrics::predictor_failure(&self.service);
                if !self.failing.swap(true, Relaxed) {
                    tracing::error!(
                        service = %self.service, error = error.as_deref().unwrap_or(""),
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
        for (class, (p, &last)) in batch.predictions.iter_mut().zip(current).enumerate() {
            let v = f64::from(last);
            *p = if (-1e-6..=1.0 + 1e-6).contains(&v) {
                Some(v.clamp(0.0, 1.0))
            } else {
                // The contract is a probability; a value that is not one (NaN, or outside
                // 0..=1 beyond a rounding error) is no prediction for this class, not a
                // certain failure, and the other classes keep theirs (said once).
                if !self.out_of_range.swap(true, Relaxed) {
                    tracing::warn!(
                        service = %self.service,
                        class = runner.classes.get(class).map_or("", String::as_str),
                        value = v,
                        "the predictor answered a value that is not a probability in 0..=1: \
                         read as no prediction for this class (said once)"
                    );
                }
                None
            };
        }
    }
}
