//! BIND: listen on the external address, reply with it, wait (bounded) for one peer, reply with
//! the peer's address, relay. If the request named a specific address, only that host may
//! connect (RFC 1928: DST.ADDR evaluates the BIND).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use tokio::net::TcpSocket;
use tracing::info;

use super::{
    Services,
    connection::{Connection, ConnectionError},
    relay::relay,
    send_failure, send_success,
};
use gateway_proto::{Address, ReplyCode};

pub async fn run(
    mut conn: Connection,
    services: &Services,
    peer: SocketAddr,
    address: &Address,
) -> Result<(), ConnectionError> {
    // The expected peer: a specific IP restricts who may connect; a name or zeros does not.
    let expected: Option<IpAddr> = match address {
        Address::Ip(addr) if !addr.ip().is_unspecified() => Some(addr.ip().to_canonical()),
        _ => None,
    };
    let family_hint = expected.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let Some(external) = services
        .external_for(peer.ip(), family_hint)
        .or_else(|| services.external.v4.map(IpAddr::V4))
    else {
        send_failure(&mut conn, ReplyCode::AddressTypeNotSupported).await;
        return Ok(());
    };
    if expected.is_some_and(|ip| !services.access.get().policy.allows(ip)) {
        send_failure(&mut conn, ReplyCode::NotAllowed).await;
        return Ok(());
    }
    let socket = if external.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    services.tie_outside(&socket)?;
    socket.bind(SocketAddr::new(external, 0))?;
    let listener = socket.listen(1)?;
    let listening = listener.local_addr()?;
    send_success(&mut conn, listening).await?;
    info!(%peer, %listening, "BIND listening");

    let deadline = tokio::time::Instant::now() + services.timeouts.bind_accept;
    let (stream, from) = loop {
        let accepted = tokio::select! {
            accepted = tokio::time::timeout_at(deadline, listener.accept()) => accepted,
            // The client gave up: nothing more to do.
            () = conn.wait_closed() => return Ok(()),
        };
        match accepted {
            Ok(Ok((stream, from))) if expected.is_none_or(|ip| ip == from.ip().to_canonical()) => {
                break (stream, from);
            }
            Ok(Ok((_, from))) => {
                info!(%peer, %from, "BIND: connection from an unexpected host refused");
            }
            Ok(Err(error)) => return Err(error.into()),
            Err(_) => {
                info!(%peer, "BIND: no peer connected in time");
                send_failure(&mut conn, ReplyCode::GeneralFailure).await;
                return Ok(());
            }
        }
    };
    drop(listener);
    send_success(&mut conn, from).await?;
    info!(%peer, %from, "BIND connected");
    let (client, early) = conn.into_parts();
    let (up, down) = relay(client, stream, &early, services.timeouts.tcp_idle).await;
    info!(%peer, %from, up, down, "BIND closed");
    Ok(())
}
