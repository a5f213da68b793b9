//! Answering a call its class does not admit: the fallback, or a degraded answer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::class::{ClassId, Route};
use crate::degrader::Shared;
use crate::error::Degraded;
use crate::fallback::{Diverted, Fallback};
use crate::gate::Reason;
use crate::window::{Outcome, shard_index};

/// Send a call its class does not admit to the fallback (counted as degraded), or answer it
/// degraded (counted as rejected) when the fallback has no handler for the route. A call to
/// [`Route::Cached`] the fallback does not take is answered degraded for a
/// `LastGoodLayer` outside the layer to serve its copy: counted as degraded (diverted), as
/// the copy or the miss is counted there.
pub(super) fn divert<F, Req, Res, E>(
    shared: &Arc<Shared>,
    fallback: &mut F,
    req: Req,
    idx: usize,
    reason: Reason,
    route: Route,
    retry_after: Option<Duration>,
) -> Result<F::Future, Degraded>
where
    F: Fallback<Req, Res, E>,
{
    let shard = &shared.shards[shard_index(shared.shard_mask)];
    if reason == Reason::Overload {
        shard.overloaded(idx);
    }
    let name = shared.names[idx].clone();
    if route != Route::Reject {
        let call = Diverted::new(
            req,
            ClassId(idx as u16),
            shared.service.clone(),
            name.clone(),
            route,
            reason,
            retry_after,
        );
        match fallback.call(call) {
            Ok(fut) => {
                shard.record(idx, Outcome::Degraded, Duration::ZERO);
                return Ok(fut);
            }
            Err(call) => {
                fallback.reject(call.into_request());
                if route == Route::Cached {
                    shard.record(idx, Outcome::Degraded, Duration::ZERO);
                    let claim = CachedClaim(Arc::new(Claim {
                        claimed: AtomicBool::new(false),
                        shared: shared.clone(),
                        idx,
                    }));
                    return Err(Degraded::new(
                        shared.service.clone(),
                        name,
                        reason,
                        route,
                        retry_after,
                    )
                    .with_cached_claim(claim));
                }
                unserved(shared, idx, route);
            }
        }
    } else {
        fallback.reject(req);
    }
    shard.record(idx, Outcome::Rejected, Duration::ZERO);
    tracing::debug!(
        service = %shared.service, class = %name, reason = %reason, route = %route,
        "call not admitted"
    );
    Err(Degraded::new(
        shared.service.clone(),
        name,
        reason,
        route,
        retry_after,
    ))
}

/// Say once per class that its route has nobody to serve it on this layer (a class configured
/// with `fallback_route(Route::Service)` on a layer without `fallback_service`, say): its
/// diverted calls are rejected instead.
#[cold]
fn unserved(shared: &Shared, idx: usize, route: Route) {
    if !shared.gauges[idx]
        .unserved_route_logged
        .swap(true, std::sync::atomic::Ordering::Relaxed)
    {
        tracing::warn!(
            service = %shared.service, class = %shared.names[idx], route = %route,
            "the class diverts calls to a route nothing behind this layer serves (a \
             `FallbackRouter` given with `fallback_with` keeps `delayed_retry`, `spool` and \
             `manual_review`, and `batch_merge` for a class given a `batch_merge`; `service` \
             needs a fallback service, `DegradeLayer::fallback_service` or the router's): \
             they are rejected"
        );
    }
}

/// The answer to a call diverted to [`Route::Cached`], in its [`Degraded`] (and every clone of
/// it: the error, the response's extension): a `LastGoodLayer` outside the layer claims it
/// when it looks for the call's copy. One that no `LastGoodLayer` claimed (none outside the
/// layer, or the call is not a read, which is never served from a copy) was answered with the
/// layer's `503` alone: counted as a `miss` in `degrade_fallback_cached_total`, and said once
/// per class, as a route nobody serves is.
#[derive(Clone)]
pub(crate) struct CachedClaim(Arc<Claim>);

struct Claim {
    claimed: AtomicBool,
    shared: Arc<Shared>,
    idx: usize,
}

impl CachedClaim {
    #[cfg(feature = "fallback")]
    pub(crate) fn claim(&self) {
        self.0.claimed.store(true, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for CachedClaim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedClaim")
            .field("claimed", &self.0.claimed.load(Ordering::Relaxed))
            .finish()
    }
}

/// Not part of what a [`Degraded`] says: any two are alike.
impl PartialEq for CachedClaim {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for CachedClaim {}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.claimed.load(Ordering::Relaxed) {
            return;
        }
        let (shared, idx) = (&*self.shared, self.idx);
        #[cfg(feature = "fallback")]
        crate::fallback::count_cached(&shared.service, &shared.names[idx], "miss");
        if !shared.gauges[idx]
            .unserved_route_logged
            .swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                service = %shared.service, class = %shared.names[idx],
                "a call diverted to `cached` was answered 503 with no copy looked for: no \
                 `LastGoodLayer` outside the degrade layer saw it, or it is not a GET or HEAD \
                 read (only reads are served from copies): add the layer around the class's \
                 routes, or give the class another fallback route"
            );
        }
    }
}
