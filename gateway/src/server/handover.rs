//! The control plane's part of an upgrade: the quiesce signal every connection task watches,
//! and what a connection leaves behind when it stops for the next daemon ([`Moved`]), turned
//! into the state document's sessions and back.
//!
//! Owns which connections move (enhanced-mode sessions, CONNECT tunnels, UDP ASSOCIATE
//! associations) and which close (a BIND still waiting for its peer, or relaying: the client
//! sees its control connection close).

use std::{net::SocketAddr, os::fd::OwnedFd, time::Duration};

use bytes::BytesMut;
use tokio::{net::TcpStream, sync::watch};

use crate::{
    binding::{ConnId, Family},
    handover::state::{Incoming, Outgoing, Session, SessionKind},
};

/// Set once, when the daemon starts handing over: every connection task stops at its next
/// message boundary.
#[derive(Debug)]
pub struct Quiesce {
    tx: watch::Sender<bool>,
}

impl Default for Quiesce {
    fn default() -> Self {
        Self {
            tx: watch::channel(false).0,
        }
    }
}

impl Quiesce {
    /// Starts the quiesce.
    pub fn begin(&self) {
        self.tx.send_replace(true);
    }

    /// Ends it (an upgrade that failed: the daemon serves on).
    pub fn end(&self) {
        self.tx.send_replace(false);
    }

    pub fn is_set(&self) -> bool {
        *self.tx.borrow()
    }

    /// A receiver that sees the quiesce begin.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.tx.subscribe()
    }

    /// Completes once the quiesce begins (at once if it has).
    pub async fn wait(&self) {
        quiesced(&mut self.tx.subscribe()).await;
    }
}

/// Completes once the quiesce `rx` watches begins (holds no borrow of it meanwhile).
pub async fn quiesced(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|set| *set).await;
}

/// A control connection stopped for the next daemon, with its sockets.
#[derive(Debug)]
pub struct Moved {
    pub log_conn: u64,
    pub peer: SocketAddr,
    pub user: Option<String>,
    pub stream: TcpStream,
    pub kind: MovedKind,
}

#[derive(Debug)]
pub enum MovedKind {
    Enhanced {
        conn: ConnId,
        buffered: BytesMut,
        /// AID, TID and external family of each binding with a relay entry.
        bindings: Vec<(u32, u16, Family)>,
    },
    Connect(MovedTunnel),
    Associate(MovedAssociation),
}

/// A UDP ASSOCIATE between two datagrams: its relay sockets and the remotes it admitted (their
/// kernel entries stay).
#[derive(Debug)]
pub struct MovedAssociation {
    pub client: SocketAddr,
    pub inside: tokio::net::UdpSocket,
    pub outside_v4: Option<tokio::net::UdpSocket>,
    pub outside_v6: Option<tokio::net::UdpSocket>,
    /// Each admitted remote, its external relay address and how long it has been quiet.
    pub remotes: Vec<(SocketAddr, SocketAddr, Duration)>,
}

/// A CONNECT tunnel between two reads.
#[derive(Debug)]
pub struct MovedTunnel {
    pub target_addr: SocketAddr,
    pub target: TcpStream,
    pub up_open: bool,
    pub down_open: bool,
    pub up_bytes: u64,
    pub down_bytes: u64,
    pub idle_for: Duration,
}

