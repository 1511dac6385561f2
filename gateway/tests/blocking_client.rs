//! The synchronous core of the client library (`gateway_client::blocking`) against the real
//! server, in-process on loopback: CONNECT by IP and by name, RFC 1929 good and bad, and the
//! two-step binding (nothing admitted after step 1, exact admission after step 2, release), as
//! the `LD_PRELOAD` shim will drive it. Blocking calls run on the blocking pool; every wait is
//! bounded.

mod common;

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    time::Duration,
};

use common::{
    gateway::{BLOCKING_CLIENT_PORTS, Gateway, resolver, users},
    peers::{LOCALHOST, REMOTE_HOST, fake_nameserver, tcp_echo},
};
use gateway_client::{
    Address, BindingError, ClientError, Family, Timeouts,
    blocking::{Client, Session},
};

fn timeouts() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(5),
        handshake: Duration::from_secs(5),
        request: Duration::from_secs(5),
        control: Duration::from_secs(5),
    }
}

async fn blocking<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    tokio::time::timeout(Duration::from_secs(30), tokio::task::spawn_blocking(f))
        .await
        .expect("bounded")
        .unwrap()
}

#[tokio::test]
async fn connect_by_ip_and_by_name_and_passwords() {
    let echo = tcp_echo(LOCALHOST).await.addr;
    let dns = fake_nameserver(vec![("echo.test", Ipv4Addr::LOCALHOST)]).await;
    let names = resolver(&[dns]);
    let gateway = Gateway::start(|services| {
        services.access.get_mut().allow_anonymous = false;
        services.access.get_mut().users = Some(users("alice", "secret"));
        services.resolver = names;
    })
    .await;
    let proxy = gateway.addr;
    blocking(move || {
        for target in [
            Address::Ip(echo),
            Address::Domain("echo.test".into(), echo.port()),
        ] {
            let credentials = Some(("alice".to_owned(), "secret".to_owned()));
            let client = Client::connect(proxy, credentials, timeouts()).unwrap();
            assert_eq!(client.method(), gateway_client::Method::UserPass);
            let (mut stream, bound) = client.tcp_connect(target.clone()).unwrap();
            assert!(matches!(bound, Address::Ip(_)), "{target}");
            stream.write_all(b"ping").unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut echoed = [0u8; 4];
            stream.read_exact(&mut echoed).unwrap();
            assert_eq!(&echoed, b"ping", "{target}");
        }
        let wrong = Some(("alice".to_owned(), "guess".to_owned()));
        assert!(matches!(
            Client::connect(proxy, wrong, timeouts()),
            Err(ClientError::BadCredentials(_))
        ));
        assert!(matches!(
            Client::connect(proxy, None, timeouts()),
            Err(ClientError::NoAcceptableMethod)
        ));
    })
    .await;
}

/// Waits up to `wait` for a datagram on `socket`.
fn receive(socket: &UdpSocket, wait: Duration) -> Option<Vec<u8>> {
    socket.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 2048];
    socket.recv(&mut buf).ok().map(|len| buf[..len].to_vec())
}

#[tokio::test]
async fn the_two_step_binding_admits_exactly_the_confirmed_remote() {
    let gateway = Gateway::start_enhanced(&BLOCKING_CLIENT_PORTS, |_| {}, |_| {}).await;
    let proxy = gateway.addr;
    blocking(move || {
        let mut session: Session = Client::connect(proxy, None, timeouts())
            .unwrap()
            .enhanced()
            .unwrap();
        let app = UdpSocket::bind((LOCALHOST, 0)).unwrap();
        let remote = UdpSocket::bind((REMOTE_HOST, 0)).unwrap();
        let other = UdpSocket::bind((REMOTE_HOST, 0)).unwrap();
        let mut binding = session.bind(app.local_addr().unwrap(), Family::V4).unwrap();
        let relays = binding.relays();
        assert_ne!(relays.aid, 0);
        remote.send_to(b"too early", relays.external).unwrap();
        assert_eq!(
            receive(&app, Duration::from_millis(300)),
            None,
            "step 1 admits nothing"
        );

        let remote_addr = remote.local_addr().unwrap();
        let confirmed = session.connect(&mut binding, remote_addr).unwrap();
        assert_eq!(confirmed, relays, "step 2 keeps the relays");
        assert_eq!(binding.remote(), Some(&Address::Ip(remote_addr)));
        // The same remote again is a no-op; another is refused before it reaches the gateway.
        session.connect(&mut binding, remote_addr).unwrap();
        assert!(matches!(
            session.connect(&mut binding, other.local_addr().unwrap()),
            Err(ClientError::OtherRemote { .. })
        ));
        other.send_to(b"not admitted", relays.external).unwrap();
        remote.send_to(b"media", relays.external).unwrap();
        let datagram =
            receive(&app, Duration::from_secs(5)).expect("the confirmed remote's datagram");
        assert!(
            datagram.ends_with(b"media"),
            "header, then the payload: {datagram:?}"
        );
        assert_eq!(datagram.len(), 8 + 5, "the 8-octet header");
        assert_eq!(
            receive(&app, Duration::from_millis(300)),
            None,
            "only that remote"
        );

        session.release(binding.clone()).unwrap();
        // A second release of the same binding: the gateway no longer knows the AID.
        assert!(matches!(
            session.release(binding),
            Err(ClientError::Binding(BindingError::BadAssociationId))
        ));
        remote.send_to(b"after release", relays.external).unwrap();
        assert_eq!(receive(&app, Duration::from_millis(300)), None, "released");
        // A one-step Open on the same session.
        let open = session
            .open(app.local_addr().unwrap(), SocketAddr::new(REMOTE_HOST, 9))
            .unwrap();
        assert!(open.remote().is_some());
    })
    .await;
}

#[tokio::test]
async fn udp_associate_relays_for_the_applications_own_socket() {
    let gateway = Gateway::start(|_| {}).await;
    let proxy = gateway.addr;
    blocking(move || {
        let app = UdpSocket::bind((LOCALHOST, 0)).unwrap();
        let echo = UdpSocket::bind((LOCALHOST, 0)).unwrap();
        let echo_addr = echo.local_addr().unwrap();
        let (control, relay) = Client::connect(proxy, None, timeouts())
            .unwrap()
            .udp_associate(app.local_addr().unwrap())
            .unwrap();
        assert_eq!(relay.ip(), LOCALHOST, "the relay is reachable");
        // RFC 1928 framing: RSV RSV FRAG ATYP=1 ADDR PORT, then the payload.
        let mut framed = vec![0, 0, 0, 1];
        framed.extend_from_slice(&[127, 0, 0, 1]);
        framed.extend_from_slice(&echo_addr.port().to_be_bytes());
        framed.extend_from_slice(b"over udp");
        app.send_to(&framed, relay).unwrap();
        echo.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 1500];
        let (len, relayed_from) = echo.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"over udp");
        echo.send_to(b"answer", relayed_from).unwrap();
        let answer = receive(&app, Duration::from_secs(5)).expect("the answer, relayed back");
        assert_eq!(
            &answer[..10],
            &framed[..10],
            "framed with the echo's address"
        );
        assert_eq!(&answer[10..], b"answer");
        drop(control);
    })
    .await;
}
