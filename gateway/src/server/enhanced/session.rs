//! One control connection in the enhanced mode: the entry reply, then control packets (UDP BIND,
//! UDP RELEASE, SET TTL) and TCP-encapsulated datagrams until the connection closes.
//!
//! Owns the list of the connection's bindings (by AID) and the order in which a [`Decision`] is
//! applied: the relay entry made (`Reserve`), kernel entries installed (`Install`), then the
//! reply; requests already buffered are answered together in one write. A
//! malformed packet closes the connection; a failed command gets its reply code and the
//! connection stays open. Closing (also by cancellation) releases everything it made.
//!
//! It must not decide any binding rule (the machine does), must not hold the bindings mutex
//! across an `.await`, and must only reach relays it started itself.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use bytes::{Bytes, BytesMut};
use tokio::{net::TcpStream, sync::mpsc};
use tracing::{debug, info, warn};

use super::{EnhancedMode, ExpiryNotice, gate_entry, kernel_relay, now};
use crate::{
    binding::{Action, BindRequest, BindingInfo, ConnId, Decision, Family, Remote, ReplyCode},
    gate::Gate,
    server::{
        Services,
        connection::{Connection, ConnectionError},
        handover::MovedKind,
    },
};
use gateway_proto::{
    Address,
    enhanced::{
        ControlReply, ControlRequest, EnhancedReplyCode, EntryReply, Flags, Packet, TcpDatagram,
        UdpCommand,
    },
};

/// TCP-encapsulated datagrams waiting to be written to the client; more are counted drops.
const TO_CLIENT_BACKLOG: usize = 256;

/// Releases everything the connection made when it ends, however it ends (also when its task is
/// cancelled by shutdown), unless it stopped for the next daemon ([`Registration::keep`]).
struct Registration {
    mode: Arc<EnhancedMode>,
    gate: Arc<dyn Gate>,
    conn: ConnId,
    kept: bool,
}

impl Registration {
    /// The connection's bindings stay: the next daemon (or this one, resuming) serves them.
    fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if !self.kept {
            self.mode.connection_closed(self.gate.as_ref(), self.conn);
        }
    }
}

/// How the session loop ended.
enum Stop {
    /// The client closed, sent something malformed, or an I/O error ended it.
    Closed,
    /// The quiesce of an upgrade: stopped at a message boundary.
    Quiesced,
}

/// An enhanced-mode session handed over: its connection id, the octets it had buffered and its
/// bindings with a relay entry.
#[derive(Debug)]
pub struct Resumed {
    pub log_conn: u64,
    pub conn: ConnId,
    pub buffered: BytesMut,
    pub bindings: Vec<(u32, u16, Family)>,
}

/// Counters of one connection, logged when it ends.
#[derive(Debug, Default)]
struct SessionStats {
    binds: u64,
    releases: u64,
    refused: u64,
    tcp_datagrams_in: u64,
    tcp_dropped_unknown_aid: u64,
    tcp_dropped_not_encapsulated: u64,
}

/// What a session remembers of a binding it made (the relay holds the rest).
#[derive(Debug, Clone, Copy)]
struct Own {
    tid: u16,
    /// The family of its external relay address.
    family: Family,
}

struct Session<'a> {
    mode: Arc<EnhancedMode>,
    services: &'a Services,
    conn: ConnId,
    peer: SocketAddr,
    user: Option<&'a str>,
    /// This connection's bindings with a relay entry, by AID. Nothing else is reachable from
    /// here.
    relays: HashMap<u32, Own>,
    /// Handed to relays of TCP-encapsulated bindings: encoded `03` packets for the client.
    to_client: mpsc::Sender<Bytes>,
    stats: SessionStats,
}

/// Enters the mode on `conn` and serves it until it closes (`None`) or stops for the next
/// daemon (its socket and state).
pub(super) async fn run(
    mode: Arc<EnhancedMode>,
    mut conn: Connection,
    services: &Services,
    peer: SocketAddr,
    user: Option<&str>,
) -> Result<Option<(TcpStream, MovedKind)>, ConnectionError> {
    // `01 00 00 01 00000000 0000`: the reply layout with the extension version first.
    let mut out = BytesMut::new();
    EntryReply::Entered(Address::UNSPECIFIED_V4).encode(&mut out)?;
    conn.write_all(&out).await?;
    mode.ensure_expiry_task(&services.gate);
    let (notice_tx, notices) = mpsc::unbounded_channel();
    let registration = Registration {
        conn: mode.register_conn(notice_tx, peer, user),
        mode: Arc::clone(&mode),
        gate: Arc::clone(&services.gate),
        kept: false,
    };
    let (to_client, outgoing) = mpsc::channel(TO_CLIENT_BACKLOG);
    let session = Session {
        mode,
        services,
        conn: registration.conn,
        peer,
        user,
        relays: HashMap::new(),
        to_client,
        stats: SessionStats::default(),
    };
    info!(%peer, user = user.unwrap_or("-"), conn = ?session.conn, "enhanced UDP mode entered");
    finish(session, registration, conn, notices, outgoing).await
}

