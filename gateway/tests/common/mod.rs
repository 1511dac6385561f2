//! Helpers for the in-process SOCKS5 server tests: a gateway on loopback (`server::run` with a
//! `MemoryGate`), raw SOCKS byte builders and parsers written independently of the crate's codec,
//! and peers (TCP and UDP echo servers, a fake nameserver). Every wait is bounded.

use std::{
    future::Future,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use gateway::{
    gate::MemoryGate,
    resolver::Resolver,
    server::{
        self, External, Services, Timeouts,
        auth::{FailureLimiter, Users, hash_line},
        policy::Policy,
    },
};
use hickory_proto::{
    op::{Message, MessageType, OpCode, ResponseCode},
    rr::{RData, Record, RecordType, rdata},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpSocket, TcpStream, UdpSocket},
    sync::{mpsc, oneshot},
    task::JoinHandle,
};

/// The bound on every read, write and wait in real time.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// `f`, or a panic naming `what` if it takes longer than [`IO_TIMEOUT`].
pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(IO_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// Services for a test gateway on loopback: anonymous access, loopback destinations allowed,
/// external address 127.0.0.1 / `::1` on any interface, a resolver without nameservers, default
/// timeouts, a limiter of 5 failures per 60 s. Tests adjust the fields before starting.
pub async fn loopback_services() -> (Services, MemoryGate) {
    let gate = MemoryGate::default();
    let services = Services {
        allow_anonymous: true,
        users: None,
        limiter: FailureLimiter::new(5, Duration::from_mins(1)),
        policy: Policy {
            allow_loopback: true,
            ..Policy::default()
        },
        resolver: Arc::new(Resolver::bind(&[]).await.unwrap()),
        gate: Arc::new(gate.clone()),
        external: External {
            v4: Some(Ipv4Addr::LOCALHOST),
            v6: Some(Ipv6Addr::LOCALHOST),
            ifindex: None,
        },
        timeouts: Timeouts::default(),
        max_connections: 64,
        enhanced: None,
    };
    (services, gate)
}

/// A users file with one user.
pub fn users(name: &str, password: &str) -> Users {
    Users::parse(&hash_line(name, password.as_bytes()).unwrap()).unwrap()
}

/// A running `server::run` on 127.0.0.1:0.
pub struct Gateway {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Gateway {
    pub async fn start(services: Services) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(Arc::new(services), listener, async move {
            let _ = rx.await;
        }));
        Self {
            addr,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub async fn connect(&self) -> TcpStream {
        within("connect to the gateway", TcpStream::connect(self.addr))
            .await
            .unwrap()
    }

    /// Connects from a given loopback address (127.0.0.2 is a different client host).
    pub async fn connect_from(&self, ip: IpAddr) -> TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(ip, 0)).unwrap();
        within("connect to the gateway", socket.connect(self.addr))
            .await
            .unwrap()
    }

    /// Completes the shutdown future; returns `run`'s task so the caller can await it.
    pub fn begin_shutdown(&mut self) -> JoinHandle<()> {
        let _ = self.shutdown.take().unwrap().send(());
        self.task.take().unwrap()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

// ---- raw SOCKS bytes ----------------------------------------------------------------------

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

fn parse_addr(bytes: &[u8]) -> (SocketAddr, &[u8]) {
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

pub async fn send(stream: &mut TcpStream, bytes: &[u8]) {
    within("write", stream.write_all(bytes)).await.unwrap();
}

pub async fn read_exact(stream: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    within("read", stream.read_exact(&mut buf)).await.unwrap();
    buf
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

/// Reads until the server closes the connection (EOF or reset) and returns what came before.
/// Panics if the connection is still open after `limit`.
pub async fn read_until_closed_within(stream: &mut TcpStream, limit: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .expect("the server did not close the connection")
        {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(error) if error.kind() == io::ErrorKind::ConnectionReset => return got,
            Err(error) => panic!("read: {error}"),
        }
    }
}

pub async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    read_until_closed_within(stream, IO_TIMEOUT).await
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

/// Polls `condition` until it holds, for at most [`IO_TIMEOUT`].
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    within(what, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

// ---- peers --------------------------------------------------------------------------------

/// A TCP echo server; each accepted peer address is reported, each connection echoes until EOF
/// and then half-closes.
pub struct TcpEcho {
    pub addr: SocketAddr,
    pub peers: mpsc::UnboundedReceiver<SocketAddr>,
}

pub async fn tcp_echo(ip: IpAddr) -> TcpEcho {
    let listener = TcpListener::bind(SocketAddr::new(ip, 0)).await.unwrap();
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
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
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

pub async fn udp_echo(ip: IpAddr) -> UdpEcho {
    let socket = UdpSocket::bind(SocketAddr::new(ip, 0)).await.unwrap();
    let addr = socket.local_addr().unwrap();
    let (tx, received) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_535];
        loop {
            let (len, from) = socket.recv_from(&mut buf).await.unwrap();
            let _ = tx.send((from, buf[..len].to_vec()));
            let _ = socket.send_to(&buf[..len], from).await;
        }
    });
    UdpEcho { addr, received }
}

impl UdpEcho {
    pub async fn next(&mut self) -> (SocketAddr, Vec<u8>) {
        within("the echo server receives a datagram", self.received.recv())
            .await
            .unwrap()
    }
}

pub async fn recv_udp(socket: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 65_535];
    let (len, from) = within("receive a datagram", socket.recv_from(&mut buf))
        .await
        .unwrap();
    buf.truncate(len);
    (buf, from)
}

/// A nameserver on loopback: A records for the names in `records`, NXDOMAIN for other names,
/// an empty answer for other record types of known names.
pub async fn fake_nameserver(records: Vec<(&'static str, Ipv4Addr)>) -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
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
