//! The two-step binding end to end in the test bed, with the client library in `client`, a UDP
//! sender in `server` and the gateway in `fw`: the RTSP call order of protocol.md section 4,
//! nothing admitted before step 2, exact admission after it, delivery relayed by the kernel
//! (the userspace relay handles none of it), the outbound direction, release and connection
//! close, fail-closed on SIGKILL, IPv6, the userspace datapath and Listen policy. Root only.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use gateway_client::{Client, ClientError, Family};
use gateway_common::ExitReason;
use testbed::{
    Netns, Testbed, addr,
    gateway::{GatewayDaemon, InstanceCleanup, reason_packets, start_in_fw, stats_json},
    send_paced, time_scale, wait_until,
};

const PROXY: &str = "198.51.100.1:1080";
const STREAM: usize = 200;
/// Bound on waiting for a counter, a log line or a datagram that must come.
const WAIT: Duration = Duration::from_secs(5);
/// How soon after a SIGKILL the bindings must admit nothing (the heartbeat's fail-closed limit
/// is 2 s).
const FAIL_CLOSED_WITHIN: Duration = Duration::from_secs(3);

struct Setup {
    gateway: GatewayDaemon,
    cleanup: InstanceCleanup,
    bed: Testbed,
}

fn setup(extra: &[&str]) -> Setup {
    let bed = Testbed::new().unwrap();
    // A second host on the server side (another remote, not the media source).
    bed.add_second_server_address().unwrap();
    let (gateway, cleanup) = start_in_fw(&bed, extra).unwrap();
    Setup {
        gateway,
        cleanup,
        bed,
    }
}

fn stat(setup: &Setup, reason: &str) -> u64 {
    reason_packets(
        &stats_json(&setup.bed.fw, &setup.gateway.instance).unwrap(),
        reason,
    )
}

fn server_socket(bed: &Testbed, addr: &str) -> Arc<UdpSocket> {
    Arc::new(bed.server.udp_socket(addr, Duration::from_secs(3)).unwrap())
}

/// Runs `body` on a current-thread runtime in the `client` namespace.
fn in_client<R: Send + 'static>(
    ns: &Netns,
    body: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = R>>> + Send + 'static,
) -> R {
    ns.run(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(body())
    })
    .unwrap()
}

/// Receives until `count` datagrams arrived or 3 s passed without one.
async fn receive(binding: &gateway_client::UdpBinding, count: usize) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 2048];
    while got.len() < count {
        match tokio::time::timeout(
            Duration::from_secs(3) * time_scale(),
            binding.recv(&mut buf),
        )
        .await
        {
            Ok(Ok(len)) => got.push(buf[..len].to_vec()),
            _ => break,
        }
    }
    got
}

/// Whether nothing reaches the binding's local socket for `wait`. Reads the socket itself:
/// `recv` on a bound, unconnected binding would ask for a Listen step 2.
async fn nothing_arrives(binding: &gateway_client::UdpBinding, wait: Duration) -> bool {
    let mut buf = vec![0u8; 2048];
    tokio::time::timeout(wait, binding.socket().recv(&mut buf))
        .await
        .is_err()
}

