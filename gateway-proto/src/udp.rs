//! The RFC 1928 UDP request header carried by every datagram relayed for a UDP ASSOCIATE.
//!
//! A datagram is complete when it arrives, so these decoders have no "need more bytes": a
//! datagram too short for its header is [`ProtocolError::Truncated`]. Relays drop bad datagrams
//! silently (protocol.md section 1); the error is for counting why.

use bytes::{Buf, BufMut};

use super::ProtocolError;
use super::addr::Address;
use super::wire::{decode_datagram_with, need};

/// The header in front of each relayed datagram.
///
/// ```text
/// +-----+------+------+----------+----------+----------+
/// | RSV | FRAG | ATYP | DST.ADDR | DST.PORT |   DATA   |
/// +-----+------+------+----------+----------+----------+
/// |  2  |  1   |  1   | variable |    2     | variable |
/// +-----+------+------+----------+----------+----------+
/// ```
///
/// Client to relay, the address is the destination; relay to client, the remote sender.
/// `RSV` must be `0000`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpHeader {
    /// `FRAG`: 0 for a standalone datagram. The gateway drops anything else.
    pub frag: u8,
    /// `ATYP ADDR PORT`.
    pub address: Address,
}

impl UdpHeader {
    /// The largest header.
    pub const MAX_LEN: usize = 3 + Address::MAX_ENCODED_LEN;

    /// A header for a standalone datagram (`FRAG = 0`).
    pub fn new(address: Address) -> Self {
        Self { frag: 0, address }
    }

    /// Whether `FRAG` is non-zero (a fragment, which the gateway does not reassemble).
    pub fn is_fragment(&self) -> bool {
        self.frag != 0
    }

    /// The number of octets [`UdpHeader::encode`] writes: 10 for IPv4, 22 for IPv6.
    pub fn encoded_len(&self) -> usize {
        3 + self.address.encoded_len()
    }

    /// Reads the header at the start of a datagram and leaves `buf` at `DATA`. On error nothing
    /// is consumed.
    pub fn decode(buf: &mut impl Buf) -> Result<Self, ProtocolError> {
        decode_datagram_with(buf, Self::MAX_LEN, |r| {
            let rsv = need!(r.u16());
            if rsv != 0 {
                return Err(ProtocolError::BadReserved(rsv));
            }
            let frag = need!(r.u8());
            let address = need!(Address::read(r)?);
            Ok(Some(Self { frag, address }))
        })
    }

    /// Writes the header; the caller appends `DATA`.
    pub fn encode(&self, buf: &mut impl BufMut) -> Result<(), ProtocolError> {
        self.address.validate()?;
        buf.put_u16(0);
        buf.put_u8(self.frag);
        self.address.put(buf);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use bytes::{Bytes, BytesMut};
    use proptest::prelude::*;

    use super::*;
    use crate::strategies::address;

    fn ip(s: &str) -> Address {
        s.parse::<SocketAddr>().unwrap().into()
    }

    #[test]
    fn every_atyp() {
        let v6_wire = [
            0, 0, 0, 0x04, 0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9, 0x00, 0x07,
        ];
        let cases: [(&[u8], UdpHeader); 3] = [
            (
                &[0, 0, 0, 0x01, 203, 0, 113, 2, 0x17, 0x70],
                UdpHeader::new(ip("203.0.113.2:6000")),
            ),
            (&v6_wire, UdpHeader::new(ip("[2001:db8::9]:7"))),
            (
                &[0, 0, 0, 0x03, 4, b'e', b'.', b't', b'x', 0, 53],
                UdpHeader::new(Address::Domain("e.tx".into(), 53)),
            ),
        ];
        for (wire, header) in cases {
            let mut datagram = wire.to_vec();
            datagram.extend_from_slice(b"payload");
            let mut buf = &datagram[..];
            assert_eq!(UdpHeader::decode(&mut buf), Ok(header.clone()));
            assert_eq!(buf, b"payload");
            let mut out = Vec::new();
            header.encode(&mut out).unwrap();
            assert_eq!(out, wire);
            assert_eq!(header.encoded_len(), wire.len());
            // Every truncation of the header is an error, never a panic.
            for len in 0..wire.len() {
                let mut short = &wire[..len];
                assert_eq!(UdpHeader::decode(&mut short), Err(ProtocolError::Truncated));
                assert_eq!(short.len(), len);
            }
        }
        assert_eq!(UdpHeader::new(ip("1.2.3.4:5")).encoded_len(), 10);
        assert_eq!(UdpHeader::new(ip("[::1]:5")).encoded_len(), 22);
    }

    #[test]
    fn header_only_datagram_has_empty_data() {
        let mut buf = Bytes::from_static(&[0, 0, 0, 0x01, 1, 2, 3, 4, 0, 5]);
        UdpHeader::decode(&mut buf).unwrap();
        assert!(buf.is_empty());
    }

    #[test]
    fn fragments_are_decoded_and_flagged() {
        let wire = [0, 0, 0x81, 0x01, 1, 2, 3, 4, 0, 5, 0xAA];
        let header = UdpHeader::decode(&mut &wire[..]).unwrap();
        assert_eq!(header.frag, 0x81);
        assert!(header.is_fragment());
        assert!(!UdpHeader::new(ip("1.2.3.4:5")).is_fragment());
    }

    #[test]
    fn malformed() {
        let cases: [(&[u8], ProtocolError); 4] = [
            (
                &[0, 1, 0, 0x01, 1, 2, 3, 4, 0, 5],
                ProtocolError::BadReserved(1),
            ),
            (
                &[0x80, 0, 0, 0x01, 1, 2, 3, 4, 0, 5],
                ProtocolError::BadReserved(0x8000),
            ),
            (
                &[0, 0, 0, 0x05, 1, 2, 3, 4, 0, 5],
                ProtocolError::UnknownAddressType(5),
            ),
            (&[0, 0, 0, 0x03, 0, 0, 5], ProtocolError::EmptyDomain),
        ];
        for (wire, err) in cases {
            let mut buf = wire;
            assert_eq!(UdpHeader::decode(&mut buf), Err(err));
            assert_eq!(buf.len(), wire.len());
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut buf = &bytes[..];
            let consumed = UdpHeader::decode(&mut buf).map_or(0, |h| h.encoded_len());
            prop_assert_eq!(buf.len(), bytes.len() - consumed);
        }

        #[test]
        fn round_trip(
            frag in any::<u8>(),
            address in address(),
            data in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let header = UdpHeader { frag, address };
            let mut datagram = BytesMut::new();
            header.encode(&mut datagram).unwrap();
            datagram.put_slice(&data);
            let mut buf = datagram.freeze();
            prop_assert_eq!(UdpHeader::decode(&mut buf), Ok(header));
            prop_assert_eq!(&buf[..], &data[..]);
        }
    }
}
