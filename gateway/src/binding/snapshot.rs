//! The binding table as data, for an upgrade: [`Bindings::snapshot`] writes every live binding
//! and tombstone (clock values as durations from the snapshot's `now`, since an `Instant` means
//! nothing in another process), [`Bindings::restore`] rebuilds a table from it in the new daemon,
//! taking exactly the same relay ports, AIDs, TIDs and connection ids.
//!
//! Owns the format of the table's part of the handed-over state. It must not do I/O or read a
//! clock; a snapshot that does not fit the new configuration (a relay port outside its ranges or
//! taken twice, an AID twice) is refused whole, never restored in part.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::aid::AidSource;
use super::config::{Config, ConfigError};
use super::machine::Bindings;
use super::record::{Binding, State, Tombstone, after};
use super::types::{Action, ConnId, Family, RelayPorts, RemoteMatch};

/// Every live binding and tombstone of the gateway.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableSnapshot {
    pub bindings: Vec<BindingSnapshot>,
    pub tombstones: Vec<TombstoneSnapshot>,
    /// The next tombstone's sequence number (tombstones are capped oldest first).
    pub tomb_seq: u64,
}

/// One live binding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindingSnapshot {
    pub conn: u64,
    pub tid: u16,
    pub aid: u32,
    pub user: Option<String>,
    pub local: SocketAddr,
    pub flags: u16,
    pub internal_relay: SocketAddr,
    pub external_relay: SocketAddr,
    pub rtp_pair: bool,
    /// The family of the external relay (step 1's REMOTE chose it).
    pub external_v6: bool,
    pub state: StateSnapshot,
    pub ttl: u8,
    pub source: Option<IpAddr>,
}

/// Half-bound or confirmed, with its clock as a duration from the snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StateSnapshot {
    HalfBound {
        /// Until it expires without a step 2 (0: due).
        expires_in_ms: u64,
    },
    Confirmed {
        remote: RemoteSnapshot,
        /// Since its last datagram (or confirmation).
        idle_for_ms: u64,
    },
}

/// [`RemoteMatch`] as data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RemoteSnapshot {
    Exact(SocketAddr),
    Host(IpAddr),
    Any,
}

/// An expired binding's tombstone (answers `17` until released or its connection closes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TombstoneSnapshot {
    pub conn: u64,
    pub tid: u16,
    pub aid: u32,
    pub seq: u64,
}

/// Why a snapshot cannot be restored here.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RestoreError {
    #[error("the configuration: {0}")]
    Config(#[from] ConfigError),
    #[error(
        "binding {aid}: relay ports {internal} / {external} are not free relay ports of this \
         configuration"
    )]
    Ports {
        aid: u32,
        internal: SocketAddr,
        external: SocketAddr,
    },
    #[error("AID {0} appears twice")]
    DuplicateAid(u32),
    #[error("binding {aid}: TID {tid} of connection {conn} is taken twice")]
    DuplicateTid { aid: u32, tid: u16, conn: u64 },
    #[error("AID 0 is not a binding")]
    ZeroAid,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl From<RemoteMatch> for RemoteSnapshot {
    fn from(remote: RemoteMatch) -> Self {
        match remote {
            RemoteMatch::Exact(addr) => Self::Exact(addr),
            RemoteMatch::Host(ip) => Self::Host(ip),
            RemoteMatch::Any => Self::Any,
        }
    }
}

impl From<RemoteSnapshot> for RemoteMatch {
    fn from(remote: RemoteSnapshot) -> Self {
        match remote {
            RemoteSnapshot::Exact(addr) => Self::Exact(addr),
            RemoteSnapshot::Host(ip) => Self::Host(ip),
            RemoteSnapshot::Any => Self::Any,
        }
    }
}

impl Bindings {
    /// The table as data, its clocks relative to `now`. Sorted by AID (a stable format).
    pub fn snapshot(&self, now: Instant) -> TableSnapshot {
        let mut bindings: Vec<BindingSnapshot> = self
            .live
            .iter()
            .map(|(aid, b)| BindingSnapshot {
                conn: b.conn.0,
                tid: b.tid,
                aid: *aid,
                user: b.user.as_deref().map(str::to_owned),
                local: b.local,
                flags: b.flags,
                internal_relay: b.ports.internal,
                external_relay: b.ports.external,
                rtp_pair: b.ports.pair,
                external_v6: b.family == Family::V6,
                state: match b.state {
                    State::HalfBound { expires } => StateSnapshot::HalfBound {
                        expires_in_ms: millis(expires.saturating_duration_since(now)),
                    },
                    State::Confirmed {
                        remote,
                        last_activity,
                    } => StateSnapshot::Confirmed {
                        remote: remote.into(),
                        idle_for_ms: millis(now.saturating_duration_since(last_activity)),
                    },
                },
                ttl: b.ttl,
                source: b.source,
            })
            .collect();
        bindings.sort_by_key(|b| b.aid);
        let mut tombstones: Vec<TombstoneSnapshot> = self
            .tombstones
            .iter()
            .map(|(aid, t)| TombstoneSnapshot {
                conn: t.conn.0,
                tid: t.tid,
                aid: *aid,
                seq: t.seq,
            })
            .collect();
        tombstones.sort_by_key(|t| t.seq);
        TableSnapshot {
            bindings,
            tombstones,
            tomb_seq: self.tomb_seq,
        }
    }

