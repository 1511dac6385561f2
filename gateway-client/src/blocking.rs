//! The synchronous core: the same SOCKS5 and enhanced-mode exchanges as the async layer (both
//! follow the same I/O-free exchange steps), over `std`'s blocking sockets and without a runtime. It is for
//! code that cannot run tokio: the `LD_PRELOAD` shim, which answers an application's `bind`,
//! `getsockname`, `sendto` and `close` on the spot.
//!
//! Multicast: [`Session::subscribe`], [`Session::multicast_send`], [`Session::set_ttl`],
//! [`Session::release_multicast`], with the application's socket read by [`recv_multicast`]
//! and written by [`send_multicast`].
//!
//! Every network wait is bounded by [`Timeouts`], as in the async layer. An enhanced-mode
//! [`Session`] serves one caller at a time (`&mut self`); its requests are answered in order.
//!
//! # Examples
//!
//! The RTSP order with the two-step binding: step 1 before SETUP, step 2 with the media
//! source the SETUP reply names, release at the end.
//!
//! ```no_run
//! use gateway_client::{Family, Timeouts, blocking::Client};
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let proxy = "198.51.100.1:1080".parse()?;
//!     let mut session = Client::connect(proxy, None, Timeouts::default())?.enhanced()?;
//!     // The application's RTP socket, bound where the gateway can reach it.
//!     let rtp = std::net::UdpSocket::bind("198.51.100.2:0")?;
//!     // bind() + getsockname(): step 1. The external relay goes into SETUP's client_port.
//!     let mut binding = session.bind(rtp.local_addr()?, Family::V4)?;
//!     println!("client_port={}", binding.relays().external.port());
//!     // After the SETUP reply: step 2 names the exact media source.
//!     session.connect(&mut binding, "203.0.113.2:6000".parse::<std::net::SocketAddr>()?)?;
//!     // ... PLAY, then receive on `rtp` (8-octet header first) ...
//!     session.release(binding)?;
//!     Ok(())
//! }
//! ```
//!
//! Asking for header-less delivery, as the shim does for an unmodified program's socket: the
//! session only speaks the control protocol and says whether the gateway granted it; the caller
//! keeps its own socket and uses it plainly (with the remote's address) or with the header.
//!
//! ```no_run
//! use gateway_client::{BindOptions, Family, Timeouts, blocking::Client};
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let proxy = "198.51.100.1:1080".parse()?;
//!     let mut session = Client::connect(proxy, None, Timeouts::default())?.enhanced()?;
//!     let app = std::net::UdpSocket::bind("198.51.100.2:0")?;
//!     let raw = BindOptions { raw: true };
//!     let mut binding = session.bind_with(app.local_addr()?, Family::V4, raw)?;
//!     let source: std::net::SocketAddr = "203.0.113.2:6000".parse()?;
//!     session.connect(&mut binding, source)?;
//!     if binding.is_raw() {
//!         // Plain datagrams with the source itself; the gateway is the next hop.
//!         app.connect(source)?;
//!     } else {
//!         // The 8-octet header, to and from binding.relays().internal.
//!     }
//!     Ok(())
//! }
//! ```

