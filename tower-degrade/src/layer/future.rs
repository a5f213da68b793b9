//! The response future of [`Degrade`](crate::Degrade).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Sleep;

use crate::class::Route;
use crate::error::Degraded;
use crate::gate::Reason;
use crate::protocol::Protocol;
use crate::window::{Outcome, Recording};

pin_project! {
    #[project = KindProj]
    enum Kind<F, FB> {
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
    /// recording, released on drop), the fallback call, or a ready degraded answer. No boxing.
    pub struct ResponseFuture<F, FB, P> {
        #[pin]
        kind: Kind<F, FB>,
        recording: Option<Recording>,
        protocol: P,
    }
}

impl<F, FB, P> std::fmt::Debug for ResponseFuture<F, FB, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, FB, P> ResponseFuture<F, FB, P> {
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

impl<F, FB, P, Res, E> Future for ResponseFuture<F, FB, P>
where
    F: Future<Output = Result<Res, E>>,
    FB: Future<Output = Result<Res, E>>,
    P: Protocol<Res, E>,
{
    type Output = Result<P::Response, P::Error>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.kind.project() {
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
                if let Some(rec) = this.recording.as_mut() {
                    rec.polling = true;
                }
                let polled = fut.poll(cx);
                if let Some(rec) = this.recording.as_mut() {
                    rec.polling = false;
                }
                if let Poll::Ready(result) = polled {
                    let rec = this.recording.take().expect("polled after completion");
                    return Poll::Ready(this.protocol.on_response(result, rec));
                }
                if let Some(timer) = sleep.as_pin_mut() {
                    ready!(timer.poll(cx));
                    let rec = this.recording.take().expect("polled after completion");
                    let name = rec.class_name();
                    rec.finish(Outcome::Timeout);
                    let d = Degraded::new(name, Reason::Timeout, Route::Reject, None);
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
