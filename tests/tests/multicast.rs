//! Multicast through the gateway in the test bed (protocol.md section 3): a sender in `server`
//! to a group from 233.252.0.0/24 (or a documentation-scope IPv6 group), subscribers in
//! `client` through the gateway in `fw`. Multicast-to-unicast fanned out by the kernel, one
//! membership however many subscribe; multicast-to-multicast to plain inside sockets; a
//! client's sends with their TTL and SET TTL; the source list; the refusals; fail closed on
//! SIGKILL. Root only.

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

mod common;

use bytes::BytesMut;
use gateway_common::ExitReason;
use gateway_proto::{
    Address,
    enhanced::{ControlReply, ControlRequest, EnhancedReplyCode, Flags, Packet, UdpCommand},
};
use serde_json::Value;
use testbed::{
    Netns, Testbed, addr,
    gateway::{
        GatewayDaemon, InstanceCleanup, gateway_cli, reason_packets, start_in_fw, stats_json,
    },
    iface, run_checked, send_paced, time_scale, wait_until,
};

const PROXY: &str = "198.51.100.1:1080";
const PROXY_V6: &str = "[2001:db8:1::1]:1080";
const GROUP_V4: Ipv4Addr = Ipv4Addr::new(233, 252, 0, 7);
/// A global-scope group in the documentation prefix.
const GROUP_V6: Ipv6Addr = Ipv6Addr::new(0xff0e, 0, 0, 0, 0, 0xdb8, 0, 7);
const PORT: u16 = 5004;
const STREAM: usize = 60;
const WAIT: Duration = Duration::from_secs(5);
const RECV: u16 = 0x0001 | 0x0010;
const SEND: u16 = 0x0002 | 0x0010;
const MU: u16 = 0x0020;
const MM: u16 = 0x0040;

fn group_v4() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(GROUP_V4), PORT)
}

fn group_v6() -> SocketAddr {
    SocketAddr::new(IpAddr::V6(GROUP_V6), PORT)
}

const POLICY: [&str; 10] = [
    "--allow-multicast-receive",
    "233.252.0.0/24",
    "--allow-multicast-receive",
    "ff0e::db8:0:0/96",
    "--allow-multicast-send",
    "233.252.0.0/24",
    "--multicast-max-ttl",
    "16",
    "--multicast-modes",
    "both",
];

struct Setup {
    gateway: GatewayDaemon,
    cleanup: InstanceCleanup,
    bed: Testbed,
}

fn setup(extra: &[&str]) -> Setup {
    let bed = Testbed::new().unwrap();
    bed.add_second_server_address().unwrap();
    // The server sends multicast out of its one link.
    run_checked(
        bed.server
            .command("ip")
            .args(["route", "add", "224.0.0.0/4", "dev", iface::HOST]),
    )
    .unwrap();
    let args: Vec<&str> = POLICY.iter().chain(extra).copied().collect();
    let (gateway, cleanup) = start_in_fw(&bed, &args).unwrap();
    Setup {
        gateway,
        cleanup,
        bed,
    }
}

/// One control connection in the enhanced mode, spoken byte for byte.
struct Control {
    stream: TcpStream,
    buffer: BytesMut,
    next_tid: u16,
}

impl Control {
    fn enter(client: &Netns) -> Self {
        Self::enter_at(client, PROXY)
    }

    fn enter_at(client: &Netns, proxy: &'static str) -> Self {
        let mut stream = client
            .run(move || TcpStream::connect(proxy))
            .unwrap()
            .expect("connect to the gateway");
        stream.set_read_timeout(Some(WAIT * time_scale())).unwrap();
        stream.write_all(&[5, 1, 0]).unwrap();
        let mut method = [0u8; 2];
        stream.read_exact(&mut method).unwrap();
        assert_eq!(method, [5, 0]);
        stream.write_all(&[5, 4, 0, 1, 0, 0, 0, 0, 0, 0]).unwrap();
        let mut entered = [0u8; 10];
        stream.read_exact(&mut entered).unwrap();
        assert_eq!(entered[..2], [1, 0], "enhanced mode entered");
        Self {
            stream,
            buffer: BytesMut::new(),
            next_tid: 1,
        }
    }

