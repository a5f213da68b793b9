//! A tonic gRPC service behind tower-degrade: one layer on `Server::builder()`, classes by
//! gRPC method, and answers a tonic client understands (`UNAVAILABLE` with
//! `grpc-retry-pushback-ms`) when a class is not served.
//!
//! ```text
//! /orders.v1.Orders/Pay     -> payment (gold)
//! /orders.v1.Orders/Status  -> status  (silver)
//! /orders.v1.Orders/Watch   -> status  (silver; a server stream)
//! ```
//!
//! A stream is timed to its response headers and its status counted when it ends, so long
//! watches share the `status` class with the unary reads without looking slow to it.

use std::net::SocketAddr;
use std::pin::Pin;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::{TcpListenerStream, WatchStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use tower_degrade::error::ConfigError;
use tower_degrade::{ClassConfig, Degrader};

/// The generated code of `proto/orders.proto`.
#[allow(missing_docs, unreachable_pub, missing_debug_implementations)]
pub mod proto {
    tonic::include_proto!("orders.v1");
}

use proto::orders_server::{Orders, OrdersServer};
use proto::{PayReply, PayRequest, StatusReply, StatusRequest};

/// The service: pays (or fails when asked to, as a dead payment provider would) and reads
/// order statuses.
#[derive(Debug, Clone)]
pub struct OrderService {
    /// Turns `true` when the server starts shutting down: open watches end then.
    stopping: watch::Receiver<bool>,
}

#[tonic::async_trait]
impl Orders for OrderService {
    type WatchStream = Pin<Box<dyn Stream<Item = Result<StatusReply, Status>> + Send>>;

    async fn pay(&self, req: Request<PayRequest>) -> Result<Response<PayReply>, Status> {
        let req = req.into_inner();
        if req.fail {
            return Err(Status::internal("payment provider failed"));
        }
        Ok(Response::new(PayReply {
            payment_id: format!("pay-{}", req.order_id),
        }))
    }

    async fn status(&self, req: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        Ok(Response::new(StatusReply {
            order_id: req.into_inner().order_id,
            status: "shipped".into(),
        }))
    }

    async fn watch(
        &self,
        req: Request<StatusRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let now = StatusReply {
            order_id: req.into_inner().order_id,
            status: "shipped".into(),
        };
        // The current status, then nothing changes (a shipped order stays shipped) until the
        // client goes away, or the server shuts down: a graceful shutdown waits for every
        // call to end, and a watch left open would hold it (and the connection, whose new
        // calls then hang) for as long as its client watches. It ends then, with an `OK`
        // status, as a watch may (a client watches again, on another instance): an error
        // status would count as a failure of the `status` class, each open watch one, and
        // could open it at every deploy.
        let stopping = WatchStream::new(self.stopping.clone())
            .filter(|stopping| *stopping)
            .take(1)
            .filter_map(|_| None);
        let updates = tokio_stream::once(Ok(now)).chain(stopping);
        Ok(Response::new(Box::pin(updates)))
    }
}

/// The degrader of the example: `payment` (gold) and `status` (silver), with priority
/// admission (past the capacity it finds, calls wait by tier, gold first).
pub fn degrader_builder() -> tower_degrade::DegraderBuilder {
    Degrader::builder("orders-grpc")
        .admission(tower_degrade::admit::Admission::adaptive())
        .class(ClassConfig::gold("payment").depends_on("third_party:payments"))
        .class(ClassConfig::silver("status").depends_on("db"))
}

/// Serve the order service on `listener`, every call through `degrader`, until `shutdown`
/// completes: then new connections are refused, open watches end, and it returns once the
/// calls in flight are answered.
pub async fn serve(
    degrader: &Degrader,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let classify = classifier(degrader)?;
    let (stop, stopping) = watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        let _ = stop.send(true);
    };
    tonic::transport::Server::builder()
        // Calls that are not served have their message read (and thrown away) rather than
        // dropped: over HTTP/2, messages that arrive after their call's answer would make h2
        // close the client's connection (`DrainRejected` says why).
        .layer(degrader.layer(classify).grpc().drain_rejected())
        .add_service(OrdersServer::new(OrderService { stopping }))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}

/// The order service and an axum HTTP API served on one port (`axum::serve(listener,
/// tower::make::Shared::new(app))`, which speaks HTTP/1.1 and HTTP/2 alike): each call goes
/// through exactly one degrade layer, picked by its content type: a gRPC call through the
/// order service's (`.grpc()`: gRPC statuses are its failures, a call not served is answered
/// `UNAVAILABLE`), any other through `http`'s (`.http()`: 5xx are failures, 503 answers).
/// `classify` names both the HTTP routes and the gRPC methods. A layer added over the merged
/// routers instead counts a call that passes both twice; and merged with tonic's router
/// (`Routes::into_axum_router`), `http` would hand the requests none of its routes match to
/// tonic's fallback, which answers `200` with `grpc-status: 12`, not a 404.
pub fn with_http(
    degrader: &Degrader,
    classify: tower_degrade::classify::HttpClassifier,
    http: axum::Router,
    stopping: watch::Receiver<bool>,
) -> OnePort {
    let http = http.layer(degrader.layer(classify.clone()).http().drain_rejected());
    let grpc = tonic::service::Routes::new(OrdersServer::new(OrderService { stopping }))
        .into_axum_router()
        .layer(degrader.layer(classify).grpc().drain_rejected());
    tower::steer::Steer::new([http, grpc], pick)
}

/// [`with_http`]'s service: two axum routers, steered by a gRPC call's headers
/// ([`tower_degrade::protocol::is_grpc`]).
pub type OnePort = tower::steer::Steer<
    axum::Router,
    fn(&axum::extract::Request, &[axum::Router]) -> usize,
    axum::extract::Request,
>;

/// The router for `req`: the second (gRPC) for a gRPC call
/// ([`tower_degrade::protocol::is_grpc`]), the first otherwise.
fn pick(req: &axum::extract::Request, _: &[axum::Router]) -> usize {
    usize::from(tower_degrade::protocol::is_grpc(req.headers()))
}

/// Classes by gRPC method: a full method, or a whole service with `/*`.
pub fn classifier(
    degrader: &Degrader,
) -> Result<tower_degrade::classify::HttpClassifier, ConfigError> {
    Ok(degrader
        .http_classifier()
        .grpc("/orders.v1.Orders/Pay", "payment")?
        .grpc("/orders.v1.Orders/Status", "status")?
        .grpc("/orders.v1.Orders/Watch", "status")?
        .build())
}

/// Bind `addr` (port 0 picks a free one).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