use std::{
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use bytes::BytesMut;
use gateway_proto::{
    Address, AuthReply, Command, Family, Method, MethodSelection,
    enhanced::{ControlReply, ControlRequest, Flags, Packet},
};

use super::{
    BindOptions, BindingError, ClientError, RelayAddrs, Timeouts,
    exchange::{self, Tids},
};

/// An authenticated SOCKS5 control connection, ready for one command.
#[derive(Debug)]
pub struct Client {
    stream: TcpStream,
    proxy: SocketAddr,
    method: Method,
    timeouts: Timeouts,
}

impl Client {
    /// Connects to the gateway at `proxy` and authenticates: anonymously without credentials,
    /// with RFC 1929 username/password with them.
    pub fn connect(
        proxy: SocketAddr,
        credentials: Option<(String, String)>,
        timeouts: Timeouts,
    ) -> Result<Self, ClientError> {
        // Checked before connecting: credentials that cannot be sent fail without a connection.
        exchange::auth_request(credentials.as_ref())?;
        let stream = TcpStream::connect_timeout(&proxy, timeouts.connect).map_err(|source| {
            if is_timeout(&source) {
                ClientError::Timeout {
                    operation: "connect to the gateway",
                    after: timeouts.connect,
                }
            } else {
                ClientError::Connect { proxy, source }
            }
        })?;
        Self::over(stream, credentials, timeouts)
    }

    /// Greets and authenticates on `stream`, already connected to the gateway (the shim's way:
    /// the program's own socket becomes the proxied connection).
    #[expect(
        clippy::needless_pass_by_value,
        reason = "the same signature as the async `Client::connect`"
    )]
    pub fn over(
        stream: TcpStream,
        credentials: Option<(String, String)>,
        timeouts: Timeouts,
    ) -> Result<Self, ClientError> {
        let auth = exchange::auth_request(credentials.as_ref())?;
        let proxy = stream.peer_addr()?;
        stream.set_nodelay(true)?;
        let mut wire = Wire::new(
            &stream,
            "SOCKS5 greeting and authentication",
            timeouts.handshake,
        );
        let (greeting, offered) = exchange::greeting(auth.as_ref())?;
        wire.write(&greeting)?;
        let mut selection = [0u8; MethodSelection::LEN];
        wire.read_exact(&mut selection)?;
        let method = exchange::selected_method(selection, &offered)?;
        if let (Method::UserPass, Some(auth)) = (method, &auth) {
            wire.write(&exchange::auth_octets(auth)?)?;
            let mut status = [0u8; AuthReply::LEN];
            wire.read_exact(&mut status)?;
            exchange::check_auth_reply(status)?;
        }
        Ok(Self {
            stream,
            proxy,
            method,
            timeouts,
        })
    }

    /// The authentication method the gateway selected.
    pub fn method(&self) -> Method {
        self.method
    }

    /// The local address of the control connection.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.stream.local_addr()
    }

    /// CONNECT to `target` (an IP socket address or a name the gateway resolves). Returns the
    /// stream, now relayed to the target (with no timeouts set), and the address the gateway
    /// connected from.
    pub fn tcp_connect(
        self,
        target: impl Into<Address>,
    ) -> Result<(TcpStream, Address), ClientError> {
        let bound = self.request(Command::Connect, target.into(), "CONNECT")?;
        self.stream.set_read_timeout(None)?;
        self.stream.set_write_timeout(None)?;
        Ok((self.stream, bound))
    }

    /// RFC 1928 UDP ASSOCIATE for the application's own UDP socket at `from`. Returns the
    /// control connection, which the association lives as long as (keep it open), and the
    /// relay address to send RFC 1928-framed datagrams to (the gateway's address where it
    /// answers with an unspecified one).
    pub fn udp_associate(self, from: SocketAddr) -> Result<(TcpStream, SocketAddr), ClientError> {
        let relay = self.request(Command::UdpAssociate, from.into(), "UDP ASSOCIATE")?;
        let relay = super::reachable(&relay, self.proxy.ip())?;
        self.stream.set_read_timeout(None)?;
        self.stream.set_write_timeout(None)?;
        Ok((self.stream, relay))
    }

    /// Enters the enhanced UDP mode (CMD `04`).
    pub fn enhanced(self) -> Result<Session, ClientError> {
        let mut wire = Wire::new(
            &self.stream,
            "entering the enhanced UDP mode",
            self.timeouts.request,
        );
        wire.write(&exchange::entry_octets()?)?;
        exchange::entry_address(&wire.read_reply()?)?;
        Ok(Session {
            stream: self.stream,
            proxy: self.proxy,
            timeouts: self.timeouts,
            buffer: BytesMut::new(),
            tids: Tids::default(),
            closed: false,
        })
    }

    fn request(
        &self,
        command: Command,
        address: Address,
        operation: &'static str,
    ) -> Result<Address, ClientError> {
        let mut wire = Wire::new(&self.stream, operation, self.timeouts.request);
        wire.write(&exchange::request_octets(command, address)?)?;
        exchange::reply_address(&wire.read_reply()?)
    }
}