    fn request(&mut self, request: &ControlRequest) -> ControlReply {
        let mut out = BytesMut::new();
        request.encode(&mut out).unwrap();
        self.stream.write_all(&out).unwrap();
        loop {
            if let Some(packet) = Packet::decode(&mut self.buffer).unwrap() {
                let Packet::Reply(reply) = packet else {
                    panic!("not a reply: {packet:?}");
                };
                return reply;
            }
            let mut chunk = [0u8; 512];
            let n = self.stream.read(&mut chunk).expect("a reply in time");
            assert!(n > 0, "the gateway closed the control connection");
            self.buffer.extend_from_slice(&chunk[..n]);
        }
    }

    fn bind(&mut self, local: SocketAddr, group: SocketAddr, flags: u16, ttl: u8) -> ControlReply {
        let tid = self.next_tid;
        self.next_tid += 1;
        self.request(&ControlRequest {
            command: UdpCommand::Bind,
            flags: Flags::from_bits_retain(flags),
            ttl,
            tid,
            aid: 0,
            local: local.into(),
            remote: group.into(),
        })
    }

    fn command(&mut self, command: UdpCommand, aid: u32, ttl: u8) -> EnhancedReplyCode {
        self.request(&ControlRequest {
            command,
            flags: Flags::empty(),
            ttl,
            tid: 0,
            aid,
            local: Address::UNSPECIFIED_V4,
            remote: Address::UNSPECIFIED_V4,
        })
        .code
    }
}

fn ip_of(address: &Address) -> SocketAddr {
    match address {
        Address::Ip(addr) => *addr,
        Address::Domain(..) => panic!("a domain in a reply"),
    }
}

/// A subscriber's socket in `client`.
fn client_socket(bed: &Testbed, ip: IpAddr) -> UdpSocket {
    bed.client
        .udp_socket(
            &SocketAddr::new(ip, 0).to_string(),
            Duration::from_millis(300),
        )
        .unwrap()
}

/// A sender in `server`, from `source`, with multicast TTL 4.
fn sender(bed: &Testbed, source: IpAddr) -> UdpSocket {
    let socket = bed
        .server
        .udp_socket(&SocketAddr::new(source, 0).to_string(), WAIT)
        .unwrap();
    match source {
        IpAddr::V4(_) => socket.set_multicast_ttl_v4(4).unwrap(),
        IpAddr::V6(_) => {
            let hops: libc::c_int = 4;
            // SAFETY: a valid socket and an int that outlives the call.
            let rc = unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::IPPROTO_IPV6,
                    libc::IPV6_MULTICAST_HOPS,
                    (&raw const hops).cast(),
                    4,
                )
            };
            assert_eq!(rc, 0, "IPV6_MULTICAST_HOPS");
        }
    }
    socket
}

fn payload(tag: u8, i: usize) -> Vec<u8> {
    let mut data = vec![tag];
    data.extend_from_slice(&u32::try_from(i).unwrap().to_be_bytes());
    data.resize(200, 0xa5);
    data
}

/// Receives until `count` datagrams arrived or nothing came for a while; each as (AID of the
/// header, tag, sequence number).
fn receive_framed(socket: &UdpSocket, count: usize) -> Vec<(u32, u8, u32)> {
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + WAIT * time_scale();
    while got.len() < count && Instant::now() < deadline {
        let Ok(n) = socket.recv(&mut buf) else {
            continue;
        };
        assert!(n >= 8 + 5, "a framed datagram");
        assert_eq!(buf[..4], [0, 0, 0, 0], "RSV, FRAG and DGID zero");
        let aid = u32::from_be_bytes(buf[4..8].try_into().unwrap());
        let seq = u32::from_be_bytes(buf[9..13].try_into().unwrap());
        got.push((aid, buf[8], seq));
    }
    got
}

/// Everything that arrives within `quiet` (nothing more expected).
fn drain(socket: &UdpSocket, quiet: Duration) -> usize {
    let mut buf = [0u8; 2048];
    let mut n = 0;
    let deadline = Instant::now() + quiet;
    while Instant::now() < deadline {
        if socket.recv(&mut buf).is_ok() {
            n += 1;
        }
    }
    n
}

