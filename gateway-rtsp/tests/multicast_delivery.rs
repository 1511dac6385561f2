//! `play` with [`PlayOptions::multicast`], in-process on loopback and without root: a scripted
//! RTSP server that answers SETUP with a multicast transport (what `GStreamer`'s server sends),
//! and a fake gateway that splices SOCKS5 CONNECT and answers multicast receive binds in MU
//! mode. Loopback has no multicast routing, so "the group" is a loopback socket per subscribed
//! group port that the fake gateway relays to the subscriber with the 8-octet header, exactly as
//! the real gateway relays what it receives on the group. The audio must arrive sample-exact;
//! a unicast answer and a refused subscription must be the typed errors.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::BytesMut;
use gateway_client::{BindingError, MulticastMode};
use gateway_proto::{
    Address, Command, Greeting, Method, MethodSelection, ProtocolError, Reply, ReplyCode, Request,
    enhanced::{
        ControlReply, ControlRequest, DatagramHeader, EnhancedReplyCode, EntryReply, Flags, Packet,
        UdpCommand,
    },
};
use gateway_rtsp::{
    RtspError,
    audio::{Audio, Codec},
    client::{Event, PlayOptions, PlayReport, play},
    rtp::{self, RtpPacket},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UdpSocket},
};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const AID: u32 = 0x4D;
const GROUP: Ipv4Addr = Ipv4Addr::new(233, 252, 0, 10);
const GROUP_PORT: u16 = 5000;
const SSRC: u32 = 0x1234_5678;
const PLAY_TIMEOUT: Duration = Duration::from_secs(30);

/// Where "the group" is for each subscribed group port: the loopback socket the server sends to.
type Groups = Arc<Mutex<HashMap<SocketAddr, SocketAddr>>>;

/// What the fake gateway does with a multicast receive bind.
#[derive(Debug, Clone, Copy)]
enum Policy {
    Subscribe,
    Refuse(EnhancedReplyCode),
}

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

/// Starts the fake gateway; returns its address and the requests of its enhanced sessions.
async fn fake_gateway(
    policy: Policy,
    groups: Groups,
) -> (SocketAddr, Arc<Mutex<Vec<ControlRequest>>>) {
    let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let record = Arc::new(Mutex::new(Vec::new()));
    let requests = Arc::clone(&record);
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(connection(
                stream,
                policy,
                Arc::clone(&groups),
                Arc::clone(&record),
            ));
        }
    });
    (addr, requests)
}

async fn connection(
    mut stream: TcpStream,
    policy: Policy,
    groups: Groups,
    record: Arc<Mutex<Vec<ControlRequest>>>,
) {
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
    let mut out = BytesMut::new();
    match request.command {
        Command::Connect => {
            let Address::Ip(target) = request.address else {
                panic!("CONNECT by name")
            };
            let mut upstream = TcpStream::connect(target).await.unwrap();
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
            EntryReply::Entered(Address::UNSPECIFIED_V4)
                .encode(&mut out)
                .unwrap();
            stream.write_all(&out).await.unwrap();
            while let Some(packet) = read_message(&mut stream, &mut buffer, Packet::decode).await {
                let Packet::Request(request) = packet else {
                    panic!("the client sent {packet:?}")
                };
                record.lock().unwrap().push(request.clone());
                let reply = match (request.command, policy) {
                    // A source named for a subscription (its TID again): granted.
                    (UdpCommand::Bind, Policy::Subscribe)
                        if matches!(&request.remote, Address::Ip(source)
                            if !source.ip().is_multicast()) =>
                    {
                        ControlReply::echo(&request, EnhancedReplyCode::Succeeded)
                    }
                    (UdpCommand::Bind, Policy::Subscribe) => subscribe(&request, &groups).await,
                    (UdpCommand::Bind, Policy::Refuse(code)) => ControlReply::echo(&request, code),
                    _ => ControlReply::echo(&request, EnhancedReplyCode::Succeeded),
                };
                let mut out = BytesMut::new();
                Packet::Reply(reply).encode(&mut out).unwrap();
                stream.write_all(&out).await.unwrap();
            }
        }
        other => panic!("unexpected command {other:?}"),
    }
}

