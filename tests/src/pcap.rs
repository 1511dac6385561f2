//! A reader of the classic pcap files tcpdump writes ([`crate::capture`] runs it), down to UDP
//! datagrams ([`parse`]) and the RTP flows among them ([`rtp_flows`]). Pure but for [`read`],
//! which reads the file named.
//!
//! It knows exactly what tcpdump writes on the test bed's veth ends: the classic format
//! (24-octet global header, 16-octet record headers, micro- or nanosecond timestamps, either byte
//! order), Ethernet, IPv4 or IPv6 without extension headers, UDP. Every other frame (TCP, ARP,
//! fragments, frames cut by the snap length) is skipped, never guessed at.

use std::{
    collections::HashSet,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};

/// `LINKTYPE_ETHERNET`, what tcpdump records on veth.
const LINKTYPE_ETHERNET: u32 = 1;
const GLOBAL_HEADER: usize = 24;
const RECORD_HEADER: usize = 16;
const ETHERNET_HEADER: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const PROTOCOL_UDP: u8 = 17;

/// One UDP datagram of a capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    /// The record's timestamp (since the Unix epoch).
    pub time: Duration,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub payload: Vec<u8>,
}

/// The UDP datagrams of a classic pcap file's contents, in capture order. A record cut off at
/// the end (a file tcpdump is still writing) ends the list; a malformed global header is an
/// error.
pub fn parse(bytes: &[u8]) -> Result<Vec<Datagram>> {
    ensure!(
        bytes.len() >= GLOBAL_HEADER,
        "a pcap file has a {GLOBAL_HEADER}-octet header; this one has {} octets",
        bytes.len()
    );
    let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
    let (big_endian, nanoseconds) = match magic {
        [0xd4, 0xc3, 0xb2, 0xa1] => (false, false),
        [0x4d, 0x3c, 0xb2, 0xa1] => (false, true),
        [0xa1, 0xb2, 0xc3, 0xd4] => (true, false),
        [0xa1, 0xb2, 0x3c, 0x4d] => (true, true),
        other => bail!("not a classic pcap file (magic {other:02x?})"),
    };
    let word = |at: usize| {
        let octets = [bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]];
        if big_endian {
            u32::from_be_bytes(octets)
        } else {
            u32::from_le_bytes(octets)
        }
    };
    let linktype = word(20) & 0x0fff_ffff;
    ensure!(
        linktype == LINKTYPE_ETHERNET,
        "link type {linktype}: only Ethernet captures are read"
    );
    let mut datagrams = Vec::new();
    let mut at = GLOBAL_HEADER;
    while at + RECORD_HEADER <= bytes.len() {
        let seconds = u64::from(word(at));
        let fraction = u64::from(word(at + 4));
        let captured = usize::try_from(word(at + 8)).context("record length")?;
        let original = usize::try_from(word(at + 12)).context("record length")?;
        let frame_at = at + RECORD_HEADER;
        let Some(frame) = bytes.get(frame_at..frame_at + captured) else {
            break;
        };
        at = frame_at + captured;
        if captured < original {
            continue;
        }
        let time = Duration::from_secs(seconds)
            + if nanoseconds {
                Duration::from_nanos(fraction)
            } else {
                Duration::from_micros(fraction)
            };
        if let Some((src, dst, payload)) = udp_of_frame(frame) {
            datagrams.push(Datagram {
                time,
                src,
                dst,
                payload: payload.to_vec(),
            });
        }
    }
    Ok(datagrams)
}

/// Reads and parses a pcap file (see [`parse`]).
pub fn read(path: &Path) -> Result<Vec<Datagram>> {
    let bytes = fs::read(path).with_context(|| format!("read {}", path.display()))?;
    parse(&bytes).with_context(|| format!("parse {}", path.display()))
}

fn be16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*bytes.get(at)?, *bytes.get(at + 1)?]))
}

