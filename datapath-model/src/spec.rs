//! The datapath's rules, written from the architecture and protocol documents rather than from
//! the programs: what each program must answer for any frame, given the maps ([`World`]). The
//! verdict (the program's return value), every exit reason counted, and the frame as it leaves.
//!
//! - The gate (XDP `gateway_external`, and the first half of tc `gateway_gate`): Ethernet with
//!   up to two VLAN tags; IPv4 (UDP fragments and UDP with options dropped) or IPv6 with a walk
//!   of at most four extension headers (longer chains dropped, UDP fragments dropped); a header
//!   cut short is a drop. UDP meets, in order: a received group (and its source list), the exact
//!   binding, the host allow-list, a host-level binding, a Listen binding; nothing else is
//!   admitted, and with the daemon's heartbeat stale nothing is. TCP to a control listener is
//!   dropped; everything else passes.
//! - Behind the XDP gate, tc `gateway_inbound`: a UDP datagram to a group (read at the plain
//!   IPv4 or IPv6 offsets, no VLAN tag) goes to the fan-out program (not loaded here: the
//!   userspace relay); everything else to the inbound kernel relay, as in `gateway_gate`.
//! - The kernel relay (the second half of `gateway_gate`, `gateway_inbound`, and
//!   `gateway_internal`): only plain IPv4 (IHL 5, unfragmented) or IPv6 with UDP right after
//!   the fixed header, only exact entries, only within one family; a framed relay (enhanced,
//!   SOCKS5) only for a datagram whose UDP length is its IP payload's and which the frame holds
//!   whole, and not for a checksum the stack has yet to complete. A relayed datagram's checksums keep their error
//!   (RFC 1624): valid stays valid. RAW rewrites one end (address and port) and nothing else.
//! - The internal side first drops UDP (or what may be UDP) to an external address.

use gateway_common::{Addr16, ExitReason, Verdict, framing, ipv4_mapped};

use crate::{
    checksum,
    world::{Binding, End, Outbound, World},
};

const ETH_HLEN: usize = 14;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const UDP: u8 = 17;
const TCP: u8 = 6;
const UDP_HLEN: usize = 8;

/// The program return values (`XDP_*`, `TC_ACT_*`).
pub mod action {
    pub const XDP_DROP: u32 = 1;
    pub const XDP_PASS: u32 = 2;
    pub const TC_ACT_OK: u32 = 0;
    pub const TC_ACT_SHOT: u32 = 2;
    pub const TC_ACT_REDIRECT: u32 = 7;
}

/// The programs the model describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Program {
    /// XDP on the external interface: the gate.
    XdpGate,
    /// tc ingress on the external interface: the gate and the inbound relay.
    TcGate,
    /// tc ingress on the external interface behind the XDP gate: the inbound relay.
    TcInbound,
    /// tc ingress on the internal interface.
    TcInternal,
}

impl Program {
    pub const ALL: [Self; 4] = [
        Self::XdpGate,
        Self::TcGate,
        Self::TcInbound,
        Self::TcInternal,
    ];
}

/// What a program does with one frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub action: u32,
    /// Every exit counted, in order (the tc gate counts the gate's and then the relay's).
    pub counted: Vec<ExitReason>,
    /// The frame as the program leaves it.
    pub frame: Vec<u8>,
}

/// The model's answer for `program` on `frame`.
pub fn run(program: Program, world: &World, frame: &[u8]) -> Outcome {
    match program {
        Program::XdpGate => {
            let reason = gate(world, frame);
            let action = match reason.verdict() {
                Verdict::Drop => action::XDP_DROP,
                Verdict::Pass | Verdict::Redirect => action::XDP_PASS,
            };
            Outcome {
                action,
                counted: vec![reason],
                frame: frame.to_vec(),
            }
        }
        Program::TcGate => tc_gate(world, frame),
        Program::TcInbound => tc_inbound(world, frame),
        Program::TcInternal => internal(world, frame),
    }
}

fn unchanged(action: u32, counted: Vec<ExitReason>, frame: &[u8]) -> Outcome {
    Outcome {
        action,
        counted,
        frame: frame.to_vec(),
    }
}

