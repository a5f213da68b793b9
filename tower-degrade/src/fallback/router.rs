//! The [`FallbackRouter`]: dispatches each diverted call on its route, keeps what is to be
//! replayed, and answers `202 Accepted` only once the task is durably stored.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::Body;
use pin_project_lite::pin_project;
use tokio::sync::Notify;

use super::batch::{BatchMerge, Batcher};
use super::capture::{Capture, CaptureError, InvalidKey};
use super::record::{HttpRequest, Payload, Queue, Task, TaskId};
use super::replay::Replay;
use super::review::ManualReview;
use super::schedule::{Backfill, Clock, RetryPolicy};
use super::shared::{Kept, KeptCall, RouterShared, Stored};
use super::store::Store;
use super::worker::{FallbackWorker, Settings};
use super::{Diverted, Fallback, FallbackService, NoFallback};
use crate::class::{Route, Tier};
use crate::degrader::Degrader;
use crate::error::{BoxError, ConfigError, Degraded};
use crate::every::{Every, LOG_EVERY};
use crate::gate::Reason;
use crate::protocol::{degraded_response, kept_response, key_reused_response};

/// The longest [`FallbackRouterBuilder::period`]: a due task waits for the worker's next look
/// at most this long.
const MAX_PERIOD: Duration = Duration::from_secs(60);

/// Serves the routes that keep calls (`delayed_retry`, `spool`, `manual_review`,
/// `batch_merge`), and hands [`Route::Service`] to a custom service. Give it to
/// [`DegradeLayer::fallback_with`](crate::DegradeLayer::fallback_with); spawn its
/// [`FallbackWorker`], which replays what it kept.
///
/// A kept call is captured ([`Capture`]), stored with an id and an idempotency key, and only
/// then answered `202 Accepted` with `x-degrade-task-id` (gRPC: see
/// [`TASK_ID_HEADER`](crate::protocol::TASK_ID_HEADER)). A call that cannot be kept gets
/// `413` with `x-degrade-reason: too_large` (its body or kept headers over the limit), `400`
/// with `malformed` (a gRPC body that is not length-prefixed messages) or the reject answer
/// with `not_kept` (the store full or failing, or a request to switch protocols, such as a
/// WebSocket's upgrade, which no replay can serve): never a 202. A client that sends
/// the same idempotency key again while the task is kept gets the same task id, and nothing
/// is kept twice (with a Redis store, also across the instances sharing it); the same
/// key on a different request gets `422` (`key_reused`). [`Route::Cached`] is served by [`LastGoodLayer`](super::LastGoodLayer).
///
/// ```
/// use tower_degrade::{ClassConfig, Degrader, Route};
/// use tower_degrade::fallback::{FallbackRouter, MemoryStore, Replayed, replay_fn};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_degrade::BoxError> {
/// let degrader = Degrader::builder("shop")
///     .class(ClassConfig::bronze("browse_log").fallback_route(Route::Spool))
///     .build()?;
/// let (router, worker) = FallbackRouter::builder(&degrader)
///     .store(MemoryStore::default())
///     .replay(replay_fn(|_task, _attempt| async { Replayed::Done }))
///     .build()?;
/// tokio::spawn(worker.run());
/// # drop(router);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct FallbackRouter<T = NoFallback> {
    shared: Arc<RouterShared>,
    service: T,
}

/// Builds a [`FallbackRouter`] and its [`FallbackWorker`].
#[must_use = "a setting or builder does nothing until it is passed on or built"]
pub struct FallbackRouterBuilder<T = NoFallback> {
    degrader: Degrader,
    store: Option<Arc<dyn Store>>,
    capture: Capture,
    retry: RetryPolicy,
    batches: HashMap<String, Arc<dyn Batcher>>,
    /// A class given a second `batch_merge` (refused when built).
    merged_twice: Option<String>,
    /// [`service`](Self::service) was given: it serves `service`, and `batch_merge` for a
    /// class with no `batch_merge` of its own.
    serves: bool,
    replay: Option<Arc<dyn Replay>>,
    /// Per tier, gold, silver, bronze: the share of the store new tasks may fill.
    shares: [f64; 3],
    service: T,
    worker: Settings,
}

/// Per tier, gold, silver, bronze: the share of the store new tasks may fill by default
/// ([`FallbackRouterBuilder::store_share`]).
const DEFAULT_SHARES: [f64; 3] = [1.0, 0.9, 0.8];

