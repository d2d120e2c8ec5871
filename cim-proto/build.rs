//! Generates the client wire types (prost) and their proto3 JSON mapping (pbjson) from
//! `proto/cim.proto`. (`proto/cluster.proto`, the internal calls, is compiled in cim-common.)
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../proto");
    let files = [proto_dir.join("cim.proto")];
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let descriptor_path = out_dir.join("descriptors.bin");
    prost_build::Config::new()
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
        // A JSON key this build does not know is skipped, as protobuf readers skip unknown
        // field numbers: a web page built against a newer cim.proto keeps working against an
        // older server (and an older page against a newer server). Malformed JSON and known
        // keys with the wrong type are still refused.
        .ignore_unknown_fields()
        .build(&[".cim"])?;
    Ok(())
}
