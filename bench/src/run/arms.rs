//! The arms compared: the gateway's in-kernel relay (with the 8-octet header, and header-less:
//! RAW), each with the gate where the daemon puts it by default (tc on veth) and forced into
//! XDP; its userspace relay; Dante's `sockd` (the packaged SOCKS server with a UDP relay,
//! standard UDP ASSOCIATE); plain kernel forwarding in `fw` (no proxy: the test bed's limit),
//! also with a pass-through XDP program attached (what veth charges for any XDP program); and an
//! nftables exact hole with DNAT and SNAT through conntrack for the same flow (what an operator
//! would configure instead of the gateway for a flow known in advance). Each arm is brought up
//! in `fw` and torn down by a guard; a [`ClientPath`] is the client's side of one media flow
//! through it.

use std::{
    fs,
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use gateway_client::{BindOptions, Family, RelayAddrs, blocking};
use nix::sys::signal::{Signal, kill};
use serde::Serialize;
use testbed::{
    ChildGuard, Netns, addr,
    gateway::{GatewayDaemon, InstanceCleanup},
    iface, run_checked, unique_suffix, wait_until,
};

use super::{
    env::{Env, SocketSpec},
    pass_xdp::PassXdp,
};

/// The SOCKS port in `fw` (the gateway's default and Dante's configured one).
pub const PROXY: SocketAddr = SocketAddr::new(IpAddr::V4(addr::FW_INSIDE_V4), 1080);
/// The media source in `server` (the REMOTE of step 2).
pub const SOURCE: SocketAddr = SocketAddr::new(IpAddr::V4(addr::SERVER_V4), 6000);
/// The plain arm's receiver in `client`.
pub const PLAIN_SINK: SocketAddr = SocketAddr::new(IpAddr::V4(addr::CLIENT_V4), 5004);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arm {
    /// The in-kernel relay as an operator gets it: the gate's default hook.
    Kernel,
    /// The in-kernel relay with the gate forced into XDP (`--gate-hook xdp`).
    KernelXdp,
    /// The in-kernel relay of a header-less (RAW) binding.
    Raw,
    /// RAW with the gate in XDP.
    RawXdp,
    Userspace,
    Dante,
    Plain,
    /// Plain forwarding with a pass-through XDP program on `fw`'s external interface.
    PlainXdp,
    /// An nftables DNAT/SNAT exact hole (conntrack) for the flow.
    Nat,
}

/// `--gate-hook xdp`, for the arms that force it.
const GATE_IN_XDP: [&str; 2] = ["--gate-hook", "xdp"];

impl Arm {
    /// The media relay's arms.
    pub const RELAYS: [Arm; 9] = [
        Arm::Kernel,
        Arm::KernelXdp,
        Arm::Raw,
        Arm::RawXdp,
        Arm::Userspace,
        Arm::Dante,
        Arm::Plain,
        Arm::PlainXdp,
        Arm::Nat,
    ];
    /// The echo latency's arms.
    pub const LATENCY: [Arm; 5] = [
        Arm::Kernel,
        Arm::Raw,
        Arm::Userspace,
        Arm::Dante,
        Arm::Plain,
    ];

    pub fn key(self) -> &'static str {
        match self {
            Arm::Kernel => "kernel",
            Arm::KernelXdp => "kernel_xdp",
            Arm::Raw => "raw",
            Arm::RawXdp => "raw_xdp",
            Arm::Userspace => "userspace",
            Arm::Dante => "dante",
            Arm::Plain => "plain",
            Arm::PlainXdp => "plain_xdp",
            Arm::Nat => "nft_nat",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Arm::Kernel => "in-kernel relay",
            Arm::KernelXdp => "kernel, XDP gate",
            Arm::Raw => "in-kernel RAW",
            Arm::RawXdp => "RAW, XDP gate",
            Arm::Userspace => "userspace relay",
            Arm::Dante => "Dante sockd",
            Arm::Plain => "plain forwarding",
            Arm::PlainXdp => "plain + XDP pass",
            Arm::Nat => "nft DNAT hole",
        }
    }

    /// Whether the arm is the gateway daemon.
    fn is_gateway(self) -> bool {
        matches!(
            self,
            Arm::Kernel | Arm::KernelXdp | Arm::Raw | Arm::RawXdp | Arm::Userspace
        )
    }

    /// Whether the client asks for header-less delivery.
    fn is_raw(self) -> bool {
        matches!(self, Arm::Raw | Arm::RawXdp)
    }
}

