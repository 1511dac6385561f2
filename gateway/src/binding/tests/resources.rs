//! Caps, relay ports (exhaustion, return, RTP pairs, external addresses), AIDs and config.

use super::*;

// ---- Caps ----

#[test]
fn half_bound_cap_per_connection() {
    let mut gw = Gw::with(Config {
        max_half_bound_per_connection: 2,
        ..test_config()
    });
    gw.bind(A, step1(1), 0);
    gw.bind(A, step1(2), 0);
    let over = gw.bind(A, step1(3), 0);
    assert_eq!(
        (code(&over), over.reply.error),
        (ReplyCode::GeneralFailure, Some(BindError::ConnectionCap))
    );
    assert!(over.actions.is_empty());
    assert_eq!(gw.b.ports_in_use(), (2, 2), "nothing reserved");
    // The TID was not taken by the refusal.
    assert_eq!(code(&gw.bind(A, step1(3), 0)), ReplyCode::GeneralFailure);
    // One-step Opens are not half-bound; another connection has its own count.
    assert_eq!(code(&gw.bind(A, open(4, source()), 0)), ReplyCode::Ok);
    assert_eq!(code(&gw.bind(B, step1(1), 0)), ReplyCode::Ok);
    // A confirmation (or release, or expiry) makes room.
    gw.bind(A, step2(1, 42), 1);
    assert_eq!(code(&gw.bind(A, step1(3), 1)), ReplyCode::Ok);
}

#[test]
fn half_bound_cap_per_user_across_connections() {
    let mut gw = Gw::with(Config {
        max_half_bound_per_user: 2,
        ..test_config()
    });
    let alice = Some("alice");
    assert_eq!(
        code(&gw.bind_as(A, CLIENT, alice, step1(1), 0)),
        ReplyCode::Ok
    );
    assert_eq!(
        code(&gw.bind_as(B, CLIENT, alice, step1(1), 0)),
        ReplyCode::Ok
    );
    let over = gw.bind_as(ConnId(3), CLIENT, alice, step1(1), 0);
    assert_eq!(over.reply.error, Some(BindError::UserCap));
    assert_eq!(code(&over), ReplyCode::GeneralFailure);
    assert_eq!(
        code(&gw.bind_as(ConnId(3), CLIENT, Some("bob"), step1(1), 0)),
        ReplyCode::Ok
    );
    // Anonymous connections are not capped per user.
    for tid in 1..=3 {
        assert_eq!(
            code(&gw.bind_as(ConnId(4), CLIENT, None, step1(tid), 0)),
            ReplyCode::Ok
        );
    }
    // Closing one of alice's connections gives her room again.
    gw.b.on_connection_closed(A);
    assert_eq!(
        code(&gw.bind_as(ConnId(5), CLIENT, alice, step1(1), 0)),
        ReplyCode::Ok
    );
    // Expiry does too.
    gw.timeout(30);
    assert_eq!(
        code(&gw.bind_as(ConnId(6), CLIENT, alice, step1(1), 31)),
        ReplyCode::Ok
    );
    assert_eq!(
        code(&gw.bind_as(ConnId(6), CLIENT, alice, step1(2), 31)),
        ReplyCode::Ok
    );
}

#[test]
fn total_bindings_cap() {
    let mut gw = Gw::with(Config {
        max_bindings: 2,
        ..test_config()
    });
    gw.bind(A, step1(1), 0);
    gw.bind(B, open(0, source()), 0);
    let over = gw.bind(A, open(0, source()), 0);
    assert_eq!(over.reply.error, Some(BindError::TotalCap));
    assert_eq!(gw.b.ports_in_use(), (2, 2));
    gw.release(A, 42, 1);
    assert_eq!(code(&gw.bind(A, open(0, source()), 1)), ReplyCode::Ok);
}

// ---- Ports ----

