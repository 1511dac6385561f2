//! What every stream-decoder target checks: a decoder never claims more octets than it was
//! given, an incomplete or rejected input leaves the buffer untouched (nothing consumed, no
//! state behind), and what it decoded encodes to octets that decode to the same message.

use bytes::{Buf, BytesMut};
use gateway_proto::ProtocolError;

/// Runs `decode` over `data` like the server's read loop does (each message off the front of
/// the buffer until it needs more or refuses), checking the properties on every message.
pub fn stream_decoder<T: PartialEq + std::fmt::Debug>(
    data: &[u8],
    decode: impl Fn(&mut BytesMut) -> Result<Option<T>, ProtocolError>,
    encode: impl Fn(&T, &mut BytesMut),
) {
    let mut buffer = BytesMut::from(data);
    // Bounded: each round either consumes at least one octet or stops.
    for _ in 0..=data.len() {
        let before = buffer.clone();
        match decode(&mut buffer) {
            Ok(Some(message)) => {
                let used = before.len() - buffer.len();
                assert!(used > 0, "a message of no octets: {message:?}");
                assert!(used <= before.len());
                round_trip(&message, &decode, &encode);
            }
            Ok(None) | Err(_) => {
                assert_eq!(
                    buffer, before,
                    "an incomplete or refused input consumed octets"
                );
                return;
            }
        }
    }
}

/// `decode(encode(message)) == message`, consuming exactly what `encode` wrote.
pub fn round_trip<T: PartialEq + std::fmt::Debug>(
    message: &T,
    decode: impl Fn(&mut BytesMut) -> Result<Option<T>, ProtocolError>,
    encode: impl Fn(&T, &mut BytesMut),
) {
    let mut encoded = BytesMut::new();
    encode(message, &mut encoded);
    let len = encoded.len();
    let again = decode(&mut encoded)
        .unwrap_or_else(|e| panic!("{message:?} encodes to {len} octets that do not decode: {e}"))
        .unwrap_or_else(|| panic!("{message:?} encodes to an incomplete message"));
    assert_eq!(&again, message, "decode(encode(x)) != x");
    assert_eq!(
        encoded.remaining(),
        0,
        "the decoder left octets of its own encoding"
    );
}

/// A datagram-header decoder (the whole datagram is there): on success it stops within the
/// datagram and the rest is the payload; a refused datagram is left untouched.
pub fn datagram_decoder<T: PartialEq + std::fmt::Debug>(
    data: &[u8],
    decode: impl Fn(&mut &[u8]) -> Result<T, ProtocolError>,
    encode: impl Fn(&T, &mut BytesMut),
) {
    let mut rest = data;
    match decode(&mut rest) {
        Ok(header) => {
            assert!(rest.len() <= data.len());
            let mut encoded = BytesMut::new();
            encode(&header, &mut encoded);
            encoded.extend_from_slice(rest);
            let mut again: &[u8] = &encoded;
            let decoded = decode(&mut again).expect("a header it wrote decodes");
            assert_eq!(decoded, header, "decode(encode(x)) != x");
            assert_eq!(again, rest, "the payload after the header is the same");
        }
        Err(_) => assert_eq!(rest, data, "a refused datagram was consumed"),
    }
}
