//! CONNECT: resolve (domain names by the gateway's resolver), check policy, connect from the
//! external address, reply with the bound address, relay.

use std::{io, net::SocketAddr};

use tokio::net::{TcpSocket, TcpStream};
use tracing::info;

use super::{
    Services,
    connection::{Connection, ConnectionError},
    handover::{MovedKind, MovedTunnel},
    relay::{RelayEnd, Tunnel, relay_from},
    send_failure, send_success,
};
use gateway_proto::{Address, ReplyCode};

/// The reply code for a failed outbound connect.
pub fn connect_error_code(error: &io::Error) -> ReplyCode {
    match error.raw_os_error() {
        Some(libc::ECONNREFUSED) => ReplyCode::ConnectionRefused,
        Some(libc::ENETUNREACH) => ReplyCode::NetworkUnreachable,
        Some(libc::EHOSTUNREACH | libc::ETIMEDOUT) => ReplyCode::HostUnreachable,
        _ if error.kind() == io::ErrorKind::TimedOut => ReplyCode::HostUnreachable,
        _ => ReplyCode::GeneralFailure,
    }
}

/// Resolves `address` to socket addresses the policy allows, or the reply code explaining why not.
pub async fn resolve_allowed(
    services: &Services,
    address: &Address,
) -> Result<Vec<SocketAddr>, ReplyCode> {
    let candidates: Vec<SocketAddr> = match address {
        Address::Ip(addr) => vec![*addr],
        Address::Domain(name, port) => match services.resolver.lookup(name).await {
            Ok(ips) => ips
                .into_iter()
                .map(|ip| SocketAddr::new(ip, *port))
                .collect(),
            Err(error) => {
                info!(%name, %error, "name resolution failed");
                return Err(ReplyCode::HostUnreachable);
            }
        },
    };
    let allowed: Vec<SocketAddr> = candidates
        .into_iter()
        .map(|addr| SocketAddr::new(addr.ip().to_canonical(), addr.port()))
        .filter(|addr| services.access.get().policy.allows(addr.ip()))
        .collect();
    if allowed.is_empty() {
        return Err(ReplyCode::NotAllowed);
    }
    Ok(allowed)
}

async fn connect_from_external(
    services: &Services,
    peer: SocketAddr,
    target: SocketAddr,
) -> io::Result<TcpStream> {
    let socket = if target.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    services.tie_outside(&socket)?;
    if let Some(external) = services.external_for(peer.ip(), target.ip()) {
        socket.bind(SocketAddr::new(external, 0))?;
    }
    match tokio::time::timeout(services.timeouts.connect, socket.connect(target)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::from(io::ErrorKind::TimedOut)),
    }
}

/// CONNECT: `Some` with the client's socket when the tunnel stopped for the next daemon.
pub async fn run(
    mut conn: Connection,
    services: &Services,
    peer: SocketAddr,
    address: &Address,
) -> Result<Option<(TcpStream, MovedKind)>, ConnectionError> {
    let targets = match resolve_allowed(services, address).await {
        Ok(targets) => targets,
        Err(code) => {
            info!(%peer, %address, ?code, "CONNECT refused");
            send_failure(&mut conn, code).await;
            return Ok(None);
        }
    };
    let mut last_code = ReplyCode::HostUnreachable;
    for target in targets {
        match connect_from_external(services, peer, target).await {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                let bound = stream.local_addr()?;
                send_success(&mut conn, bound).await?;
                info!(%peer, %target, %bound, "CONNECT established");
                let (client, early) = conn.into_parts();
                return Ok(
                    tunnel(client, stream, &early, Tunnel::NEW, services, peer, target).await,
                );
            }
            Err(error) => {
                last_code = connect_error_code(&error);
                info!(%peer, %target, %error, "CONNECT attempt failed");
            }
        }
    }
    send_failure(&mut conn, last_code).await;
    Ok(None)
}

/// A CONNECT tunnel handed over by the previous daemon, relayed on from where it stopped.
pub async fn resume(
    client: TcpStream,
    moved: MovedTunnel,
    services: &Services,
    peer: SocketAddr,
) -> Option<(TcpStream, MovedKind)> {
    let start = Tunnel {
        up_open: moved.up_open,
        down_open: moved.down_open,
        up_bytes: moved.up_bytes,
        down_bytes: moved.down_bytes,
        idle_for: moved.idle_for,
    };
    info!(%peer, target = %moved.target_addr, up = start.up_bytes, down = start.down_bytes,
        "CONNECT tunnel taken over from the previous daemon");
    tunnel(
        client,
        moved.target,
        &[],
        start,
        services,
        peer,
        moved.target_addr,
    )
    .await
}

async fn tunnel(
    client: TcpStream,
    target_stream: TcpStream,
    early: &[u8],
    start: Tunnel,
    services: &Services,
    peer: SocketAddr,
    target: SocketAddr,
) -> Option<(TcpStream, MovedKind)> {
    let idle = services.timeouts.tcp_idle;
    match relay_from(
        client,
        target_stream,
        early,
        idle,
        start,
        Some(&services.quiesce),
    )
    .await
    {
        RelayEnd::Closed { up, down } => {
            info!(%peer, %target, up, down, "CONNECT closed");
            None
        }
        RelayEnd::Quiesced {
            client,
            target: target_stream,
            tunnel,
        } => {
            info!(%peer, %target, up = tunnel.up_bytes, down = tunnel.down_bytes,
                "CONNECT tunnel stopped for the upgrade; its sockets move");
            Some((
                client,
                MovedKind::Connect(MovedTunnel {
                    target_addr: target,
                    target: target_stream,
                    up_open: tunnel.up_open,
                    down_open: tunnel.down_open,
                    up_bytes: tunnel.up_bytes,
                    down_bytes: tunnel.down_bytes,
                    idle_for: tunnel.idle_for,
                }),
            ))
        }
    }
}