fn tc_action(reason: ExitReason) -> u32 {
    match reason.verdict() {
        Verdict::Pass => action::TC_ACT_OK,
        Verdict::Drop => action::TC_ACT_SHOT,
        Verdict::Redirect => action::TC_ACT_REDIRECT,
    }
}

fn tc_gate(world: &World, frame: &[u8]) -> Outcome {
    let reason = gate(world, frame);
    match reason {
        ExitReason::BindingToKernelRelay => {
            let (exit, out) = inbound(world, frame);
            Outcome {
                action: tc_action(exit),
                counted: vec![reason, exit],
                frame: out.unwrap_or_else(|| frame.to_vec()),
            }
        }
        // No fan-out program is loaded here: the userspace relay serves the group.
        ExitReason::MulticastToFanOut => unchanged(
            action::TC_ACT_OK,
            vec![reason, ExitReason::MulticastToUserspace],
            frame,
        ),
        _ => unchanged(tc_action(reason), vec![reason], frame),
    }
}

fn tc_inbound(world: &World, frame: &[u8]) -> Outcome {
    if to_group(frame) {
        // No fan-out program is loaded here: the userspace relay serves the group.
        return unchanged(
            action::TC_ACT_OK,
            vec![ExitReason::MulticastToUserspace],
            frame,
        );
    }
    let (exit, out) = inbound(world, frame);
    Outcome {
        action: tc_action(exit),
        counted: vec![exit],
        frame: out.unwrap_or_else(|| frame.to_vec()),
    }
}

/// Whether `gateway_inbound` hands a frame to the fan-out: UDP to a group, read at the fixed
/// offsets of an untagged IPv4 header (whatever its IHL) or IPv6 header (UDP next, no extension
/// header: MLD and other `ICMPv6` to groups stay with the stack).
fn to_group(frame: &[u8]) -> bool {
    let at = |offset: usize| frame.get(ETH_HLEN + offset).copied();
    match be16(frame, 12) {
        Some(ETH_P_IPV4) => at(16).is_some_and(|b| b & 0xf0 == 0xe0) && at(9) == Some(UDP),
        Some(ETH_P_IPV6) => at(24) == Some(0xff) && at(6) == Some(UDP),
        _ => false,
    }
}

fn be16(frame: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]))
}

fn bytes<const N: usize>(frame: &[u8], at: usize) -> Option<[u8; N]> {
    frame.get(at..at + N)?.try_into().ok()
}

fn addr16_at(frame: &[u8], at: usize) -> Option<Addr16> {
    bytes::<16>(frame, at)
}

fn v4_at(frame: &[u8], at: usize) -> Option<Addr16> {
    bytes::<4>(frame, at).map(ipv4_mapped)
}

fn is_v4(addr: &Addr16) -> bool {
    addr[..10] == [0; 10] && addr[10..12] == [0xff, 0xff]
}

fn is_multicast(addr: &Addr16) -> bool {
    if is_v4(addr) {
        addr[12] & 0xf0 == 0xe0
    } else {
        addr[0] == 0xff
    }
}

/// A datagram or segment the gate decides on.
struct Flow {
    udp: bool,
    src: End,
    dst: End,
}

const TRUNCATED: ExitReason = ExitReason::TruncatedHeader;

/// The gate's reading of a frame: `Ok(None)` for what it passes unread.
fn flow(frame: &[u8]) -> Result<Option<Flow>, ExitReason> {
    let mut ether_type = be16(frame, 12).ok_or(TRUNCATED)?;
    let mut l3 = ETH_HLEN;
    for _ in 0..2 {
        if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
            ether_type = be16(frame, l3 + 2).ok_or(TRUNCATED)?;
            l3 += 4;
        }
    }
    match ether_type {
        ETH_P_IPV4 => flow_v4(frame, l3),
        ETH_P_IPV6 => flow_v6(frame, l3),
        _ => Ok(None),
    }
}