impl<T> fmt::Debug for FallbackRouterBuilder<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FallbackRouterBuilder")
            .field("capture", &self.capture)
            .field("retry", &self.retry)
            .field("worker", &self.worker)
            .finish_non_exhaustive()
    }
}

impl FallbackRouter {
    /// Start building a router for the classes of `degrader`.
    pub fn builder(degrader: &Degrader) -> FallbackRouterBuilder {
        FallbackRouterBuilder {
            degrader: degrader.clone(),
            store: None,
            capture: Capture::new(),
            retry: RetryPolicy::default(),
            batches: HashMap::new(),
            merged_twice: None,
            serves: false,
            replay: None,
            shares: DEFAULT_SHARES,
            service: NoFallback,
            worker: Settings {
                backfill: Backfill::default(),
                period: Duration::from_millis(100),
                concurrency: 32,
                replay_timeout: Duration::from_secs(30),
            },
        }
    }
}

impl<T> FallbackRouter<T> {
    /// The manual-review queue: list, show, requeue, drop.
    pub fn review(&self) -> ManualReview {
        ManualReview::new(self.shared.clone())
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.shared.store
    }
}

impl<T> FallbackRouterBuilder<T> {
    /// Where kept tasks are stored (required). Use
    /// [`EmbeddedStore`](super::store::EmbeddedStore) for durability.
    pub fn store(mut self, store: impl Store) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    /// A store shared with something else (a second router, a test).
    pub fn shared_store(mut self, store: Arc<dyn Store>) -> Self {
        self.store = Some(store);
        self
    }

    /// What of a request is kept (default: [`Capture::new`]).
    pub fn capture(mut self, capture: Capture) -> Self {
        self.capture = capture;
        self
    }

    /// The `delayed_retry` schedule (default: [`RetryPolicy::default`]).
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// When and how fast spooled tasks are backfilled (default: [`Backfill::default`]).
    pub fn backfill(mut self, backfill: Backfill) -> Self {
        self.worker.backfill = backfill;
        self
    }

    /// Serve `class`'s `batch_merge` route with `batch` (one per class: a second is an error
    /// when the router is built).
    pub fn batch_merge<V>(mut self, class: &str, batch: BatchMerge<V>) -> Self
    where
        V: serde::Serialize + serde::de::DeserializeOwned + Clone + Send + Sync + 'static,
    {
        let batcher = Arc::new(batch.into_batcher(class));
        if self.batches.insert(class.to_owned(), batcher).is_some() {
            self.merged_twice.get_or_insert_with(|| class.to_owned());
        }
        self
    }

    /// What replays kept tasks (required): [`HttpReplay`](super::HttpReplay) around the
    /// application without the degrade layer, or [`replay_fn`](super::replay_fn). Required
    /// also where every class keeps its calls with `batch_merge`: a policy's
    /// `fallback(route)` can divert any class's calls to a route that replays them.
    pub fn replay(mut self, replay: impl Replay) -> Self {
        self.replay = Some(Arc::new(replay));
        self
    }

    /// How much of the store the new tasks of `tier`'s classes may fill, a share of its
    /// capacity in (0, 1] (default: gold 1.0, silver 0.9, bronze 0.8; the whole store for the
    /// first tier the degrader has classes of, which has no higher one to keep room for:
    /// silver where there is no gold class, with the default class too). Past it a call of that
    /// tier is not kept (answered `not_kept`, as by a full store), so that a bronze class
    /// spooling through a long outage, or clients sending their own calls to manual review,
    /// leave room for the payments a gold class keeps. Tasks already kept are never moved
    /// out, and a task moved between queues (a retry to manual review) takes no new room.
    /// Only where the store says how full it is ([`Store::usage`]: the bundled stores do);
    /// the share is checked against its count before each commit (a moment old for a store
    /// several instances share), so calls stored at once can pass it by their number, never
    /// the capacity.
    pub fn store_share(mut self, tier: Tier, share: f64) -> Self {
        self.shares[tier.index()] = share;
        self
    }

    /// How often the worker looks for due tasks when nothing wakes it (default 100 ms; at
    /// most a minute).
    pub fn period(mut self, period: Duration) -> Self {
        self.worker.period = period;
        self
    }

