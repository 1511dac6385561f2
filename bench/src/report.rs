//! Turns the measured runs into summaries (median and spread of every figure), ratios between
//! arms, the targets against the measured numbers, the printed table and the JSON
//! document. Pure: no I/O.

use std::fmt::Write as _;

use serde::Serialize;
use serde_json::{Value, json};

use crate::{
    model::{MulticastRun, Results, StreamRun, median_of, summary},
    stats::{Summary, ratio},
};

/// Loss below which the arm kept up with everything offered.
const KEPT_UP_LOSS: f64 = 0.01;

/// Arms of the media relay in table order, with their labels.
pub const RELAY_ARMS: [(&str, &str); 9] = [
    ("kernel", "in-kernel relay"),
    ("kernel_xdp", "kernel, XDP gate"),
    ("raw", "in-kernel RAW"),
    ("raw_xdp", "RAW, XDP gate"),
    ("userspace", "userspace relay"),
    ("dante", "Dante sockd"),
    ("plain", "plain forwarding"),
    ("plain_xdp", "plain + XDP pass"),
    ("nft_nat", "nft DNAT hole"),
];

/// Drop arms in table order.
pub const DROP_ARMS: [(&str, &str); 5] = [
    ("xdp", "gateway gate"),
    ("xdp_monitor", "gate, monitor on"),
    ("nft", "nft netdev ingress"),
    ("closed", "closed port"),
    ("null_device", "sender only (null dev)"),
];

/// Who limited a stream's rate.
pub fn bottleneck(runs: &[StreamRun]) -> &'static str {
    let loss = median_of(runs, |r| r.loss);
    let offered = median_of(runs, |r| r.offered_pps);
    #[expect(clippy::cast_precision_loss, reason = "packet counts")]
    let rcvbuf = median_of(runs, |r| r.rcvbuf_errors as f64);
    if loss.is_nan() {
        "n/a"
    } else if loss < KEPT_UP_LOSS {
        "sender"
    } else if rcvbuf > offered * 0.005 {
        "sink"
    } else {
        "arm"
    }
}

/// The baseline CPU per packet for payload `size` (the sender into a local sink).
fn baseline_cpu(results: &Results, size: usize) -> f64 {
    results
        .relay
        .get(&size)
        .and_then(|arms| arms.get("local_sink"))
        .map_or(f64::NAN, |runs| median_of(runs, |r| r.cpu_ns_per_delivered))
}

fn null_device_cpu(results: &Results) -> f64 {
    results
        .drop
        .get("null_device")
        .map_or(f64::NAN, |runs| median_of(runs, |r| r.cpu_ns_per_offered))
}

fn relay_runs<'a>(results: &'a Results, size: usize, arm: &str) -> &'a [StreamRun] {
    results
        .relay
        .get(&size)
        .and_then(|arms| arms.get(arm))
        .map_or(&[], Vec::as_slice)
}

/// Median delivered pps of an arm at a size.
pub fn relay_pps(results: &Results, size: usize, arm: &str) -> f64 {
    median_of(relay_runs(results, size, arm), |r| r.delivered_pps)
}

/// Median CPU per delivered packet, net of the sender's cost into a local sink.
pub fn relay_net_cpu(results: &Results, size: usize, arm: &str) -> f64 {
    let base = baseline_cpu(results, size);
    median_of(relay_runs(results, size, arm), |r| {
        r.cpu_ns_per_delivered - base
    })
}

fn drop_net_cpu(results: &Results, arm: &str) -> f64 {
    let base = null_device_cpu(results);
    results.drop.get(arm).map_or(f64::NAN, |runs| {
        median_of(runs, |r| r.cpu_ns_per_offered - base)
    })
}

fn latency_runs<'a>(results: &'a Results, arm: &str, rate: &str) -> &'a [crate::model::PingRun] {
    results
        .latency
        .get(arm)
        .and_then(|rates| rates.get(rate))
        .map_or(&[], Vec::as_slice)
}

#[expect(clippy::cast_precision_loss, reason = "ns to us")]
fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

/// One of the targets against the measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// The target's text, exactly as the issue states it.
    pub target: String,
    /// The measured value (a ratio, a percentage, microseconds: the target's unit); `None`
    /// (null) when it could not be measured.
    pub measured: Option<f64>,
    /// `None` when it could not be measured.
    pub met: Option<bool>,
    /// How far off (or ahead), in words, or why it could not be measured.
    pub margin: String,
}

/// `a / b` for costs: NaN unless both are positive (a net cost at or below zero means the
/// measurement drowned in noise, and a ratio of it means nothing).
pub fn cost_ratio(a: f64, b: f64) -> f64 {
    if a > 0.0 && b > 0.0 { a / b } else { f64::NAN }
}

/// Which way a target bounds its figure.
#[derive(Clone, Copy)]
enum Bound {
    AtLeast(f64),
    AtMost(f64),
}

/// `text` is the target as stated (the bound included); `bound` the number it names.
fn target(text: &str, value: f64, bound: Bound) -> Target {
    let (met, limit) = match bound {
        Bound::AtLeast(floor) => (value >= floor, floor),
        Bound::AtMost(ceiling) => (value <= ceiling, ceiling),
    };
    Target {
        target: text.to_owned(),
        measured: value.is_finite().then_some(value),
        met: value.is_finite().then_some(met),
        margin: if !value.is_finite() {
            "not measured".to_owned()
        } else if limit == 0.0 {
            format!("{value:+.3} against 0")
        } else {
            format!("{:+.0} % of the target", (value / limit - 1.0) * 100.0)
        },
    }
}

