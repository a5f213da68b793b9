//! The response future of [`Degrade`](crate::Degrade).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Sleep;

use super::queued::{Exit, QueuedCall};
use crate::class::Route;
use crate::error::Degraded;
use crate::gate::Reason;
use crate::protocol::Protocol;
use crate::window::{Outcome, Recording};

pin_project! {
    #[project = KindProj]
    enum Kind<F, FB, Q> {
        // Waiting for an admission permit: boxed, so that the futures of calls that do not
        // wait (all of them while permits are free) stay as small as without admission.
        Queued {
            wait: Pin<Box<Q>>,
        },
        Called {
            #[pin]
            fut: F,
            // The policy's delay first, then the class timeout: one timer, reset.
            #[pin]
            sleep: Option<Sleep>,
            // `Some(class timeout)` while a policy's delay holds the call.
            delaying: Option<Option<Duration>>,
        },
        Fallback {
            #[pin]
            fut: FB,
        },
        Degraded {
            degraded: Option<Degraded>,
        },
    }
}

pin_project! {
    /// The response future of [`Degrade`](crate::Degrade): the inner call (with its
    /// recording, released on drop), the fallback call, a ready degraded answer, or a call
    /// waiting for an admission permit (`Q`). No boxing.
    pub struct ResponseFuture<F, FB, P, Q> {
        #[pin]
        kind: Kind<F, FB, Q>,
        recording: Option<Recording>,
        protocol: P,
    }
}

impl<F, FB, P, Q> std::fmt::Debug for ResponseFuture<F, FB, P, Q> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, FB, P, Q> ResponseFuture<F, FB, P, Q> {
    #[inline]
    pub(crate) fn called(
        fut: F,
        rec: Recording,
        timeout: Option<Duration>,
        delay: Option<Duration>,
        protocol: P,
    ) -> Self {
        Self {
            kind: match delay {
                None => Kind::Called {
                    fut,
                    sleep: timeout.map(tokio::time::sleep),
                    delaying: None,
                },
                Some(by) => Kind::Called {
                    fut,
                    sleep: Some(tokio::time::sleep(by)),
                    delaying: Some(timeout),
                },
            },
            recording: Some(rec),
            protocol,
        }
    }

    pub(crate) fn queued(wait: Q, protocol: P) -> Self {
        Self {
            kind: Kind::Queued {
                wait: Box::pin(wait),
            },
            recording: None,
            protocol,
        }
    }

    pub(crate) fn fallback(fut: FB, protocol: P) -> Self {
        Self {
            kind: Kind::Fallback { fut },
            recording: None,
            protocol,
        }
    }

    pub(crate) fn degraded(degraded: Degraded, protocol: P) -> Self {
        Self {
            kind: Kind::Degraded {
                degraded: Some(degraded),
            },
            recording: None,
            protocol,
        }
    }
}

impl<F, FB, P, Q> ResponseFuture<F, FB, P, Q> {
    /// Wait in the admission queue; then either become the called (or fallback) state, or
    /// answer at once (`Some`).
    #[cold]
    #[inline(never)]
    fn leave_queue<Res, E>(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<P::Response, P::Error>>>
    where
        P: Protocol<Res, E>,
        Q: QueuedCall<Inner = F, Fallback = FB, Error = E>,
    {
        let this = self.project();
        let mut kind = this.kind;
        let KindProj::Queued { wait } = kind.as_mut().project() else {
            return Poll::Ready(None);
        };
        let exit = ready!(wait.as_mut().poll_wait(cx));
        Poll::Ready(match exit {
            Exit::Called { fut, rec, timeout } => {
                *this.recording = Some(rec);
                kind.set(Kind::Called {
                    fut,
                    sleep: timeout.map(tokio::time::sleep),
                    delaying: None,
                });
                None
            }
            Exit::Fallback(fut) => {
                kind.set(Kind::Fallback { fut });
                None
            }
            Exit::Degraded(d) => Some(this.protocol.on_degraded(d)),
            Exit::ReadyError(e) => Some(Err(this.protocol.on_ready_error(e))),
        })
    }
}

impl<F, FB, P, Q, Res, E> Future for ResponseFuture<F, FB, P, Q>
where
    F: Future<Output = Result<Res, E>>,
    FB: Future<Output = Result<Res, E>>,
    P: Protocol<Res, E>,
    Q: QueuedCall<Inner = F, Fallback = FB, Error = E>,
{
    type Output = Result<P::Response, P::Error>;

    #[inline]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Kind::Queued { .. } = &self.kind
            && let Some(answer) = ready!(self.as_mut().leave_queue(cx))
        {
            return Poll::Ready(answer);
        }
        let this = self.project();
        match this.kind.project() {
            KindProj::Queued { .. } => unreachable!("left the queue above"),
            KindProj::Called {
                fut,
                mut sleep,
                delaying,
            } => {
                if let Some(timeout) = *delaying {
                    // Held by a policy's delay: the inner future is not polled yet.
                    let timer = sleep
                        .as_mut()
                        .as_pin_mut()
                        .expect("a delayed call has a timer");
                    ready!(timer.poll(cx));
                    *delaying = None;
                    if let Some(rec) = this.recording.as_mut() {
                        rec.restart();
                    }
                    match timeout {
                        Some(t) => {
                            let timer = sleep.as_mut().as_pin_mut().expect("checked above");
                            timer.reset(tokio::time::Instant::now() + t);
                        }
                        None => sleep.set(None),
                    }
                }
                // A panic in the inner future unwinds through here and leaves the recording
                // marked as polling: dropped later, wherever the panic was caught, it counts the
                // call as a failure.
                let polled = match this.recording.as_mut() {
                    Some(rec) => {
                        rec.set_polling(true);
                        let _tier = rec.tier_scope();
                        let polled = fut.poll(cx);
                        rec.set_polling(false);
                        polled
                    }
                    None => fut.poll(cx),
                };
                if let Poll::Ready(result) = polled {
                    let rec = this.recording.take().expect("polled after completion");
                    return Poll::Ready(this.protocol.on_response(result, rec));
                }
                if let Some(timer) = sleep.as_pin_mut() {
                    ready!(timer.poll(cx));
                    let rec = this.recording.take().expect("polled after completion");
                    let (service, name) = rec.names();
                    let route = timed_out_route(&rec);
                    rec.finish(Outcome::Timeout);
                    let d = Degraded::new(service, name, Reason::Timeout, route, None);
                    return Poll::Ready(this.protocol.on_degraded(d));
                }
                Poll::Pending
            }
            KindProj::Fallback { fut } => {
                let result = ready!(fut.poll(cx));
                Poll::Ready(this.protocol.on_fallback(result))
            }
            KindProj::Degraded { degraded } => {
                let d = degraded.take().expect("polled after completion");
                Poll::Ready(this.protocol.on_degraded(d))
            }
        }
    }
}

/// The route a call the layer timed out is answered on: `cached` for a class routed there (a
/// `LastGoodLayer` outside the layer puts the read's copy in place of the `504`), else none.
#[cold]
fn timed_out_route(rec: &Recording) -> Route {
    #[cfg(feature = "fallback")]
    if rec.route() == Route::Cached {
        return Route::Cached;
    }
    let _ = rec;
    Route::Reject
}
