//! The client library (`gateway_client`) against the real server, in-process on loopback:
//! CONNECT (by IP and by name), RFC 1929, typed refusals and timeouts, RFC 1928 UDP ASSOCIATE,
//! and the enhanced mode's socket calls (two-step Open, Listen, one-step Open, RTP pair, expiry,
//! release, session close). The client is on 127.0.0.1, remotes on 127.0.0.2, the relays on
//! 127.0.0.1. Every await is bounded. The harness is in `common/`.

mod common;

use std::{
    future::Future as _,
    net::{Ipv4Addr, SocketAddr},
    task::Poll,
    time::Duration,
};

use common::{
    gateway::{CLIENT_LIBRARY_PORTS, Gateway, new_socket, resolver, users},
    io::{IO_TIMEOUT, assert_silent, eventually, eventually_for, recv_udp, send_udp, within},
    peers::{LOCALHOST, REMOTE_HOST, fake_nameserver, tcp_echo, udp, udp_pair},
};
use gateway::{binding::Config, server::auth::Users};
use gateway_client::{Address, BindingError, Client, ClientError, Family, ReplyCode, Timeouts};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
    sync::oneshot,
};

/// A gateway without the enhanced mode: anonymous access unless `users` is given, `nameserver`
/// (if any) resolving names.
async fn start(users: Option<Users>, nameserver: Option<SocketAddr>) -> Gateway {
    let names = resolver(&Vec::from_iter(nameserver));
    Gateway::start(|services| {
        services.access.get_mut().allow_anonymous = users.is_none();
        services.access.get_mut().users = users;
        services.resolver = names;
    })
    .await
}

/// An anonymous gateway with the enhanced mode on the next block of this binary's relay ports,
/// its binding configuration changed by `tweak`.
async fn start_enhanced(tweak: impl FnOnce(&mut Config)) -> Gateway {
    Gateway::start_enhanced(&CLIENT_LIBRARY_PORTS, tweak, |_| {}).await
}

// ---- SOCKS5: CONNECT, authentication, refusals, timeouts -----------------------------------

#[tokio::test]
async fn connect_by_ip_and_by_name_reaches_the_echo() {
    let echo = tcp_echo(LOCALHOST).await.addr;
    let dns = fake_nameserver(vec![("echo.test", Ipv4Addr::LOCALHOST)]).await;
    let gateway = start(None, Some(dns)).await;
    let targets = [
        Address::Ip(echo),
        Address::Domain("echo.test".into(), echo.port()),
    ];
    for target in targets {
        let client = gateway.client().await;
        assert_eq!(client.method(), gateway_client::Method::NoAuth);
        let (mut stream, bound) = within("CONNECT", client.tcp_connect(target.clone()))
            .await
            .unwrap();
        let Address::Ip(bound) = bound else {
            panic!("BND is an IP address")
        };
        assert_eq!(bound.ip(), LOCALHOST, "{target}");
        within("write", stream.write_all(b"ping through the gateway"))
            .await
            .unwrap();
        let mut echoed = [0u8; 24];
        within("read", stream.read_exact(&mut echoed))
            .await
            .unwrap();
        assert_eq!(&echoed, b"ping through the gateway");
    }
    // A name the nameserver does not know: host unreachable.
    let client = gateway.client().await;
    let unknown = Address::Domain("nowhere.test".into(), 80);
    assert!(matches!(
        within("CONNECT", client.tcp_connect(unknown)).await,
        Err(ClientError::Refused(ReplyCode::HostUnreachable))
    ));
}