fn bindings_json(setup: &Setup) -> Value {
    let out = gateway_cli(
        &setup.bed.fw,
        &["bindings", "--json", "--instance", &setup.gateway.instance],
    )
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn stat(setup: &Setup, reason: &str) -> u64 {
    reason_packets(
        &stats_json(&setup.bed.fw, &setup.gateway.instance).unwrap(),
        reason,
    )
}

/// How many memberships of `group` the external interface holds (`ip maddr`).
fn memberships(bed: &Testbed, group: IpAddr) -> usize {
    let out = run_checked(
        bed.fw
            .command("ip")
            .args(["maddr", "show", "dev", iface::FW_OUTSIDE]),
    )
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let needle = group.to_string();
    text.lines()
        .filter(|line| line.split_whitespace().nth(1) == Some(needle.as_str()))
        .count()
}

/// Three clients subscribe (multicast-to-unicast) and get one stream with their own AIDs; the
/// kernel delivers to the first `in_kernel`, the userspace relay to the rest.
fn three_subscribers(
    setup: &Setup,
    group: SocketAddr,
    client_ip: IpAddr,
    source: IpAddr,
    in_kernel: usize,
) {
    three_subscribers_in_table(setup, group, client_ip, source, in_kernel, true);
}

/// [`three_subscribers`] where the first `in_kernel` are in the kernel's table, and the kernel
/// delivers to them only if `kernel_delivers` (else it hands every datagram up whole).
fn three_subscribers_in_table(
    setup: &Setup,
    group: SocketAddr,
    client_ip: IpAddr,
    source: IpAddr,
    in_table: usize,
    kernel_delivers: bool,
) {
    let in_kernel = if kernel_delivers { in_table } else { 0 };
    let bed = &setup.bed;
    let proxy = if client_ip.is_ipv6() { PROXY_V6 } else { PROXY };
    let mut controls: Vec<Control> = (0..3)
        .map(|_| Control::enter_at(&bed.client, proxy))
        .collect();
    let sockets: Vec<UdpSocket> = (0..3).map(|_| client_socket(bed, client_ip)).collect();
    let mut aids = Vec::new();
    for (control, socket) in controls.iter_mut().zip(&sockets) {
        let reply = control.bind(socket.local_addr().unwrap(), group, RECV | MU, 0);
        assert_eq!(reply.code, EnhancedReplyCode::Succeeded, "{reply:?}");
        assert_eq!(reply.flags.bits() & (MU | MM), MU, "the mode is echoed");
        assert_eq!(
            ip_of(&reply.remote),
            group,
            "REMOTE of the reply is the group"
        );
        aids.push(reply.aid);
    }
    assert!(
        wait_until(WAIT, || memberships(bed, group.ip()) == 1),
        "one membership on the external interface however many subscribe"
    );
    let kernel_before = stat(setup, "kernel_relayed_multicast");
    let to_userspace_before = stat(setup, "multicast_to_userspace");
    let server = sender(bed, source);
    send_paced(&server, group, STREAM, |i| payload(1, i));
    for (socket, aid) in sockets.iter().zip(&aids) {
        let got = receive_framed(socket, STREAM);
        assert_eq!(got.len(), STREAM, "every datagram to subscriber {aid:#x}");
        assert!(
            got.iter().all(|(a, tag, _)| a == aid && *tag == 1),
            "its own AID"
        );
        let seqs: BTreeSet<u32> = got.iter().map(|(_, _, seq)| *seq).collect();
        assert_eq!(seqs.len(), STREAM, "each exactly once");
        assert_eq!(drain(socket, Duration::from_millis(300)), 0, "no duplicate");
    }
    let kernel = stat(setup, "kernel_relayed_multicast") - kernel_before;
    assert_eq!(kernel, (in_kernel * STREAM) as u64, "the kernel's copies");
    let to_userspace = stat(setup, "multicast_to_userspace") - to_userspace_before;
    if in_kernel == 3 {
        assert_eq!(to_userspace, 0, "nothing went up to the userspace relay");
    } else if in_kernel == 0 {
        // The datagram itself goes up: no copy.
        assert_eq!(to_userspace, STREAM as u64, "every datagram went up once");
    } else {
        // Counted when the fan-out hands the copy up and again when it passes the program on
        // its way to the stack.
        assert_eq!(
            to_userspace,
            2 * STREAM as u64,
            "one copy up for the rest, per datagram"
        );
    }
    let doc = bindings_json(setup);
    let groups = doc["multicast_groups"].as_array().unwrap();
    let entry = groups
        .iter()
        .find(|g| g["group"] == group.to_string())
        .expect("the group is listed");
    let members = entry["members"].as_array().unwrap();
    assert_eq!(members.len(), 3);
    let kernel_members = members.iter().filter(|m| m["in_kernel"] == true).count();
    assert_eq!(kernel_members, in_table, "{members:?}");
    for member in members {
        let (kernel, userspace) = if member["in_kernel"] == true && kernel_delivers {
            (STREAM as u64, 0)
        } else {
            (0, STREAM as u64)
        };
        assert_eq!(member["kernel_packets"], kernel, "{member}");
        assert_eq!(member["userspace_packets"], userspace, "{member}");
    }
    // Release one, close the others: the membership goes with the last.
    assert_eq!(
        controls[0].command(UdpCommand::Release, aids[0], 0),
        EnhancedReplyCode::Succeeded
    );
    assert_eq!(memberships(bed, group.ip()), 1, "two subscribers remain");
    drop(controls);
    assert!(
        wait_until(WAIT, || memberships(bed, group.ip()) == 0),
        "the group is left after the last subscriber"
    );
    send_paced(&server, group, 10, |i| payload(2, i));
    for socket in &sockets {
        assert_eq!(
            drain(socket, Duration::from_millis(500)),
            0,
            "nothing after the release"
        );
    }
}

#[test]
fn three_subscribers_get_every_datagram_once_with_their_own_aid_fanned_out_by_the_kernel() {
    let setup = setup(&[]);
    three_subscribers(
        &setup,
        group_v4(),
        IpAddr::V4(addr::CLIENT_V4),
        IpAddr::V4(addr::SERVER_V4),
        3,
    );
}

#[test]
fn with_the_userspace_data_path_the_relay_serves_every_subscriber_once() {
    let setup = setup(&["--datapath", "userspace"]);
    three_subscribers(
        &setup,
        group_v4(),
        IpAddr::V4(addr::CLIENT_V4),
        IpAddr::V4(addr::SERVER_V4),
        0,
    );
}

/// A sender whose stack leaves the UDP checksum to the NIC (a container or VM host hands the
/// gateway `CHECKSUM_PARTIAL` skbs): the kernel cannot fan those out with right checksums, so the
/// userspace relay serves every subscriber, each datagram once and intact.
#[test]
fn a_container_senders_partial_checksums_reach_every_subscriber_from_user_space() {
    let setup = setup(&[]);
    setup
        .bed
        .server
        .set_tx_checksum_offload(iface::HOST, true)
        .unwrap();
    three_subscribers_in_table(
        &setup,
        group_v4(),
        IpAddr::V4(addr::CLIENT_V4),
        IpAddr::V4(addr::SERVER_V4),
        3,
        false,
    );
}

#[test]
fn an_ipv6_group_is_fanned_out_by_the_kernel_too() {
    let setup = setup(&[]);
    three_subscribers(
        &setup,
        group_v6(),
        IpAddr::V6(addr::CLIENT_V6),
        IpAddr::V6(addr::SERVER_V6),
        3,
    );
}

#[test]
fn subscribers_beyond_the_kernels_table_are_served_by_the_userspace_relay_once() {
    let setup = setup(&["--multicast-kernel-subscribers", "1"]);
    three_subscribers(
        &setup,
        group_v4(),
        IpAddr::V4(addr::CLIENT_V4),
        IpAddr::V4(addr::SERVER_V4),
        1,
    );
}

/// A plain multicast socket in `client` joined to the group on its link.
fn inside_receiver(bed: &Testbed) -> UdpSocket {
    let socket = bed
        .client
        .run(|| {
            let socket = nix::sys::socket::socket(
                nix::sys::socket::AddressFamily::Inet,
                nix::sys::socket::SockType::Datagram,
                nix::sys::socket::SockFlag::empty(),
                None,
            )
            .unwrap();
            nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::ReuseAddr, &true)
                .unwrap();
            let bind_to =
                nix::sys::socket::SockaddrIn::from(std::net::SocketAddrV4::new(GROUP_V4, PORT));
            nix::sys::socket::bind(socket.as_raw_fd(), &bind_to).unwrap();
            let socket = UdpSocket::from(socket);
            socket
                .join_multicast_v4(&GROUP_V4, &addr::CLIENT_V4)
                .unwrap();
            socket
        })
        .unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    socket
}