#[expect(
    clippy::too_many_lines,
    reason = "one end-to-end scenario, step by step"
)]
fn two_step_stream_is_relayed_by_the_kernel(v6: bool, extra: &[&str]) {
    let setup = setup(extra);
    let (source, wrong_port, other_host, family) = if v6 {
        (
            "[2001:db8:2::2]:6000",
            "[2001:db8:2::2]:6001",
            "[2001:db8:2::3]:6000",
            Family::V6,
        )
    } else {
        (
            "203.0.113.2:6000",
            "203.0.113.2:6001",
            "203.0.113.3:6000",
            Family::V4,
        )
    };
    let proxy: SocketAddr = if v6 { "[2001:db8:1::1]:1080" } else { PROXY }
        .parse()
        .unwrap();
    let source_sock = server_socket(&setup.bed, source);
    let wrong_port_sock = server_socket(&setup.bed, wrong_port);
    let other_host_sock = server_socket(&setup.bed, other_host);
    let source_addr: SocketAddr = source.parse().unwrap();
    let setup = Arc::new(setup);
    let shared = Arc::clone(&setup);
    in_client(&setup.bed.client, move || {
        Box::pin(async move {
            let setup = shared;
            let session = Client::connect(proxy, None)
                .await
                .unwrap()
                .enhanced()
                .await
                .unwrap();
            // bind + getsockname before SETUP: step 1 reserves, admits nothing.
            let binding = session.udp_socket(family).await.unwrap();
            let relay = binding.bind().await.unwrap();
            let external = relay.external;
            assert_eq!(
                external.ip(),
                if v6 {
                    IpAddr::from(addr::FW_OUTSIDE_V6)
                } else {
                    IpAddr::from(addr::FW_OUTSIDE_V4)
                }
            );
            println!(
                "step 1: AID {:#x} internal {} external {}",
                relay.aid, relay.internal, external
            );

            let dropped_before = stat(&setup, "no_binding");
            for socket in [&source_sock, &wrong_port_sock, &other_host_sock] {
                socket.send_to(b"too early", external).unwrap();
            }
            // The gate has seen all three before the absence check starts.
            let counted = Arc::clone(&setup);
            let dropped = tokio::task::spawn_blocking(move || {
                wait_until(WAIT, || stat(&counted, "no_binding") - dropped_before >= 3)
            });
            assert!(
                dropped.await.unwrap(),
                "the gate did not count the three early datagrams as no_binding"
            );
            assert!(
                nothing_arrives(&binding, Duration::from_millis(500)).await,
                "a half-bound binding admits nothing"
            );
            assert_eq!(stat(&setup, "no_binding") - dropped_before, 3);

            // connect after the SETUP reply: step 2 with the exact source.
            binding.connect(source_addr).await.unwrap();
            let relayed_before = stat(&setup, "kernel_relayed_inbound");
            let userspace_before = stat(&setup, "binding_to_userspace");
            let dropped_before = stat(&setup, "no_binding");
            // Wrong port and other host: still dropped.
            wrong_port_sock.send_to(b"wrong port", external).unwrap();
            other_host_sock.send_to(b"other host", external).unwrap();
            // recv after PLAY: the stream.
            let sender = Arc::clone(&source_sock);
            let send = std::thread::spawn(move || {
                send_paced(&sender, external, STREAM, |i| {
                    format!("rtp {i:04}").into_bytes()
                });
            });
            let got = receive(&binding, STREAM).await;
            send.join().unwrap();
            assert_eq!(got.len(), STREAM, "every datagram of the stream arrives");
            assert!(
                got.iter()
                    .enumerate()
                    .all(|(i, d)| d == format!("rtp {i:04}").as_bytes())
            );
            assert_eq!(
                stat(&setup, "no_binding") - dropped_before,
                2,
                "wrong port and other host dropped"
            );
            assert_eq!(
                stat(&setup, "kernel_relayed_inbound") - relayed_before,
                STREAM as u64
            );
            assert_eq!(
                stat(&setup, "binding_to_userspace") - userspace_before,
                0,
                "the userspace relay saw none"
            );

            // The outbound direction: reports leave from the external relay address.
            let out_before = stat(&setup, "kernel_relayed_outbound");
            for i in 0..10 {
                binding.send(format!("rtcp {i}").as_bytes()).await.unwrap();
            }
            // Every one, in any order: the first ones wait in the neighbour queue while the
            // gateway resolves the remote's MAC, and a later one may overtake them on the other
            // CPU (UDP promises no order).
            let mut buf = [0u8; 64];
            let mut received = Vec::new();
            for _ in 0..10 {
                let (len, from) = source_sock.recv_from(&mut buf).unwrap();
                received.push(String::from_utf8_lossy(&buf[..len]).into_owned());
                assert_eq!(from, external, "source translated to the external relay");
            }
            received.sort();
            let mut reports: Vec<String> = (0..10).map(|i| format!("rtcp {i}")).collect();
            reports.sort();
            assert_eq!(received, reports, "each report once");
            assert_eq!(stat(&setup, "kernel_relayed_outbound") - out_before, 10);

            // Release stops delivery within a second: the next datagram is dropped by the gate.
            binding.release().await.unwrap();
            assert!(gate_drops_within_a_second(
                &setup,
                &source_sock,
                external,
                Instant::now()
            ));

            // Connection close stops delivery of every binding of the connection.
            let second = session.udp_socket(family).await.unwrap();
            let external = second.bind().await.unwrap().external;
            second.connect(source_addr).await.unwrap();
            source_sock.send_to(b"while bound", external).unwrap();
            assert_eq!(receive(&second, 1).await.len(), 1);
            let closed = Instant::now();
            session.close();
            tokio::time::timeout(Duration::from_secs(2), session.closed())
                .await
                .unwrap();
            drop(second);
            drop(session);
            // The runtime finishes closing the control connection (its tasks run while this
            // waits) and the gateway sees the close.
            tokio::time::timeout(WAIT, async {
                while !setup.gateway.log_text().contains(SESSION_ENDED) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no {SESSION_ENDED:?} in the gateway log:\n{}",
                    setup.gateway.log_text()
                )
            });
            let check = tokio::task::spawn_blocking(move || {
                gate_drops_within_a_second(&setup, &source_sock, external, closed)
            });
            assert!(
                check.await.unwrap(),
                "connection close stops delivery within a second"
            );
        })
    });
}

