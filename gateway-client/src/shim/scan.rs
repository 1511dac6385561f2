//! A streaming scanner of the bytes an RTSP player reads from its RTSP connection, for the
//! `LD_PRELOAD` shim: it finds the SETUP replies and says, for each media flow, where its RTP
//! comes from.
//!
//! # Why it exists
//!
//! The shim turns an unmodified player's UDP media socket into an enhanced-mode binding: the
//! player's `bind` is step 1, and the external relay port it learns from `getsockname` goes into
//! its SETUP request as `client_port`. Step 2 must name the remote, the server's RTP source, and
//! the gateway drops media that arrives before it. What an unmodified player does with its socket
//! does not reliably name that source in time: it may never connect it and `recv` from anyone
//! after PLAY, while the server starts sending right after its PLAY reply, so a step 2 made on
//! the player's first `recv` would lose the start of the stream. The source is
//! in the SETUP reply, though (`server_port`, and `source=` when the media comes from another host
//! than the RTSP server), and the shim sees every byte the player reads from its RTSP connection.
//! So the shim feeds those bytes to a [`RtspScanner`] and confirms step 2 from each
//! [`SetupReply`], before the player can send PLAY, and no media is lost at the start.
//!
//! # What it reads
//!
//! The byte stream is what the player reads from the server, in whatever chunks its reads
//! return (a chunk may end anywhere, or hold several messages):
//!
//! - RTSP messages: responses (`RTSP/1.0 200 OK`) and server requests (`ANNOUNCE ... RTSP/1.0`,
//!   `GET_PARAMETER ...`), each a header block (CRLF or bare LF line ends) and a body of
//!   `Content-Length` octets (none without the header);
//! - interleaved binary frames (`$`, channel, 16-bit big-endian length, data) between messages,
//!   as with `-rtsp_transport tcp`.
//!
//! Only header blocks are buffered, at most [`MAX_HEADER_BLOCK`] octets; bodies and frames are
//! skipped by count, never looked into. The work is linear in the octets fed, and no input
//! panics.
//!
//! A SETUP reply is a response with an `RTSP/1.0` or `RTSP/2.0` 2xx status and a `Transport`
//! header (any letter case; several headers, or several comma-separated specs, are read in
//! order) whose first spec with both `client_port` and `server_port` names the flow; a spec with
//! the lower transport TCP (`RTP/AVP/TCP`) is skipped, as its ports are no UDP ports. Only SETUP
//! replies carry a Transport header, so the scanner need not see the requests.
//!
//! Not handled, by design:
//!
//! - RTSP 2.0's `dest_addr`/`src_addr` (RFC 7826 section 18.54) in place of the ports: such a
//!   reply produces no [`SetupReply`]. The players the shim serves (ffmpeg 5.1, `GStreamer` 1.22
//!   `rtspsrc`) speak RTSP 1.0;
//! - a `source=` host name: the scanner does no name resolution, and
//!   [`SetupReply::source`] is then `None`, as without `source=`.
//!
//! # Giving up
//!
//! The shim scans every connection it proxies, most of which are not RTSP (curl fetching
//! `HTTP/1.1`, TLS, ...). The scanner decides from a message's first line: it must be an RTSP
//! status line (`RTSP/`) or an RTSP request line (`METHOD SP URI SP RTSP/`). It checks that line
//! octet by octet and gives up at the first octet that cannot continue one (the `/` of `HTTP/`,
//! the first octet of a TLS record, ...); it also gives up when a header block does not end
//! within [`MAX_HEADER_BLOCK`] octets or a `Content-Length` is not a number. Once it has given up
//! ([`RtspScanner::is_done`]) it frees its buffer, and [`RtspScanner::feed`] returns at once.

use std::net::IpAddr;

/// The longest header block (start line, headers and the blank line that ends them) the scanner
/// buffers; a longer one makes it give up.
pub const MAX_HEADER_BLOCK: usize = 16 * 1024;

/// What one SETUP reply says about a media flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetupReply {
    /// The first `client_port` of the reply: the port the client advertised (for the shim, the
    /// gateway's external relay port).
    pub client_port: u16,
    /// The first `server_port`: where RTP comes from (RTCP from `server_port + 1`).
    pub server_port: u16,
    /// `source=` when present and an IP literal (IPv4 or IPv6, with or without brackets or
    /// quotes). `None` without `source=`, and also for a host name or anything else that is no IP
    /// literal: the scanner does not resolve names, so a host name is ignored and the caller
    /// treats the reply as one without `source=` (the media comes from the RTSP server).
    pub source: Option<IpAddr>,
}

/// A streaming, sans-IO scanner of the bytes a program reads from an RTSP connection; see the
/// [module documentation](self). One per connection, fed from its first octet.
///
#[derive(Debug, Clone, Default)]
pub struct RtspScanner {
    state: State,
    /// The header block read so far (in [`State::Header`]); at most [`MAX_HEADER_BLOCK`] octets.
    header: Vec<u8>,
    /// How far the header block's first line has been checked.
    start_line: StartLine,
    /// Where the header block's last octet left the search for its end.
    line_end: LineEnd,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum State {
    /// Between messages: an RTSP message, a `$` frame, or a stray line end comes next.
    #[default]
    Boundary,
    /// Inside the 3 octets after a `$`: `seen` of them read, `length` so far.
    FrameHeader { seen: u8, length: u16 },
    /// Inside a header block.
    Header,
    /// Skipping so many octets of a body or a frame.
    Skip(u64),
    /// Gave up.
    Done,
}

/// The check of a message's first line, one octet at a time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum StartLine {
    /// Nothing read yet.
    #[default]
    Method,
    /// In the first token (a method, or `RTSP` of a status line): `length` (at least 1, at most
    /// 255) octets so far, and whether they are a prefix of `RTSP`.
    Token { length: u8, rtsp: bool },
    /// In a request line's URI; `empty` until its first octet.
    Uri { empty: bool },
    /// In a request line's version: `matched` octets of `RTSP/`.
    Version { matched: u8 },
    /// A status line or a request line: the rest of the block is read whole.
    Decided,
}