/// A session handed over by the previous daemon (or by this one's failed upgrade), served on:
/// its bindings are in the table already; their relay entries get this session's channel.
pub(super) async fn resume(
    mode: Arc<EnhancedMode>,
    stream: TcpStream,
    services: &Services,
    peer: SocketAddr,
    user: Option<&str>,
    resumed: Resumed,
) -> Option<(TcpStream, MovedKind)> {
    mode.ensure_expiry_task(&services.gate);
    let (notice_tx, notices) = mpsc::unbounded_channel();
    let conn_id = resumed.conn;
    mode.reattach_conn(conn_id, notice_tx, peer, user);
    let registration = Registration {
        conn: conn_id,
        mode: Arc::clone(&mode),
        gate: Arc::clone(&services.gate),
        kept: false,
    };
    let (to_client, outgoing) = mpsc::channel(TO_CLIENT_BACKLOG);
    let mut relays = HashMap::new();
    for (aid, tid, family) in resumed.bindings {
        if mode.adopt_relay(conn_id, aid, to_client.clone()) {
            relays.insert(aid, Own { tid, family });
        } else {
            warn!(%peer, aid, "a handed-over binding is not in the table; forgotten");
        }
    }
    let session = Session {
        mode,
        services,
        conn: conn_id,
        peer,
        user,
        relays,
        to_client,
        stats: SessionStats::default(),
    };
    info!(%peer, user = user.unwrap_or("-"), conn = ?conn_id, bindings = session.relays.len(),
        "enhanced UDP mode session taken over");
    let conn = Connection::with_buffer(stream, resumed.buffered);
    match finish(session, registration, conn, notices, outgoing).await {
        Ok(moved) => moved,
        Err(error) => {
            debug!(%peer, %error, "connection ended with an error");
            None
        }
    }
}

/// Serves `session` until it ends: a close releases everything it made; a quiesce keeps it
/// all and returns the socket and state for the next daemon.
async fn finish(
    mut session: Session<'_>,
    registration: Registration,
    mut conn: Connection,
    notices: mpsc::UnboundedReceiver<ExpiryNotice>,
    mut outgoing: mpsc::Receiver<Bytes>,
) -> Result<Option<(TcpStream, MovedKind)>, ConnectionError> {
    let peer = session.peer;
    let result = session.serve(&mut conn, notices, &mut outgoing).await;
    if let Ok(Stop::Quiesced) = result {
        // TCP-encapsulated datagrams already queued for the client go out first.
        while let Ok(packet) = outgoing.try_recv() {
            conn.write_all(&packet).await?;
        }
        let bindings = session
            .relays
            .iter()
            .map(|(aid, own)| (*aid, own.tid, own.family))
            .collect();
        let conn_id = session.conn;
        info!(%peer, conn = ?conn_id, stats = ?session.stats, "enhanced UDP mode session stopped for the upgrade");
        drop(session);
        registration.keep();
        let (stream, buffered) = conn.into_parts();
        return Ok(Some((
            stream,
            MovedKind::Enhanced {
                conn: conn_id,
                buffered,
                bindings,
            },
        )));
    }
    info!(%peer, conn = ?session.conn, stats = ?session.stats, "enhanced UDP mode ended");
    drop(session);
    drop(registration);
    result.map(|_| None)
}

