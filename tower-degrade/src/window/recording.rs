//! The accounting of one admitted call.

use std::sync::Arc;

use super::{Outcome, Shard};
use crate::class::Tier;
use crate::gate::ProbePermit;

/// The accounting of one admitted call: it holds the call's in-flight slot and records the
/// outcome and latency when finished. Dropped unfinished (the caller gave up), it records a
/// `cancelled` call, or a `timeout` past the class's abandon threshold, frees the slot and
/// gives back its half-open probe permit, if any.
pub struct Recording {
    shard: Arc<Shard>,
    class: u16,
    /// The class's tier, set as [`current_tier`](crate::admit::current_tier) while polled.
    pub(crate) tier: Tier,
    start: u64,
    /// When the call started running (after any wait): its latency in the service.
    run_start: u64,
    probe: Option<ProbePermit>,
    done: bool,
    /// Holds a permit of the class's admission limiter, given back when the call ends.
    pub(crate) permit: bool,
    /// Set while the inner future is being polled: still set when the recording is dropped,
    /// the poll panicked.
    pub(crate) polling: bool,
}

impl std::fmt::Debug for Recording {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recording")
            .field("class", &self.class)
            .field("probe", &self.probe.is_some())
            .finish()
    }
}

impl Recording {
    #[inline]
    pub(crate) fn start(
        shard: Arc<Shard>,
        class: u16,
        tier: Tier,
        probe: Option<ProbePermit>,
    ) -> Self {
        shard.begin(usize::from(class));
        let start = shard.timer.start();
        Self {
            start,
            run_start: start,
            shard,
            class,
            tier,
            probe,
            done: false,
            permit: false,
            polling: false,
        }
    }

    /// A call that waited for the inner service to become ready since `since` (a stamp of the
    /// shard's timer): the wait is its queueing delay and part of its latency.
    #[cold]
    pub(crate) fn after_wait(
        shard: Arc<Shard>,
        class: u16,
        tier: Tier,
        probe: Option<ProbePermit>,
        since: u64,
    ) -> Self {
        let mut rec = Self::start(shard, class, tier, probe);
        rec.queued(rec.shard.timer.elapsed(since));
        rec.start = since;
        rec
    }

    /// Count `wait` as this call's queueing delay.
    #[cold]
    pub(crate) fn queued(&self, wait: std::time::Duration) {
        self.shard.queued(usize::from(self.class), wait);
    }

    /// Time the call from now (after a policy's delay, so the delay is not its latency).
    pub(crate) fn restart(&mut self) {
        self.start = self.shard.timer.start();
        self.run_start = self.start;
    }

    /// Record the call's outcome and latency, and free its in-flight slot.
    #[inline]
    pub fn finish(mut self, outcome: Outcome) {
        self.done = true;
        let latency = self.shard.timer.elapsed(self.start);
        self.shard.end(usize::from(self.class), outcome, latency);
        if self.permit {
            self.release(latency, true);
        }
    }

    /// Give the admission permit back, with the time the call ran as a latency sample when
    /// it tells something of the service's capacity (it completed or ran into a timeout).
    #[inline]
    fn release(&self, latency: std::time::Duration, sample: bool) {
        let limiter = self.shard.limiter(usize::from(self.class));
        if sample {
            let waited = self.shard.timer.delta(self.start, self.run_start);
            let ran = latency.saturating_sub(waited);
            limiter.release(u64::try_from(ran.as_micros()).unwrap_or(u64::MAX));
        } else {
            limiter.give_back();
        }
    }

    /// The class name (for errors on cold paths).
    pub(crate) fn class_name(&self) -> Arc<str> {
        self.shard.name(usize::from(self.class))
    }
}

/// Dropped unfinished: the caller gave up on the call, or the service panicked while the call
/// was being made (`error`: a panic is a failure, wherever it is caught). A call its caller gave
/// up on after the class's abandon threshold (its SLA by default) is a `timeout`: overload
/// that makes callers give up is a failure the breaker must see. Before it, it is `cancelled`.
/// Either way its latency so far is recorded, a lower bound of what the call would have taken.
impl Drop for Recording {
    fn drop(&mut self) {
        if !self.done {
            let class = usize::from(self.class);
            let latency = self.shard.timer.elapsed(self.start);
            let outcome = if self.polling || std::thread::panicking() {
                Outcome::Error
            } else {
                self.shard.abandoned(class, latency)
            };
            self.shard.end(class, outcome, latency);
            if self.permit {
                self.release(latency, outcome != Outcome::Cancelled);
            }
            if let Some(probe) = self.probe.take() {
                probe.release(usize::from(self.class));
            }
        }
    }
}
