//! The userspace relay of the enhanced mode: every binding's slow path, on the shared relay
//! sockets (protocol.md sections 3 and 4). A binding holds no socket and no task: it is an entry
//! in one table, found by the relay address a datagram was sent to.
//!
//! Per flow a binding has an internal relay address (client side, 8-octet header) and an
//! external one (remote side). An RTP-PAIR binding has two flows, RTP on Q/P and RTCP on
//! Q+1/P+1, talking to S:s and S:s+1 and to the client's L and L+1. Rules: a half-bound binding
//! relays nothing; datagrams from another client address, with another AID, a non-zero FRAG or a
//! bad header are dropped; the client's port is latched from its first datagram when LOCAL's port
//! was 0, and nothing goes to the client before that; the remote side talks to the bound remote
//! only (Open), to any allowed remote (Listen, the remote's address after the header both ways,
//! and only to remotes that have sent), or to any port of one host (host-level match, answered on
//! the port last heard from). TCP-encapsulated bindings get the remote's datagrams on the control
//! connection (`03 SIZE AID DATA`). A datagram that arrived on the other side's interface is
//! dropped. Traffic is reported to the machine at most once a second per binding.
//!
//! A RAW (header-less) binding is relayed in the kernel; what reaches this relay is what the
//! kernel hands up (a datagram too big for the internal link). It goes to the client without a
//! header and from the remote's own address and port, as the kernel would send it. The client's
//! RAW datagrams are addressed to the remote and never reach a relay port.
//!
//! Every drop is counted by reason ([`RelayDrop`]). It must not change the binding table
//! (beyond reporting traffic) or touch the kernel gate, and it must never relay for another
//! binding's AID or hand one connection's datagrams to another.

use std::{
    collections::{HashMap, HashSet},
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{
    EnhancedMode,
    sockets::{Arrival, RelaySockets, Side},
};
use crate::{
    binding::{BindingInfo, BindingState, ConnId, RelayPorts, RemoteMatch, flags},
    server::outside::with_scratch,
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

/// Why the relay dropped a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayDrop {
    /// To a relay port no binding holds.
    UnknownPort,
    /// The binding is half-bound: nothing is relayed yet.
    HalfBound,
    /// From another client address or port than the binding's.
    WrongClient,
    /// The header names another AID.
    WrongAid,
    /// A bad header, or a Listen datagram without a usable remote address.
    Malformed,
    /// FRAG is not zero (fragmentation is not supported).
    Fragment,
    /// A direction the binding's flags do not allow.
    Direction,
    /// From or to a remote the binding does not admit.
    UnknownRemote,
    /// Arrived on the other side's interface.
    WrongInterface,
    /// For the client before its port was latched.
    NotLatched,
    /// Too large for one datagram once framed.
    TooLarge,
    /// The control connection's queue is full (TCP-encapsulated).
    Backlog,
    /// The kernel refused to send it.
    SendError,
}

impl RelayDrop {
    pub const ALL: [RelayDrop; 13] = [
        RelayDrop::UnknownPort,
        RelayDrop::HalfBound,
        RelayDrop::WrongClient,
        RelayDrop::WrongAid,
        RelayDrop::Malformed,
        RelayDrop::Fragment,
        RelayDrop::Direction,
        RelayDrop::UnknownRemote,
        RelayDrop::WrongInterface,
        RelayDrop::NotLatched,
        RelayDrop::TooLarge,
        RelayDrop::Backlog,
        RelayDrop::SendError,
    ];

    /// The name used in logs and reports.
    pub fn name(self) -> &'static str {
        match self {
            RelayDrop::UnknownPort => "unknown_port",
            RelayDrop::HalfBound => "half_bound",
            RelayDrop::WrongClient => "wrong_client",
            RelayDrop::WrongAid => "wrong_aid",
            RelayDrop::Malformed => "malformed",
            RelayDrop::Fragment => "fragment",
            RelayDrop::Direction => "direction",
            RelayDrop::UnknownRemote => "unknown_remote",
            RelayDrop::WrongInterface => "wrong_interface",
            RelayDrop::NotLatched => "not_latched",
            RelayDrop::TooLarge => "too_large",
            RelayDrop::Backlog => "backlog",
            RelayDrop::SendError => "send_error",
        }
    }
}

