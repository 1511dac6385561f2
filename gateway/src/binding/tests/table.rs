//! Every cell of the four-case table and rules 1 to 3 of protocol.md section 4.

use super::*;

// ---- Table, left column, unspecified: step 1 ----

#[test]
fn step1_reserves_both_relays_flags_remote_pending_and_installs_nothing() {
    let mut gw = Gw::new();
    let d = gw.bind(A, step1(0x0101), 0);
    assert_eq!(code(&d), ReplyCode::Ok);
    assert_eq!(d.reply.aid, 42);
    assert_eq!(d.reply.flags, 0x0087, "receive|send|unicast|REMOTE-PENDING");
    let internal = d.reply.internal.unwrap();
    let external = d.reply.external.unwrap();
    assert_eq!(internal.ip(), INTERNAL_V4);
    assert_eq!(external.ip(), EXTERNAL_V4);
    assert!(test_config().internal_ports.contains(internal.port()));
    assert!(test_config().external_ports.contains(external.port()));
    let ports = RelayPorts {
        internal,
        external,
        pair: false,
    };
    assert_eq!(
        d.actions,
        vec![Action::Reserve(ports)],
        "half-bound admits nothing"
    );
    let info = gw.b.binding(42).unwrap();
    assert!(matches!(info.state, BindingState::HalfBound { .. }));
    assert_eq!((info.conn, info.tid, info.flags), (A, 0x0101, RSU));
    assert_eq!(gw.b.ports_in_use(), (1, 1));
}

// ---- Table, right column, specific: step 2 UDP Open ----

#[test]
fn worked_example_step2_open_installs_the_exact_entry_and_repeats_the_relays() {
    let mut gw = Gw::new();
    let one = gw.bind(A, step1(0x0101), 0);
    let two = gw.bind(A, step2(0x0101, 42), 1);
    assert_eq!(code(&two), ReplyCode::Ok);
    assert_eq!(two.reply.aid, 42);
    assert_eq!(two.reply.flags, 0x0007);
    assert_eq!(two.reply.internal, one.reply.internal);
    assert_eq!(two.reply.external, one.reply.external);
    let entry = KernelEntry {
        remote: RemoteMatch::Exact(source()),
        external: one.reply.external.unwrap(),
        internal: one.reply.internal.unwrap(),
        client: sa(CLIENT, 5000),
        aid: 42,
        flags: RSU,
    };
    assert_eq!(two.actions, vec![Action::Install(entry)]);
    assert!(matches!(
        gw.b.binding(42).unwrap().state,
        BindingState::Confirmed { remote: RemoteMatch::Exact(s), .. } if s == source()
    ));
}

#[test]
fn step2_may_carry_aid_zero() {
    let mut gw = Gw::new();
    gw.bind(A, step1(7), 0);
    let two = gw.bind(A, step2(7, 0), 1);
    assert_eq!(code(&two), ReplyCode::Ok);
    assert_eq!(two.reply.aid, 42);
}

// ---- Table, right column, unspecified: step 2 UDP Listen ----

#[test]
fn step2_listen_refused_by_default_and_binding_stays_half_bound() {
    let mut gw = Gw::new();
    gw.bind(A, step1(7), 0);
    let listen = gw.bind(A, step1(7), 1);
    assert_eq!(code(&listen), ReplyCode::NotAllowed);
    assert_eq!(listen.reply.error, Some(BindError::ListenNotAllowed));
    assert!(listen.actions.is_empty());
    assert!(matches!(
        gw.b.binding(42).unwrap().state,
        BindingState::HalfBound { .. }
    ));
    assert_eq!(code(&gw.bind(A, step2(7, 42), 2)), ReplyCode::Ok);
}

#[test]
fn step2_listen_where_allowed_installs_a_relay_port_only_entry() {
    let mut gw = Gw::with(Config {
        allow_listen: true,
        ..test_config()
    });
    let one = gw.bind(A, step1(7), 0);
    let two = gw.bind(A, step1(7), 1);
    assert_eq!(code(&two), ReplyCode::Ok);
    assert_eq!(two.reply.flags, RSU, "no REMOTE-PENDING once confirmed");
    let [Action::Install(entry)] = two.actions[..] else {
        panic!("{:?}", two.actions)
    };
    assert_eq!(entry.remote, RemoteMatch::Any);
    assert_eq!(Some(entry.external), one.reply.external);
    // Rule 3 on a Listen binding: the same (unspecified) REMOTE is a repeat.
    let again = gw.bind(A, step1(7), 2);
    assert_eq!(code(&again), ReplyCode::Ok);
    assert!(again.actions.is_empty());
    // Narrowing a Listen binding to one remote is not a repeat either.
    assert_eq!(
        code(&gw.bind(A, step2(7, 42), 3)),
        ReplyCode::BadAssociationContext
    );
}

