//! Multicast bindings of the async layer: [`MulticastReceiver`] (a subscription to a group; in
//! multicast-to-unicast mode it receives the group's datagrams on its own unicast socket and
//! strips the 8-octet header) and [`MulticastSender`] (datagrams to a group with a TTL), made by
//! [`EnhancedSession::subscribe`] and [`EnhancedSession::multicast_sender`]. The protocol steps
//! are in `multicast`; this module owns the local sockets and the binding's life (release on
//! request or on drop).

use std::{
    io,
    net::{IpAddr, SocketAddr},
    num::NonZeroU8,
    sync::{Mutex, MutexGuard, PoisonError},
};

use bytes::BytesMut;
use tokio::net::UdpSocket;

use super::{
    BindingError, ClientError, EnhancedSession,
    exchange::{refusal, release_request},
    multicast::{
        MulticastBinding, MulticastMode, after_set_ttl, binding_of, check_group, check_source,
        mu_payload, receive_request, send_request, set_ttl_request, source_request,
    },
};
use gateway_proto::enhanced::{ControlRequest, DatagramHeader, EnhancedReplyCode};

impl EnhancedSession {
    /// Subscribes to `group` (a multicast address and port): a receive binding for a new local
    /// UDP socket on [`EnhancedSession::local_ip`], with the preferred delivery `mode` (`None`:
    /// the gateway picks by its policy; [`MulticastReceiver::mode`] says what it chose). A
    /// preference the gateway answers with the other mode is
    /// [`ClientError::UnexpectedReply`]; a refusal is [`ClientError::Binding`]
    /// ([`BindingError::MulticastReceiveNotAllowed`], [`BindingError::BadMulticastAddress`], ...).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use gateway_client::{Client, MulticastMode};
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let session = Client::connect("198.51.100.1:1080".parse()?, None)
    ///     .await?
    ///     .enhanced()
    ///     .await?;
    /// let group = "233.252.0.10:5004".parse()?;
    /// let receiver = session
    ///     .subscribe(group, Some(MulticastMode::ToUnicast))
    ///     .await?;
    /// let mut buf = vec![0; 2048];
    /// let len = receiver.recv(&mut buf).await?; // the header is stripped
    /// println!("{len} octets from {group}");
    /// receiver.release().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn subscribe(
        &self,
        group: SocketAddr,
        mode: Option<MulticastMode>,
    ) -> Result<MulticastReceiver, ClientError> {
        check_group(group)?;
        let member = Member::bind(self, "UDP BIND (multicast receive)", |tid, local| {
            receive_request(tid, local, group, mode)
        })
        .await?;
        Ok(MulticastReceiver { member })
    }

    /// A send binding to `group` with `ttl`: a new local UDP socket whose datagrams
    /// ([`MulticastSender::send`]) the gateway sends to the group on its external interface.
    /// A refusal is [`ClientError::Binding`] ([`BindingError::MulticastSendNotAllowed`],
    /// [`BindingError::TtlNotAllowed`], [`BindingError::BadMulticastAddress`], ...).
    pub async fn multicast_sender(
        &self,
        group: SocketAddr,
        ttl: NonZeroU8,
    ) -> Result<MulticastSender, ClientError> {
        check_group(group)?;
        let member = Member::bind(self, "UDP BIND (multicast send)", |tid, local| {
            send_request(tid, local, group, ttl)
        })
        .await?;
        Ok(MulticastSender { member })
    }
}

/// A subscription to a multicast group through the gateway (a receive binding).
///
/// In multicast-to-unicast mode ([`MulticastMode::ToUnicast`]) the gateway delivers each group
/// datagram to [`MulticastReceiver::socket`] from the internal relay with the 8-octet header;
/// [`MulticastReceiver::recv`] checks and strips it. In multicast-to-multicast mode the gateway
/// re-sends the group on its internal interface; join the group there on a socket of your own
/// (`recv` is then [`ClientError::WrongState`]). Dropping the value releases the binding.
#[derive(Debug)]
pub struct MulticastReceiver {
    member: Member,
}

impl MulticastReceiver {
    /// What the gateway's reply said (after [`release`](Self::release): what it was).
    pub fn binding(&self) -> MulticastBinding {
        self.member.binding()
    }

