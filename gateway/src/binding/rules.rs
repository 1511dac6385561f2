//! The rules of protocol.md section 4 applied to one UDP BIND: rule 1 (tombstones, `17`), rule 2
//! (AIDs, `10`), rule 3 (confirmed: repeat or `13`), rule 4 (step 2 on a half-bound binding) and
//! rule 5 (a new binding: step 1 or one-step Open), with the checks listed under the table.
//!
//! Owns the decision for one request. It must not expire, release or tear down bindings (that is
//! `machine`) and must not do I/O.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use super::machine::Bindings;
use super::record::{Binding, Owner, State, Wanted, after, canonical, next_port, ok_reply};
use super::types::{Action, BindError, BindRequest, ConnId, Decision, Family, flags};

/// How many candidate AIDs are drawn before a request fails with `01`.
const AID_DRAWS: usize = 64;

impl Bindings {
    /// Rules 1 to 5 of protocol.md section 4, first match wins.
    pub(super) fn bind(
        &mut self,
        conn: ConnId,
        peer: IpAddr,
        user: Option<&str>,
        req: BindRequest,
        flags: u16,
        now: Instant,
    ) -> Result<Decision, BindError> {
        let local = canonical(req.local);
        let wanted = Wanted::of(req.remote);
        // 1. A TID or AID naming an expired binding.
        if let Some(aid) = self.tombstone_named(conn, req.tid, req.aid) {
            return Err(BindError::Expired { aid });
        }
        // 2. A non-zero AID must be a live binding of this connection, with this TID.
        if req.aid != 0 {
            let binding = self
                .live
                .get(&req.aid)
                .filter(|b| b.conn == conn)
                .ok_or(BindError::UnknownAid)?;
            if binding.tid != req.tid {
                return Err(BindError::AidTidMismatch);
            }
        }
        let target = if req.aid != 0 {
            Some(req.aid)
        } else if req.tid != 0 {
            self.conns
                .get(&conn)
                .and_then(|c| c.tids.get(&req.tid).copied())
                .filter(|aid| self.live.contains_key(aid))
        } else {
            None
        };
        let Some(aid) = target else {
            // 5. A new TID (or TID 0).
            return self.create(
                conn, peer, user, req.tid, local, wanted, flags, req.ttl, now,
            );
        };
        let confirmed = self
            .live
            .get(&aid)
            .is_some_and(|b| matches!(b.state, State::Confirmed { .. }));
        if confirmed && self.live.get(&aid).is_some_and(Binding::is_multicast) {
            // 3m. A multicast binding: a repeat, or the source of a source-specific receive.
            self.multicast_again(aid, local, wanted, flags)
        } else if confirmed {
            // 3. A confirmed binding: an exact repeat is answered again, anything else is `13`.
            self.repeat(aid, local, wanted, flags)
        } else {
            // 4. A half-bound binding: step 2.
            self.confirm(aid, local, wanted, flags, now)
        }
    }

    fn tombstone_named(&self, conn: ConnId, tid: u16, aid: u32) -> Option<u32> {
        if tid != 0
            && let Some(&named) = self.conns.get(&conn).and_then(|c| c.tids.get(&tid))
            && self.tombstones.contains_key(&named)
        {
            return Some(named);
        }
        (aid != 0 && self.tombstones.get(&aid).is_some_and(|t| t.conn == conn)).then_some(aid)
    }

    fn repeat(
        &self,
        aid: u32,
        local: SocketAddr,
        wanted: Wanted,
        flags: u16,
    ) -> Result<Decision, BindError> {
        let binding = self.live.get(&aid).ok_or(BindError::UnknownAid)?;
        // RAW asked again but not granted is the same request; dropping a granted RAW is not.
        let same_flags = flags & !flags::RAW == binding.flags & !flags::RAW
            && (flags & flags::RAW != 0 || binding.flags & flags::RAW == 0);
        if !binding.same_remote(wanted) || local != binding.local || !same_flags {
            return Err(BindError::ConfirmedMismatch);
        }
        Ok(Decision {
            reply: ok_reply(aid, binding.flags, &binding.ports),
            actions: Vec::new(),
        })
    }

