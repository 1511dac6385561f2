//! A gateway on loopback: `server::run` on 127.0.0.1:0 with a `MemoryGate`, the `Services` a test
//! asks for, and optionally the enhanced mode with relay ports from the test binary's own range.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU16, Ordering},
    },
    time::Duration,
};

use gateway::{
    binding::{Config, PortRange},
    gate::MemoryGate,
    resolver::Resolver,
    server::{
        self, External, Services, Timeouts,
        access::{Access, LiveAccess},
        auth::{FailureLimiter, Users, hash_line},
        enhanced::{EnhancedMode, Interfaces, RelaySockets},
        limits::{AuthLimit, ConnectionLimits},
        policy::Policy,
    },
};
use gateway_client::{Client, EnhancedSession, Family, UdpBinding};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::oneshot,
    task::JoinHandle,
};

use super::{
    io::{eventually, within},
    peers::LOCALHOST,
};

// ---- services -------------------------------------------------------------------------------

/// Services for a test gateway on loopback holding `gate`: anonymous access, loopback
/// destinations allowed, external address 127.0.0.1 / `::1` on any interface (no interface
/// check), control connections from loopback only, a resolver without nameservers, default
/// timeouts, 64 connections, a limiter of 5 failures per 60 s, no enhanced mode.
pub fn loopback_services(gate: &MemoryGate) -> Services {
    Services {
        access: LiveAccess::new(Access {
            allow_anonymous: true,
            users: None,
            policy: Policy {
                allow_loopback: true,
                ..Policy::default()
            },
            clients: vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()],
            direct_networks: vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()],
        }),
        limiter: FailureLimiter::new(5, Duration::from_mins(1)),
        resolver: resolver(&[]),
        gate: Arc::new(gate.clone()),
        external: External {
            v4: Some(Ipv4Addr::LOCALHOST),
            v6: Some(Ipv6Addr::LOCALHOST),
            ifindex: None,
            device: None,
        },
        internal_device: None,
        timeouts: Timeouts::default(),
        connections: ConnectionLimits::new(64, 64),
        auth: AuthLimit::per_core(2),
        association_limits: gateway::server::AssociationLimits::default(),
        enhanced: None,
        counters: gateway::counters::Counters::default(),
        quiesce: gateway::server::handover::Quiesce::default(),
        upgrades: None,
    }
}

/// A resolver asking `nameservers` (a [`super::peers::fake_nameserver`]).
pub fn resolver(nameservers: &[SocketAddr]) -> Arc<Resolver> {
    Arc::new(Resolver::without_gate(nameservers).unwrap())
}

/// A users file with one user.
pub fn users(name: &str, password: &str) -> Users {
    Users::parse(&hash_line(name, password.as_bytes()).unwrap()).unwrap()
}

// ---- relay ports of the enhanced mode -------------------------------------------------------

/// The relay ports one test binary gives its enhanced-mode gateways: a block per gateway (the
/// tests of a binary run in parallel in one process), an area per process (`pid % processes`),
/// every area below the usual ephemeral range (32768 and up). Each binary has its own plan below
/// so that binaries run at the same time never meet; `next_block` counts in a static, which is
/// one per binary because each binary compiles this module, so a binary uses one plan only.
pub struct RelayPorts {
    /// The first port of the plan.
    pub base: u16,
    /// Processes that may run the binary at once without meeting.
    pub processes: u16,
    /// Blocks per process: at least the number of gateways the binary starts.
    pub blocks: u16,
    /// Ports per block.
    pub block: u16,
    /// Of a block, how many come first as internal relay ports; the rest are external.
    pub internal: u16,
}

/// `rtsp_loopback.rs`: 5000..9800.
pub const RTSP_LOOPBACK_PORTS: RelayPorts = RelayPorts {
    base: 5_000,
    processes: 8,
    blocks: 10,
    block: 60,
    internal: 30,
};
/// `enhanced_mode.rs`: 10000..30000.
pub const ENHANCED_MODE_PORTS: RelayPorts = RelayPorts {
    base: 10_000,
    processes: 10,
    blocks: 20,
    block: 100,
    internal: 50,
};
/// `client_library.rs`: 30000..32520.
pub const CLIENT_LIBRARY_PORTS: RelayPorts = RelayPorts {
    base: 30_000,
    processes: 7,
    blocks: 12,
    block: 30,
    internal: 14,
};

/// `blocking_client.rs`: 2000..2960.
pub const BLOCKING_CLIENT_PORTS: RelayPorts = RelayPorts {
    base: 2_000,
    processes: 8,
    blocks: 4,
    block: 30,
    internal: 14,
};

impl RelayPorts {
    /// The next block: `(internal, external)`.
    pub fn next_block(&self) -> (PortRange, PortRange) {
        static NEXT: AtomicU16 = AtomicU16::new(0);
        let slot = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(slot < self.blocks, "more tests than port blocks");
        let process = u16::try_from(std::process::id() % u32::from(self.processes)).unwrap();
        let base = self.base + (process * self.blocks + slot) * self.block;
        (
            PortRange::new(base, base + self.internal - 1),
            PortRange::new(base + self.internal, base + self.block - 1),
        )
    }
}

