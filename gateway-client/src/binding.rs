//! The control plane of one enhanced-mode binding: its state (unbound, half-bound, connected,
//! listening, released) and the UDP BIND / UDP RELEASE requests that move it, following the
//! table of protocol.md section 4. [`super::UdpBinding`] and [`super::RtpPair`] wrap it with
//! their local sockets; [`super::Flow`] does the data plane.
//!
//! Rules kept here: a step 1 is sent once and never again (a repeat would be read as a step 2
//! Listen), each step 1 and one-step Open takes a fresh TID, a step 2 repeats step 1's TID, LOCAL
//! and flags, and a binding is never widened (another remote on a connected binding is refused
//! locally, before the gateway would answer `13`).

use std::{
    net::SocketAddr,
    sync::{Mutex, MutexGuard, PoisonError},
};

use super::{
    BindingError, ClientError, EnhancedSession, Family,
    exchange::{bind_request, refusal, relays_of, release_request},
};
use gateway_proto::{Address, enhanced::Flags};

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

/// One binding's control state, shared by its flows.
#[derive(Debug)]
pub(super) struct Core {
    pub(super) session: EnhancedSession,
    family: Family,
    flags: Flags,
    /// LOCAL: the (first) local socket's address.
    local: SocketAddr,
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
    pub(super) fn new(
        session: EnhancedSession,
        family: Family,
        flags: Flags,
        local: SocketAddr,
    ) -> Self {
        Self {
            session,
            family,
            flags,
            local,
            phase: Mutex::new(Phase::Unbound),
            op: tokio::sync::Mutex::new(()),
        }
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

    /// Step 1: a new TID, REMOTE unspecified of the binding's family.
    pub(super) async fn bind(&self) -> Result<RelayAddrs, ClientError> {
        let _op = self.op.lock().await;
        let phase = self.phase();
        if phase != Phase::Unbound {
            return Err(wrong("bind", &phase));
        }
        let remote = self.family.unspecified();
        let (tid, relays) = self.first_request(remote, "UDP BIND step 1").await?;
        self.set(Phase::HalfBound { tid, relays });
        Ok(relays)
    }

    /// `connect(remote)`: step 2 Open on a half-bound binding, a one-step Open on an unbound one.
    /// Connecting again to the same remote is a no-op.
    pub(super) async fn connect(&self, remote: Address) -> Result<RelayAddrs, ClientError> {
        if remote.is_unspecified() {
            return Err(ClientError::UnspecifiedRemote);
        }
        let _op = self.op.lock().await;
        match self.phase() {
            Phase::Unbound => {
                let (tid, relays) = self
                    .first_request(remote.clone(), "UDP BIND (one-step Open)")
                    .await?;
                self.set(Phase::Open {
                    tid,
                    relays,
                    remote,
                });
                Ok(relays)
            }
            Phase::HalfBound { tid, relays } => {
                let confirmed = self
                    .step_two(tid, relays, remote.clone(), "UDP BIND step 2 (Open)")
                    .await?;
                self.set(Phase::Open {
                    tid,
                    relays: confirmed,
                    remote,
                });
                Ok(confirmed)
            }
            Phase::Open {
                relays,
                remote: connected,
                ..
            } if connected == remote => Ok(relays),
            Phase::Open {
                remote: connected, ..
            } => Err(ClientError::OtherRemote {
                connected,
                requested: remote,
            }),
            phase => Err(wrong("connect", &phase)),
        }
    }

    /// `listen()`: step 2 Listen on a half-bound binding; a no-op on a listening one.
    pub(super) async fn listen(&self) -> Result<RelayAddrs, ClientError> {
        let _op = self.op.lock().await;
        match self.phase() {
            Phase::HalfBound { tid, relays } => {
                let remote = self.family.unspecified();
                let confirmed = self
                    .step_two(tid, relays, remote, "UDP BIND step 2 (Listen)")
                    .await?;
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

    /// A request with a fresh TID (step 1 or one-step Open); never repeated.
    async fn first_request(
        &self,
        remote: Address,
        operation: &'static str,
    ) -> Result<(u16, RelayAddrs), ClientError> {
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
        result.map(|relays| (tid, relays))
    }

    /// Step 2 with step 1's TID, AID, LOCAL and flags.
    async fn step_two(
        &self,
        tid: u16,
        relays: RelayAddrs,
        remote: Address,
        operation: &'static str,
    ) -> Result<RelayAddrs, ClientError> {
        let confirmed = self
            .bind_request(tid, relays.aid, remote, operation)
            .await?;
        if confirmed.aid != relays.aid {
            return Err(ClientError::UnexpectedReply(format!(
                "step 2 answered for AID {:#x}, the binding is {:#x}",
                confirmed.aid, relays.aid
            )));
        }
        Ok(confirmed)
    }

    async fn bind_request(
        &self,
        tid: u16,
        aid: u32,
        remote: Address,
        operation: &'static str,
    ) -> Result<RelayAddrs, ClientError> {
        let request = bind_request(self.flags, tid, aid, self.local.into(), remote);
        let reply = self.session.request(&request, operation).await?;
        relays_of(&reply, self.session.proxy_addr().ip())
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
