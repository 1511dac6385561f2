//! Kernel relay unit tests: the tc programs run by the kernel (`BPF_PROG_TEST_RUN`) on hand-built
//! frames. A hit is rewritten to exactly the expected bytes, with valid IPv4/IPv6 and UDP
//! checksums, in both framings and both directions; misses and stale heartbeats are counted.
//! Root only.

use std::net::{IpAddr, SocketAddr};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use gateway::host_flow::addr16;
use gateway_common::{
    BindingKey, BindingValue, ClientSocketKey, Counter, DatapathSettings, EntryCounters,
    ExitReason, OutboundKey, OutboundValue, RawClientValue, TC_GATE_PROGRAM, TC_INBOUND_PROGRAM,
    TC_INTERNAL_PROGRAM, XDP_EXTERNAL_PROGRAM, framing, map_names, relay_mode,
};
use testbed::frames::{ETH, with_ipv4_options, with_ipv6_ext};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];
const AID: u32 = 0x0000_002a;

struct Programs {
    ebpf: Ebpf,
}

fn sa(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

impl Programs {
    fn load() -> Self {
        let mut ebpf = EbpfLoader::new()
            .load(gateway::datapath::EBPF_OBJECT)
            .unwrap();
        let xdp: &mut Xdp = ebpf
            .program_mut(XDP_EXTERNAL_PROGRAM)
            .unwrap()
            .try_into()
            .unwrap();
        xdp.load().unwrap();
        for name in [TC_GATE_PROGRAM, TC_INBOUND_PROGRAM, TC_INTERNAL_PROGRAM] {
            let tc: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
            tc.load()
                .unwrap_or_else(|e| panic!("verifier rejects {name}: {e:?}"));
        }
        let mut programs = Self { ebpf };
        let mut settings: Array<&mut MapData, DatapathSettings> =
            Array::try_from(programs.ebpf.map_mut(map_names::SETTINGS).unwrap()).unwrap();
        // Loopback (ifindex 1) as both interfaces: its MTU is large; redirects are not performed
        // by test runs.
        settings
            .set(
                0,
                DatapathSettings {
                    internal_ifindex: 1,
                    external_ifindex: 1,
                    fail_closed_after_ns: 3_000_000_000,
                },
                0,
            )
            .unwrap();
        programs.beat();
        programs
    }

    fn beat(&mut self) {
        let mut heartbeat: Array<&mut MapData, u64> =
            Array::try_from(self.ebpf.map_mut(map_names::HEARTBEAT).unwrap()).unwrap();
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
        let ns = u64::try_from(now.tv_sec()).unwrap() * 1_000_000_000
            + u64::try_from(now.tv_nsec()).unwrap();
        heartbeat.set(0, ns, 0).unwrap();
    }

    fn stop_heart(&mut self) {
        let mut heartbeat: Array<&mut MapData, u64> =
            Array::try_from(self.ebpf.map_mut(map_names::HEARTBEAT).unwrap()).unwrap();
        heartbeat.set(0, 1, 0).unwrap();
    }

    fn bind(&mut self, remote: SocketAddr, relay: SocketAddr, value: BindingValue) {
        let mut map: HashMap<&mut MapData, BindingKey, BindingValue> =
            HashMap::try_from(self.ebpf.map_mut(map_names::BINDINGS).unwrap()).unwrap();
        let key = BindingKey {
            remote_addr: addr16(remote.ip()),
            relay_addr: addr16(relay.ip()),
            remote_port_be: remote.port().to_be(),
            relay_port_be: relay.port().to_be(),
        };
        map.insert(key, value, 0).unwrap();
    }

    fn bind_outbound(&mut self, client: SocketAddr, relay: SocketAddr, value: OutboundValue) {
        let mut map: HashMap<&mut MapData, OutboundKey, OutboundValue> =
            HashMap::try_from(self.ebpf.map_mut(map_names::OUTBOUND).unwrap()).unwrap();
        let key = OutboundKey {
            client_addr: addr16(client.ip()),
            relay_addr: addr16(relay.ip()),
            client_port_be: client.port().to_be(),
            relay_port_be: relay.port().to_be(),
        };
        map.insert(key, value, 0).unwrap();
    }

    fn run(&self, program: &str, frame: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; frame.len() + 64];
        let result = if program == XDP_EXTERNAL_PROGRAM {
            let p: &Xdp = self.ebpf.program(program).unwrap().try_into().unwrap();
            p.test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
        } else {
            let p: &SchedClassifier = self.ebpf.program(program).unwrap().try_into().unwrap();
            p.test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
        }
        .unwrap();
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    fn count(&self, reason: ExitReason) -> u64 {
        let counters: PerCpuArray<&MapData, Counter> =
            PerCpuArray::try_from(self.ebpf.map(map_names::EXIT_COUNTERS).unwrap()).unwrap();
        counters
            .get(&(reason as u32), 0)
            .unwrap()
            .iter()
            .map(|c| c.packets)
            .sum()
    }

    fn inbound_counters(
        &self,
        remote: SocketAddr,
        relay: SocketAddr,
    ) -> gateway_common::EntryCounters {
        let map: HashMap<&MapData, BindingKey, BindingValue> =
            HashMap::try_from(self.ebpf.map(map_names::BINDINGS).unwrap()).unwrap();
        let key = BindingKey {
            remote_addr: addr16(remote.ip()),
            relay_addr: addr16(relay.ip()),
            remote_port_be: remote.port().to_be(),
            relay_port_be: relay.port().to_be(),
        };
        map.get(&key, 0).unwrap().counters
    }
}

fn udp_frame(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(MAC_A, MAC_B);
    let mut frame = Vec::new();
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => builder
            .ipv4(s.octets(), d.octets(), 64)
            .udp(src.port(), dst.port())
            .write(&mut frame, payload)
            .unwrap(),
        (IpAddr::V6(s), IpAddr::V6(d)) => builder
            .ipv6(s.octets(), d.octets(), 64)
            .udp(src.port(), dst.port())
            .write(&mut frame, payload)
            .unwrap(),
        _ => panic!("mixed families"),
    }
    frame
}

