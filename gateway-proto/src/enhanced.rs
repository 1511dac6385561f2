//! The enhanced UDP mode (the AFT UDP extension, protocol.md section 3): entering it, the control
//! packets on the TCP connection, and the datagram framings between client and relay.
//!
//! Entering: the client sends an ordinary [`Request`] with [`Command::EnhancedUdp`] and
//! `0.0.0.0:0` ([`entry_request`]); the server answers with an [`EntryReply`]. From then on the TCP
//! connection carries only [`Packet`]s. A malformed packet is a [`ProtocolError`] (close the
//! connection); a failed command is a [`ControlReply`] with a non-zero code (keep it open).

mod codes;
mod control;
mod datagram;

use bytes::{Buf, BufMut};

pub use self::codes::{EnhancedReplyCode, Flags, PacketType, UdpCommand};
pub use self::control::{CONTROL_MAX_LEN, CONTROL_MIN_LEN, ControlReply, ControlRequest, Packet};
pub use self::datagram::{DatagramHeader, TcpDatagram};
use super::ProtocolError;
use super::addr::Address;
use super::codec::{Command, Reply, ReplyCode, Request};
use super::wire::{decode_with, need};

/// The first octet of a successful entry reply.
pub const EXTENSION_VERSION: u8 = 0x01;

/// The request that enters the mode: `05 04 00 01 00000000 0000`.
pub fn entry_request() -> Request {
    Request {
        command: Command::EnhancedUdp,
        address: Address::UNSPECIFIED_V4,
    }
}

/// The server's answer to [`entry_request`].
///
/// ```text
/// entered:  +-----+-----+-----+------+----------+----------+
///           | 01  | 00  | 00  | ATYP | BND.ADDR | BND.PORT |
///           +-----+-----+-----+------+----------+----------+
/// refused:  an ordinary SOCKS5 reply, 05 REP 00 ..., REP != 00; the server closes.
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryReply {
    /// `01 00 00 ATYP ADDR PORT`: the connection now carries control packets.
    Entered(Address),
    /// `05 REP 00 ...` with a non-zero `REP`.
    Refused(Reply),
}

impl EntryReply {
    /// Reads the entry reply. A first octet other than `01` or `05`, `01` with a non-zero code, or
    /// `05 00` (a plain success, which is no answer to this request) is an error.
    pub fn decode(buf: &mut impl Buf) -> Result<Option<Self>, ProtocolError> {
        decode_with(buf, Reply::MAX_LEN, |r| {
            let version = need!(r.u8());
            match version {
                EXTENSION_VERSION => {
                    let code = need!(r.u8());
                    if code != 0 {
                        return Err(ProtocolError::BadEntryReply { version, code });
                    }
                    let rsv = need!(r.u8());
                    if rsv != 0 {
                        return Err(ProtocolError::BadReserved(u16::from(rsv)));
                    }
                    Ok(Some(Self::Entered(need!(Address::read(r)?))))
                }
                super::SOCKS_VERSION => {
                    let reply = need!(Reply::read_after_version(r)?);
                    if reply.code == ReplyCode::Succeeded {
                        return Err(ProtocolError::BadEntryReply { version, code: 0 });
                    }
                    Ok(Some(Self::Refused(reply)))
                }
                other => Err(ProtocolError::WrongVersion(other)),
            }
        })
    }

