//! Multicast binds and SET TTL (protocol.md section 3): every refusal code, the chosen mode,
//! the relay's membership actions, and the life of a multicast binding.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::*;

const GROUP: IpAddr = IpAddr::V4(Ipv4Addr::new(233, 252, 0, 7));
const GROUP_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xff0e, 0, 0, 0, 0, 0xdb8, 0, 7));
const RECV: u16 = flags::RECEIVE | flags::MULTICAST;
const SEND: u16 = flags::SEND | flags::MULTICAST;

fn policy(modes: MulticastModes, default_mode: MulticastMode) -> MulticastPolicy {
    MulticastPolicy {
        receive: vec![
            "233.252.0.0/24".parse().unwrap(),
            "ff0e::db8:0:0/96".parse().unwrap(),
        ],
        send: vec!["233.252.0.0/25".parse().unwrap()],
        max_ttl: 16,
        modes,
        default_mode,
        sources: vec![(
            IpAddr::V4(Ipv4Addr::new(233, 252, 0, 9)),
            vec![IpAddr::V4(Ipv4Addr::new(203, 0, 113, 2))],
        )],
    }
}

const BOTH: MulticastModes = MulticastModes {
    to_unicast: true,
    to_multicast: true,
};
const MU_ONLY: MulticastModes = MulticastModes {
    to_unicast: true,
    to_multicast: false,
};

fn gw(policy: MulticastPolicy) -> Gw {
    Gw::with(Config {
        multicast: policy,
        ..test_config()
    })
}

fn mreq(tid: u16, group: SocketAddr, flags: u16, ttl: u8) -> BindRequest {
    BindRequest {
        ttl,
        ..req(tid, 0, sa(CLIENT, 5000), Remote::Exact(group), flags)
    }
}

fn code(d: &Decision) -> ReplyCode {
    d.reply.code
}

fn memberships(d: &Decision) -> Vec<Membership> {
    d.actions
        .iter()
        .filter_map(|a| match a {
            Action::Subscribe(m) => Some(*m),
            _ => None,
        })
        .collect()
}

#[test]
fn a_receive_bind_subscribes_in_the_default_mode_and_replies_with_the_group() {
    let mut g = gw(policy(BOTH, MulticastMode::ToUnicast));
    let group = sa(GROUP, 5004);
    let d = g.bind(A, mreq(1, group, RECV, 0), 0);
    assert_eq!(code(&d), ReplyCode::Ok);
    assert_eq!(d.reply.flags, RECV | flags::MULTICAST_TO_UNICAST);
    assert_eq!(
        d.reply.external,
        Some(group),
        "REMOTE of the reply is the group"
    );
    let internal = d.reply.internal.unwrap();
    assert_eq!(internal.ip(), INTERNAL_V4);
    assert!(matches!(d.actions[0], Action::Reserve(_)));
    assert_eq!(
        memberships(&d),
        vec![Membership {
            aid: d.reply.aid,
            group,
            client: sa(CLIENT, 5000),
            internal,
            external: memberships(&d)[0].external,
            receive: Some(MulticastMode::ToUnicast),
            send_ttl: None,
            source: None,
        }]
    );
    assert!(
        g.b.kernel_entries(d.reply.aid).is_empty(),
        "no unicast entry"
    );
}

#[test]
fn the_mode_asked_for_is_granted_or_refused_with_11() {
    let group = sa(GROUP, 5004);
    let mut g = gw(policy(BOTH, MulticastMode::ToUnicast));
    let d = g.bind(
        A,
        mreq(1, group, RECV | flags::MULTICAST_TO_MULTICAST, 0),
        0,
    );
    assert_eq!(
        d.reply.flags & flags::MULTICAST_MODES,
        flags::MULTICAST_TO_MULTICAST
    );
    assert_eq!(memberships(&d)[0].receive, Some(MulticastMode::ToMulticast));
    // Both bits: no preference, the default.
    let d = g.bind(A, mreq(2, group, RECV | flags::MULTICAST_MODES, 0), 0);
    assert_eq!(
        d.reply.flags & flags::MULTICAST_MODES,
        flags::MULTICAST_TO_UNICAST
    );

    let mut g = gw(policy(MU_ONLY, MulticastMode::ToUnicast));
    let d = g.bind(
        A,
        mreq(1, group, RECV | flags::MULTICAST_TO_MULTICAST, 0),
        0,
    );
    assert_eq!(code(&d), ReplyCode::MulticastReceiveNotAllowed);
    assert!(d.actions.is_empty());
    // The default mode not allowed: the other one.
    let mm_only = MulticastModes {
        to_unicast: false,
        to_multicast: true,
    };
    let mut g = gw(policy(mm_only, MulticastMode::ToUnicast));
    let d = g.bind(A, mreq(1, group, RECV, 0), 0);
    assert_eq!(
        d.reply.flags & flags::MULTICAST_MODES,
        flags::MULTICAST_TO_MULTICAST
    );
}