/// Parses a frame and checks every checksum; returns (src, dst, UDP payload).
fn parse_checked(frame: &[u8]) -> (SocketAddr, SocketAddr, Vec<u8>) {
    let sliced = SlicedPacket::from_ethernet(frame).expect("a well-formed frame");
    let Some(TransportSlice::Udp(udp)) = &sliced.transport else {
        panic!("UDP expected")
    };
    let (src_ip, dst_ip, checksum): (IpAddr, IpAddr, u16) = match &sliced.net {
        Some(NetSlice::Ipv4(ip)) => {
            let header = ip.header().to_header();
            assert_eq!(
                header.header_checksum,
                header.calc_header_checksum(),
                "IPv4 header checksum"
            );
            assert_eq!(
                usize::from(header.total_len),
                frame.len() - 14,
                "IPv4 total length"
            );
            let sum = udp
                .to_header()
                .calc_checksum_ipv4(&header, udp.payload())
                .unwrap();
            (header.source.into(), header.destination.into(), sum)
        }
        Some(NetSlice::Ipv6(ip)) => {
            let header = ip.header().to_header();
            assert_eq!(
                usize::from(header.payload_length),
                frame.len() - 54,
                "IPv6 payload length"
            );
            let sum = udp
                .to_header()
                .calc_checksum_ipv6(&header, udp.payload())
                .unwrap();
            (header.source.into(), header.destination.into(), sum)
        }
        _ => panic!("IP expected"),
    };
    assert_eq!(udp.checksum(), checksum, "UDP checksum");
    assert_eq!(
        usize::from(udp.length()),
        udp.payload().len() + 8,
        "UDP length"
    );
    (
        SocketAddr::new(src_ip, udp.source_port()),
        SocketAddr::new(dst_ip, udp.destination_port()),
        udp.payload().to_vec(),
    )
}

struct Case {
    remote: SocketAddr,
    external_relay: SocketAddr,
    client: SocketAddr,
    internal_relay: SocketAddr,
}

fn v4_case() -> Case {
    Case {
        remote: sa("203.0.113.2:6000"),
        external_relay: sa("203.0.113.1:30000"),
        client: sa("198.51.100.2:5000"),
        internal_relay: sa("198.51.100.1:40000"),
    }
}

fn v6_case() -> Case {
    Case {
        remote: sa("[2001:db8:2::2]:6000"),
        external_relay: sa("[2001:db8:2::1]:30000"),
        client: sa("[2001:db8:1::2]:5000"),
        internal_relay: sa("[2001:db8:1::1]:40000"),
    }
}

fn binding_value(case: &Case, framing_kind: u32) -> BindingValue {
    BindingValue {
        client_addr: addr16(case.client.ip()),
        internal_relay_addr: addr16(case.internal_relay.ip()),
        client_port_be: case.client.port().to_be(),
        internal_relay_port_be: case.internal_relay.port().to_be(),
        aid_be: AID.to_be(),
        mode: relay_mode::KERNEL,
        framing: framing_kind,
        counters: EntryCounters::default(),
    }
}

fn socks5_header(addr: SocketAddr) -> Vec<u8> {
    let mut header = vec![0, 0, 0];
    match addr.ip() {
        IpAddr::V4(v4) => {
            header.push(1);
            header.extend_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            header.push(4);
            header.extend_from_slice(&v6.octets());
        }
    }
    header.extend_from_slice(&addr.port().to_be_bytes());
    header
}

fn inbound_is_rewritten(case: &Case, framing_kind: u32) {
    let mut programs = Programs::load();
    programs.bind(
        case.remote,
        case.external_relay,
        binding_value(case, framing_kind),
    );
    let payload: Vec<u8> = (0..=255u8).cycle().take(301).collect();
    let frame = udp_frame(case.remote, case.external_relay, &payload);

    let (xdp, _) = programs.run(XDP_EXTERNAL_PROGRAM, &frame);
    assert_eq!(xdp, XDP_PASS, "the gate admits the binding");
    assert_eq!(programs.count(ExitReason::BindingToKernelRelay), 1);

    let (action, out) = programs.run(TC_INBOUND_PROGRAM, &frame);
    assert_eq!(action, TC_ACT_REDIRECT);
    let (src, dst, data) = parse_checked(&out);
    assert_eq!(src, case.internal_relay);
    assert_eq!(dst, case.client);
    let mut expected = if framing_kind == framing::ENHANCED {
        let mut header = vec![0, 0, 0, 0];
        header.extend_from_slice(&AID.to_be_bytes());
        header
    } else {
        socks5_header(case.remote)
    };
    expected.extend_from_slice(&payload);
    assert_eq!(data, expected, "framing header, then the payload unchanged");
    assert_eq!(
        &out[..12],
        &frame[..12],
        "MACs are left to bpf_redirect_neigh"
    );
    assert_eq!(programs.count(ExitReason::KernelRelayedInbound), 1);
    let counters = programs.inbound_counters(case.remote, case.external_relay);
    assert_eq!(counters.packets, 1);
    assert_eq!(counters.bytes, payload.len() as u64);
    assert_ne!(counters.last_seen_ns, 0);
}

