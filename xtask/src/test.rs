//! `cargo xtask test`: build, unit tests, then the root-only integration tests of `tests/`, one
//! file at a time and one test at a time (they create namespaces and attach programs), collecting
//! every failure before reporting.

use std::{fs, process::Command, time::Instant};

use anyhow::{Context as _, Result, bail};

use crate::setup::workspace_root;

pub fn cargo(args: &[&str]) -> Result<()> {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()))
        .args(args)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("run cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed with {status}", args.join(" "));
    }
    Ok(())
}

/// Names of the integration test files in `tests/tests/`.
pub fn integration_tests() -> Result<Vec<String>> {
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
    cargo(&["build", "--locked", "--bins"])?;

    let mut failures = Vec::new();
    if !skip_unit {
        println!("test: unit tests");
        if let Err(error) = cargo(&[
            "test",
            "--locked",
            "--workspace",
            "--exclude",
            "integration-tests",
            "--exclude",
            "gateway-ebpf",
        ]) {
            failures.push(format!("unit tests: {error:#}"));
        }
    }

    let gateway_bin = workspace_root().join("target/debug/gateway");
    for name in integration_tests()? {
        if filter.is_some_and(|filter| !name.contains(filter)) {
            continue;
        }
        println!("test: integration test `{name}` (root, network namespaces)");
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()))
            .args([
                "test",
                "--locked",
                "--package",
                "integration-tests",
                "--test",
                &name,
                "--",
                "--test-threads=1",
            ])
            .env("GATEWAY_BIN", &gateway_bin)
            .current_dir(workspace_root())
            .status()
            .with_context(|| format!("run integration test {name}"))?;
        if !status.success() {
            failures.push(format!("integration test `{name}` failed ({status})"));
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
