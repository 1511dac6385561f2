//! The gateway's own DNS resolver for SOCKS domain names (CONNECT targets, UDP destinations).
//!
//! Each configured nameserver is asked from one long-lived UDP socket with a fixed local port, so
//! the kernel gate can admit its replies with one exact allow-list entry per (nameserver, local
//! address and port) and no wider hole. Messages are encoded and parsed with `hickory-proto`;
//! this module only does the transport: transaction ids, timeouts, retries, failover.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{Name, RData, RecordType},
};
use thiserror::Error;
use tokio::{net::UdpSocket, sync::oneshot, task::JoinHandle};
use tracing::{debug, warn};

use crate::datapath::HostFlow;

/// How long one attempt waits for an answer.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Attempts per nameserver.
const ATTEMPTS: usize = 2;

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
}

type Pending = Arc<Mutex<HashMap<(SocketAddr, u16), oneshot::Sender<Message>>>>;

/// One nameserver and the socket that talks to it.
struct Upstream {
    server: SocketAddr,
    socket: Arc<UdpSocket>,
    local: SocketAddr,
    reader: JoinHandle<()>,
}

/// Resolves names through fixed-port sockets whose flows can be allow-listed exactly.
pub struct Resolver {
    upstreams: Vec<Upstream>,
    pending: Pending,
    next_id: Mutex<u16>,
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

impl Drop for Resolver {
    fn drop(&mut self) {
        for upstream in &self.upstreams {
            upstream.reader.abort();
        }
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

impl Resolver {
    /// Binds one socket per nameserver (an ephemeral port, fixed for the daemon's lifetime).
    pub async fn bind(servers: &[SocketAddr]) -> io::Result<Self> {
        Self::bind_tied(servers, &|_| None).await
    }

    /// Like [`Resolver::bind`], and ties each socket to the interface `device_for` names for the
    /// source address the kernel picks towards its nameserver (`None`: not tied, as for a
    /// nameserver on loopback).
    pub async fn bind_tied(
        servers: &[SocketAddr],
        device_for: &(dyn Fn(IpAddr) -> Option<String> + Sync),
    ) -> io::Result<Self> {
        let pending: Pending = Arc::default();
        let mut upstreams = Vec::with_capacity(servers.len());
        for &server in servers {
            let any: IpAddr = if server.is_ipv4() {
                Ipv4Addr::UNSPECIFIED.into()
            } else {
                Ipv6Addr::UNSPECIFIED.into()
            };
            // The source address the kernel picks for this nameserver, without sending anything.
            let probe = std::net::UdpSocket::bind(SocketAddr::new(any, 0))?;
            if let Err(error) = probe.connect(server) {
                warn!(%server, %error, "nameserver unreachable from here; not using it");
                continue;
            }
            let socket = UdpSocket::bind(SocketAddr::new(any, 0)).await?;
            let source = probe.local_addr()?.ip();
            crate::netif::tie_to_device(&socket, device_for(source).as_deref())?;
            let local = SocketAddr::new(source, socket.local_addr()?.port());
            let socket = Arc::new(socket);
            let reader = tokio::spawn(read_replies(
                Arc::clone(&socket),
                server,
                Arc::clone(&pending),
            ));
            upstreams.push(Upstream {
                server,
                socket,
                local,
                reader,
            });
        }
        Ok(Self {
            upstreams,
            pending,
            next_id: Mutex::new(1),
        })
    }

    /// The exact (nameserver, local address and port) flows the gate must admit.
    pub fn host_flows(&self) -> Vec<HostFlow> {
        self.upstreams
            .iter()
            .map(|upstream| HostFlow {
                remote: upstream.server,
                local: upstream.local,
            })
            .collect()
    }

    /// Addresses of `name`: A and AAAA, IPv4 first.
    pub async fn lookup(&self, name: &str) -> Result<Vec<IpAddr>, ResolveError> {
        if let Ok(ip) = name.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
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
        let (v4, v6) = tokio::join!(
            self.query(name, &fqdn, RecordType::A),
            self.query(name, &fqdn, RecordType::AAAA)
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

    fn allocate_id(&self) -> u16 {
        let mut next = self.next_id.lock().unwrap_or_else(PoisonError::into_inner);
        // Ids only need to be unique among outstanding queries; mix in the address of a fresh
        // allocation-free counter so ids are not trivially predictable.
        let id =
            next.wrapping_mul(0x9e37).wrapping_add(0x7f4a) ^ (std::process::id() & 0xffff) as u16;
        *next = next.wrapping_add(1);
        id
    }

    async fn query(
        &self,
        name: &str,
        fqdn: &Name,
        record_type: RecordType,
    ) -> Result<Vec<IpAddr>, ResolveError> {
        for upstream in &self.upstreams {
            for _ in 0..ATTEMPTS {
                let id = self.allocate_id();
                let mut message = Message::new(id, MessageType::Query, OpCode::Query);
                message.metadata.recursion_desired = true;
                message.add_query(Query::query(fqdn.clone(), record_type));
                let Ok(bytes) = message.to_vec() else {
                    return Err(ResolveError::InvalidName(name.to_owned()));
                };
                let (tx, rx) = oneshot::channel();
                self.pending
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert((upstream.server, id), tx);
                let answer = match upstream.socket.send_to(&bytes, upstream.server).await {
                    Ok(_) => tokio::time::timeout(ATTEMPT_TIMEOUT, rx)
                        .await
                        .ok()
                        .and_then(Result::ok),
                    Err(error) => {
                        debug!(server = %upstream.server, %error, "send DNS query");
                        None
                    }
                };
                self.pending
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&(upstream.server, id));
                if let Some(answer) = answer {
                    return interpret(name, &answer);
                }
            }
        }
        Err(ResolveError::Timeout(name.to_owned()))
    }
}

fn interpret(name: &str, answer: &Message) -> Result<Vec<IpAddr>, ResolveError> {
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
    let addresses: Vec<IpAddr> = answer
        .answers
        .iter()
        .filter_map(|record| match &record.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
            _ => None,
        })
        .collect();
    if addresses.is_empty() {
        return Err(ResolveError::NoAddresses(name.to_owned()));
    }
    Ok(addresses)
}

/// Hands each reply to the query waiting for its (nameserver, id); drops anything else.
async fn read_replies(socket: Arc<UdpSocket>, server: SocketAddr, pending: Pending) {
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((len, from)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        if from != server {
            continue;
        }
        let Ok(message) = Message::from_vec(&buf[..len]) else {
            continue;
        };
        if message.metadata.message_type != MessageType::Response {
            continue;
        }
        let waiter = pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&(server, message.metadata.id));
        if let Some(waiter) = waiter {
            let _ = waiter.send(message);
        }
    }
}

#[cfg(test)]
mod tests {
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

