//! The async driver of the SOCKS5 handshake ([`super::exchange`] says what the steps are):
//! greeting, method selection, RFC 1929, one request and its reply. Generic over the stream so
//! unit tests can play the gateway on a duplex pipe.
//!
//! Replies are read to their exact length (the address type says how long they are), so not one
//! octet after a CONNECT reply, which belongs to the relayed stream, is taken from the socket.
//! The callers bound every call with a timeout.

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use super::{ClientError, exchange};
use gateway_proto::{Address, AuthReply, AuthRequest, Command, Method, MethodSelection};

/// Greeting, method selection and, when the gateway selects it, RFC 1929.
pub(super) async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    auth: Option<&AuthRequest>,
) -> Result<Method, ClientError> {
    let (greeting, offered) = exchange::greeting(auth)?;
    stream.write_all(&greeting).await?;
    let mut selection = [0u8; MethodSelection::LEN];
    read_exact(stream, &mut selection).await?;
    let method = exchange::selected_method(selection, &offered)?;
    if let (Method::UserPass, Some(auth)) = (method, auth) {
        stream.write_all(&exchange::auth_octets(auth)?).await?;
        let mut status = [0u8; AuthReply::LEN];
        read_exact(stream, &mut status).await?;
        exchange::check_auth_reply(status)?;
    }
    Ok(method)
}

/// Sends a request and reads its reply; a refusal is [`ClientError::Refused`]. Returns BND.
pub(super) async fn request<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    command: Command,
    address: Address,
) -> Result<Address, ClientError> {
    stream
        .write_all(&exchange::request_octets(command, address)?)
        .await?;
    exchange::reply_address(&read_reply(stream).await?)
}

/// Sends `05 04 00 01 00000000 0000` and reads the entry reply.
pub(super) async fn enter_enhanced<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
) -> Result<Address, ClientError> {
    stream.write_all(&exchange::entry_octets()?).await?;
    exchange::entry_address(&read_reply(stream).await?)
}

/// Reads exactly one reply (`VER REP RSV ATYP ADDR PORT`), however the gateway sends it.
async fn read_reply<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Vec<u8>, ClientError> {
    let mut prefix = [0u8; exchange::REPLY_PREFIX];
    read_exact(stream, &mut prefix).await?;
    let mut octets = prefix.to_vec();
    octets.resize(exchange::REPLY_PREFIX + exchange::reply_rest(prefix), 0);
    read_exact(stream, &mut octets[exchange::REPLY_PREFIX..]).await?;
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
    use crate::exchange::auth_request;
    use gateway_proto::ReplyCode;

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
