//! Header-less (RAW) delivery end to end in the test bed, spoken byte by byte from plain sockets
//! (no client library): the client's unconnected UDP socket sees the remote itself as the source
//! of what arrives, its replies to the remote arrive from the external relay address, its
//! datagrams to anywhere else are dropped and counted; release, connection close and SIGKILL stop
//! delivery. Forwarding is off in `fw`, so whatever arrives went through the gateway. Root only.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use gateway_common::ExitReason;
use testbed::{
    Testbed, addr,
    gateway::{GatewayDaemon, InstanceCleanup, start_in_fw},
    time_scale, wait_until,
};

const RSU: u16 = 0x0007;
const RAW: u16 = 0x0200;
const REMOTE_PENDING: u16 = 0x0080;
const BIND: u8 = 0x05;
const RELEASE: u8 = 0x06;
/// Bound on waiting for a counter or a datagram that must come.
const WAIT: Duration = Duration::from_secs(5);
const FAIL_CLOSED_WITHIN: Duration = Duration::from_secs(3);

struct Setup {
    gateway: GatewayDaemon,
    cleanup: InstanceCleanup,
    bed: Testbed,
}

fn setup() -> Setup {
    let bed = Testbed::new().unwrap();
    bed.add_second_server_address().unwrap();
    let (gateway, cleanup) = start_in_fw(&bed, &[]).unwrap();
    Setup {
        gateway,
        cleanup,
        bed,
    }
}

impl Setup {
    /// An exit reason's packet count, read from the pinned counters (works after SIGKILL too).
    fn counted(&self, reason: ExitReason) -> u64 {
        gateway::exit_counters::read_exit_counters(&self.cleanup.pin_dir())
            .unwrap()
            .into_iter()
            .find(|total| total.reason == reason)
            .map_or(0, |total| total.packets)
    }

    fn server_socket(&self, addr: SocketAddr) -> UdpSocket {
        self.bed
            .server
            .udp_socket(&addr.to_string(), Duration::from_secs(3))
            .unwrap()
    }

    /// A plain, unconnected UDP socket of the client at `addr`.
    fn client_socket(&self, addr: SocketAddr) -> UdpSocket {
        self.bed
            .client
            .udp_socket(&addr.to_string(), Duration::from_secs(3))
            .unwrap()
    }
}

struct Family {
    proxy: SocketAddr,
    client: SocketAddr,
    remote: SocketAddr,
    elsewhere: SocketAddr,
    external_ip: IpAddr,
    unspecified: SocketAddr,
}

fn v4() -> Family {
    Family {
        proxy: SocketAddr::new(addr::FW_INSIDE_V4.into(), 1080),
        client: SocketAddr::new(addr::CLIENT_V4.into(), 5000),
        remote: SocketAddr::new(addr::SERVER_V4.into(), 6000),
        elsewhere: SocketAddr::new(addr::SERVER2_V4.into(), 6000),
        external_ip: addr::FW_OUTSIDE_V4.into(),
        unspecified: "0.0.0.0:0".parse().unwrap(),
    }
}

fn v6() -> Family {
    Family {
        proxy: SocketAddr::new(addr::FW_INSIDE_V6.into(), 1080),
        client: SocketAddr::new(addr::CLIENT_V6.into(), 5000),
        remote: SocketAddr::new(addr::SERVER_V6.into(), 6000),
        elsewhere: SocketAddr::new(addr::SERVER2_V6.into(), 6000),
        external_ip: addr::FW_OUTSIDE_V6.into(),
        unspecified: "[::]:0".parse().unwrap(),
    }
}

