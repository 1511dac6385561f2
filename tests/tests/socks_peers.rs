//! The SOCKS5 control plane in the test bed with real peers: curl (CONNECT with and without
//! username/password, by `.test` name resolved by the gateway through dnsmasq, by IPv4 and IPv6
//! address), `PySocks` (UDP ASSOCIATE, `rdns=False` and its default `rdns=True`), raw SOCKS for
//! policy refusals, BIND, and the firewall rule that only remotes the client sent to get in.
//! Root only.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    process::Output,
    time::Duration,
};

use bytes::BytesMut;
use gateway_proto::{
    Address, Command as SocksCommand, Greeting, Method, MethodSelection, Reply, ReplyCode, Request,
    UdpHeader,
};
use testbed::{
    Testbed, addr,
    gateway::{
        GatewayDaemon, InstanceCleanup, gateway_cli, passwd_line, reason_packets, stats_json,
        unique_instance,
    },
    iface,
    peers::{Dnsmasq, HttpServer, UdpEcho},
    wait_until,
};

const BODY: &str = "hello through the gateway\n";
const PROXY: &str = "198.51.100.1:1080";
const PASSWORD: &str = "correct horse";
/// Bound on waiting for a log line, a counter or a kernel entry that must come (or go).
const WAIT: Duration = Duration::from_secs(5);

struct Setup {
    // Drop order: gateway first, peers, then the namespaces.
    gateway: GatewayDaemon,
    _http: HttpServer,
    _dns: Dnsmasq,
    _cleanup: InstanceCleanup,
    users: std::path::PathBuf,
    bed: Testbed,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.users);
    }
}

fn setup() -> Setup {
    let bed = Testbed::new().unwrap();
    let dns = Dnsmasq::start(&bed.server, &["web.test"]).unwrap();
    let http = HttpServer::start(&bed.server, BODY).unwrap();
    let users = std::env::temp_dir().join(format!("gateway-users-{}", unique_instance()));
    std::fs::write(&users, passwd_line("alice", PASSWORD).unwrap()).unwrap();
    let instance = unique_instance();
    let cleanup = InstanceCleanup {
        instance: instance.clone(),
    };
    let gateway = GatewayDaemon::start(
        &bed.fw,
        &instance,
        &[
            "--external",
            iface::FW_OUTSIDE,
            "--internal",
            iface::FW_INSIDE,
            "--users",
            users.to_str().unwrap(),
            "--allow-anonymous",
            "--resolver",
            &addr::SERVER_DNS_V4.to_string(),
        ],
    )
    .unwrap();
    Setup {
        gateway,
        _http: http,
        _dns: dns,
        _cleanup: cleanup,
        users,
        bed,
    }
}

fn curl(setup: &Setup, args: &[&str]) -> Output {
    setup
        .bed
        .client
        .command("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .unwrap()
}

/// Waits (bounded) until the gateway's log contains `line`: the daemon may write it after the
/// client has already seen the outcome (a refusal is sent before it is logged).
fn assert_logged(gateway: &GatewayDaemon, line: &str, what: &str) {
    assert!(
        wait_until(WAIT, || gateway.log_text().contains(line)),
        "{what}: no {line:?} in the gateway log within {WAIT:?}:\n{}",
        gateway.log_text()
    );
}

/// The `no_binding` drops counted so far.
fn no_binding(setup: &Setup) -> u64 {
    reason_packets(
        &stats_json(&setup.bed.fw, &setup.gateway.instance).unwrap(),
        "no_binding",
    )
}

/// The external relay addresses of the kernel entries (`gateway bindings --json`).
fn kernel_entry_relays(setup: &Setup) -> Vec<String> {
    let out = gateway_cli(
        &setup.bed.fw,
        &["bindings", "--instance", &setup.gateway.instance, "--json"],
    )
    .unwrap();
    assert!(
        out.status.success(),
        "gateway bindings failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let document: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    document["kernel_entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["external_relay"].as_str().unwrap().to_owned())
        .collect()
}

fn assert_fetched(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), BODY, "{what}");
}