    /// How long one replay may take before it counts as failed (default 30 s). With a Redis
    /// store, a replay running longer than its `claim_timeout` keeps its task as long as the
    /// worker goes on stepping (the worker heartbeats what it holds when it steps).
    pub fn replay_timeout(mut self, d: Duration) -> Self {
        self.worker.replay_timeout = d;
        self
    }

    /// How many replays the worker runs at once (default 32).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.worker.concurrency = n;
        self
    }

    /// Serve [`Route::Service`] with a tower service that receives the [`Diverted`] call
    /// (as [`DegradeLayer::fallback_service`](crate::DegradeLayer::fallback_service)).
    pub fn service<S>(self, service: S) -> FallbackRouterBuilder<FallbackService<S>> {
        FallbackRouterBuilder {
            degrader: self.degrader,
            store: self.store,
            capture: self.capture,
            retry: self.retry,
            batches: self.batches,
            merged_twice: self.merged_twice,
            serves: true,
            replay: self.replay,
            shares: self.shares,
            service: FallbackService(service),
            worker: self.worker,
        }
    }

    /// The router and its worker. Fails when the store or the replay target is missing, or a
    /// batch-merge class is not configured.
    pub fn build(self) -> Result<(FallbackRouter<T>, FallbackWorker), ConfigError> {
        let missing = |field: &'static str, what: &str| ConfigError::InvalidValue {
            field,
            reason: format!("is required: {what}"),
        };
        let store = self.store.ok_or_else(|| {
            missing(
                "fallback.store",
                "where kept tasks are stored (EmbeddedStore for durability)",
            )
        })?;
        let replay = self.replay.ok_or_else(|| {
            missing(
                "fallback.replay",
                "what replays kept tasks (HttpReplay around the app without the degrade \
                 layer); also with batch_merge alone, as a policy can divert any class's calls \
                 to a route that replays them",
            )
        })?;
        if let Some(class) = self.merged_twice {
            return Err(ConfigError::InvalidValue {
                field: "fallback.batch_merge",
                reason: format!(
                    "class `{class}` is given two: one batch_merge a class (the second would \
                     replace the first)"
                ),
            });
        }
        for (class, batcher) in &self.batches {
            self.degrader.registry().require(class)?;
            batcher.validate()?;
        }
        // A class whose configured route this router cannot serve (a configuration file's
        // `fallback = "batch_merge"` with no `batch_merge` in code): said now, not at its
        // first diverted call. (A warning: another router, or a layer's own fallback
        // service, may serve it.)
        for (_, class) in self.degrader.registry().iter() {
            let (name, route) = (class.name(), class.route());
            let unserved = match route {
                Route::BatchMerge => !self.batches.contains_key(name) && !self.serves,
                Route::Service => !self.serves,
                _ => false,
            };
            if unserved {
                tracing::warn!(service = %self.degrader.service(), class = %name, route = %route,
                    "the class's fallback route is one this router does not serve (`batch_merge` \
                     needs `FallbackRouterBuilder::batch_merge` for the class, `service` a \
                     fallback service): its diverted calls through it are answered 503");
            }
        }
        for class in replay.classes() {
            if self.degrader.registry().get(class).is_none() {
                return Err(ConfigError::InvalidValue {
                    field: "fallback.replay",
                    reason: format!("names class `{class}`, which the degrader does not have"),
                });
            }
        }
        if self.worker.concurrency == 0 {
            return Err(ConfigError::InvalidValue {
                field: "fallback.concurrency",
                reason: "must be at least 1".into(),
            });
        }
        if self.worker.period.is_zero() || self.worker.period > MAX_PERIOD {
            return Err(ConfigError::InvalidValue {
                field: "fallback.period",
                reason: format!(
                    "must be more than zero and at most {MAX_PERIOD:?} (the worker looks for \
                     due tasks this often), not {:?}",
                    self.worker.period
                ),
            });
        }
        if self.worker.replay_timeout.is_zero() {
            return Err(ConfigError::InvalidValue {
                field: "fallback.replay_timeout",
                reason: "must be more than zero: every replay would time out".into(),
            });
        }
        if let Some(claim) = store.claim_timeout()
            && self.worker.period * 3 > claim
        {
            // The worker heartbeats the tasks it holds when it steps: stepping less often
            // than a third of the claim timeout, another instance takes its tasks over and
            // replays them too.
            return Err(ConfigError::InvalidValue {
                field: "fallback.period",
                reason: format!(
                    "must be at most a third of the {} store's claim_timeout ({claim:?}), not \
                     {:?}: the worker heartbeats its tasks when it steps",
                    store.kind(),
                    self.worker.period
                ),
            });
        }
        for tier in [Tier::Gold, Tier::Silver, Tier::Bronze] {
            let share = self.shares[tier.index()];
            if !(share > 0.0 && share <= 1.0) {
                return Err(ConfigError::InvalidValue {
                    field: "fallback.store_share",
                    reason: format!(
                        "{tier}'s share of the store must be more than 0 and at most 1, not \
                         {share}"
                    ),
                });
            }
        }
        // The first tier the degrader has (`Tier` orders gold first) has nobody to keep room
        // for: the whole store.
        let registry = self.degrader.registry();
        let first = registry.iter().map(|(_, c)| c.tier()).min();
        let shares = registry
            .iter()
            .map(|(_, c)| {
                let share = if Some(c.tier()) == first {
                    1.0
                } else {
                    self.shares[c.tier().index()]
                };
                (c.name().to_owned(), (c.tier(), share))
            })
            .collect();
        self.retry.validate()?;
        self.capture.validate()?;
        self.worker.backfill.validate()?;
        crate::metrics::describe_fallback();
        let shared = Arc::new(RouterShared {
            // The degrader's own: a diverted call carries it, and is checked against it.
            service: self.degrader.shared.service.clone(),
            store,
            capture: self.capture,
            retry: self.retry,
            batches: self.batches,
            wake: Notify::new(),
            clock: Clock::new(),
            retry_after: Duration::from_secs(1),
            storing: Default::default(),
            reviewing: Default::default(),
            not_kept: Every::new(LOG_EVERY),
            to_review: Every::new(LOG_EVERY),
            shares,
            foreign_said: Default::default(),
        });
        let worker = FallbackWorker::new(shared.clone(), self.degrader, replay, self.worker);
        Ok((
            FallbackRouter {
                shared,
                service: self.service,
            },
            worker,
        ))
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, Res, E> {
        // Keeping the call (boxed: the diverted path captures the body and waits for the
        // store; the primary path never builds this future).
        Keep {
            fut: Pin<Box<dyn Future<Output = Result<Res, E>> + Send>>,
        },
        Service {
            #[pin]
            fut: F,
        },
    }
}

