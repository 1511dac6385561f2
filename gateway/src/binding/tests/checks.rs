//! Rule 4 (step 2 must repeat LOCAL, may only narrow) and the checks on every new binding:
//! LOCAL tied to the control peer, port 0, forbidden remotes, families, flags, reply codes.

use super::*;

// ---- Rule 4: step 2 must repeat LOCAL and may only narrow ----

#[test]
fn rule4_step2_must_repeat_local() {
    let mut gw = Gw::new();
    gw.bind(A, step1(7), 0);
    let other_port = req(7, 42, sa(CLIENT, 5002), Remote::Exact(source()), RSU);
    let port_zero = req(7, 42, sa(CLIENT, 0), Remote::Exact(source()), RSU);
    let other_ip = req(
        7,
        42,
        sa(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 9)), 5000),
        Remote::Exact(source()),
        RSU,
    );
    for request in [other_port, port_zero, other_ip] {
        let d = gw.bind(A, request, 1);
        assert_eq!(d.reply.error, Some(BindError::LocalChanged), "{request:?}");
        assert_eq!(code(&d), ReplyCode::BadAssociationContext);
    }
    assert_eq!(code(&gw.bind(A, step2(7, 42), 1)), ReplyCode::Ok);
}

#[test]
fn rule4_step2_fills_in_a_local_port_that_was_zero() {
    let mut gw = Gw::new();
    let latch = req(7, 0, sa(CLIENT, 0), Remote::Unspecified(Family::V4), RSU);
    assert_eq!(code(&gw.bind(A, latch, 0)), ReplyCode::Ok);
    let two = gw.bind(A, step2(7, 42), 1);
    assert_eq!(code(&two), ReplyCode::Ok);
    let [Action::Install(entry)] = two.actions[..] else {
        panic!()
    };
    assert_eq!(entry.client, sa(CLIENT, 5000));
    assert_eq!(gw.b.binding(42).unwrap().local, sa(CLIENT, 5000));
    // Or keeps it 0 (latch from the first datagram).
    let mut gw = Gw::new();
    gw.bind(A, latch, 0);
    let keep = req(7, 42, sa(CLIENT, 0), Remote::Exact(source()), RSU);
    let d = gw.bind(A, keep, 1);
    assert_eq!(code(&d), ReplyCode::Ok);
    assert_eq!(gw.b.binding(42).unwrap().local.port(), 0);
}

#[test]
fn rule4_step2_may_only_narrow_direction_flags() {
    let mut gw = Gw::new();
    gw.bind(A, step1(7), 0);
    let changed = [
        RSU | flags::RTP_PAIR,
        RSU | flags::TCP_ENCAPSULATED,
        flags::RECEIVE | flags::SEND,
        flags::UNICAST,
        RSU | 0x8000,
    ];
    for f in changed {
        let d = gw.bind(
            A,
            req(7, 42, sa(CLIENT, 5000), Remote::Exact(source()), f),
            1,
        );
        assert_eq!(code(&d), ReplyCode::BadAssociationContext, "{f:#06x}");
    }
    let narrow = req(
        7,
        42,
        sa(CLIENT, 5000),
        Remote::Exact(source()),
        flags::RECEIVE | flags::UNICAST,
    );
    let d = gw.bind(A, narrow, 1);
    assert_eq!(code(&d), ReplyCode::Ok);
    assert_eq!(d.reply.flags, flags::RECEIVE | flags::UNICAST);
    assert_eq!(
        gw.b.binding(42).unwrap().flags,
        flags::RECEIVE | flags::UNICAST
    );

    // A step 1 that only receives cannot be widened to send.
    let mut gw = Gw::new();
    let recv_only = req(
        7,
        0,
        sa(CLIENT, 5000),
        Remote::Unspecified(Family::V4),
        flags::RECEIVE | flags::UNICAST,
    );
    gw.bind(A, recv_only, 0);
    let d = gw.bind(A, step2(7, 42), 1);
    assert_eq!(d.reply.error, Some(BindError::FlagsChanged));
    // REMOTE-PENDING echoed back by the client is ignored.
    let echoed = req(7, 42, sa(CLIENT, 5000), Remote::Exact(source()), 0x0085);
    assert_eq!(code(&gw.bind(A, echoed, 1)), ReplyCode::Ok);
}

