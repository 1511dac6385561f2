//! Greeting, method selection, RFC 1929 sub-negotiation and the request. Never selects GSSAPI;
//! anonymous access only where the configuration allows it.

use std::{net::SocketAddr, time::Instant};

use bytes::BytesMut;
use thiserror::Error;
use tracing::info;

use super::{
    Services,
    connection::{Connection, ConnectionError},
    send_failure,
};
use gateway_proto::{AuthReply, AuthRequest, Greeting, Method, MethodSelection, Request};

#[derive(Debug, Error)]
pub enum HandshakeError {
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    #[error("no acceptable authentication method offered")]
    NoAcceptableMethod,
    #[error("authentication failed for user {0:?}")]
    BadCredentials(String),
    #[error("too many failed authentications from this address")]
    RateLimited,
}

/// Runs the handshake; returns the authenticated user (None for anonymous) and the request.
pub async fn run(
    conn: &mut Connection,
    services: &Services,
    peer: SocketAddr,
) -> Result<(Option<String>, Request), HandshakeError> {
    let greeting = conn.read_message(Greeting::decode).await?;
    let access = services.access.get();
    let method = if access.users.is_some() && greeting.offers(Method::UserPass) {
        Method::UserPass
    } else if access.allow_anonymous && greeting.offers(Method::NoAuth) {
        Method::NoAuth
    } else {
        Method::NoAcceptable
    };
    let mut out = BytesMut::new();
    MethodSelection { method }.encode(&mut out);
    conn.write_all(&out).await?;

    let user = match method {
        Method::UserPass => Some(authenticate(conn, services, peer).await?),
        Method::NoAuth => None,
        _ => return Err(HandshakeError::NoAcceptableMethod),
    };

    match conn.read_message(Request::decode).await {
        Ok(request) => Ok((user, request)),
        Err(ConnectionError::Protocol(error)) => {
            if let Some(code) = error.reply_code() {
                send_failure(conn, code).await;
            }
            Err(ConnectionError::Protocol(error).into())
        }
        Err(error) => Err(error.into()),
    }
}

async fn authenticate(
    conn: &mut Connection,
    services: &Services,
    peer: SocketAddr,
) -> Result<String, HandshakeError> {
    let request = conn.read_message(AuthRequest::decode).await?;
    let name = String::from_utf8_lossy(&request.username).into_owned();
    let now = Instant::now();
    let allowed = services.limiter.may_try(peer.ip(), now);
    let ok = allowed && {
        let access = services.access.get();
        let (user, password) = (name.clone(), request.password.clone());
        services
            .auth
            .run(move || {
                access
                    .users
                    .as_ref()
                    .is_some_and(|users| users.verify(&user, &password))
            })
            .await
    };
    let logged = super::printable_user(Some(&name));
    let mut out = BytesMut::new();
    if ok {
        AuthReply::SUCCESS
    } else {
        AuthReply::FAILURE
    }
    .encode(&mut out);
    conn.write_all(&out).await?;
    if ok {
        services.counters.auth_succeeded.inc();
        services.limiter.record_success(peer.ip());
        return Ok(name);
    }
    if !allowed {
        services.counters.auth_rate_limited.inc();
        info!(%peer, user = %logged, "authentication refused: too many failures from this address");
        return Err(HandshakeError::RateLimited);
    }
    services.counters.auth_failed.inc();
    services.limiter.record_failure(peer.ip(), now);
    info!(%peer, user = %logged, "authentication failed");
    Err(HandshakeError::BadCredentials(name))
}
