//! Unit tests of the socket-like bindings: local port pairs, and the bindings against the scripted gateway on loopback: what each UDP BIND
//! asks for, and how datagrams travel with header-less delivery granted (plain, on a socket
//! connected to the remote) and not granted (the 8-octet header through the internal relay).
//! The test's own UDP sockets stand in for the internal relay and for the remote.

use std::{future::Future, time::Duration};

use bytes::BytesMut;
use gateway_proto::enhanced::{DatagramHeader, UdpCommand};

use super::*;
use crate::{
    BindOptions, Client,
    fake_gateway::{FakeGateway, Raw, bindings},
};

const AID: u32 = 0x2A;
const RAW: BindOptions = BindOptions { raw: true };
/// What "nothing arrives" waits for.
const QUIET: Duration = Duration::from_millis(200);

async fn within<F: Future>(future: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(5), future)
        .await
        .expect("in time")
}

async fn loopback_socket() -> (UdpSocket, SocketAddr) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    (socket, addr)
}

/// A fake gateway whose bindings use `internal` as their internal relay, and a session on it.
async fn gateway(internal: SocketAddr, raw: Raw) -> (FakeGateway, EnhancedSession) {
    let relays = RelayAddrs {
        aid: AID,
        internal,
        external: "192.0.2.1:30000".parse().unwrap(),
    };
    let fake = FakeGateway::start(bindings(relays, raw));
    let session = Client::connect(fake.addr, None)
        .await
        .unwrap()
        .enhanced()
        .await
        .unwrap();
    (fake, session)
}

/// The next datagram on `socket` and its source.
async fn next(socket: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 2048];
    let (len, from) = within(socket.recv_from(&mut buf)).await.unwrap();
    buf.truncate(len);
    (buf, from)
}

async fn nothing_arrives(socket: &UdpSocket) -> bool {
    let mut buf = [0u8; 2048];
    tokio::time::timeout(QUIET, socket.recv_from(&mut buf))
        .await
        .is_err()
}

/// `payload` behind an Open binding's 8-octet header.
fn with_header(payload: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    DatagramHeader::new(AID).encode(&mut out).unwrap();
    out.extend_from_slice(payload);
    out.to_vec()
}

/// The binding's next payload and who sent it, through the library.
async fn received(binding: &UdpBinding) -> (Vec<u8>, Address) {
    let mut buf = vec![0u8; 2048];
    let (len, from) = within(binding.recv_from(&mut buf)).await.unwrap();
    buf.truncate(len);
    (buf, from)
}

#[tokio::test]
async fn local_pairs_are_even_then_odd() {
    let ip: IpAddr = "127.0.0.1".parse().unwrap();
    for _ in 0..8 {
        let (even, odd) = local_pair(ip).await.unwrap();
        let l = even.local_addr().unwrap().port();
        assert_eq!(l % 2, 0);
        assert_eq!(odd.local_addr().unwrap().port(), l + 1);
    }
}

#[tokio::test]
async fn a_granted_raw_binding_is_a_plain_socket_connected_to_the_remote() {
    let (relay, relay_addr) = loopback_socket().await;
    let (fake, session) = gateway(relay_addr, Raw::Grant).await;
    let binding = session.udp_socket_with(Family::V4, RAW).await.unwrap();
    let local = binding.local_addr().unwrap();

    binding.bind().await.unwrap();
    let step1 = fake.request();
    assert!(step1.flags.contains(Flags::RAW), "step 1 asks: {step1:?}");
    assert!(step1.remote.is_unspecified());
    assert_eq!((step1.aid, step1.local.clone()), (0, local.into()));
    assert!(!binding.is_raw(), "a step-1 echo is provisional");

    let (remote, remote_addr) = loopback_socket().await;
    binding.connect(remote_addr).await.unwrap();
    let step2 = fake.request();
    assert!(step2.flags.contains(Flags::RAW), "step 2 asks: {step2:?}");
    assert_eq!(step2.flags, step1.flags, "step 2 repeats step 1's flags");
    assert_eq!((step2.tid, step2.aid), (step1.tid, AID));
    assert_eq!(step2.remote, remote_addr.into());
    assert!(binding.is_raw());
    assert_eq!(binding.socket().peer_addr().unwrap(), remote_addr);

    // Inbound: plain, from the remote's own address; nothing is taken for a header, not even
    // a payload that would decode as one.
    remote.send_to(b"media", local).await.unwrap();
    assert_eq!(
        received(&binding).await,
        (b"media".to_vec(), remote_addr.into())
    );
    let looks_like_a_header = with_header(b"x");
    remote.send_to(&looks_like_a_header, local).await.unwrap();
    assert_eq!(received(&binding).await.0, looks_like_a_header);
    // The application may read the socket itself, like an unproxied connected socket.
    remote.send_to(b"direct", local).await.unwrap();
    let mut buf = [0u8; 64];
    let len = within(binding.socket().recv(&mut buf)).await.unwrap();
    assert_eq!(&buf[..len], b"direct");

    // Outbound: plain, to the remote itself, never to the internal relay.
    binding.send(b"report").await.unwrap();
    assert_eq!(next(&remote).await, (b"report".to_vec(), local));
    binding.send_to(remote_addr, b"again").await.unwrap();
    assert_eq!(next(&remote).await, (b"again".to_vec(), local));
    binding.socket().send(b"by hand").await.unwrap();
    assert_eq!(next(&remote).await, (b"by hand".to_vec(), local));
    assert!(nothing_arrives(&relay).await, "nothing goes to the relay");

    // Another destination is an error, not a silent send.
    let (stranger, stranger_addr) = loopback_socket().await;
    assert!(matches!(
        binding.send_to(stranger_addr, b"no").await,
        Err(ClientError::OtherRemote { .. })
    ));
    assert!(nothing_arrives(&stranger).await);
    // Only the remote is heard: neither a stranger nor the relay with a header gets through.
    stranger.send_to(b"stranger", local).await.unwrap();
    relay.send_to(&with_header(b"relay"), local).await.unwrap();
    remote.send_to(b"after", local).await.unwrap();
    assert_eq!(received(&binding).await.0, b"after");

    // Connecting again to the same remote is a no-op that sends nothing.
    binding.connect(remote_addr).await.unwrap();
    binding.release().await.unwrap();
    assert_eq!(fake.request().command, UdpCommand::Release);
    assert!(fake.quiet(QUIET));
}

