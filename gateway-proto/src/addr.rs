//! The SOCKS5 address (`ATYP ADDR PORT`), shared by requests, replies, UDP headers and the
//! enhanced mode's LOCAL / REMOTE fields.
//!
//! ```text
//! +------+----------------------------+------+
//! | ATYP | ADDR                       | PORT |
//! +------+----------------------------+------+
//! |  01  | IPv4, 4 octets             |  2   |
//! |  03  | LEN(1) + name, LEN 1..255  |  2   |
//! |  04  | IPv6, 16 octets            |  2   |
//! +------+----------------------------+------+
//! ```

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};

use bytes::{Buf, BufMut};

use super::ProtocolError;
use super::wire::{Reader, byte_enum, decode_with, need};

byte_enum! {
    /// `ATYP`: how the address that follows is written.
    pub enum AddressType (unknown: ProtocolError::UnknownAddressType) {
        /// `01`: 4 octets.
        Ipv4 = 0x01,
        /// `03`: a length octet and a name.
        Domain = 0x03,
        /// `04`: 16 octets.
        Ipv6 = 0x04,
    }
}

/// A SOCKS5 address: an IP socket address or a domain name with a port.
///
/// IPv6 flow info and scope id are not on the wire (always 0 after decoding). IPv4-mapped IPv6
/// addresses are kept as IPv6; normalising them is the caller's decision.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Address {
    /// `ATYP 01` or `04`.
    Ip(SocketAddr),
    /// `ATYP 03`: a name of 1..255 octets of UTF-8 without control characters, and a port.
    Domain(String, u16),
}

impl Address {
    /// `0.0.0.0:0`, the "address unknown" of requests and enhanced-mode REMOTE.
    pub const UNSPECIFIED_V4: Self =
        Self::Ip(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)));

    /// The largest encoding: `03`, a length octet, 255 octets of name, 2 of port.
    pub const MAX_ENCODED_LEN: usize = 1 + 1 + 255 + 2;

    /// The port.
    pub fn port(&self) -> u16 {
        match self {
            Self::Ip(addr) => addr.port(),
            Self::Domain(_, port) => *port,
        }
    }

    /// The `ATYP` this address is written with.
    pub fn address_type(&self) -> AddressType {
        match self {
            Self::Ip(SocketAddr::V4(_)) => AddressType::Ipv4,
            Self::Ip(SocketAddr::V6(_)) => AddressType::Ipv6,
            Self::Domain(..) => AddressType::Domain,
        }
    }

    /// True when the host part says "unknown": `0.0.0.0`, `::`, or the domain name `"0"` that
    /// `PySocks` sends (with its local port) in UDP ASSOCIATE when remote DNS is on. The port is
    /// not looked at.
    pub fn is_unspecified_host(&self) -> bool {
        match self {
            Self::Ip(addr) => addr.ip().is_unspecified(),
            Self::Domain(name, _) => name == "0",
        }
    }

    /// True for `0.0.0.0:0`, `[::]:0` and `"0":0`: host and port both unknown (an unspecified
    /// enhanced-mode REMOTE, a UDP ASSOCIATE client address of all zeros).
    pub fn is_unspecified(&self) -> bool {
        self.is_unspecified_host() && self.port() == 0
    }

    /// The number of octets [`Address::encode`] writes.
    pub fn encoded_len(&self) -> usize {
        match self {
            Self::Ip(SocketAddr::V4(_)) => 1 + 4 + 2,
            Self::Ip(SocketAddr::V6(_)) => 1 + 16 + 2,
            Self::Domain(name, _) => 1 + 1 + name.len() + 2,
        }
    }

    /// Checks that the address can be encoded: a domain name of 1..255 octets without control
    /// characters.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        match self {
            Self::Ip(_) => Ok(()),
            Self::Domain(name, _) => validate_domain(name.as_bytes()).map(|_| ()),
        }
    }

    /// Writes `ATYP ADDR PORT`. Nothing is written when the address is invalid.
    pub fn encode(&self, buf: &mut impl BufMut) -> Result<(), ProtocolError> {
        self.validate()?;
        self.put(buf);
        Ok(())
    }

    /// Reads `ATYP ADDR PORT` from a stream: `Ok(None)` (consuming nothing) until it is complete.
    pub fn decode(buf: &mut impl Buf) -> Result<Option<Self>, ProtocolError> {
        decode_with(buf, Self::MAX_ENCODED_LEN, Self::read)
    }

    /// Writes an address that [`Address::validate`] accepted.
    pub(crate) fn put(&self, buf: &mut impl BufMut) {
        match self {
            Self::Ip(SocketAddr::V4(addr)) => {
                buf.put_u8(AddressType::Ipv4.to_u8());
                buf.put_slice(&addr.ip().octets());
            }
            Self::Ip(SocketAddr::V6(addr)) => {
                buf.put_u8(AddressType::Ipv6.to_u8());
                buf.put_slice(&addr.ip().octets());
            }
            Self::Domain(name, _) => {
                // Validated to 1..=255 octets; the clamp keeps LEN and the name consistent anyway.
                let name = &name.as_bytes()[..name.len().min(255)];
                buf.put_u8(AddressType::Domain.to_u8());
                buf.put_u8(u8::try_from(name.len()).unwrap_or(u8::MAX));
                buf.put_slice(name);
            }
        }
        buf.put_u16(self.port());
    }

    /// Parses `ATYP ADDR PORT`; errors are reported as soon as the octet that shows them arrives.
    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Option<Self>, ProtocolError> {
        let atyp = AddressType::try_from(need!(r.u8()))?;
        let addr = match atyp {
            AddressType::Ipv4 => {
                let ip = Ipv4Addr::from(need!(r.array::<4>()));
                Self::Ip(SocketAddr::new(IpAddr::V4(ip), need!(r.u16())))
            }
            AddressType::Ipv6 => {
                let ip = Ipv6Addr::from(need!(r.array::<16>()));
                Self::Ip(SocketAddr::new(IpAddr::V6(ip), need!(r.u16())))
            }
            AddressType::Domain => {
                let len = need!(r.u8());
                if len == 0 {
                    return Err(ProtocolError::EmptyDomain);
                }
                let name = validate_domain(need!(r.take(usize::from(len))))?;
                let name = name.to_owned();
                Self::Domain(name, need!(r.u16()))
            }
        };
        Ok(Some(addr))
    }
}

