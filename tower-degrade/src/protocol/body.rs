//! The response body of the [`Grpc`](super::Grpc) protocol, which records the outcome at the
//! end of the stream.

use std::pin::Pin;
use std::task::{Context, Poll};

use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower_http::classify::{ClassifyEos, ClassifyResponse};

use super::FailureOutcome;
use crate::window::{Outcome, Recording};

pin_project! {
    /// The response body of a [`Grpc`](super::Grpc) service: the inner body, or empty for a
    /// degraded answer. The outcome, when it depends on the trailers, is recorded at the end of
    /// the stream.
    pub struct DegradeBody<B, C: ClassifyResponse> {
        #[pin]
        pub(super) inner: Option<B>,
        pub(super) eos: Option<(Recording, C::ClassifyEos)>,
    }
}

impl<B, C: ClassifyResponse> std::fmt::Debug for DegradeBody<B, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DegradeBody")
            .field("empty", &self.inner.is_none())
            .field("awaiting_eos", &self.eos.is_some())
            .finish()
    }
}

impl<B, C: ClassifyResponse> DegradeBody<B, C> {
    pub(super) fn empty() -> Self {
        Self {
            inner: None,
            eos: None,
        }
    }

    /// Whether this body belongs to a degraded answer.
    pub fn is_degraded(&self) -> bool {
        self.inner.is_none()
    }
}

impl<B, C> Body for DegradeBody<B, C>
where
    B: Body,
    C: ClassifyResponse,
    C::FailureClass: FailureOutcome,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let Some(inner) = this.inner.as_pin_mut() else {
            return Poll::Ready(None);
        };
        let frame = std::task::ready!(inner.poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(trailers) = f.trailers_ref() {
                    finish_eos(this.eos, Some(trailers));
                }
            }
            Some(Err(_)) => {
                if let Some((rec, _)) = this.eos.take() {
                    rec.finish(Outcome::Error);
                }
            }
            None => finish_eos(this.eos, None),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or(SizeHint::with_exact(0), |b| b.size_hint())
    }
}

/// Classify the end of stream and finish the recording, if it still waits for it.
fn finish_eos<E: ClassifyEos>(eos: &mut Option<(Recording, E)>, trailers: Option<&HeaderMap>)
where
    E::FailureClass: FailureOutcome,
{
    if let Some((rec, classify)) = eos.take() {
        rec.finish(match classify.classify_eos(trailers) {
            Ok(()) => Outcome::Success,
            Err(f) => f.outcome(),
        });
    }
}
