//! Whole IP packets for one UDP datagram, as the relay's raw sockets send them: the IPv4 or IPv6
//! header, the UDP header with its checksum, the payload, and fragments when the datagram does
//! not fit the link's MTU (a raw socket that brings its own header is not fragmented by the
//! kernel).
//!
//! Pure: no sockets, no clock. The caller picks the fragment identification.

use std::net::{IpAddr, SocketAddr};

use etherparse::{
    IpFragOffset, IpNumber, Ipv4Header, Ipv6FlowLabel, Ipv6FragmentHeader, Ipv6Header, UdpHeader,
};

/// TTL / hop limit of what the relay sends (Linux's default).
pub const HOP_LIMIT: u8 = 64;
/// Smallest MTU IPv4 allows (RFC 791).
pub const MIN_MTU_V4: usize = 68;
/// Smallest MTU IPv6 allows (RFC 8200).
pub const MIN_MTU_V6: usize = 1280;

/// Why no packet could be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("source and destination are of different address families")]
    MixedFamilies,
    #[error("a UDP payload of {0} octets does not fit one datagram")]
    TooLarge(usize),
    #[error("an MTU of {0} is below the family's minimum")]
    MtuTooSmall(usize),
}

/// The packets carrying `payload` from `from` to `to` over a link of `mtu` octets: one when it
/// fits, otherwise fragments that share `id` (IPv4 uses its low 16 bits).
pub fn packets(
    from: SocketAddr,
    to: SocketAddr,
    payload: &[u8],
    mtu: usize,
    id: u32,
) -> Result<Vec<Vec<u8>>, PacketError> {
    packets_with_hop_limit(from, to, payload, mtu, id, HOP_LIMIT)
}

/// [`packets`] with TTL (IPv4) or hop limit (IPv6) `hop_limit` (a multicast send binding's).
pub fn packets_with_hop_limit(
    from: SocketAddr,
    to: SocketAddr,
    payload: &[u8],
    mtu: usize,
    id: u32,
    hop_limit: u8,
) -> Result<Vec<Vec<u8>>, PacketError> {
    match (from.ip().to_canonical(), to.ip().to_canonical()) {
        (IpAddr::V4(source), IpAddr::V4(destination)) => {
            if mtu < MIN_MTU_V4 {
                return Err(PacketError::MtuTooSmall(mtu));
            }
            let mut ip = Ipv4Header::new(
                0,
                hop_limit,
                IpNumber::UDP,
                source.octets(),
                destination.octets(),
            )
            .map_err(|_| PacketError::TooLarge(payload.len()))?;
            let udp = UdpHeader::with_ipv4_checksum(from.port(), to.port(), &ip, payload)
                .map_err(|_| PacketError::TooLarge(payload.len()))?;
            let datagram = udp_datagram(&udp, payload);
            if datagram.len() > usize::from(u16::MAX) - Ipv4Header::MIN_LEN {
                return Err(PacketError::TooLarge(payload.len()));
            }
            if Ipv4Header::MIN_LEN + datagram.len() <= mtu {
                // Identification 0: the kernel picks one for an unfragmented packet.
                return Ok(vec![ipv4_packet(&mut ip, &datagram, 0, false)]);
            }
            // Nonzero, so the kernel keeps it (it replaces 0).
            ip.identification = u16::try_from(id & 0xffff).unwrap_or(1).max(1);
            let chunk = (mtu - Ipv4Header::MIN_LEN) / 8 * 8;
            Ok(datagram
                .chunks(chunk)
                .enumerate()
                .map(|(i, part)| {
                    let offset = i * chunk;
                    let more = offset + part.len() < datagram.len();
                    ipv4_packet(&mut ip, part, offset, more)
                })
                .collect())
        }
        (IpAddr::V6(source), IpAddr::V6(destination)) => {
            if mtu < MIN_MTU_V6 {
                return Err(PacketError::MtuTooSmall(mtu));
            }
            let mut ip = Ipv6Header {
                traffic_class: 0,
                flow_label: Ipv6FlowLabel::ZERO,
                payload_length: 0,
                next_header: IpNumber::UDP,
                hop_limit,
                source: source.octets(),
                destination: destination.octets(),
            };
            let udp = UdpHeader::with_ipv6_checksum(from.port(), to.port(), &ip, payload)
                .map_err(|_| PacketError::TooLarge(payload.len()))?;
            let datagram = udp_datagram(&udp, payload);
            if Ipv6Header::LEN + datagram.len() <= mtu {
                ip.payload_length = u16::try_from(datagram.len())
                    .map_err(|_| PacketError::TooLarge(payload.len()))?;
                let mut packet = ip.to_bytes().to_vec();
                packet.extend_from_slice(&datagram);
                return Ok(vec![packet]);
            }
            ip.next_header = IpNumber::IPV6_FRAGMENTATION_HEADER;
            let chunk = (mtu - Ipv6Header::LEN - Ipv6FragmentHeader::LEN) / 8 * 8;
            datagram
                .chunks(chunk)
                .enumerate()
                .map(|(i, part)| {
                    let offset = i * chunk;
                    let fragment = Ipv6FragmentHeader::new(
                        IpNumber::UDP,
                        frag_offset(offset)?,
                        offset + part.len() < datagram.len(),
                        id,
                    );
                    ip.payload_length = u16::try_from(Ipv6FragmentHeader::LEN + part.len())
                        .map_err(|_| PacketError::TooLarge(payload.len()))?;
                    let mut packet = ip.to_bytes().to_vec();
                    packet.extend_from_slice(&fragment.to_bytes());
                    packet.extend_from_slice(part);
                    Ok(packet)
                })
                .collect()
        }
        _ => Err(PacketError::MixedFamilies),
    }
}