#[test]
fn port_exhaustion_gets_01_and_ports_come_back() {
    let mut gw = Gw::with(Config {
        internal_ports: PortRange::new(40_000, 40_002),
        ..test_config()
    });
    let aids: Vec<u32> = (1..=3)
        .map(|tid| gw.bind(A, step1(tid), 0).reply.aid)
        .collect();
    let over = gw.bind(A, step1(4), 0);
    assert_eq!(
        (code(&over), over.reply.error),
        (ReplyCode::GeneralFailure, Some(BindError::PortsExhausted))
    );
    assert_eq!(
        gw.b.ports_in_use(),
        (3, 3),
        "the external port was given back"
    );
    gw.release(A, aids[1], 1);
    assert_eq!(code(&gw.bind(A, step1(4), 1)), ReplyCode::Ok);
    // Expiry returns them too.
    gw.timeout(31);
    assert_eq!(gw.b.ports_in_use(), (0, 0));
    for tid in 10..=12 {
        assert_eq!(code(&gw.bind(A, step1(tid), 31)), ReplyCode::Ok);
    }
}

#[test]
fn rtp_pair_allocates_aligned_pairs_and_two_entries() {
    let mut gw = Gw::new();
    let pair_flags = RSU | flags::RTP_PAIR;
    let one = req(
        7,
        0,
        sa(CLIENT, 5000),
        Remote::Unspecified(Family::V4),
        pair_flags,
    );
    let d = gw.bind(A, one, 0);
    assert_eq!(code(&d), ReplyCode::Ok);
    assert_eq!(d.reply.flags, pair_flags | flags::REMOTE_PENDING);
    let q = d.reply.internal.unwrap();
    let p = d.reply.external.unwrap();
    assert_eq!((q.port() % 2, p.port() % 2), (0, 0), "even ports");
    assert_eq!(gw.b.ports_in_use(), (2, 2));
    let census = |gw: &Gw| {
        gw.b.census()
            .labelled()
            .filter(|c| c.2 > 0)
            .collect::<Vec<_>>()
    };
    assert_eq!(census(&gw), vec![("half_bound", "rtp_pair", 1)]);
    let two = req(7, 42, sa(CLIENT, 5000), Remote::Exact(source()), pair_flags);
    let d = gw.bind(A, two, 1);
    assert_eq!(code(&d), ReplyCode::Ok);
    assert_eq!(census(&gw), vec![("confirmed", "rtp_pair", 1)]);
    let free = gw.b.free_ports();
    let free_on = |side: &str, address: IpAddr| {
        free.iter()
            .find(|f| f.side == side && f.address == address)
            .map(|f| f.free)
    };
    assert_eq!(
        free_on("internal", INTERNAL_V4),
        Some(98),
        "100 less the pair"
    );
    assert_eq!(free_on("external", EXTERNAL_V4), Some(98));
    assert_eq!(free_on("external", EXTERNAL_V6), Some(100));
    let plus = |a: SocketAddr| sa(a.ip(), a.port() + 1);
    let even_entry = KernelEntry {
        remote: RemoteMatch::Exact(source()),
        external: p,
        internal: q,
        client: sa(CLIENT, 5000),
        aid: 42,
        flags: pair_flags,
    };
    let odd_entry = KernelEntry {
        remote: RemoteMatch::Exact(plus(source())),
        external: plus(p),
        internal: plus(q),
        client: sa(CLIENT, 5001),
        ..even_entry
    };
    assert_eq!(
        d.actions,
        vec![Action::Install(even_entry), Action::Install(odd_entry)]
    );
    let d = gw.release(A, 42, 2);
    assert_eq!(removes(&d.actions), vec![even_entry, odd_entry]);
    assert_eq!(gw.b.ports_in_use(), (0, 0));
    assert_eq!(census(&gw), vec![]);
}

