//! The enhanced mode's control connection: control packets (requests, replies) and
//! TCP-encapsulated datagrams, one after another as a session reads them.
#![no_main]

use gateway_fuzz::stream_decoder;
use gateway_proto::enhanced::Packet;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    stream_decoder(data, |b| Packet::decode(b), |m, b| m.encode(b).unwrap());
});