/// `items` rotated left by `run`: arms alternate their order from run to run.
pub fn rotated<T: Copy>(items: &[T], run: usize) -> Vec<T> {
    let n = items.len().max(1);
    (0..items.len()).map(|i| items[(i + run) % n]).collect()
}

/// A running arm; dropping it stops what it started and restores `fw`.
pub struct ArmGuard {
    // Field order is drop order: the daemon stops before its pins are removed.
    pub gateway: Option<GatewayDaemon>,
    pub cleanup: Option<InstanceCleanup>,
    /// Where the gateway runs, for `gateway detach` after its stop.
    gateway_ns: Option<PathBuf>,
    dante: Option<Dante>,
    pass_xdp: Option<PassXdp>,
    nat: Option<NatHole>,
    forwarding_ns: Option<PathBuf>,
}

impl ArmGuard {
    /// Starts `arm` in `fw`; `extra` are more `gateway run` flags.
    pub fn start(env: &Env, arm: Arm, extra: &[&str]) -> Result<Self> {
        let mut guard = Self {
            gateway: None,
            cleanup: None,
            gateway_ns: None,
            dante: None,
            pass_xdp: None,
            nat: None,
            forwarding_ns: None,
        };
        match arm {
            _ if arm.is_gateway() => {
                let instance = format!("bench-{}", unique_suffix());
                guard.cleanup = Some(InstanceCleanup {
                    instance: instance.clone(),
                });
                let mut args = vec![
                    "--external",
                    iface::FW_OUTSIDE,
                    "--internal",
                    iface::FW_INSIDE,
                    "--allow-anonymous",
                    "--datapath",
                    if arm == Arm::Userspace {
                        "userspace"
                    } else {
                        "kernel"
                    },
                ];
                if matches!(arm, Arm::KernelXdp | Arm::RawXdp) {
                    args.extend_from_slice(&GATE_IN_XDP);
                }
                args.extend_from_slice(extra);
                // Extra gateway flags for experiments, e.g. BENCH_GATEWAY_ARGS="--xdp-mode generic".
                let from_env = std::env::var("BENCH_GATEWAY_ARGS").unwrap_or_default();
                args.extend(from_env.split_whitespace());
                guard.gateway_ns = Some(env.bed.fw.path());
                guard.gateway = Some(GatewayDaemon::start(&env.bed.fw, &instance, &args)?);
            }
            Arm::Dante => guard.dante = Some(Dante::start(env)?),
            _ => {
                env.bed.fw.sysctl("net.ipv4.ip_forward", "1")?;
                guard.forwarding_ns = Some(env.bed.fw.path());
                if arm == Arm::PlainXdp {
                    guard.pass_xdp = Some(PassXdp::attach(&env.bed.fw, iface::FW_OUTSIDE)?);
                }
                if arm == Arm::Nat {
                    guard.nat = Some(NatHole::install(env)?);
                }
            }
        }
        Ok(guard)
    }

    pub fn instance(&self) -> Option<&str> {
        self.gateway.as_ref().map(|g| g.instance.as_str())
    }

    pub fn daemon_pid(&self) -> Option<i32> {
        self.gateway.as_ref().map(GatewayDaemon::pid)
    }
}

impl Drop for ArmGuard {
    fn drop(&mut self) {
        if let Some(mut gateway) = self.gateway.take() {
            if !gateway.stop() {
                eprintln!(
                    "bench: the gateway did not stop cleanly:\n{}",
                    gateway.log_text()
                );
            }
            // A stopped gateway leaves its gate dropping: the next arm needs it gone.
            if let Some(ns) = &self.gateway_ns {
                let detached = Command::new("nsenter")
                    .arg(format!("--net={}", ns.display()))
                    .arg(testbed::gateway::gateway_bin())
                    .args(["detach", "--instance", &gateway.instance])
                    .stdout(Stdio::null())
                    .status();
                if !detached.is_ok_and(|status| status.success()) {
                    eprintln!(
                        "bench: gateway detach --instance {} failed",
                        gateway.instance
                    );
                }
            }
        }
        self.cleanup.take();
        self.dante.take();
        self.pass_xdp.take();
        self.nat.take();
        if let Some(ns) = self.forwarding_ns.take() {
            let _ = Command::new("nsenter")
                .arg(format!("--net={}", ns.display()))
                .args(["sysctl", "-qw", "net.ipv4.ip_forward=0"])
                .status();
        }
    }
}

