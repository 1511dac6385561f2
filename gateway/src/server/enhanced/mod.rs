//! The enhanced UDP mode on the network (protocol.md sections 3 and 4): the glue between the
//! sans-IO binding state machine ([`Bindings`]), the enhanced-mode codec, the kernel gate and the
//! userspace relay.
//!
//! Owns the gateway-wide [`EnhancedMode`]: the one [`Bindings`] behind a mutex, the userspace
//! relay (one table of the bindings it serves, on shared sockets), the registry of the control
//! connections in the mode, and the expiry task that sleeps until [`Bindings::next_deadline`]
//! and applies [`Bindings::on_timeout`]. Files: `session` (one control connection in the mode:
//! control packets, TCP-encapsulated datagrams, applying decisions in order), `relay` (the
//! userspace relay of every binding), `sockets` (the shared relay sockets and their steering).
//!
//! It must not decide who may bind what (that is the state machine's, with its `Config`), must
//! not hold the bindings mutex across an `.await`, and must never let a connection reach a
//! binding it did not create: a session only ever touches relays it started itself, and every
//! request goes through the machine, which checks ownership.

mod multicast;
mod relay;
mod session;
mod sockets;

pub use self::{
    multicast::{GroupReport, MemberReport, MulticastSetup},
    relay::RelayDrop,
    session::Resumed,
    sockets::{Interfaces, RelaySockets, SocketsError},
};

use std::{
    collections::HashMap,
    fmt,
    net::SocketAddr,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError, Weak,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Instant,
};

use tokio::{
    sync::{Notify, mpsc},
    task::AbortHandle,
};
use tracing::{debug, info};

use super::{Services, connection::Connection, send_failure};
use crate::{
    binding::{
        Action, Bindings, Config, ConfigError, ConnId, ExpiryReason, HashAids, KernelEntry,
        RemoteMatch,
    },
    gate::{Framing, Gate, GateEntry, KernelRelay},
};
use gateway_proto::ReplyCode;

/// The clock of the mode: tokio's, so tests on a paused clock drive expiry.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// A binding of a connection expired: sent to the connection's session, which forgets its relay.
/// Nothing is sent to the client (a later request naming it gets `17`).
#[derive(Debug, Clone, Copy)]
pub(super) struct ExpiryNotice {
    aid: u32,
    tid: u16,
    reason: ExpiryReason,
}

/// The enhanced UDP mode of the whole gateway, shared by every control connection.
pub struct EnhancedMode {
    bindings: Mutex<Bindings>,
    /// A copy of the machine's configuration, read by relays without taking the mutex.
    config: Config,
    /// The userspace relay of every binding.
    relay: Arc<relay::Relay>,
    /// Every multicast group with a binding.
    multicast: Arc<multicast::Multicast>,
    /// The relay's receive tasks, started with the expiry task; aborted when the mode goes.
    receivers: Mutex<Vec<AbortHandle>>,
    conns: Mutex<HashMap<ConnId, mpsc::UnboundedSender<ExpiryNotice>>>,
    /// Who holds each control connection in the mode: its peer address and user.
    owners: Mutex<HashMap<ConnId, (SocketAddr, Option<String>)>>,
    next_conn: AtomicU64,
    /// Bindings refused by a cap (per connection, per user, gateway-wide) and for want of a
    /// relay port (or an aligned pair).
    caps_hit: [AtomicU64; 4],
    wake: Arc<Notify>,
    /// The deadline the expiry task sleeps towards (nanoseconds after `epoch`; `u64::MAX`:
    /// none), read and written under the bindings lock: a bind wakes the task only when it
    /// brings an earlier one.
    expiry_target: AtomicU64,
    epoch: Instant,
    expiry_started: AtomicBool,
    /// `CLOCK_MONOTONIC` ns of the last poll of the kernel's counters: flows seen after it
    /// keep their bindings from idling out.
    last_kernel_poll_ns: AtomicU64,
    /// Set (under the bindings lock) once the table was handed to the next daemon: nothing
    /// here changes it or the kernel's entries any more, unless the upgrade fails and it thaws.
    frozen: AtomicBool,
}