    /// A fake nameserver on loopback answering A queries for `web.test`.
    async fn fake_nameserver() -> (SocketAddr, JoinHandle<()>) {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 1500];
            loop {
                let (len, from) = socket.recv_from(&mut buf).await.unwrap();
                let query = Message::from_vec(&buf[..len]).unwrap();
                let q = query.queries[0].clone();
                let mut reply =
                    Message::new(query.metadata.id, MessageType::Response, OpCode::Query);
                reply.add_query(q.clone());
                let name = q.name().to_ascii();
                if name == "web.test." && q.query_type() == RecordType::A {
                    reply.add_answer(hickory_proto::rr::Record::from_rdata(
                        q.name().clone(),
                        60,
                        RData::A(hickory_proto::rr::rdata::A(Ipv4Addr::new(203, 0, 113, 2))),
                    ));
                } else if name != "web.test." {
                    reply.metadata.response_code = ResponseCode::NXDomain;
                }
                socket
                    .send_to(&reply.to_vec().unwrap(), from)
                    .await
                    .unwrap();
            }
        });
        (addr, task)
    }

    #[tokio::test]
    async fn resolves_through_a_nameserver_and_reports_its_flow() {
        let (server, task) = fake_nameserver().await;
        let resolver = Resolver::bind(&[server]).await.unwrap();
        assert_eq!(
            resolver.lookup("web.test").await.unwrap(),
            vec![IpAddr::V4(Ipv4Addr::new(203, 0, 113, 2))]
        );
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
        let flows = resolver.host_flows();
        assert_eq!(flows.len(), 1);
        assert_eq!(flows[0].remote, server);
        assert_eq!(flows[0].local.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_ne!(flows[0].local.port(), 0);
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn silent_nameserver_times_out() {
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let resolver = Resolver::bind(&[silent.local_addr().unwrap()])
            .await
            .unwrap();
        assert!(matches!(
            resolver.lookup("web.test").await,
            Err(ResolveError::Timeout(_))
        ));
    }
}
