//! What a SOCKS5 server decodes from a client: the greeting, the RFC 1929 username/password
//! request and the request (first octet picks which, the rest is the stream).
#![no_main]

use gateway_fuzz::stream_decoder;
use gateway_proto::{AuthRequest, Greeting, Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((which, stream)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => stream_decoder(stream, |b| Greeting::decode(b), |m, b| m.encode(b).unwrap()),
        1 => stream_decoder(
            stream,
            |b| AuthRequest::decode(b),
            |m, b| m.encode(b).unwrap(),
        ),
        _ => stream_decoder(stream, |b| Request::decode(b), |m, b| m.encode(b).unwrap()),
    }
});
