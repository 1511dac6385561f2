//! The control plane of one enhanced-mode binding: its state (unbound, half-bound, connected,
//! listening, released), the UDP BIND / UDP RELEASE requests that move it, following the table of
//! protocol.md section 4, and its local sockets, which it connects to the remote when the gateway
//! grants header-less delivery. [`super::UdpBinding`] and [`super::RtpPair`] wrap it;
//! [`super::Flow`] does the data plane.
//!
//! Rules kept here: a step 1 is sent once and never again (a repeat would be read as a step 2
//! Listen), each step 1 and one-step Open takes a fresh TID, a step 2 repeats step 1's TID, LOCAL
//! and flags (RAW included, whatever step 1's reply said), and a binding is never widened
//! (another remote on a connected binding is refused locally, before the gateway would answer
//! `13`).

use std::{
    net::SocketAddr,
    sync::{Mutex, MutexGuard, PoisonError},
};

use tokio::net::UdpSocket;

use super::{
    BindingError, ClientError, EnhancedSession, Family,
    exchange::{
        bind_request, check_raw, raw_remote, refusal, relays_of, release_request, step_two_relays,
    },
    flow::{FlowSocket, shifted},
};
use gateway_proto::{
    Address,
    enhanced::{ControlReply, Flags},
};

/// A binding's relay addresses, from the gateway's reply to step 1 (or to a one-step Open).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RelayAddrs {
    /// The association id the gateway chose; it is in every datagram header.
    pub aid: u32,
    /// The internal relay address (the reply's LOCAL): where the client sends its datagrams and
    /// where the remote's datagrams come from.
    pub internal: SocketAddr,
    /// The external relay address (the reply's REMOTE): what `getsockname` returns for a
    /// socksified socket, the address the remote must send to. Advertise this one.
    pub external: SocketAddr,
}

/// How a connected binding's datagrams travel between its local sockets and the remote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Delivery {
    /// Through the internal relay, with the 8-octet header.
    Header,
    /// Header-less (RAW granted): plain datagrams straight to and from this remote (the RTP
    /// source of a pair; its RTCP flow uses the next port), the local sockets connected to it.
    Raw(SocketAddr),
}

/// Where a binding is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Phase {
    /// Nothing sent yet.
    Unbound,
    /// Step 1 done: relay ports reserved, nothing admitted.
    HalfBound { tid: u16, relays: RelayAddrs },
    /// Confirmed with one remote (step 2 Open or a one-step Open).
    Open {
        tid: u16,
        relays: RelayAddrs,
        remote: Address,
        delivery: Delivery,
    },
    /// Confirmed for any remote (step 2 Listen).
    Listen { tid: u16, relays: RelayAddrs },
    /// Released, by [`Core::release`].
    Released,
}

impl Phase {
    fn name(&self) -> &'static str {
        match self {
            Self::Unbound => "unbound",
            Self::HalfBound { .. } => "bound but not connected",
            Self::Open { .. } => "connected",
            Self::Listen { .. } => "listening",
            Self::Released => "released",
        }
    }

    /// The TID and AID of a binding the gateway knows.
    fn ids(&self) -> Option<(u16, u32)> {
        match self {
            Self::HalfBound { tid, relays }
            | Self::Open { tid, relays, .. }
            | Self::Listen { tid, relays } => Some((*tid, relays.aid)),
            Self::Unbound | Self::Released => None,
        }
    }

    pub(super) fn relays(&self) -> Option<RelayAddrs> {
        match self {
            Self::HalfBound { relays, .. }
            | Self::Open { relays, .. }
            | Self::Listen { relays, .. } => Some(*relays),
            Self::Unbound | Self::Released => None,
        }
    }
}

/// [`ClientError::WrongState`] for `operation` in `phase`.
pub(super) fn wrong(operation: &'static str, phase: &Phase) -> ClientError {
    ClientError::WrongState {
        operation,
        state: phase.name(),
    }
}

/// One binding's control state and local sockets, shared by its flows.
#[derive(Debug)]
pub(super) struct Core {
    pub(super) session: EnhancedSession,
    family: Family,
    flags: Flags,
    /// LOCAL: the first local socket's address.
    local: SocketAddr,
    /// One socket per flow, in offset order: a plain binding's, or a pair's RTP and RTCP.
    sockets: Vec<FlowSocket>,
    phase: Mutex<Phase>,
    /// Serialises control requests, so two tasks cannot both send a step 1.
    op: tokio::sync::Mutex<()>,
}