#[test]
fn rule4_step2_of_the_other_family_gets_08() {
    let mut gw = Gw::new();
    gw.bind(A, step1(7), 0);
    let v6 = req(7, 42, sa(CLIENT, 5000), Remote::Exact(source_v6()), RSU);
    assert_eq!(code(&gw.bind(A, v6, 1)), ReplyCode::AddressTypeNotSupported);
    let v6_listen = req(
        7,
        42,
        sa(CLIENT, 5000),
        Remote::Unspecified(Family::V6),
        RSU,
    );
    assert_eq!(
        code(&gw.bind(A, v6_listen, 1)),
        ReplyCode::AddressTypeNotSupported
    );
    // An IPv4-mapped IPv6 remote is IPv4.
    let IpAddr::V4(v4) = source().ip() else {
        panic!()
    };
    let mapped = sa(IpAddr::V6(v4.to_ipv6_mapped()), 6000);
    let d = gw.bind(
        A,
        req(7, 42, sa(CLIENT, 5000), Remote::Exact(mapped), RSU),
        1,
    );
    assert_eq!(code(&d), ReplyCode::Ok);
    let [Action::Install(entry)] = d.actions[..] else {
        panic!()
    };
    assert_eq!(entry.remote, RemoteMatch::Exact(source()));
}

#[test]
fn rule4_step2_to_a_forbidden_remote_gets_02_and_stays_half_bound() {
    let mut gw = Gw::new();
    gw.bind(A, step1(7), 0);
    let loopback = req(
        7,
        42,
        sa(CLIENT, 5000),
        Remote::Exact(sa(IpAddr::V4(Ipv4Addr::LOCALHOST), 6000)),
        RSU,
    );
    assert_eq!(code(&gw.bind(A, loopback, 1)), ReplyCode::NotAllowed);
    let port0 = req(
        7,
        42,
        sa(CLIENT, 5000),
        Remote::Exact(sa(source().ip(), 0)),
        RSU,
    );
    assert_eq!(
        gw.bind(A, port0, 1).reply.error,
        Some(BindError::RemotePortZero)
    );
    assert_eq!(code(&gw.bind(A, step2(7, 42), 2)), ReplyCode::Ok);
}

// ---- Rule 5 and the checks on a new binding ----

#[test]
fn local_must_be_the_control_peer() {
    let mut gw = Gw::new();
    let elsewhere = req(
        7,
        0,
        sa(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 3)), 5000),
        Remote::Unspecified(Family::V4),
        RSU,
    );
    let d = gw.bind(A, elsewhere, 0);
    assert_eq!(code(&d), ReplyCode::NotAllowed);
    assert_eq!(d.reply.error, Some(BindError::LocalNotPeer));
    let unspecified_local = req(
        7,
        0,
        sa(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        Remote::Exact(source()),
        RSU,
    );
    assert_eq!(
        code(&gw.bind(A, unspecified_local, 0)),
        ReplyCode::NotAllowed
    );
    assert_eq!(gw.b.ports_in_use(), (0, 0));
    // A peer seen as IPv4-mapped IPv6 is the same IPv4 client.
    let IpAddr::V4(client) = CLIENT else { panic!() };
    let mapped_peer = IpAddr::V6(client.to_ipv6_mapped());
    let d = gw.bind_as(A, mapped_peer, None, step1(7), 0);
    assert_eq!(code(&d), ReplyCode::Ok);
    let mapped_local = req(
        8,
        0,
        sa(mapped_peer, 5002),
        Remote::Unspecified(Family::V4),
        RSU,
    );
    let d = gw.bind(A, mapped_local, 0);
    assert_eq!(code(&d), ReplyCode::Ok);
    assert_eq!(d.reply.internal.unwrap().ip(), INTERNAL_V4);
    assert_eq!(gw.b.binding(d.reply.aid).unwrap().local, sa(CLIENT, 5002));
}

