//! Enhanced-mode control packets (`PKT TYPE 01` request, `02` reply) and the [`Packet`] stream
//! decoder that also yields TCP-encapsulated datagrams (`03`).

use bytes::{Buf, BufMut};

use super::codes::{EnhancedReplyCode, Flags, PacketType, UdpCommand};
use super::datagram::TcpDatagram;
use crate::ProtocolError;
use crate::addr::Address;
use crate::wire::{Reader, decode_with, need, view};

/// The fixed part of a control packet, before LOCAL.
const CONTROL_FIXED_LEN: usize = 13;
/// The shortest LOCAL or REMOTE: a one-octet domain name.
const MIN_ADDRESS_LEN: usize = 1 + 1 + 1 + 2;

/// The shortest control packet: both addresses one-octet domain names.
pub const CONTROL_MIN_LEN: usize = CONTROL_FIXED_LEN + 2 * MIN_ADDRESS_LEN;
/// The longest control packet: both addresses 255-octet domain names.
pub const CONTROL_MAX_LEN: usize = CONTROL_FIXED_LEN + 2 * Address::MAX_ENCODED_LEN;

/// A control request, client to server (`PKT TYPE 01`).
///
/// ```text
/// off size field
///  0   1   PKT TYPE          01 request (02 reply, see ControlReply)
///  1   2   SIZE              whole packet in octets
///  3   1   UDPCMD / REPLY    05 UDP BIND, 06 UDP RELEASE, 07 SET TTL / reply code
///  4   2   FLAGS
///  6   1   RSVD              (TTL for multicast send)
///  7   2   TID               chosen by the client, echoed in the reply
///  9   4   AID               association id chosen by the server; 0 in a new request
/// 13   var LOCAL             ATYP ADDR PORT
///  ..  var REMOTE            ATYP ADDR PORT
/// ```
///
/// Both addresses are always present (zeros where unused, as in RELEASE) and SIZE must end
/// exactly where REMOTE ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlRequest {
    /// `UDPCMD`.
    pub command: UdpCommand,
    /// `FLAGS`.
    pub flags: Flags,
    /// `RSVD`: the TTL of a multicast send binding or SET TTL, else 0.
    pub ttl: u8,
    /// `TID`: chosen by the client, echoed in the reply; 0 means "not two-step".
    pub tid: u16,
    /// `AID`: 0 in a new request.
    pub aid: u32,
    /// `LOCAL`: where the client sends from and receives on.
    pub local: Address,
    /// `REMOTE`: the remote peer, or unspecified in step 1.
    pub remote: Address,
}

impl ControlRequest {
    /// The number of octets [`ControlRequest::encode`] writes (its SIZE).
    pub fn encoded_len(&self) -> usize {
        CONTROL_FIXED_LEN + self.local.encoded_len() + self.remote.encoded_len()
    }

    /// Writes the packet.
    pub fn encode(&self, buf: &mut impl BufMut) -> Result<(), ProtocolError> {
        let fields = ControlFields {
            kind: PacketType::Request,
            code: self.command.to_u8(),
            flags: self.flags,
            ttl: self.ttl,
            tid: self.tid,
            aid: self.aid,
            local: &self.local,
            remote: &self.remote,
        };
        fields.encode(buf)
    }
}

/// A control reply, server to client (`PKT TYPE 02`): the [`ControlRequest`] layout with the reply
/// code in place of `UDPCMD`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlReply {
    /// `REPLY`.
    pub code: EnhancedReplyCode,
    /// `FLAGS`, with [`Flags::REMOTE_PENDING`] in a step-1 reply.
    pub flags: Flags,
    /// `RSVD`, echoed.
    pub ttl: u8,
    /// `TID` of the request.
    pub tid: u16,
    /// `AID` of the binding.
    pub aid: u32,
    /// `LOCAL`: the internal relay address (client side).
    pub local: Address,
    /// `REMOTE`: the external relay address (remote side).
    pub remote: Address,
}

