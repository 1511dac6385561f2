//! The harness of `client_library.rs`: a gateway on loopback (`server::run` with a `MemoryGate`,
//! optionally a users file, a nameserver and the enhanced mode), a binding helper and peers (TCP
//! and UDP echoes, an even/odd UDP pair, a fake nameserver). Every wait is bounded.

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
    client::{Client, EnhancedSession, Family, UdpBinding},
    gate::MemoryGate,
    resolver::Resolver,
    server::{
        self, External, Services, auth::FailureLimiter, auth::Users, enhanced::EnhancedMode,
        policy::Policy,
    },
};
use hickory_proto::{
    op::{Message, MessageType, OpCode, ResponseCode},
    rr::{RData, Record, RecordType, rdata},
};
use tokio::{
    net::{TcpListener, UdpSocket},
    sync::oneshot,
};

pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
pub const SILENCE: Duration = Duration::from_millis(300);
pub const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
pub const REMOTE_HOST: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(IO_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

// ---- the gateway ----------------------------------------------------------------------------

pub struct Gateway {
    pub addr: SocketAddr,
    pub gate: MemoryGate,
    pub mode: Option<Arc<EnhancedMode>>,
    _shutdown: oneshot::Sender<()>,
}

/// Relay ports per test, disjoint from `enhanced_mode.rs`'s blocks (10000..30000) and below the
/// ephemeral range.
pub fn port_block() -> (PortRange, PortRange) {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let slot = NEXT.fetch_add(1, Ordering::Relaxed);
    assert!(slot < 10, "more tests than port blocks");
    let process = u16::try_from(std::process::id() % 9).unwrap();
    let base = 30_000 + process * 300 + slot * 30;
    (
        PortRange::new(base, base + 13),
        PortRange::new(base + 14, base + 29),
    )
}

/// A gateway on 127.0.0.1:0: anonymous access unless `users` is given, loopback destinations
/// allowed, the enhanced mode with the test configuration changed by `tweak` if `enhanced`.
pub async fn start(
    users: Option<Users>,
    nameserver: Option<SocketAddr>,
    enhanced: Option<fn(&mut Config)>,
) -> Gateway {
    let mode = enhanced.map(|tweak| {
        let (internal_ports, external_ports) = port_block();
        let mut config = Config {
            internal_ips: vec![LOCALHOST],
            external_ips: vec![LOCALHOST],
            internal_ports,
            external_ports,
            forbidden_remotes: Vec::new(),
            ..Config::default()
        };
        tweak(&mut config);
        Arc::new(EnhancedMode::new(config).unwrap())
    });
    let gate = MemoryGate::default();
    let services = Services {
        allow_anonymous: users.is_none(),
        users,
        limiter: FailureLimiter::new(5, Duration::from_mins(1)),
        policy: Policy {
            allow_loopback: true,
            ..Policy::default()
        },
        resolver: Arc::new(
            within(
                "bind the resolver",
                Resolver::bind(&Vec::from_iter(nameserver)),
            )
            .await
            .unwrap(),
        ),
        gate: Arc::new(gate.clone()),
        external: External {
            v4: Some(Ipv4Addr::LOCALHOST),
            v6: None,
            ifindex: None,
        },
        timeouts: server::Timeouts::default(),
        max_connections: 64,
        enhanced: mode.clone(),
    };
    let listener = within("listen", TcpListener::bind("127.0.0.1:0"))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(server::run(Arc::new(services), listener, async move {
        let _ = rx.await;
    }));
    Gateway {
        addr,
        gate,
        mode,
        _shutdown: tx,
    }
}

pub async fn start_enhanced(tweak: fn(&mut Config)) -> Gateway {
    start(None, None, Some(tweak)).await
}

impl Gateway {
    pub async fn session(&self) -> EnhancedSession {
        within("enter the enhanced mode", self.client().await.enhanced())
            .await
            .unwrap()
    }

    pub async fn client(&self) -> Client {
        within("connect", Client::connect(self.addr, None))
            .await
            .unwrap()
    }

    pub fn mode(&self) -> &EnhancedMode {
        self.mode.as_deref().unwrap()
    }

    pub async fn all_released(&self) {
        within("every binding, entry and relay is gone", async {
            while !(self.gate.entries().is_empty()
                && self.mode().live_bindings() == 0
                && self.mode().ports_in_use() == (0, 0)
                && self.mode().running_relays() == 0)
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }
}

/// A new binding of `session`, like `socket(AF_INET, SOCK_DGRAM)`.
pub async fn new_socket(session: &EnhancedSession) -> UdpBinding {
    within("socket", session.udp_socket(Family::V4))
        .await
        .unwrap()
}

// ---- peers ----------------------------------------------------------------------------------

pub async fn tcp_echo() -> SocketAddr {
    let listener = within("listen", TcpListener::bind("127.0.0.1:0"))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    addr
}

pub async fn udp(ip: IpAddr) -> UdpSocket {
    within("bind a UDP socket", UdpSocket::bind(SocketAddr::new(ip, 0)))
        .await
        .unwrap()
}

pub async fn recv(socket: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 65_535];
    let (len, from) = within("receive a datagram", socket.recv_from(&mut buf))
        .await
        .unwrap();
    buf.truncate(len);
    (buf, from)
}

/// Sends `data` from `socket` to `to`.
pub async fn send_udp(socket: &UdpSocket, data: &[u8], to: SocketAddr) {
    within("send a datagram", socket.send_to(data, to))
        .await
        .unwrap();
}

pub async fn assert_silent(socket: &UdpSocket, what: &str) {
    let mut buf = [0u8; 2048];
    if let Ok(got) = tokio::time::timeout(SILENCE, socket.recv_from(&mut buf)).await {
        panic!("{what}: got {got:?}");
    }
}

/// Two sockets on `ip`, ports s (even) and s+1.
pub async fn udp_pair(ip: IpAddr) -> (UdpSocket, UdpSocket) {
    loop {
        let even = udp(ip).await;
        let port = even.local_addr().unwrap().port();
        if port % 2 == 0
            && let Ok(Ok(odd)) =
                tokio::time::timeout(IO_TIMEOUT, UdpSocket::bind(SocketAddr::new(ip, port + 1)))
                    .await
        {
            return (even, odd);
        }
    }
}

/// A nameserver on loopback answering `name` with `ip` (A) and nothing else.
pub async fn nameserver(name: &'static str, ip: Ipv4Addr) -> SocketAddr {
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
            if question.name().to_ascii() != format!("{name}.") {
                reply.metadata.response_code = ResponseCode::NXDomain;
            } else if question.query_type() == RecordType::A {
                let answer =
                    Record::from_rdata(question.name().clone(), 60, RData::A(rdata::A(ip)));
                reply.add_answer(answer);
            }
            let _ = socket.send_to(&reply.to_vec().unwrap(), from).await;
        }
    });
    addr
}
