//! Compiles the contracts under `proto/` with a vendored protoc, so a fresh machine needs none.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "meshgate/common/v1/common.proto",
    "meshgate/gateway/v1/gateway.proto",
    "meshgate/inference/v1/inference.proto",
    "meshgate/router/v1/router.proto",
    "meshgate/quota/v1/quota.proto",
    "meshgate/analytics/v1/analytics.proto",
    "meshgate/sync/v1/sync.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let include = protoc_bin_vendored::include_path()?;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);

    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure().file_descriptor_set_path(out.join("meshgate_descriptor.bin")).compile_with_config(
        config,
        &PROTOS.iter().map(|p| root.join(p)).collect::<Vec<_>>(),
        &[root.clone(), include],
    )?;
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={}", root.join(proto).display());
    }
    Ok(())
}
