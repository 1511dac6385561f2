//! `gateway upgrade`: a new daemon takes over listeners, control connections and bindings.
//! A 1,000 pps stream through the kernel relay loses nothing across the upgrade and the client's
//! control connection keeps working (RELEASE answered `00`, a new binding on it works); the same
//! through the userspace relay with a CONNECT tunnel whose bytes keep flowing and a UDP ASSOCIATE
//! that relays on (the design moves both); builds with other state versions upgrade or refuse (the refused upgrade leaves the
//! old daemon serving); kill -9 of the new daemon mid-handover leaves the old one serving with the
//! gate closed to unsolicited traffic. Root only.

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::BytesMut;
use gateway_client::{Family, Timeouts, blocking::Client};
use gateway_proto::{Address, UdpHeader, enhanced::DatagramHeader};
use nix::{sys::signal::Signal, unistd::Pid};
use testbed::{
    Testbed, addr,
    gateway::{GatewayDaemon, gateway_bin, gateway_cli, reason_packets, start_in_fw, stats_json},
    wait_until,
};

const STREAM: u32 = 3_000;
const WAIT: Duration = Duration::from_secs(20);

/// Stops a daemon this test caused to run (the new one, started by the old): SIGTERM, then
/// SIGKILL, bounded; by pid, since it is not our child.
struct PidGuard(i32);

impl PidGuard {
    fn alive(pid: i32) -> bool {
        Path::new(&format!("/proc/{pid}")).exists()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|stat| stat.contains(") Z "))
    }

    fn stop(&self) {
        let pid = Pid::from_raw(self.0);
        let _ = nix::sys::signal::kill(pid, Signal::SIGTERM);
        if !wait_until(Duration::from_secs(10), || !Self::alive(self.0)) {
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            wait_until(Duration::from_secs(5), || !Self::alive(self.0));
        }
    }
}

impl Drop for PidGuard {
    fn drop(&mut self) {
        if Self::alive(self.0) {
            self.stop();
        }
    }
}

fn framed(aid: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    DatagramHeader::new(aid).encode(&mut out).unwrap();
    out.extend_from_slice(payload);
    out.to_vec()
}

fn udp(bed_ns: &testbed::Netns, ip: std::net::Ipv4Addr) -> UdpSocket {
    let socket = bed_ns
        .run(move || UdpSocket::bind((ip, 0)).unwrap())
        .unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    socket
}

fn proxy() -> SocketAddr {
    SocketAddr::from((addr::FW_INSIDE_V4, 1080))
}

fn session(bed: &Testbed) -> gateway_client::blocking::Session {
    let proxy = proxy();
    bed.client
        .run(move || {
            Client::connect(proxy, None, Timeouts::default())
                .unwrap()
                .enhanced()
                .unwrap()
        })
        .unwrap()
}

/// `gateway upgrade` in the bed's firewall: (exit ok, stdout, stderr).
fn upgrade(bed: &Testbed, instance: &str, binary: &Path) -> (bool, String, String) {
    let out = gateway_cli(
        &bed.fw,
        &[
            "upgrade",
            "--instance",
            instance,
            "--binary",
            &binary.display().to_string(),
        ],
    )
    .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The new pid from `gateway upgrade`'s line `... pid OLD -> NEW (...`.
fn new_pid(stdout: &str) -> i32 {
    stdout
        .split(" -> ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no new pid in {stdout:?}"))
}

