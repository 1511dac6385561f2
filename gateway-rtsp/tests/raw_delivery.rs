//! `play` with and without `--raw`, in-process on loopback and without root: the demo media
//! server, and a fake gateway that splices SOCKS5 CONNECT and answers the enhanced mode's UDP
//! BINDs. Where it grants header-less delivery it names the client's own LOCAL pair as the
//! external relay, so the server's RTP and RTCP reach the client plain and from the server's own
//! ports, exactly what a gateway on the route delivers after rewriting the destination; where it
//! does not, it relays the pair with the 8-octet header like the real userspace relay. Either way
//! the audio must arrive sample-exact, with receiver reports reaching the server.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::BytesMut;
use gateway_proto::{
    Address, Command, Greeting, Method, MethodSelection, ProtocolError, Reply, ReplyCode, Request,
    enhanced::{
        ControlReply, ControlRequest, DatagramHeader, EnhancedReplyCode, EntryReply, Flags, Packet,
        UdpCommand,
    },
};
use gateway_rtsp::{
    audio::{Audio, Codec},
    client::{Event, PlayOptions, PlayReport, play},
    server::{DemoServer, ServerConfig, ServerStats},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::oneshot,
};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const AID: u32 = 0x2A;
/// Bound on a whole play: the clip is one second long.
const PLAY_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether the fake gateway grants RAW when asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Raw {
    Grant,
    Refuse,
}

/// The fake gateway's control address and the UDP BIND flags it was sent.
struct FakeGateway {
    addr: SocketAddr,
    bind_flags: Arc<Mutex<Vec<Flags>>>,
}

impl FakeGateway {
    async fn start(raw: Raw) -> Self {
        let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let bind_flags = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&bind_flags);
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                tokio::spawn(connection(stream, raw, Arc::clone(&record)));
            }
        });
        Self { addr, bind_flags }
    }
}

/// Reads one message that `decode` recognises, keeping what follows in `buffer`.
async fn read_message<T>(
    stream: &mut TcpStream,
    buffer: &mut BytesMut,
    decode: impl Fn(&mut BytesMut) -> Result<Option<T>, ProtocolError>,
) -> Option<T> {
    loop {
        if let Some(message) = decode(buffer).unwrap() {
            return Some(message);
        }
        if stream.read_buf(buffer).await.ok()? == 0 {
            return None;
        }
    }
}

/// One control connection: no authentication, then CONNECT (spliced) or the enhanced mode.
async fn connection(mut stream: TcpStream, raw: Raw, record: Arc<Mutex<Vec<Flags>>>) {
    let mut buffer = BytesMut::new();
    let greeting = read_message(&mut stream, &mut buffer, Greeting::decode)
        .await
        .unwrap();
    assert!(greeting.offers(Method::NoAuth));
    let mut out = BytesMut::new();
    MethodSelection {
        method: Method::NoAuth,
    }
    .encode(&mut out);
    stream.write_all(&out).await.unwrap();
    let request = read_message(&mut stream, &mut buffer, Request::decode)
        .await
        .unwrap();
    match request.command {
        Command::Connect => {
            let Address::Ip(target) = request.address else {
                panic!("CONNECT by name: {}", request.address)
            };
            let mut upstream = TcpStream::connect(target).await.unwrap();
            let mut out = BytesMut::new();
            Reply {
                code: ReplyCode::Succeeded,
                address: upstream.local_addr().unwrap().into(),
            }
            .encode(&mut out)
            .unwrap();
            stream.write_all(&out).await.unwrap();
            upstream.write_all(&buffer).await.unwrap();
            let _ = tokio::io::copy_bidirectional(&mut stream, &mut upstream).await;
        }
        Command::EnhancedUdp => {
            let mut out = BytesMut::new();
            EntryReply::Entered(Address::UNSPECIFIED_V4)
                .encode(&mut out)
                .unwrap();
            stream.write_all(&out).await.unwrap();
            enhanced(stream, buffer, raw, record).await;
        }
        other => panic!("unexpected command {other:?}"),
    }
}

/// The relay sockets of one RTP-pair binding: external P, P+1 and internal Q, Q+1.
struct RelayPair {
    external: [Arc<UdpSocket>; 2],
    internal: [Arc<UdpSocket>; 2],
}

