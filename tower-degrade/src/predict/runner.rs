//! The predictor's own thread, so a slow model never holds the tick past its budget.

use std::sync::mpsc;
use std::time::Instant;

use super::{N_FEATURES, Predictor, PredictorConfig, WINDOW};
use crate::error::BoxError;

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
pub(crate) enum Batch {
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
    pub(crate) fn run(&mut self, fill: impl FnOnce(&mut [f32])) -> (Batch, Option<String>) {
        // A batch that overran its budget may have finished since.
        if self.buffer.is_none() {
            match self.results.try_recv() {
                Ok((buf, res)) => {
                    self.buffer = Some(buf);
                    if let Ok(p) = res {
                        self.last = p;
                    }
                }
                Err(_) => return (Batch::Overrun, None),
            }
        }
        let mut buf = self.buffer.take().expect("returned above");
        fill(&mut buf);
        let deadline = Instant::now() + self.config.budget;
        if self.requests.send(buf).is_err() {
            return (Batch::Failed, Some("the predictor thread stopped".into()));
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
                        (Batch::Fresh, None)
                    }
                    Err(e) => (Batch::Failed, Some(e)),
                }
            }
            Err(_) => (Batch::Overrun, None),
        }
    }
}
