//! Area 3, control plane: two-step bindings (step 1, step 2, release) per second over many
//! concurrent enhanced-mode control connections; RFC 1928 UDP ASSOCIATE setups per second on the
//! gateway and on Dante; and the daemon's resident memory per live binding, spread over extra
//! external addresses where the daemon uses them.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use bench::{
    model::{ControlRun, MemoryResult, Results},
    procfs,
    stats::Percentiles,
};
use gateway_client::{Client, Family, UdpBinding};
use testbed::{addr, iface, run_checked};
use tokio::{task::JoinSet, time::Instant};

use super::{
    arms::{Arm, ArmGuard, PROXY, add_address, rotated},
    env::Env,
};

/// Gives up on a loop after this many errors.
const MAX_ERRORS: u64 = 1000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Load {
    Enhanced,
    GatewayAssociate,
    DanteAssociate,
}

impl Load {
    const ALL: [Load; 3] = [Load::Enhanced, Load::GatewayAssociate, Load::DanteAssociate];

    fn key(self) -> &'static str {
        match self {
            Load::Enhanced => "enhanced",
            Load::GatewayAssociate => "gateway_associate",
            Load::DanteAssociate => "dante_associate",
        }
    }
}

pub fn run(env: &Env, results: &mut Results) {
    for run in 0..env.plan.runs {
        for load in rotated(&Load::ALL, run) {
            match control_run(env, load) {
                Ok(outcome) => {
                    env.progress(&format!(
                        "control run {}/{} {:<18}: {:>7.0} setups/s over {} connections, p50 {:.0} us, \
                         p99 {:.0} us, {} errors",
                        run + 1,
                        env.plan.runs,
                        load.key(),
                        outcome.per_second,
                        outcome.connections,
                        outcome.p50_us,
                        outcome.p99_us,
                        outcome.errors
                    ));
                    results
                        .control
                        .entry(load.key().to_owned())
                        .or_default()
                        .push(outcome);
                }
                Err(error) => {
                    let text = format!("control run {} {}: {error:#}", run + 1, load.key());
                    env.progress(&format!("FAILED {text}"));
                    results.errors.push(text);
                }
            }
        }
    }
    match memory(env) {
        Ok(memory) => {
            env.progress(&format!(
                "memory: {} live bindings (target {}), RSS {} -> {} KiB, {:.0} B per binding, \
                 external addresses used {:?}",
                memory.live,
                memory.target,
                memory.rss_before / 1024,
                memory.rss_after / 1024,
                memory.bytes_per_binding,
                memory.external_ips_used
            ));
            results.memory = Some(memory);
        }
        Err(error) => {
            let text = format!("memory per binding: {error:#}");
            env.progress(&format!("FAILED {text}"));
            results.errors.push(text);
        }
    }
}

fn control_run(env: &Env, load: Load) -> Result<ControlRun> {
    let arm = if load == Load::DanteAssociate {
        Arm::Dante
    } else {
        Arm::Kernel
    };
    let guard = ArmGuard::start(env, arm, &[])?;
    let conns = env.plan.control_conns;
    let time = env.plan.control_time;
    let mut run = env.client(time + Duration::from_mins(1), async move {
        match load {
            Load::Enhanced => enhanced_load(conns, time).await,
            Load::GatewayAssociate | Load::DanteAssociate => associate_load(conns, time).await,
        }
    })?;
    if run.errors > 0 {
        run.daemon_log = daemon_warnings(&guard);
    }
    Ok(run)
}

/// What one load task did.
#[derive(Default)]
struct TaskOutcome {
    completed: u64,
    errors: u64,
    first_error: Option<String>,
    latencies_ns: Vec<u64>,
}

impl TaskOutcome {
    fn error(&mut self, error: impl std::fmt::Display) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(error.to_string());
        }
    }
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

fn combine(conns: usize, elapsed: Duration, outcomes: Vec<TaskOutcome>) -> ControlRun {
    let mut run = ControlRun {
        connections: conns,
        ..ControlRun::default()
    };
    let mut latencies = Vec::new();
    for outcome in outcomes {
        run.completed += outcome.completed;
        run.errors += outcome.errors;
        if run.first_error.is_none() {
            run.first_error = outcome.first_error;
        }
        latencies.extend(outcome.latencies_ns);
    }
    run.per_second = super::env::per_second(run.completed, elapsed.as_secs_f64());
    if let Some(p) = Percentiles::of(&mut latencies) {
        #[expect(clippy::cast_precision_loss, reason = "latencies in ns")]
        {
            run.p50_us = p.p50_ns as f64 / 1000.0;
            run.p99_us = p.p99_ns as f64 / 1000.0;
        }
    }
    run
}

