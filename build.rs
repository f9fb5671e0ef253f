//! Compiles `proto/` with protox (no system `protoc`), generates prost/tonic code, and writes
//! the FileDescriptorSet that `GetContractRegistry` ships: `eventbus.proto` plus every file it
//! imports, source info stripped.

use prost::Message;
use std::{env, fs, path::PathBuf};

const PROTOS: &[&str] = &[
    "plugin.proto",
    "iac.proto",
    "grpc_broker.proto",
    "grpc_controller.proto",
    "grpc_stdio.proto",
    "eventbus.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out = PathBuf::from(env::var("OUT_DIR")?);

    let all = protox::compile(PROTOS, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Trims pipeline state nobody reads before prost's recursion limit sees it.
        .codec_path("crate::host::codec::PluginCodec")
        .compile_fds(all)?;

    // The registry set: eventbus.proto and its transitive imports only, so a host can build
    // codecs for our messages from it alone.
    let mut registry = protox::compile(["eventbus.proto"], ["proto"])?;
    for file in &mut registry.file {
        file.source_code_info = None;
    }
    fs::write(
        out.join("eventbus_descriptor.bin"),
        registry.encode_to_vec(),
    )?;
    Ok(())
}