/// Dante's `danted` in `fw`, configured as in the test bed notes, started with `ip netns exec`
/// and stopped by the pid in its pid file.
pub struct Dante {
    child: ChildGuard,
    pid_file: PathBuf,
    config: PathBuf,
    fw: String,
}

const DANTE_CONFIG: &str = "\
logoutput: stderr
internal: 198.51.100.1 port = 1080
external: 203.0.113.1
socksmethod: none
clientmethod: none
user.privileged: root
user.unprivileged: nobody
client pass { from: 198.51.100.0/24 to: 0.0.0.0/0 }
socks pass { from: 198.51.100.0/24 to: 0.0.0.0/0  command: connect udpassociate }
socks pass { from: 0.0.0.0/0 to: 198.51.100.0/24  command: udpreply }
";

impl Dante {
    pub fn start(env: &Env) -> Result<Self> {
        let suffix = unique_suffix();
        let config = env.work_dir.join(format!("danted-{suffix}.conf"));
        let pid_file = env.work_dir.join(format!("danted-{suffix}.pid"));
        fs::write(&config, DANTE_CONFIG).with_context(|| format!("write {}", config.display()))?;
        let fw = env.bed.fw.name().to_owned();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &fw, "danted", "-f"])
            .arg(&config)
            .arg("-p")
            .arg(&pid_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = ChildGuard::spawn(&mut cmd, "danted")?;
        let mut dante = Self {
            child,
            pid_file,
            config,
            fw,
        };
        let up = env.bed.client.run(|| {
            wait_until(Duration::from_secs(10), || {
                TcpStream::connect_timeout(&PROXY, Duration::from_millis(200)).is_ok()
            })
        })?;
        if !up || dante.child.has_exited() {
            bail!("danted did not start (is dante-server installed? `cargo xtask setup`)");
        }
        Ok(dante)
    }

    fn pid_from_file(&self) -> Option<i32> {
        fs::read_to_string(&self.pid_file).ok()?.trim().parse().ok()
    }
}

impl Drop for Dante {
    fn drop(&mut self) {
        if let Some(pid) = self.pid_from_file() {
            let _ = kill(nix::unistd::Pid::from_raw(pid), Signal::SIGTERM);
        }
        self.child
            .stop_with(Signal::SIGTERM, Duration::from_secs(5));
        // Children of the monitor that outlived it (started by our danted), by pid.
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let left = dante_pids(&self.fw);
            if left.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                for pid in left {
                    let _ = kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
                }
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = fs::remove_file(&self.pid_file);
        let _ = fs::remove_file(&self.config);
    }
}

/// Pids of `danted` processes in namespace `ns`.
fn dante_pids(ns: &str) -> Vec<i32> {
    let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|pid| pid.parse::<i32>().ok())
        .filter(|pid| {
            fs::read_to_string(Path::new(&format!("/proc/{pid}/comm")))
                .is_ok_and(|comm| comm.trim() == "danted")
        })
        .collect()
}

/// The client's side of one media flow through an arm.
#[expect(clippy::large_enum_variant, reason = "a handful exist at a time")]
pub enum ClientPath {
    /// Two-step binding (bind, then connect to [`SOURCE`]) on the gateway, for a plain socket
    /// of the client's own; `raw` when granted header-less delivery (the socket is then
    /// connected to [`SOURCE`] itself). Made with the blocking client: the socket is in no
    /// event loop of the bench, so no datagram wakes one (an async runtime's epoll would be woken
    /// for every datagram the sink reads, and charge that to the arm).
    Enhanced {
        _session: blocking::Session,
        _binding: blocking::Binding,
        socket: UdpSocket,
        relays: RelayAddrs,
        raw: bool,
    },
    /// RFC 1928 UDP ASSOCIATE (Dante) for a plain socket of the client's own, made with the
    /// blocking client for the same reason as [`ClientPath::Enhanced`].
    Associate {
        _control: TcpStream,
        socket: UdpSocket,
        relay: SocketAddr,
    },
    /// No proxy: the client's own socket, reached by forwarding.
    Plain,
    /// No proxy: the client's own socket, reached through the nftables DNAT hole.
    Nat,
}