#[test]
fn remote_port_zero_refused_unless_allowed() {
    let mut gw = Gw::new();
    let host = sa(source().ip(), 0);
    let d = gw.bind(A, open(9, host), 0);
    assert_eq!(
        (code(&d), d.reply.error),
        (ReplyCode::NotAllowed, Some(BindError::RemotePortZero))
    );
    let mut gw = Gw::with(Config {
        allow_port_zero_remote: true,
        ..test_config()
    });
    let d = gw.bind(A, open(9, host), 0);
    assert_eq!(code(&d), ReplyCode::Ok);
    assert!(matches!(
        d.actions[1],
        Action::Install(KernelEntry { remote: RemoteMatch::Host(ip), .. }) if ip == source().ip()
    ));
    // Still not to a forbidden host.
    let d = gw.bind(A, open(10, sa(IpAddr::V4(Ipv4Addr::LOCALHOST), 0)), 0);
    assert_eq!(d.reply.error, Some(BindError::RemoteForbidden));
}

#[test]
fn forbidden_remotes_get_02() {
    let mut gw = Gw::new();
    let v4 = |a, b, c, d| IpAddr::V4(Ipv4Addr::new(a, b, c, d));
    let forbidden = [
        v4(127, 0, 0, 1),       // loopback
        v4(224, 1, 2, 3),       // multicast
        v4(255, 255, 255, 255), // broadcast
        v4(0, 0, 0, 0),         // unspecified with a port
        v4(198, 51, 100, 7),    // the internal network
        EXTERNAL_V4,            // the gateway's own addresses
        INTERNAL_V4,
        IpAddr::V6(Ipv6Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1)),
        EXTERNAL_V6,
        IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped()), // mapped loopback
    ];
    for ip in forbidden {
        let d = gw.bind(A, open(0, sa(ip, 6000)), 0);
        assert_eq!(code(&d), ReplyCode::NotAllowed, "{ip}");
        assert_eq!(d.reply.error, Some(BindError::RemoteForbidden), "{ip}");
    }
    assert_eq!(gw.b.ports_in_use(), (0, 0));
}

#[test]
fn address_families() {
    // No IPv6 relay: IPv6 remotes and IPv6 clients get 08.
    let mut gw = Gw::with(Config {
        internal_ips: vec![INTERNAL_V4],
        external_ips: vec![EXTERNAL_V4],
        ..test_config()
    });
    let v6_step1 = req(7, 0, sa(CLIENT, 5000), Remote::Unspecified(Family::V6), RSU);
    assert_eq!(
        code(&gw.bind(A, v6_step1, 0)),
        ReplyCode::AddressTypeNotSupported
    );
    assert_eq!(
        code(&gw.bind(A, open(0, source_v6()), 0)),
        ReplyCode::AddressTypeNotSupported
    );
    let v6_client = req(0, 0, sa(CLIENT_V6, 5000), Remote::Exact(source()), RSU);
    assert_eq!(
        code(&gw.bind_as(A, CLIENT_V6, None, v6_client, 0)),
        ReplyCode::AddressTypeNotSupported
    );
    assert_eq!(gw.b.ports_in_use(), (0, 0));

    // Both families: the step-1 REMOTE family picks the external relay family; the client's
    // family picks the internal one.
    let mut gw = Gw::new();
    let d = gw.bind(A, v6_step1, 0);
    assert_eq!(code(&d), ReplyCode::Ok);
    assert_eq!(d.reply.internal.unwrap().ip(), INTERNAL_V4);
    assert_eq!(d.reply.external.unwrap().ip(), EXTERNAL_V6);
    assert_eq!(
        code(&gw.bind(A, step2(7, 42), 1)),
        ReplyCode::AddressTypeNotSupported
    );
    let v6_step2 = req(7, 42, sa(CLIENT, 5000), Remote::Exact(source_v6()), RSU);
    assert_eq!(code(&gw.bind(A, v6_step2, 1)), ReplyCode::Ok);
    let d = gw.bind_as(B, CLIENT_V6, None, v6_client, 0);
    assert_eq!(code(&d), ReplyCode::Ok);
    assert_eq!(d.reply.internal.unwrap().ip(), INTERNAL_V6);
    assert_eq!(d.reply.external.unwrap().ip(), EXTERNAL_V4);
}

