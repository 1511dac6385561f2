//! RTP and RTCP wire formats (RFC 3550 sections 5 and 6): parsing received packets and writing the
//! few packets the client and the demo server send (RTP, SR, RR with SDES CNAME, BYE).
//!
//! Pure: bytes in, values out, no I/O and no clock. A malformed packet is a [`ParseError`], never a
//! panic; callers skip it.
//!
//! ```text
//! RTP:   V=2|P|X|CC(4) | M|PT(7) | SEQ(16) | TIMESTAMP(32) | SSRC(32) | CSRC*CC | [ext] | payload | [pad]
//! RTCP:  V=2|P|RC(5) | PT(8) | LENGTH(16, 32-bit words - 1) | ...       (compound: several in a row)
//! SR:    SSRC | NTP(64) | RTP TS | PACKETS | OCTETS | report blocks      PT 200
//! RR:    SSRC | report blocks                                            PT 201
//! block: SSRC | FRACTION(8) LOST(24) | EXT HIGHEST SEQ | JITTER | LSR | DLSR   (24 octets)
//! ```

use super::ParseError;

/// RTCP packet type of a sender report.
pub const RTCP_SR: u8 = 200;
/// RTCP packet type of a receiver report.
pub const RTCP_RR: u8 = 201;
/// RTCP packet type of source descriptions.
pub const RTCP_SDES: u8 = 202;
/// RTCP packet type of BYE.
pub const RTCP_BYE: u8 = 203;

/// One parsed RTP packet; the payload borrows from the datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpPacket<'a> {
    /// The marker bit.
    pub marker: bool,
    /// The payload type (0..=127).
    pub payload_type: u8,
    /// The sequence number.
    pub sequence: u16,
    /// The RTP timestamp.
    pub timestamp: u32,
    /// The synchronisation source.
    pub ssrc: u32,
    /// The payload, without CSRCs, header extension and padding.
    pub payload: &'a [u8],
}

fn rtp_error(reason: &'static str) -> ParseError {
    ParseError::Rtp(reason)
}

fn rtcp_error(reason: &'static str) -> ParseError {
    ParseError::Rtcp(reason)
}

fn be16(data: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([data[at], data[at + 1]])
}

fn be32(data: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]])
}

impl<'a> RtpPacket<'a> {
    /// Parses one RTP packet.
    pub fn parse(data: &'a [u8]) -> Result<Self, ParseError> {
        if data.len() < 12 {
            return Err(rtp_error("shorter than the 12-octet header"));
        }
        if data[0] >> 6 != 2 {
            return Err(rtp_error("version is not 2"));
        }
        let padding = data[0] & 0x20 != 0;
        let extension = data[0] & 0x10 != 0;
        let csrcs = usize::from(data[0] & 0x0f);
        let mut start = 12 + 4 * csrcs;
        if extension {
            if data.len() < start + 4 {
                return Err(rtp_error("header extension past the end"));
            }
            start += 4 + 4 * usize::from(be16(data, start + 2));
        }
        if data.len() < start {
            return Err(rtp_error("CSRC list or header extension past the end"));
        }
        let mut end = data.len();
        if padding {
            let count = usize::from(data[end - 1]);
            if count == 0 || count > end - start {
                return Err(rtp_error("bad padding count"));
            }
            end -= count;
        }
        Ok(Self {
            marker: data[1] & 0x80 != 0,
            payload_type: data[1] & 0x7f,
            sequence: be16(data, 2),
            timestamp: be32(data, 4),
            ssrc: be32(data, 8),
            payload: &data[start..end],
        })
    }

    /// Appends this packet (no CSRCs, no extension, no padding) to `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.push(0x80);
        out.push(u8::from(self.marker) << 7 | (self.payload_type & 0x7f));
        out.extend_from_slice(&self.sequence.to_be_bytes());
        out.extend_from_slice(&self.timestamp.to_be_bytes());
        out.extend_from_slice(&self.ssrc.to_be_bytes());
        out.extend_from_slice(self.payload);
    }
}