impl ClientPath {
    /// Makes the flow for `arm` (in `client`).
    pub fn open(env: &Env, arm: Arm) -> Result<Self> {
        if arm.is_gateway() {
            let raw = arm.is_raw();
            return env.bed.client.run(move || -> Result<Self> {
                let socket = UdpSocket::bind(SocketAddr::new(IpAddr::V4(addr::CLIENT_V4), 0))?;
                let timeouts = gateway_client::Timeouts::default();
                let mut session = blocking::Client::connect(PROXY, None, timeouts)?.enhanced()?;
                let mut binding =
                    session.bind_with(socket.local_addr()?, Family::V4, BindOptions { raw })?;
                let relays = session.connect(&mut binding, SOURCE)?;
                if raw && !binding.is_raw() {
                    bail!("the gateway did not grant RAW (see its log)");
                }
                if binding.is_raw() {
                    socket.connect(SOURCE)?;
                }
                Ok(Self::Enhanced {
                    raw: binding.is_raw(),
                    _session: session,
                    _binding: binding,
                    socket,
                    relays,
                })
            })?;
        }
        Ok(match arm {
            Arm::Dante => env.bed.client.run(move || -> Result<Self> {
                let socket = UdpSocket::bind(SocketAddr::new(IpAddr::V4(addr::CLIENT_V4), 0))?;
                let timeouts = gateway_client::Timeouts::default();
                let (control, relay) = blocking::Client::connect(PROXY, None, timeouts)?
                    .udp_associate(socket.local_addr()?)?;
                Ok(Self::Associate {
                    _control: control,
                    socket,
                    relay,
                })
            })??,
            Arm::Nat => Self::Nat,
            _ => Self::Plain,
        })
    }

    /// Closes the flow on the client runtime (control connections end, bindings are released).
    pub fn close(self, env: &Env) {
        let _ = env.client(Duration::from_secs(5), async move {
            drop(self);
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok(())
        });
    }

    /// Where the receiver of inbound media reads.
    pub fn sink_socket(&self) -> SocketSpec {
        match self {
            Self::Enhanced { socket, .. } | Self::Associate { socket, .. } => {
                SocketSpec::Fd(socket.as_raw_fd())
            }
            Self::Plain | Self::Nat => SocketSpec::Bind(PLAIN_SINK),
        }
    }

    /// Where the media source sends (`None`: to whoever the client's first datagram came from,
    /// which is Dante's outside port).
    pub fn inbound_to(&self) -> Option<SocketAddr> {
        match self {
            Self::Enhanced { relays, .. } => Some(relays.external),
            Self::Associate { .. } => None,
            Self::Plain => Some(PLAIN_SINK),
            Self::Nat => Some(NAT_HOLE),
        }
    }

    /// Octets of relay header in front of inbound datagrams at the client.
    pub fn inbound_header(&self) -> usize {
        match self {
            Self::Enhanced { raw: false, .. } => 8,
            Self::Associate { .. } => 10,
            Self::Enhanced { raw: true, .. } | Self::Plain | Self::Nat => 0,
        }
    }

    /// The pinger's socket, destination and request header towards [`SOURCE`].
    pub fn ping_route(&self) -> (SocketSpec, SocketAddr, Vec<u8>) {
        match self {
            Self::Enhanced {
                socket, raw: true, ..
            } => (SocketSpec::Fd(socket.as_raw_fd()), SOURCE, Vec::new()),
            Self::Enhanced { socket, relays, .. } => {
                let mut header = vec![0u8; 4];
                header.extend_from_slice(&relays.aid.to_be_bytes());
                (SocketSpec::Fd(socket.as_raw_fd()), relays.internal, header)
            }
            Self::Associate { socket, relay, .. } => (
                SocketSpec::Fd(socket.as_raw_fd()),
                *relay,
                socks_header(SOURCE),
            ),
            Self::Plain | Self::Nat => (
                SocketSpec::Bind(SocketAddr::new(IpAddr::V4(addr::CLIENT_V4), 0)),
                SOURCE,
                Vec::new(),
            ),
        }
    }

    /// Sends one datagram from the client to [`SOURCE`] through the arm, so that Dante opens
    /// its outside port and admits the source's answers. No-op for the other arms.
    pub fn kick(&self) -> Result<()> {
        if let Self::Associate { socket, relay, .. } = self {
            let mut datagram = socks_header(SOURCE);
            datagram.extend_from_slice(b"hello");
            socket
                .send_to(&datagram, relay)
                .context("send the hello through Dante")?;
        }
        Ok(())
    }
}

