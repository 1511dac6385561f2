//! `cargo xtask test`: build, unit tests, then the root-only integration tests of `tests/`, one
//! file at a time and one test at a time (they create namespaces and attach programs), collecting
//! every failure before reporting.

use std::{fs, process::Command, time::Instant};

use anyhow::{Context as _, Result, bail};

use crate::{cargo::cargo, setup::workspace_root};

/// Names of the integration test files in `tests/tests/`.
pub fn integration_test_files() -> Result<Vec<String>> {
    let dir = workspace_root().join("tests/tests");
    let mut names: Vec<String> = fs::read_dir(&dir)
        .with_context(|| format!("read {}", dir.display()))?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            name.strip_suffix(".rs").map(str::to_owned)
        })
        .collect();
    names.sort();
    Ok(names)
}

pub fn run(filter: Option<&str>, skip_unit: bool) -> Result<()> {
    let started = Instant::now();
    println!("test: building the workspace (the eBPF object comes from gateway/build.rs)");
    // Default members: everything but gateway-ebpf, which build.rs cross-compiles.
    cargo(&["build", "--locked", "--bins", "--examples"])?;
    // The preload library is a cdylib, which `--bins` does not build: `gateway socksify` finds
    // it beside the binaries.
    cargo(&["build", "--locked", "-p", "gateway-socksify", "--lib"])?;

    let mut failures = Vec::new();
    if filter.is_none() && !skip_unit {
        println!("test: gateway-client alone, with stable Rust only and no bpf-linker on PATH");
        if let Err(error) = client_without_ebpf_toolchain() {
            failures.push(format!(
                "gateway-client without the eBPF toolchain: {error:#}"
            ));
        }
    }
    if !skip_unit {
        println!("test: unit tests");
        if let Err(error) = cargo(&[
            "test",
            "--locked",
            "--workspace",
            "--exclude",
            "testbed",
            "--exclude",
            "gateway-ebpf",
        ]) {
            failures.push(format!("unit tests: {error:#}"));
        }
    }

    let files = integration_test_files()?;
    let selected = |name: &str| filter.is_none_or(|filter| name.contains(filter));
    // The package's test installs the .deb built once here, from the test build.
    let mut deb = None;
    if files.iter().any(|name| name == DEB_TEST && selected(name)) {
        println!("test: building the Debian package for `{DEB_TEST}`");
        match crate::deb::build(crate::deb::Profile::Dev) {
            Ok(path) => deb = Some(path),
            Err(error) => failures.push(format!("the Debian package: {error:#}")),
        }
    }
    for name in files {
        if !selected(&name) || (name == DEB_TEST && deb.is_none()) {
            continue;
        }
        println!("test: integration test `{name}` (root, network namespaces)");
        if let Err(error) = integration_test(&name, None, deb.as_deref()) {
            failures.push(format!("integration test `{name}`: {error:#}"));
        }
    }
    // The test bed's links are veth, where the gate's default hook is tc: the relay's
    // end-to-end files run once more with the gate in XDP, the hook a NIC with native XDP gets.
    for name in GATE_HOOK_FILES {
        if filter.is_some_and(|filter| !name.contains(filter)) {
            continue;
        }
        println!("test: integration test `{name}` with the gate in XDP (--gate-hook xdp)");
        if let Err(error) = integration_test(name, Some("xdp"), None) {
            failures.push(format!(
                "integration test `{name}` (gate in XDP): {error:#}"
            ));
        }
    }

    if filter.is_none_or(|filter| "fuzz".contains(filter)) {
        println!(
            "test: fuzz short pass ({} s per target)",
            crate::fuzz::SHORT_PASS_SECONDS
        );
        if let Err(error) = crate::setup::ensure_cargo_fuzz()
            .and_then(|()| crate::fuzz::run(crate::fuzz::SHORT_PASS_SECONDS, None))
        {
            failures.push(format!("fuzz short pass: {error:#}"));
        }
    }

    if filter.is_none_or(|filter| "bench".contains(filter)) {
        println!("test: bench smoke run (a few hundred packets per scenario)");
        if let Err(error) = crate::bench::smoke() {
            failures.push(format!("bench smoke run: {error:#}"));
        }
    }

    let elapsed = started.elapsed().as_secs();
    if failures.is_empty() {
        println!("test: all passed in {elapsed} s");
        Ok(())
    } else {
        for failure in &failures {
            eprintln!("test: FAILED: {failure}");
        }
        bail!("{} test group(s) failed after {elapsed} s", failures.len())
    }
}