/// A stream of `STREAM` datagrams at about 1,000 per second from `server` to `to`, while a
/// receiver on `client` records every sequence number it gets; `during` runs once the first
/// few hundred arrived. Returns what arrived, with what `during` returned.
fn stream_across<T: Send>(
    server: &UdpSocket,
    client: &UdpSocket,
    to: SocketAddr,
    aid: u32,
    during: impl FnOnce() -> T + Send,
) -> (BTreeSet<u32>, usize, T) {
    let got = Arc::new(Mutex::new(BTreeSet::new()));
    let duplicates = Arc::new(Mutex::new(0usize));
    let done = AtomicBool::new(false);
    let result = std::thread::scope(|scope| {
        scope.spawn(|| {
            let start = Instant::now();
            for seq in 0..STREAM {
                // Paced by the clock: 1 ms per datagram, catching up after a late wake-up.
                let due = start + Duration::from_millis(u64::from(seq));
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                server
                    .send_to(format!("rtp {seq:05}").as_bytes(), to)
                    .unwrap();
            }
        });
        scope.spawn(|| {
            let mut buf = [0u8; 2048];
            let deadline = Instant::now() + Duration::from_secs(30);
            while !done.load(Ordering::Relaxed) && Instant::now() < deadline {
                let Ok((len, _)) = client.recv_from(&mut buf) else {
                    if got.lock().unwrap().len() == STREAM as usize {
                        break;
                    }
                    continue;
                };
                let header = framed(aid, b"");
                let Some(text) = buf[..len].strip_prefix(header.as_slice()) else {
                    continue;
                };
                let Some(seq) = std::str::from_utf8(text)
                    .ok()
                    .and_then(|t| t.strip_prefix("rtp "))
                    .and_then(|n| n.parse::<u32>().ok())
                else {
                    continue;
                };
                if !got.lock().unwrap().insert(seq) {
                    *duplicates.lock().unwrap() += 1;
                }
            }
        });
        assert!(
            wait_until(WAIT, || got.lock().unwrap().len() >= 300),
            "the stream flows before the upgrade"
        );
        let result = during();
        wait_until(Duration::from_secs(15), || {
            got.lock().unwrap().len() == STREAM as usize
        });
        done.store(true, Ordering::Relaxed);
        result
    });
    let got = got.lock().unwrap().clone();
    let duplicates = *duplicates.lock().unwrap();
    (got, duplicates, result)
}

fn missing(got: &BTreeSet<u32>) -> Vec<u32> {
    (0..STREAM).filter(|seq| !got.contains(seq)).collect()
}

/// Fails with the datagrams lost (first and last and how many) and the daemons' log.
fn assert_none_lost(got: &BTreeSet<u32>, log: &str) {
    let lost = missing(got);
    assert!(
        lost.is_empty(),
        "{} lost across the upgrade ({:?} .. {:?}); the log:\n{log}",
        lost.len(),
        lost.first(),
        lost.last()
    );
}

/// After an upgrade: the old binding is released (`00`), a new two-step binding on the same
/// control connection carries a datagram each way, and a datagram to the old relay port is
/// dropped by the gate.
fn connection_keeps_working(
    bed: &Testbed,
    instance: &str,
    session: &mut gateway_client::blocking::Session,
    old: gateway_client::blocking::Binding,
    client: &UdpSocket,
    server: &UdpSocket,
) {
    let old_external = old.relays().external;
    session
        .release(old)
        .expect("RELEASE after the upgrade is answered 00");
    let dropped = || reason_packets(&stats_json(&bed.fw, instance).unwrap(), "no_binding");
    let before = dropped();
    server.send_to(b"after release", old_external).unwrap();
    assert!(
        wait_until(WAIT, || dropped() > before),
        "the released binding's port admits nothing"
    );
    let mut binding = session
        .bind(client.local_addr().unwrap(), Family::V4)
        .unwrap();
    let relays = session
        .connect(&mut binding, server.local_addr().unwrap())
        .unwrap();
    let mut buf = [0u8; 2048];
    let inbound = wait_until(WAIT, || {
        server.send_to(b"new binding", relays.external).unwrap();
        client
            .recv_from(&mut buf)
            .is_ok_and(|(len, _)| buf[..len] == framed(relays.aid, b"new binding")[..])
    });
    assert!(
        inbound,
        "a new binding after the upgrade carries datagrams in"
    );
    client
        .send_to(&framed(relays.aid, b"back out"), relays.internal)
        .unwrap();
    let outbound = wait_until(WAIT, || {
        server
            .recv_from(&mut buf)
            .is_ok_and(|(len, from)| &buf[..len] == b"back out" && from == relays.external)
    });
    assert!(outbound, "and out");
}