/// A multicast receive bind in MU mode: "the group" (a loopback socket) relayed to LOCAL with
/// the header from the internal relay socket.
async fn subscribe(request: &ControlRequest, groups: &Groups) -> ControlReply {
    assert!(
        request
            .flags
            .contains(Flags::RECEIVE | Flags::MULTICAST | Flags::MULTICAST_TO_UNICAST),
        "{request:?}"
    );
    let (Address::Ip(local), Address::Ip(group)) = (&request.local, &request.remote) else {
        panic!("{request:?}")
    };
    let aid = AID + u32::from(group.port() - GROUP_PORT);
    let injection = UdpSocket::bind((LOCALHOST, 0)).await.unwrap();
    let internal = UdpSocket::bind((LOCALHOST, 0)).await.unwrap();
    let relay = internal.local_addr().unwrap();
    groups
        .lock()
        .unwrap()
        .insert(*group, injection.local_addr().unwrap());
    let local = *local;
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        loop {
            let Ok((len, _)) = injection.recv_from(&mut buf).await else {
                return;
            };
            let mut out = BytesMut::new();
            DatagramHeader::new(aid).encode(&mut out).unwrap();
            out.extend_from_slice(&buf[..len]);
            // A datagram of another binding first: the client must drop it.
            let mut stray = BytesMut::new();
            DatagramHeader::new(aid ^ 0xFF00)
                .encode(&mut stray)
                .unwrap();
            stray.extend_from_slice(&buf[..len]);
            let _ = internal.send_to(&stray, local).await;
            let _ = internal.send_to(&out, local).await;
        }
    });
    ControlReply {
        code: EnhancedReplyCode::Succeeded,
        flags: request.flags,
        ttl: 0,
        tid: request.tid,
        aid,
        local: relay.into(),
        remote: request.remote.clone(),
    }
}

fn tone() -> Audio {
    Audio::tone(8000, 1.0, 440.0)
}

/// A scripted RTSP server: one session; SETUP answered with `transport`; after PLAY the tone in
/// 50 L16 packets to the group's RTP port and a BYE to its RTCP port.
async fn rtsp_server(transport: &'static str, groups: Groups) -> String {
    let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    let url = format!("rtsp://{}/tone", listener.local_addr().unwrap());
    let base = url.clone();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut buffer = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") else {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                }
                continue;
            };
            let request = String::from_utf8(buffer.drain(..end + 4).collect()).unwrap();
            let method = request.split(' ').next().unwrap().to_owned();
            let cseq = request
                .lines()
                .find_map(|line| line.strip_prefix("CSeq:"))
                .unwrap()
                .trim()
                .to_owned();
            let (headers, body) = match method.as_str() {
                "DESCRIBE" => {
                    let sdp = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=tone\r\nt=0 0\r\n\
                               a=control:*\r\nm=audio 0 RTP/AVP 96\r\n\
                               c=IN IP4 233.252.0.10/16\r\na=rtpmap:96 L16/8000/1\r\n\
                               a=control:stream=0\r\n";
                    (
                        format!(
                            "Content-Type: application/sdp\r\nContent-Base: {base}/\r\n\
                             Content-Length: {}\r\n",
                            sdp.len()
                        ),
                        sdp.to_owned(),
                    )
                }
                "SETUP" => {
                    assert!(
                        request.contains("Transport: RTP/AVP;multicast\r\n"),
                        "{request}"
                    );
                    (
                        format!("Transport: {transport}\r\nSession: MC1\r\n"),
                        String::new(),
                    )
                }
                "PLAY" => {
                    tokio::spawn(stream_tone(Arc::clone(&groups)));
                    ("Session: MC1\r\n".to_owned(), String::new())
                }
                _ => (String::new(), String::new()),
            };
            let response = format!("RTSP/1.0 200 OK\r\nCSeq: {cseq}\r\n{headers}\r\n{body}");
            if stream.write_all(response.as_bytes()).await.is_err() {
                return;
            }
        }
    });
    url
}