fn ports(frame: &[u8], l4: usize, udp: bool, src: Addr16, dst: Addr16) -> Result<Flow, ExitReason> {
    // A UDP header must be whole; of TCP only the ports are read.
    let need = if udp { UDP_HLEN } else { 4 };
    frame.get(l4..l4 + need).ok_or(TRUNCATED)?;
    Ok(Flow {
        udp,
        src: End {
            addr: src,
            port: be16(frame, l4).ok_or(TRUNCATED)?,
        },
        dst: End {
            addr: dst,
            port: be16(frame, l4 + 2).ok_or(TRUNCATED)?,
        },
    })
}

#[expect(
    clippy::verbose_bit_mask,
    reason = "the flags and offset field as RFC 791 draws it"
)]
fn flow_v4(frame: &[u8], l3: usize) -> Result<Option<Flow>, ExitReason> {
    let header = bytes::<20>(frame, l3).ok_or(TRUNCATED)?;
    let header_len = usize::from(header[0] & 0x0f) * 4;
    if header[0] >> 4 != 4 || header_len < 20 {
        return Err(ExitReason::MalformedIpHeader);
    }
    let flags_offset = u16::from_be_bytes([header[6], header[7]]);
    let udp = match header[9] {
        UDP if flags_offset & 0x3fff != 0 => return Err(ExitReason::IpFragment),
        UDP if header_len != 20 => return Err(ExitReason::Ipv4Options),
        UDP => true,
        // A later fragment carries no ports.
        TCP if flags_offset & 0x1fff == 0 => false,
        _ => return Ok(None),
    };
    let src = v4_at(frame, l3 + 12).ok_or(TRUNCATED)?;
    let dst = v4_at(frame, l3 + 16).ok_or(TRUNCATED)?;
    ports(frame, l3 + header_len, udp, src, dst).map(Some)
}

/// Extension headers the gate walks, and how long the longest chain it walks is.
const GATE_EXTENSIONS: [u8; 5] = [0, 43, 44, 51, 60];
const GATE_CHAIN: usize = 4;

fn flow_v6(frame: &[u8], l3: usize) -> Result<Option<Flow>, ExitReason> {
    let header = bytes::<40>(frame, l3).ok_or(TRUNCATED)?;
    if header[0] >> 4 != 6 {
        return Err(ExitReason::MalformedIpHeader);
    }
    let mut next = header[6];
    let mut at = l3 + 40;
    let (mut fragmented, mut later_fragment) = (false, false);
    let mut walked = 0;
    while GATE_EXTENSIONS.contains(&next) {
        if walked == GATE_CHAIN {
            return Err(ExitReason::Ipv6ExtensionHeaders);
        }
        let ext = bytes::<4>(frame, at).ok_or(TRUNCATED)?;
        let len = match next {
            44 => {
                fragmented = true;
                later_fragment |= u16::from_be_bytes([ext[2], ext[3]]) & 0xfff8 != 0;
                8
            }
            51 => (usize::from(ext[1]) + 2) * 4,
            _ => (usize::from(ext[1]) + 1) * 8,
        };
        next = ext[0];
        at += len;
        walked += 1;
    }
    let udp = match next {
        UDP if fragmented => return Err(ExitReason::IpFragment),
        UDP => true,
        TCP if !later_fragment => false,
        _ => return Ok(None),
    };
    let src = addr16_at(frame, l3 + 8).ok_or(TRUNCATED)?;
    let dst = addr16_at(frame, l3 + 24).ok_or(TRUNCATED)?;
    ports(frame, at, udp, src, dst).map(Some)
}

/// The gate's exit for one frame.
pub fn gate(world: &World, frame: &[u8]) -> ExitReason {
    match flow(frame) {
        Err(reason) => reason,
        Ok(None) => ExitReason::NotUdpPassed,
        Ok(Some(flow)) if flow.udp => admit(world, &flow),
        Ok(Some(flow)) => {
            let wildcard = End {
                addr: [0; 16],
                port: flow.dst.port,
            };
            if world.control_port(flow.dst) || world.control_port(wildcard) {
                ExitReason::ControlPortFromOutside
            } else {
                ExitReason::NotUdpPassed
            }
        }
    }
}

