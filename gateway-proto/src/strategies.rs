//! Test support: proptest strategies for valid messages and shared assertions.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use proptest::prelude::*;

use super::{Address, ProtocolError};

/// Any valid address: IPv4, IPv6 or a domain name of 1..255 octets without control characters.
pub(crate) fn address() -> impl Strategy<Value = Address> {
    let v4 = (any::<[u8; 4]>(), any::<u16>())
        .prop_map(|(ip, port)| Address::Ip(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port)));
    let v6 = (any::<[u8; 16]>(), any::<u16>())
        .prop_map(|(ip, port)| Address::Ip(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port)));
    let ascii = "[a-z0-9.-]{1,255}";
    let text = "[^\\p{Cc}]{1,63}".prop_filter("at most 255 octets", |s: &String| s.len() <= 255);
    let domain = (prop_oneof![ascii, text], any::<u16>())
        .prop_map(|(name, port)| Address::Domain(name, port));
    prop_oneof![v4, v6, domain, Just(Address::Domain("0".into(), 0))]
}

/// Decodes every strict prefix of `wire` with `decode` and checks each is "need more bytes"
/// (`Ok(false)`) and consumed nothing, then that the whole of `wire` decodes (`Ok(true)`) and is
/// consumed exactly.
pub(crate) fn assert_prefixes_need_more(
    wire: &[u8],
    mut decode: impl FnMut(&mut &[u8]) -> Result<bool, ProtocolError>,
) {
    for len in 0..wire.len() {
        let mut buf = &wire[..len];
        assert_eq!(decode(&mut buf), Ok(false), "prefix of {len} octets");
        assert_eq!(buf.len(), len, "prefix of {len} octets consumed input");
    }
    let mut buf = wire;
    assert_eq!(decode(&mut buf), Ok(true), "whole message");
    assert!(buf.is_empty(), "whole message not consumed");
}

/// Decodes `bytes` with `decode` and checks the consumption contract: a message consumes at least
/// one octet, "need more bytes" and errors consume nothing. Must not panic, whatever the input.
pub(crate) fn check_consumption(
    bytes: &[u8],
    decode: impl FnOnce(&mut &[u8]) -> Result<bool, ProtocolError>,
) -> Result<(), TestCaseError> {
    let mut buf = bytes;
    let decoded = decode(&mut buf);
    prop_assert_eq!(buf.len() < bytes.len(), decoded == Ok(true));
    Ok(())
}

/// Octets from hex digits, spaces ignored: `hex("01 001B 05")`.
pub(crate) fn hex(text: &str) -> Vec<u8> {
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    assert!(
        digits.len().is_multiple_of(2),
        "odd number of hex digits in {text:?}"
    );
    digits
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
        .collect()
}
