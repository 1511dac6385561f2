//! No way in, as an attacker would try it in the test bed: the control port from outside (the
//! weak-host model routes TCP for internal addresses in from the external side), a restart that
//! fails, a stop, signals during start-up, and reloads while a stream flows. Root only.

mod common;

use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::Duration,
};

use std::os::unix::fs::OpenOptionsExt as _;

use common::pinned_packets;
use gateway_client::{Client, EnhancedSession, Family, Timeouts};
use gateway_common::ExitReason;
use nix::{
    sched::{CloneFlags, setns},
    sys::signal::Signal,
};
use testbed::{
    Netns, Testbed, addr,
    gateway::{
        GatewayDaemon, InstanceCleanup, TESTBED_ARGS, detach, passwd_line, start_expecting_failure,
        start_in_fw, unique_instance,
    },
    iface, send_paced, time_scale,
    traffic::{self, drain},
    wait_until,
};

/// Bound on waiting for something that must happen.
const WAIT: Duration = Duration::from_secs(10);
const BURST: usize = 100;
const SINK_PORTS: [u16; 4] = [7201, 7202, 7203, 7204];

/// Sends `BURST` unsolicited datagrams from `server` to sockets on the external address, waits
/// until the gate has counted them and returns how many reached a socket.
fn unsolicited_burst(bed: &Testbed, cleanup: &InstanceCleanup, sinks: &[UdpSocket]) -> usize {
    let before = pinned_packets(cleanup, ExitReason::NoBinding);
    traffic::send_udp(
        &bed.server,
        addr::FW_OUTSIDE_V4.into(),
        &SINK_PORTS,
        BURST,
        b"unsolicited",
    )
    .unwrap();
    let counted = wait_until(WAIT, || {
        pinned_packets(cleanup, ExitReason::NoBinding) >= before + BURST as u64
    });
    // Counted or not, whatever arrived is the answer; the count explains a failure.
    let arrived = drain(sinks, 0, Duration::from_millis(100));
    assert!(
        counted || arrived > 0,
        "the burst was neither counted as no_binding nor delivered"
    );
    arrived
}

fn external_sinks(bed: &Testbed) -> Vec<UdpSocket> {
    traffic::bind_sinks(&bed.fw, addr::FW_OUTSIDE_V4.into(), &SINK_PORTS).unwrap()
}

