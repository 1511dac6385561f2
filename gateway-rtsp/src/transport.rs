//! The RTSP `Transport` header (RFC 2326 section 12.39; RTSP 2.0's `src_addr`, RFC 7826 18.54)
//! as protocol.md section 5 uses it: the client's request with `client_port` (the external relay
//! pair), the server's reply with `server_port` and `source`, and the demo server's side of both.
//! Multicast too: the client's `RTP/AVP;multicast` and the server's
//! `RTP/AVP;multicast;destination=G;port=P-Q;ttl=N` (or RTSP 2.0's `dest_addr="G:P"/"G:Q"`),
//! which [`parse_setup_reply`] tells from a unicast answer.
//!
//! Pure, and parsed here rather than with `rtsp-types` 0.1: its Transport parser panics on some
//! `src_addr` lists (`src_addr="/"` slices past a lone quote; found by the property tests in
//! `transport_tests.rs`) and refuses an IPv6 `source=` without quotes, which servers send. This
//! parser takes printable ASCII only, at most 4 KiB, and never panics.

use std::{fmt, net::IpAddr};

use super::ParseError;

/// Longest Transport header accepted.
pub const MAX_TRANSPORT_LEN: usize = 4096;

const NAME: &str = "Transport";

/// The client's request: RTP over UDP, unicast, receiving on the pair `rtp_port`, `rtp_port + 1`.
pub fn client_request(rtp_port: u16) -> String {
    format!(
        "RTP/AVP;unicast;client_port={rtp_port}-{}",
        rtp_port.wrapping_add(1)
    )
}

/// The client's request for multicast delivery: the server picks the group and ports.
pub fn client_request_multicast() -> String {
    "RTP/AVP;multicast".to_owned()
}

/// A host named in a Transport header.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SourceHost {
    /// An IP address.
    Ip(IpAddr),
    /// A DNS name (the gateway resolves it at step 2).
    Name(String),
}

impl fmt::Display for SourceHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ip(ip) => write!(f, "{ip}"),
            Self::Name(name) => f.write_str(name),
        }
    }
}

/// What a SETUP reply's Transport header tells the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyTransport {
    /// `source=` (or the host of `src_addr`): where the media comes from. `None`: from the RTSP
    /// server's own address.
    pub source: Option<SourceHost>,
    /// The source's RTP and RTCP ports (`server_port`, or the ports of `src_addr`). `None`: the
    /// reply names none, and the stream cannot be admitted exactly.
    pub ports: Option<(u16, u16)>,
    /// `ssrc=`, if given.
    pub ssrc: Option<u32>,
    /// `client_port` as echoed by the server.
    pub client_port: Option<(u16, u16)>,
}

/// What a SETUP reply's multicast Transport header tells the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MulticastTransport {
    /// The group (`destination=`, or the host of `dest_addr`): an IPv4 or IPv6 multicast
    /// address.
    pub group: IpAddr,
    /// The RTP and RTCP ports on the group (`port=`, or the ports of `dest_addr`).
    pub ports: (u16, u16),
    /// `ttl=`, if given.
    pub ttl: Option<u8>,
    /// `source=` (a source-specific group's sender), if given.
    pub source: Option<SourceHost>,
    /// `ssrc=`, if given.
    pub ssrc: Option<u32>,
}

/// A SETUP reply's first transport: unicast or multicast.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetupTransport {
    /// Unicast (`unicast`, or neither flag and no multicast destination).
    Unicast(ReplyTransport),
    /// Multicast (`multicast`, or neither flag and a multicast destination).
    Multicast(MulticastTransport),
}

/// The demo server's view of a SETUP request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestTransport {
    /// `client_port`: where the client receives RTP and RTCP.
    pub client_port: (u16, u16),
}

/// The lower transport of an RTP transport spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lower {
    /// UDP (`RTP/AVP` or `RTP/AVP/UDP`).
    Udp,
    /// TCP (`RTP/AVP/TCP`, interleaved on the control connection).
    Tcp,
    /// Anything else.
    Other(String),
}