/// One enhanced-mode binding made through a [`Session`]: step 1 done, or confirmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    tid: u16,
    relays: RelayAddrs,
    local: SocketAddr,
    /// What every UDP BIND of the binding asks for.
    flags: Flags,
    /// The flags of the gateway's last reply for it.
    reply_flags: Flags,
    remote: Option<Address>,
    /// Whether a confirming reply granted header-less delivery.
    raw: bool,
}

impl Binding {
    /// The relay addresses the gateway gave it.
    pub fn relays(&self) -> RelayAddrs {
        self.relays
    }

    /// The remote step 2 (or a one-step Open) confirmed, if any.
    pub fn remote(&self) -> Option<&Address> {
        self.remote.as_ref()
    }

    /// The flags of the gateway's last reply for this binding. After a step 1 that asked for
    /// RAW, [`Flags::RAW`] there says header-less delivery would be possible (provisional: the
    /// step-2 reply decides); `REMOTE_PENDING` says the binding awaits its remote.
    pub fn reply_flags(&self) -> Flags {
        self.reply_flags
    }

    /// Whether header-less delivery is in effect: the binding asked for it
    /// ([`BindOptions::raw`]), is confirmed with its remote, and the confirming reply echoed
    /// RAW. Then the application's socket exchanges plain datagrams with the remote's own
    /// address; otherwise it uses the 8-octet header with [`RelayAddrs::internal`].
    pub fn is_raw(&self) -> bool {
        self.raw
    }
}

/// A control connection in the enhanced UDP mode. Dropping it closes the connection, and the
/// gateway releases every binding made on it.
#[derive(Debug)]
pub struct Session {
    stream: TcpStream,
    proxy: SocketAddr,
    timeouts: Timeouts,
    buffer: BytesMut,
    tids: Tids,
    /// A request got no answer in time: the connection's state is unknown, so nothing more is
    /// sent on it.
    closed: bool,
}

impl std::os::fd::AsRawFd for Session {
    /// The control connection's descriptor (the shim tells it from the program's own).
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.stream)
    }
}

impl Session {
    /// Whether the control connection ended (closed, or timed out and abandoned): its bindings
    /// are gone on the gateway too.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Step 1 for the application socket at `local`: relay ports reserved, nothing admitted.
    pub fn bind(&mut self, local: SocketAddr, family: Family) -> Result<Binding, ClientError> {
        self.bind_with(local, family, BindOptions::default())
    }

    /// [`Session::bind`] asking for `options`, here and in the step 2 ([`Session::connect`]).
    pub fn bind_with(
        &mut self,
        local: SocketAddr,
        family: Family,
        options: BindOptions,
    ) -> Result<Binding, ClientError> {
        self.first_request(
            local,
            family.unspecified(),
            exchange::bind_flags(options),
            "UDP BIND step 1",
        )
    }

    /// Step 1 of an RTP-PAIR binding: `local` (RTP, even or odd) and its port + 1 (RTCP) on one
    /// binding, with an aligned external pair P, P+1 (docs/protocol.md section 5.5). A gateway
    /// without a free aligned pair refuses it ([`BindingError::PortPairUnavailable`]).
    pub fn bind_pair_with(
        &mut self,
        local: SocketAddr,
        family: Family,
        options: BindOptions,
    ) -> Result<Binding, ClientError> {
        self.first_request(
            local,
            family.unspecified(),
            exchange::bind_flags(options) | Flags::RTP_PAIR,
            "UDP BIND step 1 (RTP pair)",
        )
    }

    /// A one-step Open: bind and confirm `remote` in one request.
    pub fn open(
        &mut self,
        local: SocketAddr,
        remote: impl Into<Address>,
    ) -> Result<Binding, ClientError> {
        self.open_with(local, remote, BindOptions::default())
    }

    /// [`Session::open`] asking for `options`; [`Binding::is_raw`] says whether the gateway
    /// granted header-less delivery.
    pub fn open_with(
        &mut self,
        local: SocketAddr,
        remote: impl Into<Address>,
        options: BindOptions,
    ) -> Result<Binding, ClientError> {
        let remote = remote.into();
        if remote.is_unspecified() {
            return Err(ClientError::UnspecifiedRemote);
        }
        self.first_request(
            local,
            remote,
            exchange::bind_flags(options),
            "UDP BIND (one-step Open)",
        )
    }

