//! Compiles `dagmesh/v1/*.proto` with protox (no system `protoc`) and writes the descriptor set
//! that the servers hand to gRPC reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "dagmesh/v1/types.proto",
        "dagmesh/v1/workflow.proto",
        "dagmesh/v1/run.proto",
        "dagmesh/v1/worker.proto",
        "dagmesh/v1/metadata.proto",
        "dagmesh/v1/cluster.proto",
        "dagmesh/v1/scheduler.proto",
        "dagmesh/v1/auth.proto",
        "dagmesh/v1/webhooks.proto",
        "dagmesh/v1/peer.proto",
        "externalscaler/externalscaler.proto",
    ];
    let descriptors = protox::compile(protos, ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("dagmesh_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    // `build_transport(false)`: the generated `connect` constructor would clash with the
    // `WorkerService.Connect` RPC; clients are built from a `Channel` instead.
    tonic_prost_build::configure()
        .build_transport(false)
        .compile_fds(descriptors)?;
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
