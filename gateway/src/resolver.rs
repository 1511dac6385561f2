//! The gateway's own DNS resolver for SOCKS domain names (CONNECT targets, UDP destinations),
//! hardened as RFC 5452 asks: every query goes out from a fresh socket on a random source port
//! with a random id, and only that exact (nameserver, local address and port) flow is admitted by
//! the kernel gate while the query is outstanding; the socket is connected to the nameserver and
//! tied to the interface the route to it uses; a reply counts only with the query's id and the
//! very question asked, and only answer records for the queried name (or the CNAME chain from it
//! within the answer) are used. Answers are cached for their TTL (bounded). Messages are encoded
//! and parsed with `hickory-proto`; this module does the transport and the checks.

use std::{
    collections::{HashMap, VecDeque},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::RangeInclusive,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{DNSClass, Name, RData, RecordType},
};
use thiserror::Error;
use tokio::{net::UdpSocket, time::Instant};
use tracing::{debug, warn};

use crate::{
    counters::Count,
    gate::{Gate, MemoryGate},
    host_flow::HostFlow,
};

/// How long one attempt waits for an answer.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Attempts per nameserver.
const ATTEMPTS: usize = 2;
/// Source ports of queries: the top of the kernel's default ephemeral range, clear of the relay
/// port ranges. A port the host already uses is skipped.
pub const DEFAULT_QUERY_PORTS: RangeInclusive<u16> = 50_000..=60_999;
/// Recently used ids and ports are not reused at once (so two close queries never share one).
const RECENT: usize = 256;
/// Answers kept at most, and at most this long whatever their TTL.
const CACHE_ENTRIES: usize = 1024;
const CACHE_MAX_TTL: Duration = Duration::from_hours(1);
/// CNAMEs followed within one answer.
const MAX_CNAME_CHAIN: usize = 8;
/// Lookups in flight at once, gateway-wide. Each holds up to two host allow-list entries (A and
/// AAAA), so this keeps the resolver well inside the allow-list's 1024 entries whatever clients
/// ask; a lookup beyond it fails at once.
pub const MAX_LOOKUPS_IN_FLIGHT: usize = 256;

#[derive(Debug, Error)]
pub enum ResolveError {
    #[error("{0:?} is not a valid domain name")]
    InvalidName(String),
    #[error("{0} does not exist (NXDOMAIN)")]
    NotFound(String),
    #[error("{0} has no address records")]
    NoAddresses(String),
    #[error("no nameserver answered for {0}")]
    Timeout(String),
    #[error("no nameserver is configured")]
    NoNameservers,
    #[error("nameserver failure for {name}: {code}")]
    ServerFailure { name: String, code: String },
    #[error("no query socket for {name}: {source}")]
    Socket { name: String, source: io::Error },
    #[error("too many lookups in flight ({MAX_LOOKUPS_IN_FLIGHT}); {0} not looked up")]
    Busy(String),
}

/// One nameserver: where queries to it come from, and the interface they use.
#[derive(Debug, Clone)]
struct Upstream {
    server: SocketAddr,
    source: IpAddr,
    device: Option<String>,
}

/// Ids and ports of the last [`RECENT`] queries.
#[derive(Debug, Default)]
struct Recent {
    ids: VecDeque<u16>,
    ports: VecDeque<u16>,
}

impl Recent {
    fn remember(list: &mut VecDeque<u16>, value: u16) {
        if list.len() == RECENT {
            list.pop_front();
        }
        list.push_back(value);
    }
}

#[derive(Debug, Clone)]
struct Cached {
    addresses: Vec<IpAddr>,
    expires: Instant,
}

/// Resolves names with one fresh, exactly allow-listed socket per query.
pub struct Resolver {
    upstreams: Vec<Upstream>,
    gate: Arc<dyn Gate>,
    ports: RangeInclusive<u16>,
    recent: Mutex<Recent>,
    cache: Mutex<HashMap<(Name, RecordType), Cached>>,
    in_flight: tokio::sync::Semaphore,
    /// Names asked for (cache hits included) and those that found no address.
    lookups: Count,
    lookup_failures: Count,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field(
                "nameservers",
                &self.upstreams.iter().map(|u| u.server).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// Nameservers from resolv.conf text (`nameserver` lines), port 53.
pub fn nameservers_from_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
                .and_then(|addr| addr.split('%').next()?.parse::<IpAddr>().ok())
                .map(|ip| SocketAddr::new(ip, 53))
        })
        .collect()
}

