//! Unit tests of the multicast bindings, async and blocking, against the scripted gateway on
//! loopback: the UDP BINDs, SET TTL and RELEASE they send (re-encoded to their exact octets),
//! each refusal's typed error, and the multicast-to-unicast receive path (header stripped,
//! other AIDs and other sources dropped). The test's own UDP socket plays the internal relay.

use std::{future::Future, time::Duration};

use gateway_proto::enhanced::{ControlReply, EnhancedReplyCode, Flags, UdpCommand};

use super::*;
use crate::{
    Client, Timeouts, blocking,
    fake_gateway::{FakeGateway, multicast},
};

const AID: u32 = 0x2A;
const GROUP: &str = "233.252.0.10:5004";

fn group() -> SocketAddr {
    GROUP.parse().unwrap()
}

fn ttl(value: u8) -> NonZeroU8 {
    NonZeroU8::new(value).unwrap()
}

async fn within<F: Future>(future: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(5), future)
        .await
        .expect("in time")
}

fn octets(request: &ControlRequest) -> Vec<u8> {
    let mut out = Vec::new();
    request.encode(&mut out).unwrap();
    out
}

/// `local` as the 7 octets of an IPv4 LOCAL (`01 ADDR PORT`).
fn v4(local: SocketAddr) -> Vec<u8> {
    let SocketAddr::V4(local) = local else {
        panic!("IPv4")
    };
    let mut out = vec![1];
    out.extend_from_slice(&local.ip().octets());
    out.extend_from_slice(&local.port().to_be_bytes());
    out
}

async fn session(
    refuse: Option<(UdpCommand, EnhancedReplyCode)>,
) -> (FakeGateway, EnhancedSession, tokio::net::UdpSocket) {
    let relay = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let fake = FakeGateway::start(multicast(relay.local_addr().unwrap(), AID, refuse));
    let session = Client::connect(fake.addr, None)
        .await
        .unwrap()
        .enhanced()
        .await
        .unwrap();
    (fake, session, relay)
}

fn datagram(aid: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 0, 0];
    out.extend_from_slice(&aid.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

#[tokio::test]
async fn subscribe_asks_for_the_mode_and_strips_the_header() {
    let (fake, session, relay) = session(None).await;
    let receiver = within(session.subscribe(group(), Some(MulticastMode::ToUnicast)))
        .await
        .unwrap();
    let request = fake.request();
    let local = receiver.local_addr().unwrap();
    // 01 SIZE 05 FLAGS=0031 (receive|multicast|MU) RSVD 00 TID AID 0, LOCAL, REMOTE the group.
    let mut expected = vec![0x01, 0x00, 0x1B, 0x05, 0x00, 0x31, 0x00];
    expected.extend_from_slice(&request.tid.to_be_bytes());
    expected.extend_from_slice(&[0; 4]);
    expected.extend_from_slice(&v4(local));
    expected.extend_from_slice(&v4(group()));
    assert_eq!(octets(&request), expected);
    assert_ne!(request.tid, 0);
    assert_eq!(local.ip(), session.local_ip());
    let binding = receiver.binding();
    assert_eq!(receiver.mode(), MulticastMode::ToUnicast);
    assert_eq!(
        (binding.aid, binding.group, binding.relay),
        (AID, group(), relay.local_addr().unwrap())
    );

    // Another AID from the relay, the right AID from another socket, a fragment: dropped.
    let stranger = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    relay
        .send_to(&datagram(AID + 1, b"other"), local)
        .await
        .unwrap();
    stranger
        .send_to(&datagram(AID, b"spoofed"), local)
        .await
        .unwrap();
    let mut fragment = datagram(AID, b"fragment");
    fragment[1] = 1;
    relay.send_to(&fragment, local).await.unwrap();
    relay
        .send_to(&datagram(AID, b"media"), local)
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let len = within(receiver.recv(&mut buf)).await.unwrap();
    assert_eq!(&buf[..len], b"media");

    within(receiver.release()).await.unwrap();
    let release = fake.request();
    assert_eq!(
        (release.command, release.tid, release.aid),
        (UdpCommand::Release, request.tid, AID)
    );
    // Released: nothing more is sent, recv says so.
    within(receiver.release()).await.unwrap();
    assert!(fake.quiet(Duration::from_millis(200)));
    assert!(matches!(
        within(receiver.recv(&mut buf)).await,
        Err(ClientError::WrongState { .. })
    ));
}

// Multi-threaded: the fake is read blocking while the writer task sends the RELEASE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_preference_takes_the_gateways_choice_and_mm_is_not_received_here() {
    let (fake, session, _relay) = session(None).await;
    let any = within(session.subscribe(group(), None)).await.unwrap();
    let request = fake.request();
    assert_eq!(request.flags, Flags::RECEIVE | Flags::MULTICAST);
    assert_eq!(any.mode(), MulticastMode::ToUnicast, "the fake's default");
    let mm = within(session.subscribe(group(), Some(MulticastMode::ToMulticast)))
        .await
        .unwrap();
    assert_eq!(
        fake.request().flags,
        Flags::RECEIVE | Flags::MULTICAST | Flags::MULTICAST_TO_MULTICAST
    );
    assert_eq!(mm.mode(), MulticastMode::ToMulticast);
    let mut buf = [0u8; 8];
    assert!(matches!(
        within(mm.recv(&mut buf)).await,
        Err(ClientError::WrongState { .. })
    ));
    // Dropping releases without waiting.
    drop(mm);
    let release = fake.request();
    assert_eq!((release.command, release.aid), (UdpCommand::Release, AID));
}

