//! Generates the internal call bodies (prost) and their proto3 JSON mapping (pbjson) from
//! `proto/cluster.proto`. The client types it refers to (`cim.Message`, ...) are cim-proto's,
//! not generated again: one Rust type per protobuf message.
use std::{env, path::PathBuf};

/// The types of `cim.proto` that `cluster.proto` uses, mapped to cim-proto's. One by one, not
/// the whole `.cim` package: an extern path is a prefix, and `.cim` would also take
/// `.cim.cluster`, the package generated here.
const CIM_TYPES: [&str; 4] = ["Message", "Kick", "Send", "SendResult"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../proto");
    let files = [proto_dir.join("cluster.proto")];
    for f in [proto_dir.join("cim.proto"), proto_dir.join("cluster.proto")] {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let descriptor_path = out_dir.join("descriptors.bin");
    let mut config = prost_build::Config::new();
    for name in CIM_TYPES {
        config.extern_path(format!(".cim.{name}"), format!("::cim_proto::pb::{name}"));
    }
    config
        .file_descriptor_set_path(&descriptor_path)
        .compile_protos(&files, &[proto_dir])
        .map_err(|e| {
            format!(
                "{e}\n(cim needs `protoc` to build: install the Debian package protobuf-compiler)"
            )
        })?;
    let descriptors = std::fs::read(descriptor_path)?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptors)?
        // As in cim-proto: JSON keys this build does not know are skipped.
        .ignore_unknown_fields()
        .build(&[".cim.cluster"])?;
    Ok(())
}
