//! Area 5, added latency: round-trip time of a paced UDP echo (200-octet payloads) from
//! `client` to an echo server in `server` through each arm, at a low rate and at half of the
//! arm's maximum measured in area 1 (200 octets). Arms alternate within every run.

use std::{fmt::Write as _, time::Duration};

use anyhow::{Context as _, Result};
use bench::model::{PingRun, Results, median_of};

use super::{
    arms::{Arm, ArmGuard, ClientPath, SOURCE, rotated},
    env::{Blast, Env, SocketSpec},
};

/// Half-rate fallback when area 1 did not run or failed for an arm.
const FALLBACK_MAX_PPS: f64 = 100_000.0;

fn hex(octets: &[u8]) -> String {
    octets.iter().fold(String::new(), |mut out, o| {
        let _ = write!(out, "{o:02x}");
        out
    })
}

pub fn run(env: &Env, results: &mut Results) {
    for run in 0..env.plan.runs {
        for arm in rotated(&Arm::LATENCY, run) {
            if let Err(error) = arm_run(env, arm, run, results) {
                let text = format!("latency run {} arm {}: {error:#}", run + 1, arm.key());
                env.progress(&format!("FAILED {text}"));
                results.errors.push(text);
            }
        }
    }
}

/// Half of the arm's median delivered rate at 200 octets (area 1).
fn half_rate(results: &Results, arm: Arm) -> u64 {
    let max = results
        .relay
        .get(&200)
        .and_then(|arms| arms.get(arm.key()))
        .map_or(f64::NAN, |runs| median_of(runs, |r| r.delivered_pps));
    let max = if max.is_finite() && max > 0.0 {
        max
    } else {
        FALLBACK_MAX_PPS
    };
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a packet rate"
    )]
    let half = (max / 2.0) as u64;
    half.max(1)
}

fn arm_run(env: &Env, arm: Arm, run: usize, results: &mut Results) -> Result<()> {
    let _guard = ArmGuard::start(env, arm, &[])?;
    let echo_args = vec!["echo".to_owned(), "--duration".to_owned(), "120".to_owned()];
    let mut echo = Blast::spawn(
        env,
        &env.bed.server,
        &echo_args,
        SocketSpec::Bind(SOURCE),
        "udp-blast echo",
    )?;
    echo.wait_event("ready", Duration::from_secs(5))?;
    let path = ClientPath::open(env, arm)?;
    let rates = [
        ("low", env.plan.low_rate),
        ("half", half_rate(results, arm)),
    ];
    let outcome = (|| -> Result<()> {
        for (label, rate) in rates {
            let ping = ping(env, &path, env.plan.rate(rate))?;
            env.progress(&format!(
                "latency run {}/{} {:<16} {label:<4} {:>7} pps: RTT p50 {:>7.1} us, p99 {:>7.1} us, \
                 p99.9 {:>7.1} us, loss {:.2} %",
                run + 1,
                env.plan.runs,
                arm.label(),
                ping.rate,
                us(ping.p50_ns),
                us(ping.p99_ns),
                us(ping.p999_ns),
                ping.loss * 100.0
            ));
            results
                .latency
                .entry(arm.key().to_owned())
                .or_default()
                .entry(label.to_owned())
                .or_default()
                .push(ping);
        }
        Ok(())
    })();
    path.close(env);
    let _ = echo.stop();
    outcome
}

#[expect(clippy::cast_precision_loss, reason = "for display")]
fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

fn ping(env: &Env, path: &ClientPath, rate: u64) -> Result<PingRun> {
    let (socket, to, prefix) = path.ping_route();
    let args = vec![
        "ping".to_owned(),
        "--to".to_owned(),
        to.to_string(),
        "--prefix".to_owned(),
        hex(&prefix),
        "--strip".to_owned(),
        path.inbound_header().to_string(),
        "--size".to_owned(),
        "200".to_owned(),
        "--rate".to_owned(),
        rate.to_string(),
        "--duration".to_owned(),
        format!("{}", (env.plan.warmup + env.plan.window).as_secs_f64()),
    ];
    let pinger = Blast::spawn(env, &env.bed.client, &args, socket, "udp-blast ping")?;
    let report = pinger
        .finish(env.plan.warmup + env.plan.window + Duration::from_secs(10))
        .context("the pinger's report")?;
    let sent = report["sent"].as_u64().unwrap_or(0);
    let received = report["received"].as_u64().unwrap_or(0);
    #[expect(clippy::cast_precision_loss, reason = "packet counts")]
    let loss = if sent == 0 {
        0.0
    } else {
        (1.0 - received as f64 / sent as f64).max(0.0)
    };
    Ok(PingRun {
        rate,
        sent,
        received,
        loss,
        p50_ns: report["rtt"]["p50_ns"].as_u64().unwrap_or(0),
        p99_ns: report["rtt"]["p99_ns"].as_u64().unwrap_or(0),
        p999_ns: report["rtt"]["p999_ns"].as_u64().unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_of_a_header() {
        assert_eq!(
            super::hex(&[0, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef]),
            "00000000deadbeef"
        );
    }
}
