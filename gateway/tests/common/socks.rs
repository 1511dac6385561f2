//! Raw SOCKS5 bytes (RFC 1928, RFC 1929), built and parsed independently of the crate's codec,
//! and the client steps the SOCKS tests share.

use std::net::{IpAddr, SocketAddr};

use tokio::net::TcpStream;

use super::{
    gateway::Gateway,
    io::{read_exact, send},
};

/// `ATYP ADDR PORT` for an IP address.
pub fn put_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr {
        SocketAddr::V4(v4) => {
            out.push(0x01);
            out.extend_from_slice(&v4.ip().octets());
        }
        SocketAddr::V6(v6) => {
            out.push(0x04);
            out.extend_from_slice(&v6.ip().octets());
        }
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
}

/// Parses `ATYP ADDR PORT` (IPv4 or IPv6); returns the address and the bytes after it.
pub fn parse_addr(bytes: &[u8]) -> (SocketAddr, &[u8]) {
    let (ip, rest): (IpAddr, &[u8]) = match bytes[0] {
        0x01 => {
            let octets: [u8; 4] = bytes[1..5].try_into().unwrap();
            (octets.into(), &bytes[5..])
        }
        0x04 => {
            let octets: [u8; 16] = bytes[1..17].try_into().unwrap();
            (octets.into(), &bytes[17..])
        }
        other => panic!("unexpected ATYP {other:#04x}"),
    };
    let port = u16::from_be_bytes([rest[0], rest[1]]);
    (SocketAddr::new(ip, port), &rest[2..])
}

/// `05 CMD 00 ATYP ADDR PORT`.
pub fn request(command: u8, addr: SocketAddr) -> Vec<u8> {
    let mut out = vec![0x05, command, 0x00];
    put_addr(&mut out, addr);
    out
}

/// `05 CMD 00 03 LEN NAME PORT`.
pub fn request_domain(command: u8, name: &str, port: u16) -> Vec<u8> {
    let mut out = vec![0x05, command, 0x00, 0x03, u8::try_from(name.len()).unwrap()];
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&port.to_be_bytes());
    out
}

/// RFC 1929 `01 ULEN UNAME PLEN PASSWD`.
pub fn auth_request(name: &str, password: &str) -> Vec<u8> {
    let mut out = vec![0x01, u8::try_from(name.len()).unwrap()];
    out.extend_from_slice(name.as_bytes());
    out.push(u8::try_from(password.len()).unwrap());
    out.extend_from_slice(password.as_bytes());
    out
}

/// A failure reply as the server sends it: `05 REP 00 01 0.0.0.0:0`.
pub fn failure_reply(code: u8) -> Vec<u8> {
    vec![0x05, code, 0x00, 0x01, 0, 0, 0, 0, 0, 0]
}

/// The RFC 1928 UDP header and payload.
pub fn udp_datagram(frag: u8, to: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0x00, 0x00, frag];
    put_addr(&mut out, to);
    out.extend_from_slice(payload);
    out
}

/// Parses a datagram from the relay: checks RSV and FRAG, returns the named address and payload.
pub fn parse_udp(datagram: &[u8]) -> (SocketAddr, Vec<u8>) {
    assert_eq!(&datagram[..3], &[0, 0, 0], "RSV and FRAG must be zero");
    let (addr, rest) = parse_addr(&datagram[3..]);
    (addr, rest.to_vec())
}

/// Reads a reply; returns REP and BND. Checks VER and RSV.
pub async fn read_reply(stream: &mut TcpStream) -> (u8, SocketAddr) {
    let head = read_exact(stream, 4).await;
    assert_eq!(head[0], 0x05, "reply version");
    assert_eq!(head[2], 0x00, "reply RSV");
    let rest = match head[3] {
        0x01 => read_exact(stream, 6).await,
        0x04 => read_exact(stream, 18).await,
        other => panic!("reply ATYP {other:#04x}"),
    };
    let mut bytes = vec![head[3]];
    bytes.extend_from_slice(&rest);
    (head[1], parse_addr(&bytes).0)
}

/// Connects, greets with "no authentication" and expects it selected.
pub async fn connect_anonymous(gateway: &Gateway) -> TcpStream {
    let mut stream = gateway.connect().await;
    send(&mut stream, &[0x05, 0x01, 0x00]).await;
    assert_eq!(read_exact(&mut stream, 2).await, [0x05, 0x00]);
    stream
}

/// An anonymous CONNECT to `target`; returns the stream after a success reply and BND.
pub async fn socks_connect(gateway: &Gateway, target: SocketAddr) -> (TcpStream, SocketAddr) {
    let mut stream = connect_anonymous(gateway).await;
    send(&mut stream, &request(0x01, target)).await;
    let (code, bound) = read_reply(&mut stream).await;
    assert_eq!(code, 0x00, "CONNECT {target} failed");
    (stream, bound)
}
