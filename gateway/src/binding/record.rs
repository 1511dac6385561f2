//! One binding's record and the per-connection bookkeeping, plus the normalisation of a
//! request's REMOTE and the kernel entries a confirmed binding implies.
//!
//! Owns the data layout only; the rules that change it live in `rules` and `machine`. It must not
//! allocate ports or decide replies.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::config::Config;
use super::types::{
    ConnId, Family, KernelEntry, Membership, MulticastMode, RelayPorts, Remote, RemoteMatch, Reply,
    ReplyCode, flags,
};

/// One live binding (half-bound or confirmed).
pub(super) struct Binding {
    pub(super) conn: ConnId,
    /// 0 when made with TID 0 (never remembered).
    pub(super) tid: u16,
    pub(super) user: Option<Arc<str>>,
    pub(super) local: SocketAddr,
    pub(super) flags: u16,
    pub(super) ports: RelayPorts,
    /// Family of the external relay, picked by step 1's (or the one-step) REMOTE.
    pub(super) family: Family,
    pub(super) state: State,
    /// This binding's key in `timers` (multicast bindings have none: they live until
    /// released or their connection closes).
    pub(super) timer: Instant,
    /// The TTL of a multicast send binding (0 otherwise).
    pub(super) ttl: u8,
    /// The source a multicast receive binding was narrowed to (a later bind with its TID).
    pub(super) source: Option<IpAddr>,
}

/// Who a binding counts against for the per-user cap: its user, or for an anonymous client its
/// address (so anonymous clients cannot share one unlimited pool).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) enum Owner {
    User(Arc<str>),
    Address(IpAddr),
}

impl Owner {
    pub(super) fn of(user: Option<&Arc<str>>, client: IpAddr) -> Self {
        match user {
            Some(user) => Self::User(Arc::clone(user)),
            None => Self::Address(client.to_canonical()),
        }
    }
}

impl Binding {
    pub(super) fn owner(&self) -> Owner {
        Owner::of(self.user.as_ref(), self.local.ip())
    }
}

/// Half-bound (admits nothing, waits for step 2) or confirmed (admits `remote`).
#[derive(Clone, Copy)]
pub(super) enum State {
    HalfBound {
        expires: Instant,
    },
    Confirmed {
        remote: RemoteMatch,
        last_activity: Instant,
    },
}

/// What is left of an expired binding until RELEASE or connection close: answers `17`.
pub(super) struct Tombstone {
    pub(super) conn: ConnId,
    pub(super) tid: u16,
    pub(super) seq: u64,
}

/// Per control connection: its TIDs, live bindings, tombstones and half-bound count.
#[derive(Default)]
pub(super) struct ConnState {
    /// TID -> AID of a live binding or of a tombstone.
    pub(super) tids: HashMap<u16, u32>,
    pub(super) live: HashSet<u32>,
    /// Tombstones oldest first, for the per-connection cap.
    pub(super) tombs: BTreeMap<u64, u32>,
    pub(super) half_bound: usize,
}

/// A request's REMOTE, normalised (IPv4-mapped addresses as IPv4, `0.0.0.0:0` as unspecified).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Wanted {
    Listen(Family),
    Host(IpAddr),
    Exact(SocketAddr),
}

impl Wanted {
    pub(super) fn of(remote: Remote) -> Self {
        match remote {
            Remote::Unspecified(family) => Wanted::Listen(family),
            Remote::Exact(addr) => {
                let ip = addr.ip().to_canonical();
                match addr.port() {
                    0 if ip.is_unspecified() => Wanted::Listen(Family::of(ip)),
                    0 => Wanted::Host(ip),
                    port => Wanted::Exact(SocketAddr::new(ip, port)),
                }
            }
        }
    }

    pub(super) fn family(self) -> Family {
        match self {
            Wanted::Listen(family) => family,
            Wanted::Host(ip) => Family::of(ip),
            Wanted::Exact(addr) => Family::of(addr.ip()),
        }
    }

    pub(super) fn port(self) -> u16 {
        match self {
            Wanted::Exact(addr) => addr.port(),
            Wanted::Listen(_) | Wanted::Host(_) => 0,
        }
    }

    pub(super) fn matcher(self) -> RemoteMatch {
        match self {
            Wanted::Listen(_) => RemoteMatch::Any,
            Wanted::Host(ip) => RemoteMatch::Host(ip),
            Wanted::Exact(addr) => RemoteMatch::Exact(addr),
        }
    }
}