impl Moved {
    /// The session as the state document has it, its sockets added to `fds`.
    pub fn to_state<'a>(&'a self, fds: &mut Outgoing<'a>) -> Session {
        let fd = fds.add(&self.stream);
        let kind = match &self.kind {
            MovedKind::Enhanced {
                conn,
                buffered,
                bindings,
            } => SessionKind::Enhanced {
                conn: conn.0,
                buffered: buffered.to_vec(),
                bindings: bindings
                    .iter()
                    .map(|(aid, tid, family)| (*aid, *tid, *family == Family::V6))
                    .collect(),
            },
            MovedKind::Associate(association) => SessionKind::Associate {
                client: association.client,
                inside_fd: fds.add(&association.inside),
                outside_v4_fd: association.outside_v4.as_ref().map(|s| fds.add(s)),
                outside_v6_fd: association.outside_v6.as_ref().map(|s| fds.add(s)),
                remotes: association
                    .remotes
                    .iter()
                    .map(|(remote, relay, quiet)| {
                        (
                            *remote,
                            *relay,
                            u64::try_from(quiet.as_millis()).unwrap_or(u64::MAX),
                        )
                    })
                    .collect(),
            },
            MovedKind::Connect(tunnel) => SessionKind::Connect {
                target: tunnel.target_addr,
                target_fd: fds.add(&tunnel.target),
                up_open: tunnel.up_open,
                down_open: tunnel.down_open,
                up_bytes: tunnel.up_bytes,
                down_bytes: tunnel.down_bytes,
                idle_for_ms: u64::try_from(tunnel.idle_for.as_millis()).unwrap_or(u64::MAX),
            },
        };
        Session {
            log_conn: self.log_conn,
            peer: self.peer,
            user: self.user.clone(),
            fd,
            kind,
        }
    }

    /// The session of the state document with its sockets from `fds` (needs the runtime).
    pub fn from_state(session: &Session, fds: &mut Incoming) -> Result<Self, String> {
        let stream = tcp(fds.take(session.fd, "control connection")?)?;
        let kind = match &session.kind {
            SessionKind::Enhanced {
                conn,
                buffered,
                bindings,
            } => MovedKind::Enhanced {
                conn: ConnId(*conn),
                buffered: BytesMut::from(&buffered[..]),
                bindings: bindings
                    .iter()
                    .map(|(aid, tid, v6)| (*aid, *tid, if *v6 { Family::V6 } else { Family::V4 }))
                    .collect(),
            },
            SessionKind::Associate {
                client,
                inside_fd,
                outside_v4_fd,
                outside_v6_fd,
                remotes,
            } => {
                let mut udp = |index: &Option<usize>, what: &str| -> Result<_, String> {
                    index.map(|index| udp(fds.take(index, what)?)).transpose()
                };
                MovedKind::Associate(MovedAssociation {
                    client: *client,
                    inside: udp(&Some(*inside_fd), "UDP ASSOCIATE inside socket")?
                        .ok_or("no inside socket")?,
                    outside_v4: udp(outside_v4_fd, "UDP ASSOCIATE IPv4 outside socket")?,
                    outside_v6: udp(outside_v6_fd, "UDP ASSOCIATE IPv6 outside socket")?,
                    remotes: remotes
                        .iter()
                        .map(|(remote, relay, quiet)| {
                            (*remote, *relay, Duration::from_millis(*quiet))
                        })
                        .collect(),
                })
            }
            SessionKind::Connect {
                target,
                target_fd,
                up_open,
                down_open,
                up_bytes,
                down_bytes,
                idle_for_ms,
            } => MovedKind::Connect(MovedTunnel {
                target_addr: *target,
                target: tcp(fds.take(*target_fd, "CONNECT target")?)?,
                up_open: *up_open,
                down_open: *down_open,
                up_bytes: *up_bytes,
                down_bytes: *down_bytes,
                idle_for: Duration::from_millis(*idle_for_ms),
            }),
        };
        Ok(Self {
            log_conn: session.log_conn,
            peer: session.peer,
            user: session.user.clone(),
            stream,
            kind,
        })
    }
}

/// A UDP socket received from the other daemon, as a tokio socket.
fn udp(fd: OwnedFd) -> Result<tokio::net::UdpSocket, String> {
    let std = std::net::UdpSocket::from(fd);
    std.set_nonblocking(true)
        .and_then(|()| tokio::net::UdpSocket::from_std(std))
        .map_err(|e| format!("adopt a UDP socket: {e}"))
}

/// A TCP socket received from the other daemon, as a tokio stream.
fn tcp(fd: OwnedFd) -> Result<TcpStream, String> {
    let std = std::net::TcpStream::from(fd);
    std.set_nonblocking(true)
        .and_then(|()| TcpStream::from_std(std))
        .map_err(|e| format!("adopt a TCP socket: {e}"))
}