#[test]
fn rtp_pair_exhaustion_gets_16_while_singles_still_fit() {
    let mut gw = Gw::with(Config {
        external_ports: PortRange::new(30_000, 30_003),
        ..test_config()
    });
    let pair = |tid| {
        req(
            tid,
            0,
            sa(CLIENT, 5000),
            Remote::Unspecified(Family::V4),
            RSU | flags::RTP_PAIR,
        )
    };
    assert_eq!(code(&gw.bind(A, step1(1), 0)), ReplyCode::Ok); // splits one slot
    assert_eq!(code(&gw.bind(A, step1(2), 0)), ReplyCode::Ok); // fills the same slot
    assert_eq!(code(&gw.bind(A, pair(3), 0)), ReplyCode::Ok);
    let over = gw.bind(A, pair(4), 0);
    assert_eq!(code(&over), ReplyCode::PortPairUnavailable);
    assert_eq!(gw.b.ports_in_use(), (4, 4));
    gw.release(A, 42, 1);
    // One port free but no aligned pair: still 16; a single fits.
    assert_eq!(
        code(&gw.bind(A, pair(4), 1)),
        ReplyCode::PortPairUnavailable
    );
    assert_eq!(code(&gw.bind(A, step1(5), 1)), ReplyCode::Ok);
    assert_eq!(code(&gw.bind(A, step1(6), 1)), ReplyCode::GeneralFailure);
}

#[test]
fn rtp_pair_with_port_65535_gets_13() {
    let mut gw = Gw::new();
    let top = req(
        7,
        0,
        sa(CLIENT, 65_535),
        Remote::Unspecified(Family::V4),
        RSU | flags::RTP_PAIR,
    );
    assert_eq!(
        gw.bind(A, top, 0).reply.error,
        Some(BindError::PairPortOverflow)
    );
    let latch = req(
        7,
        0,
        sa(CLIENT, 0),
        Remote::Unspecified(Family::V4),
        RSU | flags::RTP_PAIR,
    );
    gw.bind(A, latch, 0);
    let remote_top = req(
        7,
        42,
        sa(CLIENT, 0),
        Remote::Exact(sa(source().ip(), 65_535)),
        RSU | flags::RTP_PAIR,
    );
    assert_eq!(
        gw.bind(A, remote_top, 1).reply.error,
        Some(BindError::PairPortOverflow)
    );
    let fill_top = req(
        7,
        42,
        sa(CLIENT, 65_535),
        Remote::Exact(source()),
        RSU | flags::RTP_PAIR,
    );
    assert_eq!(
        gw.bind(A, fill_top, 1).reply.error,
        Some(BindError::PairPortOverflow)
    );
    let ok = req(
        7,
        42,
        sa(CLIENT, 0),
        Remote::Exact(source()),
        RSU | flags::RTP_PAIR,
    );
    let d = gw.bind(A, ok, 1);
    assert_eq!(code(&d), ReplyCode::Ok);
    let Action::Install(rtcp) = d.actions[1] else {
        panic!()
    };
    assert_eq!(
        rtcp.client.port(),
        0,
        "an unlatched client port stays unlatched"
    );
}

#[test]
fn external_address_is_the_clients_own_and_spill_is_opt_in() {
    let ext2 = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 11));
    let ext3 = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 12));
    let config = Config {
        external_ips: vec![EXTERNAL_V4, ext2, ext3, EXTERNAL_V6],
        internal_ports: PortRange::new(40_000, 40_999),
        external_ports: PortRange::new(30_000, 30_009),
        ..test_config()
    };
    let mine = config.external_ip_for(CLIENT, Family::V4).unwrap();
    assert_eq!(
        config.external_ip_for(CLIENT, Family::V4),
        Some(mine),
        "stable"
    );
    assert_eq!(
        config.external_ip_for(CLIENT, Family::V6),
        Some(EXTERNAL_V6)
    );
    let mut gw = Gw::with(config.clone());
    for tid in 1..=10 {
        let d = gw.bind(A, open(tid, source()), 0);
        assert_eq!(d.reply.external.unwrap().ip(), mine);
    }
    assert_eq!(
        code(&gw.bind(A, open(11, source()), 0)),
        ReplyCode::GeneralFailure
    );
    let mut gw = Gw::with(Config {
        spill_to_other_external_ips: true,
        ..config
    });
    for tid in 1..=30 {
        assert_eq!(
            code(&gw.bind(A, open(tid, source()), 0)),
            ReplyCode::Ok,
            "{tid}"
        );
    }
    assert_eq!(
        code(&gw.bind(A, open(31, source()), 0)),
        ReplyCode::GeneralFailure
    );
    assert_eq!(gw.b.ports_in_use(), (30, 30));
}

