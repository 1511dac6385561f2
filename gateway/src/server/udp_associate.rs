//! UDP ASSOCIATE (RFC 1928) with the userspace relay, the slow path until the kernel relays.
//!
//! Rules (protocol.md section 1): datagrams from any client address other than the allowed one
//! are dropped (IP from DST, or the control peer's IP when DST is zero or `PySocks`' name "0"; port
//! latched from the first datagram when DST.PORT is 0); FRAG != 0 is dropped; bad datagrams are
//! dropped silently. As a firewall, a remote is admitted inbound only after the client sent to
//! it: the exact (remote ip:port -> external relay ip:port) kernel entry is installed before that
//! first datagram leaves, and every entry is removed when the association ends with its control
//! connection.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use std::os::fd::AsFd as _;

use bytes::BytesMut;
use tokio::{
    net::{TcpStream, UdpSocket},
    time::Instant,
};
use tracing::{debug, info, warn};

use super::{
    Services,
    connect::resolve_allowed,
    connection::{Connection, ConnectionError},
    handover::{MovedAssociation, MovedKind},
    outside::{OutsideSocket, Received, with_scratch},
    send_failure, send_success,
};
use crate::gate::{Framing, GateEntry, KernelRelay};
use gateway_proto::{Address, ReplyCode, UdpHeader};

/// What one RFC 1928 association may hold.
#[derive(Debug, Clone, Copy)]
pub struct AssociationLimits {
    /// Remotes admitted at once; past it, datagrams to new remotes are dropped and counted (the
    /// kernel's binding map is shared by every client). Default 4096.
    pub max_remotes: usize,
    /// An admitted remote with no datagram either way for this long is removed (default: the
    /// enhanced mode's binding idle timeout, 5 min); the client sending to it admits it again.
    pub remote_idle: Duration,
}

impl Default for AssociationLimits {
    fn default() -> Self {
        Self {
            max_remotes: 4096,
            remote_idle: Duration::from_mins(5),
        }
    }
}
/// How often idle remotes are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(15);

/// Counters of one association, logged when it ends.
#[derive(Debug, Default)]
struct AssociationStats {
    dropped_remote_cap: u64,
    remotes_expired: u64,
    to_remote: u64,
    to_client: u64,
    dropped_wrong_client: u64,
    dropped_malformed: u64,
    dropped_fragment: u64,
    dropped_policy: u64,
    dropped_unknown_remote: u64,
    dropped_wrong_interface: u64,
}

/// Who may use the association from inside.
#[derive(Debug, Clone, Copy)]
struct ClientMatch {
    ip: IpAddr,
    /// 0 until latched from the first datagram.
    port: u16,
}

impl ClientMatch {
    fn accepts(&mut self, from: SocketAddr) -> bool {
        if from.ip().to_canonical() != self.ip {
            return false;
        }
        if self.port == 0 {
            self.port = from.port();
            return true;
        }
        from.port() == self.port
    }

    fn addr(&self) -> Option<SocketAddr> {
        (self.port != 0).then(|| SocketAddr::new(self.ip, self.port))
    }
}

struct Association<'a> {
    services: &'a Services,
    peer: SocketAddr,
    client: ClientMatch,
    inside: UdpSocket,
    outside_v4: Option<OutsideSocket>,
    outside_v6: Option<OutsideSocket>,
    /// Remotes the client has sent to, each with a kernel entry, and when the userspace relay
    /// last saw a datagram of it.
    admitted: HashMap<GateEntry, Instant>,
    remote_cap: usize,
    remote_idle: Duration,
    stats: AssociationStats,
    /// Handed to the next daemon: its kernel entries stay.
    moved: bool,
}

