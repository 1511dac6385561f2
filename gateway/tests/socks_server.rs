//! In-process tests of the SOCKS5 server (test layer 2 of style.md): `server::run` on loopback
//! with a `MemoryGate`, spoken to in raw bytes. Handshake timeouts run on paused time; everything
//! else in real time, every wait bounded.

mod common;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use common::{
    gateway::{Gateway, resolver, users},
    io::{
        IO_TIMEOUT, eventually, eventually_for, read_exact, read_until_closed,
        read_until_closed_within, recv_udp, send, within, within_for,
    },
    peers::{LOCALHOST, REMOTE_HOST, fake_nameserver, tcp_counter, tcp_echo, udp_echo},
    socks::{
        auth_request, connect_anonymous, failure_reply, parse_udp, read_reply, request,
        request_domain, socks_connect, udp_datagram,
    },
};
use gateway::gate::GateEntry;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpStream, UdpSocket},
    time::Instant,
};

/// Another client host, or a remote host the policy denies.
const OTHER_HOST: IpAddr = REMOTE_HOST;
const CONNECT: u8 = 0x01;
const BIND: u8 = 0x02;
const UDP_ASSOCIATE: u8 = 0x03;

async fn anonymous_gateway() -> Gateway {
    Gateway::start(|_| {}).await
}

// ---- greeting -----------------------------------------------------------------------------

#[tokio::test]
async fn wrong_version_greeting_is_closed_without_a_reply() {
    let gateway = anonymous_gateway().await;
    // A SOCKS4 CONNECT: the server does not speak it and must not answer in SOCKS5.
    let mut stream = gateway.connect().await;
    send(&mut stream, &[0x04, 0x01, 0x00, 0x50, 127, 0, 0, 1, 0x00]).await;
    assert_eq!(read_until_closed(&mut stream).await, b"");
    // The version is judged on the first octet alone.
    let mut stream = gateway.connect().await;
    send(&mut stream, &[0x06]).await;
    assert_eq!(read_until_closed(&mut stream).await, b"");
}

#[tokio::test]
async fn zero_methods_greeting_is_closed_without_a_reply() {
    let gateway = anonymous_gateway().await;
    let mut stream = gateway.connect().await;
    send(&mut stream, &[0x05, 0x00]).await;
    assert_eq!(read_until_closed(&mut stream).await, b"");
}

#[tokio::test]
async fn no_acceptable_method_gets_ff_then_close() {
    let gateway = Gateway::start(|services| {
        services.access.get_mut().allow_anonymous = false;
        services.access.get_mut().users = Some(users("alice", "s3cret"));
    })
    .await;
    // Only "no authentication" offered, but the gateway requires a password.
    let mut stream = gateway.connect().await;
    send(&mut stream, &[0x05, 0x01, 0x00]).await;
    assert_eq!(read_until_closed(&mut stream).await, [0x05, 0xFF]);
    // Only private methods offered.
    let mut stream = gateway.connect().await;
    send(&mut stream, &[0x05, 0x02, 0x80, 0xFE]).await;
    assert_eq!(read_until_closed(&mut stream).await, [0x05, 0xFF]);
}

#[tokio::test]
async fn gssapi_is_never_selected() {
    let gateway =
        Gateway::start(|services| services.access.get_mut().users = Some(users("alice", "s3cret")))
            .await;
    let mut stream = gateway.connect().await;
    send(&mut stream, &[0x05, 0x01, 0x01]).await;
    assert_eq!(read_until_closed(&mut stream).await, [0x05, 0xFF]);
    // Offered beside an acceptable method, GSSAPI is passed over.
    let mut stream = gateway.connect().await;
    send(&mut stream, &[0x05, 0x02, 0x01, 0x00]).await;
    assert_eq!(read_exact(&mut stream, 2).await, [0x05, 0x00]);
}

#[tokio::test]
async fn username_password_is_preferred_when_users_are_configured() {
    let gateway =
        Gateway::start(|services| services.access.get_mut().users = Some(users("alice", "s3cret")))
            .await;
    let mut stream = gateway.connect().await;
    send(&mut stream, &[0x05, 0x02, 0x00, 0x02]).await;
    assert_eq!(read_exact(&mut stream, 2).await, [0x05, 0x02]);
}

// ---- requests -----------------------------------------------------------------------------

#[tokio::test]
async fn unknown_command_gets_07_then_close() {
    let gateway = anonymous_gateway().await;
    let mut stream = connect_anonymous(&gateway).await;
    send(&mut stream, &request(0x07, "127.0.0.1:80".parse().unwrap())).await;
    assert_eq!(read_until_closed(&mut stream).await, failure_reply(0x07));
}

#[tokio::test]
async fn unknown_address_type_gets_08_then_close() {
    let gateway = anonymous_gateway().await;
    let mut stream = connect_anonymous(&gateway).await;
    send(&mut stream, &[0x05, 0x01, 0x00, 0x08, 127, 0, 0, 1, 0, 80]).await;
    assert_eq!(read_until_closed(&mut stream).await, failure_reply(0x08));
}

