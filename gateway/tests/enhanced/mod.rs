//! The harness of `enhanced_mode.rs`: a gateway on loopback (`server::run` with a `MemoryGate`
//! and its own `EnhancedMode`), raw enhanced-mode bytes written from protocol.md sections 3 and 4
//! independently of the crate's codec, and UDP peers. Every wait is bounded.

use std::{
    future::Future,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU16, Ordering},
    },
    time::Duration,
};

use gateway::{
    binding::{Config, PortRange},
    gate::{GateEntry, MemoryGate},
    resolver::Resolver,
    server::{
        self, External, Services, Timeouts, auth::FailureLimiter, enhanced::EnhancedMode,
        policy::Policy,
    },
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::{mpsc, oneshot},
};
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
pub const SILENCE: Duration = Duration::from_millis(300);
pub const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// The remote host: another loopback address, so it is not the gateway's relay address.
pub const REMOTE_HOST: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
pub const UNSPECIFIED: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);

pub const BIND: u8 = 0x05;
pub const RELEASE: u8 = 0x06;
pub const SET_TTL: u8 = 0x07;
/// receive | send | unicast
pub const RSU: u16 = 0x0007;
pub const TCP_ENCAPSULATED: u16 = 0x0008;
pub const REMOTE_PENDING: u16 = 0x0080;
pub const RTP_PAIR: u16 = 0x0100;

pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(IO_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

// ---- the gateway ----------------------------------------------------------------------------

/// One block of relay ports per test (tests run in parallel in one process): 50 internal ports,
/// then 50 external ones, below the usual ephemeral range.
pub fn port_block() -> (PortRange, PortRange) {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let slot = NEXT.fetch_add(1, Ordering::Relaxed);
    assert!(slot < 20, "more tests than port blocks");
    let process = u16::try_from(std::process::id() % 10).unwrap();
    let base = 10_000 + process * 2_000 + slot * 100;
    (
        PortRange::new(base, base + 49),
        PortRange::new(base + 50, base + 99),
    )
}

/// A running gateway with the enhanced mode; stops when dropped.
pub struct Gateway {
    pub addr: SocketAddr,
    pub gate: MemoryGate,
    pub mode: Arc<EnhancedMode>,
    pub internal: PortRange,
    pub external: PortRange,
    _shutdown: oneshot::Sender<()>,
}

/// Anonymous access, external address 127.0.0.1 on any interface (no interface check), a
/// resolver without nameservers, and `enhanced` as the enhanced mode.
pub async fn services(gate: &MemoryGate, enhanced: Option<Arc<EnhancedMode>>) -> Services {
    Services {
        allow_anonymous: true,
        users: None,
        limiter: FailureLimiter::new(5, Duration::from_mins(1)),
        policy: Policy::default(),
        resolver: Arc::new(Resolver::bind(&[]).await.unwrap()),
        gate: Arc::new(gate.clone()),
        external: External {
            v4: Some(Ipv4Addr::LOCALHOST),
            v6: None,
            ifindex: None,
        },
        timeouts: Timeouts::default(),
        max_connections: 64,
        enhanced,
    }
}

/// Runs `services` on 127.0.0.1:0 until the returned sender is dropped.
pub async fn serve(services: Services) -> (SocketAddr, oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(server::run(Arc::new(services), listener, async move {
        let _ = rx.await;
    }));
    (addr, tx)
}

/// A gateway whose binding configuration is the test default changed by `tweak`: relay
/// addresses 127.0.0.1 (internal and external, disjoint port blocks), no forbidden remotes.
pub async fn start(tweak: impl FnOnce(&mut Config)) -> Gateway {
    let (internal, external) = port_block();
    let mut config = Config {
        internal_ips: vec![LOCALHOST],
        external_ips: vec![LOCALHOST],
        internal_ports: internal,
        external_ports: external,
        // Loopback remotes are the whole point of an in-process test.
        forbidden_remotes: Vec::new(),
        ..Config::default()
    };
    tweak(&mut config);
    let mode = Arc::new(EnhancedMode::new(config).unwrap());
    let gate = MemoryGate::default();
    let (addr, tx) = serve(services(&gate, Some(Arc::clone(&mode))).await).await;
    Gateway {
        addr,
        gate,
        mode,
        internal,
        external,
        _shutdown: tx,
    }
}

impl Gateway {
    /// Greets anonymously and sends CMD 04; returns the stream and the raw entry reply.
    pub async fn enter_raw(&self) -> (TcpStream, Vec<u8>) {
        let mut stream = within("connect", TcpStream::connect(self.addr))
            .await
            .unwrap();
        send(&mut stream, &[0x05, 0x01, 0x00]).await;
        assert_eq!(read_exact(&mut stream, 2).await, [0x05, 0x00]);
        send(&mut stream, &hex("05 04 00 01 00000000 0000")).await;
        let reply = read_exact(&mut stream, 10).await;
        (stream, reply)
    }

    pub async fn enter(&self) -> TcpStream {
        let (stream, reply) = self.enter_raw().await;
        assert_eq!(reply, hex("01 00 00 01 00000000 0000"));
        stream
    }

    pub async fn all_released(&self) {
        eventually("every binding, entry and relay is gone", || {
            self.gate.entries().is_empty()
                && self.mode.live_bindings() == 0
                && self.mode.ports_in_use() == (0, 0)
                && self.mode.running_relays() == 0
        })
        .await;
    }
}

/// The kernel entry admitting `remote` to the external relay address `relay`.
pub fn entry(remote: SocketAddr, relay: SocketAddr) -> GateEntry {
    GateEntry { remote, relay }
}

pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    within(what, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

// ---- raw bytes ------------------------------------------------------------------------------

pub fn hex(text: &str) -> Vec<u8> {
    let digits: String = text.split_whitespace().collect();
    (0..digits.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).unwrap())
        .collect()
}

pub fn put_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    let SocketAddr::V4(v4) = addr else {
        panic!("IPv4 only here");
    };
    out.push(0x01);
    out.extend_from_slice(&v4.ip().octets());
    out.extend_from_slice(&v4.port().to_be_bytes());
}

