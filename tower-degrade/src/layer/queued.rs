//! A call waiting for an admission permit, inside its response future.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower::Service;

use super::divert::divert;
use crate::admit::{WaitEnd, Waiter};
use crate::degrader::Shared;
use crate::error::Degraded;
use crate::fallback::Fallback;
use crate::gate::{ProbePermit, Reason};
use crate::window::{Outcome, Recording, shard_index};

/// How a queued call left the queue.
#[derive(Debug)]
pub enum Exit<F, FB, E> {
    /// Admitted and called: the inner future and its recording.
    Called {
        /// The inner service's future.
        fut: F,
        /// The call's accounting.
        rec: Recording,
        /// The class timeout, armed from now.
        timeout: Option<Duration>,
    },
    /// Not admitted, served by the fallback.
    Fallback(FB),
    /// Not admitted, answered degraded.
    Degraded(Degraded),
    /// Admitted, but the inner service failed to become ready.
    ReadyError(E),
}

/// A call waiting in the queue; the response future's queued state. Not nameable outside the
/// crate: it only appears as a type parameter of [`ResponseFuture`](super::ResponseFuture).
pub trait QueuedCall {
    /// The inner service's future.
    type Inner;
    /// The fallback's future.
    type Fallback;
    /// The inner service's error.
    type Error;

    /// Wait for a permit (or the bound), then ready and call the inner service.
    fn poll_wait(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Exit<Self::Inner, Self::Fallback, Self::Error>>;
}

/// The place in the queue: leaving it (dropped while waiting) gives back a permit granted in
/// the meantime and the call's probe permit, and counts the call as one its caller abandoned
/// (cancelled, or a timeout past the class's abandon threshold), so that callers giving up
/// in the queue show in the class's window.
#[derive(Debug)]
struct Ticket {
    shared: Arc<Shared>,
    limiter: usize,
    waiter: Option<Waiter>,
    class: u16,
    since: u64,
    probe: Option<ProbePermit>,
}

impl Ticket {
    /// Leave the queue; the tier rank of a permit granted meanwhile (now held by the caller).
    fn leave(&mut self) -> Option<u8> {
        let w = self.waiter.take()?;
        self.shared.limiters[self.limiter]
            .leave(&w)
            .then(|| w.rank())
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let class = usize::from(self.class);
        if self.waiter.is_some() {
            if let Some(rank) = self.leave() {
                self.shared.limiters[self.limiter].give_back(rank);
            }
            let shard = &self.shared.shards[shard_index(self.shared.shard_mask)];
            let waited = shard.timer.elapsed(self.since);
            shard.queued(class, waited);
            shard.count(class, shard.abandoned(class, waited));
        }
        if let Some(p) = self.probe.take() {
            p.release(class);
        }
    }
}

pin_project! {
    /// A call waiting for an admission permit (see [`admit`](crate::admit)).
    pub struct Queued<S, Req, Fb> {
        #[pin]
        deadline: Sleep,
        ticket: Ticket,
        svc: S,
        req: Option<Req>,
        fallback: Fb,
        rec: Option<Recording>,
    }
}

impl<S, Req, Fb> std::fmt::Debug for Queued<S, Req, Fb> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queued")
            .field("class", &self.ticket.class)
            .field("granted", &self.rec.is_some())
            .finish_non_exhaustive()
    }
}

impl<S, Req, Fb> Queued<S, Req, Fb> {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        shared: Arc<Shared>,
        limiter: usize,
        waiter: Waiter,
        class: u16,
        since: u64,
        bound: Duration,
        probe: Option<ProbePermit>,
        svc: S,
        req: Req,
        fallback: Fb,
    ) -> Self {
        Self {
            deadline: tokio::time::sleep(bound),
            ticket: Ticket {
                shared,
                limiter,
                waiter: Some(waiter),
                class,
                since,
                probe,
            },
            svc,
            req: Some(req),
            fallback,
            rec: None,
        }
    }
}

impl<S, Req, Fb> QueuedCall for Queued<S, Req, Fb>
where
    S: Service<Req>,
    Fb: Fallback<Req, S::Response, S::Error>,
{
    type Inner = S::Future;
    type Fallback = Fb::Future;
    type Error = S::Error;

    fn poll_wait(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Exit<S::Future, Fb::Future, S::Error>> {
        let this = self.project();
        let (class, since) = (this.ticket.class, this.ticket.since);
        let idx = usize::from(class);
        if this.rec.is_none() {
            let waiter = this
                .ticket
                .waiter
                .as_ref()
                .expect("polled after completion");
            let rank = waiter.rank();
            let end = match waiter.poll(cx) {
                Poll::Ready(end) => end,
                Poll::Pending => {
                    ready!(this.deadline.poll(cx));
                    // Waited as long as the class tolerates: leave, unless granted meanwhile.
                    match this.ticket.leave() {
                        Some(_) => WaitEnd::Granted,
                        None => WaitEnd::Shed,
                    }
                }
            };
            this.ticket.waiter = None;
            let shared = &this.ticket.shared;
            let shard = shared.shards[shard_index(shared.shard_mask)].clone();
            match end {
                WaitEnd::Granted => {
                    let probe = this.ticket.probe.take();
                    let mut rec = Recording::after_wait(shard, class, probe, since);
                    rec.hold_permit(rank);
                    *this.rec = Some(rec);
                }
                WaitEnd::Shed => {
                    shard.queued(idx, shard.timer.elapsed(since));
                    if let Some(p) = this.ticket.probe.take() {
                        p.release(idx);
                    }
                    let req = this.req.take().expect("polled after completion");
                    let gate = &shared.gates[idx];
                    let retry = Some(gate.overload_pushback(shared.period));
                    return Poll::Ready(
                        match divert(
                            shared,
                            this.fallback,
                            req,
                            idx,
                            Reason::Overload,
                            gate.route,
                            retry,
                        ) {
                            Ok(fut) => Exit::Fallback(fut),
                            Err(d) => Exit::Degraded(d),
                        },
                    );
                }
            }
        }
        match this.svc.poll_ready(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => {
                let rec = this.rec.take().expect("granted");
                rec.finish(Outcome::Error);
                if let Some(req) = this.req.take() {
                    this.fallback.reject(req);
                }
                Poll::Ready(Exit::ReadyError(e))
            }
            Poll::Ready(Ok(())) => {
                let req = this.req.take().expect("polled after completion");
                let fut = this.svc.call(req);
                Poll::Ready(Exit::Called {
                    fut,
                    rec: this.rec.take().expect("granted"),
                    timeout: this.ticket.shared.gates[idx].timeout,
                })
            }
        }
    }
}
