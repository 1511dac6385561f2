//! Pending and idle expiry, tombstones, release and connection close.

use super::*;

// ---- Pending expiry ----

#[test]
fn half_bound_expires_after_pending_timeout_via_next_deadline() {
    let mut gw = Gw::new();
    assert_eq!(gw.b.next_deadline(), None);
    let one = gw.bind(A, step1(7), 0);
    assert_eq!(gw.b.next_deadline(), Some(gw.at(30)));
    assert!(gw.timeout(29).is_empty());
    assert!(gw.b.binding(42).is_some());
    // Traffic does not keep a half-bound binding alive.
    gw.b.on_traffic(42, gw.at(29));
    let expired = gw.timeout(30);
    let ports = RelayPorts {
        internal: one.reply.internal.unwrap(),
        external: one.reply.external.unwrap(),
        pair: false,
    };
    assert_eq!(
        expired,
        vec![Expired {
            conn: A,
            aid: 42,
            tid: 7,
            reason: ExpiryReason::Pending,
            actions: vec![Action::Free(ports)],
        }]
    );
    assert_eq!(gw.b.ports_in_use(), (0, 0));
    assert_eq!(gw.b.next_deadline(), None);
    assert!(gw.b.binding(42).is_none());
    // A late step 2 never gets a fresh binding with other ports.
    assert_eq!(
        code(&gw.bind(A, step2(7, 42), 31)),
        ReplyCode::TwoStepBindingExpired
    );
    assert_eq!(gw.b.len(), 0);
}

#[test]
fn pending_timeout_is_configurable_and_confirmation_stops_it() {
    let mut gw = Gw::with(Config {
        pending_timeout: Duration::from_secs(5),
        ..test_config()
    });
    gw.bind(A, step1(7), 0);
    gw.bind(A, step1(8), 0);
    assert_eq!(code(&gw.bind(A, step2(8, 43), 4)), ReplyCode::Ok);
    let expired = gw.timeout(5);
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].aid, 42);
    assert!(gw.timeout(200).is_empty(), "the confirmed one lives on");
    assert_eq!(gw.b.next_deadline(), Some(gw.at(4 + 300)));
}

// ---- Idle expiry ----

#[test]
fn confirmed_binding_expires_after_idle_timeout_without_traffic() {
    let mut gw = Gw::new();
    let d = gw.bind(A, open(9, source()), 0);
    let Action::Install(entry) = d.actions[1] else {
        panic!()
    };
    gw.b.on_traffic(42, gw.at(200));
    gw.b.on_traffic(42, gw.at(100)); // an older report does not move the clock back
    gw.b.on_traffic(999, gw.at(200)); // unknown AIDs are ignored
    // The scheduled check may come early; it then reschedules and expires nothing.
    let first = gw.b.next_deadline().unwrap();
    assert!(first <= gw.at(500));
    assert!(gw.b.on_timeout(first).is_empty() || first == gw.at(500));
    assert_eq!(gw.b.next_deadline(), Some(gw.at(500)));
    assert!(gw.timeout(499).is_empty());
    let expired = gw.timeout(500);
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].reason, ExpiryReason::Idle);
    assert_eq!(removes(&expired[0].actions), vec![entry]);
    assert_eq!(frees(&expired[0].actions), 1);
    assert_eq!(gw.b.ports_in_use(), (0, 0));
    // Its tombstone answers 17 until RELEASE.
    assert_eq!(
        code(&gw.bind(A, open(9, source()), 501)),
        ReplyCode::TwoStepBindingExpired
    );
    assert_eq!(code(&gw.release(A, 42, 502)), ReplyCode::Ok);
    let again = gw.bind(A, open(9, source()), 503);
    assert_eq!(code(&again), ReplyCode::Ok);
    assert_eq!(again.reply.aid, 43);
}

#[test]
fn next_deadline_is_always_after_a_timeout_that_expired_everything_due() {
    let mut gw = Gw::new();
    for tid in 1..=5 {
        gw.bind(A, open(tid, sa(source().ip(), 6000 + tid)), u64::from(tid));
    }
    gw.bind(A, step1(100), 3);
    for secs in [10, 33, 100, 303, 304, 305, 1000] {
        gw.timeout(secs);
        if let Some(next) = gw.b.next_deadline() {
            assert!(next > gw.at(secs), "no busy loop at {secs}");
        }
    }
    assert!(gw.b.is_empty());
    assert_eq!(gw.b.tombstones(), 6);
}

