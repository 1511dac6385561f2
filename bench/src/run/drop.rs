//! Area 2, unsolicited drop: one junk stream (64-octet payloads, flat out) at fw's external
//! address with (a) the gateway's XDP gate, (a') the same with `gateway monitor` watching every
//! drop (sampling and the rate limit are what keep that cheap), (b) an nftables netdev-ingress
//! drop rule, (c) nothing (closed port), plus the sender's own cost into a null device; and the
//! collateral damage: a legitimate stream through the in-kernel relay with and without a junk
//! flood. The gateway's arms also record its programs' own time per packet (`kernel.bpf_stats_enabled`).

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use bench::model::{CollateralRun, Results, StreamRun};
use testbed::{
    ChildGuard, addr,
    gateway::{reason_packets, stats_json},
    iface, run_checked,
};

use super::{
    arms::{Arm, ArmGuard, ClientPath, SOURCE, add_address, rotated},
    env::{Blast, Env, SocketSpec},
    profile::{BpfStats, program_stats},
    stream::{StreamSpec, run_stream},
};

/// Where junk comes from and goes to (nothing listens there).
const JUNK_FROM: SocketAddr = SocketAddr::new(IpAddr::V4(addr::SERVER_V4), 7000);
const JUNK_TO: SocketAddr = SocketAddr::new(IpAddr::V4(addr::FW_OUTSIDE_V4), 9999);
/// Junk payload octets.
const JUNK_SIZE: usize = 64;
/// A destination routed to a null device in `server` (documentation range).
const NULL_DEVICE_NET: &str = "192.0.2.1/24";
const NULL_TO: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 99)), 9);
const NFT_TABLE: &str = "gateway_bench";

#[derive(Clone, Copy, PartialEq, Eq)]
enum DropArm {
    Xdp,
    XdpMonitor,
    Nft,
    Closed,
    NullDevice,
}

impl DropArm {
    const ALL: [DropArm; 5] = [
        DropArm::Xdp,
        DropArm::XdpMonitor,
        DropArm::Nft,
        DropArm::Closed,
        DropArm::NullDevice,
    ];

    fn key(self) -> &'static str {
        match self {
            DropArm::Xdp => "xdp",
            DropArm::XdpMonitor => "xdp_monitor",
            DropArm::Nft => "nft",
            DropArm::Closed => "closed",
            DropArm::NullDevice => "null_device",
        }
    }
}

pub fn run(env: &Env, results: &mut Results) {
    if let Err(error) = null_device(env) {
        results.errors.push(format!("drop: null device: {error:#}"));
    }
    for run in 0..env.plan.runs {
        for arm in rotated(&DropArm::ALL, run) {
            match drop_run(env, arm) {
                Ok(stream) => {
                    env.progress(&format!(
                        "drop run {}/{} {:<12}: {:>8.0} pps dropped, {:5.0} ns CPU/pkt, verified {}",
                        run + 1,
                        env.plan.runs,
                        arm.key(),
                        stream.offered_pps,
                        stream.cpu_ns_per_offered,
                        stream
                            .drops_verified
                            .map_or_else(|| "-".to_owned(), |v| format!("{:.1} %", v * 100.0)),
                    ));
                    results
                        .drop
                        .entry(arm.key().to_owned())
                        .or_default()
                        .push(stream);
                }
                Err(error) => {
                    let text = format!("drop run {} {}: {error:#}", run + 1, arm.key());
                    env.progress(&format!("FAILED {text}"));
                    results.errors.push(text);
                }
            }
        }
    }
    if let Err(error) = collateral(env, results) {
        let text = format!("collateral damage: {error:#}");
        env.progress(&format!("FAILED {text}"));
        results.errors.push(text);
    }
}

/// A veth end whose peer stays down (no dummy driver on every kernel): what is routed there is
/// dropped at transmit, so a sender into it pays only its own syscall, UDP, IP and xmit cost.
fn null_device(env: &Env) -> Result<()> {
    let server = &env.bed.server;
    run_checked(server.command("ip").args([
        "link", "add", "bnull", "type", "veth", "peer", "name", "bnullp",
    ]))?;
    add_address(server, "192.0.2.1".parse()?, 24, "bnull")
        .with_context(|| format!("address {NULL_DEVICE_NET}"))?;
    run_checked(server.command("ip").args(["link", "set", "bnull", "up"]))?;
    run_checked(server.command("ip").args([
        "neigh",
        "add",
        &NULL_TO.ip().to_string(),
        "lladdr",
        "02:00:00:00:00:99",
        "dev",
        "bnull",
        "nud",
        "permanent",
    ]))?;
    Ok(())
}