/// The UDP header and the payload, one buffer: the part IP fragments.
fn udp_datagram(udp: &UdpHeader, payload: &[u8]) -> Vec<u8> {
    let mut datagram = Vec::with_capacity(UdpHeader::LEN + payload.len());
    datagram.extend_from_slice(&udp.to_bytes());
    datagram.extend_from_slice(payload);
    datagram
}

/// An 8-octet fragment offset from a byte offset (always a multiple of 8 here, below 65536).
fn frag_offset(offset: usize) -> Result<IpFragOffset, PacketError> {
    u16::try_from(offset / 8)
        .ok()
        .and_then(|units| IpFragOffset::try_new(units).ok())
        .ok_or(PacketError::TooLarge(offset))
}

/// One IPv4 packet: `ip` with its length, offset and MF set for `part` at byte `offset`.
fn ipv4_packet(ip: &mut Ipv4Header, part: &[u8], offset: usize, more: bool) -> Vec<u8> {
    ip.total_len = u16::try_from(Ipv4Header::MIN_LEN + part.len()).unwrap_or(u16::MAX);
    ip.more_fragments = more;
    ip.dont_fragment = false;
    ip.fragment_offset = frag_offset(offset).unwrap_or(IpFragOffset::ZERO);
    ip.header_checksum = ip.calc_header_checksum();
    let mut packet = ip.to_bytes().to_vec();
    packet.extend_from_slice(part);
    packet
}

