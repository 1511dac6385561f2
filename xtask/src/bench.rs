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
    release_daemon_holds_only_the_daemon(&release.join("gateway"))?;
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

/// The release `gateway` binary carries none of the RTSP client's code (it lives in
/// `gateway-rtsp-get`): no symbol of `gateway_rtsp`, `rtsp_types` or `hound`, while symbols of the
/// crates it does hold (`gateway_proto`) are there, so the check cannot pass on a stripped binary.
fn release_daemon_holds_only_the_daemon(binary: &Path) -> Result<()> {
    let bytes = std::fs::read(binary).with_context(|| format!("read {}", binary.display()))?;
    let count = |needle: &str| {
        bytes
            .windows(needle.len())
            .filter(|window| *window == needle.as_bytes())
            .count()
    };
    if count("gateway_proto") == 0 {
        bail!("{} has no symbols to check", binary.display());
    }
    for foreign in ["gateway_rtsp", "rtsp_types", "hound"] {
        let found = count(foreign);
        if found > 0 {
            bail!(
                "{} holds {found} symbol(s) of {foreign}: the RTSP client belongs in \
                 gateway-rtsp-get",
                binary.display()
            );
        }
    }
    println!("bench: the release gateway binary holds no RTSP client code");
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
    // The profile area: the smoke run profiles the default kernel relay arm.
    let flame = out.join("flame-kernel.svg");
    if !std::fs::read_to_string(&flame).is_ok_and(|svg| svg.contains("<svg")) {
        bail!(
            "the bench smoke run wrote no flame graph {}",
            flame.display()
        );
    }
    println!("bench: smoke run OK ({})", out.display());
    Ok(())
}

fn positive(value: &Value) -> bool {
    value.as_f64().is_some_and(|v| v.is_finite() && v > 0.0)
}

/// What a churn run left behind (anything unreadable counts as left): the smoke churn must leave
/// nothing, like the full one.
fn churn_left(churn: &Value) -> u64 {
    let count = |value: &Value| value.as_u64().unwrap_or(u64::MAX);
    [
        "bindings_left",
        "relay_entries_left",
        "timers_left",
        "internal_ports_left",
        "external_ports_left",
    ]
    .iter()
    .map(|key| count(&churn[*key]))
    .chain(
        churn["map_entries_left"]
            .as_object()
            .map_or(vec![u64::MAX], |maps| maps.values().map(count).collect()),
    )
    .fold(0u64, u64::saturating_add)
}

/// Subscriber counts of the multicast area (`summary.multicast.subscribers_N`).
const MULTICAST_SUBSCRIBERS: [usize; 3] = [1, 8, 64];