fn admit(world: &World, flow: &Flow) -> ExitReason {
    if is_multicast(&flow.dst.addr)
        && let Some(group) = world.group(flow.dst)
    {
        return if group
            .sources
            .as_ref()
            .is_some_and(|sources| !sources.contains(&flow.src.addr))
        {
            ExitReason::MulticastSourceNotAllowed
        } else if !world.daemon_alive {
            ExitReason::DaemonGone
        } else {
            ExitReason::MulticastToFanOut
        };
    }
    let host_level = End {
        addr: flow.src.addr,
        port: 0,
    };
    let any = End {
        addr: [0; 16],
        port: 0,
    };
    let found = match world.binding(flow.src, flow.dst) {
        Some(binding) => Some(binding),
        None if world.host_allowed(flow.src, flow.dst) => return ExitReason::HostAllowListed,
        None => world
            .binding(host_level, flow.dst)
            .or_else(|| world.binding(any, flow.dst)),
    };
    match found {
        None => ExitReason::NoBinding,
        Some(_) if !world.daemon_alive => ExitReason::DaemonGone,
        Some(binding) if binding.kernel => ExitReason::BindingToKernelRelay,
        Some(_) => ExitReason::BindingToUserspace,
    }
}

/// A datagram the kernel relay may rewrite: plain IPv4 or IPv6, UDP right after the fixed header.
struct Datagram {
    v6: bool,
    l4: usize,
    src: End,
    dst: End,
    udp_len: u16,
    check: u16,
    /// The UDP length is the IP payload's, and the frame holds all of it.
    whole: bool,
}

impl Datagram {
    fn read(frame: &[u8]) -> Option<Self> {
        let (v6, l4, src, dst, ip_payload) = match be16(frame, 12)? {
            ETH_P_IPV4 => {
                let header = bytes::<20>(frame, ETH_HLEN)?;
                let fragment = u16::from_be_bytes([header[6], header[7]]) & 0x3fff;
                if header[0] != 0x45 || header[9] != UDP || fragment != 0 {
                    return None;
                }
                let total = usize::from(u16::from_be_bytes([header[2], header[3]]));
                let payload = total
                    .checked_sub(20)
                    .filter(|_| ETH_HLEN + total <= frame.len());
                let (src, dst) = (v4_at(frame, 26)?, v4_at(frame, 30)?);
                (false, ETH_HLEN + 20, src, dst, payload)
            }
            ETH_P_IPV6 => {
                if *frame.get(ETH_HLEN + 6)? != UDP {
                    return None;
                }
                let (src, dst) = (addr16_at(frame, 22)?, addr16_at(frame, 38)?);
                let payload = usize::from(be16(frame, ETH_HLEN + 4)?);
                let payload = Some(payload).filter(|p| ETH_HLEN + 40 + p <= frame.len());
                (true, ETH_HLEN + 40, src, dst, payload)
            }
            _ => return None,
        };
        let udp = bytes::<8>(frame, l4)?;
        let udp_len = u16::from_be_bytes([udp[4], udp[5]]);
        Some(Self {
            v6,
            l4,
            src: End {
                addr: src,
                port: u16::from_be_bytes([udp[0], udp[1]]),
            },
            dst: End {
                addr: dst,
                port: u16::from_be_bytes([udp[2], udp[3]]),
            },
            udp_len,
            check: u16::from_be_bytes([udp[6], udp[7]]),
            whole: usize::from(udp_len) >= UDP_HLEN && ip_payload == Some(usize::from(udp_len)),
        })
    }

    /// The UDP pseudo-header for these addresses and length.
    fn pseudo_header(&self, src: &Addr16, dst: &Addr16, udp_len: u16) -> Vec<u8> {
        let len = udp_len.to_be_bytes();
        if self.v6 {
            let mut p = Vec::with_capacity(40);
            p.extend_from_slice(src);
            p.extend_from_slice(dst);
            p.extend_from_slice(&[0, 0, len[0], len[1], 0, 0, 0, UDP]);
            p
        } else {
            let mut p = Vec::with_capacity(12);
            p.extend_from_slice(&src[12..]);
            p.extend_from_slice(&dst[12..]);
            p.extend_from_slice(&[0, UDP, len[0], len[1]]);
            p
        }
    }