/// ATYP, address and port of a SOCKS address.
fn address_bytes(addr: SocketAddr) -> Vec<u8> {
    let mut out = Vec::new();
    match addr.ip() {
        IpAddr::V4(ip) => {
            out.push(1);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
    out
}

/// A control packet `01 SIZE CMD FLAGS RSVD TID AID LOCAL REMOTE` (protocol.md section 3).
fn control(
    cmd: u8,
    flags: u16,
    tid: u16,
    aid: u32,
    local: SocketAddr,
    remote: SocketAddr,
) -> Vec<u8> {
    let mut body = vec![cmd];
    body.extend_from_slice(&flags.to_be_bytes());
    body.push(0);
    body.extend_from_slice(&tid.to_be_bytes());
    body.extend_from_slice(&aid.to_be_bytes());
    body.extend(address_bytes(local));
    body.extend(address_bytes(remote));
    let size = u16::try_from(body.len() + 3).unwrap();
    let mut packet = vec![0x01];
    packet.extend_from_slice(&size.to_be_bytes());
    packet.extend(body);
    packet
}

#[derive(Debug)]
struct Reply {
    code: u8,
    flags: u16,
    aid: u32,
    external: SocketAddr,
}

fn parse_address(bytes: &[u8]) -> (SocketAddr, usize) {
    let (ip, len): (IpAddr, usize) = match bytes[0] {
        1 => (<[u8; 4]>::try_from(&bytes[1..5]).unwrap().into(), 4),
        4 => (<[u8; 16]>::try_from(&bytes[1..17]).unwrap().into(), 16),
        other => panic!("ATYP {other} in a reply"),
    };
    let port = u16::from_be_bytes([bytes[1 + len], bytes[2 + len]]);
    (SocketAddr::new(ip, port), 3 + len)
}

fn read_reply(control: &mut TcpStream) -> Reply {
    let mut head = [0u8; 3];
    control.read_exact(&mut head).unwrap();
    assert_eq!(head[0], 0x02, "a control reply");
    let mut rest = vec![0u8; usize::from(u16::from_be_bytes([head[1], head[2]])) - 3];
    control.read_exact(&mut rest).unwrap();
    let (_internal, used) = parse_address(&rest[10..]);
    let (external, _) = parse_address(&rest[10 + used..]);
    Reply {
        code: rest[0],
        flags: u16::from_be_bytes([rest[1], rest[2]]),
        aid: u32::from_be_bytes([rest[6], rest[7], rest[8], rest[9]]),
        external,
    }
}

/// A control connection from `client`, greeted without authentication and in the enhanced mode.
fn enter(setup: &Setup, proxy: SocketAddr) -> TcpStream {
    let mut control = setup
        .bed
        .client
        .run(move || TcpStream::connect_timeout(&proxy, Duration::from_secs(5)).unwrap())
        .unwrap();
    control.set_read_timeout(Some(WAIT * time_scale())).unwrap();
    control.write_all(&[5, 1, 0]).unwrap();
    let mut selection = [0u8; 2];
    control.read_exact(&mut selection).unwrap();
    assert_eq!(selection, [5, 0]);
    control.write_all(&[5, 4, 0, 1, 0, 0, 0, 0, 0, 0]).unwrap();
    let mut entered = [0u8; 10];
    control.read_exact(&mut entered).unwrap();
    assert_eq!(entered[1], 0, "enhanced mode entered");
    control
}

/// Step 1 and step 2 with RAW, as the preload shim does them: RAW echoed both times.
fn two_step_raw(control: &mut TcpStream, family: &Family, tid: u16) -> Reply {
    let flags = RSU | RAW;
    control
        .write_all(&self::control(
            BIND,
            flags,
            tid,
            0,
            family.client,
            family.unspecified,
        ))
        .unwrap();
    let first = read_reply(control);
    assert_eq!(first.code, 0, "{first:?}");
    assert_eq!(
        first.flags,
        flags | REMOTE_PENDING,
        "RAW provisional in step 1: {first:?}"
    );
    assert_eq!(first.external.ip(), family.external_ip);
    control
        .write_all(&self::control(
            BIND,
            flags,
            tid,
            first.aid,
            family.client,
            family.remote,
        ))
        .unwrap();
    let second = read_reply(control);
    assert_eq!(second.code, 0, "{second:?}");
    assert_eq!(second.flags, flags, "RAW granted: {second:?}");
    assert_eq!((second.aid, second.external), (first.aid, first.external));
    second
}

/// Receives one datagram within the bed's bounds.
fn recv(socket: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = [0u8; 2048];
    let (len, from) = socket.recv_from(&mut buf).expect("a datagram arrives");
    (buf[..len].to_vec(), from)
}

fn nothing_queued(socket: &UdpSocket) -> bool {
    socket.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    let empty =
        matches!(socket.recv_from(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
    socket.set_nonblocking(false).unwrap();
    empty
}

fn raw_socket_sees_the_remote_as_its_peer(family: &Family) {
    let setup = setup();
    let remote = setup.server_socket(family.remote);
    let elsewhere = setup.server_socket(family.elsewhere);
    let client = setup.client_socket(family.client);
    let mut control = enter(&setup, family.proxy);
    let reply = two_step_raw(&mut control, family, 0x0a01);
    for i in 0..20 {
        let payload = format!("media {i:02}").into_bytes();
        remote.send_to(&payload, reply.external).unwrap();
        let (got, from) = recv(&client);
        assert_eq!(from, family.remote, "recvfrom reports the remote itself");
        assert_eq!(got, payload, "no header, not a byte changed");
        let answer = format!("report {i:02}").into_bytes();
        client.send_to(&answer, family.remote).unwrap();
        let (got, from) = recv(&remote);
        assert_eq!(
            from, reply.external,
            "the reply leaves from the external relay"
        );
        assert_eq!(got, answer);
    }
    // The RAW socket to another outside host: dropped and counted, nothing arrives there.
    let before = setup.counted(ExitReason::RawToOtherDestination);
    client.send_to(b"leak", family.elsewhere).unwrap();
    assert!(wait_until(WAIT, || {
        setup.counted(ExitReason::RawToOtherDestination) > before
    }));
    assert!(nothing_queued(&elsewhere), "nothing reached the other host");
    assert!(setup.counted(ExitReason::KernelRelayedRawInbound) >= 20);
    assert!(setup.counted(ExitReason::KernelRelayedRawOutbound) >= 20);
    assert_eq!(
        setup.counted(ExitReason::BindingToUserspace),
        0,
        "all in the kernel"
    );
    assert_eq!(setup.counted(ExitReason::OutboundToUserspace), 0);
}

#[test]
fn ipv4_raw_socket_sees_the_remote_as_its_peer() {
    raw_socket_sees_the_remote_as_its_peer(&v4());
}

#[test]
fn ipv6_raw_socket_sees_the_remote_as_its_peer() {
    raw_socket_sees_the_remote_as_its_peer(&v6());
}

/// Sends probes from `remote` to `external` until one is dropped for `reason` (the entries went)
/// instead of delivered, each accounted for before the next; how long after `since` that was.
fn probe_until_dropped(
    setup: &Setup,
    remote: &UdpSocket,
    client: &UdpSocket,
    external: SocketAddr,
    reason: ExitReason,
    since: Instant,
    within: Duration,
) -> Duration {
    client
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let mut buf = [0u8; 64];
    loop {
        let elapsed = since.elapsed();
        assert!(
            elapsed <= within * time_scale(),
            "still delivered {elapsed:?} later"
        );
        let before = setup.counted(reason);
        remote.send_to(b"probe", external).unwrap();
        let mut delivered = false;
        let accounted = wait_until(WAIT, || {
            delivered = delivered || client.recv_from(&mut buf).is_ok();
            delivered || setup.counted(reason) > before
        });
        assert!(
            accounted,
            "a probe was neither delivered nor dropped for {reason:?}"
        );
        if !delivered {
            client.set_read_timeout(Some(WAIT * time_scale())).unwrap();
            return elapsed;
        }
    }
}

#[test]
fn release_close_and_sigkill_stop_raw_delivery() {
    let mut setup = setup();
    let family = v4();
    let remote = setup.server_socket(family.remote);
    let client = setup.client_socket(family.client);

    // UDP RELEASE.
    let mut control = enter(&setup, family.proxy);
    let reply = two_step_raw(&mut control, &family, 0x0b01);
    remote.send_to(b"bound", reply.external).unwrap();
    assert_eq!(recv(&client).0, b"bound");
    control
        .write_all(&self::control(
            RELEASE,
            0,
            0x0b01,
            reply.aid,
            family.client,
            family.unspecified,
        ))
        .unwrap();
    assert_eq!(read_reply(&mut control).code, 0, "released");
    let before = setup.counted(ExitReason::NoBinding);
    remote.send_to(b"after release", reply.external).unwrap();
    assert!(wait_until(WAIT, || setup.counted(ExitReason::NoBinding) > before));
    assert!(nothing_queued(&client));

    // Connection close: the same flow again (a released flow is free), then the TCP closes.
    let reply = two_step_raw(&mut control, &family, 0x0b02);
    remote.send_to(b"bound again", reply.external).unwrap();
    assert_eq!(recv(&client).0, b"bound again");
    drop(control);
    let closed = Instant::now();
    let after = probe_until_dropped(
        &setup,
        &remote,
        &client,
        reply.external,
        ExitReason::NoBinding,
        closed,
        WAIT,
    );
    println!("delivery stopped {after:?} after the connection closed");

    // SIGKILL: the kernel entries stay, the stale heartbeat fails them closed both ways.
    let mut control = enter(&setup, family.proxy);
    let reply = two_step_raw(&mut control, &family, 0x0b03);
    remote.send_to(b"before the kill", reply.external).unwrap();
    assert_eq!(recv(&client).0, b"before the kill");
    setup.gateway.kill();
    let killed = Instant::now();
    let after = probe_until_dropped(
        &setup,
        &remote,
        &client,
        reply.external,
        ExitReason::DaemonGone,
        killed,
        FAIL_CLOSED_WITHIN,
    );
    println!("delivery stopped {after:?} after SIGKILL");
    let gone = setup.counted(ExitReason::DaemonGone);
    client
        .send_to(b"out after the kill", family.remote)
        .unwrap();
    assert!(
        wait_until(WAIT, || setup.counted(ExitReason::DaemonGone) > gone),
        "the client's datagram to the remote is dropped too"
    );
    assert!(nothing_queued(&remote));
}

/// UDP checksum errors the namespace's stack has counted (`InCsumErrors` of IPv4 and IPv6).
fn checksum_errors(ns: &testbed::Netns) -> u64 {
    ns.run(|| {
        let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap();
        let udp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Udp:")).collect();
        let names: Vec<&str> = udp[0].split_whitespace().collect();
        let values: Vec<&str> = udp[1].split_whitespace().collect();
        let at = names.iter().position(|n| *n == "InCsumErrors").unwrap();
        let v4: u64 = values[at].parse().unwrap();
        let snmp6 = std::fs::read_to_string("/proc/thread-self/net/snmp6").unwrap();
        let v6: u64 = snmp6
            .lines()
            .find_map(|l| l.strip_prefix("Udp6InCsumErrors"))
            .map_or(0, |v| v.trim().parse().unwrap());
        v4 + v6
    })
    .unwrap()
}

/// Senders that leave the UDP checksum to the device (veth, containers and VMs with tx offload:
/// `CHECKSUM_PARTIAL` skbs) on both sides. RAW changes no length, so the kernel relays them with
/// the partial checksum kept right; `fw`'s own interfaces complete checksums in software here
/// (tx offload off), so the receivers verify every one of them.
fn partial_checksums_are_relayed_in_the_kernel(family: &Family) {
    let setup = setup();
    setup
        .bed
        .server
        .set_tx_checksum_offload(testbed::iface::HOST, true)
        .unwrap();
    setup
        .bed
        .client
        .set_tx_checksum_offload(testbed::iface::HOST, true)
        .unwrap();
    setup
        .bed
        .fw
        .set_tx_checksum_offload(testbed::iface::FW_INSIDE, false)
        .unwrap();
    setup
        .bed
        .fw
        .set_tx_checksum_offload(testbed::iface::FW_OUTSIDE, false)
        .unwrap();
    let errors_before = checksum_errors(&setup.bed.client) + checksum_errors(&setup.bed.server);
    let remote = setup.server_socket(family.remote);
    let client = setup.client_socket(family.client);
    let mut control = enter(&setup, family.proxy);
    let reply = two_step_raw(&mut control, family, 0x0c01);
    for i in 0..50 {
        let payload: Vec<u8> = (0..=255u8).cycle().skip(i).take(200 + i).collect();
        remote.send_to(&payload, reply.external).unwrap();
        let (got, from) = recv(&client);
        assert_eq!((got, from), (payload.clone(), family.remote));
        client.send_to(&payload, family.remote).unwrap();
        assert_eq!(recv(&remote), (payload, reply.external));
    }
    assert_eq!(
        checksum_errors(&setup.bed.client) + checksum_errors(&setup.bed.server),
        errors_before,
        "every checksum completed from the partial state was right"
    );
    assert!(setup.counted(ExitReason::KernelRelayedRawInbound) >= 50);
    assert!(setup.counted(ExitReason::KernelRelayedRawOutbound) >= 50);
    assert_eq!(setup.counted(ExitReason::PartialChecksumToUserspace), 0);
    assert_eq!(setup.counted(ExitReason::BindingToUserspace), 0);

    // The control: the same sender through a header binding (another client port) does carry
    // partial checksums, which that path hands to user space.
    let header_client = SocketAddr::new(family.client.ip(), 5002);
    let header_socket = setup.client_socket(header_client);
    control
        .write_all(&self::control(
            BIND,
            RSU,
            0,
            0,
            header_client,
            family.remote,
        ))
        .unwrap();
    let header = read_reply(&mut control);
    assert_eq!((header.code, header.flags & RAW), (0, 0), "{header:?}");
    remote.send_to(b"framed", header.external).unwrap();
    let (got, _) = recv(&header_socket);
    assert_eq!(&got[8..], b"framed", "delivered with the 8-octet header");
    assert_eq!(setup.counted(ExitReason::PartialChecksumToUserspace), 1);
}

#[test]
fn ipv4_partial_checksums_are_relayed_in_the_kernel() {
    partial_checksums_are_relayed_in_the_kernel(&v4());
}

#[test]
fn ipv6_partial_checksums_are_relayed_in_the_kernel() {
    partial_checksums_are_relayed_in_the_kernel(&v6());
}

/// A RAW datagram too big for the internal link (an internal MTU below the external one): the
/// kernel hands it to the userspace relay, which sends it from the remote's own address through
/// a transparent socket, fragmented by IP; the client sees it whole, from the remote.
#[test]
fn raw_datagrams_too_big_for_the_internal_link_go_through_user_space() {
    let setup = setup();
    testbed::run_checked(setup.bed.fw.command("ip").args([
        "link",
        "set",
        testbed::iface::FW_INSIDE,
        "mtu",
        "1280",
    ]))
    .unwrap();
    let family = v4();
    let remote = setup.server_socket(family.remote);
    let client = setup.client_socket(family.client);
    let mut control = enter(&setup, family.proxy);
    let reply = two_step_raw(&mut control, &family, 0x0d01);
    let big: Vec<u8> = (0..1400u32).map(|i| (i % 251) as u8).collect();
    remote.send_to(&big, reply.external).unwrap();
    assert_eq!(
        recv(&client),
        (big, family.remote),
        "whole, from the remote"
    );
    remote.send_to(b"small", reply.external).unwrap();
    assert_eq!(recv(&client), (b"small".to_vec(), family.remote));
    assert_eq!(setup.counted(ExitReason::TooBigForKernelRelay), 1);
    assert_eq!(setup.counted(ExitReason::KernelRelayedRawInbound), 1);
}

/// With `--datapath userspace` a RAW client's datagrams (addressed to the remote) would never
/// reach a relay socket, so RAW is not granted and the binding uses the header.
#[test]
fn the_userspace_datapath_does_not_grant_raw() {
    let bed = Testbed::new().unwrap();
    let (gateway, cleanup) = start_in_fw(&bed, &["--datapath", "userspace"]).unwrap();
    let setup = Setup {
        gateway,
        cleanup,
        bed,
    };
    let family = v4();
    let mut control = enter(&setup, family.proxy);
    control
        .write_all(&self::control(
            BIND,
            RSU | RAW,
            0,
            0,
            family.client,
            family.remote,
        ))
        .unwrap();
    let reply = read_reply(&mut control);
    assert_eq!(reply.code, 0, "bound: {reply:?}");
    assert_eq!(reply.flags & RAW, 0, "RAW not echoed: {reply:?}");
    assert!(
        setup
            .gateway
            .wait_for_log("RAW not granted: the userspace data path", 1, WAIT),
        "the log says why"
    );
}