// ---- AIDs ----

#[test]
fn aids_are_non_zero_unique_and_draws_are_bounded() {
    let mut draws = vec![0, 42, 42, 0, 43, 42, 44].into_iter();
    let mut b = Bindings::new(test_config(), move || draws.next().unwrap_or(0)).unwrap();
    let now = Instant::now();
    let a1 = b.on_bind(A, CLIENT, None, step1(1), now);
    let a2 = b.on_bind(A, CLIENT, None, step1(2), now);
    assert_eq!((a1.reply.aid, a2.reply.aid), (42, 43));
    // 42 expires into a tombstone; its AID is not handed out again while the tombstone exists.
    b.on_timeout(now + Duration::from_secs(30));
    let a3 = b.on_bind(A, CLIENT, None, step1(3), now + Duration::from_secs(30));
    assert_eq!(a3.reply.aid, 44);
    // The source is dry (only zeros): 01 after a bounded number of draws, nothing reserved.
    let before = b.ports_in_use();
    let dry = b.on_bind(A, CLIENT, None, step1(4), now + Duration::from_secs(30));
    assert_eq!(
        (dry.reply.code, dry.reply.error),
        (ReplyCode::GeneralFailure, Some(BindError::AidsExhausted))
    );
    assert_eq!(b.ports_in_use(), before);
    b.check_invariants();
}

#[test]
fn hash_aids_drive_the_machine() {
    let mut b = Bindings::new(test_config(), HashAids::new()).unwrap();
    let now = Instant::now();
    let d = b.on_bind(A, CLIENT, None, step1(1), now);
    assert_eq!(d.reply.code, ReplyCode::Ok);
    assert_ne!(d.reply.aid, 0);
    assert!(format!("{b:?}").contains("live: 1"));
}

// ---- Config ----

#[test]
fn config_validation_names_the_key() {
    let ok = test_config();
    assert_eq!(ok.validate(), Ok(()));
    assert_eq!(
        Config::default().validate(),
        Err(ConfigError::NoAddress("internal_ips"))
    );
    let bad = [
        Config {
            pending_timeout: Duration::from_secs(4),
            ..ok.clone()
        },
        Config {
            pending_timeout: Duration::from_secs(301),
            ..ok.clone()
        },
        Config {
            idle_timeout: Duration::ZERO,
            ..ok.clone()
        },
        Config {
            internal_ports: PortRange::new(0, 10),
            ..ok.clone()
        },
        Config {
            external_ports: PortRange::new(10, 9),
            ..ok.clone()
        },
        Config {
            external_ips: vec![],
            ..ok.clone()
        },
        Config {
            external_ips: vec![EXTERNAL_V4, EXTERNAL_V4],
            ..ok.clone()
        },
        Config {
            internal_ips: vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)],
            ..ok.clone()
        },
        Config {
            internal_ips: vec![EXTERNAL_V4],
            external_ports: PortRange::new(40_050, 40_060),
            ..ok.clone()
        },
    ];
    for config in bad {
        let error = config.validate().unwrap_err();
        assert!(Bindings::new(config, counting_aids()).is_err());
        assert!(error.to_string().contains('_'), "names a key: {error}");
    }
    // The same address inside and outside works with disjoint ranges.
    let shared = Config {
        internal_ips: vec![EXTERNAL_V4],
        ..ok.clone()
    };
    assert_eq!(shared.validate(), Ok(()));
    assert_eq!(
        PENDING_TIMEOUT_MIN..=PENDING_TIMEOUT_MAX,
        Duration::from_secs(5)..=Duration::from_mins(5)
    );
    // A REMOTE in a forbidden network is refused, also written IPv4-mapped.
    let mut config = ok.clone();
    config.forbidden_remotes = vec![
        "2001:db8::/32".parse().unwrap(),
        "192.0.2.0/24".parse().unwrap(),
    ];
    assert!(!config.remote_allowed(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 9, 0, 0, 0, 0, 1))));
    assert!(!config.remote_allowed("::ffff:192.0.2.7".parse().unwrap()));
    assert!(config.remote_allowed("203.0.113.77".parse().unwrap()));
    assert!(!Config::default().remote_allowed("::ffff:127.0.0.1".parse().unwrap()));
}

