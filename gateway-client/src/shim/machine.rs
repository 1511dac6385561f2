//! The socket-call logic of the `LD_PRELOAD` shim (`gateway socksify`), free of sockets: it is
//! told what the program calls (`bind`, `getsockname`, `sendto`, `connect`, `close`, `read` on a
//! proxied connection, `fork`) and answers what the real call should do, asking a [`Control`]
//! (the gateway's control connection in the library, a fake in tests) for the bindings.
//!
//! How an unmodified player's UDP socket gets a two-step binding (docs/protocol.md section 10):
//!
//! - `bind()` is recorded; the real socket keeps its own port.
//! - The first `getsockname()` is step 1 with RAW and RTP-PAIR: it answers the **external relay
//!   address** P (even), which the player advertises in its SETUP. A bind of the next port, or of
//!   P+1 (what a player binds when it takes the reported port for its own, as `GStreamer` does), is
//!   the pair's RTCP socket: it is really bound to the RTP socket's port + 1 and reports P+1.
//! - Step 2 names the media source as soon as the shim knows it: from the SETUP reply read on
//!   the proxied RTSP connection (its `server_port` and `source`, else the RTSP server itself),
//!   before the player can send PLAY, so nothing the server streams is dropped; or else from the
//!   socket's first datagram to a remote (`sendto`, `sendmsg`, `sendmmsg` or `connect`). A
//!   datagram to an outside address from a socket that never called `getsockname` is a one-step
//!   Open. With RAW granted the player's socket then talks to the remote's own address, so its
//!   receives need no interception at all.
//! - `close()` of the last socket of a binding releases it.
//!
//! Where RAW is not granted the socket is left alone (the real port is reported), and the
//! program is told once why its UDP cannot pass the firewall. Destinations that are loopback,
//! link-local, multicast, the proxy's own address or on a direct network never go through the
//! gateway.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use super::scan::{RtspScanner, SetupReply};

/// A file descriptor of the program.
pub type Fd = i32;

/// The gateway's side of the shim: one enhanced-mode control connection (opened lazily by the
/// library) and the program's stderr. Errors are messages for the program's user.
pub trait Control {
    /// The library's handle on one binding.
    type Binding;
    /// Step 1 (RAW asked) for the program's socket on `local_port`, as an RTP pair (`local_port`
    /// and `local_port + 1`) or alone.
    fn reserve(&mut self, local_port: u16, pair: bool) -> Result<Reserved<Self::Binding>, String>;
    /// Step 2 with the exact `remote` (the RTP source for a pair); whether RAW is in effect.
    fn confirm(&mut self, binding: &mut Self::Binding, remote: SocketAddr) -> Result<bool, String>;
    /// A one-step Open (RAW asked) from `local_port` to `remote`; `raw` says whether RAW is in
    /// effect.
    fn open(
        &mut self,
        local_port: u16,
        remote: SocketAddr,
    ) -> Result<Reserved<Self::Binding>, String>;
    /// UDP RELEASE.
    fn release(&mut self, binding: Self::Binding);
    /// After `fork()`, in the child: the inherited control connection is the parent's; drop it
    /// without a word on it (the child opens its own when it needs one).
    fn forget_connection(&mut self);
    /// Tells the program's user something, on stderr (or the shim's log file).
    fn notice(&mut self, text: &str);
}

/// What step 1 or a one-step Open gave.
#[derive(Debug)]
pub struct Reserved<B> {
    pub binding: B,
    /// The external relay address (P; P+1 is the RTCP half of a pair).
    pub external: SocketAddr,
    /// Whether the reply echoed RAW (after step 1 provisionally: step 2 decides).
    pub raw: bool,
}

/// Which destinations the program reaches directly, never through the gateway.
#[derive(Debug, Clone)]
pub struct Direct {
    proxy: SocketAddr,
    networks: Vec<(IpAddr, u8)>,
}

impl Direct {
    /// `networks` as (address, prefix length): the hosts the program reaches without the
    /// firewall (its own links, `--direct`).
    pub fn new(proxy: SocketAddr, networks: Vec<(IpAddr, u8)>) -> Self {
        Self { proxy, networks }
    }

    /// Whether `ip` is reached directly.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        let special = match ip {
            IpAddr::V4(v4) => {
                v4.is_loopback()
                    || v4.is_unspecified()
                    || v4.is_multicast()
                    || v4.is_broadcast()
                    || v4.is_link_local()
            }
            IpAddr::V6(v6) => {
                v6.is_loopback()
                    || v6.is_unspecified()
                    || v6.is_multicast()
                    || v6.is_unicast_link_local()
            }
        };
        special
            || ip == self.proxy.ip().to_canonical()
            || self
                .networks
                .iter()
                .any(|&(net, prefix)| in_prefix(ip, net.to_canonical(), prefix))
    }
}