pin_project! {
    /// The response future of a [`FallbackRouter`]: a kept call (capture, store, answer) or
    /// the custom service's future.
    pub struct RouterFuture<F, Res, E> {
        #[pin]
        kind: Kind<F, Res, E>,
    }
}

impl<F, Res, E> RouterFuture<F, Res, E> {
    fn keep(fut: impl Future<Output = Result<Res, E>> + Send + 'static) -> Self {
        Self {
            kind: Kind::Keep { fut: Box::pin(fut) },
        }
    }

    fn service(fut: F) -> Self {
        Self {
            kind: Kind::Service { fut },
        }
    }
}

impl<F, Res, E> fmt::Debug for RouterFuture<F, Res, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouterFuture").finish_non_exhaustive()
    }
}

impl<F, Res, E> Future for RouterFuture<F, Res, E>
where
    F: Future<Output = Result<Res, E>>,
{
    type Output = Result<Res, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Keep { fut } => fut.as_mut().poll(cx),
            KindProj::Service { fut } => fut.poll(cx),
        }
    }
}

impl<T, B, RB, E> Fallback<http::Request<B>, http::Response<RB>, E> for FallbackRouter<T>
where
    T: Fallback<http::Request<B>, http::Response<RB>, E>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    RB: Default + Send + 'static,
    E: Send + 'static,
{
    type Future = RouterFuture<T::Future, http::Response<RB>, E>;

    fn call(
        &mut self,
        call: Diverted<http::Request<B>>,
    ) -> Result<Self::Future, Diverted<http::Request<B>>> {
        match call.route() {
            Route::DelayedRetry | Route::Spool | Route::ManualReview => {
                Ok(RouterFuture::keep(keep(self.shared.clone(), call)))
            }
            Route::BatchMerge if self.shared.batches.contains_key(call.class_name()) => {
                Ok(RouterFuture::keep(keep(self.shared.clone(), call)))
            }
            _ => self.service.call(call).map(RouterFuture::service),
        }
    }

    fn reject(&mut self, request: http::Request<B>) {
        self.service.reject(request);
    }
}