/// A uniformly random `u16` from the OS. Without OS randomness there is no query (a guessable
/// id or port would let a forger in).
fn random_u16() -> io::Result<u16> {
    let value =
        getrandom::u32().map_err(|error| io::Error::other(format!("no randomness: {error}")))?;
    Ok(u16::try_from(value >> 16).unwrap_or_default())
}

/// Removes a query's flow from the gate when the query ends, however it ends.
struct AllowedFlow<'a> {
    gate: &'a dyn Gate,
    flow: HostFlow,
}

impl Drop for AllowedFlow<'_> {
    fn drop(&mut self) {
        self.gate.remove_host_flow(self.flow);
    }
}

impl Resolver {
    /// A resolver for `servers` whose queries need no gate (tests on loopback).
    pub fn without_gate(servers: &[SocketAddr]) -> io::Result<Self> {
        Self::new(servers, Arc::new(MemoryGate::default()), &|_| None)
    }

    /// A resolver for `servers`: finds the source address the kernel picks for each (without
    /// sending anything) and the interface `device_for` names for it; each query's flow is
    /// admitted through `gate` while it is outstanding.
    pub fn new(
        servers: &[SocketAddr],
        gate: Arc<dyn Gate>,
        device_for: &(dyn Fn(IpAddr) -> Option<String> + Sync),
    ) -> io::Result<Self> {
        let mut upstreams = Vec::with_capacity(servers.len());
        for &server in servers {
            let any: IpAddr = if server.is_ipv4() {
                Ipv4Addr::UNSPECIFIED.into()
            } else {
                Ipv6Addr::UNSPECIFIED.into()
            };
            let probe = std::net::UdpSocket::bind(SocketAddr::new(any, 0))?;
            if let Err(error) = probe.connect(server) {
                warn!(%server, %error, "nameserver unreachable from here; not using it");
                continue;
            }
            let source = probe.local_addr()?.ip();
            upstreams.push(Upstream {
                server,
                source,
                device: device_for(source),
            });
        }
        Ok(Self {
            upstreams,
            gate,
            ports: DEFAULT_QUERY_PORTS,
            recent: Mutex::default(),
            cache: Mutex::default(),
            in_flight: tokio::sync::Semaphore::new(MAX_LOOKUPS_IN_FLIGHT),
            lookups: Count::default(),
            lookup_failures: Count::default(),
        })
    }

    /// Addresses of `name`: A and AAAA, IPv4 first. Every name (not an IP literal) is counted,
    /// and so is every one that fails.
    pub async fn lookup(&self, name: &str) -> Result<Vec<IpAddr>, ResolveError> {
        if let Ok(ip) = name.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        self.lookups.inc();
        let result = self.lookup_name(name).await;
        if result.is_err() {
            self.lookup_failures.inc();
        }
        result
    }

    /// Names looked up so far, and how many of them failed.
    pub fn lookup_counts(&self) -> (u64, u64) {
        (self.lookups.get(), self.lookup_failures.get())
    }

