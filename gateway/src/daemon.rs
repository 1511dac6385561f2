//! `gateway run`: everything a daemon does between start and stop, in order. Owns the order of
//! start-up (signal handlers first; nothing is served before the gate is attached) and of
//! shutdown (the gate is emptied at once, connections end, the gate stays attached and dropping).
//! No path out of here opens the firewall: only `--remove-gate-on-exit` after a clean stop, or
//! `gateway detach`, removes the gate.

mod access;
mod readiness;
mod signals;

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use gateway::{
    binding,
    datapath::{Datapath, DatapathConfig, interface_index},
    gate::Gate,
    instance::Instance,
    netif::{self, InterfaceAddress, tie_to_device},
    resolver::{Resolver, nameservers_from_resolv_conf},
    server::{
        self, External, Services,
        access::LiveAccess,
        auth::FailureLimiter,
        enhanced::{EnhancedMode, Interfaces, MulticastSetup, RelaySockets},
        limits::{AuthLimit, ConnectionLimits},
        policy::Policy,
    },
    settings::{DatapathKind, Settings},
};
use tokio::{
    net::{TcpListener, TcpSocket},
    sync::watch,
};
use tracing::{info, warn};

pub use self::access::AccessSource;
use self::signals::{Event, Signals};

/// SOCKS port when `--listen` is not given.
pub const DEFAULT_SOCKS_PORT: u16 = 1080;

/// What `gateway run` was asked to do: the effective settings (checked), and where the
/// reloadable ones come from again on SIGHUP.
#[derive(Debug)]
pub struct DaemonArgs {
    pub settings: Settings,
    pub access: AccessSource,
}

pub fn run(args: DaemonArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    runtime.block_on(async move {
        // Before anything is attached or bound: a signal from here on is handled, never the
        // default action.
        let mut signals = Signals::install()?;
        info!(pid = std::process::id(), "gateway starting");
        start_and_serve(args, &mut signals).await
    })
}

async fn start_and_serve(args: DaemonArgs, signals: &mut Signals) -> Result<()> {
    let s = &args.settings;
    if !nix::unistd::geteuid().is_root() {
        bail!("`gateway run` needs root (it loads and attaches eBPF programs)");
    }
    let instance = Instance::new(&s.instance)?;
    let external_ifindex = interface_index(&s.external).context("--external")?;
    interface_index(&s.internal).context("--internal")?;
    if s.external == s.internal {
        bail!(
            "--external and --internal must be different interfaces (both are {})",
            s.external
        );
    }
    let access = args.access.load()?;
    let lock = instance.lock()?;
    raise_open_file_limit();
    let result = serve(args, &instance, external_ifindex, access, signals).await;
    lock.release();
    result
}

/// The control listeners: `--listen`, or every address of the internal interface on port 1080.
/// None may be an address of the external interface.
fn listen_addresses(
    args: &DaemonArgs,
    internal: &[InterfaceAddress],
    external: &[InterfaceAddress],
) -> Result<Vec<SocketAddr>> {
    let s = &args.settings;
    let listen: Vec<SocketAddr> = if s.listen.is_empty() {
        internal
            .iter()
            .filter(|a| !matches!(a.ip, IpAddr::V6(v6) if v6.is_unicast_link_local()))
            .map(|a| SocketAddr::new(a.ip, DEFAULT_SOCKS_PORT))
            .collect()
    } else {
        s.listen.clone()
    };
    if listen.is_empty() {
        bail!(
            "nothing to listen on: --internal {} has no address and no --listen was given",
            s.internal
        );
    }
    for addr in &listen {
        let ip = addr.ip().to_canonical();
        if external.iter().any(|a| a.ip == ip) {
            bail!(
                "--listen {addr} is an address of the external interface {}: the control port \
                 answers only from inside; listen on an address of --internal {}",
                s.external,
                s.internal
            );
        }
        if !ip.is_unspecified() && !internal.iter().any(|a| a.ip == ip) {
            bail!(
                "--listen {addr} is not an address of --internal {}: listeners are tied to that \
                 interface, so it would never accept a client",
                s.internal
            );
        }
    }
    Ok(listen)
}

