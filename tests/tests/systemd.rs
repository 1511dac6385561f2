//! The daemon under systemd, without systemd as PID 1: readiness over `NOTIFY_SOCKET`
//! (`READY=1` only once the gate drops and the listeners accept, `RELOADING=1`/`READY=1` around
//! SIGHUP, `STOPPING=1` on SIGTERM), checked through a datagram socket the test binds; the unit
//! file passes `systemd-analyze verify`; and the daemon, started with exactly the unit's
//! capabilities (read from the unit file, with `setpriv`), carries a two-step stream. Root only.

use std::{
    net::{SocketAddr, TcpStream, UdpSocket},
    os::{fd::AsRawFd as _, unix::net::UnixDatagram},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use bytes::BytesMut;
use gateway_client::{Family, Timeouts, blocking::Client};
use gateway_proto::enhanced::DatagramHeader;
use nix::sys::{
    signal::Signal,
    socket::{MsgFlags, recv},
};
use testbed::{
    Testbed, addr,
    gateway::{
        GatewayDaemon, InstanceCleanup, TESTBED_ARGS, gateway_bin, reason_packets, stats_json,
        unique_instance,
    },
    run_checked, unique_suffix, wait_until,
};

/// Bound on the daemon's start (attach and listen) and on each notification after it.
const WAIT: Duration = Duration::from_secs(20);

/// The test's end of `NOTIFY_SOCKET`: a bound datagram socket, removed on drop.
struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    fn bind() -> Self {
        let path = std::env::temp_dir().join(format!("gateway-notify-{}.sock", unique_suffix()));
        let socket = UnixDatagram::bind(&path).unwrap();
        socket.set_read_timeout(Some(WAIT)).unwrap();
        Self { socket, path }
    }

    /// The `env` prefix that starts the daemon with `NOTIFY_SOCKET` set to this socket.
    fn env(&self) -> String {
        format!("NOTIFY_SOCKET={}", self.path.display())
    }

    /// Blocks (bounded) until a notification is queued, without taking it.
    fn wait_queued(&self) -> bool {
        let mut byte = [0u8; 1];
        recv(self.socket.as_raw_fd(), &mut byte, MsgFlags::MSG_PEEK).is_ok()
    }

    /// The next notification (bounded); panics when none comes.
    fn next(&self) -> String {
        let mut buf = [0u8; 4096];
        let len = self
            .socket
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no notification within {WAIT:?}: {e}"));
        String::from_utf8_lossy(&buf[..len]).into_owned()
    }

    /// Whether nothing more is queued.
    fn is_empty(&self) -> bool {
        self.socket.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 4096];
        let empty = self.socket.recv(&mut buf).is_err();
        self.socket.set_nonblocking(false).unwrap();
        empty
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn lines(message: &str) -> Vec<&str> {
    message.lines().collect()
}

#[test]
fn ready_only_once_the_gate_drops_and_the_listeners_accept_then_reload_and_stop() {
    let bed = Testbed::new().unwrap();
    let notify = NotifySocket::bind();
    let instance = unique_instance();
    let _cleanup = InstanceCleanup {
        instance: instance.clone(),
    };
    let env = notify.env();
    let mut daemon =
        GatewayDaemon::spawn(&bed.fw, &instance, &["env", &env], &TESTBED_ARGS).unwrap();
    assert!(
        notify.wait_queued(),
        "no notification within {WAIT:?}; the daemon's log:\n{}",
        daemon.log_text()
    );
    // The daemon logs before it notifies: what the log holds now was written before the
    // notification was sent.
    let log_at_notification = daemon.log_text();
    for line in ["gate attached", "SOCKS5 listening", "gateway running"] {
        assert!(
            log_at_notification.contains(line),
            "notified before {line:?} was logged:\n{log_at_notification}"
        );
    }
    // Before taking READY=1: an unsolicited datagram from outside is dropped by the gate ...
    let outside = bed
        .server
        .udp_socket("203.0.113.2:0", Duration::from_secs(1))
        .unwrap();
    let external = SocketAddr::from((addr::FW_OUTSIDE_V4, 40_000));
    let dropped =
        |bed: &Testbed| reason_packets(&stats_json(&bed.fw, &instance).unwrap(), "no_binding");
    let before = dropped(&bed);
    outside.send_to(b"unsolicited", external).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || dropped(&bed) > before),
        "the gate did not count the unsolicited datagram as no_binding"
    );
    // ... and the control port accepts.
    let proxy = SocketAddr::from((addr::FW_INSIDE_V4, 1080));
    bed.client
        .run(move || TcpStream::connect_timeout(&proxy, Duration::from_secs(5)))
        .unwrap()
        .unwrap();
    let ready = notify.next();
    assert!(lines(&ready).contains(&"READY=1"), "{ready:?}");
    assert!(notify.is_empty(), "one READY=1 per start");

    daemon.signal(Signal::SIGHUP);
    let reloading = notify.next();
    assert!(lines(&reloading).contains(&"RELOADING=1"), "{reloading:?}");
    assert!(
        lines(&reloading)
            .iter()
            .any(|l| l.starts_with("MONOTONIC_USEC=")),
        "{reloading:?}"
    );
    let ready = notify.next();
    assert!(
        lines(&ready).contains(&"READY=1"),
        "after the reload: {ready:?}"
    );

    daemon.signal(Signal::SIGTERM);
    let stopping = notify.next();
    assert!(lines(&stopping).contains(&"STOPPING=1"), "{stopping:?}");
    assert!(
        daemon.wait_exit(WAIT).is_some_and(|s| s.success()),
        "a clean stop:\n{}",
        daemon.log_text()
    );
}

