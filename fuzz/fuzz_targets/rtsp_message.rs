//! RTSP messages off a control connection's stream (what `rtsp-get` and the shim's scanner
//! read from a server): a message is taken whole; interleaved binary data (`$`) and the empty
//! lines between messages are skipped, and nothing else is consumed while the decoder waits for
//! more.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buffer = BytesMut::from(data);
    for _ in 0..=data.len() {
        let before = buffer.len();
        match gateway_rtsp::message::decode(&mut buffer) {
            Ok(Some(_)) => assert!(buffer.len() < before, "a message of no octets"),
            Ok(None) => {
                let consumed = before - buffer.len();
                if consumed > 0 {
                    let skipped = &data[data.len() - before..][..consumed];
                    assert!(
                        matches!(skipped[0], b'$' | b'\r' | b'\n'),
                        "an incomplete message consumed octets: {skipped:?}"
                    );
                }
                return;
            }
            Err(_) => return,
        }
        assert!(buffer.len() <= data.len());
    }
});
