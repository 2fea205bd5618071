//! Compiles containerd's snapshots API (src/runtime/proto/) into Rust with tonic and
//! prost. The .proto files are parsed by protox, in Rust, so a clean clone builds with
//! cargo alone: no protoc to install.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = "src/runtime/proto";
    let api = "src/runtime/proto/containerd/services/snapshots/v1/snapshots.proto";
    println!("cargo:rerun-if-changed={root}");
    let descriptors = protox::compile([api], [root])?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
