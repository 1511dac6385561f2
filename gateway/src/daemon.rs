//! `gateway run`: everything a daemon does between start and stop, in order. Owns the order of
//! start-up (signal handlers first; nothing is served before the gate is attached) and of
//! shutdown (the gate is emptied at once, connections end, the gate stays attached and dropping).
//! No path out of here opens the firewall: only `--remove-gate-on-exit` after a clean stop, or
//! `gateway detach`, removes the gate.

mod access;
mod readiness;
mod signals;
pub mod upgrade;

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
    /// What this build does in an upgrade.
    pub upgrade: upgrade::Options,
}

pub fn run(args: DaemonArgs) -> Result<()> {
    // Before the runtime starts its threads: taking the channel out of the environment
    // changes the environment.
    let takeover = gateway::handover::wire::Channel::from_env();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    runtime.block_on(async move {
        // Before anything is attached or bound: a signal from here on is handled, never the
        // default action.
        let mut signals = Signals::install()?;
        info!(pid = std::process::id(), "gateway starting");
        start_and_serve(args, &mut signals, takeover).await
    })
}

async fn start_and_serve(
    args: DaemonArgs,
    signals: &mut Signals,
    takeover: Option<Result<gateway::handover::wire::Channel, gateway::handover::wire::WireError>>,
) -> Result<()> {
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
    let takeover = match takeover {
        Some(Ok(channel)) => {
            info!("upgrade: taking over from the running daemon");
            Some(channel)
        }
        Some(Err(error)) => bail!("upgrade: {error}"),
        None => None,
    };
    // Taking over, the lock comes with the state (the running daemon holds it).
    let lock = match takeover {
        Some(_) => None,
        None => Some(instance.lock()?),
    };
    raise_open_file_limit();
    serve(
        args,
        &instance,
        external_ifindex,
        access,
        signals,
        takeover,
        lock,
    )
    .await
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
    takeover: Option<gateway::handover::wire::Channel>,
    lock: Option<gateway::instance::InstanceLock>,
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

    if takeover.is_some() {
        // The previous daemon reserved them; its relays' ports are busy by design.
        reserve_relay_ports_again(&args, instance);
    } else {
        reserve_relay_ports(&args, instance)?;
    }

    let mut config = DatapathConfig::new(instance.clone(), s.external.clone(), s.internal.clone());
    config.max_bindings = s.max_bindings.get();
    config.host_allow = s.allow_host_udp.clone();
    config.external_addresses = external_addrs.iter().map(|a| a.ip).collect();
    config.gate_hook = s.gate_hook;
    config.xdp_mode = s.xdp_mode;
    config.tc_mode = s.tc_attach;
    config.control_listeners = listen.clone();
    config.adopt = takeover.is_some();
    // TCP to the metrics port from outside is dropped like TCP to the control port.
    config
        .control_listeners
        .extend(metrics_addr.filter(|a| !a.ip().is_loopback()));
    // From here on every exit leaves the gate attached and dropping (a failed attach leaves
    // whatever was pinned before, which drops too).
    let mut datapath = match Datapath::attach(&config) {
        Ok(datapath) => datapath,
        Err(error) => {
            let error =
                anyhow::Error::from(error).context(format!("attach the gateway to {}", s.external));
            if let Some(channel) = &takeover {
                upgrade::fail(channel, &format!("{error:#}"));
            }
            return Err(error);
        }
    };
    datapath.start_kernel_log();
    let gate = match datapath.take_gate() {
        Ok(gate) => gate,
        Err(error) => {
            if let Some(channel) = &takeover {
                upgrade::fail(channel, &error.to_string());
                datapath.leave_to_other_daemon();
            } else {
                datapath.stop();
            }
            return Err(error).context("open the binding maps");
        }
    };
    // Taking over: the running daemon's state, before anything here is served.
    let mut handed = match &takeover {
        Some(channel) => {
            match tokio::task::block_in_place(|| upgrade::receive(channel, &args.upgrade)) {
                Ok(handed) => Some(handed),
                Err(reason) => {
                    warn!(%reason, "upgrade: not taking over; the running daemon keeps serving");
                    datapath.leave_to_other_daemon();
                    bail!("upgrade refused or failed: {reason}");
                }
            }
        }
        None => None,
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
    // A failure from here on: a new daemon leaves the gate to the old one, which resumes.
    let give_up = |datapath: Datapath, reason: &str| {
        if let Some(channel) = &takeover {
            upgrade::fail(channel, reason);
            datapath.leave_to_other_daemon();
        } else {
            datapath.stop();
        }
    };
    let resolver = match Resolver::new(&resolvers, Arc::clone(&gate), &device_for) {
        Ok(resolver) => Arc::new(resolver),
        Err(error) => {
            give_up(datapath, &error.to_string());
            return Err(error).context("set up the resolver");
        }
    };
    if takeover.is_none()
        && let Some(signal) = signals.stop_pending()
    {
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
            give_up(datapath, &format!("{error:#}"));
            return Err(error);
        }
    };
    let (upgrade_tx, mut upgrade_rx) = tokio::sync::mpsc::channel(1);
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
        quiesce: gateway::server::handover::Quiesce::default(),
        upgrades: Some(upgrade_tx),
    });

    let mut lock = lock;
    let (listeners, metrics_listener, admin_listener, resumed) = if let Some((state, fds)) =
        handed.as_mut()
    {
        match take_over(state, fds, &services, instance, &listen) {
            Ok((handed_lock, listeners, metrics, admin, resumed)) => {
                lock = Some(handed_lock);
                (listeners, metrics, admin, resumed)
            }
            Err(reason) => {
                warn!(%reason, "upgrade: cannot take over; the running daemon keeps serving");
                give_up(datapath, &reason);
                bail!("upgrade failed: {reason}");
            }
        }
    } else {
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
                Ok(listener) => Some(listener),
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
        (listeners, metrics, None, Vec::new())
    };
    // Kept for a later upgrade: the listeners' descriptors go to the next daemon.
    let metrics_fd = metrics_listener
        .as_ref()
        .and_then(|l| std::os::fd::AsFd::as_fd(l).try_clone_to_owned().ok());
    let metrics = metrics_listener.map(|listener| {
        serve_metrics(
            listener,
            metrics_addr.unwrap_or_else(|| listen[0]),
            &services,
            instance,
        )
    });
    let watcher = tokio::spawn(follow_address_changes(
        Arc::clone(&services),
        s.external.clone(),
        s.internal.clone(),
        instance.pin_dir(),
    ));
    let control_path = gateway::admin_socket::socket_path(instance);
    let admin_listener = match admin_listener {
        Some(listener) => Ok(listener),
        None => gateway::admin_socket::bind(&control_path),
    };
    let admin_fd = admin_listener
        .as_ref()
        .ok()
        .and_then(|l| std::os::fd::AsFd::as_fd(l).try_clone_to_owned().ok());
    let control = tokio::spawn({
        let (path, services) = (control_path.clone(), Arc::clone(&services));
        async move {
            let served = match admin_listener {
                Ok(listener) => gateway::admin_socket::serve_listener(listener, services).await,
                Err(error) => Err(error),
            };
            if let Err(error) = served {
                warn!(path = %path.display(), %error, "control socket failed: `gateway bindings` will not answer");
            }
        }
    });
    if let Some(channel) = &takeover {
        // The service manager follows this process from now on; then the old daemon goes.
        readiness::main_pid_ready();
        if let Err(reason) = upgrade::announce(channel) {
            warn!(%reason, "upgrade: the old daemon did not confirm; leaving the gate to it");
            datapath.leave_to_other_daemon();
            bail!("upgrade failed: {reason}");
        }
        info!(
            sessions = resumed.len(),
            bindings = services.enhanced.as_ref().map_or(0, |m| m.live_bindings()),
            "upgrade: took over from the previous daemon"
        );
    }
    for addr in &listen {
        info!(%addr, device = %s.internal, "SOCKS5 listening");
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let spawn_server = |listeners: Vec<TcpListener>, resumed: Vec<server::handover::Moved>| {
        let mut stop = stop_rx.clone();
        tokio::spawn(server::serve_all(
            Arc::clone(&services),
            listeners,
            resumed,
            async move {
                let _ = stop.wait_for(|stop| *stop).await;
            },
        ))
    };
    let mut server_task = spawn_server(listeners, resumed);
    let invocation = upgrade::Invocation::current();

    let signal = if takeover.is_none()
        && let Some(signal) = signals.stop_pending()
    {
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
        if takeover.is_none() {
            readiness::ready();
        }
        loop {
            let request = tokio::select! {
                event = signals.next() => match event {
                    Event::Stop(signal) => break signal,
                    Event::Reload => {
                        readiness::reloading();
                        reload(&args.access, &services);
                        readiness::ready();
                        continue;
                    }
                    Event::Upgrade => None,
                },
                Some(request) = upgrade_rx.recv() => Some(request),
            };
            let (binary, reply) = match request {
                Some(request) => (request.binary, Some(request.reply)),
                None => (None, None),
            };
            let binary = binary.unwrap_or_else(|| invocation.binary.clone());
            let context = HandoverContext {
                services: &services,
                lock: lock.as_ref(),
                metrics: metrics_fd.as_ref(),
                admin: admin_fd.as_ref(),
                listen: &listen,
                format: &args.upgrade.format,
            };
            match upgrade_to(&binary, &invocation, &context, &mut server_task).await {
                Ok(done) => {
                    info!(new_pid = done.new_pid, binary = %binary.display(), sessions = done.sessions,
                        bindings = done.bindings, "upgrade: handed over; this daemon exits");
                    if let Some(reply) = reply {
                        let _ = reply.send(Ok(done));
                        // The answer reaches `gateway upgrade` before the process goes.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    datapath.leave_to_other_daemon();
                    std::process::exit(0);
                }
                Err(UpgradeFailure::NotStarted(reason)) => {
                    // Nothing was stopped: the connections never noticed.
                    warn!(%reason, binary = %binary.display(), "upgrade failed; this daemon serves on");
                    if let Some(reply) = reply {
                        let _ = reply.send(Err(reason));
                    }
                }
                Err(UpgradeFailure::AfterQuiesce(reason, listeners, moved)) => {
                    warn!(%reason, binary = %binary.display(), "upgrade failed; this daemon serves on");
                    if let Some(mode) = &services.enhanced {
                        mode.thaw();
                    }
                    services.quiesce.end();
                    server_task = spawn_server(listeners, moved);
                    readiness::main_pid_ready();
                    if let Some(reply) = reply {
                        let _ = reply.send(Err(reason));
                    }
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
    let _ = server_task.await;
    control.abort();
    if let Some(metrics) = metrics {
        metrics.abort();
    }
    watcher.abort();
    let _ = std::fs::remove_file(&control_path);
    drop(services);
    if let Some(lock) = lock {
        lock.release();
    }
    if s.remove_gate_on_exit {
        datapath.detach();
    } else {
        datapath.stop();
    }
    Ok(())
}

/// What the old daemon hands over besides its connections.
struct HandoverContext<'a> {
    services: &'a Arc<Services>,
    lock: Option<&'a gateway::instance::InstanceLock>,
    metrics: Option<&'a std::os::fd::OwnedFd>,
    admin: Option<&'a std::os::fd::OwnedFd>,
    listen: &'a [SocketAddr],
    format: &'a gateway::handover::Format,
}

/// Why an upgrade did not happen, and what the old daemon serves on with.
enum UpgradeFailure {
    /// The new binary refused, failed or died before anything here stopped.
    NotStarted(String),
    /// After the quiesce: the listeners and the stopped connections to serve again.
    AfterQuiesce(String, Vec<TcpListener>, Vec<server::handover::Moved>),
}

/// The old daemon's upgrade: start the new binary; once it accepted, quiesce the server
/// (`server_task` ends) and hand everything over. On success the new daemon's answer; on
/// failure why, with what to serve on.
async fn upgrade_to(
    binary: &std::path::Path,
    invocation: &upgrade::Invocation,
    context: &HandoverContext<'_>,
    server_task: &mut tokio::task::JoinHandle<server::Ended>,
) -> Result<gateway::admin_socket::UpgradeDone, UpgradeFailure> {
    let services = context.services;
    info!(binary = %binary.display(), "upgrade requested");
    // The connections go on meanwhile: a refusal or a binary that does not start stops nothing.
    let new = upgrade::start_new(binary, invocation, context.format)
        .map_err(UpgradeFailure::NotStarted)?;
    services.quiesce.begin();
    let (listeners, moved) = match server_task.await {
        Ok(server::Ended::Quiesced { listeners, moved }) => (listeners, moved),
        Ok(server::Ended::Stopped) | Err(_) => (Vec::new(), Vec::new()),
    };
    let (table, relays) = match &services.enhanced {
        Some(mode) => {
            let (table, relays) = mode.freeze();
            (Some(table), relays)
        }
        None => (None, Vec::new()),
    };
    let bindings = table.as_ref().map_or(0, |t| t.bindings.len());
    let sessions = moved.len();
    let result = {
        use gateway::handover::state::{DaemonState, Listener, Outgoing};
        let mut fds = Outgoing::default();
        let lock = context.lock.map(|lock| fds.add(lock));
        let listener_states = listeners
            .iter()
            .zip(context.listen)
            .map(|(listener, addr)| Listener {
                addr: listener.local_addr().unwrap_or(*addr),
                fd: fds.add(listener),
            })
            .collect();
        let metrics = context.metrics.map(|fd| fds.add(fd));
        let admin = context.admin.map(|fd| fds.add(fd));
        let session_states = moved.iter().map(|m| m.to_state(&mut fds)).collect();
        let state = DaemonState {
            version: context.format.writes,
            pid: std::process::id(),
            lock,
            listeners: listener_states,
            metrics,
            admin,
            table,
            relays,
            sessions: session_states,
            next_log_conn: server::next_log_conn(),
        };
        match serde_json::to_vec(&state) {
            Ok(document) => {
                info!(
                    octets = document.len(),
                    descriptors = fds.fds().len(),
                    sessions,
                    bindings,
                    "upgrade: handing over"
                );
                upgrade::hand_over(new, &document, fds.fds())
            }
            Err(error) => {
                new.kill();
                Err(format!("serialise the state: {error}"))
            }
        }
    };
    match result {
        Ok(new_pid) => Ok(gateway::admin_socket::UpgradeDone {
            old_pid: std::process::id(),
            new_pid,
            binary: binary.to_owned(),
            state_version: context.format.writes,
            sessions,
            bindings,
        }),
        Err(reason) => Err(UpgradeFailure::AfterQuiesce(reason, listeners, moved)),
    }
}

type TakenOver = (
    gateway::instance::InstanceLock,
    Vec<TcpListener>,
    Option<TcpListener>,
    Option<tokio::net::UnixListener>,
    Vec<server::handover::Moved>,
);

/// The new daemon's take-over of `state`: the lock, the listeners, the table and the
/// sessions. Nothing is served yet.
fn take_over(
    state: &gateway::handover::state::DaemonState,
    fds: &mut gateway::handover::state::Incoming,
    services: &Services,
    instance: &Instance,
    listen: &[SocketAddr],
) -> Result<TakenOver, String> {
    let lock_fd = fds.take(
        state.lock.ok_or("no instance lock in the state")?,
        "instance lock",
    )?;
    let lock =
        gateway::instance::InstanceLock::adopt(instance, lock_fd).map_err(|e| e.to_string())?;
    let mut listeners = Vec::new();
    for listener in &state.listeners {
        if !listen.contains(&listener.addr) {
            warn!(addr = %listener.addr, "upgrade: a handed-over listener is not in the settings; serving it anyway");
        }
        let fd = fds.take(listener.fd, "SOCKS listener")?;
        let std = std::net::TcpListener::from(fd);
        std.set_nonblocking(true).map_err(|e| e.to_string())?;
        listeners.push(TcpListener::from_std(std).map_err(|e| e.to_string())?);
    }
    let metrics = match state.metrics {
        Some(index) => {
            let std = std::net::TcpListener::from(fds.take(index, "metrics listener")?);
            std.set_nonblocking(true).map_err(|e| e.to_string())?;
            Some(TcpListener::from_std(std).map_err(|e| e.to_string())?)
        }
        None => None,
    };
    let admin = match state.admin {
        Some(index) => {
            let std = std::os::unix::net::UnixListener::from(fds.take(index, "control socket")?);
            std.set_nonblocking(true).map_err(|e| e.to_string())?;
            Some(tokio::net::UnixListener::from_std(std).map_err(|e| e.to_string())?)
        }
        None => None,
    };
    match (&services.enhanced, &state.table) {
        (Some(mode), Some(table)) => mode
            .restore(services.gate.as_ref(), table, state.relays.clone())
            .map_err(|e| format!("the binding table: {e}"))?,
        (None, Some(table)) if !table.bindings.is_empty() => {
            return Err(format!(
                "{} bindings were handed over, but the enhanced mode is off here",
                table.bindings.len()
            ));
        }
        _ => {}
    }
    let mut resumed = Vec::new();
    let mut kept = std::collections::HashSet::new();
    for session in &state.sessions {
        match server::handover::Moved::from_state(session, fds) {
            Ok(moved) => {
                if let server::handover::MovedKind::Enhanced { conn, .. } = &moved.kind {
                    kept.insert(*conn);
                }
                resumed.push(moved);
            }
            Err(reason) => {
                warn!(peer = %session.peer, %reason, "upgrade: a handed-over connection cannot be adopted; closed");
            }
        }
    }
    if let Some(mode) = &services.enhanced {
        let closed = mode.close_connections_except(services.gate.as_ref(), &kept);
        if closed > 0 {
            warn!(
                connections = closed,
                "upgrade: bindings of connections that did not come along removed"
            );
        }
    }
    server::continue_log_conns(state.next_log_conn);
    Ok((lock, listeners, metrics, admin, resumed))
}

/// After an upgrade: the previous daemon reserved the relay ports; reserve them again (the
/// record is rewritten) without the in-use check, since the old relays hold them.
fn reserve_relay_ports_again(args: &DaemonArgs, instance: &Instance) {
    let s = &args.settings;
    let ranges = [s.internal_ports.ports(), s.external_ports.ports()];
    let record = instance.run_dir().join(super::RESERVED_PORTS_RECORD);
    if let Err(error) = gateway::reserved_ports::reserve(&ranges, &record) {
        warn!(%error, "could not reserve the relay ports again");
    }
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
    let record = instance.run_dir().join(super::RESERVED_PORTS_RECORD);
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
