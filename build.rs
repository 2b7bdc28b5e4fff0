//! Compiles `proto/` with protox (pure Rust, no system `protoc`) and generates
//! the tonic client and server code, plus the encoded descriptor set that the
//! reflection services serve.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/securemesh/v1/data.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }

    let file_descriptors = protox::compile(protos, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("securemesh_descriptor.bin"),
        prost::Message::encode_to_vec(&file_descriptors),
    )?;

    // The token as `bytes::Bytes`: decoded without a copy, and cloned for
    // each attempt of a retried call by a reference count, not a memcpy.
    tonic_prost_build::configure()
        .bytes(".securemesh.v1.SubmitRequest.token")
        .compile_fds(file_descriptors)?;
    Ok(())
}
