//! `cargo xtask fuzz`: builds the cargo-fuzz targets in `fuzz/` (nightly, libFuzzer, the daemon
//! crate with an empty eBPF object) and runs each for a while on its committed seed corpus,
//! printing per target its executions per second, the coverage it reached and any crash. The
//! short pass of `cargo xtask test` is the same with 15 s per target.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::setup::workspace_root;

/// Seconds per target in `cargo xtask test`'s short pass.
pub const SHORT_PASS_SECONDS: u64 = 15;
/// The differential target (the kernel programs against the model), which reports how many
/// frames it compared ...
const DIFFERENTIAL_TARGET: &str = "datapath";
/// ... and must compare at least this many in a run of [`SHORT_PASS_SECONDS`] or more.
const DIFFERENTIAL_MIN_FRAMES: u64 = 100_000;

/// The targets, as `fuzz/Cargo.toml` names them.
pub fn targets() -> Result<Vec<String>> {
    let manifest = workspace_root().join("fuzz/Cargo.toml");
    let text =
        fs::read_to_string(&manifest).with_context(|| format!("read {}", manifest.display()))?;
    let mut names = Vec::new();
    let mut in_bin = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
        } else if in_bin && let Some(name) = line.strip_prefix("name = ") {
            names.push(name.trim_matches('"').to_owned());
        }
    }
    Ok(names)
}

/// One target's run.
#[derive(Debug)]
struct Outcome {
    target: String,
    executions: u64,
    per_second: u64,
    coverage: Option<u64>,
    features: Option<u64>,
    /// Frames compared with the model (the differential target only).
    frames: Option<u64>,
    crash: Option<String>,
}