impl ControlReply {
    /// A reply with `code` that echoes every field of `request` (a refusal, a RELEASE).
    pub fn echo(request: &ControlRequest, code: EnhancedReplyCode) -> Self {
        Self {
            code,
            flags: request.flags,
            ttl: request.ttl,
            tid: request.tid,
            aid: request.aid,
            local: request.local.clone(),
            remote: request.remote.clone(),
        }
    }

    /// The number of octets [`ControlReply::encode`] writes (its SIZE).
    pub fn encoded_len(&self) -> usize {
        CONTROL_FIXED_LEN + self.local.encoded_len() + self.remote.encoded_len()
    }

    /// Writes the packet.
    pub fn encode(&self, buf: &mut impl BufMut) -> Result<(), ProtocolError> {
        let fields = ControlFields {
            kind: PacketType::Reply,
            code: self.code.to_u8(),
            flags: self.flags,
            ttl: self.ttl,
            tid: self.tid,
            aid: self.aid,
            local: &self.local,
            remote: &self.remote,
        };
        fields.encode(buf)
    }
}

/// The fields of either control packet, for the shared encoder and parser.
struct ControlFields<'a> {
    kind: PacketType,
    code: u8,
    flags: Flags,
    ttl: u8,
    tid: u16,
    aid: u32,
    local: &'a Address,
    remote: &'a Address,
}

impl ControlFields<'_> {
    fn encode(&self, buf: &mut impl BufMut) -> Result<(), ProtocolError> {
        self.local.validate()?;
        self.remote.validate()?;
        let len = CONTROL_FIXED_LEN + self.local.encoded_len() + self.remote.encoded_len();
        // At most CONTROL_MAX_LEN (531) once both addresses are valid.
        let size = u16::try_from(len).map_err(|_| ProtocolError::PayloadTooLarge(len))?;
        buf.put_u8(self.kind.to_u8());
        buf.put_u16(size);
        buf.put_u8(self.code);
        buf.put_u16(self.flags.bits());
        buf.put_u8(self.ttl);
        buf.put_u16(self.tid);
        buf.put_u32(self.aid);
        self.local.put(buf);
        self.remote.put(buf);
        Ok(())
    }
}

/// The fields after `PKT TYPE` and `SIZE`, before the code octet is given its meaning.
struct RawControl {
    code: u8,
    flags: Flags,
    ttl: u8,
    tid: u16,
    aid: u32,
    local: Address,
    remote: Address,
}

impl RawControl {
    /// Parses a control packet of exactly `frame.len()` octets, the `size` it declares.
    fn parse(frame: &[u8], size: u16) -> Result<Self, ProtocolError> {
        let mismatch = || ProtocolError::SizeMismatch(size);
        let mut r = Reader::new(frame);
        // The caller checked `size >= CONTROL_MIN_LEN`, so the fixed part is there.
        let (Some(_kind), Some(_size), Some(code), Some(flags), Some(ttl), Some(tid), Some(aid)) =
            (r.u8(), r.u16(), r.u8(), r.u16(), r.u8(), r.u16(), r.u32())
        else {
            return Err(mismatch());
        };
        let local = Address::read(&mut r)?.ok_or_else(mismatch)?;
        let remote = Address::read(&mut r)?.ok_or_else(mismatch)?;
        if r.consumed() != frame.len() {
            return Err(mismatch());
        }
        Ok(Self {
            code,
            flags: Flags::from_bits_retain(flags),
            ttl,
            tid,
            aid,
            local,
            remote,
        })
    }

    fn into_request(self) -> Result<ControlRequest, ProtocolError> {
        Ok(ControlRequest {
            command: UdpCommand::try_from(self.code)?,
            flags: self.flags,
            ttl: self.ttl,
            tid: self.tid,
            aid: self.aid,
            local: self.local,
            remote: self.remote,
        })
    }

