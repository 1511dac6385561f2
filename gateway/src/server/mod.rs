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
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
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
                let services = Arc::clone(&services);
                let mut stop = stop_rx.clone();
                // Every line of this connection carries its number, peer and (once known) user.
                let conn = NEXT_CONN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let span = info_span!("conn", conn, %peer, user = Empty);
                tasks.spawn(async move {
                    tokio::select! {
                        () = serve(services, stream, peer) => {}
                        _ = stop.wait_for(|stop| *stop) => debug!(%peer, "closed by shutdown"),
                    }
                    drop(permit);
                }.instrument(span));
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    info!(connections = tasks.len(), "shutting down the SOCKS server");
    let _ = stop_tx.send(true);
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(5), drain)
        .await
        .is_err()
    {
        tasks.abort_all();
    }
}

/// One control connection, start to end. Every error ends here as a log line.
async fn serve(services: Arc<Services>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let local = match stream.local_addr() {
        Ok(local) => local,
        Err(error) => {
            debug!(%peer, %error, "no local address");
            return;
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
            return;
        }
        Err(_) => {
            info!(%peer, "handshake timed out; closing");
            return;
        }
    };
    let who = printable_user(user.as_deref());
    tracing::Span::current().record("user", who.as_str());
    info!(%peer, user = %who, command = ?request.command, target = %request.address, "request");
    let command = async {
        match request.command {
            Command::Connect => connect::run(conn, &services, peer, &request.address).await,
            Command::Bind => bind::run(conn, &services, peer, &request.address).await,
            Command::UdpAssociate => {
                udp_associate::run(conn, &services, peer, local, &request.address).await
            }
            Command::EnhancedUdp => enhanced::run(conn, &services, peer, user.as_deref()).await,
        }
    };
    tokio::select! {
        result = command => {
            if let Err(error) = result {
                debug!(%peer, %error, "connection ended with an error");
            }
        }
        () = services.access.revoked(peer.ip(), user.as_deref()) => {
            info!(%peer, user = %who, "access withdrawn by a reload; closing the connection");
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
