//! `cargo xtask bench [--quick]`: builds the gateway and the bench crate in release mode and runs
//! the `bench` binary (root), which brings up its own namespaces, prints progress and a table,
//! and writes `target/bench/results.json` and plots. The heavy logic lives in the `bench` crate
//! (it needs the gateway's client library and aya); xtask only builds, runs and, for the smoke
//! run inside `cargo xtask test`, checks that every scenario produced numbers.

use std::{path::Path, process::Command};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::{cargo::cargo, setup::workspace_root};

/// Builds and runs the bench in `mode` (`full`, `quick` or `smoke`), results into `out`.
pub fn run(mode: &str, only: Option<&str>, out: &Path) -> Result<()> {
    println!("bench: building the gateway and the bench (release)");
    cargo(&[
        "build",
        "--release",
        "--locked",
        "--package",
        "gateway",
        "--package",
        "bench",
    ])?;
    let release = workspace_root().join("target/release");
    let mut cmd = Command::new(release.join("bench"));
    cmd.args(["--mode", mode, "--out"])
        .arg(out)
        .env("GATEWAY_BIN", release.join("gateway"))
        .current_dir(workspace_root());
    if let Some(only) = only {
        cmd.args(["--only", only]);
    }
    let status = cmd.status().context("run target/release/bench")?;
    if !status.success() {
        bail!("the bench failed ({status})");
    }
    Ok(())
}

/// The smoke run of `cargo xtask test`: a few hundred packets per scenario, then checks that the
/// JSON parses and every scenario has numbers. Timings are never asserted.
pub fn smoke() -> Result<()> {
    let out = workspace_root().join("target/bench-smoke");
    let _ = std::fs::remove_dir_all(&out);
    run("smoke", None, &out)?;
    let path = out.join("results.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let document: Value = serde_json::from_str(&text).context("parse results.json")?;
    let missing = check_document(&document);
    if !missing.is_empty() {
        bail!(
            "the bench smoke run lacks numbers for: {}",
            missing.join(", ")
        );
    }
    for plot in [
        "relay_pps",
        "relay_cpu",
        "drop_cpu",
        "latency_low",
        "scale",
        "control",
    ] {
        for ext in ["svg", "png"] {
            let file = out.join(format!("{plot}.{ext}"));
            if !file.exists() {
                bail!("the bench smoke run wrote no {}", file.display());
            }
        }
    }
    println!("bench: smoke run OK ({})", out.display());
    Ok(())
}

fn positive(value: &Value) -> bool {
    value.as_f64().is_some_and(|v| v.is_finite() && v > 0.0)
}

/// Every scenario of the document that has no (positive) figure.
pub fn check_document(doc: &Value) -> Vec<String> {
    let summary = &doc["summary"];
    let mut missing = Vec::new();
    let mut need = |what: String, value: &Value| {
        if !positive(value) {
            missing.push(what);
        }
    };
    for size in ["200", "1200"] {
        for arm in ["kernel", "userspace", "dante", "plain", "local_sink"] {
            need(
                format!("relay {size} {arm}"),
                &summary["relay"][size][arm]["delivered_pps"]["median"],
            );
        }
    }
    for arm in ["xdp", "nft", "closed", "null_device"] {
        need(
            format!("drop {arm}"),
            &summary["drop"][arm]["offered_pps"]["median"],
        );
    }
    for key in ["quiet", "flood"] {
        need(
            format!("collateral {key}"),
            &summary["collateral"][key]["legit_pps"]["median"],
        );
    }
    for key in ["enhanced", "gateway_associate", "dante_associate"] {
        need(
            format!("control {key}"),
            &summary["control"][key]["per_second"]["median"],
        );
    }
    need("memory".to_owned(), &summary["memory"]["live"]);
    for arm in ["kernel", "userspace", "dante", "plain"] {
        for rate in ["low", "half"] {
            need(
                format!("latency {arm} {rate}"),
                &summary["latency"][arm][rate]["p50_us"]["median"],
            );
        }
    }
    let scale = summary["scale"].as_object().map_or(0, serde_json::Map::len);
    if scale < 3 {
        missing.push(format!("scale ({scale} entry counts)"));
    }
    if doc["targets"].as_array().is_none_or(Vec::is_empty) {
        missing.push("targets".to_owned());
    }
    if let Some(errors) = doc["errors"].as_array()
        && !errors.is_empty()
    {
        missing.push(format!(
            "{} failed scenario run(s): {errors:?}",
            errors.len()
        ));
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_document_lacks_everything() {
        let missing = check_document(&serde_json::json!({}));
        assert!(missing.iter().any(|m| m == "relay 200 kernel"));
        assert!(missing.iter().any(|m| m == "memory"));
        assert!(missing.iter().any(|m| m == "targets"));
    }
}
