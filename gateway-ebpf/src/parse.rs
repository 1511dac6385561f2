//! Header parsing for the external interface: Ethernet with up to two VLAN tags, IPv4, IPv6 with a
//! bounded walk over extension headers, UDP and TCP ports. Every read goes through [`ptr_at`], the
//! one bounds-checked accessor. Option and fragment drops apply only to UDP; TCP is parsed only
//! so far as its destination port (to keep the SOCKS control port unreachable from outside).
//!
//! The same parser serves the gate in XDP and in tc: both read the frame directly between its
//! start and end pointers ([`Frame`]).

use aya_ebpf::programs::{TcContext, XdpContext};
use gateway_common::{Addr16, ExitReason, ipv4_mapped};

use crate::events;

pub(crate) const ETH_HLEN: usize = 14;
pub(crate) const VLAN_HLEN: usize = 4;
pub(crate) const ETH_P_IPV4: u16 = 0x0800;
pub(crate) const ETH_P_IPV6: u16 = 0x86dd;
pub(crate) const ETH_P_8021Q: u16 = 0x8100;
pub(crate) const ETH_P_8021AD: u16 = 0x88a8;
pub(crate) const IPV4_MIN_HLEN: usize = 20;
pub(crate) const IPV6_HLEN: usize = 40;
const UDP_HLEN: usize = 8;
pub(crate) const IPPROTO_UDP: u8 = 17;
pub(crate) const IPPROTO_TCP: u8 = 6;
// IPv6 extension headers we can walk.
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTH: u8 = 51;
const IPV6_DEST_OPTS: u8 = 60;
/// Longest extension-header chain we walk; longer chains are a counted drop (fail closed).
const MAX_IPV6_EXT_HEADERS: usize = 4;
/// IPv4 flags+offset: MF bit and the 13-bit offset.
const IPV4_MF_OR_OFFSET: u16 = 0x3fff;
/// IPv4 flags+offset: the 13-bit offset alone (non-zero: not the first fragment).
pub(crate) const IPV4_OFFSET: u16 = 0x1fff;
/// IPv6 fragment header: the offset bits of its second 16-bit word.
const IPV6_FRAGMENT_OFFSET: u16 = 0xfff8;

/// The transport protocols the gate looks into.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    /// Only the ports are read (the first fragment or an unfragmented segment).
    Tcp,
}

/// The addresses and ports of a UDP datagram or TCP segment; addresses IPv4-mapped.
pub struct Flow {
    pub transport: Transport,
    pub src_addr: Addr16,
    pub dst_addr: Addr16,
    pub src_port_be: u16,
    pub dst_port_be: u16,
}

/// A frame the verifier lets a program read directly: an XDP buffer, or the linear part of an
/// skb in tc (made to hold the headers before parsing, see `tc::gate`).
pub trait Frame {
    fn start(&self) -> usize;
    fn end(&self) -> usize;
}

impl Frame for XdpContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
}

impl Frame for TcContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
}

/// A pointer to `N` bytes at `offset`, or a truncation drop when the frame is shorter.
#[inline(always)]
fn ptr_at<const N: usize, F: Frame>(ctx: &F, offset: usize) -> Result<*const [u8; N], ExitReason> {
    let start = ctx.start();
    let end = ctx.end();
    if start + offset + N > end {
        return Err(ExitReason::TruncatedHeader);
    }
    Ok((start + offset) as *const [u8; N])
}

#[inline(always)]
fn read<const N: usize, F: Frame>(ctx: &F, offset: usize) -> Result<[u8; N], ExitReason> {
    // SAFETY: ptr_at checked that N bytes at offset lie inside the frame.
    Ok(unsafe { *ptr_at::<N, _>(ctx, offset)? })
}

#[inline(always)]
fn read_u16<F: Frame>(ctx: &F, offset: usize) -> Result<u16, ExitReason> {
    Ok(u16::from_be_bytes(read::<2, _>(ctx, offset)?))
}

/// `Ok(None)` for anything that is neither UDP nor a TCP segment with ports (to be passed),
/// `Ok(Some)` for a flow to look up, `Err` for a counted drop.
#[inline(always)]
pub fn parse_flow<F: Frame>(ctx: &F) -> Result<Option<Flow>, ExitReason> {
    let mut offset = ETH_HLEN;
    let mut ether_type = read_u16(ctx, 12)?;
    // Up to two VLAN tags (802.1Q, 802.1ad QinQ).
    for _ in 0..2 {
        if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
            ether_type = read_u16(ctx, offset + 2)?;
            offset += VLAN_HLEN;
        }
    }
    match ether_type {
        ETH_P_IPV4 => parse_ipv4(ctx, offset),
        ETH_P_IPV6 => parse_ipv6(ctx, offset),
        _ => Ok(None),
    }
}

/// The four port octets at the transport header `l4`; a UDP header must be whole.
#[inline(always)]
fn read_ports<F: Frame>(ctx: &F, transport: Transport, l4: usize) -> Result<[u8; 4], ExitReason> {
    if transport == Transport::Udp {
        read::<UDP_HLEN, _>(ctx, l4)?;
    }
    read::<4, _>(ctx, l4)
}