#[tokio::test]
async fn refusals_are_typed_and_bad_groups_are_not_sent() {
    for (code, error) in [
        (
            EnhancedReplyCode::MulticastReceiveNotAllowed,
            BindingError::MulticastReceiveNotAllowed,
        ),
        (
            EnhancedReplyCode::BadMulticastAddress,
            BindingError::BadMulticastAddress,
        ),
        (EnhancedReplyCode::NotAllowed, BindingError::NotAllowed),
    ] {
        let (_fake, session, _relay) = session(Some((UdpCommand::Bind, code))).await;
        let refused = within(session.subscribe(group(), None)).await;
        assert!(
            matches!(refused, Err(ClientError::Binding(e)) if e == error),
            "{code:?}: {refused:?}"
        );
    }
    for (code, error) in [
        (
            EnhancedReplyCode::MulticastSendNotAllowed,
            BindingError::MulticastSendNotAllowed,
        ),
        (
            EnhancedReplyCode::TtlNotAllowed,
            BindingError::TtlNotAllowed,
        ),
    ] {
        let (_fake, session, _relay) = session(Some((UdpCommand::Bind, code))).await;
        let refused = within(session.multicast_sender(group(), ttl(64))).await;
        assert!(
            matches!(refused, Err(ClientError::Binding(e)) if e == error),
            "{code:?}: {refused:?}"
        );
    }
    let (fake, session, _relay) = session(None).await;
    for bad in ["203.0.113.2:5004", "233.252.0.10:0"] {
        let bad: SocketAddr = bad.parse().unwrap();
        assert!(matches!(
            within(session.subscribe(bad, None)).await,
            Err(ClientError::NotMulticast(_))
        ));
    }
    assert!(fake.quiet(Duration::from_millis(200)), "nothing was sent");
}

// Multi-threaded: the fake is read blocking while the writer task sends the RELEASE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_answering_another_mode_is_not_an_answer_and_is_released() {
    let relay = "127.0.0.1:40000".parse().unwrap();
    let fake = FakeGateway::start(move |request: &ControlRequest| {
        let mut reply = multicast(relay, AID, None)(request);
        if request.command == UdpCommand::Bind {
            reply.flags = Flags::RECEIVE | Flags::MULTICAST | Flags::MULTICAST_TO_MULTICAST;
        }
        reply
    });
    let session = Client::connect(fake.addr, None)
        .await
        .unwrap()
        .enhanced()
        .await
        .unwrap();
    let answer = within(session.subscribe(group(), Some(MulticastMode::ToUnicast))).await;
    assert!(
        matches!(answer, Err(ClientError::UnexpectedReply(_))),
        "{answer:?}"
    );
    let bind = fake.request();
    let release = fake.request();
    assert_eq!(
        (release.command, release.tid, release.aid),
        (UdpCommand::Release, bind.tid, AID)
    );
}