/// `conns` enhanced-mode sessions, each doing bind, connect, release in a loop for `time`.
async fn enhanced_load(conns: usize, time: Duration) -> Result<ControlRun> {
    let mut sessions = Vec::with_capacity(conns);
    for _ in 0..conns {
        sessions.push(Client::connect(PROXY, None).await?.enhanced().await?);
    }
    let start = Instant::now();
    let deadline = start + time;
    let mut tasks = JoinSet::new();
    for (i, session) in sessions.into_iter().enumerate() {
        let remote = SocketAddr::new(
            IpAddr::V4(addr::SERVER_V4),
            20_000 + u16::try_from(i % 20_000).unwrap_or(0),
        );
        tasks.spawn(async move {
            let mut outcome = TaskOutcome::default();
            while Instant::now() < deadline && outcome.errors < MAX_ERRORS {
                let t0 = Instant::now();
                let step = async {
                    let binding = session.udp_socket(Family::V4).await?;
                    binding.bind().await?;
                    binding.connect(remote).await?;
                    let setup = t0.elapsed();
                    binding.release().await?;
                    Ok::<_, gateway_client::ClientError>(setup)
                };
                match step.await {
                    Ok(setup) => {
                        outcome.completed += 1;
                        outcome.latencies_ns.push(nanos(setup));
                    }
                    Err(error) => outcome.error(error),
                }
            }
            drop(session);
            outcome
        });
    }
    let outcomes = tasks.join_all().await;
    Ok(combine(conns, start.elapsed(), outcomes))
}

/// `conns` tasks, each opening a control connection, asking UDP ASSOCIATE and closing, in a loop.
async fn associate_load(conns: usize, time: Duration) -> Result<ControlRun> {
    let start = Instant::now();
    let deadline = start + time;
    let mut tasks = JoinSet::new();
    for _ in 0..conns {
        tasks.spawn(async move {
            let mut outcome = TaskOutcome::default();
            while Instant::now() < deadline && outcome.errors < MAX_ERRORS {
                let t0 = Instant::now();
                let setup = async { Client::connect(PROXY, None).await?.udp_associate().await };
                match tokio::time::timeout(Duration::from_secs(5), setup).await {
                    Ok(Ok(association)) => {
                        outcome.completed += 1;
                        outcome.latencies_ns.push(nanos(t0.elapsed()));
                        drop(association);
                    }
                    Ok(Err(error)) => outcome.error(error),
                    Err(_) => outcome.error("UDP ASSOCIATE timed out (5 s)"),
                }
            }
            outcome
        });
    }
    let outcomes = tasks.join_all().await;
    Ok(combine(conns, start.elapsed(), outcomes))
}

/// Extra external addresses put on fw's outside interface for the memory scenario.
fn extra_external() -> Vec<(IpAddr, u8)> {
    let mut extra: Vec<(IpAddr, u8)> = (10..14)
        .map(|i| (IpAddr::from([203, 0, 113, i]), 24))
        .collect();
    extra.extend((0x10..0x14).map(|i| (IpAddr::from([0x2001, 0xdb8, 2, 0, 0, 0, 0, i]), 64)));
    extra
}

/// Holds as many confirmed two-step bindings as the daemon gives (up to the plan's target),
/// half IPv4 and half IPv6, and reads the daemon's resident memory.
fn memory(env: &Env) -> Result<MemoryResult> {
    let extra = extra_external();
    for (ip, prefix) in &extra {
        add_address(&env.bed.fw, *ip, *prefix, iface::FW_OUTSIDE)?;
    }
    let outcome = (|| {
        let target = env.plan.memory_target;
        let max = (target * 4).max(65_536).to_string();
        let guard = ArmGuard::start(env, Arm::Kernel, &["--max-bindings", &max])?;
        let pid = guard.daemon_pid().context("daemon pid")?;
        let pin_dir = guard.cleanup.as_ref().context("pins")?.pin_dir();
        std::thread::sleep(Duration::from_millis(300));
        let mut configured = vec![
            addr::FW_OUTSIDE_V4.to_string(),
            addr::FW_OUTSIDE_V6.to_string(),
        ];
        configured.extend(extra.iter().map(|(ip, _)| ip.to_string()));
        let memory = env.client(Duration::from_mins(5), async move {
            hold_bindings(target, pid, pin_dir, configured).await
        });
        memory.map(|mut memory| {
            memory.daemon_log = daemon_warnings(&guard);
            memory
        })
    })();
    for (ip, prefix) in &extra {
        let _ = run_checked(env.bed.fw.command("ip").args([
            "addr",
            "del",
            &format!("{ip}/{prefix}"),
            "dev",
            iface::FW_OUTSIDE,
        ]));
    }
    outcome.map(|mut memory| {
        memory.bytes_per_binding = if memory.live == 0 {
            f64::NAN
        } else {
            #[expect(clippy::cast_precision_loss, reason = "memory sizes")]
            let per =
                memory.rss_after.saturating_sub(memory.rss_before) as f64 / memory.live as f64;
            per
        };
        memory
    })
}

