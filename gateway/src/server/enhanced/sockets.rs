//! The enhanced mode's shared relay sockets: per address family and side, one UDP socket that
//! receives every datagram for a relay port (steered there by the `sk_lookup` program, the relay
//! port read from `IP_RECVORIGDSTADDR`) and one raw socket that sends from any relay port.
//!
//! Why raw sockets for sending: a binding has no socket bound to its ports, and the kernel lets
//! a UDP socket send only from its own port. A raw socket that brings its own IP and UDP headers
//! (`IPPROTO_RAW`) sends from any address and port, costs the kernel's fast path nothing (a tc
//! egress rewrite would run on every relayed packet) and serves header-less (RAW) delivery from
//! the remote's address too. What the kernel then no longer does is done here: the UDP checksum
//! and fragmentation to the interface's MTU ([`crate::udp_packet`]). The raw socket receives
//! nothing (`IPPROTO_RAW` is send-only).
//!
//! Owns the sockets and the steering program; knows nothing of bindings.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, AsRawFd, OwnedFd},
    sync::atomic::{AtomicU32, AtomicUsize, Ordering},
};

use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrStorage, sendto, setsockopt,
    socket,
    sockopt::{Ipv4OrigDstAddr, Ipv4PacketInfo, Ipv6OrigDstAddr, Ipv6RecvPacketInfo},
};
use tokio::{
    io::{Interest, unix::AsyncFd},
    net::UdpSocket,
};

use crate::{
    binding::Config,
    datapath::steering::{RelayPortRange, Steering},
    netif::tie_to_device,
    server::outside::recv_datagram,
    udp_packet::{self, PacketError},
};
pub use gateway_common::RelaySide as Side;

/// Receive queue of a shared relay socket (the kernel doubles it for its bookkeeping).
const RECEIVE_QUEUE: usize = 4 << 20;

/// What the relay sockets need to know of the interfaces.
#[derive(Debug, Clone, Default)]
pub struct Interfaces {
    /// The internal interface's name and index (`None`: untied, in-process tests).
    pub internal: Option<(String, u32)>,
    /// The external interface's name and index.
    pub external: Option<(String, u32)>,
}

impl Interfaces {
    /// The interface of `side`, if the sockets are tied to one.
    pub fn of(&self, side: Side) -> Option<&(String, u32)> {
        match side {
            Side::Inside => self.internal.as_ref(),
            Side::Outside => self.external.as_ref(),
        }
    }
}

/// Why the shared relay sockets could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SocketsError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("steer relay ports to the shared sockets: {0}")]
    Steering(#[from] crate::datapath::DatapathError),
}

fn io_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> SocketsError {
    let what = what.into();
    move |source| SocketsError::Io { what, source }
}

/// One datagram that reached a relay port.
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    pub len: usize,
    pub from: SocketAddr,
    /// The relay address and port it was sent to.
    pub to: SocketAddr,
    /// The interface it arrived on, if the kernel said.
    pub ifindex: Option<u32>,
}

/// The receiving socket of one family and side.
#[derive(Debug)]
pub struct Receiver {
    socket: UdpSocket,
    pub side: Side,
}

impl Receiver {
    fn open(ip: IpAddr, side: Side, interfaces: &Interfaces) -> Result<Self, SocketsError> {
        let std = std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).map_err(io_error(format!(
            "bind the shared {side:?} relay socket on {ip}"
        )))?;
        std.set_nonblocking(true)
            .map_err(io_error("set non-blocking"))?;
        tie_to_device(&std, interfaces.of(side).map(|(name, _)| name.as_str()))
            .map_err(io_error("tie the shared relay socket to its interface"))?;
        let options = if ip.is_ipv4() {
            setsockopt(&std, Ipv4PacketInfo, &true)
                .and_then(|()| setsockopt(&std, Ipv4OrigDstAddr, &true))
        } else {
            setsockopt(&std, Ipv6RecvPacketInfo, &true)
                .and_then(|()| setsockopt(&std, Ipv6OrigDstAddr, &true))
        };
        options
            .map_err(|e| io_error("ask for packet info and the original destination")(e.into()))?;
        // A burst for the slow path of every binding lands here: a larger queue than one
        // socket's default, past net.core.rmem_max where CAP_NET_ADMIN allows it.
        if setsockopt(&std, nix::sys::socket::sockopt::RcvBufForce, &RECEIVE_QUEUE).is_err() {
            let _ = setsockopt(&std, nix::sys::socket::sockopt::RcvBuf, &RECEIVE_QUEUE);
        }
        let socket = UdpSocket::from_std(std).map_err(io_error("register with the runtime"))?;
        Ok(Self { socket, side })
    }

    /// Waits until a datagram can be read.
    pub async fn readable(&self) -> io::Result<()> {
        self.socket.readable().await
    }

    /// Receives one datagram now into `buf`, or fails with `WouldBlock`.
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<Arrival> {
        let received = self.socket.try_io(Interest::READABLE, || {
            recv_datagram(self.socket.as_raw_fd(), buf)
        })?;
        let to = received
            .to
            .ok_or_else(|| io::Error::other("datagram without its original destination"))?;
        Ok(Arrival {
            len: received.len,
            from: received.from,
            to,
            ifindex: received.ifindex,
        })
    }
}

