//! The test bed: uniquely named network namespaces wired as a real deployment,
//! `client -- fw -- server`, with forwarding off in `fw`, plus guards that remove namespaces and
//! stop the processes we started in them on drop, also when a test panics.
//!
//! It runs `ip` (iproute2) and `nsenter`; the gateway and its CLI are started with
//! `nsenter --net=...` so they keep seeing the host's bpffs. Nothing here loads eBPF.

pub mod capture;
pub mod frames;
pub mod gateway;
pub mod pcap;
pub mod peers;
pub mod players;
pub mod traffic;

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    sched::{CloneFlags, setns},
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// Addresses of the test bed (documentation ranges only).
pub mod addr {
    use super::{Ipv4Addr, Ipv6Addr};

    pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
    pub const FW_INSIDE_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
    pub const FW_OUTSIDE_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
    pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
    pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
    pub const FW_INSIDE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
    pub const FW_OUTSIDE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1);
    pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 2);
    /// A second host address in `server` (added by `Testbed::add_second_server_address`).
    pub const SERVER2_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 3);
    pub const SERVER2_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 3);
    /// The test DNS server's address in `server` (added by `peers::Dnsmasq`).
    pub const SERVER_DNS_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 53);
}

/// Interface names inside the namespaces.
pub mod iface {
    /// `fw`'s interface towards the client (the gateway's internal interface).
    pub const FW_INSIDE: &str = "inside0";
    /// `fw`'s interface towards the server (the gateway's external interface).
    pub const FW_OUTSIDE: &str = "outside0";
    /// The only interface of `client` and of `server`.
    pub const HOST: &str = "eth0";
}

/// Runs a command, failing with its stderr when it exits non-zero.
pub fn run_checked(cmd: &mut Command) -> Result<Output> {
    let what = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

fn ip(args: &[&str]) -> Result<()> {
    run_checked(Command::new("ip").args(args)).map(drop)
}

/// A short suffix unique to this process and call, so parallel or crashed runs never collide.
pub fn unique_suffix() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{:x}{count}", std::process::id() & 0xffff)
}

/// A named network namespace; removed on drop after the processes inside are killed.
#[derive(Debug)]
pub struct Netns {
    name: String,
    remove_on_drop: bool,
}

impl Netns {
    pub fn create(name: &str) -> Result<Self> {
        ip(&["netns", "add", name]).with_context(|| format!("create namespace {name}"))?;
        let ns = Self {
            name: name.to_owned(),
            remove_on_drop: true,
        };
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// A command that runs `program` in this namespace's network stack only (host mounts, so
    /// bpffs stays visible).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs `f` on a fresh thread that has entered this namespace. Sockets created there stay in
    /// the namespace wherever they are used later.
    pub fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> Result<R> {
        let path = self.path();
        let handle = thread::spawn(move || -> Result<R> {
            let file = File::open(&path).with_context(|| format!("open {}", path.display()))?;
            setns(&file, CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("setns into {}", path.display()))?;
            Ok(f())
        });
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// A UDP socket bound to `addr` in this namespace, with a read timeout.
    pub fn udp_socket(&self, addr: &str, read_timeout: Duration) -> Result<std::net::UdpSocket> {
        let addr: std::net::SocketAddr = addr.parse().with_context(|| format!("parse {addr}"))?;
        let socket = self
            .run(move || std::net::UdpSocket::bind(addr))?
            .with_context(|| format!("bind UDP {addr}"))?;
        socket.set_read_timeout(Some(read_timeout))?;
        Ok(socket)
    }

    /// Turns `dev`'s tx checksum offload on (the stack hands `CHECKSUM_PARTIAL` skbs to the
    /// device, as containers and VMs do) or off (complete checksums, as from a wire).
    pub fn set_tx_checksum_offload(&self, dev: &str, on: bool) -> Result<()> {
        let state = if on { "on" } else { "off" };
        run_checked(self.command("ethtool").args(["-K", dev, "tx", state]))
            .with_context(|| {
                format!("ethtool -K {dev} tx {state} (is ethtool installed? `cargo xtask setup`)")
            })
            .map(drop)
    }

    /// Sets a sysctl inside this namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        run_checked(
            self.command("sysctl")
                .args(["-qw", &format!("{key}={value}")]),
        )
        .map(drop)
    }