/// UDP ASSOCIATE: `Some` with the control connection's socket when the association stopped
/// for the next daemon.
pub async fn run(
    mut conn: Connection,
    services: &Services,
    peer: SocketAddr,
    local: SocketAddr,
    address: &Address,
) -> Result<Option<(TcpStream, MovedKind)>, ConnectionError> {
    let peer_ip = peer.ip().to_canonical();
    let client_ip = match address {
        Address::Ip(addr) if !addr.ip().is_unspecified() => addr.ip().to_canonical(),
        _ => peer_ip,
    };
    // Decision: the association serves the host on the control connection only, so no client
    // can steer a relay towards another inside host.
    if client_ip != peer_ip {
        info!(%peer, %client_ip, "UDP ASSOCIATE for another host refused");
        send_failure(&mut conn, ReplyCode::NotAllowed).await;
        return Ok(None);
    }
    let bound = match UdpSocket::bind(SocketAddr::new(local.ip(), 0)).await {
        Ok(inside) => services.tie_inside(&inside).map(|()| inside),
        Err(error) => Err(error),
    };
    let (inside, relay_inside) = match bound.and_then(|inside| {
        let relay = inside.local_addr()?;
        Ok((inside, relay))
    }) {
        Ok(bound) => bound,
        Err(error) => {
            // EMFILE, no port left: the client hears why instead of a closed connection.
            warn!(%peer, %error, "bind the inside relay socket for UDP ASSOCIATE");
            send_failure(&mut conn, ReplyCode::GeneralFailure).await;
            return Ok(None);
        }
    };
    let association = Association {
        services,
        peer,
        client: ClientMatch {
            ip: client_ip,
            port: address.port(),
        },
        inside,
        outside_v4: None,
        outside_v6: None,
        admitted: HashMap::new(),
        remote_cap: services.association_limits.max_remotes,
        remote_idle: services.association_limits.remote_idle,
        stats: AssociationStats::default(),
        moved: false,
    };
    send_success(&mut conn, relay_inside).await?;
    info!(%peer, relay = %relay_inside, "UDP ASSOCIATE ready");
    Ok(association.serve_until_closed(conn).await)
}

/// A UDP ASSOCIATE handed over by the previous daemon, relayed on: its remotes are admitted in
/// the kernel already.
pub async fn resume(
    stream: TcpStream,
    moved: MovedAssociation,
    services: &Services,
    peer: SocketAddr,
) -> Option<(TcpStream, MovedKind)> {
    let outside = |socket: Option<UdpSocket>| {
        socket.and_then(|socket| {
            let std = socket.into_std().ok()?;
            OutsideSocket::adopt(std, &services.external).ok()
        })
    };
    let now = Instant::now();
    let association = Association {
        services,
        peer,
        client: ClientMatch {
            ip: moved.client.ip(),
            port: moved.client.port(),
        },
        inside: moved.inside,
        outside_v4: outside(moved.outside_v4),
        outside_v6: outside(moved.outside_v6),
        admitted: moved
            .remotes
            .iter()
            .map(|(remote, relay, quiet)| {
                let seen = now.checked_sub(*quiet).unwrap_or(now);
                (
                    GateEntry {
                        remote: *remote,
                        relay: *relay,
                    },
                    seen,
                )
            })
            .collect(),
        remote_cap: services.association_limits.max_remotes,
        remote_idle: services.association_limits.remote_idle,
        stats: AssociationStats::default(),
        moved: false,
    };
    info!(%peer, remotes = association.admitted.len(), "UDP ASSOCIATE taken over from the previous daemon");
    association
        .serve_until_closed(Connection::new(stream))
        .await
}

