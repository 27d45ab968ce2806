//! Generates the gRPC code from `proto/wicket/v1` with a vendored `protoc`,
//! so a plain `cargo build` needs no system protobuf compiler.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files =
        ["common.proto", "sidecar.proto", "admin.proto"].map(|f| root.join("wicket/v1").join(f));
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("wicket_descriptor.bin"))
        .compile_with_config(
            config,
            &files,
            &[root, protoc_bin_vendored::include_path()?],
        )?;
    Ok(())
}
