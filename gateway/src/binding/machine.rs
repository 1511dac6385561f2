//! The binding table of the whole gateway and its inputs: UDP BIND (decided in `rules`), UDP
//! RELEASE, connection close, traffic, and pending and idle expiry with tombstones.
//!
//! Owns every binding, tombstone and relay port reservation. It must not do I/O or read a clock:
//! inputs carry `now`, outputs are [`Decision`]s and [`Expired`] events the caller applies.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use super::aid::AidSource;
use super::config::{Config, ConfigError};
use super::ports::RelayAllocator;
use super::record::{Binding, ConnState, Owner, State, Tombstone};
use super::types::{
    Action, BindError, BindRequest, BindingInfo, BindingState, ConnId, Decision, Expired,
    ExpiryReason, Reply, ReplyCode, flags,
};

/// All bindings of the gateway, across every control connection.
pub struct Bindings {
    pub(super) config: Config,
    pub(super) aids: Box<dyn AidSource + Send>,
    pub(super) ports: RelayAllocator,
    pub(super) live: HashMap<u32, Binding>,
    pub(super) tombstones: HashMap<u32, Tombstone>,
    pub(super) conns: HashMap<ConnId, ConnState>,
    /// Half-bound bindings per authenticated user.
    pub(super) users: HashMap<Arc<str>, usize>,
    /// Live bindings per owner (user, or an anonymous client's address).
    pub(super) owners: HashMap<Owner, usize>,
    /// Scheduled checks `(when, aid)`. A binding's entry may be earlier than its real deadline
    /// (traffic only moves `last_activity`); [`Bindings::on_timeout`] reschedules those.
    pub(super) timers: BTreeSet<(Instant, u32)>,
    pub(super) tomb_seq: u64,
    /// The (client socket, remote) flows of confirmed RAW bindings. The kernel keys a RAW
    /// client's outbound datagrams by exactly these, so no two bindings may share one.
    pub(super) raw_flows: HashSet<(SocketAddr, SocketAddr)>,
}

impl fmt::Debug for Bindings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bindings")
            .field("live", &self.live.len())
            .field("tombstones", &self.tombstones.len())
            .field("connections", &self.conns.len())
            .finish_non_exhaustive()
    }
}