    async fn lookup_name(&self, name: &str) -> Result<Vec<IpAddr>, ResolveError> {
        let fqdn = Name::from_ascii(name)
            .ok()
            .filter(|n| !n.is_root())
            .map(|mut n| {
                n.set_fqdn(true);
                n
            })
            .ok_or_else(|| ResolveError::InvalidName(name.to_owned()))?;
        if self.upstreams.is_empty() {
            return Err(ResolveError::NoNameservers);
        }
        let Ok(_permit) = self.in_flight.try_acquire() else {
            return Err(ResolveError::Busy(name.to_owned()));
        };
        let (v4, v6) = tokio::join!(
            self.cached_query(name, &fqdn, RecordType::A),
            self.cached_query(name, &fqdn, RecordType::AAAA)
        );
        let mut addresses = Vec::new();
        let mut first_error = None;
        for result in [v4, v6] {
            match result {
                Ok(mut found) => addresses.append(&mut found),
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        if addresses.is_empty() {
            return Err(first_error.unwrap_or_else(|| ResolveError::NoAddresses(name.to_owned())));
        }
        Ok(addresses)
    }

    async fn cached_query(
        &self,
        name: &str,
        fqdn: &Name,
        record_type: RecordType,
    ) -> Result<Vec<IpAddr>, ResolveError> {
        let key = (fqdn.clone(), record_type);
        let now = Instant::now();
        {
            let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
            match cache.get(&key) {
                Some(hit) if hit.expires > now => return Ok(hit.addresses.clone()),
                Some(_) => {
                    cache.remove(&key);
                }
                None => {}
            }
        }
        let (addresses, ttl) = self.query(name, fqdn, record_type).await?;
        let ttl = ttl.min(CACHE_MAX_TTL);
        if !ttl.is_zero() {
            let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
            if cache.len() >= CACHE_ENTRIES {
                let now = Instant::now();
                cache.retain(|_, entry| entry.expires > now);
            }
            if cache.len() >= CACHE_ENTRIES
                && let Some(oldest) = cache
                    .iter()
                    .min_by_key(|(_, entry)| entry.expires)
                    .map(|(key, _)| key.clone())
            {
                cache.remove(&oldest);
            }
            cache.insert(
                key,
                Cached {
                    addresses: addresses.clone(),
                    expires: Instant::now() + ttl,
                },
            );
        }
        Ok(addresses)
    }

    /// A query id not among the last [`RECENT`].
    fn fresh_id(&self) -> io::Result<u16> {
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        let id = loop {
            let id = random_u16()?;
            if !recent.ids.contains(&id) {
                break id;
            }
        };
        Recent::remember(&mut recent.ids, id);
        Ok(id)
    }

    /// A fresh socket for one query to `upstream`: a random port of the query range not used
    /// lately (and not in use), tied to the nameserver's interface, connected to it.
    async fn query_socket(&self, upstream: &Upstream) -> io::Result<UdpSocket> {
        let span = u32::from(*self.ports.end()) - u32::from(*self.ports.start()) + 1;
        let mut last_error = io::Error::from(io::ErrorKind::AddrInUse);
        for _ in 0..64 {
            let offset = u32::from(random_u16()?) % span;
            let port = u16::try_from(u32::from(*self.ports.start()) + offset).unwrap_or(0);
            if self
                .recent
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .ports
                .contains(&port)
            {
                continue;
            }
            let socket = match UdpSocket::bind(SocketAddr::new(upstream.source, port)).await {
                Ok(socket) => socket,
                Err(error) => {
                    last_error = error;
                    continue;
                }
            };
            crate::netif::tie_to_device(&socket, upstream.device.as_deref())?;
            socket.connect(upstream.server).await?;
            Recent::remember(
                &mut self
                    .recent
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .ports,
                port,
            );
            return Ok(socket);
        }
        Err(last_error)
    }

    /// Asks the nameservers in turn; the addresses and the TTL to cache them for.
    async fn query(
        &self,
        name: &str,
        fqdn: &Name,
        record_type: RecordType,
    ) -> Result<(Vec<IpAddr>, Duration), ResolveError> {
        let question = Query::query(fqdn.clone(), record_type);
        for upstream in &self.upstreams {
            for _ in 0..ATTEMPTS {
                let id = self.fresh_id().map_err(|source| ResolveError::Socket {
                    name: name.to_owned(),
                    source,
                })?;
                let mut message = Message::new(id, MessageType::Query, OpCode::Query);
                message.metadata.recursion_desired = true;
                message.add_query(question.clone());
                let Ok(bytes) = message.to_vec() else {
                    return Err(ResolveError::InvalidName(name.to_owned()));
                };
                let socket =
                    self.query_socket(upstream)
                        .await
                        .map_err(|source| ResolveError::Socket {
                            name: name.to_owned(),
                            source,
                        })?;
                let local =
                    SocketAddr::new(upstream.source, socket.local_addr().map_or(0, |a| a.port()));
                let flow = HostFlow {
                    remote: upstream.server,
                    local,
                };
                if let Err(error) = self.gate.allow_host_flow(flow) {
                    warn!(%error, "cannot admit the resolver's reply flow");
                    return Err(ResolveError::Timeout(name.to_owned()));
                }
                let _allowed = AllowedFlow {
                    gate: self.gate.as_ref(),
                    flow,
                };
                if let Err(error) = socket.send(&bytes).await {
                    debug!(server = %upstream.server, %error, "send DNS query");
                    continue;
                }
                let deadline = Instant::now() + ATTEMPT_TIMEOUT;
                if let Some(result) = await_answer(&socket, id, &question, deadline, |answer| {
                    interpret(name, fqdn, record_type, answer)
                })
                .await
                {
                    return result;
                }
            }
        }
        Err(ResolveError::Timeout(name.to_owned()))
    }
}

/// Reads replies on the query's connected socket until one is the answer ([`judge_reply`]), or
/// `deadline`. Anything else is dropped and the wait goes on, so a forged reply racing the
/// genuine one cannot end the lookup.
async fn await_answer(
    socket: &UdpSocket,
    id: u16,
    question: &Query,
    deadline: Instant,
    interpret: impl Fn(&Message) -> Result<(Vec<IpAddr>, Duration), ResolveError>,
) -> Option<Result<(Vec<IpAddr>, Duration), ResolveError>> {
    let mut buf = vec![0u8; 4096];
    loop {
        // A timeout, or ICMP port unreachable and friends: no answer from this nameserver.
        let Ok(Ok(len)) = tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await else {
            return None;
        };
        if let Some(result) = judge(&buf[..len], id, question, &interpret) {
            return Some(result);
        }
    }
}

/// What one datagram on a query's socket means: `None` unless it is the answer to query `id`
/// for `question` (a response with that id and exactly that question, whose records are not
/// all about other names: an empty answer, a genuine "no such record", is an answer); else the
/// addresses for `name` (`fqdn`, of `record_type`) in it, or why there are none. Garbage,
/// another question and answers about other names give `None`. Pure: what the resolver does
/// with every reply (and what `fuzz/` feeds hostile bytes).
pub fn judge_reply(
    datagram: &[u8],
    id: u16,
    question: &Query,
    name: &str,
    fqdn: &Name,
    record_type: RecordType,
) -> Option<Result<(Vec<IpAddr>, Duration), ResolveError>> {
    judge(datagram, id, question, &|answer| {
        interpret(name, fqdn, record_type, answer)
    })
}

fn judge(
    datagram: &[u8],
    id: u16,
    question: &Query,
    interpret: &impl Fn(&Message) -> Result<(Vec<IpAddr>, Duration), ResolveError>,
) -> Option<Result<(Vec<IpAddr>, Duration), ResolveError>> {
    let message = Message::from_vec(datagram).ok()?;
    if message.metadata.message_type == MessageType::Response
        && message.metadata.id == id
        && is_the_question(&message, question)
    {
        let result = interpret(&message);
        let about_other_names =
            matches!(result, Err(ResolveError::NoAddresses(_))) && !message.answers.is_empty();
        if !about_other_names {
            return Some(result);
        }
        debug!(
            id,
            "DNS reply whose records are all for other names; dropped"
        );
        return None;
    }
    debug!(
        id = message.metadata.id,
        "DNS reply that does not answer our query; dropped"
    );
    None
}

/// Whether `message` carries exactly `question` (name case-insensitively, type, class IN).
fn is_the_question(message: &Message, question: &Query) -> bool {
    matches!(message.queries.as_slice(), [asked]
        if asked.name() == question.name()
            && asked.query_type() == question.query_type()
            && asked.query_class() == DNSClass::IN)
}

/// The addresses for `fqdn` in `answer`: records of the queried name, or of the names a CNAME
/// chain from it leads to within the answer; records for any other name are ignored. Returns
/// them with the shortest TTL of the records used.
fn interpret(
    name: &str,
    fqdn: &Name,
    record_type: RecordType,
    answer: &Message,
) -> Result<(Vec<IpAddr>, Duration), ResolveError> {
    match answer.metadata.response_code {
        ResponseCode::NoError => {}
        ResponseCode::NXDomain => return Err(ResolveError::NotFound(name.to_owned())),
        code => {
            return Err(ResolveError::ServerFailure {
                name: name.to_owned(),
                code: code.to_string(),
            });
        }
    }
    let mut current = fqdn.clone();
    let mut ttl = u32::MAX;
    for _ in 0..=MAX_CNAME_CHAIN {
        let mut addresses = Vec::new();
        for record in answer.answers.iter().filter(|r| r.name == current) {
            let address = match (&record.data, record_type) {
                (RData::A(a), RecordType::A) => IpAddr::V4(a.0),
                (RData::AAAA(aaaa), RecordType::AAAA) => IpAddr::V6(aaaa.0),
                _ => continue,
            };
            ttl = ttl.min(record.ttl);
            addresses.push(address);
        }
        if !addresses.is_empty() {
            return Ok((addresses, Duration::from_secs(u64::from(ttl))));
        }
        let alias = answer.answers.iter().find_map(|r| match &r.data {
            RData::CNAME(target) if r.name == current => Some((target.0.clone(), r.ttl)),
            _ => None,
        });
        match alias {
            Some((target, alias_ttl)) => {
                ttl = ttl.min(alias_ttl);
                current = target;
            }
            None => break,
        }
    }
    Err(ResolveError::NoAddresses(name.to_owned()))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use hickory_proto::rr::{
        Record,
        rdata::{A, CNAME},
    };
    use tokio::task::JoinHandle;

    use super::*;

    #[test]
    fn resolv_conf_nameservers() {
        let text = "# comment\nnameserver 192.0.2.53\nsearch example\nnameserver 2001:db8::53\nnameserver fe80::1%eth0\nnameserver bogus\n";
        let servers = nameservers_from_resolv_conf(text);
        assert_eq!(
            servers,
            vec![
                "192.0.2.53:53".parse().unwrap(),
                "[2001:db8::53]:53".parse().unwrap(),
                "[fe80::1]:53".parse().unwrap(),
            ]
        );
    }

    /// What a fake nameserver saw of each query: its id and source port.
    type Seen = Arc<Mutex<Vec<(u16, u16)>>>;

    /// A fake nameserver on loopback: `answer` builds the replies (none, one or several) to
    /// each query from its source; every query's id and source port are recorded.
    async fn nameserver(
        answer: impl Fn(&Message, SocketAddr) -> Vec<Message> + Send + 'static,
    ) -> (SocketAddr, Seen, JoinHandle<()>) {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let seen: Seen = Arc::default();
        let log = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 1500];
            loop {
                let (len, from) = socket.recv_from(&mut buf).await.unwrap();
                let query = Message::from_vec(&buf[..len]).unwrap();
                log.lock().unwrap().push((query.metadata.id, from.port()));
                for reply in answer(&query, from) {
                    socket
                        .send_to(&reply.to_vec().unwrap(), from)
                        .await
                        .unwrap();
                }
            }
        });
        (addr, seen, task)
    }

    fn name(text: &str) -> Name {
        Name::from_ascii(text).unwrap()
    }

    fn reply_to(query: &Message, question: &Query, records: Vec<Record>) -> Message {
        let mut reply = Message::new(query.metadata.id, MessageType::Response, OpCode::Query);
        reply.add_query(question.clone());
        for record in records {
            reply.add_answer(record);
        }
        reply
    }

    fn a(owner: &str, ip: [u8; 4], ttl: u32) -> Record {
        Record::from_rdata(name(owner), ttl, RData::A(A(Ipv4Addr::from(ip))))
    }

    /// Answers A queries for `web.test.` with 203.0.113.2 (TTL 60); NXDOMAIN for other names.
    fn genuine(query: &Message, _: SocketAddr) -> Vec<Message> {
        let question = query.queries[0].clone();
        if question.name() != &name("web.test.") {
            let mut reply = reply_to(query, &question, vec![]);
            reply.metadata.response_code = ResponseCode::NXDomain;
            return vec![reply];
        }
        let records = if question.query_type() == RecordType::A {
            vec![a("web.test.", [203, 0, 113, 2], 60)]
        } else {
            vec![]
        };
        vec![reply_to(query, &question, records)]
    }

    #[tokio::test]
    async fn resolves_and_admits_each_query_flow_only_while_it_is_outstanding() {
        let gate = MemoryGate::default();
        let admitted_while_asked = Arc::new(AtomicUsize::new(0));
        let (server, seen, task) = {
            let (gate, admitted) = (gate.clone(), Arc::clone(&admitted_while_asked));
            nameserver(move |query, from| {
                // The gate admits exactly this query's reply flow while it is outstanding.
                if gate.host_flows().iter().any(|flow| flow.local == from) {
                    admitted.fetch_add(1, Ordering::Relaxed);
                }
                genuine(query, from)
            })
            .await
        };
        let resolver = Resolver::new(&[server], Arc::new(gate.clone()), &|_| None).unwrap();
        assert_eq!(
            resolver.lookup("web.test").await.unwrap(),
            vec![IpAddr::V4(Ipv4Addr::new(203, 0, 113, 2))]
        );
        assert_eq!(
            admitted_while_asked.load(Ordering::Relaxed),
            2,
            "A and AAAA each had their flow admitted"
        );
        assert!(gate.host_flows().is_empty(), "no flow outlives its query");
        assert!(matches!(
            resolver.lookup("missing.test").await,
            Err(ResolveError::NotFound(_))
        ));
        assert!(matches!(
            resolver.lookup("bad..name").await,
            Err(ResolveError::InvalidName(_))
        ));
        assert_eq!(
            resolver.lookup("192.0.2.7").await.unwrap(),
            vec!["192.0.2.7".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            resolver.lookup_counts(),
            (3, 2),
            "three names looked up (not the IP literal), two failed"
        );
        for (_, port) in seen.lock().unwrap().iter() {
            assert!(DEFAULT_QUERY_PORTS.contains(port), "source port {port}");
        }
        task.abort();
    }

    #[tokio::test]
    async fn ids_and_source_ports_of_50_queries_are_all_distinct() {
        let (server, seen, task) = nameserver(genuine).await;
        let resolver = Resolver::without_gate(&[server]).unwrap();
        for i in 0..25 {
            // A and AAAA per lookup: 50 queries, none answered from the cache.
            let _ = resolver.lookup(&format!("host{i}.test")).await;
        }
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 50);
        let ids: std::collections::HashSet<u16> = seen.iter().map(|(id, _)| *id).collect();
        let ports: std::collections::HashSet<u16> = seen.iter().map(|(_, port)| *port).collect();
        assert_eq!(ids.len(), 50, "ids {seen:?}");
        assert_eq!(ports.len(), 50, "ports {seen:?}");
        task.abort();
    }

    #[tokio::test]
    async fn a_reply_to_another_question_is_ignored() {
        // The forger knows the id but not the question: it answers for evil.test first.
        let (server, _, task) = nameserver(|query, from| {
            let forged_question = Query::query(name("evil.test."), RecordType::A);
            let forged = reply_to(
                query,
                &forged_question,
                vec![a("evil.test.", [198, 51, 100, 66], 60)],
            );
            let mut replies = vec![forged];
            replies.extend(genuine(query, from));
            replies
        })
        .await;
        let resolver = Resolver::without_gate(&[server]).unwrap();
        assert_eq!(
            resolver.lookup("web.test").await.unwrap(),
            vec![IpAddr::V4(Ipv4Addr::new(203, 0, 113, 2))],
            "the genuine answer, not the forged one"
        );
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn only_forged_replies_time_out() {
        let (server, _, task) = nameserver(|query, _| {
            let question = Query::query(name("evil.test."), RecordType::A);
            vec![reply_to(
                query,
                &question,
                vec![a("evil.test.", [198, 51, 100, 66], 60)],
            )]
        })
        .await;
        let resolver = Resolver::without_gate(&[server]).unwrap();
        assert!(matches!(
            resolver.lookup("web.test").await,
            Err(ResolveError::Timeout(_))
        ));
        task.abort();
    }

    #[tokio::test]
    async fn records_of_other_names_are_not_used_and_cname_chains_are_followed() {
        let (server, _, task) = nameserver(|query, _| {
            let question = query.queries[0].clone();
            if question.query_type() != RecordType::A {
                return vec![reply_to(query, &question, vec![])];
            }
            let records = if question.name() == &name("alias.test.") {
                vec![
                    Record::from_rdata(
                        name("alias.test."),
                        300,
                        RData::CNAME(CNAME(name("cdn.test."))),
                    ),
                    a("cdn.test.", [203, 0, 113, 9], 30),
                    // Glue for a name nobody asked about: ignored.
                    a("bank.test.", [198, 51, 100, 66], 30),
                ]
            } else {
                // The right question, but the only record is for another name.
                vec![a("bank.test.", [198, 51, 100, 66], 30)]
            };
            vec![reply_to(query, &question, records)]
        })
        .await;
        let resolver = Resolver::without_gate(&[server]).unwrap();
        assert_eq!(
            resolver.lookup("alias.test").await.unwrap(),
            vec![IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9))]
        );
        // A reply whose records all belong to another name is no answer: the wait goes on
        // (a genuine answer may follow) until the attempts time out.
        assert!(matches!(
            resolver.lookup("web.test").await,
            Err(ResolveError::Timeout(_))
        ));
        task.abort();
    }

    #[tokio::test]
    async fn answers_are_cached_for_their_ttl() {
        let queries = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&queries);
        let (server, _, task) = nameserver(move |query, _| {
            let question = query.queries[0].clone();
            if question.query_type() == RecordType::A {
                counter.fetch_add(1, Ordering::Relaxed);
            }
            let records = if question.query_type() == RecordType::A {
                vec![a("web.test.", [203, 0, 113, 2], 1)]
            } else {
                vec![]
            };
            vec![reply_to(query, &question, records)]
        })
        .await;
        let resolver = Resolver::without_gate(&[server]).unwrap();
        resolver.lookup("web.test").await.unwrap();
        resolver.lookup("web.test").await.unwrap();
        assert_eq!(
            queries.load(Ordering::Relaxed),
            1,
            "the second lookup is a cache hit"
        );
        // After the one-second TTL the name is asked again (bounded wait).
        let deadline = Instant::now() + Duration::from_secs(10);
        while queries.load(Ordering::Relaxed) < 2 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            resolver.lookup("web.test").await.unwrap();
        }
        assert_eq!(
            queries.load(Ordering::Relaxed),
            2,
            "asked again once the TTL ran out"
        );
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn lookups_in_flight_are_capped() {
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let resolver = Arc::new(Resolver::without_gate(&[silent.local_addr().unwrap()]).unwrap());
        let mut waiting = tokio::task::JoinSet::new();
        for i in 0..MAX_LOOKUPS_IN_FLIGHT {
            let resolver = Arc::clone(&resolver);
            waiting.spawn(async move { resolver.lookup(&format!("n{i}.test")).await });
        }
        // Every spawned lookup holds its permit once it has run up to its first wait.
        while resolver.in_flight.available_permits() > 0 {
            tokio::task::yield_now().await;
        }
        assert!(matches!(
            resolver.lookup("one-too-many.test").await,
            Err(ResolveError::Busy(_))
        ));
        while let Some(done) = waiting.join_next().await {
            assert!(matches!(done.unwrap(), Err(ResolveError::Timeout(_))));
        }
        // The permits came back.
        assert!(matches!(
            resolver.lookup("again.test").await,
            Err(ResolveError::Timeout(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn silent_nameserver_times_out() {
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let resolver = Resolver::without_gate(&[silent.local_addr().unwrap()]).unwrap();
        assert!(matches!(
            resolver.lookup("web.test").await,
            Err(ResolveError::Timeout(_))
        ));
    }
}