    fn confirm(
        &mut self,
        aid: u32,
        local: SocketAddr,
        wanted: Wanted,
        flags: u16,
        now: Instant,
    ) -> Result<Decision, BindError> {
        let binding = self.live.get(&aid).ok_or(BindError::UnknownAid)?;
        let old = binding.local;
        if local.ip() != old.ip() || (old.port() != 0 && local.port() != old.port()) {
            return Err(BindError::LocalChanged);
        }
        if flags & !flags::KNOWN != 0 || flags & flags::DIRECTIONS == 0 {
            return Err(BindError::BadFlags);
        }
        let widened = flags & flags::DIRECTIONS & !binding.flags != 0;
        // RAW is decided anew in step 2: asked there or not, granted or not.
        let fixed = !(flags::DIRECTIONS | flags::RAW);
        let others_changed = flags & fixed != binding.flags & fixed;
        if widened || others_changed {
            return Err(BindError::FlagsChanged);
        }
        if wanted.family() != binding.family {
            return Err(BindError::FamilyMismatch);
        }
        if matches!(wanted, Wanted::Listen(_)) {
            if !self.config.allow_listen {
                return Err(BindError::ListenNotAllowed);
            }
        } else {
            self.check_remote(wanted)?;
        }
        if binding.ports.pair && (local.port() == u16::MAX || wanted.port() == u16::MAX) {
            return Err(BindError::PairPortOverflow);
        }
        let (conn, user) = (binding.conn, binding.user.clone());
        let flags = self.grant_raw(local, wanted, flags, binding.ports.pair, false);
        self.uncount_half_bound(conn, user.as_deref());
        let deadline = after(now, self.config.idle_timeout);
        let Some(binding) = self.live.get_mut(&aid) else {
            return Err(BindError::UnknownAid);
        };
        binding.local = local;
        binding.flags = flags;
        binding.state = State::Confirmed {
            remote: wanted.matcher(),
            last_activity: now,
        };
        self.timers.remove(&(binding.timer, aid));
        binding.timer = deadline;
        self.timers.insert((deadline, aid));
        self.raw_flows.extend(binding.raw_flows());
        let actions = binding
            .entries(aid)
            .into_iter()
            .map(Action::Install)
            .collect();
        Ok(Decision {
            reply: ok_reply(aid, flags, &binding.ports),
            actions,
        })
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "the inputs of one UDP BIND, unpacked"
    )]
    fn create(
        &mut self,
        conn: ConnId,
        peer: IpAddr,
        user: Option<&str>,
        tid: u16,
        local: SocketAddr,
        wanted: Wanted,
        flags: u16,
        ttl: u8,
        now: Instant,
    ) -> Result<Decision, BindError> {
        let step1 = matches!(wanted, Wanted::Listen(_));
        if step1 && tid == 0 {
            return Err(BindError::TidZeroUnspecified);
        }
        if flags & !flags::KNOWN != 0 {
            return Err(BindError::BadFlags);
        }
        if flags & flags::MULTICAST_ANY != 0 {
            return self.create_multicast(conn, peer, user, tid, local, wanted, flags, ttl, now);
        }
        if flags & flags::DIRECTIONS == 0 {
            return Err(BindError::BadFlags);
        }
        if local.ip() != peer {
            return Err(BindError::LocalNotPeer);
        }
        let internal_family = Family::of(local.ip());
        let family = wanted.family();
        if !self.ports.has_internal(internal_family) || !self.ports.has_external(family) {
            return Err(BindError::FamilyNotSupported);
        }
        if !step1 {
            self.check_remote(wanted)?;
        }
        let pair = flags & flags::RTP_PAIR != 0;
        if pair && (local.port() == u16::MAX || wanted.port() == u16::MAX) {
            return Err(BindError::PairPortOverflow);
        }
        let flags = self.grant_raw(local, wanted, flags, pair, step1);
        let owner_user: Option<Arc<str>> = user.map(Arc::from);
        let owner = Owner::of(owner_user.as_ref(), peer);
        self.check_caps(conn, &owner, user, step1)?;
        let external_ip = self
            .config
            .external_ip_for(peer, family)
            .ok_or(BindError::FamilyNotSupported)?;
        let aid = self.draw_aid()?;
        let ports = self.ports.reserve(internal_family, external_ip, pair)?;

        let user = owner_user;
        let (state, timer) = if step1 {
            let expires = after(now, self.config.pending_timeout);
            (State::HalfBound { expires }, expires)
        } else {
            let remote = wanted.matcher();
            let state = State::Confirmed {
                remote,
                last_activity: now,
            };
            (state, after(now, self.config.idle_timeout))
        };
        let binding = Binding {
            conn,
            tid,
            user: user.clone(),
            local,
            flags,
            ports,
            family,
            state,
            timer,
            ttl: 0,
            source: None,
        };
        let mut actions = vec![Action::Reserve(ports)];
        actions.extend(binding.entries(aid).into_iter().map(Action::Install));
        let conn_state = self.conns.entry(conn).or_default();
        conn_state.live.insert(aid);
        if tid != 0 {
            conn_state.tids.insert(tid, aid);
        }
        if step1 {
            conn_state.half_bound += 1;
            if let Some(user) = user {
                *self.users.entry(user).or_insert(0) += 1;
            }
        }
        self.timers.insert((timer, aid));
        // Counted only now: every refusal above leaves nothing behind.
        *self.owners.entry(owner).or_insert(0) += 1;
        self.raw_flows.extend(binding.raw_flows());
        self.live.insert(aid, binding);
        let reply_flags = if step1 {
            flags | flags::REMOTE_PENDING
        } else {
            flags
        };
        Ok(Decision {
            reply: ok_reply(aid, reply_flags, &ports),
            actions,
        })
    }

    /// The caps a new binding must fit: the gateway's, its connection's and its owner's, and for
    /// a half-bound one the half-bound caps.
    pub(super) fn check_caps(
        &self,
        conn: ConnId,
        owner: &Owner,
        user: Option<&str>,
        step1: bool,
    ) -> Result<(), BindError> {
        if self.live.len() >= self.config.max_bindings {
            return Err(BindError::TotalCap);
        }
        let live_on_conn = self.conns.get(&conn).map_or(0, |c| c.live.len());
        if live_on_conn >= self.config.max_bindings_per_connection {
            return Err(BindError::ConnectionCap);
        }
        if self.owners.get(owner).copied().unwrap_or(0) >= self.config.max_bindings_per_user {
            return Err(BindError::UserCap);
        }
        if step1 {
            let on_conn = self.conns.get(&conn).map_or(0, |c| c.half_bound);
            if on_conn >= self.config.max_half_bound_per_connection {
                return Err(BindError::ConnectionCap);
            }
            let of_user = user.map_or(0, |u| self.users.get(u).copied().unwrap_or(0));
            if user.is_some() && of_user >= self.config.max_half_bound_per_user {
                return Err(BindError::UserCap);
            }
        }
        Ok(())
    }

    /// `flags`, without RAW unless it can be granted (protocol.md section 3): asked for, both
    /// directions over UDP, a known LOCAL port, one family on both sides, and an exact remote
    /// whose flows (client socket, remote) no other RAW binding holds; in a step 1, whose remote
    /// is still to come, it is granted provisionally and decided again in step 2. The caller has
    /// checked what the machine cannot see (a kernel datapath, a directly connected client).
    fn grant_raw(
        &self,
        local: SocketAddr,
        wanted: Wanted,
        flags: u16,
        pair: bool,
        step1: bool,
    ) -> u16 {
        let possible = flags & flags::DIRECTIONS == flags::DIRECTIONS
            && flags & flags::TCP_ENCAPSULATED == 0
            && local.port() != 0
            && Family::of(local.ip()) == wanted.family()
            && match wanted {
                Wanted::Listen(_) => step1,
                Wanted::Host(_) => false,
                Wanted::Exact(remote) => {
                    let taken = |flow| self.raw_flows.contains(&flow);
                    let rtcp_taken = pair && taken((next_port(local), next_port(remote)));
                    !taken((local, remote)) && !rtcp_taken
                }
            };
        if flags & flags::RAW != 0 && !possible {
            tracing::debug!(%local, "RAW asked for, not possible for this binding: header delivery");
        }
        if possible { flags } else { flags & !flags::RAW }
    }

    /// Port 0 and forbidden networks for a specific REMOTE.
    fn check_remote(&self, wanted: Wanted) -> Result<(), BindError> {
        let ip = match wanted {
            Wanted::Listen(_) => return Ok(()),
            Wanted::Host(ip) => {
                if !self.config.allow_port_zero_remote {
                    return Err(BindError::RemotePortZero);
                }
                ip
            }
            Wanted::Exact(addr) => addr.ip(),
        };
        if self.config.remote_allowed(ip) {
            Ok(())
        } else {
            Err(BindError::RemoteForbidden)
        }
    }

    /// A random, non-zero AID not used by a live binding or a tombstone; bounded draws.
    pub(super) fn draw_aid(&mut self) -> Result<u32, BindError> {
        for _ in 0..AID_DRAWS {
            let aid = self.aids.next_aid();
            if aid != 0 && !self.live.contains_key(&aid) && !self.tombstones.contains_key(&aid) {
                return Ok(aid);
            }
        }
        Err(BindError::AidsExhausted)
    }
}