/// The targets, evaluated on the medians. The kernel relay is the `kernel` arm: the default
/// mode an operator gets (the gate's default hook, the 8-octet header).
#[expect(clippy::too_many_lines, reason = "one target after the other")]
pub fn targets(results: &Results) -> Vec<Target> {
    let mut out = Vec::new();
    for size in results.relay.keys().copied() {
        let kernel = relay_pps(results, size, "kernel");
        let kernel_cpu = relay_net_cpu(results, size, "kernel");
        out.push(target(
            &format!("{size} B: kernel relay pps / plain forwarding pps >= 1.0"),
            ratio(kernel, relay_pps(results, size, "plain")),
            Bound::AtLeast(1.0),
        ));
        out.push(target(
            &format!("{size} B: kernel relay CPU/pkt / plain forwarding CPU/pkt <= 1.0"),
            cost_ratio(kernel_cpu, relay_net_cpu(results, size, "plain")),
            Bound::AtMost(1.0),
        ));
        if size == 200 {
            out.push(target(
                "200 B: kernel relay pps / Dante pps >= 5",
                ratio(kernel, relay_pps(results, size, "dante")),
                Bound::AtLeast(5.0),
            ));
        }
        out.push(target(
            &format!("{size} B: kernel relay CPU/pkt / Dante CPU/pkt (net of sender) <= 0.2"),
            cost_ratio(kernel_cpu, relay_net_cpu(results, size, "dante")),
            Bound::AtMost(0.2),
        ));
        out.push(target(
            &format!(
                "{size} B: kernel relay CPU/pkt / userspace relay CPU/pkt (net of sender) <= 1/3"
            ),
            cost_ratio(kernel_cpu, relay_net_cpu(results, size, "userspace")),
            Bound::AtMost(1.0 / 3.0),
        ));
    }
    if !results.drop.is_empty() {
        out.push(target(
            "XDP drop CPU/pkt / nft ingress drop CPU/pkt <= 1.0",
            cost_ratio(drop_net_cpu(results, "xdp"), drop_net_cpu(results, "nft")),
            Bound::AtMost(1.0),
        ));
    }
    if results.drop.contains_key("xdp_monitor") {
        let program = |arm: &str| {
            results.drop.get(arm).map_or(f64::NAN, |runs| {
                median_of(runs, |r| r.program_ns_per_packet.unwrap_or(f64::NAN))
            })
        };
        out.push(target(
            "gate's own ns/pkt under a junk flood, monitor watching / not watching <= 1.05",
            cost_ratio(program("xdp_monitor"), program("xdp")),
            Bound::AtMost(1.05),
        ));
    }
    if let Some(flood) = results.collateral.get("flood") {
        let worst = flood.iter().map(|r| r.loss).fold(f64::NAN, f64::max);
        out.push(target(
            "legitimate stream loss under the junk flood (worst run) <= 0 %",
            worst * 100.0,
            Bound::AtMost(0.0),
        ));
        if let Some(quiet) = results.collateral.get("quiet") {
            #[expect(clippy::cast_precision_loss, reason = "nanoseconds")]
            let p99 = |runs: &[crate::model::CollateralRun]| {
                median_of(runs, |r| r.delay_p99_ns as f64) / 1000.0
            };
            out.push(target(
                "legitimate stream p99 delay growth under the junk flood <= 50 us",
                p99(flood) - p99(quiet),
                Bound::AtMost(50.0),
            ));
        }
    }
    // The targets' load: a client that pipelines its requests (the lock-step row is reported
    // beside it).
    if let Some(enhanced) = results.control.get("enhanced_pipelined") {
        out.push(target(
            "two-step bindings per second (bind+connect+release) >= 40000/s",
            median_of(enhanced, |r| r.per_second),
            Bound::AtLeast(40_000.0),
        ));
        out.push(target(
            "p99 two-step setup latency <= 2000 us",
            median_of(enhanced, |r| r.p99_us),
            Bound::AtMost(2000.0),
        ));
    }
    if let Some(memory) = &results.memory {
        out.push(target(
            "daemon RSS per live binding <= 1024 B",
            memory.bytes_per_binding,
            Bound::AtMost(1024.0),
        ));
        #[expect(clippy::cast_precision_loss, reason = "binding counts")]
        out.push(target(
            &format!("live bindings held at once >= {}", memory.target),
            memory.live as f64,
            Bound::AtLeast(memory.target as f64),
        ));
    }
    if let Some(churn) = &results.churn {
        #[expect(clippy::cast_precision_loss, reason = "counts")]
        out.push(target(
            &format!(
                "churn: leaked ports, map entries and fds after {} bindings <= 0",
                churn.target
            ),
            churn.leaked() as f64,
            Bound::AtMost(0.0),
        ));
        out.push(target(
            &format!(
                "churn: daemon RSS growth after {} bindings <= 5 %",
                churn.target
            ),
            churn.rss_growth_percent(),
            Bound::AtMost(5.0),
        ));
    }
    let (small, large) = (
        results.scale.keys().next().copied(),
        results.scale.keys().next_back().copied(),
    );
    if let (Some(small), Some(large)) = (small, large)
        && small != large
    {
        out.push(target(
            &format!("kernel relay pps with {large} entries / with {small} >= 0.95"),
            ratio(
                median_of(&results.scale[&large], |r| r.delivered_pps),
                median_of(&results.scale[&small], |r| r.delivered_pps),
            ),
            Bound::AtLeast(0.95),
        ));
    }
    for rate in ["low", "half"] {
        let kernel = median_of(latency_runs(results, "kernel", rate), |r| us(r.p99_ns));
        let plain = median_of(latency_runs(results, "plain", rate), |r| us(r.p99_ns));
        if kernel.is_finite() || plain.is_finite() {
            out.push(target(
                &format!(
                    "added p99 RTT of the kernel relay over plain forwarding ({rate} rate) <= 20 us"
                ),
                kernel - plain,
                Bound::AtMost(20.0),
            ));
        }
    }
    out
}