fn in_prefix(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(ip), IpAddr::V4(net)) => {
            let bits = u32::from(prefix.min(32));
            let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
            u32::from(ip) & mask == u32::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) => {
            let bits = u32::from(prefix.min(128));
            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            u128::from(ip) & mask == u128::from(net) & mask
        }
        _ => false,
    }
}

/// What a UDP send (or `connect`) should do after the shim saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendPlan {
    /// Go ahead with the real call.
    Send,
    /// The socket has no port yet: bind it to the wildcard address, port 0, report it with
    /// [`Shim::bound`], then ask again.
    BindFirst,
}

/// A binding of the program, by the shim's own number.
type BindingId = u64;

struct Record<B> {
    /// `None` while the control call is out, or after a fork.
    binding: Option<B>,
    /// The RTP socket's real port (L); the RTCP half is L+1.
    local_port: u16,
    pair: bool,
    external: SocketAddr,
    rtp: Option<Fd>,
    rtcp: Option<Fd>,
    /// The confirmed RTP remote (RTCP's is its port + 1).
    remote: Option<SocketAddr>,
}

enum Udp {
    /// `bind()` seen, no binding yet.
    Bound { port: u16 },
    /// A socket of a binding (its RTCP half, or RTP / alone).
    Member { id: BindingId, rtcp: bool },
    /// Not proxied: reported and used as it is.
    Passthrough,
}

struct Proxied {
    destination: SocketAddr,
    scanner: RtspScanner,
}

/// The shim's state for one process.
pub struct Shim<B> {
    direct: Direct,
    udp: HashMap<Fd, Udp>,
    bindings: HashMap<BindingId, Record<B>>,
    tcp: HashMap<Fd, Proxied>,
    /// RTCP halves steered by [`Shim::bind_address`] whose real bind is still to be reported.
    tentative: HashSet<Fd>,
    next_id: BindingId,
    /// Notices already given (each once).
    told: HashSet<&'static str>,
}

impl<B> Shim<B> {
    pub fn new(direct: Direct) -> Self {
        Self {
            direct,
            udp: HashMap::new(),
            bindings: HashMap::new(),
            tcp: HashMap::new(),
            tentative: HashSet::new(),
            next_id: 1,
            told: HashSet::new(),
        }
    }

    fn tell(&mut self, control: &mut impl Control<Binding = B>, key: &'static str, text: &str) {
        if self.told.insert(key) {
            control.notice(text);
        }
    }

    /// Before the real `bind(fd, requested)` of a UDP socket: the address to really bind. The
    /// RTCP half of a pair is steered to the RTP socket's port + 1.
    pub fn bind_address(&mut self, fd: Fd, requested: SocketAddr) -> SocketAddr {
        if self.udp.contains_key(&fd) {
            // Bound already: the real call fails (EINVAL) and changes nothing.
            return requested;
        }
        let ip = requested.ip().to_canonical();
        if ip.is_loopback() || ip.is_multicast() {
            // A loopback socket never meets the firewall; a multicast receiver is not unicast.
            self.udp.insert(fd, Udp::Passthrough);
            return requested;
        }
        let port = requested.port();
        if port % 2 == 1
            && let Some((&id, record)) = self.bindings.iter().find(|(_, r)| {
                r.pair
                    && r.rtcp.is_none()
                    && (u32::from(r.local_port) + 1 == u32::from(port)
                        || u32::from(r.external.port()) + 1 == u32::from(port))
            })
        {
            let real = SocketAddr::new(requested.ip(), record.local_port + 1);
            if let Some(record) = self.bindings.get_mut(&id) {
                record.rtcp = Some(fd);
            }
            self.udp.insert(fd, Udp::Member { id, rtcp: true });
            self.tentative.insert(fd);
            return real;
        }
        self.udp.insert(fd, Udp::Bound { port });
        requested
    }

    /// After the real `bind`: its local address, or `None` when it failed.
    pub fn bound(
        &mut self,
        control: &mut impl Control<Binding = B>,
        fd: Fd,
        local: Option<SocketAddr>,
    ) {
        let tentative = self.tentative.remove(&fd);
        match (local, self.udp.get_mut(&fd)) {
            (Some(local), Some(Udp::Bound { port })) => *port = local.port(),
            (None, Some(&mut Udp::Member { id, rtcp: true })) if tentative => {
                if let Some(record) = self.bindings.get_mut(&id) {
                    record.rtcp = None;
                }
                self.udp.remove(&fd);
                // The RTP socket may have closed while this bind was out: then no socket
                // holds the binding any more.
                self.release_if_unheld(control, id);
            }
            (None, Some(Udp::Bound { .. } | Udp::Passthrough)) => {
                self.udp.remove(&fd);
            }
            // A socket bound outside `bind_address` (e.g. by `sendto` on an unbound socket).
            (Some(local), None) => {
                self.udp.insert(fd, Udp::Bound { port: local.port() });
            }
            // A member or a passthrough socket stays what it was (a failed re-bind changes
            // nothing).
            (_, Some(Udp::Member { .. })) | (Some(_), Some(Udp::Passthrough)) | (None, None) => {}
        }
    }

