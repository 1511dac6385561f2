//! A relay's outside UDP socket: bound to the gateway's external address, and accepting only
//! datagrams that arrived on the external interface (`IP_PKTINFO` / `IPV6_RECVPKTINFO`), so an
//! inside host cannot pose as a remote by sending to the outside address from within.

use std::{
    io::{self, IoSliceMut},
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd as _, RawFd},
};

use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg, setsockopt,
    sockopt::{Ipv4PacketInfo, Ipv6RecvPacketInfo},
};
use tokio::{io::Interest, net::UdpSocket};

use super::{External, tie_to_device};

/// What one receive produced.
pub enum Received {
    /// A datagram from `from` that arrived on the external interface.
    Datagram { len: usize, from: SocketAddr },
    /// A datagram that arrived on another interface: to be dropped and counted.
    WrongInterface { from: SocketAddr, ifindex: u32 },
}

#[derive(Debug)]
pub struct OutsideSocket {
    socket: UdpSocket,
    local: SocketAddr,
    ifindex: Option<u32>,
}

impl OutsideSocket {
    /// Binds `ip:0` (an ephemeral port) on the external interface.
    pub async fn bind(ip: IpAddr, external: &External) -> io::Result<Self> {
        Self::bind_port(SocketAddr::new(ip, 0), external).await
    }

    /// Binds exactly `addr`, tied to the external interface (when `external` names one).
    pub async fn bind_port(addr: SocketAddr, external: &External) -> io::Result<Self> {
        let ifindex = external.ifindex;
        let socket = UdpSocket::bind(addr).await?;
        tie_to_device(&socket, external.device.as_deref())?;
        if addr.is_ipv4() {
            setsockopt(&socket, Ipv4PacketInfo, &true).map_err(io::Error::from)?;
        } else {
            setsockopt(&socket, Ipv6RecvPacketInfo, &true).map_err(io::Error::from)?;
        }
        let local = socket.local_addr()?;
        Ok(Self {
            socket,
            local,
            ifindex,
        })
    }

    /// A socket [`OutsideSocket::bind_port`] made, handed over by the previous daemon (its
    /// options came with it).
    pub fn adopt(socket: std::net::UdpSocket, external: &External) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        let socket = UdpSocket::from_std(socket)?;
        let local = socket.local_addr()?;
        Ok(Self {
            socket,
            local,
            ifindex: external.ifindex,
        })
    }

    /// The socket, to hand over.
    pub fn socket(&self) -> &UdpSocket {
        &self.socket
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub async fn send_to(&self, payload: &[u8], to: SocketAddr) -> io::Result<usize> {
        self.socket.send_to(payload, to).await
    }

    /// Waits until a datagram can be read (without holding a buffer while waiting).
    pub async fn readable(&self) -> io::Result<()> {
        self.socket.readable().await
    }

    /// Receives one datagram now, or fails with `WouldBlock`.
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<Received> {
        let received = self.socket.try_io(Interest::READABLE, || {
            recv_datagram(self.socket.as_raw_fd(), buf)
        })?;
        Ok(self.classify((received.len, received.from, received.ifindex)))
    }

    fn classify(&self, (len, from, arrived_on): (usize, SocketAddr, Option<u32>)) -> Received {
        match (self.ifindex, arrived_on) {
            (Some(expected), Some(actual)) if expected != actual => Received::WrongInterface {
                from,
                ifindex: actual,
            },
            (Some(_), None) => Received::WrongInterface { from, ifindex: 0 },
            _ => Received::Datagram { len, from },
        }
    }
}

/// What one `recvmsg` on a relay socket gave: the datagram's length and source, its original
/// destination (with `IP_RECVORIGDSTADDR` on) and the interface it arrived on (with
/// `IP_PKTINFO` on), when the kernel said.
#[derive(Debug, Clone, Copy)]
pub struct RecvInfo {
    pub len: usize,
    pub from: SocketAddr,
    pub to: Option<SocketAddr>,
    pub ifindex: Option<u32>,
}

/// One non-blocking `recvmsg` with the control messages a relay socket asks for.
pub fn recv_datagram(fd: RawFd, buf: &mut [u8]) -> io::Result<RecvInfo> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut cmsg = nix::cmsg_space!(libc::in6_pktinfo, libc::sockaddr_in6);
    let msg = recvmsg::<SockaddrStorage>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_DONTWAIT)
        .map_err(io::Error::from)?;
    let mut ifindex = None;
    let mut to = None;
    if let Ok(cmsgs) = msg.cmsgs() {
        for cmsg in cmsgs {
            match cmsg {
                ControlMessageOwned::Ipv4PacketInfo(info) => {
                    ifindex = u32::try_from(info.ipi_ifindex).ok();
                }
                ControlMessageOwned::Ipv6PacketInfo(info) => ifindex = Some(info.ipi6_ifindex),
                ControlMessageOwned::Ipv4OrigDstAddr(addr) => {
                    to = Some(SocketAddr::from(std::net::SocketAddrV4::new(
                        u32::from_be(addr.sin_addr.s_addr).into(),
                        u16::from_be(addr.sin_port),
                    )));
                }
                ControlMessageOwned::Ipv6OrigDstAddr(addr) => {
                    to = Some(SocketAddr::from(std::net::SocketAddrV6::new(
                        addr.sin6_addr.s6_addr.into(),
                        u16::from_be(addr.sin6_port),
                        0,
                        0,
                    )));
                }
                _ => {}
            }
        }
    }
    let from = msg
        .address
        .and_then(|addr| {
            addr.as_sockaddr_in()
                .map(|v4| SocketAddr::from(std::net::SocketAddrV4::from(*v4)))
                .or_else(|| {
                    addr.as_sockaddr_in6()
                        .map(|v6| SocketAddr::from(std::net::SocketAddrV6::from(*v6)))
                })
        })
        .ok_or_else(|| io::Error::other("datagram without a source address"))?;
    Ok(RecvInfo {
        len: msg.bytes,
        from,
        to,
        ifindex,
    })
}

/// Runs `f` on this worker thread's receive buffer (64 KiB, shared by every relay on the thread):
/// relays wait for readiness without a buffer of their own and copy out what they read, so a
/// live binding costs no receive buffer.
pub fn with_scratch<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; 65_535]);
    }
    SCRATCH.with(|buf| f(&mut buf.borrow_mut()))
}
