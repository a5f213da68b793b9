//! Reading the bodies of the calls the layer answers as not served.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::Buf;
use http_body::Body;

use super::{Diverted, Fallback, NoFallback};

/// A [`Fallback`] that reads the request body of each call answered as not served to its end
/// (in a task of its own, bounded) instead of dropping it, and hands every diverted call to
/// the fallback it wraps. [`DegradeLayer::drain_rejected`](crate::DegradeLayer::drain_rejected)
/// puts it around the layer's fallback.
///
/// # Why
///
/// The layer answers a call it does not serve at once, before the request body is read, and
/// on HTTP/2 the call's message (a gRPC request, a small POST body) often arrives after the
/// answer, at a stream nobody reads. h2 (0.4.16 and later) charges each such DATA frame
/// under 256 bytes that does not end its stream (a gRPC message frame does not: the client
/// ends the stream with an empty frame after it) 256 bytes less its length, to a budget of the
/// connection (half the connection window since h2 0.4.19, at least 25,600 bytes; frames of
/// 256 bytes or more give some back), and closes the connection with `GOAWAY
/// ENHANCE_YOUR_CALM` (`too_many_data_frames`) when it is spent, failing every call in flight
/// on it, the ones the layer serves too. With hyper's 1 MiB window that is at least 2,048 late
/// small messages; a storm of refusals on one connection gets there in seconds. A message for
/// a stream h2 has already forgotten (it remembers a few reset streams) is answered with a
/// reset instead, and hyper's server closes the connection the same way after 1,024 of those
/// (`too_many_internal_resets`, its `max_local_error_reset_streams`): in a trial of 20,000
/// refused POSTs, 512 at a time on one h2c connection, that limit came first. A frame that
/// is read is given back to the budget: with the bodies read, 200,000 refused calls on one
/// connection closed nothing (`examples/grpc`), and the stream stays open until its body
/// ends, so no reset is sent either. (h2's budget can be set, but hyper 1.x does not expose
/// the setting; its reset limit it does.)
///
/// # Bounds
///
/// A body already at its end (a `GET`) costs nothing. What has come of any other is read at
/// once, when the call is answered; the rest, if the body still waits for its client, in a
/// task spawned on the current tokio runtime (none: it is dropped), for at most
/// [`MOST_TIME`](DrainRejected::MOST_TIME). Reading stops once more than
/// [`MOST_BYTES`](DrainRejected::MOST_BYTES) or 256 frames have come; at most
/// [`MOST_AT_ONCE`](DrainRejected::MOST_AT_ONCE)
/// bodies are read at once per layer (the count is shared by the layer's clones, so by all its
/// connections: a client that holds refused streams open takes slots for up to a second each);
/// past any bound the body is dropped as it would have been. What is read is thrown away. A
/// body costs an allocation on the refusal path, one that has to wait a task too; the served
/// path is unchanged.
/// The time bound needs tokio's timers, as the layer's class timeouts and admission queue do.
///
/// # What it does not reach
///
/// Only the calls the layer itself answers as not served, and those the fallback router
/// refuses before it reads them (a malformed idempotency key, a call of another degrader),
/// whose bodies it reads itself before it answers. A body that a custom fallback takes and
/// then refuses without reading, a protocol switch the router refuses (its body is the new
/// protocol's stream), a call stopped by its class timeout while the service holds its body,
/// and the chaos layer's injected errors are dropped as before. The wrapped fallback's own
/// [`reject`](Fallback::reject) is not called.
#[derive(Debug, Clone)]
pub struct DrainRejected<F = NoFallback> {
    inner: F,
    reading: Arc<AtomicUsize>,
}

impl DrainRejected {
    /// The longest a rejected call's body is read: a client that sends its message with its
    /// call has long finished.
    pub const MOST_TIME: Duration = Duration::from_secs(1);
    /// Past this many bytes of a rejected call's body (the frame that crosses it is read), no
    /// more is read. Only small DATA frames are charged to h2's budget (large ones give to
    /// it), so a large body needs no reading.
    pub const MOST_BYTES: usize = 64 * 1024;
    /// The most bodies read at once by one layer and its clones.
    pub const MOST_AT_ONCE: usize = 1024;

    /// Read the bodies of rejected calls; divert nothing (no fallback).
    pub fn new() -> Self {
        Self::wrap(NoFallback)
    }
}

impl Default for DrainRejected {
    fn default() -> Self {
        Self::new()
    }
}