/// Whether the request asks to switch to another protocol on its connection: a WebSocket's
/// `Upgrade: websocket` (any upgrade but to `h2c`, which a server may ignore and answer the
/// request itself, as curl's `--http2` asks over plain HTTP) or a `CONNECT` (HTTP/2's
/// extended CONNECT for WebSockets among them).
fn switches_protocols(parts: &http::request::Parts) -> bool {
    parts.method == http::Method::CONNECT
        || parts
            .headers
            .get_all(http::header::UPGRADE)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .map(<[u8]>::trim_ascii)
            .any(|p| !p.is_empty() && !p.eq_ignore_ascii_case(b"h2c"))
}

/// [`keep_call`], and a call whose caller goes away before it is stored (its future dropped
/// while the body is read or a refused one drained: a client that cancels its stream, a
/// deadline that passes; or its body failing on its way, left to this guard) counted as
/// `cancelled` in
/// [`FALLBACK_KEPT`](crate::metrics::FALLBACK_KEPT): every call diverted to a keeping route
/// has one result there. (Once captured, its task is stored whether or not the caller waits,
/// and counted so.)
async fn keep<B, RB, E>(
    shared: Arc<RouterShared>,
    call: Diverted<http::Request<B>>,
) -> Result<http::Response<RB>, E>
where
    B: Body,
    B::Error: Into<BoxError>,
    RB: Default,
{
    let mut unanswered = Unanswered(Some(crate::metrics::kept_labels(
        &call.service,
        call.class_name(),
        call.route(),
    )));
    keep_call(shared, call, &mut unanswered).await
}

/// A diverted call's labels in [`FALLBACK_KEPT`](crate::metrics::FALLBACK_KEPT) until its
/// result is counted: `cancelled` when dropped before [`answered`](Self::answered) or
/// [`refused`](Self::refused).
struct Unanswered(Option<[metrics::Label; 3]>);

impl Unanswered {
    /// The call's result is counted elsewhere from here on.
    fn answered(&mut self) {
        self.0 = None;
    }

    /// The call is refused: counted so (once).
    fn refused(&mut self, why: Reason) {
        if let Some(labels) = self.0.take() {
            crate::metrics::count_kept(&labels, why.as_str());
        }
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some(labels) = self.0.take() {
            crate::metrics::count_kept(&labels, "cancelled");
        }
    }
}