/// The search for the blank line that ends a header block.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum LineEnd {
    /// Inside a line.
    #[default]
    Inside,
    /// Just after a LF.
    LineStart,
    /// A CR right after a LF.
    LineStartCr,
}

const RTSP: &[u8] = b"RTSP/";

/// An RFC 2326 token octet (RFC 2616's `token`), the octets of a method name.
fn is_token(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

impl StartLine {
    /// Takes the next octet of the first line; `false` when it cannot continue an RTSP status
    /// or request line.
    fn step(&mut self, byte: u8) -> bool {
        *self = match *self {
            Self::Method => {
                if !is_token(byte) {
                    return false;
                }
                Self::Token {
                    length: 1,
                    rtsp: byte == RTSP[0],
                }
            }
            Self::Token { length, rtsp } => {
                if rtsp && length == 4 && byte == b'/' {
                    Self::Decided
                } else if is_token(byte) {
                    let at = usize::from(length);
                    Self::Token {
                        length: length.saturating_add(1),
                        rtsp: rtsp && at < 4 && byte == RTSP[at],
                    }
                } else if byte == b' ' {
                    Self::Uri { empty: true }
                } else {
                    return false;
                }
            }
            Self::Uri { empty } => {
                if byte == b' ' && !empty {
                    Self::Version { matched: 0 }
                } else if byte > b' ' && byte != 0x7f {
                    Self::Uri { empty: false }
                } else {
                    return false;
                }
            }
            Self::Version { matched } => {
                let at = usize::from(matched);
                if RTSP.get(at) != Some(&byte) {
                    return false;
                }
                if at + 1 == RTSP.len() {
                    Self::Decided
                } else {
                    Self::Version {
                        matched: matched + 1,
                    }
                }
            }
            Self::Decided => Self::Decided,
        };
        true
    }
}

impl LineEnd {
    /// Takes the next octet; `true` when it ends the header block (a LF that ends an empty line).
    fn step(&mut self, byte: u8) -> bool {
        match (byte, *self) {
            (b'\n', Self::LineStart | Self::LineStartCr) => return true,
            (b'\n', Self::Inside) => *self = Self::LineStart,
            (b'\r', Self::LineStart) => *self = Self::LineStartCr,
            _ => *self = Self::Inside,
        }
        false
    }
}

impl RtspScanner {
    /// A scanner at the start of a connection.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes the program read; returns the SETUP replies completed in them (2xx status, a
    /// Transport header with `client_port` and `server_port`), in order.
    pub fn feed(&mut self, mut data: &[u8]) -> Vec<SetupReply> {
        let mut replies = Vec::new();
        while let Some(&first) = data.first() {
            match self.state {
                State::Done => break,
                State::Boundary => match first {
                    b'\r' | b'\n' => data = &data[1..],
                    b'$' => {
                        self.state = State::FrameHeader { seen: 0, length: 0 };
                        data = &data[1..];
                    }
                    _ => {
                        self.state = State::Header;
                        self.start_line = StartLine::default();
                        self.line_end = LineEnd::default();
                    }
                },
                State::FrameHeader { seen, length } => {
                    data = &data[1..];
                    self.state = match seen {
                        // The channel.
                        0 => State::FrameHeader { seen: 1, length },
                        1 => State::FrameHeader {
                            seen: 2,
                            length: u16::from(first) << 8,
                        },
                        _ => State::Skip(u64::from(length | u16::from(first))),
                    };
                }
                State::Skip(left) => {
                    data = self.skip(left, data);
                }
                State::Header => {
                    data = self.header_bytes(data, &mut replies);
                }
            }
        }
        // A frame or body that ended exactly at the end of the data.
        if self.state == State::Skip(0) {
            self.state = State::Boundary;
        }
        replies
    }

    /// Whether the scanner gave up (not RTSP, a header block over [`MAX_HEADER_BLOCK`], or a
    /// `Content-Length` that is no number): [`feed`](Self::feed) is then a no-op.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    fn give_up(&mut self) {
        self.state = State::Done;
        self.header = Vec::new();
    }

    /// Skips up to `left` octets of `data`; returns the rest.
    fn skip<'a>(&mut self, left: u64, data: &'a [u8]) -> &'a [u8] {
        match usize::try_from(left) {
            Ok(left) if left <= data.len() => {
                self.state = State::Boundary;
                &data[left..]
            }
            _ => {
                // `data.len()` < `left`, which is a u64.
                let taken = u64::try_from(data.len()).unwrap_or(left);
                self.state = State::Skip(left - taken);
                &[]
            }
        }
    }

    /// Takes octets of a header block; returns the rest of `data` after the block, if it ended.
    fn header_bytes<'a>(&mut self, data: &'a [u8], replies: &mut Vec<SetupReply>) -> &'a [u8] {
        let room = MAX_HEADER_BLOCK.saturating_sub(self.header.len());
        let window = &data[..data.len().min(room)];
        let mut end = None;
        for (at, &byte) in window.iter().enumerate() {
            if self.start_line != StartLine::Decided && !self.start_line.step(byte) {
                self.give_up();
                return &[];
            }
            if self.line_end.step(byte) {
                end = Some(at + 1);
                break;
            }
        }
        let Some(end) = end else {
            if window.len() == room {
                // Full, and `data` is not empty: the block does not end within the bound.
                self.give_up();
            } else {
                self.append(window);
            }
            return &[];
        };
        self.append(&window[..end]);
        let parsed = parse_block(&self.header);
        self.header.clear();
        match parsed {
            Some(message) => {
                replies.extend(message.reply);
                self.state = State::Skip(message.body);
            }
            None => self.give_up(),
        }
        &data[end..]
    }

    /// Appends to the header block, growing the buffer in powers of two up to
    /// [`MAX_HEADER_BLOCK`] exactly.
    fn append(&mut self, bytes: &[u8]) {
        let needed = self.header.len() + bytes.len();
        if needed > self.header.capacity() {
            let capacity = needed.next_power_of_two().clamp(256, MAX_HEADER_BLOCK);
            self.header.reserve_exact(capacity - self.header.len());
        }
        self.header.extend_from_slice(bytes);
    }
}