    fn pids(&self) -> Vec<i32> {
        Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|out| {
                String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .filter_map(|pid| pid.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Kills what still runs inside (only processes started in this namespace by us), then
    /// deletes the namespace and with it its veth ends.
    pub fn remove(&self) -> Result<()> {
        for pid in self.pids() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.pids().is_empty() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        ip(&["netns", "del", &self.name]).with_context(|| format!("delete namespace {}", self.name))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.remove_on_drop
            && let Err(error) = self.remove()
        {
            eprintln!("testbed: cleanup: {error:#}");
        }
    }
}

/// Names of a test bed's three namespaces.
#[derive(Debug, Clone)]
pub struct TestbedNames {
    pub client: String,
    pub fw: String,
    pub server: String,
}

impl TestbedNames {
    /// Fixed names used by `cargo xtask testbed` and the demo.
    pub fn persistent() -> Self {
        Self {
            client: "client".into(),
            fw: "fw".into(),
            server: "server".into(),
        }
    }

    /// Fresh names for one test.
    pub fn unique() -> Self {
        let suffix = unique_suffix();
        Self {
            client: format!("gwc-{suffix}"),
            fw: format!("gwf-{suffix}"),
            server: format!("gws-{suffix}"),
        }
    }
}

/// The three namespaces, wired. Dropping it removes them (servers first, client last).
#[derive(Debug)]
pub struct Testbed {
    // Field order is drop order.
    pub server: Netns,
    pub fw: Netns,
    pub client: Netns,
}

impl Testbed {
    /// A test bed with names unique to this test.
    pub fn new() -> Result<Self> {
        Self::with_names(&TestbedNames::unique())
    }

    pub fn with_names(names: &TestbedNames) -> Result<Self> {
        let client = Netns::create(&names.client)?;
        let fw = Netns::create(&names.fw)?;
        let server = Netns::create(&names.server)?;
        let bed = Self { server, fw, client };
        bed.wire().context("wire the test bed")?;
        Ok(bed)
    }

    #[expect(
        clippy::too_many_lines,
        reason = "the topology, step by step, in one place"
    )]
    fn wire(&self) -> Result<()> {
        let (c, f, s) = (self.client.name(), self.fw.name(), self.server.name());
        // Create each veth end directly in its namespace: a crash leaves nothing in the host.
        ip(&[
            "link",
            "add",
            iface::FW_INSIDE,
            "netns",
            f,
            "type",
            "veth",
            "peer",
            "name",
            iface::HOST,
            "netns",
            c,
        ])?;
        ip(&[
            "link",
            "add",
            iface::FW_OUTSIDE,
            "netns",
            f,
            "type",
            "veth",
            "peer",
            "name",
            iface::HOST,
            "netns",
            s,
        ])?;
        let plan: [(&str, &str, IpAddr, IpAddr); 4] = [
            (
                c,
                iface::HOST,
                addr::CLIENT_V4.into(),
                addr::CLIENT_V6.into(),
            ),
            (
                f,
                iface::FW_INSIDE,
                addr::FW_INSIDE_V4.into(),
                addr::FW_INSIDE_V6.into(),
            ),
            (
                f,
                iface::FW_OUTSIDE,
                addr::FW_OUTSIDE_V4.into(),
                addr::FW_OUTSIDE_V6.into(),
            ),
            (
                s,
                iface::HOST,
                addr::SERVER_V4.into(),
                addr::SERVER_V6.into(),
            ),
        ];
        for (ns, dev, v4, v6) in plan {
            ip(&["-n", ns, "addr", "add", &format!("{v4}/24"), "dev", dev])?;
            // nodad: otherwise the address stays tentative for a second and early packets are lost.
            ip(&[
                "-n",
                ns,
                "-6",
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                dev,
                "nodad",
            ])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        ip(&[
            "-n",
            c,
            "route",
            "add",
            "203.0.113.0/24",
            "via",
            &addr::FW_INSIDE_V4.to_string(),
        ])?;
        ip(&[
            "-n",
            c,
            "-6",
            "route",
            "add",
            "2001:db8:2::/64",
            "via",
            &addr::FW_INSIDE_V6.to_string(),
        ])?;
        ip(&[
            "-n",
            s,
            "route",
            "add",
            "198.51.100.0/24",
            "via",
            &addr::FW_OUTSIDE_V4.to_string(),
        ])?;
        ip(&[
            "-n",
            s,
            "-6",
            "route",
            "add",
            "2001:db8:1::/64",
            "via",
            &addr::FW_OUTSIDE_V6.to_string(),
        ])?;
        // The hosts send complete UDP checksums, as packets from a wire always carry: veth would
        // otherwise pass CHECKSUM_PARTIAL skbs, which no NIC delivers.
        for ns in [&self.client, &self.server] {
            ns.set_tx_checksum_offload(iface::HOST, false)?;
        }
        // Nothing crosses fw except through the gateway.
        self.fw.sysctl("net.ipv4.ip_forward", "0")?;
        self.fw.sysctl("net.ipv6.conf.all.forwarding", "0")?;
        Ok(())
    }

    /// Adds [`addr::SERVER2_V4`] and [`addr::SERVER2_V6`] to `server`: another remote host, or a
    /// media source apart from the RTSP address.
    pub fn add_second_server_address(&self) -> Result<()> {
        let s = self.server.name();
        ip(&[
            "-n",
            s,
            "addr",
            "add",
            &format!("{}/24", addr::SERVER2_V4),
            "dev",
            iface::HOST,
        ])?;
        ip(&[
            "-n",
            s,
            "-6",
            "addr",
            "add",
            &format!("{}/64", addr::SERVER2_V6),
            "dev",
            iface::HOST,
            "nodad",
        ])
    }

    /// `cargo xtask testbed up`: the fixed-name bed, left in place.
    pub fn up_persistent() -> Result<TestbedNames> {
        let names = TestbedNames::persistent();
        Self::down_persistent()?;
        let mut bed = Self::with_names(&names)?;
        for ns in [&mut bed.client, &mut bed.fw, &mut bed.server] {
            ns.remove_on_drop = false;
        }
        Ok(names)
    }

    /// `cargo xtask testbed down`: removes the fixed-name bed if present.
    pub fn down_persistent() -> Result<()> {
        let names = TestbedNames::persistent();
        let listed = run_checked(Command::new("ip").args(["netns", "list"]))?;
        let listed = String::from_utf8_lossy(&listed.stdout);
        for name in [names.client, names.fw, names.server] {
            if listed
                .lines()
                .any(|line| line.split_whitespace().next() == Some(name.as_str()))
            {
                Netns {
                    name,
                    remove_on_drop: false,
                }
                .remove()?;
            }
        }
        Ok(())
    }
}

/// A child process stopped on drop: SIGTERM, then SIGKILL after a grace period.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
    what: String,
}

impl ChildGuard {
    pub fn spawn(cmd: &mut Command, what: &str) -> Result<Self> {
        let child = cmd
            .spawn()
            .with_context(|| format!("start {what}: {cmd:?}"))?;
        Ok(Self {
            child: Some(child),
            what: what.to_owned(),
        })
    }