/// Sends a SOCKS5 greeting (no authentication) and returns the method selection, or `None`
/// when no SOCKS reply comes (no connection, closed, or silence).
fn greeting_reply(ns: &Netns, proxy: SocketAddr) -> Option<[u8; 2]> {
    ns.run(move || {
        let mut stream = TcpStream::connect_timeout(&proxy, Duration::from_secs(2)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        stream.write_all(&[5, 1, 0]).ok()?;
        let mut reply = [0u8; 2];
        stream.read_exact(&mut reply).ok()?;
        Some(reply)
    })
    .unwrap()
}

#[test]
fn the_control_port_answers_only_from_inside() {
    let bed = Testbed::new().unwrap();
    let (gateway, cleanup) = start_in_fw(&bed, &[]).unwrap();
    let inside_v4 = SocketAddr::new(addr::FW_INSIDE_V4.into(), 1080);
    let inside_v6 = SocketAddr::new(addr::FW_INSIDE_V6.into(), 1080);

    // The server side has a route to the internal prefix via fw's external address: the
    // weak-host model would deliver its SYN to the listener.
    for proxy in [inside_v4, inside_v6] {
        let before = pinned_packets(&cleanup, ExitReason::ControlPortFromOutside);
        assert_eq!(
            greeting_reply(&bed.server, proxy),
            None,
            "{proxy}: no SOCKS reply to a host outside"
        );
        assert!(
            wait_until(WAIT, || pinned_packets(
                &cleanup,
                ExitReason::ControlPortFromOutside
            ) > before),
            "{proxy}: the SYN from outside is dropped and counted as control_port_from_outside"
        );
        assert_eq!(
            greeting_reply(&bed.client, proxy),
            Some([5, 0]),
            "{proxy}: a client inside still gets 05 00"
        );
    }
    // The listeners are tied to the internal interface (`ss` shows ADDR%DEVICE), so a
    // connection that arrives anywhere else finds no socket even without the gate.
    let listening = testbed::run_checked(bed.fw.command("ss").args(["-Htln"])).unwrap();
    let listening = String::from_utf8_lossy(&listening.stdout);
    for proxy in [inside_v4, inside_v6] {
        let tied = match proxy.ip() {
            IpAddr::V4(ip) => format!("{ip}%{}:1080", iface::FW_INSIDE),
            IpAddr::V6(ip) => format!("[{ip}]%{}:1080", iface::FW_INSIDE),
        };
        assert!(
            listening.contains(&tied),
            "{tied} in `ss -tln`:\n{listening}"
        );
    }
    drop(gateway);
}

#[test]
fn control_connections_only_from_permitted_client_networks() {
    let bed = Testbed::new().unwrap();
    let (mut gateway, cleanup) = start_in_fw(&bed, &["--allow-clients", "192.0.2.0/24"]).unwrap();
    let proxy = SocketAddr::new(addr::FW_INSIDE_V4.into(), 1080);
    assert_eq!(
        greeting_reply(&bed.client, proxy),
        None,
        "a client outside the permitted networks gets no SOCKS reply"
    );
    assert!(
        gateway.wait_for_log("outside the permitted client networks", 1, WAIT),
        "the refusal is logged:\n{}",
        gateway.log_text()
    );
    assert!(gateway.stop());
    detach(&bed.fw, &gateway.instance).unwrap();
    drop(cleanup);

    // The default: the internal interface's networks.
    let (_gateway, _cleanup) = start_in_fw(&bed, &[]).unwrap();
    assert_eq!(greeting_reply(&bed.client, proxy), Some([5, 0]));
}

/// The client library's timeouts with the handshake's stretched like every other wait: password
/// checks are CPU work, slower with everything else in an emulated VM.
fn scaled_timeouts() -> Timeouts {
    let defaults = Timeouts::default();
    Timeouts {
        handshake: defaults.handshake * time_scale(),
        ..defaults
    }
}

/// An enhanced-mode session with the gateway in the test bed (run in `client`).
async fn enhanced_session(credentials: Option<(String, String)>) -> EnhancedSession {
    let proxy = SocketAddr::new(addr::FW_INSIDE_V4.into(), 1080);
    Client::connect_with(proxy, credentials, scaled_timeouts())
        .await
        .unwrap()
        .enhanced()
        .await
        .unwrap()
}

/// A confirmed enhanced-mode binding held by a client in `client`, counting what reaches its
/// socket, until it is told to stop.
struct LiveBinding {
    external: SocketAddr,
    received: Arc<AtomicUsize>,
    session_closed: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl LiveBinding {
    fn start(bed: &Testbed, credentials: Option<(&str, &str)>, remote: SocketAddr) -> Self {
        let path: PathBuf = bed.client.path();
        let credentials = credentials.map(|(u, p)| (u.to_owned(), p.to_owned()));
        let received = Arc::new(AtomicUsize::new(0));
        let session_closed = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = {
            let (received, closed, stop) = (
                Arc::clone(&received),
                Arc::clone(&session_closed),
                Arc::clone(&stop),
            );
            std::thread::spawn(move || {
                setns(File::open(&path).unwrap(), CloneFlags::CLONE_NEWNET).unwrap();
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    let session = enhanced_session(credentials).await;
                    let binding = session.udp_socket(Family::V4).await.unwrap();
                    let relay = binding.bind().await.unwrap();
                    binding.connect(remote).await.unwrap();
                    ready_tx.send(relay.external).unwrap();
                    let mut buf = vec![0u8; 2048];
                    while !stop.load(Ordering::Relaxed) {
                        tokio::select! {
                            got = tokio::time::timeout(
                                Duration::from_millis(50),
                                binding.socket().recv(&mut buf),
                            ) => {
                                if matches!(got, Ok(Ok(_))) {
                                    received.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            () = session.closed(), if !closed.load(Ordering::Relaxed) => {
                                closed.store(true, Ordering::Relaxed);
                            }
                        }
                    }
                });
            })
        };
        let external = ready_rx
            .recv_timeout(WAIT * time_scale())
            .expect("the binding is confirmed");
        Self {
            external,
            received,
            session_closed,
            stop,
            thread: Some(thread),
        }
    }

    fn received(&self) -> usize {
        self.received.load(Ordering::Relaxed)
    }

    fn session_closed(&self) -> bool {
        self.session_closed.load(Ordering::Relaxed)
    }
}

impl Drop for LiveBinding {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The media source in `server`.
fn source(bed: &Testbed) -> UdpSocket {
    bed.server
        .udp_socket("203.0.113.2:6000", Duration::from_secs(2))
        .unwrap()
}

fn send_stream(socket: &UdpSocket, to: SocketAddr, count: usize) {
    send_paced(socket, to, count, |i| format!("media {i}").into_bytes());
}

/// A gate left pinned by a daemon killed with SIGKILL: its instance name and cleanup guard.
fn gate_of_a_killed_daemon(bed: &Testbed) -> (String, InstanceCleanup) {
    let instance = unique_instance();
    let cleanup = InstanceCleanup {
        instance: instance.clone(),
    };
    GatewayDaemon::start(&bed.fw, &instance, &TESTBED_ARGS)
        .unwrap()
        .kill();
    (instance, cleanup)
}

#[test]
fn a_failed_restart_and_a_stop_keep_the_gate_closed_until_detach() {
    let bed = Testbed::new().unwrap();
    let sinks = external_sinks(&bed);
    let (instance, cleanup) = gate_of_a_killed_daemon(&bed);

    // Someone holds the listen port: the next start fails, clearly, and opens nothing.
    let squatter = bed
        .fw
        .run(|| TcpListener::bind((addr::FW_INSIDE_V4, 1080)).unwrap())
        .unwrap();
    let (status, log) = start_expecting_failure(&bed.fw, &instance, &TESTBED_ARGS).unwrap();
    assert!(!status.success());
    assert!(
        log.contains("listen on 198.51.100.1:1080") && log.to_lowercase().contains("in use"),
        "the failure names the address and the cause:\n{log}"
    );
    assert!(
        log.contains("the gate stays attached and dropping"),
        "the failure says the gate stays:\n{log}"
    );
    assert_eq!(
        unsolicited_burst(&bed, &cleanup, &sinks),
        0,
        "after a failed restart no unsolicited datagram reaches a socket"
    );
    drop(squatter);

    // A running daemon with a live binding; then SIGTERM.
    let mut gateway = GatewayDaemon::start(&bed.fw, &instance, &TESTBED_ARGS).unwrap();
    let source = source(&bed);
    let live = LiveBinding::start(&bed, None, source.local_addr().unwrap());
    send_stream(&source, live.external, 10);
    assert!(
        wait_until(WAIT, || live.received() >= 10),
        "the live binding delivers ({} of 10)",
        live.received()
    );
    assert!(gateway.stop(), "clean exit:\n{}", gateway.log_text());
    assert!(
        gateway.log_text().contains("the gate admits nothing now"),
        "{}",
        gateway.log_text()
    );
    assert_eq!(
        unsolicited_burst(&bed, &cleanup, &sinks),
        0,
        "after SIGTERM no unsolicited datagram reaches a socket"
    );
    let before = pinned_packets(&cleanup, ExitReason::NoBinding);
    let delivered = live.received();
    send_stream(&source, live.external, BURST);
    assert!(
        wait_until(WAIT, || pinned_packets(&cleanup, ExitReason::NoBinding)
            >= before + BURST as u64),
        "the stopped binding's datagrams are dropped as no_binding"
    );
    assert_eq!(
        live.received(),
        delivered,
        "a binding live before the stop admits nothing after it"
    );
    drop(live);

    // Only `gateway detach` opens the firewall, and leaves nothing behind.
    detach(&bed.fw, &instance).unwrap();
    assert!(!cleanup.pin_dir().exists(), "no pins left");
    assert!(
        !testbed::gateway::gate_attached(&bed.fw, iface::FW_OUTSIDE).unwrap(),
        "no gate program left"
    );
    traffic::send_udp(
        &bed.server,
        addr::FW_OUTSIDE_V4.into(),
        &SINK_PORTS,
        BURST,
        b"after detach",
    )
    .unwrap();
    assert_eq!(drain(&sinks, BURST, WAIT), BURST, "after detach all arrive");
}

/// A file the test edits while the daemon runs (users, configuration), removed on drop.
struct EditedFile(PathBuf);

impl EditedFile {
    fn write(&self, text: &str) {
        // Write aside and rename, as an operator's editor would: the daemon never reads half.
        let tmp = self.0.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.0).unwrap();
    }
}

impl Drop for EditedFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn authenticates(bed: &Testbed, user: &str, password: &str) -> bool {
    let (user, password) = (user.to_owned(), password.to_owned());
    bed.client
        .run(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(Client::connect_with(
                    SocketAddr::new(addr::FW_INSIDE_V4.into(), 1080),
                    Some((user, password)),
                    scaled_timeouts(),
                ))
                .is_ok()
        })
        .unwrap()
}

/// Datagrams of the stream that flows across the reload.
const STREAM: usize = 400;

#[test]
fn sighup_reloads_users_and_keeps_live_streams() {
    let bed = Testbed::new().unwrap();
    let users =
        EditedFile(std::env::temp_dir().join(format!("gateway-users-{}", unique_instance())));
    let alice = passwd_line("alice", "alice-pw").unwrap();
    let bob = passwd_line("bob", "bob-pw").unwrap();
    let carol = passwd_line("carol", "carol-pw").unwrap();
    users.write(&format!("{alice}{carol}"));
    let args = [
        "--external",
        iface::FW_OUTSIDE,
        "--internal",
        iface::FW_INSIDE,
        "--users",
        users.0.to_str().unwrap(),
    ];
    let instance = unique_instance();
    let _cleanup = InstanceCleanup {
        instance: instance.clone(),
    };
    let mut gateway = GatewayDaemon::start(&bed.fw, &instance, &args).unwrap();
    let pid = gateway.pid();
    assert!(authenticates(&bed, "alice", "alice-pw"));
    assert!(
        !authenticates(&bed, "bob", "bob-pw"),
        "bob is not a user yet"
    );

    // alice's stream flows while the users file gains bob and SIGHUP reloads it.
    let source = source(&bed);
    let stream = LiveBinding::start(
        &bed,
        Some(("alice", "alice-pw")),
        source.local_addr().unwrap(),
    );
    let carols = LiveBinding::start(
        &bed,
        Some(("carol", "carol-pw")),
        "203.0.113.2:6002".parse().unwrap(),
    );
    let sender = {
        let source = source.try_clone().unwrap();
        let to = stream.external;
        std::thread::spawn(move || {
            for i in 0..STREAM {
                source.send_to(format!("media {i}").as_bytes(), to).unwrap();
                if i % 10 == 0 {
                    // Paced, so the reload falls in the middle of the stream.
                    std::thread::sleep(Duration::from_millis(2) * time_scale());
                }
            }
        })
    };
    users.write(&format!("{alice}{bob}{carol}"));
    gateway.signal(Signal::SIGHUP);
    assert!(
        gateway.wait_for_log("SIGHUP: users and policy reloaded", 1, WAIT),
        "the reload is logged:\n{}",
        gateway.log_text()
    );
    sender.join().unwrap();
    assert!(
        wait_until(WAIT, || stream.received() >= STREAM),
        "the live stream lost packets across the reload: {} of {STREAM}",
        stream.received()
    );
    assert!(gateway.is_running() && gateway.pid() == pid, "same process");
    assert!(
        authenticates(&bed, "bob", "bob-pw"),
        "the new user authenticates"
    );
    assert!(!stream.session_closed() && !carols.session_closed());

    // A broken file is refused; the users in force stay.
    users.write("this line is not NAME:HASH\n");
    gateway.signal(Signal::SIGHUP);
    assert!(
        gateway.wait_for_log("reload refused", 1, WAIT),
        "the refusal is logged:\n{}",
        gateway.log_text()
    );
    assert!(
        authenticates(&bed, "alice", "alice-pw"),
        "old users still work"
    );
    assert!(authenticates(&bed, "bob", "bob-pw"));

    // A file without carol ends carol's session, and only hers.
    users.write(&format!("{alice}{bob}"));
    gateway.signal(Signal::SIGHUP);
    assert!(gateway.wait_for_log("SIGHUP: users and policy reloaded", 2, WAIT));
    assert!(
        wait_until(WAIT, || carols.session_closed()),
        "a removed user's live session ends"
    );
    assert!(!stream.session_closed(), "other sessions stay");
    assert!(!authenticates(&bed, "carol", "carol-pw"));
    assert!(gateway.is_running() && gateway.pid() == pid);
}

/// Makes a FIFO at `path` (the daemon reads its configuration file through it, so the test
/// decides when each read completes).
fn mkfifo(path: &std::path::Path) {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
}

#[test]
fn sigterm_during_start_up_leaves_the_gate_closed() {
    let bed = Testbed::new().unwrap();
    let sinks = external_sinks(&bed);
    let (instance, cleanup) = gate_of_a_killed_daemon(&bed);

    let dir = std::env::temp_dir().join(format!("gateway-fifo-{instance}"));
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("config.toml");
    mkfifo(&fifo);
    let config = format!(
        "external = \"{}\"\ninternal = \"{}\"\nallow_anonymous = true\n",
        iface::FW_OUTSIDE,
        iface::FW_INSIDE
    );
    // The daemon reads its configuration once for its settings and once more, after its signal
    // handlers are installed, for users and policy: the second read is held until SIGTERM is in.
    let fifo_arg = fifo.to_str().unwrap().to_owned();
    let mut daemon =
        GatewayDaemon::spawn(&bed.fw, &instance, &[], &["--config", &fifo_arg]).unwrap();
    // Bounded: a non-blocking open fails until the daemon opens its end.
    let feed = |text: &str| {
        let mut writer = None;
        assert!(
            wait_until(WAIT, || {
                writer = std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&fifo)
                    .ok();
                writer.is_some()
            }),
            "the daemon never opened its configuration file"
        );
        writer.unwrap().write_all(text.as_bytes()).unwrap();
    };
    feed(&config);
    assert!(
        daemon.wait_for_log("gateway starting", 1, WAIT),
        "the daemon starts:\n{}",
        daemon.log_text()
    );
    daemon.signal(Signal::SIGTERM);
    feed(&config);
    let status = daemon.wait_exit(WAIT);
    let text = daemon.log_text();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        status.is_some_and(|s| s.success()),
        "a requested stop is a clean exit:\n{text}"
    );
    assert!(
        text.contains("stop requested during start-up"),
        "a clear log line:\n{text}"
    );
    assert!(
        !text.contains("gateway running"),
        "it never served:\n{text}"
    );
    assert_eq!(
        unsolicited_burst(&bed, &cleanup, &sinks),
        0,
        "the gate stays closed"
    );
}