/// What a complete header block says.
struct Message {
    /// The body's length.
    body: u64,
    reply: Option<SetupReply>,
}

/// Which header a line (and its continuation lines) belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Current {
    ContentLength,
    Transport,
    Other,
}

/// Parses a header block that passed the start-line check; `None` when its body's length is
/// unknown (a bad or conflicting `Content-Length`).
fn parse_block(block: &[u8]) -> Option<Message> {
    let mut lines = block
        .split(|&byte| byte == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line));
    let start = lines.next().unwrap_or_default();
    let success = is_success(start);
    let mut body = None;
    let mut transport = Vec::new();
    let mut current = Current::Other;
    for line in lines {
        let Some(&first) = line.first() else {
            // The blank line that ends the block.
            break;
        };
        if first == b' ' || first == b'\t' {
            // A continuation of the previous header's value.
            match current {
                Current::ContentLength => return None,
                Current::Transport => {
                    transport.push(b' ');
                    transport.extend_from_slice(line.trim_ascii());
                }
                Current::Other => {}
            }
            continue;
        }
        current = Current::Other;
        let Some(colon) = line.iter().position(|&byte| byte == b':') else {
            continue;
        };
        let name = line[..colon].trim_ascii();
        let value = line[colon + 1..].trim_ascii();
        if name.eq_ignore_ascii_case(b"content-length") {
            let length = decimal(value)?;
            if body.is_some_and(|body| body != length) {
                return None;
            }
            body = Some(length);
            current = Current::ContentLength;
        } else if success && name.eq_ignore_ascii_case(b"transport") {
            if !transport.is_empty() {
                transport.push(b',');
            }
            transport.extend_from_slice(value);
            current = Current::Transport;
        }
    }
    Some(Message {
        body: body.unwrap_or(0),
        reply: if success {
            setup_reply(&transport)
        } else {
            None
        },
    })
}

/// Whether a start line is an `RTSP/1.0` or `RTSP/2.0` status line with a 2xx code.
fn is_success(line: &[u8]) -> bool {
    let Some(space) = line.iter().position(|&byte| byte == b' ') else {
        return false;
    };
    let version = &line[..space];
    if version != b"RTSP/1.0" && version != b"RTSP/2.0" {
        return false;
    }
    let status = line[space + 1..].trim_ascii_start();
    match status {
        [b'2', tens, units, rest @ ..] => {
            tens.is_ascii_digit()
                && units.is_ascii_digit()
                && rest.first().is_none_or(|&b| b == b' ')
        }
        _ => false,
    }
}

/// A decimal number of 1 to 19 digits (always within a u64).
fn decimal(text: &[u8]) -> Option<u64> {
    if text.is_empty() || text.len() > 19 || !text.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        text.iter()
            .fold(0, |number, &digit| number * 10 + u64::from(digit - b'0')),
    )
}

/// The flow of a SETUP reply's Transport value (its headers joined by commas).
fn setup_reply(transport: &[u8]) -> Option<SetupReply> {
    split_outside_quotes(transport, b',').find_map(spec)
}

/// One transport spec, if it names both ports.
fn spec(text: &[u8]) -> Option<SetupReply> {
    let mut parameters = split_outside_quotes(text, b';');
    let protocol = parameters.next().unwrap_or_default().trim_ascii();
    let lower = protocol.split(|&byte| byte == b'/').nth(2);
    if lower.is_some_and(|lower| lower.trim_ascii().eq_ignore_ascii_case(b"TCP")) {
        return None;
    }
    let mut client_port = None;
    let mut server_port = None;
    let mut source = None;
    for parameter in parameters {
        let Some(equals) = parameter.iter().position(|&byte| byte == b'=') else {
            continue;
        };
        let name = parameter[..equals].trim_ascii();
        let value = unquote(&parameter[equals + 1..]);
        if name.eq_ignore_ascii_case(b"client_port") {
            client_port = client_port.or_else(|| first_port(value));
        } else if name.eq_ignore_ascii_case(b"server_port") {
            server_port = server_port.or_else(|| first_port(value));
        } else if name.eq_ignore_ascii_case(b"source") && source.is_none() {
            source = Some(ip_literal(value));
        }
    }
    Some(SetupReply {
        client_port: client_port?,
        server_port: server_port?,
        source: source.flatten(),
    })
}

