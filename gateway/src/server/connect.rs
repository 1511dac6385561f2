//! CONNECT: resolve (domain names by the gateway's resolver), check policy, connect from the
//! external address, reply with the bound address, relay.

use std::{io, net::SocketAddr};

use tokio::net::{TcpSocket, TcpStream};
use tracing::info;

use super::{
    Services,
    connection::{Connection, ConnectionError},
    relay::relay,
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

pub async fn run(
    mut conn: Connection,
    services: &Services,
    peer: SocketAddr,
    address: &Address,
) -> Result<(), ConnectionError> {
    let targets = match resolve_allowed(services, address).await {
        Ok(targets) => targets,
        Err(code) => {
            info!(%peer, %address, ?code, "CONNECT refused");
            send_failure(&mut conn, code).await;
            return Ok(());
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
                let (up, down) = relay(client, stream, &early, services.timeouts.tcp_idle).await;
                info!(%peer, %target, up, down, "CONNECT closed");
                return Ok(());
            }
            Err(error) => {
                last_code = connect_error_code(&error);
                info!(%peer, %target, %error, "CONNECT attempt failed");
            }
        }
    }
    send_failure(&mut conn, last_code).await;
    Ok(())
}