#[tokio::test]
async fn nonzero_reserved_octet_gets_01_then_close() {
    let gateway = anonymous_gateway().await;
    let mut stream = connect_anonymous(&gateway).await;
    send(&mut stream, &[0x05, 0x01, 0x01, 0x01, 127, 0, 0, 1, 0, 80]).await;
    assert_eq!(read_until_closed(&mut stream).await, failure_reply(0x01));
}

#[tokio::test]
async fn truncated_messages_end_the_connection_task() {
    let gateway = Gateway::start(|services| {
        // One slot: a connection task that did not end would keep the next client out. A long
        // handshake timeout: the closes seen here are not timeouts.
        services.connections = gateway::server::limits::ConnectionLimits::new(1, 1);
        services.timeouts.handshake = Duration::from_mins(1);
        services.access.get_mut().users = Some(users("alice", "s3cret"));
    })
    .await;
    let mut request = vec![0x05, 0x01, 0x00];
    request.extend_from_slice(&common::socks::request(
        CONNECT,
        "127.0.0.1:80".parse().unwrap(),
    ));
    let mut with_auth = vec![0x05, 0x01, 0x02];
    with_auth.extend_from_slice(&auth_request("alice", "s3cret"));
    let cases: [(&[u8], &[u8]); 6] = [
        (&[0x05], b""),
        (&[0x05, 0x02, 0x00], b""),
        (&request[..5], &[0x05, 0x00]),
        (&request[..request.len() - 1], &[0x05, 0x00]),
        (&with_auth[..6], &[0x05, 0x02]),
        (&with_auth[..with_auth.len() - 2], &[0x05, 0x02]),
    ];
    for (sent, expected) in cases {
        for half_close in [true, false] {
            let mut stream = gateway.connect().await;
            send(&mut stream, sent).await;
            if half_close {
                stream.shutdown().await.unwrap();
                assert_eq!(
                    read_until_closed(&mut stream).await,
                    expected,
                    "after {sent:02x?}"
                );
            } else {
                if !expected.is_empty() {
                    assert_eq!(read_exact(&mut stream, expected.len()).await, expected);
                }
                drop(stream);
            }
            // The slot is free again (at once after a half-close, once the server saw the close
            // after a drop): a fresh client is served.
            eventually_served(&gateway).await;
        }
    }
}

#[tokio::test]
async fn request_dribbled_one_byte_at_a_time_still_works() {
    let echo = tcp_echo(LOCALHOST).await;
    let gateway = anonymous_gateway().await;
    let mut stream = gateway.connect().await;
    let greeting = [0x05, 0x01, 0x00];
    for byte in greeting {
        send(&mut stream, &[byte]).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(read_exact(&mut stream, 2).await, [0x05, 0x00]);
    for byte in request(CONNECT, echo.addr) {
        send(&mut stream, &[byte]).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (code, _) = read_reply(&mut stream).await;
    assert_eq!(code, 0x00);
    send(&mut stream, b"ping").await;
    assert_eq!(read_exact(&mut stream, 4).await, b"ping");
}

// ---- handshake timeout (paused time) ------------------------------------------------------
//
// With paused time the clock jumps to the next timer whenever the runtime waits for I/O, so
// these tests check "still open just before the timeout, closed no later than one second after
// it" rather than an exact instant.

const HANDSHAKE: Duration = Duration::from_secs(10);
/// One second before the handshake timeout.
const JUST_BEFORE: Duration = Duration::from_secs(9);

async fn assert_open_until_handshake_timeout(stream: &mut TcpStream, start: Instant) {
    let mut buf = [0u8; 16];
    assert!(
        tokio::time::timeout_at(start + JUST_BEFORE, stream.read(&mut buf))
            .await
            .is_err(),
        "closed before the handshake timeout"
    );
    assert_eq!(
        read_until_closed_within(stream, Duration::from_secs(2)).await,
        b""
    );
    let elapsed = start.elapsed();
    assert!(
        elapsed >= HANDSHAKE && elapsed <= HANDSHAKE + Duration::from_secs(1),
        "closed after {elapsed:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn silent_client_is_cut_off_by_the_handshake_timeout() {
    let gateway = Gateway::start(|services| services.timeouts.handshake = HANDSHAKE).await;
    let mut stream = gateway.connect().await;
    let start = Instant::now();
    assert_open_until_handshake_timeout(&mut stream, start).await;
}

#[tokio::test(start_paused = true)]
async fn partial_greeting_is_cut_off_by_the_handshake_timeout() {
    let gateway = Gateway::start(|services| services.timeouts.handshake = HANDSHAKE).await;
    let mut stream = gateway.connect().await;
    let start = Instant::now();
    stream.write_all(&[0x05, 0x02, 0x00]).await.unwrap();
    assert_open_until_handshake_timeout(&mut stream, start).await;
}

#[tokio::test(start_paused = true)]
async fn dribbling_client_is_cut_off_by_the_handshake_timeout() {
    let gateway = Gateway::start(|services| services.timeouts.handshake = HANDSHAKE).await;
    let mut stream = gateway.connect().await;
    let start = Instant::now();
    // A byte a second: each read makes progress, but the whole handshake may not take longer
    // than the timeout.
    let mut bytes = vec![0x05, 0x01, 0x00];
    bytes.extend_from_slice(&request_domain(CONNECT, &"a".repeat(200), 80));
    let mut buf = [0u8; 64];
    let mut answered = Vec::new();
    let closed_at = 'dribble: {
        for byte in bytes {
            if stream.write_all(&[byte]).await.is_err() {
                break 'dribble start.elapsed();
            }
            match tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf)).await {
                Err(_) => {}
                Ok(Ok(0) | Err(_)) => break 'dribble start.elapsed(),
                Ok(Ok(n)) => answered.extend_from_slice(&buf[..n]),
            }
        }
        panic!("the dribbling client was never cut off");
    };
    assert_eq!(answered, [0x05, 0x00], "the greeting is answered");
    assert!(
        closed_at >= HANDSHAKE && closed_at <= HANDSHAKE + Duration::from_secs(1),
        "closed after {closed_at:?}"
    );
}