#[test]
fn curl_connects_by_name_and_address_with_and_without_credentials() {
    let setup = setup();
    let by_name = curl(
        &setup,
        &["--socks5-hostname", PROXY, "http://web.test/index.txt"],
    );
    assert_fetched(&by_name, "anonymous, name resolved by the gateway");
    let v4 = curl(&setup, &["--socks5", PROXY, "http://203.0.113.2/index.txt"]);
    assert_fetched(&v4, "anonymous, IPv4");
    let v6 = curl(
        &setup,
        &["--socks5", PROXY, "http://[2001:db8:2::2]/index.txt"],
    );
    assert_fetched(&v6, "anonymous, IPv6");
    let user = format!("alice:{PASSWORD}");
    let authed = curl(
        &setup,
        &[
            "--socks5-hostname",
            PROXY,
            "--proxy-user",
            &user,
            "http://web.test/index.txt",
        ],
    );
    assert_fetched(&authed, "username/password");
    assert_logged(&setup.gateway, "user=alice", "the log names the user");
}

#[test]
fn curl_with_a_wrong_password_fails() {
    let setup = setup();
    let out = curl(
        &setup,
        &[
            "--socks5-hostname",
            PROXY,
            "--proxy-user",
            "alice:wrong",
            "http://web.test/index.txt",
        ],
    );
    assert!(
        !out.status.success(),
        "a wrong password must not get through"
    );
    assert!(out.stdout.is_empty());
    assert_logged(
        &setup.gateway,
        "authentication failed",
        "the refusal is logged",
    );
}

/// Opens a control connection from `client` and runs greeting + one request; returns the stream
/// and the first reply.
fn socks_request(setup: &Setup, command: SocksCommand, address: Address) -> (TcpStream, Reply) {
    setup
        .bed
        .client
        .run(move || {
            let mut stream =
                TcpStream::connect_timeout(&PROXY.parse().unwrap(), Duration::from_secs(5))
                    .unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut out = BytesMut::new();
            Greeting {
                methods: vec![Method::NoAuth],
            }
            .encode(&mut out)
            .unwrap();
            Request { command, address }.encode(&mut out).unwrap();
            stream.write_all(&out).unwrap();
            let selection = read_message(&mut stream, MethodSelection::decode);
            assert_eq!(selection.method, Method::NoAuth);
            let reply = read_message(&mut stream, Reply::decode);
            (stream, reply)
        })
        .unwrap()
}

fn read_message<T>(
    stream: &mut TcpStream,
    decode: impl Fn(&mut BytesMut) -> Result<Option<T>, gateway_proto::ProtocolError>,
) -> T {
    let mut buf = BytesMut::new();
    loop {
        if let Some(message) = decode(&mut buf).unwrap() {
            return message;
        }
        let mut byte = [0u8; 1];
        let n = stream.read(&mut byte).unwrap();
        assert_eq!(n, 1, "connection closed before a whole message");
        buf.extend_from_slice(&byte);
    }
}

#[test]
fn connect_that_policy_forbids_gets_not_allowed() {
    let setup = setup();
    for forbidden in [
        "198.51.100.2:80",
        "127.0.0.1:80",
        "203.0.113.1:80",
        "[2001:db8:1::2]:80",
    ] {
        let target: SocketAddr = forbidden.parse().unwrap();
        let (_stream, reply) = socks_request(&setup, SocksCommand::Connect, Address::Ip(target));
        assert_eq!(reply.code, ReplyCode::NotAllowed, "{forbidden}");
    }
    let (_stream, reply) = socks_request(
        &setup,
        SocksCommand::Connect,
        Address::Domain("missing.test".into(), 80),
    );
    assert_eq!(reply.code, ReplyCode::HostUnreachable, "unknown name");
}

const PYSOCKS_UDP: &str = r#"
import socket, socks, sys
rdns = sys.argv[1] == "1"
s = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
s.set_proxy(socks.SOCKS5, "198.51.100.1", 1080, rdns=rdns)
s.settimeout(5)
s.bind(("0.0.0.0", 0))
for i in range(3):
    s.sendto(b"ping%d" % i, ("203.0.113.2", 9999))
    data, addr = s.recvfrom(2048)
    print(data.decode(), addr[0], addr[1])
"#;

