//! Internet checksum arithmetic (RFC 1071) as classes modulo 65535: what a checksum means,
//! whatever order its words were added in and however a helper represents zero.

/// The ones-complement sum of `bytes` (big-endian 16-bit words, an odd last octet padded with
/// zero) as its class modulo 65535.
pub fn sum(bytes: &[u8]) -> u32 {
    let total: u64 = bytes
        .chunks(2)
        .map(|pair| {
            u64::from(u16::from_be_bytes([
                pair[0],
                pair.get(1).copied().unwrap_or(0),
            ]))
        })
        .sum();
    u32::try_from(total % 65535).unwrap_or_default()
}

/// The class of a checksum field after covered words summing to `old` were replaced by words
/// summing to `new`, by incremental update (RFC 1624): the field keeps its error, so a valid
/// checksum stays valid and a wrong one stays wrong by as much.
pub fn updated(check: u16, old: u32, new: u32) -> u32 {
    (u32::from(check) % 65535 + old + 65535 - new) % 65535
}

/// An IPv4 header checksum of class `class` as the kernel writes it: zero as 0x0000.
pub fn ip_field(class: u32) -> u16 {
    u16::try_from(class % 65535).unwrap_or_default()
}

/// A UDP checksum of class `class`: zero as 0xffff, since 0x0000 means "no checksum" (RFC 768).
pub fn udp_field(class: u32) -> u16 {
    match class % 65535 {
        0 => 0xffff,
        other => u16::try_from(other).unwrap_or_default(),
    }
}

/// The checksum field that makes the covered words (the field itself read as zero) sum to
/// "all ones": a valid checksum.
pub fn valid(covered: u32) -> u16 {
    udp_field(65535 - covered % 65535)
}

/// The folded pseudo-header sum alone, as a `CHECKSUM_PARTIAL` skb carries in its UDP checksum
/// field until the checksum is completed (never 0: the protocol number is in it).
pub fn partial(pseudo_header: &[u8]) -> u16 {
    match sum(pseudo_header) {
        0 => 0xffff,
        other => u16::try_from(other).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3: 0001 f203 f4f5 f6f7 sums to ddf2.
        assert_eq!(
            sum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            0xddf2
        );
        assert_eq!(valid(0xddf2), !0xddf2);
    }

    #[test]
    fn an_update_keeps_a_valid_checksum_valid() {
        let old = [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc];
        let check = valid(sum(&old));
        let new = [0x12, 0x34, 0xff, 0xff, 0x00, 0x01];
        let class = updated(check, sum(&old[2..]), sum(&new[2..]));
        assert_eq!(udp_field(class), valid(sum(&new)));
        // A checksum one off stays one off.
        let class = updated(check - 1, sum(&old[2..]), sum(&new[2..]));
        assert_eq!(udp_field(class), valid(sum(&new)) - 1);
    }

    #[test]
    fn zero_is_written_as_each_protocol_wants() {
        assert_eq!(ip_field(0), 0);
        assert_eq!(ip_field(65535), 0);
        assert_eq!(udp_field(0), 0xffff);
        assert_eq!(udp_field(7), 7);
    }
}
