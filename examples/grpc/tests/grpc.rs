//! Over a real socket: a failing method opens its class, a tonic client sees `UNAVAILABLE`
//! with `grpc-retry-pushback-ms`, and the other method keeps answering.

use example_grpc::proto::orders_client::OrdersClient;
use example_grpc::proto::{PayRequest, StatusRequest};
use std::time::Duration;

use tonic::Code;
use tonic::transport::Channel;
use tower_degrade::Degrader;
use tower_degrade::breaker::State;

/// The example's server on a free port of loopback, every call through `degrader`.
struct Server {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), Box<dyn std::error::Error + Send + Sync>>>,
}

impl Server {
    /// Start it, and connect a client.
    async fn start(degrader: &Degrader) -> (OrdersClient<Channel>, Self) {
        let listener = example_grpc::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let degrader = degrader.clone();
        let task = tokio::spawn(async move {
            example_grpc::serve(&degrader, listener, async {
                let _ = stopped.await;
            })
            .await
        });
        let client = OrdersClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        (client, Self { stop, task })
    }

    /// Stop it and wait for it to finish.
    async fn stop(self) {
        self.stop.send(()).unwrap();
        self.task.await.unwrap().unwrap();
    }
}

/// An order to pay, or one whose payment fails.
fn pay(fail: bool) -> PayRequest {
    PayRequest {
        order_id: "7".into(),
        amount_cents: 1999,
        fail,
    }
}

/// The status of order 7, which the service always has.
async fn order_status(client: &mut OrdersClient<Channel>) -> String {
    let order = StatusRequest {
        order_id: "7".into(),
    };
    client.status(order).await.unwrap().into_inner().status
}

/// The example's degrader and server, one call paid and then the payment class opened by 25
/// failing ones. The control loop is not spawned: the test ticks it, so nothing depends on
/// timing.
async fn payment_opened() -> (
    Degrader,
    impl std::future::Future<Output = ()>,
    OrdersClient<Channel>,
    Server,
) {
    let (degrader, control) = example_grpc::degrader_builder()
        .build_with_worker()
        .unwrap();
    let (mut client, server) = Server::start(&degrader).await;
    let ok = client.pay(pay(false)).await.unwrap().into_inner();
    assert_eq!(ok.payment_id, "pay-7");
    for _ in 0..25 {
        let err = client.pay(pay(true)).await.unwrap_err();
        assert_eq!(err.code(), Code::Internal);
    }
    degrader.tick_now();
    assert_eq!(degrader.state("payment").unwrap(), State::Open);
    (degrader, control, client, server)
}

#[tokio::test]
async fn a_failing_method_opens_its_class_and_the_other_keeps_answering() {
    let (degrader, _loop, mut client, server) = payment_opened().await;

    // The open class answers for the service: UNAVAILABLE, with when to come back.
    let err = client.pay(pay(false)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let pushback: u64 = err
        .metadata()
        .get("grpc-retry-pushback-ms")
        .expect("pushback")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((4_000..=5_000).contains(&pushback), "{pushback}");
    assert_eq!(
        err.metadata().get("x-degrade-reason").unwrap(),
        "breaker_open"
    );
    assert_eq!(
        err.message(),
        format!(
            "not served: circuit breaker open; retry after {:.1} s",
            pushback as f64 / 1e3
        )
    );

    // The other method's class is untouched.
    assert_eq!(order_status(&mut client).await, "shipped");
    degrader.tick_now();
    assert_eq!(degrader.state("status").unwrap(), State::Closed);
    let w = *degrader.history("payment").unwrap().latest().unwrap();
    assert_eq!(w.rejected, 1);

    server.stop().await;
}

#[tokio::test(start_paused = true)]
async fn long_watches_share_a_class_with_unary_reads_without_opening_it() {
    // A status class that expects answers within 50 ms; latencies on tokio's (paused) clock.
    let (degrader, _loop) = tower_degrade::Degrader::builder("orders-grpc")
        .latency_clock(tower_degrade::clock::LatencyClock::Tokio)
        .class(tower_degrade::ClassConfig::gold("payment"))
        .class(tower_degrade::ClassConfig::silver("status").sla(Duration::from_millis(50)))
        .build_with_worker()
        .unwrap();
    let (mut client, server) = Server::start(&degrader).await;
    let order = || StatusRequest {
        order_id: "7".into(),
    };

    // 25 watches, each answered at once and then held open for 2 s: 40 times the class's SLA.
    let mut watches = Vec::new();
    for _ in 0..25 {
        let mut watch = client.watch(order()).await.unwrap().into_inner();
        let first = watch.message().await.unwrap().unwrap();
        assert_eq!(first.status, "shipped");
        watches.push(watch);
    }
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        degrader.tick_now();
        let w = *degrader.history("status").unwrap().latest().unwrap();
        assert_eq!((w.inflight, w.overdue, w.slow), (0, 0, 0), "{w:?}");
        assert_eq!(degrader.state("status").unwrap(), State::Closed);
    }
    // Unary reads in the same class are answered throughout.
    let status = client.status(order()).await.unwrap().into_inner();
    assert_eq!(status.status, "shipped");

    // The watches end when their clients drop them: cancelled, not failed.
    drop(watches);
    let cancelled = async {
        let mut total = 0;
        loop {
            degrader.tick_now();
            let w = *degrader.history("status").unwrap().latest().unwrap();
            total += w.cancelled;
            assert_eq!((w.errors, w.timeouts), (0, 0), "{w:?}");
            if total == 25 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), cancelled)
        .await
        .expect("the server sees every watch end");
    assert_eq!(degrader.state("status").unwrap(), State::Closed);

    server.stop().await;
}

