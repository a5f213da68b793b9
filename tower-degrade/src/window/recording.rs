//! The accounting of one admitted call.

use std::sync::Arc;

use super::{Outcome, Shard};
use crate::gate::ProbePermit;

/// The accounting of one admitted call: it holds the call's in-flight slot and records the
/// outcome and latency when finished. Dropped unfinished (the caller gave up), it records a
/// `cancelled` call, or a `timeout` past the class's abandon threshold, frees the slot and
/// gives back its half-open probe permit, if any (a probe abandoned past the threshold has
/// failed). A probe's outcome is also counted as the probe's, for the half-open verdict.
///
/// A call whose outcome is known only at the end of its response stream (gRPC's status in the
/// trailers) is [`answered`](Self::answered) when its response head comes back: its latency is
/// taken then and its slot freed, and the outcome is counted when the stream ends, so a long
/// stream is neither a slow call nor an overdue one.
///
/// It is moved by value into the protocol when the call completes: it is kept to 32 bytes (two
/// aligned 16-byte moves), as a larger one costs a failed store-to-load forwarding on the
/// closed path.
pub struct Recording {
    shard: Arc<Shard>,
    /// When the call started running (after any wait).
    start: u64,
    /// How long the call waited before it ran (readiness, admission), µs: part of its latency,
    /// not of its time in the service.
    waited_micros: u32,
    class: u16,
    flags: u8,
}

/// Recorded (finished or dropped).
const DONE: u8 = 1;
/// Holds a permit of the class's admission limiter, given back when the call ends.
const PERMIT: u8 = 2;
/// The inner future is being polled: still set when the recording is dropped, the poll
/// panicked.
const POLLING: u8 = 4;
/// Holds one of its class's half-open probe permits.
const PROBE: u8 = 8;
/// Answered: the latency is recorded and the in-flight slot and permit are freed; only the
/// outcome is left to count.
const ANSWERED: u8 = 16;
/// With `PERMIT`: the tier rank the permit was taken as (two bits from here), given back
/// with it.
const PERMIT_RANK_SHIFT: u8 = 5;

impl std::fmt::Debug for Recording {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recording")
            .field("class", &self.class)
            .field("probe", &(self.flags & PROBE != 0))
            .finish()
    }
}

impl Recording {
    #[inline]
    pub(crate) fn start(shard: Arc<Shard>, class: u16, probe: Option<ProbePermit>) -> Self {
        let start = shard.timer.start();
        shard.begin(usize::from(class), start);
        Self {
            start,
            shard,
            waited_micros: 0,
            class,
            // The permit goes back through the shard's gates, if the call is cancelled.
            flags: if probe.is_some() { PROBE } else { 0 },
        }
    }

    /// This call holds a permit of its class's admission limiter, taken as a call of tier
    /// rank `rank` (`admit::queue::rank`: its class's tier, or the one an upstream raised it
    /// to).
    #[inline]
    pub(crate) fn hold_permit(&mut self, rank: u8) {
        debug_assert!(rank < 4);
        self.flags |= PERMIT | (rank << PERMIT_RANK_SHIFT);
    }

    /// Mark the inner future as being polled (or not any more).
    #[inline]
    pub(crate) fn set_polling(&mut self, on: bool) {
        if on {
            self.flags |= POLLING;
        } else {
            self.flags &= !POLLING;
        }
    }

    /// Set [`current_tier`](crate::admit::current_tier) to the call's tier while it is polled.
    #[inline]
    pub(crate) fn tier_scope(&self) -> crate::admit::TierScope {
        crate::admit::TierScope::enter(|| self.shard.tier(usize::from(self.class)))
    }

    /// The call's latency: its wait and its time running since `start`, with the latter.
    #[inline]
    fn latency(&self) -> (std::time::Duration, std::time::Duration) {
        let ran = self.shard.timer.elapsed(self.start);
        if self.waited_micros == 0 {
            return (ran, ran);
        }
        let waited = std::time::Duration::from_micros(u64::from(self.waited_micros));
        (ran.saturating_add(waited), ran)
    }

    /// A call that waited for the inner service to become ready since `since` (a stamp of the
    /// shard's timer): the wait is its queueing delay and part of its latency.
    #[cold]
    pub(crate) fn after_wait(
        shard: Arc<Shard>,
        class: u16,
        probe: Option<ProbePermit>,
        since: u64,
    ) -> Self {
        let mut rec = Self::start(shard, class, probe);
        let waited = rec.shard.timer.delta(since, rec.start);
        rec.queued(waited);
        rec.waited_micros = u32::try_from(waited.as_micros()).unwrap_or(u32::MAX);
        rec
    }

    /// Count `wait` as this call's queueing delay.
    #[cold]
    pub(crate) fn queued(&self, wait: std::time::Duration) {
        self.shard.queued(usize::from(self.class), wait);
    }

    /// Time the call from now (after a policy's delay, so the delay is not its latency).
    pub(crate) fn restart(&mut self) {
        let from = self.start;
        self.start = self.shard.timer.start();
        self.shard.moved(usize::from(self.class), from, self.start);
        self.waited_micros = 0;
    }