#[test]
fn refusals_name_the_rule() {
    let group = sa(GROUP, 5004);
    let mut g = gw(policy(BOTH, MulticastMode::ToUnicast));
    // 14: not a multicast address, a group outside every prefix, no port.
    for remote in [
        sa(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9)), 5004),
        sa(IpAddr::V4(Ipv4Addr::new(233, 252, 1, 1)), 5004),
    ] {
        assert_eq!(
            code(&g.bind(A, mreq(0, remote, RECV, 0), 0)),
            ReplyCode::BadMulticastAddress
        );
    }
    // Send allowed only in the lower half of the test prefix.
    let high = sa(IpAddr::V4(Ipv4Addr::new(233, 252, 0, 200)), 5004);
    assert_eq!(
        code(&g.bind(A, mreq(0, high, SEND, 4), 0)),
        ReplyCode::BadMulticastAddress
    );
    // 15: TTL 0 and over the maximum.
    assert_eq!(
        code(&g.bind(A, mreq(0, group, SEND, 0), 0)),
        ReplyCode::TtlNotAllowed
    );
    assert_eq!(
        code(&g.bind(A, mreq(0, group, SEND, 17), 0)),
        ReplyCode::TtlNotAllowed
    );
    assert_eq!(code(&g.bind(A, mreq(0, group, SEND, 16), 0)), ReplyCode::Ok);
    // 02: LOCAL not the peer.
    let other = BindRequest {
        local: sa(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 3)), 5000),
        ..mreq(0, group, RECV, 0)
    };
    assert_eq!(code(&g.bind(A, other, 0)), ReplyCode::NotAllowed);
    // 13: a mode bit without the multicast bit; MU with LOCAL port 0; unicast framing bits.
    assert_eq!(
        code(&g.bind(
            A,
            mreq(0, group, flags::RECEIVE | flags::MULTICAST_TO_UNICAST, 0),
            0
        )),
        ReplyCode::BadAssociationContext
    );
    let unlatched = BindRequest {
        local: sa(CLIENT, 0),
        ..mreq(0, group, RECV, 0)
    };
    assert_eq!(
        code(&g.bind(A, unlatched, 0)),
        ReplyCode::BadAssociationContext
    );
    assert_eq!(
        code(&g.bind(A, mreq(0, group, RECV | flags::RTP_PAIR, 0), 0)),
        ReplyCode::BadAssociationContext
    );

    // Nothing allowed (the default policy): 11 and 12.
    let mut g = Gw::new();
    assert_eq!(
        code(&g.bind(A, mreq(0, group, RECV, 0), 0)),
        ReplyCode::MulticastReceiveNotAllowed
    );
    assert_eq!(
        code(&g.bind(A, mreq(0, group, SEND, 1), 0)),
        ReplyCode::MulticastSendNotAllowed
    );
    assert_eq!(g.b.len(), 0);
}

#[test]
fn set_ttl_changes_a_live_send_binding_only() {
    let group = sa(GROUP, 5004);
    let mut g = gw(policy(BOTH, MulticastMode::ToUnicast));
    let send = g.bind(A, mreq(1, group, SEND, 4), 0).reply.aid;
    let receive = g.bind(A, mreq(2, group, RECV, 0), 0).reply.aid;
    let d = g.b.on_set_ttl(A, send, 9);
    assert_eq!(code(&d), ReplyCode::Ok);
    assert_eq!(memberships(&d)[0].send_ttl, Some(9));
    assert_eq!(g.b.binding(send).unwrap().ttl, 9);
    assert_eq!(code(&g.b.on_set_ttl(A, send, 17)), ReplyCode::TtlNotAllowed);
    assert_eq!(code(&g.b.on_set_ttl(A, send, 0)), ReplyCode::TtlNotAllowed);
    assert_eq!(
        g.b.binding(send).unwrap().ttl,
        9,
        "a refused SET TTL changes nothing"
    );
    assert_eq!(
        code(&g.b.on_set_ttl(A, receive, 3)),
        ReplyCode::BadAssociationContext
    );
    assert_eq!(
        code(&g.b.on_set_ttl(B, send, 3)),
        ReplyCode::BadAssociationId
    );
    assert_eq!(
        code(&g.b.on_set_ttl(A, 999, 3)),
        ReplyCode::BadAssociationId
    );
    let unicast = g.bind(A, open(3, source()), 0).reply.aid;
    assert_eq!(
        code(&g.b.on_set_ttl(A, unicast, 3)),
        ReplyCode::BadAssociationContext
    );
}