/// A `NOTIFY_SOCKET` nobody listens on costs a warning, never the daemon.
#[test]
fn an_unreachable_notify_socket_is_not_fatal() {
    let bed = Testbed::new().unwrap();
    let instance = unique_instance();
    let _cleanup = InstanceCleanup {
        instance: instance.clone(),
    };
    let env = format!(
        "NOTIFY_SOCKET={}",
        std::env::temp_dir()
            .join(format!("gateway-nobody-{}.sock", unique_suffix()))
            .display()
    );
    let mut daemon =
        GatewayDaemon::start_with_prefix(&bed.fw, &instance, &["env", &env], &TESTBED_ARGS)
            .unwrap();
    assert!(
        daemon.wait_for_log("cannot notify the service manager", 1, WAIT),
        "{}",
        daemon.log_text()
    );
    assert!(daemon.is_running());
    assert!(daemon.stop(), "{}", daemon.log_text());
}

/// The unit file the Debian package installs.
fn unit_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/gateway.service")
}

/// The words of the unit's `KEY=` line (the one line of that key; none is repeated).
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    let prefix = format!("{key}=");
    let lines: Vec<&str> = unit
        .lines()
        .filter_map(|line| line.strip_prefix(&prefix))
        .collect();
    assert_eq!(lines.len(), 1, "one {key}= line in the unit");
    lines[0].split_whitespace().map(str::to_owned).collect()
}