#[test]
fn remove_gate_on_exit_opens_the_firewall_only_when_asked() {
    let bed = Testbed::new().unwrap();
    let sinks = external_sinks(&bed);
    let (mut gateway, cleanup) = start_in_fw(&bed, &["--remove-gate-on-exit"]).unwrap();
    assert_eq!(unsolicited_burst(&bed, &cleanup, &sinks), 0);
    assert!(gateway.stop());
    assert!(
        gateway.log_text().contains("the gate is open"),
        "{}",
        gateway.log_text()
    );
    assert!(!cleanup.pin_dir().exists(), "nothing left pinned");
    traffic::send_udp(
        &bed.server,
        addr::FW_OUTSIDE_V4.into(),
        &SINK_PORTS,
        BURST,
        b"gate removed",
    )
    .unwrap();
    assert_eq!(drain(&sinks, BURST, WAIT), BURST);
}

/// The reply code of a SOCKS5 CONNECT to `target` by an anonymous client in `client`; `None`
/// when the gateway gives no SOCKS answer.
fn connect_reply(bed: &Testbed, target: SocketAddr) -> Option<u8> {
    let SocketAddr::V4(target) = target else {
        panic!("IPv4 targets only");
    };
    bed.client
        .run(move || {
            let proxy = SocketAddr::new(addr::FW_INSIDE_V4.into(), 1080);
            let mut stream = TcpStream::connect_timeout(&proxy, Duration::from_secs(2)).ok()?;
            stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            stream.write_all(&[5, 1, 0]).ok()?;
            let mut selection = [0u8; 2];
            stream.read_exact(&mut selection).ok()?;
            let mut request = vec![5, 1, 0, 1];
            request.extend_from_slice(&target.ip().octets());
            request.extend_from_slice(&target.port().to_be_bytes());
            stream.write_all(&request).ok()?;
            let mut reply = [0u8; 2];
            stream.read_exact(&mut reply).ok()?;
            Some(reply[1])
        })
        .unwrap()
}