/// One RTP transport spec of a Transport header, with the parameters this crate reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportSpec {
    /// The profile (`AVP`, `SAVP`, ...), upper case.
    pub profile: String,
    /// The lower transport.
    pub lower: Lower,
    /// `unicast`.
    pub unicast: bool,
    /// `multicast`.
    pub multicast: bool,
    /// `interleaved=` is present.
    pub interleaved: bool,
    /// `client_port=a[-b]`.
    pub client_port: Option<(u16, Option<u16>)>,
    /// `server_port=a[-b]`.
    pub server_port: Option<(u16, Option<u16>)>,
    /// `source=` (quotes removed).
    pub source: Option<String>,
    /// `destination=` (quotes removed).
    pub destination: Option<String>,
    /// `port=a[-b]` (multicast).
    pub port: Option<(u16, Option<u16>)>,
    /// `ttl=` (multicast).
    pub ttl: Option<u8>,
    /// `dest_addr=` items (quotes removed).
    pub dest_addr: Vec<String>,
    /// `src_addr=` items (quotes removed).
    pub src_addr: Vec<String>,
    /// The first SSRC of `ssrc=`.
    pub ssrc: Option<u32>,
}

/// Splits `text` at `separator` outside double quotes; `None` if a quote is left open.
fn split_outside_quotes(text: &str, separator: u8) -> Option<Vec<&str>> {
    let mut parts = Vec::new();
    let mut quoted = false;
    let mut start = 0;
    for (at, byte) in text.bytes().enumerate() {
        match byte {
            b'"' => quoted = !quoted,
            byte if byte == separator && !quoted => {
                parts.push(&text[start..at]);
                start = at + 1;
            }
            _ => {}
        }
    }
    if quoted {
        return None;
    }
    parts.push(&text[start..]);
    Some(parts)
}

fn unquote(text: &str) -> &str {
    let text = text.trim();
    text.strip_prefix('"')
        .and_then(|inner| inner.strip_suffix('"'))
        .unwrap_or(text)
}

