//! The RFC 1928 UDP request header at the start of a datagram.
#![no_main]

use gateway_fuzz::datagram_decoder;
use gateway_proto::UdpHeader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    datagram_decoder(data, |b| UdpHeader::decode(b), |h, b| h.encode(b).unwrap());
});