impl RelayPair {
    async fn bind() -> Self {
        let (external, external_next) = even_pair().await;
        let (internal, internal_next) = even_pair().await;
        Self {
            external: [Arc::new(external), Arc::new(external_next)],
            internal: [Arc::new(internal), Arc::new(internal_next)],
        }
    }

    fn addr(socket: &UdpSocket) -> SocketAddr {
        socket.local_addr().unwrap()
    }

    /// Relays both flows (RTP, then RTCP on the next ports) between the remote and the client,
    /// adding and stripping the header, until the test ends.
    fn relay(&self, remote: SocketAddr, client: SocketAddr) {
        for (offset, (external, internal)) in (0..).zip(self.external.iter().zip(&self.internal)) {
            let (remote, client) = (shift(remote, offset), shift(client, offset));
            let (external, internal) = (Arc::clone(external), Arc::clone(internal));
            let (inbound_external, inbound_internal) =
                (Arc::clone(&external), Arc::clone(&internal));
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65_536];
                loop {
                    let (len, from) = inbound_external.recv_from(&mut buf).await.unwrap();
                    if from != remote {
                        continue;
                    }
                    let mut out = BytesMut::new();
                    DatagramHeader::new(AID).encode(&mut out).unwrap();
                    out.extend_from_slice(&buf[..len]);
                    let _ = inbound_internal.send_to(&out, client).await;
                }
            });
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65_536];
                loop {
                    let (len, from) = internal.recv_from(&mut buf).await.unwrap();
                    let mut datagram = &buf[..len];
                    let Ok(header) = DatagramHeader::decode(&mut datagram) else {
                        continue;
                    };
                    if from == client && header.aid == AID {
                        let _ = external.send_to(datagram, remote).await;
                    }
                }
            });
        }
    }
}

/// Two UDP sockets on loopback, ports even and even + 1.
async fn even_pair() -> (UdpSocket, UdpSocket) {
    loop {
        let first = UdpSocket::bind((LOCALHOST, 0)).await.unwrap();
        let port = first.local_addr().unwrap().port();
        if port % 2 != 0 {
            continue;
        }
        if let Ok(second) = UdpSocket::bind((LOCALHOST, port + 1)).await {
            return (first, second);
        }
    }
}

fn shift(addr: SocketAddr, offset: u16) -> SocketAddr {
    SocketAddr::new(addr.ip(), addr.port() + offset)
}

/// The enhanced mode: RTP-pair bindings (step 1, step 2 Open, release), RAW per `raw`.
async fn enhanced(
    mut stream: TcpStream,
    mut buffer: BytesMut,
    raw: Raw,
    record: Arc<Mutex<Vec<Flags>>>,
) {
    let mut relays = Vec::new();
    while let Some(packet) = read_message(&mut stream, &mut buffer, Packet::decode).await {
        let Packet::Request(request) = packet else {
            panic!("the client sent {packet:?}")
        };
        let reply = match request.command {
            UdpCommand::Bind => {
                record.lock().unwrap().push(request.flags);
                if request.aid == 0 {
                    relays.push(RelayPair::bind().await);
                }
                bind_reply(&request, relays.last().unwrap(), raw)
            }
            _ => ControlReply::echo(&request, EnhancedReplyCode::Succeeded),
        };
        let mut out = BytesMut::new();
        Packet::Reply(reply).encode(&mut out).unwrap();
        stream.write_all(&out).await.unwrap();
    }
}

fn bind_reply(request: &ControlRequest, pair: &RelayPair, raw: Raw) -> ControlReply {
    let Address::Ip(local) = request.local else {
        panic!("LOCAL {}", request.local)
    };
    let granted = raw == Raw::Grant && request.flags.contains(Flags::RAW);
    let mut flags = request.flags - Flags::RAW;
    if granted {
        flags.insert(Flags::RAW);
    }
    let step_one = request.remote.is_unspecified();
    if step_one {
        flags.insert(Flags::REMOTE_PENDING);
    } else if !granted {
        let Address::Ip(remote) = request.remote else {
            panic!("REMOTE {}", request.remote)
        };
        pair.relay(remote, local);
    }
    // Granted, the server is told to send to LOCAL itself: what reaches the client is then what
    // a gateway on the route delivers, plain and from the server's ports.
    let external = if granted {
        local
    } else {
        RelayPair::addr(&pair.external[0])
    };
    ControlReply {
        code: EnhancedReplyCode::Succeeded,
        flags,
        ttl: 0,
        tid: request.tid,
        aid: AID,
        local: RelayPair::addr(&pair.internal[0]).into(),
        remote: external.into(),
    }
}