fn is_token(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// `a` or `a-b`, decimal ports.
fn port_range(text: &str) -> Option<(u16, Option<u16>)> {
    let number = |t: &str| {
        let t = t.trim();
        (!t.is_empty() && t.len() <= 5 && t.bytes().all(|b| b.is_ascii_digit()))
            .then(|| t.parse::<u16>().ok())
            .flatten()
    };
    match text.split_once('-') {
        Some((first, second)) => Some((number(first)?, Some(number(second)?))),
        None => Some((number(text)?, None)),
    }
}

fn spec(text: &str, value: &str) -> Result<Option<TransportSpec>, ParseError> {
    let parts = split_outside_quotes(text, b';')
        .ok_or_else(|| ParseError::header(NAME, value, "an unclosed quote"))?;
    let protocol: Vec<&str> = parts[0].trim().split('/').map(str::trim).collect();
    let (profile, lower) = match protocol.as_slice() {
        [rtp, profile] if rtp.eq_ignore_ascii_case("RTP") => (profile, Lower::Udp),
        [rtp, profile, lower] if rtp.eq_ignore_ascii_case("RTP") => {
            let lower = if lower.eq_ignore_ascii_case("UDP") {
                Lower::Udp
            } else if lower.eq_ignore_ascii_case("TCP") {
                Lower::Tcp
            } else {
                Lower::Other((*lower).to_owned())
            };
            (profile, lower)
        }
        _ => return Ok(None),
    };
    let mut spec = TransportSpec {
        profile: profile.to_ascii_uppercase(),
        lower,
        unicast: false,
        multicast: false,
        interleaved: false,
        client_port: None,
        server_port: None,
        source: None,
        destination: None,
        port: None,
        ttl: None,
        dest_addr: Vec::new(),
        src_addr: Vec::new(),
        ssrc: None,
    };
    for parameter in &parts[1..] {
        let parameter = parameter.trim();
        if parameter.is_empty() {
            continue;
        }
        let (name, argument) = match parameter.split_once('=') {
            Some((name, argument)) => (name.trim(), Some(argument.trim())),
            None => (parameter, None),
        };
        if !is_token(name) {
            return Err(ParseError::header(
                NAME,
                value,
                format!("bad parameter {parameter:?}"),
            ));
        }
        set_parameter(&mut spec, name, argument, value)?;
    }
    Ok(Some(spec))
}

/// Records one `name[=argument]` parameter of a transport spec in `spec`.
fn set_parameter(
    spec: &mut TransportSpec,
    name: &str,
    argument: Option<&str>,
    value: &str,
) -> Result<(), ParseError> {
    let bad = || ParseError::header(NAME, value, format!("bad {name}"));
    match (name.to_ascii_lowercase().as_str(), argument) {
        ("unicast", _) => spec.unicast = true,
        ("multicast", _) => spec.multicast = true,
        ("interleaved", _) => spec.interleaved = true,
        ("client_port", Some(text)) => {
            spec.client_port = Some(port_range(text).ok_or_else(bad)?);
        }
        ("server_port", Some(text)) => {
            spec.server_port = Some(port_range(text).ok_or_else(bad)?);
        }
        ("source", Some(text)) => spec.source = Some(unquote(text).to_owned()),
        ("destination", Some(text)) => spec.destination = Some(unquote(text).to_owned()),
        ("port", Some(text)) => spec.port = Some(port_range(text).ok_or_else(bad)?),
        ("ttl", Some(text)) => {
            let digits =
                !text.is_empty() && text.len() <= 3 && text.bytes().all(|b| b.is_ascii_digit());
            spec.ttl = Some(
                digits
                    .then(|| text.parse::<u8>().ok())
                    .flatten()
                    .ok_or_else(bad)?,
            );
        }
        ("src_addr" | "dest_addr", Some(text)) => {
            let items = split_outside_quotes(text, b'/').ok_or_else(bad)?;
            let items = items
                .into_iter()
                .map(|item| unquote(item).to_owned())
                .collect();
            if name.eq_ignore_ascii_case("src_addr") {
                spec.src_addr = items;
            } else {
                spec.dest_addr = items;
            }
        }
        ("ssrc", Some(text)) => {
            let first = text.split('/').next().unwrap_or_default().trim();
            let valid = !first.is_empty() && first.len() <= 8;
            spec.ssrc = Some(
                valid
                    .then(|| u32::from_str_radix(first, 16).ok())
                    .flatten()
                    .ok_or_else(bad)?,
            );
        }
        (
            "client_port" | "server_port" | "source" | "src_addr" | "ssrc" | "destination" | "port"
            | "ttl" | "dest_addr",
            None,
        ) => {
            return Err(bad());
        }
        _ => {}
    }
    Ok(())
}

/// Parses a Transport header into its RTP transport specs, in the order given (others are
/// skipped).
pub fn parse(value: &str) -> Result<Vec<TransportSpec>, ParseError> {
    if value.len() > MAX_TRANSPORT_LEN {
        return Err(ParseError::header(NAME, value, "longer than 4096 octets"));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_graphic() || b == b' ' || b == b'\t')
    {
        return Err(ParseError::header(
            NAME,
            value,
            "control characters or non-ASCII text",
        ));
    }
    let transports = split_outside_quotes(value, b',')
        .ok_or_else(|| ParseError::header(NAME, value, "an unclosed quote"))?;
    let mut specs = Vec::new();
    for text in transports {
        if let Some(spec) = spec(text, value)? {
            specs.push(spec);
        }
    }
    if specs.is_empty() {
        return Err(ParseError::header(NAME, value, "no RTP transport"));
    }
    Ok(specs)
}

/// RTP over UDP (`RTP/AVP` or `RTP/AVP/UDP`), unicast, not interleaved.
fn check_udp_unicast(spec: &TransportSpec, value: &str) -> Result<(), ParseError> {
    check_udp(spec, value)?;
    if spec.multicast {
        return Err(ParseError::header(
            NAME,
            value,
            "multicast; only unicast is supported",
        ));
    }
    Ok(())
}

/// RTP over UDP (`RTP/AVP` or `RTP/AVP/UDP`), not interleaved.
fn check_udp(spec: &TransportSpec, value: &str) -> Result<(), ParseError> {
    if spec.profile != "AVP" {
        return Err(ParseError::header(
            NAME,
            value,
            format!("profile RTP/{}; only RTP/AVP is supported", spec.profile),
        ));
    }
    if spec.lower == Lower::Tcp || spec.interleaved {
        return Err(ParseError::header(
            NAME,
            value,
            "RTP over TCP (interleaved); only UDP passes the two-step binding",
        ));
    }
    if let Lower::Other(other) = &spec.lower {
        return Err(ParseError::header(
            NAME,
            value,
            format!("lower transport {other}; only UDP"),
        ));
    }
    Ok(())
}

/// A port range `a` or `a-b` as an RTP/RTCP pair (`a`, `a+1` when only `a` is given).
#[expect(
    clippy::similar_names,
    reason = "RTP and RTCP are the protocol's names"
)]
fn pair(range: (u16, Option<u16>), what: &str, value: &str) -> Result<(u16, u16), ParseError> {
    let (rtp, rtcp) = range;
    let rtcp = match rtcp {
        Some(rtcp) => Some(rtcp),
        None => rtp.checked_add(1),
    };
    match rtcp {
        Some(rtcp) if rtp != 0 && rtcp != 0 => Ok((rtp, rtcp)),
        _ => Err(ParseError::header(NAME, value, format!("bad {what}"))),
    }
}