fn fmt_summary(s: Option<Summary>, scale: f64, decimals: usize) -> String {
    match s {
        Some(s) => {
            // A range wider than the median itself says more as its top.
            let spread = match s.spread {
                Some(p) if p > 2.0 => format!(" (max {:.*})", decimals, s.max * scale),
                Some(p) => format!(" ±{:.0}%", p * 50.0),
                None => String::new(),
            };
            format!("{:.*}{spread}", decimals, s.median * scale)
        }
        None => "-".to_owned(),
    }
}

fn fmt_ratio(value: f64) -> String {
    if value.is_finite() {
        format!("{value:.2}")
    } else {
        "n/a".to_owned()
    }
}

/// The printed table. `±x%` is half the min-max range over the median.
#[expect(clippy::too_many_lines, reason = "one table, section by section")]
pub fn table(results: &Results) -> String {
    let mut out = String::new();
    let m = &results.meta;
    let _ = writeln!(
        out,
        "\n== gateway bench ({} mode: median of {} run(s), ±x% = half the min-max range, (max x) when wider than the median; {} CPUs, kernel {})",
        m.mode, m.runs, m.cpus, m.kernel
    );
    for (size, arms) in &results.relay {
        let base = baseline_cpu(results, *size);
        let _ = writeln!(
            out,
            "\n[1] inbound media relay, {size}-octet payloads (CPU = all CPUs' busy time per delivered \
             packet; net = minus the sender's cost into a local sink, {base:.0} ns)"
        );
        let _ = writeln!(
            out,
            "{:<22}{:>18}{:>18}{:>13}{:>16}{:>16}{:>11}",
            "arm", "offered pps", "delivered pps", "loss %", "CPU ns/pkt", "net ns/pkt", "limit"
        );
        let mut rows: Vec<(&str, &str)> = RELAY_ARMS.to_vec();
        rows.push(("local_sink", "sender->local sink"));
        for (key, label) in rows {
            let Some(runs) = arms.get(key) else { continue };
            let _ = writeln!(
                out,
                "{label:<22}{:>18}{:>18}{:>13}{:>16}{:>16}{:>11}",
                fmt_summary(summary(runs, |r| r.offered_pps), 1.0, 0),
                fmt_summary(summary(runs, |r| r.delivered_pps), 1.0, 0),
                fmt_summary(summary(runs, |r| r.loss), 100.0, 2),
                fmt_summary(summary(runs, |r| r.cpu_ns_per_delivered), 1.0, 0),
                if key == "local_sink" {
                    "-".to_owned()
                } else {
                    fmt_summary(summary(runs, |r| r.cpu_ns_per_delivered - base), 1.0, 0)
                },
                bottleneck(runs),
            );
        }
        let pps = |arm| relay_pps(results, *size, arm);
        let cpu = |arm| relay_net_cpu(results, *size, arm);
        let _ = writeln!(
            out,
            "ratios: kernel/plain pps {}, kernel/userspace pps {}, kernel/Dante pps {}; net CPU kernel/userspace {}, kernel/Dante {}",
            fmt_ratio(ratio(pps("kernel"), pps("plain"))),
            fmt_ratio(ratio(pps("kernel"), pps("userspace"))),
            fmt_ratio(ratio(pps("kernel"), pps("dante"))),
            fmt_ratio(cost_ratio(cpu("kernel"), cpu("userspace"))),
            fmt_ratio(cost_ratio(cpu("kernel"), cpu("dante"))),
        );
        let _ = writeln!(
            out,
            "RAW: raw/plain pps {}, raw/kernel pps {}; net CPU raw/kernel {}, raw/plain {}",
            fmt_ratio(ratio(pps("raw"), pps("plain"))),
            fmt_ratio(ratio(pps("raw"), pps("kernel"))),
            fmt_ratio(cost_ratio(cpu("raw"), cpu("kernel"))),
            fmt_ratio(cost_ratio(cpu("raw"), cpu("plain"))),
        );
    }
    if !results.drop.is_empty() {
        let base = null_device_cpu(results);
        let _ = writeln!(
            out,
            "\n[2] unsolicited drop, 64-octet junk flat out at fw's external address (net = minus the \
             sender's cost into a null device, {base:.0} ns; the sender limits every arm)"
        );
        let _ = writeln!(
            out,
            "{:<24}{:>18}{:>16}{:>16}{:>12}{:>14}",
            "arm", "dropped pps", "CPU ns/pkt", "net ns/pkt", "verified", "prog ns/pkt"
        );
        for (key, label) in DROP_ARMS {
            let Some(runs) = results.drop.get(key) else {
                continue;
            };
            let _ = writeln!(
                out,
                "{label:<24}{:>18}{:>16}{:>16}{:>12}{:>14}",
                fmt_summary(summary(runs, |r| r.offered_pps), 1.0, 0),
                fmt_summary(summary(runs, |r| r.cpu_ns_per_offered), 1.0, 0),
                if key == "null_device" {
                    "-".to_owned()
                } else {
                    fmt_summary(summary(runs, |r| r.cpu_ns_per_offered - base), 1.0, 0)
                },
                summary(runs, |r| r.drops_verified.unwrap_or(f64::NAN))
                    .map_or_else(|| "-".to_owned(), |s| format!("{:.1} %", s.median * 100.0)),
                summary(runs, |r| r.program_ns_per_packet.unwrap_or(f64::NAN))
                    .map_or_else(|| "-".to_owned(), |s| format!("{:.1}", s.median)),
            );
        }
        let _ = writeln!(
            out,
            "ratio: XDP/nft CPU per dropped packet {} (net), {} (raw)",
            fmt_ratio(cost_ratio(
                drop_net_cpu(results, "xdp"),
                drop_net_cpu(results, "nft")
            )),
            fmt_ratio(ratio(
                results
                    .drop
                    .get("xdp")
                    .map_or(f64::NAN, |r| median_of(r, |r| r.cpu_ns_per_offered)),
                results
                    .drop
                    .get("nft")
                    .map_or(f64::NAN, |r| median_of(r, |r| r.cpu_ns_per_offered)),
            )),
        );
    }
    if !results.collateral.is_empty() {
        let _ = writeln!(
            out,
            "\n[2b] collateral damage: legitimate 200-octet stream through the kernel relay"
        );
        let _ = writeln!(
            out,
            "{:<10}{:>14}{:>12}{:>16}{:>16}{:>18}",
            "junk", "legit pps", "loss %", "delay p50 us", "delay p99 us", "junk flood pps"
        );
        for key in ["quiet", "flood"] {
            let Some(runs) = results.collateral.get(key) else {
                continue;
            };
            let _ = writeln!(
                out,
                "{key:<10}{:>14}{:>12}{:>16}{:>16}{:>18}",
                fmt_summary(summary(runs, |r| r.legit_pps), 1.0, 0),
                fmt_summary(summary(runs, |r| r.loss), 100.0, 3),
                fmt_summary(summary(runs, |r| us(r.delay_p50_ns)), 1.0, 1),
                fmt_summary(summary(runs, |r| us(r.delay_p99_ns)), 1.0, 1),
                fmt_summary(summary(runs, |r| r.flood_pps), 1.0, 0),
            );
        }
    }
    if !results.control.is_empty() || results.memory.is_some() {
        let _ = writeln!(
            out,
            "\n[3] control plane (client load generator shares the 2 CPUs with the daemon)"
        );
        let _ = writeln!(
            out,
            "{:<44}{:>16}{:>14}{:>14}{:>10}",
            "setup", "per second", "p50 us", "p99 us", "errors"
        );
        for (key, label) in [
            ("enhanced", "two-step binding, one request at a time"),
            (
                "enhanced_pipelined",
                "two-step binding, 8 bindings in flight per conn",
            ),
            ("gateway_associate", "gateway RFC 1928 UDP ASSOCIATE"),
            ("dante_associate", "Dante RFC 1928 UDP ASSOCIATE"),
        ] {
            let Some(runs) = results.control.get(key) else {
                continue;
            };
            #[expect(clippy::cast_precision_loss, reason = "error counts")]
            let errors = summary(runs, |r| r.errors as f64);
            let _ = writeln!(
                out,
                "{label:<44}{:>16}{:>14}{:>14}{:>10}",
                fmt_summary(summary(runs, |r| r.per_second), 1.0, 0),
                fmt_summary(summary(runs, |r| r.p50_us), 1.0, 0),
                fmt_summary(summary(runs, |r| r.p99_us), 1.0, 0),
                errors.map_or_else(|| "-".to_owned(), |s| format!("{:.0}", s.median)),
            );
        }
        if let Some(memory) = &results.memory {
            let _ = writeln!(
                out,
                "memory: {} live bindings of {} wanted ({:?}) from {} client addresses, daemon RSS {:.1} -> {:.1} MiB = {:.0} B per binding; \
                 descriptors {} -> {} = {:.4} per binding; \
                 kernel maps {}; external addresses used {:?} of {} configured; set up in {:.1} s",
                memory.live,
                memory.target,
                memory.per_family,
                memory.client_addresses,
                mib(memory.rss_before),
                mib(memory.rss_after),
                memory.bytes_per_binding,
                memory.fds_before,
                memory.fds_after,
                memory.fds_per_binding,
                memory
                    .kernel_map_bytes
                    .map_or_else(|| "n/a".to_owned(), |b| format!("{:.1} MiB", mib(b))),
                memory.external_ips_used,
                memory.external_ips_configured.len(),
                memory.setup_seconds,
            );
            for (refusal, tasks) in &memory.refusals {
                let _ = writeln!(out, "  refused ({tasks} sessions): {refusal}");
            }
        }
    }
    if !results.scale.is_empty() {
        let _ = writeln!(
            out,
            "\n[4] scale: in-kernel relay, 200-octet payloads, with N entries in BINDINGS"
        );
        let _ = writeln!(
            out,
            "{:<14}{:>18}{:>13}{:>16}{:>11}",
            "entries", "delivered pps", "loss %", "CPU ns/pkt", "limit"
        );
        for (entries, runs) in &results.scale {
            let _ = writeln!(
                out,
                "{entries:<14}{:>18}{:>13}{:>16}{:>11}",
                fmt_summary(summary(runs, |r| r.delivered_pps), 1.0, 0),
                fmt_summary(summary(runs, |r| r.loss), 100.0, 2),
                fmt_summary(summary(runs, |r| r.cpu_ns_per_delivered), 1.0, 0),
                bottleneck(runs),
            );
        }
    }
    if let Some(churn) = &results.churn {
        let _ = writeln!(
            out,
            "\n[5] churn: {} bindings made and ended in {:.1} s ({:.0}/s, {} errors{}), by end: {:?}\n\
             left afterwards: {}; RSS {:.1} -> {:.1} MiB ({:+.1} %)",
            churn.done,
            churn.seconds,
            churn.per_second,
            churn.errors,
            churn
                .first_error
                .as_ref()
                .map_or_else(String::new, |e| format!(", first: {e}")),
            churn.by_kind,
            churn.leftovers_text(),
            mib(churn.rss_before),
            mib(churn.rss_after),
            churn.rss_growth_percent(),
        );
    }
    if !results.latency.is_empty() {
        let _ = writeln!(out, "\n[6] added latency: UDP echo RTT, 200-octet payloads");
        let _ = writeln!(
            out,
            "{:<20}{:<6}{:>10}{:>14}{:>14}{:>14}{:>13}",
            "arm", "rate", "pps", "p50 us", "p99 us", "p99.9 us", "loss %"
        );
        for (key, label) in RELAY_ARMS {
            for rate in ["low", "half"] {
                let runs = latency_runs(results, key, rate);
                if runs.is_empty() {
                    continue;
                }
                #[expect(clippy::cast_precision_loss, reason = "packet rates")]
                let pps = median_of(runs, |r| r.rate as f64);
                let _ = writeln!(
                    out,
                    "{label:<20}{rate:<6}{pps:>10.0}{:>14}{:>14}{:>14}{:>13}",
                    fmt_summary(summary(runs, |r| us(r.p50_ns)), 1.0, 1),
                    fmt_summary(summary(runs, |r| us(r.p99_ns)), 1.0, 1),
                    fmt_summary(summary(runs, |r| us(r.p999_ns)), 1.0, 1),
                    fmt_summary(summary(runs, |r| r.loss), 100.0, 2),
                );
            }
        }
    }
    if !results.profile.is_empty() {
        let _ = writeln!(
            out,
            "\n[7] where the time goes, 200-octet payloads flat out (perf cpu-clock, all CPUs, idle \
             left out; stages: inclusive shares of the busy samples; top: self time; the \
             gateway's programs per run; flame-ARM.svg)"
        );
        for (key, label) in RELAY_ARMS {
            let Some(profile) = results.profile.get(key) else {
                continue;
            };
            let top: Vec<String> = profile
                .top
                .iter()
                .take(5)
                .map(|(name, share)| format!("{name} {:.1} %", share * 100.0))
                .collect();
            let programs: Vec<String> = profile
                .program_ns_per_run
                .iter()
                .map(|(name, ns)| format!("{name} {ns:.0} ns"))
                .collect();
            let stages: Vec<String> = profile
                .stages
                .iter()
                .filter(|(_, share)| *share > 0.0)
                .map(|(name, share)| format!("{name} {:.0} %", share * 100.0))
                .collect();
            let _ = writeln!(
                out,
                "{label:<22}{:>9.0} pps  stages: {}\n{:<33}top: {}{}",
                profile.delivered_pps,
                stages.join(", "),
                "",
                top.join(", "),
                if programs.is_empty() {
                    String::new()
                } else {
                    format!("; programs: {}", programs.join(", "))
                }
            );
        }
    }
    if !results.multicast.is_empty() {
        multicast_table(&mut out, results);
    }
    let targets = targets(results);
    if !targets.is_empty() {
        let _ = writeln!(out, "\ntargets against the measured medians:");
        for t in &targets {
            let verdict = match t.met {
                Some(true) => "MET   ",
                Some(false) => "MISSED",
                None => "n/a   ",
            };
            let _ = writeln!(
                out,
                "  {verdict} {:<86} measured {} ({})",
                t.target,
                t.measured
                    .map_or_else(|| "-".to_owned(), |value| format!("{value:.2}")),
                t.margin
            );
        }
    }
    for note in &results.notes {
        let _ = writeln!(out, "note: {note}");
    }
    if !results.errors.is_empty() {
        let _ = writeln!(
            out,
            "\n{} scenario run(s) failed (see results.json \"errors\")",
            results.errors.len()
        );
    }
    out
}

