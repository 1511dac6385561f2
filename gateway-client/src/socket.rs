//! The socket-like binding types of the enhanced mode: [`UdpBinding`] (one local socket, one
//! flow) and [`RtpPair`] (local sockets on an even/odd port pair, one binding with RTP-PAIR).
//! Their calls mirror the socket calls of protocol.md section 4; the protocol work is done by
//! `binding` (control, and the local sockets) and `flow` (data).

use std::{
    io,
    net::{IpAddr, SocketAddr},
};

use tokio::net::UdpSocket;

use super::{
    BindOptions, ClientError, EnhancedSession, Family,
    binding::{Core, Phase, RelayAddrs},
    exchange::bind_flags,
    flow::{Flow, shifted},
};
use gateway_proto::{Address, enhanced::Flags};

/// How many times to look for a free even/odd pair of local ports.
const PAIR_ATTEMPTS: usize = 64;

/// One enhanced-mode UDP binding that behaves like a socksified UDP socket: each call is the
/// socket call of protocol.md section 4 and triggers its protocol step.
///
/// | call | protocol step |
/// |---|---|
/// | [`bind`](Self::bind) (+ `getsockname`) | step 1: new TID, REMOTE unspecified; returns the external relay address |
/// | [`connect`](Self::connect) | step 2, UDP Open (a one-step Open if not bound) |
/// | [`listen`](Self::listen), or [`recv`](Self::recv) on a bound, unconnected binding | step 2, UDP Listen |
/// | [`send_to`](Self::send_to) on an unbound binding | one-step UDP Open |
/// | [`release`](Self::release), or dropping the value | UDP RELEASE |
///
/// The local socket is bound to the control connection's local IP, the only LOCAL the gateway
/// accepts. Control calls are bounded by [`super::Timeouts::control`]; a failed call leaves the
/// binding as it was (a timed-out step 2 may be repeated: the gateway answers a repeat `00`).
///
/// A binding made with [`BindOptions::raw`] ([`EnhancedSession::udp_socket_with`]) asks for
/// header-less delivery in every UDP BIND. If the reply that connects it grants it
/// ([`is_raw`](Self::is_raw)), [`socket`](Self::socket) is connected to the remote and carries
/// plain datagrams, so the application may read and write it like an unproxied connected UDP
/// socket; otherwise the header is used as without the option. The calls below do the right
/// thing in both cases.
///
/// # Examples
///
/// Two steps, as an RTSP client does (bind before SETUP, connect after its reply):
///
/// ```no_run
/// use gateway_client::{Client, Family};
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let session = Client::connect("198.51.100.1:1080".parse()?, None)
///     .await?
///     .enhanced()
///     .await?;
/// let socket = session.udp_socket(Family::V4).await?;
/// let relays = socket.bind().await?; // step 1
/// println!("tell the remote to send to {}", relays.external);
/// let remote: std::net::SocketAddr = "203.0.113.2:6000".parse()?;
/// socket.connect(remote).await?; // step 2, Open
/// socket.send(b"hello").await?;
/// let mut buf = [0u8; 1500];
/// let len = socket.recv(&mut buf).await?;
/// socket.release().await?;
/// # let _ = len;
/// # Ok(())
/// # }
/// ```
///
/// One step, like `sendto` on a fresh socket:
///
/// ```no_run
/// # async fn demo(session: gateway_client::EnhancedSession) -> Result<(), gateway_client::ClientError> {
/// let socket = session.udp_socket(gateway_client::Family::V4).await?;
/// let server: std::net::SocketAddr = "192.0.2.53:53".parse().expect("an address");
/// socket.send_to(server, b"query").await?; // one-step Open
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct UdpBinding {
    core: Core,
}

impl UdpBinding {
    pub(super) async fn new(
        session: EnhancedSession,
        family: Family,
        options: BindOptions,
    ) -> Result<Self, ClientError> {
        let socket = UdpSocket::bind(SocketAddr::new(session.local_ip(), 0)).await?;
        let core = Core::new(session, family, bind_flags(options), socket, None)?;
        Ok(Self { core })
    }

