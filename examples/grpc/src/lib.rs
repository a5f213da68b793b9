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
use tokio_stream::wrappers::TcpListenerStream;
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
#[derive(Debug, Default, Clone)]
pub struct OrderService;

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
        // client goes away.
        let updates = tokio_stream::once(Ok(now)).chain(tokio_stream::pending());
        Ok(Response::new(Box::pin(updates)))
    }
}

/// The degrader of the example: `payment` (gold) and `status` (silver).
pub fn degrader_builder() -> tower_degrade::DegraderBuilder {
    Degrader::builder("orders-grpc")
        .class(ClassConfig::gold("payment").depends_on("third_party:payments"))
        .class(ClassConfig::silver("status").depends_on("db"))
}

/// The HTTP/2 connection window of the server: 64 MiB rather than hyper's 1 MiB.
///
/// The layer answers a call it does not serve at once, before its request body is read, and
/// the call's message then arrives at a stream that nobody reads. h2 (0.4.16 and later)
/// charges each such small DATA frame to a budget of half the connection window, for the life
/// of the connection, and closes the connection with `GOAWAY ENHANCE_YOUR_CALM`
/// (`too_many_data_frames`) when it is spent: every call in flight on it fails, the gold ones
/// too. With 1 MiB that is about 2,000 late messages; in a test 20,000 refused calls, 512 at
/// a time on one connection, lost 715 to 1,294 calls to closed connections (five runs).
/// 64 MiB makes it about 140,000 late messages per connection. It is also the most request
/// data one connection can have sent that the server has not read yet.
pub const CONNECTION_WINDOW: u32 = 64 << 20;

/// Serve the order service on `listener`, every call through `degrader`, until `shutdown`
/// completes.
pub async fn serve(
    degrader: &Degrader,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let classify = classifier(degrader)?;
    tonic::transport::Server::builder()
        .initial_connection_window_size(CONNECTION_WINDOW)
        .layer(degrader.layer(classify).grpc())
        .add_service(OrdersServer::new(OrderService))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
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