/// The unit, its `ExecStart` pointing at the binary under test (`systemd-analyze verify` checks
/// that the command exists).
fn unit_for_build(dir: &Path) -> PathBuf {
    let unit = std::fs::read_to_string(unit_file()).unwrap();
    let exec: Vec<&str> = unit
        .lines()
        .filter(|line| line.starts_with("ExecStart="))
        .collect();
    assert_eq!(
        exec,
        ["ExecStart=/usr/bin/gateway run --config /etc/gateway/gateway.toml"]
    );
    let path = dir.join("gateway.service");
    let text = unit.replace(
        "ExecStart=/usr/bin/gateway",
        &format!("ExecStart={}", gateway_bin().display()),
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    let dir = std::env::temp_dir().join(format!("gateway-unit-{}", unique_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let unit = unit_for_build(&dir);
    // The man pages it names exist only once the package is installed (the package's test
    // verifies the installed unit with them).
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let unit = std::fs::read_to_string(unit_file()).unwrap();
    assert_eq!(unit_values(&unit, "Type"), ["notify"]);
    assert!(
        !unit.lines().any(|line| line.starts_with("ExecStopPost=")),
        "nothing may open the gate after a stop"
    );
}

/// `setpriv`'s arguments that give the process exactly the unit's capabilities: its bounding
/// set, inheritable and ambient sets, and no new privileges.
fn setpriv_args(unit: &str) -> Vec<String> {
    let bounding = unit_values(unit, "CapabilityBoundingSet");
    let ambient = unit_values(unit, "AmbientCapabilities");
    assert_eq!(unit_values(unit, "NoNewPrivileges"), ["yes"]);
    let list = |caps: &[String]| -> String {
        caps.iter()
            .map(|cap| format!("+{}", cap.trim_start_matches("CAP_").to_lowercase()))
            .collect::<Vec<_>>()
            .join(",")
    };
    vec![
        "setpriv".to_owned(),
        format!("--bounding-set=-all,{}", list(&bounding)),
        format!("--inh-caps=-all,{}", list(&ambient)),
        format!("--ambient-caps=-all,{}", list(&ambient)),
        "--no-new-privs".to_owned(),
        "--".to_owned(),
    ]
}

/// The capability names of `/proc/PID/status`'s `KEY` line (`CapEff`, `CapBnd`), decoded by
/// `capsh`, upper case as the unit spells them.
fn capabilities(pid: i32, key: &str) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hex = status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{key}:")))
        .unwrap()
        .trim()
        .to_owned();
    let out = run_checked(Command::new("capsh").arg(format!("--decode={hex}"))).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut caps: Vec<String> = text
        .trim()
        .split_once('=')
        .map_or("", |(_, names)| names)
        .split(',')
        .filter(|name| !name.is_empty())
        .map(str::to_uppercase)
        .collect();
    caps.sort();
    caps
}

fn framed(aid: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    DatagramHeader::new(aid).encode(&mut out).unwrap();
    out.extend_from_slice(payload);
    out.to_vec()
}

const STREAM: u32 = 100;

#[test]
fn with_exactly_the_units_capabilities_the_daemon_carries_a_two_step_stream() {
    let unit = std::fs::read_to_string(unit_file()).unwrap();
    let prefix = setpriv_args(&unit);
    let prefix: Vec<&str> = prefix.iter().map(String::as_str).collect();
    let bed = Testbed::new().unwrap();
    let instance = unique_instance();
    let _cleanup = InstanceCleanup {
        instance: instance.clone(),
    };
    let daemon =
        GatewayDaemon::start_with_prefix(&bed.fw, &instance, &prefix, &TESTBED_ARGS).unwrap();
    let mut expected = unit_values(&unit, "CapabilityBoundingSet");
    expected.sort();
    assert_eq!(capabilities(daemon.pid(), "CapBnd"), expected);
    assert_eq!(capabilities(daemon.pid(), "CapEff"), expected);
    let log = daemon.log_text();
    assert!(log.contains("gate attached"), "{log}");
    assert!(
        log.contains("relay ports reserved"),
        "the port reservation works in the sandbox:\n{log}"
    );

    let client = bed
        .client
        .run(|| UdpSocket::bind((addr::CLIENT_V4, 0)).unwrap())
        .unwrap();
    let server = bed
        .server
        .run(|| UdpSocket::bind((addr::SERVER_V4, 0)).unwrap())
        .unwrap();
    for socket in [&client, &server] {
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
    }
    let (client_addr, server_addr) = (client.local_addr().unwrap(), server.local_addr().unwrap());
    let proxy = SocketAddr::from((addr::FW_INSIDE_V4, 1080));
    let mut session = bed
        .client
        .run(move || {
            Client::connect(proxy, None, Timeouts::default())
                .unwrap()
                .enhanced()
                .unwrap()
        })
        .unwrap();
    // Step 1 admits nothing; step 2 admits the one source.
    let mut binding = session.bind(client_addr, Family::V4).unwrap();
    let dropped =
        |bed: &Testbed| reason_packets(&stats_json(&bed.fw, &instance).unwrap(), "no_binding");
    let before = dropped(&bed);
    server
        .send_to(b"too early", binding.relays().external)
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || dropped(&bed) > before),
        "step 1 admits nothing"
    );
    let relays = session.connect(&mut binding, server_addr).unwrap();
    let mut buf = [0u8; 2048];
    for seq in 0..STREAM {
        let payload = format!("rtp {seq:04}");
        server.send_to(payload.as_bytes(), relays.external).unwrap();
        let (len, from) = client
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("inbound datagram {seq}: {e}"));
        assert_eq!(from, relays.internal);
        assert_eq!(
            &buf[..len],
            framed(relays.aid, payload.as_bytes()).as_slice()
        );
        client
            .send_to(
                &framed(relays.aid, format!("rtcp {seq:04}").as_bytes()),
                relays.internal,
            )
            .unwrap();
        let (len, from) = server
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("outbound datagram {seq}: {e}"));
        assert_eq!(from, relays.external);
        assert_eq!(&buf[..len], format!("rtcp {seq:04}").as_bytes());
    }
    let stats = stats_json(&bed.fw, &instance).unwrap();
    assert!(reason_packets(&stats, "kernel_relayed_inbound") >= u64::from(STREAM));
    drop(session);
}
