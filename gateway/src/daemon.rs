//! `gateway run`: everything a daemon does between start and stop, in order. Owns the order of
//! start-up (nothing is served before the gate is attached) and of shutdown (connections end,
//! their kernel entries go, then the gate is detached).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use gateway::{
    binding,
    datapath::{Datapath, DatapathConfig, HostFlow, interface_index},
    gate::Gate,
    instance::Instance,
    netif::{self, InterfaceAddress},
    resolver::{Resolver, nameservers_from_resolv_conf},
    server::{
        self, External, Services, Timeouts,
        auth::{FailureLimiter, Users},
        enhanced::EnhancedMode,
        policy::Policy,
    },
};
use ipnet::IpNet;
use tokio::{net::TcpListener, sync::watch};
use tracing::{info, warn};

/// Who relays the datagrams of confirmed bindings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DatapathKind {
    /// The kernel: tc programs rewrite and redirect (the XDP gate admits).
    Xdp,
    /// The userspace relay (the XDP gate still admits and drops).
    Userspace,
}

impl DatapathKind {
    pub const fn describe(self) -> &'static str {
        match self {
            Self::Xdp => "the kernel (tc programs)",
            Self::Userspace => "the userspace relay",
        }
    }
}

/// SOCKS port when `--listen` is not given.
pub const DEFAULT_SOCKS_PORT: u16 = 1080;

/// What `gateway run` was asked to do (validated by clap and here).
#[derive(Debug)]
pub struct DaemonArgs {
    pub external: String,
    pub internal: String,
    pub instance: String,
    pub max_bindings: u32,
    pub host_allow: Vec<HostFlow>,
    pub listen: Vec<SocketAddr>,
    pub users: Option<PathBuf>,
    pub allow_anonymous: bool,
    pub resolvers: Vec<SocketAddr>,
    pub deny: Vec<IpNet>,
    pub max_connections: usize,
    pub datapath: DatapathKind,
    pub xdp_mode: gateway::datapath::XdpAttachMode,
    pub allow_listen: bool,
}

pub fn run(args: DaemonArgs) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("`gateway run` needs root (it loads and attaches eBPF programs)");
    }
    let instance = Instance::new(&args.instance)?;
    let external_ifindex = interface_index(&args.external).context("--external")?;
    interface_index(&args.internal).context("--internal")?;
    if args.external == args.internal {
        bail!(
            "--external and --internal must be different interfaces (both are {})",
            args.external
        );
    }
    let users = args
        .users
        .as_deref()
        .map(Users::load)
        .transpose()
        .context("--users")?;
    if users.is_none() && !args.allow_anonymous {
        bail!(
            "no way to authenticate: give --users FILE (see `gateway passwd`) or --allow-anonymous"
        );
    }
    let lock = instance.lock()?;
    raise_open_file_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    let result = runtime.block_on(serve(args, instance, external_ifindex, users));
    lock.release();
    result
}

