//! The client's half of the SOCKS5 handshake: greeting, method selection, RFC 1929, one request
//! and its reply. Generic over the stream so unit tests can play the gateway on a duplex pipe.
//!
//! Replies are read to their exact length (the address type says how long they are), so not one
//! octet after a CONNECT reply, which belongs to the relayed stream, is taken from the socket.
//! The callers bound every call with a timeout.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use super::ClientError;
use gateway_proto::{
    Address, AddressType, AuthReply, AuthRequest, Command, Greeting, Method, MethodSelection,
    ProtocolError, Reply, ReplyCode, Request,
    enhanced::{EntryReply, entry_request},
};

/// The RFC 1929 request for `credentials`, checked before anything is sent.
pub(super) fn auth_request(
    credentials: Option<&(String, String)>,
) -> Result<Option<AuthRequest>, ClientError> {
    let Some((user, password)) = credentials else {
        return Ok(None);
    };
    let request = AuthRequest::new(user.as_bytes(), password.as_bytes());
    let mut scratch = Vec::new();
    request
        .encode(&mut scratch)
        .map_err(ClientError::InvalidCredentials)?;
    Ok(Some(request))
}

/// Greeting, method selection and, when the gateway selects it, RFC 1929. Offers no
/// authentication without credentials, username/password first (then none) with them.
pub(super) async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    auth: Option<&AuthRequest>,
) -> Result<Method, ClientError> {
    let methods = if auth.is_some() {
        vec![Method::UserPass, Method::NoAuth]
    } else {
        vec![Method::NoAuth]
    };
    let mut out = BytesMut::new();
    Greeting {
        methods: methods.clone(),
    }
    .encode(&mut out)?;
    stream.write_all(&out).await?;

    let mut selection = [0u8; MethodSelection::LEN];
    read_exact(stream, &mut selection).await?;
    let method = MethodSelection::decode(&mut &selection[..])?
        .ok_or(ProtocolError::Truncated)?
        .method;
    if method == Method::NoAcceptable {
        return Err(ClientError::NoAcceptableMethod);
    }
    if !methods.contains(&method) {
        return Err(ClientError::UnexpectedMethod(method.to_u8()));
    }
    if let (Method::UserPass, Some(auth)) = (method, auth) {
        let mut out = BytesMut::new();
        auth.encode(&mut out)
            .map_err(ClientError::InvalidCredentials)?;
        stream.write_all(&out).await?;
        let mut status = [0u8; AuthReply::LEN];
        read_exact(stream, &mut status).await?;
        let reply = AuthReply::decode(&mut &status[..])?.ok_or(ProtocolError::Truncated)?;
        if !reply.is_success() {
            return Err(ClientError::BadCredentials(reply.status));
        }
    }
    Ok(method)
}

/// Sends a request and reads its reply; a refusal is [`ClientError::Refused`]. Returns BND.
pub(super) async fn request<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    command: Command,
    address: Address,
) -> Result<Address, ClientError> {
    let mut out = BytesMut::new();
    Request { command, address }.encode(&mut out)?;
    stream.write_all(&out).await?;
    let octets = read_reply(stream).await?;
    let reply = Reply::decode(&mut &octets[..])?.ok_or(ProtocolError::Truncated)?;
    if reply.code != ReplyCode::Succeeded {
        return Err(ClientError::Refused(reply.code));
    }
    Ok(reply.address)
}

/// Sends `05 04 00 01 00000000 0000` and reads the entry reply.
pub(super) async fn enter_enhanced<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
) -> Result<Address, ClientError> {
    let mut out = BytesMut::new();
    entry_request().encode(&mut out)?;
    stream.write_all(&out).await?;
    let octets = read_reply(stream).await?;
    match EntryReply::decode(&mut &octets[..])?.ok_or(ProtocolError::Truncated)? {
        EntryReply::Entered(address) => Ok(address),
        EntryReply::Refused(reply) => Err(ClientError::Refused(reply.code)),
    }
}

/// Reads exactly one reply (`VER REP RSV ATYP ADDR PORT`), however the gateway sends it.
async fn read_reply<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Vec<u8>, ClientError> {
    // VER REP RSV ATYP and the first octet of ADDR (the length of a domain name).
    let mut octets = vec![0u8; 5];
    read_exact(stream, &mut octets).await?;
    let rest = match AddressType::try_from(octets[3]) {
        Ok(AddressType::Ipv4) => 4 + 2 - 1,
        Ok(AddressType::Ipv6) => 16 + 2 - 1,
        Ok(AddressType::Domain) => usize::from(octets[4]) + 2,
        // The decoder reports the unknown type.
        Err(_) => 0,
    };
    octets.resize(5 + rest, 0);
    read_exact(stream, &mut octets[5..]).await?;
    Ok(octets)
}