/// Checks a domain name's octets: 1..255 of them, UTF-8, no control characters.
fn validate_domain(name: &[u8]) -> Result<&str, ProtocolError> {
    if name.is_empty() {
        return Err(ProtocolError::EmptyDomain);
    }
    if name.len() > 255 {
        return Err(ProtocolError::DomainTooLong(name.len()));
    }
    let name = std::str::from_utf8(name).map_err(|_| ProtocolError::InvalidDomain)?;
    // Control characters have no place in a host name and would let a client forge log lines.
    if name.chars().any(char::is_control) {
        return Err(ProtocolError::InvalidDomain);
    }
    Ok(name)
}

impl From<SocketAddr> for Address {
    fn from(addr: SocketAddr) -> Self {
        Self::Ip(addr)
    }
}

impl fmt::Display for Address {
    /// `192.0.2.1:80`, `[2001:db8::1]:80`, `example.test:80`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ip(addr) => addr.fmt(f),
            Self::Domain(name, port) => write!(f, "{name}:{port}"),
        }
    }
}

/// An address family. IPv4-mapped IPv6 addresses count as IPv4 everywhere in the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// The family of `ip` (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }

    /// `0.0.0.0:0` or `[::]:0`: the unspecified REMOTE of a step 1 or a Listen.
    pub fn unspecified(self) -> Address {
        let ip = match self {
            Self::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            Self::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        Address::Ip(SocketAddr::new(ip, 0))
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use proptest::prelude::*;

    use super::*;
    use crate::strategies::{address, assert_prefixes_need_more};

    fn decode_all(bytes: &[u8]) -> Result<Option<Address>, ProtocolError> {
        let mut buf = bytes;
        Address::decode(&mut buf)
    }

    #[test]
    fn every_atyp() {
        let cases: [(Address, &[u8]); 3] = [
            (
                "192.0.2.1:80".parse::<SocketAddr>().unwrap().into(),
                &[0x01, 192, 0, 2, 1, 0x00, 0x50],
            ),
            (
                Address::Domain("a.test".into(), 443),
                &[0x03, 6, b'a', b'.', b't', b'e', b's', b't', 0x01, 0xBB],
            ),
            (
                "[2001:db8::1]:8080".parse::<SocketAddr>().unwrap().into(),
                &[
                    0x04, 0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0x1F, 0x90,
                ],
            ),
        ];
        for (addr, wire) in cases {
            let mut out = BytesMut::new();
            addr.encode(&mut out).unwrap();
            assert_eq!(&out[..], wire, "{addr}");
            assert_eq!(addr.encoded_len(), wire.len());
            assert_eq!(decode_all(wire), Ok(Some(addr.clone())));
            assert_prefixes_need_more(wire, |b| Address::decode(b).map(|o| o.is_some()));
        }
    }

    #[test]
    fn malformed() {
        assert_eq!(
            decode_all(&[0x02, 1, 2, 3, 4, 0, 0]),
            Err(ProtocolError::UnknownAddressType(2))
        );
        assert_eq!(
            decode_all(&[0x00]),
            Err(ProtocolError::UnknownAddressType(0))
        );
        assert_eq!(decode_all(&[0x03, 0]), Err(ProtocolError::EmptyDomain));
        assert_eq!(
            decode_all(&[0x03, 2, 0xff, 0xfe, 0, 80]),
            Err(ProtocolError::InvalidDomain)
        );
        assert_eq!(
            decode_all(&[0x03, 3, b'a', b'\n', b'b', 0, 80]),
            Err(ProtocolError::InvalidDomain)
        );
        // The error shows before the port arrives.
        assert_eq!(
            decode_all(&[0x03, 1, 0x00]),
            Err(ProtocolError::InvalidDomain)
        );
    }

    #[test]
    fn longest_domain() {
        let name = "x".repeat(255);
        let addr = Address::Domain(name.clone(), 1);
        let mut out = Vec::new();
        addr.encode(&mut out).unwrap();
        assert_eq!(out.len(), Address::MAX_ENCODED_LEN);
        assert_eq!(decode_all(&out), Ok(Some(addr)));

        let too_long = Address::Domain(name + "x", 1);
        let mut out = Vec::new();
        assert_eq!(
            too_long.encode(&mut out),
            Err(ProtocolError::DomainTooLong(256))
        );
        assert!(out.is_empty());
        assert_eq!(
            Address::Domain(String::new(), 1).encode(&mut out),
            Err(ProtocolError::EmptyDomain)
        );
    }

    #[test]
    fn unspecified() {
        let v6: Address = "[::]:0".parse::<SocketAddr>().unwrap().into();
        let pysocks = Address::Domain("0".into(), 0);
        for addr in [Address::UNSPECIFIED_V4, v6, pysocks] {
            assert!(addr.is_unspecified(), "{addr}");
            assert!(addr.is_unspecified_host(), "{addr}");
        }
        // PySocks with rdns=True: domain "0" and its local port.
        let pysocks_port = Address::Domain("0".into(), 5000);
        assert!(pysocks_port.is_unspecified_host());
        assert!(!pysocks_port.is_unspecified());
        let zero_port: Address = "192.0.2.1:0".parse::<SocketAddr>().unwrap().into();
        assert!(!zero_port.is_unspecified_host());
        assert!(!Address::Domain("00".into(), 0).is_unspecified());
    }

    #[test]
    fn display() {
        let v6: Address = "[2001:db8::1]:80".parse::<SocketAddr>().unwrap().into();
        assert_eq!(v6.to_string(), "[2001:db8::1]:80");
        assert_eq!(
            Address::Domain("a.test".into(), 80).to_string(),
            "a.test:80"
        );
    }

    proptest! {
        #[test]
        fn round_trip(addr in address()) {
            let mut out = BytesMut::new();
            addr.encode(&mut out).unwrap();
            prop_assert_eq!(out.len(), addr.encoded_len());
            out.put_slice(b"tail");
            let mut buf = out.freeze();
            prop_assert_eq!(Address::decode(&mut buf), Ok(Some(addr)));
            prop_assert_eq!(&buf[..], b"tail");
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut buf = &bytes[..];
            let decoded = Address::decode(&mut buf);
            prop_assert_eq!(buf.len() < bytes.len(), matches!(decoded, Ok(Some(_))));
        }
    }
}