/// `--metrics`, checked against the interfaces: loopback or an internal address only.
fn metrics_address(
    s: &Settings,
    internal: &[InterfaceAddress],
    external: &[InterfaceAddress],
) -> Result<Option<SocketAddr>> {
    let Some(addr) = s.metrics.0 else {
        return Ok(None);
    };
    let ips = |addrs: &[InterfaceAddress]| addrs.iter().map(|a| a.ip).collect::<Vec<_>>();
    gateway::metrics::check_address(addr, &ips(internal), &ips(external))?;
    Ok(Some(addr))
}

/// The metrics listener: on the internal interface tied to it like the control listeners, on
/// loopback as it is.
fn bind_metrics(addr: SocketAddr, internal: &str) -> std::io::Result<TcpListener> {
    let device = if addr.ip().is_loopback() {
        "lo"
    } else {
        internal
    };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    tie_to_device(&socket, Some(device))?;
    socket.bind(addr)?;
    socket.listen(16)
}

/// Serves the metrics endpoint from `services` and the instance's pinned counters.
fn serve_metrics(
    listener: TcpListener,
    addr: SocketAddr,
    services: &Arc<Services>,
    instance: &Instance,
) -> tokio::task::JoinHandle<()> {
    let (services, pin_dir) = (Arc::clone(services), instance.pin_dir());
    let scrape = Arc::new(move || gateway::metrics::snapshot(&services, &pin_dir));
    info!(%addr, path = "/metrics", "metrics endpoint listening (Prometheus text, OpenMetrics)");
    tokio::spawn(gateway::metrics::serve(listener, scrape))
}

/// A control listener tied to the internal interface, so a connection that arrives anywhere
/// else (the weak-host model delivers TCP for internal addresses that came in outside) finds
/// no socket.
fn bind_listener(addr: SocketAddr, device: &str) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    tie_to_device(&socket, Some(device))?;
    socket.bind(addr)?;
    socket.listen(1024)
}

