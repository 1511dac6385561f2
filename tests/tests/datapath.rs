//! Datapath unit tests: the XDP program run by the kernel (`BPF_PROG_TEST_RUN`) on hand-built
//! frames, checking the verdict and the per-reason counters. Root only.

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray},
    programs::{TestRun, TestRunOptions, Xdp},
};
use etherparse::PacketBuilder;
use gateway::datapath::EBPF_OBJECT;
use gateway_common::{
    ControlPortKey, Counter, ExitReason, HostAllowKey, HostAllowValue, XDP_EXTERNAL_PROGRAM,
    ipv4_mapped, map_names,
};
use testbed::frames::{ETH, with_ipv4_options, with_ipv6_ext};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

const SERVER: [u8; 4] = [203, 0, 113, 2];
const GATEWAY: [u8; 4] = [203, 0, 113, 1];
const SERVER6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const GATEWAY6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];

struct Loaded {
    ebpf: Ebpf,
}

impl Loaded {
    fn new() -> Self {
        assert!(!EBPF_OBJECT.is_empty(), "the eBPF object was not built");
        let mut ebpf = EbpfLoader::new().load(EBPF_OBJECT).expect("load object");
        let program: &mut Xdp = ebpf
            .program_mut(XDP_EXTERNAL_PROGRAM)
            .unwrap()
            .try_into()
            .unwrap();
        program.load().expect("verifier accepts the program");
        Self { ebpf }
    }

    fn run(&self, frame: &[u8]) -> u32 {
        let program: &Xdp = self
            .ebpf
            .program(XDP_EXTERNAL_PROGRAM)
            .unwrap()
            .try_into()
            .unwrap();
        let mut out = vec![0u8; frame.len() + 256];
        program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .expect("test_run")
            .return_value
    }

    fn count(&self, reason: ExitReason) -> Counter {
        let counters: PerCpuArray<&MapData, Counter> =
            PerCpuArray::try_from(self.ebpf.map(map_names::EXIT_COUNTERS).unwrap()).unwrap();
        counters
            .get(&(reason as u32), 0)
            .unwrap()
            .iter()
            .fold(Counter::default(), |sum, c| Counter {
                packets: sum.packets + c.packets,
                bytes: sum.bytes + c.bytes,
            })
    }

    /// Runs `frame`, expecting `action` and exactly one more count for `reason` (with the frame's
    /// bytes) and no change to any other reason.
    fn expect(&self, frame: &[u8], action: u32, reason: ExitReason) {
        let before: Vec<Counter> = ExitReason::ALL.iter().map(|&r| self.count(r)).collect();
        assert_eq!(self.run(frame), action, "action for {reason:?}");
        for (i, &r) in ExitReason::ALL.iter().enumerate() {
            let after = self.count(r);
            if r == reason {
                assert_eq!(after.packets, before[i].packets + 1, "{r:?} packets");
                assert_eq!(
                    after.bytes,
                    before[i].bytes + frame.len() as u64,
                    "{r:?} bytes"
                );
            } else {
                assert_eq!(after, before[i], "{r:?} must not change");
            }
        }
    }
}

fn udp4(src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(SERVER, GATEWAY, 64)
        .udp(src_port, dst_port);
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut frame, payload).unwrap();
    frame
}

fn udp6(src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv6(SERVER6, GATEWAY6, 64)
        .udp(src_port, dst_port);
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut frame, payload).unwrap();
    frame
}

fn tcp4() -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(SERVER, GATEWAY, 64)
        .tcp(40000, 80, 1, 1000);
    let mut frame = Vec::new();
    builder.write(&mut frame, b"GET /").unwrap();
    frame
}

#[test]
fn unbound_udp_is_dropped_and_counted() {
    let xdp = Loaded::new();
    xdp.expect(&udp4(6000, 30000, b"junk"), XDP_DROP, ExitReason::NoBinding);
    xdp.expect(&udp6(6000, 30000, b"junk"), XDP_DROP, ExitReason::NoBinding);
}

#[test]
fn non_udp_passes() {
    let xdp = Loaded::new();
    xdp.expect(&tcp4(), XDP_PASS, ExitReason::NotUdpPassed);
    // ARP request.
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&MAC_A);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&MAC_A);
    arp.extend_from_slice(&SERVER);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&GATEWAY);
    xdp.expect(&arp, XDP_PASS, ExitReason::NotUdpPassed);
    // IPv6 neighbour solicitation (ICMPv6, next header 58).
    let builder = PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv6(SERVER6, GATEWAY6, 255)
        .icmpv6_echo_request(1, 1);
    let mut icmp6 = Vec::new();
    builder.write(&mut icmp6, b"ping").unwrap();
    xdp.expect(&icmp6, XDP_PASS, ExitReason::NotUdpPassed);
}