    /// Whether the checksum field holds only the folded pseudo-header sum: a `CHECKSUM_PARTIAL`
    /// skb whose checksum the stack completes later (the kernel relay leaves those to user
    /// space).
    fn checksum_is_partial(&self) -> bool {
        self.check != 0
            && self.check
                == checksum::partial(&self.pseudo_header(
                    &self.src.addr,
                    &self.dst.addr,
                    self.udp_len,
                ))
    }
}

/// The UDP header with its checksum field zero, as the checksum covers it.
fn udp_header(src: u16, dst: u16, len: u16) -> [u8; 8] {
    let (s, d, l) = (src.to_be_bytes(), dst.to_be_bytes(), len.to_be_bytes());
    [s[0], s[1], d[0], d[1], l[0], l[1], 0, 0]
}

/// One datagram rewritten: new ends, a framing header added (inbound) or removed (outbound).
struct Rewrite<'a> {
    packet: &'a Datagram,
    src: End,
    dst: End,
    /// The framing header added after the UDP header (inbound).
    added: &'a [u8],
    /// How many octets of framing header after the UDP header are removed (outbound).
    removed: usize,
}

impl Rewrite<'_> {
    fn apply(&self, frame: &[u8]) -> Vec<u8> {
        let p = self.packet;
        let l3 = ETH_HLEN;
        let old_udp_len = p.udp_len;
        let new_udp_len = usize::from(old_udp_len) + self.added.len() - self.removed;
        let new_udp_len = u16::try_from(new_udp_len).expect("a UDP length");
        let mut ip = frame[l3..p.l4].to_vec();
        let old_ip = ip.clone();
        if p.v6 {
            let payload =
                usize::from(u16::from_be_bytes([ip[4], ip[5]])) + self.added.len() - self.removed;
            ip[4..6].copy_from_slice(&u16::try_from(payload).expect("16 bits").to_be_bytes());
            ip[8..24].copy_from_slice(&self.src.addr);
            ip[24..40].copy_from_slice(&self.dst.addr);
        } else {
            let total =
                usize::from(u16::from_be_bytes([ip[2], ip[3]])) + self.added.len() - self.removed;
            ip[2..4].copy_from_slice(&u16::try_from(total).expect("16 bits").to_be_bytes());
            ip[12..16].copy_from_slice(&self.src.addr[12..]);
            ip[16..20].copy_from_slice(&self.dst.addr[12..]);
            let without_check = |h: &[u8]| checksum::sum(&h[..10]) + checksum::sum(&h[12..]);
            let check = u16::from_be_bytes([old_ip[10], old_ip[11]]);
            let class = checksum::updated(check, without_check(&old_ip), without_check(&ip));
            ip[10..12].copy_from_slice(&checksum::ip_field(class).to_be_bytes());
        }
        // The words of the UDP checksum that change: pseudo-header, UDP header, framing.
        let removed = &frame[p.l4 + UDP_HLEN..p.l4 + UDP_HLEN + self.removed];
        let mut old = p.pseudo_header(&p.src.addr, &p.dst.addr, old_udp_len);
        old.extend_from_slice(&udp_header(p.src.port, p.dst.port, old_udp_len));
        old.extend_from_slice(removed);
        let mut new = p.pseudo_header(&self.src.addr, &self.dst.addr, new_udp_len);
        new.extend_from_slice(&udp_header(self.src.port, self.dst.port, new_udp_len));
        new.extend_from_slice(self.added);
        let check = if p.check == 0 {
            // IPv4 without a checksum stays without; IPv6's zero (invalid) is left as it is.
            0
        } else {
            let class = checksum::updated(p.check, checksum::sum(&old), checksum::sum(&new));
            checksum::udp_field(class)
        };
        let mut udp = udp_header(self.src.port, self.dst.port, new_udp_len);
        udp[6..8].copy_from_slice(&check.to_be_bytes());

        let mut out = frame[..l3].to_vec();
        out.extend_from_slice(&ip);
        out.extend_from_slice(&udp);
        out.extend_from_slice(self.added);
        out.extend_from_slice(&frame[p.l4 + UDP_HLEN + self.removed..]);
        out
    }
}