#[expect(
    clippy::too_many_lines,
    reason = "start-up, serving and shutdown in order, read top to bottom"
)]
async fn serve(
    args: DaemonArgs,
    instance: &Instance,
    external_ifindex: u32,
    access: server::access::Access,
    signals: &mut Signals,
) -> Result<()> {
    let s = &args.settings;
    let external_addrs = netif::addresses(&s.external).context("read --external addresses")?;
    let internal_addrs = netif::addresses(&s.internal).context("read --internal addresses")?;
    let (external_v4, external_v6) = netif::primary(&external_addrs);
    if external_v4.is_none() && external_v6.is_none() {
        bail!("--external {} has no IP address", s.external);
    }
    let listen = listen_addresses(&args, &internal_addrs, &external_addrs)?;
    let metrics_addr = metrics_address(s, &internal_addrs, &external_addrs)?;

    let resolvers: Vec<SocketAddr> = if s.resolvers.is_empty() {
        let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        nameservers_from_resolv_conf(&text)
    } else {
        s.resolvers.iter().map(|server| server.0).collect()
    };
    if resolvers.is_empty() {
        warn!("no nameserver configured (--resolver, /etc/resolv.conf): domain names will fail");
    }
    if let Some(signal) = signals.stop_pending() {
        info!(
            signal,
            "stop requested during start-up, before the gate was touched; exiting"
        );
        return Ok(());
    }

    reserve_relay_ports(&args, instance)?;

    let mut config = DatapathConfig::new(instance.clone(), s.external.clone(), s.internal.clone());
    config.max_bindings = s.max_bindings.get();
    config.host_allow = s.allow_host_udp.clone();
    config.external_addresses = external_addrs.iter().map(|a| a.ip).collect();
    config.gate_hook = s.gate_hook;
    config.xdp_mode = s.xdp_mode;
    config.tc_mode = s.tc_attach;
    config.control_listeners = listen.clone();
    // TCP to the metrics port from outside is dropped like TCP to the control port.
    config
        .control_listeners
        .extend(metrics_addr.filter(|a| !a.ip().is_loopback()));
    // From here on every exit leaves the gate attached and dropping (a failed attach leaves
    // whatever was pinned before, which drops too).
    let mut datapath = Datapath::attach(&config)
        .with_context(|| format!("attach the gateway to {}", s.external))?;
    datapath.start_kernel_log();
    let gate = match datapath.take_gate() {
        Ok(gate) => gate,
        Err(error) => {
            datapath.stop();
            return Err(error).context("open the binding maps");
        }
    };
    let gate: Arc<dyn Gate> = match s.datapath {
        DatapathKind::Kernel | DatapathKind::Xdp => Arc::new(gate),
        DatapathKind::Userspace => Arc::new(gate.userspace_only()),
    };
    info!(datapath = ?s.datapath, "confirmed bindings are relayed by {}", s.datapath.describe());
    // Each query's socket is tied to the interface its nameserver is reached through, and its
    // exact reply flow is admitted by the gate only while the query is outstanding.
    let device_for = {
        let (external, internal) = (external_addrs.clone(), internal_addrs.clone());
        let (ext_name, int_name) = (s.external.clone(), s.internal.clone());
        move |source: IpAddr| {
            if external.iter().any(|a| a.ip == source) {
                Some(ext_name.clone())
            } else if internal.iter().any(|a| a.ip == source) {
                Some(int_name.clone())
            } else {
                None
            }
        }
    };
    let resolver = match Resolver::new(&resolvers, Arc::clone(&gate), &device_for) {
        Ok(resolver) => Arc::new(resolver),
        Err(error) => {
            datapath.stop();
            return Err(error).context("set up the resolver");
        }
    };
    if let Some(signal) = signals.stop_pending() {
        info!(
            signal,
            "stop requested during start-up; the gate stays attached and dropping"
        );
        datapath.stop();
        return Ok(());
    }

    let fanout_capacity = if s.datapath == DatapathKind::Userspace {
        0
    } else {
        datapath.fanout_capacity()
    };
    let enhanced = match enhanced_mode(
        &args,
        &external_addrs,
        &internal_addrs,
        &access.policy,
        fanout_capacity,
    ) {
        Ok(enhanced) => enhanced,
        Err(error) => {
            datapath.stop();
            return Err(error);
        }
    };
    let services = Arc::new(Services {
        access: LiveAccess::new(access),
        limiter: FailureLimiter::new(5, Duration::from_mins(1)),
        resolver,
        gate: Arc::clone(&gate),
        external: External {
            v4: external_v4,
            v6: external_v6,
            ifindex: Some(external_ifindex),
            device: Some(s.external.clone()),
        },
        internal_device: Some(s.internal.clone()),
        timeouts: s.timeouts(),
        connections: ConnectionLimits::new(
            s.max_connections.get(),
            s.max_connections_per_client.get(),
        ),
        auth: AuthLimit::per_core(2),
        association_limits: gateway::server::AssociationLimits {
            max_remotes: s.max_remotes_per_association.get(),
            remote_idle: Duration::from_secs(s.idle_timeout),
        },
        enhanced,
        counters: gateway::counters::Counters::default(),
    });

    let mut listeners = Vec::new();
    for addr in &listen {
        match bind_listener(*addr, &s.internal) {
            Ok(listener) => listeners.push(listener),
            Err(error) => {
                warn!(%addr, %error, "cannot listen; stopping, and the gate stays attached and dropping");
                gate.close();
                datapath.stop();
                return Err(error).with_context(|| {
                    format!(
                        "listen on {addr} (the gate stays attached and dropping; `gateway detach \
                         --instance {}` removes it)",
                        instance.name()
                    )
                });
            }
        }
    }
    let metrics = match metrics_addr {
        Some(addr) => match bind_metrics(addr, &s.internal) {
            Ok(listener) => Some(serve_metrics(listener, addr, &services, instance)),
            Err(error) => {
                gate.close();
                datapath.stop();
                return Err(error).with_context(|| {
                    format!(
                        "listen for metrics on {addr} (the gate stays attached and dropping; \
                         `gateway detach --instance {}` removes it)",
                        instance.name()
                    )
                });
            }
        },
        None => None,
    };
    let watcher = tokio::spawn(follow_address_changes(
        Arc::clone(&services),
        s.external.clone(),
        s.internal.clone(),
        instance.pin_dir(),
    ));
    let control_path = gateway::admin_socket::socket_path(instance);
    let control = tokio::spawn({
        let (path, services) = (control_path.clone(), Arc::clone(&services));
        async move {
            if let Err(error) = gateway::admin_socket::serve(path.clone(), services).await {
                warn!(path = %path.display(), %error, "control socket failed: `gateway bindings` will not answer");
            }
        }
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut servers = Vec::new();
    for (addr, listener) in listen.iter().zip(listeners) {
        info!(%addr, device = %s.internal, "SOCKS5 listening");
        let mut stop = stop_rx.clone();
        servers.push(tokio::spawn(server::run(
            Arc::clone(&services),
            listener,
            async move {
                let _ = stop.wait_for(|stop| *stop).await;
            },
        )));
    }

    let signal = if let Some(signal) = signals.stop_pending() {
        info!(signal, "stop requested during start-up; not serving");
        signal
    } else {
        info!(
            instance = instance.name(),
            external = %s.external,
            internal = %s.internal,
            pid = std::process::id(),
            "gateway running"
        );
        // Only now: the gate drops and every listener accepts.
        readiness::ready();
        loop {
            match signals.next().await {
                Event::Stop(signal) => break signal,
                Event::Reload => {
                    readiness::reloading();
                    reload(&args.access, &services);
                    readiness::ready();
                }
            }
        }
    };
    readiness::stopping();
    // Nothing is admitted from this moment, even while connections are still closing.
    let removed = gate.close();
    info!(
        signal,
        kernel_entries_removed = removed,
        "shutting down: the gate admits nothing now"
    );
    let _ = stop_tx.send(true);
    for server in servers {
        let _ = server.await;
    }
    control.abort();
    if let Some(metrics) = metrics {
        metrics.abort();
    }
    watcher.abort();
    let _ = std::fs::remove_file(&control_path);
    drop(services);
    if s.remove_gate_on_exit {
        datapath.detach();
    } else {
        datapath.stop();
    }
    Ok(())
}

/// Keeps the relay port ranges for the gateway: refused if a port in them is in use now,
/// reserved otherwise (recorded in the run directory for `gateway detach`).
fn reserve_relay_ports(args: &DaemonArgs, instance: &Instance) -> Result<()> {
    use gateway::reserved_ports;
    let s = &args.settings;
    let ranges = [s.internal_ports.ports(), s.external_ports.ports()];
    // The resolver binds its query ports itself, which a reservation does not stop.
    let queries = gateway::resolver::DEFAULT_QUERY_PORTS;
    if let Some(range) = ranges
        .iter()
        .find(|r| r.start() <= queries.end() && queries.start() <= r.end())
    {
        bail!(
            "the relay port range {}-{} overlaps the resolver's query ports {}-{}; choose \
             another range (--internal-ports, --external-ports)",
            range.start(),
            range.end(),
            queries.start(),
            queries.end()
        );
    }
    let busy = reserved_ports::in_use(&ranges, 5);
    if !busy.is_empty() {
        let listed: Vec<String> = busy.iter().map(|(p, port)| format!("{p} {port}")).collect();
        bail!(
            "the relay port ranges {} (internal) and {} (external) hold ports in use: {}; free \
             them or choose other ranges (--internal-ports, --external-ports)",
            s.internal_ports.first.to_string() + "-" + &s.internal_ports.last.to_string(),
            s.external_ports.first.to_string() + "-" + &s.external_ports.last.to_string(),
            listed.join(", ")
        );
    }
    let record = instance.run_dir().join(crate::RESERVED_PORTS_RECORD);
    match reserved_ports::reserve(&ranges, &record) {
        Ok(added) => info!(
            reserved = %reserved_ports::format(&added),
            "relay ports reserved (net.ipv4.ip_local_reserved_ports)"
        ),
        Err(error) => {
            warn!(%error, "could not reserve the relay ports; ephemeral binds may take some");
        }
    }
    Ok(())
}

/// Keeps the policy's own addresses (the whole host's) current: on every address change the
/// kernel announces over netlink, they are read again and put in force, for the SOCKS policy and
/// the enhanced mode's forbidden remotes alike.
async fn follow_address_changes(
    services: Arc<Services>,
    external: String,
    internal: String,
    pin_dir: std::path::PathBuf,
) {
    let socket = match netif::address_changes().and_then(|fd| {
        // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open and the same for
        // the AsyncFd's whole life.
        unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }
        .map_err(std::io::Error::from)
    }) {
        Ok(socket) => socket,
        Err(error) => {
            warn!(%error, "cannot follow address changes (netlink); own addresses are refreshed on SIGHUP only");
            return;
        }
    };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let Ok(mut ready) = socket.readable().await else {
            return;
        };
        // Drain everything queued: one refresh covers a burst of changes.
        while nix::sys::socket::recv(
            std::os::fd::AsRawFd::as_raw_fd(socket.get_ref()),
            &mut buf,
            nix::sys::socket::MsgFlags::empty(),
        )
        .is_ok()
        {}
        ready.clear_ready();
        let (Ok(ext), Ok(int)) = (netif::addresses(&external), netif::addresses(&internal)) else {
            continue;
        };
        // The kernel's "no UDP from inside to an external address" rule follows too.
        let external_ips: Vec<IpAddr> = ext.iter().map(|a| a.ip).collect();
        match gateway::datapath::sync_external_addresses(&pin_dir, &external_ips) {
            Ok((0, 0)) => {}
            Ok((added, removed)) => info!(
                added,
                removed, "external addresses changed; the internal interface's program follows"
            ),
            Err(error) => warn!(%error, "cannot update the kernel's external addresses"),
        }
        let own = access::own_addresses(&ext, &int);
        let mut updated = (*services.access.get()).clone();
        if updated.policy.own_addresses == own {
            continue;
        }
        info!(
            addresses = own.len(),
            "host addresses changed; the policy follows"
        );
        updated.policy.own_addresses = own;
        if let Some(mode) = &services.enhanced {
            mode.set_forbidden_remotes(access::forbidden_remotes(&updated.policy));
        }
        services.access.replace(updated);
    }
}

