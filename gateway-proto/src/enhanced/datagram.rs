//! Enhanced-mode datagram framings: the 8-octet header on UDP between client and relay (with the
//! remote's address after it for Listen bindings), and the TCP-encapsulated datagram.

use bytes::{Buf, BufMut, Bytes};

use crate::ProtocolError;
use crate::addr::Address;
use crate::wire::{decode_datagram_with, need};

use super::codes::PacketType;

/// The header in front of each UDP datagram between client and relay.
///
/// ```text
/// +-----+------+------+-----+----------------------+----------+
/// | RSV | FRAG | DGID | AID | ATYP ADDR PORT       |   DATA   |
/// +-----+------+------+-----+----------------------+----------+
/// | 00  |  1   |  2   |  4  | Listen bindings only | variable |
/// +-----+------+------+-----+----------------------+----------+
/// ```
///
/// An Open binding relays only its one remote, so its header has no address. A Listen binding's
/// datagrams carry the remote after the 8 octets: to the client who sent it, from the client
/// where it goes. Whether a binding is Listen is known only from its AID, so the relay reads the
/// AID first ([`DatagramHeader::peek_aid`]) and then decodes with or without the address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatagramHeader {
    /// `FRAG`: 0 for a whole datagram. The gateway never fragments and drops anything else.
    pub frag: u8,
    /// `DGID`: datagram id of a fragmented datagram, 0 for a whole one.
    pub dgid: u16,
    /// `AID`: the binding.
    pub aid: u32,
    /// The remote, present for Listen bindings only.
    pub remote: Option<Address>,
}

impl DatagramHeader {
    /// The fixed header length.
    pub const LEN: usize = 8;
    /// The largest header: the fixed part and a 255-octet domain name.
    pub const MAX_LEN: usize = Self::LEN + Address::MAX_ENCODED_LEN;

    /// The header of a whole datagram of an Open binding.
    pub fn new(aid: u32) -> Self {
        Self {
            frag: 0,
            dgid: 0,
            aid,
            remote: None,
        }
    }

    /// The header of a whole datagram of a Listen binding.
    pub fn with_remote(aid: u32, remote: Address) -> Self {
        Self {
            remote: Some(remote),
            ..Self::new(aid)
        }
    }

    /// Whether `FRAG` and `DGID` are both 0 (a whole datagram).
    pub fn is_whole(&self) -> bool {
        self.frag == 0 && self.dgid == 0
    }

    /// The AID of a datagram, without checking anything else; `None` if it is shorter than 8.
    pub fn peek_aid(datagram: &[u8]) -> Option<u32> {
        let aid = datagram.get(4..Self::LEN)?;
        aid.try_into().ok().map(u32::from_be_bytes)
    }

    /// The number of octets [`DatagramHeader::encode`] writes.
    pub fn encoded_len(&self) -> usize {
        Self::LEN + self.remote.as_ref().map_or(0, Address::encoded_len)
    }

    /// Reads the 8-octet header of an Open binding's datagram and leaves `buf` at `DATA`.
    pub fn decode(buf: &mut impl Buf) -> Result<Self, ProtocolError> {
        Self::decode_inner(buf, false)
    }

    /// Reads the header of a Listen binding's datagram, the remote's address included, and
    /// leaves `buf` at `DATA`.
    pub fn decode_with_remote(buf: &mut impl Buf) -> Result<Self, ProtocolError> {
        Self::decode_inner(buf, true)
    }

    fn decode_inner(buf: &mut impl Buf, with_remote: bool) -> Result<Self, ProtocolError> {
        decode_datagram_with(buf, Self::MAX_LEN, |r| {
            let rsv = need!(r.u8());
            if rsv != 0 {
                return Err(ProtocolError::BadReserved(u16::from(rsv)));
            }
            let frag = need!(r.u8());
            let dgid = need!(r.u16());
            let aid = need!(r.u32());
            let remote = if with_remote {
                Some(need!(Address::read(r)?))
            } else {
                None
            };
            Ok(Some(Self {
                frag,
                dgid,
                aid,
                remote,
            }))
        })
    }

    /// Writes the header (and the remote, if any); the caller appends `DATA`.
    pub fn encode(&self, buf: &mut impl BufMut) -> Result<(), ProtocolError> {
        if let Some(remote) = &self.remote {
            remote.validate()?;
        }
        buf.put_u8(0);
        buf.put_u8(self.frag);
        buf.put_u16(self.dgid);
        buf.put_u32(self.aid);
        if let Some(remote) = &self.remote {
            remote.put(buf);
        }
        Ok(())
    }
}

