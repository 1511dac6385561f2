//! What a SOCKS5 client decodes from a server: the method selection, the RFC 1929 reply, the
//! request reply and the enhanced mode's entry reply.
#![no_main]

use gateway_fuzz::stream_decoder;
use gateway_proto::{AuthReply, MethodSelection, Reply, enhanced::EntryReply};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((which, stream)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => stream_decoder(stream, |b| MethodSelection::decode(b), |m, b| m.encode(b)),
        1 => stream_decoder(stream, |b| AuthReply::decode(b), |m, b| m.encode(b)),
        2 => stream_decoder(stream, |b| Reply::decode(b), |m, b| m.encode(b).unwrap()),
        _ => stream_decoder(
            stream,
            |b| EntryReply::decode(b),
            |m, b| m.encode(b).unwrap(),
        ),
    }
});
