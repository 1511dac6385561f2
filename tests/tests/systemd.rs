//! The daemon under systemd, without systemd: readiness over `NOTIFY_SOCKET` (`READY=1` only
//! once the gate drops and the listeners accept, `RELOADING=1`/`READY=1` around SIGHUP,
//! `STOPPING=1` on SIGTERM), checked through a datagram socket the test binds. Root only.

use std::{
    net::{SocketAddr, TcpStream},
    os::{fd::AsRawFd as _, unix::net::UnixDatagram},
    path::PathBuf,
    time::Duration,
};

use nix::sys::{
    signal::Signal,
    socket::{MsgFlags, recv},
};
use testbed::{
    Testbed, addr,
    gateway::{
        GatewayDaemon, InstanceCleanup, TESTBED_ARGS, reason_packets, stats_json, unique_instance,
    },
    unique_suffix, wait_until,
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