    /// The delivery mode the gateway chose.
    pub fn mode(&self) -> MulticastMode {
        self.binding().mode().unwrap_or(MulticastMode::ToUnicast)
    }

    /// The local socket (LOCAL). Reading from it directly bypasses the header check.
    pub fn socket(&self) -> &UdpSocket {
        &self.member.socket
    }

    /// The local socket's address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.member.socket.local_addr()
    }

    /// Receives the next group datagram's payload into the start of `buf` (multicast-to-unicast
    /// mode only). Datagrams not from the internal relay, for another AID, malformed or
    /// fragmented are skipped; a payload longer than `buf` minus the header is truncated. It
    /// waits like a socket does; it fails with [`ClientError::SessionClosed`] when the control
    /// connection ends.
    pub async fn recv(&self, buf: &mut [u8]) -> Result<usize, ClientError> {
        let binding = self.member.live("recv")?;
        if binding.mode() != Some(MulticastMode::ToUnicast) {
            return Err(ClientError::WrongState {
                operation: "recv",
                state: "multicast-to-multicast (join the group on the internal interface)",
            });
        }
        loop {
            let (len, from) = tokio::select! {
                received = self.member.socket.recv_from(buf) => received?,
                () = self.member.session.closed() => return Err(ClientError::SessionClosed(
                    "the control connection ended".to_owned(),
                )),
            };
            let Some(payload) = mu_payload(&binding, from, &buf[..len]) else {
                continue;
            };
            let payload_len = payload.len();
            buf.copy_within(len - payload_len..len, 0);
            return Ok(payload_len);
        }
    }

    /// Makes this multicast-to-unicast subscription source-specific: from now on it gets only
    /// the group's datagrams from `source` (the gateway joins the group for that source where
    /// no other receiver takes every source). Once per subscription: another source is
    /// [`BindingError::BadAssociationContext`], a source off the gateway's list for the group
    /// [`BindingError::MulticastReceiveNotAllowed`]; the subscription stays as it was then.
    pub async fn only_from(&self, source: IpAddr) -> Result<(), ClientError> {
        let _op = self.member.op.lock().await;
        let binding = self.member.live("only_from")?;
        check_source(&binding, source)?;
        let reply = self
            .member
            .session
            .request(
                &source_request(&binding, source),
                "UDP BIND (multicast source)",
            )
            .await?;
        refusal(&reply)?;
        Ok(())
    }

    /// UDP RELEASE: the gateway ends the subscription (and leaves the group when no other
    /// client receives it). Releasing twice sends nothing.
    pub async fn release(&self) -> Result<(), ClientError> {
        self.member.release().await
    }
}

/// A multicast send binding: datagrams to a group through the gateway, with a TTL.
/// Dropping the value releases the binding.
///
/// # Examples
///
/// ```no_run
/// use std::num::NonZeroU8;
/// # async fn demo(session: gateway_client::EnhancedSession) -> Result<(), gateway_client::ClientError> {
/// let group = "233.252.0.10:5004".parse().expect("an address");
/// let sender = session
///     .multicast_sender(group, NonZeroU8::new(8).expect("not 0"))
///     .await?;
/// sender.send(b"to the group").await?;
/// sender.set_ttl(NonZeroU8::new(16).expect("not 0")).await?; // SET TTL
/// sender.release().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct MulticastSender {
    member: Member,
}

impl MulticastSender {
    /// What the gateway's reply said, with the current TTL.
    pub fn binding(&self) -> MulticastBinding {
        self.member.binding()
    }

    /// The TTL the gateway sends with.
    pub fn ttl(&self) -> NonZeroU8 {
        self.binding().ttl().unwrap_or(NonZeroU8::MIN)
    }

    /// The local socket (LOCAL).
    pub fn socket(&self) -> &UdpSocket {
        &self.member.socket
    }

    /// Sends `data` to the group: with the 8-octet header to the internal relay, which sends it
    /// on with the binding's TTL.
    pub async fn send(&self, data: &[u8]) -> Result<usize, ClientError> {
        let binding = self.member.live("send")?;
        let header = DatagramHeader::new(binding.aid);
        let mut out = BytesMut::with_capacity(header.encoded_len() + data.len());
        header.encode(&mut out)?;
        out.extend_from_slice(data);
        self.member.socket.send_to(&out, binding.relay).await?;
        Ok(data.len())
    }

