//! Header-less (RAW) delivery in the machine (protocol.md section 3): granted only where an Open
//! binding can have it, echoed only when granted, decided again in step 2, never shared.

use super::*;

const RAW: u16 = flags::RAW;

fn raw_entries(d: &Decision) -> Vec<KernelEntry> {
    d.actions
        .iter()
        .filter_map(|a| match a {
            Action::Install(entry) if entry.flags & RAW != 0 => Some(*entry),
            _ => None,
        })
        .collect()
}

fn pair_open(tid: u16, local_port: u16, remote: SocketAddr) -> BindRequest {
    req(
        tid,
        0,
        sa(CLIENT, local_port),
        Remote::Exact(remote),
        RSU | flags::RTP_PAIR | RAW,
    )
}

#[test]
fn one_step_open_with_raw_is_granted_and_echoed() {
    let mut gw = Gw::new();
    let mut request = open(0, source());
    request.flags |= RAW;
    let d = gw.bind(A, request, 0);
    assert_eq!(code(&d), ReplyCode::Ok);
    assert_eq!(d.reply.flags & RAW, RAW, "echoed");
    let entries = raw_entries(&d);
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].remote, RemoteMatch::Exact(source()));
    assert_eq!(entries[0].client, sa(CLIENT, 5000));
}

#[test]
fn step_one_grants_provisionally_and_step_two_decides() {
    let mut gw = Gw::new();
    let mut first = step1(7);
    first.flags |= RAW;
    let d1 = gw.bind(A, first, 0);
    assert_eq!(d1.reply.flags & RAW, RAW, "provisional grant in step 1");
    assert!(raw_entries(&d1).is_empty(), "half-bound: nothing installed");
    let aid = d1.reply.aid;

    let mut second = step2(7, aid);
    second.flags |= RAW;
    let d2 = gw.bind(A, second, 1);
    assert_eq!(code(&d2), ReplyCode::Ok);
    assert_eq!(d2.reply.flags & RAW, RAW);
    assert_eq!(raw_entries(&d2).len(), 1);
}

#[test]
fn step_two_without_raw_uses_the_header() {
    let mut gw = Gw::new();
    let mut first = step1(7);
    first.flags |= RAW;
    let aid = gw.bind(A, first, 0).reply.aid;
    let d2 = gw.bind(A, step2(7, aid), 1);
    assert_eq!(code(&d2), ReplyCode::Ok);
    assert_eq!(d2.reply.flags & RAW, 0);
    assert!(raw_entries(&d2).is_empty());
}

#[test]
fn raw_may_be_asked_first_in_step_two() {
    let mut gw = Gw::new();
    let aid = gw.bind(A, step1(7), 0).reply.aid;
    let mut second = step2(7, aid);
    second.flags |= RAW;
    let d2 = gw.bind(A, second, 1);
    assert_eq!(code(&d2), ReplyCode::Ok);
    assert_eq!(d2.reply.flags & RAW, RAW);
}

#[test]
fn listen_is_never_raw() {
    let mut config = test_config();
    config.allow_listen = true;
    let mut gw = Gw::with(config);
    let mut first = step1(7);
    first.flags |= RAW;
    let aid = gw.bind(A, first, 0).reply.aid;
    let mut listen = req(
        7,
        aid,
        sa(CLIENT, 5000),
        Remote::Unspecified(Family::V4),
        RSU | RAW,
    );
    listen.flags |= RAW;
    let d = gw.bind(A, listen, 1);
    assert_eq!(code(&d), ReplyCode::Ok, "Listen confirmed, with the header");
    assert_eq!(d.reply.flags & RAW, 0);
    assert!(raw_entries(&d).is_empty());
}

