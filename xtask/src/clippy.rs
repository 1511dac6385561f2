//! `cargo xtask clippy`: the host crates with the workspace's lints, then `gateway-ebpf` for the
//! target it runs on (`bpfel-unknown-none`, nightly, `-Z build-std=core`, as `gateway/build.rs`
//! builds it) with its own lints. Both with `-D warnings`.

use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::{cargo::cargo, setup::workspace_root};

/// Where the eBPF lint run keeps its artifacts (nightly and a rebuilt `core`), apart from the
/// host builds'.
const EBPF_TARGET_DIR: &str = "target/ebpf-clippy";

pub fn run() -> Result<()> {
    cargo(&[
        "clippy",
        "--workspace",
        "--exclude",
        "gateway-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    ebpf()
}

/// Lints the eBPF crate's library and program targets. `--all-targets` would add test targets,
/// which need `std`.
fn ebpf() -> Result<()> {
    let args = [
        "run",
        "nightly",
        "cargo",
        "clippy",
        "--locked",
        "--package",
        "gateway-ebpf",
        "--lib",
        "--bins",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--target-dir",
        EBPF_TARGET_DIR,
        "--",
        "-D",
        "warnings",
    ];
    let mut cmd = Command::new("rustup");
    cmd.args(args).current_dir(workspace_root());
    // The stable toolchain that runs xtask must not leak into the nightly build (as aya-build).
    for key in ["RUSTC", "RUSTC_WORKSPACE_WRAPPER", "RUSTFLAGS", "CARGO"] {
        cmd.env_remove(key);
    }
    let status = cmd.status().context(
        "run `rustup run nightly cargo clippy` for gateway-ebpf (needs nightly with rust-src: \
         `cargo xtask setup`)",
    )?;
    if !status.success() {
        bail!("clippy for gateway-ebpf (bpfel-unknown-none) failed with {status}");
    }
    Ok(())
}