#[test]
fn a_kernel_relayed_stream_loses_nothing_across_an_upgrade_and_its_connection_works_on() {
    let bed = Testbed::new().unwrap();
    let (mut old, cleanup) = start_in_fw(&bed, &[]).unwrap();
    let client = udp(&bed.client, addr::CLIENT_V4);
    let server = udp(&bed.server, addr::SERVER_V4);
    let mut session = session(&bed);
    let mut binding = session
        .bind(client.local_addr().unwrap(), Family::V4)
        .unwrap();
    let relays = session
        .connect(&mut binding, server.local_addr().unwrap())
        .unwrap();
    let old_pid = old.pid();
    let (got, duplicates, (ok, stdout, stderr)) =
        stream_across(&server, &client, relays.external, relays.aid, || {
            upgrade(&bed, &cleanup.instance, &gateway_bin())
        });
    assert!(ok, "upgrade failed: {stderr}\n{}", old.log_text());
    // Shown with --nocapture: the README quotes a real upgrade.
    eprintln!("$ gateway upgrade ...\n{stdout}");
    for line in old.log_text().lines().filter(|l| l.contains("upgrade")) {
        eprintln!("{line}");
    }
    let new = PidGuard(new_pid(&stdout));
    assert_ne!(new.0, old_pid, "{stdout}");
    assert!(
        old.wait_exit(WAIT).is_some_and(|s| s.success()),
        "the old daemon exits 0"
    );
    assert_none_lost(&got, &old.log_text());
    assert_eq!(duplicates, 0);
    let stats = stats_json(&bed.fw, &cleanup.instance).unwrap();
    assert!(reason_packets(&stats, "kernel_relayed_inbound") >= u64::from(STREAM));
    let log = old.log_text();
    assert!(
        log.contains("upgrade: took over from the previous daemon"),
        "{log}"
    );
    connection_keeps_working(
        &bed,
        &cleanup.instance,
        &mut session,
        binding,
        &client,
        &server,
    );
    drop(session);
    new.stop();
}

#[test]
fn a_userspace_relayed_stream_a_connect_tunnel_and_a_udp_associate_cross_an_upgrade() {
    let bed = Testbed::new().unwrap();
    let (mut old, cleanup) = start_in_fw(&bed, &["--datapath", "userspace"]).unwrap();
    let (mut tunnel, echo) = echo_tunnel(&bed);
    let mut echoed = [0u8; 6];
    let proxy = proxy();
    let client = udp(&bed.client, addr::CLIENT_V4);
    let server = udp(&bed.server, addr::SERVER_V4);
    // An RFC 1928 UDP ASSOCIATE with one remote admitted: it moves too.
    let associate = udp(&bed.client, addr::CLIENT_V4);
    let from = associate.local_addr().unwrap();
    let (associate_control, associate_relay) = bed
        .client
        .run(move || {
            Client::connect(proxy, None, Timeouts::default())
                .unwrap()
                .udp_associate(from)
                .unwrap()
        })
        .unwrap();
    let echo_server = udp(&bed.server, addr::SERVER_V4);
    assert!(
        associate_round_trip(&associate, associate_relay, &echo_server, b"assoc before"),
        "the association relays before the upgrade"
    );
    let mut session = session(&bed);
    let mut binding = session
        .bind(client.local_addr().unwrap(), Family::V4)
        .unwrap();
    let relays = session
        .connect(&mut binding, server.local_addr().unwrap())
        .unwrap();
    let (got, duplicates, (ok, stdout, stderr)) =
        stream_across(&server, &client, relays.external, relays.aid, || {
            upgrade(&bed, &cleanup.instance, &gateway_bin())
        });
    assert!(ok, "upgrade failed: {stderr}\n{}", old.log_text());
    let new = PidGuard(new_pid(&stdout));
    assert!(old.wait_exit(WAIT).is_some());
    assert!(
        associate_round_trip(&associate, associate_relay, &echo_server, b"assoc after"),
        "the same association relays after the upgrade:\n{}",
        old.log_text()
    );
    assert!(
        old.log_text()
            .contains("UDP ASSOCIATE taken over from the previous daemon"),
        "{}",
        old.log_text()
    );
    assert_none_lost(&got, &old.log_text());
    assert_eq!(duplicates, 0);
    let stats = stats_json(&bed.fw, &cleanup.instance).unwrap();
    assert_eq!(
        reason_packets(&stats, "kernel_relayed_inbound"),
        0,
        "the userspace relay carried it"
    );
    // The tunnel moved: the same TCP connection carries bytes both ways through the new daemon.
    tunnel.write_all(b"after!").unwrap();
    if let Err(error) = tunnel.read_exact(&mut echoed) {
        panic!(
            "the tunnel after the upgrade: {error}; the log:\n{}",
            old.log_text()
        );
    }
    assert_eq!(&echoed, b"after!");
    let log = old.log_text();
    assert!(
        log.contains("CONNECT tunnel taken over from the previous daemon"),
        "{log}"
    );
    connection_keeps_working(
        &bed,
        &cleanup.instance,
        &mut session,
        binding,
        &client,
        &server,
    );
    drop(tunnel);
    drop(associate_control);
    let _ = echo.join();
    drop(session);
    new.stop();
}

