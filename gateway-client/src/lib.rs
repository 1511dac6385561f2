//! The client library of the gateway: it socksifies an application through SOCKS5 (RFC 1928)
//! with username/password (RFC 1929), TCP CONNECT, RFC 1928 UDP ASSOCIATE, and the enhanced UDP
//! mode with the two-step binding (docs/protocol.md). It builds on stable Rust alone: nothing
//! below it needs the eBPF toolchain.
//!
//! This crate owns the client side of the conversation: one I/O-free module says what each step
//! writes and what each answer means, without I/O; two layers drive it over sockets, bounding
//! every network wait of the control plane with a timeout ([`Timeouts`]) and turning refusals
//! into typed errors ([`ClientError`], [`BindingError`]). It must not depend on the server, the
//! binding state machine or the datapath: it talks to any gateway over the network only.
//!
//! - [`blocking`]: the synchronous core on `std` sockets (for the `LD_PRELOAD` shim):
//!   [`blocking::Client`], [`blocking::Session`] and [`blocking::Binding`].
//! - The async tokio layer:
//!   - [`Client`]: one authenticated control connection; it is spent on one command:
//!     [`Client::tcp_connect`], [`Client::udp_associate`] or [`Client::enhanced`].
//!   - [`UdpAssociation`]: RFC 1928 UDP relaying, adding and stripping the RFC 1928 header.
//!   - [`EnhancedSession`]: a control connection in the enhanced mode, carrying any number of
//!     bindings; replies are matched to requests by TID in a background task.
//!   - [`UdpBinding`]: one enhanced-mode binding that mirrors an application's socket calls
//!     (`bind` is step 1, `connect` step 2 Open, `listen` or `recv` step 2 Listen, `send_to` on
//!     an unbound binding a one-step Open).
//!   - [`RtpPair`]: one RTP-PAIR binding with its RTP and RTCP flows.
//!   - [`MulticastReceiver`] ([`EnhancedSession::subscribe`]): a subscription to a multicast
//!     group, delivered multicast-to-unicast with the header or multicast-to-multicast;
//!     [`MulticastSender`] ([`EnhancedSession::multicast_sender`]): datagrams to a group with a
//!     TTL, changed by SET TTL.
//!
//! # Header-less delivery
//!
//! By default a binding's datagrams travel between the local socket and the gateway's internal
//! relay with the 8-octet enhanced-mode header, which this library adds and strips. A binding
//! made with [`BindOptions::raw`] ([`EnhancedSession::udp_socket_with`],
//! [`EnhancedSession::bind_rtp_pair_with`], [`blocking::Session::bind_with`],
//! [`blocking::Session::open_with`]) asks for RAW (flag `0200`) in step 1 and step 2, or in its
//! one-step Open. Whether it is in effect is decided by the reply that confirms the binding with
//! its remote (a step-1 echo is provisional, a Listen binding is never raw):
//!
//! - granted ([`UdpBinding::is_raw`], [`RtpPair::is_raw`], [`blocking::Binding::is_raw`]): the
//!   local socket exchanges plain datagrams with the remote's own address. The async layer
//!   connects the binding's socket (an RTP pair's two sockets, to the source's ports s and s+1)
//!   to the remote, so the application may also read and write it like an unproxied connected
//!   UDP socket. This host must route to the remote through the gateway (its next hop), which
//!   rewrites the addresses on the way;
//! - not granted: the header, exactly as without the option.
//!
//! Either way the bindings' own `send`, `send_to`, `recv` and `recv_from` do the right thing; in
//! raw mode `send_to` another address than the remote is [`ClientError::OtherRemote`].
//!
//! # Examples
//!
//! The RTSP ordering through the gateway: bind and getsockname before SETUP, connect after the
//! SETUP reply, recv after PLAY.
//!
//! ```no_run
//! use gateway_client::{Client, Family};
//! # async fn rtsp() -> Result<(), Box<dyn std::error::Error>> {
//! let proxy = "198.51.100.1:1080".parse()?;
//! let credentials = Some(("alice".to_owned(), "secret".to_owned()));
//! let session = Client::connect(proxy, credentials).await?.enhanced().await?;
//!
//! // socket() + bind() + getsockname(): step 1. The external relay address is what the
//! // streaming server must send to, so it goes into the SETUP request.
//! let socket = session.udp_socket(Family::V4).await?;
//! let relays = socket.bind().await?;
//! let client_port = relays.external.port();
//! // ... SETUP with `Transport: RTP/AVP;unicast;client_port={client_port}` ...
//!
//! // The SETUP reply names the media source: connect() is step 2 (UDP Open).
//! let source = "203.0.113.2:6000".parse::<std::net::SocketAddr>()?;
//! socket.connect(source).await?;
//! // ... PLAY ...
//!
//! // recv() after the PLAY reply: the datagrams arrive without the 8-octet header.
//! let mut buf = vec![0; 2048];
//! let len = socket.recv(&mut buf).await?;
//! println!("{len} octets of media");
//! socket.release().await?;
//! # Ok(())
//! # }
//! ```