    /// Step 2 (Open): confirms the exact `remote` with step 1's TID, AID, LOCAL and flags (RAW
    /// included when step 1 asked for it; [`Binding::is_raw`] then says whether it is granted).
    /// Connecting a confirmed binding again to the same remote is a no-op; another remote is
    /// refused here, before the gateway would answer `13`.
    pub fn connect(
        &mut self,
        binding: &mut Binding,
        remote: impl Into<Address>,
    ) -> Result<RelayAddrs, ClientError> {
        let remote = remote.into();
        if remote.is_unspecified() {
            return Err(ClientError::UnspecifiedRemote);
        }
        match &binding.remote {
            Some(connected) if *connected == remote => return Ok(binding.relays),
            Some(connected) => {
                return Err(ClientError::OtherRemote {
                    connected: connected.clone(),
                    requested: remote,
                });
            }
            None => {}
        }
        exchange::check_raw(binding.flags, binding.local, &remote)?;
        let request = exchange::bind_request(
            binding.flags,
            binding.tid,
            binding.relays.aid,
            binding.local.into(),
            remote.clone(),
        );
        let reply = self.exchange(&request, "UDP BIND step 2 (Open)")?;
        let confirmed = exchange::step_two_relays(&reply, self.proxy.ip(), &binding.relays)?;
        binding.relays = confirmed;
        binding.reply_flags = reply.flags;
        binding.raw = exchange::raw_remote(binding.flags, &reply, &remote).is_some();
        binding.remote = Some(remote);
        Ok(confirmed)
    }

    /// UDP RELEASE: the gateway removes the binding and frees its relay ports.
    #[expect(
        clippy::needless_pass_by_value,
        reason = "a released binding is spent: taking it keeps it from being used again"
    )]
    pub fn release(&mut self, binding: Binding) -> Result<(), ClientError> {
        let Binding { tid, relays, .. } = binding;
        let request = exchange::release_request(tid, relays.aid);
        let reply = self.exchange(&request, "UDP RELEASE")?;
        let result = exchange::refusal(&reply);
        if matches!(result, Ok(()) | Err(BindingError::BadAssociationId)) {
            // Released, or already gone on the gateway: either way the TID is free again.
            self.tids.free(tid);
        }
        Ok(result?)
    }

    /// A request with a fresh TID (step 1 or one-step Open). A refusal frees the TID; a
    /// timeout retires it with the connection.
    fn first_request(
        &mut self,
        local: SocketAddr,
        remote: Address,
        flags: Flags,
        operation: &'static str,
    ) -> Result<Binding, ClientError> {
        exchange::check_raw(flags, local, &remote)?;
        let tid = self.tids.allocate().ok_or(ClientError::TidsExhausted)?;
        let request = exchange::bind_request(flags, tid, 0, local.into(), remote.clone());
        let result = self.exchange(&request, operation).and_then(|reply| {
            let relays = exchange::relays_of(&reply, self.proxy.ip())?;
            Ok((reply, relays))
        });
        match result {
            Ok((reply, relays)) => {
                // Only a confirmed Open can be raw: a step 1's RAW is provisional.
                let remote = (!remote.is_unspecified()).then_some(remote);
                let raw = remote
                    .as_ref()
                    .and_then(|remote| exchange::raw_remote(flags, &reply, remote))
                    .is_some();
                Ok(Binding {
                    tid,
                    relays,
                    local,
                    flags,
                    reply_flags: reply.flags,
                    remote,
                    raw,
                })
            }
            Err(error) => {
                if matches!(error, ClientError::Binding(_)) {
                    self.tids.free(tid);
                }
                Err(error)
            }
        }
    }

    /// Sends `request` and reads packets until the reply with its TID, within
    /// [`Timeouts::control`]. Other packets (a TCP-encapsulated datagram) are skipped.
    fn exchange(
        &mut self,
        request: &ControlRequest,
        operation: &'static str,
    ) -> Result<ControlReply, ClientError> {
        if self.closed {
            return Err(ClientError::Closed);
        }
        let mut frame = BytesMut::with_capacity(request.encoded_len());
        request.encode(&mut frame)?;
        let mut wire = Wire::new(&self.stream, operation, self.timeouts.control);
        let result = wire.write(&frame).and_then(|()| {
            loop {
                match Packet::decode(&mut self.buffer)? {
                    Some(Packet::Reply(reply)) if reply.tid == request.tid => break Ok(reply),
                    Some(_) => {}
                    None if self.buffer.len() > exchange::MAX_BUFFERED => {
                        break Err(ClientError::UnexpectedReply(format!(
                            "{} octets without a whole control packet",
                            self.buffer.len()
                        )));
                    }
                    None => wire.read_some(&mut self.buffer)?,
                }
            }
        });
        if matches!(
            result,
            Err(ClientError::Timeout { .. } | ClientError::Closed)
        ) {
            self.closed = true;
        }
        result
    }
}