#[test]
fn sighup_reloads_the_policy_from_the_config_file() {
    let bed = Testbed::new().unwrap();
    let dir = std::env::temp_dir().join(format!("gateway-policy-{}", unique_instance()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = EditedFile(dir.join("gateway.toml"));
    let base = format!(
        "external = \"{}\"\ninternal = \"{}\"\nallow_anonymous = true\n",
        iface::FW_OUTSIDE,
        iface::FW_INSIDE
    );
    config.write(&base);
    let (gateway, _cleanup) = start_in_fw(&bed, &["--config", config.0.to_str().unwrap()]).unwrap();
    let server: SocketAddr = "203.0.113.2:9".parse().unwrap();
    let before = connect_reply(&bed, server);
    assert!(
        before.is_some_and(|code| code != 2),
        "allowed before the reload (nothing listens there: {before:?})"
    );
    let source = source(&bed);
    let live = LiveBinding::start(&bed, None, source.local_addr().unwrap());

    // deny: CONNECT and enhanced-mode REMOTEs in the network are refused from now on.
    config.write(&format!("{base}deny = [\"203.0.113.0/24\"]\n"));
    gateway.signal(Signal::SIGHUP);
    assert!(gateway.wait_for_log("SIGHUP: users and policy reloaded", 1, WAIT));
    assert_eq!(
        connect_reply(&bed, server),
        Some(2),
        "denied after the reload"
    );
    let refused = bed
        .client
        .run(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async {
                    let session = enhanced_session(None).await;
                    let binding = session.udp_socket(Family::V4).await.unwrap();
                    binding.bind().await.unwrap();
                    binding
                        .connect("203.0.113.2:6000".parse::<SocketAddr>().unwrap())
                        .await
                        .is_err()
                })
        })
        .unwrap();
    assert!(
        refused,
        "an enhanced-mode step 2 into the denied network is refused"
    );
    assert!(!live.session_closed(), "the live binding stays");

    // allow_clients: a reload that no longer permits the inside network ends its sessions.
    config.write(&format!("{base}allow_clients = [\"192.0.2.0/24\"]\n"));
    gateway.signal(Signal::SIGHUP);
    assert!(gateway.wait_for_log("SIGHUP: users and policy reloaded", 2, WAIT));
    assert!(
        wait_until(WAIT, || live.session_closed()),
        "a session from a network no longer permitted ends"
    );
    assert_eq!(
        greeting_reply(
            &bed.client,
            SocketAddr::new(addr::FW_INSIDE_V4.into(), 1080)
        ),
        None
    );
    drop(live);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn user_names_are_logged_with_control_characters_escaped() {
    let bed = Testbed::new().unwrap();
    let users =
        EditedFile(std::env::temp_dir().join(format!("gateway-users-{}", unique_instance())));
    users.write(&passwd_line("alice", "alice-pw").unwrap());
    let (gateway, _cleanup) = start_in_fw(&bed, &["--users", users.0.to_str().unwrap()]).unwrap();
    let name: &[u8] = b"mallory\nINFO forged: authentication succeeded\x1b[2K";
    let answer = bed
        .client
        .run(move || {
            let proxy = SocketAddr::new(addr::FW_INSIDE_V4.into(), 1080);
            let mut stream = TcpStream::connect_timeout(&proxy, Duration::from_secs(2)).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(5) * time_scale()))
                .unwrap();
            stream.write_all(&[5, 1, 2]).unwrap();
            let mut selection = [0u8; 2];
            stream.read_exact(&mut selection).unwrap();
            let mut auth = vec![1, u8::try_from(name.len()).unwrap()];
            auth.extend_from_slice(name);
            auth.extend_from_slice(&[5]);
            auth.extend_from_slice(b"wrong");
            stream.write_all(&auth).unwrap();
            let mut reply = [0u8; 2];
            stream.read_exact(&mut reply).unwrap();
            (selection, reply)
        })
        .unwrap();
    assert_eq!(answer.0, [5, 2]);
    assert_ne!(answer.1[1], 0, "refused");
    assert!(gateway.wait_for_log("authentication failed", 1, WAIT));
    let log = gateway.log_text();
    assert!(
        !log.lines().any(|line| line.starts_with("INFO forged")),
        "no forged log line:\n{log}"
    );
    assert!(!log.contains('\x1b'), "no raw escape sequence in the log");
    assert!(
        log.contains("mallory\\nINFO forged") && log.contains("\\u{1b}[2K"),
        "the name is logged escaped:\n{log}"
    );
}

