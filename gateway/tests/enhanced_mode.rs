//! The enhanced UDP mode against the running server, in-process on loopback with a `MemoryGate`:
//! raw bytes as protocol.md sections 3 and 4 lay them out (`common/enhanced.rs` writes them
//! independently of the crate's codec), a UDP echo "remote" on 127.0.0.2, the client on
//! 127.0.0.1. The internal and external relay addresses are both 127.0.0.1 with disjoint port
//! ranges (one block per test). The kernel gate is a `MemoryGate` and `ifindex` is `None`, so the
//! external-interface check is not exercised here (the testbed does that).

mod common;

use std::{collections::HashSet, net::SocketAddr, time::Duration};

use common::{
    enhanced::*,
    gateway::{ENHANCED_MODE_PORTS, Gateway},
    io::{assert_closed, assert_silent, eventually, read_exact, recv_udp, send, within},
    peers::{LOCALHOST, REMOTE_HOST, UdpEcho, udp, udp_pair},
    socks::put_addr,
};
use gateway::{
    binding::{Config, PortRange},
    server::{Services, policy::Policy},
};
use tokio::net::UdpSocket;

/// These tests keep the default SOCKS policy (loopback destinations refused): the enhanced mode
/// does not consult it, and with loopback remotes everywhere these tests would notice if it did.
fn default_policy(services: &mut Services) {
    services.access.get_mut().policy = Policy::default();
}

/// A gateway with the enhanced mode on the next block of this binary's relay ports, its binding
/// configuration changed by `tweak`.
async fn start(tweak: impl FnOnce(&mut Config)) -> Gateway {
    Gateway::start_enhanced(&ENHANCED_MODE_PORTS, tweak, default_policy).await
}

// ---- entering the mode ----------------------------------------------------------------------

#[tokio::test]
async fn entering_the_mode_is_byte_exact() {
    let gateway = start(|_| {}).await;
    let (_stream, reply) = gateway.enter_raw().await;
    // protocol.md section 3: `05 04 00 01 00000000 0000` -> `01 00 00 01 00000000 0000`.
    assert_eq!(reply, hex("01 00 00 01 00000000 0000"));
}

#[tokio::test]
async fn without_the_mode_cmd_04_is_refused_and_closed() {
    let gateway = Gateway::start(default_policy).await;
    let mut stream = gateway.connect().await;
    send(&mut stream, &[0x05, 0x01, 0x00]).await;
    assert_eq!(read_exact(&mut stream, 2).await, [0x05, 0x00]);
    send(&mut stream, &hex("05 04 00 01 00000000 0000")).await;
    assert_eq!(
        read_exact(&mut stream, 10).await,
        hex("05 07 00 01 00000000 0000")
    );
    assert_closed(&mut stream).await;
}

// ---- the two-step binding -------------------------------------------------------------------

