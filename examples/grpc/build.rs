//! Generates the gRPC code from `proto/orders.proto` (needs `protoc`: Debian's
//! `protobuf-compiler`, or `PROTOC` pointing at one).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::compile_protos("proto/orders.proto")?;
    Ok(())
}
