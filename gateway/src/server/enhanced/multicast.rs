//! Multicast groups through the gateway (protocol.md section 3): joining and leaving groups on
//! the external interface, the kernel's entry of each group (which subscribers the tc fan-out
//! delivers to, whether it re-sends inside), and the userspace relay of what the kernel leaves
//! to it.
//!
//! Owns one [`Group`] per group address and port with a binding: its members (receivers and
//! senders, by AID), the socket that holds the membership (one per group, however many
//! subscribe; closing it leaves the group) and its receive task. The kernel delivers to the
//! first subscribers of a group in its table; user space serves the rest, and everything when
//! the kernel hands a datagram up unmarked (a `CHECKSUM_PARTIAL` datagram, the userspace data
//! path). A copy the fan-out hands up for the rest carries `FANOUT_TO_STACK_MARK`.
//!
//! It must not decide who may bind what (the machine does), and must only be changed from the
//! [`Action::Subscribe`](crate::binding::Action) and `Unsubscribe` the machine hands out, with
//! the bindings lock held (so a group's kernel entry follows the machine's order).

use std::{
    collections::{BTreeMap, HashMap},
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, AsRawFd, OwnedFd},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError, Weak,
        atomic::{AtomicU64, Ordering},
    },
};

use gateway_common::{
    FANOUT_TO_STACK_MARK, GroupSubscriber, GroupValue, MAX_KERNEL_SUBSCRIBERS, group_flags,
};
use gateway_proto::enhanced::DatagramHeader;
use nix::sys::socket::{
    AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType, SockaddrLike,
    SockaddrStorage, bind, recvmsg, setsockopt, socket, sockopt,
};
use tokio::{io::Interest, net::UdpSocket, task::AbortHandle};
use tracing::{debug, info, warn};

use super::{
    relay::Relay,
    sockets::{Side, set_int_option},
};
use crate::{
    binding::{Membership, MulticastMode},
    gate::{Gate, GateError},
    host_flow::addr16,
    server::outside::with_scratch,
};

/// How the gateway's groups are served: fixed at start.
#[derive(Debug, Clone, Default)]
pub struct MulticastSetup {
    /// The external interface (name, index): where groups are joined.
    pub external: Option<(String, u32)>,
    /// The internal interface (name, index): where subscribers and MM receivers are.
    pub internal: Option<(String, u32)>,
    /// The internal interface's MAC address (the source of the kernel's frames inside).
    pub internal_mac: Option<[u8; 6]>,
    /// The gateway's internal addresses (the source of MM re-sends, by family).
    pub internal_ips: Vec<IpAddr>,
    /// Whether the kernel fans out (`--datapath kernel`).
    pub kernel: bool,
    /// Most subscribers of one group the kernel delivers to.
    pub kernel_subscribers: usize,
    /// Most groups at once.
    pub max_groups: usize,
}

/// One member of a group, with what user space delivered to it.
#[derive(Debug)]
struct Member {
    membership: Membership,
    /// The next hop's MAC towards the client, when the neighbour table knew it.
    mac: Option<[u8; 6]>,
    /// Datagrams user space delivered to it.
    delivered: u64,
}

/// One group address and port with at least one binding.
#[derive(Debug)]
struct Group {
    members: BTreeMap<u32, Member>,
    /// The socket that holds the membership on the external interface, and its receive task;
    /// only while a member receives.
    receiver: Option<(Arc<UdpSocket>, AbortHandle)>,
    /// The sources the group is received from ([`admitted_sources`]; empty: any), as the
    /// kernel's entry and the socket's filter have them.
    sources: Vec<IpAddr>,
    /// The source filter the socket holds (empty: any source).
    joined: Vec<IpAddr>,
    /// The members the kernel delivers to, as last written to its entry.
    kernel_aids: Vec<u32>,
    /// Whether the kernel re-sends inside (MM), as last written.
    kernel_inside: bool,
    /// Datagrams the receive socket got.
    received: u64,
    /// Datagrams dropped for a source not on the list (in user space; the gate drops most).
    dropped_source: u64,
    /// MM re-sends user space made.
    inside_sent: u64,
}