/// How often kernel counters are polled for activity: a quarter of the idle timeout (a binding
/// with kernel traffic is seen active well before it could idle out), within these bounds. Each
/// poll reads every kernel flow's counters, so it must not run every second at 100,000 bindings
/// with a long idle timeout.
fn kernel_traffic_poll(idle_timeout: std::time::Duration) -> std::time::Duration {
    (idle_timeout / 4).clamp(
        std::time::Duration::from_millis(250),
        std::time::Duration::from_secs(30),
    )
}

impl fmt::Debug for EnhancedMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnhancedMode")
            .field("bindings", &*self.lock_bindings())
            .finish_non_exhaustive()
    }
}

impl Drop for EnhancedMode {
    fn drop(&mut self) {
        // Lets the expiry task see that the mode is gone.
        self.wake.notify_one();
        for receiver in self
            .receivers
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            receiver.abort();
        }
    }
}

impl EnhancedMode {
    /// The mode with the binding configuration `config` (validated here), random AIDs, and the
    /// userspace relay on `sockets` (opened for this `config`).
    pub fn new(config: Config, sockets: RelaySockets) -> Result<Self, ConfigError> {
        let setup = MulticastSetup {
            max_groups: 64,
            kernel_subscribers: gateway_common::MAX_KERNEL_SUBSCRIBERS,
            ..MulticastSetup::default()
        };
        Self::with_multicast(config, sockets, setup)
    }

    /// [`EnhancedMode::new`] with the multicast groups served as `setup` says.
    pub fn with_multicast(
        config: Config,
        sockets: RelaySockets,
        setup: MulticastSetup,
    ) -> Result<Self, ConfigError> {
        let bindings = Bindings::new(config.clone(), HashAids::new())?;
        let relay = Arc::new(relay::Relay::new(sockets));
        let multicast = Arc::new(multicast::Multicast::new(
            setup,
            config.multicast.sources.clone(),
            Arc::clone(&relay),
        ));
        Ok(Self {
            bindings: Mutex::new(bindings),
            config,
            multicast,
            relay,
            receivers: Mutex::new(Vec::new()),
            conns: Mutex::new(HashMap::new()),
            owners: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            caps_hit: Default::default(),
            wake: Arc::new(Notify::new()),
            expiry_target: AtomicU64::new(u64::MAX),
            epoch: now(),
            expiry_started: AtomicBool::new(false),
            last_kernel_poll_ns: AtomicU64::new(crate::datapath::monotonic_ns()),
            frozen: AtomicBool::new(false),
        })
    }

    /// Hands the table over: from now on nothing here changes it or the kernel's entries (an
    /// expiry, a close, a traffic poll), until [`EnhancedMode::thaw`]. Returns the table and
    /// what the relay learnt of each binding.
    pub fn freeze(
        &self,
    ) -> (
        crate::binding::TableSnapshot,
        Vec<crate::handover::state::RelayState>,
    ) {
        let bindings = self.lock_bindings();
        self.frozen.store(true, Ordering::Release);
        let table = bindings.snapshot(now());
        drop(bindings);
        (table, self.relay.snapshot())
    }

    /// The upgrade failed: this daemon owns the table again.
    pub fn thaw(&self) {
        let _bindings = self.lock_bindings();
        self.frozen.store(false, Ordering::Release);
        self.wake.notify_one();
    }

    fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::Acquire)
    }

    /// Takes over the previous daemon's table (the kernel entries are in the maps already):
    /// the bindings with their AIDs, TIDs, ports and clocks, the multicast groups joined
    /// again, and the relay's entries with what the old relay learnt. Refused whole when the
    /// table does not fit this configuration.
    pub fn restore(
        &self,
        gate: &dyn Gate,
        table: &crate::binding::TableSnapshot,
        learned: Vec<crate::handover::state::RelayState>,
    ) -> Result<(), crate::binding::RestoreError> {
        let (restored, actions) =
            Bindings::restore(self.config.clone(), HashAids::new(), table, now())?;
        let mut bindings = self.lock_bindings();
        let forbidden = bindings.config().forbidden_remotes.clone();
        *bindings = restored;
        bindings.set_forbidden_remotes(forbidden);
        let next = table
            .bindings
            .iter()
            .map(|b| b.conn)
            .chain(table.tombstones.iter().map(|t| t.conn))
            .max();
        self.next_conn
            .fetch_max(next.map_or(1, |n| n + 1), Ordering::Relaxed);
        for action in &actions {
            if let Action::Subscribe(membership) = action
                && let Err(error) = self.multicast.subscribe(gate, *membership)
            {
                tracing::warn!(aid = membership.aid, %error, "cannot join a handed-over multicast binding's group");
            }
        }
        // Every relay entry now, before a receive loop runs: a datagram the steering hands
        // this daemon finds its binding. Its session gives it its channel when it resumes.
        let learned: HashMap<u32, crate::handover::state::RelayState> = learned
            .into_iter()
            .map(|state| (state.aid, state))
            .collect();
        let (placeholder, _) = mpsc::channel(1);
        for (info, _) in bindings.list() {
            self.relay
                .adopt(&info, placeholder.clone(), learned.get(&info.aid));
        }
        drop(bindings);
        self.wake.notify_one();
        Ok(())
    }

    /// After a take-over: the bindings of every connection in the table that did not come
    /// with it (its socket was missing or would not adopt) go, with their kernel entries, as if
    /// it had closed. Returns how many connections that was.
    pub fn close_connections_except(
        &self,
        gate: &dyn Gate,
        kept: &std::collections::HashSet<ConnId>,
    ) -> usize {
        let orphans: std::collections::BTreeSet<ConnId> = self
            .lock_bindings()
            .list()
            .into_iter()
            .map(|(info, _)| info.conn)
            .filter(|conn| !kept.contains(conn))
            .collect();
        for conn in &orphans {
            self.connection_closed(gate, *conn);
        }
        orphans.len()
    }

    /// A handed-over connection registers again under its old id.
    fn reattach_conn(
        &self,
        conn: ConnId,
        notices: mpsc::UnboundedSender<ExpiryNotice>,
        peer: SocketAddr,
        user: Option<&str>,
    ) {
        self.lock_conns().insert(conn, notices);
        self.owners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(conn, (peer, user.map(str::to_owned)));
        self.next_conn.fetch_max(conn.0 + 1, Ordering::Relaxed);
    }

    /// Binding `aid` of `conn`, handed over: its relay entry sends to `to_client` from now on.
    /// False if the table has no such binding of `conn`.
    fn adopt_relay(&self, conn: ConnId, aid: u32, to_client: mpsc::Sender<bytes::Bytes>) -> bool {
        let bindings = self.lock_bindings();
        let Some(info) = bindings.binding(aid).filter(|b| b.conn == conn) else {
            return false;
        };
        self.relay.adopt(&info, to_client, None);
        true
    }

    /// Reports to the machine every binding whose kernel flows moved since the last poll.
    fn poll_kernel_traffic(&self, gate: &dyn Gate) {
        if self.is_frozen() {
            return;
        }
        let now_ns = crate::datapath::monotonic_ns();
        let since = self.last_kernel_poll_ns.swap(now_ns, Ordering::AcqRel);
        let active = gate.kernel_active_since(since);
        if !active.is_empty() {
            let at = now();
            let mut bindings = self.lock_bindings();
            for aid in active {
                bindings.on_traffic(aid, at);
            }
        }
    }

    /// The binding configuration in force (its forbidden remotes as at start: the machine holds
    /// the current list).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Counts a refused binding against its cap, if a cap (or the port space) refused it.
    fn count_refusal(&self, error: crate::binding::BindError) {
        use crate::binding::BindError;
        let slot = match error {
            BindError::ConnectionCap => 0,
            BindError::UserCap => 1,
            BindError::TotalCap => 2,
            BindError::PortsExhausted | BindError::PairUnavailable => 3,
            _ => return,
        };
        self.caps_hit[slot].fetch_add(1, Ordering::Relaxed);
    }

    /// Bindings refused so far by the cap per connection, per user and in total, and for want
    /// of a relay port.
    pub fn caps_hit(&self) -> [u64; 4] {
        [0, 1, 2, 3].map(|i| self.caps_hit[i].load(Ordering::Relaxed))
    }

    /// Deadlines the machine has scheduled (one or two per live binding; none when idle).
    pub fn scheduled_checks(&self) -> usize {
        self.lock_bindings().scheduled_checks()
    }

    /// Replaces the networks a REMOTE may not name, for every later request (SIGHUP).
    pub fn set_forbidden_remotes(&self, forbidden: Vec<ipnet::IpNet>) {
        self.lock_bindings().set_forbidden_remotes(forbidden);
    }

    /// Whether a datagram from `ip` may reach a Listen binding: the policy in force now (a
    /// SIGHUP or an address change applies to live Listen bindings too).
    pub fn remote_allowed_now(&self, ip: std::net::IpAddr) -> bool {
        self.lock_bindings().config().remote_allowed(ip)
    }

    /// How many bindings (half-bound and confirmed) are live.
    pub fn live_bindings(&self) -> usize {
        self.lock_bindings().len()
    }

    /// How many internal and external relay ports are reserved.
    pub fn ports_in_use(&self) -> (usize, usize) {
        self.lock_bindings().ports_in_use()
    }

    /// How many bindings the userspace relay serves.
    pub fn running_relays(&self) -> usize {
        self.relay.len()
    }

    /// Datagrams the userspace relay dropped, by reason.
    pub fn relay_drops(&self) -> Vec<(RelayDrop, u64)> {
        self.relay.drops()
    }

    /// Datagrams the userspace relay relayed (both ways).
    pub fn relay_relayed(&self) -> u64 {
        self.relay.relayed()
    }

    /// Payload bytes the userspace relay relayed (both ways).
    pub fn relay_relayed_bytes(&self) -> u64 {
        self.relay.relayed_bytes()
    }

    /// Live bindings by state and kind (see [`crate::binding::Census`]).
    pub fn census(&self) -> crate::binding::Census {
        self.lock_bindings().census()
    }

    /// Free relay ports of every relay address (see [`crate::binding::FreePorts`]).
    pub fn free_ports(&self) -> Vec<crate::binding::FreePorts> {
        self.lock_bindings().free_ports()
    }

    fn lock_bindings(&self) -> MutexGuard<'_, Bindings> {
        self.bindings.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_conns(&self) -> MutexGuard<'_, HashMap<ConnId, mpsc::UnboundedSender<ExpiryNotice>>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts the expiry task on first use (in the caller's runtime).
    fn ensure_expiry_task(self: &Arc<Self>, gate: &Arc<dyn Gate>) {
        if self.expiry_started.swap(true, Ordering::AcqRel) {
            return;
        }
        tokio::spawn(expiry_loop(
            Arc::downgrade(self),
            Arc::clone(&self.wake),
            Arc::clone(gate),
        ));
        tokio::spawn(kernel_traffic_loop(Arc::downgrade(self), Arc::clone(gate)));
        let mut receivers = self
            .receivers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for index in 0..self.relay.receivers() {
            let task = tokio::spawn(relay::receive_loop(
                Arc::clone(&self.relay),
                Arc::downgrade(self),
                index,
            ));
            receivers.push(task.abort_handle());
        }
    }

    /// A new control connection enters the mode; expiry notices go to `notices`.
    fn register_conn(
        &self,
        notices: mpsc::UnboundedSender<ExpiryNotice>,
        peer: SocketAddr,
        user: Option<&str>,
    ) -> ConnId {
        let conn = ConnId(self.next_conn.fetch_add(1, Ordering::Relaxed));
        self.lock_conns().insert(conn, notices);
        self.owners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(conn, (peer, user.map(str::to_owned)));
        conn
    }

    /// The live bindings for `gateway bindings`: state, owner, addresses and, for flows the
    /// kernel relays, its counters.
    pub fn describe(&self, gate: &dyn Gate) -> Vec<crate::report::EnhancedBinding> {
        use crate::{
            binding::BindingState,
            report::{EnhancedBinding, KernelFlow},
        };
        let list: Vec<_> = {
            let bindings = self.lock_bindings();
            bindings
                .list()
                .into_iter()
                .map(|(info, user)| {
                    let entries = bindings.kernel_entries(info.aid);
                    (info, user, entries)
                })
                .collect()
        };
        let owners = self
            .owners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        list.into_iter()
            .map(|(info, user, entries)| {
                let (state, remote) = match info.state {
                    BindingState::HalfBound { .. } => ("half-bound", None),
                    BindingState::Confirmed { remote, .. } => {
                        ("confirmed", Some(format!("{remote:?}")))
                    }
                };
                let kernel_flows = entries
                    .iter()
                    .filter_map(|entry| Some((gate_entry(entry), kernel_relay(entry)?)))
                    .map(|(entry, relay)| {
                        let counters = gate.inbound_counters(entry);
                        KernelFlow {
                            remote: entry.remote,
                            external_relay: entry.relay,
                            client: relay.client,
                            internal_relay: relay.internal_relay,
                            inbound_packets: counters.map_or(0, |c| c.packets),
                            inbound_bytes: counters.map_or(0, |c| c.bytes),
                        }
                    })
                    .collect();
                EnhancedBinding {
                    aid: info.aid,
                    tid: info.tid,
                    state: state.to_owned(),
                    user,
                    control_peer: owners.get(&info.conn).map(|(peer, _)| *peer),
                    client: info.local,
                    internal_relay: info.ports.internal,
                    external_relay: info.ports.external,
                    rtp_pair: info.ports.pair,
                    remote,
                    flags: info.flags,
                    kernel_flows,
                }
            })
            .collect()
    }

    /// Has the relay serve binding `info`, unless the binding is gone already (expired or
    /// released meanwhile) or its ports are served already; false then.
    fn add_relay(
        &self,
        info: &crate::binding::BindingInfo,
        to_client: mpsc::Sender<bytes::Bytes>,
    ) -> bool {
        let bindings = self.lock_bindings();
        // Lock order: bindings, then the relay's table (the relay never takes bindings while
        // holding its table).
        bindings
            .binding(info.aid)
            .is_some_and(|b| b.conn == info.conn)
            && self.relay.add(info, to_client)
    }

    /// Has the multicast relay serve `membership` of `conn`'s binding, unless the binding is
    /// gone already (lock order as for [`EnhancedMode::add_relay`]).
    fn subscribe(
        &self,
        gate: &dyn Gate,
        conn: ConnId,
        membership: crate::binding::Membership,
    ) -> Result<(), multicast::MulticastError> {
        let bindings = self.lock_bindings();
        if bindings
            .binding(membership.aid)
            .is_none_or(|b| b.conn != conn)
        {
            return Ok(());
        }
        self.multicast.subscribe(gate, membership)
    }

    /// `at` as the expiry task's target.
    fn deadline_key(&self, at: Option<Instant>) -> u64 {
        at.map_or(u64::MAX, |at| {
            u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
        })
    }

    /// After a decision that may have scheduled a deadline (with the bindings lock held):
    /// whether the expiry task must wake, because the earliest deadline is now earlier than
    /// the one it sleeps towards.
    fn expiry_due_earlier(&self, bindings: &Bindings) -> bool {
        self.deadline_key(bindings.next_deadline()) < self.expiry_target.load(Ordering::Acquire)
    }

    /// Releases binding `aid` of `conn`: the machine's decision, applied before the bindings
    /// lock is let go.
    fn release(&self, gate: &dyn Gate, conn: ConnId, aid: u32) -> crate::binding::Decision {
        let mut bindings = self.lock_bindings();
        debug_assert!(
            !self.is_frozen(),
            "a release while the table is handed over"
        );
        let decision = bindings.on_release(conn, aid, now());
        self.apply_teardown(gate, &decision.actions);
        drop(bindings);
        decision
    }

    /// SET TTL of binding `aid` of `conn`: the machine's decision, applied (the relay's group
    /// member updated) before the bindings lock is let go.
    fn set_ttl(
        &self,
        gate: &dyn Gate,
        conn: ConnId,
        aid: u32,
        ttl: u8,
    ) -> crate::binding::Decision {
        let mut bindings = self.lock_bindings();
        let decision = bindings.on_set_ttl(conn, aid, ttl);
        for action in &decision.actions {
            if let Action::Subscribe(membership) = action
                && let Err(error) = self.multicast.subscribe(gate, *membership)
            {
                tracing::warn!(aid, %error, "cannot update the multicast member");
            }
        }
        drop(bindings);
        if decision.reply.code == crate::binding::ReplyCode::Ok {
            self.relay.set_ttl(aid, ttl);
        }
        decision
    }

    /// Multicast groups with their members and counters (for `gateway bindings`).
    pub fn multicast_groups(&self, gate: &dyn Gate) -> Vec<GroupReport> {
        self.multicast.report(gate)
    }

    /// Datagrams of groups the userspace relay delivered.
    pub fn multicast_delivered(&self) -> u64 {
        self.multicast.delivered()
    }

    /// Reports traffic of binding `aid` (the relay rate-limits these calls).
    fn traffic(&self, aid: u32, at: Instant) {
        self.lock_bindings().on_traffic(aid, at);
    }

    /// Applies the teardown actions of a release, an expiry or a connection close, in order:
    /// kernel entries first, then the relay entry. Called with the bindings lock held (lock
    /// order: bindings, then the relay's table): a port the machine frees is
    /// handed out again only after its old kernel entries and relay entry are gone, so a new
    /// binding on it never has its entries removed by the old one's teardown.
    fn apply_teardown(&self, gate: &dyn Gate, actions: &[Action]) {
        for action in actions {
            match action {
                Action::Remove(entry) => {
                    gate.remove(gate_entry(entry));
                    if let Some(relay) = kernel_relay(entry) {
                        gate.remove_outbound(&relay);
                    }
                }
                Action::Free(ports) => self.relay.remove_ports(ports.internal),
                Action::Unsubscribe(membership) => self.multicast.unsubscribe(gate, membership),
                Action::Reserve(_) | Action::Install(_) | Action::Subscribe(_) => {
                    debug!(?action, "unexpected action in a teardown; ignored");
                }
            }
        }
    }

    /// Expires what is due at `now`: kernel entries go, relays stop, owners are told.
    fn expire(&self, gate: &dyn Gate, now: Instant) {
        let expired = {
            let mut bindings = self.lock_bindings();
            if self.is_frozen() {
                return;
            }
            let expired = bindings.on_timeout(now);
            for gone in &expired {
                self.apply_teardown(gate, &gone.actions);
            }
            drop(bindings);
            expired
        };
        for gone in expired {
            info!(conn = ?gone.conn, aid = gone.aid, tid = gone.tid, reason = ?gone.reason,
                "binding expired");
            if let Some(notices) = self.lock_conns().get(&gone.conn) {
                let _ = notices.send(ExpiryNotice {
                    aid: gone.aid,
                    tid: gone.tid,
                    reason: gone.reason,
                });
            }
        }
    }

    /// Connection `conn` closed: every binding it made goes, with its kernel entries and relays.
    fn connection_closed(&self, gate: &dyn Gate, conn: ConnId) {
        let actions = {
            let mut bindings = self.lock_bindings();
            if self.is_frozen() {
                // Handed over: the next daemon owns this connection's bindings.
                return;
            }
            let actions = bindings.on_connection_closed(conn);
            self.apply_teardown(gate, &actions);
            // Nothing of this connection may outlive it, whatever the machine said.
            self.relay.remove_conn(conn);
            drop(bindings);
            actions
        };
        self.lock_conns().remove(&conn);
        self.owners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&conn);
        debug!(
            ?conn,
            removed = actions.len(),
            "enhanced-mode connection closed"
        );
    }
}