/// Retires a step-1 (or one-step) TID unless the caller saw the outcome: a timeout or a dropped
/// future leaves the gateway's answer unknown.
struct PendingTid<'a> {
    session: &'a EnhancedSession,
    tid: u16,
    settled: bool,
}

impl Drop for PendingTid<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.session.abandon(self.tid);
        }
    }
}

impl Core {
    /// A binding of the local `socket` (LOCAL; an RTP pair's RTP socket) and, for a pair, the
    /// RTCP socket on the next port, that will ask for `flags`.
    pub(super) fn new(
        session: EnhancedSession,
        family: Family,
        flags: Flags,
        socket: UdpSocket,
        rtcp: Option<UdpSocket>,
    ) -> Result<Self, ClientError> {
        let local = socket.local_addr()?;
        let sockets = std::iter::once(socket)
            .chain(rtcp)
            .zip(0..)
            .map(|(socket, offset)| FlowSocket { socket, offset })
            .collect();
        Ok(Self {
            session,
            family,
            flags,
            local,
            sockets,
            phase: Mutex::new(Phase::Unbound),
            op: tokio::sync::Mutex::new(()),
        })
    }

    /// The local socket of the flow at `offset` (0, or 1 for a pair's RTCP).
    pub(super) fn socket(&self, offset: u16) -> &FlowSocket {
        &self.sockets[usize::from(offset)]
    }

    fn lock(&self) -> MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn phase(&self) -> Phase {
        self.lock().clone()
    }

    fn set(&self, phase: Phase) {
        *self.lock() = phase;
    }

    pub(super) fn family(&self) -> Family {
        self.family
    }

    /// Whether the binding is connected with header-less delivery in effect.
    pub(super) fn is_raw(&self) -> bool {
        matches!(
            self.phase(),
            Phase::Open {
                delivery: Delivery::Raw(_),
                ..
            }
        )
    }

    /// Step 1: a new TID, REMOTE unspecified of the binding's family.
    pub(super) async fn bind(&self) -> Result<RelayAddrs, ClientError> {
        let _op = self.op.lock().await;
        let phase = self.phase();
        if phase != Phase::Unbound {
            return Err(wrong("bind", &phase));
        }
        let remote = self.family.unspecified();
        check_raw(self.flags, self.local, &remote)?;
        let (tid, reply) = self.first_request(&remote, "UDP BIND step 1").await?;
        let relays = relays_of(&reply, self.proxy_ip())?;
        self.set(Phase::HalfBound { tid, relays });
        Ok(relays)
    }

    /// `connect(remote)`: step 2 Open on a half-bound binding, a one-step Open on an unbound one.
    /// When the reply grants header-less delivery, the local sockets are connected to the remote
    /// before the binding counts as connected. Connecting again to the same remote is a no-op
    /// (it connects the sockets again, should that have failed the first time).
    pub(super) async fn connect(&self, remote: Address) -> Result<RelayAddrs, ClientError> {
        if remote.is_unspecified() {
            return Err(ClientError::UnspecifiedRemote);
        }
        let _op = self.op.lock().await;
        let (tid, reply, relays) = match self.phase() {
            Phase::Unbound => {
                check_raw(self.flags, self.local, &remote)?;
                let (tid, reply) = self
                    .first_request(&remote, "UDP BIND (one-step Open)")
                    .await?;
                let relays = relays_of(&reply, self.proxy_ip())?;
                (tid, reply, relays)
            }
            Phase::HalfBound { tid, relays } => {
                check_raw(self.flags, self.local, &remote)?;
                let reply = self
                    .bind_request(tid, relays.aid, &remote, "UDP BIND step 2 (Open)")
                    .await?;
                let confirmed = step_two_relays(&reply, self.proxy_ip(), &relays)?;
                (tid, reply, confirmed)
            }
            Phase::Open {
                relays,
                remote: connected,
                delivery,
                ..
            } if connected == remote => {
                self.connect_sockets(delivery).await?;
                return Ok(relays);
            }
            Phase::Open {
                remote: connected, ..
            } => {
                return Err(ClientError::OtherRemote {
                    connected,
                    requested: remote,
                });
            }
            phase => return Err(wrong("connect", &phase)),
        };
        let delivery =
            raw_remote(self.flags, &reply, &remote).map_or(Delivery::Header, Delivery::Raw);
        // The gateway has confirmed the binding whatever happens to the sockets: record it (so it
        // is released), then connect them; a failure here is the caller's to see and retry.
        let connected = self.connect_sockets(delivery).await;
        self.set(Phase::Open {
            tid,
            relays,
            remote,
            delivery,
        });
        connected.map(|()| relays)
    }