/// `text` trimmed, without surrounding double quotes.
fn unquote(text: &[u8]) -> &[u8] {
    let text = text.trim_ascii();
    text.strip_prefix(b"\"")
        .and_then(|inner| inner.strip_suffix(b"\""))
        .map_or(text, <[u8]>::trim_ascii)
}

/// The first port of `a` or `a-b`; `None` if it is no port number from 1 to 65535.
fn first_port(text: &[u8]) -> Option<u16> {
    let first = text.split(|&byte| byte == b'-').next()?.trim_ascii();
    if first.len() > 5 {
        return None;
    }
    u16::try_from(decimal(first)?)
        .ok()
        .filter(|&port| port != 0)
}

/// An IPv4 or IPv6 literal, brackets allowed.
fn ip_literal(text: &[u8]) -> Option<IpAddr> {
    let bare = text
        .strip_prefix(b"[")
        .and_then(|inner| inner.strip_suffix(b"]"))
        .unwrap_or(text);
    std::str::from_utf8(bare).ok()?.parse().ok()
}

/// Splits `text` at `separator` outside double quotes (an unclosed quote runs to the end).
fn split_outside_quotes(text: &[u8], separator: u8) -> SplitOutsideQuotes<'_> {
    SplitOutsideQuotes {
        rest: Some(text),
        separator,
    }
}

struct SplitOutsideQuotes<'a> {
    rest: Option<&'a [u8]>,
    separator: u8,
}