#[tokio::test]
async fn two_step_open_relays_both_ways_and_only_the_bound_remote() {
    let gateway = start(|_| {}).await;
    let mut stream = gateway.enter().await;
    let client = udp(LOCALHOST).await;
    let local = client.local_addr().unwrap();
    let first = step1(&gateway, &mut stream, RSU, 0x0101, local).await;
    let (aid, internal, external) = (first.aid, first.local, first.remote);
    // Step 1 admits nothing: no kernel entry, and the relay passes nothing either way.
    assert!(gateway.gate.entries().is_empty());
    let mut remote = UdpEcho::start(udp(REMOTE_HOST).await);
    let stranger = udp(REMOTE_HOST).await;
    stranger.send_to(b"early", external).await.unwrap();
    client
        .send_to(&datagram(aid, b"too soon"), internal)
        .await
        .unwrap();
    remote
        .assert_silent("a half-bound binding relays nothing")
        .await;
    assert_silent(&client, "a half-bound binding relays nothing").await;

    // Step 2 (Open): the exact entry is there by the time the reply arrives.
    let second = request(
        &mut stream,
        &control(BIND, RSU, 0x0101, aid, local, remote.addr),
    )
    .await;
    assert_eq!(second.code, 0x00, "{second:?}");
    assert_eq!((second.flags, second.tid, second.aid), (RSU, 0x0101, aid));
    assert_eq!((second.local, second.remote), (internal, external));
    assert_eq!(
        gateway.gate.entries(),
        HashSet::from([entry(remote.addr, external)])
    );

    // Client -> remote: the header goes, the payload leaves from the external relay address.
    client
        .send_to(&datagram(aid, b"hello"), internal)
        .await
        .unwrap();
    assert_eq!(remote.next().await, (external, b"hello".to_vec()));
    // The echo comes back to the client with the 8-octet header and the AID.
    assert_eq!(recv_udp(&client).await, (datagram(aid, b"hello"), internal));

    // Another port of the same host, and another AID from the client, are not relayed.
    stranger.send_to(b"intruder", external).await.unwrap();
    assert_silent(&client, "a datagram from another remote port").await;
    client
        .send_to(&datagram(aid ^ 1, b"wrong aid"), internal)
        .await
        .unwrap();
    remote.assert_silent("a datagram with another AID").await;
    // FRAG != 0 is dropped.
    let mut fragment = datagram(aid, b"fragment");
    fragment[1] = 1;
    client.send_to(&fragment, internal).await.unwrap();
    remote.assert_silent("a fragment").await;
    // A datagram from another client socket is dropped.
    let other_client = udp(LOCALHOST).await;
    other_client
        .send_to(&datagram(aid, b"not the client"), internal)
        .await
        .unwrap();
    remote
        .assert_silent("a datagram from another client port")
        .await;

    // UDP RELEASE: the reply echoes it and the entry goes.
    let release = request(
        &mut stream,
        &control(RELEASE, 0, 0x0101, aid, UNSPECIFIED, UNSPECIFIED),
    )
    .await;
    assert_eq!(release.code, 0x00);
    assert_eq!(release.aid, aid);
    assert_eq!(
        release.raw,
        {
            let mut echo = control(RELEASE, 0, 0x0101, aid, UNSPECIFIED, UNSPECIFIED);
            echo[0] = 0x02;
            echo[3] = 0x00;
            echo
        },
        "the RELEASE reply echoes the request"
    );
    gateway.all_released().await;
}

/// Requests sent back to back in one segment are all answered, in order (the gateway answers
/// what it has buffered in one write).
#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let gateway = start(|_| {}).await;
    let mut stream = gateway.enter().await;
    let locals: Vec<SocketAddr> = (0..8u16)
        .map(|i| SocketAddr::new(LOCALHOST, 7000 + 2 * i))
        .collect();
    let mut batch = Vec::new();
    for (tid, local) in (1u16..).zip(&locals) {
        batch.extend(control(BIND, RSU, tid, 0, *local, UNSPECIFIED));
    }
    // A release of an AID nobody has, in the middle: its refusal comes in its place.
    batch.extend(control(
        RELEASE,
        0,
        99,
        0x0bad_0bad,
        UNSPECIFIED,
        UNSPECIFIED,
    ));
    send(&mut stream, &batch).await;
    let mut aids = HashSet::new();
    for tid in 1..=8u16 {
        let reply = read_control_reply(&mut stream).await;
        assert_eq!((reply.code, reply.tid), (0x00, tid), "{reply:?}");
        assert!(aids.insert(reply.aid), "a fresh AID per binding");
    }
    let refused = read_control_reply(&mut stream).await;
    assert_eq!(refused.tid, 99);
    assert_ne!(refused.code, 0x00, "{refused:?}");
    assert_eq!(gateway.mode().live_bindings(), 8);
    drop(stream);
    gateway.all_released().await;
}

#[tokio::test]
async fn one_step_open_and_connection_close_removes_everything() {
    let gateway = start(|_| {}).await;
    let mut stream = gateway.enter().await;
    let client = udp(LOCALHOST).await;
    let local = client.local_addr().unwrap();
    let mut remote = UdpEcho::start(udp(REMOTE_HOST).await);
    // TID 0 with a specific REMOTE: one-step Open, no REMOTE-PENDING.
    let open = request(&mut stream, &control(BIND, RSU, 0, 0, local, remote.addr)).await;
    assert_eq!((open.code, open.flags, open.tid), (0x00, RSU, 0));
    assert_eq!(
        gateway.gate.entries(),
        HashSet::from([entry(remote.addr, open.remote)])
    );
    client
        .send_to(&datagram(open.aid, b"one step"), open.local)
        .await
        .unwrap();
    assert_eq!(remote.next().await, (open.remote, b"one step".to_vec()));
    assert_eq!(recv_udp(&client).await.0, datagram(open.aid, b"one step"));

    // A second binding, half-bound.
    let second_client = udp(LOCALHOST).await;
    step1(
        &gateway,
        &mut stream,
        RSU,
        7,
        second_client.local_addr().unwrap(),
    )
    .await;
    assert_eq!(gateway.mode().live_bindings(), 2);
    drop(stream);
    gateway.all_released().await;
    // The relay is gone: nothing reaches the remote any more.
    client
        .send_to(&datagram(open.aid, b"after close"), open.local)
        .await
        .unwrap();
    remote.assert_silent("after the connection closed").await;
}

