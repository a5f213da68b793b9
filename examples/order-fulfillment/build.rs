//! Generates the gRPC code from `proto/fulfillment.proto`, parsed by `protox` (pure Rust), so
//! the README's first command builds on a machine without `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/fulfillment.proto");
    let fds = protox::compile(["proto/fulfillment.proto"], ["proto"])?;
    tonic_prost_build::compile_fds(fds)?;
    Ok(())
}