impl<'a> Iterator for SplitOutsideQuotes<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let rest = self.rest?;
        let mut quoted = false;
        for (at, &byte) in rest.iter().enumerate() {
            if byte == b'"' {
                quoted = !quoted;
            } else if byte == self.separator && !quoted {
                self.rest = Some(&rest[at + 1..]);
                return Some(&rest[..at]);
            }
        }
        self.rest = None;
        Some(rest)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    /// A SETUP reply of `GStreamer`'s rtsp-server (the example of the brief).
    const EXAMPLE: &[u8] = b"RTSP/1.0 200 OK\r\n\
        CSeq: 4\r\n\
        Transport: RTP/AVP;unicast;client_port=45962-45963;server_port=57094-57095;\
        ssrc=B69B264D;mode=\"PLAY\"\r\n\
        Session: 1234567;timeout=60\r\n\
        \r\n";

    const EXAMPLE_REPLY: SetupReply = SetupReply {
        client_port: 45962,
        server_port: 57094,
        source: None,
    };

    /// A DESCRIBE reply whose SDP body holds text that looks like a SETUP reply.
    fn describe_reply() -> Vec<u8> {
        let body = "v=0\r\n\
            o=- 0 0 IN IP4 203.0.113.2\r\n\
            s=trap\r\n\
            \r\n\
            RTSP/1.0 200 OK\r\n\
            Transport: RTP/AVP;unicast;client_port=1-2;server_port=3-4\r\n\
            \r\n\
            m=video 0 RTP/AVP 96\r\n\
            a=control:track1\r\n";
        format!(
            "RTSP/1.0 200 OK\r\nCSeq: 2\r\nContent-Base: rtsp://203.0.113.2/s/\r\n\
             Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    /// An interleaved frame on `channel` carrying `payload`.
    fn frame(channel: u8, payload: &[u8]) -> Vec<u8> {
        let length = u16::try_from(payload.len()).expect("a short payload");
        let mut frame = vec![b'$', channel];
        frame.extend_from_slice(&length.to_be_bytes());
        frame.extend_from_slice(payload);
        frame
    }

    /// A frame whose payload looks like a SETUP reply.
    fn trap_frame() -> Vec<u8> {
        frame(
            0,
            b"RTSP/1.0 200 OK\r\nTransport: RTP/AVP;unicast;client_port=1-2;server_port=3-4\r\n\r\n",
        )
    }

    fn setup_reply(cseq: u32, client_port: u16, server_port: u16, extra: &str) -> Vec<u8> {
        format!(
            "RTSP/1.0 200 OK\r\nCSeq: {cseq}\r\nSession: 42;timeout=60\r\nTransport: \
             RTP/AVP;unicast;client_port={client_port}-{};server_port={server_port}-{}{extra}\r\n\r\n",
            client_port + 1,
            server_port + 1
        )
        .into_bytes()
    }

    fn reply(client_port: u16, server_port: u16, source: Option<IpAddr>) -> SetupReply {
        SetupReply {
            client_port,
            server_port,
            source,
        }
    }

    /// Everything of one feed.
    fn scan(data: &[u8]) -> (Vec<SetupReply>, bool) {
        let mut scanner = RtspScanner::new();
        let replies = scanner.feed(data);
        (replies, scanner.is_done())
    }

    /// Feeds `data` in chunks ending at `splits` (sorted).
    fn scan_split(data: &[u8], splits: &[usize]) -> (Vec<SetupReply>, bool) {
        let mut scanner = RtspScanner::new();
        let mut replies = Vec::new();
        let mut start = 0;
        for &split in splits.iter().chain([&data.len()]) {
            replies.extend(scanner.feed(&data[start..split]));
            start = split;
        }
        assert!(scanner.header.capacity() <= MAX_HEADER_BLOCK);
        (replies, scanner.is_done())
    }

    /// A session with everything the scanner must tell apart, and its replies.
    fn session() -> (Vec<u8>, Vec<SetupReply>) {
        let mut data = Vec::new();
        data.extend(frame(1, b"\x80\x60early"));
        data.extend_from_slice(
            b"RTSP/1.0 200 OK\r\nCSeq: 1\r\nPublic: OPTIONS, DESCRIBE, SETUP\r\n\r\n",
        );
        data.extend(describe_reply());
        data.extend(trap_frame());
        data.extend(setup_reply(3, 5000, 6000, ";source=203.0.113.3"));
        data.extend_from_slice(
            b"GET_PARAMETER rtsp://203.0.113.2/s/ RTSP/1.0\r\nCSeq: 9\r\nContent-Length: 0\r\n\r\n",
        );
        data.extend(frame(0, &[]));
        data.extend_from_slice(EXAMPLE);
        data.extend_from_slice(
            b"RTSP/1.0 461 Unsupported Transport\r\nCSeq: 5\r\n\
              Transport: RTP/AVP;unicast;client_port=7-8;server_port=9-10\r\n\r\n",
        );
        data.extend(frame(2, &[b'$'; 300]));
        data.extend(setup_reply(6, 5002, 6002, ";source=[2001:db8::3]"));
        data.extend_from_slice(b"RTSP/1.0 200 OK\r\nCSeq: 7\r\nRange: npt=0-\r\n\r\n");
        data.extend(frame(0, b"RTSP/1.0 200 OK\r\n"));
        let replies = vec![
            reply(5000, 6000, Some(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 3)))),
            EXAMPLE_REPLY,
            reply(
                5002,
                6002,
                Some(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 3))),
            ),
        ];
        (data, replies)
    }

    #[test]
    fn example_in_one_chunk() {
        assert_eq!(scan(EXAMPLE), (vec![EXAMPLE_REPLY], false));
    }

    #[test]
    fn example_at_every_split_point() {
        for split in 0..=EXAMPLE.len() {
            assert_eq!(
                scan_split(EXAMPLE, &[split]),
                (vec![EXAMPLE_REPLY], false),
                "split at {split}"
            );
        }
    }

    #[test]
    fn example_byte_by_byte() {
        let mut scanner = RtspScanner::new();
        let mut replies = Vec::new();
        for (at, byte) in EXAMPLE.iter().enumerate() {
            let found = scanner.feed(std::slice::from_ref(byte));
            // Reported with the blank line's LF, and not before.
            assert_eq!(found.is_empty(), at + 1 != EXAMPLE.len(), "octet {at}");
            replies.extend(found);
        }
        assert_eq!(replies, [EXAMPLE_REPLY]);
        assert!(!scanner.is_done());
    }

    #[test]
    fn source_ip_literals_and_host_names() {
        let v6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 2));
        let cases = [
            (
                ";source=203.0.113.3",
                Some(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 3))),
            ),
            (
                "; source = 203.0.113.3 ",
                Some(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 3))),
            ),
            (";source=2001:db8:2::2", Some(v6)),
            (";source=[2001:db8:2::2]", Some(v6)),
            (";source=\"2001:db8:2::2\"", Some(v6)),
            (";source=\"[2001:db8:2::2]\"", Some(v6)),
            (
                ";Source=203.0.113.3",
                Some(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 3))),
            ),
            (";source=media.example.test", None),
            (";source=", None),
            (";source=203.0.113.300", None),
            (";source=fe80::1%eth0", None),
            ("", None),
        ];
        for (extra, source) in cases {
            let data = setup_reply(3, 5000, 6000, extra);
            assert_eq!(
                scan(&data),
                (vec![reply(5000, 6000, source)], false),
                "{extra}"
            );
        }
    }

    #[test]
    fn single_ports() {
        let data = b"RTSP/1.0 200 OK\r\nCSeq: 3\r\n\
            Transport: RTP/AVP/UDP;unicast;client_port=5000;server_port=7000;source=192.0.2.9\r\n\r\n";
        assert_eq!(
            scan(data).0,
            [reply(
                5000,
                7000,
                Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 9)))
            )]
        );
        let mixed = b"RTSP/1.0 200 OK\r\nTransport: RTP/AVP;unicast;server_port=7000;client_port=5000-5001\r\n\r\n";
        assert_eq!(scan(mixed).0, [reply(5000, 7000, None)]);
    }

    #[test]
    fn bad_or_missing_ports_are_no_reply() {
        for transport in [
            "RTP/AVP;unicast;client_port=5000-5001",
            "RTP/AVP;unicast;server_port=5000-5001",
            "RTP/AVP;unicast;client_port=0-1;server_port=3-4",
            "RTP/AVP;unicast;client_port=65536;server_port=3-4",
            "RTP/AVP;unicast;client_port=abc;server_port=3-4",
            "RTP/AVP;unicast;client_port=;server_port=3-4",
            "RTP/AVP;unicast;client_port=-5;server_port=3-4",
            "RTP/AVP/TCP;unicast;client_port=1-2;server_port=3-4",
            "RTP/AVP/TCP;unicast;interleaved=0-1",
        ] {
            let data = format!("RTSP/1.0 200 OK\r\nTransport: {transport}\r\n\r\n");
            assert_eq!(scan(data.as_bytes()), (vec![], false), "{transport}");
        }
    }

    #[test]
    fn the_first_spec_with_both_ports() {
        let data = b"RTSP/1.0 200 OK\r\nTransport: RTP/AVP/TCP;unicast;interleaved=0-1, \
            RTP/AVP;unicast;client_port=1000-1001;mode=\"PLAY,RECORD\", \
            RTP/AVP;unicast;client_port=5000-5001;server_port=7000-7001, \
            RTP/AVP;unicast;client_port=5002;server_port=7002\r\n\r\n";
        assert_eq!(scan(data).0, [reply(5000, 7000, None)]);
        // Two Transport headers read as one, in order.
        let two = b"RTSP/1.0 200 OK\r\nTransport: RTP/AVP;unicast;client_port=1000\r\n\
            Transport: RTP/AVP;unicast;client_port=5000;server_port=7000\r\n\r\n";
        assert_eq!(scan(two).0, [reply(5000, 7000, None)]);
    }

    #[test]
    fn folded_transport_header() {
        let data =
            b"RTSP/1.0 200 OK\r\nTransport: RTP/AVP;unicast;\r\n\tclient_port=5000-5001;\r\n \
            server_port=7000-7001\r\nCSeq: 3\r\n\r\n";
        assert_eq!(scan(data).0, [reply(5000, 7000, None)]);
    }

    #[test]
    fn describe_body_is_skipped() {
        let mut data = describe_reply();
        assert_eq!(scan(&data), (vec![], false));
        // The next message is still found: the body was skipped by its length exactly.
        data.extend_from_slice(EXAMPLE);
        assert_eq!(scan(&data), (vec![EXAMPLE_REPLY], false));
        for split in 0..=data.len() {
            assert_eq!(scan_split(&data, &[split]), (vec![EXAMPLE_REPLY], false));
        }
    }

    #[test]
    fn interleaved_frames_before_between_and_after() {
        let mut data = frame(0, b"\x80\x60before");
        data.extend(trap_frame());
        data.extend_from_slice(EXAMPLE);
        data.extend(frame(1, b""));
        data.extend(trap_frame());
        data.extend(setup_reply(5, 5002, 6002, ""));
        data.extend(frame(3, &[0xff; 1000]));
        data.extend(trap_frame());
        let expected = vec![EXAMPLE_REPLY, reply(5002, 6002, None)];
        assert_eq!(scan(&data), (expected.clone(), false));
        for split in 0..=data.len() {
            assert_eq!(
                scan_split(&data, &[split]),
                (expected.clone(), false),
                "split at {split}"
            );
        }
        let every: Vec<usize> = (1..data.len()).collect();
        assert_eq!(scan_split(&data, &every), (expected, false));
    }

    #[test]
    fn a_frame_that_looks_like_a_reply_is_not_one() {
        assert_eq!(scan(&trap_frame()), (vec![], false));
        // A frame of the largest length, its payload a stream of replies.
        let mut payload = Vec::new();
        while payload.len() < usize::from(u16::MAX) - EXAMPLE.len() {
            payload.extend_from_slice(EXAMPLE);
        }
        let mut data = frame(0, &payload);
        data.extend_from_slice(EXAMPLE);
        assert_eq!(scan(&data), (vec![EXAMPLE_REPLY], false));
    }

    #[test]
    fn several_messages_in_one_feed() {
        let (data, replies) = session();
        assert_eq!(scan(&data), (replies, false));
    }

    #[test]
    fn non_success_replies_are_not_reported() {
        for status in [
            "RTSP/1.0 461 Unsupported Transport",
            "RTSP/1.0 404 Not Found",
            "RTSP/1.0 301 Moved",
            "RTSP/1.0 500 Internal Server Error",
            "RTSP/1.0 20 Short",
            "RTSP/1.0 2000 Long",
            "RTSP/1.1 200 OK",
            "RTSP/1.0",
        ] {
            let data = format!(
                "{status}\r\nCSeq: 3\r\nTransport: RTP/AVP;unicast;client_port=1-2;server_port=3-4\r\n\r\n"
            );
            assert_eq!(scan(data.as_bytes()), (vec![], false), "{status}");
        }
        // Other 2xx codes and RTSP 2.0 count.
        for status in ["RTSP/1.0 201 Created", "RTSP/2.0 200 OK", "RTSP/1.0 250"] {
            let data = format!(
                "{status}\r\nTransport: RTP/AVP;unicast;client_port=1-2;server_port=3-4\r\n\r\n"
            );
            assert_eq!(scan(data.as_bytes()).0, [reply(1, 3, None)], "{status}");
        }
    }

    #[test]
    fn rtsp_2_addresses_are_not_handled() {
        let data = b"RTSP/2.0 200 OK\r\nCSeq: 3\r\nTransport: RTP/AVP;unicast;\
            dest_addr=\":5000\"/\":5001\";src_addr=\"192.0.2.1:6000\"/\"192.0.2.1:6001\"\r\n\r\n";
        assert_eq!(scan(data), (vec![], false));
    }

    #[test]
    fn other_protocols_give_up_at_once() {
        for (data, within) in [
            (&b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"[..], 5),
            (b"HTTP/1.0 301 Moved", 5),
            (b"\x16\x03\x03\x00\x7a\x02", 1),
            (b"SSH-2.0-OpenSSH_9.6\r\n", 20),
            (b"220 smtp.example.test ESMTP\r\n", 23),
            (b"+OK POP3\r\n", 9),
            (b"* OK IMAP\r\n", 6),
            (b"RTSP\r\n", 5),
            (b"GET / HTTP/1.1\r\n", 7),
            (b"OPTIONS\r\n", 8),
            (b" RTSP/1.0 200 OK\r\n", 1),
            (b"\0\0\0\0", 1),
        ] {
            let mut scanner = RtspScanner::new();
            let mut fed = 0;
            while !scanner.is_done() && fed < data.len() {
                assert!(scanner.feed(&data[fed..=fed]).is_empty());
                fed += 1;
            }
            assert!(scanner.is_done(), "{:?}", String::from_utf8_lossy(data));
            assert!(
                fed <= within,
                "{:?}: {fed} octets",
                String::from_utf8_lossy(data)
            );
            // A no-op from then on, even for RTSP.
            assert!(scanner.feed(EXAMPLE).is_empty());
            assert!(scanner.is_done());
            assert_eq!(scanner.header.capacity(), 0);
        }
    }

    #[test]
    fn curl_over_http_gives_up() {
        let data = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 90\r\n\r\n\
            RTSP/1.0 200 OK\r\nTransport: RTP/AVP;unicast;client_port=1-2;server_port=3-4\r\n\r\n";
        assert_eq!(scan(data), (vec![], true));
    }

    #[test]
    fn garbage_after_a_message_gives_up() {
        let mut data = EXAMPLE.to_vec();
        data.extend_from_slice(b"HTTP/1.1 200 OK\r\n\r\n");
        data.extend_from_slice(EXAMPLE);
        assert_eq!(scan(&data), (vec![EXAMPLE_REPLY], true));
    }

    #[test]
    fn a_header_block_over_the_bound_gives_up() {
        let head = b"RTSP/1.0 200 OK\r\nX-Padding: ";
        let tail = b"\r\nTransport: RTP/AVP;unicast;client_port=1;server_port=3\r\n\r\n";
        // Exactly at the bound: read.
        let padding = MAX_HEADER_BLOCK - head.len() - tail.len();
        let mut data = head.to_vec();
        data.resize(head.len() + padding, b'x');
        data.extend_from_slice(tail);
        assert_eq!(data.len(), MAX_HEADER_BLOCK);
        assert_eq!(scan(&data), (vec![reply(1, 3, None)], false));
        assert_eq!(
            scan_split(&data, &[100, 9000]),
            (vec![reply(1, 3, None)], false)
        );
        // One octet more: given up.
        data.insert(head.len(), b'x');
        assert_eq!(scan(&data), (vec![], true));
        assert_eq!(scan_split(&data, &[100, 9000]), (vec![], true));
        // Given up as soon as the block has MAX_HEADER_BLOCK octets without its end.
        let mut scanner = RtspScanner::new();
        assert!(scanner.feed(&data[..MAX_HEADER_BLOCK - 1]).is_empty());
        assert!(!scanner.is_done());
        assert!(
            scanner
                .feed(&data[MAX_HEADER_BLOCK - 1..MAX_HEADER_BLOCK])
                .is_empty()
        );
        assert!(scanner.is_done());
        // A never-ending first line too.
        let mut scanner = RtspScanner::new();
        scanner.feed(b"ANNOUNCE rtsp://");
        for _ in 0..MAX_HEADER_BLOCK {
            scanner.feed(b"a");
        }
        assert!(scanner.is_done());
    }

    #[test]
    fn bad_content_length_gives_up() {
        for header in [
            "Content-Length: ten",
            "Content-Length: -1",
            "Content-Length:",
            "Content-Length: 99999999999999999999",
            "Content-Length: 3\r\nContent-Length: 4",
            "Content-Length: 3\r\n 4",
        ] {
            let data = format!("RTSP/1.0 200 OK\r\n{header}\r\n\r\nabc");
            assert_eq!(scan(data.as_bytes()), (vec![], true), "{header}");
        }
        // The same length twice is fine.
        let mut data =
            b"RTSP/1.0 200 OK\r\nContent-Length: 3\r\ncontent-length: 3\r\n\r\nabc".to_vec();
        data.extend_from_slice(EXAMPLE);
        assert_eq!(scan(&data), (vec![EXAMPLE_REPLY], false));
    }

    #[test]
    fn a_huge_body_is_skipped_by_count() {
        let mut scanner = RtspScanner::new();
        assert!(
            scanner
                .feed(b"RTSP/1.0 200 OK\r\nContent-Length: 9999999999999999999\r\n\r\n")
                .is_empty()
        );
        assert_eq!(scanner.state, State::Skip(9_999_999_999_999_999_999));
        assert!(scanner.feed(EXAMPLE).is_empty());
        assert!(!scanner.is_done());
    }

    #[test]
    fn server_requests_are_skipped() {
        let sdp = "v=0\r\nTransport: RTP/AVP;unicast;client_port=1-2;server_port=3-4\r\n";
        let announce = format!(
            "ANNOUNCE rtsp://203.0.113.2/s RTSP/1.0\r\nCSeq: 10\r\nContent-Type: application/sdp\r\n\
             Content-Length: {}\r\n\r\n{sdp}",
            sdp.len()
        );
        // A request with a Transport header (as a client would send) is not a reply.
        let setup = b"SETUP rtsp://203.0.113.2/s/track1 RTSP/1.0\r\nCSeq: 3\r\n\
            Transport: RTP/AVP;unicast;client_port=1-2;server_port=3-4\r\n\r\n";
        let mut data = announce.into_bytes();
        data.extend_from_slice(b"GET_PARAMETER * RTSP/1.0\r\nCSeq: 11\r\n\r\n");
        data.extend_from_slice(setup);
        data.extend_from_slice(EXAMPLE);
        data.extend_from_slice(b"x-vendor-ping rtsp://h/ RTSP/2.0\r\n\r\n");
        data.extend(setup_reply(5, 5002, 6002, ""));
        let expected = vec![EXAMPLE_REPLY, reply(5002, 6002, None)];
        assert_eq!(scan(&data), (expected.clone(), false));
        for split in 0..=data.len() {
            assert_eq!(
                scan_split(&data, &[split]),
                (expected.clone(), false),
                "split at {split}"
            );
        }
    }

    #[test]
    fn lowercase_names_and_bare_line_feeds() {
        let data = b"RTSP/1.0 200 OK\ncseq: 4\ntransport: rtp/avp;UNICAST;Client_Port=5000-5001;\
            SERVER_PORT=7000-7001;SOURCE=192.0.2.9\nsession: 1\n\n\
            RTSP/1.0 200 OK\r\nCONTENT-LENGTH: 5\r\n\r\n$$$$$\
            RTSP/1.0 200 OK\ncontent-length: 2\n\r\nhi";
        let expected = vec![reply(
            5000,
            7000,
            Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 9))),
        )];
        assert_eq!(scan(data), (expected, false));
        let mut scanner = RtspScanner::new();
        scanner.feed(data);
        assert_eq!(scanner.state, State::Boundary);
    }

    #[test]
    fn stray_line_ends_between_messages() {
        let mut data = b"\r\n".to_vec();
        data.extend_from_slice(EXAMPLE);
        data.extend_from_slice(b"\r\n\n\r\n");
        data.extend_from_slice(EXAMPLE);
        assert_eq!(scan(&data), (vec![EXAMPLE_REPLY, EXAMPLE_REPLY], false));
    }

    /// xorshift64*: deterministic pseudo-random numbers (the crate has no proptest).
    struct Random(u64);

    impl Random {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        /// A number below `bound` (> 0).
        fn below(&mut self, bound: usize) -> usize {
            usize::try_from(self.next() % u64::try_from(bound).expect("a usize"))
                .expect("below a usize")
        }

        fn byte(&mut self) -> u8 {
            self.next().to_le_bytes()[0]
        }
    }

    /// Random chunkings of a valid session give the same replies.
    #[test]
    fn random_chunkings_give_the_same_replies() {
        let (data, expected) = session();
        let mut random = Random(0x9E37_79B9_7F4A_7C15);
        for round in 0..2000 {
            let mut splits: Vec<usize> = (0..random.below(64))
                .map(|_| random.below(data.len() + 1))
                .collect();
            if round % 10 == 0 {
                // Many tiny chunks.
                splits.extend((0..data.len()).filter(|_| random.below(3) == 0));
            }
            splits.sort_unstable();
            assert_eq!(
                scan_split(&data, &splits),
                (expected.clone(), false),
                "splits {splits:?}"
            );
        }
    }

    /// Random octets, and valid streams with random damage, never panic, and the buffer stays
    /// within its bound.
    #[test]
    fn random_input_never_panics() {
        let (session, _) = session();
        let alphabet = b"RTSP/1.0 2\r\n:;=-,\"[]$\0\xffaTransportclient_portserver_portsourceContent-Length0123456789";
        let mut random = Random(0x0123_4567_89AB_CDEF);
        let (mut found, mut alive) = (0, 0);
        for round in 0..3000 {
            let length = random.below(2048);
            let mut data: Vec<u8> = match round % 4 {
                // Raw octets.
                0 => (0..length).map(|_| random.byte()).collect(),
                // Octets from the protocol's alphabet, after a valid start.
                1 => {
                    let mut data = b"RTSP/1.0 200 OK\r\n".to_vec();
                    data.extend((0..length).map(|_| alphabet[random.below(alphabet.len())]));
                    data
                }
                // A valid session with octets flipped, dropped or inserted.
                _ => {
                    let mut data = session.clone();
                    for _ in 0..=random.below(8) {
                        let at = random.below(data.len());
                        match random.below(3) {
                            0 => data[at] = random.byte(),
                            1 => {
                                data.remove(at);
                            }
                            _ => data.insert(at, alphabet[random.below(alphabet.len())]),
                        }
                    }
                    data
                }
            };
            if round % 7 == 0 {
                data.extend(std::iter::repeat_n(b'T', MAX_HEADER_BLOCK + 10));
            }
            let mut splits: Vec<usize> = (0..random.below(16))
                .map(|_| random.below(data.len() + 1))
                .collect();
            splits.sort_unstable();
            let (split_replies, split_done) = scan_split(&data, &splits);
            found += usize::from(!split_replies.is_empty());
            alive += usize::from(!split_done);
            // Chunking never changes the outcome.
            assert_eq!(scan(&data), (split_replies, split_done));
        }
        // The damaged streams reach past the first line: some still give replies, some are
        // read to their end.
        assert!(found > 500, "{found} rounds with replies");
        assert!(alive > 500, "{alive} rounds not given up");
    }
}
