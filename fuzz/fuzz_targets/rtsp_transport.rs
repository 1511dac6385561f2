//! The RTSP Transport header a server answers SETUP with.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(specs) = gateway_rtsp::transport::parse(text) {
        for spec in &specs {
            // A port range never runs backwards past the end of the port space.
            for (first, last) in [spec.client_port, spec.server_port, spec.port]
                .into_iter()
                .flatten()
            {
                assert!(last.is_none_or(|last| u32::from(last) <= u32::from(u16::MAX)));
                let _ = first;
            }
        }
        // Parsing is a function of the text.
        assert_eq!(gateway_rtsp::transport::parse(text).ok(), Some(specs));
    }
});