impl<F> DrainRejected<F> {
    /// Read the bodies of rejected calls, and hand diverted calls to `inner`.
    pub fn wrap(inner: F) -> Self {
        Self {
            inner,
            reading: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The fallback it wraps.
    pub fn inner(&self) -> &F {
        &self.inner
    }

    /// How many rejected calls' bodies are being read now.
    pub fn reading(&self) -> usize {
        self.reading.load(Ordering::Relaxed)
    }
}

impl<F, B, Res, E> Fallback<http::Request<B>, Res, E> for DrainRejected<F>
where
    F: Fallback<http::Request<B>, Res, E>,
    B: Body + Send + 'static,
    B::Data: Send,
{
    type Future = F::Future;

    fn call(
        &mut self,
        call: Diverted<http::Request<B>>,
    ) -> Result<Self::Future, Diverted<http::Request<B>>> {
        self.inner.call(call)
    }

    fn reject(&mut self, request: http::Request<B>) {
        let body = request.into_body();
        if body.is_end_stream() {
            return;
        }
        // What has come already is read now, without waiting: often all of it (the message
        // came with the call). Only a body still waiting for its client costs a task.
        let mut reader = Reader::new(body);
        if reader
            .poll_read(&mut Context::from_waker(Waker::noop()))
            .is_ready()
        {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Some(slot) = Slot::take(&self.reading, DrainRejected::MOST_AT_ONCE) else {
            return;
        };
        runtime.spawn(async move {
            let _slot = slot;
            let read = std::future::poll_fn(|cx| reader.poll_read(cx));
            let _ = tokio::time::timeout(DrainRejected::MOST_TIME, read).await;
        });
    }
}

/// Read a body a fallback took and then refuses, as [`DrainRejected`] reads a rejected call's,
/// in the refusal's own future: what has come at once, the rest for at most
/// [`DrainRejected::MOST_TIME`].
#[cfg(feature = "fallback")]
pub(crate) async fn read_refused<B: Body>(body: B) {
    let mut reader = Reader::new(body);
    let read = std::future::poll_fn(|cx| reader.poll_read(cx));
    let _ = tokio::time::timeout(DrainRejected::MOST_TIME, read).await;
}

/// The most frames read of one body (a gRPC call's has two): a body that answers every poll
/// with a frame at once would otherwise keep its reader from ever waiting, and its time bound
/// from being checked.
const MOST_FRAMES: usize = 256;

/// A rejected call's body being read.
struct Reader<B> {
    body: Pin<Box<B>>,
    bytes: usize,
    frames: usize,
}

impl<B: Body> Reader<B> {
    fn new(body: B) -> Self {
        Self {
            body: Box::pin(body),
            bytes: 0,
            frames: 0,
        }
    }

    /// Read until the body ends, fails, has to wait (`Pending`), or a bound is passed.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let Some(Ok(frame)) = ready!(self.body.as_mut().poll_frame(cx)) else {
                return Poll::Ready(());
            };
            self.frames += 1;
            if let Some(data) = frame.data_ref() {
                self.bytes = self.bytes.saturating_add(data.remaining());
            }
            if self.bytes > DrainRejected::MOST_BYTES || self.frames >= MOST_FRAMES {
                return Poll::Ready(());
            }
        }
    }
}