/// The integration test files that run a second time with the gate's hook forced to XDP: the
/// gate, the relay end to end (release, kill -9, takeover), RAW and partial checksums.
const GATE_HOOK_FILES: [&str; 4] = ["xdp_gate", "enhanced_testbed", "raw_testbed", "multicast"];

/// The integration test file that installs and removes the Debian package.
const DEB_TEST: &str = "deb";

/// `cargo xtask soak`: builds, then runs the `soak` integration test for `minutes`, its summary,
/// CSV and plot written to `out`.
pub fn soak(minutes: f64, out: &std::path::Path) -> Result<()> {
    if minutes.is_nan() || minutes <= 0.0 {
        bail!("--minutes must be more than 0, not {minutes}");
    }
    cargo(&["build", "--locked", "--bins", "--examples"])?;
    let out = workspace_root().join(out);
    println!(
        "soak: {minutes} min; summary, soak.csv and soak.svg go to {}",
        out.display()
    );
    let status = integration_test_command("soak")
        .arg("--nocapture")
        .env("GATEWAY_SOAK_MINUTES", minutes.to_string())
        .env("GATEWAY_SOAK_OUT", &out)
        .status()
        .context("run the soak")?;
    if !status.success() {
        bail!(
            "the soak failed ({status}); see {}/summary.txt",
            out.display()
        );
    }
    Ok(())
}

/// `cargo test` of one integration test file against the debug build, one test at a time
/// (more test-harness arguments may follow).
fn integration_test_command(name: &str) -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()));
    command
        .args([
            "test",
            "--locked",
            "--package",
            "testbed",
            "--test",
            name,
            "--",
            "--test-threads=1",
        ])
        .env("GATEWAY_BIN", workspace_root().join("target/debug/gateway"))
        .current_dir(workspace_root());
    command
}

/// Runs one integration test file; `gate_hook` forces every test-bed daemon's `--gate-hook`;
/// `deb` is the package the package's test installs.
fn integration_test(
    name: &str,
    gate_hook: Option<&str>,
    deb: Option<&std::path::Path>,
) -> Result<()> {
    let mut command = integration_test_command(name);
    if let Some(hook) = gate_hook {
        command.env(testbed::gateway::GATE_HOOK_ENV, hook);
    }
    if let Some(deb) = deb {
        command.env("GATEWAY_DEB", deb);
    }
    let status = command
        .status()
        .with_context(|| format!("run integration test {name}"))?;
    if !status.success() {
        bail!("failed ({status})");
    }
    Ok(())
}

/// Builds and tests `gateway-client` as an application embedding it would: the stable
/// toolchain's own cargo and rustc (no rustup proxy, so no nightly), a PATH without bpf-linker,
/// a target directory of its own (nothing built with the eBPF toolchain is reused), and a check
/// that its dependency tree holds nothing of the eBPF build.
fn client_without_ebpf_toolchain() -> Result<()> {
    let root = workspace_root();
    let stable_bin = |tool: &str| -> Result<std::path::PathBuf> {
        let out = Command::new("rustup")
            .args(["which", "--toolchain", "stable", tool])
            .output()
            .context("run rustup which")?;
        if !out.status.success() {
            bail!(
                "rustup which {tool}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().into())
    };
    let bin = root.join("target/stable-only/bin");
    fs::create_dir_all(&bin)?;
    for tool in ["cargo", "rustc", "rustdoc"] {
        let link = bin.join(tool);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(stable_bin(tool)?, &link)
            .with_context(|| format!("link {}", link.display()))?;
    }
    let path = format!("{}:/usr/bin:/bin", bin.display());
    let hidden = |args: &[&str]| -> Result<String> {
        let out = Command::new(bin.join("cargo"))
            .args(args)
            .current_dir(root)
            .env("PATH", &path)
            .env("CARGO_TARGET_DIR", root.join("target/stable-only/target"))
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("RUSTC")
            .env_remove("CARGO")
            .output()
            .with_context(|| format!("run cargo {}", args.join(" ")))?;
        if !out.status.success() {
            bail!(
                "cargo {} failed:\n{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let tree = hidden(&[
        "tree",
        "--locked",
        "-p",
        "gateway-client",
        "-e",
        "normal,build,dev",
        "--prefix",
        "none",
    ])?;
    for forbidden in ["aya", "gateway-ebpf", "gateway-common", "gateway v"] {
        if tree.lines().any(|line| line.starts_with(forbidden)) {
            bail!("gateway-client depends on {forbidden}:\n{tree}");
        }
    }
    hidden(&["test", "--locked", "-p", "gateway-client", "--all-targets"])?;
    hidden(&["test", "--locked", "-p", "gateway-client", "--doc"])?;
    println!("test: gateway-client builds and passes with stable Rust alone");
    Ok(())
}