#[tokio::test]
async fn user_pass_good_bad_and_missing() {
    let gateway = start(Some(users("alice", "secret")), None).await;
    let echo = tcp_echo(LOCALHOST).await.addr;
    let good = Some(("alice".to_owned(), "secret".to_owned()));
    let client = within("connect", Client::connect(gateway.addr, good))
        .await
        .unwrap();
    assert_eq!(client.method(), gateway_client::Method::UserPass);
    within("CONNECT", client.tcp_connect(echo)).await.unwrap();

    let bad = Some(("alice".to_owned(), "wrong".to_owned()));
    assert!(matches!(
        within("connect", Client::connect(gateway.addr, bad)).await,
        Err(ClientError::BadCredentials(_))
    ));
    assert!(matches!(
        within("connect", Client::connect(gateway.addr, None)).await,
        Err(ClientError::NoAcceptableMethod)
    ));
    let too_long = Some(("alice".to_owned(), "x".repeat(256)));
    assert!(matches!(
        within("connect", Client::connect(gateway.addr, too_long)).await,
        Err(ClientError::InvalidCredentials(_))
    ));
}

#[tokio::test]
async fn refusals_are_typed() {
    let gateway = start(None, None).await;
    // Nothing listens on a port we just freed: connection refused.
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let client = gateway.client().await;
    assert!(matches!(
        within("CONNECT", client.tcp_connect(closed)).await,
        Err(ClientError::Refused(ReplyCode::ConnectionRefused))
    ));
    // This gateway does not serve the enhanced mode: 07.
    let client = gateway.client().await;
    assert!(matches!(
        within("enter", client.enhanced()).await,
        Err(ClientError::Refused(ReplyCode::CommandNotSupported))
    ));
}

#[tokio::test]
async fn a_silent_gateway_times_out() {
    let silent = within("listen", TcpListener::bind("127.0.0.1:0"))
        .await
        .unwrap();
    let addr = silent.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            held.push(silent.accept().await.unwrap());
        }
    });
    let timeouts = Timeouts {
        handshake: Duration::from_millis(200),
        ..Timeouts::default()
    };
    let result = within("connect", Client::connect_with(addr, None, timeouts)).await;
    assert!(
        matches!(result, Err(ClientError::Timeout { after, .. }) if after == timeouts.handshake),
        "{result:?}"
    );
}

// ---- RFC 1928 UDP ASSOCIATE -----------------------------------------------------------------

#[tokio::test]
async fn udp_associate_round_trip() {
    let gateway = start(None, None).await;
    let echo = udp(LOCALHOST).await;
    let echo_addr = echo.local_addr().unwrap();
    let client = gateway.client().await;
    let association = within("UDP ASSOCIATE", client.udp_associate())
        .await
        .unwrap();
    assert_eq!(association.relay_addr().ip(), LOCALHOST);
    within("send", association.send_to(echo_addr, b"over udp"))
        .await
        .unwrap();
    let (payload, relayed_from) = recv_udp(&echo).await;
    assert_eq!(payload, b"over udp");
    send_udp(&echo, b"answer", relayed_from).await;
    let mut buf = [0u8; 1500];
    let (len, from) = within("recv", association.recv_from(&mut buf))
        .await
        .unwrap();
    assert_eq!(
        (&buf[..len], from),
        (&b"answer"[..], Address::Ip(echo_addr))
    );
}

// ---- the enhanced mode ----------------------------------------------------------------------

