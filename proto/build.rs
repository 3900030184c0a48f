//! Generates the tonic/prost code from `proto/` with `protox`, so no system
//! `protoc` is needed, and the table of the API's gRPC methods
//! (`grpc_methods.rs`, [`GRPC_METHODS`](../src/lib.rs)).

use std::fmt::Write as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let file = "proto/skymesh/v1/skymesh.proto";
    println!("cargo:rerun-if-changed={file}");
    let fds = protox::compile([file], ["proto"])?;
    let mut methods = String::from("&[\n");
    for f in &fds.file {
        let package = f.package();
        for s in &f.service {
            for m in &s.method {
                writeln!(
                    methods,
                    "    GrpcMethod {{ service: \"{package}.{}\", method: \"{}\", server_streaming: {}, client_streaming: {} }},",
                    s.name(),
                    m.name(),
                    m.server_streaming(),
                    m.client_streaming()
                )?;
            }
        }
    }
    methods.push(']');
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("grpc_methods.rs");
    std::fs::write(out, methods)?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
