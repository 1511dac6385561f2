//! Random sequences of binds, releases, traffic, timeouts and closes never panic, keep every
//! internal count consistent, and leak nothing: after every connection closed, every port is
//! free and no kernel entry remains.

use std::collections::HashSet;

use proptest::prelude::*;

use super::*;

/// What the caller would have applied: reserved ports and installed entries.
#[derive(Default)]
struct Applied {
    reserved: HashSet<RelayPorts>,
    installed: HashSet<KernelEntry>,
    members: std::collections::HashMap<u32, crate::binding::Membership>,
}

impl Applied {
    fn apply(&mut self, actions: &[Action]) {
        for action in actions {
            match action {
                Action::Reserve(ports) => assert!(self.reserved.insert(*ports), "reserved twice"),
                Action::Free(ports) => assert!(self.reserved.remove(ports), "freed unreserved"),
                Action::Install(entry) => {
                    assert!(
                        self.reserved
                            .iter()
                            .any(|p| p.external.ip() == entry.external.ip()
                                && (p.external.port() == entry.external.port()
                                    || p.pair && p.external.port() + 1 == entry.external.port()))
                    );
                    assert!(self.installed.insert(*entry), "installed twice");
                }
                Action::Remove(entry) => assert!(self.installed.remove(entry), "removed unknown"),
                Action::Subscribe(membership) => {
                    self.members.insert(membership.aid, *membership);
                }
                Action::Unsubscribe(membership) => assert_eq!(
                    self.members.remove(&membership.aid).as_ref(),
                    Some(membership),
                    "unsubscribed unknown"
                ),
            }
        }
    }
}

type Op = (u8, u8, u8, u8, u8, u16);

fn peer_of(conn: u8) -> IpAddr {
    if conn == 2 { CLIENT_V6 } else { CLIENT }
}

fn local_of(peer: IpAddr, pick: u8) -> SocketAddr {
    match pick % 6 {
        0 | 1 => sa(peer, 5000),
        2 => sa(peer, 0),
        3 => sa(peer, 65_535),
        4 => sa(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 77)), 5000),
        _ => match peer {
            IpAddr::V4(v4) => sa(IpAddr::V6(v4.to_ipv6_mapped()), 5000),
            IpAddr::V6(_) => sa(peer, 5002),
        },
    }
}

fn remote_of(pick: u8) -> Remote {
    match pick % 10 {
        0 | 1 => Remote::Unspecified(Family::V4),
        2 => Remote::Unspecified(Family::V6),
        3 | 4 => Remote::Exact(source()),
        5 => Remote::Exact(sa(source().ip(), 6002)),
        6 => Remote::Exact(source_v6()),
        7 => Remote::Exact(sa(source().ip(), 0)),
        8 => Remote::Exact(sa(IpAddr::V4(Ipv4Addr::LOCALHOST), 6000)),
        _ => Remote::Exact(sa(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)),
    }
}

fn flags_of(pick: u8, raw: u16) -> u16 {
    match pick % 7 {
        0 | 1 => RSU,
        2 => RSU | flags::RTP_PAIR,
        3 => flags::RECEIVE | flags::UNICAST,
        4 => flags::RECEIVE | flags::UNICAST | flags::RTP_PAIR,
        5 => RSU | flags::MULTICAST,
        _ => raw,
    }
}

fn run(ops: &[Op], allow_listen: bool, allow_port_zero: bool) {
    let config = Config {
        allow_listen,
        allow_port_zero_remote: allow_port_zero,
        internal_ports: PortRange::new(40_001, 40_010),
        external_ports: PortRange::new(30_000, 30_007),
        max_half_bound_per_connection: 4,
        max_half_bound_per_user: 5,
        max_bindings: 9,
        max_tombstones_per_connection: 3,
        ..test_config()
    };
    let mut b = Bindings::new(config, counting_aids()).unwrap();
    let mut now = Instant::now();
    let mut applied = Applied::default();
    let mut aids: Vec<u32> = vec![42];
    let mut last_ok: Option<(ConnId, IpAddr, Option<&str>, BindRequest)> = None;
    for &(kind, x, y, z, w, raw) in ops {
        let conn = x % 3;
        let id = ConnId(u64::from(conn));
        let aid_of = |pick: u8| match pick % 8 {
            0..=3 => 0,
            4 => 9999,
            _ => aids[usize::from(pick / 8) % aids.len()],
        };
        match kind % 9 {
            0..=2 => {
                let peer = peer_of(conn);
                let request = BindRequest {
                    tid: u16::from(y % 5),
                    aid: aid_of(z),
                    local: local_of(peer, w),
                    remote: remote_of((w / 6) ^ z),
                    flags: flags_of(y / 5, raw),
                    ttl: w % 4,
                };
                let user = ["alice", "bob"].get(usize::from(w % 3)).copied();
                let d = b.on_bind(id, peer, user, request, now);
                applied.apply(&d.actions);
                if d.reply.code == ReplyCode::Ok {
                    assert!(d.reply.internal.is_some() && d.reply.external.is_some());
                    aids.push(d.reply.aid);
                    last_ok = Some((id, peer, user, request));
                } else {
                    assert!(d.actions.is_empty(), "a refusal changes nothing");
                    assert_eq!(d.reply.error.map(BindError::code), Some(d.reply.code));
                }
            }
            3 => {
                // Repeat the last accepted request (a retransmission, or step 2 after step 1).
                if let Some((id, peer, user, request)) = last_ok {
                    let d = b.on_bind(id, peer, user, request, now);
                    applied.apply(&d.actions);
                }
            }
            4 => {
                let d = b.on_release(id, aid_of(z), now);
                applied.apply(&d.actions);
            }
            5 => {
                let seen = now.checked_sub(Duration::from_secs(u64::from(w % 4)));
                b.on_traffic(aid_of(z), seen.unwrap_or(now));
            }
            6 | 7 => {
                let step = if raw % 8 == 0 { raw % 400 } else { raw % 20 };
                now += Duration::from_secs(u64::from(step));
                for expired in b.on_timeout(now) {
                    applied.apply(&expired.actions);
                }
                if let Some(next) = b.next_deadline() {
                    assert!(next > now);
                }
            }
            _ => applied.apply(&b.on_connection_closed(id)),
        }
        b.check_invariants();
        assert_eq!(applied.reserved.len(), b.len());
        let in_use: usize = applied
            .reserved
            .iter()
            .map(|p| if p.pair { 2 } else { 1 })
            .sum();
        assert_eq!(b.ports_in_use(), (in_use, in_use));
    }
    for conn in 0..3 {
        applied.apply(&b.on_connection_closed(ConnId(conn)));
    }
    b.check_invariants();
    assert!(b.is_empty());
    assert_eq!(b.tombstones(), 0);
    assert_eq!(b.ports_in_use(), (0, 0));
    assert_eq!(b.next_deadline(), None);
    assert!(
        applied.reserved.is_empty(),
        "ports leaked: {:?}",
        applied.reserved
    );
    assert!(
        applied.installed.is_empty(),
        "entries leaked: {:?}",
        applied.installed
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_never_panic_and_never_leak(
        ops in proptest::collection::vec(any::<Op>(), 0..300),
        allow_listen in any::<bool>(),
        allow_port_zero in any::<bool>(),
    ) {
        run(&ops, allow_listen, allow_port_zero);
    }
}