/// A datagram carried on the control connection (`TCP_ENCAPSULATED` bindings).
///
/// ```text
/// +----+------+-----+----------+
/// | 03 | SIZE | AID |   DATA   |
/// +----+------+-----+----------+
/// | 1  |  2   |  4  | SIZE - 7 |
/// +----+------+-----+----------+
/// ```
///
/// SIZE counts the whole packet. Decoded by [`super::Packet::decode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpDatagram {
    /// `AID`: the binding.
    pub aid: u32,
    /// `DATA`, at most [`TcpDatagram::MAX_DATA_LEN`] octets.
    pub data: Bytes,
}

impl TcpDatagram {
    /// `PKT TYPE`, `SIZE`, `AID`.
    pub const HEADER_LEN: usize = 7;
    /// The most `DATA` a 16-bit SIZE leaves room for.
    pub const MAX_DATA_LEN: usize = u16::MAX as usize - Self::HEADER_LEN;

    /// The number of octets [`TcpDatagram::encode`] writes (its SIZE).
    pub fn encoded_len(&self) -> usize {
        Self::HEADER_LEN + self.data.len()
    }

    /// Writes the packet.
    pub fn encode(&self, buf: &mut impl BufMut) -> Result<(), ProtocolError> {
        let size = u16::try_from(self.encoded_len())
            .map_err(|_| ProtocolError::PayloadTooLarge(self.data.len()))?;
        buf.put_u8(PacketType::TcpDatagram.to_u8());
        buf.put_u16(size);
        buf.put_u32(self.aid);
        buf.put_slice(&self.data);
        Ok(())
    }

