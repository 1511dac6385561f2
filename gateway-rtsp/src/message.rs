//! RTSP message framing on the control connection (RFC 2326 section 4): whole messages cut from a
//! byte buffer with `rtsp-types`, a size limit against hostile peers, requests written the
//! RTSP 1.0 way, and the few header readings both sides need (`CSeq`, `Session`, `Content-Base`).
//!
//! Pure: the async sides ([`super::client`], [`super::server`]) own the sockets and the timeouts.

use bytes::{Buf as _, BytesMut};
use rtsp_types::{
    Message, Method, Request, Response, StatusCode, Url, Version,
    headers::{self, HeaderName},
};

use super::ParseError;

/// Largest message (headers and body) accepted: descriptions and replies are a few KiB.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// What the client puts in `User-Agent` and the server in `Server`.
pub const PRODUCT: &str = concat!("gateway-rtsp/", env!("CARGO_PKG_VERSION"));

/// Takes one whole message off the front of `buffer`: `Ok(None)` when more bytes are needed.
///
/// Interleaved binary data (`$`) is skipped, as this crate never asks for TCP transport.
pub fn decode(buffer: &mut BytesMut) -> Result<Option<Message<Vec<u8>>>, ParseError> {
    loop {
        match Message::<Vec<u8>>::parse(&buffer[..]) {
            Ok((Message::Data(_), consumed)) => buffer.advance(consumed),
            Ok((message, consumed)) => {
                buffer.advance(consumed);
                return Ok(Some(message));
            }
            Err(rtsp_types::ParseError::Incomplete(needed)) => {
                let needed = needed.map_or(1, std::num::NonZeroUsize::get);
                if buffer.len().saturating_add(needed) > MAX_MESSAGE {
                    return Err(ParseError::TooLarge(MAX_MESSAGE));
                }
                return Ok(None);
            }
            Err(rtsp_types::ParseError::Error) => return Err(ParseError::Message(preview(buffer))),
        }
    }
}

/// The first line of `bytes`, escaped and cut short, for error messages.
fn preview(bytes: &[u8]) -> String {
    let line = bytes.split(|&b| b == b'\n').next().unwrap_or_default();
    let mut text: String = line
        .iter()
        .take(80)
        .flat_map(|&b| std::ascii::escape_default(b))
        .map(char::from)
        .collect();
    if line.len() > 80 {
        text.push_str("...");
    }
    text
}

/// An RTSP 1.0 request with `CSeq`, `User-Agent`, the given headers and no body, as bytes.
pub fn request(method: Method, url: &Url, cseq: u32, extra: &[(HeaderName, String)]) -> Vec<u8> {
    let mut builder = Request::builder(method, Version::V1_0)
        .request_uri(url.clone())
        .header(headers::CSEQ, cseq.to_string())
        .header(headers::USER_AGENT, PRODUCT);
    for (name, value) in extra {
        builder = builder.header(name.clone(), value.clone());
    }
    let mut out = Vec::with_capacity(256);
    // Writing to a Vec cannot fail.
    let _ = builder.empty().write(&mut out);
    out
}

/// A response with `CSeq` (echoed), `Server`, the given headers and body, as bytes.
pub fn response(
    status: StatusCode,
    cseq: Option<&str>,
    extra: &[(HeaderName, String)],
    body: &[u8],
) -> Vec<u8> {
    let mut builder = Response::builder(Version::V1_0, status).header(headers::SERVER, PRODUCT);
    if status == StatusCode::Ok {
        // RFC 2326's spelling (the crate's default phrase is "Ok").
        builder = builder.reason_phrase("OK");
    }
    if let Some(cseq) = cseq {
        builder = builder.header(headers::CSEQ, cseq);
    }
    for (name, value) in extra {
        builder = builder.header(name.clone(), value.clone());
    }
    let mut out = Vec::with_capacity(256 + body.len());
    let _ = builder.build(body.to_vec()).write(&mut out);
    out
}