#[test]
fn inbound_ipv4_enhanced_framing() {
    inbound_is_rewritten(&v4_case(), framing::ENHANCED);
}

#[test]
fn inbound_ipv4_socks5_framing() {
    inbound_is_rewritten(&v4_case(), framing::SOCKS5);
}

#[test]
fn inbound_ipv6_enhanced_framing() {
    inbound_is_rewritten(&v6_case(), framing::ENHANCED);
}

#[test]
fn inbound_ipv6_socks5_framing() {
    inbound_is_rewritten(&v6_case(), framing::SOCKS5);
}

#[test]
fn misses_and_wrong_ports_are_not_relayed() {
    let case = v4_case();
    let mut programs = Programs::load();
    programs.bind(
        case.remote,
        case.external_relay,
        binding_value(&case, framing::ENHANCED),
    );
    // Right host, wrong source port; and another relay port.
    for frame in [
        udp_frame(sa("203.0.113.2:6001"), case.external_relay, b"x"),
        udp_frame(case.remote, sa("203.0.113.1:30002"), b"x"),
    ] {
        assert_eq!(programs.run(XDP_EXTERNAL_PROGRAM, &frame).0, XDP_DROP);
        let (action, out) = programs.run(TC_INBOUND_PROGRAM, &frame);
        assert_eq!(action, TC_ACT_OK, "tc leaves misses alone");
        assert_eq!(out, frame);
    }
    assert_eq!(programs.count(ExitReason::NoBinding), 2);
    assert_eq!(programs.count(ExitReason::InboundToStack), 2);
}

#[test]
fn stale_heartbeat_fails_closed() {
    let case = v4_case();
    let mut programs = Programs::load();
    programs.bind(
        case.remote,
        case.external_relay,
        binding_value(&case, framing::ENHANCED),
    );
    programs.stop_heart();
    let frame = udp_frame(case.remote, case.external_relay, b"media");
    assert_eq!(programs.run(XDP_EXTERNAL_PROGRAM, &frame).0, XDP_DROP);
    assert_eq!(programs.count(ExitReason::DaemonGone), 1);
    assert_eq!(programs.run(TC_INBOUND_PROGRAM, &frame).0, TC_ACT_SHOT);
    programs.beat();
    assert_eq!(programs.run(XDP_EXTERNAL_PROGRAM, &frame).0, XDP_PASS);
}

fn outbound_value(case: &Case, framing_kind: u32) -> OutboundValue {
    OutboundValue {
        remote_addr: addr16(case.remote.ip()),
        external_relay_addr: addr16(case.external_relay.ip()),
        remote_port_be: case.remote.port().to_be(),
        external_relay_port_be: case.external_relay.port().to_be(),
        aid_be: AID.to_be(),
        framing: framing_kind,
        padding: 0,
        counters: EntryCounters::default(),
    }
}

fn outbound_is_rewritten(case: &Case, framing_kind: u32) {
    let mut programs = Programs::load();
    programs.bind(
        case.remote,
        case.external_relay,
        binding_value(case, framing_kind),
    );
    programs.bind_outbound(
        case.client,
        case.internal_relay,
        outbound_value(case, framing_kind),
    );
    let payload: Vec<u8> = (0..=255u8).rev().cycle().take(173).collect();
    let mut framed = if framing_kind == framing::ENHANCED {
        let mut header = vec![0, 0, 0, 0];
        header.extend_from_slice(&AID.to_be_bytes());
        header
    } else {
        socks5_header(case.remote)
    };
    framed.extend_from_slice(&payload);
    let frame = udp_frame(case.client, case.internal_relay, &framed);
    let (action, out) = programs.run(TC_INTERNAL_PROGRAM, &frame);
    assert_eq!(action, TC_ACT_REDIRECT);
    let (src, dst, data) = parse_checked(&out);
    assert_eq!(
        src, case.external_relay,
        "leaves from the external relay address"
    );
    assert_eq!(dst, case.remote);
    assert_eq!(data, payload, "header stripped");
    assert_eq!(programs.count(ExitReason::KernelRelayedOutbound), 1);

    // A wrong AID / a destination the binding does not admit goes to user space unchanged.
    let mut wrong = if framing_kind == framing::ENHANCED {
        vec![0, 0, 0, 0, 0, 0, 0, 0x2b]
    } else {
        socks5_header(SocketAddr::new(case.remote.ip(), 6009))
    };
    wrong.extend_from_slice(&payload);
    let frame = udp_frame(case.client, case.internal_relay, &wrong);
    let (action, out) = programs.run(TC_INTERNAL_PROGRAM, &frame);
    assert_eq!((action, out), (TC_ACT_OK, frame));
    // FRAG != 0 as well.
    let mut fragment = framed.clone();
    fragment[if framing_kind == framing::ENHANCED {
        1
    } else {
        2
    }] = 1;
    let frame = udp_frame(case.client, case.internal_relay, &fragment);
    assert_eq!(programs.run(TC_INTERNAL_PROGRAM, &frame).0, TC_ACT_OK);
    let mut to_userspace = 2;
    if framing_kind == framing::ENHANCED {
        // DGID != 0 (a piece of a fragmented datagram) is the userspace relay's to drop.
        let mut dgid = framed.clone();
        dgid[3] = 1;
        let frame = udp_frame(case.client, case.internal_relay, &dgid);
        assert_eq!(
            programs.run(TC_INTERNAL_PROGRAM, &frame),
            (TC_ACT_OK, frame)
        );
        to_userspace += 1;
    }
    assert_eq!(
        programs.count(ExitReason::OutboundToUserspace),
        to_userspace
    );
    assert_eq!(programs.count(ExitReason::KernelRelayedOutbound), 1);
}

