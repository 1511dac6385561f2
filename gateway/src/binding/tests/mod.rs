//! Tests of the binding state machine on a virtual clock: the table of protocol.md section 4 and
//! rules 1 to 3 (`table`), rule 4 and the per-request checks (`checks`), expiry, tombstones,
//! release and close (`expiry`), caps, ports, AIDs and config (`resources`), header-less delivery
//! (`raw`) and a property test (`prop`).

mod checks;
mod expiry;
mod multicast;
mod prop;
mod raw;
mod resources;
mod snapshot;
mod table;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use super::*;

pub(super) const INTERNAL_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1));
pub(super) const EXTERNAL_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1));
pub(super) const INTERNAL_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1));
pub(super) const EXTERNAL_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1));
/// The client of the worked example.
pub(super) const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 2));
pub(super) const CLIENT_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2));
/// Receive | send | unicast.
pub(super) const RSU: u16 = flags::RECEIVE | flags::SEND | flags::UNICAST;

pub(super) const A: ConnId = ConnId(1);
pub(super) const B: ConnId = ConnId(2);

pub(super) fn sa(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

/// The media source of the worked example, 203.0.113.2:6000.
pub(super) fn source() -> SocketAddr {
    sa(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 2)), 6000)
}

pub(super) fn source_v6() -> SocketAddr {
    sa(
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 3, 0, 0, 0, 0, 2)),
        6000,
    )
}

pub(super) fn test_config() -> Config {
    let mut config = Config {
        internal_ips: vec![INTERNAL_V4, INTERNAL_V6],
        external_ips: vec![EXTERNAL_V4, EXTERNAL_V6],
        internal_ports: PortRange::new(40_000, 40_099),
        external_ports: PortRange::new(30_000, 30_099),
        ..Config::default()
    };
    // An internal network (the client side) is forbidden as a REMOTE.
    config
        .forbidden_remotes
        .push("198.51.100.0/24".parse().unwrap());
    config
}

/// AIDs 42, 43, 44, ...
pub(super) fn counting_aids() -> impl FnMut() -> u32 + Send + 'static {
    let mut next = 41;
    move || {
        next += 1;
        next
    }
}

/// A gateway on a virtual clock.
pub(super) struct Gw {
    pub b: Bindings,
    pub t0: Instant,
}

impl Gw {
    pub fn new() -> Self {
        Self::with(test_config())
    }

    pub fn with(config: Config) -> Self {
        Gw {
            b: Bindings::new(config, counting_aids()).unwrap(),
            t0: Instant::now(),
        }
    }

    pub fn at(&self, secs: u64) -> Instant {
        self.t0 + Duration::from_secs(secs)
    }

    /// A bind from the worked example's client on `conn` at `secs`.
    pub fn bind(&mut self, conn: ConnId, req: BindRequest, secs: u64) -> Decision {
        let now = self.at(secs);
        let d = self.b.on_bind(conn, CLIENT, None, req, now);
        self.b.check_invariants();
        d
    }

    pub fn bind_as(
        &mut self,
        conn: ConnId,
        peer: IpAddr,
        user: Option<&str>,
        req: BindRequest,
        secs: u64,
    ) -> Decision {
        let now = self.at(secs);
        let d = self.b.on_bind(conn, peer, user, req, now);
        self.b.check_invariants();
        d
    }

    pub fn release(&mut self, conn: ConnId, aid: u32, secs: u64) -> Decision {
        let now = self.at(secs);
        let d = self.b.on_release(conn, aid, now);
        self.b.check_invariants();
        d
    }

    pub fn timeout(&mut self, secs: u64) -> Vec<Expired> {
        let now = self.at(secs);
        let e = self.b.on_timeout(now);
        self.b.check_invariants();
        e
    }
}

pub(super) fn req(
    tid: u16,
    aid: u32,
    local: SocketAddr,
    remote: Remote,
    flags: u16,
) -> BindRequest {
    BindRequest {
        tid,
        aid,
        local,
        remote,
        flags,
        ttl: 0,
    }
}

/// Step 1 of the worked example: client 198.51.100.2:5000, remote unknown.
pub(super) fn step1(tid: u16) -> BindRequest {
    req(
        tid,
        0,
        sa(CLIENT, 5000),
        Remote::Unspecified(Family::V4),
        RSU,
    )
}

/// Step 2 (UDP Open) of the worked example to 203.0.113.2:6000.
pub(super) fn step2(tid: u16, aid: u32) -> BindRequest {
    req(tid, aid, sa(CLIENT, 5000), Remote::Exact(source()), RSU)
}

/// A one-step UDP Open to `remote`.
pub(super) fn open(tid: u16, remote: SocketAddr) -> BindRequest {
    req(tid, 0, sa(CLIENT, 5000), Remote::Exact(remote), RSU)
}

pub(super) fn code(d: &Decision) -> ReplyCode {
    d.reply.code
}

/// How many `Free` actions.
pub(super) fn frees(actions: &[Action]) -> usize {
    actions
        .iter()
        .filter(|a| matches!(a, Action::Free(_)))
        .count()
}

/// The entries of the `Remove` actions, in order.
pub(super) fn removes(actions: &[Action]) -> Vec<KernelEntry> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Remove(entry) => Some(*entry),
            _ => None,
        })
        .collect()
}
