//! The order-fulfillment service: axum HTTP routes, a tonic gRPC service and two task-API
//! workers (a cron job and a queue consumer) on one set of classes, protected by one degrader
//! and one fallback router, or left unprotected.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tower_degrade::admin::{Admin, Exposure, bind};
use tower_degrade::chaos::Chaos;
use tower_degrade::classify::HttpClassifier;
use tower_degrade::fallback::store::EmbeddedStore;
use tower_degrade::fallback::{
    Batch, BatchMerge, Capture, FallbackRouter, HttpReplay, LastGoodLayer, ManualReview, Payload,
    REPLAY_HEADER, Replay, ReplayFuture, Store, Task, replay_task,
};
use tower_degrade::task::Tasks;
use tower_degrade::{BoxError, ClassId, Degraded, Degrader};

use crate::config::Config;
use crate::world::{Effects, World};

pub(crate) const PAYMENT: &str = "payment_callback";
pub(crate) const INVENTORY: &str = "inventory";
pub(crate) const PRODUCT: &str = "product_detail";
pub(crate) const BROWSE: &str = "browse_log";
pub(crate) const STATUS: &str = "order_status";
pub(crate) const ASYNC_TASK: &str = "async_task";
pub(crate) const TIMEOUT_CHECK: &str = "order_timeout_check";
pub(crate) const EVENTS: &str = "order_events";

/// How long a stopping shop lets the fallback worker's running replays end.
const WORKER_GRACE: Duration = Duration::from_secs(10);

#[allow(missing_docs, unreachable_pub, missing_debug_implementations)]
pub(crate) mod proto {
    tonic::include_proto!("fulfillment.v1");
}

use proto::async_tasks_server::{AsyncTasks, AsyncTasksServer};
use proto::{SubmitAsyncTaskReply, SubmitAsyncTaskRequest};

/// The classes' ids, for the dependencies' chaos handles.
#[derive(Debug, Clone, Copy)]
struct Ids {
    payment: ClassId,
    inventory: ClassId,
    product: ClassId,
    browse: ClassId,
    status: ClassId,
    async_task: ClassId,
    timeout_check: ClassId,
    events: ClassId,
}

#[derive(Clone)]
struct Ctx {
    world: Arc<World>,
    ids: Ids,
}

