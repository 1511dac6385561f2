//! The SOCKS5 server: an accept loop with a connection cap and graceful shutdown, and a task per
//! control connection that authenticates it and runs its command (CONNECT, BIND, UDP ASSOCIATE,
//! the enhanced UDP mode).
//! Protocol decisions come from the sans-IO `socks` codecs; this layer does the I/O.

pub mod access;
pub mod auth;
mod bind;
mod connect;
pub mod connection;
pub mod enhanced;
pub mod handover;
mod handshake;
pub mod limits;
mod outside;
pub mod policy;
mod relay;
mod udp_associate;

pub use self::udp_associate::AssociationLimits;

use std::{
    future::Future,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinSet,
};
use tracing::{Instrument as _, debug, field::Empty, info, info_span, warn};

/// The number of the next control connection (of every listener), for the log's spans.
static NEXT_CONN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

use self::{
    access::LiveAccess,
    auth::FailureLimiter,
    connection::Connection,
    handover::{Moved, MovedKind},
    limits::{AuthLimit, ConnectionLimits, Refusal},
};
use crate::{gate::Gate, resolver::Resolver};
use gateway_proto::{Command, Reply, ReplyCode};

/// Timeouts of the control plane.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// From accept to a complete request; a silent or dribbling client is cut off.
    pub handshake: Duration,
    /// Outbound TCP connect for CONNECT.
    pub connect: Duration,
    /// How long a BIND waits for the peer to connect.
    pub bind_accept: Duration,
    /// A CONNECT/BIND relay with no bytes in either direction for this long is closed.
    pub tcp_idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            handshake: Duration::from_secs(10),
            connect: Duration::from_secs(10),
            bind_accept: Duration::from_mins(2),
            tcp_idle: Duration::from_hours(1),
        }
    }
}

/// The gateway's outside addresses: relays and outbound connections use these, so a client's
/// CONNECTs and UDP relays share one external IP per family.
#[derive(Debug, Clone, Default)]
pub struct External {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
    /// Index of the external interface: outside sockets accept only datagrams that arrived there.
    /// `None` accepts any interface (in-process tests on loopback).
    pub ifindex: Option<u32>,
    /// The external interface's name: outside sockets are tied to it (`SO_BINDTODEVICE`), so
    /// nothing they send or accept uses another interface. `None` ties nothing (tests).
    pub device: Option<String>,
}

impl External {
    /// The external address of `ip`'s family, if the gateway has one.
    pub fn for_family(&self, ip: IpAddr) -> Option<IpAddr> {
        match ip.to_canonical() {
            IpAddr::V4(_) => self.v4.map(IpAddr::V4),
            IpAddr::V6(_) => self.v6.map(IpAddr::V6),
        }
    }
}

/// Everything a control connection needs, shared by all of them.
#[derive(Debug)]
pub struct Services {
    /// Users, anonymous access, destination policy, client networks: replaced by SIGHUP.
    pub access: LiveAccess,
    pub limiter: FailureLimiter,
    pub resolver: Arc<Resolver>,
    pub gate: Arc<dyn Gate>,
    pub external: External,
    /// The internal interface's name: inside sockets are tied to it (`SO_BINDTODEVICE`). `None`
    /// ties nothing (in-process tests on loopback).
    pub internal_device: Option<String>,
    pub timeouts: Timeouts,
    /// Control connections in total and per client address, across every listener.
    pub connections: ConnectionLimits,
    /// Password verifications in flight (Argon2 on the blocking pool).
    pub auth: AuthLimit,
    /// What one RFC 1928 UDP association may hold.
    pub association_limits: AssociationLimits,
    /// The enhanced UDP mode (CMD 04) and its binding table; `None` refuses CMD 04 with `07`.
    pub enhanced: Option<Arc<enhanced::EnhancedMode>>,
    /// What the control plane decided, counted for `--metrics`.
    pub counters: crate::counters::Counters,
    /// Set while the daemon hands over to a new one (`gateway upgrade`).
    pub quiesce: handover::Quiesce,
    /// Where the control socket's `upgrade` goes (`None`: no upgrades, in-process tests).
    pub upgrades: Option<tokio::sync::mpsc::Sender<crate::admin_socket::UpgradeRequest>>,
}

pub use crate::netif::tie_to_device;