#[inline(always)]
fn parse_ipv4<F: Frame>(ctx: &F, l3: usize) -> Result<Option<Flow>, ExitReason> {
    let header = read::<IPV4_MIN_HLEN, _>(ctx, l3)?;
    let header_len = usize::from(header[0] & 0x0f) * 4;
    if header[0] >> 4 != 4 || header_len < IPV4_MIN_HLEN {
        return Err(ExitReason::MalformedIpHeader);
    }
    let flags_offset = u16::from_be_bytes([header[6], header[7]]);
    let transport = match header[9] {
        IPPROTO_UDP => {
            if flags_offset & IPV4_MF_OR_OFFSET != 0 {
                let (src, dst) = ipv4_addrs(&header);
                events::udp_fragment(&src, &dst);
                return Err(ExitReason::IpFragment);
            }
            if header_len != IPV4_MIN_HLEN {
                let (src, dst) = ipv4_addrs(&header);
                events::ipv4_options(&src, &dst);
                return Err(ExitReason::Ipv4Options);
            }
            Transport::Udp
        }
        // A later fragment carries no ports; without its first fragment it never reassembles.
        IPPROTO_TCP if flags_offset & IPV4_OFFSET == 0 => Transport::Tcp,
        _ => return Ok(None),
    };
    let ports = read_ports(ctx, transport, l3 + header_len)?;
    let (src_addr, dst_addr) = ipv4_addrs(&header);
    Ok(Some(Flow {
        transport,
        src_addr,
        dst_addr,
        src_port_be: u16::from_ne_bytes([ports[0], ports[1]]),
        dst_port_be: u16::from_ne_bytes([ports[2], ports[3]]),
    }))
}

/// The source and destination of an IPv4 header, IPv4-mapped.
#[inline(always)]
fn ipv4_addrs(header: &[u8; IPV4_MIN_HLEN]) -> (Addr16, Addr16) {
    (
        ipv4_mapped([header[12], header[13], header[14], header[15]]),
        ipv4_mapped([header[16], header[17], header[18], header[19]]),
    )
}

/// The source and destination of an IPv6 header.
#[inline(always)]
fn ipv6_addrs(header: &[u8; IPV6_HLEN]) -> (Addr16, Addr16) {
    let mut src_addr = [0u8; 16];
    let mut dst_addr = [0u8; 16];
    src_addr.copy_from_slice(&header[8..24]);
    dst_addr.copy_from_slice(&header[24..40]);
    (src_addr, dst_addr)
}

#[inline(always)]
fn parse_ipv6<F: Frame>(ctx: &F, l3: usize) -> Result<Option<Flow>, ExitReason> {
    let header = read::<IPV6_HLEN, _>(ctx, l3)?;
    if header[0] >> 4 != 6 {
        return Err(ExitReason::MalformedIpHeader);
    }
    let mut next = header[6];
    let mut offset = l3 + IPV6_HLEN;
    let mut fragmented = false;
    let mut later_fragment = false;
    let mut transport_found = false;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS | IPV6_AUTH | IPV6_FRAGMENT => {
                let ext = read::<4, _>(ctx, offset)?;
                let length = match next {
                    IPV6_FRAGMENT => {
                        fragmented = true;
                        later_fragment |=
                            u16::from_be_bytes([ext[2], ext[3]]) & IPV6_FRAGMENT_OFFSET != 0;
                        8
                    }
                    IPV6_AUTH => (usize::from(ext[1]) + 2) * 4,
                    _ => (usize::from(ext[1]) + 1) * 8,
                };
                next = ext[0];
                offset += length;
            }
            _ => {
                transport_found = true;
                break;
            }
        }
    }
    if !transport_found {
        // After the loop `next` may be the transport; anything else is too long a chain.
        match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS | IPV6_AUTH | IPV6_FRAGMENT => {
                let (src, dst) = ipv6_addrs(&header);
                events::ipv6_extension_chain(&src, &dst, MAX_IPV6_EXT_HEADERS);
                return Err(ExitReason::Ipv6ExtensionHeaders);
            }
            _ => {}
        }
    }
    let transport = match next {
        IPPROTO_UDP if fragmented => {
            let (src, dst) = ipv6_addrs(&header);
            events::udp_fragment(&src, &dst);
            return Err(ExitReason::IpFragment);
        }
        IPPROTO_UDP => Transport::Udp,
        IPPROTO_TCP if !later_fragment => Transport::Tcp,
        _ => return Ok(None),
    };
    let ports = read_ports(ctx, transport, offset)?;
    let (src_addr, dst_addr) = ipv6_addrs(&header);
    Ok(Some(Flow {
        transport,
        src_addr,
        dst_addr,
        src_port_be: u16::from_ne_bytes([ports[0], ports[1]]),
        dst_port_be: u16::from_ne_bytes([ports[2], ports[3]]),
    }))
}
