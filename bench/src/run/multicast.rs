//! Area 8, multicast fan-out: one group stream from `server` (233.252.0.7, flat out, TTL 4)
//! through the gateway to 1, 8 and 64 subscribers in `client`, each with its own control
//! connection in the enhanced mode (UDP BIND, receive + multicast-to-unicast) and its own UDP
//! socket; one `udp-blast sinks` reads all of a run's sockets. Measured: datagrams delivered per
//! second summed over the subscribers (UDP `InDatagrams` of `client`), system-wide CPU per
//! delivered datagram (`/proc/stat`), and who carried the copies: the kernel's
//! `kernel_relayed_multicast` against the userspace relay's (`multicast_to_userspace`, the
//! members' `userspace_packets` in `gateway bindings`). The daemon's counters are read before the
//! sender starts and after it ends, outside the measured window (the CLI costs CPU too).

use std::{
    io::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    os::fd::{AsRawFd as _, RawFd},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use bench::model::{MulticastRun, Results, kernel_share};
use bytes::BytesMut;
use gateway_proto::enhanced::{ControlRequest, EnhancedReplyCode, Flags, Packet, UdpCommand};
use serde_json::Value;
use testbed::{
    addr,
    gateway::{gateway_cli, reason_packets, stats_json},
    iface, run_checked,
};

use super::{
    arms::{Arm, ArmGuard, rotated},
    control::raw_session,
    env::{Blast, Env, SocketSpec, measure},
};

/// The group (from 233.252.0.0/24, the documentation block).
pub const GROUP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(233, 252, 0, 7)), 5004);
/// What the gateway is allowed to receive.
const POLICY: [&str; 2] = ["--allow-multicast-receive", "233.252.0.0/24"];
/// The group's sender in `server` (a port no other area sends from).
const SENDER: SocketAddr = SocketAddr::new(IpAddr::V4(addr::SERVER_V4), 6100);
/// TTL of the group datagrams: more than 1, to cross `fw`.
const TTL: u32 = 4;
/// UDP BIND flags: receive (0x0001) | multicast (0x0010) | multicast-to-unicast (0x0020).
const RECEIVE_MU: u16 = 0x0031;
/// Receive buffer of each subscriber's socket.
const SINK_BUFFER: usize = 4 << 20;
/// How long the daemon may take to list every subscriber, or to drop them after the close.
const SETTLE: Duration = Duration::from_secs(10);

pub fn run(env: &Env, results: &mut Results) {
    let _route = match GroupRoute::add(env) {
        Ok(route) => route,
        Err(error) => {
            let text = format!("multicast: {error:#}");
            env.progress(&format!("FAILED {text}"));
            results.errors.push(text);
            return;
        }
    };
    let runs = env.plan.runs;
    for run in 0..runs {
        if let Err(error) = gateway_run(env, run, results) {
            let text = format!("multicast run {}: {error:#}", run + 1);
            env.progress(&format!("FAILED {text}"));
            results.errors.push(text);
        }
    }
}

/// One gateway for all subscriber counts of a run (in rotated order).
fn gateway_run(env: &Env, run: usize, results: &mut Results) -> Result<()> {
    let guard = ArmGuard::start(env, Arm::Kernel, &POLICY)?;
    let instance = guard
        .instance()
        .context("the gateway's instance")?
        .to_owned();
    for subscribers in rotated(&env.plan.multicast_subscribers, run) {
        match fan_out(env, &instance, subscribers) {
            Ok(measured) => {
                report(env, run, &measured);
                results
                    .multicast
                    .entry(subscribers)
                    .or_default()
                    .push(measured);
            }
            Err(error) => {
                let text = format!(
                    "multicast run {} with {subscribers} subscribers: {error:#}",
                    run + 1
                );
                env.progress(&format!("FAILED {text}"));
                results.errors.push(text);
            }
        }
    }
    drop(guard);
    Ok(())
}

fn report(env: &Env, run: usize, m: &MulticastRun) {
    env.progress(&format!(
        "multicast run {}/{} {:>3} subscriber(s): offered {:>8.0} pps, delivered {:>8.0} pps \
         ({:>7.0} each), loss {:5.2} %, {:6.0} ns CPU/delivered; copies kernel {} userspace {} \
         (kernel share {})",
        run + 1,
        env.plan.runs,
        m.subscribers,
        m.offered_pps,
        m.delivered_pps,
        m.per_subscriber_pps,
        m.loss * 100.0,
        m.cpu_ns_per_delivered,
        m.kernel_copies,
        m.userspace_copies,
        if m.kernel_share.is_finite() {
            format!("{:.1} %", m.kernel_share * 100.0)
        } else {
            "n/a".to_owned()
        },
    ));
}