// ---- username/password --------------------------------------------------------------------

async fn password_gateway() -> (Gateway, SocketAddr) {
    let echo = tcp_echo(LOCALHOST).await;
    (
        Gateway::start(|services| {
            services.access.get_mut().allow_anonymous = false;
            services.access.get_mut().users = Some(users("alice", "s3cret"));
        })
        .await,
        echo.addr,
    )
}

/// How long a password check may take before its reply counts as lost: argon2id at the
/// production cost takes seconds in a debug build, several at once (tests run in parallel) on a
/// loaded machine longer. A bound against a hang, not a timing assertion.
const PASSWORD_CHECK_BOUND: Duration = Duration::from_mins(1);

async fn try_password(stream: &mut TcpStream, name: &str, password: &str) -> Vec<u8> {
    send(stream, &[0x05, 0x01, 0x02]).await;
    assert_eq!(read_exact(stream, 2).await, [0x05, 0x02]);
    send(stream, &auth_request(name, password)).await;
    let mut reply = vec![0u8; 2];
    within_for(
        "the password check's reply",
        PASSWORD_CHECK_BOUND,
        stream.read_exact(&mut reply),
    )
    .await
    .unwrap();
    reply
}

async fn assert_authenticated_connect(stream: &mut TcpStream, echo: SocketAddr) {
    send(stream, &request(CONNECT, echo)).await;
    assert_eq!(read_reply(stream).await.0, 0x00);
    send(stream, b"hello").await;
    assert_eq!(read_exact(stream, 5).await, b"hello");
}

#[tokio::test]
async fn right_password_then_the_request_proceeds() {
    let (gateway, echo) = password_gateway().await;
    let mut stream = gateway.connect().await;
    assert_eq!(
        try_password(&mut stream, "alice", "s3cret").await,
        [0x01, 0x00]
    );
    assert_authenticated_connect(&mut stream, echo).await;
}

#[tokio::test]
async fn wrong_password_or_unknown_user_gets_01_01_then_close() {
    let (gateway, _) = password_gateway().await;
    for (name, password) in [
        ("alice", "wrong"),
        ("mallory", "s3cret"),
        ("alice", "s3cre"),
    ] {
        let mut stream = gateway.connect().await;
        assert_eq!(
            try_password(&mut stream, name, password).await,
            [0x01, 0x01]
        );
        assert_eq!(read_until_closed(&mut stream).await, b"", "{name}");
    }
}

#[tokio::test]
async fn repeated_failures_from_one_address_are_rate_limited() {
    let (gateway, echo) = password_gateway().await;
    for _ in 0..5 {
        let mut stream = gateway.connect().await;
        assert_eq!(
            try_password(&mut stream, "alice", "wrong").await,
            [0x01, 0x01]
        );
        assert_eq!(read_until_closed(&mut stream).await, b"");
    }
    // The sixth attempt within the window fails even with the right password.
    let mut stream = gateway.connect().await;
    assert_eq!(
        try_password(&mut stream, "alice", "s3cret").await,
        [0x01, 0x01]
    );
    assert_eq!(read_until_closed(&mut stream).await, b"");
    // Another source address is not affected.
    let mut stream = gateway.connect_from(OTHER_HOST).await;
    assert_eq!(
        try_password(&mut stream, "alice", "s3cret").await,
        [0x01, 0x00]
    );
    assert_authenticated_connect(&mut stream, echo).await;
    // Each result is counted where it is decided (what --metrics serves).
    let counters = &gateway.services.counters;
    assert_eq!(
        (
            counters.auth_succeeded.get(),
            counters.auth_failed.get(),
            counters.auth_rate_limited.get()
        ),
        (1, 5, 1)
    );
    assert_eq!(counters.connections_accepted.get(), 7);
}

