//! Builds `gateway-ebpf` for `bpfel-unknown-none` with aya-build (nightly, `-Z build-std=core`,
//! bpf-linker) and leaves the object in `OUT_DIR/gateway` for `include_bytes_aligned!`.
//! With `AYA_BUILD_SKIP=1` it writes an empty object instead, so check/clippy/doc work without the
//! eBPF toolchain; loading that object fails with a clear error.

use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let object = out_dir.join("gateway");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        fs::write(&object, []).with_context(|| format!("write {}", object.display()))?;
        return Ok(());
    }
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|package| package.name.as_str() == "gateway-ebpf")
        .ok_or_else(|| anyhow!("package gateway-ebpf not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("gateway-ebpf manifest has no parent directory"))?
        .as_str()
        .to_owned();
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: &root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context("build gateway-ebpf (needs nightly with rust-src and bpf-linker: `cargo xtask setup`)")
}