mod binding;
pub mod blocking;
mod error;
mod exchange;
#[cfg(test)]
mod fake_gateway;
mod flow;
mod handshake;
mod multicast;
mod multicast_socket;
mod session;
pub mod shim;
mod socket;
mod udp;

use std::{
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use tokio::net::{TcpStream, UdpSocket};

pub use self::binding::RelayAddrs;
pub use self::error::{BindingError, ClientError};
pub use self::flow::Flow;
pub use self::multicast::{MulticastBinding, MulticastMode, MulticastRole, mu_payload};
pub use self::multicast_socket::{MulticastReceiver, MulticastSender};
pub use self::session::EnhancedSession;
pub use self::socket::{RtpPair, UdpBinding};
pub use self::udp::UdpAssociation;
pub use gateway_proto::{Address, Method, ReplyCode};

/// Bounds on the control plane's network waits. Data-plane receives (`recv` on a binding or an
/// association) wait like a socket does; wrap them in [`tokio::time::timeout`] where needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// The TCP connect to the gateway.
    pub connect: Duration,
    /// Greeting, method selection and RFC 1929 sub-negotiation.
    pub handshake: Duration,
    /// Sending a SOCKS5 request and reading its reply. A CONNECT reply waits for the gateway's own
    /// outbound connect (and its name resolution), so this is longer than the others.
    pub request: Duration,
    /// Sending an enhanced-mode control request and reading its reply.
    pub control: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(10),
            handshake: Duration::from_secs(10),
            request: Duration::from_secs(30),
            control: Duration::from_secs(10),
        }
    }
}

/// What a UDP BIND asks the gateway for beyond receiving, sending and unicast. The default asks
/// for nothing more: datagrams travel through the internal relay with the 8-octet header.
///
/// # Examples
///
/// ```no_run
/// use gateway_client::{BindOptions, Family};
/// # async fn demo(session: gateway_client::EnhancedSession) -> Result<(), gateway_client::ClientError> {
/// let socket = session
///     .udp_socket_with(Family::V4, BindOptions { raw: true })
///     .await?;
/// socket.connect("203.0.113.2:6000".parse::<std::net::SocketAddr>().expect("an address")).await?;
/// if socket.is_raw() {
///     // Granted: `socket.socket()` is connected to 203.0.113.2:6000 and carries plain datagrams.
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct BindOptions {
    /// Ask for header-less delivery (RAW, flag `0200`, docs/protocol.md section 4.3), in step 1
    /// and step 2 or in a one-step Open. Granted only for an Open binding (one exact remote) and
    /// only when the reply echoes the flag; then the local socket exchanges plain datagrams with
    /// the remote's own address (the gateway, which must be this host's next hop to the remote,
    /// rewrites the addresses on the way), exactly as an unproxied socket would. When the gateway
    /// does not grant it, the binding uses the header as without this option.
    ///
    /// It needs an IP remote of LOCAL's address family (the local socket talks to the remote
    /// itself) and a LOCAL port other than 0; a request that cannot meet that fails with
    /// [`ClientError::RawUnavailable`] before anything is sent.
    pub raw: bool,
}

/// The address family of a binding's remote side. It picks the family of the gateway's external
/// relay socket (docs/protocol.md), as `socket(AF_INET, ...)` picks a socket's family.
pub use gateway_proto::Family;

/// An authenticated SOCKS5 control connection to the gateway, ready for one command.
///
/// SOCKS5 carries one command per TCP connection, so each command consumes the client; make a
/// new one (or use one [`EnhancedSession`] for many UDP bindings) for the next.
///
/// # Examples
///
/// ```no_run
/// use gateway_client::{Address, Client};
/// use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let proxy = "198.51.100.1:1080".parse()?;
/// // Anonymous; pass Some((user, password)) for RFC 1929.
/// let client = Client::connect(proxy, None).await?;
/// // A domain name is resolved by the gateway.
/// let (mut stream, bound) = client
///     .tcp_connect(Address::Domain("example.test".into(), 80))
///     .await?;
/// println!("the gateway connected from {bound}");
/// stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await?;
/// let mut answer = Vec::new();
/// stream.read_to_end(&mut answer).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Client {
    stream: TcpStream,
    proxy: SocketAddr,
    method: Method,
    timeouts: Timeouts,
}

impl Client {
    /// Connects to the gateway at `proxy` and authenticates: anonymously without credentials,
    /// with RFC 1929 username/password with them. Uses the default [`Timeouts`].
    pub async fn connect(
        proxy: SocketAddr,
        credentials: Option<(String, String)>,
    ) -> Result<Self, ClientError> {
        Self::connect_with(proxy, credentials, Timeouts::default()).await
    }