    fn into_reply(self) -> Result<ControlReply, ProtocolError> {
        Ok(ControlReply {
            code: EnhancedReplyCode::try_from(self.code)?,
            flags: self.flags,
            ttl: self.ttl,
            tid: self.tid,
            aid: self.aid,
            local: self.local,
            remote: self.remote,
        })
    }
}

/// Anything on the TCP connection after entering the enhanced mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// `PKT TYPE 01`.
    Request(ControlRequest),
    /// `PKT TYPE 02`.
    Reply(ControlReply),
    /// `PKT TYPE 03`.
    Datagram(TcpDatagram),
}

impl Packet {
    /// Reads one packet. `PKT TYPE` and `SIZE` are checked as soon as they arrive (a SIZE no
    /// packet of that type can have is an error at once); then `Ok(None)` until SIZE octets are
    /// there. Either direction's packets are accepted; refusing the wrong direction is the
    /// caller's job.
    pub fn decode(buf: &mut impl Buf) -> Result<Option<Self>, ProtocolError> {
        let (kind, size) = {
            let head = view(buf, 3);
            let mut r = Reader::new(&head);
            let kind = PacketType::try_from(need!(r.u8()))?;
            (kind, need!(r.u16()))
        };
        let (min, max) = match kind {
            PacketType::Request | PacketType::Reply => (CONTROL_MIN_LEN, CONTROL_MAX_LEN),
            PacketType::TcpDatagram => (TcpDatagram::HEADER_LEN, usize::from(u16::MAX)),
        };
        let len = usize::from(size);
        if !(min..=max).contains(&len) {
            return Err(ProtocolError::SizeOutOfRange {
                size,
                min: u16::try_from(min).unwrap_or(u16::MAX),
                max: u16::try_from(max).unwrap_or(u16::MAX),
            });
        }
        if buf.remaining() < len {
            return Ok(None);
        }
        let is_request = match kind {
            PacketType::TcpDatagram => {
                return Ok(Some(Self::Datagram(TcpDatagram::read(buf, size))));
            }
            PacketType::Request => true,
            PacketType::Reply => false,
        };
        decode_with(buf, len, |r| {
            let raw = RawControl::parse(need!(r.take(len)), size)?;
            Ok(Some(if is_request {
                Self::Request(raw.into_request()?)
            } else {
                Self::Reply(raw.into_reply()?)
            }))
        })
    }

    /// The number of octets [`Packet::encode`] writes (its SIZE).
    pub fn encoded_len(&self) -> usize {
        match self {
            Self::Request(p) => p.encoded_len(),
            Self::Reply(p) => p.encoded_len(),
            Self::Datagram(p) => p.encoded_len(),
        }
    }