/// One of the layer's reading slots, given back when dropped.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(count: &Arc<AtomicUsize>, most: usize) -> Option<Self> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < most).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(count.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::pin::Pin;
    use std::sync::atomic::AtomicBool;
    use std::task::{Context, Poll};

    use bytes::Bytes;
    use http_body::Frame;
    use tokio::sync::mpsc;

    /// A body fed by a channel, that says how much of it was read and when it is dropped.
    struct Fed {
        rx: mpsc::Receiver<Bytes>,
        read: Arc<AtomicUsize>,
        dropped: Arc<AtomicBool>,
        ended: bool,
    }

    impl Body for Fed {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(b)) => {
                    self.read.fetch_add(b.len(), Ordering::SeqCst);
                    Poll::Ready(Some(Ok(Frame::data(b))))
                }
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            }
        }

        fn is_end_stream(&self) -> bool {
            self.ended
        }
    }

    impl Drop for Fed {
        fn drop(&mut self) {
            self.dropped.store(true, Ordering::SeqCst);
        }
    }

    struct Probe {
        tx: mpsc::Sender<Bytes>,
        read: Arc<AtomicUsize>,
        dropped: Arc<AtomicBool>,
    }

    fn fed(ended: bool) -> (http::Request<Fed>, Probe) {
        let (tx, rx) = mpsc::channel(64);
        let (read, dropped) = (Arc::default(), Arc::new(AtomicBool::new(false)));
        let body = Fed {
            rx,
            read: Arc::clone(&read),
            dropped: Arc::clone(&dropped),
            ended,
        };
        (http::Request::new(body), Probe { tx, read, dropped })
    }

    fn reject(d: &mut DrainRejected, req: http::Request<Fed>) {
        Fallback::<_, (), ()>::reject(d, req);
    }

    /// Let the spawned readers run until none can go on: paused time moves on only when
    /// every task waits.
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_rejected_body_is_read_to_its_end_and_then_dropped() {
        let mut d = DrainRejected::new();
        let (req, probe) = fed(false);
        reject(&mut d, req);
        settle().await;
        assert_eq!(d.reading(), 1);
        for _ in 0..3 {
            probe.tx.send(Bytes::from_static(b"hello")).await.unwrap();
        }
        settle().await;
        assert_eq!(probe.read.load(Ordering::SeqCst), 15);
        assert!(!probe.dropped.load(Ordering::SeqCst));
        drop(probe.tx);
        settle().await;
        assert!(probe.dropped.load(Ordering::SeqCst));
        assert_eq!(d.reading(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_never_ends_is_dropped_after_the_most_time() {
        let mut d = DrainRejected::new();
        let (req, probe) = fed(false);
        reject(&mut d, req);
        tokio::time::sleep(DrainRejected::MOST_TIME - Duration::from_millis(1)).await;
        assert!(!probe.dropped.load(Ordering::SeqCst));
        tokio::time::sleep(Duration::from_millis(2)).await;
        settle().await;
        assert!(probe.dropped.load(Ordering::SeqCst));
        assert_eq!(d.reading(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn reading_stops_past_the_most_bytes() {
        let mut d = DrainRejected::new();
        let (req, probe) = fed(false);
        reject(&mut d, req);
        let chunk = Bytes::from(vec![0u8; 16 * 1024]);
        for _ in 0..5 {
            probe.tx.send(chunk.clone()).await.unwrap();
            settle().await;
        }
        assert!(probe.dropped.load(Ordering::SeqCst));
        assert_eq!(probe.read.load(Ordering::SeqCst), 80 * 1024);
        assert_eq!(d.reading(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_at_its_end_is_dropped_at_once() {
        let mut d = DrainRejected::new();
        let (req, probe) = fed(true);
        reject(&mut d, req);
        assert!(probe.dropped.load(Ordering::SeqCst));
        assert_eq!(d.reading(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_most_at_once_a_body_is_dropped_and_a_freed_slot_is_taken_again() {
        let mut d = DrainRejected::new();
        let mut clone = d.clone();
        let mut probes = Vec::new();
        for _ in 0..DrainRejected::MOST_AT_ONCE {
            let (req, probe) = fed(false);
            reject(&mut clone, req);
            probes.push(probe);
        }
        settle().await;
        assert_eq!(d.reading(), DrainRejected::MOST_AT_ONCE);
        let (req, over) = fed(false);
        reject(&mut d, req);
        assert!(over.dropped.load(Ordering::SeqCst));

        drop(probes.pop().unwrap().tx);
        settle().await;
        assert_eq!(d.reading(), DrainRejected::MOST_AT_ONCE - 1);
        let (req, again) = fed(false);
        reject(&mut d, req);
        settle().await;
        assert!(!again.dropped.load(Ordering::SeqCst));
        assert_eq!(d.reading(), DrainRejected::MOST_AT_ONCE);
    }

    #[test]
    fn what_has_come_is_read_at_once_without_a_task() {
        let mut d = DrainRejected::new();
        let (req, probe) = fed(false);
        probe.tx.try_send(Bytes::from_static(b"order 7")).unwrap();
        drop(probe.tx);
        // No runtime: nothing could be spawned.
        reject(&mut d, req);
        assert_eq!(probe.read.load(Ordering::SeqCst), 7);
        assert!(probe.dropped.load(Ordering::SeqCst));
        assert_eq!(d.reading(), 0);
    }

    /// A body with a frame for every poll, never ending.
    struct Endless(Arc<AtomicUsize>);

    impl Body for Endless {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Poll::Ready(Some(Ok(Frame::data(Bytes::new()))))
        }
    }

    #[test]
    fn a_body_that_never_waits_is_dropped_after_the_most_frames() {
        let mut d = DrainRejected::new();
        let polled = Arc::new(AtomicUsize::new(0));
        let req = http::Request::new(Endless(polled.clone()));
        Fallback::<_, (), ()>::reject(&mut d, req);
        assert_eq!(polled.load(Ordering::SeqCst), MOST_FRAMES);
        assert_eq!(d.reading(), 0);
    }

    #[test]
    fn without_a_runtime_the_body_is_dropped() {
        let mut d = DrainRejected::new();
        let (req, probe) = fed(false);
        reject(&mut d, req);
        assert!(probe.dropped.load(Ordering::SeqCst));
        assert_eq!(d.reading(), 0);
    }
}
