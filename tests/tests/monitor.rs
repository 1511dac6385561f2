//! `gateway monitor`: a datagram from the wrong source port of a bound remote is dropped by the
//! gate, and the watcher sees that drop with its reason and exact addresses and ports, and the
//! admitted datagram from the right port beside it; one watcher at a time, the next once it has
//! gone. Root only.

use std::{
    io::{BufRead as _, BufReader},
    net::{IpAddr, SocketAddr, UdpSocket},
    process::Stdio,
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use gateway_client::{
    Family, RelayAddrs, Timeouts,
    blocking::{Client, Session},
};
use nix::sys::signal::Signal;
use serde_json::Value;
use testbed::{
    ChildGuard, Netns, Testbed, addr,
    gateway::{gateway_bin, gateway_cli, start_in_fw},
    iface, time_scale, wait_until,
};

const PROXY: SocketAddr = SocketAddr::new(IpAddr::V4(addr::FW_INSIDE_V4), 1080);
const WAIT: Duration = Duration::from_secs(10);

/// A running `gateway monitor --json` and the lines it printed so far.
struct Watcher {
    child: ChildGuard,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

fn collect(pipe: impl std::io::Read + Send + 'static) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&lines);
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

impl Watcher {
    fn start(ns: &Netns, instance: &str, extra: &[&str]) -> Self {
        let mut command = ns.command(gateway_bin());
        command
            .args(["monitor", "--instance", instance])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = ChildGuard::spawn(&mut command, "gateway monitor").unwrap();
        let process = child.child_mut().unwrap();
        let stdout = collect(process.stdout.take().unwrap());
        let stderr = collect(process.stderr.take().unwrap());
        Self {
            child,
            stdout,
            stderr,
        }
    }

    fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    fn events(&self) -> Vec<Value> {
        self.stdout
            .lock()
            .unwrap()
            .iter()
            .map(|line| {
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
            })
            .collect()
    }

    fn find(&self, matches: impl Fn(&Value) -> bool) -> Option<Value> {
        self.events().into_iter().find(matches)
    }
}

/// The client's socket, the remote's and a stranger's beside it (same host, another port), and
/// the confirmed binding from the client to the remote.
fn bound(bed: &Testbed) -> (UdpSocket, UdpSocket, UdpSocket, Session, RelayAddrs) {
    let client = bed
        .client
        .run(|| UdpSocket::bind((addr::CLIENT_V4, 0)).unwrap())
        .unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(2) * time_scale()))
        .unwrap();
    let (server, stranger) = bed
        .server
        .run(|| {
            (
                UdpSocket::bind((addr::SERVER_V4, 0)).unwrap(),
                UdpSocket::bind((addr::SERVER_V4, 0)).unwrap(),
            )
        })
        .unwrap();
    let mut session: Session = bed
        .client
        .run(|| {
            Client::connect(PROXY, None, Timeouts::default())
                .unwrap()
                .enhanced()
                .unwrap()
        })
        .unwrap();
    let mut binding = session
        .bind(client.local_addr().unwrap(), Family::V4)
        .unwrap();
    let relays = session
        .connect(&mut binding, server.local_addr().unwrap())
        .unwrap();
    (client, server, stranger, session, relays)
}

#[test]
fn a_drop_from_a_wrong_source_port_shows_with_its_reason_addresses_and_ports() {
    let bed = Testbed::new().unwrap();
    let (gateway, _cleanup) = start_in_fw(&bed, &[]).unwrap();
    let (client, server, stranger, _session, relays) = bound(&bed);

    let watcher = Watcher::start(&bed.fw, &gateway.instance, &["--json"]);
    assert!(
        wait_until(WAIT, || watcher.stderr_text().contains("watching instance")),
        "the monitor did not start: {}",
        watcher.stderr_text()
    );
    // A second watcher is refused while the first holds the instance, naming it.
    let second = gateway_cli(&bed.fw, &["monitor", "--instance", &gateway.instance]).unwrap();
    assert!(!second.status.success());
    let refusal = String::from_utf8_lossy(&second.stderr);
    assert!(
        refusal.contains(&format!("(pid {})", watcher.child.pid())),
        "{refusal}"
    );

    let wrong_port = stranger.local_addr().unwrap().port();
    let right_port = server.local_addr().unwrap().port();
    let dropped = |event: &Value| {
        event["reason"] == "no_binding" && event["source_port"] == u64::from(wrong_port)
    };
    let admitted = |event: &Value| {
        event["verdict"] != "drop"
            && event["source"] == addr::SERVER_V4.to_string()
            && event["source_port"] == u64::from(right_port)
    };
    // Sent until both are seen (the first datagrams may precede the watch by a hair).
    let mut buf = [0u8; 256];
    assert!(
        wait_until(WAIT, || {
            stranger.send_to(b"stray", relays.external).unwrap();
            server.send_to(b"media", relays.external).unwrap();
            let _ = client.recv_from(&mut buf);
            watcher.find(dropped).is_some() && watcher.find(admitted).is_some()
        }),
        "events seen: {:?}\nstderr: {}",
        watcher.events(),
        watcher.stderr_text()
    );
    let drop = watcher.find(dropped).unwrap();
    println!("the drop: {drop}");
    assert_eq!(drop["verdict"], "drop");
    assert_eq!(drop["protocol"], "udp");
    assert_eq!(drop["source"], addr::SERVER_V4.to_string());
    assert_eq!(drop["destination"], relays.external.ip().to_string());
    assert_eq!(drop["destination_port"], u64::from(relays.external.port()));
    assert_eq!(drop["interface"], iface::FW_OUTSIDE);
    assert!(drop["time"].as_str().unwrap().ends_with('Z'));
    let admit = watcher.find(admitted).unwrap();
    println!("the admit: {admit}");
    assert!(
        ["binding_to_kernel_relay", "kernel_relayed_inbound"]
            .contains(&admit["reason"].as_str().unwrap()),
        "{admit}"
    );
    // Only the reasons asked for: nothing of the stack's own traffic.
    assert!(
        watcher
            .events()
            .iter()
            .all(|event| event["reason"] != "not_udp_passed")
    );

    // SIGTERM ends the watch with a summary; the next watcher may start.
    let mut watcher = watcher;
    let status = watcher
        .child
        .stop_with(Signal::SIGTERM, Duration::from_secs(5))
        .unwrap();
    assert!(status.success(), "{}", watcher.stderr_text());
    assert!(
        wait_until(WAIT, || watcher
            .stderr_text()
            .contains("events written by the kernel")),
        "{}",
        watcher.stderr_text()
    );
    next_watcher_prints_one_text_line(&bed, &gateway.instance, &stranger, relays.external);
}

/// The next watcher, in text and for one drop only, prints its line and exits by itself.
fn next_watcher_prints_one_text_line(
    bed: &Testbed,
    instance: &str,
    stranger: &UdpSocket,
    external: SocketAddr,
) {
    let mut next = Watcher::start(
        &bed.fw,
        instance,
        &["--reason", "no_binding", "--count", "1"],
    );
    assert!(
        wait_until(WAIT, || next.stderr_text().contains("watching instance")),
        "the next watcher did not start: {}",
        next.stderr_text()
    );
    let expected = format!(
        " no_binding                     udp  {} -> {} len ",
        stranger.local_addr().unwrap(),
        external
    );
    assert!(
        wait_until(WAIT, || {
            stranger.send_to(b"stray", external).unwrap();
            next.child.has_exited()
        }),
        "the watcher did not stop after one event: {:?}",
        next.stdout.lock().unwrap()
    );
    // Its pipe may still hold the line when it has exited.
    wait_until(WAIT, || !next.stdout.lock().unwrap().is_empty());
    let lines = next.stdout.lock().unwrap().clone();
    println!("text lines: {lines:?}\nstderr: {}", next.stderr_text());
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains(" drop ") && lines[0].contains(&expected),
        "{lines:?}"
    );
    assert!(
        lines[0].ends_with(&format!("on {} (tc_gate)", iface::FW_OUTSIDE))
            || lines[0].ends_with(&format!("on {} (xdp_gate)", iface::FW_OUTSIDE)),
        "{lines:?}"
    );
}

