//! The state document one daemon hands to the next (JSON, versioned by [`VERSION`]).
//! Descriptors are not in it: they travel beside it, and the document names them by their
//! position ([`FdIndex`]) in the order they were sent.
//!
//! A new field must have a default (`#[serde(default)]`), so the next build reads this
//! version's documents; a change the next build cannot read from this one bumps [`VERSION`].

use std::{
    net::SocketAddr,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
};

use serde::{Deserialize, Serialize};

use crate::binding::TableSnapshot;

/// The state format this build writes.
pub const VERSION: u32 = 1;

/// A descriptor's position among those sent with the document.
pub type FdIndex = usize;

/// Everything a daemon hands over.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DaemonState {
    /// The format of this document.
    pub version: u32,
    /// The old daemon's pid (for the log).
    pub pid: u32,
    /// The instance lock (an `flock`ed file: the lock moves with the descriptor).
    pub lock: Option<FdIndex>,
    /// The SOCKS listeners, in the order of the settings.
    pub listeners: Vec<Listener>,
    /// The metrics listener, if any.
    pub metrics: Option<FdIndex>,
    /// The local control socket's listener (`gateway bindings`, `gateway upgrade`).
    pub admin: Option<FdIndex>,
    /// The enhanced mode's binding table (`None`: the mode is off).
    pub table: Option<TableSnapshot>,
    /// What the userspace relay learnt of each binding.
    pub relays: Vec<RelayState>,
    /// Every control connection that moves.
    pub sessions: Vec<Session>,
    /// The number the next control connection gets in the log.
    pub next_log_conn: u64,
}

/// A SOCKS listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listener {
    pub addr: SocketAddr,
    pub fd: FdIndex,
}

/// What the userspace relay learnt of one binding after it was made.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayState {
    pub aid: u32,
    /// Client ports latched per flow (LOCAL port 0), 0 while not latched.
    pub latched: [u16; 2],
    /// Host-level bindings: the remote port last heard from, per flow.
    pub host_peers: [Option<SocketAddr>; 2],
    /// Listen bindings: the remotes that have sent, per flow.
    pub listen_peers: [Vec<SocketAddr>; 2],
    pub sent_to_remote: u64,
    pub sent_to_client: u64,
}

/// One control connection past its handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// The connection's number in the log.
    pub log_conn: u64,
    pub peer: SocketAddr,
    /// The authenticated user (`None`: anonymous).
    pub user: Option<String>,
    /// The client's control connection.
    pub fd: FdIndex,
    pub kind: SessionKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SessionKind {
    /// In the enhanced UDP mode: its bindings are in the table under `conn`.
    Enhanced {
        conn: u64,
        /// Octets the client sent that are not a whole packet yet.
        buffered: Vec<u8>,
        /// Its bindings with a relay entry: AID, TID, whether the external relay is IPv6.
        bindings: Vec<(u32, u16, bool)>,
    },
    /// A UDP ASSOCIATE: its relay sockets move; the admitted remotes keep their kernel entries.
    Associate {
        /// The client's address (port 0 until latched from its first datagram).
        client: SocketAddr,
        inside_fd: FdIndex,
        outside_v4_fd: Option<FdIndex>,
        outside_v6_fd: Option<FdIndex>,
        /// Remote, external relay address, and milliseconds since either last moved.
        remotes: Vec<(SocketAddr, SocketAddr, u64)>,
    },
    /// A CONNECT tunnel: both sockets move; nothing is buffered in the daemon.
    Connect {
        target: SocketAddr,
        target_fd: FdIndex,
        /// Whether each direction is still open (client to target, target to client).
        up_open: bool,
        down_open: bool,
        up_bytes: u64,
        down_bytes: u64,
        /// Since the last byte in either direction.
        idle_for_ms: u64,
    },
}

/// Collects descriptors in the order they are sent and hands out their positions.
#[derive(Debug, Default)]
pub struct Outgoing<'a> {
    fds: Vec<BorrowedFd<'a>>,
}

impl<'a> Outgoing<'a> {
    /// Adds `fd`; returns its position.
    pub fn add(&mut self, fd: &'a impl AsFd) -> FdIndex {
        self.fds.push(fd.as_fd());
        self.fds.len() - 1
    }

    pub fn fds(&self) -> &[BorrowedFd<'a>] {
        &self.fds
    }
}

/// The received descriptors; each may be taken once.
#[derive(Debug, Default)]
pub struct Incoming {
    fds: Vec<Option<OwnedFd>>,
}

impl Incoming {
    pub fn new(fds: Vec<OwnedFd>) -> Self {
        Self {
            fds: fds.into_iter().map(Some).collect(),
        }
    }

    /// The descriptor at `index`, or an error naming `what` when it is missing or was taken.
    pub fn take(&mut self, index: FdIndex, what: &str) -> Result<OwnedFd, String> {
        self.fds
            .get_mut(index)
            .and_then(Option::take)
            .ok_or_else(|| format!("descriptor {index} ({what}) missing from the handover"))
    }

    /// How many were never taken (closed when this is dropped).
    pub fn left(&self) -> usize {
        self.fds.iter().filter(|fd| fd.is_some()).count()
    }
}

/// Parses a state document of a version this build reads.
pub fn parse(document: &[u8]) -> Result<DaemonState, String> {
    serde_json::from_slice(document).map_err(|e| format!("state document: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_round_trips_and_an_older_one_without_new_fields_reads() {
        let state = DaemonState {
            version: VERSION,
            pid: 1,
            lock: Some(0),
            listeners: vec![Listener {
                addr: "192.0.2.1:1080".parse().unwrap(),
                fd: 1,
            }],
            sessions: vec![Session {
                log_conn: 3,
                peer: "192.0.2.2:40000".parse().unwrap(),
                user: Some("alice".into()),
                fd: 2,
                kind: SessionKind::Enhanced {
                    conn: 9,
                    buffered: vec![1, 2],
                    bindings: vec![(42, 1, false)],
                },
            }],
            ..DaemonState::default()
        };
        let text = serde_json::to_vec(&state).unwrap();
        assert_eq!(parse(&text).unwrap(), state);
        // Unknown fields of a newer document are ignored; missing ones take their defaults.
        let minimal = br#"{"version":1,"pid":2,"lock":null,"listeners":[],"metrics":null,
            "admin":null,"table":null,"relays":[],"sessions":[],"next_log_conn":1,"new":true}"#;
        assert_eq!(parse(minimal).unwrap().pid, 2);
        assert!(parse(b"{").is_err());
    }

    #[test]
    fn a_descriptor_is_taken_once() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut incoming = Incoming::new(vec![OwnedFd::from(a)]);
        assert!(incoming.take(0, "x").is_ok());
        assert!(incoming.take(0, "x").is_err());
        assert!(incoming.take(5, "y").is_err());
        assert_eq!(incoming.left(), 0);
    }
}