// ---- CONNECT ------------------------------------------------------------------------------

#[tokio::test]
async fn connect_replies_with_the_outbound_address_and_relays_both_ways() {
    let mut echo = tcp_echo(LOCALHOST).await;
    let gateway = anonymous_gateway().await;
    let (stream, bound) = socks_connect(&gateway, echo.addr).await;
    let seen = within("echo accepts", echo.peers.recv()).await.unwrap();
    assert_eq!(
        bound, seen,
        "BND is the gateway's end of the outbound connection"
    );
    assert_eq!(
        bound.ip(),
        LOCALHOST,
        "the outbound connection leaves from External.v4"
    );

    // A quarter of a megabyte each way, written and read concurrently.
    let payload: Vec<u8> = (0..256 * 1024_u32)
        .map(|i| u8::try_from(i % 251).unwrap())
        .collect();
    let (mut read, mut write) = stream.into_split();
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        write.write_all(&sent).await.unwrap();
        write
    });
    let mut echoed = vec![0u8; payload.len()];
    within("read the echo", read.read_exact(&mut echoed))
        .await
        .unwrap();
    assert!(echoed == payload, "echoed bytes differ");
    let mut write = within("writer", writer).await.unwrap();
    // Half-close: the echo server sees EOF, half-closes too, and the client sees EOF.
    write.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within("EOF from the echo server", read.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(rest.is_empty());
}

#[tokio::test]
async fn connect_propagates_half_close_and_keeps_the_other_direction() {
    let counter = tcp_counter().await;
    let gateway = anonymous_gateway().await;
    let (mut stream, _) = socks_connect(&gateway, counter).await;
    send(&mut stream, b"0123456789").await;
    // The target answers only after it saw our EOF, on the direction that is still open.
    stream.shutdown().await.unwrap();
    assert_eq!(read_until_closed(&mut stream).await, b"got 10");
}

#[tokio::test]
async fn connect_forwards_bytes_sent_before_the_reply() {
    let echo = tcp_echo(LOCALHOST).await;
    let gateway = anonymous_gateway().await;
    let mut stream = gateway.connect().await;
    // Greeting, request and payload in one segment, as optimistic clients send them.
    let mut bytes = vec![0x05, 0x01, 0x00];
    bytes.extend_from_slice(&request(CONNECT, echo.addr));
    bytes.extend_from_slice(b"early");
    send(&mut stream, &bytes).await;
    assert_eq!(read_exact(&mut stream, 2).await, [0x05, 0x00]);
    assert_eq!(read_reply(&mut stream).await.0, 0x00);
    assert_eq!(read_exact(&mut stream, 5).await, b"early");
}

#[tokio::test]
async fn connect_to_ipv6() {
    let mut echo = tcp_echo(IpAddr::V6(Ipv6Addr::LOCALHOST)).await;
    let gateway = anonymous_gateway().await;
    let (mut stream, bound) = socks_connect(&gateway, echo.addr).await;
    assert_eq!(
        bound,
        within("echo accepts", echo.peers.recv()).await.unwrap()
    );
    assert_eq!(bound.ip(), IpAddr::V6(Ipv6Addr::LOCALHOST));
    send(&mut stream, b"six").await;
    assert_eq!(read_exact(&mut stream, 3).await, b"six");
}

#[tokio::test]
async fn connect_to_a_closed_port_gets_05() {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let gateway = anonymous_gateway().await;
    let mut stream = connect_anonymous(&gateway).await;
    send(&mut stream, &request(CONNECT, closed)).await;
    assert_eq!(read_until_closed(&mut stream).await, failure_reply(0x05));
}

#[tokio::test]
async fn connect_to_a_domain_name_resolved_by_the_gateway() {
    let mut echo = tcp_echo(LOCALHOST).await;
    let nameserver = fake_nameserver(vec![("echo.test", Ipv4Addr::LOCALHOST)]).await;
    let names = resolver(&[nameserver]);
    let gateway = Gateway::start(|services| services.resolver = names).await;

    let mut stream = connect_anonymous(&gateway).await;
    send(
        &mut stream,
        &request_domain(CONNECT, "echo.test", echo.addr.port()),
    )
    .await;
    let (code, bound) = read_reply(&mut stream).await;
    assert_eq!(code, 0x00);
    assert_eq!(
        bound,
        within("echo accepts", echo.peers.recv()).await.unwrap()
    );
    send(&mut stream, b"by name").await;
    assert_eq!(read_exact(&mut stream, 7).await, b"by name");

    // A name that does not exist: host unreachable.
    let mut stream = connect_anonymous(&gateway).await;
    send(&mut stream, &request_domain(CONNECT, "missing.test", 80)).await;
    assert_eq!(read_until_closed(&mut stream).await, failure_reply(0x04));
}