#[tokio::test]
async fn a_sender_frames_its_datagrams_and_sets_its_ttl() {
    let (fake, session, relay) = session(None).await;
    let sender = within(session.multicast_sender(group(), ttl(8)))
        .await
        .unwrap();
    let request = fake.request();
    let local = sender.socket().local_addr().unwrap();
    // FLAGS 0012 (send|multicast), RSVD = TTL 8.
    let mut expected = vec![0x01, 0x00, 0x1B, 0x05, 0x00, 0x12, 0x08];
    expected.extend_from_slice(&request.tid.to_be_bytes());
    expected.extend_from_slice(&[0; 4]);
    expected.extend_from_slice(&v4(local));
    expected.extend_from_slice(&v4(group()));
    assert_eq!(octets(&request), expected);
    assert_eq!(sender.ttl(), ttl(8));
    assert_eq!(sender.binding().aid, AID + 1);

    within(sender.send(b"to the group")).await.unwrap();
    let mut buf = [0u8; 64];
    let (len, from) = within(relay.recv_from(&mut buf)).await.unwrap();
    assert_eq!(from, local);
    assert_eq!(&buf[..len], &datagram(AID + 1, b"to the group")[..]);

    within(sender.set_ttl(ttl(32))).await.unwrap();
    let set = fake.request();
    let mut expected = vec![0x01, 0x00, 0x1B, 0x07, 0x00, 0x00, 0x20];
    expected.extend_from_slice(&request.tid.to_be_bytes());
    expected.extend_from_slice(&(AID + 1).to_be_bytes());
    expected.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    assert_eq!(octets(&set), expected);
    assert_eq!(sender.ttl(), ttl(32));
    within(sender.release()).await.unwrap();
    assert_eq!(fake.request().command, UdpCommand::Release);
    assert!(matches!(
        within(sender.send(b"x")).await,
        Err(ClientError::WrongState { .. })
    ));
}

#[tokio::test]
async fn a_refused_set_ttl_keeps_the_ttl() {
    for (code, error) in [
        (
            EnhancedReplyCode::TtlNotAllowed,
            BindingError::TtlNotAllowed,
        ),
        (
            EnhancedReplyCode::BadAssociationContext,
            BindingError::BadAssociationContext,
        ),
        (
            EnhancedReplyCode::BadAssociationId,
            BindingError::BadAssociationId,
        ),
    ] {
        let (_fake, session, _relay) = session(Some((UdpCommand::SetTtl, code))).await;
        let sender = within(session.multicast_sender(group(), ttl(8)))
            .await
            .unwrap();
        let refused = within(sender.set_ttl(ttl(255))).await;
        assert!(
            matches!(refused, Err(ClientError::Binding(e)) if e == error),
            "{code:?}: {refused:?}"
        );
        assert_eq!(sender.ttl(), ttl(8));
    }
}

