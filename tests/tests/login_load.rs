//! Password checks cannot stall the relay: 16 logins at once (each an Argon2 verification, slow
//! on purpose) while a userspace-relayed UDP stream runs at 1,000 datagrams per second. Every
//! datagram carries its send time (`CLOCK_MONOTONIC`, shared by all namespaces of the host), so
//! the stream measures its own delay through the gateway; none may be late by more than 50 ms.
//! Root only.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use nix::time::{ClockId, clock_gettime};
use testbed::{
    Netns, Testbed, addr,
    gateway::{passwd_line, start_in_fw},
};

const LOGINS: usize = 16;
const RATE_PER_SECOND: u64 = 1000;
const MAX_DELAY: Duration = Duration::from_millis(50);

fn now_ns() -> u64 {
    let t = clock_gettime(ClockId::CLOCK_MONOTONIC).unwrap();
    u64::try_from(t.tv_sec()).unwrap() * 1_000_000_000 + u64::try_from(t.tv_nsec()).unwrap()
}

fn proxy() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(addr::FW_INSIDE_V4), 1080)
}

fn connect(client: &Netns) -> TcpStream {
    let proxy = proxy();
    let stream = client
        .run(move || TcpStream::connect_timeout(&proxy, Duration::from_secs(5)))
        .unwrap()
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_mins(2)))
        .unwrap();
    stream
}

/// An RFC 1929 login: whether the gateway accepted it.
fn login(mut stream: TcpStream, user: &str, password: &str) -> bool {
    stream.write_all(&[5, 1, 2]).unwrap();
    let mut method = [0u8; 2];
    stream.read_exact(&mut method).unwrap();
    assert_eq!(method, [5, 2], "username/password chosen");
    let mut request = vec![1, u8::try_from(user.len()).unwrap()];
    request.extend_from_slice(user.as_bytes());
    request.push(u8::try_from(password.len()).unwrap());
    request.extend_from_slice(password.as_bytes());
    stream.write_all(&request).unwrap();
    let mut status = [0u8; 2];
    stream.read_exact(&mut status).is_ok() && status == [1, 0]
}

/// An anonymous RFC 1928 UDP ASSOCIATE: the control connection (kept open) and the relay.
fn associate(client: &Netns) -> (TcpStream, SocketAddr) {
    let mut stream = connect(client);
    stream.write_all(&[5, 1, 0]).unwrap();
    let mut method = [0u8; 2];
    stream.read_exact(&mut method).unwrap();
    assert_eq!(method, [5, 0]);
    stream.write_all(&[5, 3, 0, 1, 0, 0, 0, 0, 0, 0]).unwrap();
    let mut reply = [0u8; 10];
    stream.read_exact(&mut reply).unwrap();
    assert_eq!(reply[..4], [5, 0, 0, 1], "association granted");
    let ip = Ipv4Addr::new(reply[4], reply[5], reply[6], reply[7]);
    let port = u16::from_be_bytes([reply[8], reply[9]]);
    (stream, SocketAddr::new(IpAddr::V4(ip), port))
}

/// A stream through an anonymous UDP ASSOCIATE (the client admits the sender first), each
/// datagram stamped with its send time; the receiving side keeps the worst delay.
struct TimedStream {
    running: Arc<AtomicBool>,
    sender: std::thread::JoinHandle<u64>,
    receiver: std::thread::JoinHandle<(u64, u64)>,
    _control: TcpStream,
}

