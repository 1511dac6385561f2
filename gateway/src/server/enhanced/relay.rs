//! The userspace relay of one enhanced-mode binding: its sockets and the task that moves
//! datagrams between the client and the remote (protocol.md sections 3 and 4).
//!
//! One flow per relay port pair: the internal relay socket (client side, 8-octet header) and the
//! external relay socket (remote side, an [`OutsideSocket`] that accepts only datagrams that
//! arrived on the external interface). An RTP-PAIR binding has two flows, RTP on Q/P and RTCP on
//! Q+1/P+1, talking to S:s and S:s+1 and to the client's L and L+1. Rules: a half-bound binding
//! relays nothing; datagrams from another client address, with another AID, a non-zero FRAG or a
//! bad header are dropped; the client's port is latched from its first datagram when LOCAL's port
//! was 0, and nothing goes to the client before that; the remote side talks to the bound remote
//! only (Open), to any allowed remote (Listen, the remote's address after the header both ways,
//! and only to remotes that have sent), or to any port of one host (host-level match, answered on
//! the port last heard from). TCP-encapsulated bindings get the remote's datagrams on the control
//! connection (`03 SIZE AID DATA`). Traffic is reported to the machine at most once a second.
//!
//! A RAW (header-less) binding is relayed in the kernel; what reaches this relay is what the
//! kernel hands up (a datagram too big for the internal link, which IP then fragments). It goes
//! to the client without a header and from the remote's own address and port, as the kernel
//! would send it: through a transparent socket (`IP_TRANSPARENT`, which needs `CAP_NET_ADMIN`)
//! bound to that address, opened on the first such datagram. The client's RAW datagrams are
//! addressed to the remote and never reach a relay socket, so this relay sends none of them.
//!
//! Owns the sockets: they close when the task ends (it is aborted on release, expiry and
//! connection close). It must not change the binding table (beyond reporting traffic) or touch
//! the kernel gate, and it must never relay for another binding's AID.

use std::{
    collections::HashSet,
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use tokio::{
    net::UdpSocket,
    sync::{mpsc, watch},
    task::AbortHandle,
};
use tracing::{debug, warn};

use super::EnhancedMode;
use crate::{
    binding::{BindingInfo, BindingState, Family, RelayPorts, RemoteMatch, flags},
    server::{
        Services,
        outside::{OutsideSocket, Received, with_scratch},
    },
};
use gateway_proto::{
    Address,
    enhanced::{DatagramHeader, TcpDatagram},
};

/// At most one traffic report per binding per this interval.
const REPORT_EVERY: Duration = Duration::from_secs(1);
/// Remotes a Listen binding remembers per flow (the ones the client may answer).
const MAX_LISTEN_PEERS: usize = 4096;
/// Pause after a failed receive.
const RECV_ERROR_PAUSE: Duration = Duration::from_millis(50);
/// TCP-encapsulated datagrams from the client waiting for the relay.
const FROM_CLIENT_BACKLOG: usize = 256;

/// What the relay needs to know of its binding; updated by the session on step 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RelayState {
    /// `None` while half-bound (nothing is relayed).
    remote: Option<RemoteMatch>,
    /// The client's LOCAL; port 0 until latched.
    client: SocketAddr,
    flags: u16,
}

impl RelayState {
    fn of(info: &BindingInfo) -> Self {
        Self {
            remote: match info.state {
                BindingState::HalfBound { .. } => None,
                BindingState::Confirmed { remote, .. } => Some(remote),
            },
            client: SocketAddr::new(info.local.ip().to_canonical(), info.local.port()),
            flags: info.flags,
        }
    }
}

/// The session's handle on one relay.
#[derive(Debug)]
pub(super) struct RelayControl {
    /// The binding's TID (0 if none).
    pub tid: u16,
    /// The family of its external relay address.
    pub family: Family,
    state: watch::Sender<RelayState>,
    from_client: mpsc::Sender<Bytes>,
}

impl RelayControl {
    /// Tells the relay the binding's current state (after a step 2).
    pub fn update(&self, info: &BindingInfo) {
        self.state.send_replace(RelayState::of(info));
    }