/// What the daemon logs when an enhanced-mode control connection has ended.
const SESSION_ENDED: &str = "enhanced UDP mode ended";

/// Sends one datagram after a release or close (at `since`) and checks that the gate drops it
/// (its `no_binding` counter rises) within a second of `since`; retries the send, since a
/// datagram sent before the daemon removed the entry is still delivered and never counted.
fn gate_drops_within_a_second(
    setup: &Setup,
    sender: &UdpSocket,
    to: SocketAddr,
    since: Instant,
) -> bool {
    while since.elapsed() < Duration::from_secs(1) {
        let before = stat(setup, "no_binding");
        sender.send_to(b"after the end", to).unwrap();
        if wait_until(Duration::from_millis(100), || {
            stat(setup, "no_binding") > before
        }) {
            println!("delivery stopped after {:?}", since.elapsed());
            return true;
        }
    }
    false
}

#[test]
fn ipv4_two_step_stream_is_relayed_by_the_kernel() {
    two_step_stream_is_relayed_by_the_kernel(false, &[]);
}

#[test]
fn ipv6_two_step_stream_is_relayed_by_the_kernel() {
    two_step_stream_is_relayed_by_the_kernel(true, &[]);
}

/// The tc relay attached as netlink filters (clsact + `cls_bpf`), as on kernels without tcx.
#[test]
fn two_step_stream_is_relayed_by_the_kernel_through_netlink_filters() {
    two_step_stream_is_relayed_by_the_kernel(false, &["--tc-attach", "netlink"]);
}

#[test]
fn sigkill_stops_admission_within_three_seconds_and_a_new_daemon_works() {
    sigkill_stops_admission_and_a_new_daemon_works(&[]);
}

/// The same with the tc relay as netlink filters: they outlive the killed daemon like pinned
/// links, and the new daemon replaces their programs.
#[test]
fn sigkill_fails_closed_and_a_new_daemon_works_with_netlink_filters() {
    sigkill_stops_admission_and_a_new_daemon_works(&["--tc-attach", "netlink"]);
}

