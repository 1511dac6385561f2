//! Datapath unit tests: the gate run by the kernel (`BPF_PROG_TEST_RUN`) on hand-built frames,
//! checking the verdict and the per-reason counters, in each of its hooks: the XDP program and
//! the tc program that gates and relays in one. Root only.

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use etherparse::PacketBuilder;
use gateway::datapath::EBPF_OBJECT;
use gateway_common::{
    ControlPortKey, Counter, ExitReason, HostAllowKey, HostAllowValue, LEASE_NS, MonitorBudget,
    MonitorEvent, MonitorHook, MonitorSettings, TC_GATE_PROGRAM, XDP_EXTERNAL_PROGRAM, ipv4_mapped,
    map_names,
};
use testbed::frames::{ETH, with_ipv4_options, with_ipv6_ext};

/// The verdict a test expects, whichever hook gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Pass,
    Drop,
}
use Verdict::{Drop as DROP, Pass as PASS};

/// Where the gate runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hook {
    Xdp,
    Tc,
}

impl Hook {
    fn verdict(self, action: u32) -> Option<Verdict> {
        const XDP_DROP: u32 = 1;
        const XDP_PASS: u32 = 2;
        const TC_ACT_OK: u32 = 0;
        const TC_ACT_SHOT: u32 = 2;
        match (self, action) {
            (Self::Xdp, XDP_PASS) | (Self::Tc, TC_ACT_OK) => Some(PASS),
            (Self::Xdp, XDP_DROP) | (Self::Tc, TC_ACT_SHOT) => Some(DROP),
            _ => None,
        }
    }
}

const SERVER: [u8; 4] = [203, 0, 113, 2];
const GATEWAY: [u8; 4] = [203, 0, 113, 1];
const SERVER6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const GATEWAY6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];

struct Loaded {
    ebpf: Ebpf,
    hook: Hook,
}

impl Loaded {
    fn new(hook: Hook) -> Self {
        assert!(!EBPF_OBJECT.is_empty(), "the eBPF object was not built");
        let mut ebpf = EbpfLoader::new().load(EBPF_OBJECT).expect("load object");
        match hook {
            Hook::Xdp => {
                let program: &mut Xdp = ebpf
                    .program_mut(XDP_EXTERNAL_PROGRAM)
                    .unwrap()
                    .try_into()
                    .unwrap();
                program.load().expect("verifier accepts the XDP gate");
            }
            Hook::Tc => {
                let program: &mut SchedClassifier = ebpf
                    .program_mut(TC_GATE_PROGRAM)
                    .unwrap()
                    .try_into()
                    .unwrap();
                program.load().expect("verifier accepts the tc gate");
            }
        }
        Self { ebpf, hook }
    }

    /// A fresh load of the gate in each hook.
    fn each_hook() -> [Self; 2] {
        [Self::new(Hook::Xdp), Self::new(Hook::Tc)]
    }