#[tokio::test]
async fn two_step_open_then_release() {
    let gateway = start_enhanced(|_| {}).await;
    let session = gateway.session().await;
    let socket = new_socket(&session).await;
    assert_eq!(socket.local_addr().unwrap().ip(), LOCALHOST);
    // bind() + getsockname(): step 1.
    let relays = within("bind", socket.bind()).await.unwrap();
    assert_eq!(socket.external_addr(), Some(relays.external));
    assert_ne!(relays.aid, 0);
    assert!(gateway.gate.entries().is_empty(), "step 1 admits nothing");

    // The remote sends to the external relay before step 2: nothing is delivered.
    let remote = udp(REMOTE_HOST).await;
    let remote_addr = remote.local_addr().unwrap();
    send_udp(&remote, b"too early", relays.external).await;
    assert_silent(socket.socket(), "before step 2").await;

    // connect(remote): step 2 Open, same relay addresses.
    let confirmed = within("connect", socket.connect(remote_addr))
        .await
        .unwrap();
    assert_eq!(confirmed, relays);
    assert_eq!(socket.peer_addr(), Some(Address::Ip(remote_addr)));
    // Connecting again to the same remote is a no-op; another remote is refused locally.
    within("connect again", socket.connect(remote_addr))
        .await
        .unwrap();
    let other: SocketAddr = "127.0.0.2:9".parse().unwrap();
    assert!(matches!(
        within("connect elsewhere", socket.connect(other)).await,
        Err(ClientError::OtherRemote { .. })
    ));

    send_udp(&remote, b"media", relays.external).await;
    let mut buf = [0u8; 1500];
    let (len, from) = within("recv", socket.recv_from(&mut buf)).await.unwrap();
    assert_eq!(
        (&buf[..len], from),
        (&b"media"[..], Address::Ip(remote_addr))
    );
    within("send", socket.send(b"report")).await.unwrap();
    assert_eq!(
        recv_udp(&remote).await,
        (b"report".to_vec(), relays.external)
    );

    within("release", socket.release()).await.unwrap();
    gateway.all_released().await;
    assert!(matches!(
        within("send after release", socket.send(b"x")).await,
        Err(ClientError::WrongState { .. })
    ));
    send_udp(&remote, b"after release", relays.external).await;
    assert_silent(socket.socket(), "after release").await;
}

#[tokio::test]
async fn listen_where_allowed_and_refused_where_not() {
    let refusing = start_enhanced(|_| {}).await;
    let session = refusing.session().await;
    let socket = new_socket(&session).await;
    within("bind", socket.bind()).await.unwrap();
    assert!(matches!(
        within("listen", socket.listen()).await,
        Err(ClientError::Binding(BindingError::NotAllowed))
    ));

    let gateway = start_enhanced(|config| config.allow_listen = true).await;
    let session = gateway.session().await;
    let socket = new_socket(&session).await;
    let relays = within("bind", socket.bind()).await.unwrap();
    // recv() on a bound, unconnected socket is step 2 Listen.
    let (first, second) = (udp(REMOTE_HOST).await, udp(REMOTE_HOST).await);
    let receiving = async {
        let mut buf = [0u8; 1500];
        let mut got = Vec::new();
        for _ in 0..2 {
            let (len, from) = socket.recv_from(&mut buf).await.unwrap();
            got.push((buf[..len].to_vec(), from));
        }
        got
    };
    let sending = async {
        // Wait until the Listen is confirmed, then send from two remotes.
        eventually("the Listen is confirmed", || socket.is_listening()).await;
        send_udp(&first, b"one", relays.external).await;
        send_udp(&second, b"two", relays.external).await;
    };
    let (mut got, ()) = within("listen and receive", async {
        tokio::join!(receiving, sending)
    })
    .await;
    got.sort_by(|a, b| a.0.cmp(&b.0));
    let first_addr = first.local_addr().unwrap();
    let second_addr = second.local_addr().unwrap();
    assert_eq!(
        got,
        vec![
            (b"one".to_vec(), Address::Ip(first_addr)),
            (b"two".to_vec(), Address::Ip(second_addr)),
        ]
    );
    // send_to on a Listen binding names the remote in the header.
    within("send_to", socket.send_to(second_addr, b"back to two"))
        .await
        .unwrap();
    assert_eq!(
        recv_udp(&second).await,
        (b"back to two".to_vec(), relays.external)
    );
}