impl Group {
    fn receives(&self) -> bool {
        self.members
            .values()
            .any(|m| m.membership.receive.is_some())
    }

    fn has_inside_receiver(&self) -> bool {
        self.members
            .values()
            .any(|m| m.membership.receive == Some(MulticastMode::ToMulticast))
    }
}

/// The sources a group is received from: the policy's list (empty: any) while any receiver
/// takes every source; else only the sources its source-specific receivers named (each of them
/// on the policy's list: the machine checked).
fn admitted_sources(listed: &[IpAddr], members: &BTreeMap<u32, Member>) -> Vec<IpAddr> {
    let mut named = Vec::new();
    for member in members.values().filter(|m| m.membership.receive.is_some()) {
        match member.membership.source {
            None => return listed.to_vec(),
            Some(source) => named.push(source),
        }
    }
    if named.is_empty() {
        return listed.to_vec();
    }
    named.sort_unstable();
    named.dedup();
    named
}

/// Whether `member` takes a datagram from `source`.
fn takes_from(member: &Member, source: IpAddr) -> bool {
    member.membership.source.is_none_or(|named| named == source)
}

/// What one group datagram comes to, decided under the lock and sent after it.
struct Fanout {
    /// (relay address, client, AID) of every MU subscriber user space delivers to.
    unicast: Vec<(SocketAddr, SocketAddr, u32)>,
    /// The source of an MM re-send inside, when user space makes it.
    inside: Option<SocketAddr>,
}

/// A group's state for `gateway bindings`.
#[derive(Debug, Clone)]
pub struct GroupReport {
    pub group: SocketAddr,
    /// The sources the group is received from (empty: any).
    pub sources: Vec<IpAddr>,
    /// (AID, client, mode name, kernel-delivered packets, userspace-delivered, sends).
    pub members: Vec<MemberReport>,
    pub received_userspace: u64,
    pub received_kernel: u64,
    pub inside_sent_kernel: u64,
    pub inside_sent_userspace: u64,
    pub dropped_source_userspace: u64,
}