async fn hold_bindings(
    target: usize,
    pid: i32,
    pin_dir: std::path::PathBuf,
    configured: Vec<String>,
) -> Result<MemoryResult> {
    let rss_before = procfs::read_rss(pid)?;
    let started = Instant::now();
    let sessions_per_family = 32;
    let mut tasks = JoinSet::new();
    for (family, proxy, remote_ip) in [
        (Family::V4, PROXY, IpAddr::V4(addr::SERVER_V4)),
        (
            Family::V6,
            SocketAddr::new(IpAddr::V6(addr::FW_INSIDE_V6), 1080),
            IpAddr::V6(addr::SERVER_V6),
        ),
    ] {
        let count = Arc::new(AtomicUsize::new(0));
        let quota = target / 2;
        for i in 0..sessions_per_family {
            let count = Arc::clone(&count);
            let remote = SocketAddr::new(remote_ip, 6000 + i);
            tasks.spawn(async move {
                let mut held: Vec<UdpBinding> = Vec::new();
                let mut refusal = None;
                let mut externals = BTreeSet::new();
                match Client::connect(proxy, None).await {
                    Ok(client) => match client.enhanced().await {
                        Ok(session) => {
                            while count.fetch_add(1, Ordering::Relaxed) < quota {
                                let made = async {
                                    let binding = session.udp_socket(family).await?;
                                    let relays = binding.bind().await?;
                                    binding.connect(remote).await?;
                                    Ok::<_, gateway_client::ClientError>((binding, relays))
                                };
                                match made.await {
                                    Ok((binding, relays)) => {
                                        externals.insert(relays.external.ip());
                                        held.push(binding);
                                    }
                                    Err(error) => {
                                        refusal = Some(error.to_string());
                                        break;
                                    }
                                }
                            }
                            // The session must outlive its bindings' use: keep it with them.
                            (family, held, refusal, externals, Some(session))
                        }
                        Err(error) => (family, held, Some(error.to_string()), externals, None),
                    },
                    Err(error) => (family, held, Some(error.to_string()), externals, None),
                }
            });
        }
    }
    let outcomes = tasks.join_all().await;
    let setup_seconds = started.elapsed().as_secs_f64();
    let mut memory = MemoryResult {
        target,
        rss_before,
        external_ips_configured: configured,
        setup_seconds,
        ..MemoryResult::default()
    };
    let mut externals = BTreeSet::new();
    let mut refusals: BTreeMap<String, u64> = BTreeMap::new();
    for (family, held, refusal, used, _) in &outcomes {
        memory.live += held.len();
        *memory.per_family.entry(format!("{family:?}")).or_default() += held.len();
        externals.extend(used.iter().map(ToString::to_string));
        if let Some(refusal) = refusal {
            *refusals.entry(refusal.clone()).or_default() += 1;
        }
    }
    memory.refusals = refusals;
    memory.external_ips_used = externals.into_iter().collect();
    // Let the daemon settle (allocator, relay tasks) before reading.
    tokio::time::sleep(Duration::from_millis(500)).await;
    memory.rss_after = procfs::read_rss(pid)?;
    memory.kernel_map_bytes = kernel_map_bytes(&pin_dir);
    drop(outcomes);
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(memory)
}

/// The first few distinct warnings and errors of the daemon's log (timestamps cut off).
fn daemon_warnings(guard: &ArmGuard) -> Vec<String> {
    let Some(gateway) = guard.gateway.as_ref() else {
        return Vec::new();
    };
    let mut seen = Vec::new();
    for line in gateway.log_text().lines() {
        // The resolver's start-up warning (no nameserver in the test bed) is not about bindings.
        if !(line.contains("WARN") || line.contains("ERROR")) || line.contains("gateway::resolver")
        {
            continue;
        }
        let text = line
            .find("WARN")
            .or_else(|| line.find("ERROR"))
            .map_or(line, |at| &line[at..])
            .to_owned();
        if !seen.contains(&text) {
            seen.push(text);
        }
        if seen.len() >= 3 {
            break;
        }
    }
    seen
}

/// `bytes_memlock` of the pinned BINDINGS and OUTBOUND maps, from bpftool.
fn kernel_map_bytes(pin_dir: &std::path::Path) -> Option<u64> {
    let mut total = 0;
    for map in ["BINDINGS", "OUTBOUND"] {
        let out = std::process::Command::new("bpftool")
            .args(["-j", "map", "show", "pinned"])
            .arg(pin_dir.join(map))
            .output()
            .ok()?;
        let value: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        total += value["bytes_memlock"].as_u64()?;
    }
    Some(total)
}
