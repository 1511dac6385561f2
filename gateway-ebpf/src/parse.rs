//! Header parsing for the external interface: Ethernet with up to two VLAN tags, IPv4, IPv6 with a
//! bounded walk over extension headers, UDP. Every read goes through [`ptr_at`], the one
//! bounds-checked accessor. Option, extension-header and fragment drops apply only to UDP.

use aya_ebpf::programs::XdpContext;
use gateway_common::{Addr16, DropReason, ipv4_mapped};

const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPV4_MIN_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const UDP_HLEN: usize = 8;
const IPPROTO_UDP: u8 = 17;
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

/// The addresses and ports of a UDP datagram; addresses IPv4-mapped.
pub struct UdpFlow {
    pub src_addr: Addr16,
    pub dst_addr: Addr16,
    pub src_port_be: u16,
    pub dst_port_be: u16,
}

/// A pointer to `N` bytes at `offset`, or a truncation drop when the frame is shorter.
#[inline(always)]
fn ptr_at<const N: usize>(ctx: &XdpContext, offset: usize) -> Result<*const [u8; N], DropReason> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + N > end {
        return Err(DropReason::TruncatedHeader);
    }
    Ok((start + offset) as *const [u8; N])
}

#[inline(always)]
fn read<const N: usize>(ctx: &XdpContext, offset: usize) -> Result<[u8; N], DropReason> {
    // SAFETY: ptr_at checked that N bytes at offset lie inside the frame.
    Ok(unsafe { *ptr_at::<N>(ctx, offset)? })
}

#[inline(always)]
fn read_u16(ctx: &XdpContext, offset: usize) -> Result<u16, DropReason> {
    Ok(u16::from_be_bytes(read::<2>(ctx, offset)?))
}

/// `Ok(None)` for anything that is not UDP (to be passed), `Ok(Some)` for a UDP datagram to look
/// up, `Err` for a counted drop.
#[inline(always)]
pub fn parse_udp_flow(ctx: &XdpContext) -> Result<Option<UdpFlow>, DropReason> {
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

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, l3: usize) -> Result<Option<UdpFlow>, DropReason> {
    let header = read::<IPV4_MIN_HLEN>(ctx, l3)?;
    if header[0] >> 4 != 4 || usize::from(header[0] & 0x0f) * 4 < IPV4_MIN_HLEN {
        return Err(DropReason::MalformedIpHeader);
    }
    if header[9] != IPPROTO_UDP {
        return Ok(None);
    }
    if u16::from_be_bytes([header[6], header[7]]) & IPV4_MF_OR_OFFSET != 0 {
        return Err(DropReason::IpFragment);
    }
    if header[0] & 0x0f != 5 {
        return Err(DropReason::Ipv4Options);
    }
    let udp = read::<UDP_HLEN>(ctx, l3 + IPV4_MIN_HLEN)?;
    Ok(Some(UdpFlow {
        src_addr: ipv4_mapped([header[12], header[13], header[14], header[15]]),
        dst_addr: ipv4_mapped([header[16], header[17], header[18], header[19]]),
        src_port_be: u16::from_ne_bytes([udp[0], udp[1]]),
        dst_port_be: u16::from_ne_bytes([udp[2], udp[3]]),
    }))
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, l3: usize) -> Result<Option<UdpFlow>, DropReason> {
    let header = read::<IPV6_HLEN>(ctx, l3)?;
    if header[0] >> 4 != 6 {
        return Err(DropReason::MalformedIpHeader);
    }
    let mut next = header[6];
    let mut offset = l3 + IPV6_HLEN;
    let mut fragmented = false;
    let mut transport_found = false;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS | IPV6_AUTH | IPV6_FRAGMENT => {
                let ext = read::<2>(ctx, offset)?;
                let length = match next {
                    IPV6_FRAGMENT => {
                        fragmented = true;
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
                return Err(DropReason::Ipv6ExtensionHeaders);
            }
            _ => {}
        }
    }
    if next != IPPROTO_UDP {
        return Ok(None);
    }
    if fragmented {
        return Err(DropReason::IpFragment);
    }
    let udp = read::<UDP_HLEN>(ctx, offset)?;
    let mut src_addr = [0u8; 16];
    let mut dst_addr = [0u8; 16];
    src_addr.copy_from_slice(&header[8..24]);
    dst_addr.copy_from_slice(&header[24..40]);
    Ok(Some(UdpFlow {
        src_addr,
        dst_addr,
        src_port_be: u16::from_ne_bytes([udp[0], udp[1]]),
        dst_port_be: u16::from_ne_bytes([udp[2], udp[3]]),
    }))
}