/// A host of `source=` or `src_addr`: an IP address (brackets allowed) or a DNS name.
fn host(text: &str, value: &str) -> Result<SourceHost, ParseError> {
    let bare = text.trim_matches(|c| c == '[' || c == ']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(SourceHost::Ip(ip));
    }
    let is_name = !text.is_empty()
        && text.len() <= 253
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !text.starts_with(['-', '.']);
    if is_name {
        Ok(SourceHost::Name(text.to_owned()))
    } else {
        Err(ParseError::header(
            NAME,
            value,
            format!("source host {text:?} is neither an IP address nor a DNS name"),
        ))
    }
}

/// An RTSP 2.0 address `host:port`, `[v6]:port` or `:port` (the host is then unnamed).
fn host_port(text: &str, value: &str) -> Result<(Option<SourceHost>, u16), ParseError> {
    let bad = || ParseError::header(NAME, value, format!("bad src_addr {text:?}"));
    let (host_text, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(bad)?;
    if host_text.is_empty() {
        return Ok((None, port));
    }
    Ok((Some(host(host_text, value)?), port))
}

/// Parses a SETUP reply's Transport header: the first RTP transport, which must be UDP unicast.
/// A reply without ports is not an error here ([`ReplyTransport::ports`] is `None`): the caller
/// says what that means.
#[expect(
    clippy::similar_names,
    reason = "RTP and RTCP are the protocol's names"
)]
pub fn parse_reply(value: &str) -> Result<ReplyTransport, ParseError> {
    let transports = parse(value)?;
    let params = &transports[0];
    check_udp_unicast(params, value)?;
    let mut source = params
        .source
        .as_deref()
        .map(|text| host(text, value))
        .transpose()?;
    let mut ports = params
        .server_port
        .map(|range| pair(range, "server_port", value))
        .transpose()?;
    if let Some(first) = params.src_addr.first() {
        let (src_host, rtp_port) = host_port(first, value)?;
        if source.is_none() {
            source = src_host;
        }
        if ports.is_none() {
            let rtcp_port = match params.src_addr.get(1) {
                Some(second) => host_port(second, value)?.1,
                None => rtp_port
                    .checked_add(1)
                    .ok_or_else(|| ParseError::header(NAME, value, "bad src_addr port"))?,
            };
            ports = Some((rtp_port, rtcp_port));
        }
    }
    let client_port = params
        .client_port
        .map(|range| pair(range, "client_port", value))
        .transpose()?;
    Ok(ReplyTransport {
        source,
        ports,
        ssrc: params.ssrc,
        client_port,
    })
}