/// Capture, store, then answer: `202` (or the gRPC equivalent) once stored, the reject answer
/// otherwise.
async fn keep_call<B, RB, E>(
    shared: Arc<RouterShared>,
    call: Diverted<http::Request<B>>,
    unanswered: &mut Unanswered,
) -> Result<http::Response<RB>, E>
where
    B: Body,
    B::Error: Into<BoxError>,
    RB: Default,
{
    let (route, reason, class) = (call.route(), call.reason(), call.class_name().to_owned());
    let (service, name) = (call.service.clone(), call.name.clone());
    let foreign = !shared.owns(&service);
    let come_back = shared.come_back(call.retry_after());
    let (parts, body) = call.into_request().into_parts();
    let grpc = crate::protocol::is_grpc(&parts.headers);
    let answer = |why: Reason, detail: Option<&str>| {
        // A body too large to keep will not be kept later either: no `Retry-After`.
        let retry = !matches!(why, Reason::TooLarge | Reason::Malformed);
        let retry = retry.then_some(come_back);
        let mut d = Degraded::new(service.clone(), name.clone(), why, route, retry);
        if let Some(detail) = detail {
            // What is wrong with the client's own request: told, so it can be mended.
            d = d.with_detail(detail);
        }
        Ok(degraded_response(d, grpc, false, RB::default()))
    };
    let refuse_for = |unanswered: &mut Unanswered, why: Reason, detail: Option<&str>| {
        // Labelled with the call's service: the router's own but for a call of another
        // degrader (refused), whose class it is.
        unanswered.refused(why);
        answer(why, detail)
    };
    let refuse = |unanswered: &mut Unanswered, why: Reason| refuse_for(unanswered, why, None);
    if foreign {
        // Read, as the layer's `drain_rejected` reads the calls it refuses: over HTTP/2 a
        // message that comes after the answer, unread, counts against the client's connection.
        super::drain::read_refused(body).await;
        return refuse(unanswered, Reason::NotKept);
    }
    if switches_protocols(&parts) {
        // A replay later could hand nobody the connection (and the upgrade headers are not
        // kept: it would be a plain GET the handler refuses): refused, to be tried again.
        tracing::debug!(class = %class, "a diverted protocol upgrade is not kept");
        return refuse(unanswered, Reason::NotKept);
    }
    // A key that is not one: refused, rather than kept under its task id, where each retry
    // of the call would be another task, replayed with another key.
    let key = match shared.capture.key(&parts) {
        Ok(key) => key,
        Err(InvalidKey(why)) => {
            tracing::debug!(class = %class, error = %why,
                "a diverted call's idempotency key is not a valid key");
            super::drain::read_refused(body).await;
            return refuse_for(unanswered, Reason::Malformed, Some(&why));
        }
    };
    // The body first: a client that stalls its body holds no key, so it cannot hold back
    // the other calls with its key (a retry of its own, say).
    let rec = match shared.capture.capture(&parts, body).await {
        Ok(rec) => rec,
        Err(CaptureError::TooLarge(why)) => {
            return refuse_for(unanswered, Reason::TooLarge, Some(&why));
        }
        Err(CaptureError::Malformed(why)) => {
            tracing::debug!(class = %class, error = %why, "a diverted gRPC call is malformed");
            return refuse_for(unanswered, Reason::Malformed, Some(&why));
        }
        Err(CaptureError::Body(e)) => {
            // Its caller went away mid-body (an HTTP/1.1 connection closed, a stream reset):
            // counted `cancelled` by the guard, left armed, as a call dropped while its body
            // is read is; a caller still there is answered `not_kept`.
            tracing::debug!(class = %class, error = %e, "the diverted request's body failed");
            return answer(Reason::NotKept, None);
        }
        Err(CaptureError::Stalled(e)) => {
            tracing::debug!(class = %class, error = %e, "the diverted request's body stalled");
            return refuse(unanswered, Reason::NotKept);
        }
    };
    // Captured: stored whether or not the caller waits, and counted there.
    unanswered.answered();
    match shared.keep((class.clone(), key, route, reason), rec).await {
        Stored::Kept(id) | Stored::Found(Kept { id, same: true }) => {
            let mut res = kept_response(&id.to_string(), route, reason, grpc, RB::default());
            // As the layer's other answers: the service did not answer this call (yet).
            res.extensions_mut()
                .insert(Degraded::new(service, name, reason, route, None));
            Ok(res)
        }
        Stored::Found(kept) => Ok(key_reused_response(
            &kept.id.to_string(),
            grpc,
            RB::default(),
        )),
        // `keep` counted them.
        Stored::Unreadable(why, detail) => answer(why, detail.as_deref()),
        Stored::NotKept => answer(Reason::NotKept, None),
    }
}

impl KeptCall for HttpRequest {
    /// The same key again: the task kept for it (a second call waits while the first stores).
    /// The same request again is the same task; another one under its key is refused rather
    /// than acknowledged and never run.
    fn same(&self, shared: &RouterShared, class: &str, kept: &Payload) -> bool {
        match kept {
            Payload::Http(first) => first.same_call(self),
            // A journaled `batch_merge` delta: the same request is the same delta (the key and
            // value its extractor reads); one it cannot read is not.
            Payload::Bytes(first) => shared.batches.get(class).is_none_or(|b| {
                b.journal(class, None, self)
                    .is_ok_and(|now| matches!(now.payload(), Payload::Bytes(d) if d == first))
            }),
        }
    }

    fn task(
        self,
        shared: &RouterShared,
        class: &str,
        key: Option<String>,
        route: Route,
        reason: Reason,
    ) -> Result<(Queue, Task), (Reason, Option<String>)> {
        let Some(batcher) = shared
            .batches
            .get(class)
            .filter(|_| route == Route::BatchMerge)
        else {
            return Ok(shared.new_task(route, class, key, reason, Payload::Http(self)));
        };
        batcher
            .journal(class, key, &self)
            .map(|task| (Queue::Journal, task))
            .map_err(|(refused, why)| {
                tracing::debug!(class = %class, answer = %refused, error = %why,
                    "batch_merge cannot read the call");
                // The extractor's own words on what is wrong with the call go to its client;
                // a panic's or the journal's are the server's.
                (refused, (refused == Reason::Malformed).then_some(why))
            })
    }
}