#[tokio::test]
async fn a_raw_request_the_gateway_does_not_grant_uses_the_header() {
    let (relay, relay_addr) = loopback_socket().await;
    let (fake, session) = gateway(relay_addr, Raw::Refuse).await;
    let binding = session.udp_socket_with(Family::V4, RAW).await.unwrap();
    let local = binding.local_addr().unwrap();
    binding.bind().await.unwrap();
    let remote: SocketAddr = "203.0.113.2:6000".parse().unwrap();
    binding.connect(remote).await.unwrap();
    for step in [fake.request(), fake.request()] {
        assert!(step.flags.contains(Flags::RAW), "asked anyway: {step:?}");
    }
    assert!(!binding.is_raw());
    assert!(
        binding.socket().peer_addr().is_err(),
        "the socket talks to the relay, unconnected"
    );
    relay.send_to(&with_header(b"media"), local).await.unwrap();
    assert_eq!(received(&binding).await, (b"media".to_vec(), remote.into()));
    binding.send(b"up").await.unwrap();
    assert_eq!(next(&relay).await, (with_header(b"up"), local));
}

#[tokio::test]
async fn the_step_two_reply_decides_and_an_unasked_raw_is_ignored() {
    // RAW echoed at step 1 only: provisional, then not granted.
    let (relay, relay_addr) = loopback_socket().await;
    let (_fake, session) = gateway(relay_addr, Raw::StepOneOnly).await;
    let binding = session.udp_socket_with(Family::V4, RAW).await.unwrap();
    binding.bind().await.unwrap();
    binding
        .connect("203.0.113.2:6000".parse::<SocketAddr>().unwrap())
        .await
        .unwrap();
    assert!(!binding.is_raw());
    binding.send(b"up").await.unwrap();
    assert_eq!(next(&relay).await.0, with_header(b"up"));

    // A gateway that echoes RAW whatever it is asked: a binding that did not ask keeps the
    // header, and a Listen binding is never raw.
    let (relay, relay_addr) = loopback_socket().await;
    let (fake, session) = gateway(relay_addr, Raw::Always).await;
    let plain = session.udp_socket(Family::V4).await.unwrap();
    plain.bind().await.unwrap();
    plain
        .connect("203.0.113.2:6000".parse::<SocketAddr>().unwrap())
        .await
        .unwrap();
    for step in [fake.request(), fake.request()] {
        assert!(!step.flags.contains(Flags::RAW), "not asked: {step:?}");
    }
    assert!(!plain.is_raw());
    plain.send(b"up").await.unwrap();
    assert_eq!(next(&relay).await.0, with_header(b"up"));
    let listener = session.udp_socket_with(Family::V4, RAW).await.unwrap();
    listener.bind().await.unwrap();
    listener.listen().await.unwrap();
    let _step1 = fake.request();
    assert!(
        fake.request().flags.contains(Flags::RAW),
        "step 2 repeats it"
    );
    assert!(listener.is_listening() && !listener.is_raw());
}