#[test]
fn truncated_headers_are_dropped() {
    let xdp = Loaded::new();
    let v4 = udp4(6000, 30000, b"");
    let v6 = udp6(6000, 30000, b"");
    // Ethernet cut inside its type field (after the VLAN tag's TPID).
    let mut vlan_cut = v4[..12].to_vec();
    vlan_cut.extend_from_slice(&[0x81, 0x00, 0x00]);
    xdp.expect(&vlan_cut, XDP_DROP, ExitReason::TruncatedHeader);
    xdp.expect(&v4[..ETH + 19], XDP_DROP, ExitReason::TruncatedHeader);
    xdp.expect(&v4[..ETH + 20 + 7], XDP_DROP, ExitReason::TruncatedHeader);
    xdp.expect(&v6[..ETH + 39], XDP_DROP, ExitReason::TruncatedHeader);
    xdp.expect(&v6[..ETH + 40 + 7], XDP_DROP, ExitReason::TruncatedHeader);
}

#[test]
fn ipv4_fragments_and_options_are_dropped_for_udp_only() {
    let xdp = Loaded::new();
    let mut first_fragment = udp4(6000, 30000, b"payload");
    first_fragment[ETH + 6] |= 0x20; // MF
    xdp.expect(&first_fragment, XDP_DROP, ExitReason::IpFragment);
    let mut later_fragment = udp4(6000, 30000, b"payload");
    later_fragment[ETH + 7] = 0x10; // offset 16 * 8
    xdp.expect(&later_fragment, XDP_DROP, ExitReason::IpFragment);

    // IHL 6: one word of options (NOP NOP NOP EOL) inserted after the fixed header.
    let plain = udp4(6000, 30000, b"payload");
    let with_options = with_ipv4_options(&plain);
    xdp.expect(&with_options, XDP_DROP, ExitReason::Ipv4Options);

    // TCP with options and as a fragment still passes: those drops are for UDP only.
    let mut tcp_fragment = tcp4();
    tcp_fragment[ETH + 6] |= 0x20;
    xdp.expect(&tcp_fragment, XDP_PASS, ExitReason::NotUdpPassed);

    let mut bad_ihl = udp4(6000, 30000, b"payload");
    bad_ihl[ETH] = 0x44;
    xdp.expect(&bad_ihl, XDP_DROP, ExitReason::MalformedIpHeader);
}

#[test]
fn ipv6_extension_headers() {
    let xdp = Loaded::new();
    let plain = udp6(6000, 30000, b"payload");
    // Destination options are walked: the UDP behind them is looked up (and dropped, unbound).
    let dest_opts = with_ipv6_ext(&plain, 60, [0, 0, 1, 4, 0, 0, 0, 0]);
    xdp.expect(&dest_opts, XDP_DROP, ExitReason::NoBinding);
    // A fragment header in front of UDP.
    let fragment = with_ipv6_ext(&plain, 44, [0, 0, 0, 1, 0, 0, 0, 7]);
    xdp.expect(&fragment, XDP_DROP, ExitReason::IpFragment);
    // A chain longer than the program walks: counted, dropped.
    let mut long = plain.clone();
    for _ in 0..5 {
        long = with_ipv6_ext(&long, 60, [0, 0, 1, 4, 0, 0, 0, 0]);
    }
    xdp.expect(&long, XDP_DROP, ExitReason::Ipv6ExtensionHeaders);
    // A truncated extension header.
    xdp.expect(
        &dest_opts[..=ETH + 40],
        XDP_DROP,
        ExitReason::TruncatedHeader,
    );
}

#[test]
fn vlan_tagged_udp_is_parsed() {
    let xdp = Loaded::new();
    let plain = udp4(6000, 30000, b"payload");
    let mut single = plain[..12].to_vec();
    single.extend_from_slice(&[0x81, 0x00, 0x00, 0x0a]);
    single.extend_from_slice(&plain[12..]);
    xdp.expect(&single, XDP_DROP, ExitReason::NoBinding);
    let mut double = plain[..12].to_vec();
    double.extend_from_slice(&[0x88, 0xa8, 0x00, 0x0b, 0x81, 0x00, 0x00, 0x0a]);
    double.extend_from_slice(&plain[12..]);
    xdp.expect(&double, XDP_DROP, ExitReason::NoBinding);
}