impl Session<'_> {
    async fn serve(
        &mut self,
        conn: &mut Connection,
        mut notices: mpsc::UnboundedReceiver<ExpiryNotice>,
        outgoing: &mut mpsc::Receiver<Bytes>,
    ) -> Result<Stop, ConnectionError> {
        let mut quiesce = self.services.quiesce.subscribe();
        loop {
            tokio::select! {
                // Checked first: a quiesce stops the session before its next request.
                biased;
                () = crate::server::handover::quiesced(&mut quiesce) => return Ok(Stop::Quiesced),
                packet = conn.read_message(Packet::decode) => {
                    let mut packet = match packet {
                        Ok(packet) => packet,
                        Err(ConnectionError::Closed) => return Ok(Stop::Closed),
                        Err(error) => return Err(error),
                    };
                    // Every packet already buffered is handled before the replies go out in
                    // one write: a client that pipelines its requests costs one system call
                    // per batch, not per reply. Replies keep the order of the requests.
                    let mut out = BytesMut::new();
                    loop {
                        match packet {
                            Packet::Request(request) => {
                                let reply = self.on_request(&request).await;
                                reply.encode(&mut out)?;
                            }
                            Packet::Datagram(datagram) => self.on_tcp_datagram(datagram).await,
                            Packet::Reply(reply) => {
                                // A reply from the client is malformed: close (after the replies
                                // it is owed).
                                debug!(peer = %self.peer, ?reply, "control reply from the client");
                                conn.write_all(&out).await?;
                                return Ok(Stop::Closed);
                            }
                        }
                        match conn.buffered_message(Packet::decode) {
                            Ok(Some(next)) => packet = next,
                            Ok(None) => break,
                            Err(error) => {
                                conn.write_all(&out).await?;
                                return Err(error);
                            }
                        }
                    }
                    if !out.is_empty() {
                        conn.write_all(&out).await?;
                    }
                }
                Some(notice) = notices.recv() => self.on_expired(notice),
                Some(packet) = outgoing.recv() => conn.write_all(&packet).await?,
            }
        }
    }

    async fn on_request(&mut self, request: &ControlRequest) -> ControlReply {
        let reply = match request.command {
            UdpCommand::Bind => self.on_bind(request).await,
            UdpCommand::Release => self.on_release(request),
            UdpCommand::SetTtl => self.on_set_ttl(request),
        };
        if reply.code != EnhancedReplyCode::Succeeded {
            self.stats.refused += 1;
        }
        debug!(peer = %self.peer, ?request, ?reply, "control request");
        reply
    }

    async fn on_bind(&mut self, request: &ControlRequest) -> ControlReply {
        self.stats.binds += 1;
        let Address::Ip(local) = request.local else {
            return ControlReply::echo(request, EnhancedReplyCode::AddressTypeNotSupported);
        };
        let remote = match self.remote_of(request).await {
            Ok(remote) => remote,
            Err(code) => return ControlReply::echo(request, code),
        };
        let mut flags = request.flags.bits();
        if request.flags.contains(Flags::RAW)
            && let Some(why) = self.raw_impossible()
        {
            // The binding is made without RAW and the reply does not echo it: the client uses
            // the 8-octet header (docs/protocol.md).
            info!(peer = %self.peer, tid = request.tid, "RAW not granted: {why}");
            flags &= !Flags::RAW.bits();
        }
        let bind = BindRequest {
            tid: request.tid,
            aid: request.aid,
            local,
            remote,
            flags,
            ttl: request.ttl,
        };
        let (decision, info, wake_expiry) = {
            let mut bindings = self.mode.lock_bindings();
            let decision = bindings.on_bind(self.conn, self.peer.ip(), self.user, bind, now());
            if let Some(error) = decision.reply.error {
                self.mode.count_refusal(error);
            }
            let info = if decision.reply.code == ReplyCode::Ok {
                bindings.binding(decision.reply.aid)
            } else {
                None
            };
            let wake_expiry = self.mode.expiry_due_earlier(&bindings);
            (decision, info, wake_expiry)
        };
        if wake_expiry {
            self.mode.wake.notify_one();
        }
        if let Err(error) = self.apply(&decision, info) {
            warn!(peer = %self.peer, aid = decision.reply.aid, %error,
                "cannot set up the binding; released");
            self.release_quietly(decision.reply.aid);
            return ControlReply::echo(request, EnhancedReplyCode::GeneralFailure);
        }
        wire_reply(request, &decision)
    }

    /// Why this connection cannot have header-less delivery, if it cannot: the machine checks
    /// the binding itself; this is what only the daemon can see.
    fn raw_impossible(&self) -> Option<&'static str> {
        if !self.services.gate.relays_in_kernel() {
            return Some(
                "the userspace data path cannot relay it (a RAW client's datagrams are \
                 addressed to the remote and never reach a relay socket)",
            );
        }
        if !self
            .services
            .access
            .get()
            .is_directly_connected(self.peer.ip())
        {
            return Some(
                "the client is not on a directly connected internal network, so its route to \
                 the remote need not pass the gateway",
            );
        }
        None
    }

    /// REMOTE for the machine: an IP as given, or a domain name resolved once, now.
    async fn remote_of(&self, request: &ControlRequest) -> Result<Remote, EnhancedReplyCode> {
        let (name, port) = match &request.remote {
            Address::Ip(addr) => return Ok(Remote::Exact(*addr)),
            Address::Domain(name, port) => (name, *port),
        };
        let ips = self.services.resolver.lookup(name).await.map_err(|error| {
            info!(%name, %error, "REMOTE name resolution failed");
            EnhancedReplyCode::HostUnreachable
        })?;
        // Prefer the family of the binding a step 2 names (by AID or TID), else the first.
        let family = self
            .relays
            .iter()
            .find(|(aid, relay)| {
                (request.aid != 0 && **aid == request.aid)
                    || (request.tid != 0 && relay.tid == request.tid)
            })
            .map(|(_, relay)| relay.family);
        let pick = |ip: &&IpAddr| family.is_none_or(|f| Family::of(**ip) == f);
        let ip = ips
            .iter()
            .find(pick)
            .or(ips.first())
            .ok_or(EnhancedReplyCode::HostUnreachable)?;
        Ok(Remote::Exact(SocketAddr::new(*ip, port)))
    }

    /// Applies a bind decision's actions in order; the first failure stops it.
    fn apply(
        &mut self,
        decision: &Decision,
        info: Option<BindingInfo>,
    ) -> Result<(), std::io::Error> {
        let aid = decision.reply.aid;
        for action in &decision.actions {
            match action {
                Action::Reserve(ports) => {
                    let info = info.ok_or_else(|| std::io::Error::other("binding vanished"))?;
                    if !self.mode.add_relay(&info, self.to_client.clone()) {
                        return Err(std::io::Error::other(
                            "the binding is gone or its relay ports are served already",
                        ));
                    }
                    self.relays.insert(
                        aid,
                        Own {
                            tid: info.tid,
                            family: Family::of(ports.external.ip()),
                        },
                    );
                }
                Action::Install(entry) => {
                    let gate_entry = gate_entry(entry);
                    let installed = match kernel_relay(entry) {
                        Some(relay) => self.services.gate.install_kernel_relay(gate_entry, relay),
                        None => self.services.gate.install(gate_entry),
                    };
                    installed.map_err(std::io::Error::other)?;
                }
                Action::Subscribe(membership) => self
                    .mode
                    .subscribe(self.services.gate.as_ref(), self.conn, *membership)
                    .map_err(std::io::Error::other)?,
                Action::Remove(_) | Action::Free(_) | Action::Unsubscribe(_) => self
                    .mode
                    .apply_teardown(self.services.gate.as_ref(), std::slice::from_ref(action)),
            }
        }
        if let Some(info) = info
            && self.relays.contains_key(&aid)
        {
            self.mode.relay.update(&info);
        }
        Ok(())
    }

    fn on_set_ttl(&mut self, request: &ControlRequest) -> ControlReply {
        let decision = self.mode.set_ttl(
            self.services.gate.as_ref(),
            self.conn,
            request.aid,
            request.ttl,
        );
        ControlReply::echo(request, wire_code(decision.reply.code))
    }

    /// Releases `aid` after a failed setup: what was reserved or installed goes again.
    fn release_quietly(&mut self, aid: u32) {
        self.mode
            .release(self.services.gate.as_ref(), self.conn, aid);
        self.relays.remove(&aid);
    }

    fn on_release(&mut self, request: &ControlRequest) -> ControlReply {
        self.stats.releases += 1;
        let decision = self
            .mode
            .release(self.services.gate.as_ref(), self.conn, request.aid);
        if decision.reply.code == ReplyCode::Ok {
            self.relays.remove(&request.aid);
        }
        ControlReply::echo(request, wire_code(decision.reply.code))
    }

    /// `03 SIZE AID DATA` from the client: relayed for this connection's binding of that AID,
    /// if it is a TCP-encapsulated binding.
    async fn on_tcp_datagram(&mut self, datagram: TcpDatagram) {
        self.stats.tcp_datagrams_in += 1;
        match self.mode.relay.tcp_encapsulated(self.conn, datagram.aid) {
            None => self.stats.tcp_dropped_unknown_aid += 1,
            Some(false) => self.stats.tcp_dropped_not_encapsulated += 1,
            Some(true) => {
                self.mode
                    .relay
                    .relay_tcp_datagram(&self.mode, self.conn, datagram.aid, &datagram.data)
                    .await;
            }
        }
    }

    fn on_expired(&mut self, notice: ExpiryNotice) {
        self.relays.remove(&notice.aid);
        info!(peer = %self.peer, aid = notice.aid, tid = notice.tid, reason = ?notice.reason,
            "binding of this connection expired");
    }
}

fn wire_code(code: ReplyCode) -> EnhancedReplyCode {
    EnhancedReplyCode::try_from(code.as_u8()).unwrap_or(EnhancedReplyCode::GeneralFailure)
}

/// The wire reply for a machine decision: on success LOCAL is the internal relay address and
/// REMOTE the external one; a refusal echoes the request with the code (and the expired AID).
fn wire_reply(request: &ControlRequest, decision: &Decision) -> ControlReply {
    let reply = &decision.reply;
    let code = wire_code(reply.code);
    match (reply.code, reply.internal, reply.external) {
        (ReplyCode::Ok, Some(internal), Some(external)) => ControlReply {
            code,
            flags: Flags::from_bits_retain(reply.flags),
            ttl: request.ttl,
            tid: request.tid,
            aid: reply.aid,
            local: internal.into(),
            remote: external.into(),
        },
        _ => ControlReply {
            aid: reply.aid,
            ..ControlReply::echo(request, code)
        },
    }
}