#[test]
fn pysocks_udp_associate_with_and_without_rdns() {
    let setup = setup();
    let echo = UdpEcho::start(
        &setup.bed.server,
        "203.0.113.2:9999".parse().unwrap(),
        b"echo:",
    )
    .unwrap();
    for rdns in ["0", "1"] {
        let out = setup
            .bed
            .client
            .command("/usr/bin/python3")
            .args(["-c", PYSOCKS_UDP, rdns])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "PySocks rdns={rdns}: {}\ngateway log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            setup.gateway.log_text()
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "echo:ping0 203.0.113.2 9999\necho:ping1 203.0.113.2 9999\necho:ping2 203.0.113.2 9999\n",
            "rdns={rdns}"
        );
    }
    // The server saw the datagrams come from the gateway's external address, never the client.
    let senders = echo.stop();
    assert!(!senders.is_empty());
    assert!(
        senders
            .iter()
            .all(|s| s.ip() == IpAddr::from(addr::FW_OUTSIDE_V4)),
        "{senders:?}"
    );
}

#[test]
fn only_remotes_the_client_sent_to_get_in() {
    let setup = setup();
    let (control, reply) = socks_request(
        &setup,
        SocksCommand::UdpAssociate,
        Address::Ip("0.0.0.0:0".parse().unwrap()),
    );
    assert_eq!(reply.code, ReplyCode::Succeeded);
    let Address::Ip(relay) = reply.address else {
        panic!("relay must be an IP")
    };
    assert_eq!(
        relay.ip(),
        IpAddr::from(addr::FW_INSIDE_V4),
        "reachable relay address"
    );

    let client = setup
        .bed
        .client
        .udp_socket("198.51.100.2:0", Duration::from_secs(3))
        .unwrap();
    let remote = setup
        .bed
        .server
        .udp_socket("203.0.113.2:9999", Duration::from_secs(3))
        .unwrap();
    let stranger = setup
        .bed
        .server
        .udp_socket("203.0.113.2:9998", Duration::from_secs(3))
        .unwrap();

    let mut datagram = BytesMut::new();
    UdpHeader::new(Address::Ip("203.0.113.2:9999".parse().unwrap()))
        .encode(&mut datagram)
        .unwrap();
    datagram.extend_from_slice(b"question");
    client.send_to(&datagram, relay).unwrap();
    let mut buf = [0u8; 2048];
    let (len, relay_outside) = remote.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..len], b"question");
    assert_eq!(relay_outside.ip(), IpAddr::from(addr::FW_OUTSIDE_V4));

    let before = no_binding(&setup);
    for _ in 0..5 {
        stranger.send_to(b"intruder", relay_outside).unwrap();
    }
    remote.send_to(b"answer", relay_outside).unwrap();
    let (len, _) = client.recv_from(&mut buf).unwrap();
    let mut received = &buf[..len];
    let header = UdpHeader::decode(&mut received).unwrap();
    assert_eq!(
        header.address,
        Address::Ip("203.0.113.2:9999".parse().unwrap())
    );
    assert_eq!(
        received, b"answer",
        "the answer arrives, the intruder's datagrams do not"
    );
    let after = no_binding(&setup);
    assert_eq!(
        after - before,
        5,
        "the kernel dropped the stranger's datagrams"
    );

    // The association ends with its control connection, and so does the kernel entry.
    let relay_outside_text = relay_outside.to_string();
    assert!(
        kernel_entry_relays(&setup).contains(&relay_outside_text),
        "the association has its kernel entry"
    );
    drop(control);
    assert!(
        wait_until(WAIT, || !kernel_entry_relays(&setup)
            .contains(&relay_outside_text)),
        "the kernel entry of {relay_outside} outlived its control connection by {WAIT:?}"
    );
    let before = no_binding(&setup);
    remote.send_to(b"late answer", relay_outside).unwrap();
    assert!(
        wait_until(WAIT, || no_binding(&setup) > before),
        "the late answer was not counted as no_binding"
    );
    let after = no_binding(&setup);
    assert_eq!(
        after - before,
        1,
        "after the association the remote is dropped too"
    );
}