impl Services {
    /// Ties an inside socket (client side) to the internal interface.
    pub fn tie_inside(&self, socket: &impl std::os::fd::AsFd) -> std::io::Result<()> {
        tie_to_device(socket, self.internal_device.as_deref())
    }

    /// Ties an outside socket (remote side) to the external interface.
    pub fn tie_outside(&self, socket: &impl std::os::fd::AsFd) -> std::io::Result<()> {
        tie_to_device(socket, self.external.device.as_deref())
    }

    /// The external address a client at `peer` uses towards `target`'s family: the same for its
    /// CONNECTs, BINDs and UDP relays (RTSP servers may refuse media to an address other than the
    /// one the session came from). With several external addresses the enhanced mode's choice per
    /// client decides.
    pub fn external_for(&self, peer: IpAddr, target: IpAddr) -> Option<IpAddr> {
        match &self.enhanced {
            Some(mode) => mode
                .config()
                .external_ip_for(peer.to_canonical(), crate::binding::Family::of(target)),
            None => self.external.for_family(target),
        }
    }
}

/// Serves SOCKS5 on `listener` until `shutdown` completes, then closes every control
/// connection (which ends their associations and removes their kernel entries) and returns.
pub async fn run(
    services: Arc<Services>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) {
    serve_all(services, vec![listener], Vec::new(), shutdown).await;
}

/// How [`serve_all`] ended.
#[derive(Debug)]
pub enum Ended {
    /// `shutdown` completed: every connection was closed.
    Stopped,
    /// The quiesce began: the listeners (in order, still listening: the kernel queues new
    /// connections) and every connection that stopped for the next daemon. The others closed.
    Quiesced {
        listeners: Vec<TcpListener>,
        moved: Vec<Moved>,
    },
}

/// How long a quiesce waits for the connections to reach a message boundary (a handshake or a
/// request in flight finishes meanwhile); the rest are closed.
pub const QUIESCE_DEADLINE: Duration = Duration::from_secs(2);

/// Serves SOCKS5 on `listeners` and the connections in `resumed` (handed over by the previous
/// daemon, or by this one's failed upgrade) until `shutdown` completes or the quiesce begins.
#[expect(
    clippy::too_many_lines,
    reason = "serving, then the quiesce and the shutdown in order, read top to bottom"
)]
pub async fn serve_all(
    services: Arc<Services>,
    listeners: Vec<TcpListener>,
    resumed: Vec<Moved>,
    shutdown: impl Future<Output = ()>,
) -> Ended {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks: JoinSet<Option<Moved>> = JoinSet::new();
    let (accepted_tx, mut accepted) = tokio::sync::mpsc::channel(64);
    let mut acceptors = Vec::new();
    for listener in listeners {
        acceptors.push(tokio::spawn(accept_loop(
            Arc::clone(&services),
            listener,
            accepted_tx.clone(),
        )));
    }
    drop(accepted_tx);
    for moved in resumed {
        let Some(permit) = services.connections.admit(moved.peer.ip()).ok() else {
            warn!(peer = %moved.peer, "connection cap reached by handed-over connections; closing one");
            continue;
        };
        let span = info_span!("conn", conn = moved.log_conn, peer = %moved.peer, user = Empty);
        let services = Arc::clone(&services);
        let mut stop = stop_rx.clone();
        tasks.spawn(
            async move {
                let result = tokio::select! {
                    moved = resume(Arc::clone(&services), moved) => moved,
                    _ = stop.wait_for(|stop| *stop) => None,
                };
                drop(permit);
                result
            }
            .instrument(span),
        );
    }
    tokio::pin!(shutdown);
    // A connection that saw the quiesce first may end here before the loop does: it is kept.
    let mut moved = Vec::new();
    let quiescing = loop {
        tokio::select! {
            () = &mut shutdown => break false,
            () = services.quiesce.wait() => break true,
            Some((stream, peer, permit)) = accepted.recv() => {
                let services = Arc::clone(&services);
                let mut stop = stop_rx.clone();
                // Every line of this connection carries its number, peer and (once known) user.
                let conn = NEXT_CONN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let span = info_span!("conn", conn, %peer, user = Empty);
                tasks.spawn(async move {
                    let result = tokio::select! {
                        moved = serve(services, stream, peer, conn) => moved,
                        _ = stop.wait_for(|stop| *stop) => {
                            debug!(%peer, "closed by shutdown");
                            None
                        }
                    };
                    drop(permit);
                    result
                }.instrument(span));
            }
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Ok(Some(one)) = done {
                    moved.push(one);
                }
            }
        }
    };
    if quiescing {
        info!(
            connections = tasks.len() + moved.len(),
            "quiescing for the upgrade: listeners stop accepting, connections stop at their next message"
        );
        services.quiesce.begin();
        let mut listeners = Vec::new();
        for acceptor in acceptors {
            if let Ok(Some(listener)) = acceptor.await {
                listeners.push(listener);
            }
        }
        // Connections accepted but not yet started get their handshake too (within the
        // deadline), like those already running.
        accepted.close();
        while let Some((stream, peer, permit)) = accepted.recv().await {
            let services = Arc::clone(&services);
            let conn = NEXT_CONN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let span = info_span!("conn", conn, %peer, user = Empty);
            tasks.spawn(
                async move {
                    let moved = serve(services, stream, peer, conn).await;
                    drop(permit);
                    moved
                }
                .instrument(span),
            );
        }
        let drain = async {
            while let Some(done) = tasks.join_next().await {
                if let Ok(Some(one)) = done {
                    moved.push(one);
                }
            }
        };
        if tokio::time::timeout(QUIESCE_DEADLINE, drain).await.is_err() {
            info!(
                closing = tasks.len(),
                "connections not at a message boundary in time; closing them"
            );
            tasks.abort_all();
            while let Some(done) = tasks.join_next().await {
                if let Ok(Some(one)) = done {
                    moved.push(one);
                }
            }
        }
        return Ended::Quiesced { listeners, moved };
    }
    info!(connections = tasks.len(), "shutting down the SOCKS server");
    for acceptor in &acceptors {
        acceptor.abort();
    }
    let _ = stop_tx.send(true);
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(5), drain)
        .await
        .is_err()
    {
        tasks.abort_all();
    }
    Ended::Stopped
}

