//! A relay's outside UDP socket: bound to the gateway's external address, and accepting only
//! datagrams that arrived on the external interface (`IP_PKTINFO` / `IPV6_RECVPKTINFO`), so an
//! inside host cannot pose as a remote by sending to the outside address from within.

use std::{
    io::{self, IoSliceMut},
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd as _,
};

use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg, setsockopt,
    sockopt::{Ipv4PacketInfo, Ipv6RecvPacketInfo},
};
use tokio::{io::Interest, net::UdpSocket};

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
    /// Binds `ip:0` (an ephemeral port). `ifindex` is the external interface (None: any).
    pub async fn bind(ip: IpAddr, ifindex: Option<u32>) -> io::Result<Self> {
        Self::bind_port(SocketAddr::new(ip, 0), ifindex).await
    }

    /// Binds exactly `addr`.
    pub async fn bind_port(addr: SocketAddr, ifindex: Option<u32>) -> io::Result<Self> {
        let socket = UdpSocket::bind(addr).await?;
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

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub async fn send_to(&self, payload: &[u8], to: SocketAddr) -> io::Result<usize> {
        self.socket.send_to(payload, to).await
    }

    /// Receives one datagram into `buf`, reporting where it came from and whether it arrived on
    /// the external interface.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<Received> {
        let fd = self.socket.as_raw_fd();
        let (len, from, arrived_on) = self
            .socket
            .async_io(Interest::READABLE, || {
                let mut iov = [IoSliceMut::new(buf)];
                let mut cmsg = nix::cmsg_space!(libc::in6_pktinfo);
                let msg = recvmsg::<SockaddrStorage>(
                    fd,
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::MSG_DONTWAIT,
                )
                .map_err(io::Error::from)?;
                let mut arrived_on = None;
                if let Ok(cmsgs) = msg.cmsgs() {
                    for cmsg in cmsgs {
                        match cmsg {
                            ControlMessageOwned::Ipv4PacketInfo(info) => {
                                arrived_on = u32::try_from(info.ipi_ifindex).ok();
                            }
                            ControlMessageOwned::Ipv6PacketInfo(info) => {
                                arrived_on = Some(info.ipi6_ifindex);
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
                Ok((msg.bytes, from, arrived_on))
            })
            .await?;
        match (self.ifindex, arrived_on) {
            (Some(expected), Some(actual)) if expected != actual => Ok(Received::WrongInterface {
                from,
                ifindex: actual,
            }),
            (Some(_), None) => Ok(Received::WrongInterface { from, ifindex: 0 }),
            _ => Ok(Received::Datagram { len, from }),
        }
    }
}