/// What the relay needs to know of its binding; updated by the session on step 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RelayState {
    /// `None` while half-bound (nothing is relayed).
    remote: Option<RemoteMatch>,
    /// The client's LOCAL; port 0 until latched.
    client: SocketAddr,
    flags: u16,
    /// TTL of a multicast send binding's datagrams (0: the default).
    ttl: u8,
}

impl RelayState {
    fn of(info: &BindingInfo) -> Self {
        Self {
            remote: match info.state {
                BindingState::HalfBound { .. } => None,
                BindingState::Confirmed { remote, .. } => Some(remote),
            },
            client: canonical(info.local),
            flags: info.flags,
            ttl: info.ttl,
        }
    }
}

/// One binding in the relay table.
#[derive(Debug)]
struct Entry {
    conn: ConnId,
    ports: RelayPorts,
    state: RelayState,
    /// Client ports latched per flow (LOCAL port 0).
    latched: [u16; 2],
    /// What only host-level and Listen bindings need (most bindings are Opens: none).
    peers: Option<Box<Peers>>,
    /// Where encoded `03` packets for the client go (TCP-encapsulated bindings).
    to_client: mpsc::Sender<Bytes>,
    last_report: Option<tokio::time::Instant>,
    sent_to_remote: u64,
    sent_to_client: u64,
}

/// The remotes a host-level or Listen binding has heard from.
#[derive(Debug, Default)]
struct Peers {
    /// Host-level match: the remote port last heard from, per flow.
    host: [Option<SocketAddr>; 2],
    /// Listen: remotes that have sent, per flow.
    listen: [HashSet<SocketAddr>; 2],
}

impl Entry {
    fn peers(&mut self) -> &mut Peers {
        self.peers.get_or_insert_with(Box::default)
    }

    /// The client's port on `flow`: LOCAL's (plus the flow number), or the latched one.
    fn client_port(&self, flow: usize) -> Option<u16> {
        match self.state.client.port() {
            0 => Some(self.latched[flow]).filter(|port| *port != 0),
            port => port.checked_add(u16::try_from(flow).ok()?),
        }
    }

    /// Whether a traffic report is due now (and records it).
    fn report_due(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        if self
            .last_report
            .is_some_and(|last| now.duration_since(last) < REPORT_EVERY)
        {
            return false;
        }
        self.last_report = Some(now);
        true
    }
}

/// A relay address in the table: side, address (canonical) and port, 20 octets (a
/// `SocketAddr` takes 32).
type PortKey = (Side, IpAddr, u16);

fn port_key(side: Side, addr: SocketAddr) -> PortKey {
    (side, addr.ip().to_canonical(), addr.port())
}

#[derive(Debug, Default)]
struct Table {
    /// Every flow's internal and external relay address: its binding's AID and flow number.
    by_port: HashMap<PortKey, (u32, u8)>,
    bindings: HashMap<u32, Entry>,
}

impl Table {
    fn flows(ports: &RelayPorts) -> impl Iterator<Item = (Side, SocketAddr, u8)> {
        let count: u8 = if ports.pair { 2 } else { 1 };
        (0..count).flat_map(move |flow| {
            [
                with_offset(ports.internal, u16::from(flow)).map(|a| (Side::Inside, a, flow)),
                with_offset(ports.external, u16::from(flow)).map(|a| (Side::Outside, a, flow)),
            ]
            .into_iter()
            .flatten()
        })
    }

