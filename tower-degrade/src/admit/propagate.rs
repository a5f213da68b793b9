//! Priority propagation: a payment callback stays gold through the call chain.
//!
//! While a call's inner future is polled, [`current_tier`] tells its tier (a thread-local set
//! around each poll, about a nanosecond). [`PropagatePriorityLayer`] wraps an outbound client
//! (HTTP or gRPC: both are `http::Request`s) and writes that tier into [`PRIORITY_HEADER`]
//! (`x-degrade-priority: gold`); on the server, [`HttpClassifierBuilder::upstream_priority`](
//! crate::classify::HttpClassifierBuilder::upstream_priority) reads it, capped, for admission.
//!
//! Requests made from a task spawned off the handler are not polled inside the call: set the
//! tier on them explicitly (a [`Tier`] in the request's extensions wins over the thread-local).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use http::HeaderValue;
use http::header::HeaderName;
use tower::{Layer, Service};

use crate::class::Tier;

/// The header that carries a call's tier downstream.
pub const PRIORITY_HEADER: &str = "x-degrade-priority";

const NONE: u8 = u8::MAX;

thread_local! {
    static CURRENT: Cell<u8> = const { Cell::new(NONE) };
}

/// Whether calls set [`current_tier`] while polled: off until something reads it, so that the
/// closed path of a process that does not propagate priority pays one relaxed load for it.
static TRACKED: AtomicBool = AtomicBool::new(false);

/// Make every call set [`current_tier`] while it is polled. Creating a
/// [`PropagatePriorityLayer`] does it; call this to read `current_tier` without one.
pub fn track_current_tier() {
    TRACKED.store(true, Ordering::Relaxed);
}

fn to_bits(t: Tier) -> u8 {
    t.index() as u8
}

fn from_bits(b: u8) -> Option<Tier> {
    match b {
        0 => Some(Tier::Gold),
        1 => Some(Tier::Silver),
        2 => Some(Tier::Bronze),
        _ => None,
    }
}

/// The tier of the call whose future is being polled on this thread, if any (once
/// [`track_current_tier`] was called or a [`PropagatePriorityLayer`] created).
pub fn current_tier() -> Option<Tier> {
    from_bits(CURRENT.with(Cell::get))
}

/// Sets the current tier for the duration of one poll (when tracked), restoring the previous
/// on drop.
#[derive(Debug)]
pub(crate) struct TierScope(Option<u8>);

impl TierScope {
    #[inline]
    pub(crate) fn enter(tier: impl FnOnce() -> Tier) -> Self {
        if !TRACKED.load(Ordering::Relaxed) {
            return Self(None);
        }
        Self(Some(CURRENT.with(|c| c.replace(to_bits(tier())))))
    }
}

impl Drop for TierScope {
    #[inline]
    fn drop(&mut self) {
        if let Some(prev) = self.0 {
            CURRENT.with(|c| c.set(prev));
        }
    }
}

/// Adds the calling request's tier to outbound requests (`x-degrade-priority` by default), for
/// [`HttpClassifierBuilder::upstream_priority`](crate::classify::HttpClassifierBuilder::upstream_priority)
/// on the other side; see [`current_tier`] for where the tier comes from.
///
/// ```
/// use tower::ServiceBuilder;
/// use tower_degrade::admit::PropagatePriorityLayer;
///
/// let client = ServiceBuilder::new()
///     .layer(PropagatePriorityLayer::new())
///     .service_fn(|req: http::Request<()>| async move {
///         Ok::<_, std::convert::Infallible>(req.headers().get("x-degrade-priority").cloned())
///     });
/// # drop(client);
/// ```
#[derive(Debug, Clone)]
pub struct PropagatePriorityLayer {
    header: HeaderName,
}

impl PropagatePriorityLayer {
    /// Write [`PRIORITY_HEADER`].
    pub fn new() -> Self {
        track_current_tier();
        Self {
            header: HeaderName::from_static(PRIORITY_HEADER),
        }
    }

    /// Write another header.
    pub fn header(mut self, name: HeaderName) -> Self {
        self.header = name;
        self
    }
}

impl Default for PropagatePriorityLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Layer<S> for PropagatePriorityLayer {
    type Service = PropagatePriority<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PropagatePriority {
            inner,
            header: self.header.clone(),
        }
    }
}

/// The service made by [`PropagatePriorityLayer`].
#[derive(Debug, Clone)]
pub struct PropagatePriority<S> {
    inner: S,
    header: HeaderName,
}

impl<S, B> Service<http::Request<B>> for PropagatePriority<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let tier = req
            .extensions()
            .get::<Tier>()
            .copied()
            .or_else(current_tier);
        if let Some(t) = tier {
            req.headers_mut()
                .insert(self.header.clone(), HeaderValue::from_static(t.as_str()));
        }
        self.inner.call(req)
    }
}

/// Parse a propagated tier; `None` for anything but `gold`, `silver` or `bronze`.
pub(crate) fn parse_tier(v: &[u8]) -> Option<Tier> {
    match v {
        b"gold" => Some(Tier::Gold),
        b"silver" => Some(Tier::Silver),
        b"bronze" => Some(Tier::Bronze),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scope_sets_and_restores_the_tier() {
        track_current_tier();
        assert_eq!(current_tier(), None);
        {
            let _outer = TierScope::enter(|| Tier::Gold);
            assert_eq!(current_tier(), Some(Tier::Gold));
            {
                let _inner = TierScope::enter(|| Tier::Bronze);
                assert_eq!(current_tier(), Some(Tier::Bronze));
            }
            assert_eq!(current_tier(), Some(Tier::Gold));
        }
        assert_eq!(current_tier(), None);
        assert_eq!(parse_tier(b"gold"), Some(Tier::Gold));
        assert_eq!(parse_tier(b"GOLD!"), None);
    }
}