#[test]
fn a_multicast_binding_does_not_idle_out_and_goes_with_release_or_its_connection() {
    let group = sa(GROUP_V6, 5004);
    let mut g = gw(policy(BOTH, MulticastMode::ToUnicast));
    let v6 = BindRequest {
        local: sa(CLIENT_V6, 5000),
        ..mreq(1, group, RECV, 0)
    };
    let d = g.bind_as(A, CLIENT_V6, None, v6, 0);
    assert_eq!(code(&d), ReplyCode::Ok, "{:?}", d.reply.error);
    let aid = d.reply.aid;
    let membership = memberships(&d)[0];
    assert_eq!(membership.send_ttl, None);
    assert_eq!(membership.internal.ip(), INTERNAL_V6);
    assert!(g.timeout(100_000).is_empty(), "no idle expiry");
    assert!(g.b.binding(aid).is_some());
    let released = g.release(A, aid, 100_001);
    assert!(released.actions.contains(&Action::Unsubscribe(membership)));
    assert!(
        released
            .actions
            .iter()
            .any(|a| matches!(a, Action::Free(_)))
    );
    assert_eq!(g.b.ports_in_use(), (0, 0));

    let aid = g.bind(A, mreq(2, sa(GROUP, 5004), RECV, 0), 0).reply.aid;
    let closed = g.b.on_connection_closed(A);
    assert!(
        closed
            .iter()
            .any(|a| matches!(a, Action::Unsubscribe(m) if m.aid == aid))
    );
    g.b.check_invariants();
    assert!(g.b.is_empty());
}

const SOURCE: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 2));

/// The bind that names the source of a receive binding made with `tid`.
fn sreq(tid: u16, source: IpAddr, flags: u16) -> BindRequest {
    req(
        tid,
        0,
        sa(CLIENT, 5000),
        Remote::Exact(sa(source, 0)),
        flags,
    )
}

#[test]
fn a_second_bind_with_the_tid_names_the_one_source_of_a_receive() {
    let mut g = gw(policy(BOTH, MulticastMode::ToUnicast));
    let group = sa(GROUP, 5004);
    let first = g.bind(A, mreq(1, group, RECV, 0), 0);
    assert_eq!(memberships(&first)[0].source, None, "any source at first");
    let named = g.bind(A, sreq(1, SOURCE, RECV), 0);
    assert_eq!(code(&named), ReplyCode::Ok);
    assert_eq!(named.reply.aid, first.reply.aid, "the same binding");
    assert_eq!(
        named.reply.external,
        Some(group),
        "REMOTE is still the group"
    );
    assert_eq!(named.reply.internal, first.reply.internal);
    let member = memberships(&named);
    assert_eq!(member.len(), 1, "the relay is told the narrowed membership");
    assert_eq!(member[0].source, Some(SOURCE));
    assert_eq!(member[0].aid, first.reply.aid);
    // The same source again (the mode bit now spelt out) repeats the reply and changes nothing.
    let again = g.bind(A, sreq(1, SOURCE, RECV | flags::MULTICAST_TO_UNICAST), 0);
    assert_eq!(code(&again), ReplyCode::Ok);
    assert!(again.actions.is_empty());
    // The group again repeats too.
    let group_again = g.bind(A, mreq(1, group, RECV, 0), 0);
    assert_eq!(code(&group_again), ReplyCode::Ok);
    assert!(group_again.actions.is_empty());
    // Another source once one is named: 13.
    let other = g.bind(
        A,
        sreq(1, IpAddr::V4(Ipv4Addr::new(203, 0, 113, 3)), RECV),
        0,
    );
    assert_eq!(code(&other), ReplyCode::BadAssociationContext);
    g.b.check_invariants();
}