#[test]
fn tombstones_per_connection_are_capped_oldest_first() {
    let mut gw = Gw::with(Config {
        max_tombstones_per_connection: 2,
        ..test_config()
    });
    for tid in 1..=3 {
        gw.bind(A, step1(tid), 0);
    }
    assert_eq!(gw.timeout(30).len(), 3);
    assert_eq!(gw.b.tombstones(), 2);
    // The oldest (TID 1, AID 42) is forgotten: its TID is free, its AID unknown.
    assert_eq!(
        code(&gw.bind(A, step2(0, 42), 31)),
        ReplyCode::BadAssociationId
    );
    assert_eq!(
        code(&gw.bind(A, step2(2, 0), 31)),
        ReplyCode::TwoStepBindingExpired
    );
    assert_eq!(code(&gw.bind(A, step1(1), 31)), ReplyCode::Ok);
}

// ---- Release and connection close ----

#[test]
fn release_frees_ports_and_removes_entries_and_the_tid() {
    let mut gw = Gw::new();
    gw.bind(A, step1(7), 0);
    let two = gw.bind(A, step2(7, 42), 1);
    let Action::Install(entry) = two.actions[0] else {
        panic!()
    };
    let d = gw.release(A, 42, 2);
    assert_eq!(code(&d), ReplyCode::Ok);
    assert_eq!(d.reply.aid, 42);
    assert_eq!(removes(&d.actions), vec![entry]);
    assert_eq!(frees(&d.actions), 1);
    assert!(
        matches!(d.actions.last(), Some(Action::Free(_))),
        "entries go before ports"
    );
    assert_eq!(gw.b.ports_in_use(), (0, 0));
    assert_eq!(gw.b.next_deadline(), None);
    assert_eq!(code(&gw.release(A, 42, 3)), ReplyCode::BadAssociationId);
    assert_eq!(code(&gw.release(A, 0, 3)), ReplyCode::BadAssociationId);
    // The TID is free: a new step 1 with it.
    let again = gw.bind(A, step1(7), 4);
    assert_eq!(code(&again), ReplyCode::Ok);
    assert_eq!(again.reply.aid, 43);
    // Releasing a half-bound binding frees its ports; there is no entry to remove.
    let d = gw.release(A, 43, 5);
    assert_eq!(d.actions.len(), 1);
    assert_eq!(frees(&d.actions), 1);
}

#[test]
fn connection_close_frees_everything_of_that_connection_only() {
    let mut gw = Gw::new();
    gw.bind(A, step1(1), 0); // 42 half-bound
    gw.bind(A, open(2, source()), 0); // 43 confirmed
    gw.bind(A, step1(3), 0); // 44 will be confirmed
    gw.bind(A, step1(4), 0); // 45 will expire
    gw.bind(B, step1(1), 0); // 46, other connection
    gw.bind(A, step2(3, 44), 10);
    gw.bind(B, step2(1, 46), 10);
    gw.b.on_traffic(43, gw.at(10));
    let expired = gw.timeout(30);
    assert_eq!(expired.len(), 2, "42 and 45");
    assert_eq!(gw.b.tombstones(), 2);
    let actions = gw.b.on_connection_closed(A);
    gw.b.check_invariants();
    let removed: Vec<u32> = removes(&actions).iter().map(|e| e.aid).collect();
    assert_eq!(removed, vec![43, 44]);
    assert_eq!(frees(&actions), 2);
    assert_eq!(gw.b.tombstones(), 0);
    assert_eq!(gw.b.len(), 1);
    assert_eq!(gw.b.ports_in_use(), (1, 1));
    assert!(gw.b.on_connection_closed(A).is_empty());
    assert_eq!(code(&gw.bind(B, step2(1, 46), 31)), ReplyCode::Ok);
    gw.b.on_connection_closed(B);
    assert!(gw.b.is_empty());
    assert_eq!(gw.b.ports_in_use(), (0, 0));
    assert_eq!(gw.b.next_deadline(), None);
}