/// Accepts on `listener` and hands each admitted connection on; returns the listener when the
/// quiesce begins (`None` if the server went first).
async fn accept_loop(
    services: Arc<Services>,
    listener: TcpListener,
    accepted: tokio::sync::mpsc::Sender<(TcpStream, SocketAddr, limits::ConnectionSlot)>,
) -> Option<TcpListener> {
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            () = services.quiesce.wait() => return Some(listener),
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if !services.access.get().admits_client(peer.ip()) {
            info!(%peer, "control connection from outside the permitted client networks; closing");
            drop(stream);
            continue;
        }
        let permit = match services.connections.admit(peer.ip()) {
            Ok(permit) => permit,
            Err(Refusal::Total) => {
                warn!(%peer, cap = services.connections.max_total(), "connection cap reached; closing");
                drop(stream);
                continue;
            }
            Err(Refusal::PerClient) => {
                warn!(%peer, cap = services.connections.max_per_client(), "connection cap of this client address reached; closing");
                drop(stream);
                continue;
            }
        };
        services.counters.connections_accepted.inc();
        if accepted.send((stream, peer, permit)).await.is_err() {
            return None;
        }
    }
}

/// The number the next control connection gets in the log (handed to the next daemon, so
/// numbers stay unique across an upgrade).
pub fn next_log_conn() -> u64 {
    NEXT_CONN.load(std::sync::atomic::Ordering::Relaxed)
}

/// Continues numbering after the previous daemon's connections.
pub fn continue_log_conns(next: u64) {
    NEXT_CONN.fetch_max(next, std::sync::atomic::Ordering::Relaxed);
}