/// One reception report block of an SR or RR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReportBlock {
    /// The source this block reports on.
    pub ssrc: u32,
    /// Fraction of packets lost since the previous report, in 1/256.
    pub fraction_lost: u8,
    /// Cumulative packets lost (24-bit signed on the wire; clamped when written).
    pub cumulative_lost: i32,
    /// Extended highest sequence number received (cycles << 16 | sequence).
    pub highest_sequence: u32,
    /// Interarrival jitter in timestamp units.
    pub jitter: u32,
    /// The middle 32 bits of the last SR's NTP timestamp (0 if none).
    pub last_sr: u32,
    /// Delay since that SR, in 1/65536 s (0 if none).
    pub delay_since_last_sr: u32,
}

impl ReportBlock {
    fn parse(data: &[u8]) -> Self {
        // The 24-bit signed count, sign-extended by the arithmetic shift.
        let cumulative_lost = i32::from_be_bytes([data[5], data[6], data[7], 0]) >> 8;
        Self {
            ssrc: be32(data, 0),
            fraction_lost: data[4],
            cumulative_lost,
            highest_sequence: be32(data, 8),
            jitter: be32(data, 12),
            last_sr: be32(data, 16),
            delay_since_last_sr: be32(data, 20),
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.ssrc.to_be_bytes());
        let lost = self.cumulative_lost.clamp(-0x0080_0000, 0x007f_ffff);
        let lost = lost.to_be_bytes();
        out.extend_from_slice(&[self.fraction_lost, lost[1], lost[2], lost[3]]);
        out.extend_from_slice(&self.highest_sequence.to_be_bytes());
        out.extend_from_slice(&self.jitter.to_be_bytes());
        out.extend_from_slice(&self.last_sr.to_be_bytes());
        out.extend_from_slice(&self.delay_since_last_sr.to_be_bytes());
    }
}

/// A sender report's sender information.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SenderInfo {
    /// The sender's SSRC.
    pub ssrc: u32,
    /// Wallclock time of the report, NTP format (seconds << 32 | fraction).
    pub ntp: u64,
    /// The RTP timestamp matching `ntp`.
    pub rtp_timestamp: u32,
    /// Packets sent so far.
    pub packets: u32,
    /// Payload octets sent so far.
    pub octets: u32,
}

impl SenderInfo {
    /// The middle 32 bits of the NTP timestamp: the LSR of a report on this SR.
    pub fn compact_ntp(&self) -> u32 {
        // Bits 16..48 of a 64-bit value fit 32 bits.
        u32::try_from((self.ntp >> 16) & 0xffff_ffff).unwrap_or(0)
    }
}

/// One packet of an RTCP compound packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RtcpPacket {
    /// PT 200.
    SenderReport {
        /// Sender information.
        info: SenderInfo,
        /// Reports on the sources the sender receives.
        reports: Vec<ReportBlock>,
    },
    /// PT 201.
    ReceiverReport {
        /// The reporter's SSRC.
        ssrc: u32,
        /// Reports on the sources it receives.
        reports: Vec<ReportBlock>,
    },
    /// PT 203: the sources leave.
    Bye {
        /// The sources leaving.
        ssrcs: Vec<u32>,
    },
    /// Any other packet type (SDES, APP, feedback), not looked into.
    Other {
        /// Its packet type.
        packet_type: u8,
    },
}

/// Parses an RTCP compound packet into its packets.
pub fn parse_rtcp(mut data: &[u8]) -> Result<Vec<RtcpPacket>, ParseError> {
    if data.is_empty() {
        return Err(rtcp_error("empty datagram"));
    }
    let mut packets = Vec::new();
    while !data.is_empty() {
        if data.len() < 4 {
            return Err(rtcp_error("shorter than the 4-octet header"));
        }
        if data[0] >> 6 != 2 {
            return Err(rtcp_error("version is not 2"));
        }
        let count = usize::from(data[0] & 0x1f);
        let packet_type = data[1];
        let len = 4 * (usize::from(be16(data, 2)) + 1);
        if len > data.len() {
            return Err(rtcp_error("length past the end of the datagram"));
        }
        let (packet, rest) = data.split_at(len);
        data = rest;
        let body = &packet[4..];
        packets.push(match packet_type {
            RTCP_SR => {
                if body.len() < 24 + 24 * count {
                    return Err(rtcp_error("sender report shorter than its report count"));
                }
                let info = SenderInfo {
                    ssrc: be32(body, 0),
                    ntp: u64::from(be32(body, 4)) << 32 | u64::from(be32(body, 8)),
                    rtp_timestamp: be32(body, 12),
                    packets: be32(body, 16),
                    octets: be32(body, 20),
                };
                let reports = body[24..].chunks_exact(24).take(count);
                RtcpPacket::SenderReport {
                    info,
                    reports: reports.map(ReportBlock::parse).collect(),
                }
            }
            RTCP_RR => {
                if body.len() < 4 + 24 * count {
                    return Err(rtcp_error("receiver report shorter than its report count"));
                }
                let reports = body[4..].chunks_exact(24).take(count);
                RtcpPacket::ReceiverReport {
                    ssrc: be32(body, 0),
                    reports: reports.map(ReportBlock::parse).collect(),
                }
            }
            RTCP_BYE => {
                if body.len() < 4 * count {
                    return Err(rtcp_error("BYE shorter than its source count"));
                }
                let ssrcs = body.chunks_exact(4).take(count).map(|s| be32(s, 0));
                RtcpPacket::Bye {
                    ssrcs: ssrcs.collect(),
                }
            }
            packet_type => RtcpPacket::Other { packet_type },
        });
    }
    Ok(packets)
}