    /// Whether the binding's datagrams travel on the control connection.
    pub fn tcp_encapsulated(&self) -> bool {
        self.state.borrow().flags & flags::TCP_ENCAPSULATED != 0
    }

    /// Hands a TCP-encapsulated datagram's DATA to the relay; false if its backlog is full.
    pub fn forward(&self, data: Bytes) -> bool {
        self.from_client.try_send(data).is_ok()
    }
}

/// One relay port pair: the internal socket (client side) and the external one (remote side).
#[derive(Debug)]
pub(super) struct Flow {
    inside: UdpSocket,
    outside: OutsideSocket,
}

/// Binds the relay sockets of `ports`: Q and P, and Q+1 and P+1 for an RTP pair.
pub(super) async fn bind_flows(ports: &RelayPorts, services: &Services) -> io::Result<Vec<Flow>> {
    let mut flows = Vec::with_capacity(2);
    for offset in 0..if ports.pair { 2 } else { 1 } {
        let (Some(internal), Some(external)) = (
            with_offset(ports.internal, offset),
            with_offset(ports.external, offset),
        ) else {
            return Err(io::Error::other("relay port pair past 65535"));
        };
        let inside = retry_in_use(|| UdpSocket::bind(internal)).await?;
        services.tie_inside(&inside)?;
        let outside =
            retry_in_use(|| OutsideSocket::bind_port(external, &services.external)).await?;
        flows.push(Flow { inside, outside });
    }
    Ok(flows)
}