    fn remove(&mut self, aid: u32) -> Option<Entry> {
        let entry = self.bindings.remove(&aid)?;
        for (side, addr, _) in Self::flows(&entry.ports) {
            let key = port_key(side, addr);
            if self.by_port.get(&key).is_some_and(|(a, _)| *a == aid) {
                self.by_port.remove(&key);
            }
        }
        Some(entry)
    }
}

/// A datagram to send, decided under the table lock and sent after it.
#[derive(Debug)]
enum Delivery {
    /// From `from` to `to`, on the sender of `side`.
    Udp {
        side: Side,
        from: SocketAddr,
        to: SocketAddr,
        data: Vec<u8>,
        /// TTL (hop limit); 0: the default.
        ttl: u8,
    },
    /// An encoded `03` packet for the control connection.
    Tcp(mpsc::Sender<Bytes>, Bytes),
}

/// What handling one datagram came to.
enum Outcome {
    Drop(RelayDrop),
    /// A Listen binding's datagram from `from`: the current policy must admit it first.
    AskPolicy,
    Deliver {
        aid: u32,
        delivery: Delivery,
        report: bool,
    },
}

/// The relay: the shared sockets and the table of bindings they serve.
#[derive(Debug)]
pub struct Relay {
    sockets: RelaySockets,
    table: Mutex<Table>,
    drops: [AtomicU64; RelayDrop::ALL.len()],
    relayed: AtomicU64,
    /// Payload bytes of the datagrams relayed.
    relayed_bytes: AtomicU64,
}

impl Relay {
    pub fn new(sockets: RelaySockets) -> Self {
        Self {
            sockets,
            table: Mutex::new(Table::default()),
            drops: Default::default(),
            relayed: AtomicU64::new(0),
            relayed_bytes: AtomicU64::new(0),
        }
    }

    /// The sender for datagrams from a relay address of `side`.
    pub fn sender(&self, ipv6: bool, side: Side) -> Option<&super::sockets::Sender> {
        self.sockets.sender(ipv6, side)
    }

