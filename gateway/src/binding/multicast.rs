//! Multicast binds (protocol.md section 3): a receive, send or receive-and-send binding on a
//! group, decided against the [`MulticastPolicy`](super::config::MulticastPolicy), and SET TTL.
//!
//! A multicast binding is confirmed at once (its REMOTE is the group), holds one internal and
//! one external relay port (deliveries come from the internal one, the client's datagrams to
//! the group leave from the external one), installs no unicast kernel entry and does not idle
//! out: it lives until released or its connection closes. The relay joins and leaves groups
//! from the [`Action::Subscribe`] and [`Action::Unsubscribe`] it is handed.
//!
//! It must not do I/O.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use super::machine::Bindings;
use super::record::{Binding, Owner, State, Wanted};
use super::types::{
    Action, BindError, ConnId, Decision, Family, MulticastMode, RemoteMatch, Reply, ReplyCode,
    flags,
};

impl Bindings {
    /// A new multicast binding (rule 5 for a request with a multicast flag).
    #[expect(
        clippy::too_many_arguments,
        reason = "the inputs of one UDP BIND, unpacked"
    )]
    pub(super) fn create_multicast(
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
        let (group, flags) = self.check_multicast(local, peer, wanted, flags, ttl)?;
        let owner_user: Option<Arc<str>> = user.map(Arc::from);
        let owner = Owner::of(owner_user.as_ref(), peer);
        self.check_caps(conn, &owner, user, false)?;
        let family = Family::of(group.ip());
        let internal_family = Family::of(local.ip());
        if !self.ports.has_internal(internal_family) || !self.ports.has_external(family) {
            return Err(BindError::FamilyNotSupported);
        }
        let external_ip = self
            .config
            .external_ip_for(peer, family)
            .ok_or(BindError::FamilyNotSupported)?;
        let aid = self.draw_aid()?;
        let ports = self.ports.reserve(internal_family, external_ip, false)?;
        // No timer: it does not idle out, so the deadline is never looked at.
        let binding = Binding {
            conn,
            tid,
            user: owner_user,
            local,
            flags,
            ports,
            family,
            state: State::Confirmed {
                remote: RemoteMatch::Exact(group),
                last_activity: now,
            },
            timer: now,
            ttl: if flags & flags::SEND != 0 { ttl } else { 0 },
            source: None,
        };
        let mut actions = vec![Action::Reserve(ports)];
        actions.extend(binding.membership(aid).map(Action::Subscribe));
        let conn_state = self.conns.entry(conn).or_default();
        conn_state.live.insert(aid);
        if tid != 0 {
            conn_state.tids.insert(tid, aid);
        }
        *self.owners.entry(owner).or_insert(0) += 1;
        self.live.insert(aid, binding);
        Ok(Decision {
            reply: Reply {
                code: ReplyCode::Ok,
                aid,
                flags,
                internal: Some(ports.internal),
                // REMOTE of the reply is the group.
                external: Some(group),
                error: None,
            },
            actions,
        })
    }

    /// A bind naming live multicast binding `aid` again (by its TID): the same group repeats
    /// the reply; a source address (port 0) makes a multicast-to-unicast receive
    /// source-specific, once (the same source again repeats the reply, another one is `13`).
    pub(super) fn multicast_again(
        &mut self,
        aid: u32,
        local: SocketAddr,
        wanted: Wanted,
        flags: u16,
    ) -> Result<Decision, BindError> {
        let binding = self.live.get(&aid).ok_or(BindError::UnknownAid)?;
        let State::Confirmed {
            remote: RemoteMatch::Exact(group),
            ..
        } = binding.state
        else {
            return Err(BindError::ConfirmedMismatch);
        };
        // The mode bits may be left to the gateway again (neither or both).
        let modes = flags & flags::MULTICAST_MODES;
        let same_mode = modes == 0
            || modes == flags::MULTICAST_MODES
            || modes == binding.flags & flags::MULTICAST_MODES;
        let same_flags = flags & !flags::MULTICAST_MODES == binding.flags & !flags::MULTICAST_MODES;
        if local != binding.local || !same_flags || !same_mode {
            return Err(BindError::ConfirmedMismatch);
        }
        let repeat = |binding: &Binding| {
            Ok(Decision {
                reply: Reply {
                    code: ReplyCode::Ok,
                    aid,
                    flags: binding.flags,
                    internal: Some(binding.ports.internal),
                    external: Some(group),
                    error: None,
                },
                actions: Vec::new(),
            })
        };
        let source = match wanted {
            Wanted::Exact(named) if named == group => return repeat(binding),
            Wanted::Host(source) => source,
            Wanted::Exact(_) | Wanted::Listen(_) => return Err(BindError::BadMulticastSource),
        };
        if binding.flags & flags::RECEIVE == 0 || binding.flags & flags::MULTICAST_TO_MULTICAST != 0
        {
            // Only a multicast-to-unicast receive is delivered per client, so only it can be
            // narrowed to one source.
            return Err(BindError::BadFlags);
        }
        match binding.source {
            Some(named) if named == source => return repeat(binding),
            Some(_) => return Err(BindError::ConfirmedMismatch),
            None => {}
        }
        if source.is_multicast()
            || source.is_unspecified()
            || source.is_loopback()
            || source.is_ipv6() != group.is_ipv6()
        {
            return Err(BindError::BadMulticastSource);
        }
        let listed = self.config.multicast.sources_of(group.ip());
        if !listed.is_empty() && !listed.contains(&source) {
            return Err(BindError::MulticastSourceNotAllowed);
        }
        if !self.config.remote_allowed(source) {
            return Err(BindError::RemoteForbidden);
        }
        let binding = self.live.get_mut(&aid).ok_or(BindError::UnknownAid)?;
        binding.source = Some(source);
        let mut decision = repeat(binding)?;
        decision
            .actions
            .extend(binding.membership(aid).map(Action::Subscribe));
        Ok(decision)
    }

    /// The checks of protocol.md section 3, in the order the reply codes rank them: flags,
    /// the group (`14`), receive (`11`), send (`12`), TTL (`15`), LOCAL (`02`). Returns the
    /// group and the binding's flags (with the chosen receive mode).
    fn check_multicast(
        &self,
        local: SocketAddr,
        peer: IpAddr,
        wanted: Wanted,
        flags: u16,
        ttl: u8,
    ) -> Result<(SocketAddr, u16), BindError> {
        let directions = flags & flags::DIRECTIONS;
        let unsupported = flags::UNICAST | flags::TCP_ENCAPSULATED | flags::RTP_PAIR | flags::RAW;
        if flags & flags::MULTICAST == 0 || directions == 0 || flags & unsupported != 0 {
            return Err(BindError::BadFlags);
        }
        let Wanted::Exact(group) = wanted else {
            return Err(BindError::BadMulticastAddress);
        };
        if !group.ip().is_multicast() {
            return Err(BindError::BadMulticastAddress);
        }
        let policy = &self.config.multicast;
        let mut chosen = flags & !flags::MULTICAST_MODES;
        if directions & flags::RECEIVE != 0 {
            if policy.receive.is_empty() {
                return Err(BindError::MulticastReceive);
            }
            if !policy.receive.iter().any(|net| net.contains(&group.ip())) {
                return Err(BindError::BadMulticastAddress);
            }
            let mode = match flags & flags::MULTICAST_MODES {
                flags::MULTICAST_TO_UNICAST => MulticastMode::ToUnicast,
                flags::MULTICAST_TO_MULTICAST => MulticastMode::ToMulticast,
                _ if policy.allows(policy.default_mode) => policy.default_mode,
                _ if policy.allows(MulticastMode::ToUnicast) => MulticastMode::ToUnicast,
                _ => MulticastMode::ToMulticast,
            };
            if !policy.allows(mode) {
                return Err(BindError::MulticastReceive);
            }
            // Delivery to LOCAL needs its port: nothing to latch it from on a receive-only
            // binding.
            if mode == MulticastMode::ToUnicast && local.port() == 0 {
                return Err(BindError::BadFlags);
            }
            chosen |= mode.flag();
        }
        if directions & flags::SEND != 0 {
            if policy.send.is_empty() {
                return Err(BindError::MulticastSend);
            }
            if !policy.send.iter().any(|net| net.contains(&group.ip())) {
                return Err(BindError::BadMulticastAddress);
            }
            if ttl == 0 || ttl > policy.max_ttl {
                return Err(BindError::TtlNotAllowed);
            }
        }
        if local.ip() != peer {
            return Err(BindError::LocalNotPeer);
        }
        Ok((group, chosen))
    }

    /// SET TTL (`07`) on binding `aid` of `conn`: `10` unknown, `13` not a multicast send
    /// binding, `15` out of range.
    pub fn on_set_ttl(&mut self, conn: ConnId, aid: u32, ttl: u8) -> Decision {
        let refused = |error| Decision {
            reply: Reply::refused(error, aid, 0),
            actions: Vec::new(),
        };
        let max_ttl = self.config.multicast.max_ttl;
        let Some(binding) = self.live.get_mut(&aid).filter(|b| b.conn == conn) else {
            return refused(BindError::UnknownAid);
        };
        if !binding.is_multicast() || binding.flags & flags::SEND == 0 {
            return refused(BindError::NotMulticastSend);
        }
        if ttl == 0 || ttl > max_ttl {
            return refused(BindError::TtlNotAllowed);
        }
        binding.ttl = ttl;
        Decision {
            reply: Reply {
                code: ReplyCode::Ok,
                aid,
                flags: binding.flags,
                internal: None,
                external: None,
                error: None,
            },
            actions: binding
                .membership(aid)
                .map(Action::Subscribe)
                .into_iter()
                .collect(),
        }
    }
}