/// The kernel entry for a machine entry: exact remotes match (remote ip:port, relay ip:port);
/// host-level bindings (remote port 0) match any port of that host; Listen bindings match any
/// remote (all-zero address, port 0). The XDP gate tries them in that order.
pub(crate) fn gate_entry(entry: &KernelEntry) -> GateEntry {
    let remote = match entry.remote {
        RemoteMatch::Exact(remote) => remote,
        RemoteMatch::Host(ip) => std::net::SocketAddr::new(ip, 0),
        RemoteMatch::Any => std::net::SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), 0),
    };
    GateEntry {
        remote,
        relay: entry.external,
    }
}

/// How the kernel relays an exact, two-way, UDP-framed binding whose client port is known (with
/// the 8-octet header, or without one where RAW was granted); `None` keeps the binding in the
/// userspace relay (the gate still admits it).
pub(crate) fn kernel_relay(entry: &KernelEntry) -> Option<KernelRelay> {
    use crate::binding::flags;
    let RemoteMatch::Exact(remote) = entry.remote else {
        return None;
    };
    let both_ways = entry.flags & flags::DIRECTIONS == flags::DIRECTIONS;
    let udp_framed = entry.flags & flags::TCP_ENCAPSULATED == 0;
    let framing = if entry.flags & flags::RAW != 0 {
        Framing::Raw { remote }
    } else {
        Framing::Enhanced
    };
    (both_ways && udp_framed && entry.client.port() != 0).then_some(KernelRelay {
        client: entry.client,
        internal_relay: entry.internal,
        aid: entry.aid,
        framing,
    })
}

