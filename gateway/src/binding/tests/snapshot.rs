//! The table handed to a new daemon: a restored table is the same table (same AIDs, TIDs,
//! ports, owners, clocks), behaves the same afterwards, and a snapshot that does not fit is
//! refused whole.

use super::*;

/// A table with one of each: half-bound, confirmed Open, RTP pair with RAW, a host-level
/// binding, a binding of another user on another connection, and a tombstone.
fn busy_table() -> Gw {
    let mut gw = Gw::with(Config {
        allow_port_zero_remote: true,
        ..test_config()
    });
    let half = gw.bind(A, step1(1), 0);
    assert_eq!(code(&half), ReplyCode::Ok);
    let s1 = gw.bind(A, step1(2), 0);
    assert_eq!(code(&gw.bind(A, step2(2, s1.reply.aid), 1)), ReplyCode::Ok);
    let pair = req(
        3,
        0,
        sa(CLIENT, 5002),
        Remote::Exact(sa(source().ip(), 6002)),
        RSU | flags::RTP_PAIR | flags::RAW,
    );
    assert_eq!(code(&gw.bind(A, pair, 2)), ReplyCode::Ok);
    let host = req(
        4,
        0,
        sa(CLIENT, 5010),
        Remote::Exact(sa(source().ip(), 0)),
        RSU,
    );
    assert_eq!(code(&gw.bind(A, host, 2)), ReplyCode::Ok);
    let theirs = gw.bind_as(B, CLIENT, Some("alice"), step1(1), 3);
    assert_eq!(code(&theirs), ReplyCode::Ok);
    // TID 9 expires (pending timeout) and leaves a tombstone.
    let doomed = gw.bind(B, step1(9), 3);
    assert_eq!(code(&doomed), ReplyCode::Ok);
    gw
}

fn restored(gw: &Gw, at: Instant) -> (Bindings, Vec<Action>) {
    let snapshot = gw.b.snapshot(at);
    let (table, actions) =
        Bindings::restore(gw.b.config().clone(), counting_aids(), &snapshot, at).unwrap();
    table.check_invariants();
    (table, actions)
}

#[test]
fn a_restored_table_snapshots_the_same() {
    let mut gw = busy_table();
    let pending = gw.b.config().pending_timeout.as_secs();
    assert_eq!(
        gw.timeout(3 + pending).len(),
        3,
        "TIDs 1 of A and B, 9 of B expire"
    );
    assert!(gw.b.tombstones() >= 1);
    let at = gw.at(3 + pending + 1);
    let snapshot = gw.b.snapshot(at);
    let (table, _) = restored(&gw, at);
    assert_eq!(table.snapshot(at), snapshot);
    assert_eq!(table.len(), gw.b.len());
    assert_eq!(table.tombstones(), gw.b.tombstones());
    assert_eq!(table.ports_in_use(), gw.b.ports_in_use());
    // The format survives its serialised form.
    let text = serde_json::to_string(&snapshot).unwrap();
    let back: TableSnapshot = serde_json::from_str(&text).unwrap();
    assert_eq!(back, snapshot);
}

#[test]
fn restoring_asks_for_every_relay_and_installs_nothing() {
    let gw = busy_table();
    let (table, actions) = restored(&gw, gw.at(4));
    let reserved: Vec<RelayPorts> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Reserve(ports) => Some(*ports),
            _ => None,
        })
        .collect();
    assert_eq!(reserved.len(), table.len());
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::Install(_) | Action::Remove(_))),
        "the kernel entries stay where they are"
    );
    for (info, _) in gw.b.list() {
        assert!(reserved.contains(&info.ports), "ports of {}", info.aid);
        assert_eq!(table.binding(info.aid).map(|b| b.ports), Some(info.ports));
        assert_eq!(
            table.kernel_entries(info.aid),
            gw.b.kernel_entries(info.aid)
        );
    }
}