pub fn parse_addr(bytes: &[u8]) -> (SocketAddr, &[u8]) {
    assert_eq!(bytes[0], 0x01, "ATYP");
    let ip: [u8; 4] = bytes[1..5].try_into().unwrap();
    let port = u16::from_be_bytes([bytes[5], bytes[6]]);
    (SocketAddr::new(ip.into(), port), &bytes[7..])
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
    let (local, rest) = parse_addr(&raw[13..]);
    let (remote, rest) = parse_addr(rest);
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

pub async fn send(stream: &mut TcpStream, bytes: &[u8]) {
    within("write", stream.write_all(bytes)).await.unwrap();
}

pub async fn read_exact(stream: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    within("read", stream.read_exact(&mut buf)).await.unwrap();
    buf
}

pub async fn assert_closed(stream: &mut TcpStream) {
    let mut buf = [0u8; 64];
    match within("the server closes", stream.read(&mut buf)).await {
        Ok(0) => {}
        Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("connection still open: {other:?}"),
    }
}

// ---- UDP peers ------------------------------------------------------------------------------

pub async fn recv(socket: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 65_535];
    let (len, from) = within("receive a datagram", socket.recv_from(&mut buf))
        .await
        .unwrap();
    buf.truncate(len);
    (buf, from)
}

pub async fn assert_silent(socket: &UdpSocket, what: &str) {
    let mut buf = vec![0u8; 65_535];
    if let Ok(received) = tokio::time::timeout(SILENCE, socket.recv_from(&mut buf)).await {
        panic!("{what}: got {received:?}");
    }
}

/// A UDP echo server; reports every datagram with its source.
pub struct Echo {
    pub addr: SocketAddr,
    pub received: mpsc::UnboundedReceiver<(SocketAddr, Vec<u8>)>,
}

impl Echo {
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

    pub async fn next(&mut self) -> (SocketAddr, Vec<u8>) {
        within("the remote receives a datagram", self.received.recv())
            .await
            .unwrap()
    }

    pub async fn assert_silent(&mut self, what: &str) {
        if let Ok(received) = tokio::time::timeout(SILENCE, self.received.recv()).await {
            panic!("{what}: got {received:?}");
        }
    }
}

pub async fn udp(ip: IpAddr) -> UdpSocket {
    UdpSocket::bind(SocketAddr::new(ip, 0)).await.unwrap()
}

/// Two UDP sockets on `ip` with consecutive ports, the first even.
pub async fn udp_pair(ip: IpAddr) -> (UdpSocket, UdpSocket) {
    for _ in 0..100 {
        let first = udp(ip).await;
        let port = first.local_addr().unwrap().port();
        if port % 2 != 0 || port == u16::MAX {
            continue;
        }
        if let Ok(second) = UdpSocket::bind(SocketAddr::new(ip, port + 1)).await {
            return (first, second);
        }
    }
    panic!("no consecutive port pair");
}

pub fn plus_one(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip(), addr.port() + 1)
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
    assert!(gateway.internal.contains(reply.local.port()), "{reply:?}");
    assert_eq!(reply.remote.ip(), LOCALHOST);
    assert!(gateway.external.contains(reply.remote.port()), "{reply:?}");
    reply
}