#[tokio::test]
async fn a_shutdown_ends_the_open_watches_and_the_server_stops() {
    // A user's trial: the server ignored Ctrl-C while a client kept a watch open, and new
    // calls on that connection hung meanwhile.
    let (degrader, _loop) = example_grpc::degrader_builder()
        .build_with_worker()
        .unwrap();
    let (mut client, server) = Server::start(&degrader).await;
    let order = StatusRequest {
        order_id: "7".into(),
    };
    let mut watch = client.watch(order).await.unwrap().into_inner();
    assert_eq!(watch.message().await.unwrap().unwrap().status, "shipped");
    server.stop.send(()).unwrap();
    // (Bounds on the waits, so that a server that never stops fails here, not hangs.)
    let ended = tokio::time::timeout(Duration::from_secs(30), watch.message())
        .await
        .expect("the watch ends at the shutdown");
    assert!(matches!(ended, Ok(None)), "ended with OK: {ended:?}");
    tokio::time::timeout(Duration::from_secs(30), server.task)
        .await
        .expect("the server stops once its watches have ended")
        .unwrap()
        .unwrap();
    // Ended as a watch may end: not a failure of the class.
    degrader.tick_now();
    let errors = degrader
        .history("status")
        .unwrap()
        .iter()
        .fold(0, |n, w| n + w.errors);
    assert_eq!(errors, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_calls_never_close_the_clients_connection() {
    // Each refused call is answered before its request message is read, and on HTTP/2 the
    // message often arrives after the answer. h2 charges such messages, unread, to a budget of
    // half the connection window and closes the connection when it is spent (GOAWAY
    // ENHANCE_YOUR_CALM): every call in flight on it fails. When the layer dropped the
    // messages, this lost 715 to 1,294 of the 20,000 calls below (five runs, hyper's 1 MiB
    // window); the example's layer reads them (`drain_rejected`), and a storm of refusals on one
    // connection stays a storm of UNAVAILABLE answers. Two worker threads: the server answers
    // while the client's messages are still arriving.
    let (degrader, _loop, mut client, server) = payment_opened().await;

    const CALLS: usize = 20_000;
    const IN_FLIGHT: usize = 512;
    let mut other = std::collections::BTreeMap::new();
    let mut unavailable = 0;
    let mut sent = 0;
    let mut calls = tokio::task::JoinSet::new();
    while sent < CALLS || !calls.is_empty() {
        while sent < CALLS && calls.len() < IN_FLIGHT {
            let mut client = client.clone();
            calls.spawn(async move { client.pay(pay(false)).await });
            sent += 1;
        }
        match calls.join_next().await.unwrap().unwrap() {
            Err(status) if status.code() == Code::Unavailable => unavailable += 1,
            other_answer => {
                let key = match other_answer {
                    Ok(_) => "served".to_string(),
                    Err(status) => format!("{:?}: {}", status.code(), status.message()),
                };
                *other.entry(key).or_insert(0) += 1;
            }
        }
    }
    assert_eq!(unavailable, CALLS, "other answers: {other:?}");
    degrader.tick_now();
    let w = *degrader.history("payment").unwrap().latest().unwrap();
    assert_eq!(w.rejected as usize, CALLS);

    // The connection still serves the class that is open to it.
    assert_eq!(order_status(&mut client).await, "shipped");
    server.stop().await;
}

/// One raw HTTP/1.1 `GET` of `path`: the status line and the body.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nhost: orders\r\nconnection: close\r\n\r\n");
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).await.unwrap();
    let status = answer.lines().next().unwrap_or_default().to_owned();
    let body = answer
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    (status, body)
}

#[tokio::test]
async fn beside_an_axum_api_on_one_port_each_call_is_counted_once() {
    // A user's trial served an axum API and this service on one port with a layer of each kind
    // over the merged routers: every call was counted twice, and an HTTP request to no route
    // was answered `200` with `grpc-status: 12` by tonic's fallback.
    let (degrader, _loop) = example_grpc::degrader_builder()
        .build_with_worker()
        .unwrap();
    let classify = degrader
        .http_classifier()
        .route(None, "/orders/{id}", "status")
        .unwrap()
        .grpc("/orders.v1.Orders/Pay", "payment")
        .unwrap()
        .build();
    let api = axum::Router::new().route("/orders/{id}", axum::routing::get(|| async { "shipped" }));
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let app = example_grpc::with_http(&degrader, classify, api, stopping);
    let listener = example_grpc::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let server =
        tokio::spawn(async move { axum::serve(listener, tower::make::Shared::new(app)).await });
    let mut client = OrdersClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    assert_eq!(
        client
            .pay(pay(false))
            .await
            .unwrap()
            .into_inner()
            .payment_id,
        "pay-7"
    );
    // A gRPC method this classifier names no class for: served, in the `default` class.
    assert_eq!(order_status(&mut client).await, "shipped");
    assert_eq!(
        http_get(addr, "/orders/7").await,
        ("HTTP/1.1 200 OK".to_owned(), "shipped".to_owned())
    );
    let (status, _) = http_get(addr, "/nowhere").await;
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    degrader.tick_now();
    let calls = |class: &str| {
        let history = degrader.history(class).unwrap();
        history.iter().map(|w| w.requests()).sum::<u64>()
    };
    // Each once: the payment, the HTTP read, and the gRPC status read and the 404 in
    // `default`.
    assert_eq!(
        (calls("payment"), calls("status"), calls("default")),
        (1, 1, 2)
    );
    drop(stop);
    server.abort();
}