/// Binds, retrying briefly while the port is still in use: a port released a moment ago may
/// still be held by the aborted relay task of its previous binding until that task is dropped,
/// which the runtime does on its next turn. Bounded: about 20 ms, then the error stands.
async fn retry_in_use<T, F: Future<Output = io::Result<T>>>(
    mut bind: impl FnMut() -> F,
) -> io::Result<T> {
    for _ in 0..20 {
        match bind().await {
            Err(error) if error.kind() == io::ErrorKind::AddrInUse => {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            other => return other,
        }
    }
    bind().await
}

/// `addr` with its port moved up by `offset` (the flow number).
fn with_offset(addr: SocketAddr, offset: u16) -> Option<SocketAddr> {
    Some(SocketAddr::new(addr.ip(), addr.port().checked_add(offset)?))
}

/// What [`spawn`] needs.
pub(super) struct Spawn {
    pub mode: Arc<EnhancedMode>,
    pub info: BindingInfo,
    pub flows: Vec<Flow>,
    /// Where encoded `03` packets for the client go.
    pub to_client: mpsc::Sender<Bytes>,
    /// The internal interface, which RAW deliveries leave by (`None`: untied).
    pub internal_device: Option<String>,
}

/// Starts the relay task of one binding; its sockets live as long as the task.
pub(super) fn spawn(spawn: Spawn) -> (RelayControl, AbortHandle) {
    let initial = RelayState::of(&spawn.info);
    let (state_tx, state) = watch::channel(initial);
    let (from_client_tx, from_client) = mpsc::channel(FROM_CLIENT_BACKLOG);
    let relay = Relay {
        mode: spawn.mode,
        aid: spawn.info.aid,
        flows: spawn.flows,
        state,
        latched: [0; 2],
        host_peer: [None; 2],
        listen_peers: [HashSet::new(), HashSet::new()],
        from_client,
        to_client: spawn.to_client,
        internal_device: spawn.internal_device,
        raw_senders: [None, None],
        last_report: None,
        stats: RelayStats::default(),
    };
    let task = tokio::spawn(relay.run());
    let control = RelayControl {
        tid: spawn.info.tid,
        family: Family::of(spawn.info.ports.external.ip()),
        state: state_tx,
        from_client: from_client_tx,
    };
    (control, task.abort_handle())
}

/// Counters of one relay, logged when it ends.
#[derive(Debug, Default)]
struct RelayStats {
    to_remote: u64,
    to_client: u64,
    dropped_half_bound: u64,
    dropped_wrong_client: u64,
    dropped_wrong_aid: u64,
    dropped_malformed: u64,
    dropped_fragment: u64,
    dropped_direction: u64,
    dropped_unknown_remote: u64,
    dropped_wrong_interface: u64,
    dropped_not_latched: u64,
    dropped_too_large: u64,
    dropped_backlog: u64,
    send_errors: u64,
    recv_errors: u64,
}

struct Relay {
    mode: Arc<EnhancedMode>,
    aid: u32,
    flows: Vec<Flow>,
    state: watch::Receiver<RelayState>,
    /// Client ports latched per flow (LOCAL port 0).
    latched: [u16; 2],
    /// Host-level match: the remote port last heard from, per flow.
    host_peer: [Option<SocketAddr>; 2],
    /// Listen: remotes that have sent, per flow.
    listen_peers: [HashSet<SocketAddr>; 2],
    from_client: mpsc::Receiver<Bytes>,
    to_client: mpsc::Sender<Bytes>,
    internal_device: Option<String>,
    /// RAW: per flow, the transparent socket bound to the remote's address, once opened.
    raw_senders: [Option<UdpSocket>; 2],
    last_report: Option<tokio::time::Instant>,
    stats: RelayStats,
}

impl Drop for Relay {
    fn drop(&mut self) {
        debug!(aid = self.aid, stats = ?self.stats, "relay closed");
    }
}

async fn inside_readable(flow: Option<&Flow>) -> io::Result<()> {
    match flow {
        Some(flow) => flow.inside.readable().await,
        None => std::future::pending().await,
    }
}

async fn outside_readable(flow: Option<&Flow>) -> io::Result<()> {
    match flow {
        Some(flow) => flow.outside.readable().await,
        None => std::future::pending().await,
    }
}

/// Which socket is ready.
enum Ready {
    Inside(usize),
    Outside(usize),
    Tcp(Bytes),
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

impl Relay {
    async fn run(mut self) {
        // No buffer per binding: wait for readiness, then read into the thread's scratch buffer
        // and copy out exactly the datagram (the slow path; the kernel relays the fast one).
        loop {
            let ready = tokio::select! {
                r = inside_readable(self.flows.first()) => r.map(|()| Ready::Inside(0)),
                r = inside_readable(self.flows.get(1)) => r.map(|()| Ready::Inside(1)),
                r = outside_readable(self.flows.first()) => r.map(|()| Ready::Outside(0)),
                r = outside_readable(self.flows.get(1)) => r.map(|()| Ready::Outside(1)),
                Some(data) = self.from_client.recv() => Ok(Ready::Tcp(data)),
            };
            let result = match ready {
                Ok(Ready::Inside(flow)) => with_scratch(|buf| {
                    self.flows[flow]
                        .inside
                        .try_recv_from(buf)
                        .map(|(len, from)| {
                            (
                                flow,
                                Event::Client {
                                    data: buf[..len].to_vec(),
                                    from,
                                },
                            )
                        })
                }),
                Ok(Ready::Outside(flow)) => with_scratch(|buf| {
                    self.flows[flow].outside.try_recv(buf).map(|received| {
                        let data = match received {
                            Received::Datagram { len, .. } => buf[..len].to_vec(),
                            Received::WrongInterface { .. } => Vec::new(),
                        };
                        (flow, Event::Remote(received, data))
                    })
                }),
                Ok(Ready::Tcp(data)) => Ok((0, Event::Tcp(data))),
                Err(error) => Err(error),
            };
            let (flow, event) = match result {
                Ok(event) => event,
                // Readiness was spurious: wait again.
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                Err(error) => {
                    // Not expected on unconnected UDP sockets; never spin on a persistent one.
                    self.stats.recv_errors += 1;
                    if self.stats.recv_errors.is_power_of_two() {
                        warn!(aid = self.aid, %error, count = self.stats.recv_errors,
                            "relay socket receive failed");
                    }
                    tokio::time::sleep(RECV_ERROR_PAUSE).await;
                    continue;
                }
            };
            match event {
                Event::Client { data, from } => self.on_client_datagram(flow, &data, from).await,
                Event::Remote(received, data) => {
                    self.on_remote_datagram(flow, received, &data).await;
                }
                Event::Tcp(data) => self.on_tcp_datagram(data).await,
            }
        }
    }

    /// The client's port on `flow`: LOCAL's (plus the flow number), or the latched one.
    fn client_port(&self, flow: usize, state: &RelayState) -> Option<u16> {
        match state.client.port() {
            0 => Some(self.latched[flow]).filter(|port| *port != 0),
            port => port.checked_add(u16::try_from(flow).ok()?),
        }
    }

    /// A UDP datagram from inside on `flow`'s internal relay socket.
    async fn on_client_datagram(&mut self, flow: usize, datagram: &[u8], from: SocketAddr) {
        let state = *self.state.borrow();
        let Some(remote) = state.remote else {
            self.stats.dropped_half_bound += 1;
            return;
        };
        if from.ip().to_canonical() != state.client.ip() {
            self.stats.dropped_wrong_client += 1;
            return;
        }
        if DatagramHeader::peek_aid(datagram) != Some(self.aid) {
            self.stats.dropped_wrong_aid += 1;
            return;
        }
        let mut payload = datagram;
        let header = if remote == RemoteMatch::Any {
            DatagramHeader::decode_with_remote(&mut payload)
        } else {
            DatagramHeader::decode(&mut payload)
        };
        let Ok(header) = header else {
            self.stats.dropped_malformed += 1;
            return;
        };
        if !header.is_whole() {
            self.stats.dropped_fragment += 1;
            return;
        }
        match self.client_port(flow, &state) {
            Some(port) if port != from.port() => {
                self.stats.dropped_wrong_client += 1;
                return;
            }
            Some(_) => {}
            None => self.latched[flow] = from.port(),
        }
        self.send_to_remote(flow, &state, remote, header.remote.as_ref(), payload)
            .await;
    }

    /// DATA of a `03` packet from the control connection (flow 0).
    async fn on_tcp_datagram(&mut self, data: Bytes) {
        let state = *self.state.borrow();
        let Some(remote) = state.remote else {
            self.stats.dropped_half_bound += 1;
            return;
        };
        let mut payload = &data[..];
        let target = if remote == RemoteMatch::Any {
            let Ok(Some(address)) = Address::decode(&mut payload) else {
                self.stats.dropped_malformed += 1;
                return;
            };
            Some(address)
        } else {
            None
        };
        self.send_to_remote(0, &state, remote, target.as_ref(), payload)
            .await;
    }

    /// Sends `payload` to the remote of `flow`.
    async fn send_to_remote(
        &mut self,
        flow: usize,
        state: &RelayState,
        remote: RemoteMatch,
        named: Option<&Address>,
        payload: &[u8],
    ) {
        if state.flags & flags::SEND == 0 {
            self.stats.dropped_direction += 1;
            return;
        }
        let target = match remote {
            RemoteMatch::Exact(addr) => with_offset(addr, u16::try_from(flow).unwrap_or(0)),
            RemoteMatch::Host(_) => self.host_peer[flow],
            RemoteMatch::Any => match named {
                Some(Address::Ip(addr)) => {
                    Some(canonical(*addr)).filter(|a| self.listen_peers[flow].contains(a))
                }
                _ => None,
            },
        };
        let Some(target) = target else {
            self.stats.dropped_unknown_remote += 1;
            return;
        };
        match self.flows[flow].outside.send_to(payload, target).await {
            Ok(_) => {
                self.stats.to_remote += 1;
                self.report_traffic();
            }
            Err(error) => {
                self.stats.send_errors += 1;
                debug!(aid = self.aid, %target, %error, "send to the remote failed");
            }
        }
    }

    /// A datagram on `flow`'s external relay socket.
    async fn on_remote_datagram(&mut self, flow: usize, received: Received, buf: &[u8]) {
        let (len, from) = match received {
            Received::Datagram { len, from } => (len, canonical(from)),
            Received::WrongInterface { from, ifindex } => {
                debug!(aid = self.aid, %from, ifindex, "datagram from the wrong interface");
                self.stats.dropped_wrong_interface += 1;
                return;
            }
        };
        let state = *self.state.borrow();
        let Some(remote) = state.remote else {
            self.stats.dropped_half_bound += 1;
            return;
        };
        let admitted = match remote {
            RemoteMatch::Exact(addr) => {
                with_offset(addr, u16::try_from(flow).unwrap_or(0)) == Some(from)
            }
            RemoteMatch::Host(ip) => from.ip() == ip,
            RemoteMatch::Any => self.mode.remote_allowed_now(from.ip()),
        };
        if !admitted {
            self.stats.dropped_unknown_remote += 1;
            return;
        }
        if state.flags & flags::RECEIVE == 0 {
            self.stats.dropped_direction += 1;
            return;
        }
        let header = match remote {
            RemoteMatch::Any => {
                let peers = &mut self.listen_peers[flow];
                if peers.len() < MAX_LISTEN_PEERS {
                    peers.insert(from);
                }
                DatagramHeader::with_remote(self.aid, Address::Ip(from))
            }
            RemoteMatch::Host(_) => {
                self.host_peer[flow] = Some(from);
                DatagramHeader::new(self.aid)
            }
            RemoteMatch::Exact(_) => DatagramHeader::new(self.aid),
        };
        let payload = &buf[..len];
        if state.flags & flags::RAW != 0 {
            self.send_raw_to_client(flow, &state, from, payload).await;
        } else if state.flags & flags::TCP_ENCAPSULATED != 0 {
            self.send_to_client_tcp(header.remote.as_ref(), payload);
        } else {
            self.send_to_client_udp(flow, &state, &header, payload)
                .await;
        }
    }

    async fn send_to_client_udp(
        &mut self,
        flow: usize,
        state: &RelayState,
        header: &DatagramHeader,
        payload: &[u8],
    ) {
        let Some(port) = self.client_port(flow, state) else {
            // Nothing is admitted inbound before the client's port is latched.
            self.stats.dropped_not_latched += 1;
            return;
        };
        let client = SocketAddr::new(state.client.ip(), port);
        let mut out = BytesMut::with_capacity(header.encoded_len() + payload.len());
        if header.encode(&mut out).is_err() {
            self.stats.dropped_malformed += 1;
            return;
        }
        out.extend_from_slice(payload);
        if out.len() > max_udp_payload(client.ip()) {
            // The header would push it past what one datagram carries: a counted drop.
            self.stats.dropped_too_large += 1;
            return;
        }
        match self.flows[flow].inside.send_to(&out, client).await {
            Ok(_) => {
                self.stats.to_client += 1;
                self.report_traffic();
            }
            Err(error) => {
                self.stats.send_errors += 1;
                debug!(aid = self.aid, %client, %error, "send to the client failed");
            }
        }
    }

    /// RAW: `payload` as is, to the client from the remote's address `from`.
    async fn send_raw_to_client(
        &mut self,
        flow: usize,
        state: &RelayState,
        from: SocketAddr,
        payload: &[u8],
    ) {
        let Some(port) = self.client_port(flow, state) else {
            self.stats.dropped_not_latched += 1;
            return;
        };
        let client = SocketAddr::new(state.client.ip(), port);
        if self.raw_senders[flow].is_none() {
            match transparent_socket(from, self.internal_device.as_deref()) {
                Ok(socket) => self.raw_senders[flow] = Some(socket),
                Err(error) => {
                    self.stats.send_errors += 1;
                    warn!(aid = self.aid, %from, %error,
                        "cannot open a transparent socket for RAW delivery (needs CAP_NET_ADMIN)");
                    return;
                }
            }
        }
        let Some(socket) = &self.raw_senders[flow] else {
            return;
        };
        match socket.send_to(payload, client).await {
            Ok(_) => {
                self.stats.to_client += 1;
                self.report_traffic();
            }
            Err(error) => {
                self.stats.send_errors += 1;
                debug!(aid = self.aid, %client, %error, "RAW send to the client failed");
            }
        }
    }

    fn send_to_client_tcp(&mut self, remote: Option<&Address>, payload: &[u8]) {
        let mut data = BytesMut::new();
        if let Some(remote) = remote
            && remote.encode(&mut data).is_err()
        {
            self.stats.dropped_malformed += 1;
            return;
        }
        data.extend_from_slice(payload);
        if data.len() > TcpDatagram::MAX_DATA_LEN {
            self.stats.dropped_too_large += 1;
            return;
        }
        let packet = TcpDatagram {
            aid: self.aid,
            data: data.freeze(),
        };
        let mut out = BytesMut::with_capacity(packet.encoded_len());
        if packet.encode(&mut out).is_err() {
            self.stats.dropped_too_large += 1;
            return;
        }
        if self.to_client.try_send(out.freeze()).is_ok() {
            self.stats.to_client += 1;
            self.report_traffic();
        } else {
            self.stats.dropped_backlog += 1;
        }
    }

    /// Tells the machine the binding is in use, at most once per [`REPORT_EVERY`].
    fn report_traffic(&mut self) {
        let now = tokio::time::Instant::now();
        if self
            .last_report
            .is_some_and(|last| now.duration_since(last) < REPORT_EVERY)
        {
            return;
        }
        self.last_report = Some(now);
        self.mode.traffic(self.aid, now.into_std());
    }
}

/// What woke the relay.
enum Event {
    Client {
        data: Vec<u8>,
        from: SocketAddr,
    },
    /// The datagram's bytes follow the receive result (empty when it is dropped unread).
    Remote(Received, Vec<u8>),
    Tcp(Bytes),
}

/// The largest UDP payload of one datagram to `ip` (IPv4: 65535 - 20 - 8; IPv6: 65535 - 8).
/// A UDP socket bound to `from`, an address of another host (`IP_TRANSPARENT` /
/// `IPV6_TRANSPARENT`), tied to the internal interface: what it sends has `from` as source.
/// `SO_REUSEADDR`, since bindings of several clients may name the same remote.
fn transparent_socket(from: SocketAddr, device: Option<&str>) -> io::Result<UdpSocket> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrStorage, bind, setsockopt, socket,
        sockopt::{IpTransparent, ReuseAddr},
    };
    use std::os::fd::AsRawFd as _;
    let family = if from.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(
        family,
        SockType::Datagram,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    if from.is_ipv4() {
        setsockopt(&fd, IpTransparent, &true)?;
    } else {
        let on: libc::c_int = 1;
        // SAFETY: a valid socket and a c_int option value of the given size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_IPV6,
                libc::IPV6_TRANSPARENT,
                (&raw const on).cast(),
                libc::socklen_t::try_from(size_of::<libc::c_int>()).unwrap_or(4),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    setsockopt(&fd, ReuseAddr, &true)?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(from))?;
    let socket = UdpSocket::from_std(std::net::UdpSocket::from(fd))?;
    crate::netif::tie_to_device(&socket, device)?;
    Ok(socket)
}

fn max_udp_payload(ip: IpAddr) -> usize {
    match ip {
        IpAddr::V4(_) => 65_507,
        IpAddr::V6(_) => 65_527,
    }
}

#[cfg(test)]
mod tests {
    use bytes::Buf as _;

    use super::*;

    #[test]
    fn offsets() {
        let addr: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        assert_eq!(
            with_offset(addr, 1),
            Some("127.0.0.1:40001".parse().unwrap())
        );
        assert_eq!(with_offset("127.0.0.1:65535".parse().unwrap(), 1), None);
    }

    #[test]
    fn bytes_is_buf() {
        // TCP-encapsulated DATA of a Listen binding starts with the remote's address.
        let mut data = BytesMut::new();
        Address::Ip("203.0.113.2:6000".parse().unwrap())
            .encode(&mut data)
            .unwrap();
        data.extend_from_slice(b"hi");
        let mut payload = &data[..];
        let address = Address::decode(&mut payload).unwrap().unwrap();
        assert_eq!(address, Address::Ip("203.0.113.2:6000".parse().unwrap()));
        assert_eq!(payload.remaining(), 2);
    }
}