    fn flow(&self) -> Flow<'_> {
        Flow::new(&self.core, 0)
    }

    /// The local socket's address (LOCAL).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.flow().local_addr()
    }

    /// The local socket: see [`Flow::socket`] (connected to the remote once raw).
    pub fn socket(&self) -> &UdpSocket {
        self.flow().socket()
    }

    /// The family of the remote side.
    pub fn family(&self) -> Family {
        self.core.family()
    }

    /// The relay addresses, once bound.
    pub fn relay_addrs(&self) -> Option<RelayAddrs> {
        self.core.phase().relays()
    }

    /// `getsockname()`: the external relay address, once bound.
    pub fn external_addr(&self) -> Option<SocketAddr> {
        self.relay_addrs().map(|relays| relays.external)
    }

    /// The remote of a connected binding.
    pub fn peer_addr(&self) -> Option<Address> {
        match self.core.phase() {
            Phase::Open { remote, .. } => Some(remote),
            _ => None,
        }
    }

    /// Whether the binding is confirmed for any remote (step 2 Listen).
    pub fn is_listening(&self) -> bool {
        matches!(self.core.phase(), Phase::Listen { .. })
    }

    /// Whether header-less delivery is in effect: the binding asked for it, is connected, and
    /// the gateway's reply to the connecting request granted it. Then [`socket`](Self::socket)
    /// is connected to the remote.
    pub fn is_raw(&self) -> bool {
        self.core.is_raw()
    }

    /// `bind()`: step 1. Returns the relay addresses; [`RelayAddrs::external`] is what
    /// `getsockname` returns and what to advertise. Sent once: call it again only after an error
    /// and it makes a new binding with a new TID.
    pub async fn bind(&self) -> Result<RelayAddrs, ClientError> {
        self.core.bind().await
    }

    /// `connect(remote)`: step 2, UDP Open, with the same TID, LOCAL and flags as step 1 (a
    /// one-step Open if the binding is not bound). From then on only `remote` is relayed. If the
    /// reply grants header-less delivery, the local socket is connected to `remote` before this
    /// returns (an error connecting it is returned, the binding stays connected, and calling
    /// `connect` again retries).
    pub async fn connect(&self, remote: impl Into<Address>) -> Result<RelayAddrs, ClientError> {
        self.core.connect(remote.into()).await
    }

    /// Step 2, UDP Listen: datagrams from any remote (where the gateway's policy allows it);
    /// each carries the remote's address, which [`UdpBinding::recv_from`] returns.
    pub async fn listen(&self) -> Result<RelayAddrs, ClientError> {
        self.core.listen().await
    }

    /// Sends to the connected remote: see [`Flow::send`].
    pub async fn send(&self, data: &[u8]) -> Result<usize, ClientError> {
        self.flow().send(data).await
    }

    /// `sendto(remote)`: see [`Flow::send_to`] (a one-step Open on an unbound binding).
    pub async fn send_to(
        &self,
        remote: impl Into<Address>,
        data: &[u8],
    ) -> Result<usize, ClientError> {
        self.flow().send_to(remote, data).await
    }

    /// Receives a payload: see [`Flow::recv_from`].
    pub async fn recv(&self, buf: &mut [u8]) -> Result<usize, ClientError> {
        self.flow().recv(buf).await
    }

    /// Receives a payload and its remote: see [`Flow::recv_from`].
    pub async fn recv_from(&self, buf: &mut [u8]) -> Result<(usize, Address), ClientError> {
        self.flow().recv_from(buf).await
    }

    /// UDP RELEASE: the gateway frees the relay ports and stops relaying.
    pub async fn release(&self) -> Result<(), ClientError> {
        self.core.release().await
    }
}