#[test]
fn multicast_to_multicast_reaches_plain_inside_sockets_only_while_a_bind_asks_for_it() {
    let setup = setup(&[]);
    let bed = &setup.bed;
    let receivers = [inside_receiver(bed), inside_receiver(bed)];
    let server = sender(bed, IpAddr::V4(addr::SERVER_V4));
    send_paced(&server, group_v4(), 10, |i| payload(1, i));
    for receiver in &receivers {
        assert_eq!(
            drain(receiver, Duration::from_millis(500)),
            0,
            "nothing before the bind"
        );
    }
    let mut control = Control::enter(&bed.client);
    let local = SocketAddr::new(IpAddr::V4(addr::CLIENT_V4), 0);
    let reply = control.bind(local, group_v4(), RECV | MM, 0);
    assert_eq!(reply.code, EnhancedReplyCode::Succeeded, "{reply:?}");
    assert_eq!(reply.flags.bits() & (MU | MM), MM);
    let before = stat(&setup, "kernel_relayed_multicast_inside");
    send_paced(&server, group_v4(), STREAM, |i| payload(2, i));
    for receiver in &receivers {
        let mut seqs = BTreeSet::new();
        let mut buf = [0u8; 2048];
        let deadline = Instant::now() + WAIT * time_scale();
        while seqs.len() < STREAM && Instant::now() < deadline {
            if let Ok((n, from)) = receiver.recv_from(&mut buf) {
                assert_eq!(n, 200, "no header");
                assert_eq!(buf[0], 2);
                assert_eq!(
                    from.ip(),
                    IpAddr::V4(addr::FW_INSIDE_V4),
                    "re-sent by the gateway"
                );
                seqs.insert(u32::from_be_bytes(buf[1..5].try_into().unwrap()));
            }
        }
        assert_eq!(seqs.len(), STREAM, "the whole stream inside");
    }
    assert_eq!(
        stat(&setup, "kernel_relayed_multicast_inside") - before,
        STREAM as u64,
        "re-sent by the kernel, once per datagram"
    );
    assert_eq!(
        control.command(UdpCommand::Release, reply.aid, 0),
        EnhancedReplyCode::Succeeded
    );
    assert!(wait_until(WAIT, || memberships(bed, GROUP_V4.into()) == 0));
    send_paced(&server, group_v4(), 10, |i| payload(3, i));
    for receiver in &receivers {
        assert_eq!(
            drain(receiver, Duration::from_millis(500)),
            0,
            "nothing after the release"
        );
    }
}