    /// Writes the packet.
    pub fn encode(&self, buf: &mut impl BufMut) -> Result<(), ProtocolError> {
        match self {
            Self::Request(p) => p.encode(buf),
            Self::Reply(p) => p.encode(buf),
            Self::Datagram(p) => p.encode(buf),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use bytes::Bytes;
    use proptest::prelude::*;

    use super::*;
    use crate::strategies::{address, assert_prefixes_need_more, check_consumption, hex};

    fn ip(s: &str) -> Address {
        s.parse::<SocketAddr>().unwrap().into()
    }

    fn decode(wire: &[u8]) -> Result<Option<Packet>, ProtocolError> {
        Packet::decode(&mut &wire[..])
    }

    fn encode(packet: &Packet) -> Vec<u8> {
        let mut out = Vec::new();
        packet.encode(&mut out).unwrap();
        assert_eq!(out.len(), packet.encoded_len());
        out
    }

    #[test]
    fn every_udp_command_and_release() {
        for &command in UdpCommand::ALL {
            let request = ControlRequest {
                command,
                flags: Flags::empty(),
                ttl: if command == UdpCommand::SetTtl { 16 } else { 0 },
                tid: 7,
                aid: 0xDEAD_BEEF,
                local: Address::UNSPECIFIED_V4,
                remote: Address::UNSPECIFIED_V4,
            };
            let wire = encode(&Packet::Request(request.clone()));
            assert_eq!(wire.len(), CONTROL_FIXED_LEN + 14);
            assert_eq!(wire[3], command.to_u8());
            assert_eq!(decode(&wire), Ok(Some(Packet::Request(request))));
        }
        let release = hex("01 001B 06 0000 00 0000 0000002A 01 00000000 0000 01 00000000 0000");
        let Ok(Some(Packet::Request(request))) = decode(&release) else {
            panic!("RELEASE does not decode");
        };
        assert_eq!((request.command, request.aid), (UdpCommand::Release, 42));
        let reply = ControlReply::echo(&request, EnhancedReplyCode::Succeeded);
        let mut echoed = release.clone();
        echoed[0] = 0x02;
        echoed[3] = 0x00;
        assert_eq!(encode(&Packet::Reply(reply)), echoed);
    }

    #[test]
    fn every_reply_code() {
        for &code in EnhancedReplyCode::ALL {
            let reply = ControlReply {
                code,
                flags: Flags::RTP_PAIR,
                ttl: 0,
                tid: 0xFFFF,
                aid: 1,
                local: ip("[2001:db8::1]:40000"),
                remote: Address::Domain("relay.test".into(), 30000),
            };
            let wire = encode(&Packet::Reply(reply.clone()));
            assert_eq!(wire[3], code.to_u8());
            assert_eq!(&wire[1..3], &[0x00, 13 + 19 + 14]);
            assert_eq!(decode(&wire), Ok(Some(Packet::Reply(reply))));
            assert_prefixes_need_more(&wire, |b| Packet::decode(b).map(|m| m.is_some()));
        }
    }

    #[test]
    fn malformed() {
        let step1 = hex("01 001B 05 0007 00 0101 00000000 01 C6336402 1388 01 00000000 0000");
        let patched = |offset: usize, octet: u8| {
            let mut wire = step1.clone();
            wire[offset] = octet;
            wire
        };
        let mut trailing = patched(2, 0x1C);
        trailing.push(0x00);
        let mut short = patched(2, 0x1A);
        short.pop();
        let mut empty_domain = hex("01 0017 05 0000 00 0000 00000000 03 00");
        empty_domain.resize(0x17, 0);
        let cases: [(Vec<u8>, ProtocolError); 11] = [
            (vec![0x04], ProtocolError::UnknownPacketType(4)),
            (vec![0x00, 0x00], ProtocolError::UnknownPacketType(0)),
            (
                hex("01 0016"),
                ProtocolError::SizeOutOfRange {
                    size: 22,
                    min: 23,
                    max: 531,
                },
            ),
            (
                hex("02 0214"),
                ProtocolError::SizeOutOfRange {
                    size: 532,
                    min: 23,
                    max: 531,
                },
            ),
            (
                hex("03 0006"),
                ProtocolError::SizeOutOfRange {
                    size: 6,
                    min: 7,
                    max: 65535,
                },
            ),
            (trailing, ProtocolError::SizeMismatch(0x1C)),
            (short, ProtocolError::SizeMismatch(0x1A)),
            (patched(13, 0x02), ProtocolError::UnknownAddressType(2)),
            (patched(20, 0x05), ProtocolError::UnknownAddressType(5)),
            (patched(3, 0x08), ProtocolError::UnknownUdpCommand(8)),
            (empty_domain, ProtocolError::EmptyDomain),
        ];
        for (wire, err) in cases {
            let mut buf = &wire[..];
            assert_eq!(Packet::decode(&mut buf), Err(err), "{wire:02X?}");
            assert_eq!(buf.len(), wire.len(), "an error consumes nothing");
        }
        let mut reply = patched(0, 0x02);
        reply[3] = 0x09;
        assert_eq!(
            decode(&reply),
            Err(ProtocolError::UnknownEnhancedReplyCode(9))
        );
    }

    #[test]
    fn domain_too_long_is_refused_by_the_encoder() {
        let request = ControlRequest {
            command: UdpCommand::Bind,
            flags: Flags::empty(),
            ttl: 0,
            tid: 0,
            aid: 0,
            local: Address::UNSPECIFIED_V4,
            remote: Address::Domain("x".repeat(256), 1),
        };
        let mut out = Vec::new();
        assert_eq!(
            request.encode(&mut out),
            Err(ProtocolError::DomainTooLong(256))
        );
        assert!(out.is_empty());
    }

    #[test]
    fn largest_control_packet() {
        let name = Address::Domain("n".repeat(255), 9);
        let reply = ControlReply {
            code: EnhancedReplyCode::Succeeded,
            flags: Flags::empty(),
            ttl: 0,
            tid: 1,
            aid: 2,
            local: name.clone(),
            remote: name,
        };
        let wire = encode(&Packet::Reply(reply.clone()));
        assert_eq!(wire.len(), CONTROL_MAX_LEN);
        assert_eq!(decode(&wire), Ok(Some(Packet::Reply(reply))));
    }

    fn flags() -> impl Strategy<Value = Flags> {
        any::<u16>().prop_map(Flags::from_bits_retain)
    }

    fn control_request() -> impl Strategy<Value = ControlRequest> {
        (
            proptest::sample::select(UdpCommand::ALL),
            flags(),
            any::<(u8, u16, u32)>(),
            address(),
            address(),
        )
            .prop_map(
                |(command, flags, (ttl, tid, aid), local, remote)| ControlRequest {
                    command,
                    flags,
                    ttl,
                    tid,
                    aid,
                    local,
                    remote,
                },
            )
    }

    fn control_reply() -> impl Strategy<Value = ControlReply> {
        (
            control_request(),
            proptest::sample::select(EnhancedReplyCode::ALL),
        )
            .prop_map(|(request, code)| ControlReply::echo(&request, code))
    }

    fn packet() -> impl Strategy<Value = Packet> {
        let datagram = (any::<u32>(), proptest::collection::vec(any::<u8>(), 0..200)).prop_map(
            |(aid, data)| {
                Packet::Datagram(TcpDatagram {
                    aid,
                    data: Bytes::from(data),
                })
            },
        );
        prop_oneof![
            control_request().prop_map(Packet::Request),
            control_reply().prop_map(Packet::Reply),
            datagram,
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            check_consumption(&bytes, |b| Packet::decode(b).map(|m| m.is_some()))?;
        }

        /// Arbitrary contents behind a plausible header, so the field parsers are reached.
        #[test]
        fn arbitrary_bodies_never_panic(
            kind in 1u8..=3,
            body in proptest::collection::vec(any::<u8>(), 4..560),
            extra in 0usize..3,
        ) {
            let size = u16::try_from(3 + body.len()).unwrap();
            let mut wire = vec![kind];
            wire.extend_from_slice(&size.to_be_bytes());
            wire.extend_from_slice(&body);
            wire.extend(std::iter::repeat_n(0xEE, extra));
            check_consumption(&wire, |b| Packet::decode(b).map(|m| m.is_some()))?;
            // Whatever decodes is canonical: it encodes back to exactly the octets it came from.
            if let Ok(Some(packet)) = decode(&wire) {
                prop_assert_eq!(&encode(&packet)[..], &wire[..usize::from(size)]);
            }
        }

        #[test]
        fn round_trip(packet in packet()) {
            let wire = encode(&packet);
            prop_assert_eq!(decode(&wire), Ok(Some(packet)));
            assert_prefixes_need_more(&wire, |b| Packet::decode(b).map(|m| m.is_some()));
        }
    }
}
