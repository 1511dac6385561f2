//! The little HTTP the endpoint speaks, as a pure function from the request bytes read so far
//! to what to answer ([`route`]), and the response bytes ([`Route::response`]). Only
//! `GET /metrics` is served; junk gets `400`, never a panic.

use super::render::Format;

/// A request (line and headers) longer than this gets `431` and the connection is closed.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Headers beyond this many make the request malformed.
const MAX_HEADERS: usize = 32;

/// What a request comes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Not a whole request yet: read more.
    Incomplete,
    /// `GET /metrics`: `200` in this format.
    Metrics(Format),
    /// Another path: `404`.
    NotFound,
    /// `/metrics` with another method: `405`.
    MethodNotAllowed,
    /// Not HTTP/1.x: `400`.
    BadRequest,
    /// Over [`MAX_REQUEST_BYTES`] without its end: `431`.
    TooLarge,
}

/// What the request in `buf` (every byte read so far) asks for.
pub fn route(buf: &[u8]) -> Route {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buf) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) if buf.len() >= MAX_REQUEST_BYTES => return Route::TooLarge,
        Ok(httparse::Status::Partial) => return Route::Incomplete,
        Err(_) => return Route::BadRequest,
    }
    let path = request.path.unwrap_or_default();
    let path = path.split_once('?').map_or(path, |(path, _query)| path);
    if path != "/metrics" {
        return Route::NotFound;
    }
    if request.method != Some("GET") {
        return Route::MethodNotAllowed;
    }
    let openmetrics = request
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("accept"))
        .filter_map(|h| std::str::from_utf8(h.value).ok())
        .any(accepts_openmetrics);
    Route::Metrics(if openmetrics {
        Format::OpenMetrics
    } else {
        Format::Prometheus
    })
}

/// Whether an `Accept` value names `application/openmetrics-text` with a weight above zero.
fn accepts_openmetrics(accept: &str) -> bool {
    accept.split(',').any(|range| {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or_default();
        let refused = parts.any(|p| {
            p.strip_prefix("q=")
                .and_then(|q| q.parse::<f32>().ok())
                .is_some_and(|q| q <= 0.0)
        });
        media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
    })
}

impl Route {
    /// The status line's code and reason of an answer other than metrics.
    fn status(self) -> (u16, &'static str) {
        match self {
            Route::Metrics(_) => (200, "OK"),
            Route::NotFound => (404, "Not Found"),
            Route::MethodNotAllowed => (405, "Method Not Allowed"),
            Route::TooLarge => (431, "Request Header Fields Too Large"),
            Route::BadRequest | Route::Incomplete => (400, "Bad Request"),
        }
    }

    /// The whole response: `body` (of `content_type`) for metrics, a one-line text otherwise.
    /// The connection closes after it.
    pub fn response(self, content_type: &str, body: &[u8]) -> Vec<u8> {
        let (code, reason) = self.status();
        let (content_type, body) = match self {
            Route::Metrics(_) => (content_type, body),
            _ => ("text/plain; charset=utf-8", reason.as_bytes()),
        };
        let allow = if self == Route::MethodNotAllowed {
            "Allow: GET\r\n"
        } else {
            ""
        };
        let mut out = format!(
            "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
             {allow}Connection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        out.extend_from_slice(body);
        out
    }
}

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;

    use super::*;

    #[test]
    fn only_get_metrics_is_served() {
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Metrics(Format::Prometheus)
        );
        assert_eq!(
            route(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Route::Metrics(Format::Prometheus)
        );
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route(b"GET /metricsx HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(
            route(b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n"),
            Route::MethodNotAllowed
        );
        assert_eq!(
            route(b"HEAD /metrics HTTP/1.1\r\n\r\n"),
            Route::MethodNotAllowed
        );
    }

    #[test]
    fn the_format_follows_accept() {
        // What Prometheus 2.x sends.
        let prometheus = b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text;version=1.0.0,\
            application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1\r\n\r\n";
        assert_eq!(route(prometheus), Route::Metrics(Format::OpenMetrics));
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\naccept: text/plain\r\n\r\n"),
            Route::Metrics(Format::Prometheus)
        );
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text;q=0\r\n\r\n"),
            Route::Metrics(Format::Prometheus)
        );
    }

    #[test]
    fn partial_large_and_junk_requests() {
        assert_eq!(route(b""), Route::Incomplete);
        assert_eq!(route(b"GET /metrics HTTP/1.1\r\nHost:"), Route::Incomplete);
        let mut long = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        long.resize(MAX_REQUEST_BYTES, b'a');
        assert_eq!(route(&long), Route::TooLarge);
        assert_eq!(route(b"\x16\x03\x01\x02\x00\x01\x00"), Route::BadRequest);
        assert_eq!(route(b"GET /metrics SPDY/9\r\n\r\n"), Route::BadRequest);
        let mut many = String::new();
        for i in 0..=MAX_HEADERS {
            let _ = write!(many, "H{i}: v\r\n");
        }
        assert_eq!(
            route(format!("GET /metrics HTTP/1.1\r\n{many}\r\n").as_bytes()),
            Route::BadRequest
        );
        // Every prefix of every byte value: no panic.
        for byte in 0..=255u8 {
            let mut junk = b"GET /metrics HTTP/1.1\r\n".to_vec();
            junk.push(byte);
            for end in 0..=junk.len() {
                let _ = route(&junk[..end]);
            }
        }
    }

    #[test]
    fn responses_carry_length_and_close() {
        let ok = String::from_utf8(
            Route::Metrics(Format::Prometheus).response("text/plain; version=0.0.4", b"a 1\n"),
        )
        .unwrap();
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains("Content-Length: 4\r\n") && ok.ends_with("\r\n\r\na 1\n"),
            "{ok}"
        );
        let not_allowed = String::from_utf8(Route::MethodNotAllowed.response("", b"")).unwrap();
        assert!(not_allowed.starts_with("HTTP/1.1 405 "), "{not_allowed}");
        assert!(not_allowed.contains("Allow: GET\r\n"), "{not_allowed}");
        let missing = String::from_utf8(Route::NotFound.response("x", b"secret")).unwrap();
        assert!(missing.starts_with("HTTP/1.1 404 ") && !missing.contains("secret"));
    }
}