    /// `getsockname` of a UDP socket: `Some(address)` to report instead of the real one. The
    /// first call on a bound socket is step 1.
    pub fn sockname(
        &mut self,
        control: &mut impl Control<Binding = B>,
        fd: Fd,
    ) -> Option<SocketAddr> {
        match self.udp.get(&fd)? {
            Udp::Passthrough => None,
            Udp::Member { id, rtcp } => {
                let record = self.bindings.get(id)?;
                Some(if *rtcp {
                    with_port_offset(record.external, 1)
                } else {
                    record.external
                })
            }
            &Udp::Bound { port } => {
                if port == 0 {
                    return None;
                }
                // Every socket asks for a pair: its getsockname answer may become a client_port
                // whose + 1 the player binds next. Without an aligned pair free, alone.
                let mut pair = port < u16::MAX;
                let reserved = match control.reserve(port, pair) {
                    Err(_) if pair => {
                        pair = false;
                        control.reserve(port, false)
                    }
                    other => other,
                };
                match reserved {
                    Ok(reserved) if reserved.raw => {
                        let id = self.next_id;
                        self.next_id += 1;
                        let external = reserved.external;
                        self.bindings.insert(
                            id,
                            Record {
                                binding: Some(reserved.binding),
                                local_port: port,
                                pair,
                                external,
                                rtp: Some(fd),
                                rtcp: None,
                                remote: None,
                            },
                        );
                        self.udp.insert(fd, Udp::Member { id, rtcp: false });
                        Some(external)
                    }
                    Ok(reserved) => {
                        control.release(reserved.binding);
                        self.udp.insert(fd, Udp::Passthrough);
                        self.tell(
                            control,
                            "no raw",
                            "the gateway does not grant header-less (RAW) delivery to this host \
                             (is it this host's next hop to the remote, with --datapath kernel?): \
                             UDP is not proxied, and a strict firewall drops it",
                        );
                        None
                    }
                    Err(error) => {
                        self.udp.insert(fd, Udp::Passthrough);
                        let text = format!(
                            "UDP binding refused by the gateway ({error}): UDP is not proxied"
                        );
                        self.tell(control, "reserve failed", &text);
                        None
                    }
                }
            }
        }
    }

    /// Before a UDP send to `destination` (or a UDP `connect`): step 2 or a one-step Open when
    /// this is the socket's first datagram to an outside remote.
    pub fn before_send(
        &mut self,
        control: &mut impl Control<Binding = B>,
        fd: Fd,
        destination: SocketAddr,
    ) -> SendPlan {
        let destination = canonical(destination);
        if self.direct.contains(destination.ip()) {
            return SendPlan::Send;
        }
        match self.udp.get(&fd) {
            None => SendPlan::BindFirst,
            Some(Udp::Passthrough) => SendPlan::Send,
            Some(&Udp::Bound { port }) => {
                if port == 0 {
                    return SendPlan::BindFirst;
                }
                match control.open(port, destination) {
                    Ok(opened) if opened.raw => {
                        let id = self.next_id;
                        self.next_id += 1;
                        self.bindings.insert(
                            id,
                            Record {
                                binding: Some(opened.binding),
                                local_port: port,
                                pair: false,
                                external: opened.external,
                                rtp: Some(fd),
                                rtcp: None,
                                remote: Some(destination),
                            },
                        );
                        self.udp.insert(fd, Udp::Member { id, rtcp: false });
                    }
                    Ok(opened) => {
                        control.release(opened.binding);
                        self.udp.insert(fd, Udp::Passthrough);
                        self.tell(
                            control,
                            "no raw",
                            "the gateway does not grant header-less (RAW) delivery to this host: \
                             UDP is not proxied, and a strict firewall drops it",
                        );
                    }
                    Err(error) => {
                        self.udp.insert(fd, Udp::Passthrough);
                        let text = format!(
                            "UDP Open refused by the gateway ({error}): UDP is not proxied"
                        );
                        self.tell(control, "open failed", &text);
                    }
                }
                SendPlan::Send
            }
            Some(&Udp::Member { id, rtcp }) => {
                let rtp_remote = if rtcp {
                    match destination.port().checked_sub(1) {
                        Some(port) => SocketAddr::new(destination.ip(), port),
                        None => return SendPlan::Send,
                    }
                } else {
                    destination
                };
                self.confirm(control, id, rtp_remote);
                SendPlan::Send
            }
        }
    }

