//! A request body whose message comes after its call was answered, as an HTTP/2 client's can:
//! each test crate that needs it includes it with `#[path = "../late.rs"] mod late;`.

#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::Frame;
use tokio::sync::oneshot;

/// A request body whose one message is sent after the call was answered: [`late_message`]
/// makes one.
#[derive(Debug)]
pub struct LateMessage {
    message: Option<oneshot::Receiver<Bytes>>,
    read: Arc<AtomicUsize>,
}

/// The client's side of a [`LateMessage`].
#[derive(Debug)]
pub struct LateSender {
    /// Where the message is sent (dropped: the body ends without one).
    pub send: oneshot::Sender<Bytes>,
    /// How many of its bytes were read.
    pub read: Arc<AtomicUsize>,
}

/// A body and its client's side.
pub fn late_message() -> (LateMessage, LateSender) {
    let (send, message) = oneshot::channel();
    let read = Arc::new(AtomicUsize::new(0));
    let body = LateMessage {
        message: Some(message),
        read: Arc::clone(&read),
    };
    (body, LateSender { send, read })
}

impl http_body::Body for LateMessage {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let Some(message) = self.message.as_mut() else {
            return Poll::Ready(None);
        };
        let got = ready!(Pin::new(message).poll(cx));
        self.message = None;
        Poll::Ready(got.ok().map(|data| {
            self.read.fetch_add(data.len(), Ordering::SeqCst);
            Ok(Frame::data(data))
        }))
    }
}