/// Section 8 of the table: the multicast fan-out per subscriber count, and its reading.
fn multicast_table(out: &mut String, results: &Results) {
    let _ = writeln!(
        out,
        "\n[8] multicast fan-out: one group stream from server flat out, multicast-to-unicast \
         to N subscribers (each its own control connection and socket); delivered = summed over \
         the subscribers; CPU = all CPUs' busy time per delivered datagram"
    );
    let _ = writeln!(
        out,
        "{:<13}{:>16}{:>18}{:>18}{:>12}{:>18}{:>14}{:>18}",
        "subscribers",
        "offered pps",
        "delivered pps",
        "per subscriber",
        "loss %",
        "CPU ns/delivered",
        "kernel share",
        "userspace copies"
    );
    for (subscribers, runs) in &results.multicast {
        let _ = writeln!(
            out,
            "{subscribers:<13}{:>16}{:>18}{:>18}{:>12}{:>18}{:>14}{:>18}",
            fmt_summary(summary(runs, |r| r.offered_pps), 1.0, 0),
            fmt_summary(summary(runs, |r| r.delivered_pps), 1.0, 0),
            fmt_summary(summary(runs, |r| r.per_subscriber_pps), 1.0, 0),
            fmt_summary(summary(runs, |r| r.loss), 100.0, 2),
            fmt_summary(summary(runs, |r| r.cpu_ns_per_delivered), 1.0, 0),
            fmt_summary(summary(runs, |r| r.kernel_share), 100.0, 1),
            runs.iter().map(|r| r.userspace_copies).sum::<u64>(),
        );
    }
    let _ = writeln!(out, "reading: {}", multicast_reading(results));
}