/// Builds every target and runs each (or only `only`) for `seconds`.
pub fn run(seconds: u64, only: Option<&str>) -> Result<()> {
    let targets: Vec<String> = targets()?
        .into_iter()
        .filter(|t| only.is_none_or(|only| t == only))
        .collect();
    if targets.is_empty() {
        bail!(
            "no fuzz target {:?}; the targets are: {}",
            only.unwrap_or(""),
            targets_list()?
        );
    }
    let started = Instant::now();
    println!(
        "fuzz: building {} target(s) with cargo +nightly fuzz build",
        targets.len()
    );
    build()?;
    let object = ebpf_object()?;
    println!(
        "fuzz: built in {} s; running each for {seconds} s",
        started.elapsed().as_secs()
    );
    let mut outcomes = Vec::new();
    for target in &targets {
        let outcome = run_one(target, seconds, &object)?;
        println!(
            "fuzz: {:<18} {:>10} runs {:>8}/s  cov {:>5}  ft {:>6}  {}{}",
            outcome.target,
            outcome.executions,
            outcome.per_second,
            outcome.coverage.map_or("?".to_owned(), |c| c.to_string()),
            outcome.features.map_or("?".to_owned(), |f| f.to_string()),
            outcome
                .frames
                .map_or(String::new(), |f| format!("{f} frames compared, ")),
            outcome
                .crash
                .as_deref()
                .map_or("no crash".to_owned(), |c| format!("CRASH: {c}"))
        );
        outcomes.push(outcome);
    }
    let crashed: Vec<&Outcome> = outcomes.iter().filter(|o| o.crash.is_some()).collect();
    if !crashed.is_empty() {
        bail!(
            "{} target(s) crashed: {} (reproduce: fuzz/target/x86_64-unknown-linux-gnu/release/TARGET ARTIFACT)",
            crashed.len(),
            crashed
                .iter()
                .map(|o| o.target.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if seconds >= SHORT_PASS_SECONDS
        && let Some(differential) = outcomes.iter().find(|o| o.target == DIFFERENTIAL_TARGET)
        && differential.crash.is_none()
    {
        let frames = differential.frames.unwrap_or(0);
        if frames < DIFFERENTIAL_MIN_FRAMES {
            bail!(
                "the {DIFFERENTIAL_TARGET} target compared {frames} frames with the model in \
                 {seconds} s, fewer than {DIFFERENTIAL_MIN_FRAMES}"
            );
        }
    }
    println!(
        "fuzz: {} target(s), no crash, {} s in all",
        outcomes.len(),
        started.elapsed().as_secs()
    );
    Ok(())
}

fn targets_list() -> Result<String> {
    Ok(targets()?.join(", "))
}

/// `cargo +nightly fuzz build` with debug assertions (overflow checks) and without a sanitizer
/// (the targets are safe Rust; the sanitizer would only slow them).
fn build() -> Result<()> {
    let status = Command::new("cargo")
        .args([
            "+nightly",
            "fuzz",
            "build",
            "--release",
            "--debug-assertions",
            "--sanitizer",
            "none",
        ])
        .current_dir(workspace_root().join("fuzz"))
        // Only the daemon crate's pure parsers are fuzzed: an empty eBPF object will do.
        .env("AYA_BUILD_SKIP", "1")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .status()
        .context("run cargo +nightly fuzz build (is cargo-fuzz installed? `cargo xtask setup`)")?;
    if !status.success() {
        bail!("cargo +nightly fuzz build failed with {status}");
    }
    Ok(())
}

/// Names the eBPF object for the `datapath` target, which runs the real programs.
const EBPF_OBJECT_ENV: &str = "GATEWAY_EBPF_OBJECT";

/// The eBPF object the main workspace's debug build embeds (built here if it is not yet): the
/// newest non-empty `gateway` in a `gateway-*/out` build directory.
fn ebpf_object() -> Result<PathBuf> {
    crate::cargo::cargo(&["build", "--locked", "-p", "gateway", "--bin", "gateway"])?;
    let build = workspace_root().join("target/debug/build");
    let newest = fs::read_dir(&build)
        .with_context(|| format!("read {}", build.display()))?
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("gateway-"))
        .map(|entry| entry.path().join("out/gateway"))
        .filter_map(|path| {
            let meta = fs::metadata(&path).ok()?;
            (meta.len() > 0).then(|| (meta.modified().ok(), path))
        })
        .max_by_key(|(modified, _)| *modified)
        .map(|(_, path)| path);
    newest.with_context(|| format!("no eBPF object under {}/gateway-*/out", build.display()))
}

fn binary(target: &str) -> PathBuf {
    workspace_root()
        .join("fuzz/target/x86_64-unknown-linux-gnu/release")
        .join(target)
}

/// Runs `target` for `seconds` on a scratch corpus (under target/) seeded from the committed
/// one (read, never written).
fn run_one(target: &str, seconds: u64, object: &Path) -> Result<Outcome> {
    let root = workspace_root();
    let scratch = root.join("target/fuzz/corpus").join(target);
    let artifacts = root.join("target/fuzz/artifacts").join(target);
    let seeds = root.join("fuzz/corpus").join(target);
    for dir in [&scratch, &artifacts] {
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let mut command = Command::new(binary(target));
    command
        .arg(format!("-max_total_time={seconds}"))
        .arg("-print_final_stats=1")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg(&scratch)
        .env(EBPF_OBJECT_ENV, object)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if seeds.is_dir() {
        command.arg(&seeds);
    }
    let output = command
        .output()
        .with_context(|| format!("run the fuzz target {target}"))?;
    let log = String::from_utf8_lossy(&output.stderr);
    let stat = |key: &str| -> Option<u64> {
        log.lines()
            .find_map(|line| line.strip_prefix(key))
            .and_then(|rest| rest.trim().parse().ok())
    };
    let last_status = log.lines().rev().find(|line| line.contains(" cov: "));
    let field = |name: &str| -> Option<u64> {
        let line = last_status?;
        let at = line.find(name)? + name.len();
        line[at..].split_whitespace().next()?.parse().ok()
    };
    let crash = (!output.status.success()).then(|| crash_summary(&log, &artifacts));
    Ok(Outcome {
        target: target.to_owned(),
        executions: stat("stat::number_of_executed_units:").unwrap_or(0),
        per_second: stat("stat::average_exec_per_sec:").unwrap_or(0),
        coverage: field("cov: "),
        features: field("ft: "),
        frames: log.lines().rev().find_map(|line| {
            line.strip_prefix("datapath: ")?
                .strip_suffix(" frames compared with the model")?
                .parse()
                .ok()
        }),
        crash,
    })
}

/// The panic message and the artifact of a crash.
fn crash_summary(log: &str, artifacts: &Path) -> String {
    let message = log
        .lines()
        .skip_while(|line| !line.contains("panicked at"))
        .take(3)
        .collect::<Vec<_>>()
        .join(" / ");
    let artifact = log
        .lines()
        .find_map(|line| line.split("Test unit written to ").nth(1))
        .map_or_else(|| artifacts.display().to_string(), str::to_owned);
    if message.is_empty() {
        format!("libFuzzer stopped (see {artifact})")
    } else {
        format!("{message} (input {artifact})")
    }
}
