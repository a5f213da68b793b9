//! The gRPC example: `cargo run -p example-grpc` serves `orders.v1.Orders` on 127.0.0.1:50051
//! (`GRPC_ADDR` changes it) until Ctrl-C. Try it with `grpcurl -plaintext -d '{"order_id":"7",
//! "fail":true}' 127.0.0.1:50051 orders.v1.Orders/Pay` a few dozen times: the payment class
//! opens and calls get `UNAVAILABLE` with `grpc-retry-pushback-ms`, while `Status` answers.

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let addr = std::env::var("GRPC_ADDR").unwrap_or_else(|_| "127.0.0.1:50051".into());
    let degrader = example_grpc::degrader_builder().build()?;
    let listener = example_grpc::bind(addr.parse()?).await?;
    println!("serving orders.v1.Orders on {}", listener.local_addr()?);
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    example_grpc::serve(&degrader, listener, shutdown).await
}