fn multicast_runs(results: &Results, subscribers: usize) -> &[MulticastRun] {
    results
        .multicast
        .get(&subscribers)
        .map_or(&[], Vec::as_slice)
}

/// One line saying what the multicast figures mean: the most subscribers against the fewest
/// (total rate and CPU per delivered datagram) and who made the copies.
pub fn multicast_reading(results: &Results) -> String {
    let (Some(&few), Some(&many)) = (
        results.multicast.keys().next(),
        results.multicast.keys().next_back(),
    ) else {
        return "not measured".to_owned();
    };
    let pps = |n| median_of(multicast_runs(results, n), |r| r.delivered_pps);
    let cpu = |n| median_of(multicast_runs(results, n), |r| r.cpu_ns_per_delivered);
    let share = |n| median_of(multicast_runs(results, n), |r| r.kernel_share);
    let delivered = pps(many);
    if delivered.is_nan() || delivered <= 0.0 {
        return format!(
            "nothing was delivered to {many} subscribers: the group's datagrams did not get past \
             the gateway (a build without the kernel fan-out drops them at the gate)"
        );
    }
    let carried = if share(many).is_finite() {
        format!(
            "the kernel made {:.0} % of the copies at {many}",
            share(many) * 100.0
        )
    } else {
        "the daemon counted no copies".to_owned()
    };
    if few == many {
        return format!(
            "{many} subscriber(s) got {:.0} pps in total at {:.0} ns CPU per delivered datagram; \
             {carried}",
            pps(many),
            cpu(many)
        );
    }
    format!(
        "{many} subscribers got {:.0} pps in total, {} times what {few} got, at {} times the CPU \
         per delivered datagram ({:.0} ns against {:.0} ns); {carried}",
        pps(many),
        fmt_ratio(ratio(pps(many), pps(few))),
        fmt_ratio(cost_ratio(cpu(many), cpu(few))),
        cpu(many),
        cpu(few)
    )
}