#[test]
fn a_named_source_is_checked_against_the_policy_and_the_binding() {
    let group = sa(GROUP, 5004);
    let listed_group = sa(IpAddr::V4(Ipv4Addr::new(233, 252, 0, 9)), 5004);
    let cases: &[(&str, SocketAddr, BindRequest, ReplyCode)] = &[
        (
            "a multicast source",
            group,
            sreq(1, IpAddr::V4(Ipv4Addr::new(233, 252, 0, 8)), RECV),
            ReplyCode::BadMulticastAddress,
        ),
        (
            "a source with a port",
            group,
            req(
                1,
                0,
                sa(CLIENT, 5000),
                Remote::Exact(sa(SOURCE, 6000)),
                RECV,
            ),
            ReplyCode::BadMulticastAddress,
        ),
        (
            "another family",
            group,
            sreq(
                1,
                IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2)),
                RECV,
            ),
            ReplyCode::BadMulticastAddress,
        ),
        (
            "loopback",
            group,
            sreq(1, IpAddr::V4(Ipv4Addr::LOCALHOST), RECV),
            ReplyCode::BadMulticastAddress,
        ),
        (
            "not on the group's source list",
            listed_group,
            sreq(1, IpAddr::V4(Ipv4Addr::new(203, 0, 113, 3)), RECV),
            ReplyCode::MulticastReceiveNotAllowed,
        ),
        (
            "the gateway's own external address",
            group,
            sreq(1, EXTERNAL_V4, RECV),
            ReplyCode::NotAllowed,
        ),
        (
            "other flags",
            group,
            sreq(1, SOURCE, RECV | flags::SEND),
            ReplyCode::BadAssociationContext,
        ),
        (
            "another LOCAL",
            group,
            req(1, 0, sa(CLIENT, 5002), Remote::Exact(sa(SOURCE, 0)), RECV),
            ReplyCode::BadAssociationContext,
        ),
    ];
    for (what, group, request, expected) in cases {
        let mut g = gw(policy(BOTH, MulticastMode::ToUnicast));
        let first = g.bind(A, mreq(1, *group, RECV, 0), 0);
        assert_eq!(code(&first), ReplyCode::Ok, "{what}");
        let d = g.bind(A, *request, 0);
        assert_eq!(code(&d), *expected, "{what}");
        assert!(d.actions.is_empty(), "{what}: a refusal changes nothing");
        // The binding still takes any source: naming the listed one now works.
        let ok = g.bind(A, sreq(1, SOURCE, RECV), 0);
        assert_eq!(code(&ok), ReplyCode::Ok, "{what}: the binding is intact");
        g.b.check_invariants();
    }
    // The listed source of a listed group is accepted.
    let mut g = gw(policy(BOTH, MulticastMode::ToUnicast));
    g.bind(A, mreq(1, listed_group, RECV, 0), 0);
    assert_eq!(code(&g.bind(A, sreq(1, SOURCE, RECV), 0)), ReplyCode::Ok);
}

#[test]
fn only_a_multicast_to_unicast_receive_takes_a_source() {
    let group = sa(GROUP, 5004);
    let mut g = gw(policy(BOTH, MulticastMode::ToUnicast));
    let mm = RECV | flags::MULTICAST_TO_MULTICAST;
    assert_eq!(code(&g.bind(A, mreq(1, group, mm, 0), 0)), ReplyCode::Ok);
    assert_eq!(
        code(&g.bind(A, sreq(1, SOURCE, mm), 0)),
        ReplyCode::BadAssociationContext,
        "MM re-sends the group inside for everyone"
    );
    assert_eq!(code(&g.bind(A, mreq(2, group, SEND, 4), 0)), ReplyCode::Ok);
    assert_eq!(
        code(&g.bind(A, sreq(2, SOURCE, SEND), 0)),
        ReplyCode::BadAssociationContext,
        "a send binding receives nothing"
    );
    // Another connection cannot name the source of A's binding by its TID: it is a new bind.
    let d = g.bind(B, sreq(1, SOURCE, RECV), 0);
    assert_ne!(code(&d), ReplyCode::Ok);
    g.b.check_invariants();
}