#[cfg(test)]
mod tests {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice, defrag::IpDefragPool};

    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    /// Parses one whole packet: (source, destination, payload), the UDP checksum verified.
    fn parse(packet: &[u8]) -> (SocketAddr, SocketAddr, Vec<u8>) {
        let sliced = SlicedPacket::from_ip(packet).expect("a valid IP packet");
        let Some(TransportSlice::Udp(udp)) = &sliced.transport else {
            panic!("no UDP header in {sliced:?}");
        };
        let (source, destination) = endpoints(&sliced);
        let header = udp.to_header();
        assert_eq!(
            header.checksum,
            checksum(&header, source, destination, udp.payload())
        );
        assert_eq!(usize::from(header.length), 8 + udp.payload().len());
        (
            SocketAddr::new(source, header.source_port),
            SocketAddr::new(destination, header.destination_port),
            udp.payload().to_vec(),
        )
    }

    /// Reassembles fragments with etherparse's defragmenter and checks the whole datagram.
    fn reassemble(packets: &[Vec<u8>]) -> (SocketAddr, SocketAddr, Vec<u8>) {
        let mut pool: IpDefragPool<(), ()> = IpDefragPool::new();
        let mut whole = None;
        for packet in packets {
            let sliced = SlicedPacket::from_ip(packet).unwrap();
            if let Some(done) = pool.process_sliced_packet(&sliced, (), ()).unwrap() {
                assert!(whole.is_none(), "one datagram, reassembled once");
                whole = Some((done, endpoints(&sliced)));
            }
        }
        let (done, (source, destination)) = whole.expect("the fragments reassemble");
        let udp = etherparse::UdpSlice::from_slice(&done.payload).unwrap();
        let header = udp.to_header();
        assert_eq!(
            header.checksum,
            checksum(&header, source, destination, udp.payload())
        );
        (
            SocketAddr::new(source, header.source_port),
            SocketAddr::new(destination, header.destination_port),
            udp.payload().to_vec(),
        )
    }

    fn endpoints(sliced: &SlicedPacket<'_>) -> (IpAddr, IpAddr) {
        match sliced.net.as_ref().unwrap() {
            NetSlice::Ipv4(v4) => (
                v4.header().source_addr().into(),
                v4.header().destination_addr().into(),
            ),
            NetSlice::Ipv6(v6) => (
                v6.header().source_addr().into(),
                v6.header().destination_addr().into(),
            ),
            other @ NetSlice::Arp(_) => panic!("unexpected {other:?}"),
        }
    }

    fn checksum(header: &UdpHeader, source: IpAddr, destination: IpAddr, data: &[u8]) -> u16 {
        match (source, destination) {
            (IpAddr::V4(s), IpAddr::V4(d)) => header
                .calc_checksum_ipv4_raw(s.octets(), d.octets(), data)
                .unwrap(),
            (IpAddr::V6(s), IpAddr::V6(d)) => header
                .calc_checksum_ipv6_raw(s.octets(), d.octets(), data)
                .unwrap(),
            _ => unreachable!(),
        }
    }

    fn payload(len: usize) -> Vec<u8> {
        (0..len).map(|i| u8::try_from(i % 251).unwrap()).collect()
    }

    #[test]
    fn a_datagram_that_fits_is_one_packet_with_a_valid_checksum() {
        for (from, to) in [
            (addr("192.0.2.1:24576"), addr("192.0.2.10:5000")),
            (addr("[2001:db8::1]:24576"), addr("[2001:db8::10]:5000")),
        ] {
            for len in [0, 1, 1200, 1400] {
                let out = packets(from, to, &payload(len), 1500, 7).unwrap();
                assert_eq!(out.len(), 1);
                assert!(out[0].len() <= 1500);
                assert_eq!(parse(&out[0]), (from, to, payload(len)));
            }
        }
    }

    #[test]
    fn an_unfragmented_ipv4_packet_leaves_the_identification_to_the_kernel() {
        let out = packets(addr("192.0.2.1:1"), addr("192.0.2.2:2"), b"x", 1500, 99).unwrap();
        let header = Ipv4Header::from_slice(&out[0]).unwrap().0;
        assert_eq!(header.identification, 0);
        assert!(!header.dont_fragment && !header.more_fragments);
        assert_eq!(header.time_to_live, HOP_LIMIT);
        assert_eq!(header.header_checksum, header.calc_header_checksum());
    }

    #[test]
    fn an_oversized_datagram_is_fragmented_within_the_mtu_and_reassembles() {
        for (from, to, mtu) in [
            (addr("192.0.2.1:24576"), addr("203.0.113.5:6000"), 1500),
            (addr("192.0.2.1:24576"), addr("203.0.113.5:6000"), 576),
            (
                addr("192.0.2.1:24576"),
                addr("203.0.113.5:6000"),
                MIN_MTU_V4,
            ),
            (
                addr("[2001:db8::1]:24576"),
                addr("[2001:db8:2::5]:6000"),
                1500,
            ),
            (
                addr("[2001:db8::1]:24576"),
                addr("[2001:db8:2::5]:6000"),
                MIN_MTU_V6,
            ),
        ] {
            for len in [1500, 4000, 65_000] {
                let data = payload(len);
                let out = packets(from, to, &data, mtu, 0x1234_5678).unwrap();
                assert!(out.len() > 1, "{len} octets over an MTU of {mtu}");
                for packet in &out {
                    assert!(packet.len() <= mtu, "{} > {mtu}", packet.len());
                }
                assert_eq!(reassemble(&out), (from, to, data));
            }
        }
    }

    #[test]
    fn ipv4_fragments_share_a_nonzero_identification() {
        for id in [0, 1, 0x1_0000, 0xabcd] {
            let out = packets(
                addr("192.0.2.1:1"),
                addr("192.0.2.2:2"),
                &payload(3000),
                1500,
                id,
            )
            .unwrap();
            let ids: Vec<u16> = out
                .iter()
                .map(|p| Ipv4Header::from_slice(p).unwrap().0.identification)
                .collect();
            assert!(ids.iter().all(|i| *i == ids[0] && *i != 0), "{ids:?}");
        }
    }

    #[test]
    fn the_largest_datagrams_fit_and_one_more_octet_does_not() {
        let (v4_from, v4_to) = (addr("192.0.2.1:1"), addr("192.0.2.2:2"));
        assert!(packets(v4_from, v4_to, &payload(65_507), 1500, 1).is_ok());
        assert_eq!(
            packets(v4_from, v4_to, &payload(65_508), 1500, 1),
            Err(PacketError::TooLarge(65_508))
        );
        let (v6_from, v6_to) = (addr("[2001:db8::1]:1"), addr("[2001:db8::2]:2"));
        assert!(packets(v6_from, v6_to, &payload(65_527), 1500, 1).is_ok());
        assert_eq!(
            packets(v6_from, v6_to, &payload(65_528), 1500, 1),
            Err(PacketError::TooLarge(65_528))
        );
    }

    #[test]
    fn bad_requests_are_errors() {
        assert_eq!(
            packets(addr("192.0.2.1:1"), addr("[2001:db8::2]:2"), b"x", 1500, 1),
            Err(PacketError::MixedFamilies)
        );
        assert_eq!(
            packets(addr("192.0.2.1:1"), addr("192.0.2.2:2"), b"x", 67, 1),
            Err(PacketError::MtuTooSmall(67))
        );
        assert_eq!(
            packets(
                addr("[2001:db8::1]:1"),
                addr("[2001:db8::2]:2"),
                b"x",
                1279,
                1
            ),
            Err(PacketError::MtuTooSmall(1279))
        );
    }

    #[test]
    fn ipv4_mapped_addresses_make_ipv4_packets() {
        let from = addr("[::ffff:192.0.2.1]:1");
        let to = addr("192.0.2.2:2");
        let out = packets(from, to, b"mapped", 1500, 1).unwrap();
        assert_eq!(
            parse(&out[0]),
            (addr("192.0.2.1:1"), to, b"mapped".to_vec())
        );
    }
}
