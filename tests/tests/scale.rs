//! Bindings at scale, on the real daemon in the test bed: a binding holds no file descriptor (the
//! daemon's `/proc/PID/fd` does not grow with 20,000 live bindings, twice what one descriptor
//! pair per binding allowed), a stream through one of them still arrives intact both ways, and
//! a churn of every kind of binding end leaves no relay port, map entry or descriptor behind.
//! Root only.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use bytes::BytesMut;
use gateway_client::{
    BindOptions, Family, Timeouts,
    blocking::{Binding, Client, Session},
};
use gateway_proto::enhanced::DatagramHeader;
use serde_json::Value;
use testbed::{
    Testbed, addr,
    gateway::{InstanceCleanup, gateway_cli, start_in_fw},
    run_checked,
};

const PROXY: SocketAddr = SocketAddr::new(IpAddr::V4(addr::FW_INSIDE_V4), 1080);

/// Open file descriptors of process `pid`.
fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// `gateway bindings --json` of the instance (`extra`: more flags).
fn bindings_doc_with(bed: &Testbed, instance: &str, extra: &[&str]) -> Value {
    let args: Vec<&str> = ["bindings", "--instance", instance, "--json"]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
    let out = gateway_cli(&bed.fw, &args).unwrap();
    assert!(
        out.status.success(),
        "gateway bindings: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn bindings_doc(bed: &Testbed, instance: &str) -> Value {
    bindings_doc_with(bed, instance, &[])
}

/// Entries of a pinned map, as `bpftool` (not the daemon) counts them.
fn map_entries(pin_dir: &Path, map: &str) -> usize {
    let out = run_checked(Command::new("bpftool").args([
        "map",
        "dump",
        "pinned",
        &pin_dir.join(map).display().to_string(),
        "-j",
    ]))
    .unwrap();
    serde_json::from_slice::<Value>(&out.stdout)
        .ok()
        .and_then(|v| v.as_array().map(Vec::len))
        .unwrap_or(usize::MAX)
}

fn session() -> Session {
    Client::connect(PROXY, None, Timeouts::default())
        .unwrap()
        .enhanced()
        .unwrap()
}

/// The client's LOCAL for binding `n`: a distinct port, no socket needed (the kernel relay
/// only needs to know where to send).
fn local(n: usize) -> SocketAddr {
    SocketAddr::new(
        IpAddr::V4(addr::CLIENT_V4),
        u16::try_from(1024 + n % 60_000).unwrap(),
    )
}

fn remote(n: usize) -> SocketAddr {
    SocketAddr::new(
        IpAddr::V4(addr::SERVER_V4),
        u16::try_from(5000 + n % 1000).unwrap(),
    )
}

fn framed(aid: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    DatagramHeader::new(aid).encode(&mut out).unwrap();
    out.extend_from_slice(payload);
    out.to_vec()
}

const LIVE: usize = 20_000;
const SESSIONS: usize = 20;

#[test]
fn twenty_thousand_live_bindings_hold_no_descriptor_and_a_stream_through_one_arrives() {
    let bed = Testbed::new().unwrap();
    let (gateway, _cleanup) = start_in_fw(
        &bed,
        &[
            "--internal-ports",
            "2048-32767",
            "--external-ports",
            "2048-32767",
            "--max-bindings",
            "65536",
            "--max-bindings-per-user",
            "30000",
            "--max-bindings-per-connection",
            "2000",
        ],
    )
    .unwrap();
    let pid = gateway.pid();
    // Sockets stay in the namespace they were made in: the client's and the server's ends of
    // the stream, used from this thread.
    let client_socket = bed
        .client
        .run(|| UdpSocket::bind((addr::CLIENT_V4, 0)).unwrap())
        .unwrap();
    let server_socket = bed
        .server
        .run(|| UdpSocket::bind((addr::SERVER_V4, 0)).unwrap())
        .unwrap();
    let (client_addr, server_addr) = (
        client_socket.local_addr().unwrap(),
        server_socket.local_addr().unwrap(),
    );
    let (mut sessions, fds_with_sessions, held) = bed
        .client
        .run(move || {
            let mut sessions: Vec<Session> = (0..SESSIONS).map(|_| session()).collect();
            let mut held: Vec<Binding> = Vec::with_capacity(LIVE);
            // One binding per session first, so whatever a first binding sets up exists.
            for (s, session) in sessions.iter_mut().enumerate() {
                let mut binding = session.bind(local(s), Family::V4).unwrap();
                session.connect(&mut binding, remote(s)).unwrap();
                held.push(binding);
            }
            let fds_with_sessions = fd_count(pid);
            let mut n = SESSIONS;
            while n < LIVE {
                let session = &mut sessions[n % SESSIONS];
                let mut binding = session
                    .bind(local(n), Family::V4)
                    .unwrap_or_else(|e| panic!("binding {n}: {e}"));
                session
                    .connect(&mut binding, remote(n))
                    .unwrap_or_else(|e| panic!("binding {n}: {e}"));
                held.push(binding);
                n += 1;
            }
            (sessions, fds_with_sessions, held)
        })
        .unwrap();
    let fds_with_bindings = fd_count(pid);
    assert!(
        fds_with_bindings <= fds_with_sessions + 2,
        "{LIVE} live bindings took the daemon from {fds_with_sessions} to \
         {fds_with_bindings} descriptors"
    );
    // The summary: counts without 20,000 lines (the listing is for a few).
    let doc = bindings_doc_with(&bed, &gateway.instance, &["--summary"]);
    assert_eq!(doc["summary"], true);
    assert_eq!(
        doc["relay"]["bindings_served"], LIVE,
        "every binding is live"
    );
    assert_eq!(doc["relay"]["scheduled_checks"], LIVE);
    assert_eq!(doc["relay"]["internal_ports_in_use"], LIVE);

    // One more, for real sockets: the stream goes through it while all the others are live.
    let mut stream = sessions[0].bind(client_addr, Family::V4).unwrap();
    let relays = sessions[0].connect(&mut stream, server_addr).unwrap();
    let timeout = Some(Duration::from_secs(5));
    client_socket.set_read_timeout(timeout).unwrap();
    server_socket.set_read_timeout(timeout).unwrap();
    let mut buf = [0u8; 2048];
    for seq in 0..200u32 {
        let payload = format!("frame {seq:05} ").repeat(20);
        server_socket
            .send_to(payload.as_bytes(), relays.external)
            .unwrap();
        let (len, from) = client_socket
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("inbound datagram {seq}: {e}"));
        assert_eq!(from, relays.internal);
        assert_eq!(
            &buf[..len],
            framed(relays.aid, payload.as_bytes()).as_slice()
        );
        client_socket
            .send_to(&framed(relays.aid, payload.as_bytes()), relays.internal)
            .unwrap();
        let (len, from) = server_socket
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("outbound datagram {seq}: {e}"));
        assert_eq!(from, relays.external);
        assert_eq!(&buf[..len], payload.as_bytes());
    }
    drop(held);
    drop(sessions);
}