fn multicast_summary(results: &Results) -> Value {
    let mut per_count = serde_json::Map::new();
    for (subscribers, runs) in &results.multicast {
        per_count.insert(
            format!("subscribers_{subscribers}"),
            json!({
                "subscribers": subscribers,
                "offered_pps": summary(runs, |r| r.offered_pps),
                "delivered_pps": summary(runs, |r| r.delivered_pps),
                "per_subscriber_pps": summary(runs, |r| r.per_subscriber_pps),
                "loss": summary(runs, |r| r.loss),
                "cpu_ns_per_delivered": summary(runs, |r| r.cpu_ns_per_delivered),
                "cpu_ns_per_offered": summary(runs, |r| r.cpu_ns_per_offered),
                "busy_cores": summary(runs, |r| r.busy_cores),
                "kernel_share": summary(runs, |r| r.kernel_share),
                "kernel_copies": runs.iter().map(|r| r.kernel_copies).sum::<u64>(),
                "to_userspace": runs.iter().map(|r| r.to_userspace).sum::<u64>(),
                "userspace_copies": runs.iter().map(|r| r.userspace_copies).sum::<u64>(),
                "members_in_kernel": runs.iter().map(|r| r.members_in_kernel).min(),
                "rcvbuf_errors": runs.iter().map(|r| r.rcvbuf_errors).sum::<u64>(),
            }),
        );
    }
    if !per_count.is_empty() {
        per_count.insert("reading".to_owned(), json!(multicast_reading(results)));
    }
    Value::Object(per_count)
}

/// What the reader needs to know to read the table right, derived from the results.
pub fn auto_notes(results: &Results) -> Vec<String> {
    let mut notes = Vec::new();
    for (size, arms) in &results.relay {
        let sender_bound: Vec<&str> = RELAY_ARMS
            .iter()
            .filter(|(key, _)| {
                arms.get(*key)
                    .is_some_and(|runs| bottleneck(runs) == "sender")
            })
            .map(|(_, label)| *label)
            .collect();
        if !sender_bound.is_empty() {
            notes.push(format!(
                "{size} B: the sender, not the arm, was the bottleneck for {}: they delivered all \
                 that was offered. On veth the receive work of fw runs in the sender's softirq, so \
                 a costlier path lowers the offered rate; compare these arms by CPU per packet.",
                sender_bound.join(", ")
            ));
        }
    }
    for (load, runs) in &results.control {
        let errors: u64 = runs.iter().map(|r| r.errors).sum();
        if errors > 0 {
            let first = runs
                .iter()
                .find_map(|r| r.first_error.clone())
                .unwrap_or_default();
            let log: Vec<&String> = runs.iter().flat_map(|r| &r.daemon_log).take(3).collect();
            notes.push(format!(
                "control {load}: {errors} setups failed in all runs (first: {first}); daemon log: {log:?}"
            ));
        }
    }
    if let Some(memory) = results.memory.as_ref().filter(|m| m.live < m.target) {
        let refusals: Vec<&str> = memory.refusals.keys().map(String::as_str).collect();
        let log = if memory.daemon_log.is_empty() {
            String::new()
        } else {
            format!("; daemon log: {:?}", memory.daemon_log)
        };
        notes.push(format!(
            "memory: {} of {} bindings fit ({:?}); the daemon used external addresses {:?} of the \
             {} on fw's outside interface (one per family), then refused with {:?}{log}",
            memory.live,
            memory.target,
            memory.per_family,
            memory.external_ips_used,
            memory.external_ips_configured.len(),
            refusals,
        ));
    }
    if results
        .latency
        .values()
        .any(|rates| rates.contains_key("half"))
    {
        notes.push(
            "latency at half of each arm's one-way maximum: an echo doubles the packets and the \
             pinger, the echo server and the arm share 2 CPUs, so this rate is at or past \
             saturation and its RTTs are mostly queueing. Low-rate RTTs include the wake-up of \
             the pinger's and the echo server's threads."
                .to_owned(),
        );
    }
    if !results.relay.is_empty() || !results.drop.is_empty() {
        notes.push(
            "CPU per packet is system-wide (/proc/stat, 10 ms ticks): anything else running on \
             the machine during a window adds to it; the spread shows how much."
                .to_owned(),
        );
    }
    notes
}