/// An RTP-PAIR binding (protocol.md section 3): one AID, two flows. Local sockets on an even/odd
/// pair L (RTP) and L+1 (RTCP); the gateway's external relay pair P, P+1 and internal relay pair
/// Q, Q+1. Step 2 names the RTP source S:s; S:s reaches [`RtpPair::rtp`] and S:s+1 reaches
/// [`RtpPair::rtcp`], whose sends leave from P+1 to S:s+1.
///
/// Made with [`BindOptions::raw`] ([`EnhancedSession::bind_rtp_pair_with`]) and granted
/// ([`RtpPair::is_raw`]), both flows are header-less: the RTP socket is connected to S:s, the
/// RTCP socket to S:s+1, and each carries plain datagrams both ways.
///
/// # Examples
///
/// ```no_run
/// use gateway_client::{Client, Family};
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let session = Client::connect("198.51.100.1:1080".parse()?, None)
///     .await?
///     .enhanced()
///     .await?;
/// let pair = session.bind_rtp_pair(Family::V4).await?; // step 1 with RTP-PAIR
/// let p = pair.relay_addrs().external.port();
/// // SETUP with `Transport: RTP/AVP;unicast;client_port={p}-{}`, p + 1; the reply says
/// // `server_port=6000-6001`:
/// pair.connect("203.0.113.2:6000".parse::<std::net::SocketAddr>()?).await?; // step 2
/// // PLAY, then:
/// let mut buf = vec![0; 2048];
/// let len = pair.rtp().recv(&mut buf).await?;
/// # let _ = len;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct RtpPair {
    core: Core,
    relays: RelayAddrs,
}

impl RtpPair {
    pub(super) async fn bind(
        session: EnhancedSession,
        family: Family,
        options: BindOptions,
    ) -> Result<Self, ClientError> {
        let (even, odd) = local_pair(session.local_ip()).await?;
        let flags = bind_flags(options) | Flags::RTP_PAIR;
        let core = Core::new(session, family, flags, even, Some(odd))?;
        let relays = core.bind().await?;
        if relays.external.port() % 2 != 0 || relays.internal.port() == u16::MAX {
            // Dropping `core` releases the binding.
            return Err(ClientError::UnexpectedReply(format!(
                "relay ports {} / {} are no RTP pair",
                relays.internal, relays.external
            )));
        }
        Ok(Self { core, relays })
    }

    /// The relay addresses of the RTP flow (P and Q); RTCP uses the next ports.
    pub fn relay_addrs(&self) -> RelayAddrs {
        self.relays
    }

    /// The external relay pair (P, P+1): advertise these as the client ports.
    pub fn external_addrs(&self) -> (SocketAddr, SocketAddr) {
        (self.relays.external, shifted(self.relays.external, 1))
    }

    /// The RTP flow: local port L, relay ports Q and P (raw: the source's port s).
    pub fn rtp(&self) -> Flow<'_> {
        Flow::new(&self.core, 0)
    }

    /// The RTCP flow: local port L+1, relay ports Q+1 and P+1 (raw: the source's port s+1).
    pub fn rtcp(&self) -> Flow<'_> {
        Flow::new(&self.core, 1)
    }

    /// Whether header-less delivery is in effect for both flows (see [`UdpBinding::is_raw`]).
    pub fn is_raw(&self) -> bool {
        self.core.is_raw()
    }

    /// Step 2, UDP Open, naming the RTP source S:s (RTCP is then S:s+1). If the reply grants
    /// header-less delivery, the RTP and RTCP sockets are connected to S:s and S:s+1 before this
    /// returns.
    pub async fn connect(&self, rtp_source: impl Into<Address>) -> Result<RelayAddrs, ClientError> {
        self.core.connect(rtp_source.into()).await
    }

    /// Step 2, UDP Listen.
    pub async fn listen(&self) -> Result<RelayAddrs, ClientError> {
        self.core.listen().await
    }

    /// UDP RELEASE of the pair.
    pub async fn release(&self) -> Result<(), ClientError> {
        self.core.release().await
    }
}

/// Two local UDP sockets on `ip`, ports L (even) and L+1.
async fn local_pair(ip: IpAddr) -> Result<(UdpSocket, UdpSocket), ClientError> {
    for _ in 0..PAIR_ATTEMPTS {
        let first = UdpSocket::bind(SocketAddr::new(ip, 0)).await?;
        let port = first.local_addr()?.port();
        let first_is_even = port % 2 == 0;
        let other = if first_is_even {
            port.checked_add(1)
        } else {
            port.checked_sub(1).filter(|&even| even != 0)
        };
        let Some(other) = other else { continue };
        match UdpSocket::bind(SocketAddr::new(ip, other)).await {
            Ok(second) if first_is_even => return Ok((first, second)),
            Ok(second) => return Ok((second, first)),
            Err(error) if error.kind() == io::ErrorKind::AddrInUse => {}
            Err(error) => return Err(error.into()),
        }
    }
    Err(ClientError::NoLocalPortPair(ip))
}

#[cfg(test)]
#[path = "socket_tests.rs"]
mod tests;
