//! [`ChaosLayer`], its service and its future.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::answer::{ErrorAnswer, FaultAnswer, GrpcAnswer, HttpAnswer};
use super::{ChaosShared, FaultKind};
use crate::class::ClassId;
use crate::classify::ClassifyRequest;

/// Injects a [`Chaos`](super::Chaos) handle's faults into the calls of the service it wraps.
/// Made by [`Chaos::layer`](super::Chaos::layer); put it inside the degrade layer.
#[derive(Debug, Clone)]
pub struct ChaosLayer<C, A = ErrorAnswer> {
    shared: Arc<ChaosShared>,
    classify: C,
    answer: A,
}

impl<C, A> ChaosLayer<C, A> {
    pub(super) fn new(shared: Arc<ChaosShared>, classify: C, answer: A) -> Self {
        Self {
            shared,
            classify,
            answer,
        }
    }

    /// Answer struck calls with HTTP 500 (error), 502 (abort) or 504 (hang).
    pub fn http(self) -> ChaosLayer<C, HttpAnswer> {
        self.answer_with(HttpAnswer)
    }

    /// Answer struck calls with a trailers-only gRPC `UNAVAILABLE` (error, abort) or
    /// `DEADLINE_EXCEEDED` (hang).
    pub fn grpc(self) -> ChaosLayer<C, GrpcAnswer> {
        self.answer_with(GrpcAnswer)
    }

    /// Answer struck calls with `answer`.
    pub fn answer_with<A2>(self, answer: A2) -> ChaosLayer<C, A2> {
        ChaosLayer {
            shared: self.shared,
            classify: self.classify,
            answer,
        }
    }
}

impl<S, C: Clone, A: Clone> Layer<S> for ChaosLayer<C, A> {
    type Service = ChaosService<S, C, A>;

    fn layer(&self, inner: S) -> Self::Service {
        ChaosService {
            inner,
            shared: self.shared.clone(),
            classify: self.classify.clone(),
            answer: self.answer.clone(),
        }
    }
}

/// The service a [`ChaosLayer`] makes.
#[derive(Debug, Clone)]
pub struct ChaosService<S, C, A> {
    inner: S,
    shared: Arc<ChaosShared>,
    classify: C,
    answer: A,
}

impl<S, C, A, Req> Service<Req> for ChaosService<S, C, A>
where
    S: Service<Req> + Clone,
    C: ClassifyRequest<Req>,
    A: FaultAnswer<S::Response, S::Error> + Clone,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ChaosFuture<S, Req, A>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let plan = self.shared.plan();
        // A clear after this plan releases the call's wait, though it may land before the
        // wait starts and its notification is gone.
        let clears = plan.epoch();
        if plan.is_empty() {
            return ChaosFuture::pass(self.inner.call(req), self.answer.clone());
        }
        let class = self
            .shared
            .own(self.classify.classify(&req), self.classify.registry());
        let path = if plan.has_routes() {
            self.classify.describe(&req).path
        } else {
            ""
        };
        let fault = plan.fault(class, path);
        drop(plan);
        let Some(fault) = fault else {
            return ChaosFuture::pass(self.inner.call(req), self.answer.clone());
        };
        let (u, v) = self.shared.draw();
        let delay = fault.latency + fault.jitter.mul_f64(v);
        let (errors, aborts, hangs) = fault.rates();
        let kind = if u < errors {
            Some(FaultKind::Error)
        } else if u < errors + aborts {
            Some(FaultKind::Abort)
        } else if u < errors + aborts + hangs {
            Some(FaultKind::Hang)
        } else {
            None
        };
        self.shared.count(!delay.is_zero(), kind);
        let abort = kind == Some(FaultKind::Abort);
        let state = match kind {
            Some(FaultKind::Error) if delay.is_zero() => State::Answer {
                fault: Some(FaultKind::Error),
            },
            Some(FaultKind::Error) => {
                State::wait(&self.shared, clears, delay, Then::Answer(FaultKind::Error))
            }
            Some(FaultKind::Hang) => State::wait(
                &self.shared,
                clears,
                delay.saturating_add(fault.hang_for),
                Then::Answer(FaultKind::Hang),
            ),
            None | Some(FaultKind::Abort) if delay.is_zero() => State::Run {
                fut: self.inner.call(req),
                abort,
            },
            None | Some(FaultKind::Abort) => {
                // The ready service goes with the call; this one keeps a fresh clone (tower's
                // pattern for calling after `poll_ready` from a future).
                let fresh = self.inner.clone();
                let ready = std::mem::replace(&mut self.inner, fresh);
                State::wait(
                    &self.shared,
                    clears,
                    delay,
                    Then::Call {
                        inner: ready,
                        req,
                        abort,
                    },
                )
            }
        };
        ChaosFuture {
            state,
            answer: self.answer.clone(),
            struck: Some((self.shared.clone(), class)),
        }
    }
}