/// Device MTU when the interface cannot say (an untied socket: loopback tests).
const UNTIED_MTU: usize = 65_535;

/// The sending socket of one family and side: `IPPROTO_RAW`, tied to the side's interface.
#[derive(Debug)]
pub struct Sender {
    fd: AsyncFd<OwnedFd>,
    device: Option<String>,
    /// The interface's MTU as last read; re-read when the kernel refuses a packet as too big.
    mtu: AtomicUsize,
    next_id: AtomicU32,
}

impl Sender {
    fn open(ipv6: bool, device: Option<&str>) -> Result<Self, SocketsError> {
        let family = if ipv6 {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        let fd = socket(
            family,
            SockType::Raw,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            SockProtocol::Raw,
        )
        .map_err(|e| io_error("open a raw socket for the relay (needs CAP_NET_RAW)")(e.into()))?;
        tie_to_device(&fd, device)
            .map_err(io_error("tie the raw relay socket to its interface"))?;
        // What the relay sends to a group must not loop back to this host: the gateway's own
        // group sockets would fan its clients' datagrams out a second time.
        let (level, name) = if ipv6 {
            (libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_LOOP)
        } else {
            (libc::IPPROTO_IP, libc::IP_MULTICAST_LOOP)
        };
        set_int_option(&fd, level, name, 0).map_err(io_error("turn multicast loopback off"))?;
        let mtu = device.map_or(Ok(UNTIED_MTU), |name| device_mtu(&fd, name));
        let mtu = mtu.map_err(io_error("read the interface MTU"))?;
        // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open and the same for
        // the AsyncFd's whole life.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::WRITABLE) }
            .map_err(|e| io_error("register with the runtime")(e.into()))?;
        let seed = {
            let mut bytes = [0u8; 4];
            let _ = getrandom::fill(&mut bytes);
            u32::from_ne_bytes(bytes)
        };
        Ok(Self {
            fd,
            device: device.map(str::to_owned),
            mtu: AtomicUsize::new(mtu),
            next_id: AtomicU32::new(seed),
        })
    }

    /// Sends `payload` from `from` to `to` as one UDP datagram (fragmented to the MTU).
    pub async fn send(&self, from: SocketAddr, to: SocketAddr, payload: &[u8]) -> io::Result<()> {
        self.send_with_ttl(from, to, payload, udp_packet::HOP_LIMIT)
            .await
    }

    /// [`Sender::send`] with TTL (hop limit) `ttl`: a multicast send binding's, or 1 for a
    /// multicast-to-multicast re-send inside.
    pub async fn send_with_ttl(
        &self,
        from: SocketAddr,
        to: SocketAddr,
        payload: &[u8],
        ttl: u8,
    ) -> io::Result<()> {
        let mut refreshed = false;
        loop {
            let mtu = self.mtu.load(Ordering::Relaxed);
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let packets = udp_packet::packets_with_hop_limit(from, to, payload, mtu, id, ttl)
                .map_err(|error| {
                    let kind = match error {
                        PacketError::TooLarge(_) => io::ErrorKind::InvalidInput,
                        _ => io::ErrorKind::Other,
                    };
                    io::Error::new(kind, error)
                })?;
            match self.send_packets(to.ip().to_canonical(), &packets).await {
                Err(error) if error.raw_os_error() == Some(libc::EMSGSIZE) && !refreshed => {
                    // The MTU went down since it was read: read it again and fragment anew.
                    refreshed = true;
                    if let Some(device) = &self.device
                        && let Ok(mtu) = device_mtu(self.fd.get_ref(), device)
                    {
                        self.mtu.store(mtu, Ordering::Relaxed);
                    }
                }
                other => return other,
            }
        }
    }

    async fn send_packets(&self, to: IpAddr, packets: &[Vec<u8>]) -> io::Result<()> {
        let target: SockaddrStorage = SocketAddr::new(to, 0).into();
        for packet in packets {
            loop {
                let mut ready = self.fd.writable().await?;
                match ready.try_io(|fd| {
                    sendto(fd.as_raw_fd(), packet, &target, MsgFlags::MSG_DONTWAIT)
                        .map_err(io::Error::from)
                }) {
                    Ok(result) => {
                        result?;
                        break;
                    }
                    Err(_would_block) => {}
                }
            }
        }
        Ok(())
    }
}

/// `setsockopt` of an `int` option nix has no type for.
pub(super) fn set_int_option(
    socket: &impl AsFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: a valid socket, and a pointer to an int that outlives the call with its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            libc::socklen_t::try_from(size_of::<libc::c_int>()).unwrap_or(4),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The MTU of interface `name` (`SIOCGIFMTU` on any socket of this namespace).
fn device_mtu(socket: &impl AsFd, name: &str) -> io::Result<usize> {
    // SAFETY: ifreq is plain data; zeroes are valid.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.len() >= request.ifr_name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    for (slot, byte) in request.ifr_name.iter_mut().zip(bytes) {
        *slot = libc::c_char::from_ne_bytes([*byte]);
    }
    // SAFETY: a valid socket and a valid ifreq that outlives the call.
    let rc = unsafe {
        libc::ioctl(
            socket.as_fd().as_raw_fd(),
            libc::SIOCGIFMTU,
            &raw mut request,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFMTU filled the MTU member of the union.
    let mtu = unsafe { request.ifr_ifru.ifru_mtu };
    usize::try_from(mtu).map_err(|_| io::Error::other("negative MTU"))
}

/// Every shared relay socket of the gateway and the steering that feeds them.
#[derive(Debug)]
pub struct RelaySockets {
    pub receivers: Vec<Receiver>,
    /// By [`gateway_common::relay_socket_index`].
    senders: [Option<Sender>; 4],
    pub interfaces: Interfaces,
    _steering: Steering,
}

impl RelaySockets {
    /// Opens a receiver and a sender for each family and side `config` has relay addresses of,
    /// and steers `config`'s relay ports to the receivers. Needs a tokio runtime.
    pub fn open(config: &Config, interfaces: &Interfaces) -> Result<Self, SocketsError> {
        let mut receivers = Vec::new();
        let mut senders: [Option<Sender>; 4] = Default::default();
        let mut ranges = Vec::new();
        for (side, ips, ports) in [
            (Side::Inside, &config.internal_ips, config.internal_ports),
            (Side::Outside, &config.external_ips, config.external_ports),
        ] {
            for ipv6 in [false, true] {
                let mut family = ips.iter().filter(|ip| ip.is_ipv6() == ipv6).peekable();
                let Some(first) = family.peek().copied() else {
                    continue;
                };
                receivers.push(Receiver::open(*first, side, interfaces)?);
                let slot = gateway_common::relay_socket_index(ipv6, side) as usize;
                senders[slot] = Some(Sender::open(
                    ipv6,
                    interfaces.of(side).map(|(name, _)| name.as_str()),
                )?);
                ranges.extend(family.map(|ip| RelayPortRange {
                    ip: *ip,
                    side,
                    first: ports.first,
                    last: ports.last,
                }));
            }
        }
        let slots: Vec<(bool, Side, &dyn AsRawFd)> = receivers
            .iter()
            .map(|r| {
                let ipv6 = r.socket.local_addr().is_ok_and(|a| a.is_ipv6());
                (ipv6, r.side, &r.socket as &dyn AsRawFd)
            })
            .collect();
        let steering = Steering::attach(&ranges, &slots)?;
        Ok(Self {
            receivers,
            senders,
            interfaces: interfaces.clone(),
            _steering: steering,
        })
    }

    /// The sender for datagrams from a relay address of `side` (or, RAW, towards a client).
    pub fn sender(&self, ipv6: bool, side: Side) -> Option<&Sender> {
        self.senders[gateway_common::relay_socket_index(ipv6, side) as usize].as_ref()
    }
}