    /// A table holding exactly `snapshot`'s bindings and tombstones, their clocks continued from
    /// `now`, under `config`. Returns it with what the caller must do for them besides the
    /// kernel entries (which stay where they are): [`Action::Reserve`] for every binding's relay
    /// ports and [`Action::Subscribe`] for every multicast member.
    pub fn restore(
        config: Config,
        aids: impl AidSource + Send + 'static,
        snapshot: &TableSnapshot,
        now: Instant,
    ) -> Result<(Self, Vec<Action>), RestoreError> {
        let mut table = Bindings::new(config, aids)?;
        let mut actions = Vec::new();
        for b in &snapshot.bindings {
            actions.extend(table.restore_binding(b, now)?);
        }
        let live: HashSet<u32> = table.live.keys().copied().collect();
        for t in &snapshot.tombstones {
            if t.aid == 0 {
                return Err(RestoreError::ZeroAid);
            }
            if live.contains(&t.aid) || table.tombstones.contains_key(&t.aid) {
                return Err(RestoreError::DuplicateAid(t.aid));
            }
            let conn = ConnId(t.conn);
            let state = table.conns.entry(conn).or_default();
            if t.tid != 0 {
                if state.tids.contains_key(&t.tid) {
                    return Err(RestoreError::DuplicateTid {
                        aid: t.aid,
                        tid: t.tid,
                        conn: t.conn,
                    });
                }
                state.tids.insert(t.tid, t.aid);
            }
            state.tombs.insert(t.seq, t.aid);
            table.tombstones.insert(
                t.aid,
                Tombstone {
                    conn,
                    tid: t.tid,
                    seq: t.seq,
                },
            );
        }
        let next_seq = snapshot.tombstones.iter().map(|t| t.seq + 1).max();
        table.tomb_seq = snapshot.tomb_seq.max(next_seq.unwrap_or(0));
        Ok((table, actions))
    }

    fn restore_binding(
        &mut self,
        b: &BindingSnapshot,
        now: Instant,
    ) -> Result<Vec<Action>, RestoreError> {
        if b.aid == 0 {
            return Err(RestoreError::ZeroAid);
        }
        if self.live.contains_key(&b.aid) {
            return Err(RestoreError::DuplicateAid(b.aid));
        }
        let conn = ConnId(b.conn);
        if b.tid != 0
            && self
                .conns
                .get(&conn)
                .is_some_and(|c| c.tids.contains_key(&b.tid))
        {
            return Err(RestoreError::DuplicateTid {
                aid: b.aid,
                tid: b.tid,
                conn: b.conn,
            });
        }
        let ports = RelayPorts {
            internal: b.internal_relay,
            external: b.external_relay,
            pair: b.rtp_pair,
        };
        if !self.ports.take(&ports) {
            return Err(RestoreError::Ports {
                aid: b.aid,
                internal: ports.internal,
                external: ports.external,
            });
        }
        let state = match b.state {
            StateSnapshot::HalfBound { expires_in_ms } => State::HalfBound {
                expires: after(now, Duration::from_millis(expires_in_ms)),
            },
            StateSnapshot::Confirmed {
                remote,
                idle_for_ms,
            } => State::Confirmed {
                remote: remote.into(),
                last_activity: now
                    .checked_sub(Duration::from_millis(idle_for_ms))
                    .unwrap_or(now),
            },
        };
        let user: Option<Arc<str>> = b.user.as_deref().map(Arc::from);
        let mut binding = Binding {
            conn,
            tid: b.tid,
            user: user.clone(),
            local: b.local,
            flags: b.flags,
            ports,
            family: if b.external_v6 {
                Family::V6
            } else {
                Family::V4
            },
            state,
            timer: now,
            ttl: b.ttl,
            source: b.source,
        };
        binding.timer = binding.deadline(&self.config);
        let half_bound = matches!(binding.state, State::HalfBound { .. });
        let conn_state = self.conns.entry(conn).or_default();
        conn_state.live.insert(b.aid);
        if b.tid != 0 {
            conn_state.tids.insert(b.tid, b.aid);
        }
        if half_bound {
            conn_state.half_bound += 1;
            if let Some(user) = &user {
                *self.users.entry(Arc::clone(user)).or_insert(0) += 1;
            }
        }
        if !binding.is_multicast() {
            self.timers.insert((binding.timer, b.aid));
        }
        *self.owners.entry(binding.owner()).or_insert(0) += 1;
        self.raw_flows.extend(binding.raw_flows());
        let mut actions = vec![Action::Reserve(ports)];
        actions.extend(binding.membership(b.aid).map(Action::Subscribe));
        self.live.insert(b.aid, binding);
        Ok(actions)
    }
}