/// Parses a SETUP reply's Transport header when either delivery may come back (the client asked
/// for multicast): the first RTP transport, which must be UDP. It is multicast when it says
/// `multicast`, or says neither and names a multicast destination (RFC 2326's default is
/// multicast); it is unicast otherwise, parsed as [`parse_reply`] does.
pub fn parse_setup_reply(value: &str) -> Result<SetupTransport, ParseError> {
    let transports = parse(value)?;
    let params = &transports[0];
    check_udp(params, value)?;
    if params.unicast && params.multicast {
        return Err(ParseError::header(
            NAME,
            value,
            "both unicast and multicast",
        ));
    }
    let destination = params
        .destination
        .as_deref()
        .or_else(|| params.dest_addr.first().map(String::as_str));
    let names_group = destination.is_some_and(|text| {
        let host = text.rsplit_once(':').map_or(text, |(host, _)| host);
        [text, host].iter().any(|candidate| {
            candidate
                .trim_matches(|c| c == '[' || c == ']')
                .parse::<IpAddr>()
                .is_ok_and(|ip| ip.to_canonical().is_multicast())
        })
    });
    if params.multicast || (!params.unicast && names_group) {
        multicast_spec(params, value).map(SetupTransport::Multicast)
    } else {
        parse_reply(value).map(SetupTransport::Unicast)
    }
}

/// The group, ports, TTL and source of a multicast transport spec.
#[expect(
    clippy::similar_names,
    reason = "RTP and RTCP are the protocol's names"
)]
fn multicast_spec(spec: &TransportSpec, value: &str) -> Result<MulticastTransport, ParseError> {
    let bad = |reason: String| ParseError::header(NAME, value, reason);
    let group_of = |text: &str| {
        let bare = text.trim_matches(|c| c == '[' || c == ']');
        let ip = bare.parse::<IpAddr>().map_err(|_| {
            bad(format!(
                "multicast destination {text:?} is not an IP address"
            ))
        })?;
        if ip.to_canonical().is_multicast() {
            Ok(ip.to_canonical())
        } else {
            Err(bad(format!(
                "multicast destination {ip} is not a multicast group address"
            )))
        }
    };
    let mut group = spec.destination.as_deref().map(group_of).transpose()?;
    let mut ports = spec
        .port
        .map(|range| pair(range, "port", value))
        .transpose()?;
    if let Some(first) = spec.dest_addr.first() {
        let bad_dest = || bad(format!("bad dest_addr {first:?}"));
        let (host_text, port_text) = first.rsplit_once(':').ok_or_else(bad_dest)?;
        if group.is_none() {
            group = Some(group_of(host_text)?);
        }
        let rtp_port = port_text
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(bad_dest)?;
        if ports.is_none() {
            let rtcp_port = match spec.dest_addr.get(1) {
                Some(second) => host_port(second, value)?.1,
                None => rtp_port.checked_add(1).ok_or_else(bad_dest)?,
            };
            ports = Some((rtp_port, rtcp_port));
        }
    }
    let group = group.ok_or_else(|| {
        bad("a multicast transport without destination (no group to receive)".to_owned())
    })?;
    let ports = ports.ok_or_else(|| {
        bad("a multicast transport without port (no port on the group)".to_owned())
    })?;
    let source = spec
        .source
        .as_deref()
        .map(|text| host(text, value))
        .transpose()?;
    Ok(MulticastTransport {
        group,
        ports,
        ttl: spec.ttl,
        source,
        ssrc: spec.ssrc,
    })
}

/// Parses a SETUP request's Transport header (the demo server's side): the first RTP/AVP UDP
/// unicast transport with `client_port`.
pub fn parse_request(value: &str) -> Result<RequestTransport, ParseError> {
    let transports = parse(value)?;
    let mut why = ParseError::header(NAME, value, "no client_port");
    for rtp in &transports {
        if let Err(error) = check_udp_unicast(rtp, value) {
            why = error;
            continue;
        }
        if let Some(range) = rtp.client_port {
            return Ok(RequestTransport {
                client_port: pair(range, "client_port", value)?,
            });
        }
    }
    Err(why)
}

/// The demo server's reply: always `server_port` and `source`, as protocol.md section 5 asks.
pub fn server_reply(
    client_port: (u16, u16),
    server_port: (u16, u16),
    source: IpAddr,
    ssrc: u32,
) -> String {
    format!(
        "RTP/AVP;unicast;client_port={}-{};server_port={}-{};source={source};ssrc={ssrc:08X};\
         mode=\"PLAY\"",
        client_port.0, client_port.1, server_port.0, server_port.1
    )
}

#[cfg(test)]
#[path = "transport_tests.rs"]
mod tests;