#[tokio::test]
async fn connect_to_a_denied_address_gets_02() {
    let mut echo = tcp_echo(LOCALHOST).await;
    // Default policy: loopback is refused.
    let gateway =
        Gateway::start(|services| services.access.get_mut().policy.allow_loopback = false).await;
    for target in [echo.addr, "[::1]:80".parse().unwrap()] {
        let mut stream = connect_anonymous(&gateway).await;
        send(&mut stream, &request(CONNECT, target)).await;
        assert_eq!(
            read_until_closed(&mut stream).await,
            failure_reply(0x02),
            "{target}"
        );
    }
    // A denied network (operator rule) with loopback otherwise allowed.
    let gateway = Gateway::start(|services| {
        services.access.get_mut().policy.deny = vec!["127.0.0.0/24".parse().unwrap()];
    })
    .await;
    let mut stream = connect_anonymous(&gateway).await;
    send(&mut stream, &request(CONNECT, echo.addr)).await;
    assert_eq!(read_until_closed(&mut stream).await, failure_reply(0x02));
    assert!(echo.peers.try_recv().is_err(), "nothing reached the target");
}

#[tokio::test]
async fn idle_relay_is_closed_after_the_idle_timeout() {
    let echo = tcp_echo(LOCALHOST).await;
    let gateway =
        Gateway::start(|services| services.timeouts.tcp_idle = Duration::from_millis(300)).await;
    let (mut stream, _) = socks_connect(&gateway, echo.addr).await;
    // Traffic keeps it open past the idle timeout...
    let start = std::time::Instant::now();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        send(&mut stream, b"x").await;
        assert_eq!(read_exact(&mut stream, 1).await, b"x");
    }
    assert!(start.elapsed() >= Duration::from_millis(600));
    // ...silence closes it.
    assert_eq!(read_until_closed(&mut stream).await, b"");
}

// ---- UDP ASSOCIATE ------------------------------------------------------------------------

/// An anonymous UDP ASSOCIATE with DST 0.0.0.0:0; returns the control stream and BND.
async fn udp_associate(gateway: &Gateway, client: SocketAddr) -> (TcpStream, SocketAddr) {
    let mut control = connect_anonymous(gateway).await;
    send(&mut control, &request(UDP_ASSOCIATE, client)).await;
    let (code, relay) = read_reply(&mut control).await;
    assert_eq!(code, 0x00);
    (control, relay)
}

const ANY: &str = "0.0.0.0:0";

#[tokio::test]
async fn udp_associate_relays_and_admits_exactly_the_remote_while_it_lives() {
    let mut echo = udp_echo(LOCALHOST).await;
    let gateway = Gateway::start(|_| {}).await;
    let gate = gateway.gate.clone();
    let (control, relay) = udp_associate(&gateway, ANY.parse().unwrap()).await;
    assert_eq!(
        relay.ip(),
        LOCALHOST,
        "BND is an address the client reaches"
    );
    assert_ne!(relay.port(), 0);
    assert!(gate.entries().is_empty(), "nothing admitted before a send");

    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client
        .send_to(&udp_datagram(0, echo.addr, b"question"), relay)
        .await
        .unwrap();
    let (outside, payload) = echo.next().await;
    assert_eq!(payload, b"question", "the header is stripped");
    assert_eq!(outside.ip(), LOCALHOST, "sent from External.v4");
    let (answer, from) = recv_udp(&client).await;
    assert_eq!(from, relay, "answers come from the relay address");
    assert_eq!(parse_udp(&answer), (echo.addr, b"question".to_vec()));
    assert_eq!(
        gate.entries(),
        [GateEntry {
            remote: echo.addr,
            relay: outside,
        }]
        .into(),
        "one exact entry: remote -> external relay"
    );

    // A second datagram reuses the entry and the outside socket.
    client
        .send_to(&udp_datagram(0, echo.addr, b"again"), relay)
        .await
        .unwrap();
    assert_eq!(echo.next().await, (outside, b"again".to_vec()));
    assert_eq!(parse_udp(&recv_udp(&client).await.0).1, b"again");
    assert_eq!(gate.entries().len(), 1);

    drop(control);
    eventually("entries removed with the control connection", || {
        gate.entries().is_empty()
    })
    .await;
}