// ---- Table, left column, specific: one-step UDP Open ----

#[test]
fn one_step_open_reserves_and_installs_at_once_and_takes_its_tid() {
    let mut gw = Gw::new();
    let d = gw.bind(A, open(9, source()), 0);
    assert_eq!(code(&d), ReplyCode::Ok);
    assert_eq!(d.reply.flags, RSU);
    assert!(matches!(d.actions[0], Action::Reserve(_)));
    assert!(matches!(
        d.actions[1],
        Action::Install(KernelEntry { remote: RemoteMatch::Exact(s), aid: 42, .. }) if s == source()
    ));
    // The TID is taken: the same request again is a repeat (rule 3), not a new binding.
    let again = gw.bind(A, open(9, source()), 1);
    assert_eq!(code(&again), ReplyCode::Ok);
    assert_eq!(again.reply.aid, 42);
    assert_eq!(again.reply.external, d.reply.external);
    assert!(again.actions.is_empty());
    assert_eq!(gw.b.len(), 1);
}

#[test]
fn tid_zero_is_never_remembered() {
    let mut gw = Gw::new();
    let first = gw.bind(A, open(0, source()), 0);
    let second = gw.bind(A, open(0, source()), 0);
    assert_eq!(
        (code(&first), code(&second)),
        (ReplyCode::Ok, ReplyCode::Ok)
    );
    assert_ne!(first.reply.aid, second.reply.aid, "two one-step Opens");
    assert_ne!(first.reply.external, second.reply.external);
    assert_eq!(gw.b.binding(first.reply.aid).unwrap().tid, 0);
    // TID 0 with an unspecified REMOTE: 13, nothing reserved.
    let d = gw.bind(A, step1(0), 0);
    assert_eq!(code(&d), ReplyCode::BadAssociationContext);
    assert_eq!(d.reply.error, Some(BindError::TidZeroUnspecified));
    assert_eq!(gw.b.ports_in_use(), (2, 2));
}

// ---- Rule 1: tombstones ----

#[test]
fn rule1_expired_step1_answers_17_by_tid_and_by_aid_until_release() {
    let mut gw = Gw::new();
    gw.bind(A, step1(7), 0);
    let expired = gw.timeout(30);
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].reason, ExpiryReason::Pending);
    assert_eq!(gw.b.tombstones(), 1);
    for request in [
        step2(7, 0),
        step2(7, 42),
        step2(0, 42),
        step1(7),
        open(7, source()),
    ] {
        let d = gw.bind(A, request, 31);
        assert_eq!(code(&d), ReplyCode::TwoStepBindingExpired, "{request:?}");
        assert_eq!(d.reply.aid, 42, "the reply names the expired AID");
        assert!(d.actions.is_empty(), "never a fresh binding");
    }
    // A TID naming the tombstone wins over an AID naming another live binding.
    let other = gw.bind(A, step1(8), 31).reply.aid;
    assert_eq!(
        code(&gw.bind(A, step2(7, other), 31)),
        ReplyCode::TwoStepBindingExpired
    );
    // RELEASE of the AID forgets the tombstone and frees the TID.
    assert_eq!(code(&gw.release(A, 42, 32)), ReplyCode::Ok);
    assert_eq!(gw.b.tombstones(), 0);
    assert_eq!(code(&gw.bind(A, step1(7), 33)), ReplyCode::Ok);
    assert_eq!(
        code(&gw.bind(A, step2(0, 42), 33)),
        ReplyCode::BadAssociationId
    );
}

#[test]
fn rule1_tombstones_belong_to_their_connection() {
    let mut gw = Gw::new();
    gw.bind(A, step1(7), 0);
    gw.timeout(30);
    // Another connection: the TID means nothing there, the AID is not its own.
    assert_eq!(code(&gw.bind(B, step1(7), 31)), ReplyCode::Ok);
    assert_eq!(
        code(&gw.bind(B, step2(0, 42), 31)),
        ReplyCode::BadAssociationId
    );
    assert_eq!(code(&gw.release(B, 42, 31)), ReplyCode::BadAssociationId);
    assert_eq!(gw.b.tombstones(), 1);
    // Closing the connection forgets its tombstones.
    gw.b.on_connection_closed(A);
    assert_eq!(gw.b.tombstones(), 0);
}