/// The framing header a client receives from `remote` through `binding`.
fn framing_header(binding: &Binding, remote: End) -> Vec<u8> {
    let port = remote.port.to_be_bytes();
    if binding.framing == framing::ENHANCED {
        let mut h = vec![0, 0, 0, 0];
        h.extend_from_slice(&binding.aid.to_be_bytes());
        h
    } else if is_v4(&remote.addr) {
        let mut h = vec![0, 0, 0, 1];
        h.extend_from_slice(&remote.addr[12..]);
        h.extend_from_slice(&port);
        h
    } else {
        let mut h = vec![0, 0, 0, 4];
        h.extend_from_slice(&remote.addr);
        h.extend_from_slice(&port);
        h
    }
}

/// The relay's exit for a datagram the gate sent it, and the frame when rewritten.
fn inbound(world: &World, frame: &[u8]) -> (ExitReason, Option<Vec<u8>>) {
    let to_stack = (ExitReason::InboundToStack, None);
    let Some(packet) = Datagram::read(frame) else {
        return to_stack;
    };
    let Some(binding) = world.binding(packet.src, packet.dst).filter(|b| b.kernel) else {
        return to_stack;
    };
    if !world.daemon_alive {
        return (ExitReason::DaemonGone, None);
    }
    if is_v4(&binding.client.addr) == packet.v6 || is_v4(&binding.internal_relay.addr) == packet.v6
    {
        return to_stack;
    }
    if binding.framing == framing::RAW {
        let out = Rewrite {
            packet: &packet,
            src: packet.src,
            dst: binding.client,
            added: &[],
            removed: 0,
        }
        .apply(frame);
        return (ExitReason::KernelRelayedRawInbound, Some(out));
    }
    if !packet.whole {
        return to_stack;
    }
    if packet.checksum_is_partial() {
        return (ExitReason::PartialChecksumToUserspace, None);
    }
    let header = framing_header(binding, packet.src);
    let out = Rewrite {
        packet: &packet,
        src: binding.internal_relay,
        dst: binding.client,
        added: &header,
        removed: 0,
    }
    .apply(frame);
    (ExitReason::KernelRelayedInbound, Some(out))
}

/// Extension headers the internal side knows (RFC 8200 and the IANA list) and how far it walks.
const INSIDE_EXTENSIONS: [u8; 10] = [0, 43, 44, 51, 60, 135, 139, 140, 253, 254];
const INSIDE_CHAIN: usize = 6;

/// Whether an inside frame is UDP, or may be (a chain too long or cut short to tell), to an
/// external address, whatever its options, fragmentation or extension headers.
fn inside_to_external_udp(world: &World, frame: &[u8]) -> bool {
    match be16(frame, 12) {
        Some(ETH_P_IPV4) => bytes::<20>(frame, ETH_HLEN).is_some_and(|header| {
            header[9] == UDP && world.is_external(&v4_at(&header, 16).expect("20 octets"))
        }),
        Some(ETH_P_IPV6) => {
            let Some(dst) = addr16_at(frame, ETH_HLEN + 24) else {
                return false;
            };
            if !world.is_external(&dst) {
                return false;
            }
            let mut next = frame[ETH_HLEN + 6];
            let mut at = ETH_HLEN + 40;
            for _ in 0..INSIDE_CHAIN {
                if !INSIDE_EXTENSIONS.contains(&next) {
                    return next == UDP;
                }
                let Some(ext) = bytes::<2>(frame, at) else {
                    return true;
                };
                at += match next {
                    44 => 8,
                    51 => (usize::from(ext[1]) + 2) * 4,
                    _ => (usize::from(ext[1]) + 1) * 8,
                };
                next = ext[0];
            }
            next == UDP || INSIDE_EXTENSIONS.contains(&next)
        }
        _ => false,
    }
}