#[tokio::test]
async fn udp_associate_caps_its_remotes_and_expires_idle_ones() {
    let mut echoes = Vec::new();
    for _ in 0..3 {
        echoes.push(udp_echo(LOCALHOST).await);
    }
    let gateway = Gateway::start(|services| {
        services.association_limits = gateway::server::AssociationLimits {
            max_remotes: 2,
            remote_idle: Duration::from_secs(1),
        };
    })
    .await;
    let gate = gateway.gate.clone();
    let (_control, relay) = udp_associate(&gateway, ANY.parse().unwrap()).await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for echo in &mut echoes[..2] {
        client
            .send_to(&udp_datagram(0, echo.addr, b"in"), relay)
            .await
            .unwrap();
        assert_eq!(echo.next().await.1, b"in");
        recv_udp(&client).await;
    }
    // A third remote is over the cap: not admitted, not sent to.
    let third = echoes[2].addr;
    client
        .send_to(&udp_datagram(0, third, b"over"), relay)
        .await
        .unwrap();
    // A second association binds and admits normally at the same time.
    let (_other_control, other_relay) = udp_associate(&gateway, ANY.parse().unwrap()).await;
    let other = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    other
        .send_to(&udp_datagram(0, third, b"other"), other_relay)
        .await
        .unwrap();
    assert_eq!(
        echoes[2].next().await.1,
        b"other",
        "only the other association's"
    );
    assert_eq!(
        gate.entries().iter().filter(|e| e.remote == third).count(),
        1,
        "the capped association did not admit the third remote"
    );
    // Once the first two are idle past the timeout, their entries go and the third gets in.
    let first_two = [echoes[0].addr, echoes[1].addr];
    eventually_for("idle remotes expire", Duration::from_secs(30), || {
        !gate.entries().iter().any(|e| first_two.contains(&e.remote))
    })
    .await;
    client
        .send_to(&udp_datagram(0, third, b"later"), relay)
        .await
        .unwrap();
    assert_eq!(echoes[2].next().await.1, b"later");
}

#[tokio::test]
async fn udp_associate_drops_datagrams_from_other_source_ports() {
    let mut echo = udp_echo(LOCALHOST).await;
    let gateway = anonymous_gateway().await;
    let (_control, relay) = udp_associate(&gateway, ANY.parse().unwrap()).await;
    let latched = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let other = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    latched
        .send_to(&udp_datagram(0, echo.addr, b"first"), relay)
        .await
        .unwrap();
    assert_eq!(echo.next().await.1, b"first");
    assert_eq!(parse_udp(&recv_udp(&latched).await.0).1, b"first");
    // The port is latched: another port of the same host is dropped...
    other
        .send_to(&udp_datagram(0, echo.addr, b"other"), relay)
        .await
        .unwrap();
    latched
        .send_to(&udp_datagram(0, echo.addr, b"second"), relay)
        .await
        .unwrap();
    // ...so the next datagram the remote sees is the latched client's.
    assert_eq!(echo.next().await.1, b"second");
    assert_eq!(parse_udp(&recv_udp(&latched).await.0).1, b"second");
    let mut buf = [0u8; 64];
    assert!(
        tokio::time::timeout(Duration::from_millis(200), other.recv_from(&mut buf))
            .await
            .is_err(),
        "nothing for the other port"
    );
}

#[tokio::test]
async fn udp_associate_with_a_named_client_port_accepts_only_that_port() {
    let mut echo = udp_echo(LOCALHOST).await;
    let gateway = anonymous_gateway().await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let other = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (_control, relay) = udp_associate(&gateway, client.local_addr().unwrap()).await;
    // Even as the first datagram, another port is not latched.
    other
        .send_to(&udp_datagram(0, echo.addr, b"other"), relay)
        .await
        .unwrap();
    client
        .send_to(&udp_datagram(0, echo.addr, b"mine"), relay)
        .await
        .unwrap();
    assert_eq!(echo.next().await.1, b"mine");
    assert_eq!(parse_udp(&recv_udp(&client).await.0).1, b"mine");
}

#[tokio::test]
async fn udp_associate_drops_fragments_and_malformed_datagrams() {
    let mut echo = udp_echo(LOCALHOST).await;
    let gateway = Gateway::start(|_| {}).await;
    let gate = gateway.gate.clone();
    let (_control, relay) = udp_associate(&gateway, ANY.parse().unwrap()).await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for bad in [
        udp_datagram(1, echo.addr, b"fragment"),
        udp_datagram(0x81, echo.addr, b"last fragment"),
        vec![0x00, 0x01, 0x00, 0x01, 127, 0, 0, 1, 0, 9],
        vec![0x00, 0x00, 0x00, 0x01, 127, 0],
    ] {
        client.send_to(&bad, relay).await.unwrap();
    }
    client
        .send_to(&udp_datagram(0, echo.addr, b"whole"), relay)
        .await
        .unwrap();
    assert_eq!(echo.next().await.1, b"whole", "the first datagram out");
    assert_eq!(parse_udp(&recv_udp(&client).await.0).1, b"whole");
    assert_eq!(gate.entries().len(), 1);
}

#[tokio::test]
async fn udp_associate_does_not_deliver_from_remotes_the_client_never_sent_to() {
    let mut echo = udp_echo(LOCALHOST).await;
    let gateway = Gateway::start(|_| {}).await;
    let gate = gateway.gate.clone();
    let (_control, relay) = udp_associate(&gateway, ANY.parse().unwrap()).await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client
        .send_to(&udp_datagram(0, echo.addr, b"hello"), relay)
        .await
        .unwrap();
    let (outside, _) = echo.next().await;
    recv_udp(&client).await;
    // A stranger (same host as the remote, another port) sends to the outside relay address.
    let stranger = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    stranger.send_to(b"spoof", outside).await.unwrap();
    // The next datagram the client gets is the echo's, not the stranger's.
    client
        .send_to(&udp_datagram(0, echo.addr, b"marker"), relay)
        .await
        .unwrap();
    let (answer, _) = recv_udp(&client).await;
    assert_eq!(parse_udp(&answer), (echo.addr, b"marker".to_vec()));
    assert!(
        !gate
            .entries()
            .iter()
            .any(|entry| entry.remote == stranger.local_addr().unwrap()),
        "the stranger is not admitted"
    );
}