fn failed(e: BoxError) -> Response {
    (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
}

fn key(headers: &HeaderMap, fallback: &str) -> String {
    headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or(fallback)
        .to_owned()
}

/// `POST /payments/{order_id}/callback`: the payment provider says an order is paid.
async fn payment_callback(
    State(ctx): State<Ctx>,
    Path(order_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    match ctx.world.db.call(ctx.ids.payment).await {
        Ok(()) => {
            Effects::apply(&ctx.world.effects.payments, &key(&headers, &order_id));
            (StatusCode::OK, "recorded").into_response()
        }
        Err(e) => failed(e),
    }
}

/// `POST /inventory/{sku}/deduct`, body: the delta. Redis first (the reservation), then
/// the database.
async fn inventory(State(ctx): State<Ctx>, Path(_sku): Path<String>, body: String) -> Response {
    let delta: u64 = body.trim().parse().unwrap_or(1);
    let id = ctx.ids.inventory;
    let done = async {
        ctx.world.redis.call(id).await?;
        ctx.world.db.call(id).await
    };
    match done.await {
        Ok(()) => {
            ctx.world
                .effects
                .inventory_direct
                .fetch_add(delta, std::sync::atomic::Ordering::Relaxed);
            (StatusCode::OK, "deducted").into_response()
        }
        Err(e) => failed(e),
    }
}

#[derive(Serialize)]
struct Product {
    id: String,
    name: String,
    price_cents: u64,
}

/// `GET /products/{id}`: a product page's data.
async fn product(State(ctx): State<Ctx>, Path(id): Path<String>) -> Response {
    match ctx.world.db.call(ctx.ids.product).await {
        Ok(()) => Json(Product {
            name: format!("product {id}"),
            price_cents: 100 + id.len() as u64 * 7,
            id,
        })
        .into_response(),
        Err(e) => failed(e),
    }
}

/// `POST /events/browse`: a browse event, forwarded to the analytics provider.
async fn browse(State(ctx): State<Ctx>, headers: HeaderMap) -> Response {
    match ctx.world.analytics.call(ctx.ids.browse).await {
        Ok(()) => {
            let e = &ctx.world.effects;
            e.browse_logged
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if headers.contains_key(REPLAY_HEADER) {
                e.browse_backfilled
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            StatusCode::ACCEPTED.into_response()
        }
        Err(e) => failed(e),
    }
}

/// `GET /orders/{id}/status`.
async fn order_status(State(ctx): State<Ctx>, Path(id): Path<String>) -> Response {
    match ctx.world.db.call(ctx.ids.status).await {
        Ok(()) => Json(serde_json::json!({"order_id": id, "status": "shipped"})).into_response(),
        Err(e) => failed(e),
    }
}

/// The gRPC task submission (the seed's `SubmitAsyncTask(task_type=...)`).
#[derive(Clone)]
struct AsyncTaskService(Ctx);

#[tonic::async_trait]
impl AsyncTasks for AsyncTaskService {
    async fn submit_async_task(
        &self,
        req: tonic::Request<SubmitAsyncTaskRequest>,
    ) -> Result<tonic::Response<SubmitAsyncTaskReply>, tonic::Status> {
        let key = req
            .metadata()
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let req = req.into_inner();
        let ctx = &self.0;
        match req.task_type.as_str() {
            "refund" => {
                ctx.world
                    .payments
                    .call(ctx.ids.async_task)
                    .await
                    .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
                let key = key.unwrap_or_else(|| req.order_id.clone());
                Effects::apply(&ctx.world.effects.refunds, &key);
            }
            "notify" => {}
            other => {
                return Err(tonic::Status::invalid_argument(format!(
                    "unknown task_type `{other}`"
                )));
            }
        }
        Ok(tonic::Response::new(SubmitAsyncTaskReply {
            task_id: format!("{}-{}", req.task_type, req.order_id),
        }))
    }
}

/// An order event from the queue.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct OrderEvent {
    pub(crate) seq: u64,
}

/// What became of a task-API task (the cron job's run, a queue event).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TaskOutcome {
    Done,
    /// Stored durably, to be retried.
    Kept,
    /// Not run: its class was degraded (the cron job runs again next time).
    Skipped,
    Failed,
}

/// Replays kept HTTP and gRPC calls through the application, and kept queue events through
/// the event handler.
struct ShopReplay<H, E> {
    http: H,
    events: E,
}

impl<H: Replay, E: Replay> Replay for ShopReplay<H, E> {
    fn replay(&self, task: &Task, attempt: u32) -> ReplayFuture {
        match task.payload() {
            Payload::Http(_) => self.http.replay(task, attempt),
            _ => self.events.replay(task, attempt),
        }
    }
}

/// The service, running.
pub(crate) struct Shop {
    pub(crate) degrader: Degrader,
    pub(crate) world: Arc<World>,
    /// Faults by class or route at the HTTP layer (dependency faults are the world's).
    pub(crate) app_chaos: Chaos,
    pub(crate) protected: bool,
    pub(crate) addr: SocketAddr,
    pub(crate) store: Option<Arc<dyn Store>>,
    pub(crate) review: Option<ManualReview>,
    /// The failure predictor attached, or why none was.
    pub(crate) predictor: Result<String, String>,
    cron: Tasks<(), TaskOutcome>,
    events: Tasks<OrderEvent, TaskOutcome>,
    ids: Ids,
    store_path: Option<PathBuf>,
    /// The admin API's server, when served (aborted when the shop stops).
    handles: Vec<JoinHandle<()>>,
    /// The server of the shop's port, stopped gracefully.
    server: Option<(tokio::sync::oneshot::Sender<()>, JoinHandle<()>)>,
    /// The fallback worker, stopped gracefully (its running replays end and are recorded)
    /// once the other tasks are aborted.
    worker: Option<(tokio::sync::oneshot::Sender<()>, JoinHandle<()>)>,
    _policies: Option<tower_degrade::policy::PolicyWatcher>,
}

/// The admin API's token and address, from `ORDER_FULFILLMENT_ADMIN_TOKEN` and
/// `ORDER_FULFILLMENT_ADMIN_ADDR` (default `127.0.0.1:3001`).
#[derive(Clone, Debug)]
pub(crate) struct AdminConfig {
    pub(crate) token: String,
    pub(crate) addr: SocketAddr,
}

impl AdminConfig {
    /// `None` unless a token is set: the admin API is off by default.
    pub(crate) fn from_env() -> Result<Option<AdminConfig>, BoxError> {
        let Ok(token) = std::env::var("ORDER_FULFILLMENT_ADMIN_TOKEN") else {
            return Ok(None);
        };
        let addr = match std::env::var("ORDER_FULFILLMENT_ADMIN_ADDR") {
            Ok(a) => a
                .parse()
                .map_err(|e| format!("ORDER_FULFILLMENT_ADMIN_ADDR `{a}`: {e}"))?,
            Err(_) => SocketAddr::from(([127, 0, 0, 1], 3001)),
        };
        Ok(Some(AdminConfig { token, addr }))
    }
}

impl Shop {
    /// Build and serve on `addr` (port 0: any free port).
    pub(crate) async fn start(
        config: &Config,
        protected: bool,
        addr: SocketAddr,
        metrics: Option<PrometheusHandle>,
    ) -> Result<Shop, BoxError> {
        let mut builder = config.degrader();
        let mut predictor = Err("the unprotected run has none".to_owned());
        if protected {
            (builder, predictor) = crate::predictor::attach(config, builder);
        }
        let degrader = builder.build()?;
        let mut policies = None;
        if let (true, Some(dir)) = (protected, &config.policies) {
            policies = Some(degrader.watch_policies(dir, Duration::from_millis(200))?);
        }
        let id = |name: &str| degrader.class_id(name);
        let ids = Ids {
            payment: id(PAYMENT)?,
            inventory: id(INVENTORY)?,
            product: id(PRODUCT)?,
            browse: id(BROWSE)?,
            status: id(STATUS)?,
            async_task: id(ASYNC_TASK)?,
            timeout_check: id(TIMEOUT_CHECK)?,
            events: id(EVENTS)?,
        };
        let world = Arc::new(World::new(config, &degrader));
        let ctx = Ctx {
            world: world.clone(),
            ids,
        };
        let app_chaos = Chaos::builder(&degrader)
            .seed(config.storm.seed ^ 4)
            .build();
        let classify = classifier(&degrader)?;

        // The product reads apart: the last-good cache goes around them alone (it keeps every
        // read it sees, and only theirs are ever served from it).
        let product_routes = Router::new()
            .route("/products/{id}", get(product))
            .with_state(ctx.clone())
            .layer(app_chaos.layer(classify.clone()).http());
        let http_routes = Router::new()
            .route("/payments/{order_id}/callback", post(payment_callback))
            .route("/inventory/{sku}/deduct", post(inventory))
            .route("/events/browse", post(browse))
            .route("/orders/{id}/status", get(order_status))
            .with_state(ctx.clone())
            .layer(app_chaos.layer(classify.clone()).http());
        let grpc_routes =
            tonic::service::Routes::new(AsyncTasksServer::new(AsyncTaskService(ctx.clone())))
                .into_axum_router()
                .layer(app_chaos.layer(classify.clone()).grpc());

        let mut worker_task = None;
        let ((http, grpc), store, review, store_path, cron, events) = if protected {
            // Kept calls are replayed through the application without the degrade layer.
            let replayable = http_routes
                .clone()
                .merge(product_routes.clone())
                .merge(grpc_routes.clone());
            let store_path = config.storage.path.clone().unwrap_or_else(|| {
                std::env::temp_dir().join(format!(
                    "order-fulfillment-{}-{}.redb",
                    std::process::id(),
                    config.storm.seed
                ))
            });
            let capture = Capture::new();
            let events_world = world.clone();
            let events_id = ids.events;
            let replay = ShopReplay {
                http: HttpReplay::<_, Body>::new(replayable, capture.idempotency().clone()),
                events: replay_task(move |ev: OrderEvent| {
                    let world = events_world.clone();
                    async move { handle_event(&world, events_id, ev).await }
                }),
            };
            let (router, worker) = FallbackRouter::builder(&degrader)
                .store(open_store(&store_path).await?)
                .capture(capture)
                .replay(replay)
                .batch_merge(INVENTORY, inventory_batches(ctx.clone()))
                .backfill(config.backfill()?)
                .build()?;
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let stop_worker = async move {
                let _ = stopped.await;
            };
            worker_task = Some((
                stop,
                tokio::spawn(worker.run_until(stop_worker, WORKER_GRACE)),
            ));
            // Refused calls' bodies are read, not dropped: over HTTP/2 (the gRPC tasks) their
            // late messages would make h2 close the client's connection.
            let degrade_http = degrader
                .layer(classify.clone())
                .http()
                .fallback_with(router.clone())
                .drain_rejected();
            let products = product_routes
                .layer(degrade_http.clone())
                .layer(LastGoodLayer::new().ttl(Duration::from_secs(600)));
            let http = http_routes.layer(degrade_http).merge(products);
            let grpc = grpc_routes.layer(
                degrader
                    .layer(classify.clone())
                    .grpc()
                    .fallback_with(router.clone())
                    .drain_rejected(),
            );
            let cron = degrader.tasks::<(), TaskOutcome>().build();
            let events = degrader
                .tasks::<OrderEvent, TaskOutcome>()
                .keep(&router, |_accepted| TaskOutcome::Kept)
                .build();
            (
                (http, grpc),
                Some(router.store().clone()),
                Some(router.review()),
                Some(store_path),
                cron,
                events,
            )
        } else {
            let cron = degrader.tasks::<(), TaskOutcome>().build();
            let events = degrader.tasks::<OrderEvent, TaskOutcome>().build();
            (
                (http_routes.merge(product_routes), grpc_routes),
                None,
                None,
                None,
                cron,
                events,
            )
        };

        let status_degrader = degrader.clone();
        let mut http = http.route(
            "/status",
            get(move || async move { format!("{:#?}\n", status_degrader.status()) }),
        );
        if let Some(handle) = metrics {
            // A render drains every sample recorded since the last scrape: it runs on a
            // blocking thread, not on a worker the service's calls need.
            http = http.route(
                "/metrics",
                get(move || {
                    let handle = handle.clone();
                    async move {
                        tokio::task::spawn_blocking(move || handle.render())
                            .await
                            .unwrap_or_default()
                    }
                }),
            );
        }
        // One port, each call through the one layer its protocol needs: gRPC calls to the
        // tonic router, the rest to the HTTP routes. Merged, the HTTP routes' unmatched
        // requests would reach tonic's fallback (`200` with `grpc-status: 12`, not a 404).
        let app = tower::steer::Steer::new([http, grpc], grpc_or_http);
        let listener = listen(addr).await?;
        let addr = listener.local_addr()?;
        // Stopped gracefully: its connections close (the storm's idle keep-alive ones among
        // them), so that no connection task keeps this shop's degrader alive beside the next
        // (unless one outlasts the 5 s `stop` gives it: the server is aborted then).
        let (stop_serving, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, tower::make::Shared::new(app))
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(Shop {
            degrader,
            world,
            app_chaos,
            protected,
            addr,
            store,
            review,
            predictor,
            cron,
            events,
            ids,
            store_path,
            handles: Vec::new(),
            server: Some((stop_serving, server)),
            worker: worker_task,
            _policies: policies,
        })
    }

    /// The cron job: one order-timeout check.
    pub(crate) async fn check_timeouts(&self) -> TaskOutcome {
        let world = self.world.clone();
        let id = self.ids.timeout_check;
        let check = move |()| async move {
            world.db.call(id).await?;
            world
                .effects
                .timeout_checks
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok::<_, BoxError>(TaskOutcome::Done)
        };
        self.run(&self.cron, TIMEOUT_CHECK, (), check).await
    }

    /// The queue consumer: one order event.
    pub(crate) async fn consume(&self, event: OrderEvent) -> TaskOutcome {
        let world = self.world.clone();
        let id = self.ids.events;
        let handle = move |ev: OrderEvent| async move {
            handle_event(&world, id, ev)
                .await
                .map(|()| TaskOutcome::Done)
        };
        self.run(&self.events, EVENTS, event, handle).await
    }

    async fn run<T, H, Fut>(
        &self,
        tasks: &Tasks<T, TaskOutcome>,
        class: &str,
        task: T,
        handler: H,
    ) -> TaskOutcome
    where
        T: Send + 'static,
        H: FnOnce(T) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<TaskOutcome, BoxError>> + Send + 'static,
    {
        let result = if self.protected {
            tasks.run(class, task, handler).await
        } else {
            handler(task).await
        };
        match result {
            Ok(outcome) => outcome,
            Err(e) if e.downcast_ref::<Degraded>().is_some() => TaskOutcome::Skipped,
            Err(_) => TaskOutcome::Failed,
        }
    }

    /// Stop serving and remove the run's store file (unless it was configured).
    /// Serves the admin API (`tower_degrade::admin`) on `admin.addr` while the shop runs:
    /// status and the status page, breaker commands and the HTTP layer's faults.
    pub(crate) async fn serve_admin(&mut self, admin: &AdminConfig) -> Result<(), BoxError> {
        let mut api = Admin::new(&self.degrader, &admin.token)?.chaos(self.app_chaos.clone());
        if let Some(store) = &self.store {
            api = api.queues(store.clone());
        }
        let listener = bind(admin.addr, Exposure::Loopback).await?;
        let router = api.router();
        self.handles.push(tokio::spawn(async move {
            let _ = tower_degrade::admin::serve(listener, router).await;
        }));
        Ok(())
    }

    /// Stop the shop's tasks and wait until they are gone, so that its port and its store are
    /// free for the next shop (`--serve` after the storm): an aborted task is dropped later.
    pub(crate) async fn stop(self, keep_store: bool) {
        // The server first, so that no call is kept while the worker stops; then the worker,
        // gracefully: replays under way end and are acknowledged, so the next shop on this
        // store does not replay them again. The server's calls under way end (5 s at most).
        if let Some((stop, mut server)) = self.server {
            let _ = stop.send(());
            if tokio::time::timeout(Duration::from_secs(5), &mut server)
                .await
                .is_err()
            {
                server.abort();
                let _ = server.await;
            }
        }
        for h in &self.handles {
            h.abort();
        }
        for h in self.handles {
            let _ = h.await;
        }
        if let Some((stop, worker)) = self.worker {
            let _ = stop.send(());
            let _ = worker.await;
        }
        drop(self.store);
        if let (Some(path), false) = (self.store_path, keep_store) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A listener on `addr`; a port the last run's shop may still hold (its tasks are aborted, a
/// scraper's connection still open) is waited for, up to 5 s.
async fn listen(addr: std::net::SocketAddr) -> Result<tokio::net::TcpListener, BoxError> {
    let mut tries = 0;
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Err(e) if tries < 50 && e.kind() == std::io::ErrorKind::AddrInUse => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(format!("cannot listen on {addr}: {e}").into()),
            Ok(l) => return Ok(l),
        }
    }
}

/// The embedded store at `path`; a file the last run's shop still holds (its tasks are aborted,
/// not yet dropped) is waited for, up to 5 s.
async fn open_store(path: &std::path::Path) -> Result<EmbeddedStore, BoxError> {
    let mut tries = 0;
    loop {
        match EmbeddedStore::open(path) {
            Err(e) if tries < 50 && e.to_string().contains("already open") => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            done => return Ok(done?),
        }
    }
}

async fn handle_event(world: &World, class: ClassId, ev: OrderEvent) -> Result<(), BoxError> {
    world.db.call(class).await?;
    *world
        .effects
        .events
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(ev.seq)
        .or_default() += 1;
    Ok(())
}

/// Routes to classes: method + route pattern, and the gRPC method.
pub(crate) fn classifier(degrader: &Degrader) -> Result<HttpClassifier, BoxError> {
    use axum::http::Method;
    Ok(degrader
        .http_classifier()
        .route(Some(Method::POST), "/payments/{order_id}/callback", PAYMENT)?
        .route(Some(Method::POST), "/inventory/{sku}/deduct", INVENTORY)?
        .route(Some(Method::GET), "/products/{id}", PRODUCT)?
        .route(Some(Method::POST), "/events/browse", BROWSE)?
        .route(Some(Method::GET), "/orders/{id}/status", STATUS)?
        .grpc("/fulfillment.v1.AsyncTasks/SubmitAsyncTask", ASYNC_TASK)?
        .build())
}

/// The inventory class's `batch_merge`: the SKU from the path, the delta from the body,
/// summed per SKU and written as one database call per flush.
fn inventory_batches(ctx: Ctx) -> BatchMerge<u64> {
    BatchMerge::new(
        |req| {
            let sku = req.uri.split('/').nth(2).unwrap_or_default().to_owned();
            let body = std::str::from_utf8(&req.body).map_err(|e| e.to_string())?;
            let delta = match body.trim() {
                "" => 1,
                n => n.parse().map_err(|e| format!("delta `{n}`: {e}"))?,
            };
            Ok((sku, delta))
        },
        |sum: &mut u64, delta| *sum += delta,
        tower::service_fn(move |batch: Batch<u64>| {
            let ctx = ctx.clone();
            async move {
                // One `UPDATE ... WHERE sku IN (...)` for the whole batch.
                ctx.world.db.call(ctx.ids.inventory).await?;
                let e = &ctx.world.effects;
                e.inventory_writes
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let n: u64 = batch.items.iter().map(|(_, d)| d).sum();
                e.inventory_merged
                    .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                Ok::<_, BoxError>(())
            }
        }),
    )
    .flush_every(Duration::from_millis(200))
}

/// The router of [`Shop`]'s two for `req`: the gRPC one (1) for a gRPC call
/// ([`tower_degrade::protocol::is_grpc`]), the HTTP one (0) otherwise.
fn grpc_or_http(req: &axum::extract::Request, _: &[Router]) -> usize {
    usize::from(tower_degrade::protocol::is_grpc(req.headers()))
}