/// The test binding configuration: relay addresses 127.0.0.1 (internal and external, on the
/// disjoint `ports`), no forbidden remotes.
pub fn binding_config((internal_ports, external_ports): (PortRange, PortRange)) -> Config {
    Config {
        internal_ips: vec![LOCALHOST],
        external_ips: vec![LOCALHOST],
        internal_ports,
        external_ports,
        // Loopback remotes are the whole point of an in-process test.
        forbidden_remotes: Vec::new(),
        ..Config::default()
    }
}

// ---- the gateway ----------------------------------------------------------------------------

/// A running `server::run` on 127.0.0.1:0; stops when dropped.
pub struct Gateway {
    pub addr: SocketAddr,
    pub gate: MemoryGate,
    /// What the server runs with (its counters, its limits).
    pub services: Arc<Services>,
    mode: Option<Arc<EnhancedMode>>,
    /// The `(internal, external)` block the enhanced mode was given, before any tweak.
    relay_ports: Option<(PortRange, PortRange)>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Gateway {
    /// A gateway serving [`loopback_services`] changed by `adjust`.
    pub async fn start(adjust: impl FnOnce(&mut Services)) -> Self {
        Self::launch(None, adjust).await
    }

    /// A gateway with the enhanced mode: [`binding_config`] on the next block of `ports`,
    /// changed by `tweak`; then [`loopback_services`] with that mode, changed by `adjust`.
    pub async fn start_enhanced(
        ports: &RelayPorts,
        tweak: impl FnOnce(&mut Config),
        adjust: impl FnOnce(&mut Services),
    ) -> Self {
        let block = ports.next_block();
        let mut config = binding_config(block);
        tweak(&mut config);
        // The relay's shared sockets, steered to by an sk_lookup program in this (the test's)
        // network namespace: it goes when the mode is dropped.
        let sockets = RelaySockets::open(&config, &Interfaces::default()).unwrap();
        let mode = Arc::new(EnhancedMode::new(config, sockets).unwrap());
        Self::launch(Some((mode, block)), adjust).await
    }

    async fn launch(
        enhanced: Option<(Arc<EnhancedMode>, (PortRange, PortRange))>,
        adjust: impl FnOnce(&mut Services),
    ) -> Self {
        let (mode, relay_ports) = enhanced.unzip();
        let gate = MemoryGate::default();
        let mut services = loopback_services(&gate);
        services.enhanced.clone_from(&mode);
        adjust(&mut services);
        let listener = within("listen", TcpListener::bind("127.0.0.1:0"))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let services = Arc::new(services);
        let task = tokio::spawn(server::run(Arc::clone(&services), listener, async move {
            let _ = rx.await;
        }));
        Self {
            addr,
            gate,
            services,
            mode,
            relay_ports,
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

    /// The enhanced mode; panics if the gateway has none.
    pub fn mode(&self) -> &EnhancedMode {
        self.mode
            .as_deref()
            .expect("a gateway with the enhanced mode")
    }

    /// The enhanced mode, shared, for a task that outlives the borrow of the gateway; panics if
    /// the gateway has none.
    pub fn shared_mode(&self) -> Arc<EnhancedMode> {
        Arc::clone(
            self.mode
                .as_ref()
                .expect("a gateway with the enhanced mode"),
        )
    }

    /// The internal relay ports the enhanced mode was given (before the test's tweak).
    pub fn internal_ports(&self) -> PortRange {
        self.relay_ports
            .expect("a gateway with the enhanced mode")
            .0
    }

    /// The external relay ports the enhanced mode was given (before the test's tweak).
    pub fn external_ports(&self) -> PortRange {
        self.relay_ports
            .expect("a gateway with the enhanced mode")
            .1
    }

    /// Waits until no kernel entry, binding, relay port or relay is left.
    pub async fn all_released(&self) {
        eventually("every binding, entry and relay is gone", || {
            self.gate.entries().is_empty()
                && self.mode().live_bindings() == 0
                && self.mode().ports_in_use() == (0, 0)
                && self.mode().running_relays() == 0
        })
        .await;
    }

    /// A `gateway_client` client, anonymous.
    pub async fn client(&self) -> Client {
        within("connect", Client::connect(self.addr, None))
            .await
            .unwrap()
    }

    /// A `gateway_client` enhanced-mode session, anonymous.
    pub async fn session(&self) -> EnhancedSession {
        within("enter the enhanced mode", self.client().await.enhanced())
            .await
            .unwrap()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// A new binding of `session`, like `socket(AF_INET, SOCK_DGRAM)`.
pub async fn new_socket(session: &EnhancedSession) -> UdpBinding {
    within("socket", session.udp_socket(Family::V4))
        .await
        .unwrap()
}