fn junk(env: &Env, to: SocketAddr) -> Result<StreamRun> {
    let spec = StreamSpec {
        sender_ns: &env.bed.server,
        sender_bind: JUNK_FROM,
        to: Some(to),
        size: JUNK_SIZE,
        rate: 0,
        stamps: false,
        receiver_ns: &env.bed.fw,
        sink: None,
        sink_ts_offset: None,
        kick: None,
    };
    Ok(run_stream(env, &spec)?.0)
}

fn drop_run(env: &Env, arm: DropArm) -> Result<StreamRun> {
    match arm {
        DropArm::Xdp | DropArm::XdpMonitor => {
            let guard = ArmGuard::start(env, Arm::Kernel, &[])?;
            let instance = guard.instance().context("gateway instance")?.to_owned();
            let _watcher = if arm == DropArm::XdpMonitor {
                Some(Watcher::start(env, &instance)?)
            } else {
                None
            };
            let _stats = BpfStats::enable()?;
            let programs_before = program_stats()?;
            let before = reason_packets(&stats_json(&env.bed.fw, &instance)?, "no_binding");
            let mut stream = junk(env, JUNK_TO)?;
            let after = reason_packets(&stats_json(&env.bed.fw, &instance)?, "no_binding");
            stream.drops_verified = Some(fraction(after - before, stream.sender_sent));
            stream.program_ns_per_packet = ns_per_run(&programs_before, &program_stats()?);
            Ok(stream)
        }
        DropArm::Nft => {
            let _rule = NftDrop::install(env)?;
            let mut stream = junk(env, JUNK_TO)?;
            stream.drops_verified = Some(fraction(NftDrop::counted(env)?, stream.sender_sent));
            Ok(stream)
        }
        DropArm::Closed => {
            let mut stream = junk(env, JUNK_TO)?;
            // Counted over the window: closed-port datagrams over offered ones.
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "a window's packet count"
            )]
            let offered = (stream.offered_pps * env.plan.window.as_secs_f64()) as u64;
            stream.drops_verified = Some(fraction(stream.no_ports, offered));
            Ok(stream)
        }
        DropArm::NullDevice => junk(env, NULL_TO),
    }
}

/// The gateway's programs' time per run between two readings (every program's runs: under the
/// flood nearly all are the gate's drops).
#[expect(clippy::cast_precision_loss, reason = "nanosecond and run counts")]
fn ns_per_run(
    before: &BTreeMap<String, (u64, u64)>,
    after: &BTreeMap<String, (u64, u64)>,
) -> Option<f64> {
    let (runs, ns) = after.iter().fold((0u64, 0u64), |(runs, ns), (name, now)| {
        let was = before.get(name).copied().unwrap_or((0, 0));
        (
            runs + now.0.saturating_sub(was.0),
            ns + now.1.saturating_sub(was.1),
        )
    });
    (runs > 0).then(|| ns as f64 / runs as f64)
}

/// `gateway monitor` watching the junk's drops (its events thrown away), for as long as it
/// lives.
struct Watcher {
    /// Stopped (SIGTERM) when the watcher is dropped.
    _process: ChildGuard,
}

impl Watcher {
    fn start(env: &Env, instance: &str) -> Result<Self> {
        let mut command = env.bed.fw.command(testbed::gateway::gateway_bin());
        command
            .args(["monitor", "--instance", instance, "--reason", "no_binding"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = ChildGuard::spawn(&mut command, "gateway monitor")?;
        let stderr = child
            .child_mut()
            .and_then(|child| child.stderr.take())
            .context("the monitor's stderr")?;
        // Its first line says it holds the lease (or why not).
        let mut first = String::new();
        BufReader::new(stderr)
            .read_line(&mut first)
            .context("read the monitor's first line")?;
        if !first.contains("watching instance") {
            bail!("gateway monitor did not start: {first}");
        }
        Ok(Self { _process: child })
    }
}

#[expect(clippy::cast_precision_loss, reason = "packet counts")]
fn fraction(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        (part as f64 / whole as f64).min(1.0)
    }
}

/// An nftables netdev-ingress drop rule for the junk port on fw's external interface.
struct NftDrop<'a> {
    env: &'a Env,
}

impl<'a> NftDrop<'a> {
    fn install(env: &'a Env) -> Result<Self> {
        let script = format!(
            "table netdev {NFT_TABLE} {{\n  chain ingress {{\n    type filter hook ingress device \
             \"{}\" priority 0; policy accept;\n    udp dport {} counter drop\n  }}\n}}\n",
            iface::FW_OUTSIDE,
            JUNK_TO.port()
        );
        let path = env.work_dir.join("drop.nft");
        std::fs::write(&path, script)?;
        run_checked(env.bed.fw.command("nft").arg("-f").arg(&path))
            .context("install the nftables drop rule (is nftables installed?)")?;
        Ok(Self { env })
    }