#[tokio::test]
async fn send_to_on_an_unbound_socket_is_a_one_step_open() {
    let gateway = start_enhanced(|_| {}).await;
    let session = gateway.session().await;
    let socket = new_socket(&session).await;
    let remote = udp(REMOTE_HOST).await;
    let remote_addr = remote.local_addr().unwrap();
    within("send_to", socket.send_to(remote_addr, b"first"))
        .await
        .unwrap();
    let relays = socket.relay_addrs().unwrap();
    assert_eq!(
        recv_udp(&remote).await,
        (b"first".to_vec(), relays.external)
    );
    send_udp(&remote, b"reply", relays.external).await;
    let mut buf = [0u8; 1500];
    let len = within("recv", socket.recv(&mut buf)).await.unwrap();
    assert_eq!(&buf[..len], b"reply");
    // Dropping the socket releases the binding, like close().
    drop(socket);
    gateway.all_released().await;
    assert!(!session.is_closed());
}

#[tokio::test]
async fn rtp_pair_carries_rtp_and_rtcp() {
    let gateway = start_enhanced(|_| {}).await;
    let session = gateway.session().await;
    let pair = within("bind an RTP pair", session.bind_rtp_pair(Family::V4))
        .await
        .unwrap();
    let l = pair.rtp().local_addr().unwrap().port();
    assert_eq!(l % 2, 0);
    assert_eq!(pair.rtcp().local_addr().unwrap().port(), l + 1);
    let (p, p1) = pair.external_addrs();
    assert_eq!((p.port() % 2, p1.port()), (0, p.port() + 1));

    let (sender, reporter) = udp_pair(REMOTE_HOST).await;
    let source = sender.local_addr().unwrap();
    within("connect", pair.connect(source)).await.unwrap();

    send_udp(&sender, b"rtp", p).await;
    send_udp(&reporter, b"rtcp sr", p1).await;
    let mut buf = [0u8; 1500];
    let len = within("RTP", pair.rtp().recv(&mut buf)).await.unwrap();
    assert_eq!(&buf[..len], b"rtp");
    let (len, from) = within("RTCP", pair.rtcp().recv_from(&mut buf))
        .await
        .unwrap();
    let reporter_addr = reporter.local_addr().unwrap();
    assert_eq!(
        (&buf[..len], from),
        (&b"rtcp sr"[..], Address::Ip(reporter_addr))
    );
    // The receiver report leaves from P+1 to s+1.
    within("RTCP RR", pair.rtcp().send(b"rtcp rr"))
        .await
        .unwrap();
    assert_eq!(recv_udp(&reporter).await, (b"rtcp rr".to_vec(), p1));
    within("release", pair.release()).await.unwrap();
    gateway.all_released().await;
}

#[tokio::test]
async fn a_late_step_two_gets_expired() {
    let gateway = start_enhanced(|config| {
        config.pending_timeout = gateway::binding::PENDING_TIMEOUT_MIN;
    })
    .await;
    let session = gateway.session().await;
    let socket = new_socket(&session).await;
    within("bind", socket.bind()).await.unwrap();
    let remote: SocketAddr = "127.0.0.2:6000".parse().unwrap();
    assert_eq!(gateway.mode().live_bindings(), 1);
    // The gateway expires the half-bound binding after the pending timeout.
    eventually_for(
        "the half-bound binding expires",
        gateway::binding::PENDING_TIMEOUT_MIN + IO_TIMEOUT,
        || gateway.mode().live_bindings() == 0,
    )
    .await;
    assert!(matches!(
        within("a late connect", socket.connect(remote)).await,
        Err(ClientError::Binding(BindingError::Expired))
    ));
    // The session stays usable, and releasing the expired binding clears its tombstone.
    within("release", socket.release()).await.unwrap();
    let again = new_socket(&session).await;
    within("bind", again.bind()).await.unwrap();
    within("connect", again.connect(remote)).await.unwrap();
}