#[test]
fn raw_is_not_granted_where_it_cannot_work() {
    let cases = [
        (
            "LOCAL port 0 (latched from a header)",
            req(0, 0, sa(CLIENT, 0), Remote::Exact(source()), RSU | RAW),
        ),
        (
            "receive only",
            req(
                0,
                0,
                sa(CLIENT, 5000),
                Remote::Exact(source()),
                flags::RECEIVE | flags::UNICAST | RAW,
            ),
        ),
        (
            "TCP-encapsulated",
            req(
                0,
                0,
                sa(CLIENT, 5000),
                Remote::Exact(source()),
                RSU | flags::TCP_ENCAPSULATED | RAW,
            ),
        ),
        (
            "IPv4 client, IPv6 remote",
            req(
                0,
                0,
                sa(CLIENT, 5000),
                Remote::Exact(source_v6()),
                RSU | RAW,
            ),
        ),
    ];
    for (what, request) in cases {
        let mut gw = Gw::new();
        let d = gw.bind(A, request, 0);
        assert_eq!(code(&d), ReplyCode::Ok, "{what}: still bound");
        assert_eq!(d.reply.flags & RAW, 0, "{what}: not echoed");
        assert!(raw_entries(&d).is_empty(), "{what}");
    }
}

#[test]
fn a_flow_held_by_a_raw_binding_is_not_granted_twice() {
    let mut gw = Gw::new();
    let mut request = open(0, source());
    request.flags |= RAW;
    let first = gw.bind(A, request, 0);
    assert_eq!(first.reply.flags & RAW, RAW);
    // The same client socket and remote again (another connection of the same client): the
    // kernel could not tell the two apart, so the second gets the header.
    let second = gw.bind(B, request, 0);
    assert_eq!(code(&second), ReplyCode::Ok);
    assert_eq!(second.reply.flags & RAW, 0);
    // Released, the flow is free again.
    assert_eq!(code(&gw.release(A, first.reply.aid, 1)), ReplyCode::Ok);
    let third = gw.bind(A, request, 2);
    assert_eq!(third.reply.flags & RAW, RAW);
}

#[test]
fn rtp_pair_raw_holds_both_flows() {
    let mut gw = Gw::new();
    let d = gw.bind(A, pair_open(0, 5000, source()), 0);
    assert_eq!(d.reply.flags & RAW, RAW);
    let entries = raw_entries(&d);
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[1].client, sa(CLIENT, 5001));
    assert_eq!(
        entries[1].remote,
        RemoteMatch::Exact(sa(source().ip(), 6001))
    );
    // Another pair whose RTP flow is this pair's RTCP flow collides.
    let overlapping = gw.bind(B, pair_open(0, 5001, sa(source().ip(), 6001)), 0);
    assert_eq!(overlapping.reply.flags & RAW, 0);
}

#[test]
fn a_repeat_matches_the_granted_flags() {
    let mut gw = Gw::new();
    let mut request = open(9, source());
    request.flags |= RAW;
    let d = gw.bind(A, request, 0);
    let aid = d.reply.aid;
    let again = gw.bind(
        A,
        req(9, aid, sa(CLIENT, 5000), Remote::Exact(source()), RSU | RAW),
        1,
    );
    assert_eq!(code(&again), ReplyCode::Ok);
    assert_eq!(again.reply.flags & RAW, RAW);
    // Dropping a granted RAW would change delivery: refused like any other change.
    let dropped = gw.bind(
        A,
        req(9, aid, sa(CLIENT, 5000), Remote::Exact(source()), RSU),
        1,
    );
    assert_eq!(code(&dropped), ReplyCode::BadAssociationContext);
}

#[test]
fn raw_asked_again_but_never_granted_is_the_same_request() {
    let mut gw = Gw::new();
    let request = req(9, 0, sa(CLIENT, 0), Remote::Exact(source()), RSU | RAW);
    let d = gw.bind(A, request, 0);
    assert_eq!(d.reply.flags & RAW, 0);
    let again = gw.bind(
        A,
        BindRequest {
            aid: d.reply.aid,
            ..request
        },
        1,
    );
    assert_eq!(code(&again), ReplyCode::Ok);
    assert_eq!(again.reply.flags & RAW, 0);
}