    /// [`Client::connect`] with explicit timeouts.
    pub async fn connect_with(
        proxy: SocketAddr,
        credentials: Option<(String, String)>,
        timeouts: Timeouts,
    ) -> Result<Self, ClientError> {
        let auth = exchange::auth_request(credentials.as_ref())?;
        let stream = bounded("connect to the gateway", timeouts.connect, async {
            TcpStream::connect(proxy)
                .await
                .map_err(|source| ClientError::Connect { proxy, source })
        })
        .await?;
        // Control messages are small and latency-bound.
        stream.set_nodelay(true)?;
        let mut client = Self {
            stream,
            proxy,
            method: Method::NoAuth,
            timeouts,
        };
        client.method = bounded(
            "SOCKS5 greeting and authentication",
            timeouts.handshake,
            handshake::negotiate(&mut client.stream, auth.as_ref()),
        )
        .await?;
        Ok(client)
    }

    /// The gateway's control address.
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy
    }

    /// The local address of the control connection. Its IP is the address the gateway accepts
    /// as LOCAL and as the UDP client.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.stream.local_addr()
    }

    /// The authentication method the gateway selected.
    pub fn method(&self) -> Method {
        self.method
    }

    /// CONNECT to `target` (an IP socket address or a domain name the gateway resolves). Returns
    /// the stream, now relayed to the target, and the address the gateway connected from.
    pub async fn tcp_connect(
        mut self,
        target: impl Into<Address>,
    ) -> Result<(TcpStream, Address), ClientError> {
        let bound = bounded(
            "CONNECT",
            self.timeouts.request,
            handshake::request(
                &mut self.stream,
                gateway_proto::Command::Connect,
                target.into(),
            ),
        )
        .await?;
        Ok((self.stream, bound))
    }

    /// RFC 1928 UDP ASSOCIATE from a new local UDP socket on the control connection's local IP.
    /// The association lives as long as the returned value.
    pub async fn udp_associate(mut self) -> Result<UdpAssociation, ClientError> {
        let local_ip = self.stream.local_addr()?.ip();
        let socket = UdpSocket::bind(SocketAddr::new(local_ip, 0)).await?;
        let from = socket.local_addr()?;
        let relay = bounded(
            "UDP ASSOCIATE",
            self.timeouts.request,
            handshake::request(
                &mut self.stream,
                gateway_proto::Command::UdpAssociate,
                from.into(),
            ),
        )
        .await?;
        let relay = reachable(&relay, self.proxy.ip())?;
        Ok(UdpAssociation::new(self.stream, socket, relay))
    }

    /// Enters the enhanced UDP mode (CMD `04`). The connection then carries only control
    /// packets; see [`EnhancedSession`].
    pub async fn enhanced(mut self) -> Result<EnhancedSession, ClientError> {
        bounded(
            "entering the enhanced UDP mode",
            self.timeouts.request,
            handshake::enter_enhanced(&mut self.stream),
        )
        .await?;
        EnhancedSession::start(self.stream, self.proxy, self.timeouts)
    }
}

/// Runs `future` within `after`, or fails with [`ClientError::Timeout`] naming `operation`.
async fn bounded<T>(
    operation: &'static str,
    after: Duration,
    future: impl Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    tokio::time::timeout(after, future)
        .await
        .map_err(|_| ClientError::Timeout { operation, after })?
}

/// An IP socket address from a reply's address. An unspecified IP means "the address you
/// talk to me on" (what many SOCKS servers answer), so it becomes `fallback`.
fn reachable(address: &Address, fallback: IpAddr) -> Result<SocketAddr, ClientError> {
    match address {
        Address::Ip(addr) if addr.ip().is_unspecified() => {
            Ok(SocketAddr::new(fallback, addr.port()))
        }
        Address::Ip(addr) => Ok(*addr),
        Address::Domain(..) => Err(ClientError::UnexpectedReply(format!(
            "a domain name ({address}) as a relay address"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn family_unspecified_and_canonical() {
        assert_eq!(Family::V4.unspecified(), Address::UNSPECIFIED_V4);
        assert!(Family::V6.unspecified().is_unspecified());
        assert_eq!(Family::of("::ffff:192.0.2.1".parse().unwrap()), Family::V4);
        assert_eq!(Family::of("2001:db8::1".parse().unwrap()), Family::V6);
    }

    #[test]
    fn unspecified_relay_becomes_the_proxy_address() {
        let proxy: IpAddr = "198.51.100.1".parse().unwrap();
        let zero: SocketAddr = "0.0.0.0:4000".parse().unwrap();
        assert_eq!(
            reachable(&zero.into(), proxy).unwrap(),
            "198.51.100.1:4000".parse().unwrap()
        );
        let given: SocketAddr = "198.51.100.9:4000".parse().unwrap();
        assert_eq!(reachable(&given.into(), proxy).unwrap(), given);
        assert!(matches!(
            reachable(&Address::Domain("relay.test".into(), 1), proxy),
            Err(ClientError::UnexpectedReply(_))
        ));
    }
}
