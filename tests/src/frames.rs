//! Hand-built frame surgery for the `test_run` tests: headers the packet builder cannot make.

/// Length of an Ethernet header without VLAN tags.
pub const ETH: usize = 14;

/// Inserts an 8-octet IPv6 extension header of type `ext_type` after the fixed header of an
/// Ethernet + IPv6 frame; the extension's next header takes the old one, the payload length
/// grows by 8.
pub fn with_ipv6_ext(frame: &[u8], ext_type: u8, ext: [u8; 8]) -> Vec<u8> {
    let mut out = frame[..ETH + 40].to_vec();
    let mut ext = ext;
    ext[0] = out[ETH + 6];
    out[ETH + 6] = ext_type;
    let payload_len = u16::from_be_bytes([out[ETH + 4], out[ETH + 5]]) + 8;
    out[ETH + 4..ETH + 6].copy_from_slice(&payload_len.to_be_bytes());
    out.extend_from_slice(&ext);
    out.extend_from_slice(&frame[ETH + 40..]);
    out
}

/// An Ethernet + IPv4 frame with one word of IPv4 options (NOP NOP NOP EOL) inserted after the
/// fixed header: IHL 6, total length 4 more.
pub fn with_ipv4_options(frame: &[u8]) -> Vec<u8> {
    let mut out = frame[..ETH + 20].to_vec();
    out.extend_from_slice(&[1, 1, 1, 0]);
    out.extend_from_slice(&frame[ETH + 20..]);
    out[ETH] = 0x46;
    let total = u16::from_be_bytes([out[ETH + 2], out[ETH + 3]]) + 4;
    out[ETH + 2..ETH + 4].copy_from_slice(&total.to_be_bytes());
    out
}