    /// Connects each local socket to its flow's remote port, for header-less delivery; with the
    /// header the sockets talk to the internal relay and stay unconnected.
    async fn connect_sockets(&self, delivery: Delivery) -> Result<(), ClientError> {
        let Delivery::Raw(remote) = delivery else {
            return Ok(());
        };
        for flow in &self.sockets {
            flow.socket.connect(shifted(remote, flow.offset)).await?;
        }
        Ok(())
    }

    /// `listen()`: step 2 Listen on a half-bound binding; a no-op on a listening one.
    pub(super) async fn listen(&self) -> Result<RelayAddrs, ClientError> {
        let _op = self.op.lock().await;
        match self.phase() {
            Phase::HalfBound { tid, relays } => {
                let remote = self.family.unspecified();
                let reply = self
                    .bind_request(tid, relays.aid, &remote, "UDP BIND step 2 (Listen)")
                    .await?;
                // A Listen binding is never raw: its datagrams carry the remote's address.
                let confirmed = step_two_relays(&reply, self.proxy_ip(), &relays)?;
                self.set(Phase::Listen {
                    tid,
                    relays: confirmed,
                });
                Ok(confirmed)
            }
            Phase::Listen { relays, .. } => Ok(relays),
            phase => Err(wrong("listen", &phase)),
        }
    }

    /// UDP RELEASE. Releasing an unbound or released binding sends nothing.
    pub(super) async fn release(&self) -> Result<(), ClientError> {
        let _op = self.op.lock().await;
        let Some((tid, aid)) = self.phase().ids() else {
            self.set(Phase::Released);
            return Ok(());
        };
        let reply = self
            .session
            .request(&release_request(tid, aid), "UDP RELEASE")
            .await?;
        let result = refusal(&reply);
        if matches!(result, Ok(()) | Err(BindingError::BadAssociationId)) {
            // Released, or already gone on the gateway: either way the TID is free again.
            self.set(Phase::Released);
            self.session.free_tid(tid);
        }
        Ok(result?)
    }

    /// A request with a fresh TID (step 1 or one-step Open); never repeated. Returns the TID
    /// and the gateway's successful reply.
    async fn first_request(
        &self,
        remote: &Address,
        operation: &'static str,
    ) -> Result<(u16, ControlReply), ClientError> {
        let tid = self.session.allocate_tid()?;
        let mut pending = PendingTid {
            session: &self.session,
            tid,
            settled: false,
        };
        let result = self.bind_request(tid, 0, remote, operation).await;
        match &result {
            Err(ClientError::Timeout { .. }) => {}
            Err(ClientError::Binding(_)) => {
                // Refused: the gateway made no binding, so the TID is free.
                pending.settled = true;
                self.session.free_tid(tid);
            }
            _ => pending.settled = true,
        }
        result.map(|reply| (tid, reply))
    }

    /// A UDP BIND with the binding's flags and LOCAL; a refusal is [`ClientError::Binding`].
    async fn bind_request(
        &self,
        tid: u16,
        aid: u32,
        remote: &Address,
        operation: &'static str,
    ) -> Result<ControlReply, ClientError> {
        let request = bind_request(self.flags, tid, aid, self.local.into(), remote.clone());
        let reply = self.session.request(&request, operation).await?;
        refusal(&reply)?;
        Ok(reply)
    }

    fn proxy_ip(&self) -> std::net::IpAddr {
        self.session.proxy_addr().ip()
    }
}

impl Drop for Core {
    /// Like closing a socket: a binding the gateway knows is released (without waiting).
    fn drop(&mut self) {
        if let Some((tid, aid)) = self.lock().ids() {
            self.session.send_unanswered(&release_request(tid, aid));
            self.session.free_tid(tid);
        }
    }
}
