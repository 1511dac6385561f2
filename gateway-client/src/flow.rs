//! The data plane of a binding: datagrams between a local socket and the gateway's internal
//! relay, with the 8-octet enhanced-mode header (and, for Listen bindings, the remote's address
//! after it) added on the way out and stripped on the way in; or, when the gateway granted
//! header-less delivery, plain datagrams between the local socket and the remote itself.
//!
//! A plain binding has one flow; an RTP pair has two, RTP on relay port Q and RTCP on Q+1
//! (protocol.md section 3), told apart by the port offset (in raw mode: the remote's ports s and
//! s+1). Sends and receives take `&self`, so a task may receive while another sends.

use std::{io, net::SocketAddr};

use bytes::BytesMut;
use tokio::net::UdpSocket;

use super::{
    ClientError,
    binding::{Core, Delivery, Phase, RelayAddrs, wrong},
};
use gateway_proto::{Address, enhanced::DatagramHeader};

/// A local socket and its offset in the binding's relay port pair (0, or 1 for RTCP).
#[derive(Debug)]
pub(super) struct FlowSocket {
    pub(super) socket: UdpSocket,
    pub(super) offset: u16,
}

/// One flow of a binding: a local socket and its relay port. [`super::UdpBinding`] has one,
/// [`super::RtpPair`] two ([`super::RtpPair::rtp`], [`super::RtpPair::rtcp`]).
///
/// Its calls hide how datagrams travel: with the header through the internal relay, or, when
/// the gateway granted header-less delivery ([`Flow::is_raw`]), plain and straight to the
/// remote's port, the local socket connected to it.
///
/// # Examples
///
/// ```no_run
/// # async fn demo(pair: &gateway_client::RtpPair) -> Result<(), gateway_client::ClientError> {
/// let mut buf = vec![0; 2048];
/// let rtp = pair.rtp();
/// let len = rtp.recv(&mut buf).await?;
/// // An RTCP receiver report goes back from L+1 through the relay's P+1 to the source's s+1.
/// pair.rtcp().send(&buf[..len.min(8)]).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Flow<'a> {
    core: &'a Core,
    flow: &'a FlowSocket,
}

impl<'a> Flow<'a> {
    /// The flow at `offset` (0, or 1 for a pair's RTCP) of `core`.
    pub(super) fn new(core: &'a Core, offset: u16) -> Self {
        Self {
            core,
            flow: core.socket(offset),
        }
    }

    /// Whether header-less delivery is in effect: the binding is connected, the gateway granted
    /// RAW, and the local socket is connected to this flow's remote port.
    pub fn is_raw(&self) -> bool {
        self.core.is_raw()
    }

