//! The securemesh gRPC API, generated from `proto/securemesh/v1/data.proto`.
//!
//! Every other crate speaks to the network through these types. The encoded
//! file descriptor set is exported so that servers and the coordinator can
//! offer server reflection (grpcurl needs it to call us without proto files).

/// Version 1 of the `securemesh` protobuf package.
pub mod v1 {
    tonic::include_proto!("securemesh.v1");

    /// Fully qualified name of the data service, as health checks name it.
    pub const DATA_SERVICE_NAME: &str = "securemesh.v1.DataService";
}

/// The encoded `FileDescriptorSet` of every securemesh proto file.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/securemesh_descriptor.bin"));

/// Why the reflection services could not be built.
pub use tonic_reflection::server::Error as ReflectionError;

/// Adds both reflection services (v1 and v1alpha) for our descriptor set and
/// the health service's to `routes`.
///
/// grpcurl 1.8.6 speaks only v1alpha while newer clients try v1 first, so every
/// securemesh process offers both.
pub fn add_reflection(
    routes: &mut tonic::service::RoutesBuilder,
) -> Result<(), tonic_reflection::server::Error> {
    let configure = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    routes.add_service(configure().build_v1()?);
    routes.add_service(configure().build_v1alpha()?);
    Ok(())
}