    fn run(&self, frame: &[u8]) -> Verdict {
        let mut out = vec![0u8; frame.len() + 256];
        let options = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        };
        let action = match self.hook {
            Hook::Xdp => {
                let program: &Xdp = self
                    .ebpf
                    .program(XDP_EXTERNAL_PROGRAM)
                    .unwrap()
                    .try_into()
                    .unwrap();
                program.test_run(options)
            }
            Hook::Tc => {
                let program: &SchedClassifier = self
                    .ebpf
                    .program(TC_GATE_PROGRAM)
                    .unwrap()
                    .try_into()
                    .unwrap();
                program.test_run(options)
            }
        }
        .unwrap_or_else(|e| panic!("{:?} test_run of {} octets: {e}", self.hook, frame.len()))
        .return_value;
        self.hook
            .verdict(action)
            .unwrap_or_else(|| panic!("{:?} gate returned action {action}", self.hook))
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
    fn expect(&self, frame: &[u8], verdict: Verdict, reason: ExitReason) {
        let before: Vec<Counter> = ExitReason::ALL.iter().map(|&r| self.count(r)).collect();
        let hook = self.hook;
        assert_eq!(self.run(frame), verdict, "{hook:?} verdict for {reason:?}");
        for (i, &r) in ExitReason::ALL.iter().enumerate() {
            let after = self.count(r);
            if r == reason {
                assert_eq!(
                    after.packets,
                    before[i].packets + 1,
                    "{hook:?} {r:?} packets"
                );
                assert_eq!(
                    after.bytes,
                    before[i].bytes + frame.len() as u64,
                    "{hook:?} {r:?} bytes"
                );
            } else {
                assert_eq!(after, before[i], "{hook:?} {r:?} must not change");
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
    for gate in Loaded::each_hook() {
        gate.expect(&udp4(6000, 30000, b"junk"), DROP, ExitReason::NoBinding);
        gate.expect(&udp6(6000, 30000, b"junk"), DROP, ExitReason::NoBinding);
    }
}

#[test]
fn non_udp_passes() {
    for gate in Loaded::each_hook() {
        gate.expect(&tcp4(), PASS, ExitReason::NotUdpPassed);
        // ARP request.
        let mut arp = vec![0xff; 6];
        arp.extend_from_slice(&MAC_A);
        arp.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&MAC_A);
        arp.extend_from_slice(&SERVER);
        arp.extend_from_slice(&[0; 6]);
        arp.extend_from_slice(&GATEWAY);
        gate.expect(&arp, PASS, ExitReason::NotUdpPassed);
        // IPv6 neighbour solicitation (ICMPv6, next header 58).
        let builder = PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv6(SERVER6, GATEWAY6, 255)
            .icmpv6_echo_request(1, 1);
        let mut icmp6 = Vec::new();
        builder.write(&mut icmp6, b"ping").unwrap();
        gate.expect(&icmp6, PASS, ExitReason::NotUdpPassed);
    }
}

#[test]
fn truncated_headers_are_dropped() {
    for gate in Loaded::each_hook() {
        let v4 = udp4(6000, 30000, b"");
        let v6 = udp6(6000, 30000, b"");
        // Ethernet cut inside its type field (after the VLAN tag's TPID).
        let mut vlan_cut = v4[..12].to_vec();
        vlan_cut.extend_from_slice(&[0x81, 0x00, 0x00]);
        // The kernel's test run refuses a tc program frames cut inside the VLAN tag or the IP
        // header (the stack untags VLAN before tc ingress and drops a cut tag; a cut IP header
        // the tc gate reads through the same bounds-checked parser as XDP).
        if gate.hook == Hook::Xdp {
            gate.expect(&vlan_cut, DROP, ExitReason::TruncatedHeader);
            gate.expect(&v4[..ETH + 19], DROP, ExitReason::TruncatedHeader);
            gate.expect(&v6[..ETH + 39], DROP, ExitReason::TruncatedHeader);
        }
        gate.expect(&v4[..ETH + 20 + 7], DROP, ExitReason::TruncatedHeader);
        gate.expect(&v6[..ETH + 40 + 7], DROP, ExitReason::TruncatedHeader);
    }
}

#[test]
fn ipv4_fragments_and_options_are_dropped_for_udp_only() {
    for gate in Loaded::each_hook() {
        let mut first_fragment = udp4(6000, 30000, b"payload");
        first_fragment[ETH + 6] |= 0x20; // MF
        gate.expect(&first_fragment, DROP, ExitReason::IpFragment);
        let mut later_fragment = udp4(6000, 30000, b"payload");
        later_fragment[ETH + 7] = 0x10; // offset 16 * 8
        gate.expect(&later_fragment, DROP, ExitReason::IpFragment);

        // IHL 6: one word of options (NOP NOP NOP EOL) inserted after the fixed header.
        let plain = udp4(6000, 30000, b"payload");
        let with_options = with_ipv4_options(&plain);
        gate.expect(&with_options, DROP, ExitReason::Ipv4Options);

        // TCP with options and as a fragment still passes: those drops are for UDP only.
        let mut tcp_fragment = tcp4();
        tcp_fragment[ETH + 6] |= 0x20;
        gate.expect(&tcp_fragment, PASS, ExitReason::NotUdpPassed);

        let mut bad_ihl = udp4(6000, 30000, b"payload");
        bad_ihl[ETH] = 0x44;
        gate.expect(&bad_ihl, DROP, ExitReason::MalformedIpHeader);
    }
}

#[test]
fn ipv6_extension_headers() {
    for gate in Loaded::each_hook() {
        let plain = udp6(6000, 30000, b"payload");
        // Destination options are walked: the UDP behind them is looked up (and dropped, unbound).
        let dest_opts = with_ipv6_ext(&plain, 60, [0, 0, 1, 4, 0, 0, 0, 0]);
        gate.expect(&dest_opts, DROP, ExitReason::NoBinding);
        // A fragment header in front of UDP.
        let fragment = with_ipv6_ext(&plain, 44, [0, 0, 0, 1, 0, 0, 0, 7]);
        gate.expect(&fragment, DROP, ExitReason::IpFragment);
        // A chain longer than the program walks: counted, dropped.
        let mut long = plain.clone();
        for _ in 0..5 {
            long = with_ipv6_ext(&long, 60, [0, 0, 1, 4, 0, 0, 0, 0]);
        }
        gate.expect(&long, DROP, ExitReason::Ipv6ExtensionHeaders);
        // A truncated extension header.
        gate.expect(&dest_opts[..=ETH + 40], DROP, ExitReason::TruncatedHeader);
    }
}

#[test]
fn vlan_tagged_udp_is_parsed() {
    for gate in Loaded::each_hook() {
        let plain = udp4(6000, 30000, b"payload");
        let mut single = plain[..12].to_vec();
        single.extend_from_slice(&[0x81, 0x00, 0x00, 0x0a]);
        single.extend_from_slice(&plain[12..]);
        gate.expect(&single, DROP, ExitReason::NoBinding);
        let mut double = plain[..12].to_vec();
        double.extend_from_slice(&[0x88, 0xa8, 0x00, 0x0b, 0x81, 0x00, 0x00, 0x0a]);
        double.extend_from_slice(&plain[12..]);
        gate.expect(&double, DROP, ExitReason::NoBinding);
    }
}

#[test]
fn allow_listed_dns_reply_passes() {
    for mut gate in Loaded::each_hook() {
        {
            let mut allow: HashMap<&mut MapData, HostAllowKey, HostAllowValue> =
                HashMap::try_from(gate.ebpf.map_mut(map_names::HOST_ALLOW).unwrap()).unwrap();
            let key = HostAllowKey {
                remote_addr: ipv4_mapped(SERVER),
                local_addr: ipv4_mapped(GATEWAY),
                remote_port_be: 53u16.to_be(),
                local_port_be: 40053u16.to_be(),
            };
            allow.insert(key, HostAllowValue::default(), 0).unwrap();
        }
        gate.expect(
            &udp4(53, 40053, b"dns reply"),
            PASS,
            ExitReason::HostAllowListed,
        );
        // Exact match only: another local port or another remote port is dropped.
        gate.expect(&udp4(53, 40054, b"dns reply"), DROP, ExitReason::NoBinding);
        gate.expect(&udp4(54, 40053, b"dns reply"), DROP, ExitReason::NoBinding);
    }
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
    for mut gate in Loaded::each_hook() {
        gate.add_control_port(ipv4_mapped(CONTROL), 1080);
        gate.add_control_port(CONTROL6, 1080);
        // A wildcard listener on 1081: any address.
        gate.add_control_port([0; 16], 1081);

        let reason = ExitReason::ControlPortFromOutside;
        gate.expect(&syn4(CONTROL, 1080), DROP, reason);
        gate.expect(&syn6(CONTROL6, 1080), DROP, reason);
        gate.expect(&syn4(GATEWAY, 1081), DROP, reason);
        gate.expect(&syn6(GATEWAY6, 1081), DROP, reason);
        // Other ports and other addresses stay reachable (the host's own TCP services).
        gate.expect(&syn4(CONTROL, 80), PASS, ExitReason::NotUdpPassed);
        gate.expect(&syn4(GATEWAY, 1080), PASS, ExitReason::NotUdpPassed);
        gate.expect(&syn6(GATEWAY6, 1080), PASS, ExitReason::NotUdpPassed);

        // IPv4 options do not hide the port.
        let plain = syn4(CONTROL, 1080);
        let with_options = with_ipv4_options(&plain);
        gate.expect(&with_options, DROP, reason);
        // Nor does a first fragment, nor IPv6 extension headers before TCP.
        let mut first_fragment = syn4(CONTROL, 1080);
        first_fragment[ETH + 6] |= 0x20;
        gate.expect(&first_fragment, DROP, reason);
        let hop_by_hop = with_ipv6_ext(&syn6(CONTROL6, 1080), 0, [0, 0, 1, 4, 0, 0, 0, 0]);
        gate.expect(&hop_by_hop, DROP, reason);
        let first6 = with_ipv6_ext(&syn6(CONTROL6, 1080), 44, [0, 0, 0, 1, 0, 0, 0, 7]);
        gate.expect(&first6, DROP, reason);
        // A later fragment carries no ports (and never reassembles without its first): passed.
        let mut later_fragment = syn4(CONTROL, 1080);
        later_fragment[ETH + 7] = 0x10;
        gate.expect(&later_fragment, PASS, ExitReason::NotUdpPassed);
        // A first fragment cut before the ports is a counted drop, not a pass.
        gate.expect(
            &first_fragment[..ETH + 20 + 3],
            DROP,
            ExitReason::TruncatedHeader,
        );
    }
}

/// `gateway monitor`'s side of the gate: what a watcher asked for, and what the gate wrote.
impl Loaded {
    fn watch(&mut self, settings: MonitorSettings) {
        let mut map: Array<&mut MapData, MonitorSettings> =
            Array::try_from(self.ebpf.map_mut(map_names::MONITOR_SETTINGS).unwrap()).unwrap();
        map.set(0, settings, 0).unwrap();
    }

    /// Runs `frame` `times` times in one test run (on one CPU, so one CPU's budget applies).
    fn run_times(&self, frame: &[u8], times: u32) {
        let mut out = vec![0u8; frame.len() + 256];
        let options = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: times,
            ..TestRunOptions::default()
        };
        let name = match self.hook {
            Hook::Xdp => XDP_EXTERNAL_PROGRAM,
            Hook::Tc => TC_GATE_PROGRAM,
        };
        let program = self.ebpf.program(name).unwrap();
        match self.hook {
            Hook::Xdp => <&Xdp>::try_from(program).unwrap().test_run(options),
            Hook::Tc => <&SchedClassifier>::try_from(program)
                .unwrap()
                .test_run(options),
        }
        .unwrap();
    }

    fn events(&mut self) -> Vec<MonitorEvent> {
        let mut ring =
            RingBuf::try_from(self.ebpf.map_mut(map_names::MONITOR_EVENTS).unwrap()).unwrap();
        let mut events = Vec::new();
        while let Some(record) = ring.next() {
            events.push(gateway::monitor::render::decode(&record).expect("an event"));
        }
        events
    }

    fn budget(&self) -> MonitorBudget {
        let map: PerCpuArray<&MapData, MonitorBudget> =
            PerCpuArray::try_from(self.ebpf.map(map_names::MONITOR_BUDGET).unwrap()).unwrap();
        map.get(&0, 0)
            .unwrap()
            .iter()
            .fold(MonitorBudget::default(), |sum, cpu| MonitorBudget {
                emitted: sum.emitted + cpu.emitted,
                sampled_out: sum.sampled_out + cpu.sampled_out,
                rate_limited: sum.rate_limited + cpu.rate_limited,
                ring_full: sum.ring_full + cpu.ring_full,
                ..MonitorBudget::default()
            })
    }
}

fn watching(reasons: &[ExitReason], sample_every: u32, events_per_second: u32) -> MonitorSettings {
    MonitorSettings {
        lease_until_ns: gateway::datapath::monotonic_ns() + LEASE_NS,
        reasons: reasons.iter().fold(0, |mask, r| mask | 1 << *r as u32),
        sample_every,
        events_per_second,
        watcher_pid: std::process::id(),
        window: 1,
    }
}

#[test]
fn a_watched_drop_is_an_event_with_its_addresses_and_ports() {
    for mut gate in Loaded::each_hook() {
        let hook = gate.hook;
        gate.watch(watching(&[ExitReason::NoBinding], 1, 100));
        let frame = udp4(6000, 30000, b"junk");
        gate.expect(&frame, DROP, ExitReason::NoBinding);
        gate.expect(&udp6(6001, 30001, b"junk6"), DROP, ExitReason::NoBinding);
        // Not watched: counted, not shown.
        gate.expect(&tcp4(), PASS, ExitReason::NotUdpPassed);
        let events = gate.events();
        assert_eq!(events.len(), 2, "{hook:?}: {events:?}");
        let (v4, v6) = (&events[0], &events[1]);
        assert_eq!(v4.reason, ExitReason::NoBinding as u32);
        assert_eq!(v4.protocol, 17);
        assert_eq!(v4.src_addr, ipv4_mapped(SERVER));
        assert_eq!(v4.dst_addr, ipv4_mapped(GATEWAY));
        assert_eq!(u16::from_be(v4.src_port_be), 6000);
        assert_eq!(u16::from_be(v4.dst_port_be), 30000);
        assert_eq!(v4.len as usize, frame.len());
        let expected_hook = match hook {
            Hook::Xdp => MonitorHook::XdpGate,
            Hook::Tc => MonitorHook::TcGate,
        };
        assert_eq!(v4.hook, expected_hook as u8);
        assert_eq!((v6.src_addr, v6.dst_addr), (SERVER6, GATEWAY6));
        assert_eq!(u16::from_be(v6.src_port_be), 6001);
        assert!(v6.time_ns >= v4.time_ns);
        assert_eq!(gate.budget().emitted, 2);
    }
}

#[test]
fn without_a_live_lease_nothing_is_written() {
    for mut gate in Loaded::each_hook() {
        let frame = udp4(6000, 30000, b"junk");
        gate.expect(&frame, DROP, ExitReason::NoBinding);
        let mut expired = watching(&[ExitReason::NoBinding], 1, 100);
        expired.lease_until_ns = gateway::datapath::monotonic_ns() - 1;
        gate.watch(expired);
        gate.expect(&frame, DROP, ExitReason::NoBinding);
        assert!(gate.events().is_empty(), "{:?}", gate.hook);
        assert_eq!(gate.budget(), MonitorBudget::default());
    }
}

#[test]
fn sampling_and_the_rate_limit_bound_a_flood() {
    for mut gate in Loaded::each_hook() {
        let frame = udp4(6000, 30000, b"junk");
        // Every 4th of 40: 10 considered, of which the rate limit lets 3 through.
        gate.watch(watching(&[ExitReason::NoBinding], 4, 3));
        gate.run_times(&frame, 40);
        let budget = gate.budget();
        assert_eq!(gate.events().len(), 3, "{:?}", gate.hook);
        assert_eq!(
            (budget.emitted, budget.sampled_out, budget.rate_limited),
            (3, 30, 7),
            "{:?}",
            gate.hook
        );
        // The watcher's next window lets as many through again.
        let mut next = watching(&[ExitReason::NoBinding], 4, 3);
        next.window = 2;
        gate.watch(next);
        gate.run_times(&frame, 40);
        assert_eq!(gate.events().len(), 3, "{:?}", gate.hook);
        assert_eq!(gate.budget().rate_limited, 14);
    }
}