/// Source, destination and payload of an Ethernet frame carrying one whole UDP datagram.
fn udp_of_frame(frame: &[u8]) -> Option<(SocketAddr, SocketAddr, &[u8])> {
    let ip = frame.get(ETHERNET_HEADER..)?;
    let (src, dst, udp): (IpAddr, IpAddr, &[u8]) = match be16(frame, 12)? {
        ETHERTYPE_IPV4 => {
            let header = usize::from(ip.first()? & 0x0f) * 4;
            let total = usize::from(be16(ip, 2)?);
            let fragment = be16(ip, 6)? & 0x3fff;
            if ip[0] >> 4 != 4 || header < 20 || fragment != 0 || *ip.get(9)? != PROTOCOL_UDP {
                return None;
            }
            let octets = |at: usize| -> Option<Ipv4Addr> {
                Some(<[u8; 4]>::try_from(ip.get(at..at + 4)?).ok()?.into())
            };
            (
                octets(12)?.into(),
                octets(16)?.into(),
                ip.get(header..total)?,
            )
        }
        ETHERTYPE_IPV6 => {
            let payload = usize::from(be16(ip, 4)?);
            if ip.first()? >> 4 != 6 || *ip.get(6)? != PROTOCOL_UDP {
                return None;
            }
            let octets = |at: usize| -> Option<Ipv6Addr> {
                Some(<[u8; 16]>::try_from(ip.get(at..at + 16)?).ok()?.into())
            };
            (
                octets(8)?.into(),
                octets(24)?.into(),
                ip.get(40..40 + payload)?,
            )
        }
        _ => return None,
    };
    let length = usize::from(be16(udp, 4)?);
    let payload = udp.get(8..length)?;
    Some((
        SocketAddr::new(src, be16(udp, 0)?),
        SocketAddr::new(dst, be16(udp, 2)?),
        payload,
    ))
}

/// The fixed RTP header (RFC 3550 section 5.1) of a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpHeader {
    pub marker: bool,
    pub payload_type: u8,
    pub sequence: u16,
    pub timestamp: u32,
    pub ssrc: u32,
}

impl RtpHeader {
    /// The header of an RTP packet (version 2, room for its CSRC list), or `None`. RTCP
    /// (payload types 72 to 76 as RTP would read them) is not told apart here: select by payload
    /// type.
    pub fn parse(payload: &[u8]) -> Option<Self> {
        let first = *payload.first()?;
        let csrc_octets = usize::from(first & 0x0f) * 4;
        if first >> 6 != 2 || payload.len() < 12 + csrc_octets {
            return None;
        }
        let word = |at: usize| {
            u32::from_be_bytes([
                payload[at],
                payload[at + 1],
                payload[at + 2],
                payload[at + 3],
            ])
        };
        Some(Self {
            marker: payload[1] & 0x80 != 0,
            payload_type: payload[1] & 0x7f,
            sequence: u16::from_be_bytes([payload[2], payload[3]]),
            timestamp: word(4),
            ssrc: word(8),
        })
    }
}

/// The RTP packets of one stream in a capture: one source, one destination, one SSRC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RtpFlow {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub ssrc: u32,
    pub payload_type: u8,
    /// Sequence numbers in capture order.
    pub sequences: Vec<u16>,
}

impl RtpFlow {
    /// The sequence number of the flow's first captured packet.
    pub fn first_sequence(&self) -> u16 {
        self.sequences.first().copied().unwrap_or_default()
    }

    pub fn packets(&self) -> usize {
        self.sequences.len()
    }

    /// How many of the packets `sent` captured, up to the last one this (receiving) side
    /// captured, never arrived here: the losses on the way, not counting the stream's tail after
    /// the receiver stopped. Every packet counts when nothing arrived.
    pub fn lost_against(&self, sent: &Self) -> usize {
        let received: HashSet<u16> = self.sequences.iter().copied().collect();
        let until = self
            .sequences
            .last()
            .and_then(|last| sent.sequences.iter().rposition(|s| s == last))
            .map_or(sent.sequences.len(), |at| at + 1);
        sent.sequences[..until]
            .iter()
            .filter(|s| !received.contains(s))
            .count()
    }
}

impl std::fmt::Display for RtpFlow {
    /// `SRC -> DST SSRC x: N packets from FIRST`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} -> {} SSRC {:08x}: {} packets from {}",
            self.src,
            self.dst,
            self.ssrc,
            self.packets(),
            self.first_sequence()
        )
    }
}

/// The RTP flows of payload type `payload_type` among `datagrams`, in order of their first
/// packet.
pub fn rtp_flows(datagrams: &[Datagram], payload_type: u8) -> Vec<RtpFlow> {
    let mut flows: Vec<RtpFlow> = Vec::new();
    for datagram in datagrams {
        let Some(header) =
            RtpHeader::parse(&datagram.payload).filter(|h| h.payload_type == payload_type)
        else {
            continue;
        };
        let key = (datagram.src, datagram.dst, header.ssrc);
        if let Some(flow) = flows.iter_mut().find(|f| (f.src, f.dst, f.ssrc) == key) {
            flow.sequences.push(header.sequence);
        } else {
            flows.push(RtpFlow {
                src: datagram.src,
                dst: datagram.dst,
                ssrc: header.ssrc,
                payload_type,
                sequences: vec![header.sequence],
            });
        }
    }
    flows
}