#[expect(clippy::cast_precision_loss, reason = "memory sizes")]
fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn stream_summary(runs: &[StreamRun], base: f64, per_offered: bool) -> Value {
    let cpu = |r: &StreamRun| {
        if per_offered {
            r.cpu_ns_per_offered
        } else {
            r.cpu_ns_per_delivered
        }
    };
    json!({
        "offered_pps": summary(runs, |r| r.offered_pps),
        "delivered_pps": summary(runs, |r| r.delivered_pps),
        "loss": summary(runs, |r| r.loss),
        "cpu_ns_per_packet": summary(runs, cpu),
        "net_cpu_ns_per_packet": summary(runs, |r| cpu(r) - base),
        "busy_cores": summary(runs, |r| r.busy_cores),
        "rcvbuf_errors": runs.iter().map(|r| r.rcvbuf_errors).sum::<u64>(),
        "drops_verified": summary(runs, |r| r.drops_verified.unwrap_or(f64::NAN)),
        "limited_by": bottleneck(runs),
    })
}

/// The JSON document: summaries, ratios, targets, then every run.
#[expect(clippy::too_many_lines, reason = "one area after the other")]
pub fn document(results: &Results) -> Value {
    let mut relay = serde_json::Map::new();
    for (size, arms) in &results.relay {
        let base = baseline_cpu(results, *size);
        let mut per_arm = serde_json::Map::new();
        for (arm, runs) in arms {
            per_arm.insert(
                arm.clone(),
                stream_summary(runs, if arm == "local_sink" { 0.0 } else { base }, false),
            );
        }
        let pps = |arm| relay_pps(results, *size, arm);
        let cpu = |arm| relay_net_cpu(results, *size, arm);
        per_arm.insert(
            "ratios".to_owned(),
            json!({
                "kernel_over_plain_pps": finite(ratio(pps("kernel"), pps("plain"))),
                "kernel_over_userspace_pps": finite(ratio(pps("kernel"), pps("userspace"))),
                "kernel_over_dante_pps": finite(ratio(pps("kernel"), pps("dante"))),
                "kernel_over_userspace_net_cpu": finite(cost_ratio(cpu("kernel"), cpu("userspace"))),
                "kernel_over_dante_net_cpu": finite(cost_ratio(cpu("kernel"), cpu("dante"))),
                "raw_over_plain_pps": finite(ratio(pps("raw"), pps("plain"))),
                "raw_over_kernel_pps": finite(ratio(pps("raw"), pps("kernel"))),
                "raw_over_kernel_net_cpu": finite(cost_ratio(cpu("raw"), cpu("kernel"))),
            }),
        );
        relay.insert(size.to_string(), Value::Object(per_arm));
    }
    let base = null_device_cpu(results);
    let drop: serde_json::Map<String, Value> = results
        .drop
        .iter()
        .map(|(arm, runs)| {
            (
                arm.clone(),
                stream_summary(runs, if arm == "null_device" { 0.0 } else { base }, true),
            )
        })
        .collect();
    let collateral: serde_json::Map<String, Value> = results
        .collateral
        .iter()
        .map(|(key, runs)| {
            (
                key.clone(),
                json!({
                    "legit_pps": summary(runs, |r| r.legit_pps),
                    "loss": summary(runs, |r| r.loss),
                    "delay_p50_us": summary(runs, |r| us(r.delay_p50_ns)),
                    "delay_p99_us": summary(runs, |r| us(r.delay_p99_ns)),
                    "flood_pps": summary(runs, |r| r.flood_pps),
                }),
            )
        })
        .collect();
    let control: serde_json::Map<String, Value> = results
        .control
        .iter()
        .map(|(key, runs)| {
            (
                key.clone(),
                json!({
                    "per_second": summary(runs, |r| r.per_second),
                    "p50_us": summary(runs, |r| r.p50_us),
                    "p99_us": summary(runs, |r| r.p99_us),
                    "errors": runs.iter().map(|r| r.errors).sum::<u64>(),
                    "connections": runs.first().map(|r| r.connections),
                }),
            )
        })
        .collect();
    let scale: serde_json::Map<String, Value> = results
        .scale
        .iter()
        .map(|(entries, runs)| (entries.to_string(), stream_summary(runs, 0.0, false)))
        .collect();
    let mut latency = serde_json::Map::new();
    for (arm, rates) in &results.latency {
        let per_rate: serde_json::Map<String, Value> = rates
            .iter()
            .map(|(rate, runs)| {
                #[expect(clippy::cast_precision_loss, reason = "packet rates")]
                let pps = summary(runs, |r| r.rate as f64);
                (
                    rate.clone(),
                    json!({
                        "rate_pps": pps,
                        "p50_us": summary(runs, |r| us(r.p50_ns)),
                        "p99_us": summary(runs, |r| us(r.p99_ns)),
                        "p999_us": summary(runs, |r| us(r.p999_ns)),
                        "loss": summary(runs, |r| r.loss),
                    }),
                )
            })
            .collect();
        latency.insert(arm.clone(), Value::Object(per_rate));
    }
    json!({
        "meta": results.meta,
        "summary": {
            "relay": relay,
            "drop": drop,
            "collateral": collateral,
            "control": control,
            "memory": results.memory,
            "churn": results.churn,
            "scale": scale,
            "latency": latency,
            "profile": results.profile,
            "multicast": multicast_summary(results),
        },
        "targets": targets(results),
        "notes": results.notes,
        "errors": results.errors,
        "runs": results,
    })
}