    pub fn pid(&self) -> i32 {
        self.child
            .as_ref()
            .and_then(|child| i32::try_from(child.id()).ok())
            .unwrap_or(0)
    }

    pub fn child_mut(&mut self) -> Option<&mut Child> {
        self.child.as_mut()
    }

    /// Whether the process has already exited (reaping it if so).
    pub fn has_exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|child| matches!(child.try_wait(), Ok(Some(_))))
    }

    /// Sends `signal` and waits (bounded) for exit; returns the exit status if it exited.
    pub fn stop_with(
        &mut self,
        signal: Signal,
        grace: Duration,
    ) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = kill(Pid::from_raw(i32::try_from(child.id()).ok()?), signal);
        let deadline = Instant::now() + grace * time_scale();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                eprintln!("testbed: {} ignored {signal}; killing it", self.what);
                let _ = child.kill();
                return child.wait().ok();
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop_with(Signal::SIGTERM, Duration::from_secs(5));
    }
}

/// How many times longer waits for something to happen may take than on real hardware:
/// `GATEWAY_TEST_TIME_SCALE` (a whole number, default 1). `cargo xtask test --kernel` sets it in
/// a VM without KVM, where everything runs about 15 times slower.
pub fn time_scale() -> u32 {
    std::env::var("GATEWAY_TEST_TIME_SCALE")
        .ok()
        .and_then(|scale| scale.parse().ok())
        .filter(|&scale| scale >= 1)
        .unwrap_or(1)
}

/// Sends `count` datagrams `payload(0..count)` from `socket` to `to`, pausing briefly after
/// every 20 so that a receiver in the test bed drains its socket buffer between bursts (the
/// pause grows with [`time_scale`]: an emulated guest drains slower). Tests that count every
/// datagram of a stream send it this way.
///
/// # Panics
/// When a send fails: the test bed's own sockets must be able to send.
pub fn send_paced(
    socket: &std::net::UdpSocket,
    to: std::net::SocketAddr,
    count: usize,
    payload: impl Fn(usize) -> Vec<u8>,
) {
    for i in 0..count {
        socket
            .send_to(&payload(i), to)
            .expect("send a datagram of the stream");
        if i % 20 == 19 {
            thread::sleep(Duration::from_millis(2) * time_scale());
        }
    }
}

/// Polls `condition` every 20 ms until it holds or `timeout` (times [`time_scale`]) passes.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout * time_scale();
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}