    /// A multicast send binding's new TTL.
    pub fn set_ttl(&self, aid: u32, ttl: u8) {
        if let Some(entry) = self.lock().bindings.get_mut(&aid) {
            entry.state.ttl = ttl;
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn count(&self, drop: RelayDrop) {
        let index = RelayDrop::ALL.iter().position(|d| *d == drop).unwrap_or(0);
        self.drops[index].fetch_add(1, Ordering::Relaxed);
    }

    /// Datagrams dropped so far, by reason.
    pub fn drops(&self) -> Vec<(RelayDrop, u64)> {
        RelayDrop::ALL
            .iter()
            .zip(&self.drops)
            .map(|(drop, count)| (*drop, count.load(Ordering::Relaxed)))
            .collect()
    }

    /// Datagrams relayed so far (both ways).
    pub fn relayed(&self) -> u64 {
        self.relayed.load(Ordering::Relaxed)
    }

    /// Payload bytes relayed so far (both ways; a `03` packet counts whole).
    pub fn relayed_bytes(&self) -> u64 {
        self.relayed_bytes.load(Ordering::Relaxed)
    }

    /// How many receive tasks the relay needs (one per shared receiving socket).
    pub fn receivers(&self) -> usize {
        self.sockets.receivers.len()
    }

    /// How many bindings the relay serves.
    pub fn len(&self) -> usize {
        self.lock().bindings.len()
    }

    /// Starts serving binding `info` of `conn`. False (nothing added) if its AID or one of its
    /// relay ports is already served.
    pub fn add(&self, info: &BindingInfo, to_client: mpsc::Sender<Bytes>) -> bool {
        let mut table = self.lock();
        let flows: Vec<_> = Table::flows(&info.ports).collect();
        if table.bindings.contains_key(&info.aid)
            || flows
                .iter()
                .any(|(side, addr, _)| table.by_port.contains_key(&port_key(*side, *addr)))
        {
            return false;
        }
        for (side, addr, flow) in flows {
            table.by_port.insert(port_key(side, addr), (info.aid, flow));
        }
        let state = RelayState::of(info);
        table.bindings.insert(
            info.aid,
            Entry {
                conn: info.conn,
                ports: info.ports,
                state,
                latched: [0; 2],
                peers: None,
                to_client,
                last_report: None,
                sent_to_remote: 0,
                sent_to_client: 0,
            },
        );
        true
    }

    /// What the relay learnt of each binding (latched client ports, remotes heard from), for
    /// the next daemon.
    pub fn snapshot(&self) -> Vec<crate::handover::state::RelayState> {
        let table = self.lock();
        let mut states: Vec<_> = table
            .bindings
            .iter()
            .map(|(aid, entry)| {
                let peers = entry.peers.as_deref();
                crate::handover::state::RelayState {
                    aid: *aid,
                    latched: entry.latched,
                    host_peers: peers.map_or([None; 2], |p| p.host),
                    listen_peers: peers.map_or_else(Default::default, |p| {
                        [0, 1].map(|flow| p.listen[flow].iter().copied().collect())
                    }),
                    sent_to_remote: entry.sent_to_remote,
                    sent_to_client: entry.sent_to_client,
                }
            })
            .collect();
        states.sort_by_key(|state| state.aid);
        states
    }

    /// Binding `info`, handed over, sends its client's `03` packets to `to_client` from now
    /// on. Served already (this daemon resuming): only the channel changes. Not served (the
    /// new daemon): served, with what the previous relay had `learned`.
    pub fn adopt(
        &self,
        info: &BindingInfo,
        to_client: mpsc::Sender<Bytes>,
        learned: Option<&crate::handover::state::RelayState>,
    ) {
        {
            let mut table = self.lock();
            if let Some(entry) = table.bindings.get_mut(&info.aid) {
                entry.to_client = to_client;
                return;
            }
        }
        if !self.add(info, to_client) {
            return;
        }
        let Some(learned) = learned else {
            return;
        };
        let mut table = self.lock();
        if let Some(entry) = table.bindings.get_mut(&info.aid) {
            entry.latched = learned.latched;
            entry.sent_to_remote = learned.sent_to_remote;
            entry.sent_to_client = learned.sent_to_client;
            let heard = learned.host_peers.iter().any(Option::is_some)
                || learned.listen_peers.iter().any(|l| !l.is_empty());
            if heard {
                let peers = entry.peers();
                peers.host = learned.host_peers;
                for flow in 0..2 {
                    peers.listen[flow] = learned.listen_peers[flow].iter().copied().collect();
                }
            }
        }
    }

    /// The binding's current state (after a step 2).
    pub fn update(&self, info: &BindingInfo) {
        if let Some(entry) = self.lock().bindings.get_mut(&info.aid) {
            entry.state = RelayState::of(info);
        }
    }

    /// Stops serving the binding whose first internal relay address is `internal`.
    pub fn remove_ports(&self, internal: SocketAddr) {
        let mut table = self.lock();
        let Some((aid, _)) = table
            .by_port
            .get(&port_key(Side::Inside, internal))
            .copied()
        else {
            return;
        };
        if let Some(entry) = table.remove(aid) {
            debug!(aid, conn = ?entry.conn, to_remote = entry.sent_to_remote,
                to_client = entry.sent_to_client, "relay entry removed");
        }
    }

    /// Stops serving every binding of `conn`.
    pub fn remove_conn(&self, conn: ConnId) {
        let mut table = self.lock();
        let aids: Vec<u32> = table
            .bindings
            .iter()
            .filter(|(_, entry)| entry.conn == conn)
            .map(|(aid, _)| *aid)
            .collect();
        for aid in aids {
            table.remove(aid);
        }
    }

    /// Whether binding `aid` of `conn` has its datagrams on the control connection.
    pub fn tcp_encapsulated(&self, conn: ConnId, aid: u32) -> Option<bool> {
        let table = self.lock();
        let entry = table.bindings.get(&aid).filter(|e| e.conn == conn)?;
        Some(entry.state.flags & flags::TCP_ENCAPSULATED != 0)
    }

    /// DATA of a `03` packet from the control connection `conn` for its binding `aid`.
    pub async fn relay_tcp_datagram(
        &self,
        mode: &EnhancedMode,
        conn: ConnId,
        aid: u32,
        data: &[u8],
    ) {
        let outcome = {
            let mut table = self.lock();
            match table.bindings.get_mut(&aid).filter(|e| e.conn == conn) {
                Some(entry) => tcp_to_remote(entry, aid, data),
                None => Outcome::Drop(RelayDrop::UnknownPort),
            }
        };
        self.finish(mode, outcome).await;
    }

    /// One datagram that reached a relay port on `side`.
    async fn on_arrival(&self, mode: &EnhancedMode, side: Side, arrival: Arrival, data: &[u8]) {
        if let Some((_, expected)) = self.sockets.interfaces.of(side)
            && arrival.ifindex != Some(*expected)
        {
            debug!(from = %arrival.from, ifindex = ?arrival.ifindex, ?side,
                "datagram from the wrong interface");
            self.count(RelayDrop::WrongInterface);
            return;
        }
        let key = port_key(side, arrival.to);
        let from = canonical(arrival.from);
        let handle = |table: &mut Table, allowed: bool| {
            let Some(&(aid, flow)) = table.by_port.get(&key) else {
                return Outcome::Drop(RelayDrop::UnknownPort);
            };
            let Some(entry) = table.bindings.get_mut(&aid) else {
                return Outcome::Drop(RelayDrop::UnknownPort);
            };
            match side {
                Side::Inside => client_datagram(entry, aid, usize::from(flow), from, data),
                Side::Outside => {
                    remote_datagram(entry, aid, usize::from(flow), from, data, allowed)
                }
            }
        };
        let outcome = handle(&mut self.lock(), false);
        let outcome = match outcome {
            Outcome::AskPolicy if mode.remote_allowed_now(from.ip()) => {
                handle(&mut self.lock(), true)
            }
            Outcome::AskPolicy => Outcome::Drop(RelayDrop::UnknownRemote),
            other => other,
        };
        self.finish(mode, outcome).await;
    }

    /// Counts a drop, or sends and reports traffic.
    async fn finish(&self, mode: &EnhancedMode, outcome: Outcome) {
        let (aid, delivery, report) = match outcome {
            Outcome::Drop(drop) => {
                self.count(drop);
                return;
            }
            Outcome::AskPolicy => {
                self.count(RelayDrop::UnknownRemote);
                return;
            }
            Outcome::Deliver {
                aid,
                delivery,
                report,
            } => (aid, delivery, report),
        };
        let size = match &delivery {
            Delivery::Udp { data, .. } => data.len(),
            Delivery::Tcp(_, packet) => packet.len(),
        };
        let sent = match delivery {
            Delivery::Udp {
                side,
                from,
                to,
                data,
                ttl,
            } => {
                let Some(sender) = self.sockets.sender(to.is_ipv6(), side) else {
                    self.count(RelayDrop::SendError);
                    return;
                };
                let ttl = if ttl == 0 {
                    crate::udp_packet::HOP_LIMIT
                } else {
                    ttl
                };
                match sender.send_with_ttl(from, to, &data, ttl).await {
                    Ok(()) if to.ip().is_multicast() && side == Side::Outside => {
                        // A member's datagram to its group: the group's other subscribers
                        // get it too.
                        mode.multicast.sent_by_member(aid, to, &data).await;
                        true
                    }
                    Ok(()) => true,
                    Err(error) => {
                        debug!(aid, %from, %to, %error, "relay send failed");
                        self.count(RelayDrop::SendError);
                        false
                    }
                }
            }
            Delivery::Tcp(channel, packet) => {
                if channel.try_send(packet).is_ok() {
                    true
                } else {
                    self.count(RelayDrop::Backlog);
                    false
                }
            }
        };
        if sent {
            self.relayed.fetch_add(1, Ordering::Relaxed);
            self.relayed_bytes.fetch_add(size as u64, Ordering::Relaxed);
            if report {
                mode.traffic(aid, tokio::time::Instant::now().into_std());
            }
        }
    }
}

fn deliver(entry: &mut Entry, aid: u32, delivery: Delivery, to_remote: bool) -> Outcome {
    if to_remote {
        entry.sent_to_remote += 1;
    } else {
        entry.sent_to_client += 1;
    }
    Outcome::Deliver {
        aid,
        delivery,
        report: entry.report_due(),
    }
}

/// A UDP datagram from inside on `flow`'s internal relay address.
fn client_datagram(
    entry: &mut Entry,
    aid: u32,
    flow: usize,
    from: SocketAddr,
    datagram: &[u8],
) -> Outcome {
    let state = entry.state;
    let Some(remote) = state.remote else {
        return Outcome::Drop(RelayDrop::HalfBound);
    };
    if from.ip() != state.client.ip() {
        return Outcome::Drop(RelayDrop::WrongClient);
    }
    if DatagramHeader::peek_aid(datagram) != Some(aid) {
        return Outcome::Drop(RelayDrop::WrongAid);
    }
    let mut payload = datagram;
    let header = if remote == RemoteMatch::Any {
        DatagramHeader::decode_with_remote(&mut payload)
    } else {
        DatagramHeader::decode(&mut payload)
    };
    let Ok(header) = header else {
        return Outcome::Drop(RelayDrop::Malformed);
    };
    if !header.is_whole() {
        return Outcome::Drop(RelayDrop::Fragment);
    }
    match entry.client_port(flow) {
        Some(port) if port != from.port() => return Outcome::Drop(RelayDrop::WrongClient),
        Some(_) => {}
        None => entry.latched[flow] = from.port(),
    }
    to_remote(entry, aid, flow, remote, header.remote.as_ref(), payload)
}

/// DATA of a `03` packet (flow 0).
fn tcp_to_remote(entry: &mut Entry, aid: u32, data: &[u8]) -> Outcome {
    let Some(remote) = entry.state.remote else {
        return Outcome::Drop(RelayDrop::HalfBound);
    };
    if entry.state.flags & flags::TCP_ENCAPSULATED == 0 {
        return Outcome::Drop(RelayDrop::Direction);
    }
    let mut payload = data;
    let target = if remote == RemoteMatch::Any {
        let Ok(Some(address)) = Address::decode(&mut payload) else {
            return Outcome::Drop(RelayDrop::Malformed);
        };
        Some(address)
    } else {
        None
    };
    to_remote(entry, aid, 0, remote, target.as_ref(), payload)
}

/// `payload` to the remote of `flow`, from the flow's external relay address.
fn to_remote(
    entry: &mut Entry,
    aid: u32,
    flow: usize,
    remote: RemoteMatch,
    named: Option<&Address>,
    payload: &[u8],
) -> Outcome {
    if entry.state.flags & flags::SEND == 0 {
        return Outcome::Drop(RelayDrop::Direction);
    }
    let flow_offset = u16::try_from(flow).unwrap_or(0);
    let target = match remote {
        RemoteMatch::Exact(addr) => with_offset(canonical(addr), flow_offset),
        RemoteMatch::Host(_) => entry.peers.as_ref().and_then(|peers| peers.host[flow]),
        RemoteMatch::Any => match named {
            Some(Address::Ip(addr)) => Some(canonical(*addr)).filter(|a| {
                entry
                    .peers
                    .as_ref()
                    .is_some_and(|peers| peers.listen[flow].contains(a))
            }),
            _ => None,
        },
    };
    let (Some(target), Some(from)) = (target, with_offset(entry.ports.external, flow_offset))
    else {
        return Outcome::Drop(RelayDrop::UnknownRemote);
    };
    let delivery = Delivery::Udp {
        side: Side::Outside,
        from: canonical(from),
        to: target,
        data: payload.to_vec(),
        ttl: entry.state.ttl,
    };
    deliver(entry, aid, delivery, true)
}

/// A datagram from outside on `flow`'s external relay address. `allowed`: the policy in force
/// admits `from` (asked for only when a Listen binding needs it).
fn remote_datagram(
    entry: &mut Entry,
    aid: u32,
    flow: usize,
    from: SocketAddr,
    payload: &[u8],
    allowed: bool,
) -> Outcome {
    let state = entry.state;
    let Some(remote) = state.remote else {
        return Outcome::Drop(RelayDrop::HalfBound);
    };
    let flow_offset = u16::try_from(flow).unwrap_or(0);
    let admitted = match remote {
        RemoteMatch::Exact(addr) => with_offset(canonical(addr), flow_offset) == Some(from),
        RemoteMatch::Host(ip) => from.ip() == ip.to_canonical(),
        RemoteMatch::Any if !allowed => return Outcome::AskPolicy,
        RemoteMatch::Any => true,
    };
    if !admitted {
        return Outcome::Drop(RelayDrop::UnknownRemote);
    }
    if state.flags & flags::RECEIVE == 0 {
        return Outcome::Drop(RelayDrop::Direction);
    }
    let header = match remote {
        RemoteMatch::Any => {
            let listen = &mut entry.peers().listen[flow];
            if listen.len() < MAX_LISTEN_PEERS {
                listen.insert(from);
            }
            DatagramHeader::with_remote(aid, Address::Ip(from))
        }
        RemoteMatch::Host(_) => {
            entry.peers().host[flow] = Some(from);
            DatagramHeader::new(aid)
        }
        RemoteMatch::Exact(_) => DatagramHeader::new(aid),
    };
    if state.flags & flags::RAW == 0 && state.flags & flags::TCP_ENCAPSULATED != 0 {
        let channel = entry.to_client.clone();
        return to_client_tcp(entry, aid, channel, header.remote.as_ref(), payload);
    }
    let Some(port) = entry.client_port(flow) else {
        // Nothing is admitted inbound before the client's port is latched.
        return Outcome::Drop(RelayDrop::NotLatched);
    };
    let client = SocketAddr::new(state.client.ip(), port);
    if state.flags & flags::RAW != 0 {
        // As the kernel would deliver it: no header, from the remote itself.
        let delivery = Delivery::Udp {
            side: Side::Inside,
            from,
            to: client,
            data: payload.to_vec(),
            ttl: 0,
        };
        return deliver(entry, aid, delivery, false);
    }
    let mut out = BytesMut::with_capacity(header.encoded_len() + payload.len());
    if header.encode(&mut out).is_err() {
        return Outcome::Drop(RelayDrop::Malformed);
    }
    out.extend_from_slice(payload);
    if out.len() > max_udp_payload(client.ip()) {
        // The header would push it past what one datagram carries.
        return Outcome::Drop(RelayDrop::TooLarge);
    }
    let Some(relay) = with_offset(entry.ports.internal, flow_offset) else {
        return Outcome::Drop(RelayDrop::UnknownPort);
    };
    let delivery = Delivery::Udp {
        side: Side::Inside,
        from: canonical(relay),
        to: client,
        data: out.to_vec(),
        ttl: 0,
    };
    deliver(entry, aid, delivery, false)
}

fn to_client_tcp(
    entry: &mut Entry,
    aid: u32,
    channel: mpsc::Sender<Bytes>,
    remote: Option<&Address>,
    payload: &[u8],
) -> Outcome {
    let mut data = BytesMut::new();
    if let Some(remote) = remote
        && remote.encode(&mut data).is_err()
    {
        return Outcome::Drop(RelayDrop::Malformed);
    }
    data.extend_from_slice(payload);
    if data.len() > TcpDatagram::MAX_DATA_LEN {
        return Outcome::Drop(RelayDrop::TooLarge);
    }
    let packet = TcpDatagram {
        aid,
        data: data.freeze(),
    };
    let mut out = BytesMut::with_capacity(packet.encoded_len());
    if packet.encode(&mut out).is_err() {
        return Outcome::Drop(RelayDrop::TooLarge);
    }
    deliver(entry, aid, Delivery::Tcp(channel, out.freeze()), false)
}

/// Serves receiver `index` until the relay's mode is gone: receive, look up, relay.
pub(super) async fn receive_loop(relay: Arc<Relay>, mode: Weak<EnhancedMode>, index: usize) {
    let Some(receiver) = relay.sockets.receivers.get(index) else {
        return;
    };
    let mut errors: u64 = 0;
    loop {
        if let Err(error) = receiver.readable().await {
            warn!(%error, "shared relay socket failed");
            tokio::time::sleep(RECV_ERROR_PAUSE).await;
            continue;
        }
        // No buffer per binding: read into the thread's scratch buffer, copy out the datagram.
        let datagram = with_scratch(|buf| {
            receiver
                .try_recv(buf)
                .map(|arrival| (arrival, buf[..arrival.len].to_vec()))
        });
        let (arrival, data) = match datagram {
            Ok(datagram) => datagram,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            Err(error) => {
                // Not expected on an unconnected UDP socket; never spin on a persistent one.
                errors += 1;
                if errors.is_power_of_two() {
                    warn!(%error, count = errors, "shared relay socket receive failed");
                }
                tokio::time::sleep(RECV_ERROR_PAUSE).await;
                continue;
            }
        };
        let Some(mode) = mode.upgrade() else {
            return;
        };
        relay.on_arrival(&mode, receiver.side, arrival, &data).await;
    }
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// `addr` with its port moved up by `offset` (the flow number).
fn with_offset(addr: SocketAddr, offset: u16) -> Option<SocketAddr> {
    Some(SocketAddr::new(addr.ip(), addr.port().checked_add(offset)?))
}

/// The largest UDP payload of one datagram to `ip` (IPv4: 65535 - 20 - 8; IPv6: 65535 - 8).
fn max_udp_payload(ip: IpAddr) -> usize {
    match ip {
        IpAddr::V4(_) => 65_507,
        IpAddr::V6(_) => 65_527,
    }
}

#[cfg(test)]
mod tests {
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
    fn a_pair_has_four_relay_addresses_and_a_single_two() {
        let ports = RelayPorts {
            internal: "192.0.2.1:24576".parse().unwrap(),
            external: "203.0.113.1:16384".parse().unwrap(),
            pair: true,
        };
        let flows: Vec<_> = Table::flows(&ports).collect();
        assert_eq!(flows.len(), 4);
        assert!(flows.contains(&(Side::Inside, "192.0.2.1:24577".parse().unwrap(), 1)));
        assert!(flows.contains(&(Side::Outside, "203.0.113.1:16385".parse().unwrap(), 1)));
        let single = RelayPorts {
            pair: false,
            ..ports
        };
        assert_eq!(Table::flows(&single).count(), 2);
    }

    /// A live binding's share of the 1 KiB budget (bench: daemon RSS per live binding).
    #[test]
    fn a_relay_entry_stays_small() {
        assert!(size_of::<Entry>() <= 200, "{} octets", size_of::<Entry>());
    }

    #[test]
    fn drop_names_are_unique() {
        for (i, drop) in RelayDrop::ALL.iter().enumerate() {
            for other in &RelayDrop::ALL[i + 1..] {
                assert_ne!(drop.name(), other.name());
            }
        }
    }
}