fn finite(value: f64) -> Option<f64> {
    value.is_finite().then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(delivered: f64, offered: f64, cpu: f64) -> StreamRun {
        StreamRun {
            offered_pps: offered,
            delivered_pps: delivered,
            loss: 1.0 - delivered / offered,
            cpu_ns_per_delivered: cpu,
            ..StreamRun::default()
        }
    }

    #[test]
    fn bottleneck_is_the_sender_when_nothing_is_lost() {
        assert_eq!(bottleneck(&[stream(100.0, 100.0, 1.0)]), "sender");
        assert_eq!(bottleneck(&[stream(50.0, 100.0, 1.0)]), "arm");
        let mut sink = stream(50.0, 100.0, 1.0);
        sink.rcvbuf_errors = 40;
        assert_eq!(bottleneck(&[sink]), "sink");
        assert_eq!(bottleneck(&[]), "n/a");
    }

    fn fan_out(
        subscribers: usize,
        delivered: f64,
        cpu: f64,
        kernel: u64,
        user: u64,
    ) -> MulticastRun {
        MulticastRun {
            subscribers,
            offered_pps: 1000.0,
            delivered_pps: delivered,
            cpu_ns_per_delivered: cpu,
            kernel_copies: kernel,
            userspace_copies: user,
            kernel_share: crate::model::kernel_share(kernel, user),
            ..MulticastRun::default()
        }
    }

    #[test]
    fn multicast_lands_in_the_summary_and_the_table_with_a_reading() {
        let mut results = Results::default();
        results
            .multicast
            .insert(1, vec![fan_out(1, 1000.0, 2000.0, 1000, 0)]);
        results
            .multicast
            .insert(64, vec![fan_out(64, 32_000.0, 500.0, 48_000, 16_000)]);
        let doc = document(&results);
        let many = &doc["summary"]["multicast"]["subscribers_64"];
        assert_eq!(many["delivered_pps"]["median"], 32_000.0);
        assert_eq!(many["cpu_ns_per_delivered"]["median"], 500.0);
        assert_eq!(many["kernel_share"]["median"], 0.75);
        assert_eq!(many["userspace_copies"], 16_000);
        let reading = multicast_reading(&results);
        assert!(reading.contains("32.00 times what 1 got"), "{reading}");
        assert!(reading.contains("0.25 times the CPU"), "{reading}");
        assert!(reading.contains("75 % of the copies"), "{reading}");
        assert_eq!(doc["summary"]["multicast"]["reading"], reading.as_str());
        let text = table(&results);
        assert!(text.contains("[8] multicast fan-out"), "{text}");
        assert!(text.contains("reading: 64 subscribers"), "{text}");
        // Nothing delivered (a gateway without the kernel fan-out) says so.
        let mut dropped = Results::default();
        dropped
            .multicast
            .insert(8, vec![fan_out(8, 0.0, f64::NAN, 0, 0)]);
        assert!(multicast_reading(&dropped).starts_with("nothing was delivered"));
        assert!(
            document(&dropped)["summary"]["multicast"]["subscribers_8"]["kernel_share"].is_null()
        );
        assert!(
            document(&Results::default())["summary"]["multicast"]
                .as_object()
                .is_some_and(serde_json::Map::is_empty)
        );
    }

    #[test]
    fn targets_use_net_cpu_and_ratios() {
        let mut results = Results::default();
        let arms = results.relay.entry(200).or_default();
        arms.insert("local_sink".into(), vec![stream(1000.0, 1000.0, 100.0)]);
        arms.insert("kernel".into(), vec![stream(950.0, 950.0, 200.0)]);
        arms.insert("plain".into(), vec![stream(1000.0, 1000.0, 150.0)]);
        arms.insert("dante".into(), vec![stream(100.0, 1000.0, 1100.0)]);
        arms.insert("userspace".into(), vec![stream(300.0, 1000.0, 500.0)]);
        let targets = targets(&results);
        let find = |text: &str| {
            targets
                .iter()
                .find(|t| t.target.contains(text))
                .unwrap()
                .clone()
        };
        // 950 of 1000 pps: short of plain forwarding, 9.5 times Dante.
        let pps = find("200 B: kernel relay pps / plain forwarding pps >= 1.0");
        assert_eq!((pps.measured, pps.met), (Some(0.95), Some(false)));
        assert_eq!(
            find("200 B: kernel relay pps / Dante pps >= 5").met,
            Some(true)
        );
        // Net CPU: kernel 100, plain 50, Dante 1000, userspace 400.
        let cpu = find("200 B: kernel relay CPU/pkt / plain forwarding CPU/pkt <= 1.0");
        assert_eq!((cpu.measured, cpu.met), (Some(2.0), Some(false)));
        assert_eq!(find("Dante CPU").measured, Some(0.1));
        assert_eq!(find("userspace relay CPU").measured, Some(0.25));
        // Nothing measured for the latency: no target, rather than a made-up one.
        assert!(!targets.iter().any(|t| t.target.contains("RTT")));
        assert!(table(&results).contains("in-kernel relay"));
        let doc = document(&results);
        assert_eq!(
            doc["summary"]["relay"]["200"]["kernel"]["net_cpu_ns_per_packet"]["median"],
            100.0
        );
    }
}
