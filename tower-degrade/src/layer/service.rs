//! The [`Degrade`] service: classify, read the directive, admit or divert, time the call.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tower::Service;

use super::future::ResponseFuture;
use crate::class::{ClassId, Route};
use crate::classify::ClassifyRequest;
use crate::control::Stage;
use crate::degrader::Shared;
use crate::error::Degraded;
use crate::fallback::{Diverted, Fallback, NoFallback};
use crate::gate::{KIND_ADMIT, KIND_FRACTION, KIND_PROBE, Packed, ProbePermit};
use crate::protocol::{Generic, Protocol};
use crate::window::{Outcome, Recording, shard_index};

/// The service produced by [`DegradeLayer`](super::DegradeLayer).
///
/// `poll_ready` only passes the inner service's readiness through: calls that are not admitted
/// are answered from `call` (a ready degraded error or response, or the fallback), never by an
/// `Err` from `poll_ready`, so `Buffer`-based stacks are not torn down.
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
    S: Service<Req>,
    C: ClassifyRequest<Req>,
    P: Protocol<S::Response, S::Error> + Clone,
    F: Fallback<Req, S::Response, S::Error>,
{
    type Response = P::Response;
    type Error = P::Error;
    type Future = ResponseFuture<S::Future, F::Future, P>;

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
        let idx = class.index().min(self.shared.gates.len() - 1);
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
        let shard = self.shared.shards[shard_index(self.shared.shard_mask)].clone();
        let recording = match self.waiting_since.take() {
            None => Recording::start(shard, idx as u16, probe),
            Some(since) => Recording::after_wait(shard, idx as u16, probe, since),
        };
        let fut = self.inner.call(req);
        ResponseFuture::called(fut, recording, gate.timeout, delay, self.protocol.clone())
    }
}

impl<S, C, P, F> Degrade<S, C, P, F> {
    /// Apply the class's per-request rules (policy rollouts, `on_request` hooks).
    #[cold]
    fn per_request<Req>(&self, idx: usize, d: Packed, req: &Req) -> Packed
    where
        C: ClassifyRequest<Req>,
    {
        let view = self.classifier.describe(req);
        Stage::per_request(&self.shared.policies, idx, d, &view)
    }

    #[cold]
    fn divert<Req>(
        &mut self,
        req: Req,
        idx: usize,
        d: Packed,
    ) -> ResponseFuture<S::Future, F::Future, P>
    where
        S: Service<Req>,
        P: Protocol<S::Response, S::Error> + Clone,
        F: Fallback<Req, S::Response, S::Error>,
    {
        let shard = &self.shared.shards[shard_index(self.shared.shard_mask)];
        let route = d.route();
        let name = self.shared.names[idx].clone();
        if route != Route::Reject {
            let call = Diverted::new(req, ClassId(idx as u16), name.clone(), route, d.reason());
            match self.fallback.call(call) {
                Ok(fut) => {
                    shard.record(idx, Outcome::Degraded, Duration::ZERO);
                    return ResponseFuture::fallback(fut, self.protocol.clone());
                }
                Err(call) => drop(call),
            }
        } else {
            drop(req);
        }
        shard.record(idx, Outcome::Rejected, Duration::ZERO);
        tracing::debug!(
            service = %self.shared.service, class = %name, reason = %d.reason(), route = %route,
            "call not admitted"
        );
        let degraded = Degraded::new(name, d.reason(), route, d.retry_after());
        ResponseFuture::degraded(degraded, self.protocol.clone())
    }
}