#[test]
fn outbound_ipv4_enhanced_framing() {
    outbound_is_rewritten(&v4_case(), framing::ENHANCED);
}

#[test]
fn outbound_ipv4_socks5_framing() {
    outbound_is_rewritten(&v4_case(), framing::SOCKS5);
}

#[test]
fn outbound_ipv6_enhanced_framing() {
    outbound_is_rewritten(&v6_case(), framing::ENHANCED);
}

#[test]
fn outbound_ipv6_socks5_framing() {
    outbound_is_rewritten(&v6_case(), framing::SOCKS5);
}

#[test]
fn inside_datagrams_to_external_addresses_are_dropped() {
    let mut programs = Programs::load();
    {
        let mut external: HashMap<&mut MapData, [u8; 16], u32> =
            HashMap::try_from(programs.ebpf.map_mut(map_names::EXTERNAL_ADDRS).unwrap()).unwrap();
        external
            .insert(addr16("203.0.113.1".parse().unwrap()), 0, 0)
            .unwrap();
    }
    let frame = udp_frame(sa("203.0.113.2:6000"), sa("203.0.113.1:30000"), b"spoofed");
    assert_eq!(programs.run(TC_INTERNAL_PROGRAM, &frame).0, TC_ACT_SHOT);
    assert_eq!(programs.count(ExitReason::InsideToExternalAddress), 1);
    // Truncated UDP from inside is not relayed.
    let frame = udp_frame(sa("198.51.100.2:5000"), sa("198.51.100.1:40000"), b"");
    assert_eq!(
        programs
            .run(TC_INTERNAL_PROGRAM, &frame[..frame.len() - 4])
            .0,
        TC_ACT_OK
    );
}

#[test]
fn listen_and_host_level_entries_admit_to_userspace() {
    let case = v4_case();
    let mut programs = Programs::load();
    // Listen: any remote to relay port 30000 (all-zero remote, port 0).
    programs.bind(sa("[::]:0"), case.external_relay, BindingValue::default());
    // Host-level: any port of 203.0.113.9 to relay port 30002.
    programs.bind(
        sa("203.0.113.9:0"),
        sa("203.0.113.1:30002"),
        BindingValue::default(),
    );
    for frame in [
        udp_frame(sa("192.0.2.77:1234"), case.external_relay, b"anyone"),
        udp_frame(
            sa("203.0.113.9:4321"),
            sa("203.0.113.1:30002"),
            b"that host",
        ),
    ] {
        assert_eq!(programs.run(XDP_EXTERNAL_PROGRAM, &frame).0, XDP_PASS);
    }
    assert_eq!(programs.count(ExitReason::BindingToUserspace), 2);
    // Neither widens anything else: another host to the host-level port, any host elsewhere.
    for frame in [
        udp_frame(sa("203.0.113.8:4321"), sa("203.0.113.1:30002"), b"x"),
        udp_frame(sa("192.0.2.77:1234"), sa("203.0.113.1:30004"), b"x"),
    ] {
        assert_eq!(programs.run(XDP_EXTERNAL_PROGRAM, &frame).0, XDP_DROP);
    }
    assert_eq!(programs.count(ExitReason::NoBinding), 2);
}

