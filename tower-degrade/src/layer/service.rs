//! The [`Degrade`] service: classify, read the directive, admit or divert, time the call.

use std::sync::Arc;
use std::task::{Context, Poll};

use tower::Service;

use super::divert::divert;
use super::future::ResponseFuture;
use super::queued::Queued;
use crate::admit::{Enqueued, Priority};
use crate::class::{ClassId, Registry};
use crate::classify::ClassifyRequest;
use crate::control::Stage;
use crate::degrader::Shared;
use crate::fallback::{Fallback, NoFallback};
use crate::gate::{KIND_ADMIT, KIND_FRACTION, KIND_PROBE, Packed, ProbePermit, Reason};
use crate::protocol::{Generic, Protocol};
use crate::window::{Recording, shard_index};

/// The service produced by [`DegradeLayer`](super::DegradeLayer).
///
/// `poll_ready` only passes the inner service's readiness through: calls that are not admitted
/// are answered from `call` (a ready degraded error or response, or the fallback), never by an
/// `Err` from `poll_ready`, so `Buffer`-based stacks are not torn down.
///
/// The inner service must be `Clone`: a call that waits for an [admission](crate::admit) permit
/// takes the ready service into its future (`mem::replace` with a clone, as tower recommends)
/// and calls it when admitted, so waiting never holds `poll_ready` for other classes.
#[derive(Debug)]
pub struct Degrade<S, C, P = Generic, F = NoFallback> {
    inner: S,
    shared: Arc<Shared>,
    classifier: C,
    protocol: P,
    fallback: F,
    /// When `poll_ready` first found the inner service not ready, for the call that follows:
    /// its queueing delay, and the start of its latency.
    waiting_since: Option<u64>,
}

/// A clone has not waited for anything: the wait being timed belongs to the original.
impl<S: Clone, C: Clone, P: Clone, F: Clone> Clone for Degrade<S, C, P, F> {
    fn clone(&self) -> Self {
        Self::new(
            self.inner.clone(),
            self.shared.clone(),
            self.classifier.clone(),
            self.protocol.clone(),
            self.fallback.clone(),
        )
    }
}