/// A CONNECT tunnel through the gateway to a TCP echo server outside (the server's thread
/// ends when the tunnel closes), checked to echo once.
fn echo_tunnel(bed: &Testbed) -> (TcpStream, std::thread::JoinHandle<()>) {
    // A TCP echo server outside: the CONNECT tunnel's bytes must keep flowing.
    let listener = bed
        .server
        .run(|| TcpListener::bind((addr::SERVER_V4, 0)).unwrap())
        .unwrap();
    let target = listener.local_addr().unwrap();
    let echo = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 || stream.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    let proxy = proxy();
    let mut tunnel: TcpStream = bed
        .client
        .run(move || {
            Client::connect(proxy, None, Timeouts::default())
                .unwrap()
                .tcp_connect(target)
                .unwrap()
                .0
        })
        .unwrap();
    tunnel.set_read_timeout(Some(WAIT)).unwrap();
    let mut echoed = [0u8; 6];
    tunnel.write_all(b"before").unwrap();
    tunnel.read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed, b"before");
    (tunnel, echo)
}

/// A datagram through the UDP ASSOCIATE at `relay` to `server` (checked to arrive from the
/// gateway's external address) and its answer back, RFC 1928-framed on the client's side.
/// Retried (bounded): UDP may lose one.
fn associate_round_trip(
    client: &UdpSocket,
    relay: SocketAddr,
    server: &UdpSocket,
    text: &[u8],
) -> bool {
    let target = server.local_addr().unwrap();
    let mut buf = [0u8; 2048];
    wait_until(WAIT, || {
        let mut out = BytesMut::new();
        UdpHeader::new(Address::Ip(target))
            .encode(&mut out)
            .unwrap();
        out.extend_from_slice(text);
        client.send_to(&out, relay).unwrap();
        let Ok((len, from)) = server.recv_from(&mut buf) else {
            return false;
        };
        if &buf[..len] != text || from.ip() != std::net::IpAddr::from(addr::FW_OUTSIDE_V4) {
            return false;
        }
        server.send_to(b"answer", from).unwrap();
        let Ok((len, _)) = client.recv_from(&mut buf) else {
            return false;
        };
        let mut reply = &buf[..len];
        UdpHeader::decode(&mut reply)
            .is_ok_and(|header| header.address == Address::Ip(target) && reply == b"answer")
    })
}

/// The state-variant test build under the name that selects its format.
fn variant(dir: &Path, name: &str) -> PathBuf {
    let built = gateway_bin()
        .parent()
        .unwrap()
        .join("examples/gateway_state_variant");
    let path = dir.join(name);
    std::fs::copy(&built, &path).unwrap_or_else(|e| {
        panic!(
            "copy {} (built by `cargo build --examples`): {e}",
            built.display()
        )
    });
    path
}