// ---- Rule 2: AIDs ----

#[test]
fn rule2_unknown_aid_and_aid_tid_mismatch_get_10() {
    let mut gw = Gw::new();
    let unknown = gw.bind(A, step2(7, 999), 0);
    assert_eq!(code(&unknown), ReplyCode::BadAssociationId);
    assert_eq!(unknown.reply.aid, 999);
    gw.bind(A, step1(7), 0); // AID 42
    gw.bind(A, step1(8), 0); // AID 43
    let crossed = gw.bind(A, step2(8, 42), 1);
    assert_eq!(crossed.reply.error, Some(BindError::AidTidMismatch));
    assert_eq!(code(&crossed), ReplyCode::BadAssociationId);
    // A new TID with the AID of an existing binding names two different things.
    assert_eq!(
        code(&gw.bind(A, step2(9, 42), 1)),
        ReplyCode::BadAssociationId
    );
    // TID 0 with the AID of a binding that has a TID: mismatch too.
    assert_eq!(
        code(&gw.bind(A, step2(0, 42), 1)),
        ReplyCode::BadAssociationId
    );
    assert!(gw.b.binding(42).is_some() && gw.b.binding(43).is_some());
    assert_eq!(gw.b.len(), 2);
}

#[test]
fn rule2_no_cross_connection_use() {
    let mut gw = Gw::new();
    gw.bind(A, step1(7), 0);
    // B tries to confirm, repeat-confirm, use and release A's binding by AID.
    assert_eq!(
        code(&gw.bind(B, step2(7, 42), 1)),
        ReplyCode::BadAssociationId
    );
    assert_eq!(
        code(&gw.bind(B, step2(0, 42), 1)),
        ReplyCode::BadAssociationId
    );
    assert_eq!(code(&gw.release(B, 42, 1)), ReplyCode::BadAssociationId);
    assert!(matches!(
        gw.b.binding(42).unwrap().state,
        BindingState::HalfBound { .. }
    ));
    // TIDs are per connection: B's TID 7 is a new step 1 of its own.
    let own = gw.bind(B, step1(7), 1);
    assert_eq!(code(&own), ReplyCode::Ok);
    assert_ne!(own.reply.aid, 42);
    assert_eq!(code(&gw.bind(A, step2(7, 42), 2)), ReplyCode::Ok);
    assert_eq!(code(&gw.bind(B, step2(7, own.reply.aid), 2)), ReplyCode::Ok);
}

// ---- Rule 3: confirmed bindings ----

#[test]
fn rule3_repeat_is_idempotent_anything_else_is_13() {
    let mut gw = Gw::new();
    gw.bind(A, step1(7), 0);
    let two = gw.bind(A, step2(7, 42), 1);
    let again = gw.bind(A, step2(7, 42), 2);
    assert_eq!(
        again,
        Decision {
            actions: Vec::new(),
            ..two.clone()
        }
    );
    assert_eq!(gw.bind(A, step2(7, 0), 2).reply, two.reply);
    let other_remote = req(
        7,
        42,
        sa(CLIENT, 5000),
        Remote::Exact(sa(source().ip(), 6002)),
        RSU,
    );
    let unspecified = step1(7);
    let other_local = req(7, 42, sa(CLIENT, 5002), Remote::Exact(source()), RSU);
    let wider = req(
        7,
        42,
        sa(CLIENT, 5000),
        Remote::Exact(source()),
        RSU | flags::RTP_PAIR,
    );
    for request in [other_remote, unspecified, other_local, wider] {
        let d = gw.bind(A, request, 3);
        assert_eq!(code(&d), ReplyCode::BadAssociationContext, "{request:?}");
        assert_eq!(d.reply.error, Some(BindError::ConfirmedMismatch));
        assert!(d.actions.is_empty());
    }
    // Never widened: the entry is still the exact one.
    assert!(matches!(
        gw.b.binding(42).unwrap().state,
        BindingState::Confirmed { remote: RemoteMatch::Exact(s), .. } if s == source()
    ));
}