#[test]
fn inside_udp_to_external_addresses_is_dropped_whatever_its_headers() {
    let mut programs = Programs::load();
    {
        let mut external: HashMap<&mut MapData, [u8; 16], u32> =
            HashMap::try_from(programs.ebpf.map_mut(map_names::EXTERNAL_ADDRS).unwrap()).unwrap();
        for ip in ["203.0.113.1", "2001:db8:2::1"] {
            external.insert(addr16(ip.parse().unwrap()), 0, 0).unwrap();
        }
    }
    let v4 = udp_frame(sa("198.51.100.2:6000"), sa("203.0.113.1:30000"), b"spoofed");
    let v6 = udp_frame(
        sa("[2001:db8:1::2]:6000"),
        sa("[2001:db8:2::1]:30000"),
        b"spoofed",
    );
    let with_options = with_ipv4_options(&v4);
    let mut first_fragment = v4.clone();
    first_fragment[ETH + 6] |= 0x20;
    let mut later_fragment = v4.clone();
    later_fragment[ETH + 7] = 0x10;
    let hop_by_hop = with_ipv6_ext(&v6, 0, [0, 0, 1, 4, 0, 0, 0, 0]);
    let fragment6 = with_ipv6_ext(&v6, 44, [0, 0, 0, 0x11, 0, 0, 0, 7]);
    let chain = with_ipv6_ext(&hop_by_hop, 60, [0, 0, 1, 4, 0, 0, 0, 0]);
    let mut too_long = v6.clone();
    for _ in 0..8 {
        too_long = with_ipv6_ext(&too_long, 60, [0, 0, 1, 4, 0, 0, 0, 0]);
    }
    let cases = [
        ("plain IPv4", v4.clone()),
        ("IPv4 with options", with_options),
        ("IPv4 first fragment", first_fragment),
        ("IPv4 later fragment", later_fragment),
        ("plain IPv6", v6.clone()),
        ("IPv6 hop-by-hop", hop_by_hop.clone()),
        ("IPv6 later fragment", fragment6),
        ("IPv6 hop-by-hop + destination options", chain),
        ("IPv6 chain too long to walk", too_long),
    ];
    for (i, (what, frame)) in cases.iter().enumerate() {
        assert_eq!(
            programs.run(TC_INTERNAL_PROGRAM, frame).0,
            TC_ACT_SHOT,
            "{what} is dropped"
        );
        assert_eq!(
            programs.count(ExitReason::InsideToExternalAddress),
            i as u64 + 1,
            "{what} is counted"
        );
    }

    // TCP and ICMPv6 to the external address stay allowed (the host's own services, ping), also
    // behind an extension header.
    let tcp = {
        let mut frame = Vec::new();
        PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv4([198, 51, 100, 2], [203, 0, 113, 1], 64)
            .tcp(40000, 22, 1, 1000)
            .write(&mut frame, b"")
            .unwrap();
        frame
    };
    let icmp6 = {
        let mut frame = Vec::new();
        PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv6(
                "2001:db8:1::2"
                    .parse::<std::net::Ipv6Addr>()
                    .unwrap()
                    .octets(),
                "2001:db8:2::1"
                    .parse::<std::net::Ipv6Addr>()
                    .unwrap()
                    .octets(),
                64,
            )
            .icmpv6_echo_request(1, 1)
            .write(&mut frame, b"ping")
            .unwrap();
        frame
    };
    let passes_before = programs.count(ExitReason::NotUdpPassed);
    for frame in [
        tcp,
        icmp6.clone(),
        with_ipv6_ext(&icmp6, 0, [0, 0, 1, 4, 0, 0, 0, 0]),
    ] {
        assert_eq!(programs.run(TC_INTERNAL_PROGRAM, &frame).0, TC_ACT_OK);
    }
    assert_eq!(programs.count(ExitReason::NotUdpPassed), passes_before + 3);
    assert_eq!(
        programs.count(ExitReason::InsideToExternalAddress),
        cases.len() as u64
    );
}

// ---- header-less (RAW) delivery ---------------------------------------------------------------

fn next(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip(), addr.port() + 1)
}

impl Programs {
    /// The kernel entries of a RAW binding, as the daemon's gate writes them: inbound keyed by
    /// (remote, external relay), outbound by (client, remote), and the client socket in
    /// `RAW_CLIENTS`.
    fn bind_raw(&mut self, case: &Case) {
        self.bind(
            case.remote,
            case.external_relay,
            binding_value(case, framing::RAW),
        );
        self.bind_outbound(case.client, case.remote, outbound_value(case, framing::RAW));
        let mut clients: HashMap<&mut MapData, ClientSocketKey, RawClientValue> =
            HashMap::try_from(self.ebpf.map_mut(map_names::RAW_CLIENTS).unwrap()).unwrap();
        let key = ClientSocketKey {
            addr: addr16(case.client.ip()),
            port_be: case.client.port().to_be(),
            padding: 0,
        };
        let value = RawClientValue {
            internal_relay_addr: addr16(case.internal_relay.ip()),
        };
        clients.insert(key, value, 0).unwrap();
    }
}

/// The second flow of an RTP pair: every port one higher.
fn rtcp_of(case: &Case) -> Case {
    Case {
        remote: next(case.remote),
        external_relay: next(case.external_relay),
        client: next(case.client),
        internal_relay: next(case.internal_relay),
    }
}

/// A RAW inbound hit: only the destination changes (to the client), the remote stays the
/// source, the payload and its length are untouched, every checksum is valid.
fn raw_inbound_is_rewritten(programs: &mut Programs, case: &Case, payload: &[u8]) {
    let frame = udp_frame(case.remote, case.external_relay, payload);
    assert_eq!(programs.run(XDP_EXTERNAL_PROGRAM, &frame).0, XDP_PASS);
    let (action, out) = programs.run(TC_INBOUND_PROGRAM, &frame);
    assert_eq!(action, TC_ACT_REDIRECT);
    assert_eq!(out.len(), frame.len(), "no header added");
    let (src, dst, data) = parse_checked(&out);
    assert_eq!(src, case.remote, "the remote stays the source");
    assert_eq!(dst, case.client);
    assert_eq!(data, payload);
    // Only the destination address, the destination port and the checksums differ.
    let (dst_addr, csum) = if case.remote.is_ipv4() {
        (14 + 16..14 + 20, 14 + 20 + 6)
    } else {
        (14 + 24..14 + 40, 14 + 40 + 6)
    };
    let udp = csum - 6;
    for (i, (a, b)) in frame.iter().zip(&out).enumerate() {
        let expected_change = dst_addr.contains(&i)
            || (udp + 2..udp + 4).contains(&i)
            || (csum..csum + 2).contains(&i)
            || (case.remote.is_ipv4() && (24..26).contains(&i));
        if !expected_change {
            assert_eq!(a, b, "octet {i} unchanged");
        }
    }
}