#[tokio::test]
async fn closing_the_session_releases_everything() {
    let gateway = start_enhanced(|_| {}).await;
    let session = gateway.session().await;
    let open = new_socket(&session).await;
    within("bind", open.bind()).await.unwrap();
    let remote: SocketAddr = "127.0.0.2:7000".parse().unwrap();
    within("connect", open.connect(remote)).await.unwrap();
    let half = new_socket(&session).await;
    within("bind", half.bind()).await.unwrap();
    assert_eq!(gateway.mode().live_bindings(), 2);

    let mut buf = [0u8; 64];
    let mut receiving = std::pin::pin!(open.recv(&mut buf));
    // The recv is waiting (its first poll is pending) when the session closes.
    let waiting =
        std::future::poll_fn(|cx| Poll::Ready(receiving.as_mut().poll(cx).is_pending())).await;
    assert!(waiting, "recv returned before the session closed");
    session.close();
    let received = within("recv while the session closes", receiving).await;
    assert!(
        matches!(received, Err(ClientError::SessionClosed(_))),
        "{received:?}"
    );
    gateway.all_released().await;
    assert!(session.is_closed());
    assert!(matches!(
        within("release on a closed session", half.release()).await,
        Err(ClientError::SessionClosed(_))
    ));
}

/// A gateway that enters the enhanced mode and then answers no control request in time.
#[tokio::test]
async fn a_step_one_without_answer_is_never_resent_and_a_late_success_is_released() {
    let listener = within("listen", TcpListener::bind("127.0.0.1:0"))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (seen_tx, seen) = oneshot::channel();
    let (gave_up_tx, gave_up) = oneshot::channel::<()>();
    tokio::spawn(within("the fake gateway", async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut greeting = [0u8; 3];
        stream.read_exact(&mut greeting).await.unwrap();
        stream.write_all(&[5, 0]).await.unwrap();
        let mut entry = [0u8; 10];
        stream.read_exact(&mut entry).await.unwrap();
        stream
            .write_all(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0])
            .await
            .unwrap();
        // Step 1 (IPv4 LOCAL and REMOTE: 27 octets); no answer until the client gave up.
        let mut step1 = [0u8; 27];
        stream.read_exact(&mut step1).await.unwrap();
        gave_up.await.unwrap();
        // The late success: AID 42, relays 127.0.0.1:40000 / 127.0.0.1:30000.
        let mut reply = step1;
        reply[0] = 0x02;
        reply[3] = 0x00;
        reply[9..13].copy_from_slice(&42u32.to_be_bytes());
        reply[13..27].copy_from_slice(&[1, 127, 0, 0, 1, 0x9C, 0x40, 1, 127, 0, 0, 1, 0x75, 0x30]);
        stream.write_all(&reply).await.unwrap();
        // What comes next must be a RELEASE of AID 42, not a repeated step 1.
        let mut next = [0u8; 27];
        stream.read_exact(&mut next).await.unwrap();
        let _ = seen_tx.send((step1, next));
    }));
    let timeouts = Timeouts {
        control: Duration::from_millis(200),
        ..Timeouts::default()
    };
    let client = within("connect", Client::connect_with(addr, None, timeouts))
        .await
        .unwrap();
    let session = within("enter", client.enhanced()).await.unwrap();
    let socket = new_socket(&session).await;
    assert!(matches!(
        within("bind", socket.bind()).await,
        Err(ClientError::Timeout { .. })
    ));
    // The client gave up: only now does the gateway answer.
    gave_up_tx.send(()).unwrap();
    let (step1, next) = within("the gateway sees the RELEASE", seen).await.unwrap();
    assert_eq!((step1[0], step1[3]), (0x01, 0x05), "a UDP BIND request");
    assert_eq!(
        (next[0], next[3]),
        (0x01, 0x06),
        "a UDP RELEASE, not a second BIND"
    );
    assert_eq!(&next[7..9], &step1[7..9], "with the step-1 TID");
    assert_eq!(&next[9..13], &42u32.to_be_bytes(), "and the late AID");
}