    /// Step 2 of binding `id` with RTP remote `remote`, unless it is confirmed already.
    fn confirm(
        &mut self,
        control: &mut impl Control<Binding = B>,
        id: BindingId,
        remote: SocketAddr,
    ) {
        let Some(record) = self.bindings.get_mut(&id) else {
            return;
        };
        if record.remote.is_some() {
            return;
        }
        let Some(binding) = record.binding.as_mut() else {
            return;
        };
        let outcome = control.confirm(binding, remote);
        record.remote = Some(remote);
        match outcome {
            Ok(true) => {}
            Ok(false) => self.tell(
                control,
                "step 2 no raw",
                "the gateway confirmed a binding without header-less (RAW) delivery: its \
                 datagrams will not reach the program",
            ),
            Err(error) => {
                let text =
                    format!("step 2 refused by the gateway ({error}): that stream will not arrive");
                self.tell(control, "confirm failed", &text);
            }
        }
    }

    /// `close(fd)`: the binding goes when its last socket does.
    pub fn closing(&mut self, control: &mut impl Control<Binding = B>, fd: Fd) {
        self.tcp.remove(&fd);
        self.tentative.remove(&fd);
        let Some(Udp::Member { id, rtcp }) = self.udp.remove(&fd) else {
            return;
        };
        let Some(record) = self.bindings.get_mut(&id) else {
            return;
        };
        if rtcp {
            record.rtcp = None;
        } else {
            record.rtp = None;
        }
        self.release_if_unheld(control, id);
    }

    /// Releases binding `id` once neither of its sockets holds it.
    fn release_if_unheld(&mut self, control: &mut impl Control<Binding = B>, id: BindingId) {
        if self
            .bindings
            .get(&id)
            .is_some_and(|r| r.rtp.is_none() && r.rtcp.is_none())
            && let Some(record) = self.bindings.remove(&id)
            && let Some(binding) = record.binding
        {
            control.release(binding);
        }
    }

    /// Before a TCP `connect(fd, destination)`: whether it goes through the gateway (SOCKS
    /// CONNECT) rather than directly.
    pub fn proxies_tcp(&self, destination: SocketAddr) -> bool {
        !self.direct.contains(destination.ip())
    }

    /// A TCP connection relayed to `destination` through the gateway.
    pub fn tcp_connected(&mut self, fd: Fd, destination: SocketAddr) {
        self.tcp.insert(
            fd,
            Proxied {
                destination,
                scanner: RtspScanner::new(),
            },
        );
    }

    /// `getpeername` of a proxied connection: where the program asked to connect.
    pub fn peer(&self, fd: Fd) -> Option<SocketAddr> {
        self.tcp.get(&fd).map(|p| p.destination)
    }

    /// Whether `fd` is a proxied connection whose bytes the shim still reads along.
    pub fn scans(&self, fd: Fd) -> bool {
        self.tcp.get(&fd).is_some_and(|p| !p.scanner.is_done())
    }

    /// Bytes the program read from a proxied connection, before it sees them: every SETUP reply
    /// confirms the binding whose external port the player advertised.
    pub fn tcp_received(&mut self, control: &mut impl Control<Binding = B>, fd: Fd, data: &[u8]) {
        let Some(proxied) = self.tcp.get_mut(&fd) else {
            return;
        };
        let server = proxied.destination.ip();
        for SetupReply {
            client_port,
            server_port,
            source,
        } in proxied.scanner.feed(data)
        {
            let found = self.bindings.iter().find_map(|(&id, r)| {
                (r.external.port() == client_port && r.remote.is_none()).then_some(id)
            });
            if let Some(id) = found {
                let remote = SocketAddr::new(source.unwrap_or(server).to_canonical(), server_port);
                self.confirm(control, id, remote);
            }
        }
    }

    /// In the child after `fork()`: the bindings and the control connection are the parent's.
    /// The child forgets them (closing its copies releases nothing).
    pub fn forked_child(&mut self, control: &mut impl Control<Binding = B>) {
        for (_, record) in self.bindings.drain() {
            drop(record.binding);
        }
        self.udp.clear();
        self.tentative.clear();
        control.forget_connection();
    }

    /// Live bindings (for tests and diagnostics).
    pub fn bindings(&self) -> usize {
        self.bindings.len()
    }
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

fn with_port_offset(addr: SocketAddr, offset: u16) -> SocketAddr {
    SocketAddr::new(addr.ip(), addr.port().saturating_add(offset))
}

#[cfg(test)]
#[path = "machine_tests.rs"]
mod tests;
