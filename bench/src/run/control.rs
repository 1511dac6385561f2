//! Area 3, control plane: two-step bindings (step 1, step 2, release) per second over many
//! concurrent enhanced-mode control connections; RFC 1928 UDP ASSOCIATE setups per second on the
//! gateway and on Dante; and the daemon's resident memory per live binding, spread over extra
//! external addresses where the daemon uses them.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{Context as _, Result};
use bench::{
    model::{ControlRun, MemoryResult, Results},
    procfs,
    stats::Percentiles,
};
use gateway_client::{Client, Family, Timeouts, blocking};
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
    /// One request at a time per connection (the client library's way).
    Enhanced,
    /// [`PIPELINE`] bindings in flight per connection: requests written back to back.
    EnhancedPipelined,
    GatewayAssociate,
    DanteAssociate,
}

/// Bindings a pipelining connection has in flight (each step for all of them in one write).
pub const PIPELINE: usize = 8;

impl Load {
    const ALL: [Load; 4] = [
        Load::Enhanced,
        Load::EnhancedPipelined,
        Load::GatewayAssociate,
        Load::DanteAssociate,
    ];

    fn key(self) -> &'static str {
        match self {
            Load::Enhanced => "enhanced",
            Load::EnhancedPipelined => "enhanced_pipelined",
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
    // A pipelining connection keeps PIPELINE bindings in flight: a quarter of the connections
    // keeps about as many setups outstanding as the lock-step load.
    let conns = if load == Load::EnhancedPipelined {
        env.plan.control_conns.div_ceil(4)
    } else {
        env.plan.control_conns
    };
    let time = env.plan.control_time;
    let mut run = env.client(time + Duration::from_mins(1), async move {
        match load {
            Load::Enhanced => enhanced_load(conns, time).await,
            Load::EnhancedPipelined => {
                tokio::task::spawn_blocking(move || pipelined_threads(conns, time))
                    .await
                    .context("load threads")?
            }
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

/// `conns` enhanced-mode sessions, each doing bind, connect, release in a loop for `time`: one
/// thread per session on the blocking client, LOCAL without a socket behind it (the gateway only
/// reserves and installs), so the load generator spends its share of the 2 CPUs on the protocol.
async fn enhanced_load(conns: usize, time: Duration) -> Result<ControlRun> {
    tokio::task::spawn_blocking(move || enhanced_threads(conns, time))
        .await
        .context("load threads")?
}

fn enhanced_threads(conns: usize, time: Duration) -> Result<ControlRun> {
    let mut sessions = Vec::with_capacity(conns);
    for _ in 0..conns {
        sessions.push(blocking::Client::connect(PROXY, None, Timeouts::default())?.enhanced()?);
    }
    let start = std::time::Instant::now();
    let deadline = start + time;
    let outcomes = on_threads(sessions, |i, mut session: blocking::Session| {
        let local = SocketAddr::new(
            IpAddr::V4(addr::CLIENT_V4),
            10_000 + u16::try_from(i % 20_000).unwrap_or(0),
        );
        let remote = SocketAddr::new(
            IpAddr::V4(addr::SERVER_V4),
            20_000 + u16::try_from(i % 20_000).unwrap_or(0),
        );
        let mut outcome = TaskOutcome::default();
        while std::time::Instant::now() < deadline && outcome.errors < MAX_ERRORS {
            let t0 = std::time::Instant::now();
            let result = (|| {
                let mut binding = session.bind(local, Family::V4)?;
                session.connect(&mut binding, remote)?;
                let setup = t0.elapsed();
                session.release(binding)?;
                Ok::<_, gateway_client::ClientError>(setup)
            })();
            match result {
                Ok(setup) => {
                    outcome.completed += 1;
                    outcome.latencies_ns.push(nanos(setup));
                }
                Err(error) => {
                    outcome.error(error);
                    if session.is_closed() {
                        break;
                    }
                }
            }
        }
        outcome
    });
    Ok(combine(conns, start.elapsed(), outcomes))
}

/// Runs `work` for each item on a thread of its own; what each returned (the default for one
/// that panicked).
fn on_threads<I: Send, T: Default + Send>(
    items: Vec<I>,
    work: impl Fn(usize, I) -> T + Sync,
) -> Vec<T> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .into_iter()
            .enumerate()
            .map(|(i, item)| {
                let work = &work;
                scope.spawn(move || work(i, item))
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().unwrap_or_default())
            .collect()
    })
}

/// A control connection in the enhanced mode, entered by hand (no client library): anonymous
/// greeting, CMD 04, the 10-octet entry reply.
pub(super) fn raw_session() -> Result<std::net::TcpStream> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect_timeout(&PROXY, Duration::from_secs(5))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(&[5, 1, 0])?;
    let mut method = [0u8; 2];
    stream.read_exact(&mut method)?;
    anyhow::ensure!(method == [5, 0], "greeting refused: {method:02x?}");
    stream.write_all(&[5, 4, 0, 1, 0, 0, 0, 0, 0, 0])?;
    let mut entry = [0u8; 10];
    stream.read_exact(&mut entry)?;
    anyhow::ensure!(entry[1] == 0, "enhanced mode refused: {entry:02x?}");
    Ok(stream)
}

/// Reads `count` control replies; their AIDs, or the first refusal.
fn read_replies(
    stream: &mut std::net::TcpStream,
    buf: &mut bytes::BytesMut,
    count: usize,
) -> Result<Vec<u32>> {
    use gateway_proto::enhanced::Packet;
    use std::io::Read as _;
    let mut aids = Vec::with_capacity(count);
    let mut chunk = [0u8; 4096];
    while aids.len() < count {
        if let Some(packet) = Packet::decode(buf)? {
            let Packet::Reply(reply) = packet else {
                anyhow::bail!("not a control reply: {packet:?}");
            };
            anyhow::ensure!(
                reply.code == gateway_proto::enhanced::EnhancedReplyCode::Succeeded,
                "refused: {:?}",
                reply.code
            );
            aids.push(reply.aid);
            continue;
        }
        let n = stream.read(&mut chunk)?;
        anyhow::ensure!(n > 0, "the gateway closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(aids)
}

/// `conns` connections, each with [`PIPELINE`] bindings in flight: step 1 for all of them in one
/// write, then step 2, then release, in a loop for `time`. A binding's setup time runs from the
/// write of its step 1 to the arrival of its step-2 reply.
fn pipelined_threads(conns: usize, time: Duration) -> Result<ControlRun> {
    let mut streams = Vec::with_capacity(conns);
    for _ in 0..conns {
        streams.push(raw_session()?);
    }
    let start = std::time::Instant::now();
    let deadline = start + time;
    let outcomes = on_threads(streams, |i, stream| {
        pipelined_connection(i, stream, deadline)
    });
    Ok(combine(conns, start.elapsed(), outcomes))
}

/// Connection `i` of the pipelined load, until `deadline`.
fn pipelined_connection(
    i: usize,
    mut stream: std::net::TcpStream,
    deadline: std::time::Instant,
) -> TaskOutcome {
    use gateway_proto::{
        Address,
        enhanced::{ControlRequest, Flags, UdpCommand},
    };
    use std::io::Write as _;
    let mut outcome = TaskOutcome::default();
    let base = 10_000 + u16::try_from(i * PIPELINE * 2 % 40_000).unwrap_or(0);
    let local = |k: usize| {
        Address::Ip(SocketAddr::new(
            IpAddr::V4(addr::CLIENT_V4),
            base + u16::try_from(k * 2).unwrap_or(0),
        ))
    };
    let remote = Address::Ip(SocketAddr::new(
        IpAddr::V4(addr::SERVER_V4),
        20_000 + u16::try_from(i % 20_000).unwrap_or(0),
    ));
    let request = |command, k: usize, aid, local, remote| ControlRequest {
        command,
        flags: if command == UdpCommand::Bind {
            Flags::RECEIVE | Flags::SEND | Flags::UNICAST
        } else {
            Flags::empty()
        },
        ttl: 0,
        tid: u16::try_from(k + 1).unwrap_or(1),
        aid,
        local,
        remote,
    };
    let unspecified = || Address::UNSPECIFIED_V4;
    let mut buf = bytes::BytesMut::new();
    let mut out = bytes::BytesMut::new();
    while std::time::Instant::now() < deadline && outcome.errors < MAX_ERRORS {
        let mut round = || -> Result<u64> {
            let t0 = std::time::Instant::now();
            out.clear();
            for k in 0..PIPELINE {
                request(UdpCommand::Bind, k, 0, local(k), unspecified()).encode(&mut out)?;
            }
            stream.write_all(&out)?;
            let aids = read_replies(&mut stream, &mut buf, PIPELINE)?;
            out.clear();
            for (k, aid) in aids.iter().enumerate() {
                request(UdpCommand::Bind, k, *aid, local(k), remote.clone()).encode(&mut out)?;
            }
            stream.write_all(&out)?;
            read_replies(&mut stream, &mut buf, PIPELINE)?;
            let setup = nanos(t0.elapsed());
            out.clear();
            for (k, aid) in aids.iter().enumerate() {
                request(UdpCommand::Release, k, *aid, unspecified(), unspecified())
                    .encode(&mut out)?;
            }
            stream.write_all(&out)?;
            read_replies(&mut stream, &mut buf, PIPELINE)?;
            Ok(setup)
        };
        match round() {
            Ok(setup) => {
                outcome.completed += PIPELINE as u64;
                outcome
                    .latencies_ns
                    .extend(std::iter::repeat_n(setup, PIPELINE));
            }
            Err(error) => {
                outcome.error(format!("{error:#}"));
                break;
            }
        }
    }
    outcome
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

/// Extra addresses for the memory scenario: on fw's outside interface (external relay
/// addresses), on fw's inside interface (internal relay addresses) and on the client (client
/// hosts, each of which keeps one external address).
struct ExtraAddresses {
    external: Vec<(IpAddr, u8)>,
    internal: Vec<(IpAddr, u8)>,
    clients: Vec<(IpAddr, u8)>,
}

fn extra_addresses() -> ExtraAddresses {
    let v4 = |net: [u8; 3], range: std::ops::Range<u8>| -> Vec<(IpAddr, u8)> {
        range
            .map(|i| (IpAddr::from([net[0], net[1], net[2], i]), 24))
            .collect()
    };
    let v6 = |net: u16, range: std::ops::Range<u16>| -> Vec<(IpAddr, u8)> {
        range
            .map(|i| (IpAddr::from([0x2001, 0xdb8, net, 0, 0, 0, 0, i]), 64))
            .collect()
    };
    let mut external = v4([203, 0, 113], 10..14);
    external.extend(v6(2, 0x10..0x14));
    let mut internal = v4([198, 51, 100], 10..14);
    internal.extend(v6(1, 0x10..0x14));
    let mut clients = v4([198, 51, 100], 20..28);
    clients.extend(v6(1, 0x20..0x28));
    ExtraAddresses {
        external,
        internal,
        clients,
    }
}

/// Relay ports per address in the memory scenario: internal and external addresses differ, so
/// both sides take the same wide range below the ephemeral ports.
const MEMORY_PORTS: &str = "2048-32767";

/// Holds as many confirmed two-step bindings as the daemon gives (up to the plan's target),
/// half IPv4 and half IPv6, from several client hosts over several internal and external
/// addresses, and reads the daemon's resident memory and descriptors.
fn memory(env: &Env) -> Result<MemoryResult> {
    let extra = extra_addresses();
    let places = [
        (&env.bed.fw, &extra.external, iface::FW_OUTSIDE),
        (&env.bed.fw, &extra.internal, iface::FW_INSIDE),
        (&env.bed.client, &extra.clients, iface::HOST),
    ];
    for (ns, addrs, dev) in places {
        for (ip, prefix) in addrs {
            add_address(ns, *ip, *prefix, dev)?;
        }
    }
    let outcome = (|| {
        let target = env.plan.memory_target;
        // Room above the target, so the gateway-wide cap (half the kernel entries) is not what stops it.
        let kernel_entries = (target * 2 + 4096).max(65_536).to_string();
        let per_client = target.max(1024).to_string();
        let guard = ArmGuard::start(
            env,
            Arm::Kernel,
            &[
                "--max-bindings",
                &kernel_entries,
                "--internal-ports",
                MEMORY_PORTS,
                "--external-ports",
                MEMORY_PORTS,
                "--max-bindings-per-connection",
                &per_client,
                "--max-bindings-per-user",
                &per_client,
            ],
        )?;
        let pid = guard.daemon_pid().context("daemon pid")?;
        let pin_dir = guard.cleanup.as_ref().context("pins")?.pin_dir();
        let mut configured = vec![
            addr::FW_OUTSIDE_V4.to_string(),
            addr::FW_OUTSIDE_V6.to_string(),
        ];
        configured.extend(extra.external.iter().map(|(ip, _)| ip.to_string()));
        let mut clients: Vec<IpAddr> = vec![addr::CLIENT_V4.into(), addr::CLIENT_V6.into()];
        clients.extend(extra.clients.iter().map(|(ip, _)| *ip));
        let memory = env.client(Duration::from_mins(5), async move {
            tokio::task::spawn_blocking(move || {
                hold_bindings(target, pid, &pin_dir, configured, &clients)
            })
            .await
            .context("holding threads")?
        });
        memory.map(|mut memory| {
            memory.daemon_log = daemon_warnings(&guard);
            memory
        })
    })();
    for (ns, addrs, dev) in places {
        for (ip, prefix) in addrs {
            let _ = run_checked(ns.command("ip").args([
                "addr",
                "del",
                &format!("{ip}/{prefix}"),
                "dev",
                dev,
            ]));
        }
    }
    outcome.map(|mut memory| {
        #[expect(clippy::cast_precision_loss, reason = "memory sizes and counts")]
        if memory.live > 0 {
            let live = memory.live as f64;
            memory.bytes_per_binding =
                memory.rss_after.saturating_sub(memory.rss_before) as f64 / live;
            memory.fds_per_binding =
                memory.fds_after.saturating_sub(memory.fds_before) as f64 / live;
        } else {
            memory.bytes_per_binding = f64::NAN;
            memory.fds_per_binding = f64::NAN;
        }
        memory
    })
}

/// A control connection from `source` (one of the client's addresses), in the enhanced mode.
fn session_from(source: IpAddr) -> Result<blocking::Session> {
    let proxy = match source {
        IpAddr::V4(_) => PROXY,
        IpAddr::V6(_) => SocketAddr::new(IpAddr::V6(addr::FW_INSIDE_V6), 1080),
    };
    let stream = bound_stream(source, proxy)?;
    Ok(blocking::Client::over(stream, None, Timeouts::default())?.enhanced()?)
}

/// A TCP connection from `source` to `to`.
fn bound_stream(source: IpAddr, to: SocketAddr) -> Result<std::net::TcpStream> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrStorage, bind, connect, socket,
    };
    use std::os::fd::AsRawFd as _;
    let family = if source.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    bind(
        fd.as_raw_fd(),
        &SockaddrStorage::from(SocketAddr::new(source, 0)),
    )?;
    connect(fd.as_raw_fd(), &SockaddrStorage::from(to))?;
    Ok(std::net::TcpStream::from(fd))
}

fn hold_bindings(
    target: usize,
    pid: i32,
    pin_dir: &std::path::Path,
    configured: Vec<String>,
    clients: &[IpAddr],
) -> Result<MemoryResult> {
    // Sessions first: their descriptors are the daemon's, not the bindings'.
    let mut sessions = Vec::new();
    for client in clients {
        sessions.push((*client, session_from(*client)?));
    }
    std::thread::sleep(Duration::from_millis(300));
    let rss_before = procfs::read_rss(pid)?;
    let fds_before = procfs::fd_count(pid)?;
    let started = std::time::Instant::now();
    let quota = target.div_ceil(clients.len());
    let outcomes = std::thread::scope(|scope| {
        let handles: Vec<_> = sessions
            .into_iter()
            .enumerate()
            .map(|(i, (client, mut session))| {
                let (family, remote_ip) = match client {
                    IpAddr::V4(_) => (Family::V4, IpAddr::V4(addr::SERVER_V4)),
                    IpAddr::V6(_) => (Family::V6, IpAddr::V6(addr::SERVER_V6)),
                };
                let remote = SocketAddr::new(remote_ip, 6000 + u16::try_from(i).unwrap_or(0));
                scope.spawn(move || {
                    let mut held = Vec::with_capacity(quota);
                    let mut refusal = None;
                    let mut externals = BTreeSet::new();
                    for n in 0..quota {
                        let local =
                            SocketAddr::new(client, 1024 + u16::try_from(n % 60_000).unwrap_or(0));
                        let made = (|| {
                            let mut binding = session.bind(local, family)?;
                            let relays = session.connect(&mut binding, remote)?;
                            Ok::<_, gateway_client::ClientError>((binding, relays))
                        })();
                        match made {
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
                    // The session must outlive the reading: return it with its bindings.
                    (family, held, refusal, externals, session)
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|handle| handle.join().ok())
            .collect::<Vec<_>>()
    });
    let setup_seconds = started.elapsed().as_secs_f64();
    let mut memory = MemoryResult {
        target,
        rss_before,
        fds_before,
        external_ips_configured: configured,
        client_addresses: clients.len(),
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
    // Let the daemon settle (allocator) before reading.
    std::thread::sleep(Duration::from_millis(500));
    memory.rss_after = procfs::read_rss(pid)?;
    memory.fds_after = procfs::fd_count(pid)?;
    memory.kernel_map_bytes = kernel_map_bytes(pin_dir);
    drop(outcomes);
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