#[tokio::test]
async fn local_port_zero_is_latched_from_the_first_datagram() {
    let gateway = start(|_| {}).await;
    let mut stream = gateway.enter().await;
    let client = udp(LOCALHOST).await;
    let remote = udp(REMOTE_HOST).await;
    let remote_addr = remote.local_addr().unwrap();
    let any_port = SocketAddr::new(LOCALHOST, 0);
    let first = step1(&gateway, &mut stream, RSU, 3, any_port).await;
    let second = request(
        &mut stream,
        &control(BIND, RSU, 3, first.aid, any_port, remote_addr),
    )
    .await;
    assert_eq!(second.code, 0x00, "{second:?}");
    // Nothing is admitted inbound before the latch.
    remote.send_to(b"before", first.remote).await.unwrap();
    assert_silent(&client, "a datagram before the client's port is latched").await;
    client
        .send_to(&datagram(first.aid, b"latch me"), first.local)
        .await
        .unwrap();
    assert_eq!(
        recv_udp(&remote).await,
        (b"latch me".to_vec(), first.remote)
    );
    remote.send_to(b"after", first.remote).await.unwrap();
    assert_eq!(
        recv_udp(&client).await,
        (datagram(first.aid, b"after"), first.local)
    );
    // Another port of the client host is not the latched one.
    let other = udp(LOCALHOST).await;
    other
        .send_to(&datagram(first.aid, b"other port"), first.local)
        .await
        .unwrap();
    assert_silent(&remote, "a datagram from a port other than the latched one").await;
}

#[tokio::test(start_paused = true)]
async fn a_half_bound_binding_expires_and_step_2_gets_17() {
    let gateway = start(|config| config.pending_timeout = Duration::from_secs(5)).await;
    let mut stream = gateway.enter().await;
    let local = SocketAddr::new(LOCALHOST, 5000);
    let first = step1(&gateway, &mut stream, RSU, 0x0101, local).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(gateway.mode().live_bindings(), 0);
    assert_eq!(gateway.mode().ports_in_use(), (0, 0));
    let remote = SocketAddr::new(REMOTE_HOST, 6000);
    let late = request(
        &mut stream,
        &control(BIND, RSU, 0x0101, first.aid, local, remote),
    )
    .await;
    assert_eq!((late.code, late.aid), (0x17, first.aid));
    assert!(gateway.gate.entries().is_empty());
    // The connection stays open: the same TID without the AID still gets 17.
    let again = request(&mut stream, &control(BIND, RSU, 0x0101, 0, local, remote)).await;
    assert_eq!(again.code, 0x17);
}