#[test]
fn bind_accepts_a_peer_from_the_server_side() {
    let setup = setup();
    let (mut control, first) = socks_request(
        &setup,
        SocksCommand::Bind,
        Address::Ip("203.0.113.2:0".parse().unwrap()),
    );
    assert_eq!(first.code, ReplyCode::Succeeded);
    let Address::Ip(listening) = first.address else {
        panic!("BIND address")
    };
    assert_eq!(listening.ip(), IpAddr::from(addr::FW_OUTSIDE_V4));
    let mut peer = setup
        .bed
        .server
        .run(move || TcpStream::connect_timeout(&listening, Duration::from_secs(5)).unwrap())
        .unwrap();
    let second = read_message(&mut control, Reply::decode);
    assert_eq!(second.code, ReplyCode::Succeeded);
    assert_eq!(second.address, Address::Ip(peer.local_addr().unwrap()));
    peer.write_all(b"from peer").unwrap();
    let mut buf = [0u8; 9];
    control.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"from peer");
    control.write_all(b"to peer").unwrap();
    let mut buf = [0u8; 7];
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    peer.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"to peer");
}

#[test]
fn inside_host_cannot_pose_as_a_remote() {
    let setup = setup();
    // Loose reverse-path filtering, so only the relay's own arrival-interface check stands in
    // the way of a spoofed source.
    setup
        .bed
        .fw
        .sysctl("net.ipv4.conf.all.rp_filter", "0")
        .unwrap();
    setup
        .bed
        .fw
        .sysctl("net.ipv4.conf.inside0.rp_filter", "0")
        .unwrap();
    let (control, reply) = socks_request(
        &setup,
        SocksCommand::UdpAssociate,
        Address::Ip("0.0.0.0:0".parse().unwrap()),
    );
    let Address::Ip(relay) = reply.address else {
        panic!("relay must be an IP")
    };
    let client = setup
        .bed
        .client
        .udp_socket("198.51.100.2:0", Duration::from_millis(500))
        .unwrap();
    let remote = setup
        .bed
        .server
        .udp_socket("203.0.113.2:9999", Duration::from_secs(3))
        .unwrap();
    let mut datagram = BytesMut::new();
    UdpHeader::new(Address::Ip("203.0.113.2:9999".parse().unwrap()))
        .encode(&mut datagram)
        .unwrap();
    datagram.extend_from_slice(b"question");
    client.send_to(&datagram, relay).unwrap();
    let mut buf = [0u8; 2048];
    let (_, relay_outside) = remote.recv_from(&mut buf).unwrap();

    // An inside host takes the remote's address and sends to the relay's outside address from
    // within: it reaches fw on the internal interface, where no XDP gate runs.
    testbed::run_checked(setup.bed.client.command("ip").args([
        "addr",
        "add",
        "203.0.113.2/32",
        "dev",
        iface::HOST,
    ]))
    .unwrap();
    let spoofer = setup
        .bed
        .client
        .udp_socket("203.0.113.2:9999", Duration::from_secs(3))
        .unwrap();
    for _ in 0..3 {
        spoofer.send_to(b"spoofed", relay_outside).unwrap();
    }
    // fw has seen all three before the absence check starts.
    let inside_drops = || {
        reason_packets(
            &stats_json(&setup.bed.fw, &setup.gateway.instance).unwrap(),
            "inside_to_external_address",
        )
    };
    assert!(
        wait_until(WAIT, || inside_drops() >= 3),
        "the program on the internal interface did not count the three spoofed datagrams"
    );
    assert!(
        client.recv_from(&mut buf).is_err(),
        "a datagram that arrived on the internal interface must not be relayed"
    );
    // The genuine remote still gets through.
    remote.send_to(b"answer", relay_outside).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let (len, _) = client.recv_from(&mut buf).unwrap();
    assert!(buf[..len].ends_with(b"answer"));
    // The kernel's program on the internal interface dropped and counted them before any
    // socket saw them (the relay's own arrival-interface check is the second line).
    assert_eq!(inside_drops(), 3);
    drop(control);
}

#[test]
fn the_client_crates_example_fetches_by_name_through_the_gateway() {
    let setup = setup();
    // `cargo test` builds the examples beside the binaries.
    let example = testbed::gateway::gateway_bin()
        .parent()
        .unwrap()
        .join("examples/http_get");
    let out = setup
        .bed
        .client
        .command(&example)
        .args([PROXY, "web.test", "80", "/index.txt"])
        .env("GATEWAY_USER", "alice")
        .env("GATEWAY_PASSWORD", PASSWORD)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        example.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("HTTP/1.") && text.ends_with(BODY),
        "the page, by name, with a password: {text}"
    );
    assert_logged(&setup.gateway, "user=alice", "the log names the user");
}