    /// Packets the rule's counter saw.
    fn counted(env: &Env) -> Result<u64> {
        let out = run_checked(
            env.bed
                .fw
                .command("nft")
                .args(["list", "table", "netdev", NFT_TABLE]),
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut words = text.split_whitespace();
        while let Some(word) = words.next() {
            if word == "packets" {
                return words
                    .next()
                    .context("counter without a value")?
                    .parse()
                    .context("parse the nft counter");
            }
        }
        bail!("no counter in the nft table:\n{text}")
    }
}

impl Drop for NftDrop<'_> {
    fn drop(&mut self) {
        let _ = run_checked(
            self.env
                .bed
                .fw
                .command("nft")
                .args(["delete", "table", "netdev", NFT_TABLE]),
        );
    }
}

/// The legitimate stream through the in-kernel relay, quiet and under a junk flood, alternating.
fn collateral(env: &Env, results: &mut Results) -> Result<()> {
    let _guard = ArmGuard::start(env, Arm::Kernel, &[])?;
    let path = ClientPath::open(env, Arm::Kernel)?;
    let outcome = (|| -> Result<()> {
        for run in 0..env.plan.runs {
            for flood in rotated(&[false, true], run) {
                let stream = legit_stream(env, &path, flood)?;
                env.progress(&format!(
                    "collateral run {}/{} {}: legit {:.0} pps, loss {:.3} %, delay p99 {:.1} us{}",
                    run + 1,
                    env.plan.runs,
                    if flood { "flood" } else { "quiet" },
                    stream.legit_pps,
                    stream.loss * 100.0,
                    ns_to_us(stream.delay_p99_ns),
                    if flood {
                        format!(", junk flood {:.0} pps", stream.flood_pps)
                    } else {
                        String::new()
                    }
                ));
                results
                    .collateral
                    .entry(if flood { "flood" } else { "quiet" }.to_owned())
                    .or_default()
                    .push(stream);
            }
        }
        Ok(())
    })();
    path.close(env);
    outcome
}

#[expect(clippy::cast_precision_loss, reason = "microseconds for display")]
fn ns_to_us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

fn legit_stream(env: &Env, path: &ClientPath, flood: bool) -> Result<CollateralRun> {
    let flooder = if flood {
        let args = vec![
            "send".to_owned(),
            "--to".to_owned(),
            JUNK_TO.to_string(),
            "--size".to_owned(),
            JUNK_SIZE.to_string(),
            "--duration".to_owned(),
            format!("{}", env.plan.sender_time().as_secs_f64() + 3.0),
            "--rate".to_owned(),
            env.plan.rate(0).to_string(),
        ];
        let mut flooder = Blast::spawn(
            env,
            &env.bed.server,
            &args,
            SocketSpec::Bind(JUNK_FROM),
            "junk flood",
        )?;
        flooder.wait_event("started", Duration::from_secs(5))?;
        std::thread::sleep(Duration::from_millis(200));
        Some(flooder)
    } else {
        None
    };
    let spec = StreamSpec {
        sender_ns: &env.bed.server,
        sender_bind: SOURCE,
        to: path.inbound_to(),
        size: 200,
        rate: env.plan.legit_rate,
        stamps: true,
        receiver_ns: &env.bed.client,
        sink: Some(path.sink_socket()),
        sink_ts_offset: Some(path.inbound_header()),
        kick: None,
    };
    let result = run_stream(env, &spec);
    let flood_pps = match flooder {
        Some(flooder) => flooder.stop()?["pps"].as_f64().unwrap_or(0.0),
        None => 0.0,
    };
    let (_, reports) = result?;
    let sent = reports.sender["sent"].as_u64().unwrap_or(0);
    let sink = reports
        .sink
        .context("the legitimate stream's sink report")?;
    let received = sink["received"].as_u64().unwrap_or(0);
    Ok(CollateralRun {
        legit_pps: reports.sender["pps"].as_f64().unwrap_or(0.0),
        sent,
        received,
        loss: 1.0 - fraction(received, sent),
        delay_p50_ns: sink["delay"]["p50_ns"].as_u64().unwrap_or(0),
        delay_p99_ns: sink["delay"]["p99_ns"].as_u64().unwrap_or(0),
        flood_pps,
    })
}