/// One bounded exchange on a blocking stream: every read and write shares one deadline.
struct Wire<'a> {
    stream: &'a TcpStream,
    operation: &'static str,
    after: Duration,
    deadline: Instant,
}

impl<'a> Wire<'a> {
    fn new(stream: &'a TcpStream, operation: &'static str, after: Duration) -> Self {
        Self {
            stream,
            operation,
            after,
            deadline: Instant::now() + after,
        }
    }

    fn timeout(&self) -> ClientError {
        ClientError::Timeout {
            operation: self.operation,
            after: self.after,
        }
    }

    /// Time left, at least a millisecond (a zero timeout means "forever" to std).
    fn left(&self) -> Result<Duration, ClientError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(self.timeout())
        } else {
            Ok(left.max(Duration::from_millis(1)))
        }
    }

    fn map(&self, error: io::Error) -> ClientError {
        if is_timeout(&error) {
            self.timeout()
        } else if error.kind() == io::ErrorKind::UnexpectedEof {
            ClientError::Closed
        } else {
            error.into()
        }
    }

    fn write(&mut self, octets: &[u8]) -> Result<(), ClientError> {
        self.stream.set_write_timeout(Some(self.left()?))?;
        let mut stream = self.stream;
        stream.write_all(octets).map_err(|error| self.map(error))
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), ClientError> {
        let mut filled = 0;
        while filled < buf.len() {
            self.stream.set_read_timeout(Some(self.left()?))?;
            let mut stream = self.stream;
            match stream.read(&mut buf[filled..]) {
                Ok(0) => return Err(ClientError::Closed),
                Ok(n) => filled += n,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(self.map(error)),
            }
        }
        Ok(())
    }

    /// Reads whatever arrives (at least one octet) onto the end of `buffer`.
    fn read_some(&mut self, buffer: &mut BytesMut) -> Result<(), ClientError> {
        let mut chunk = [0u8; 4096];
        loop {
            self.stream.set_read_timeout(Some(self.left()?))?;
            let mut stream = self.stream;
            match stream.read(&mut chunk) {
                Ok(0) => return Err(ClientError::Closed),
                Ok(n) => {
                    buffer.extend_from_slice(&chunk[..n]);
                    return Ok(());
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(self.map(error)),
            }
        }
    }

    /// Exactly one reply (`VER REP RSV ATYP ADDR PORT`).
    fn read_reply(&mut self) -> Result<Vec<u8>, ClientError> {
        let mut prefix = [0u8; exchange::REPLY_PREFIX];
        self.read_exact(&mut prefix)?;
        let mut octets = prefix.to_vec();
        octets.resize(exchange::REPLY_PREFIX + exchange::reply_rest(prefix), 0);
        self.read_exact(&mut octets[exchange::REPLY_PREFIX..])?;
        Ok(octets)
    }
}

fn is_timeout(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

#[path = "blocking_multicast.rs"]
mod multicast;
pub use self::multicast::{recv_multicast, send_multicast};

#[cfg(test)]
#[path = "blocking_tests.rs"]
mod tests;