impl Bindings {
    /// A gateway with no bindings. `aids` supplies candidate association ids (a closure
    /// `FnMut() -> u32` works; the daemon uses [`HashAids`](super::HashAids)).
    pub fn new(config: Config, aids: impl AidSource + Send + 'static) -> Result<Self, ConfigError> {
        config.validate()?;
        let ports = RelayAllocator::new(
            &config.internal_ips,
            config.internal_ports,
            &config.external_ips,
            config.external_ports,
            config.spill_to_other_external_ips,
        );
        Ok(Bindings {
            config,
            aids: Box::new(aids),
            ports,
            live: HashMap::new(),
            tombstones: HashMap::new(),
            conns: HashMap::new(),
            users: HashMap::new(),
            owners: HashMap::new(),
            timers: BTreeSet::new(),
            tomb_seq: 0,
            raw_flows: HashSet::new(),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Replaces the networks a REMOTE may not name (a policy reload). Live bindings keep their
    /// remotes; the new list applies to every later request.
    pub fn set_forbidden_remotes(&mut self, forbidden: Vec<super::IpNet>) {
        self.config.forbidden_remotes = forbidden;
    }

    /// A UDP BIND from connection `conn`, whose peer is `peer_ip`, authenticated as `user`.
    pub fn on_bind(
        &mut self,
        conn: ConnId,
        peer_ip: IpAddr,
        user: Option<&str>,
        req: BindRequest,
        now: Instant,
    ) -> Decision {
        let flags = req.flags & !flags::REMOTE_PENDING;
        match self.bind(conn, peer_ip.to_canonical(), user, req, flags, now) {
            Ok(decision) => decision,
            Err(error) => {
                tracing::debug!(?conn, tid = req.tid, aid = req.aid, %error, "UDP BIND refused");
                Decision {
                    reply: Reply::refused(error, req.aid, flags),
                    actions: Vec::new(),
                }
            }
        }
    }

    /// A UDP RELEASE of `aid` from connection `conn`. Frees a live binding of this connection,
    /// or forgets its tombstone (which frees the TID); anything else gets `10`.
    pub fn on_release(&mut self, conn: ConnId, aid: u32, _now: Instant) -> Decision {
        let ok = |actions| Decision {
            reply: Reply {
                code: ReplyCode::Ok,
                aid,
                flags: 0,
                internal: None,
                external: None,
                error: None,
            },
            actions,
        };
        if aid != 0 && self.tombstones.get(&aid).is_some_and(|t| t.conn == conn) {
            self.forget_tombstone(aid);
            return ok(Vec::new());
        }
        if aid != 0 && self.live.get(&aid).is_some_and(|b| b.conn == conn) {
            return ok(self.remove(aid));
        }
        Decision {
            reply: Reply::refused(BindError::UnknownAid, aid, 0),
            actions: Vec::new(),
        }
    }

    /// Connection `conn` closed: every binding and tombstone it made goes. Returns the kernel
    /// entries to remove and the ports freed.
    pub fn on_connection_closed(&mut self, conn: ConnId) -> Vec<Action> {
        let Some(state) = self.conns.remove(&conn) else {
            return Vec::new();
        };
        for aid in state.tombs.values() {
            self.tombstones.remove(aid);
        }
        let mut live: Vec<u32> = state.live.into_iter().collect();
        live.sort_unstable();
        live.into_iter().flat_map(|aid| self.remove(aid)).collect()
    }

    /// A datagram of binding `aid` was seen at `now` (by the relay, or the kernel's last-seen
    /// time): a confirmed binding's idle clock restarts. Unknown and half-bound AIDs are ignored.
    pub fn on_traffic(&mut self, aid: u32, now: Instant) {
        if let Some(binding) = self.live.get_mut(&aid)
            && let State::Confirmed { last_activity, .. } = &mut binding.state
        {
            *last_activity = (*last_activity).max(now);
        }
    }

    /// When [`Bindings::on_timeout`] should next be called; `None` when nothing can expire.
    /// May be earlier than the next real expiry (then `on_timeout` expires nothing).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.timers.first().map(|(when, _)| *when)
    }

    /// Expires every binding whose deadline is at or before `now`, leaving tombstones.
    pub fn on_timeout(&mut self, now: Instant) -> Vec<Expired> {
        let mut expired = Vec::new();
        while let Some(&(when, aid)) = self.timers.first() {
            if when > now {
                break;
            }
            self.timers.remove(&(when, aid));
            let Some(binding) = self.live.get_mut(&aid) else {
                continue;
            };
            let due = binding.deadline(&self.config);
            if due > now {
                binding.timer = due;
                self.timers.insert((due, aid));
                continue;
            }
            let reason = match binding.state {
                State::HalfBound { .. } => ExpiryReason::Pending,
                State::Confirmed { .. } => ExpiryReason::Idle,
            };
            let (conn, tid) = (binding.conn, binding.tid);
            let actions = self.remove(aid);
            self.bury(conn, tid, aid);
            tracing::debug!(?conn, tid, aid, ?reason, "binding expired");
            expired.push(Expired {
                conn,
                aid,
                tid,
                reason,
                actions,
            });
        }
        expired
    }

    /// A view of the live binding `aid`.
    /// The kernel entries a live binding `aid` has installed (none while half-bound).
    pub fn kernel_entries(&self, aid: u32) -> Vec<super::KernelEntry> {
        self.live
            .get(&aid)
            .map(|binding| binding.entries(aid))
            .unwrap_or_default()
    }

    pub fn binding(&self, aid: u32) -> Option<BindingInfo> {
        let b = self.live.get(&aid)?;
        Some(BindingInfo {
            conn: b.conn,
            tid: b.tid,
            aid,
            local: b.local,
            flags: b.flags,
            ports: b.ports,
            ttl: b.ttl,
            state: match b.state {
                State::HalfBound { expires } => BindingState::HalfBound { expires },
                State::Confirmed {
                    remote,
                    last_activity,
                } => BindingState::Confirmed {
                    remote,
                    last_activity,
                },
            },
        })
    }

    /// Every live binding with the user that made it (for `gateway bindings`).
    pub fn list(&self) -> Vec<(BindingInfo, Option<String>)> {
        self.live
            .iter()
            .filter_map(|(aid, b)| {
                Some((self.binding(*aid)?, b.user.as_deref().map(str::to_owned)))
            })
            .collect()
    }

    /// How many live bindings (half-bound and confirmed) exist.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// Whether no live binding exists.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// How many tombstones exist.
    pub fn tombstones(&self) -> usize {
        self.tombstones.len()
    }

    /// How many internal and external relay ports are reserved.
    pub fn ports_in_use(&self) -> (usize, usize) {
        self.ports.taken()
    }

    /// How many deadline checks are scheduled (each live binding has one).
    pub fn scheduled_checks(&self) -> usize {
        self.timers.len()
    }

    pub(super) fn uncount_half_bound(&mut self, conn: ConnId, user: Option<&str>) {
        if let Some(state) = self.conns.get_mut(&conn) {
            state.half_bound = state.half_bound.saturating_sub(1);
        }
        if let Some(user) = user
            && let Some(count) = self.users.get_mut(user)
        {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.users.remove(user);
            }
        }
    }

    /// Removes live binding `aid` everywhere; returns its kernel entries to remove and its
    /// ports to free. Does not leave a tombstone.
    fn remove(&mut self, aid: u32) -> Vec<Action> {
        let Some(binding) = self.live.remove(&aid) else {
            return Vec::new();
        };
        self.timers.remove(&(binding.timer, aid));
        let owner = binding.owner();
        if let Some(count) = self.owners.get_mut(&owner) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.owners.remove(&owner);
            }
        }
        if let State::HalfBound { .. } = binding.state {
            self.uncount_half_bound(binding.conn, binding.user.as_deref());
        }
        if let Some(state) = self.conns.get_mut(&binding.conn) {
            state.live.remove(&aid);
            if binding.tid != 0 && state.tids.get(&binding.tid) == Some(&aid) {
                state.tids.remove(&binding.tid);
            }
        }
        for flow in binding.raw_flows() {
            self.raw_flows.remove(&flow);
        }
        let released = self.ports.release(&binding.ports);
        debug_assert!(released, "ports of binding {aid} were not reserved");
        let mut actions: Vec<Action> = binding
            .entries(aid)
            .into_iter()
            .map(Action::Remove)
            .collect();
        actions.extend(binding.membership(aid).map(Action::Unsubscribe));
        actions.push(Action::Free(binding.ports));
        actions
    }

    /// Leaves a tombstone for an expired binding, forgetting the connection's oldest past the cap.
    fn bury(&mut self, conn: ConnId, tid: u16, aid: u32) {
        let seq = self.tomb_seq;
        self.tomb_seq += 1;
        let Some(state) = self.conns.get_mut(&conn) else {
            return;
        };
        self.tombstones.insert(aid, Tombstone { conn, tid, seq });
        state.tombs.insert(seq, aid);
        if tid != 0 {
            state.tids.insert(tid, aid);
        }
        while state.tombs.len() > self.config.max_tombstones_per_connection {
            let Some((_, oldest)) = state.tombs.pop_first() else {
                break;
            };
            if let Some(tomb) = self.tombstones.remove(&oldest)
                && tomb.tid != 0
                && state.tids.get(&tomb.tid) == Some(&oldest)
            {
                state.tids.remove(&tomb.tid);
            }
        }
    }

    fn forget_tombstone(&mut self, aid: u32) {
        let Some(tomb) = self.tombstones.remove(&aid) else {
            return;
        };
        if let Some(state) = self.conns.get_mut(&tomb.conn) {
            state.tombs.remove(&tomb.seq);
            if tomb.tid != 0 && state.tids.get(&tomb.tid) == Some(&aid) {
                state.tids.remove(&tomb.tid);
            }
        }
    }

    /// Checks every internal count against the tables (tests only).
    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        let mut half = 0;
        for (aid, b) in &self.live {
            // Multicast bindings do not idle out: no timer.
            assert_eq!(
                self.timers.contains(&(b.timer, *aid)),
                !b.is_multicast(),
                "timer of {aid}"
            );
            let c = &self.conns[&b.conn];
            assert!(c.live.contains(aid));
            if b.tid != 0 {
                assert_eq!(c.tids.get(&b.tid), Some(aid));
            }
            if matches!(b.state, State::HalfBound { .. }) {
                half += 1;
            }
            assert!(!self.tombstones.contains_key(aid));
        }
        let timed = self.live.values().filter(|b| !b.is_multicast()).count();
        assert_eq!(self.timers.len(), timed);
        let conn_half: usize = self.conns.values().map(|c| c.half_bound).sum();
        assert_eq!(conn_half, half);
        let mut owned: HashMap<Owner, usize> = HashMap::new();
        for b in self.live.values() {
            *owned.entry(b.owner()).or_insert(0) += 1;
        }
        assert_eq!(owned, self.owners, "live bindings per owner");
        for (aid, t) in &self.tombstones {
            let c = &self.conns[&t.conn];
            assert_eq!(c.tombs.get(&t.seq), Some(aid));
            if t.tid != 0 {
                assert_eq!(c.tids.get(&t.tid), Some(aid));
            }
        }
        let tombs: usize = self.conns.values().map(|c| c.tombs.len()).sum();
        assert_eq!(tombs, self.tombstones.len());
        let mut internal = 0;
        for b in self.live.values() {
            internal += if b.ports.pair { 2 } else { 1 };
        }
        assert_eq!(self.ports.taken(), (internal, internal));
        let raw: HashSet<_> = self.live.values().flat_map(Binding::raw_flows).collect();
        assert_eq!(raw, self.raw_flows, "RAW flows");
    }
}