/// `read_exact`, with the gateway closing the connection reported as [`ClientError::Closed`].
async fn read_exact<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut [u8],
) -> Result<(), ClientError> {
    match stream.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => Err(ClientError::Closed),
        Err(error) => Err(error.into()),
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, duplex};

    use super::*;

    /// Plays the gateway: expects `expect` from the client, answers `answer`.
    async fn gateway(
        mut server: tokio::io::DuplexStream,
        script: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> tokio::io::DuplexStream {
        for (expect, answer) in script {
            let mut got = vec![0u8; expect.len()];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(got, expect);
            server.write_all(&answer).await.unwrap();
        }
        server
    }

    #[tokio::test]
    async fn anonymous_connect_keeps_early_stream_bytes() {
        let (mut client, server) = duplex(1024);
        let reply = [5, 0, 0, 1, 192, 0, 2, 1, 0x1F, 0x90, b'h', b'i'];
        let script = vec![
            (vec![5, 1, 0], vec![5, 0]),
            (
                vec![5, 1, 0, 3, 6, b'a', b'.', b't', b'e', b's', b't', 0, 80],
                reply.to_vec(),
            ),
        ];
        let server = tokio::spawn(gateway(server, script));
        assert_eq!(negotiate(&mut client, None).await.unwrap(), Method::NoAuth);
        let bound = request(
            &mut client,
            Command::Connect,
            Address::Domain("a.test".into(), 80),
        )
        .await
        .unwrap();
        assert_eq!(bound.to_string(), "192.0.2.1:8080");
        // The octets after the reply are the relayed stream's, still in the socket.
        let mut early = [0u8; 2];
        client.read_exact(&mut early).await.unwrap();
        assert_eq!(&early, b"hi");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn user_pass_success_and_failure() {
        let auth = auth_request(Some(&("u".to_owned(), "pw".to_owned())))
            .unwrap()
            .unwrap();
        let greeting = vec![5, 2, 2, 0];
        let sub = vec![1, 1, b'u', 2, b'p', b'w'];
        let (mut client, server) = duplex(1024);
        let ok = tokio::spawn(gateway(
            server,
            vec![(greeting.clone(), vec![5, 2]), (sub.clone(), vec![1, 0])],
        ));
        assert_eq!(
            negotiate(&mut client, Some(&auth)).await.unwrap(),
            Method::UserPass
        );
        ok.await.unwrap();

        let (mut client, server) = duplex(1024);
        let bad = tokio::spawn(gateway(
            server,
            vec![(greeting, vec![5, 2]), (sub, vec![1, 1])],
        ));
        assert!(matches!(
            negotiate(&mut client, Some(&auth)).await,
            Err(ClientError::BadCredentials(1))
        ));
        bad.await.unwrap();
    }

    #[tokio::test]
    async fn refused_methods() {
        for (answer, check) in [
            (0xFF, "none acceptable"),
            (0x02, "not offered"),
            (0x01, "not offered"),
        ] {
            let (mut client, server) = duplex(64);
            let task = tokio::spawn(gateway(server, vec![(vec![5, 1, 0], vec![5, answer])]));
            let result = negotiate(&mut client, None).await;
            match (answer, result) {
                (0xFF, Err(ClientError::NoAcceptableMethod))
                | (0x01 | 0x02, Err(ClientError::UnexpectedMethod(_))) => {}
                (_, other) => panic!("{check}: {other:?}"),
            }
            task.await.unwrap();
        }
    }

    #[test]
    fn credentials_are_checked_before_sending() {
        for (user, password) in [("", "x"), ("x", ""), ("x", &*"p".repeat(256))] {
            let credentials = (user.to_owned(), password.to_owned());
            assert!(matches!(
                auth_request(Some(&credentials)),
                Err(ClientError::InvalidCredentials(_))
            ));
        }
        assert!(auth_request(None).unwrap().is_none());
    }

    #[tokio::test]
    async fn refusals_and_closed_connections() {
        let (mut client, server) = duplex(64);
        let task = tokio::spawn(gateway(
            server,
            vec![(
                vec![5, 1, 0, 1, 192, 0, 2, 1, 0, 80],
                vec![5, 2, 0, 1, 0, 0, 0, 0, 0, 0],
            )],
        ));
        let target: std::net::SocketAddr = "192.0.2.1:80".parse().unwrap();
        assert!(matches!(
            request(&mut client, Command::Connect, target.into()).await,
            Err(ClientError::Refused(ReplyCode::NotAllowed))
        ));
        drop(task.await.unwrap());
        assert!(matches!(
            request(&mut client, Command::Connect, target.into()).await,
            Err(ClientError::Closed | ClientError::Io(_))
        ));
    }

    #[tokio::test]
    async fn enhanced_entry() {
        let entry = vec![5, 4, 0, 1, 0, 0, 0, 0, 0, 0];
        let (mut client, server) = duplex(64);
        let task = tokio::spawn(gateway(
            server,
            vec![(entry.clone(), vec![1, 0, 0, 1, 0, 0, 0, 0, 0, 0])],
        ));
        assert!(enter_enhanced(&mut client).await.unwrap().is_unspecified());
        task.await.unwrap();

        let (mut client, server) = duplex(64);
        let task = tokio::spawn(gateway(
            server,
            vec![(entry, vec![5, 7, 0, 1, 0, 0, 0, 0, 0, 0])],
        ));
        assert!(matches!(
            enter_enhanced(&mut client).await,
            Err(ClientError::Refused(ReplyCode::CommandNotSupported))
        ));
        task.await.unwrap();
    }
}
