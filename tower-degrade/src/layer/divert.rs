//! Answering a call its class does not admit: the fallback, or a degraded answer.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::class::{ClassId, Route};
use crate::degrader::Shared;
use crate::error::{CachedClaim, Claim, Degraded};
use crate::fallback::{Diverted, Fallback};
use crate::gate::Reason;
use crate::window::{Outcome, shard_index};

/// Send a call its class does not admit to the fallback (counted as degraded), or answer it
/// degraded (counted as rejected) when the fallback has no handler for the route. A call to
/// [`Route::Cached`] the fallback does not take is answered degraded for a
/// `LastGoodLayer` outside the layer to serve its copy: counted as degraded (diverted), as
/// the copy or the miss is counted there.
pub(super) fn divert<F, Req, Res, E>(
    shared: &Shared,
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
                    let claim = CachedClaim::new(
                        shared.service.clone(),
                        name.clone(),
                        shared.gauges[idx].unclaimed_logged.clone(),
                        unclaimed,
                    );
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

/// Said once per class of a call diverted to `cached` that no `LastGoodLayer` claimed
/// ([`CachedClaim`]): answered with the layer's `503` alone, counted as a `miss` in
/// `degrade_fallback_cached_total`.
#[cold]
fn unclaimed(claim: &Claim) {
    #[cfg(feature = "fallback")]
    crate::fallback::count_cached(&claim.service, &claim.class, "miss");
    if !claim.logged.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            service = %claim.service, class = %claim.class,
            "a call diverted to `cached` was answered 503 with no copy looked for: no \
             `LastGoodLayer` outside the degrade layer saw it, or it is a call the layer \
             does not serve from a copy (not a GET or HEAD; a read with `Authorization` or \
             `Cookie` its `vary` does not name; a range; a key over `MAX_CACHE_KEY_BYTES`): \
             put the layer around the class's reads, or give the class another fallback route"
        );
    }
}