/// A RAW client's datagram to its remote: only the source changes (to the external relay).
fn raw_outbound_is_rewritten(programs: &Programs, case: &Case, payload: &[u8]) {
    let frame = udp_frame(case.client, case.remote, payload);
    let (action, out) = programs.run(TC_INTERNAL_PROGRAM, &frame);
    assert_eq!(action, TC_ACT_REDIRECT);
    assert_eq!(out.len(), frame.len());
    let (src, dst, data) = parse_checked(&out);
    assert_eq!(src, case.external_relay, "leaves from the external relay");
    assert_eq!(dst, case.remote);
    assert_eq!(data, payload);
}

fn raw_both_ways(case: &Case) {
    let mut programs = Programs::load();
    programs.bind_raw(case);
    let payload: Vec<u8> = (0..=255u8).cycle().take(333).collect();
    raw_inbound_is_rewritten(&mut programs, case, &payload);
    raw_outbound_is_rewritten(&programs, case, &payload[..77]);
    assert_eq!(programs.count(ExitReason::KernelRelayedRawInbound), 1);
    assert_eq!(programs.count(ExitReason::KernelRelayedRawOutbound), 1);
    assert_eq!(programs.count(ExitReason::KernelRelayedInbound), 0);
    let counters = programs.inbound_counters(case.remote, case.external_relay);
    assert_eq!(counters.packets, 1);
    assert_eq!(counters.bytes, payload.len() as u64);
}

#[test]
fn raw_ipv4_both_ways() {
    raw_both_ways(&v4_case());
}

#[test]
fn raw_ipv6_both_ways() {
    raw_both_ways(&v6_case());
}

#[test]
fn raw_rtp_pair_relays_both_flows() {
    for case in [v4_case(), v6_case()] {
        let mut programs = Programs::load();
        let rtcp = rtcp_of(&case);
        programs.bind_raw(&case);
        programs.bind_raw(&rtcp);
        raw_inbound_is_rewritten(&mut programs, &case, b"rtp from the source");
        raw_inbound_is_rewritten(&mut programs, &rtcp, b"rtcp sender report");
        raw_outbound_is_rewritten(&programs, &rtcp, b"rtcp receiver report");
        raw_outbound_is_rewritten(&programs, &case, b"rtp keepalive");
        assert_eq!(programs.count(ExitReason::KernelRelayedRawInbound), 2);
        assert_eq!(programs.count(ExitReason::KernelRelayedRawOutbound), 2);
    }
}

#[test]
fn raw_ipv4_without_udp_checksum_stays_without() {
    let case = v4_case();
    let mut programs = Programs::load();
    programs.bind_raw(&case);
    let mut frame = udp_frame(case.remote, case.external_relay, b"no checksum");
    let csum = 14 + 20 + 6;
    frame[csum..csum + 2].copy_from_slice(&[0, 0]);
    let (action, out) = programs.run(TC_INBOUND_PROGRAM, &frame);
    assert_eq!(action, TC_ACT_REDIRECT);
    assert_eq!(&out[csum..csum + 2], &[0, 0], "0 means none in IPv4");
    assert_eq!(&out[14 + 16..14 + 20], &[198, 51, 100, 2]);
}

#[test]
fn raw_misses_and_other_destinations_are_dropped() {
    for case in [v4_case(), v6_case()] {
        let mut programs = Programs::load();
        programs.bind_raw(&case);
        // Another port of the remote, another host: not admitted by the gate.
        for from in [
            next(case.remote),
            SocketAddr::new(case.internal_relay.ip(), 6000),
        ] {
            let frame = udp_frame(from, case.external_relay, b"unsolicited");
            assert_eq!(programs.run(XDP_EXTERNAL_PROGRAM, &frame).0, XDP_DROP);
        }
        assert_eq!(programs.count(ExitReason::NoBinding), 2);
        // From the RAW client socket to another outside address or port: dropped, counted.
        let elsewhere = if case.remote.is_ipv4() {
            sa("192.0.2.9:6000")
        } else {
            sa("[2001:db8:9::9]:6000")
        };
        for to in [elsewhere, next(case.remote)] {
            let frame = udp_frame(case.client, to, b"leak");
            assert_eq!(programs.run(TC_INTERNAL_PROGRAM, &frame).0, TC_ACT_SHOT);
        }
        assert_eq!(programs.count(ExitReason::RawToOtherDestination), 2);
        // To the gateway's internal relay address (the header path) it goes to user space, and
        // another socket of the same client is not affected.
        let to_relay = udp_frame(case.client, case.internal_relay, b"header path");
        assert_eq!(
            programs.run(TC_INTERNAL_PROGRAM, &to_relay),
            (TC_ACT_OK, to_relay)
        );
        let other_socket = udp_frame(next(case.client), elsewhere, b"not raw");
        assert_eq!(
            programs.run(TC_INTERNAL_PROGRAM, &other_socket).0,
            TC_ACT_OK
        );
        assert_eq!(programs.count(ExitReason::OutboundToUserspace), 2);
        assert_eq!(programs.count(ExitReason::KernelRelayedRawOutbound), 0);
    }
}