/// A task-API payload (JSON): the same task is the same bytes.
impl KeptCall for Vec<u8> {
    fn same(&self, _: &RouterShared, _: &str, kept: &Payload) -> bool {
        matches!(kept, Payload::Bytes(b) if b == self)
    }

    fn task(
        self,
        shared: &RouterShared,
        class: &str,
        key: Option<String>,
        route: Route,
        reason: Reason,
    ) -> Result<(Queue, Task), (Reason, Option<String>)> {
        Ok(shared.new_task(route, class, key, reason, Payload::Bytes(self)))
    }
}

/// What a kept task-API call answers with (see [`TasksBuilder::keep`](crate::task::TasksBuilder::keep)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// The kept task's id.
    pub id: TaskId,
    /// The route that kept it.
    pub route: Route,
}

/// Why the task API could not keep a task its class diverted to `delayed_retry`, `spool` or
/// `manual_review`: something about the task itself, which trying it again as it is will not
/// change (a store that cannot take it is a [`Degraded`] `not_kept` error instead, with a
/// `retry_after`). The error of [`Tasks::run`](crate::task::Tasks::run), boxed: a worker loop
/// tells it apart with `downcast_ref::<CannotKeep>()` and gives the task up, or puts it aside.
///
/// ```
/// use tower_degrade::fallback::{CannotKeep, CannotKeepKind};
/// # fn handle(e: tower_degrade::BoxError) {
/// if let Some(e) = e.downcast_ref::<CannotKeep>() {
///     match e.kind() {
///         // Delivered twice under one key with another value: the first is kept.
///         CannotKeepKind::KeyInUse(first) => tracing::warn!(%first, "{e}"),
///         _ => tracing::error!("{e}"),
///     }
/// }
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CannotKeep {
    class: String,
    route: Route,
    kind: CannotKeepKind,
    detail: String,
}

/// What [`CannotKeep`] found wrong with a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CannotKeepKind {
    /// Its value: it does not serialize as JSON, holds a NaN or an infinity (the error names
    /// the field), is over [`Capture::body_limit`], or would not read back (nested deeper than
    /// 128 levels).
    Value,
    /// Its [idempotency key](crate::task::TasksBuilder::idempotency_key) is not 1 to
    /// [`MAX_KEY_BYTES`](super::MAX_KEY_BYTES) bytes of visible ASCII and spaces (not spaces
    /// alone).
    InvalidKey,
    /// Its idempotency key is kept for another value of the class: the task kept under it.
    KeyInUse(TaskId),
}

impl CannotKeep {
    /// The task's class.
    pub fn class(&self) -> &str {
        &self.class
    }

    /// The route that would have kept it.
    pub fn route(&self) -> Route {
        self.route
    }

    /// What is wrong with it.
    pub fn kind(&self) -> CannotKeepKind {
        self.kind
    }
}

impl fmt::Display for CannotKeep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (class, route, detail) = (&self.class, self.route.as_str(), &self.detail);
        match self.kind {
            CannotKeepKind::Value => write!(
                f,
                "the `{class}` task was diverted to `{route}` but cannot be kept: {detail}"
            ),
            CannotKeepKind::InvalidKey => write!(
                f,
                "the `{class}` task's idempotency key is not 1 to {} bytes of visible ASCII \
                 and spaces (not spaces alone): {detail}",
                super::MAX_KEY_BYTES
            ),
            CannotKeepKind::KeyInUse(id) => write!(
                f,
                "the idempotency key {detail} is kept for another `{class}` task ({id}): not kept"
            ),
        }
    }
}

impl std::error::Error for CannotKeep {}

impl<T> FallbackRouter<T> {
    /// The router without its custom service (the task API keeps calls with it).
    pub(crate) fn clone_without_service(&self) -> FallbackRouter {
        FallbackRouter {
            shared: self.shared.clone(),
            service: NoFallback,
        }
    }