/// Writes the common header for a packet whose body is `body_len` octets (a multiple of 4).
fn header(out: &mut Vec<u8>, count: usize, packet_type: u8, body_len: usize) {
    let count = u8::try_from(count.min(31)).unwrap_or(31);
    let words = u16::try_from(body_len / 4).unwrap_or(u16::MAX);
    out.push(0x80 | count);
    out.push(packet_type);
    out.extend_from_slice(&words.to_be_bytes());
}

/// An SDES packet with one chunk: `ssrc` and its CNAME (at most 255 octets are written).
fn write_sdes(out: &mut Vec<u8>, ssrc: u32, cname: &str) {
    let cname = &cname.as_bytes()[..cname.len().min(255)];
    // SSRC, CNAME item (type, length, text), END, padding to 32 bits.
    let items = 2 + cname.len() + 1;
    let body_len = 4 + items.div_ceil(4) * 4;
    header(out, 1, RTCP_SDES, body_len);
    out.extend_from_slice(&ssrc.to_be_bytes());
    out.push(1);
    out.push(u8::try_from(cname.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(cname);
    out.resize(out.len() + (body_len - 4 - 2 - cname.len()), 0);
}

/// A compound packet: a sender report (at most 31 report blocks) and SDES CNAME.
pub fn sender_report(info: &SenderInfo, reports: &[ReportBlock], cname: &str) -> Vec<u8> {
    let reports = &reports[..reports.len().min(31)];
    let mut out = Vec::with_capacity(64 + 24 * reports.len());
    header(&mut out, reports.len(), RTCP_SR, 24 + 24 * reports.len());
    out.extend_from_slice(&info.ssrc.to_be_bytes());
    out.extend_from_slice(&info.ntp.to_be_bytes());
    out.extend_from_slice(&info.rtp_timestamp.to_be_bytes());
    out.extend_from_slice(&info.packets.to_be_bytes());
    out.extend_from_slice(&info.octets.to_be_bytes());
    for report in reports {
        report.write(&mut out);
    }
    write_sdes(&mut out, info.ssrc, cname);
    out
}

/// A compound packet: a receiver report (at most 31 report blocks) and SDES CNAME.
pub fn receiver_report(ssrc: u32, reports: &[ReportBlock], cname: &str) -> Vec<u8> {
    let reports = &reports[..reports.len().min(31)];
    let mut out = Vec::with_capacity(40 + 24 * reports.len());
    header(&mut out, reports.len(), RTCP_RR, 4 + 24 * reports.len());
    out.extend_from_slice(&ssrc.to_be_bytes());
    for report in reports {
        report.write(&mut out);
    }
    write_sdes(&mut out, ssrc, cname);
    out
}

/// A compound packet: an empty receiver report (RFC 3550 wants a report first) and a BYE of `ssrc`.
pub fn bye(ssrc: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    header(&mut out, 0, RTCP_RR, 4);
    out.extend_from_slice(&ssrc.to_be_bytes());
    header(&mut out, 1, RTCP_BYE, 4);
    out.extend_from_slice(&ssrc.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtp_round_trip() {
        let packet = RtpPacket {
            marker: true,
            payload_type: 96,
            sequence: 0xfffe,
            timestamp: 0x1234_5678,
            ssrc: 0xdead_beef,
            payload: b"audio",
        };
        let mut out = Vec::new();
        packet.write(&mut out);
        assert_eq!(&out[..4], &[0x80, 0x80 | 0x60, 0xff, 0xfe]);
        assert_eq!(RtpPacket::parse(&out).unwrap(), packet);
    }

    #[test]
    fn rtp_csrcs_extension_and_padding_are_skipped() {
        // V=2 P X CC=1, PT 0, seq 1, ts 2, ssrc 3, one CSRC, extension of 1 word, payload, 3 pad.
        let mut data = vec![0xb1, 0x00, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3, 9, 9, 9, 9];
        data.extend_from_slice(&[0xbe, 0xde, 0, 1, 7, 7, 7, 7]);
        data.extend_from_slice(b"pcm");
        data.extend_from_slice(&[0, 0, 3]);
        let packet = RtpPacket::parse(&data).unwrap();
        assert_eq!(packet.payload, b"pcm");
        assert_eq!((packet.sequence, packet.timestamp, packet.ssrc), (1, 2, 3));
    }

    #[test]
    fn malformed_rtp_is_an_error() {
        let cases: [&[u8]; 6] = [
            b"",
            &[0x80; 11],
            &[0x40, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            // 15 CSRCs announced, none present.
            &[0x8f, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            // Extension announced, cut short.
            &[0x90, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xbe, 0xde],
            // Padding count larger than the payload.
            &[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 9],
        ];
        for data in cases {
            assert!(RtpPacket::parse(data).is_err(), "{data:?}");
        }
        // Padding count 0 is invalid too.
        assert!(RtpPacket::parse(&[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn sender_and_receiver_reports_round_trip() {
        let info = SenderInfo {
            ssrc: 7,
            ntp: 0x0102_0304_0506_0708,
            rtp_timestamp: 1000,
            packets: 50,
            octets: 16000,
        };
        assert_eq!(info.compact_ntp(), 0x0304_0506);
        let block = ReportBlock {
            ssrc: 7,
            fraction_lost: 25,
            cumulative_lost: -3,
            highest_sequence: 0x0001_0005,
            jitter: 12,
            last_sr: 0x0304_0506,
            delay_since_last_sr: 65536,
        };
        let sr = sender_report(&info, &[], "server@demo");
        assert_eq!(sr.len() % 4, 0);
        let parsed = parse_rtcp(&sr).unwrap();
        assert_eq!(
            parsed,
            vec![
                RtcpPacket::SenderReport {
                    info,
                    reports: vec![]
                },
                RtcpPacket::Other {
                    packet_type: RTCP_SDES
                }
            ]
        );
        let rr = receiver_report(99, &[block], "rtsp-get");
        assert_eq!(rr.len() % 4, 0);
        assert_eq!(
            parse_rtcp(&rr).unwrap()[0],
            RtcpPacket::ReceiverReport {
                ssrc: 99,
                reports: vec![block]
            }
        );
        assert_eq!(
            parse_rtcp(&bye(7)).unwrap()[1],
            RtcpPacket::Bye { ssrcs: vec![7] }
        );
    }

    #[test]
    fn cumulative_loss_is_clamped_to_24_bits() {
        let block = ReportBlock {
            cumulative_lost: 1 << 30,
            ..ReportBlock::default()
        };
        let rr = receiver_report(1, &[block], "x");
        let RtcpPacket::ReceiverReport { reports, .. } = &parse_rtcp(&rr).unwrap()[0] else {
            panic!("not an RR")
        };
        assert_eq!(reports[0].cumulative_lost, 0x007f_ffff);
    }

    #[test]
    fn malformed_rtcp_is_an_error() {
        let cases: [&[u8]; 5] = [
            b"",
            &[0x80, 200, 0],
            &[0x00, 200, 0, 0],
            // Length of 2 words, 1 present.
            &[0x80, 201, 0, 2, 0, 0, 0, 1],
            // An RR announcing one report block without it.
            &[0x81, 201, 0, 1, 0, 0, 0, 1],
        ];
        for data in cases {
            assert!(parse_rtcp(data).is_err(), "{data:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = RtpPacket::parse(&data);
            let _ = parse_rtcp(&data);
        }
    }
}