/// A receiver in `server` joined to the group; reports each datagram's TTL.
fn ttl_receiver(bed: &Testbed) -> UdpSocket {
    let socket = bed
        .server
        .run(|| {
            let socket = UdpSocket::bind(SocketAddr::new(IpAddr::V4(GROUP_V4), PORT)).unwrap();
            socket
                .join_multicast_v4(&GROUP_V4, &addr::SERVER_V4)
                .unwrap();
            nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Ipv4RecvTtl, &true)
                .unwrap();
            socket
        })
        .unwrap();
    socket.set_read_timeout(Some(WAIT * time_scale())).unwrap();
    socket
}

fn recv_with_ttl(socket: &UdpSocket) -> (Vec<u8>, SocketAddr, u8) {
    let mut buf = [0u8; 2048];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!(libc::c_int);
    let msg = nix::sys::socket::recvmsg::<nix::sys::socket::SockaddrIn>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        nix::sys::socket::MsgFlags::empty(),
    )
    .expect("a datagram at the receiver in server");
    let mut ttl = None;
    for cmsg in msg.cmsgs().unwrap() {
        if let nix::sys::socket::ControlMessageOwned::Ipv4Ttl(t) = cmsg {
            ttl = u8::try_from(t).ok();
        }
    }
    let from = SocketAddr::from(std::net::SocketAddrV4::from(msg.address.unwrap()));
    let n = msg.bytes;
    (buf[..n].to_vec(), from, ttl.expect("the TTL"))
}

