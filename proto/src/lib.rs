//! The dagmesh v1 contract, generated from `proto/dagmesh/v1`. The `.proto` files are the source
//! of truth; this crate only compiles them (plus JSON <-> `Struct` helpers).

pub mod connect;
pub mod json;
pub mod limits;

// Generated message enums hold whole messages (a WatchRun snapshot holds a Run): boxing them
// would change the generated API, and they are built once per message anyway.
#[allow(clippy::large_enum_variant)]
pub mod v1 {
    tonic::include_proto!("dagmesh.v1");
}

/// KEDA's external scaler contract (`proto/externalscaler`), served by the executor.
pub mod externalscaler {
    tonic::include_proto!("externalscaler");
}

/// Encoded `FileDescriptorSet` of all dagmesh protos (and their imports), for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("dagmesh_descriptor");