#[test]
fn config_defaults_follow_the_protocol_notes() {
    // The relay ranges lie below Linux's default ephemeral ports (32768-60999), so the
    // kernel never hands one of them to another socket, and they do not overlap each other.
    let d = Config::default();
    assert!(d.external_ports.last < 32_768 && d.internal_ports.last < 32_768);
    assert!(d.external_ports.last < d.internal_ports.first);
    assert!(d.external_ports.len() >= 8192 && d.internal_ports.len() >= 8192);
    assert_eq!(
        (d.pending_timeout, d.idle_timeout),
        (Duration::from_secs(30), Duration::from_mins(5))
    );
    assert!(!d.allow_listen && !d.allow_port_zero_remote && !d.spill_to_other_external_ips);
}

#[test]
fn a_hundred_thousand_live_bindings_over_several_external_addresses() {
    let ext = |d| IpAddr::V4(Ipv4Addr::new(203, 0, 113, d));
    let int = |d| IpAddr::V4(Ipv4Addr::new(198, 51, 100, d));
    let mut b = Bindings::new(
        Config {
            internal_ips: vec![int(1), int(2)],
            external_ips: vec![ext(1), ext(2), ext(3)],
            internal_ports: PortRange::new(1024, 65_535),
            external_ports: PortRange::new(1024, 65_535),
            max_bindings: 100_000,
            max_half_bound_per_connection: 100_000,
            ..test_config()
        },
        counting_aids(),
    )
    .unwrap();
    let now = Instant::now();
    let remote = sa(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 6000);
    let mut externals = std::collections::HashSet::new();
    for n in 0..100_000_u32 {
        // 250 clients, 400 bindings each, on one connection per client.
        let client = IpAddr::V4(Ipv4Addr::new(10, 1, (n % 250) as u8, 1));
        let conn = ConnId(u64::from(n % 250));
        let tid = u16::try_from(n / 250 + 1).unwrap();
        let request = if n % 2 == 0 {
            req(
                tid,
                0,
                sa(client, 5000),
                Remote::Unspecified(Family::V4),
                RSU,
            )
        } else {
            req(tid, 0, sa(client, 5000), Remote::Exact(remote), RSU)
        };
        let d = b.on_bind(conn, client, None, request, now);
        assert_eq!(d.reply.code, ReplyCode::Ok, "binding {n}");
        externals.insert(d.reply.external.unwrap().ip());
    }
    assert_eq!(b.len(), 100_000);
    assert_eq!(externals.len(), 3);
    assert_eq!(b.ports_in_use(), (100_000, 100_000));
    let over = b.on_bind(ConnId(0), int(9), None, open(0, remote), now);
    assert_eq!(
        over.reply.code,
        ReplyCode::NotAllowed,
        "LOCAL is checked before caps"
    );
    let expired = b.on_timeout(now + Duration::from_secs(30));
    assert_eq!(expired.len(), 50_000);
    for conn in 0..250 {
        b.on_connection_closed(ConnId(conn));
    }
    assert_eq!(b.ports_in_use(), (0, 0));
    assert!(b.is_empty() && b.tombstones() == 0);
}

