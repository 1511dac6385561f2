//! A DESCRIBE answer's SDP body.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let base = rtsp_types::Url::parse("rtsp://203.0.113.2:8554/stream").unwrap();
    if let Ok(description) = gateway_rtsp::sdp::parse_description(data, &base) {
        let again = gateway_rtsp::sdp::parse_description(data, &base).unwrap();
        assert_eq!(format!("{description:?}"), format!("{again:?}"));
    }
});