/// What the multicast area lacks: a delivered rate (positive), the CPU per delivered datagram
/// (a number: a smoke window at 2,000 pps can fall inside one `/proc/stat` tick and read 0) and
/// the kernel's share of the copies (0 to 1) for every subscriber count.
fn multicast_missing(summary: &Value) -> Vec<String> {
    let mut missing = Vec::new();
    for subscribers in MULTICAST_SUBSCRIBERS {
        let figures = &summary["multicast"][format!("subscribers_{subscribers}")];
        if !positive(&figures["delivered_pps"]["median"]) {
            missing.push(format!("multicast {subscribers} subscribers delivered_pps"));
        }
        if !figures["cpu_ns_per_delivered"]["median"]
            .as_f64()
            .is_some_and(|cpu| cpu.is_finite() && cpu >= 0.0)
        {
            missing.push(format!(
                "multicast {subscribers} subscribers cpu_ns_per_delivered"
            ));
        }
        // Who carried it must be known (0 is a figure here: all copies by the userspace relay).
        if !figures["kernel_share"]["median"]
            .as_f64()
            .is_some_and(|share| (0.0..=1.0).contains(&share))
        {
            missing.push(format!("multicast {subscribers} subscribers kernel_share"));
        }
    }
    missing
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
        for arm in [
            "kernel",
            "kernel_xdp",
            "raw",
            "raw_xdp",
            "userspace",
            "dante",
            "plain",
            "plain_xdp",
            "nft_nat",
            "local_sink",
        ] {
            need(
                format!("relay {size} {arm}"),
                &summary["relay"][size][arm]["delivered_pps"]["median"],
            );
        }
    }
    for arm in ["xdp", "xdp_monitor", "nft", "closed", "null_device"] {
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
    for key in [
        "enhanced",
        "enhanced_pipelined",
        "gateway_associate",
        "dante_associate",
    ] {
        need(
            format!("control {key}"),
            &summary["control"][key]["per_second"]["median"],
        );
    }
    need("memory".to_owned(), &summary["memory"]["live"]);
    need("churn".to_owned(), &summary["churn"]["done"]);
    for arm in ["kernel", "userspace", "dante", "plain"] {
        for rate in ["low", "half"] {
            need(
                format!("latency {arm} {rate}"),
                &summary["latency"][arm][rate]["p50_us"]["median"],
            );
        }
    }
    need(
        "profile kernel".to_owned(),
        &summary["profile"]["kernel"]["samples"],
    );
    let scale = summary["scale"].as_object().map_or(0, serde_json::Map::len);
    if scale < 3 {
        missing.push(format!("scale ({scale} entry counts)"));
    }
    missing.extend(multicast_missing(summary));
    let left = churn_left(&summary["churn"]);
    if left > 0 {
        missing.push(format!(
            "churn left {left} bindings, relay entries, timers, ports or map entries"
        ));
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
    fn a_daemon_binary_with_rtsp_symbols_or_without_symbols_is_refused() {
        let dir = std::env::temp_dir().join(format!("xtask-binary-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let check = |name: &str, content: &[u8]| {
            let path = dir.join(name);
            std::fs::write(&path, content).unwrap();
            release_daemon_holds_only_the_daemon(&path)
        };
        assert!(check("daemon", b"..gateway_proto::codec..").is_ok());
        assert!(check("with-rtsp", b"gateway_proto gateway_rtsp::client").is_err());
        assert!(check("stripped", b"no names at all").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_empty_document_lacks_everything() {
        let missing = check_document(&serde_json::json!({}));
        assert!(missing.iter().any(|m| m == "relay 200 kernel"));
        assert!(missing.iter().any(|m| m == "memory"));
        assert!(missing.iter().any(|m| m == "targets"));
        assert!(missing.iter().any(|m| m == "churn"));
    }

    #[test]
    fn multicast_needs_rate_cpu_and_kernel_share_for_every_subscriber_count() {
        let figures = |pps: f64, share: Option<f64>| {
            serde_json::json!({
                "delivered_pps": {"median": pps},
                "cpu_ns_per_delivered": {"median": 900.0},
                "kernel_share": {"median": share},
            })
        };
        let multicast = |n64: serde_json::Value| {
            check_document(&serde_json::json!({"summary": {"multicast": {
                "subscribers_1": figures(1000.0, Some(1.0)),
                "subscribers_8": figures(8000.0, Some(0.0)),
                "subscribers_64": n64,
            }}}))
            .into_iter()
            .filter(|m| m.starts_with("multicast"))
            .collect::<Vec<_>>()
        };
        assert!(multicast(figures(64_000.0, Some(0.9))).is_empty());
        let no_cpu_tick = serde_json::json!({
            "delivered_pps": {"median": 2000.0},
            "cpu_ns_per_delivered": {"median": 0.0},
            "kernel_share": {"median": 1.0},
        });
        assert!(multicast(no_cpu_tick).is_empty(), "0 CPU is a reading");
        let no_cpu = serde_json::json!({
            "delivered_pps": {"median": 2000.0},
            "kernel_share": {"median": 1.0},
        });
        assert_eq!(
            multicast(no_cpu),
            vec!["multicast 64 subscribers cpu_ns_per_delivered"]
        );
        assert_eq!(
            multicast(figures(0.0, None)),
            vec![
                "multicast 64 subscribers delivered_pps",
                "multicast 64 subscribers kernel_share"
            ]
        );
        let empty = check_document(&serde_json::json!({}));
        assert!(
            empty
                .iter()
                .any(|m| m == "multicast 1 subscribers delivered_pps")
        );
    }

    #[test]
    fn a_churn_that_left_something_is_reported() {
        let with = |left: u64| {
            check_document(&serde_json::json!({"summary": {"churn": {
                "done": 100,
                "bindings_left": 0,
                "relay_entries_left": 0,
                "timers_left": 0,
                "internal_ports_left": left,
                "external_ports_left": 0,
                "map_entries_left": {"BINDINGS": 0, "OUTBOUND": 0},
            }}}))
        };
        assert!(!with(0).iter().any(|m| m.starts_with("churn")));
        assert!(with(2).iter().any(|m| m.starts_with("churn left 2")));
    }
}