#[test]
fn a_clients_sends_leave_as_multicast_with_its_ttl_and_reach_the_other_subscribers() {
    let setup = setup(&[]);
    let bed = &setup.bed;
    let receiver = ttl_receiver(bed);
    let mut control = Control::enter(&bed.client);
    let socket = client_socket(bed, IpAddr::V4(addr::CLIENT_V4));
    let over = control.bind(socket.local_addr().unwrap(), group_v4(), SEND, 17);
    assert_eq!(
        over.code,
        EnhancedReplyCode::TtlNotAllowed,
        "over the maximum: 15"
    );
    let reply = control.bind(socket.local_addr().unwrap(), group_v4(), SEND, 5);
    assert_eq!(reply.code, EnhancedReplyCode::Succeeded, "{reply:?}");
    let relay = ip_of(&reply.local);
    // Another client subscribes (MU): the sender's datagrams reach it too.
    let mut listener_control = Control::enter(&bed.client);
    let listener = client_socket(bed, IpAddr::V4(addr::CLIENT_V4));
    let sub = listener_control.bind(listener.local_addr().unwrap(), group_v4(), RECV | MU, 0);
    assert_eq!(sub.code, EnhancedReplyCode::Succeeded);
    let framed = |ttl_tag: u8| {
        let mut data = vec![0, 0, 0, 0];
        data.extend_from_slice(&reply.aid.to_be_bytes());
        data.extend_from_slice(&payload(ttl_tag, 0));
        data
    };
    socket.send_to(&framed(5), relay).unwrap();
    let (data, from, ttl) = recv_with_ttl(&receiver);
    assert_eq!(data, payload(5, 0), "the payload, without the header");
    assert_eq!(from.ip(), IpAddr::V4(addr::FW_OUTSIDE_V4));
    assert_eq!(ttl, 5, "the binding's TTL");
    let got = receive_framed(&listener, 1);
    assert_eq!(
        got,
        vec![(sub.aid, 5, 0)],
        "the other subscriber got it, with its AID"
    );

    assert_eq!(
        control.command(UdpCommand::SetTtl, reply.aid, 9),
        EnhancedReplyCode::Succeeded
    );
    socket.send_to(&framed(9), relay).unwrap();
    let (data, _, ttl) = recv_with_ttl(&receiver);
    assert_eq!(data, payload(9, 0));
    assert_eq!(ttl, 9, "SET TTL took effect");
    assert_eq!(
        control.command(UdpCommand::SetTtl, reply.aid, 17),
        EnhancedReplyCode::TtlNotAllowed
    );
    assert_eq!(
        control.command(UdpCommand::SetTtl, sub.aid, 3),
        EnhancedReplyCode::BadAssociationId,
        "another connection's binding"
    );
    assert_eq!(
        listener_control.command(UdpCommand::SetTtl, sub.aid, 3),
        EnhancedReplyCode::BadAssociationContext,
        "not a send binding"
    );
}

#[test]
fn a_second_sender_off_the_source_list_is_dropped_and_counted() {
    let source_list = format!("{}={}", GROUP_V4, addr::SERVER_V4);
    let setup = setup(&["--multicast-sources", &source_list]);
    let bed = &setup.bed;
    let mut control = Control::enter(&bed.client);
    let socket = client_socket(bed, IpAddr::V4(addr::CLIENT_V4));
    let reply = control.bind(socket.local_addr().unwrap(), group_v4(), RECV, 0);
    assert_eq!(reply.code, EnhancedReplyCode::Succeeded);
    let allowed = sender(bed, IpAddr::V4(addr::SERVER_V4));
    let intruder = sender(bed, IpAddr::V4(addr::SERVER2_V4));
    let before = stat(&setup, "multicast_source_not_allowed");
    for i in 0..STREAM {
        allowed.send_to(&payload(1, i), group_v4()).unwrap();
        intruder.send_to(&payload(9, i), group_v4()).unwrap();
        if i % 20 == 19 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let got = receive_framed(&socket, STREAM);
    assert_eq!(got.len(), STREAM);
    assert!(
        got.iter()
            .all(|(aid, tag, _)| *aid == reply.aid && *tag == 1),
        "only the listed source"
    );
    assert_eq!(drain(&socket, Duration::from_millis(300)), 0);
    assert!(
        wait_until(WAIT, || stat(&setup, "multicast_source_not_allowed")
            - before
            == STREAM as u64),
        "every intruding datagram counted"
    );
}

#[test]
fn refusals_follow_the_policy() {
    // Receive only (no send prefix), MU only.
    let bed = Testbed::new().unwrap();
    let (gateway, _cleanup) =
        start_in_fw(&bed, &["--allow-multicast-receive", "233.252.0.0/25"]).unwrap();
    let mut control = Control::enter(&bed.client);
    let local = SocketAddr::new(IpAddr::V4(addr::CLIENT_V4), 5000);
    let unicast = SocketAddr::new(IpAddr::V4(addr::SERVER_V4), PORT);
    let outside = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(233, 252, 0, 200)), PORT);
    for (remote, flags, ttl, code, why) in [
        (
            unicast,
            RECV,
            0,
            EnhancedReplyCode::BadMulticastAddress,
            "not a group",
        ),
        (
            outside,
            RECV,
            0,
            EnhancedReplyCode::BadMulticastAddress,
            "outside the prefixes",
        ),
        (
            group_v4(),
            RECV | MM,
            0,
            EnhancedReplyCode::MulticastReceiveNotAllowed,
            "MM not allowed",
        ),
        (
            group_v4(),
            SEND,
            4,
            EnhancedReplyCode::MulticastSendNotAllowed,
            "no send allowed",
        ),
    ] {
        let reply = control.bind(local, remote, flags, ttl);
        assert_eq!(reply.code, code, "{why}");
    }
    // The connection stays usable after refusals, and nothing was joined.
    assert_eq!(memberships(&bed, GROUP_V4.into()), 0);
    let reply = control.bind(local, group_v4(), RECV, 0);
    assert_eq!(reply.code, EnhancedReplyCode::Succeeded);
    drop(gateway);
}