#[tokio::test]
async fn udp_associate_to_a_domain_name_and_to_a_denied_destination() {
    let mut echo = udp_echo(LOCALHOST).await;
    let mut denied = udp_echo(OTHER_HOST).await;
    let nameserver = fake_nameserver(vec![("echo.test", Ipv4Addr::LOCALHOST)]).await;
    let names = resolver(&[nameserver]);
    let gateway = Gateway::start(|services| {
        services.resolver = names;
        services.access.get_mut().policy.deny = vec!["127.0.0.2/32".parse().unwrap()];
    })
    .await;
    let gate = gateway.gate.clone();
    let (_control, relay) = udp_associate(&gateway, ANY.parse().unwrap()).await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();

    client
        .send_to(&udp_datagram(0, denied.addr, b"denied"), relay)
        .await
        .unwrap();
    let mut by_name = vec![0x00, 0x00, 0x00, 0x03, 9];
    by_name.extend_from_slice(b"echo.test");
    by_name.extend_from_slice(&echo.addr.port().to_be_bytes());
    by_name.extend_from_slice(b"named");
    client.send_to(&by_name, relay).await.unwrap();

    assert_eq!(echo.next().await.1, b"named");
    let (answer, _) = recv_udp(&client).await;
    assert_eq!(
        parse_udp(&answer),
        (echo.addr, b"named".to_vec()),
        "the answer names the resolved sender"
    );
    assert!(denied.received.try_recv().is_err(), "denied: nothing sent");
    let entries = gate.entries();
    assert_eq!(entries.len(), 1);
    assert!(entries.iter().all(|entry| entry.remote == echo.addr));
}

#[tokio::test]
async fn udp_associate_for_another_host_gets_02() {
    let gateway = anonymous_gateway().await;
    let mut control = connect_anonymous(&gateway).await;
    send(
        &mut control,
        &request(UDP_ASSOCIATE, "127.0.0.2:5000".parse().unwrap()),
    )
    .await;
    assert_eq!(read_until_closed(&mut control).await, failure_reply(0x02));
}

// ---- BIND ---------------------------------------------------------------------------------

#[tokio::test]
async fn bind_replies_twice_and_relays() {
    let gateway = anonymous_gateway().await;
    let mut control = connect_anonymous(&gateway).await;
    send(&mut control, &request(BIND, ANY.parse().unwrap())).await;
    let (code, listening) = read_reply(&mut control).await;
    assert_eq!(code, 0x00);
    assert_eq!(listening.ip(), LOCALHOST, "listening on External.v4");
    assert_ne!(listening.port(), 0);

    let mut peer = within("peer connects", TcpStream::connect(listening))
        .await
        .unwrap();
    let (code, from) = read_reply(&mut control).await;
    assert_eq!(code, 0x00);
    assert_eq!(
        from,
        peer.local_addr().unwrap(),
        "second reply names the peer"
    );

    send(&mut peer, b"from peer").await;
    assert_eq!(read_exact(&mut control, 9).await, b"from peer");
    send(&mut control, b"from client").await;
    assert_eq!(read_exact(&mut peer, 11).await, b"from client");
    control.shutdown().await.unwrap();
    assert_eq!(read_until_closed(&mut peer).await, b"");
}

#[tokio::test]
async fn bind_for_a_named_host_refuses_other_peers() {
    let gateway = anonymous_gateway().await;
    let mut control = connect_anonymous(&gateway).await;
    send(&mut control, &request(BIND, "127.0.0.1:0".parse().unwrap())).await;
    let (code, listening) = read_reply(&mut control).await;
    assert_eq!(code, 0x00);

    let stranger = tokio::net::TcpSocket::new_v4().unwrap();
    stranger.bind(SocketAddr::new(OTHER_HOST, 0)).unwrap();
    let mut stranger = within("stranger connects", stranger.connect(listening))
        .await
        .unwrap();
    assert_eq!(read_until_closed(&mut stranger).await, b"", "refused");

    let peer = within("peer connects", TcpStream::connect(listening))
        .await
        .unwrap();
    let (code, from) = read_reply(&mut control).await;
    assert_eq!(code, 0x00);
    assert_eq!(from, peer.local_addr().unwrap());
}