    /// Writes the entry reply. A `Refused` with [`ReplyCode::Succeeded`] is an error.
    pub fn encode(&self, buf: &mut impl BufMut) -> Result<(), ProtocolError> {
        match self {
            Self::Entered(address) => Reply {
                code: ReplyCode::Succeeded,
                address: address.clone(),
            }
            .put_with_version(EXTENSION_VERSION, buf),
            Self::Refused(reply) if reply.code == ReplyCode::Succeeded => {
                Err(ProtocolError::BadEntryReply {
                    version: super::SOCKS_VERSION,
                    code: 0,
                })
            }
            Self::Refused(reply) => reply.encode(buf),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use bytes::BytesMut;
    use proptest::prelude::*;

    use super::*;
    use crate::strategies::{address, assert_prefixes_need_more, check_consumption, hex};

    fn ip(s: &str) -> Address {
        s.parse::<SocketAddr>().unwrap().into()
    }

    fn decode(wire: &[u8]) -> Result<Option<EntryReply>, ProtocolError> {
        EntryReply::decode(&mut &wire[..])
    }

    fn encode(reply: &EntryReply) -> Vec<u8> {
        let mut out = Vec::new();
        reply.encode(&mut out).unwrap();
        out
    }

    const RECV_SEND_UNICAST: Flags = Flags::from_bits_retain(0x0007);

    /// protocol.md section 3, worked example: (wire, packet) for step 1 and step 2, both ways.
    fn worked_example() -> [(Vec<u8>, Packet); 4] {
        let internal_relay = ip("198.51.100.1:40000");
        let external_relay = ip("203.0.113.1:30000");
        let client = ip("198.51.100.2:5000");
        let step1 = ControlRequest {
            command: UdpCommand::Bind,
            flags: RECV_SEND_UNICAST,
            ttl: 0,
            tid: 0x0101,
            aid: 0,
            local: client.clone(),
            remote: Address::UNSPECIFIED_V4,
        };
        let step1_reply = ControlReply {
            code: EnhancedReplyCode::Succeeded,
            flags: RECV_SEND_UNICAST | Flags::REMOTE_PENDING,
            ttl: 0,
            tid: 0x0101,
            aid: 42,
            local: internal_relay.clone(),
            remote: external_relay.clone(),
        };
        let step2 = ControlRequest {
            aid: 42,
            remote: ip("203.0.113.2:6000"),
            ..step1.clone()
        };
        let step2_reply = ControlReply {
            flags: RECV_SEND_UNICAST,
            ..step1_reply.clone()
        };
        [
            (
                hex("01 001B 05 0007 00 0101 00000000 01 C6336402 1388 01 00000000 0000"),
                Packet::Request(step1),
            ),
            (
                hex("02 001B 00 0087 00 0101 0000002A 01 C6336401 9C40 01 CB007101 7530"),
                Packet::Reply(step1_reply),
            ),
            (
                hex("01 001B 05 0007 00 0101 0000002A 01 C6336402 1388 01 CB007102 1770"),
                Packet::Request(step2),
            ),
            (
                hex("02 001B 00 0007 00 0101 0000002A 01 C6336401 9C40 01 CB007101 7530"),
                Packet::Reply(step2_reply),
            ),
        ]
    }

    #[test]
    fn worked_example_decodes_and_encodes_byte_exact() {
        for (wire, packet) in worked_example() {
            assert_eq!(
                Packet::decode(&mut &wire[..]),
                Ok(Some(packet.clone())),
                "{wire:02X?}"
            );
            let mut out = Vec::new();
            packet.encode(&mut out).unwrap();
            assert_eq!(out, wire);
            assert_prefixes_need_more(&wire, |b| Packet::decode(b).map(|m| m.is_some()));
        }
    }

    #[test]
    fn worked_example_back_to_back() {
        let example = worked_example();
        let mut buf = BytesMut::new();
        for (wire, _) in &example {
            buf.extend_from_slice(wire);
        }
        buf.extend_from_slice(&[0x01, 0x00]); // the start of a fifth packet
        for (_, packet) in example {
            assert_eq!(Packet::decode(&mut buf), Ok(Some(packet)));
        }
        assert_eq!(Packet::decode(&mut buf), Ok(None));
        assert_eq!(&buf[..], &[0x01, 0x00]);
    }

    #[test]
    fn decodes_from_a_non_contiguous_buffer() {
        let (wire, packet) = worked_example().into_iter().nth(1).unwrap();
        let mut tcp = hex("03 0008 00000001 AB");
        tcp.extend_from_slice(&wire);
        for split in 0..tcp.len() {
            let (a, b) = tcp.split_at(split);
            let mut chain = a.chain(b);
            let Ok(Some(Packet::Datagram(datagram))) = Packet::decode(&mut chain) else {
                panic!("split at {split}");
            };
            assert_eq!(&datagram.data[..], &[0xAB]);
            assert_eq!(Packet::decode(&mut chain), Ok(Some(packet.clone())));
            assert_eq!(chain.remaining(), 0);
        }
    }

    #[test]
    fn worked_example_enter_the_mode() {
        let request = hex("05 04 00 01 00000000 0000");
        assert_eq!(
            Request::decode(&mut &request[..]),
            Ok(Some(entry_request()))
        );
        let mut out = Vec::new();
        entry_request().encode(&mut out).unwrap();
        assert_eq!(out, request);

        let reply = hex("01 00 00 01 00000000 0000");
        let entered = EntryReply::Entered(Address::UNSPECIFIED_V4);
        assert_eq!(decode(&reply), Ok(Some(entered.clone())));
        assert_eq!(encode(&entered), reply);
        assert_prefixes_need_more(&reply, |b| EntryReply::decode(b).map(|m| m.is_some()));
    }

    #[test]
    fn entered_with_an_address() {
        let wire = hex("01 00 00 01 C6336401 0438");
        let addr: SocketAddr = "198.51.100.1:1080".parse().unwrap();
        assert_eq!(decode(&wire), Ok(Some(EntryReply::Entered(addr.into()))));
    }

    #[test]
    fn refusals_are_ordinary_replies() {
        for code in [ReplyCode::CommandNotSupported, ReplyCode::NotAllowed] {
            let wire = [0x05, code.to_u8(), 0, 0x01, 0, 0, 0, 0, 0, 0];
            let refused = EntryReply::Refused(Reply::failure(code));
            assert_eq!(decode(&wire), Ok(Some(refused.clone())));
            assert_eq!(encode(&refused), wire);
            assert_prefixes_need_more(&wire, |b| EntryReply::decode(b).map(|m| m.is_some()));
        }
    }

    #[test]
    fn malformed_entry_replies() {
        let cases: [(&[u8], ProtocolError); 5] = [
            (
                &[0x01, 0x07],
                ProtocolError::BadEntryReply {
                    version: 1,
                    code: 7,
                },
            ),
            (&[0x01, 0x00, 0x01], ProtocolError::BadReserved(1)),
            (&[0x04], ProtocolError::WrongVersion(4)),
            (
                &[0x05, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0],
                ProtocolError::BadEntryReply {
                    version: 5,
                    code: 0,
                },
            ),
            (&[0x05, 0x09], ProtocolError::UnknownReplyCode(9)),
        ];
        for (wire, err) in cases {
            assert_eq!(decode(wire), Err(err), "{wire:02x?}");
        }
        let plain_success = EntryReply::Refused(Reply {
            code: ReplyCode::Succeeded,
            address: Address::UNSPECIFIED_V4,
        });
        let mut out = Vec::new();
        assert_eq!(
            plain_success.encode(&mut out),
            Err(ProtocolError::BadEntryReply {
                version: 5,
                code: 0
            })
        );
        assert!(out.is_empty());
    }

    fn entry_reply() -> impl Strategy<Value = EntryReply> {
        let refusal = (proptest::sample::select(&ReplyCode::ALL[1..]), address())
            .prop_map(|(code, address)| EntryReply::Refused(Reply { code, address }));
        prop_oneof![address().prop_map(EntryReply::Entered), refusal]
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            check_consumption(&bytes, |b| EntryReply::decode(b).map(|m| m.is_some()))?;
        }

        #[test]
        fn round_trip(reply in entry_reply()) {
            let wire = encode(&reply);
            prop_assert_eq!(decode(&wire), Ok(Some(reply)));
            assert_prefixes_need_more(&wire, |b| EntryReply::decode(b).map(|m| m.is_some()));
        }
    }
}