impl<S, C, P, F> Degrade<S, C, P, F> {
    pub(super) fn new(
        inner: S,
        shared: Arc<Shared>,
        classifier: C,
        protocol: P,
        fallback: F,
    ) -> Self {
        Self {
            inner,
            shared,
            classifier,
            protocol,
            fallback,
            waiting_since: None,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consume this service, returning the inner one.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, C, P, F, Req> Service<Req> for Degrade<S, C, P, F>
where
    S: Service<Req> + Clone,
    C: ClassifyRequest<Req>,
    P: Protocol<S::Response, S::Error> + Clone,
    F: Fallback<Req, S::Response, S::Error> + Clone,
{
    type Response = P::Response;
    type Error = P::Error;
    type Future = ResponseFuture<S::Future, F::Future, P, Queued<S, Req, F>>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match self.inner.poll_ready(cx) {
            Poll::Ready(r) => Poll::Ready(r.map_err(|e| self.protocol.on_ready_error(e))),
            Poll::Pending => {
                if self.waiting_since.is_none() {
                    self.waiting_since = Some(self.shared.shards[0].timer.start());
                }
                Poll::Pending
            }
        }
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        let class = self.classifier.classify(&req);
        let ours = class.index() < self.shared.gates.len()
            && (self.classifier.registry()).is_none_or(|r| r.same_ids(&self.shared.registry));
        let idx = if ours {
            class.index()
        } else {
            foreign_class(&self.shared, class, self.classifier.registry())
        };
        let gate = &self.shared.gates[idx];
        let mut d = gate.directive.load();
        if d.has_overlay() {
            d = self.per_request(idx, d, &req);
        }
        let (mut probe, mut delay) = (None, None);
        if !d.is_admit() {
            let admitted = match d.kind() {
                KIND_ADMIT => {
                    delay = d.delay();
                    if let Some(by) = delay {
                        // A policy's delay: queueing the class chose, not latency.
                        self.shared.shards[shard_index(self.shared.shard_mask)].queued(idx, by);
                    }
                    true
                }
                KIND_FRACTION => gate.admits_fraction(d.threshold()),
                KIND_PROBE => {
                    probe = ProbePermit::try_take(&self.shared.gates, idx);
                    probe.is_some()
                }
                _ => false,
            };
            if !admitted {
                return self.divert(req, idx, d);
            }
        }
        let mut permit = false;
        if let Some(limiter) = gate.limiter {
            let limiter = usize::from(limiter);
            if !self.shared.limiters[limiter].try_acquire(gate.tier) {
                return self.queue(req, idx, limiter, probe);
            }
            permit = true;
        }
        let shard = self.shared.shards[shard_index(self.shared.shard_mask)].clone();
        let mut recording = match self.waiting_since.take() {
            None => Recording::start(shard, idx as u16, probe),
            Some(since) => Recording::after_wait(shard, idx as u16, probe, since),
        };
        if permit {
            recording.hold_permit(crate::admit::rank(gate.tier));
        }
        let fut = self.inner.call(req);
        ResponseFuture::called(fut, recording, gate.timeout, delay, self.protocol.clone())
    }
}

impl<S, C, P, F> Degrade<S, C, P, F> {
    /// Apply the class's per-request rules (policy rollouts, `on_request` hooks). A call they
    /// turn away is told to come back no sooner than the next tick, as one the tick's
    /// directive turns away is (`Controller::publish`).
    #[cold]
    fn per_request<Req>(&self, idx: usize, d: Packed, req: &Req) -> Packed
    where
        C: ClassifyRequest<Req>,
    {
        let view = self.classifier.describe(req);
        Stage::per_request(&self.shared.policies, idx, d, &view)
            .with_retry_at_least(self.shared.period)
    }

    #[cold]
    fn divert<Req>(
        &mut self,
        req: Req,
        idx: usize,
        d: Packed,
    ) -> ResponseFuture<S::Future, F::Future, P, Queued<S, Req, F>>
    where
        S: Service<Req>,
        P: Protocol<S::Response, S::Error> + Clone,
        F: Fallback<Req, S::Response, S::Error>,
    {
        let (reason, route, retry) = (d.reason(), d.route(), d.retry_after());
        match divert(
            &self.shared,
            &mut self.fallback,
            req,
            idx,
            reason,
            route,
            retry,
        ) {
            Ok(fut) => ResponseFuture::fallback(fut, self.protocol.clone()),
            Err(degraded) => ResponseFuture::degraded(degraded, self.protocol.clone()),
        }
    }

    /// The limit is reached: wait in the admission queue (in the response future), or be
    /// answered as not admitted at once.
    #[cold]
    fn queue<Req>(
        &mut self,
        req: Req,
        idx: usize,
        limiter: usize,
        probe: Option<ProbePermit>,
    ) -> ResponseFuture<S::Future, F::Future, P, Queued<S, Req, F>>
    where
        S: Service<Req> + Clone,
        C: ClassifyRequest<Req>,
        P: Protocol<S::Response, S::Error> + Clone,
        F: Fallback<Req, S::Response, S::Error> + Clone,
    {
        let gate = &self.shared.gates[idx];
        let key = self.classifier.admission_key(&req);
        if key.invalid_tier() {
            crate::metrics::priority_header_invalid(&self.shared.service);
        }
        let tier = key.tier(gate.tier);
        let bound = key.wait_bound(gate.queue_bound);
        let priority = Priority {
            tier,
            score: gate.score.load(std::sync::atomic::Ordering::Relaxed),
            user: key.user(),
        };
        let shard = self.shared.shards[shard_index(self.shared.shard_mask)].clone();
        let since = self
            .waiting_since
            .take()
            .unwrap_or_else(|| shard.timer.start());
        if bound.is_zero() && !gate.queue_bound.is_zero() {
            // A caller whose deadline leaves no time to wait: answered now, not queued (where
            // it would have pushed a call out of a full tier and counted as turned away).
            return self.overloaded(req, idx, probe);
        }
        // The tier's queue is sized by the class's bound; the call waits at most its own.
        match self.shared.limiters[limiter].enqueue(
            priority,
            tier.burst_tolerance(),
            gate.queue_bound,
        ) {
            Enqueued::Admitted => {
                let mut rec = Recording::after_wait(shard, idx as u16, probe, since);
                rec.hold_permit(crate::admit::rank(tier));
                let fut = self.inner.call(req);
                ResponseFuture::called(fut, rec, gate.timeout, None, self.protocol.clone())
            }
            Enqueued::Shed => self.overloaded(req, idx, probe),
            Enqueued::Queued(waiter) => {
                let clone = self.inner.clone();
                let svc = std::mem::replace(&mut self.inner, clone);
                let queued = Queued::new(
                    self.shared.clone(),
                    limiter,
                    waiter,
                    idx as u16,
                    since,
                    bound,
                    probe,
                    svc,
                    req,
                    self.fallback.clone(),
                );
                ResponseFuture::queued(queued, self.protocol.clone())
            }
        }
    }
}

impl<S, C, P, F> Degrade<S, C, P, F> {
    /// Not admitted for want of a permit: answered at once through the class's route.
    #[cold]
    fn overloaded<Req>(
        &mut self,
        req: Req,
        idx: usize,
        probe: Option<ProbePermit>,
    ) -> ResponseFuture<S::Future, F::Future, P, Queued<S, Req, F>>
    where
        S: Service<Req>,
        P: Protocol<S::Response, S::Error> + Clone,
        F: Fallback<Req, S::Response, S::Error>,
    {
        if let Some(p) = probe {
            p.release(idx);
        }
        let gate = &self.shared.gates[idx];
        let (route, retry) = (gate.route, Some(gate.overload_pushback(self.shared.period)));
        match divert(
            &self.shared,
            &mut self.fallback,
            req,
            idx,
            Reason::Overload,
            route,
            retry,
        ) {
            Ok(fut) => ResponseFuture::fallback(fut, self.protocol.clone()),
            Err(degraded) => ResponseFuture::degraded(degraded, self.protocol.clone()),
        }
    }
}

/// A `ClassId` this degrader did not hand out (another degrader's, from a classifier built on
/// its registry): counted in the `default` class, and said once per degrader. It was counted
/// in the class with that index, whichever that was.
#[cold]
#[inline(never)]
fn foreign_class(shared: &Shared, class: ClassId, from: Option<&Registry>) -> usize {
    if !shared
        .foreign_said
        .swap(true, std::sync::atomic::Ordering::Relaxed)
    {
        let name = from
            .filter(|r| class.index() < r.len())
            .map_or("?", |r| r.class(class).name());
        tracing::warn!(
            service = %shared.service,
            class = class.index(),
            class_name = name,
            "a class id this degrader did not hand out (a classifier built on another \
             degrader's registry?): counted in `default`; build the layer's classifier from \
             its own degrader"
        );
    }
    ClassId::DEFAULT.index()
}