    /// Keep a task-API call diverted to `delayed_retry`, `spool` or `manual_review`: its value
    /// serialized as JSON.
    ///
    /// With `key` (the task's idempotency key, `TasksBuilder::idempotency_key`), the same key
    /// while its task is kept is that task again, and the same key on another value is an
    /// error, as for HTTP calls.
    pub(crate) fn keep_task<Req: serde::Serialize>(
        &self,
        call: Diverted<Req>,
        key: Option<String>,
    ) -> Result<impl Future<Output = Result<Accepted, BoxError>> + Send + 'static, Diverted<Req>>
    {
        let route = call.route();
        if !matches!(
            route,
            Route::DelayedRetry | Route::Spool | Route::ManualReview
        ) {
            return Err(call);
        }
        let (class, reason) = (call.class_name().to_owned(), call.reason());
        let (service, name) = (call.service.clone(), call.name.clone());
        let foreign = !self.shared.owns(&service);
        let come_back = self.shared.come_back(call.retry_after());
        // serde_json writes NaN and the infinities as `null`: kept so, the task would fail
        // every replay and its value be gone.
        // Nor is a value kept that would not read back (nested deeper than JSON readers go), or
        // larger than an HTTP body may be: one commit holds every other call's up meanwhile.
        let limit = self.shared.capture.limit();
        // Each refusal with its result in `FALLBACK_KEPT`: as an HTTP call's.
        let payload = match super::finite::non_finite(call.request()) {
            // Refused below, before the payload is looked at.
            _ if foreign => Ok(Vec::new()),
            Some(what) => Err((Reason::Malformed, format!("{what}, which JSON cannot hold"))),
            None => serde_json::to_vec(call.request())
                .map_err(|e| {
                    let why = format!("it does not serialize as JSON ({e})");
                    (Reason::Malformed, why)
                })
                .and_then(|bytes| {
                    if bytes.len() > limit {
                        let why = format!(
                            "its JSON is {} bytes, over the router's limit of {limit} \
                             (`Capture::body_limit`)",
                            bytes.len()
                        );
                        return Err((Reason::TooLarge, why));
                    }
                    // (`IgnoredAny` skips without `serde_json`'s depth limit: a `Value`.)
                    serde_json::from_slice::<serde_json::Value>(&bytes).map_err(|e| {
                        let why = format!("its JSON would not read back ({e})");
                        (Reason::Malformed, why)
                    })?;
                    Ok(bytes)
                }),
        };
        let shared = self.shared.clone();
        Ok(async move {
            // Every task diverted here has one result: a future dropped before its task is
            // stored (its caller gone) is `cancelled`.
            let labels = crate::metrics::kept_labels(&service, &class, route);
            let mut unanswered = Unanswered(Some(labels));
            let not_kept = |why: Reason| -> BoxError {
                Box::new(Degraded::new(
                    service.clone(),
                    name.clone(),
                    why,
                    route,
                    Some(come_back),
                ))
            };
            if foreign {
                unanswered.refused(Reason::NotKept);
                return Err(not_kept(Reason::NotKept));
            }
            // A value that does not serialize never will: no retry hint, and the cause said.
            let cannot = |kind: CannotKeepKind, detail: String| -> BoxError {
                Box::new(CannotKeep {
                    class: class.clone(),
                    route,
                    kind,
                    detail,
                })
            };
            let bytes = payload.map_err(|(result, why)| {
                tracing::warn!(class = %class, error = %why, "a diverted task cannot be serialized");
                unanswered.refused(result);
                cannot(CannotKeepKind::Value, why)
            })?;
            if let Some(k) = &key
                && !super::capture::valid_key(k.as_bytes())
            {
                unanswered.refused(Reason::Malformed);
                return Err(cannot(CannotKeepKind::InvalidKey, format!("{k:?}")));
            }
            // Stored whether or not the caller waits, and counted there.
            unanswered.answered();
            let stored = shared
                .keep((class.clone(), key.clone(), route, reason), bytes)
                .await;
            match stored {
                Stored::Kept(id) => Ok(Accepted { id, route }),
                Stored::Found(kept) => {
                    if kept.same {
                        return Ok(Accepted { id: kept.id, route });
                    }
                    let key = format!("{:?}", key.as_deref().unwrap_or(""));
                    Err(cannot(CannotKeepKind::KeyInUse(kept.id), key))
                }
                // `keep` counted it (a task's value always makes a task: not unreadable).
                Stored::NotKept | Stored::Unreadable(..) => Err(not_kept(Reason::NotKept)),
            }
        })
    }
}