#[tokio::test]
async fn a_connection_at_its_binding_cap_gets_01_and_others_bind_meanwhile() {
    let gateway = start_enhanced(|config| config.max_bindings_per_connection = 2).await;
    let session = gateway.session().await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let socket = new_socket(&session).await;
        within("bind", socket.bind()).await.unwrap();
        held.push(socket);
    }
    let over = new_socket(&session).await;
    assert!(matches!(
        within("bind over the cap", over.bind()).await,
        Err(ClientError::Binding(BindingError::GeneralFailure))
    ));
    assert_eq!(
        gateway.mode().caps_hit(),
        [1, 0, 0, 0],
        "counted as the connection cap"
    );
    // Another connection binds normally at the same time.
    let other = gateway.session().await;
    let socket = new_socket(&other).await;
    within("bind on another connection", socket.bind())
        .await
        .unwrap();
    // A release on the capped connection makes room.
    within("release", held.pop().unwrap().release())
        .await
        .unwrap();
    let again = new_socket(&session).await;
    within("bind after a release", again.bind()).await.unwrap();
}

#[tokio::test]
async fn a_user_at_their_binding_cap_gets_01_on_every_connection_and_others_bind() {
    let both = format!(
        "{}\n{}\n",
        gateway::server::auth::hash_line("alice", b"a-secret").unwrap(),
        gateway::server::auth::hash_line("bob", b"b-secret").unwrap()
    );
    let gateway = Gateway::start_enhanced(
        &CLIENT_LIBRARY_PORTS,
        |config| config.max_bindings_per_user = 2,
        |services| {
            services.access.get_mut().allow_anonymous = false;
            services.access.get_mut().users = Some(Users::parse(&both).unwrap());
        },
    )
    .await;
    let session_of = |user: &str, password: &str| {
        let credentials = Some((user.to_owned(), password.to_owned()));
        let proxy = gateway.addr;
        async move {
            within("log in", Client::connect(proxy, credentials))
                .await
                .unwrap()
                .enhanced()
                .await
                .unwrap()
        }
    };
    // Alice's two bindings on two connections fill her cap.
    let (first, second) = (
        session_of("alice", "a-secret").await,
        session_of("alice", "a-secret").await,
    );
    let mut held = Vec::new();
    for session in [&first, &second] {
        let socket = new_socket(session).await;
        within("bind", socket.bind()).await.unwrap();
        held.push(socket);
    }
    let third = session_of("alice", "a-secret").await;
    for session in [&first, &second, &third] {
        let over = new_socket(session).await;
        assert!(matches!(
            within("bind over the user cap", over.bind()).await,
            Err(ClientError::Binding(BindingError::GeneralFailure))
        ));
    }
    assert_eq!(
        gateway.mode().caps_hit(),
        [0, 3, 0, 0],
        "counted as the user cap"
    );
    // Bob binds normally meanwhile.
    let bob = session_of("bob", "b-secret").await;
    let socket = new_socket(&bob).await;
    within("bob binds", socket.bind()).await.unwrap();
}

#[tokio::test]
async fn a_policy_reload_applies_to_live_listen_bindings() {
    let gateway = start_enhanced(|config| config.allow_listen = true).await;
    let session = gateway.session().await;
    let socket = new_socket(&session).await;
    let relays = within("bind", socket.bind()).await.unwrap();
    within("listen", socket.listen()).await.unwrap();
    let remote = udp(REMOTE_HOST).await;
    send_udp(&remote, b"before", relays.external).await;
    let mut buf = [0u8; 1500];
    let (len, _) = within("recv", socket.recv_from(&mut buf)).await.unwrap();
    assert_eq!(&buf[..len], b"before");
    // A SIGHUP (or an address change) now forbids the remote's host.
    gateway
        .mode()
        .set_forbidden_remotes(vec!["127.0.0.2/32".parse().unwrap()]);
    send_udp(&remote, b"after the reload", relays.external).await;
    assert_silent(socket.socket(), "a remote the policy now forbids").await;
}