#[test]
fn allow_listed_dns_reply_passes() {
    let mut xdp = Loaded::new();
    {
        let mut allow: HashMap<&mut MapData, HostAllowKey, HostAllowValue> =
            HashMap::try_from(xdp.ebpf.map_mut(map_names::HOST_ALLOW).unwrap()).unwrap();
        let key = HostAllowKey {
            remote_addr: ipv4_mapped(SERVER),
            local_addr: ipv4_mapped(GATEWAY),
            remote_port_be: 53u16.to_be(),
            local_port_be: 40053u16.to_be(),
        };
        allow.insert(key, HostAllowValue::default(), 0).unwrap();
    }
    xdp.expect(
        &udp4(53, 40053, b"dns reply"),
        XDP_PASS,
        ExitReason::HostAllowListed,
    );
    // Exact match only: another local port or another remote port is dropped.
    xdp.expect(
        &udp4(53, 40054, b"dns reply"),
        XDP_DROP,
        ExitReason::NoBinding,
    );
    xdp.expect(
        &udp4(54, 40053, b"dns reply"),
        XDP_DROP,
        ExitReason::NoBinding,
    );
}

/// The SOCKS control listener of these tests: an internal address, as the weak-host model would
/// deliver it from outside.
const CONTROL: [u8; 4] = [198, 51, 100, 1];
const CONTROL6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

fn tcp_syn(builder: etherparse::PacketBuilderStep<etherparse::IpHeaders>, port: u16) -> Vec<u8> {
    let builder = builder.tcp(40000, port, 1, 1000).syn();
    let mut frame = Vec::new();
    builder.write(&mut frame, b"").unwrap();
    frame
}

fn syn4(dst: [u8; 4], port: u16) -> Vec<u8> {
    tcp_syn(
        PacketBuilder::ethernet2(MAC_A, MAC_B).ipv4(SERVER, dst, 64),
        port,
    )
}

fn syn6(dst: [u8; 16], port: u16) -> Vec<u8> {
    tcp_syn(
        PacketBuilder::ethernet2(MAC_A, MAC_B).ipv6(SERVER6, dst, 64),
        port,
    )
}

impl Loaded {
    fn add_control_port(&mut self, addr: [u8; 16], port: u16) {
        let mut ports: HashMap<&mut MapData, ControlPortKey, u32> =
            HashMap::try_from(self.ebpf.map_mut(map_names::CONTROL_PORTS).unwrap()).unwrap();
        let key = ControlPortKey {
            addr,
            port_be: port.to_be(),
            padding: 0,
        };
        ports.insert(key, 0, 0).unwrap();
    }
}

#[test]
fn tcp_to_the_control_port_from_outside_is_dropped() {
    let mut xdp = Loaded::new();
    xdp.add_control_port(ipv4_mapped(CONTROL), 1080);
    xdp.add_control_port(CONTROL6, 1080);
    // A wildcard listener on 1081: any address.
    xdp.add_control_port([0; 16], 1081);

    let reason = ExitReason::ControlPortFromOutside;
    xdp.expect(&syn4(CONTROL, 1080), XDP_DROP, reason);
    xdp.expect(&syn6(CONTROL6, 1080), XDP_DROP, reason);
    xdp.expect(&syn4(GATEWAY, 1081), XDP_DROP, reason);
    xdp.expect(&syn6(GATEWAY6, 1081), XDP_DROP, reason);
    // Other ports and other addresses stay reachable (the host's own TCP services).
    xdp.expect(&syn4(CONTROL, 80), XDP_PASS, ExitReason::NotUdpPassed);
    xdp.expect(&syn4(GATEWAY, 1080), XDP_PASS, ExitReason::NotUdpPassed);
    xdp.expect(&syn6(GATEWAY6, 1080), XDP_PASS, ExitReason::NotUdpPassed);

    // IPv4 options do not hide the port.
    let plain = syn4(CONTROL, 1080);
    let with_options = with_ipv4_options(&plain);
    xdp.expect(&with_options, XDP_DROP, reason);
    // Nor does a first fragment, nor IPv6 extension headers before TCP.
    let mut first_fragment = syn4(CONTROL, 1080);
    first_fragment[ETH + 6] |= 0x20;
    xdp.expect(&first_fragment, XDP_DROP, reason);
    let hop_by_hop = with_ipv6_ext(&syn6(CONTROL6, 1080), 0, [0, 0, 1, 4, 0, 0, 0, 0]);
    xdp.expect(&hop_by_hop, XDP_DROP, reason);
    let first6 = with_ipv6_ext(&syn6(CONTROL6, 1080), 44, [0, 0, 0, 1, 0, 0, 0, 7]);
    xdp.expect(&first6, XDP_DROP, reason);
    // A later fragment carries no ports (and never reassembles without its first): passed.
    let mut later_fragment = syn4(CONTROL, 1080);
    later_fragment[ETH + 7] = 0x10;
    xdp.expect(&later_fragment, XDP_PASS, ExitReason::NotUdpPassed);
    // A first fragment cut before the ports is a counted drop, not a pass.
    xdp.expect(
        &first_fragment[..ETH + 20 + 3],
        XDP_DROP,
        ExitReason::TruncatedHeader,
    );
}