#[test]
fn live_binding_cap_per_connection_counts_opens_and_confirmed_bindings() {
    let mut gw = Gw::with(Config {
        max_bindings_per_connection: 3,
        ..test_config()
    });
    let first = gw.bind(A, step1(1), 0);
    assert_eq!(code(&first), ReplyCode::Ok);
    gw.bind(A, step2(1, first.reply.aid), 0);
    assert_eq!(code(&gw.bind(A, open(2, source()), 0)), ReplyCode::Ok);
    assert_eq!(code(&gw.bind(A, step1(3), 0)), ReplyCode::Ok);
    let (in_use, _) = gw.b.ports_in_use();
    let over = gw.bind(A, open(4, source()), 0);
    assert_eq!(over.reply.error, Some(BindError::ConnectionCap));
    assert_eq!(code(&over), ReplyCode::GeneralFailure);
    assert!(over.actions.is_empty());
    assert_eq!(gw.b.ports_in_use().0, in_use, "a refusal reserves nothing");
    // Another connection binds normally meanwhile.
    assert_eq!(code(&gw.bind(B, open(1, source()), 0)), ReplyCode::Ok);
    // A release makes room on the capped connection.
    gw.release(A, first.reply.aid, 1);
    assert_eq!(code(&gw.bind(A, open(4, source()), 1)), ReplyCode::Ok);
}

#[test]
fn live_binding_cap_per_user_and_per_anonymous_address() {
    let mut gw = Gw::with(Config {
        max_bindings_per_user: 2,
        ..test_config()
    });
    let alice = Some("alice");
    for conn in [ConnId(1), ConnId(2)] {
        assert_eq!(
            code(&gw.bind_as(conn, CLIENT, alice, open(1, source()), 0)),
            ReplyCode::Ok
        );
    }
    let over = gw.bind_as(ConnId(3), CLIENT, alice, open(1, source()), 0);
    assert_eq!(over.reply.error, Some(BindError::UserCap));
    assert_eq!(code(&over), ReplyCode::GeneralFailure);
    // bob, at the same time, from the same address: his own count.
    assert_eq!(
        code(&gw.bind_as(ConnId(3), CLIENT, Some("bob"), open(1, source()), 0)),
        ReplyCode::Ok
    );
    // Anonymous clients count by address: two connections from one host share the cap...
    for conn in [ConnId(4), ConnId(5)] {
        assert_eq!(
            code(&gw.bind_as(conn, CLIENT_V6, None, open_from(CLIENT_V6, 1), 0)),
            ReplyCode::Ok
        );
    }
    let over = gw.bind_as(ConnId(6), CLIENT_V6, None, open_from(CLIENT_V6, 1), 0);
    assert_eq!(over.reply.error, Some(BindError::UserCap));
    // ...while another anonymous host binds normally.
    assert_eq!(
        code(&gw.bind_as(ConnId(7), CLIENT, None, open(1, source()), 0)),
        ReplyCode::Ok
    );
    // Closing one of alice's connections gives her room again.
    gw.b.on_connection_closed(ConnId(1));
    assert_eq!(
        code(&gw.bind_as(ConnId(3), CLIENT, alice, open(2, source()), 0)),
        ReplyCode::Ok
    );
}

/// A one-step Open from `client` (port 5000) to the IPv6 source.
fn open_from(client: IpAddr, tid: u16) -> BindRequest {
    req(
        tid,
        0,
        SocketAddr::new(client, 5000),
        Remote::Exact("[2001:db8:2::2]:6000".parse().unwrap()),
        RSU,
    )
}