/// What a delayed call does once its delay has passed.
enum Then<S, Req> {
    Call { inner: S, req: Req, abort: bool },
    Answer(FaultKind),
}

pin_project! {
    #[project = StateProj]
    enum State<S, Req>
    where
        S: Service<Req>,
    {
        Pass { #[pin] fut: S::Future },
        Wait {
            #[pin] sleep: tokio::time::Sleep,
            // Ready when the faults are cleared; `clears`: the call's plan's epoch.
            #[pin] cleared: tokio::sync::futures::OwnedNotified,
            clears: u64,
            then: Option<Then<S, Req>>,
        },
        Run { #[pin] fut: S::Future, abort: bool },
        Answer { fault: Option<FaultKind> },
    }
}

impl<S: Service<Req>, Req> State<S, Req> {
    /// Wait `delay`, or until the faults are cleared after the call's plan (`clears`, its
    /// epoch).
    fn wait(shared: &ChaosShared, clears: u64, delay: Duration, then: Then<S, Req>) -> Self {
        State::Wait {
            sleep: tokio::time::sleep(delay),
            cleared: shared.cleared(),
            clears,
            then: Some(then),
        }
    }
}

pin_project! {
    /// The future of a [`ChaosService`] call: the service's own future when no fault
    /// strikes the call.
    pub struct ChaosFuture<S, Req, A>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S, Req>,
        answer: A,
        struck: Option<(Arc<ChaosShared>, ClassId)>,
    }
}

impl<S: Service<Req>, Req, A> ChaosFuture<S, Req, A> {
    #[inline]
    fn pass(fut: S::Future, answer: A) -> Self {
        Self {
            state: State::Pass { fut },
            answer,
            struck: None,
        }
    }
}

impl<S, Req, A> Future for ChaosFuture<S, Req, A>
where
    S: Service<Req>,
    A: FaultAnswer<S::Response, S::Error>,
{
    type Output = Result<S::Response, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let answer = |answer: &A, struck: &Option<(Arc<ChaosShared>, ClassId)>, fault| {
            let name = struck.as_ref().map_or("", |(s, c)| s.class_name(*c));
            answer.answer(fault, name)
        };
        loop {
            match this.state.as_mut().project() {
                StateProj::Pass { fut } => return fut.poll(cx),
                StateProj::Run { fut, abort } => {
                    let result = ready!(fut.poll(cx));
                    if !*abort {
                        return Poll::Ready(result);
                    }
                    // The service did the work; its answer is lost on the way back.
                    drop(result);
                    return Poll::Ready(answer(this.answer, this.struck, FaultKind::Abort));
                }
                StateProj::Answer { fault } => {
                    let fault = fault.take().expect("ChaosFuture polled after completion");
                    return Poll::Ready(answer(this.answer, this.struck, fault));
                }
                StateProj::Wait {
                    sleep,
                    mut cleared,
                    clears,
                    then,
                } => {
                    // Cleared after the call's plan: the count tells. The notification only
                    // wakes the call; one for the clear that published this very plan (it
                    // can come after the wait began) is waited past.
                    let shared = this.struck.as_ref().map(|(s, _)| s);
                    let past = |s: &Arc<ChaosShared>| s.cleared_count() > *clears;
                    let mut released = shared.is_some_and(past);
                    while !released && cleared.as_mut().poll(cx).is_ready() {
                        released = shared.is_some_and(past);
                        if let (false, Some(s)) = (released, shared) {
                            cleared.set(s.cleared());
                        }
                    }
                    if !released {
                        ready!(sleep.poll(cx));
                    }
                    let next = match then.take().expect("ChaosFuture polled after completion") {
                        Then::Call {
                            mut inner,
                            req,
                            abort,
                        } => State::Run {
                            fut: inner.call(req),
                            abort,
                        },
                        Then::Answer(fault) => State::Answer { fault: Some(fault) },
                    };
                    this.state.set(next);
                }
            }
        }
    }
}