pub(super) fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// `t + d`, or `t` in the (configuration-excluded) case that it does not fit.
pub(super) fn after(t: Instant, d: Duration) -> Instant {
    t.checked_add(d).unwrap_or(t)
}

/// The same address with the next port (the odd half of an RTP pair). Ports that would pass
/// 65535 are refused before a binding is made; port 0 (not latched yet) stays 0.
pub(super) fn next_port(addr: SocketAddr) -> SocketAddr {
    match addr.port() {
        0 => addr,
        port => SocketAddr::new(addr.ip(), port.saturating_add(1)),
    }
}

impl Binding {
    pub(super) fn deadline(&self, config: &Config) -> Instant {
        match self.state {
            State::HalfBound { expires } => expires,
            State::Confirmed { last_activity, .. } => after(last_activity, config.idle_timeout),
        }
    }

    pub(super) fn is_multicast(&self) -> bool {
        self.flags & flags::MULTICAST != 0
    }

    /// What the relay serves of a multicast binding (none for any other).
    pub(super) fn membership(&self, aid: u32) -> Option<Membership> {
        let State::Confirmed {
            remote: RemoteMatch::Exact(group),
            ..
        } = self.state
        else {
            return None;
        };
        if !self.is_multicast() {
            return None;
        }
        let receive = if self.flags & flags::RECEIVE == 0 {
            None
        } else if self.flags & flags::MULTICAST_TO_MULTICAST != 0 {
            Some(MulticastMode::ToMulticast)
        } else {
            Some(MulticastMode::ToUnicast)
        };
        Some(Membership {
            aid,
            group,
            client: self.local,
            internal: self.ports.internal,
            external: self.ports.external,
            receive,
            send_ttl: (self.flags & flags::SEND != 0).then_some(self.ttl),
            source: self.source,
        })
    }

    /// The kernel entries of a confirmed binding (none while half-bound, none for multicast:
    /// groups have their own kernel entry, made by the relay).
    pub(super) fn entries(&self, aid: u32) -> Vec<KernelEntry> {
        let State::Confirmed { remote, .. } = self.state else {
            return Vec::new();
        };
        if self.is_multicast() {
            return Vec::new();
        }
        let first = KernelEntry {
            remote,
            external: self.ports.external,
            internal: self.ports.internal,
            client: self.local,
            aid,
            flags: self.flags,
        };
        if !self.ports.pair {
            return vec![first];
        }
        let second = KernelEntry {
            remote: match remote {
                RemoteMatch::Exact(addr) => RemoteMatch::Exact(next_port(addr)),
                other => other,
            },
            external: next_port(first.external),
            internal: next_port(first.internal),
            client: next_port(first.client),
            ..first
        };
        vec![first, second]
    }

    /// The (client socket, remote) flows of a confirmed RAW binding: one, or two for an RTP pair.
    pub(super) fn raw_flows(&self) -> Vec<(SocketAddr, SocketAddr)> {
        if self.flags & flags::RAW == 0 {
            return Vec::new();
        }
        self.entries(0)
            .into_iter()
            .filter_map(|entry| match entry.remote {
                RemoteMatch::Exact(remote) => Some((entry.client, remote)),
                RemoteMatch::Host(_) | RemoteMatch::Any => None,
            })
            .collect()
    }

    pub(super) fn same_remote(&self, wanted: Wanted) -> bool {
        match (self.state, wanted) {
            (State::Confirmed { remote, .. }, Wanted::Listen(family)) => {
                remote == RemoteMatch::Any && family == self.family
            }
            (State::Confirmed { remote, .. }, wanted) => remote == wanted.matcher(),
            (State::HalfBound { .. }, _) => false,
        }
    }
}

pub(super) fn ok_reply(aid: u32, flags: u16, ports: &RelayPorts) -> Reply {
    Reply {
        code: ReplyCode::Ok,
        aid,
        flags,
        internal: Some(ports.internal),
        external: Some(ports.external),
        error: None,
    }
}
#[cfg(test)]
mod tests {
    /// A live binding's share of the 1 KiB budget (bench: daemon RSS per live binding); 216
    /// since a multicast receive may name its source.
    #[test]
    fn a_binding_record_stays_small() {
        assert!(
            size_of::<super::Binding>() <= 216,
            "{} octets",
            size_of::<super::Binding>()
        );
    }
}