#[test]
fn kill_9_stops_every_groups_delivery_within_3_seconds() {
    let mut setup = setup(&[]);
    let bed = &setup.bed;
    let mut control = Control::enter(&bed.client);
    let socket = client_socket(bed, IpAddr::V4(addr::CLIENT_V4));
    let reply = control.bind(socket.local_addr().unwrap(), group_v4(), RECV | MU, 0);
    assert_eq!(reply.code, EnhancedReplyCode::Succeeded);
    let mm = control.bind(
        SocketAddr::new(IpAddr::V4(addr::CLIENT_V4), 0),
        group_v4(),
        RECV | MM,
        0,
    );
    assert_eq!(mm.code, EnhancedReplyCode::Succeeded);
    let inside = inside_receiver(bed);
    let server = sender(bed, IpAddr::V4(addr::SERVER_V4));
    send_paced(&server, group_v4(), 10, |i| payload(1, i));
    assert_eq!(
        receive_framed(&socket, 10).len(),
        10,
        "delivered while the daemon lives"
    );
    setup.gateway.kill();
    let killed = Instant::now();
    // Keep sending; after 3 s nothing may arrive any more.
    while killed.elapsed() < Duration::from_secs(3) {
        server.send_to(&payload(2, 0), group_v4()).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    drain(&socket, Duration::from_millis(100));
    drain(&inside, Duration::from_millis(100));
    for i in 0..50 {
        server.send_to(&payload(3, i), group_v4()).unwrap();
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(drain(&socket, Duration::from_millis(500)), 0, "MU stopped");
    assert_eq!(drain(&inside, Duration::from_millis(300)), 0, "MM stopped");
    assert!(
        common::pinned_packets(&setup.cleanup, ExitReason::DaemonGone) > 0,
        "dropped as daemon gone"
    );
}

/// The group's source filter on the external interface (`/proc/net/mcfilter`): the sources
/// included (INCLUDE mode, `IGMPv3` source-specific); empty for an any-source join.
fn included_sources(bed: &Testbed, group: Ipv4Addr) -> Vec<Ipv4Addr> {
    let out = run_checked(bed.fw.command("cat").arg("/proc/net/mcfilter")).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let hex = |field: &str| u32::from_str_radix(field.trim_start_matches("0x"), 16).ok();
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // Idx Device MCA SRC INC EXC; the device name is cut to 6 characters.
            (fields.len() == 6
                && iface::FW_OUTSIDE.starts_with(fields[1])
                && hex(fields[2]) == Some(u32::from(group))
                && fields[4] != "0")
                .then(|| hex(fields[3]).map(Ipv4Addr::from))
                .flatten()
        })
        .collect()
}