impl Association<'_> {
    /// Relays until the control connection closes (the association ends) or the quiesce of an
    /// upgrade (between two datagrams: the sockets and remotes move).
    async fn serve_until_closed(mut self, mut conn: Connection) -> Option<(TcpStream, MovedKind)> {
        let quiesced = tokio::select! {
            () = conn.wait_closed() => false,
            result = self.serve() => match result {
                Ok(quiesced) => quiesced,
                Err(error) => {
                    warn!(peer = %self.peer, %error, "UDP relay failed");
                    false
                }
            },
        };
        if !quiesced {
            return None;
        }
        let moved = self.hand_over()?;
        let (stream, _) = conn.into_parts();
        info!(peer = %self.peer, remotes = moved.remotes.len(), "UDP ASSOCIATE stopped for the upgrade; its sockets move");
        Some((stream, MovedKind::Associate(moved)))
    }

    /// The association for the next daemon (its sockets' descriptors duplicated; these close
    /// with `self`, which then leaves the kernel entries in place).
    fn hand_over(&mut self) -> Option<MovedAssociation> {
        let dup = |socket: &UdpSocket| -> Option<UdpSocket> {
            let fd = socket.as_fd().try_clone_to_owned().ok()?;
            let std = std::net::UdpSocket::from(fd);
            std.set_nonblocking(true).ok()?;
            UdpSocket::from_std(std).ok()
        };
        let now = Instant::now();
        let moved = MovedAssociation {
            client: SocketAddr::new(self.client.ip, self.client.port),
            inside: dup(&self.inside)?,
            outside_v4: self.outside_v4.as_ref().and_then(|s| dup(s.socket())),
            outside_v6: self.outside_v6.as_ref().and_then(|s| dup(s.socket())),
            remotes: self
                .admitted
                .iter()
                .map(|(entry, seen)| (entry.remote, entry.relay, now.duration_since(*seen)))
                .collect(),
        };
        self.moved = true;
        Some(moved)
    }

    /// Relays until an error, or `Ok(true)` at the quiesce of an upgrade.
    async fn serve(&mut self) -> std::io::Result<bool> {
        let mut quiesce = self.services.quiesce.subscribe();
        // No buffer per association: wait for readiness, read into the thread's scratch buffer
        // and copy out exactly the datagram.
        let period = SWEEP_EVERY
            .min(self.remote_idle / 2)
            .max(Duration::from_millis(100));
        let mut sweep = tokio::time::interval(period);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = super::handover::quiesced(&mut quiesce) => return Ok(true),
                _ = sweep.tick() => self.expire_idle_remotes(),
                ready = self.inside.readable() => {
                    ready?;
                    match with_scratch(|buf| self.inside.try_recv_from(buf).map(|(len, from)| (buf[..len].to_vec(), from))) {
                        Ok((datagram, from)) => self.on_client_datagram(&datagram, from).await,
                        Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(error) => return Err(error),
                    }
                }
                ready = readable_optional(self.outside_v4.as_ref()) => {
                    ready?;
                    self.read_outside(true).await?;
                }
                ready = readable_optional(self.outside_v6.as_ref()) => {
                    ready?;
                    self.read_outside(false).await?;
                }
            }
        }
    }

    /// Reads one datagram from the outside socket of a family and handles it.
    async fn read_outside(&mut self, v4: bool) -> std::io::Result<()> {
        let socket = if v4 {
            &self.outside_v4
        } else {
            &self.outside_v6
        };
        let Some(socket) = socket else {
            return Ok(());
        };
        let read = with_scratch(|buf| {
            socket.try_recv(buf).map(|received| {
                let data = match received {
                    Received::Datagram { len, .. } => buf[..len].to_vec(),
                    Received::WrongInterface { .. } => Vec::new(),
                };
                (received, data)
            })
        });
        let relay = socket.local_addr();
        match read {
            Ok((received, data)) => {
                self.on_remote_datagram(received, relay, &data).await;
                Ok(())
            }
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(error) => Err(error),
        }
    }

    async fn on_client_datagram(&mut self, datagram: &[u8], from: SocketAddr) {
        if !self.client.accepts(from) {
            self.stats.dropped_wrong_client += 1;
            return;
        }
        let mut buf = datagram;
        let Ok(header) = UdpHeader::decode(&mut buf) else {
            self.stats.dropped_malformed += 1;
            return;
        };
        if header.is_fragment() {
            self.stats.dropped_fragment += 1;
            return;
        }
        let payload = buf;
        let Ok(targets) = resolve_allowed(self.services, &header.address).await else {
            self.stats.dropped_policy += 1;
            return;
        };
        let target = targets[0];
        let Some(relay) = self.ensure_outside(target.ip()).await else {
            self.stats.dropped_policy += 1;
            return;
        };
        let entry = GateEntry {
            remote: target,
            relay,
        };
        if let Some(seen) = self.admitted.get_mut(&entry) {
            *seen = Instant::now();
        } else {
            if self.admitted.len() >= self.remote_cap {
                self.expire_idle_remotes();
            }
            if self.admitted.len() >= self.remote_cap {
                if self.stats.dropped_remote_cap == 0 {
                    warn!(peer = %self.peer, cap = self.remote_cap, "UDP association at its cap of remotes; datagrams to new remotes are dropped");
                }
                self.stats.dropped_remote_cap += 1;
                self.services.counters.associate_remote_cap.inc();
                return;
            }
            // Admit the answer before the question leaves; where the datapath can, the kernel
            // relays this remote's datagrams (and the client's to it) from now on.
            let installed = match self.kernel_relay() {
                Some(relay) => self.services.gate.install_kernel_relay(entry, relay),
                None => self.services.gate.install(entry),
            };
            if let Err(error) = installed {
                warn!(peer = %self.peer, %error, "cannot admit remote; datagram dropped");
                self.stats.dropped_policy += 1;
                return;
            }
            debug!(peer = %self.peer, remote = %target, relay = %entry.relay, "remote admitted");
            self.admitted.insert(entry, Instant::now());
        }
        let outside = if relay.is_ipv4() {
            &self.outside_v4
        } else {
            &self.outside_v6
        };
        let Some(outside) = outside else {
            return;
        };
        if outside.send_to(payload, target).await.is_ok() {
            self.stats.to_remote += 1;
            self.count_relayed(payload.len());
        }
    }

    async fn on_remote_datagram(&mut self, received: Received, relay: SocketAddr, buf: &[u8]) {
        let (len, from) = match received {
            Received::Datagram { len, from } => (len, from),
            Received::WrongInterface { from, ifindex } => {
                debug!(%from, ifindex, "datagram on the outside socket from the wrong interface");
                self.stats.dropped_wrong_interface += 1;
                return;
            }
        };
        let from = SocketAddr::new(from.ip().to_canonical(), from.port());
        let entry = GateEntry {
            remote: from,
            relay,
        };
        // One hash lookup per datagram, whatever the number of remotes.
        let Some(seen) = self.admitted.get_mut(&entry) else {
            self.stats.dropped_unknown_remote += 1;
            return;
        };
        *seen = Instant::now();
        let Some(client) = self.client.addr() else {
            return;
        };
        let header = UdpHeader::new(Address::Ip(from));
        let mut out = BytesMut::with_capacity(header.encoded_len() + len);
        if header.encode(&mut out).is_err() {
            return;
        }
        out.extend_from_slice(&buf[..len]);
        if self.inside.send_to(&out, client).await.is_ok() {
            self.stats.to_client += 1;
            self.count_relayed(len);
        }
    }

    /// One datagram of `payload` bytes relayed by user space (either way), for `--metrics`.
    fn count_relayed(&self, payload: usize) {
        let counters = &self.services.counters;
        counters.associate_packets.inc();
        counters.associate_bytes.add(payload as u64);
    }

    /// The address of the outside socket for `ip`'s family, created on first use on the external
    /// address.
    async fn ensure_outside(&mut self, ip: IpAddr) -> Option<SocketAddr> {
        let external = self.services.external_for(self.peer.ip(), ip)?;
        let slot = if external.is_ipv4() {
            &mut self.outside_v4
        } else {
            &mut self.outside_v6
        };
        if slot.is_none() {
            match OutsideSocket::bind(external, &self.services.external).await {
                Ok(socket) => *slot = Some(socket),
                Err(error) => {
                    warn!(%external, %error, "bind the outside relay socket");
                    return None;
                }
            }
        }
        slot.as_ref().map(OutsideSocket::local_addr)
    }

    /// Removes every remote with no datagram either way (in user space, or in the kernel by its
    /// inbound entry's counters) for the idle timeout, with its kernel entry.
    fn expire_idle_remotes(&mut self) {
        let now = Instant::now();
        let now_ns = crate::datapath::monotonic_ns();
        let idle_ns = u64::try_from(self.remote_idle.as_nanos()).unwrap_or(u64::MAX);
        let gate = &self.services.gate;
        let before = self.admitted.len();
        self.admitted.retain(|entry, seen| {
            let kernel_active = gate.inbound_counters(*entry).is_some_and(|c| {
                c.last_seen_ns != 0 && now_ns.saturating_sub(c.last_seen_ns) < idle_ns
            });
            let keep = kernel_active || now.duration_since(*seen) < self.remote_idle;
            if !keep {
                gate.remove(*entry);
            }
            keep
        });
        let expired = before - self.admitted.len();
        if expired > 0 {
            self.stats.remotes_expired += expired as u64;
            debug!(peer = %self.peer, expired, "idle remotes of the UDP association removed");
        }
    }

    /// The kernel relay description of this association (RFC 1928 framing), once the client's
    /// address is known.
    fn kernel_relay(&self) -> Option<KernelRelay> {
        Some(KernelRelay {
            client: self.client.addr()?,
            internal_relay: self.inside.local_addr().ok()?,
            aid: 0,
            framing: Framing::Socks5,
        })
    }
}

/// Ends the association: its kernel entries go with it. In `Drop` because this task's future is
/// dropped mid-await when the server shuts down (or aborts it), and the entries must go then too.
impl Drop for Association<'_> {
    fn drop(&mut self) {
        if self.moved {
            return;
        }
        for entry in self.admitted.keys() {
            self.services.gate.remove(*entry);
        }
        if let Some(relay) = self.kernel_relay() {
            self.services.gate.remove_outbound(&relay);
        }
        info!(
            peer = %self.peer,
            remotes = self.admitted.len(),
            stats = ?self.stats,
            "UDP association closed; kernel entries removed"
        );
    }
}

async fn readable_optional(socket: Option<&OutsideSocket>) -> std::io::Result<()> {
    match socket {
        Some(socket) => socket.readable().await,
        None => std::future::pending().await,
    }
}