/// The multicast route of the sender's link in `server`, removed on drop.
struct GroupRoute {
    server: std::path::PathBuf,
}

impl GroupRoute {
    fn add(env: &Env) -> Result<Self> {
        run_checked(env.bed.server.command("ip").args([
            "route",
            "replace",
            "224.0.0.0/4",
            "dev",
            iface::HOST,
        ]))
        .context("add the multicast route in server")?;
        Ok(Self {
            server: env.bed.server.path(),
        })
    }
}

impl Drop for GroupRoute {
    fn drop(&mut self) {
        let _ = Command::new("nsenter")
            .arg(format!("--net={}", self.server.display()))
            .args(["ip", "route", "del", "224.0.0.0/4", "dev", iface::HOST])
            .status();
    }
}

/// One subscriber: its control connection and its socket.
struct Subscriber {
    _control: TcpStream,
    socket: UdpSocket,
}

/// Makes `count` subscribers of [`GROUP`] in `client`, one control connection each.
fn subscribe(env: &Env, count: usize) -> Result<Vec<Subscriber>> {
    env.bed.client.run(move || -> Result<Vec<Subscriber>> {
        let mut subscribers = Vec::with_capacity(count);
        let mut buffer = BytesMut::new();
        for i in 0..count {
            let socket = UdpSocket::bind(SocketAddr::new(IpAddr::V4(addr::CLIENT_V4), 0))?;
            let mut control = raw_session()?;
            let request = ControlRequest {
                command: UdpCommand::Bind,
                flags: Flags::from_bits_retain(RECEIVE_MU),
                ttl: 0,
                tid: 1,
                aid: 0,
                local: socket.local_addr()?.into(),
                remote: GROUP.into(),
            };
            let mut out = BytesMut::new();
            request.encode(&mut out)?;
            control.write_all(&out)?;
            buffer.clear();
            let reply = read_reply(&mut control, &mut buffer)
                .with_context(|| format!("subscriber {}'s UDP BIND", i + 1))?;
            ensure!(
                reply.code == EnhancedReplyCode::Succeeded,
                "subscriber {}'s UDP BIND refused: {:?}",
                i + 1,
                reply.code
            );
            subscribers.push(Subscriber {
                _control: control,
                socket,
            });
        }
        Ok(subscribers)
    })?
}