    /// The call's response head came back and its outcome waits for the end of the response
    /// stream: record its latency now (the time to the head, as for any HTTP response), free
    /// its in-flight slot and give its admission permit back. The outcome is counted by
    /// [`finish`](Self::finish) at the end of the stream, or as `cancelled` if the stream is
    /// dropped before it (the service had answered; its caller went away).
    #[inline]
    pub fn answered(&mut self) {
        if self.flags & (ANSWERED | DONE) != 0 {
            return;
        }
        self.flags |= ANSWERED;
        let (latency, ran) = self.latency();
        self.shard
            .answered(usize::from(self.class), self.start, ran, latency);
        if self.flags & PERMIT != 0 {
            self.flags &= !PERMIT;
            self.release(ran, true);
        }
        if self.flags & PROBE != 0 {
            self.answered_probe(latency);
        }
    }

    /// A probe is judged at its answer's head: answered within its SLA it succeeded, slower it
    /// failed, whatever its stream ends with (its end is counted in the window as any call's).
    /// Judged at the stream's end instead, a watch or a feed that took a probe held it for as
    /// long as it streamed, and its class half-open, refusing nearly every call.
    #[cold]
    fn answered_probe(&mut self, latency: std::time::Duration) {
        let class = usize::from(self.class);
        self.flags &= !PROBE;
        let ok = self.shard.within_sla(class, latency);
        self.shard.probe_done(class, ok, latency);
    }

    /// A probe ended with `outcome` after `latency`: a verdict, or, cancelled by its caller,
    /// its permit back for another call.
    #[cold]
    fn probe_ended(&self, outcome: Outcome, latency: std::time::Duration) {
        let class = usize::from(self.class);
        match outcome {
            Outcome::Cancelled => self.shard.release_probe(class),
            o => self.shard.probe_done(class, o == Outcome::Success, latency),
        }
    }

    /// Record the call's outcome and latency, and free its in-flight slot (or, for a call
    /// already [`answered`](Self::answered), count its outcome).
    #[inline]
    pub fn finish(mut self, outcome: Outcome) {
        self.flags |= DONE;
        if self.flags & ANSWERED != 0 {
            // A probe was judged when it was answered (`answered_probe`).
            self.shard.count(usize::from(self.class), outcome);
            return;
        }
        let (latency, ran) = self.latency();
        self.shard
            .end(usize::from(self.class), self.start, ran, outcome, latency);
        if self.flags & PERMIT != 0 {
            self.release(ran, true);
        }
        if self.flags & PROBE != 0 {
            self.probe_ended(outcome, latency);
        }
    }

    /// Give the admission permit back, with the time the call ran as a latency sample when
    /// it tells something of the service's capacity (it completed or ran into a timeout).
    #[inline]
    fn release(&self, ran: std::time::Duration, sample: bool) {
        let micros = sample.then(|| u64::try_from(ran.as_micros()).unwrap_or(u64::MAX));
        let rank = (self.flags >> PERMIT_RANK_SHIFT) & 3;
        self.shard
            .release_permit(usize::from(self.class), rank, micros);
    }

    /// The service and class names (for errors on cold paths).
    pub(crate) fn names(&self) -> (Arc<str>, Arc<str>) {
        (
            self.shard.service(),
            self.shard.name(usize::from(self.class)),
        )
    }

    /// The fallback route the call's class is configured with (cold paths only).
    #[cfg(feature = "fallback")]
    pub(crate) fn route(&self) -> crate::class::Route {
        self.shard.route(usize::from(self.class))
    }
}

/// Dropped unfinished: the caller gave up on the call, or the service panicked while the call
/// was being made (`error`: a panic is a failure, wherever it is caught). A call its caller gave
/// up on after the class's abandon threshold (its SLA by default) is a `timeout`: overload
/// that makes callers give up is a failure the breaker must see. Before it, it is `cancelled`.
/// Either way its latency so far is recorded, a lower bound of what the call would have taken.
impl Drop for Recording {
    fn drop(&mut self) {
        if self.flags & DONE == 0 && self.flags & ANSWERED != 0 {
            let outcome = if std::thread::panicking() {
                Outcome::Error
            } else {
                Outcome::Cancelled
            };
            // A probe was judged when it was answered.
            self.shard.count(usize::from(self.class), outcome);
        } else if self.flags & DONE == 0 {
            let class = usize::from(self.class);
            let (latency, ran) = self.latency();
            let outcome = if self.flags & POLLING != 0 || std::thread::panicking() {
                Outcome::Error
            } else {
                self.shard.abandoned(class, latency)
            };
            self.shard.end(class, self.start, ran, outcome, latency);
            if self.flags & PERMIT != 0 {
                self.release(ran, outcome != Outcome::Cancelled);
                // Given up on after longer in the service than waiting for the permit: a sign
                // of a queue in the service. One given up on soon after a long wait for its
                // permit says nothing of the service (and counted, would take the limit down
                // and lengthen the waits that cause it).
                if outcome == Outcome::Cancelled && ran > latency.saturating_sub(ran) {
                    self.shard.abandoned_permit(class);
                }
            }
            if self.flags & PROBE != 0 {
                self.probe_ended(outcome, latency);
            }
        }
    }
}

// See the type's docs.
const _: () = assert!(std::mem::size_of::<Recording>() <= 32);