/// Opens `count` SOCKS control connections from `client` and sends each a greeting, without
/// waiting for answers.
fn open_connections(bed: &Testbed, count: usize) -> Vec<TcpStream> {
    bed.client
        .run(move || {
            let proxy = SocketAddr::new(addr::FW_INSIDE_V4.into(), 1080);
            (0..count)
                .filter_map(|_| {
                    let mut stream =
                        TcpStream::connect_timeout(&proxy, Duration::from_secs(2)).ok()?;
                    stream.write_all(&[5, 1, 0]).ok()?;
                    Some(stream)
                })
                .collect()
        })
        .unwrap()
}

#[test]
fn out_of_file_descriptors_the_daemon_answers_and_recovers() {
    let bed = Testbed::new().unwrap();
    let instance = unique_instance();
    let _cleanup = InstanceCleanup {
        instance: instance.clone(),
    };
    // A hard limit the daemon cannot raise: about 45 descriptors at rest (8 of them the shared
    // relay sockets), 80 allowed, so a start-up that loads the object twice (the data path and
    // the steering program, each with every map of the object, the multicast ones included)
    // still fits.
    let mut gateway = GatewayDaemon::start_with_prefix(
        &bed.fw,
        &instance,
        &["prlimit", "--nofile=80:80", "--"],
        &TESTBED_ARGS,
    )
    .unwrap();
    // Connections until the daemon runs out of descriptors (bounded: 25 batches of 4).
    let mut held = Vec::new();
    for _ in 0..25 {
        held.extend(open_connections(&bed, 4));
        if gateway.log_text().contains("accept failed") {
            break;
        }
    }
    assert!(
        gateway.wait_for_log("accept failed", 1, WAIT),
        "the SOCKS accept loop saw EMFILE ({} connections held):\n{}",
        held.len(),
        gateway.log_text()
    );
    // The control socket meets EMFILE too, and must keep its accept loop.
    let control = PathBuf::from("/run/gateway")
        .join(&instance)
        .join("control.sock");
    let mut pending = std::os::unix::net::UnixStream::connect(&control).unwrap();
    pending.write_all(b"bindings\n").unwrap();
    assert!(
        gateway.wait_for_log("control socket: accept failed", 1, WAIT),
        "{}",
        gateway.log_text()
    );
    // A UDP ASSOCIATE whose relay socket cannot be made gets a failure reply, not a silent close.
    // The first connection was accepted before the descriptors ran out.
    let mut first = held.remove(0);
    first.set_read_timeout(Some(WAIT)).unwrap();
    let mut selection = [0u8; 2];
    first.read_exact(&mut selection).unwrap();
    assert_eq!(selection, [5, 0]);
    first.write_all(&[5, 3, 0, 1, 0, 0, 0, 0, 0, 0]).unwrap();
    let mut reply = [0u8; 2];
    let reply = first.read_exact(&mut reply).map(|()| reply).ok();
    assert_eq!(reply, Some([5, 1]), "general failure for the association");

    // Free the descriptors: the pending control client is answered, the CLI works again.
    drop(held);
    pending
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(&pending), &mut answer).unwrap();
    assert!(answer.contains("enhanced_bindings"), "{answer}");
    let out =
        testbed::gateway::gateway_cli(&bed.fw, &["bindings", "--instance", &instance, "--json"])
            .unwrap();
    assert!(out.status.success());
    assert!(gateway.is_running());
}