#[expect(
    clippy::too_many_lines,
    reason = "start-up, serving and shutdown in order, read top to bottom"
)]
async fn serve(
    args: DaemonArgs,
    instance: Instance,
    external_ifindex: u32,
    users: Option<Users>,
) -> Result<()> {
    let external_addrs = netif::addresses(&args.external).context("read --external addresses")?;
    let internal_addrs = netif::addresses(&args.internal).context("read --internal addresses")?;
    let (external_v4, external_v6) = netif::primary(&external_addrs);
    if external_v4.is_none() && external_v6.is_none() {
        bail!("--external {} has no IP address", args.external);
    }

    let resolvers = if args.resolvers.is_empty() {
        let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        nameservers_from_resolv_conf(&text)
    } else {
        args.resolvers.clone()
    };
    let resolver = Arc::new(
        Resolver::bind(&resolvers)
            .await
            .context("bind the resolver sockets")?,
    );
    if resolvers.is_empty() {
        warn!("no nameserver configured (--resolver, /etc/resolv.conf): domain names will fail");
    }

    let mut config = DatapathConfig::new(
        instance.clone(),
        args.external.clone(),
        args.internal.clone(),
    );
    config.max_bindings = args.max_bindings;
    config.host_allow = args.host_allow.clone();
    config.host_allow.extend(resolver.host_flows());
    config.external_addresses = external_addrs.iter().map(|a| a.ip).collect();
    config.xdp_mode = args.xdp_mode;
    let mut datapath = Datapath::attach(&config)
        .with_context(|| format!("attach the gateway to {}", args.external))?;
    let gate = datapath.take_gate()?;
    let gate: Arc<dyn Gate> = match args.datapath {
        DatapathKind::Xdp => Arc::new(gate),
        DatapathKind::Userspace => Arc::new(gate.userspace_only()),
    };
    info!(datapath = ?args.datapath, "confirmed bindings are relayed by {}", args.datapath.describe());

    let mut policy = Policy {
        own_addresses: external_addrs
            .iter()
            .chain(&internal_addrs)
            .map(|a| a.ip)
            .collect(),
        deny: args.deny.clone(),
        allow_loopback: false,
    };
    // Clients may not reach the protected networks through the proxy.
    policy.deny.extend(internal_addrs.iter().map(|a| a.network));
    let enhanced = enhanced_mode(&args, &external_addrs, &internal_addrs, &policy)?;
    let services = Arc::new(Services {
        allow_anonymous: args.allow_anonymous,
        users,
        limiter: FailureLimiter::new(5, Duration::from_mins(1)),
        policy,
        resolver,
        gate,
        external: External {
            v4: external_v4,
            v6: external_v6,
            ifindex: Some(external_ifindex),
        },
        timeouts: Timeouts::default(),
        max_connections: args.max_connections,
        enhanced,
    });

    let control_path = gateway::control::socket_path(&instance);
    let control = tokio::spawn(gateway::control::serve(
        control_path.clone(),
        Arc::clone(&services),
    ));

    let listen = if args.listen.is_empty() {
        internal_addrs
            .iter()
            .filter(|a| !matches!(a.ip, std::net::IpAddr::V6(v6) if v6.is_unicast_link_local()))
            .map(|a| SocketAddr::new(a.ip, DEFAULT_SOCKS_PORT))
            .collect()
    } else {
        args.listen.clone()
    };
    if listen.is_empty() {
        datapath.detach();
        bail!(
            "nothing to listen on: --internal {} has no address and no --listen was given",
            args.internal
        );
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut servers = Vec::new();
    for addr in &listen {
        let listener = match TcpListener::bind(addr).await {
            Ok(listener) => listener,
            Err(error) => {
                datapath.detach();
                return Err(error).with_context(|| format!("listen on {addr}"));
            }
        };
        info!(%addr, "SOCKS5 listening");
        let mut stop = stop_rx.clone();
        servers.push(tokio::spawn(server::run(
            Arc::clone(&services),
            listener,
            async move {
                let _ = stop.wait_for(|stop| *stop).await;
            },
        )));
    }
    info!(
        instance = instance.name(),
        external = %args.external,
        internal = %args.internal,
        pid = std::process::id(),
        "gateway running"
    );

    let signal = wait_for_shutdown_signal().await?;
    info!(signal, "shutting down");
    let _ = stop_tx.send(true);
    for server in servers {
        let _ = server.await;
    }
    control.abort();
    let _ = std::fs::remove_file(&control_path);
    drop(services);
    datapath.detach();
    Ok(())
}

/// The enhanced UDP mode's binding table: relay addresses are the primary address of each family
/// on the internal (client side) and external (remote side) interfaces, and a REMOTE may not name
/// what the SOCKS policy denies (its networks, the gateway's own addresses, link-local, besides
/// the machine's defaults). `None` (CMD 04 refused) when an interface has no usable address.
fn enhanced_mode(
    args: &DaemonArgs,
    external: &[InterfaceAddress],
    internal: &[InterfaceAddress],
    policy: &Policy,
) -> Result<Option<Arc<EnhancedMode>>> {
    let primaries = |addrs: &[InterfaceAddress]| -> Vec<IpAddr> {
        let (v4, v6) = netif::primary(addrs);
        v4.map(IpAddr::V4)
            .into_iter()
            .chain(v6.map(IpAddr::V6))
            .collect()
    };
    let mut config = binding::Config {
        internal_ips: primaries(internal),
        // Every usable external address: one address has fewer than 64 k ports, and a client's
        // relays and CONNECTs share the one chosen for it.
        external_ips: external
            .iter()
            .map(|a| a.ip)
            .filter(|ip| match ip {
                IpAddr::V4(v4) => !v4.is_link_local(),
                IpAddr::V6(v6) => !v6.is_unicast_link_local(),
            })
            .collect(),
        allow_listen: args.allow_listen,
        // A confirmed RTP pair takes two kernel entries; UDP ASSOCIATE shares the map.
        max_bindings: usize::try_from(args.max_bindings / 2).unwrap_or(usize::MAX),
        ..binding::Config::default()
    };
    if config.internal_ips.is_empty() || config.external_ips.is_empty() {
        warn!("an interface has no usable address: the enhanced UDP mode (CMD 04) is off");
        return Ok(None);
    }
    let deny = policy
        .deny
        .iter()
        .filter_map(|net| binding::IpNet::new(net.addr(), net.prefix_len()));
    let own = policy
        .own_addresses
        .iter()
        .map(|ip| binding::IpNet::host(*ip));
    let link_local = [
        binding::IpNet::new(IpAddr::V4(Ipv4Addr::new(169, 254, 0, 0)), 16),
        binding::IpNet::new(IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0)), 10),
    ];
    config.forbidden_remotes.extend(deny.chain(own));
    config
        .forbidden_remotes
        .extend(link_local.into_iter().flatten());
    let mode = EnhancedMode::new(config).context("configure the enhanced UDP mode")?;
    Ok(Some(Arc::new(mode)))
}

async fn wait_for_shutdown_signal() -> Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("install the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("install the SIGINT handler")?;
    Ok(tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    })
}

/// Every relay socket is a file descriptor: take the hard limit, and say what it allows.
fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_err() {
                warn!(soft, hard, "could not raise the open-file limit");
            }
            let limit = getrlimit(Resource::RLIMIT_NOFILE).map_or(soft, |(soft, _)| soft);
            info!(
                open_files = limit,
                "open-file limit (each UDP binding holds 2 sockets, an RTP pair 4)"
            );
        }
        Err(error) => warn!(%error, "read the open-file limit"),
    }
}
