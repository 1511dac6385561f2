//! Unit tests of the synchronous core against the scripted gateway on loopback: what its UDP
//! BINDs ask for, and what it reports about header-less delivery (provisional after step 1,
//! decided by the confirming reply, never for a RAW it did not ask for, refused locally where it
//! cannot work).

use std::net::UdpSocket;

use super::*;
use crate::fake_gateway::{FakeGateway, Raw, bindings};

const RAW: BindOptions = BindOptions { raw: true };

fn start(raw: Raw) -> (FakeGateway, Session) {
    let relays = RelayAddrs {
        aid: 0x2A,
        internal: "127.0.0.1:40000".parse().unwrap(),
        external: "192.0.2.1:30000".parse().unwrap(),
    };
    let fake = FakeGateway::start(bindings(relays, raw));
    let session = Client::connect(fake.addr, None, Timeouts::default())
        .unwrap()
        .enhanced()
        .unwrap();
    (fake, session)
}

/// An application socket's address, as the shim would pass it.
fn app() -> (UdpSocket, SocketAddr) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    (socket, addr)
}

const SOURCE: &str = "127.0.0.2:6000";

#[test]
fn raw_is_asked_in_both_steps_and_the_step_two_reply_grants_it() {
    let (fake, mut session) = start(Raw::Grant);
    let (_app, local) = app();
    let mut binding = session.bind_with(local, Family::V4, RAW).unwrap();
    let step1 = fake.request();
    assert!(step1.flags.contains(Flags::RAW), "{step1:?}");
    assert!(binding.reply_flags().contains(Flags::RAW), "provisional");
    assert!(!binding.is_raw(), "not before step 2");
    let source: SocketAddr = SOURCE.parse().unwrap();
    session.connect(&mut binding, source).unwrap();
    let step2 = fake.request();
    assert_eq!((step2.flags, step2.tid), (step1.flags, step1.tid));
    assert!(binding.is_raw());
    assert!(binding.reply_flags().contains(Flags::RAW));
}

#[test]
fn without_the_echo_the_binding_keeps_the_header() {
    // Provisional at step 1, not granted at step 2.
    let (_fake, mut session) = start(Raw::StepOneOnly);
    let (_app, local) = app();
    let mut binding = session.bind_with(local, Family::V4, RAW).unwrap();
    assert!(binding.reply_flags().contains(Flags::RAW));
    session
        .connect(&mut binding, SOURCE.parse::<SocketAddr>().unwrap())
        .unwrap();
    assert!(!binding.is_raw());
    assert!(!binding.reply_flags().contains(Flags::RAW));
    // Not granted in a one-step Open either.
    let (fake, mut session) = start(Raw::Refuse);
    let open = session
        .open_with(local, SOURCE.parse::<SocketAddr>().unwrap(), RAW)
        .unwrap();
    assert!(fake.request().flags.contains(Flags::RAW));
    assert!(!open.is_raw());
}

#[test]
fn a_one_step_open_is_raw_when_asked_and_granted_only() {
    let source = SOURCE.parse::<SocketAddr>().unwrap();
    let (fake, mut session) = start(Raw::Always);
    let (_app, local) = app();
    let asked = session.open_with(local, source, RAW).unwrap();
    assert!(fake.request().flags.contains(Flags::RAW));
    assert!(asked.is_raw());
    // A RAW the client did not ask for changes nothing.
    let plain = session.open(local, source).unwrap();
    assert!(!fake.request().flags.contains(Flags::RAW));
    assert!(plain.reply_flags().contains(Flags::RAW) && !plain.is_raw());
}

#[test]
fn raw_is_refused_locally_where_it_cannot_work() {
    let (fake, mut session) = start(Raw::Grant);
    let latch = "127.0.0.1:0".parse().unwrap();
    assert!(matches!(
        session.bind_with(latch, Family::V4, RAW),
        Err(ClientError::RawUnavailable(_))
    ));
    let (_app, local) = app();
    assert!(matches!(
        session.open_with(local, Address::Domain("media.test".into(), 6000), RAW),
        Err(ClientError::RawUnavailable(_))
    ));
    assert!(fake.quiet(Duration::from_millis(200)), "nothing was sent");
    // The session is still good.
    session.bind_with(local, Family::V4, RAW).unwrap();
}
