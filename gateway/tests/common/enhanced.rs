//! Raw enhanced-mode bytes as protocol.md sections 3 and 4 lay them out, written independently of
//! the crate's codec: entering the mode, control packets and replies, datagram headers, and
//! step 1 of the two-step binding with its layout checks. IPv4 only.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use gateway::gate::GateEntry;
use tokio::net::TcpStream;

use super::{
    gateway::Gateway,
    io::{read_exact, send},
    peers::LOCALHOST,
    socks::{parse_addr, put_addr},
};

pub const UNSPECIFIED: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);

pub const BIND: u8 = 0x05;
pub const RELEASE: u8 = 0x06;
pub const SET_TTL: u8 = 0x07;
/// receive | send | unicast
pub const RSU: u16 = 0x0007;
pub const TCP_ENCAPSULATED: u16 = 0x0008;
pub const REMOTE_PENDING: u16 = 0x0080;
pub const RTP_PAIR: u16 = 0x0100;

impl Gateway {
    /// Greets anonymously and sends CMD 04; returns the stream and the raw entry reply.
    pub async fn enter_raw(&self) -> (TcpStream, Vec<u8>) {
        let mut stream = self.connect().await;
        send(&mut stream, &[0x05, 0x01, 0x00]).await;
        assert_eq!(read_exact(&mut stream, 2).await, [0x05, 0x00]);
        send(&mut stream, &hex("05 04 00 01 00000000 0000")).await;
        let reply = read_exact(&mut stream, 10).await;
        (stream, reply)
    }

    /// Enters the enhanced mode and checks the reply.
    pub async fn enter(&self) -> TcpStream {
        let (stream, reply) = self.enter_raw().await;
        assert_eq!(reply, hex("01 00 00 01 00000000 0000"));
        stream
    }
}

/// The kernel entry admitting `remote` to the external relay address `relay`.
pub fn entry(remote: SocketAddr, relay: SocketAddr) -> GateEntry {
    GateEntry { remote, relay }
}

pub fn plus_one(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip(), addr.port() + 1)
}

pub fn hex(text: &str) -> Vec<u8> {
    let digits: String = text.split_whitespace().collect();
    (0..digits.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).unwrap())
        .collect()
}

/// An IPv4 `ATYP ADDR PORT`; returns the address and the bytes after it.
fn parse_addr_v4(bytes: &[u8]) -> (SocketAddr, &[u8]) {
    assert_eq!(bytes[0], 0x01, "ATYP");
    parse_addr(bytes)
}

/// `01 SIZE UDPCMD FLAGS RSVD TID AID LOCAL REMOTE`.
pub fn control(
    command: u8,
    flags: u16,
    tid: u16,
    aid: u32,
    local: SocketAddr,
    remote: SocketAddr,
) -> Vec<u8> {
    let mut body = vec![command];
    body.extend_from_slice(&flags.to_be_bytes());
    body.push(0);
    body.extend_from_slice(&tid.to_be_bytes());
    body.extend_from_slice(&aid.to_be_bytes());
    put_addr(&mut body, local);
    put_addr(&mut body, remote);
    let mut out = vec![0x01];
    out.extend_from_slice(&u16::try_from(body.len() + 3).unwrap().to_be_bytes());
    out.extend_from_slice(&body);
    out
}

#[derive(Debug)]
pub struct ControlReply {
    pub raw: Vec<u8>,
    pub code: u8,
    pub flags: u16,
    pub tid: u16,
    pub aid: u32,
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

/// Reads one packet from the control connection: `(PKT TYPE, whole packet)`.
pub async fn read_packet(stream: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut packet = read_exact(stream, 3).await;
    let size = usize::from(u16::from_be_bytes([packet[1], packet[2]]));
    packet.extend(read_exact(stream, size - 3).await);
    (packet[0], packet)
}

pub async fn read_control_reply(stream: &mut TcpStream) -> ControlReply {
    let (kind, raw) = read_packet(stream).await;
    assert_eq!(kind, 0x02, "a control reply: {raw:02X?}");
    let (local, rest) = parse_addr_v4(&raw[13..]);
    let (remote, rest) = parse_addr_v4(rest);
    assert!(rest.is_empty(), "SIZE ends where REMOTE ends");
    ControlReply {
        code: raw[3],
        flags: u16::from_be_bytes([raw[4], raw[5]]),
        tid: u16::from_be_bytes([raw[7], raw[8]]),
        aid: u32::from_be_bytes(raw[9..13].try_into().unwrap()),
        local,
        remote,
        raw,
    }
}

/// Sends a control packet and reads the reply.
pub async fn request(stream: &mut TcpStream, packet: &[u8]) -> ControlReply {
    send(stream, packet).await;
    read_control_reply(stream).await
}

/// `RSV FRAG DGID AID DATA` (an Open binding's datagram).
pub fn datagram(aid: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 0, 0];
    out.extend_from_slice(&aid.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// `03 SIZE AID DATA`.
pub fn tcp_datagram(aid: u32, data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x03];
    out.extend_from_slice(&u16::try_from(data.len() + 7).unwrap().to_be_bytes());
    out.extend_from_slice(&aid.to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// Step 1 for a client socket on 127.0.0.1; checks the reply's layout.
pub async fn step1(
    gateway: &Gateway,
    stream: &mut TcpStream,
    flags: u16,
    tid: u16,
    local: SocketAddr,
) -> ControlReply {
    let reply = request(stream, &control(BIND, flags, tid, 0, local, UNSPECIFIED)).await;
    assert_eq!(reply.code, 0x00, "step 1 refused: {reply:?}");
    assert_eq!(reply.raw[0..3], [0x02, 0x00, 0x1B]);
    assert_eq!(reply.flags, flags | REMOTE_PENDING);
    assert_eq!(reply.raw[6], 0x00, "RSVD");
    assert_eq!(reply.tid, tid);
    assert_ne!(reply.aid, 0);
    assert_eq!(reply.local.ip(), LOCALHOST);
    let (internal, external) = (gateway.internal_ports(), gateway.external_ports());
    assert!(internal.contains(reply.local.port()), "{reply:?}");
    assert_eq!(reply.remote.ip(), LOCALHOST);
    assert!(external.contains(reply.remote.port()), "{reply:?}");
    reply
}