#[test]
fn blocking_subscribe_receive_set_ttl_and_release() {
    let relay = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let fake = FakeGateway::start(multicast(
        relay_addr,
        AID,
        Some((UdpCommand::SetTtl, EnhancedReplyCode::BadAssociationContext)),
    ));
    let mut session = blocking::Client::connect(fake.addr, None, Timeouts::default())
        .unwrap()
        .enhanced()
        .unwrap();
    let app = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    app.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let local = app.local_addr().unwrap();
    let mut binding = session
        .subscribe(local, group(), Some(MulticastMode::ToUnicast))
        .unwrap();
    let request = fake.request();
    assert_eq!(request.flags.bits(), 0x0031);
    assert_eq!(
        (request.local.clone(), request.remote.clone()),
        (local.into(), group().into())
    );
    assert_eq!(
        (binding.aid, binding.relay, binding.mode()),
        (AID, relay_addr, Some(MulticastMode::ToUnicast))
    );

    relay.send_to(&datagram(AID + 7, b"other"), local).unwrap();
    relay.send_to(&datagram(AID, b"media"), local).unwrap();
    let mut buf = [0u8; 64];
    let len = blocking::recv_multicast(&app, &binding, &mut buf).unwrap();
    assert_eq!(&buf[..len], b"media");
    assert!(matches!(
        blocking::send_multicast(&app, &binding, b"x"),
        Err(ClientError::WrongState { .. })
    ));

    // SET TTL on a receive binding: the gateway answers 13.
    let before = binding;
    assert!(matches!(
        session.set_ttl(&mut binding, ttl(4)),
        Err(ClientError::Binding(BindingError::BadAssociationContext))
    ));
    assert_eq!(binding, before);
    let set = fake.request();
    assert_eq!(
        (set.command, set.aid, set.ttl),
        (UdpCommand::SetTtl, AID, 4)
    );

    // A send binding, framed datagrams, release.
    let sender = session.multicast_send(local, group(), ttl(2)).unwrap();
    assert_eq!(fake.request().ttl, 2);
    blocking::send_multicast(&app, &sender, b"out").unwrap();
    let (len, from) = relay.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..len], from), (&datagram(AID + 1, b"out")[..], local));
    session.release_multicast(sender).unwrap();
    session.release_multicast(binding).unwrap();
    assert_eq!(fake.request().aid, AID + 1);
    assert_eq!(fake.request().aid, AID);
}

#[tokio::test]
async fn only_from_repeats_the_tid_local_and_flags_with_the_source_port_0() {
    let (fake, session, _relay) = session(None).await;
    let receiver = within(session.subscribe(group(), None)).await.unwrap();
    let subscribe = fake.request();
    let source: std::net::IpAddr = "203.0.113.2".parse().unwrap();
    within(receiver.only_from(source)).await.unwrap();
    let named = fake.request();
    let local = receiver.local_addr().unwrap();
    // 01 SIZE 05 FLAGS=0031 (the chosen mode spelt out) RSVD 00 TID (the subscription's) AID 0,
    // LOCAL again, REMOTE = the source, port 0.
    let mut expected = vec![0x01, 0x00, 0x1B, 0x05, 0x00, 0x31, 0x00];
    expected.extend_from_slice(&subscribe.tid.to_be_bytes());
    expected.extend_from_slice(&[0; 4]);
    expected.extend_from_slice(&v4(local));
    expected.extend_from_slice(&v4(SocketAddr::new(source, 0)));
    assert_eq!(octets(&named), expected);
    // Bad sources are not sent.
    for bad in ["233.252.0.1", "0.0.0.0", "2001:db8::2"] {
        assert!(
            matches!(
                within(receiver.only_from(bad.parse().unwrap())).await,
                Err(ClientError::BadSource(_))
            ),
            "{bad}"
        );
    }
    assert!(fake.quiet(Duration::from_millis(200)));
    within(receiver.release()).await.unwrap();
}

#[tokio::test]
async fn a_refused_source_is_a_typed_error() {
    let (_fake, session, _relay) = session_refusing_second_bind().await;
    let receiver = within(session.subscribe(group(), None)).await.unwrap();
    assert!(matches!(
        within(receiver.only_from("203.0.113.3".parse().unwrap())).await,
        Err(ClientError::Binding(
            BindingError::MulticastReceiveNotAllowed
        ))
    ));
}

/// A gateway that grants the first UDP BIND and answers `11` to the next.
async fn session_refusing_second_bind() -> (FakeGateway, EnhancedSession, tokio::net::UdpSocket) {
    let relay = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut grant = multicast(relay.local_addr().unwrap(), AID, None);
    let mut binds = 0;
    let fake = FakeGateway::start(move |request: &ControlRequest| {
        if request.command == UdpCommand::Bind {
            binds += 1;
            if binds > 1 {
                return ControlReply::echo(request, EnhancedReplyCode::MulticastReceiveNotAllowed);
            }
        }
        grant(request)
    });
    let session = Client::connect(fake.addr, None)
        .await
        .unwrap()
        .enhanced()
        .await
        .unwrap();
    (fake, session, relay)
}