#[test]
fn raw_fails_closed_when_the_heartbeat_stops() {
    let case = v4_case();
    let mut programs = Programs::load();
    programs.bind_raw(&case);
    programs.stop_heart();
    let inbound = udp_frame(case.remote, case.external_relay, b"in");
    assert_eq!(programs.run(XDP_EXTERNAL_PROGRAM, &inbound).0, XDP_DROP);
    assert_eq!(programs.run(TC_INBOUND_PROGRAM, &inbound).0, TC_ACT_SHOT);
    // Outbound is dropped too: passed to the stack it would be forwarded unchanged.
    let outbound = udp_frame(case.client, case.remote, b"out");
    assert_eq!(programs.run(TC_INTERNAL_PROGRAM, &outbound).0, TC_ACT_SHOT);
    assert_eq!(programs.count(ExitReason::DaemonGone), 3);
    assert_eq!(programs.count(ExitReason::KernelRelayedRawOutbound), 0);
}

// The tc gate (`gateway_gate`): the gate and the inbound relay in one program, attached instead
// of the XDP gate where XDP only adds a copy. It must decide, count and rewrite exactly as the
// XDP gate followed by `gateway_inbound` does.

/// Every count the programs made so far, by reason.
fn all_counts(programs: &Programs) -> Vec<(ExitReason, u64)> {
    ExitReason::ALL
        .iter()
        .map(|&reason| (reason, programs.count(reason)))
        .collect()
}

/// Runs `frame` through the XDP gate and then (if it passed) `gateway_inbound` on one fresh
/// load, and through the tc gate on another with the same binding: the same action, the same
/// bytes out, the same counts by reason, the same entry counters.
fn tc_gate_matches_xdp_then_tc(case: &Case, value: &BindingValue, frame: &[u8]) -> (u32, Vec<u8>) {
    let mut pair = Programs::load();
    pair.bind(case.remote, case.external_relay, *value);
    let (xdp, _) = pair.run(XDP_EXTERNAL_PROGRAM, frame);
    let expected = if xdp == XDP_PASS {
        pair.run(TC_INBOUND_PROGRAM, frame)
    } else {
        (TC_ACT_SHOT, frame.to_vec())
    };
    let mut single = Programs::load();
    single.bind(case.remote, case.external_relay, *value);
    let got = single.run(TC_GATE_PROGRAM, frame);
    assert_eq!(got.0, expected.0, "the same action");
    if got.0 != TC_ACT_SHOT {
        assert_eq!(got.1, expected.1, "the same bytes");
    }
    let mut pair_counts = all_counts(&pair);
    // Behind XDP, tc sees all XDP passed and counts what is no kernel binding's as
    // InboundToStack; the tc gate hands only kernel binding hits to the relay, so it counts the
    // gate's reason alone for the others.
    if xdp == XDP_PASS && pair.count(ExitReason::BindingToKernelRelay) == 0 {
        for (reason, count) in &mut pair_counts {
            if *reason == ExitReason::InboundToStack {
                *count -= 1;
            }
        }
    }
    assert_eq!(
        all_counts(&single),
        pair_counts,
        "the same counts by reason"
    );
    assert_eq!(
        single
            .inbound_counters(case.remote, case.external_relay)
            .packets,
        pair.inbound_counters(case.remote, case.external_relay)
            .packets,
        "the same entry counters"
    );
    got
}

#[test]
fn tc_gate_relays_every_framing_like_the_xdp_gate_and_tc() {
    let payload: Vec<u8> = (0..=255u8).cycle().take(301).collect();
    for case in [v4_case(), v6_case()] {
        for framing_kind in [framing::ENHANCED, framing::SOCKS5, framing::RAW] {
            let value = binding_value(&case, framing_kind);
            let frame = udp_frame(case.remote, case.external_relay, &payload);
            let (action, out) = tc_gate_matches_xdp_then_tc(&case, &value, &frame);
            assert_eq!(action, TC_ACT_REDIRECT, "{framing_kind} {}", case.remote);
            let (src, dst, data) = parse_checked(&out);
            assert_eq!(dst, case.client);
            if framing_kind == framing::RAW {
                assert_eq!((src, data.as_slice()), (case.remote, payload.as_slice()));
            } else {
                assert_eq!(src, case.internal_relay);
                assert!(data.ends_with(&payload));
            }
        }
    }
}

#[test]
fn tc_gate_drops_misses_and_leaves_what_the_kernel_cannot_relay_to_the_stack() {
    for case in [v4_case(), v6_case()] {
        let kernel = binding_value(&case, framing::ENHANCED);
        // Misses: another source port, another relay port.
        for frame in [
            udp_frame(next(case.remote), case.external_relay, b"x"),
            udp_frame(case.remote, next(case.external_relay), b"x"),
        ] {
            assert_eq!(
                tc_gate_matches_xdp_then_tc(&case, &kernel, &frame).0,
                TC_ACT_SHOT
            );
        }
        let frame = udp_frame(case.remote, case.external_relay, b"media");
        // A userspace-relayed binding: passed to the stack, untouched.
        let mut userspace = kernel;
        userspace.mode = relay_mode::USERSPACE;
        assert_eq!(
            tc_gate_matches_xdp_then_tc(&case, &userspace, &frame),
            (TC_ACT_OK, frame.clone())
        );
        // A binding whose client is of the other family (no translation in the kernel): to the
        // stack, whose userspace relay translates.
        let mut other_family = kernel;
        other_family.client_addr = if case.remote.is_ipv4() {
            addr16(v6_case().client.ip())
        } else {
            addr16(v4_case().client.ip())
        };
        assert_eq!(
            tc_gate_matches_xdp_then_tc(&case, &other_family, &frame),
            (TC_ACT_OK, frame.clone())
        );
    }
    // IPv4 options in front of a bound flow: dropped by the gate in both hooks.
    let case = v4_case();
    let frame = with_ipv4_options(&udp_frame(case.remote, case.external_relay, b"media"));
    let value = binding_value(&case, framing::ENHANCED);
    assert_eq!(
        tc_gate_matches_xdp_then_tc(&case, &value, &frame).0,
        TC_ACT_SHOT
    );
}