/// A daemon serves: a two-step binding carries a datagram in, and an unsolicited one is dropped.
fn serves(bed: &Testbed, instance: &str, client: &UdpSocket, server: &UdpSocket) {
    let mut session = session(bed);
    let mut binding = session
        .bind(client.local_addr().unwrap(), Family::V4)
        .unwrap();
    let relays = session
        .connect(&mut binding, server.local_addr().unwrap())
        .unwrap();
    let mut buf = [0u8; 2048];
    assert!(wait_until(WAIT, || {
        server.send_to(b"serving", relays.external).unwrap();
        client
            .recv_from(&mut buf)
            .is_ok_and(|(len, _)| buf[..len] == framed(relays.aid, b"serving")[..])
    }));
    let dropped = || reason_packets(&stats_json(&bed.fw, instance).unwrap(), "no_binding");
    let before = dropped();
    let unsolicited = SocketAddr::new(relays.external.ip(), relays.external.port() + 2);
    server.send_to(b"unsolicited", unsolicited).unwrap();
    assert!(
        wait_until(WAIT, || dropped() > before),
        "unsolicited traffic is dropped"
    );
    session.release(binding).unwrap();
}

#[test]
fn state_versions_decide_whether_an_upgrade_goes_ahead() {
    let bed = Testbed::new().unwrap();
    let (mut old, cleanup) = start_in_fw(&bed, &[]).unwrap();
    let dir = tempdir();
    let client = udp(&bed.client, addr::CLIENT_V4);
    let server = udp(&bed.server, addr::SERVER_V4);
    let mut session = session(&bed);
    let mut binding = session
        .bind(client.local_addr().unwrap(), Family::V4)
        .unwrap();
    let relays = session
        .connect(&mut binding, server.local_addr().unwrap())
        .unwrap();

    // A next build that writes version 2 and reads 1 and 2 takes over.
    let next = variant(&dir.0, "gateway-state-w2-r1-2");
    let (ok, stdout, stderr) = upgrade(&bed, &cleanup.instance, &next);
    assert!(ok, "{stderr}\n{}", old.log_text());
    assert!(stdout.contains("state version 1"), "{stdout}");
    let v2 = PidGuard(new_pid(&stdout));
    assert!(old.wait_exit(WAIT).is_some());
    let mut buf = [0u8; 2048];
    assert!(
        wait_until(WAIT, || {
            server.send_to(b"on v2", relays.external).unwrap();
            client
                .recv_from(&mut buf)
                .is_ok_and(|(len, _)| buf[..len] == framed(relays.aid, b"on v2")[..])
        }),
        "the binding made under version 1 carries on under the next build"
    );

    // Back to this build (reads only 1) from version 2: refused, version 2 serves on.
    let (ok, _, stderr) = upgrade(&bed, &cleanup.instance, &gateway_bin());
    assert!(!ok, "a downgrade it cannot read must be refused");
    assert!(
        stderr.contains("reads state versions 1..=1") && stderr.contains("writes 2"),
        "{stderr}"
    );
    // A build that reads only version 3: refused too.
    let only3 = variant(&dir.0, "gateway-state-w3-r3-3");
    let (ok, _, stderr) = upgrade(&bed, &cleanup.instance, &only3);
    assert!(!ok);
    assert!(stderr.contains("reads state versions 3..=3"), "{stderr}");
    assert!(
        PidGuard::alive(v2.0),
        "the refused upgrades left version 2 running"
    );
    assert_eq!(
        old.log_text().matches("quiescing for the upgrade").count(),
        1,
        "a refused upgrade stops no connection (only the first upgrade quiesced)"
    );
    session
        .release(binding)
        .expect("the old connection still answers 00");
    serves(&bed, &cleanup.instance, &client, &server);
    assert!(
        old.log_text()
            .contains("upgrade failed; this daemon serves on")
    );
    drop(session);
    v2.stop();
}