#[tokio::test]
async fn bind_for_a_denied_host_gets_02() {
    let gateway =
        Gateway::start(|services| services.access.get_mut().policy.allow_loopback = false).await;
    let mut control = connect_anonymous(&gateway).await;
    send(&mut control, &request(BIND, "127.0.0.1:0".parse().unwrap())).await;
    assert_eq!(read_until_closed(&mut control).await, failure_reply(0x02));
}

#[tokio::test(start_paused = true)]
async fn bind_without_a_peer_times_out_with_01() {
    let gateway =
        Gateway::start(|services| services.timeouts.bind_accept = Duration::from_secs(30)).await;
    let mut control = connect_anonymous(&gateway).await;
    let start = Instant::now();
    send(&mut control, &request(BIND, ANY.parse().unwrap())).await;
    assert_eq!(read_reply(&mut control).await.0, 0x00);
    assert_eq!(
        read_until_closed_within(&mut control, Duration::from_mins(1)).await,
        failure_reply(0x01)
    );
    assert!(start.elapsed() >= Duration::from_secs(30));
}

// ---- lifecycle ----------------------------------------------------------------------------

#[tokio::test]
async fn connection_cap_closes_connections_over_it() {
    let gateway = Gateway::start(|services| {
        services.connections = gateway::server::limits::ConnectionLimits::new(1, 1);
    })
    .await;
    let first = connect_anonymous(&gateway).await;
    let mut second = gateway.connect().await;
    send(&mut second, &[0x05, 0x01, 0x00]).await;
    assert_eq!(read_until_closed(&mut second).await, b"", "over the cap");
    drop(first);
    // The slot is released with the first connection.
    eventually_served(&gateway).await;
}

#[tokio::test]
async fn connection_cap_per_client_address_leaves_other_clients_served() {
    let gateway = Gateway::start(|services| {
        services.connections = gateway::server::limits::ConnectionLimits::new(16, 2);
    })
    .await;
    let busy: IpAddr = "127.0.0.2".parse().unwrap();
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = gateway.connect_from(busy).await;
        send(&mut stream, &[0x05, 0x01, 0x00]).await;
        let mut reply = [0u8; 2];
        stream.read_exact(&mut reply).await.unwrap();
        assert_eq!(reply, [0x05, 0x00]);
        held.push(stream);
    }
    let mut third = gateway.connect_from(busy).await;
    send(&mut third, &[0x05, 0x01, 0x00]).await;
    assert_eq!(
        read_until_closed(&mut third).await,
        b"",
        "a third connection from one address is closed"
    );
    // Another client address is served at the same time.
    let mut other = gateway.connect_from("127.0.0.3".parse().unwrap()).await;
    send(&mut other, &[0x05, 0x01, 0x00]).await;
    let mut reply = [0u8; 2];
    other.read_exact(&mut reply).await.unwrap();
    assert_eq!(reply, [0x05, 0x00]);
    assert_eq!(gateway.services.connections.refused(), (0, 1), "counted");
}

/// Retries until a new client gets its greeting answered (the previous task may still be
/// ending), then closes that client and waits until the server closed it too, so its slot is free.
async fn eventually_served(gateway: &Gateway) {
    let mut stream = within("a new client is served", async {
        loop {
            let mut stream = gateway.connect().await;
            stream.write_all(&[0x05, 0x01, 0x00]).await.unwrap();
            let mut reply = [0u8; 2];
            if stream.read_exact(&mut reply).await.is_ok() {
                assert_eq!(reply, [0x05, 0x00]);
                return stream;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    stream.shutdown().await.unwrap();
    assert_eq!(read_until_closed(&mut stream).await, b"");
}

#[tokio::test]
async fn shutdown_returns_and_closes_every_control_connection() {
    let echo = tcp_echo(LOCALHOST).await;
    let mut udp_remote = udp_echo(LOCALHOST).await;
    let mut gateway = Gateway::start(|_| {}).await;
    let gate = gateway.gate.clone();

    let (mut relayed, _) = socks_connect(&gateway, echo.addr).await;
    let mut handshaking = gateway.connect().await;
    send(&mut handshaking, &[0x05]).await;
    let (mut control, relay) = udp_associate(&gateway, ANY.parse().unwrap()).await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client
        .send_to(&udp_datagram(0, udp_remote.addr, b"x"), relay)
        .await
        .unwrap();
    udp_remote.next().await;
    recv_udp(&client).await;
    assert_eq!(gate.entries().len(), 1);

    let run = gateway.begin_shutdown();
    // Well before the 5 s drain limit: the connections end because they are told to.
    tokio::time::timeout(IO_TIMEOUT / 2, run)
        .await
        .expect("run returns after shutdown")
        .unwrap();
    for stream in [&mut relayed, &mut handshaking, &mut control] {
        assert_eq!(read_until_closed(stream).await, b"");
    }
    assert!(
        gate.entries().is_empty(),
        "the association's kernel entries are removed at shutdown: {:?}",
        gate.entries()
    );
    assert!(
        TcpStream::connect(gateway.addr).await.is_err(),
        "the listener is closed"
    );
}