#[test]
fn tc_gate_hands_a_partial_checksum_to_user_space() {
    // The UDP checksum field holding only the pseudo-header sum is what a CHECKSUM_PARTIAL skb
    // carries (a test run cannot set the skb's state; the test bed covers the real thing).
    for case in [v4_case(), v6_case()] {
        let mut frame = udp_frame(case.remote, case.external_relay, b"partial");
        let l4 = if case.remote.is_ipv4() {
            14 + 20
        } else {
            14 + 40
        };
        let udp_len = u16::from_be_bytes([frame[l4 + 4], frame[l4 + 5]]);
        let pseudo = pseudo_header_sum(case.remote.ip(), case.external_relay.ip(), udp_len);
        frame[l4 + 6..l4 + 8].copy_from_slice(&pseudo.to_be_bytes());
        let value = binding_value(&case, framing::ENHANCED);
        assert_eq!(
            tc_gate_matches_xdp_then_tc(&case, &value, &frame),
            (TC_ACT_OK, frame.clone())
        );
    }
}

/// The folded (not complemented) UDP pseudo-header sum.
fn pseudo_header_sum(src: IpAddr, dst: IpAddr, udp_len: u16) -> u16 {
    let mut words: Vec<u16> = Vec::new();
    let mut push = |octets: &[u8]| {
        for pair in octets.chunks(2) {
            words.push(u16::from_be_bytes([pair[0], pair[1]]));
        }
    };
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            push(&s.octets());
            push(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            push(&s.octets());
            push(&d.octets());
        }
        _ => panic!("mixed families"),
    }
    words.push(17);
    words.push(udp_len);
    let mut sum: u32 = words.iter().map(|&w| u32::from(w)).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    u16::try_from(sum).unwrap()
}

#[test]
fn tc_gate_fails_closed_when_the_heartbeat_stops() {
    for framing_kind in [framing::ENHANCED, framing::RAW] {
        let case = v4_case();
        let mut programs = Programs::load();
        programs.bind(
            case.remote,
            case.external_relay,
            binding_value(&case, framing_kind),
        );
        programs.stop_heart();
        let frame = udp_frame(case.remote, case.external_relay, b"media");
        assert_eq!(programs.run(TC_GATE_PROGRAM, &frame).0, TC_ACT_SHOT);
        assert_eq!(programs.count(ExitReason::DaemonGone), 1);
        programs.beat();
        assert_eq!(programs.run(TC_GATE_PROGRAM, &frame).0, TC_ACT_REDIRECT);
    }
}

/// Found by the differential fuzz (`datapath_model`): a bound remote's datagram whose UDP length
/// disagrees with its IP payload (or with what the frame holds) was relayed with lengths grown
/// from the wrong one, and a UDP length below 8 added 2^64 octets to the binding's counters.
/// Such datagrams now go to the stack, which validates lengths; both directions.
#[test]
fn datagrams_whose_lengths_disagree_are_not_relayed_in_the_kernel() {
    for case in [v4_case(), v6_case()] {
        let mut programs = Programs::load();
        programs.bind(
            case.remote,
            case.external_relay,
            binding_value(&case, framing::ENHANCED),
        );
        programs.bind_outbound(
            case.client,
            case.internal_relay,
            outbound_value(&case, framing::ENHANCED),
        );
        let udp_length_at = if case.remote.is_ipv4() {
            14 + 20 + 4
        } else {
            14 + 40 + 4
        };
        let mut framed = vec![0, 0, 0, 0];
        framed.extend_from_slice(&AID.to_be_bytes());
        framed.extend_from_slice(b"payload");
        for udp_len in [0u16, 7, 8, 14, 0xffff] {
            let mut inbound = udp_frame(case.remote, case.external_relay, b"payload");
            inbound[udp_length_at..udp_length_at + 2].copy_from_slice(&udp_len.to_be_bytes());
            let (action, out) = programs.run(TC_INBOUND_PROGRAM, &inbound);
            assert_eq!(
                (action, &out),
                (TC_ACT_OK, &inbound),
                "inbound, UDP length {udp_len}"
            );

            let mut outbound = udp_frame(case.client, case.internal_relay, &framed);
            outbound[udp_length_at..udp_length_at + 2].copy_from_slice(&udp_len.to_be_bytes());
            let (action, out) = programs.run(TC_INTERNAL_PROGRAM, &outbound);
            assert_eq!(
                (action, &out),
                (TC_ACT_OK, &outbound),
                "outbound, UDP length {udp_len}"
            );
        }
        assert_eq!(programs.count(ExitReason::InboundToStack), 5);
        assert_eq!(programs.count(ExitReason::OutboundToUserspace), 5);
        assert_eq!(programs.count(ExitReason::KernelRelayedInbound), 0);
        let counters = programs.inbound_counters(case.remote, case.external_relay);
        assert_eq!(counters.packets, 0);
    }
}