/// Where the media source sends in the nftables arm: `fw`'s external address, DNAT'ed to
/// [`PLAIN_SINK`]. A port no other arm uses, so the flow's conntrack entry, which outlives the
/// table for its timeout, never meets another arm's datagrams.
pub const NAT_HOLE: SocketAddr = SocketAddr::new(IpAddr::V4(addr::FW_OUTSIDE_V4), 5555);
/// The source the client sees in the nftables arm (SNAT), as the relay's internal address.
const NAT_INSIDE: SocketAddr = SocketAddr::new(IpAddr::V4(addr::FW_INSIDE_V4), 40000);
const NAT_TABLE: &str = "gateway_bench_nat";

/// An exact hole in `fw` for the one media flow, as an operator would configure it with
/// nftables: the flow from [`SOURCE`] to [`NAT_HOLE`] is DNAT'ed to the client and SNAT'ed to
/// `fw`'s inside address (conntrack keeps the mapping), everything else forwarded is dropped.
struct NatHole {
    fw: PathBuf,
}

impl NatHole {
    fn install(env: &Env) -> Result<Self> {
        let script = format!(
            "table ip {NAT_TABLE} {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname \"{outside}\" ip saddr {src} udp sport {sport} ip daddr {hole} udp dport {hport} dnat to {sink}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname \"{inside}\" ip saddr {src} udp sport {sport} ip daddr {sink_ip} udp dport {sink_port} snat to {nat_inside}
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    ct status dnat ip daddr {sink_ip} udp dport {sink_port} accept
  }}
}}
",
            outside = iface::FW_OUTSIDE,
            inside = iface::FW_INSIDE,
            src = SOURCE.ip(),
            sport = SOURCE.port(),
            hole = NAT_HOLE.ip(),
            hport = NAT_HOLE.port(),
            sink = PLAIN_SINK,
            sink_ip = PLAIN_SINK.ip(),
            sink_port = PLAIN_SINK.port(),
            nat_inside = NAT_INSIDE,
        );
        let path = env.work_dir.join("nat.nft");
        fs::write(&path, script)?;
        run_checked(env.bed.fw.command("nft").arg("-f").arg(&path))
            .context("install the nftables DNAT hole (is nftables installed?)")?;
        Ok(Self {
            fw: env.bed.fw.path(),
        })
    }
}

impl Drop for NatHole {
    fn drop(&mut self) {
        let _ = Command::new("nsenter")
            .arg(format!("--net={}", self.fw.display()))
            .args(["nft", "delete", "table", "ip", NAT_TABLE])
            .status();
    }
}

/// The RFC 1928 UDP request header naming `to` (IPv4).
pub fn socks_header(to: SocketAddr) -> Vec<u8> {
    let mut header = vec![0, 0, 0];
    match to.ip() {
        IpAddr::V4(v4) => {
            header.push(1);
            header.extend_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            header.push(4);
            header.extend_from_slice(&v6.octets());
        }
    }
    header.extend_from_slice(&to.port().to_be_bytes());
    header
}

/// Adds `ip/prefix` to `dev` in `ns` (IPv6 without duplicate address detection).
pub fn add_address(ns: &Netns, ip: IpAddr, prefix: u8, dev: &str) -> Result<()> {
    let cidr = format!("{ip}/{prefix}");
    let mut cmd = ns.command("ip");
    if ip.is_ipv6() {
        cmd.args(["-6", "addr", "add", &cidr, "dev", dev, "nodad"]);
    } else {
        cmd.args(["addr", "add", &cidr, "dev", dev]);
    }
    run_checked(&mut cmd).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socks_header_for_ipv4() {
        assert_eq!(
            socks_header("203.0.113.2:6000".parse().unwrap()),
            vec![0, 0, 0, 1, 203, 0, 113, 2, 0x17, 0x70]
        );
        assert_eq!(socks_header("[2001:db8::1]:1".parse().unwrap()).len(), 22);
    }

    #[test]
    fn rotation_alternates_the_order() {
        assert_eq!(rotated(&[1, 2, 3], 0), vec![1, 2, 3]);
        assert_eq!(rotated(&[1, 2, 3], 1), vec![2, 3, 1]);
        assert_eq!(rotated(&[1, 2, 3], 5), vec![3, 1, 2]);
    }
}