    /// SET TTL: the gateway sends the binding's next datagrams with `ttl`. Over the gateway's
    /// maximum is [`BindingError::TtlNotAllowed`]; the TTL is then unchanged.
    pub async fn set_ttl(&self, ttl: NonZeroU8) -> Result<(), ClientError> {
        let _op = self.member.op.lock().await;
        let binding = self.member.live("set_ttl")?;
        let reply = self
            .member
            .session
            .request(&set_ttl_request(&binding, ttl), "SET TTL")
            .await?;
        let changed = after_set_ttl(&binding, &reply, ttl)?;
        *self.member.lock() = State::Live(changed);
        Ok(())
    }

    /// UDP RELEASE. Releasing twice sends nothing.
    pub async fn release(&self) -> Result<(), ClientError> {
        self.member.release().await
    }
}

#[derive(Debug, Clone, Copy)]
enum State {
    Live(MulticastBinding),
    Released(MulticastBinding),
}

/// One multicast binding's local socket and state, shared by both kinds.
#[derive(Debug)]
struct Member {
    session: EnhancedSession,
    socket: UdpSocket,
    state: Mutex<State>,
    /// Serialises control requests (SET TTL, RELEASE).
    op: tokio::sync::Mutex<()>,
}

impl Member {
    /// A local socket and the UDP BIND `request(tid, local)` with a fresh TID. A refusal frees
    /// the TID; a timeout retires it (a late success is released by the session).
    async fn bind(
        session: &EnhancedSession,
        operation: &'static str,
        request: impl FnOnce(u16, SocketAddr) -> ControlRequest,
    ) -> Result<Self, ClientError> {
        let socket = UdpSocket::bind(SocketAddr::new(session.local_ip(), 0)).await?;
        let local = socket.local_addr()?;
        let tid = session.allocate_tid()?;
        let request = request(tid, local);
        let reply = match session.request(&request, operation).await {
            Ok(reply) => reply,
            Err(error) => {
                if matches!(error, ClientError::Timeout { .. }) {
                    session.abandon(tid);
                }
                return Err(error);
            }
        };
        match binding_of(&request, &reply, session.proxy_addr().ip()) {
            Ok(binding) => Ok(Self {
                session: session.clone(),
                socket,
                state: Mutex::new(State::Live(binding)),
                op: tokio::sync::Mutex::new(()),
            }),
            Err(error) => {
                if reply.code == EnhancedReplyCode::Succeeded && reply.aid != 0 {
                    // A success that is no answer to the request (another mode than asked): the
                    // gateway holds a binding nobody will use, so release it.
                    session.send_unanswered(&release_request(tid, reply.aid));
                }
                session.free_tid(tid);
                Err(error)
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn binding(&self) -> MulticastBinding {
        match *self.lock() {
            State::Live(binding) | State::Released(binding) => binding,
        }
    }

    /// The binding, unless released.
    fn live(&self, operation: &'static str) -> Result<MulticastBinding, ClientError> {
        match *self.lock() {
            State::Live(binding) => Ok(binding),
            State::Released(_) => Err(ClientError::WrongState {
                operation,
                state: "released",
            }),
        }
    }

    async fn release(&self) -> Result<(), ClientError> {
        let _op = self.op.lock().await;
        let State::Live(binding) = *self.lock() else {
            return Ok(());
        };
        let reply = self
            .session
            .request(&release_request(binding.tid, binding.aid), "UDP RELEASE")
            .await?;
        let result = refusal(&reply);
        if matches!(result, Ok(()) | Err(BindingError::BadAssociationId)) {
            *self.lock() = State::Released(binding);
            self.session.free_tid(binding.tid);
        }
        Ok(result?)
    }
}

impl Drop for Member {
    /// Like closing a socket: a live binding is released (without waiting).
    fn drop(&mut self) {
        if let State::Live(binding) = *self.lock() {
            self.session
                .send_unanswered(&release_request(binding.tid, binding.aid));
            self.session.free_tid(binding.tid);
        }
    }
}

#[cfg(test)]
#[path = "multicast_tests.rs"]
mod tests;