fn read_reply(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
) -> Result<gateway_proto::enhanced::ControlReply> {
    use std::io::Read as _;
    let mut chunk = [0u8; 512];
    loop {
        if let Some(packet) = Packet::decode(buf)? {
            let Packet::Reply(reply) = packet else {
                bail!("not a control reply: {packet:?}");
            };
            return Ok(reply);
        }
        let n = stream.read(&mut chunk)?;
        ensure!(n > 0, "the gateway closed the control connection");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// `gateway bindings --json`.
fn bindings(env: &Env, instance: &str) -> Result<Value> {
    let out = gateway_cli(&env.bed.fw, &["bindings", "--instance", instance, "--json"])?;
    if !out.status.success() {
        bail!("gateway bindings: {}", String::from_utf8_lossy(&out.stderr));
    }
    serde_json::from_slice(&out.stdout).context("parse gateway bindings --json")
}

/// The members of [`GROUP`] in a bindings document (none when the group is not listed).
fn members(doc: &Value) -> Vec<Value> {
    doc["multicast_groups"]
        .as_array()
        .and_then(|groups| {
            groups
                .iter()
                .find(|g| g["group"] == GROUP.to_string())
                .and_then(|g| g["members"].as_array().cloned())
        })
        .unwrap_or_default()
}

/// Waits until the daemon lists `count` members of the group; returns them.
fn wait_members(env: &Env, instance: &str, count: usize) -> Result<Vec<Value>> {
    let start = Instant::now();
    loop {
        let listed = members(&bindings(env, instance)?);
        if listed.len() == count {
            return Ok(listed);
        }
        if start.elapsed() > SETTLE {
            bail!(
                "the daemon lists {} members of {GROUP}, not {count}",
                listed.len()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn userspace_packets(members: &[Value]) -> u64 {
    members
        .iter()
        .map(|m| m["userspace_packets"].as_u64().unwrap_or(0))
        .sum()
}

/// The group's sender socket in `server`, TTL [`TTL`].
fn sender_socket(env: &Env) -> Result<UdpSocket> {
    let socket = env
        .bed
        .server
        .run(|| UdpSocket::bind(SENDER))?
        .with_context(|| format!("bind the group sender {SENDER}"))?;
    socket.set_multicast_ttl_v4(TTL)?;
    socket.set_multicast_loop_v4(false)?;
    Ok(socket)
}

/// One measured stream to `count` subscribers.
fn fan_out(env: &Env, instance: &str, count: usize) -> Result<MulticastRun> {
    let plan = &env.plan;
    let subscribers = subscribe(env, count)?;
    let fds: Vec<RawFd> = subscribers.iter().map(|s| s.socket.as_raw_fd()).collect();
    let outcome = (|| -> Result<MulticastRun> {
        let sink_args = vec![
            "sinks".to_owned(),
            "--duration".to_owned(),
            format!("{}", plan.sender_time().as_secs_f64() + 20.0),
            "--buffer".to_owned(),
            SINK_BUFFER.to_string(),
        ];
        let mut sink =
            Blast::spawn_with_fds(env, &env.bed.client, &sink_args, &fds, "udp-blast sinks")?;
        sink.wait_event("ready", Duration::from_secs(5))?;
        let before_members = wait_members(env, instance, count)?;
        let members_in_kernel = before_members
            .iter()
            .filter(|m| m["in_kernel"] == true)
            .count();
        let before = stats_json(&env.bed.fw, instance)?;
        let sender_socket = sender_socket(env)?;
        let sender_args = vec![
            "send".to_owned(),
            "--to".to_owned(),
            GROUP.to_string(),
            "--size".to_owned(),
            plan.multicast_size.to_string(),
            "--duration".to_owned(),
            format!("{}", plan.sender_time().as_secs_f64()),
            "--rate".to_owned(),
            plan.rate(0).to_string(),
        ];
        let mut sender = Blast::spawn(
            env,
            &env.bed.server,
            &sender_args,
            SocketSpec::Fd(sender_socket.as_raw_fd()),
            "udp-blast send (group)",
        )?;
        drop(sender_socket);
        sender.wait_event("started", Duration::from_secs(5))?;
        let window = measure(&env.bed.server, &env.bed.client, plan.warmup, plan.window)?;
        let sender_report = sender
            .finish(plan.sender_time() + Duration::from_secs(10))
            .context("the group sender's report")?;
        std::thread::sleep(Duration::from_millis(150));
        let sink_report = sink.stop().context("the sinks' report")?;
        let after = stats_json(&env.bed.fw, instance)?;
        let after_members = members(&bindings(env, instance)?);
        let delta = |reason: &str| {
            reason_packets(&after, reason).saturating_sub(reason_packets(&before, reason))
        };
        let kernel_copies = delta("kernel_relayed_multicast");
        let userspace_copies =
            userspace_packets(&after_members).saturating_sub(userspace_packets(&before_members));
        let offered = window.offered_pps();
        let delivered = window.delivered_pps();
        #[expect(clippy::cast_precision_loss, reason = "subscriber counts")]
        let fan = count as f64;
        Ok(MulticastRun {
            subscribers: count,
            offered_pps: offered,
            delivered_pps: delivered,
            per_subscriber_pps: delivered / fan,
            loss: if offered > 0.0 {
                (1.0 - delivered / (offered * fan)).max(0.0)
            } else {
                0.0
            },
            cpu_ns_per_delivered: if delivered > 0.0 {
                window.busy_ns / (delivered * window.secs)
            } else {
                f64::NAN
            },
            cpu_ns_per_offered: if offered > 0.0 {
                window.busy_ns / (offered * window.secs)
            } else {
                f64::NAN
            },
            busy_cores: window.busy_ns / (window.secs * 1e9),
            rcvbuf_errors: window.rx.rcvbuf_errors,
            sink_min: sink_report["per_socket_min"].as_u64().unwrap_or(0),
            sink_max: sink_report["per_socket_max"].as_u64().unwrap_or(0),
            kernel_copies,
            to_userspace: delta("multicast_to_userspace"),
            userspace_copies,
            kernel_share: kernel_share(kernel_copies, userspace_copies),
            members_in_kernel,
            sender_sent: sender_report["sent"].as_u64().unwrap_or(0),
        })
    })();
    // The control connections close: the daemon drops the members and leaves the group.
    drop(subscribers);
    let start = Instant::now();
    while start.elapsed() < SETTLE {
        if bindings(env, instance).is_ok_and(|doc| members(&doc).is_empty()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    outcome
}
