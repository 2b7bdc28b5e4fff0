//! Compiles etcd's protos with protox (a pure-Rust protobuf compiler)
//! instead of the system `protoc` the upstream build script runs.

fn main() {
    let proto_root = "proto";
    println!("cargo:rerun-if-changed={proto_root}");
    let files = [
        "proto/etcd/api/authpb/auth.proto",
        "proto/etcd/api/etcdserverpb/rpc.proto",
        "proto/etcd/api/mvccpb/kv.proto",
        "proto/etcd/server/etcdserver/api/v3election/v3electionpb/v3election.proto",
        "proto/etcd/server/etcdserver/api/v3lock/v3lockpb/v3lock.proto",
    ];
    let descriptors = match protox::compile(files, [proto_root]) {
        Ok(descriptors) => descriptors,
        Err(error) => panic!("cannot compile etcd's protos: {error:?}"),
    };
    if let Err(error) = tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(descriptors)
    {
        panic!("cannot generate etcd's client code: {error}");
    }
}