    /// The local socket's address (LOCAL, or LOCAL's port + 1 for RTCP).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.flow.socket.local_addr()
    }

    /// The local socket. With the header, reading from it directly bypasses the header
    /// stripping; with header-less delivery it is connected to this flow's remote port and
    /// carries the remote's datagrams as they are, like an unproxied connected socket.
    pub fn socket(&self) -> &'a UdpSocket {
        &self.flow.socket
    }

    /// This flow's internal relay address, once the binding is bound.
    pub fn relay_addr(&self) -> Option<SocketAddr> {
        self.core
            .phase()
            .relays()
            .map(|relays| shifted(relays.internal, self.flow.offset))
    }

    /// This flow's external relay address (what `getsockname` returns), once bound.
    pub fn external_addr(&self) -> Option<SocketAddr> {
        self.core
            .phase()
            .relays()
            .map(|relays| shifted(relays.external, self.flow.offset))
    }

    /// Sends `data` to the connected remote (its next port for a pair's RTCP). Only for
    /// connected bindings.
    pub async fn send(&self, data: &[u8]) -> Result<usize, ClientError> {
        match self.core.phase() {
            Phase::Open {
                relays, delivery, ..
            } => self.send_connected(relays, delivery, data).await,
            phase => Err(wrong("send", &phase)),
        }
    }

    /// `sendto(remote)`. On an unbound binding this is a one-step Open; on a bound one a step 2
    /// Open (an implicit `connect`); on a connected one `remote` must be its remote (else
    /// [`ClientError::OtherRemote`], in either delivery); on a listening one the datagram goes to
    /// `remote`, which must have sent to the binding.
    pub async fn send_to(
        &self,
        remote: impl Into<Address>,
        data: &[u8],
    ) -> Result<usize, ClientError> {
        let remote = remote.into();
        let mut phase = self.core.phase();
        if matches!(phase, Phase::Unbound | Phase::HalfBound { .. }) && self.flow.offset == 0 {
            self.core.connect(remote.clone()).await?;
            phase = self.core.phase();
        }
        match phase {
            Phase::Open {
                relays,
                remote: connected,
                delivery,
                ..
            } => {
                let expected = shifted_address(&connected, self.flow.offset);
                if expected != remote {
                    return Err(ClientError::OtherRemote {
                        connected: expected,
                        requested: remote,
                    });
                }
                self.send_connected(relays, delivery, data).await
            }
            Phase::Listen { relays, .. } => self.send_datagram(relays, Some(remote), data).await,
            phase => Err(wrong("send_to", &phase)),
        }
    }

    /// Receives the next datagram's payload into the start of `buf`.
    pub async fn recv(&self, buf: &mut [u8]) -> Result<usize, ClientError> {
        self.recv_from(buf).await.map(|(len, _)| len)
    }

    /// Receives the next datagram: its payload goes to the start of `buf`, and the remote that
    /// sent it is returned. On a bound, unconnected binding this first confirms it as a Listen
    /// binding (step 2 Listen), as `recv` does for a socksified socket.
    ///
    /// With the header, datagrams not from this flow's relay port, for another AID, malformed or
    /// fragmented are skipped, and a payload longer than `buf` minus the header is truncated.
    /// With header-less delivery, datagrams from anywhere but this flow's remote port are
    /// skipped. It waits like a socket does; it fails with [`ClientError::SessionClosed`] when
    /// the control connection ends.
    pub async fn recv_from(&self, buf: &mut [u8]) -> Result<(usize, Address), ClientError> {
        let mut phase = self.core.phase();
        if matches!(phase, Phase::HalfBound { .. }) {
            self.core.listen().await?;
            phase = self.core.phase();
        }
        let (relays, connected) = match phase {
            Phase::Open {
                delivery: Delivery::Raw(remote),
                ..
            } => {
                return self
                    .recv_plain(buf, shifted(remote, self.flow.offset))
                    .await;
            }
            Phase::Open { relays, remote, .. } => {
                (relays, Some(shifted_address(&remote, self.flow.offset)))
            }
            Phase::Listen { relays, .. } => (relays, None),
            phase => return Err(wrong("recv", &phase)),
        };
        let relay = shifted(relays.internal, self.flow.offset);
        loop {
            let (len, from) = self.recv_datagram(buf).await?;
            if !same_endpoint(from, relay) {
                continue;
            }
            let mut datagram = &buf[..len];
            let header = if connected.is_some() {
                DatagramHeader::decode(&mut datagram)
            } else {
                DatagramHeader::decode_with_remote(&mut datagram)
            };
            let Ok(header) = header else { continue };
            if header.aid != relays.aid || !header.is_whole() {
                continue;
            }
            let Some(remote) = header.remote.or_else(|| connected.clone()) else {
                continue;
            };
            let start = len - datagram.len();
            buf.copy_within(start..len, 0);
            return Ok((len - start, remote));
        }
    }

    /// Header-less delivery: the next datagram from `remote`, as it came. The connected socket
    /// already admits no other source; the check keeps that true should connecting it have
    /// failed.
    async fn recv_plain(
        &self,
        buf: &mut [u8],
        remote: SocketAddr,
    ) -> Result<(usize, Address), ClientError> {
        loop {
            let (len, from) = self.recv_datagram(buf).await?;
            if same_endpoint(from, remote) {
                return Ok((len, Address::Ip(remote)));
            }
        }
    }

    /// The next datagram on the local socket, or [`ClientError::SessionClosed`] when the control
    /// connection ends first (the gateway has then released the binding).
    async fn recv_datagram(&self, buf: &mut [u8]) -> Result<(usize, SocketAddr), ClientError> {
        tokio::select! {
            received = self.flow.socket.recv_from(buf) => Ok(received?),
            () = self.core.session.closed() => Err(ClientError::SessionClosed(
                "the control connection ended".to_owned(),
            )),
        }
    }

    /// Sends `data` on a connected binding: plain to the remote's port with header-less
    /// delivery (to the remote's own address, which the gateway, as the next hop, relays), else
    /// with the header to the internal relay.
    async fn send_connected(
        &self,
        relays: RelayAddrs,
        delivery: Delivery,
        data: &[u8],
    ) -> Result<usize, ClientError> {
        match delivery {
            Delivery::Raw(remote) => {
                // `send_to` rather than `send`: right even if connecting the socket failed.
                let remote = shifted(remote, self.flow.offset);
                Ok(self.flow.socket.send_to(data, remote).await?)
            }
            Delivery::Header => self.send_datagram(relays, None, data).await,
        }
    }

    async fn send_datagram(
        &self,
        relays: RelayAddrs,
        remote: Option<Address>,
        data: &[u8],
    ) -> Result<usize, ClientError> {
        let header = match remote {
            Some(remote) => DatagramHeader::with_remote(relays.aid, remote),
            None => DatagramHeader::new(relays.aid),
        };
        let mut out = BytesMut::with_capacity(header.encoded_len() + data.len());
        header.encode(&mut out)?;
        out.extend_from_slice(data);
        let relay = shifted(relays.internal, self.flow.offset);
        self.flow.socket.send_to(&out, relay).await?;
        Ok(data.len())
    }
}

/// Whether `from` is `expected`, an IPv4-mapped IPv6 address counting as its IPv4 address.
fn same_endpoint(from: SocketAddr, expected: SocketAddr) -> bool {
    from.ip().to_canonical() == expected.ip().to_canonical() && from.port() == expected.port()
}

/// `addr` with its port moved up by `offset` (the RTCP port of an RTP pair).
pub(super) fn shifted(addr: SocketAddr, offset: u16) -> SocketAddr {
    SocketAddr::new(addr.ip(), addr.port().wrapping_add(offset))
}

fn shifted_address(address: &Address, offset: u16) -> Address {
    match address {
        Address::Ip(addr) => Address::Ip(shifted(*addr, offset)),
        Address::Domain(name, port) => Address::Domain(name.clone(), port.wrapping_add(offset)),
    }
}