/// One member's state for `gateway bindings`.
#[derive(Debug, Clone)]
pub struct MemberReport {
    pub aid: u32,
    pub client: SocketAddr,
    pub receive: Option<&'static str>,
    pub send_ttl: Option<u8>,
    /// The one source of a source-specific receive.
    pub source: Option<IpAddr>,
    pub in_kernel: bool,
    pub kernel_packets: u64,
    pub userspace_packets: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum MulticastError {
    #[error("too many groups at once ({0}); raise --multicast-max-groups")]
    TooManyGroups(usize),
    #[error("no external interface to join groups on")]
    NoExternalInterface,
    #[error("join {group} on the external interface: {source}")]
    Join {
        group: SocketAddr,
        source: io::Error,
    },
    #[error(transparent)]
    Gate(#[from] GateError),
}

/// Every group of the gateway.
#[derive(Debug)]
pub struct Multicast {
    setup: MulticastSetup,
    /// The policy's source lists (group address, sources).
    listed_sources: Vec<(IpAddr, Vec<IpAddr>)>,
    relay: Arc<Relay>,
    groups: Mutex<HashMap<SocketAddr, Group>>,
    /// Datagrams user space delivered to subscribers (MU) or re-sent inside (MM).
    delivered: AtomicU64,
    /// Copies of a member's own send delivered to the group's other MU subscribers.
    looped_to_members: AtomicU64,
    send_errors: AtomicU64,
}

impl Multicast {
    pub fn new(
        setup: MulticastSetup,
        listed_sources: Vec<(IpAddr, Vec<IpAddr>)>,
        relay: Arc<Relay>,
    ) -> Self {
        Self {
            setup,
            listed_sources,
            relay,
            groups: Mutex::new(HashMap::new()),
            delivered: AtomicU64::new(0),
            looped_to_members: AtomicU64::new(0),
            send_errors: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<SocketAddr, Group>> {
        self.groups.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The allowed sources of `group` (empty: any).
    fn sources_of(&self, group: IpAddr) -> Vec<IpAddr> {
        self.listed_sources
            .iter()
            .filter(|(g, _)| *g == group)
            .flat_map(|(_, sources)| sources.iter().copied())
            .collect()
    }

    /// Adds or updates (SET TTL) a member; joins the group for its first receiver.
    pub fn subscribe(
        self: &Arc<Self>,
        gate: &dyn Gate,
        membership: Membership,
    ) -> Result<(), MulticastError> {
        let mut groups = self.lock();
        let key = membership.group;
        if !groups.contains_key(&key) && groups.len() >= self.setup.max_groups {
            return Err(MulticastError::TooManyGroups(self.setup.max_groups));
        }
        let group = groups.entry(key).or_insert_with(|| Group {
            members: BTreeMap::new(),
            receiver: None,
            sources: Vec::new(),
            joined: Vec::new(),
            kernel_aids: Vec::new(),
            kernel_inside: false,
            received: 0,
            dropped_source: 0,
            inside_sent: 0,
        });
        let mac = match (membership.receive, &self.setup.internal) {
            (Some(MulticastMode::ToUnicast), Some((_, ifindex))) if self.setup.kernel => {
                crate::neighbour::neighbour_mac(*ifindex, membership.client.ip()).unwrap_or_else(
                    |error| {
                        debug!(client = %membership.client, %error, "neighbour lookup failed");
                        None
                    },
                )
            }
            _ => None,
        };
        let delivered = group
            .members
            .get(&membership.aid)
            .map_or(0, |m| m.delivered);
        let before = group.members.insert(
            membership.aid,
            Member {
                membership,
                mac,
                delivered,
            },
        );
        let listed = self.sources_of(key.ip());
        group.sources = admitted_sources(&listed, &group.members);
        let result = self.start_receiving(group, key).and_then(|()| {
            if group.receives() {
                self.write_kernel_entry(gate, key, group)?;
            }
            Ok(())
        });
        if let Err(error) = result {
            // An update (SET TTL, a source named) goes back to what it was.
            match before {
                Some(before) => group.members.insert(membership.aid, before),
                None => group.members.remove(&membership.aid),
            };
            group.sources = admitted_sources(&listed, &group.members);
            if let Err(error) = self.start_receiving(group, key) {
                warn!(%key, %error, "cannot restore the group's source filter");
            }
            if !group.receives() {
                gate.remove_group(key);
                if let Some((_, task)) = group.receiver.take() {
                    task.abort();
                }
                if group.members.is_empty() {
                    groups.remove(&key);
                }
            } else if let Err(error) = self.write_kernel_entry(gate, key, group) {
                warn!(%key, %error, "cannot restore the group's kernel entry");
            }
            return Err(error);
        }
        Ok(())
    }

    /// Removes a member; leaves the group after its last receiver.
    pub fn unsubscribe(&self, gate: &dyn Gate, membership: &Membership) {
        let mut groups = self.lock();
        let key = membership.group;
        let Some(group) = groups.get_mut(&key) else {
            return;
        };
        group.members.remove(&membership.aid);
        if group.receives() {
            group.sources = admitted_sources(&self.sources_of(key.ip()), &group.members);
            // The kernel entry first: it admits the wider set of the two before the socket's
            // filter widens and after it narrows.
            if let Err(error) = self.write_kernel_entry(gate, key, group) {
                warn!(%key, %error, "cannot update the group's kernel entry");
            }
            if let Err(error) = self.refilter(group, key) {
                warn!(%key, %error, "cannot update the group's source filter");
            }
            return;
        }
        // No receiver left: the kernel entry goes first (the gate drops the group's datagrams
        // again), then the receive task and the socket (closing it leaves the group).
        gate.remove_group(key);
        group.kernel_aids.clear();
        group.kernel_inside = false;
        group.joined.clear();
        if let Some((_, task)) = group.receiver.take() {
            task.abort();
            info!(group = %key, "left the multicast group");
        }
        if group.members.is_empty() {
            groups.remove(&key);
        }
    }

    fn start_receiving(
        self: &Arc<Self>,
        group: &mut Group,
        key: SocketAddr,
    ) -> Result<(), MulticastError> {
        if !group.receives() {
            return Ok(());
        }
        if group.receiver.is_some() {
            return self.refilter(group, key);
        }
        let (_, ifindex) = self
            .setup
            .external
            .as_ref()
            .ok_or(MulticastError::NoExternalInterface)?;
        let socket = open_group_socket(key, self.setup.external.as_ref(), &group.sources)
            .map_err(|source| MulticastError::Join { group: key, source })?;
        let socket = Arc::new(socket);
        let task = tokio::spawn(receive_loop(Arc::downgrade(self), Arc::clone(&socket), key));
        info!(group = %key, ifindex, sources = ?group.sources, "joined the multicast group");
        group.receiver = Some((socket, task.abort_handle()));
        group.joined.clone_from(&group.sources);
        Ok(())
    }

    /// Sets the group socket's source filter to the group's sources, when they changed.
    fn refilter(&self, group: &mut Group, key: SocketAddr) -> Result<(), MulticastError> {
        if let Some((socket, _)) = &group.receiver
            && group.joined != group.sources
        {
            set_source_filter(
                socket.as_ref(),
                key,
                self.setup.external.as_ref(),
                &group.sources,
            )
            .map_err(|source| MulticastError::Join { group: key, source })?;
            info!(group = %key, sources = ?group.sources, "changed the group's source filter");
            group.joined.clone_from(&group.sources);
        }
        Ok(())
    }

    /// The group's kernel entry from its members: the first MU subscribers of the group's
    /// family whose next hop is known go in the kernel's table; MM is re-sent by the kernel;
    /// user space gets a copy when anyone is left to it.
    fn write_kernel_entry(
        &self,
        gate: &dyn Gate,
        key: SocketAddr,
        group: &mut Group,
    ) -> Result<(), GateError> {
        let ipv6 = key.is_ipv6();
        let mut value = Box::new(GroupValue::default());
        let mut kernel_aids = Vec::new();
        let mut userspace_left = false;
        let limit = self.setup.kernel_subscribers.min(MAX_KERNEL_SUBSCRIBERS);
        let internal_mac = self.setup.internal_mac.filter(|_| self.setup.kernel);
        for (aid, member) in &group.members {
            if member.membership.receive != Some(MulticastMode::ToUnicast) {
                continue;
            }
            let m = &member.membership;
            // The kernel hands every admitted source to its subscribers: a source-specific
            // one fits only while its source is the only one admitted.
            let takes_all = m.source.is_none_or(|source| group.sources == [source]);
            let fits = internal_mac.is_some()
                && takes_all
                && kernel_aids.len() < limit
                && m.client.is_ipv6() == ipv6
                && m.internal.is_ipv6() == ipv6;
            match member.mac.filter(|_| fits) {
                Some(mac) => {
                    value.subscribers[kernel_aids.len()] = GroupSubscriber {
                        client_addr: addr16(m.client.ip()),
                        internal_relay_addr: addr16(m.internal.ip()),
                        client_mac: mac,
                        client_port_be: m.client.port().to_be(),
                        internal_relay_port_be: m.internal.port().to_be(),
                        padding: 0,
                        aid_be: aid.to_be(),
                        counters: gateway_common::EntryCounters::default(),
                    };
                    kernel_aids.push(*aid);
                }
                None => userspace_left = true,
            }
        }
        let inside_source = self
            .setup
            .internal_ips
            .iter()
            .find(|ip| ip.is_ipv6() == ipv6)
            .copied();
        let kernel_inside =
            group.has_inside_receiver() && internal_mac.is_some() && inside_source.is_some();
        if group.has_inside_receiver() && !kernel_inside {
            userspace_left = true;
        }
        value.flags = 0;
        if kernel_inside {
            value.flags |= group_flags::INSIDE_MULTICAST;
        }
        if userspace_left {
            value.flags |= group_flags::TO_USERSPACE;
        }
        if !group.sources.is_empty() {
            value.flags |= group_flags::SOURCE_LIST;
        }
        value.kernel_subscribers = u32::try_from(kernel_aids.len()).unwrap_or(0);
        value.internal_mac = internal_mac.unwrap_or_default();
        value.inside_source = inside_source.map(addr16).unwrap_or_default();
        gate.set_group(key, &value, &group.sources)?;
        debug!(group = %key, kernel = kernel_aids.len(), userspace = userspace_left,
            inside = kernel_inside, "group entry written");
        group.kernel_aids = kernel_aids;
        group.kernel_inside = kernel_inside;
        Ok(())
    }

    /// What user space does with one datagram of `key` from `from`; `marked`: the kernel fanned
    /// out already and handed this copy up for the rest.
    fn plan(&self, key: SocketAddr, from: SocketAddr, marked: bool) -> Option<Fanout> {
        let mut groups = self.lock();
        let group = groups.get_mut(&key)?;
        if !group.sources.is_empty() && !group.sources.contains(&from.ip().to_canonical()) {
            group.dropped_source += 1;
            return None;
        }
        group.received += 1;
        let mut unicast = Vec::new();
        for (aid, member) in &mut group.members {
            if member.membership.receive != Some(MulticastMode::ToUnicast)
                || (marked && group.kernel_aids.contains(aid))
                || !takes_from(member, from.ip())
            {
                continue;
            }
            member.delivered += 1;
            unicast.push((member.membership.internal, member.membership.client, *aid));
        }
        let inside = if group.has_inside_receiver() && !(marked && group.kernel_inside) {
            group.inside_sent += 1;
            self.setup
                .internal_ips
                .iter()
                .find(|ip| ip.is_ipv6() == key.is_ipv6())
                .map(|ip| SocketAddr::new(*ip, from.port()))
        } else {
            None
        };
        Some(Fanout { unicast, inside })
    }

    async fn deliver(&self, key: SocketAddr, fanout: Fanout, payload: &[u8]) {
        let mut framed = Vec::with_capacity(DatagramHeader::LEN + payload.len());
        for (relay, client, aid) in fanout.unicast {
            framed.clear();
            // RSV 0, FRAG 0, DGID 0, AID.
            framed.extend_from_slice(&[0; 4]);
            framed.extend_from_slice(&aid.to_be_bytes());
            framed.extend_from_slice(payload);
            let sent = match self.relay.sender(client.is_ipv6(), Side::Inside) {
                Some(sender) => sender.send(relay, client, &framed).await,
                None => Err(io::Error::other("no inside sender of this family")),
            };
            self.count_send(sent, key, client);
        }
        if let Some(source) = fanout.inside {
            let sent = match self.relay.sender(key.is_ipv6(), Side::Inside) {
                Some(sender) => sender.send_with_ttl(source, key, payload, 1).await,
                None => Err(io::Error::other("no inside sender of this family")),
            };
            self.count_send(sent, key, key);
        }
    }

    fn count_send(&self, sent: io::Result<()>, group: SocketAddr, to: SocketAddr) {
        match sent {
            Ok(()) => {
                self.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => {
                self.send_errors.fetch_add(1, Ordering::Relaxed);
                debug!(%group, %to, %error, "multicast delivery failed");
            }
        }
    }

    /// A member's own datagram, sent to the group: the group's other MU subscribers get it
    /// too (the gateway's sends do not loop back to its own group sockets).
    pub async fn sent_by_member(&self, aid: u32, group: SocketAddr, payload: &[u8]) {
        let targets: Vec<(SocketAddr, SocketAddr, u32)> = {
            let mut groups = self.lock();
            let Some(group) = groups.get_mut(&group) else {
                return;
            };
            group
                .members
                .iter_mut()
                .filter(|(other, m)| {
                    // A source-specific receiver takes only its outside source.
                    **other != aid
                        && m.membership.receive == Some(MulticastMode::ToUnicast)
                        && m.membership.source.is_none()
                })
                .map(|(other, m)| {
                    m.delivered += 1;
                    (m.membership.internal, m.membership.client, *other)
                })
                .collect()
        };
        let count = targets.len() as u64;
        self.deliver(
            group,
            Fanout {
                unicast: targets,
                inside: None,
            },
            payload,
        )
        .await;
        self.looped_to_members.fetch_add(count, Ordering::Relaxed);
    }

    /// Datagrams user space delivered (MU copies and MM re-sends).
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    /// Every group with its members and counters, the kernel's included.
    pub fn report(&self, gate: &dyn Gate) -> Vec<GroupReport> {
        let groups = self.lock();
        let mut reports: Vec<GroupReport> = groups
            .iter()
            .map(|(key, group)| {
                let kernel = gate.group(*key);
                let kernel_packets = |aid: u32| {
                    kernel.as_ref().map_or(0, |value| {
                        value
                            .subscribers
                            .iter()
                            .take(value.kernel_subscribers as usize)
                            .find(|s| u32::from_be(s.aid_be) == aid)
                            .map_or(0, |s| s.counters.packets)
                    })
                };
                GroupReport {
                    group: *key,
                    sources: group.sources.clone(),
                    members: group
                        .members
                        .iter()
                        .map(|(aid, m)| MemberReport {
                            aid: *aid,
                            client: m.membership.client,
                            receive: m.membership.receive.map(MulticastMode::name),
                            send_ttl: m.membership.send_ttl,
                            source: m.membership.source,
                            in_kernel: group.kernel_aids.contains(aid),
                            kernel_packets: kernel_packets(*aid),
                            userspace_packets: m.delivered,
                        })
                        .collect(),
                    received_userspace: group.received,
                    received_kernel: kernel.as_ref().map_or(0, |v| v.received.packets),
                    inside_sent_kernel: kernel.as_ref().map_or(0, |v| v.inside_sent.packets),
                    inside_sent_userspace: group.inside_sent,
                    dropped_source_userspace: group.dropped_source,
                }
            })
            .collect();
        reports.sort_by_key(|r| r.group);
        reports
    }
}

/// A UDP socket bound to the group and port, tied to the external interface, that holds the
/// group's membership there (source-specific for each listed source) and reports each
/// datagram's mark.
fn open_group_socket(
    group: SocketAddr,
    external: Option<&(String, u32)>,
    sources: &[IpAddr],
) -> io::Result<UdpSocket> {
    let (name, ifindex) = external.ok_or_else(|| io::Error::other("no external interface"))?;
    let family = if group.is_ipv6() {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    let fd: OwnedFd = socket(
        family,
        SockType::Datagram,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    setsockopt(&fd, sockopt::BindToDevice, &std::ffi::OsString::from(name))?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(group))?;
    let level = if group.is_ipv6() {
        libc::IPPROTO_IPV6
    } else {
        libc::IPPROTO_IP
    };
    if sources.is_empty() {
        join(&fd, level, libc::MCAST_JOIN_GROUP, *ifindex, group, None)?;
    } else {
        for source in sources {
            join(
                &fd,
                level,
                libc::MCAST_JOIN_SOURCE_GROUP,
                *ifindex,
                group,
                Some(SocketAddr::new(*source, 0)),
            )?;
        }
    }
    if let Err(error) = set_int_option(&fd, libc::SOL_SOCKET, libc::SO_RCVMARK, 1) {
        warn!(%group, %error, "no SO_RCVMARK (Linux 5.19+): every datagram counts as fanned out");
    }
    let std = std::net::UdpSocket::from(fd);
    UdpSocket::from_std(std)
}

/// `struct group_filter` (RFC 3678 full-state API) with room for every source of a filter.
#[repr(C)]
struct GroupFilter<const N: usize> {
    interface: u32,
    group: libc::sockaddr_storage,
    mode: u32,
    count: u32,
    sources: [libc::sockaddr_storage; N],
}

/// Most sources one group's filter holds (the machine allows one per binding).
const MAX_FILTER_SOURCES: usize = 64;

/// Replaces the socket's source filter of `group` at once (`MCAST_MSFILTER`): include exactly
/// `sources`, or exclude none (any source) when it is empty. The socket holds the membership
/// throughout, so the interface never leaves the group in between.
fn set_source_filter(
    socket: &impl AsFd,
    group: SocketAddr,
    external: Option<&(String, u32)>,
    sources: &[IpAddr],
) -> io::Result<()> {
    let (_, ifindex) = external.ok_or_else(|| io::Error::other("no external interface"))?;
    if sources.len() > MAX_FILTER_SOURCES {
        return Err(io::Error::other(format!(
            "more than {MAX_FILTER_SOURCES} sources of one group"
        )));
    }
    // SAFETY: plain data; zeroes are valid.
    let mut filter: Box<GroupFilter<MAX_FILTER_SOURCES>> = Box::new(unsafe { std::mem::zeroed() });
    filter.interface = *ifindex;
    filter.group = storage_of(SocketAddr::new(group.ip(), 0));
    filter.mode = if sources.is_empty() {
        libc::MCAST_EXCLUDE as u32
    } else {
        libc::MCAST_INCLUDE as u32
    };
    filter.count = u32::try_from(sources.len()).unwrap_or(0);
    for (slot, source) in filter.sources.iter_mut().zip(sources) {
        *slot = storage_of(SocketAddr::new(*source, 0));
    }
    let len = std::mem::offset_of!(GroupFilter<MAX_FILTER_SOURCES>, sources)
        + sources.len() * size_of::<libc::sockaddr_storage>();
    let level = if group.is_ipv6() {
        libc::IPPROTO_IPV6
    } else {
        libc::IPPROTO_IP
    };
    // SAFETY: a valid socket and a filter that outlives the call, `len` octets of it.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            level,
            libc::MCAST_MSFILTER,
            (&raw const *filter).cast(),
            libc::socklen_t::try_from(len).unwrap_or(0),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `struct group_req` / `struct group_source_req` (RFC 3678), as Linux lays them out.
#[repr(C)]
struct GroupSourceReq {
    interface: u32,
    group: libc::sockaddr_storage,
    source: libc::sockaddr_storage,
}

fn storage_of(addr: SocketAddr) -> libc::sockaddr_storage {
    let from = SockaddrStorage::from(addr);
    // SAFETY: sockaddr_storage is plain data; zeroes are valid.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = (from.len() as usize).min(size_of::<libc::sockaddr_storage>());
    // SAFETY: both point to at least `len` valid octets and do not overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(
            from.as_ptr().cast::<u8>(),
            (&raw mut storage).cast::<u8>(),
            len,
        );
    }
    storage
}

/// `MCAST_JOIN_GROUP` (no source) or `MCAST_JOIN_SOURCE_GROUP` on interface `ifindex`.
fn join(
    socket: &impl AsFd,
    level: libc::c_int,
    name: libc::c_int,
    ifindex: u32,
    group: SocketAddr,
    source: Option<SocketAddr>,
) -> io::Result<()> {
    let request = GroupSourceReq {
        interface: ifindex,
        group: storage_of(SocketAddr::new(group.ip(), 0)),
        source: source.map_or_else(
            // SAFETY: plain data; zeroes are valid.
            || unsafe { std::mem::zeroed() },
            storage_of,
        ),
    };
    // group_req is group_source_req without the source.
    let len = if source.is_some() {
        size_of::<GroupSourceReq>()
    } else {
        std::mem::offset_of!(GroupSourceReq, source)
    };
    // SAFETY: a valid socket and a request that outlives the call, `len` octets of it.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            level,
            name,
            (&raw const request).cast(),
            libc::socklen_t::try_from(len).unwrap_or(0),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One datagram from a group socket: its source, length and whether the fan-out marked it.
fn recv_group(fd: i32, buf: &mut [u8]) -> io::Result<(SocketAddr, usize, bool)> {
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let mut cmsg = nix::cmsg_space!(u32);
    let msg = recvmsg::<SockaddrStorage>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_DONTWAIT)
        .map_err(io::Error::from)?;
    let mut mark = None;
    if let Ok(cmsgs) = msg.cmsgs() {
        for cmsg in cmsgs {
            if let ControlMessageOwned::Unknown(unknown) = cmsg
                && unknown.cmsg_header.cmsg_level == libc::SOL_SOCKET
                && unknown.cmsg_header.cmsg_type == libc::SO_MARK
                && let Ok(bytes) = <[u8; 4]>::try_from(unknown.data_bytes.as_slice())
            {
                mark = Some(u32::from_ne_bytes(bytes));
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
    // No mark at all (an old kernel without SO_RCVMARK reports none): taken as marked, so
    // nothing the kernel delivered is delivered twice.
    let marked = mark.is_none_or(|mark| mark == FANOUT_TO_STACK_MARK);
    Ok((
        SocketAddr::new(from.ip().to_canonical(), from.port()),
        msg.bytes,
        marked,
    ))
}

/// Serves one group socket until the group is left (the task is aborted) or the relay goes.
async fn receive_loop(multicast: Weak<Multicast>, socket: Arc<UdpSocket>, key: SocketAddr) {
    let mut errors: u64 = 0;
    loop {
        if socket.readable().await.is_err() {
            return;
        }
        let datagram = with_scratch(|buf| {
            socket
                .try_io(Interest::READABLE, || recv_group(socket.as_raw_fd(), buf))
                .map(|(from, len, marked)| (from, marked, buf[..len].to_vec()))
        });
        let (from, marked, payload) = match datagram {
            Ok(datagram) => datagram,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            Err(error) => {
                errors += 1;
                if errors.is_power_of_two() {
                    warn!(group = %key, %error, count = errors, "group socket receive failed");
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let Some(multicast) = multicast.upgrade() else {
            return;
        };
        if let Some(fanout) = multicast.plan(key, from, marked) {
            multicast.deliver(key, fanout, &payload).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(aid: u32, receive: Option<MulticastMode>, source: Option<&str>) -> (u32, Member) {
        let addr = |text: &str| text.parse::<SocketAddr>().unwrap();
        (
            aid,
            Member {
                membership: Membership {
                    aid,
                    group: addr("233.252.0.7:5004"),
                    client: addr("198.51.100.2:5000"),
                    internal: addr("198.51.100.1:24600"),
                    external: addr("203.0.113.1:16400"),
                    receive,
                    send_ttl: receive.is_none().then_some(4),
                    source: source.map(|s| s.parse().unwrap()),
                },
                mac: None,
                delivered: 0,
            },
        )
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|ip| ip.parse().unwrap()).collect()
    }

    #[test]
    fn a_group_is_received_from_what_its_receivers_named_or_from_the_policys_list() {
        let mu = Some(MulticastMode::ToUnicast);
        let listed = ips(&["203.0.113.2", "203.0.113.3"]);
        let members = |list: Vec<(u32, Member)>| list.into_iter().collect::<BTreeMap<_, _>>();
        // Any receiver without a source: the policy's list (empty: any source).
        let any = members(vec![
            member(1, mu, None),
            member(2, mu, Some("203.0.113.2")),
        ]);
        assert_eq!(admitted_sources(&listed, &any), listed);
        assert_eq!(admitted_sources(&[], &any), Vec::<IpAddr>::new());
        // Only source-specific receivers: their sources, once each, in order.
        let named = members(vec![
            member(1, mu, Some("203.0.113.3")),
            member(2, mu, Some("203.0.113.2")),
            member(3, mu, Some("203.0.113.3")),
            // A sender receives nothing, so it does not widen the set.
            member(4, None, None),
        ]);
        assert_eq!(
            admitted_sources(&[], &named),
            ips(&["203.0.113.2", "203.0.113.3"])
        );
        // No receiver: the policy's list.
        let senders = members(vec![member(4, None, None)]);
        assert_eq!(admitted_sources(&listed, &senders), listed);
    }

    #[test]
    fn a_source_specific_receiver_takes_only_its_source() {
        let (_, specific) = member(1, Some(MulticastMode::ToUnicast), Some("203.0.113.2"));
        let (_, any) = member(2, Some(MulticastMode::ToUnicast), None);
        let source: IpAddr = "203.0.113.2".parse().unwrap();
        let other: IpAddr = "203.0.113.3".parse().unwrap();
        assert!(takes_from(&specific, source));
        assert!(!takes_from(&specific, other));
        assert!(takes_from(&any, other));
    }
}