#[test]
fn an_inside_datagram_to_an_external_address_shows_as_dropped_inside() {
    let bed = Testbed::new().unwrap();
    let (gateway, _cleanup) = start_in_fw(&bed, &[]).unwrap();
    let watcher = Watcher::start(
        &bed.fw,
        &gateway.instance,
        &["--json", "--reason", "inside_to_external_address"],
    );
    assert!(
        wait_until(WAIT, || watcher.stderr_text().contains("watching instance")),
        "the monitor did not start: {}",
        watcher.stderr_text()
    );
    let inside = bed
        .client
        .run(|| UdpSocket::bind((addr::CLIENT_V4, 0)).unwrap())
        .unwrap();
    let to = SocketAddr::new(IpAddr::V4(addr::FW_OUTSIDE_V4), 9999);
    let dropped = |event: &Value| event["reason"] == "inside_to_external_address";
    assert!(
        wait_until(WAIT, || {
            inside.send_to(b"posing as a remote", to).unwrap();
            watcher.find(dropped).is_some()
        }),
        "events seen: {:?}\nstderr: {}",
        watcher.events(),
        watcher.stderr_text()
    );
    let event = watcher.find(dropped).unwrap();
    println!("the inside drop: {event}");
    assert_eq!(event["verdict"], "drop");
    assert_eq!(event["program"], "tc_internal");
    assert_eq!(event["interface"], iface::FW_INSIDE);
    assert_eq!(event["source"], addr::CLIENT_V4.to_string());
    assert_eq!(
        event["source_port"],
        u64::from(inside.local_addr().unwrap().port())
    );
    assert_eq!(event["destination"], to.ip().to_string());
    assert_eq!(event["destination_port"], u64::from(to.port()));
}