#[expect(
    clippy::too_many_lines,
    reason = "one end-to-end scenario, step by step"
)]
fn sigkill_stops_admission_and_a_new_daemon_works(extra: &[&str]) {
    let mut setup = setup(extra);
    let source_sock = server_socket(&setup.bed, "203.0.113.2:6000");
    let source_addr: SocketAddr = "203.0.113.2:6000".parse().unwrap();
    let pin_dir = setup.cleanup.pin_dir();
    let daemon = &mut setup.gateway;
    let (session_tx, session_rx) = std::sync::mpsc::channel::<()>();
    let (external_tx, external_rx) = std::sync::mpsc::channel::<(SocketAddr, SocketAddr)>();
    let delivered = Arc::new(AtomicUsize::new(0));
    let arrivals = Arc::clone(&delivered);
    let client_ns = setup.bed.client.path();
    let receiver = std::thread::spawn(move || {
        let file = std::fs::File::open(client_ns).unwrap();
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                let session = Client::connect(PROXY.parse().unwrap(), None)
                    .await
                    .unwrap()
                    .enhanced()
                    .await
                    .unwrap();
                let binding = session.udp_socket(Family::V4).await.unwrap();
                let external = binding.bind().await.unwrap().external;
                binding.connect(source_addr).await.unwrap();
                // A second binding from the same source only to probe for the moment admission
                // stops; what reaches it is never read, so it does not count as delivered.
                let probe = session.udp_socket(Family::V4).await.unwrap();
                let probe_external = probe.bind().await.unwrap().external;
                probe.connect(source_addr).await.unwrap();
                external_tx.send((external, probe_external)).unwrap();
                // Count what arrives until told to stop.
                let mut buf = [0u8; 256];
                loop {
                    if session_rx.try_recv().is_ok() {
                        drop(probe);
                        return arrivals.load(Ordering::SeqCst);
                    }
                    if let Ok(Ok(_)) =
                        tokio::time::timeout(Duration::from_millis(50), binding.recv(&mut buf))
                            .await
                    {
                        arrivals.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
    });
    let (external, probe_external) = external_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    source_sock.send_to(b"before", external).unwrap();
    assert!(
        wait_until(WAIT, || delivered.load(Ordering::SeqCst) >= 1),
        "the datagram sent before the kill did not arrive"
    );
    let counted = |reason: ExitReason| {
        gateway::exit_counters::read_exit_counters(&pin_dir)
            .unwrap()
            .into_iter()
            .find(|t| t.reason == reason)
            .unwrap()
            .packets
    };
    // Each inbound binding hit ends relayed in the kernel or dropped as daemon_gone.
    let outcomes = || counted(ExitReason::KernelRelayedInbound) + counted(ExitReason::DaemonGone);
    daemon.kill();
    let killed = Instant::now();
    // Probe until the gate drops a hit as daemon_gone (the heartbeat went stale), each probe
    // accounted for before the next.
    let stopped_after = loop {
        let sent_after = killed.elapsed();
        assert!(
            sent_after <= FAIL_CLOSED_WITHIN,
            "the bindings still admitted {sent_after:?} after SIGKILL"
        );
        let (gone, before) = (counted(ExitReason::DaemonGone), outcomes());
        source_sock.send_to(b"probe", probe_external).unwrap();
        assert!(
            wait_until(WAIT, || outcomes() > before),
            "a probe was neither relayed in the kernel nor dropped as daemon_gone"
        );
        if counted(ExitReason::DaemonGone) > gone {
            break sent_after;
        }
        // Pacing: some 100 probes until the fail-closed limit.
        std::thread::sleep(Duration::from_millis(20));
    };
    let gone_before = counted(ExitReason::DaemonGone);
    let outcomes_before = outcomes();
    for _ in 0..20 {
        source_sock.send_to(b"after kill", external).unwrap();
    }
    assert!(
        wait_until(WAIT, || outcomes() - outcomes_before >= 20),
        "the gate did not see the 20 datagrams sent after the kill"
    );
    session_tx.send(()).unwrap();
    let delivered = receiver.join().unwrap();
    println!(
        "killed {:?} ago; admission stopped {stopped_after:?} after the kill; delivered in total \
         {delivered}",
        killed.elapsed()
    );
    assert_eq!(
        delivered, 1,
        "only the datagram sent before the kill arrives"
    );
    assert_eq!(
        counted(ExitReason::DaemonGone) - gone_before,
        20,
        "fail closed: counted as daemon_gone"
    );

    // A new daemon takes over with a clean binding table and works at once.
    let instance = setup.gateway.instance.clone();
    let args: Vec<&str> = testbed::gateway::TESTBED_ARGS
        .iter()
        .chain(extra)
        .copied()
        .collect();
    let fresh = GatewayDaemon::start(&setup.bed.fw, &instance, &args).unwrap();
    assert!(
        fresh.log_text().contains("previous daemon"),
        "{}",
        fresh.log_text()
    );
    let document = testbed::gateway::gateway_cli(
        &setup.bed.fw,
        &["bindings", "--instance", &instance, "--json"],
    )
    .unwrap();
    let document: serde_json::Value = serde_json::from_slice(&document.stdout).unwrap();
    assert_eq!(
        document["kernel_entries"].as_array().unwrap().len(),
        0,
        "clean binding table"
    );
    let delivered = in_client(&setup.bed.client, move || {
        Box::pin(async move {
            let session = Client::connect(PROXY.parse().unwrap(), None)
                .await
                .unwrap()
                .enhanced()
                .await
                .unwrap();
            let binding = session.udp_socket(Family::V4).await.unwrap();
            let external = binding.bind().await.unwrap().external;
            binding.connect(source_addr).await.unwrap();
            for i in 0..5 {
                source_sock
                    .send_to(format!("{i}").as_bytes(), external)
                    .unwrap();
            }
            receive(&binding, 5).await.len()
        })
    });
    assert_eq!(delivered, 5);
    setup.gateway = fresh;
}

#[test]
fn userspace_datapath_relays_the_same_stream() {
    let setup = Arc::new(setup(&["--datapath", "userspace"]));
    let source_sock = server_socket(&setup.bed, "203.0.113.2:6000");
    let source_addr: SocketAddr = "203.0.113.2:6000".parse().unwrap();
    let shared = Arc::clone(&setup);
    in_client(&setup.bed.client, move || {
        Box::pin(async move {
            let setup = shared;
            let session = Client::connect(PROXY.parse().unwrap(), None)
                .await
                .unwrap()
                .enhanced()
                .await
                .unwrap();
            let binding = session.udp_socket(Family::V4).await.unwrap();
            let external = binding.bind().await.unwrap().external;
            binding.connect(source_addr).await.unwrap();
            let before = stat(&setup, "binding_to_userspace");
            send_paced(&source_sock, external, 50, |i| {
                format!("rtp {i:04}").into_bytes()
            });
            let got = receive(&binding, 50).await;
            assert_eq!(got.len(), 50);
            assert!(
                got.iter()
                    .enumerate()
                    .all(|(i, d)| d == format!("rtp {i:04}").as_bytes())
            );
            assert_eq!(stat(&setup, "binding_to_userspace") - before, 50);
            assert_eq!(
                stat(&setup, "kernel_relayed_inbound"),
                0,
                "nothing relayed in the kernel"
            );
            binding.send(b"report").await.unwrap();
            let mut buf = [0u8; 64];
            let (len, from) = source_sock.recv_from(&mut buf).unwrap();
            assert_eq!((&buf[..len], from), (&b"report"[..], external));
        })
    });
}

#[test]
fn listen_receives_from_any_remote_only_where_policy_allows() {
    for allow in [false, true] {
        let setup = Arc::new(setup(if allow { &["--allow-listen"] } else { &[] }));
        let a = server_socket(&setup.bed, "203.0.113.2:7000");
        let b = server_socket(&setup.bed, "203.0.113.3:7001");
        let shared = Arc::clone(&setup);
        in_client(&setup.bed.client, move || {
            Box::pin(async move {
                let _setup = shared;
                let session = Client::connect(PROXY.parse().unwrap(), None)
                    .await
                    .unwrap()
                    .enhanced()
                    .await
                    .unwrap();
                let binding = session.udp_socket(Family::V4).await.unwrap();
                let external = binding.bind().await.unwrap().external;
                let listened = binding.listen().await;
                if !allow {
                    assert!(
                        matches!(listened, Err(ClientError::Binding(_))),
                        "Listen is refused by default: {listened:?}"
                    );
                    return;
                }
                listened.unwrap();
                a.send_to(b"from a", external).unwrap();
                b.send_to(b"from b", external).unwrap();
                let mut buf = [0u8; 64];
                let mut senders = Vec::new();
                for _ in 0..2 {
                    let (len, from) =
                        tokio::time::timeout(Duration::from_secs(3), binding.recv_from(&mut buf))
                            .await
                            .unwrap()
                            .unwrap();
                    senders.push((buf[..len].to_vec(), from.to_string()));
                }
                senders.sort();
                assert_eq!(
                    senders,
                    vec![
                        (b"from a".to_vec(), "203.0.113.2:7000".to_owned()),
                        (b"from b".to_vec(), "203.0.113.3:7001".to_owned())
                    ]
                );
            })
        });
    }
}

fn hex(text: &str) -> Vec<u8> {
    let digits: String = text.split_whitespace().collect();
    (0..digits.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).unwrap())
        .collect()
}

/// The worked example of protocol.md section 3, byte for byte, from the client at
/// 198.51.100.2:5000: enter the mode, step 1, step 2 with 203.0.113.2:6000. The gateway's AID
/// and ports are its own; every other octet of its replies is as the document shows.
#[test]
fn protocol_worked_example_bytes() {
    use std::io::{Read as _, Write as _};
    let setup = setup(&[]);
    let media = server_socket(&setup.bed, "203.0.113.2:6000");
    let (mut control, client) = setup
        .bed
        .client
        .run(|| {
            let socket = std::net::TcpStream::connect_timeout(
                &PROXY.parse().unwrap(),
                Duration::from_secs(5),
            )
            .unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            (socket, UdpSocket::bind("198.51.100.2:5000").unwrap())
        })
        .unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let read = |control: &mut std::net::TcpStream, len: usize| {
        let mut buf = vec![0u8; len];
        control.read_exact(&mut buf).unwrap();
        buf
    };
    // Greeting (no authentication) and entering the mode.
    control.write_all(&hex("05 01 00")).unwrap();
    assert_eq!(read(&mut control, 2), hex("05 00"));
    control
        .write_all(&hex("05 04 00 01 00000000 0000"))
        .unwrap();
    assert_eq!(read(&mut control, 10), hex("01 00 00 01 00000000 0000"));
    // Step 1.
    control
        .write_all(&hex(
            "01 001B 05 0007 00 0101 00000000 01 C6336402 1388 01 00000000 0000",
        ))
        .unwrap();
    let reply = read(&mut control, 27);
    assert_eq!(
        &reply[..9],
        &hex("02 001B 00 0087 00 0101")[..],
        "reply, REMOTE-PENDING, TID echoed"
    );
    let aid = &reply[9..13];
    assert_ne!(aid, [0, 0, 0, 0]);
    assert_eq!(
        &reply[13..18],
        &hex("01 C6336401")[..],
        "internal relay 198.51.100.1"
    );
    assert_eq!(
        &reply[20..25],
        &hex("01 CB007101")[..],
        "external relay 203.0.113.1"
    );
    let internal_port = u16::from_be_bytes([reply[18], reply[19]]);
    let external_port = u16::from_be_bytes([reply[25], reply[26]]);
    // Step 2 with the AID of the reply and the media source 203.0.113.2:6000.
    let mut step2 = hex("01 001B 05 0007 00 0101");
    step2.extend_from_slice(aid);
    step2.extend_from_slice(&hex("01 C6336402 1388 01 CB007102 1770"));
    control.write_all(&step2).unwrap();
    let mut expected = hex("02 001B 00 0007 00 0101");
    expected.extend_from_slice(aid);
    expected.extend_from_slice(&hex("01 C6336401"));
    expected.extend_from_slice(&internal_port.to_be_bytes());
    expected.extend_from_slice(&hex("01 CB007101"));
    expected.extend_from_slice(&external_port.to_be_bytes());
    assert_eq!(
        read(&mut control, 27),
        expected,
        "the same relay addresses, REMOTE-PENDING cleared"
    );
    // A datagram from the source arrives with the 8-octet header `00 00 0000 AID`.
    media
        .send_to(b"media", ("203.0.113.1", external_port))
        .unwrap();
    let mut buf = [0u8; 64];
    let (len, from) = client.recv_from(&mut buf).unwrap();
    let mut header = hex("00 00 0000");
    header.extend_from_slice(aid);
    assert_eq!(&buf[..8], &header[..]);
    assert_eq!(&buf[8..len], b"media");
    assert_eq!(
        from,
        SocketAddr::new("198.51.100.1".parse().unwrap(), internal_port)
    );
}

/// A datagram the 8-octet header would push over the internal link's MTU is not relayed in the
/// kernel: it goes to the userspace relay (counted) and still arrives whole.
#[test]
fn datagrams_too_big_for_the_kernel_relay_go_to_userspace() {
    let setup = Arc::new(setup(&[]));
    let source_sock = server_socket(&setup.bed, "203.0.113.2:6000");
    let source_addr: SocketAddr = "203.0.113.2:6000".parse().unwrap();
    let shared = Arc::clone(&setup);
    in_client(&setup.bed.client, move || {
        Box::pin(async move {
            let setup = shared;
            let session = Client::connect(PROXY.parse().unwrap(), None)
                .await
                .unwrap()
                .enhanced()
                .await
                .unwrap();
            let binding = session.udp_socket(Family::V4).await.unwrap();
            let external = binding.bind().await.unwrap().external;
            binding.connect(source_addr).await.unwrap();
            // 20 (IPv4) + 8 (UDP) + 1470 = 1498 octets: fits the wire, not with 8 more.
            let big: Vec<u8> = (0..1470u32).map(|i| (i % 251) as u8).collect();
            source_sock.send_to(&big, external).unwrap();
            source_sock.send_to(b"small", external).unwrap();
            let got = receive(&binding, 2).await;
            assert_eq!(got.len(), 2);
            assert!(got.contains(&big), "the big datagram arrives whole");
            assert_eq!(stat(&setup, "too_big_for_kernel_relay"), 1);
            assert_eq!(
                stat(&setup, "kernel_relayed_inbound"),
                1,
                "the small one is relayed in the kernel"
            );
        })
    });
}