impl TimedStream {
    fn start(bed: &Testbed) -> Self {
        let (control, relay) = associate(&bed.client);
        let client_socket = bed
            .client
            .udp_socket("198.51.100.2:0", Duration::from_millis(200))
            .unwrap();
        let server_socket = bed
            .server
            .udp_socket("203.0.113.2:9000", Duration::from_secs(5))
            .unwrap();
        let mut hello = vec![0, 0, 0, 1];
        hello.extend_from_slice(&addr::SERVER_V4.octets());
        hello.extend_from_slice(&9000u16.to_be_bytes());
        hello.extend_from_slice(b"hello");
        client_socket.send_to(&hello, relay).unwrap();
        let mut buf = [0u8; 1500];
        let (_, gateway_outside) = server_socket
            .recv_from(&mut buf)
            .expect("the hello arrives");
        let running = Arc::new(AtomicBool::new(true));
        let sending = Arc::clone(&running);
        let sender = std::thread::spawn(move || {
            let interval = 1_000_000_000 / RATE_PER_SECOND;
            let start = now_ns();
            let mut sent = 0u64;
            // Bounded: two minutes at most, whatever the logins do.
            while sending.load(Ordering::Relaxed) && sent < 120 * RATE_PER_SECOND {
                let due = start + sent * interval;
                let now = now_ns();
                if now < due {
                    std::thread::sleep(Duration::from_nanos(due - now));
                }
                let _ = server_socket.send_to(&now_ns().to_be_bytes(), gateway_outside);
                sent += 1;
            }
            sent
        });
        let receiving = Arc::clone(&running);
        let receiver = std::thread::spawn(move || {
            let (mut count, mut worst) = (0u64, 0u64);
            let mut buf = [0u8; 1500];
            while receiving.load(Ordering::Relaxed) {
                let Ok((len, _)) = client_socket.recv_from(&mut buf) else {
                    continue;
                };
                let now = now_ns();
                // 10 octets of RFC 1928 header (IPv4), then the send time.
                let Some(stamp) = buf.get(10..18).filter(|_| len == 18) else {
                    continue;
                };
                let stamp = u64::from_be_bytes(stamp.try_into().unwrap());
                count += 1;
                worst = worst.max(now.saturating_sub(stamp));
            }
            (count, worst)
        });
        Self {
            running,
            sender,
            receiver,
            _control: control,
        }
    }

    /// Stops the stream: (sent, received, worst delay in ns).
    fn finish(self) -> (u64, u64, u64) {
        self.running.store(false, Ordering::Relaxed);
        let sent = self.sender.join().unwrap();
        let (received, worst) = self.receiver.join().unwrap();
        (sent, received, worst)
    }
}

#[test]
fn logins_do_not_delay_a_userspace_relayed_stream() {
    let bed = Testbed::new().unwrap();
    let users = std::env::temp_dir().join(format!("gateway-login-load-{}", std::process::id()));
    std::fs::write(&users, passwd_line("alice", "correct horse").unwrap()).unwrap();
    let (_gateway, _cleanup) = start_in_fw(
        &bed,
        &[
            "--datapath",
            "userspace",
            "--users",
            users.to_str().unwrap(),
            // The test binary's Argon2 is unoptimised (seconds per check), and queued logins
            // count against the handshake timeout.
            "--handshake-timeout",
            "120",
        ],
    )
    .unwrap();

    let stream = TimedStream::start(&bed);
    let logins: Vec<_> = (0..LOGINS)
        .map(|_| {
            let stream = connect(&bed.client);
            std::thread::spawn(move || {
                let start = now_ns();
                let accepted = login(stream, "alice", "correct horse");
                (accepted, now_ns() - start)
            })
        })
        .collect();
    let results: Vec<(bool, u64)> = logins.into_iter().map(|t| t.join().unwrap()).collect();
    let (sent, received, worst) = stream.finish();
    let _ = std::fs::remove_file(&users);

    assert!(
        results.iter().all(|(accepted, _)| *accepted),
        "every login accepted: {results:?}"
    );
    let slowest_login = results.iter().map(|(_, ns)| *ns).max().unwrap_or(0);
    eprintln!(
        "{LOGINS} logins, the slowest took {} ms; stream: {sent} sent, {received} measured, \
         worst delay {} us",
        slowest_login / 1_000_000,
        worst / 1000
    );
    assert!(
        received >= 100,
        "the stream ran during the logins ({received} datagrams)"
    );
    assert!(
        Duration::from_nanos(worst) <= MAX_DELAY,
        "a datagram was {} ms late during the logins (limit {MAX_DELAY:?})",
        worst / 1_000_000
    );
}