/// Polls the kernel's per-entry counters so traffic the kernel relays counts against idling.
/// Ends when the mode is dropped.
async fn kernel_traffic_loop(mode: Weak<EnhancedMode>, gate: Arc<dyn Gate>) {
    let every = match mode.upgrade() {
        Some(mode) => kernel_traffic_poll(mode.config.idle_timeout),
        None => return,
    };
    loop {
        tokio::time::sleep(every).await;
        let Some(mode) = mode.upgrade() else {
            return;
        };
        mode.poll_kernel_traffic(gate.as_ref());
    }
}

/// Sleeps until the machine's next deadline (or until woken because a new one may be earlier)
/// and expires what is due. Ends when the mode is dropped.
async fn expiry_loop(mode: Weak<EnhancedMode>, wake: Arc<Notify>, gate: Arc<dyn Gate>) {
    loop {
        let next = {
            let Some(mode) = mode.upgrade() else {
                return;
            };
            mode.expire(gate.as_ref(), now());
            let bindings = mode.lock_bindings();
            let next = bindings.next_deadline();
            mode.expiry_target
                .store(mode.deadline_key(next), Ordering::Release);
            next
        };
        match next {
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(tokio::time::Instant::from_std(at)) => {}
                    () = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
}

/// CMD 04: enters the mode (or refuses with `07` when the gateway does not serve it) and serves
/// the connection's control packets until it closes.
pub(super) async fn run(
    mut conn: Connection,
    services: &Services,
    peer: SocketAddr,
    user: Option<&str>,
) -> Result<
    Option<(tokio::net::TcpStream, super::handover::MovedKind)>,
    super::connection::ConnectionError,
> {
    let Some(mode) = services.enhanced.clone() else {
        send_failure(&mut conn, ReplyCode::CommandNotSupported).await;
        return Ok(None);
    };
    session::run(mode, conn, services, peer, user).await
}

/// An enhanced-mode session handed over, served on (see [`session::resume`]).
pub(super) async fn resume(
    mode: Arc<EnhancedMode>,
    stream: tokio::net::TcpStream,
    services: &Services,
    peer: SocketAddr,
    user: Option<&str>,
    resumed: Resumed,
) -> Option<(tokio::net::TcpStream, super::handover::MovedKind)> {
    session::resume(mode, stream, services, peer, user, resumed).await
}