#[expect(
    clippy::similar_names,
    reason = "RTP and RTCP are the protocol's names"
)]
async fn stream_tone(groups: Groups) {
    let rtp_group = SocketAddr::new(GROUP.into(), GROUP_PORT);
    let rtcp_group = SocketAddr::new(GROUP.into(), GROUP_PORT + 1);
    let (rtp_to, rtcp_to) = {
        let groups = groups.lock().unwrap();
        (groups[&rtp_group], groups.get(&rtcp_group).copied())
    };
    let socket = UdpSocket::bind((LOCALHOST, 0)).await.unwrap();
    let samples = tone().samples;
    let mut payload = Vec::new();
    for (index, frame) in samples.chunks(160).enumerate() {
        payload.clear();
        Codec::L16.encode(frame, &mut payload);
        let mut packet = Vec::new();
        RtpPacket {
            marker: index == 0,
            payload_type: 96,
            sequence: u16::try_from(index).unwrap().wrapping_add(1000),
            timestamp: u32::try_from(index * 160).unwrap(),
            ssrc: SSRC,
            payload: &payload,
        }
        .write(&mut packet);
        socket.send_to(&packet, rtp_to).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if let Some(rtcp_to) = rtcp_to {
        socket.send_to(&rtp::bye(SSRC), rtcp_to).await.unwrap();
    }
}

async fn play_multicast(
    transport: &'static str,
    policy: Policy,
) -> (
    Result<PlayReport, RtspError>,
    Vec<Event>,
    Vec<ControlRequest>,
) {
    let groups = Groups::default();
    let (gateway, requests) = fake_gateway(policy, Arc::clone(&groups)).await;
    let url = rtsp_server(transport, groups).await;
    let events = Arc::new(Mutex::new(Vec::new()));
    let mut options = PlayOptions::new(url, gateway);
    options.duration = Duration::from_secs(10);
    options.multicast = true;
    let sink = Arc::clone(&events);
    options.progress = Some(Arc::new(move |event: &Event| {
        sink.lock().unwrap().push(event.clone());
    }));
    let result = tokio::time::timeout(PLAY_TIMEOUT, play(options))
        .await
        .expect("the play ends in time");
    let events = events.lock().unwrap().clone();
    let requests = requests.lock().unwrap().clone();
    (result, events, requests)
}

const GSTREAMER_REPLY: &str =
    "RTP/AVP;multicast;destination=233.252.0.10;ttl=16;port=5000-5001;mode=\"PLAY\"";

#[tokio::test]
async fn a_multicast_stream_arrives_sample_exact_through_mu() {
    let (result, events, requests) = play_multicast(GSTREAMER_REPLY, Policy::Subscribe).await;
    let report = result.unwrap();
    let [track] = &report.tracks[..] else {
        panic!("one track")
    };
    assert_eq!(track.stats.received, 50, "{track}");
    assert_eq!(
        (track.stats.lost, track.stats.duplicates),
        (0, 0),
        "{track}"
    );
    assert!(
        track.bye,
        "the BYE came through the RTCP subscription: {track}"
    );
    assert_eq!(
        track.receiver_reports, 0,
        "no receiver reports in multicast"
    );
    assert_eq!(track.audio.samples, tone().samples);
    let binding = track.multicast.expect("a multicast track");
    assert_eq!(
        (binding.aid, binding.group, binding.mode()),
        (
            AID,
            SocketAddr::new(GROUP.into(), GROUP_PORT),
            Some(MulticastMode::ToUnicast)
        )
    );
    assert_eq!(report.teardown, Some(200));
    // Two subscriptions (RTP and RTCP), both released.
    let binds: Vec<_> = requests
        .iter()
        .filter(|r| r.command == UdpCommand::Bind)
        .map(|r| r.remote.clone())
        .collect();
    assert_eq!(
        binds,
        [
            Address::Ip(SocketAddr::new(GROUP.into(), 5000)),
            Address::Ip(SocketAddr::new(GROUP.into(), 5001))
        ]
    );
    let releases = requests
        .iter()
        .filter(|r| r.command == UdpCommand::Release)
        .count();
    assert_eq!(releases, 2);
    assert!(
        events.contains(&Event::Released { bindings: 2 }),
        "{events:?}"
    );
    let lines: Vec<String> = events.iter().map(ToString::to_string).collect();
    assert!(
        lines.iter().any(|line| line.starts_with(
            "SETUP track 0: 200 OK, multicast destination=233.252.0.10 port=5000-5001 ttl=16"
        )),
        "{lines:#?}"
    );
    assert!(
        lines.iter().any(|line| line.contains(
            "subscribed: AID 0x0000004d group 233.252.0.10:5000 \
                                         multicast-to-unicast (MU)"
        )),
        "{lines:#?}"
    );
}

#[tokio::test]
async fn a_unicast_answer_to_a_multicast_request_is_a_clear_error() {
    let (result, _, requests) = play_multicast(
        "RTP/AVP;unicast;client_port=4000-4001;server_port=6000-6001",
        Policy::Subscribe,
    )
    .await;
    let error = result.unwrap_err();
    assert!(
        matches!(&error, RtspError::UnicastAnswer { track: 0, transport } if transport.contains("server_port")),
        "{error}"
    );
    assert!(
        error
            .to_string()
            .contains("answered with a unicast transport")
    );
    assert!(
        requests.is_empty(),
        "nothing asked of the gateway: {requests:?}"
    );
}

#[tokio::test]
async fn a_refused_subscription_names_the_reply_code() {
    let (result, events, _) = play_multicast(
        GSTREAMER_REPLY,
        Policy::Refuse(EnhancedReplyCode::MulticastReceiveNotAllowed),
    )
    .await;
    let error = result.unwrap_err();
    assert!(
        matches!(
            error,
            RtspError::MulticastRefused {
                track: 0,
                refusal: BindingError::MulticastReceiveNotAllowed,
                ..
            }
        ),
        "{error}"
    );
    assert!(
        error
            .to_string()
            .contains("multicast receive not allowed (11)"),
        "{error}"
    );
    assert!(!events.iter().any(|e| matches!(e, Event::Playing { .. })));
    assert!(events.iter().any(|e| matches!(e, Event::TornDown { .. })));
}

#[tokio::test]
async fn a_source_specific_group_narrows_both_subscriptions_to_its_source() {
    let transport = "RTP/AVP;multicast;destination=233.252.0.10;source=203.0.113.2;ttl=16;\
                     port=5000-5001;mode=\"PLAY\"";
    let (result, _, requests) = play_multicast(transport, Policy::Subscribe).await;
    let report = result.unwrap();
    assert_eq!(report.tracks[0].stats.received, 50);
    let binds: Vec<_> = requests
        .iter()
        .filter(|r| r.command == UdpCommand::Bind)
        .collect();
    let source = Address::Ip("203.0.113.2:0".parse().unwrap());
    // Each subscription, then its source with the subscription's TID and LOCAL.
    assert_eq!(binds.len(), 4, "{binds:#?}");
    for (group, named) in [(binds[0], binds[1]), (binds[2], binds[3])] {
        assert_eq!(named.remote, source, "{named:?}");
        assert_eq!((named.tid, &named.local), (group.tid, &group.local));
        assert!(
            named
                .flags
                .contains(Flags::RECEIVE | Flags::MULTICAST_TO_UNICAST)
        );
    }
}
