//! The predictor's own thread, so a slow model never holds the tick past its budget.

use std::sync::mpsc;
use std::time::{Duration, Instant};

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
    /// The last batch's predictions, and the ticks since its input was taken (`None` until
    /// the first).
    last: Option<(Vec<f32>, u32)>,
    /// Ticks since the batch the worker has (or had last) was sent.
    sent_ago: u32,
    /// Stops the worker's run in progress, if the predictor can be stopped.
    stop: Option<super::StopHandle>,
    /// The batch in flight was stopped.
    stopped: bool,
    pub(crate) config: PredictorConfig,
    /// The classes' names, in batch order.
    pub(crate) classes: Vec<String>,
}

/// Ticks the last predictions stand for while the predictor overruns its budget, counted from
/// when their input was taken (a batch that landed late is that much older already); past
/// them a class has no prediction (a stalled model is not a healthy one).
pub(crate) const STALE_TICKS: u32 = 4;

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("config", &self.config)
            .finish()
    }
}

impl Drop for Runner {
    /// A batch still running is stopped (the degrader dropped while a model hangs): its
    /// thread ends with it rather than run on.
    fn drop(&mut self) {
        if self.buffer.is_none()
            && let Some(stop) = &self.stop
        {
            stop();
        }
    }
}

/// What one tick got from the predictor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Batch {
    /// New predictions.
    Fresh,
    /// Over budget (or still busy with an earlier batch): the last predictions stand.
    Overrun,
    /// The model failed, or its thread stopped (it panicked): no prediction this tick.
    Failed,
}

impl Runner {
    pub(crate) fn start(
        mut predictor: Box<dyn Predictor>,
        classes: &[&str],
        config: PredictorConfig,
        tick: Duration,
    ) -> Result<Self, BoxError> {
        let n = classes.len();
        let stop = predictor.stop_handle();
        // The runtime's own messages name the predictor where it has a name.
        let named = |what: String| match predictor.name() {
            Some(name) => format!("{name}: {what}"),
            None => what,
        };
        let (timed_out, panicked) = (
            named(format!(
                "the warm-up did not finish within {:?} (PredictorConfig::warm_up_timeout)",
                config.warm_up_timeout
            )),
            named("the warm-up panicked".to_owned()),
        );
        let names: Vec<String> = classes.iter().map(|c| (*c).to_owned()).collect();
        let thread_names = names.clone();
        let (requests, inbox) = mpsc::sync_channel::<Vec<f32>>(1);
        let (outbox, results) = mpsc::sync_channel(1);
        let (warmed, warm_up) = mpsc::sync_channel::<Result<(), String>>(1);
        std::thread::Builder::new()
            .name("degrade-predictor".into())
            .spawn(move || {
                // The warm-up runs here, so that building the degrader can stop waiting for a
                // model that never answers (the thread then ends when it does).
                let names: Vec<&str> = thread_names.iter().map(String::as_str).collect();
                let ok = predictor
                    .tick_interval(tick)
                    .and_then(|()| predictor.warm_up(&names))
                    .map_err(|e| e.to_string());
                let failed = ok.is_err();
                if warmed.send(ok).is_err() || failed {
                    return;
                }
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
        match warm_up.recv_timeout(config.warm_up_timeout) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e.into()),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // Its thread ends when the run does: stopped now if it can be.
                if let Some(stop) = &stop {
                    stop();
                }
                return Err(timed_out.into());
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(panicked.into());
            }
        }
        Ok(Self {
            requests,
            results,
            buffer: Some(vec![0.0; n * WINDOW * N_FEATURES]),
            last: None,
            sent_ago: 0,
            stop,
            stopped: false,
            config,
            classes: names,
        })
    }

    /// The predictions this tick may use: the last batch's while it is at most
    /// [`STALE_TICKS`] ticks old, none otherwise.
    pub(crate) fn current(&self) -> Option<&[f32]> {
        self.last
            .as_ref()
            .filter(|(_, age)| *age <= STALE_TICKS)
            .map(|(p, _)| p.as_slice())
    }

    fn age(&mut self) {
        if let Some((_, age)) = &mut self.last {
            *age = age.saturating_add(1);
        }
        self.sent_ago = self.sent_ago.saturating_add(1);
    }

    /// Run one batch: `fill` writes the input; waits at most the budget.
    pub(crate) fn run(&mut self, fill: impl FnOnce(&mut [f32])) -> (Batch, Option<String>) {
        const STOPPED: &str = "the predictor's thread stopped (it panicked)";
        self.age();
        // A batch that overran its budget may have finished since.
        if self.buffer.is_none() {
            match self.results.try_recv() {
                Ok((buf, res)) => {
                    self.buffer = Some(buf);
                    match res {
                        // As old as its input: a batch that took 20 ticks stands for a
                        // window 20 ticks old (zero-padded, it may be), not one just taken.
                        Ok(p) => self.last = Some((p, self.sent_ago)),
                        // A late batch that failed is a failure like any other: counted and
                        // said, and the older predictions are not used on (they were while
                        // they aged, and the failure went unseen). The next tick runs anew.
                        Err(e) => {
                            self.last = None;
                            let e = if self.stopped {
                                format!(
                                    "its batch ran past {STALE_TICKS} ticks (its answer too old \
                                     to use) and was stopped: {e}"
                                )
                            } else {
                                e
                            };
                            return (Batch::Failed, Some(e));
                        }
                    }
                }
                Err(mpsc::TryRecvError::Empty) => {
                    // Its answer would be too old to use: stop it, so that a new batch can
                    // run (a model that hangs on some input keeps its thread otherwise).
                    // Asked again each tick: a stop that came before the run began is cleared
                    // by it.
                    if self.sent_ago > STALE_TICKS
                        && let Some(stop) = &self.stop
                    {
                        self.stopped = true;
                        stop();
                    }
                    return (Batch::Overrun, None);
                }
                Err(mpsc::TryRecvError::Disconnected) => {
                    self.last = None;
                    return (Batch::Failed, Some(STOPPED.into()));
                }
            }
        }
        let mut buf = self.buffer.take().expect("returned above");
        fill(&mut buf);
        self.sent_ago = 0;
        self.stopped = false;
        let deadline = Instant::now() + self.config.budget;
        if let Err(mpsc::SendError(buf)) = self.requests.send(buf) {
            self.buffer = Some(buf);
            self.last = None;
            return (Batch::Failed, Some(STOPPED.into()));
        }
        match self
            .results
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            Ok((buf, res)) => {
                self.buffer = Some(buf);
                match res {
                    Ok(p) => {
                        self.last = Some((p, 0));
                        (Batch::Fresh, None)
                    }
                    Err(e) => {
                        self.last = None;
                        (Batch::Failed, Some(e))
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => (Batch::Overrun, None),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                self.last = None;
                (Batch::Failed, Some(STOPPED.into()))
            }
        }
    }
}