    /// Consumes a packet whose type (`03`) and `size` were checked and whose `size` octets are
    /// all in `buf`.
    pub(super) fn read(buf: &mut impl Buf, size: u16) -> Self {
        buf.advance(3);
        let aid = buf.get_u32();
        let data = buf.copy_to_bytes(usize::from(size).saturating_sub(Self::HEADER_LEN));
        Self { aid, data }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use bytes::BytesMut;
    use proptest::prelude::*;

    use super::*;
    use crate::enhanced::Packet;
    use crate::strategies::{address, assert_prefixes_need_more, hex};

    fn ip(s: &str) -> Address {
        s.parse::<SocketAddr>().unwrap().into()
    }

    #[test]
    fn open_binding_header() {
        let datagram = hex("00 00 0000 0000002A 80 60 1234");
        assert_eq!(DatagramHeader::peek_aid(&datagram), Some(42));
        let mut buf = &datagram[..];
        let header = DatagramHeader::decode(&mut buf).unwrap();
        assert_eq!(header, DatagramHeader::new(42));
        assert!(header.is_whole());
        assert_eq!(buf, &hex("80 60 1234")[..], "left at DATA (an RTP header)");
        let mut out = Vec::new();
        header.encode(&mut out).unwrap();
        assert_eq!(out, &datagram[..DatagramHeader::LEN]);
        assert_eq!(header.encoded_len(), 8);
    }

    #[test]
    fn listen_binding_header_every_atyp() {
        let remotes = [
            (ip("203.0.113.2:6000"), hex("01 CB007102 1770")),
            (
                ip("[2001:db8::2]:6000"),
                hex("04 20010DB8000000000000000000000002 1770"),
            ),
            (
                Address::Domain("s.test".into(), 6000),
                hex("03 06 732E74657374 1770"),
            ),
        ];
        for (remote, addr_wire) in remotes {
            let mut wire = hex("00 00 0000 0000002A");
            wire.extend_from_slice(&addr_wire);
            let header = DatagramHeader::with_remote(42, remote);
            let mut out = Vec::new();
            header.encode(&mut out).unwrap();
            assert_eq!(out, wire);
            assert_eq!(header.encoded_len(), wire.len());
            wire.extend_from_slice(b"data");
            let mut buf = &wire[..];
            assert_eq!(DatagramHeader::decode_with_remote(&mut buf), Ok(header));
            assert_eq!(buf, b"data");
        }
    }

    #[test]
    fn truncated_and_malformed_headers() {
        let open = hex("00 00 0000 0000002A");
        for len in 0..open.len() {
            let mut buf = &open[..len];
            assert_eq!(
                DatagramHeader::decode(&mut buf),
                Err(ProtocolError::Truncated)
            );
            assert_eq!(buf.len(), len);
        }
        assert_eq!(DatagramHeader::peek_aid(&open[..7]), None);
        let listen = hex("00 00 0000 0000002A 01 CB007102 1770");
        for len in 0..listen.len() {
            let mut buf = &listen[..len];
            assert_eq!(
                DatagramHeader::decode_with_remote(&mut buf),
                Err(ProtocolError::Truncated)
            );
        }
        let cases: [(Vec<u8>, ProtocolError); 2] = [
            (hex("01 00 0000 0000002A 01"), ProtocolError::BadReserved(1)),
            (
                hex("00 00 0000 0000002A 02"),
                ProtocolError::UnknownAddressType(2),
            ),
        ];
        for (wire, err) in cases {
            let mut buf = &wire[..];
            assert_eq!(DatagramHeader::decode_with_remote(&mut buf), Err(err));
            assert_eq!(buf.len(), wire.len());
        }
    }

    #[test]
    fn fragments_are_decoded_not_whole() {
        let header = DatagramHeader::decode(&mut &hex("00 01 0007 00000001")[..]).unwrap();
        assert_eq!((header.frag, header.dgid, header.aid), (1, 7, 1));
        assert!(!header.is_whole());
        let header = DatagramHeader::decode(&mut &hex("00 00 0007 00000001")[..]).unwrap();
        assert!(!header.is_whole());
    }

    #[test]
    fn tcp_encapsulated_datagram() {
        let wire = hex("03 000B 0000002A DEADBEEF");
        let datagram = TcpDatagram {
            aid: 42,
            data: Bytes::from_static(&[0xDE, 0xAD, 0xBE, 0xEF]),
        };
        let mut buf = BytesMut::from(&wire[..]);
        assert_eq!(
            Packet::decode(&mut buf),
            Ok(Some(Packet::Datagram(datagram.clone())))
        );
        assert!(buf.is_empty());
        let mut out = Vec::new();
        datagram.encode(&mut out).unwrap();
        assert_eq!(out, wire);
        assert_prefixes_need_more(&wire, |b| Packet::decode(b).map(|m| m.is_some()));

        let empty = hex("03 0007 00000001");
        assert_eq!(
            Packet::decode(&mut &empty[..]),
            Ok(Some(Packet::Datagram(TcpDatagram {
                aid: 1,
                data: Bytes::new()
            })))
        );
    }

    #[test]
    fn largest_tcp_datagram() {
        let datagram = TcpDatagram {
            aid: 9,
            data: Bytes::from(vec![0x55; TcpDatagram::MAX_DATA_LEN]),
        };
        let mut out = BytesMut::new();
        datagram.encode(&mut out).unwrap();
        assert_eq!(out.len(), usize::from(u16::MAX));
        assert_eq!(&out[..3], &[0x03, 0xFF, 0xFF]);
        assert_eq!(
            Packet::decode(&mut out),
            Ok(Some(Packet::Datagram(datagram)))
        );

        let too_big = TcpDatagram {
            aid: 9,
            data: Bytes::from(vec![0; TcpDatagram::MAX_DATA_LEN + 1]),
        };
        let mut out = Vec::new();
        assert_eq!(
            too_big.encode(&mut out),
            Err(ProtocolError::PayloadTooLarge(
                TcpDatagram::MAX_DATA_LEN + 1
            ))
        );
        assert!(out.is_empty());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            for with_remote in [false, true] {
                let mut buf = &bytes[..];
                let decoded = if with_remote {
                    DatagramHeader::decode_with_remote(&mut buf)
                } else {
                    DatagramHeader::decode(&mut buf)
                };
                let consumed = decoded.map_or(0, |h| h.encoded_len());
                prop_assert_eq!(buf.len(), bytes.len() - consumed);
            }
            let _ = DatagramHeader::peek_aid(&bytes);
        }

        #[test]
        fn round_trip(
            frag in any::<u8>(),
            dgid in any::<u16>(),
            aid in any::<u32>(),
            remote in proptest::option::of(address()),
            data in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let header = DatagramHeader { frag, dgid, aid, remote };
            let mut datagram = BytesMut::new();
            header.encode(&mut datagram).unwrap();
            prop_assert_eq!(DatagramHeader::peek_aid(&datagram), Some(aid));
            datagram.put_slice(&data);
            let mut buf = datagram.freeze();
            let decoded = if header.remote.is_some() {
                DatagramHeader::decode_with_remote(&mut buf)
            } else {
                DatagramHeader::decode(&mut buf)
            };
            prop_assert_eq!(decoded, Ok(header));
            prop_assert_eq!(&buf[..], &data[..]);
        }
    }
}
