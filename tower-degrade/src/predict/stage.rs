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
}

impl PredictStage {
    pub(crate) fn new(runner: Option<Runner>, service: Arc<str>) -> Self {
        Self {
            runner: runner.map(Mutex::new),
            service,
        }
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
        match outcome {
            BatchOutcome::Fresh => {}
            BatchOutcome::Overrun => crate::metrics::predictor_overrun(&self.service),
            BatchOutcome::Failed => tracing::warn!(
                service = %self.service, error = error.as_deref().unwrap_or(""),
                "predictor failed; keeping the last predictions"
            ),
        }
        for (p, last) in batch.predictions.iter_mut().zip(&runner.last) {
            *p = Some(f64::from(*last));
        }
    }
}
