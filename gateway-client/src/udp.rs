//! RFC 1928 UDP ASSOCIATE on the client side: a local UDP socket that talks to the gateway's
//! relay, adding the RFC 1928 header on the way out and stripping it on the way in. The TCP
//! control connection is kept open for as long as the association lives.

use std::net::SocketAddr;

use bytes::BytesMut;
use tokio::net::{TcpStream, UdpSocket};

use super::ClientError;
use gateway_proto::{Address, UdpHeader};

/// An RFC 1928 UDP association: datagrams to any remote through the gateway's relay.
///
/// The gateway admits answers only from remotes this association has sent to (protocol.md
/// section 1), so send first, then receive. Dropping the value closes the control connection,
/// which ends the association.
///
/// # Examples
///
/// ```no_run
/// use gateway_client::Client;
/// # async fn dns() -> Result<(), Box<dyn std::error::Error>> {
/// let proxy = "198.51.100.1:1080".parse()?;
/// let udp = Client::connect(proxy, None).await?.udp_associate().await?;
/// let resolver: std::net::SocketAddr = "192.0.2.53:53".parse()?;
/// udp.send_to(resolver, b"query").await?;
/// let mut buf = vec![0; 1500];
/// let (len, from) = tokio::time::timeout(
///     std::time::Duration::from_secs(2),
///     udp.recv_from(&mut buf),
/// )
/// .await??;
/// println!("{len} octets from {from}");
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct UdpAssociation {
    control: TcpStream,
    socket: UdpSocket,
    relay: SocketAddr,
}

impl UdpAssociation {
    pub(super) fn new(control: TcpStream, socket: UdpSocket, relay: SocketAddr) -> Self {
        Self {
            control,
            socket,
            relay,
        }
    }

    /// The gateway's relay address (BND of the reply), where datagrams are sent.
    pub fn relay_addr(&self) -> SocketAddr {
        self.relay
    }

    /// The local socket's address (DST of the request).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// The local socket. Reading from it directly bypasses the header stripping.
    pub fn socket(&self) -> &UdpSocket {
        &self.socket
    }

    /// Sends `data` to `remote` (an IP address or a name the gateway resolves) through the relay.
    pub async fn send_to(
        &self,
        remote: impl Into<Address>,
        data: &[u8],
    ) -> Result<usize, ClientError> {
        let header = UdpHeader::new(remote.into());
        let mut out = BytesMut::with_capacity(header.encoded_len() + data.len());
        header.encode(&mut out)?;
        out.extend_from_slice(data);
        self.socket.send_to(&out, self.relay).await?;
        Ok(data.len())
    }

    /// Receives the next datagram relayed to this association: its payload goes to the start of
    /// `buf`, and the remote that sent it is returned. Datagrams that are not from the relay, are
    /// malformed or are fragments are skipped. A payload longer than `buf` minus the header is
    /// truncated. Fails with [`ClientError::Closed`] when the control connection ends.
    pub async fn recv_from(&self, buf: &mut [u8]) -> Result<(usize, Address), ClientError> {
        loop {
            let (len, from) = tokio::select! {
                received = self.socket.recv_from(buf) => received?,
                () = control_closed(&self.control) => return Err(ClientError::Closed),
            };
            if from != self.relay {
                continue;
            }
            let mut datagram = &buf[..len];
            let Ok(header) = UdpHeader::decode(&mut datagram) else {
                continue;
            };
            if header.is_fragment() {
                continue;
            }
            let start = len - datagram.len();
            buf.copy_within(start..len, 0);
            return Ok((len - start, header.address));
        }
    }
}

/// Resolves when the gateway closes the control connection (EOF or an error). Anything it sends
/// there is discarded: nothing is expected after the reply.
pub(super) async fn control_closed(control: &TcpStream) {
    let mut sink = [0u8; 64];
    loop {
        if control.readable().await.is_err() {
            return;
        }
        match control.try_read(&mut sink) {
            Ok(0) => return,
            Err(error) if error.kind() != std::io::ErrorKind::WouldBlock => return,
            Ok(_) | Err(_) => {}
        }
    }
}