#[test]
fn a_restored_binding_is_released_confirmed_and_expires_like_the_original() {
    let gw = busy_table();
    let at = gw.at(4);
    let (mut table, _) = restored(&gw, at);
    let list = gw.b.list();
    let confirmed = list
        .iter()
        .find(|(b, _)| b.tid == 2 && b.conn == A)
        .unwrap()
        .0;
    let half = list
        .iter()
        .find(|(b, _)| b.tid == 1 && b.conn == A)
        .unwrap()
        .0;
    // Step 2 of the half-bound one, on the same connection, with its TID and AID.
    let d = table.on_bind(A, CLIENT, None, step2(1, half.aid), at);
    assert_eq!(d.reply.code, ReplyCode::Ok);
    assert_eq!(d.reply.external, Some(half.ports.external));
    table.check_invariants();
    // Another connection cannot name it.
    let d = table.on_release(B, confirmed.aid, at);
    assert_eq!(d.reply.code, ReplyCode::BadAssociationId);
    // Its owner releases it: its exact kernel entries go and its ports are freed.
    let d = table.on_release(A, confirmed.aid, at);
    assert_eq!(d.reply.code, ReplyCode::Ok);
    assert_eq!(removes(&d.actions), gw.b.kernel_entries(confirmed.aid));
    assert_eq!(frees(&d.actions), 1);
    table.check_invariants();
    // The reused TID 2 makes a new binding on new ports.
    let d = table.on_bind(A, CLIENT, None, step1(2), at);
    assert_eq!(d.reply.code, ReplyCode::Ok);
    let others = list.iter().filter(|(b, _)| b.aid != confirmed.aid);
    assert!(others.clone().all(|(b, _)| b.aid != d.reply.aid));
    assert!(
        others
            .clone()
            .all(|(b, _)| Some(b.ports.internal) != d.reply.internal)
    );
    // The idle clock continued: B's half-bound binding expires when it would have.
    let pending = gw.b.config().pending_timeout;
    let due = gw.at(3) + pending;
    assert!(
        table
            .on_timeout(due.checked_sub(Duration::from_millis(1)).unwrap())
            .iter()
            .all(|e| e.conn != B)
    );
    assert!(table.on_timeout(due).iter().any(|e| e.conn == B));
    table.check_invariants();
}

#[test]
fn a_new_binding_never_takes_a_restored_port_or_aid() {
    let gw = busy_table();
    let at = gw.at(4);
    // The new daemon's AID source starts where the old one did: every candidate is taken.
    let (mut table, _) = restored(&gw, at);
    let before: Vec<BindingInfo> = table.list().into_iter().map(|(b, _)| b).collect();
    for tid in 100..110 {
        let d = table.on_bind(A, CLIENT, None, step1(tid), at);
        assert_eq!(d.reply.code, ReplyCode::Ok);
        assert!(before.iter().all(|b| b.aid != d.reply.aid));
        assert!(
            before
                .iter()
                .all(|b| Some(b.ports.internal) != d.reply.internal)
        );
    }
    table.check_invariants();
}

#[test]
fn a_snapshot_that_does_not_fit_is_refused_whole() {
    let gw = busy_table();
    let at = gw.at(4);
    let snapshot = gw.b.snapshot(at);
    // Relay ports outside the new ranges.
    let narrow = Config {
        internal_ports: PortRange::new(41_000, 41_099),
        ..gw.b.config().clone()
    };
    assert!(matches!(
        Bindings::restore(narrow, counting_aids(), &snapshot, at),
        Err(RestoreError::Ports { .. })
    ));
    // The same AID twice.
    let mut twice = snapshot.clone();
    twice.bindings.push(twice.bindings[0].clone());
    assert!(matches!(
        Bindings::restore(gw.b.config().clone(), counting_aids(), &twice, at),
        Err(RestoreError::Ports { .. } | RestoreError::DuplicateAid(_))
    ));
    // The same port twice under another AID.
    let mut shared = snapshot.clone();
    let mut copy = shared.bindings[0].clone();
    copy.aid = 9_999;
    copy.tid = 777;
    shared.bindings.push(copy);
    assert!(matches!(
        Bindings::restore(gw.b.config().clone(), counting_aids(), &shared, at),
        Err(RestoreError::Ports { .. })
    ));
    // AID 0.
    let mut zero = snapshot;
    zero.bindings[0].aid = 0;
    assert_eq!(
        Bindings::restore(gw.b.config().clone(), counting_aids(), &zero, at).err(),
        Some(RestoreError::ZeroAid)
    );
}

#[test]
fn clocks_are_relative_to_the_snapshot() {
    let gw = busy_table();
    let snapshot = gw.b.snapshot(gw.at(4));
    let pending = gw.b.config().pending_timeout;
    let half = snapshot
        .bindings
        .iter()
        .find(|b| b.conn == B.0 && b.tid == 9)
        .unwrap();
    assert_eq!(
        half.state,
        StateSnapshot::HalfBound {
            expires_in_ms: u64::try_from(pending.as_millis()).unwrap() - 1_000
        }
    );
    let confirmed = snapshot
        .bindings
        .iter()
        .find(|b| b.conn == A.0 && b.tid == 2)
        .unwrap();
    assert_eq!(
        confirmed.state,
        StateSnapshot::Confirmed {
            remote: RemoteSnapshot::Exact(source()),
            idle_for_ms: 3_000
        }
    );
}