fn internal(world: &World, frame: &[u8]) -> Outcome {
    let (reason, out) = internal_exit(world, frame);
    Outcome {
        action: tc_action(reason),
        counted: vec![reason],
        frame: out.unwrap_or_else(|| frame.to_vec()),
    }
}

fn internal_exit(world: &World, frame: &[u8]) -> (ExitReason, Option<Vec<u8>>) {
    if inside_to_external_udp(world, frame) {
        return (ExitReason::InsideToExternalAddress, None);
    }
    let Some(packet) = Datagram::read(frame) else {
        return (ExitReason::NotUdpPassed, None);
    };
    let Some(entry) = world.outbound(packet.src, packet.dst) else {
        // A RAW client may send only to its remotes and to its internal relay address.
        let reason = match world.raw_client(packet.src) {
            Some(relay) if relay != packet.dst.addr => ExitReason::RawToOtherDestination,
            _ => ExitReason::OutboundToUserspace,
        };
        return (reason, None);
    };
    let to_userspace = (ExitReason::OutboundToUserspace, None);
    if entry.framing == framing::RAW {
        if !world.daemon_alive {
            return (ExitReason::DaemonGone, None);
        }
        if is_v4(&entry.external_relay.addr) == packet.v6 {
            return to_userspace;
        }
        let out = Rewrite {
            packet: &packet,
            src: entry.external_relay,
            dst: packet.dst,
            added: &[],
            removed: 0,
        }
        .apply(frame);
        return (ExitReason::KernelRelayedRawOutbound, Some(out));
    }
    if !world.daemon_alive || !packet.whole {
        return to_userspace;
    }
    let Some((header_len, dest)) = outbound_destination(frame, &packet, entry) else {
        return to_userspace;
    };
    if usize::from(packet.udp_len) < UDP_HLEN + header_len
        || is_v4(&dest.addr) == packet.v6
        || is_v4(&entry.external_relay.addr) == packet.v6
    {
        return to_userspace;
    }
    // RFC 1928: only to a remote the association admits.
    if entry.framing == framing::SOCKS5 && world.binding(dest, entry.external_relay).is_none() {
        return to_userspace;
    }
    if packet.checksum_is_partial() {
        return (ExitReason::PartialChecksumToUserspace, None);
    }
    let out = Rewrite {
        packet: &packet,
        src: entry.external_relay,
        dst: dest,
        added: &[],
        removed: header_len,
    }
    .apply(frame);
    (ExitReason::KernelRelayedOutbound, Some(out))
}

/// The framing header's length and the remote it names, when the kernel may relay it: RSV and
/// FRAG zero; enhanced: a whole datagram (DGID 0) with the binding's AID; SOCKS5: an IPv4 or
/// IPv6 address (names are for user space).
fn outbound_destination(frame: &[u8], packet: &Datagram, entry: &Outbound) -> Option<(usize, End)> {
    let at = packet.l4 + UDP_HLEN;
    let first = bytes::<4>(frame, at)?;
    if first[0] != 0 || first[1] != 0 || (entry.framing == framing::SOCKS5 && first[2] != 0) {
        return None;
    }
    if entry.framing == framing::ENHANCED {
        let header = bytes::<8>(frame, at)?;
        (header[2..4] == [0, 0] && header[4..8] == entry.aid.to_be_bytes())
            .then_some((8, entry.remote))
    } else {
        match first[3] {
            1 => {
                let header = bytes::<10>(frame, at)?;
                let addr = v4_at(&header, 4)?;
                Some((
                    10,
                    End {
                        addr,
                        port: be16(&header, 8)?,
                    },
                ))
            }
            4 => {
                let header = bytes::<22>(frame, at)?;
                let addr = addr16_at(&header, 4)?;
                Some((
                    22,
                    End {
                        addr,
                        port: be16(&header, 20)?,
                    },
                ))
            }
            _ => None,
        }
    }
}