#[test]
fn multicast_and_bad_flags() {
    let mut gw = Gw::new();
    let with = |f| req(0, 0, sa(CLIENT, 5000), Remote::Exact(source()), f);
    // A unicast REMOTE in a multicast bind is not a group: `14` (tests/multicast.rs has the
    // rest of the multicast rules).
    let recv = gw.bind(A, with(flags::RECEIVE | flags::MULTICAST), 0);
    assert_eq!(code(&recv), ReplyCode::BadMulticastAddress);
    let send = gw.bind(A, with(flags::SEND | flags::MULTICAST_TO_UNICAST), 0);
    assert_eq!(code(&send), ReplyCode::BadAssociationContext);
    let none = gw.bind(A, with(flags::UNICAST), 0);
    assert_eq!(none.reply.error, Some(BindError::BadFlags));
    let unknown = gw.bind(A, with(RSU | 0x0400), 0);
    assert_eq!(code(&unknown), ReplyCode::BadAssociationContext);
    let pending = gw.bind(
        A,
        with(RSU | flags::REMOTE_PENDING | flags::TCP_ENCAPSULATED),
        0,
    );
    assert_eq!(
        code(&pending),
        ReplyCode::Ok,
        "REMOTE-PENDING in a request is ignored"
    );
    assert_eq!(pending.reply.flags, RSU | flags::TCP_ENCAPSULATED);
}

#[test]
fn every_error_maps_to_one_code() {
    use BindError as E;
    use ReplyCode as C;
    let table = [
        (E::ConnectionCap, C::GeneralFailure, 0x01),
        (E::UserCap, C::GeneralFailure, 0x01),
        (E::TotalCap, C::GeneralFailure, 0x01),
        (E::PortsExhausted, C::GeneralFailure, 0x01),
        (E::AidsExhausted, C::GeneralFailure, 0x01),
        (E::LocalNotPeer, C::NotAllowed, 0x02),
        (E::RemotePortZero, C::NotAllowed, 0x02),
        (E::RemoteForbidden, C::NotAllowed, 0x02),
        (E::ListenNotAllowed, C::NotAllowed, 0x02),
        (E::FamilyNotSupported, C::AddressTypeNotSupported, 0x08),
        (E::FamilyMismatch, C::AddressTypeNotSupported, 0x08),
        (E::UnknownAid, C::BadAssociationId, 0x10),
        (E::AidTidMismatch, C::BadAssociationId, 0x10),
        (E::MulticastReceive, C::MulticastReceiveNotAllowed, 0x11),
        (E::MulticastSend, C::MulticastSendNotAllowed, 0x12),
        (E::TidZeroUnspecified, C::BadAssociationContext, 0x13),
        (E::ConfirmedMismatch, C::BadAssociationContext, 0x13),
        (E::LocalChanged, C::BadAssociationContext, 0x13),
        (E::FlagsChanged, C::BadAssociationContext, 0x13),
        (E::BadFlags, C::BadAssociationContext, 0x13),
        (E::PairPortOverflow, C::BadAssociationContext, 0x13),
        (E::PairUnavailable, C::PortPairUnavailable, 0x16),
        (E::Expired { aid: 1 }, C::TwoStepBindingExpired, 0x17),
    ];
    for (error, expected, octet) in table {
        assert_eq!(error.code(), expected, "{error}");
        assert_eq!(error.code().as_u8(), octet);
    }
    assert_eq!(C::Ok.as_u8(), 0);
}