#[test]
fn an_address_added_to_the_host_after_start_is_refused_as_a_connect_target() {
    let bed = Testbed::new().unwrap();
    let (gateway, _cleanup) = start_in_fw(&bed, &[]).unwrap();
    let target: SocketAddr = "192.0.2.77:22".parse().unwrap();
    let before = connect_reply(&bed, target);
    assert!(
        before.is_some_and(|code| code != 2),
        "not the gateway's yet: tried, not refused by policy ({before:?})"
    );
    // A management interface appears on the gateway host (a veth pair: this kernel may have no
    // dummy driver).
    for args in [
        &[
            "link", "add", "mgmt0", "type", "veth", "peer", "name", "mgmt1",
        ][..],
        &["addr", "add", "192.0.2.77/32", "dev", "mgmt0"],
        &["link", "set", "mgmt0", "up"],
    ] {
        testbed::run_checked(bed.fw.command("ip").args(args)).unwrap();
    }
    assert!(
        gateway.wait_for_log("host addresses changed", 1, WAIT),
        "the change is seen through netlink:\n{}",
        gateway.log_text()
    );
    assert_eq!(
        connect_reply(&bed, target),
        Some(2),
        "the host's new address is refused as a CONNECT target"
    );
}

#[test]
fn an_address_added_to_the_external_interface_after_start_is_guarded_from_inside() {
    let bed = Testbed::new().unwrap();
    let (gateway, cleanup) = start_in_fw(&bed, &[]).unwrap();
    testbed::run_checked(bed.fw.command("ip").args([
        "addr",
        "add",
        "203.0.113.9/32",
        "dev",
        iface::FW_OUTSIDE,
    ]))
    .unwrap();
    assert!(
        gateway.wait_for_log("external addresses changed", 1, WAIT),
        "the kernel's list follows the interface:\n{}",
        gateway.log_text()
    );
    let sink = bed
        .fw
        .udp_socket("203.0.113.9:7777", Duration::from_millis(300))
        .unwrap();
    let before = pinned_packets(&cleanup, ExitReason::InsideToExternalAddress);
    let inside = bed
        .client
        .udp_socket("198.51.100.2:0", Duration::from_secs(1))
        .unwrap();
    for _ in 0..3 {
        inside
            .send_to(b"posing as a remote", "203.0.113.9:7777")
            .unwrap();
    }
    assert!(
        wait_until(WAIT, || {
            pinned_packets(&cleanup, ExitReason::InsideToExternalAddress) >= before + 3
        }),
        "UDP from inside to the new external address is dropped and counted"
    );
    let mut buf = [0u8; 64];
    assert!(
        sink.recv_from(&mut buf).is_err(),
        "no socket on the new address hears it"
    );
}