/// Both servers send `STREAM` datagrams each to the group, interleaved: `tag` from the first,
/// `tag + 1` from the second.
fn two_sources_send(first: &UdpSocket, second: &UdpSocket, tag: u8) {
    for i in 0..STREAM {
        first.send_to(&payload(tag, i), group_v4()).unwrap();
        second.send_to(&payload(tag + 1, i), group_v4()).unwrap();
        if i % 20 == 19 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

fn member_of(setup: &Setup, aid: u32) -> Value {
    let doc = bindings_json(setup);
    doc["multicast_groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["members"].as_array().unwrap().clone())
        .find(|m| m["aid"] == aid)
        .unwrap_or(Value::Null)
}

#[test]
fn a_receive_narrowed_to_one_source_gets_only_it_and_the_join_follows() {
    let setup = setup(&[]);
    let bed = &setup.bed;
    let (first, second) = (addr::SERVER_V4, addr::SERVER2_V4);
    let mut any_control = Control::enter(&bed.client);
    let mut one_control = Control::enter(&bed.client);
    let any_socket = client_socket(bed, IpAddr::V4(addr::CLIENT_V4));
    let one_socket = client_socket(bed, IpAddr::V4(addr::CLIENT_V4));
    let any = any_control.bind(any_socket.local_addr().unwrap(), group_v4(), RECV | MU, 0);
    assert_eq!(any.code, EnhancedReplyCode::Succeeded, "{any:?}");
    let one_local = one_socket.local_addr().unwrap();
    let one = one_control.bind(one_local, group_v4(), RECV | MU, 0);
    assert_eq!(one.code, EnhancedReplyCode::Succeeded, "{one:?}");
    // The second bind with the subscription's TID names its source (port 0).
    let named = one_control.request(&ControlRequest {
        command: UdpCommand::Bind,
        flags: Flags::from_bits_retain(RECV | MU),
        ttl: 0,
        tid: one.tid,
        aid: 0,
        local: one_local.into(),
        remote: SocketAddr::new(IpAddr::V4(first), 0).into(),
    });
    assert_eq!(named.code, EnhancedReplyCode::Succeeded, "{named:?}");
    assert_eq!(named.aid, one.aid, "the same binding");
    assert!(
        wait_until(WAIT, || memberships(bed, IpAddr::V4(GROUP_V4)) == 1),
        "joined"
    );
    assert_eq!(
        included_sources(bed, GROUP_V4),
        Vec::<Ipv4Addr>::new(),
        "an any-source receiver keeps the join any-source"
    );

    let first_sender = sender(bed, IpAddr::V4(first));
    let second_sender = sender(bed, IpAddr::V4(second));
    two_sources_send(&first_sender, &second_sender, 1);
    let got = receive_framed(&any_socket, 2 * STREAM);
    assert_eq!(got.len(), 2 * STREAM, "the any-source receiver gets both");
    let got = receive_framed(&one_socket, STREAM);
    assert_eq!(got.len(), STREAM);
    assert!(
        got.iter().all(|(aid, tag, _)| *aid == one.aid && *tag == 1),
        "only its source"
    );
    assert_eq!(
        drain(&one_socket, Duration::from_millis(300)),
        0,
        "nothing else"
    );
    let member = member_of(&setup, one.aid);
    assert_eq!(member["source"], first.to_string(), "{member}");
    assert_eq!(
        member["in_kernel"], false,
        "the kernel hands every admitted source to its table: user space filters"
    );
    assert_eq!(member_of(&setup, any.aid)["in_kernel"], true);

    // The last any-source receiver goes: the group is received from the named source only,
    // joined for it, and fanned out by the kernel.
    assert_eq!(
        any_control.command(UdpCommand::Release, any.aid, 0),
        EnhancedReplyCode::Succeeded
    );
    assert!(
        wait_until(WAIT, || included_sources(bed, GROUP_V4) == vec![first]),
        "a source-specific join: {:?}",
        included_sources(bed, GROUP_V4)
    );
    assert!(
        wait_until(WAIT, || member_of(&setup, one.aid)["in_kernel"] == true),
        "the kernel delivers to it now"
    );
    let dropped_before = stat(&setup, "multicast_source_not_allowed");
    two_sources_send(&first_sender, &second_sender, 3);
    let got = receive_framed(&one_socket, STREAM);
    assert_eq!(got.len(), STREAM);
    assert!(got.iter().all(|(_, tag, _)| *tag == 3), "only its source");
    assert_eq!(drain(&one_socket, Duration::from_millis(300)), 0);
    assert!(
        wait_until(WAIT, || stat(&setup, "multicast_source_not_allowed")
            - dropped_before
            == STREAM as u64),
        "the other source is dropped by the gate and counted"
    );
    assert!(
        wait_until(WAIT, || member_of(&setup, one.aid)["kernel_packets"]
            == STREAM),
        "{}",
        member_of(&setup, one.aid)
    );
    // Another source once one is named: 13, and the binding keeps its source.
    let other = one_control.request(&ControlRequest {
        command: UdpCommand::Bind,
        flags: Flags::from_bits_retain(RECV | MU),
        ttl: 0,
        tid: one.tid,
        aid: 0,
        local: one_local.into(),
        remote: SocketAddr::new(IpAddr::V4(second), 0).into(),
    });
    assert_eq!(other.code, EnhancedReplyCode::BadAssociationContext);
    assert_eq!(member_of(&setup, one.aid)["source"], first.to_string());
}
