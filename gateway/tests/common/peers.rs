//! The hosts and peers around the gateway: loopback addresses, UDP sockets, TCP and UDP echo
//! servers, a TCP server that answers after EOF, and a fake nameserver.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use hickory_proto::{
    op::{Message, MessageType, OpCode, ResponseCode},
    rr::{RData, Record, RecordType, rdata},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, UdpSocket},
    sync::mpsc,
};

use super::io::{SILENCE, within};

/// The gateway's address, its relays' and the client's.
pub const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// Another loopback address: a remote host, so it is not the gateway's relay address.
pub const REMOTE_HOST: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// A UDP socket on `ip`, any port.
pub async fn udp(ip: IpAddr) -> UdpSocket {
    within("bind a UDP socket", UdpSocket::bind(SocketAddr::new(ip, 0)))
        .await
        .unwrap()
}

/// Two UDP sockets on `ip` with consecutive ports, the first even.
pub async fn udp_pair(ip: IpAddr) -> (UdpSocket, UdpSocket) {
    for _ in 0..100 {
        let first = udp(ip).await;
        let port = first.local_addr().unwrap().port();
        if port % 2 != 0 || port == u16::MAX {
            continue;
        }
        let next = SocketAddr::new(ip, port + 1);
        if let Ok(second) = within("bind a UDP socket", UdpSocket::bind(next)).await {
            return (first, second);
        }
    }
    panic!("no consecutive port pair");
}

/// A TCP echo server; each accepted peer address is reported, each connection echoes until EOF
/// and then half-closes.
pub struct TcpEcho {
    pub addr: SocketAddr,
    pub peers: mpsc::UnboundedReceiver<SocketAddr>,
}

pub async fn tcp_echo(ip: IpAddr) -> TcpEcho {
    let listener = within("listen", TcpListener::bind(SocketAddr::new(ip, 0)))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, peers) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (mut stream, peer) = listener.accept().await.unwrap();
            let _ = tx.send(peer);
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
                let _ = write.shutdown().await;
            });
        }
    });
    TcpEcho { addr, peers }
}

/// A TCP server that reads until EOF and only then answers `got N` and closes: it sees the
/// client's half-close and answers on the still-open other direction.
pub async fn tcp_counter() -> SocketAddr {
    let listener = within("listen", TcpListener::bind(SocketAddr::new(LOCALHOST, 0)))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut all = Vec::new();
                if stream.read_to_end(&mut all).await.is_ok() {
                    let _ = stream
                        .write_all(format!("got {}", all.len()).as_bytes())
                        .await;
                    let _ = stream.shutdown().await;
                }
            });
        }
    });
    addr
}

/// A UDP echo server; reports every datagram with its source.
pub struct UdpEcho {
    pub addr: SocketAddr,
    pub received: mpsc::UnboundedReceiver<(SocketAddr, Vec<u8>)>,
}

/// A UDP echo server on `ip`, any port.
pub async fn udp_echo(ip: IpAddr) -> UdpEcho {
    UdpEcho::start(udp(ip).await)
}

impl UdpEcho {
    /// Echoes on `socket` (for a socket of a [`udp_pair`]).
    pub fn start(socket: UdpSocket) -> Self {
        let addr = socket.local_addr().unwrap();
        let (tx, received) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_535];
            while let Ok((len, from)) = socket.recv_from(&mut buf).await {
                let _ = tx.send((from, buf[..len].to_vec()));
                let _ = socket.send_to(&buf[..len], from).await;
            }
        });
        Self { addr, received }
    }

    /// The next datagram the echo received, with its source.
    pub async fn next(&mut self) -> (SocketAddr, Vec<u8>) {
        within("the echo server receives a datagram", self.received.recv())
            .await
            .unwrap()
    }

    /// Nothing reaches the echo for [`SILENCE`].
    pub async fn assert_silent(&mut self, what: &str) {
        if let Ok(received) = tokio::time::timeout(SILENCE, self.received.recv()).await {
            panic!("{what}: got {received:?}");
        }
    }
}

/// A nameserver on loopback: A records for the names in `records`, NXDOMAIN for other names,
/// an empty answer for other record types of known names.
pub async fn fake_nameserver(records: Vec<(&'static str, Ipv4Addr)>) -> SocketAddr {
    let socket = udp(LOCALHOST).await;
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 1500];
        loop {
            let (len, from) = socket.recv_from(&mut buf).await.unwrap();
            let Ok(query) = Message::from_vec(&buf[..len]) else {
                continue;
            };
            let question = query.queries[0].clone();
            let mut reply = Message::new(query.metadata.id, MessageType::Response, OpCode::Query);
            reply.add_query(question.clone());
            let name = question.name().to_ascii();
            match records
                .iter()
                .find(|(known, _)| format!("{known}.") == name)
            {
                Some((_, ip)) if question.query_type() == RecordType::A => {
                    reply.add_answer(Record::from_rdata(
                        question.name().clone(),
                        60,
                        RData::A(rdata::A(*ip)),
                    ));
                }
                Some(_) => {}
                None => reply.metadata.response_code = ResponseCode::NXDomain,
            }
            let _ = socket.send_to(&reply.to_vec().unwrap(), from).await;
        }
    });
    addr
}