#[tokio::test]
async fn send_to_on_an_unbound_raw_binding_is_a_raw_one_step_open() {
    let (_relay, relay_addr) = loopback_socket().await;
    let (fake, session) = gateway(relay_addr, Raw::Grant).await;
    let binding = session.udp_socket_with(Family::V4, RAW).await.unwrap();
    let (remote, remote_addr) = loopback_socket().await;
    binding.send_to(remote_addr, b"query").await.unwrap();
    let open = fake.request();
    assert!(open.flags.contains(Flags::RAW));
    assert_ne!(open.tid, 0);
    assert_eq!((open.aid, open.remote), (0, remote_addr.into()));
    assert!(binding.is_raw());
    assert_eq!(
        next(&remote).await,
        (b"query".to_vec(), binding.local_addr().unwrap())
    );
}

#[tokio::test]
async fn raw_is_refused_locally_where_it_cannot_work() {
    let (_relay, relay_addr) = loopback_socket().await;
    let (fake, session) = gateway(relay_addr, Raw::Grant).await;
    // LOCAL is 127.0.0.1: an IPv6 remote cannot be talked to from it.
    let v6 = session.udp_socket_with(Family::V6, RAW).await.unwrap();
    assert!(matches!(
        v6.bind().await,
        Err(ClientError::RawUnavailable(_))
    ));
    // A name: only the gateway would know the address the datagrams come from.
    let named = Address::Domain("media.test".into(), 6000);
    let unbound = session.udp_socket_with(Family::V4, RAW).await.unwrap();
    assert!(matches!(
        unbound.connect(named.clone()).await,
        Err(ClientError::RawUnavailable(_))
    ));
    assert!(fake.quiet(QUIET), "nothing was sent");
    let bound = session.udp_socket_with(Family::V4, RAW).await.unwrap();
    bound.bind().await.unwrap();
    let _step1 = fake.request();
    assert!(matches!(
        bound.connect(named).await,
        Err(ClientError::RawUnavailable(_))
    ));
    assert!(fake.quiet(QUIET), "no step 2 was sent");
    assert!(bound.external_addr().is_some() && bound.peer_addr().is_none());
    // Without RAW the same names are fine.
    let plain = session.udp_socket(Family::V6).await.unwrap();
    plain.bind().await.unwrap();
}

#[tokio::test]
#[expect(
    clippy::similar_names,
    reason = "RTP and RTCP are the protocol's names"
)]
async fn a_granted_raw_rtp_pair_connects_rtp_and_rtcp_to_the_source_ports() {
    // An RTP pair needs an even external relay port; the internal relay is never used.
    let (fake, session) = gateway("127.0.0.1:40000".parse().unwrap(), Raw::Grant).await;
    let pair = session.bind_rtp_pair_with(Family::V4, RAW).await.unwrap();
    let step1 = fake.request();
    assert!(
        step1.flags.contains(Flags::RAW | Flags::RTP_PAIR),
        "{step1:?}"
    );
    let (source_rtp, source_rtcp) = local_pair("127.0.0.1".parse().unwrap()).await.unwrap();
    let (s, s1) = (
        source_rtp.local_addr().unwrap(),
        source_rtcp.local_addr().unwrap(),
    );
    pair.connect(s).await.unwrap();
    let step2 = fake.request();
    assert!(
        step2.flags.contains(Flags::RAW | Flags::RTP_PAIR),
        "{step2:?}"
    );
    assert!(pair.is_raw() && pair.rtp().is_raw() && pair.rtcp().is_raw());
    assert_eq!(pair.rtp().socket().peer_addr().unwrap(), s);
    assert_eq!(pair.rtcp().socket().peer_addr().unwrap(), s1);

    let (l, l1) = (
        pair.rtp().local_addr().unwrap(),
        pair.rtcp().local_addr().unwrap(),
    );
    let mut buf = [0u8; 64];
    source_rtp.send_to(b"rtp", l).await.unwrap();
    let (len, from) = within(pair.rtp().recv_from(&mut buf)).await.unwrap();
    assert_eq!((&buf[..len], from), (&b"rtp"[..], s.into()));
    // The RTP port's datagram to the RTCP socket is not the RTCP flow's.
    source_rtp.send_to(b"wrong port", l1).await.unwrap();
    source_rtcp.send_to(b"sr", l1).await.unwrap();
    let (len, from) = within(pair.rtcp().recv_from(&mut buf)).await.unwrap();
    assert_eq!((&buf[..len], from), (&b"sr"[..], s1.into()));
    // Receiver reports go plain from L+1 to s+1.
    pair.rtcp().send(b"rr").await.unwrap();
    assert_eq!(next(&source_rtcp).await, (b"rr".to_vec(), l1));
    assert!(nothing_arrives(&source_rtp).await);
}