fn tone() -> Audio {
    Audio::tone(8000, 1.0, 440.0)
}

async fn start_media() -> (String, Arc<ServerStats>, oneshot::Sender<()>) {
    let config = ServerConfig::new(tone(), Codec::L16).unwrap();
    let server = DemoServer::bind(SocketAddr::new(LOCALHOST, 0), config)
        .await
        .unwrap();
    let (url, stats) = (server.url().unwrap(), server.stats());
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    (url, stats, stop)
}

/// Plays the clip through a fake gateway granting or refusing RAW; returns the report, the
/// events, the flags of every UDP BIND and the server's receiver-report count.
async fn play_through(raw: Raw, ask_raw: bool) -> (PlayReport, Vec<Event>, Vec<Flags>, u64) {
    let gateway = FakeGateway::start(raw).await;
    let (url, stats, _stop) = start_media().await;
    let events = Arc::new(Mutex::new(Vec::new()));
    let mut options = PlayOptions::new(url, gateway.addr);
    options.duration = Duration::from_secs(10);
    options.rtcp_interval = Duration::from_millis(300);
    options.raw = ask_raw;
    let sink = Arc::clone(&events);
    options.progress = Some(Arc::new(move |event: &Event| {
        sink.lock().unwrap().push(event.clone());
    }));
    let report = tokio::time::timeout(PLAY_TIMEOUT, play(options))
        .await
        .expect("the play ends in time")
        .unwrap();
    let events = events.lock().unwrap().clone();
    let flags = gateway.bind_flags.lock().unwrap().clone();
    (report, events, flags, stats.receiver_reports())
}

/// Every packet arrived once, in order, sample-exact, reports went both ways.
fn assert_sample_exact(report: &PlayReport, server_receiver_reports: u64) {
    assert_eq!(report.teardown, Some(200));
    let [track] = &report.tracks[..] else {
        panic!("one track: {:?}", report.tracks.len())
    };
    assert_eq!(track.stats.received, 50, "{track}");
    assert_eq!(
        (track.stats.lost, track.stats.duplicates),
        (0, 0),
        "{track}"
    );
    assert_eq!(track.skipped, 0, "{track}");
    assert!(track.bye && track.sender_reports >= 1, "{track}");
    assert!(track.receiver_reports >= 1, "{track}");
    assert!(server_receiver_reports >= 1, "the server heard the reports");
    assert_eq!(track.audio.samples, tone().samples);
}

fn delivery_events(events: &[Event]) -> Vec<bool> {
    events
        .iter()
        .filter_map(|event| match event {
            Event::Delivery { raw, .. } => Some(*raw),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn granted_raw_media_arrives_plain_and_sample_exact() {
    let (report, events, flags, server_reports) = play_through(Raw::Grant, true).await;
    assert_eq!(flags.len(), 2, "step 1 and step 2: {flags:?}");
    assert!(
        flags
            .iter()
            .all(|f| f.contains(Flags::RAW | Flags::RTP_PAIR))
    );
    assert_eq!(delivery_events(&events), [true]);
    assert!(report.tracks[0].raw);
    assert_sample_exact(&report, server_reports);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_not_granted_says_so_and_uses_the_header() {
    let (report, events, flags, server_reports) = play_through(Raw::Refuse, true).await;
    assert!(
        flags.iter().all(|f| f.contains(Flags::RAW)),
        "asked: {flags:?}"
    );
    assert_eq!(delivery_events(&events), [false]);
    let line = events
        .iter()
        .find(|event| matches!(event, Event::Delivery { .. }))
        .unwrap()
        .to_string();
    assert!(line.contains("did not grant header-less (RAW)"), "{line}");
    assert!(!report.tracks[0].raw);
    assert_sample_exact(&report, server_reports);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_raw_nothing_asks_for_it() {
    let (report, events, flags, server_reports) = play_through(Raw::Grant, false).await;
    assert!(flags.iter().all(|f| !f.contains(Flags::RAW)), "{flags:?}");
    assert!(delivery_events(&events).is_empty(), "no delivery line");
    assert!(!report.tracks[0].raw);
    assert_sample_exact(&report, server_reports);
}