#[cfg(test)]
mod tests {
    use etherparse::PacketBuilder;

    use super::*;

    const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];

    fn rtp(payload_type: u8, sequence: u16, ssrc: u32) -> Vec<u8> {
        let mut packet = vec![0x80, payload_type, 0, 0, 0, 0, 0x12, 0x34];
        packet[2..4].copy_from_slice(&sequence.to_be_bytes());
        packet.extend_from_slice(&ssrc.to_be_bytes());
        packet.extend_from_slice(&[0xaa; 20]);
        packet
    }

    fn udp4(src: &str, dst: &str, payload: &[u8]) -> Vec<u8> {
        let (src, dst): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
        let (IpAddr::V4(s), IpAddr::V4(d)) = (src.ip(), dst.ip()) else {
            panic!("IPv4 addresses");
        };
        let builder = PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv4(s.octets(), d.octets(), 64)
            .udp(src.port(), dst.port());
        let mut frame = Vec::new();
        builder.write(&mut frame, payload).unwrap();
        frame
    }

    fn udp6(payload: &[u8]) -> Vec<u8> {
        let builder = PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv6(
                "2001:db8:2::2".parse::<Ipv6Addr>().unwrap().octets(),
                "2001:db8:1::2".parse::<Ipv6Addr>().unwrap().octets(),
                64,
            )
            .udp(6000, 5000);
        let mut frame = Vec::new();
        builder.write(&mut frame, payload).unwrap();
        frame
    }

    fn tcp4() -> Vec<u8> {
        let builder = PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv4([203, 0, 113, 2], [198, 51, 100, 2], 64)
            .tcp(8554, 40000, 1, 1000);
        let mut frame = Vec::new();
        builder.write(&mut frame, b"RTSP/1.0 200 OK").unwrap();
        frame
    }

    /// A classic pcap file, written the way tcpdump does (little endian, microseconds unless
    /// `nanoseconds`); each record is (seconds, fraction, frame, original length).
    fn capture(nanoseconds: bool, records: &[(u32, u32, Vec<u8>, Option<u32>)]) -> Vec<u8> {
        let magic: u32 = if nanoseconds {
            0xa1b2_3c4d
        } else {
            0xa1b2_c3d4
        };
        let mut file = magic.to_le_bytes().to_vec();
        file.extend_from_slice(&2u16.to_le_bytes());
        file.extend_from_slice(&4u16.to_le_bytes());
        file.extend_from_slice(&[0; 8]);
        file.extend_from_slice(&262_144u32.to_le_bytes());
        file.extend_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
        for (seconds, fraction, frame, original) in records {
            let captured = u32::try_from(frame.len()).unwrap();
            for word in [*seconds, *fraction, captured, original.unwrap_or(captured)] {
                file.extend_from_slice(&word.to_le_bytes());
            }
            file.extend_from_slice(frame);
        }
        file
    }

    #[test]
    fn reads_udp_datagrams_and_skips_everything_else() {
        let first = udp4(
            "203.0.113.2:40000",
            "198.51.100.2:5000",
            &rtp(96, 7, 0xfeed),
        );
        let cut = udp4(
            "203.0.113.2:40000",
            "198.51.100.2:5000",
            &rtp(96, 8, 0xfeed),
        );
        let file = capture(
            false,
            &[
                (100, 250_000, first, None),
                (100, 260_000, tcp4(), None),
                (100, 270_000, vec![0xff; 42], None),
                // Cut by the snap length: skipped, not misread.
                (
                    100,
                    280_000,
                    cut[..30].to_vec(),
                    Some(u32::try_from(cut.len()).unwrap()),
                ),
                (101, 5, udp6(b"six"), None),
            ],
        );
        let datagrams = parse(&file).unwrap();
        assert_eq!(datagrams.len(), 2, "{datagrams:?}");
        assert_eq!(datagrams[0].time, Duration::new(100, 250_000_000));
        assert_eq!(datagrams[0].src, "203.0.113.2:40000".parse().unwrap());
        assert_eq!(datagrams[0].dst, "198.51.100.2:5000".parse().unwrap());
        assert_eq!(datagrams[0].payload, rtp(96, 7, 0xfeed));
        assert_eq!(datagrams[1].src, "[2001:db8:2::2]:6000".parse().unwrap());
        assert_eq!(datagrams[1].payload, b"six");
    }

    #[test]
    fn nanosecond_and_big_endian_files_and_a_record_still_being_written() {
        let frame = udp4("203.0.113.2:40000", "198.51.100.2:5000", b"x");
        let mut file = capture(true, &[(1, 7, frame.clone(), None), (2, 0, frame, None)]);
        file.truncate(file.len() - 3);
        let datagrams = parse(&file).unwrap();
        assert_eq!(datagrams.len(), 1, "the cut-off record ends the list");
        assert_eq!(datagrams[0].time, Duration::new(1, 7));

        let mut big = vec![0xa1, 0xb2, 0xc3, 0xd4, 0, 2, 0, 4];
        big.extend_from_slice(&[0; 12]);
        big.extend_from_slice(&LINKTYPE_ETHERNET.to_be_bytes());
        let frame = udp4("203.0.113.2:1", "198.51.100.2:2", b"be");
        for word in [3u32, 4, 0, 0] {
            big.extend_from_slice(&word.to_be_bytes());
        }
        let len = u32::try_from(frame.len()).unwrap().to_be_bytes();
        big[GLOBAL_HEADER + 8..GLOBAL_HEADER + 12].copy_from_slice(&len);
        big[GLOBAL_HEADER + 12..GLOBAL_HEADER + 16].copy_from_slice(&len);
        big.extend_from_slice(&frame);
        assert_eq!(parse(&big).unwrap()[0].payload, b"be");
        assert_eq!(
            parse(&big).unwrap()[0].time,
            Duration::from_micros(3_000_004)
        );
    }

    #[test]
    fn refuses_what_is_not_an_ethernet_pcap() {
        assert!(parse(b"short").is_err());
        assert!(parse(&[0u8; 24]).is_err(), "bad magic");
        let mut raw_ip = capture(false, &[]);
        raw_ip[20..24].copy_from_slice(&101u32.to_le_bytes());
        assert!(parse(&raw_ip).is_err(), "LINKTYPE_RAW is not read");
    }

    #[test]
    fn rtp_headers() {
        let header = RtpHeader::parse(&rtp(96, 0xbeef, 0x1234_5678)).unwrap();
        assert_eq!(
            header,
            RtpHeader {
                marker: false,
                payload_type: 96,
                sequence: 0xbeef,
                timestamp: 0x1234,
                ssrc: 0x1234_5678,
            }
        );
        // Marker set, one CSRC: the header needs 16 octets.
        let mut marked = rtp(0xe0, 1, 1);
        marked[0] = 0x81;
        marked.truncate(12);
        assert!(RtpHeader::parse(&marked).is_none(), "no room for the CSRC");
        marked.extend_from_slice(&[0; 4]);
        let header = RtpHeader::parse(&marked).unwrap();
        assert!(header.marker);
        assert_eq!(header.payload_type, 96);
        assert!(RtpHeader::parse(&[0x40; 12]).is_none(), "version 1");
        assert!(RtpHeader::parse(&[0x80; 11]).is_none(), "too short");
    }

    fn datagram(src: &str, dst: &str, payload: Vec<u8>) -> Datagram {
        Datagram {
            time: Duration::ZERO,
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            payload,
        }
    }

    #[test]
    fn flows_by_source_destination_and_ssrc_with_losses() {
        let (server, relay, client) = (
            "203.0.113.2:40000",
            "203.0.113.1:16384",
            "198.51.100.2:5000",
        );
        // RTCP sender report: byte 1 is 200, payload type 72 as RTP reads it.
        let sender_report = vec![0x80, 200, 0, 6, 0, 0, 0xfe, 0xed];
        let mut sent = vec![datagram(server, relay, sender_report)];
        sent.extend(
            (65_533..=65_535)
                .chain(0..=3)
                .map(|s| datagram(server, relay, rtp(96, s, 0xfeed))),
        );
        sent.push(datagram(server, relay, rtp(96, 9, 0xbad)));
        sent.push(datagram(client, server, rtp(0, 0, 0)));
        let flows = rtp_flows(&sent, 96);
        assert_eq!(flows.len(), 2, "{flows:?}");
        let stream = &flows[0];
        assert_eq!(
            (stream.ssrc, stream.first_sequence(), stream.packets()),
            (0xfeed, 65_533, 7)
        );
        assert_eq!(flows[1].ssrc, 0xbad);

        // The receiver lost 65535 and 1 and stopped after 2: two lost, the tail not counted.
        let received: Vec<Datagram> = [65_533, 65_534, 0, 2]
            .into_iter()
            .map(|s| datagram(server, client, rtp(96, s, 0xfeed)))
            .collect();
        let got = &rtp_flows(&received, 96)[0];
        assert_eq!(got.first_sequence(), stream.first_sequence());
        assert_eq!(got.lost_against(stream), 2);
        let nothing = RtpFlow {
            sequences: Vec::new(),
            ..got.clone()
        };
        assert_eq!(nothing.lost_against(stream), 7);
    }
}