/// A handed-over connection, served on from where it stopped.
async fn resume(services: Arc<Services>, moved: Moved) -> Option<Moved> {
    let who = printable_user(moved.user.as_deref());
    tracing::Span::current().record("user", who.as_str());
    let peer = moved.peer;
    match moved.kind {
        MovedKind::Enhanced {
            conn,
            buffered,
            bindings,
        } => {
            let Some(mode) = services.enhanced.clone() else {
                warn!(%peer, "an enhanced-mode session was handed over, but the mode is off; closing");
                return None;
            };
            let resumed = enhanced::Resumed {
                log_conn: moved.log_conn,
                conn,
                buffered,
                bindings,
            };
            let user = moved.user;
            let stream = moved.stream;
            let ended = tokio::select! {
                ended = enhanced::resume(mode, stream, &services, peer, user.as_deref(), resumed) => ended,
                () = services.access.revoked(peer.ip(), user.as_deref()) => {
                    info!(%peer, user = %who, "access withdrawn by a reload; closing the connection");
                    return None;
                }
            };
            ended.map(|kind| Moved {
                log_conn: moved.log_conn,
                peer,
                user,
                stream: kind.0,
                kind: kind.1,
            })
        }
        MovedKind::Associate(association) => {
            let user = moved.user;
            let ended = udp_associate::resume(moved.stream, association, &services, peer).await;
            ended.map(|(stream, kind)| Moved {
                log_conn: moved.log_conn,
                peer,
                user,
                stream,
                kind,
            })
        }
        MovedKind::Connect(tunnel) => {
            let user = moved.user;
            let ended = connect::resume(moved.stream, tunnel, &services, peer).await;
            ended.map(|(stream, kind)| Moved {
                log_conn: moved.log_conn,
                peer,
                user,
                stream,
                kind,
            })
        }
    }
}

/// One control connection, start to end: `Some` when it stopped for the next daemon. Every
/// error ends here as a log line.
async fn serve(
    services: Arc<Services>,
    stream: TcpStream,
    peer: SocketAddr,
    log_conn: u64,
) -> Option<Moved> {
    let _ = stream.set_nodelay(true);
    let local = match stream.local_addr() {
        Ok(local) => local,
        Err(error) => {
            debug!(%peer, %error, "no local address");
            return None;
        }
    };
    let mut conn = Connection::new(stream);
    let handshake = tokio::time::timeout(
        services.timeouts.handshake,
        handshake::run(&mut conn, &services, peer),
    )
    .await;
    let (user, request) = match handshake {
        Ok(Ok(done)) => done,
        Ok(Err(error)) => {
            debug!(%peer, %error, "handshake failed");
            return None;
        }
        Err(_) => {
            info!(%peer, "handshake timed out; closing");
            return None;
        }
    };
    let who = printable_user(user.as_deref());
    tracing::Span::current().record("user", who.as_str());
    info!(%peer, user = %who, command = ?request.command, target = %request.address, "request");
    let moved = |(stream, kind)| Moved {
        log_conn,
        peer,
        user: user.clone(),
        stream,
        kind,
    };
    let command = async {
        match request.command {
            Command::Connect => connect::run(conn, &services, peer, &request.address)
                .await
                .map(|ended| ended.map(moved)),
            Command::Bind => {
                // A BIND waiting for its peer does not move: it closes with the quiesce.
                tokio::select! {
                    result = bind::run(conn, &services, peer, &request.address) => result.map(|()| None),
                    () = services.quiesce.wait() => {
                        info!(%peer, "BIND closed for the upgrade (a BIND relay does not move)");
                        Ok(None)
                    }
                }
            }
            Command::UdpAssociate => {
                udp_associate::run(conn, &services, peer, local, &request.address)
                    .await
                    .map(|ended| ended.map(moved))
            }
            Command::EnhancedUdp => enhanced::run(conn, &services, peer, user.as_deref())
                .await
                .map(|ended| ended.map(moved)),
        }
    };
    tokio::select! {
        result = command => match result {
            Ok(moved) => moved,
            Err(error) => {
                debug!(%peer, %error, "connection ended with an error");
                None
            }
        },
        () = services.access.revoked(peer.ip(), user.as_deref()) => {
            info!(%peer, user = %who, "access withdrawn by a reload; closing the connection");
            None
        }
    }
}

/// A user name as logged: control characters escaped, so a name cannot forge log lines.
pub fn printable_user(user: Option<&str>) -> String {
    user.map_or_else(|| "-".to_owned(), |name| name.escape_debug().to_string())
}

/// Sends a failure reply; the caller then closes the connection.
async fn send_failure(conn: &mut Connection, code: ReplyCode) {
    let mut out = bytes::BytesMut::new();
    if Reply::failure(code).encode(&mut out).is_ok() {
        let _ = conn.write_all(&out).await;
    }
}

/// Sends a success reply with `bound` as BND.ADDR/BND.PORT.
async fn send_success(
    conn: &mut Connection,
    bound: SocketAddr,
) -> Result<(), connection::ConnectionError> {
    let mut out = bytes::BytesMut::new();
    Reply {
        code: ReplyCode::Succeeded,
        address: bound.into(),
    }
    .encode(&mut out)?;
    conn.write_all(&out).await
}