/// SIGHUP: reads the users file, the configuration file's policy and the interfaces' addresses
/// again and puts them in force for every later request; live bindings and connections stay,
/// except sessions the new settings no longer admit. A file that does not load changes nothing.
fn reload(source: &AccessSource, services: &Services) {
    let access = match source.load() {
        Ok(access) => access,
        Err(error) => {
            warn!(error = %format!("{error:#}"), "SIGHUP: reload refused; the previous users and policy stay in force");
            return;
        }
    };
    if let Some(mode) = &services.enhanced {
        mode.set_forbidden_remotes(access::forbidden_remotes(&access.policy));
    }
    info!(
        users = access.users.as_ref().map_or(0, server::auth::Users::len),
        anonymous = access.allow_anonymous,
        denied_networks = access.policy.deny.len(),
        client_networks = access.clients.len(),
        "SIGHUP: users and policy reloaded"
    );
    services.access.replace(access);
}

/// The enhanced UDP mode's binding table: relay addresses are every usable (not link-local)
/// address of the internal (client side) and external (remote side) interfaces, and a REMOTE may
/// not name what the SOCKS policy denies (its networks, the gateway's own addresses, link-local,
/// besides the machine's defaults). `None` (CMD 04 refused) when an interface has no usable
/// address.
fn enhanced_mode(
    args: &DaemonArgs,
    external: &[InterfaceAddress],
    internal: &[InterfaceAddress],
    policy: &Policy,
    fanout_capacity: usize,
) -> Result<Option<Arc<EnhancedMode>>> {
    let s = &args.settings;
    let usable = |addrs: &[InterfaceAddress]| -> Vec<IpAddr> {
        addrs
            .iter()
            .map(|a| a.ip)
            .filter(|ip| match ip {
                IpAddr::V4(v4) => !v4.is_link_local(),
                IpAddr::V6(v6) => !v6.is_unicast_link_local(),
            })
            .collect()
    };
    let mut config = binding::Config {
        // Every usable address of both interfaces: one address has fewer than 64 k ports. A
        // client's relays and CONNECTs share the one external address chosen for it; internal
        // relay ports come from any internal address of the family.
        internal_ips: usable(internal),
        external_ips: usable(external),
        allow_listen: s.allow_listen,
        // A confirmed RTP pair takes two kernel entries; UDP ASSOCIATE shares the map.
        max_bindings: usize::try_from(s.max_bindings.get() / 2).unwrap_or(usize::MAX),
        internal_ports: s.internal_ports,
        external_ports: s.external_ports,
        max_bindings_per_connection: s.max_bindings_per_connection.get(),
        max_bindings_per_user: s.max_bindings_per_user.get(),
        pending_timeout: Duration::from_secs(s.pending_timeout),
        idle_timeout: Duration::from_secs(s.idle_timeout),
        multicast: binding::MulticastPolicy {
            receive: s.allow_multicast_receive.clone(),
            send: s.allow_multicast_send.clone(),
            max_ttl: s.multicast_max_ttl.get(),
            modes: s.multicast_modes.modes(),
            default_mode: s.multicast_default_mode.mode(),
            sources: s
                .multicast_sources
                .iter()
                .map(|g| (g.group, g.sources.clone()))
                .collect(),
        },
        ..binding::Config::default()
    };
    if config.internal_ips.is_empty() || config.external_ips.is_empty() {
        warn!("an interface has no usable address: the enhanced UDP mode (CMD 04) is off");
        return Ok(None);
    }
    config.forbidden_remotes = access::forbidden_remotes(policy);
    let interface = |name: &str| -> Result<(String, u32)> {
        let index = gateway::datapath::interface_index(name)?;
        Ok((name.to_owned(), index))
    };
    let interfaces = Interfaces {
        internal: Some(interface(&s.internal)?),
        external: Some(interface(&s.external)?),
    };
    let sockets = RelaySockets::open(&config, &interfaces)
        .context("open the shared relay sockets of the enhanced UDP mode")?;
    let internal_mac = match gateway::neighbour::mac_of_interface(&s.internal) {
        Ok(mac) => Some(mac),
        Err(error) => {
            warn!(interface = %s.internal, %error,
                "no MAC address: multicast is fanned out by the userspace relay only");
            None
        }
    };
    let setup = MulticastSetup {
        external: interfaces.external.clone(),
        internal: interfaces.internal.clone(),
        internal_mac,
        internal_ips: config.internal_ips.clone(),
        kernel: fanout_capacity > 0,
        kernel_subscribers: s.multicast_kernel_subscribers.get().min(fanout_capacity),
        max_groups: s.multicast_max_groups.get(),
    };
    let mode = EnhancedMode::with_multicast(config, sockets, setup)
        .context("configure the enhanced UDP mode")?;
    Ok(Some(Arc::new(mode)))
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
                "open-file limit (bindings hold none; control connections and UDP ASSOCIATE do)"
            );
        }
        Err(error) => warn!(%error, "read the open-file limit"),
    }
}