/// The `CSeq` of a message, if it has a numeric one.
pub fn cseq(message: &impl AsRef<headers::Headers>) -> Option<u32> {
    message
        .as_ref()
        .get(&headers::CSEQ)
        .and_then(|value| value.as_str().trim().parse().ok())
}

/// The session id of a `Session` header (`id;timeout=N`), and the timeout if given.
pub fn session(response: &Response<Vec<u8>>) -> Result<Option<(String, Option<u64>)>, ParseError> {
    let Some(value) = response.header(&headers::SESSION) else {
        return Ok(None);
    };
    let text = value.as_str();
    let mut parts = text.split(';');
    let id = parts.next().unwrap_or_default().trim();
    let valid = !id.is_empty()
        && id.len() <= 256
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"$-_.+".contains(&b));
    if !valid {
        return Err(ParseError::header("Session", text, "not a session id"));
    }
    let timeout = parts.find_map(|part| {
        let (name, value) = part.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("timeout")
            .then(|| value.trim().parse().ok())
            .flatten()
    });
    Ok(Some((id.to_owned(), timeout)))
}

/// The base URL for a DESCRIBE answer's relative controls: `Content-Base`, else
/// `Content-Location`, else the request URL (RFC 2326 C.1.1).
pub fn content_base(response: &Response<Vec<u8>>, request_url: &Url) -> Result<Url, ParseError> {
    for name in [&headers::CONTENT_BASE, &headers::CONTENT_LOCATION] {
        if let Some(value) = response.header(name) {
            let text = value.as_str().trim();
            return Url::parse(text).map_err(|error| ParseError::Url {
                url: text.chars().take(200).collect(),
                reason: format!("{}: {error}", name.as_str()),
            });
        }
    }
    Ok(request_url.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(bytes: &[u8]) -> Result<Option<Message<Vec<u8>>>, ParseError> {
        decode(&mut BytesMut::from(bytes))
    }

    fn reply(bytes: &[u8]) -> Response<Vec<u8>> {
        match one(bytes).unwrap() {
            Some(Message::Response(response)) => response,
            other => panic!("not a response: {other:?}"),
        }
    }

    #[test]
    fn a_response_in_pieces() {
        let whole = b"RTSP/1.0 200 OK\r\nCSeq: 2\r\nContent-Length: 4\r\n\r\nv=0\nRTSP/1.0";
        let mut buffer = BytesMut::new();
        for (i, &byte) in whole.iter().enumerate() {
            buffer.extend_from_slice(&[byte]);
            let decoded = decode(&mut buffer).unwrap();
            if i + 1 < whole.len() - 8 {
                assert!(decoded.is_none(), "early at {i}");
            } else if i + 1 == whole.len() - 8 {
                let Some(Message::Response(response)) = decoded else {
                    panic!("a response")
                };
                assert_eq!(response.status(), StatusCode::Ok);
                assert_eq!(cseq(&response), Some(2));
                assert_eq!(response.body(), b"v=0\n");
            }
        }
        // The start of the next message stays.
        assert_eq!(&buffer[..], b"RTSP/1.0");
    }

    #[test]
    fn interleaved_data_is_skipped() {
        let mut bytes = vec![b'$', 0, 0, 2, 9, 9];
        bytes.extend_from_slice(b"RTSP/1.0 454 Session Not Found\r\nCSeq: 3\r\n\r\n");
        let response = reply(&bytes);
        assert_eq!(u16::from(response.status()), 454);
        assert_eq!(response.reason_phrase(), "Session Not Found");
    }

    #[test]
    fn requests_are_rtsp_1_0_with_cseq() {
        let url = Url::parse("rtsp://203.0.113.2:8554/rtsp.wav").unwrap();
        let bytes = request(
            Method::Setup,
            &url,
            7,
            &[(headers::TRANSPORT, "RTP/AVP;unicast;client_port=4-5".into())],
        );
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.starts_with("SETUP rtsp://203.0.113.2:8554/rtsp.wav RTSP/1.0\r\n"));
        assert!(text.contains("CSeq: 7\r\n"));
        assert!(text.contains("Transport: RTP/AVP;unicast;client_port=4-5\r\n"));
        let Some(Message::Request(parsed)) = one(&bytes).unwrap() else {
            panic!("a request")
        };
        assert_eq!(parsed.method(), &Method::Setup);
    }

    #[test]
    fn responses_carry_cseq_and_body() {
        let bytes = response(StatusCode::Ok, Some("5"), &[], b"body");
        let parsed = reply(&bytes);
        assert_eq!(cseq(&parsed), Some(5));
        assert_eq!(parsed.body(), b"body");
    }

    #[test]
    fn session_and_content_base() {
        let parsed = reply(
            b"RTSP/1.0 200 OK\r\nCSeq: 1\r\nSession: 12AB.x;timeout=60\r\n\
              Content-Base: rtsp://h:1/a.wav/\r\n\r\n",
        );
        assert_eq!(
            session(&parsed).unwrap(),
            Some(("12AB.x".to_owned(), Some(60)))
        );
        let url = Url::parse("rtsp://h:1/a.wav").unwrap();
        assert_eq!(
            content_base(&parsed, &url).unwrap().as_str(),
            "rtsp://h:1/a.wav/"
        );
        let bare = reply(b"RTSP/1.0 200 OK\r\nCSeq: 1\r\n\r\n");
        assert_eq!(session(&bare).unwrap(), None);
        assert_eq!(content_base(&bare, &url).unwrap(), url);
    }

    #[test]
    fn hostile_messages_are_errors_not_panics() {
        // Not RTSP at all.
        assert!(matches!(
            one(b"HTTP/1.1 200 OK\r\n\r\n"),
            Err(ParseError::Message(_)) | Ok(_)
        ));
        assert!(matches!(
            one(b"\x00\x01garbage\r\n\r\n"),
            Err(ParseError::Message(_))
        ));
        // A body larger than the limit is refused before it is buffered.
        let huge = format!(
            "RTSP/1.0 200 OK\r\nCSeq: 1\r\nContent-Length: {}\r\n\r\n",
            MAX_MESSAGE * 4
        );
        assert!(matches!(one(huge.as_bytes()), Err(ParseError::TooLarge(_))));
        // Endless headers.
        let endless = format!("RTSP/1.0 200 OK\r\n{}", "X-Pad: y\r\n".repeat(8000));
        assert!(matches!(
            one(endless.as_bytes()),
            Err(ParseError::TooLarge(_))
        ));
        // A bad Session id and a bad Content-Base.
        let parsed = reply(
            b"RTSP/1.0 200 OK\r\nCSeq: 1\r\nSession: ;timeout=1\r\nContent-Base: ::bad\r\n\r\n",
        );
        assert!(session(&parsed).is_err());
        let url = Url::parse("rtsp://h/").unwrap();
        assert!(content_base(&parsed, &url).is_err());
        // A non-numeric CSeq reads as none.
        let parsed = reply(b"RTSP/1.0 200 OK\r\nCSeq: one\r\n\r\n");
        assert_eq!(cseq(&parsed), None);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            let mut buffer = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = decode(&mut buffer) {}
        }

        #[test]
        fn response_like_bytes_never_panic(
            status in "RTSP/[0-9.]{1,4} [0-9]{1,4}( [ -~]{0,10})?",
            lines in proptest::collection::vec("(CSeq|Content-Length|Session|Transport|Content-Base|X)[ :]{0,2}[ -~]{0,20}", 0..6),
            body in "[ -~\r\n]{0,40}",
        ) {
            let text = format!("{status}\r\n{}\r\n\r\n{body}", lines.join("\r\n"));
            let mut buffer = BytesMut::from(text.as_bytes());
            while let Ok(Some(message)) = decode(&mut buffer) {
                if let Message::Response(response) = message {
                    let _ = session(&response);
                    let _ = content_base(&response, &Url::parse("rtsp://h/").unwrap());
                    if let Some(value) = response.header(&headers::TRANSPORT) {
                        let _ = super::super::transport::parse_reply(value.as_str());
                    }
                }
            }
        }
    }
}
