//! The gateway's resolver against a hostile nameserver in the test bed (RFC 5452): a reply with
//! the right id but another question, or with records of another name, is ignored, whether it
//! races a genuine answer (the genuine one is used) or comes alone (the lookup fails); 50
//! queries use 50 distinct ids and 50 distinct source ports. The client speaks socks5h (a
//! CONNECT naming a domain) from `client`; TCP listeners on the genuine and the forged address
//! in `server` show where the gateway really connected. Root only.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use hickory_proto::{
    op::{Message, Query},
    rr::{Name, RecordType},
};
use nameserver::{ScriptedNameserver, a_record, reply};
use testbed::{Netns, Testbed, addr, gateway::start_in_fw, wait_until};

#[path = "common/nameserver.rs"]
mod nameserver;

const PORT: u16 = 8080;
const GENUINE: Ipv4Addr = addr::SERVER_V4;
const FORGED: Ipv4Addr = addr::SERVER2_V4;

fn name(text: &str) -> Name {
    Name::from_ascii(text).unwrap()
}

/// The nameserver's replies depend on the name asked:
/// `race-question.test` gets a reply for another question first, then the genuine answer;
/// `race-records.test` gets records of another name first, then the genuine answer;
/// `forged-only.test` gets only a reply for another question; every other name the genuine
/// answer. Genuine means: A -> [`GENUINE`], AAAA -> no records.
fn hostile_script(query: &Message, question: &Query) -> Vec<Vec<u8>> {
    let genuine = if question.query_type() == RecordType::A {
        reply(
            query,
            question.clone(),
            vec![a_record(question.name(), GENUINE, 60)],
        )
    } else {
        reply(query, question.clone(), vec![])
    };
    let forged_question = || {
        let other = Query::query(name("elsewhere.test."), question.query_type());
        reply(
            query,
            other,
            vec![a_record(&name("elsewhere.test."), FORGED, 60)],
        )
    };
    let forged_records = || {
        reply(
            query,
            question.clone(),
            vec![a_record(&name("elsewhere.test."), FORGED, 60)],
        )
    };
    match question.name().to_ascii().as_str() {
        "race-question.test." => vec![forged_question(), genuine],
        "race-records.test." => vec![forged_records(), genuine],
        "forged-only.test." => vec![forged_question()],
        _ => vec![genuine],
    }
}

/// A TCP listener in `server` counting the connections it accepts.
struct Listener {
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    fn start(server: &Netns, ip: Ipv4Addr) -> Self {
        let listener = server
            .run(move || TcpListener::bind((ip, PORT)))
            .unwrap()
            .unwrap();
        listener.set_nonblocking(true).unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, stopped) = (Arc::clone(&accepted), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        count.fetch_add(1, Ordering::Relaxed);
                        held.push(stream);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Self {
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Waits (bounded) until `n` connections were accepted; whether they were.
    fn reaches(&self, n: usize) -> bool {
        wait_until(Duration::from_secs(5), || self.accepted() >= n)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A socks5h CONNECT to `host:PORT` from `client`, anonymous: the reply code.
fn socks5h_connect(client: &Netns, host: &str) -> u8 {
    let proxy = SocketAddr::new(IpAddr::V4(addr::FW_INSIDE_V4), 1080);
    let mut stream = client
        .run(move || TcpStream::connect_timeout(&proxy, Duration::from_secs(5)))
        .unwrap()
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    stream.write_all(&[5, 1, 0]).unwrap();
    let mut method = [0u8; 2];
    stream.read_exact(&mut method).unwrap();
    assert_eq!(method, [5, 0], "anonymous access");
    let mut request = vec![5, 1, 0, 3, u8::try_from(host.len()).unwrap()];
    request.extend_from_slice(host.as_bytes());
    request.extend_from_slice(&PORT.to_be_bytes());
    stream.write_all(&request).unwrap();
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).unwrap();
    head[1]
}

struct Setup {
    dns: ScriptedNameserver,
    genuine: Listener,
    forged: Listener,
    _gateway: (
        testbed::gateway::GatewayDaemon,
        testbed::gateway::InstanceCleanup,
    ),
    bed: Testbed,
}

fn setup() -> Setup {
    let bed = Testbed::new().unwrap();
    bed.add_second_server_address().unwrap();
    let dns = ScriptedNameserver::start(&bed.server, hostile_script);
    let genuine = Listener::start(&bed.server, GENUINE);
    let forged = Listener::start(&bed.server, FORGED);
    let gateway = start_in_fw(&bed, &["--resolver", &addr::SERVER_DNS_V4.to_string()]).unwrap();
    Setup {
        dns,
        genuine,
        forged,
        _gateway: gateway,
        bed,
    }
}

#[test]
fn a_forged_reply_racing_the_genuine_one_is_ignored() {
    let s = setup();
    for (i, host) in ["race-question.test", "race-records.test"]
        .into_iter()
        .enumerate()
    {
        assert_eq!(
            socks5h_connect(&s.bed.client, host),
            0,
            "{host}: the genuine answer is used"
        );
        assert!(
            s.genuine.reaches(i + 1),
            "{host}: connected to the genuine address"
        );
        assert_eq!(s.forged.accepted(), 0, "{host}: never to the forged one");
    }
}

#[test]
fn a_forged_reply_alone_fails_the_lookup() {
    let s = setup();
    assert_eq!(
        socks5h_connect(&s.bed.client, "forged-only.test"),
        4,
        "host unreachable: the only reply was for another question"
    );
    assert_eq!(s.forged.accepted() + s.genuine.accepted(), 0);
    assert!(
        s.dns
            .seen()
            .iter()
            .any(|(_, _, asked)| asked == "forged-only.test."),
        "the nameserver was asked"
    );
}

#[test]
fn fifty_queries_use_distinct_ids_and_source_ports() {
    let s = setup();
    for i in 0..25 {
        assert_eq!(socks5h_connect(&s.bed.client, &format!("n{i}.test")), 0);
    }
    // Each name is asked for A and AAAA: 50 queries.
    let seen = s.dns.seen();
    assert_eq!(seen.len(), 50, "{seen:?}");
    let mut ids: Vec<u16> = seen.iter().map(|(id, _, _)| *id).collect();
    let mut ports: Vec<u16> = seen.iter().map(|(_, port, _)| *port).collect();
    ids.sort_unstable();
    ids.dedup();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ids.len(), 50, "distinct ids");
    assert_eq!(ports.len(), 50, "distinct source ports");
    assert!(s.genuine.reaches(25));
    assert_eq!(s.forged.accepted(), 0);
}