#[tokio::test(start_paused = true)]
async fn an_idle_binding_expires_and_its_entry_goes() {
    let gateway = start(|config| config.idle_timeout = Duration::from_secs(3)).await;
    let mut stream = gateway.enter().await;
    let client = udp(LOCALHOST).await;
    let local = client.local_addr().unwrap();
    let mut remote = UdpEcho::start(udp(REMOTE_HOST).await);
    let open = request(&mut stream, &control(BIND, RSU, 5, 0, local, remote.addr)).await;
    assert_eq!(open.code, 0x00);
    // Traffic at t=2 s keeps it alive past t=3 s.
    tokio::time::sleep(Duration::from_secs(2)).await;
    client
        .send_to(&datagram(open.aid, b"keepalive"), open.local)
        .await
        .unwrap();
    assert_eq!(remote.next().await.1, b"keepalive");
    assert_eq!(recv_udp(&client).await.0, datagram(open.aid, b"keepalive"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        gateway.mode().live_bindings(),
        1,
        "traffic restarted the idle clock"
    );
    assert_eq!(gateway.gate.entries().len(), 1);
    // Then silence: it expires, its entry and relay go, and its TID answers 17.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(gateway.mode().live_bindings(), 0);
    assert!(gateway.gate.entries().is_empty());
    eventually("the relay stops", || gateway.mode().running_relays() == 0).await;
    let late = request(&mut stream, &control(BIND, RSU, 5, 0, local, remote.addr)).await;
    assert_eq!((late.code, late.aid), (0x17, open.aid));
    // RELEASE forgets the tombstone; the TID is free again.
    let release = request(
        &mut stream,
        &control(RELEASE, 0, 5, open.aid, UNSPECIFIED, UNSPECIFIED),
    )
    .await;
    assert_eq!(release.code, 0x00);
    let again = request(&mut stream, &control(BIND, RSU, 5, 0, local, remote.addr)).await;
    assert_eq!(again.code, 0x00);
    assert_ne!(again.aid, open.aid);
}

#[tokio::test]
async fn rtp_pair_relays_two_flows_on_two_ports() {
    let gateway = start(|_| {}).await;
    let mut stream = gateway.enter().await;
    let (client_media, client_reports) = udp_pair(LOCALHOST).await;
    let local = client_media.local_addr().unwrap();
    let (source_media, source_reports) = udp_pair(REMOTE_HOST).await;
    let mut media = UdpEcho::start(source_media);
    let mut reports = UdpEcho::start(source_reports);
    let flags = RSU | RTP_PAIR;
    let first = step1(&gateway, &mut stream, flags, 9, local).await;
    let (q, p) = (first.local, first.remote);
    assert_eq!(q.port() % 2, 0, "internal relay port Q is even");
    assert_eq!(p.port() % 2, 0, "external relay port P is even");
    let second = request(
        &mut stream,
        &control(BIND, flags, 9, first.aid, local, media.addr),
    )
    .await;
    assert_eq!((second.code, second.flags), (0x00, flags), "{second:?}");
    assert_eq!(
        gateway.gate.entries(),
        HashSet::from([entry(media.addr, p), entry(reports.addr, plus_one(p)),])
    );
    // RTP: L -> Q -> (P) -> S:s, and back.
    client_media
        .send_to(&datagram(first.aid, b"rtp"), q)
        .await
        .unwrap();
    assert_eq!(media.next().await, (p, b"rtp".to_vec()));
    assert_eq!(
        recv_udp(&client_media).await,
        (datagram(first.aid, b"rtp"), q)
    );
    // RTCP: L+1 -> Q+1 -> (P+1) -> S:s+1, and back.
    client_reports
        .send_to(&datagram(first.aid, b"rtcp"), plus_one(q))
        .await
        .unwrap();
    assert_eq!(reports.next().await, (plus_one(p), b"rtcp".to_vec()));
    assert_eq!(
        recv_udp(&client_reports).await,
        (datagram(first.aid, b"rtcp"), plus_one(q))
    );
    assert_silent(&client_media, "RTCP does not cross over to the RTP flow").await;
}

#[tokio::test]
async fn tcp_encapsulated_datagrams_travel_on_the_control_connection() {
    let gateway = start(|_| {}).await;
    let mut stream = gateway.enter().await;
    let mut remote = UdpEcho::start(udp(REMOTE_HOST).await);
    let local = SocketAddr::new(LOCALHOST, 0);
    let flags = RSU | TCP_ENCAPSULATED;
    let open = request(&mut stream, &control(BIND, flags, 0, 0, local, remote.addr)).await;
    assert_eq!((open.code, open.flags), (0x00, flags), "{open:?}");
    send(&mut stream, &tcp_datagram(open.aid, b"over tcp")).await;
    assert_eq!(remote.next().await, (open.remote, b"over tcp".to_vec()));
    let (kind, packet) = within(
        "the echo on the control connection",
        read_packet(&mut stream),
    )
    .await;
    assert_eq!(kind, 0x03);
    assert_eq!(packet, tcp_datagram(open.aid, b"over tcp"));
    // An unknown AID is dropped and the connection stays usable.
    send(&mut stream, &tcp_datagram(open.aid ^ 1, b"nobody")).await;
    remote
        .assert_silent("a TCP datagram with an unknown AID")
        .await;
    let ttl = request(
        &mut stream,
        &control(SET_TTL, 0, 0, open.aid, UNSPECIFIED, UNSPECIFIED),
    )
    .await;
    // Not a multicast send binding.
    assert_eq!(ttl.code, 0x13);
}

#[tokio::test]
async fn listen_receives_from_any_remote_only_where_allowed() {
    let refusing = start(|_| {}).await;
    let mut stream = refusing.enter().await;
    let local = SocketAddr::new(LOCALHOST, 4000);
    let first = step1(&refusing, &mut stream, RSU, 1, local).await;
    let refused = request(
        &mut stream,
        &control(BIND, RSU, 1, first.aid, local, UNSPECIFIED),
    )
    .await;
    assert_eq!(refused.code, 0x02, "Listen is refused by default");

    let gateway = start(|config| config.allow_listen = true).await;
    let mut stream = gateway.enter().await;
    let client = udp(LOCALHOST).await;
    let local = client.local_addr().unwrap();
    let first = step1(&gateway, &mut stream, RSU, 1, local).await;
    let listen = request(
        &mut stream,
        &control(BIND, RSU, 1, first.aid, local, UNSPECIFIED),
    )
    .await;
    assert_eq!(listen.code, 0x00, "{listen:?}");
    // A relay-port-only kernel entry: any remote (all-zero address, port 0) to the relay port.
    let entries = gateway.gate.entries();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let entry = entries.into_iter().next().unwrap();
    assert_eq!(entry.relay, listen.remote);
    assert!(entry.remote.ip().is_unspecified() && entry.remote.port() == 0);
    // The client must send first so its port is known (LOCAL had one here, so it is).
    let peer = udp(REMOTE_HOST).await;
    let peer_addr = peer.local_addr().unwrap();
    peer.send_to(b"anyone", listen.remote).await.unwrap();
    let (got, from) = recv_udp(&client).await;
    assert_eq!(from, listen.local);
    let mut expected = datagram(first.aid, b"");
    put_addr(&mut expected, peer_addr);
    expected.extend_from_slice(b"anyone");
    assert_eq!(got, expected, "the remote's address follows the header");
    // The client answers that remote by naming it after the header.
    let mut answer = datagram(first.aid, b"");
    put_addr(&mut answer, peer_addr);
    answer.extend_from_slice(b"answer");
    client.send_to(&answer, listen.local).await.unwrap();
    assert_eq!(recv_udp(&peer).await, (b"answer".to_vec(), listen.remote));
    // A remote that never sent cannot be named.
    let silent = udp(REMOTE_HOST).await;
    let mut unsolicited = datagram(first.aid, b"");
    put_addr(&mut unsolicited, silent.local_addr().unwrap());
    unsolicited.extend_from_slice(b"unsolicited");
    client.send_to(&unsolicited, listen.local).await.unwrap();
    assert_silent(&silent, "a remote that never sent").await;
}

// ---- errors ---------------------------------------------------------------------------------

#[tokio::test]
async fn a_malformed_control_packet_closes_the_connection_and_releases() {
    let gateway = start(|_| {}).await;
    let mut stream = gateway.enter().await;
    step1(
        &gateway,
        &mut stream,
        RSU,
        1,
        SocketAddr::new(LOCALHOST, 5000),
    )
    .await;
    assert_eq!(gateway.mode().live_bindings(), 1);
    // SIZE 5 is shorter than any control packet.
    send(&mut stream, &hex("01 0005 05 00")).await;
    assert_closed(&mut stream).await;
    gateway.all_released().await;

    // An unknown UDPCMD closes as well.
    let mut stream = gateway.enter().await;
    let mut bad = control(
        BIND,
        RSU,
        1,
        0,
        SocketAddr::new(LOCALHOST, 5000),
        UNSPECIFIED,
    );
    bad[3] = 0x09;
    send(&mut stream, &bad).await;
    assert_closed(&mut stream).await;
}

#[tokio::test]
async fn a_failed_command_keeps_the_connection_open() {
    let gateway = start(|_| {}).await;
    let mut owner = gateway.enter().await;
    let local = SocketAddr::new(LOCALHOST, 5000);
    let first = step1(&gateway, &mut owner, RSU, 0x0101, local).await;

    // Another connection naming the first one's AID gets 10 and keeps its connection.
    let mut other = gateway.enter().await;
    let remote = SocketAddr::new(REMOTE_HOST, 6000);
    let stolen = request(
        &mut other,
        &control(BIND, RSU, 0x0101, first.aid, local, remote),
    )
    .await;
    assert_eq!((stolen.code, stolen.aid), (0x10, first.aid));
    let release = request(
        &mut other,
        &control(RELEASE, 0, 0, first.aid, UNSPECIFIED, UNSPECIFIED),
    )
    .await;
    assert_eq!(release.code, 0x10);
    assert!(gateway.gate.entries().is_empty());
    assert_eq!(gateway.mode().live_bindings(), 1);
    // Its own TID 0x0101 is a new step 1 there, with another AID.
    let own = step1(&gateway, &mut other, RSU, 0x0101, local).await;
    assert_ne!(own.aid, first.aid);
    // A LOCAL that is not the control peer's address gets 02; a multicast bind whose REMOTE is
    // no group 14; SET TTL of no binding 10.
    let elsewhere = SocketAddr::new(REMOTE_HOST, 5000);
    let not_peer = request(&mut other, &control(BIND, RSU, 2, 0, elsewhere, remote)).await;
    assert_eq!(not_peer.code, 0x02);
    let multicast = request(&mut other, &control(BIND, 0x0011, 3, 0, local, UNSPECIFIED)).await;
    assert_eq!(multicast.code, 0x14);
    let ttl = request(
        &mut other,
        &control(SET_TTL, 0, 4, 0, UNSPECIFIED, UNSPECIFIED),
    )
    .await;
    assert_eq!(ttl.code, 0x10);

    // The owner confirms its binding normally.
    let second = request(
        &mut owner,
        &control(BIND, RSU, 0x0101, first.aid, local, remote),
    )
    .await;
    assert_eq!(second.code, 0x00);
    assert_eq!(
        gateway.gate.entries(),
        HashSet::from([entry(remote, first.remote)])
    );
}

/// When the port space is exhausted a request gets the documented reply at once (`01`, `16`
/// for a pair) and is counted; a freed port is given out again.
#[tokio::test]
async fn exhausted_relay_ports_are_refused_at_once_and_counted() {
    let gateway = start(|config| {
        let first = config.internal_ports.first & !1;
        config.internal_ports = PortRange::new(first, first + 1);
    })
    .await;
    let mut stream = gateway.enter().await;
    let local = |port| SocketAddr::new(LOCALHOST, port);
    let one = step1(&gateway, &mut stream, RSU, 1, local(6000)).await;
    step1(&gateway, &mut stream, RSU, 2, local(6002)).await;
    let refused = request(
        &mut stream,
        &control(BIND, RSU, 3, 0, local(6004), UNSPECIFIED),
    )
    .await;
    assert_eq!(refused.code, 0x01, "{refused:?}");
    let pair = request(
        &mut stream,
        &control(BIND, RSU | RTP_PAIR, 4, 0, local(6006), UNSPECIFIED),
    )
    .await;
    assert_eq!(pair.code, 0x16, "{pair:?}");
    assert_eq!(gateway.mode().caps_hit()[3], 2, "both refusals counted");
    let release = request(
        &mut stream,
        &control(RELEASE, 0, 1, one.aid, UNSPECIFIED, UNSPECIFIED),
    )
    .await;
    assert_eq!(release.code, 0x00);
    step1(&gateway, &mut stream, RSU, 5, local(6008)).await;
    assert_eq!(gateway.mode().caps_hit()[3], 2);
    drop(stream);
    gateway.all_released().await;
}

/// Relay ports belong to the gateway: a binding holds no socket, and the steering hands every
/// datagram for a relay port to the gateway's shared socket, so a socket another program binds
/// to one later hijacks nothing and blocks nothing.
#[tokio::test]
async fn a_foreign_socket_on_a_relay_port_gets_none_of_the_bindings_datagrams() {
    let gateway = start(|config| {
        let only = config.internal_ports.first;
        config.internal_ports = PortRange::new(only, only);
    })
    .await;
    let squatter = UdpSocket::bind(SocketAddr::new(LOCALHOST, gateway.internal_ports().first))
        .await
        .unwrap();
    let mut stream = gateway.enter().await;
    let client = udp(LOCALHOST).await;
    let local = client.local_addr().unwrap();
    let first = step1(&gateway, &mut stream, RSU, 1, local).await;
    assert_eq!(first.local.port(), gateway.internal_ports().first);
    let mut remote = UdpEcho::start(udp(REMOTE_HOST).await);
    let second = request(
        &mut stream,
        &control(BIND, RSU, 1, first.aid, local, remote.addr),
    )
    .await;
    assert_eq!(second.code, 0x00, "{second:?}");
    client
        .send_to(&datagram(first.aid, b"through"), first.local)
        .await
        .unwrap();
    assert_eq!(remote.next().await, (first.remote, b"through".to_vec()));
    assert_eq!(
        recv_udp(&client).await,
        (datagram(first.aid, b"through"), first.local)
    );
    assert_silent(&squatter, "the foreign socket on the relay port").await;
    drop(stream);
    gateway.all_released().await;
}

#[tokio::test]
async fn raw_granted_for_an_open_binding_is_echoed_in_both_steps() {
    let gateway = start(|_| {}).await;
    let mut stream = gateway.enter().await;
    let client = udp(LOCALHOST).await;
    let local = client.local_addr().unwrap();
    let first = request(
        &mut stream,
        &control(BIND, RSU | RAW, 0x0302, 0, local, UNSPECIFIED),
    )
    .await;
    assert_eq!(first.code, 0x00, "{first:?}");
    assert_eq!(
        first.flags,
        RSU | RAW | REMOTE_PENDING,
        "provisional: {first:?}"
    );
    let remote = udp(REMOTE_HOST).await;
    let second = request(
        &mut stream,
        &control(
            BIND,
            RSU | RAW,
            0x0302,
            first.aid,
            local,
            remote.local_addr().unwrap(),
        ),
    )
    .await;
    assert_eq!(second.code, 0x00, "{second:?}");
    assert_eq!(second.flags, RSU | RAW, "granted: {second:?}");
    assert_eq!((second.local, second.remote), (first.local, first.remote));
    // The kernel is told to relay it without a header, keyed by the remote itself.
    let remote_addr = remote.local_addr().unwrap();
    let raw: Vec<_> = gateway
        .gate
        .kernel_relays()
        .into_iter()
        .filter(|relay| {
            relay.framing
                == gateway::gate::Framing::Raw {
                    remote: remote_addr,
                }
        })
        .collect();
    assert_eq!(raw.len(), 1, "one RAW kernel relay");
    assert_eq!(raw[0].client, local);
}

const RAW: u16 = 0x0200;

#[tokio::test]
async fn raw_is_not_granted_off_the_internal_networks_and_delivery_keeps_the_header() {
    // The client (loopback) is not on a directly connected internal network.
    let gateway = Gateway::start_enhanced(
        &ENHANCED_MODE_PORTS,
        |_| {},
        |services| {
            default_policy(services);
            services.access.get_mut().direct_networks.clear();
        },
    )
    .await;
    let mut stream = gateway.enter().await;
    let client = udp(LOCALHOST).await;
    let local = client.local_addr().unwrap();
    // Step 1 with RAW: made, but the reply does not echo RAW (not granted).
    let first = request(
        &mut stream,
        &control(BIND, RSU | RAW, 0x0301, 0, local, UNSPECIFIED),
    )
    .await;
    assert_eq!(first.code, 0x00, "{first:?}");
    assert_eq!(first.flags & RAW, 0, "RAW is not echoed: {first:?}");
    assert_eq!(first.flags, RSU | REMOTE_PENDING);
    // Step 2 repeats step 1's flags, RAW included, as a client not yet told no would.
    let mut remote = UdpEcho::start(udp(REMOTE_HOST).await);
    let second = request(
        &mut stream,
        &control(BIND, RSU | RAW, 0x0301, first.aid, local, remote.addr),
    )
    .await;
    assert_eq!(second.code, 0x00, "{second:?}");
    assert_eq!(second.flags & RAW, 0, "{second:?}");
    // Delivery uses the 8-octet header, as for any binding.
    client
        .send_to(&datagram(first.aid, b"hello"), first.local)
        .await
        .unwrap();
    assert_eq!(remote.next().await, (first.remote, b"hello".to_vec()));
    assert_eq!(
        recv_udp(&client).await,
        (datagram(first.aid, b"hello"), first.local)
    );
}