/// Polls `check` (at most `limit`), returning its last value.
fn poll<T>(limit: Duration, mut check: impl FnMut() -> (bool, T)) -> T {
    let start = Instant::now();
    loop {
        let (done, value) = check();
        if done || start.elapsed() > limit {
            return value;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every way a binding ends, many times over: two-step Opens and one-step Opens released, RTP
/// pairs released, bindings live when their connection closes, half-bound bindings and idle
/// confirmed ones left to expire. Afterwards nothing is left: no binding, no relay port in use,
/// no entry in any kernel map, and the daemon's descriptor count is back where it started.
#[test]
fn a_churn_of_every_kind_of_binding_leaves_no_port_entry_or_descriptor() {
    const ROUNDS: usize = 40;
    const PER_KIND: usize = 25;
    let bed = Testbed::new().unwrap();
    let (gateway, cleanup): (_, InstanceCleanup) =
        start_in_fw(&bed, &["--pending-timeout", "5", "--idle-timeout", "2"]).unwrap();
    let pid = gateway.pid();
    let fds_at_start = fd_count(pid);
    let (made, lingering) = bed
        .client
        .run(move || {
            let mut made: BTreeMap<&str, usize> = BTreeMap::new();
            let mut lingering = Vec::new();
            for round in 0..ROUNDS {
                let mut session = session();
                for i in 0..PER_KIND {
                    let n = round * 10 * PER_KIND + i * 10;
                    let mut two = session.bind(local(n), Family::V4).unwrap();
                    session.connect(&mut two, remote(n)).unwrap();
                    session.release(two).unwrap();
                    let one = session.open(local(n + 1), remote(n + 1)).unwrap();
                    session.release(one).unwrap();
                    let mut pair = session
                        .bind_pair_with(local(n + 2), Family::V4, BindOptions::default())
                        .unwrap();
                    session.connect(&mut pair, remote(n + 2)).unwrap();
                    session.release(pair).unwrap();
                    *made.entry("released").or_default() += 3;
                    // Live when the connection closes below.
                    let mut live = session.bind(local(n + 3), Family::V4).unwrap();
                    session.connect(&mut live, remote(n + 3)).unwrap();
                    let _ = session.bind(local(n + 4), Family::V4).unwrap();
                    *made.entry("closed with the connection").or_default() += 2;
                }
                drop(session);
                if round % 4 == 0 {
                    // A session that stays open: its bindings must expire on their own.
                    let mut open = self::session();
                    for i in 0..PER_KIND {
                        let n = round * 10 * PER_KIND + i * 10 + 5;
                        let _half = open.bind(local(n), Family::V4).unwrap();
                        let mut idle = open.bind(local(n + 1), Family::V4).unwrap();
                        open.connect(&mut idle, remote(n + 1)).unwrap();
                        *made.entry("expired").or_default() += 2;
                    }
                    lingering.push(open);
                }
            }
            (made, lingering)
        })
        .unwrap();
    assert!(made.values().sum::<usize>() >= ROUNDS * PER_KIND * 5);
    // The lingering sessions' bindings expire (pending 5 s, idle 2 s); everything else went at
    // release or close.
    let doc = poll(Duration::from_secs(30), || {
        let doc = bindings_doc(&bed, &gateway.instance);
        let empty = doc["enhanced_bindings"]
            .as_array()
            .is_some_and(Vec::is_empty);
        (empty, doc)
    });
    assert_eq!(
        doc["enhanced_bindings"].as_array().map(Vec::len),
        Some(0),
        "bindings left after the churn ({made:?})"
    );
    assert_eq!(doc["relay"]["bindings_served"], 0);
    assert_eq!(doc["relay"]["scheduled_checks"], 0, "no timer left");
    assert_eq!(doc["relay"]["internal_ports_in_use"], 0);
    assert_eq!(doc["relay"]["external_ports_in_use"], 0);
    assert_eq!(doc["kernel_entries"].as_array().map(Vec::len), Some(0));
    for map in ["BINDINGS", "OUTBOUND", "RAW_CLIENTS"] {
        assert_eq!(
            map_entries(&cleanup.pin_dir(), map),
            0,
            "{map} after the churn"
        );
    }
    // The sessions whose bindings expired close last; then the daemon holds exactly the
    // descriptors it started with.
    drop(lingering);
    let fds_now = poll(Duration::from_secs(10), || {
        let now = fd_count(pid);
        (now == fds_at_start, now)
    });
    assert_eq!(
        fds_now, fds_at_start,
        "the daemon's descriptors at start and after the churn"
    );
}

/// The daemon learns of kernel-relayed traffic by one pass over the kernel's counters per poll
/// (no per-binding state): a binding whose datagrams only the kernel relays, in either
/// direction alone, outlives its idle timeout for as long as they flow, and idles out once
/// they stop.
#[test]
fn kernel_relayed_traffic_either_way_keeps_a_binding_past_its_idle_timeout() {
    const IDLE: Duration = Duration::from_secs(2);
    let bed = Testbed::new().unwrap();
    let (gateway, _cleanup) = start_in_fw(&bed, &["--idle-timeout", "2"]).unwrap();
    let client = bed
        .client
        .run(|| UdpSocket::bind((addr::CLIENT_V4, 0)).unwrap())
        .unwrap();
    let server = bed
        .server
        .run(|| UdpSocket::bind((addr::SERVER_V4, 0)).unwrap())
        .unwrap();
    let (client_addr, server_addr) = (client.local_addr().unwrap(), server.local_addr().unwrap());
    let mut session = bed.client.run(session).unwrap();
    let mut binding = session.bind(client_addr, Family::V4).unwrap();
    let relays = session.connect(&mut binding, server_addr).unwrap();
    for socket in [&client, &server] {
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
    }
    let live = |bed: &Testbed| {
        bindings_doc(bed, &gateway.instance)["enhanced_bindings"]
            .as_array()
            .map_or(0, Vec::len)
    };
    let mut buf = [0u8; 256];
    // Three idle timeouts of inbound datagrams only, then three of outbound only.
    let paced = Duration::from_millis(100);
    let rounds = u32::try_from((IDLE * 3).as_millis() / paced.as_millis()).unwrap();
    for round in 0..rounds {
        server.send_to(b"in", relays.external).unwrap();
        let (len, _) = client
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("inbound datagram {round}: {e}"));
        assert_eq!(&buf[..len], framed(relays.aid, b"in").as_slice());
        std::thread::sleep(paced);
    }
    assert_eq!(live(&bed), 1, "inbound kernel traffic keeps the binding");
    for round in 0..rounds {
        client
            .send_to(&framed(relays.aid, b"out"), relays.internal)
            .unwrap();
        let (len, _) = server
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("outbound datagram {round}: {e}"));
        assert_eq!(&buf[..len], b"out");
        std::thread::sleep(paced);
    }
    assert_eq!(live(&bed), 1, "outbound kernel traffic keeps the binding");
    // Silence: it idles out (idle timeout plus a poll, with margin).
    let left = poll(IDLE * 5, || {
        let n = live(&bed);
        (n == 0, n)
    });
    assert_eq!(left, 0, "the binding idles out once its traffic stops");
    drop(session);
}

/// The kernel maps are sized from `--max-bindings`; a size the kernel cannot give stops the
/// start with an error that names the setting (and no gate is left half made).
#[test]
fn a_map_size_the_kernel_cannot_give_is_a_clear_error_at_start() {
    let bed = Testbed::new().unwrap();
    let instance = testbed::gateway::unique_instance();
    let cleanup = InstanceCleanup {
        instance: instance.clone(),
    };
    let args: Vec<&str> = testbed::gateway::TESTBED_ARGS
        .iter()
        .copied()
        .chain(["--max-bindings", "4000000000"])
        .collect();
    let (status, log) =
        testbed::gateway::start_expecting_failure(&bed.fw, &instance, &args).unwrap();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("entries (--max-bindings)") && log.contains("choose a smaller --max-bindings"),
        "{log}"
    );
    assert!(
        !testbed::gateway::gate_attached(&bed.fw, testbed::iface::FW_OUTSIDE).unwrap(),
        "nothing attached"
    );
    drop(cleanup);
}
