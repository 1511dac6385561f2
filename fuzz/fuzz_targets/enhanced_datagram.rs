//! The enhanced mode's 8-octet datagram header, without and with a Listen binding's remote.
#![no_main]

use gateway_fuzz::datagram_decoder;
use gateway_proto::enhanced::DatagramHeader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((which, datagram)) = data.split_first() else {
        return;
    };
    if which % 2 == 0 {
        datagram_decoder(
            datagram,
            |b| DatagramHeader::decode(b),
            |h, b| h.encode(b).unwrap(),
        );
    } else {
        datagram_decoder(
            datagram,
            |b| DatagramHeader::decode_with_remote(b),
            |h, b| h.encode(b).unwrap(),
        );
    }
    // The AID peek agrees with the full decode.
    if let Ok(header) = DatagramHeader::decode(&mut &datagram[..]) {
        assert_eq!(DatagramHeader::peek_aid(datagram), Some(header.aid));
    }
});