#[test]
fn killing_the_new_daemon_mid_handover_leaves_the_old_one_serving() {
    let bed = Testbed::new().unwrap();
    let (mut old, cleanup) = start_in_fw(&bed, &[]).unwrap();
    let dir = tempdir();
    let client = udp(&bed.client, addr::CLIENT_V4);
    let server = udp(&bed.server, addr::SERVER_V4);
    let mut session = session(&bed);
    let mut binding = session
        .bind(client.local_addr().unwrap(), Family::V4)
        .unwrap();
    let relays = session
        .connect(&mut binding, server.local_addr().unwrap())
        .unwrap();
    let stall = variant(&dir.0, "gateway-state-w1-r1-1-stall");
    let instance = cleanup.instance.clone();
    let (ok, _, stderr) = std::thread::scope(|scope| {
        let attempt = scope.spawn(|| upgrade(&bed, &instance, &stall));
        assert!(
            old.wait_for_log("stalling after the state", 1, WAIT),
            "{}",
            old.log_text()
        );
        let log = old.log_text();
        let pid: i32 = log
            .lines()
            .find(|line| line.contains("upgrade: new daemon started"))
            .and_then(|line| line.split("pid=").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|pid| pid.parse().ok())
            .unwrap_or_else(|| panic!("no new pid in the log:\n{log}"));
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        attempt.join().unwrap()
    });
    assert!(!ok, "the upgrade reports the failure");
    assert!(stderr.contains("died during the handover"), "{stderr}");
    assert!(old.is_running(), "the old daemon serves on");
    // Its binding made before the upgrade still carries datagrams, its connection answers.
    let mut buf = [0u8; 2048];
    assert!(wait_until(WAIT, || {
        server.send_to(b"still here", relays.external).unwrap();
        client
            .recv_from(&mut buf)
            .is_ok_and(|(len, _)| buf[..len] == framed(relays.aid, b"still here")[..])
    }));
    session
        .release(binding)
        .expect("RELEASE answered 00 by the old daemon");
    serves(&bed, &cleanup.instance, &client, &server);
    let _ = GatewayDaemon::stop(&mut old);
    drop(session);
}

/// A directory removed on drop.
struct TempDir(PathBuf);

fn tempdir() -> TempDir {
    let dir = std::env::temp_dir().join(format!("gateway-upgrade-{}", testbed::unique_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Under systemd (`NotifyAccess=all`): the new daemon tells the service manager `MAINPID=` its
/// pid with `READY=1` before the old one exits, so the service is not stopped.
#[test]
fn the_new_daemon_announces_its_pid_to_the_service_manager_before_the_old_one_exits() {
    let bed = Testbed::new().unwrap();
    let dir = tempdir();
    let path = dir.0.join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    notify.set_read_timeout(Some(WAIT)).unwrap();
    let instance = testbed::gateway::unique_instance();
    let _cleanup = testbed::gateway::InstanceCleanup {
        instance: instance.clone(),
    };
    let env = format!("NOTIFY_SOCKET={}", path.display());
    let mut old = GatewayDaemon::start_with_prefix(
        &bed.fw,
        &instance,
        &["env", env.as_str()],
        &testbed::gateway::TESTBED_ARGS,
    )
    .unwrap();
    let mut buf = [0u8; 4096];
    let first = notify
        .recv(&mut buf)
        .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned());
    assert!(
        first.is_ok_and(|m| m.contains("READY=1")),
        "the old daemon is ready"
    );
    let (ok, stdout, stderr) = upgrade(&bed, &instance, &gateway_bin());
    assert!(ok, "{stderr}\n{}", old.log_text());
    let new = PidGuard(new_pid(&stdout));
    let message = notify
        .recv(&mut buf)
        .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
        .unwrap();
    assert!(
        message.lines().any(|l| l == format!("MAINPID={}", new.0)) && message.contains("READY=1"),
        "{message:?}"
    );
    // The old daemon sent nothing more (no STOPPING=1: the service goes on).
    assert!(old.wait_exit(WAIT).is_some());
    notify.set_nonblocking(true).unwrap();
    let after = notify
        .recv(&mut buf)
        .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned());
    assert!(
        !after.as_ref().is_ok_and(|m| m.contains("STOPPING")),
        "{after:?}"
    );
    new.stop();
}
