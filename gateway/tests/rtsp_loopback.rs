//! `gateway rtsp-get` end to end, in-process on loopback: the SOCKS server with the enhanced mode
//! (`server::run`, a `MemoryGate`, userspace relays) on 127.0.0.1, the demo media server on
//! 127.0.0.2 (media from 127.0.0.3 where a test says so), and `rtsp::client::play` as the client.
//! The audio must arrive sample-exact (L16) or exactly as mu-law decodes it (PCMU). A scripted fake
//! RTSP server gives the failures: a refused SETUP, a reply without source ports, a stream that
//! never starts, a SETUP answered after the half-bound binding expired. Every wait is bounded.

mod common;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::BytesMut;
use common::{
    gateway::{Gateway, RTSP_LOOPBACK_PORTS},
    io::{IO_TIMEOUT, eventually_for, within_for},
    peers::{LOCALHOST, REMOTE_HOST},
};
use gateway::{
    binding::{Config, PENDING_TIMEOUT_MIN},
    server::enhanced::EnhancedMode,
};
use gateway_rtsp::client::{Event, PlayOptions, PlayReport, play};
use gateway_rtsp::{
    RtspError,
    audio::{Audio, Codec, Match},
    message, sdp,
    server::{DemoServer, ServerConfig, ServerStats},
};
use rtsp_types::{Message, Method, StatusCode, headers};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
    sync::oneshot,
};

const SERVER_HOST: IpAddr = REMOTE_HOST;
const MEDIA_HOST: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));
/// Bound on a whole play: the stream is about a second long.
const PLAY_TIMEOUT: Duration = Duration::from_secs(30);

/// A gateway with the enhanced mode on the next block of this binary's relay ports, its binding
/// configuration changed by `tweak`.
async fn start_gateway(tweak: impl FnOnce(&mut Config)) -> Gateway {
    Gateway::start_enhanced(&RTSP_LOOPBACK_PORTS, tweak, |_| {}).await
}

// ---- the media server and the client ----------------------------------------------------------

struct Media {
    url: String,
    stats: Arc<ServerStats>,
    _shutdown: oneshot::Sender<()>,
}

async fn start_media(config: ServerConfig) -> Media {
    let server = DemoServer::bind(SocketAddr::new(SERVER_HOST, 0), config)
        .await
        .unwrap();
    let url = server.url().unwrap();
    let stats = server.stats();
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    Media {
        url,
        stats,
        _shutdown: tx,
    }
}

fn temp_wav(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rtsp-loopback-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Options for `url` through `gateway`: up to 10 s (the clips end with BYE well before), events
/// collected in the returned list.
fn options(url: &str, gateway: &Gateway) -> (PlayOptions, Arc<Mutex<Vec<Event>>>) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let mut options = PlayOptions::new(url, gateway.addr);
    options.duration = Duration::from_secs(10);
    options.rtcp_interval = Duration::from_millis(300);
    let sink = Arc::clone(&events);
    options.progress = Some(Arc::new(move |event: &Event| {
        sink.lock().unwrap().push(event.clone());
    }));
    (options, events)
}

fn tone() -> Audio {
    Audio::tone(8000, 1.0, 440.0)
}

/// The checks every successful play shares: every packet arrived once and in order, reports
/// went both ways, TEARDOWN was answered.
fn assert_clean(report: &PlayReport, expected_packets: u64) {
    assert_eq!(report.teardown, Some(200));
    for track in &report.tracks {
        let stats = track.stats;
        assert_eq!(stats.received, expected_packets, "{track}");
        assert_eq!((stats.lost, stats.duplicates), (0, 0), "{track}");
        assert!(track.bye, "{track}");
        assert!(track.sender_reports >= 1, "{track}");
        assert!(track.receiver_reports >= 1, "{track}");
    }
}

// ---- success --------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l16_arrives_sample_exact_from_a_second_media_address() {
    let gateway = start_gateway(|_| {}).await;
    let mut config = ServerConfig::new(tone(), Codec::L16).unwrap();
    config.media_from = Some(MEDIA_HOST);
    let media = start_media(config).await;
    let (mut options, events) = options(&media.url, &gateway);
    let out = temp_wav("l16.wav");
    options.out = Some(out.clone());
    let report = within_for("play", PLAY_TIMEOUT, play(options))
        .await
        .unwrap();

    let track = &report.tracks[0];
    assert_eq!(track.track.format(), "L16/8000/1");
    assert_eq!(track.audio.samples, tone().samples, "sample-exact");
    assert_eq!(tone().compare(&track.audio), Match::Exact);
    assert_eq!(
        Audio::read_wav(&out).unwrap(),
        track.audio,
        "the WAV holds it too"
    );
    assert_clean(&report, 50);
    // Step 2 named the media address and the server's port, not the RTSP address.
    let gateway_client::Address::Ip(source) = track.source.clone() else {
        panic!("an IP source")
    };
    assert_eq!(source.ip(), MEDIA_HOST);
    assert_eq!(track.rtcp_port, source.port() + 1);
    assert_eq!(track.relays.external.ip(), LOCALHOST);

    // The progress lines, in protocol order.
    let lines: Vec<String> = events
        .lock()
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect();
    let position = |prefix: &str| {
        lines
            .iter()
            .position(|line| line.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line in {lines:#?}"))
    };
    let order = [
        "control:", "DESCRIBE", "step 1:", "SETUP", "step 2:", "PLAY", "TEARDOWN",
    ];
    let positions: Vec<usize> = order.iter().map(|prefix| position(prefix)).collect();
    assert!(positions.is_sorted(), "{lines:#?}");
    let step1 = &lines[positions[2]];
    let p = track.relays.external.port();
    assert!(
        step1.contains(&format!("(client_port={p}-{})", p + 1)),
        "{step1}"
    );
    assert!(step1.contains(&format!("external relay {}", track.relays.external)));
    let step2 = &lines[positions[4]];
    assert_eq!(
        step2,
        &format!(
            "step 2: confirmed source {source}-{} for track 0",
            source.port() + 1
        )
    );

    // The server saw the receiver reports and the TEARDOWN; the gateway released everything.
    assert!(media.stats.receiver_reports() >= 1);
    assert_eq!((media.stats.plays(), media.stats.teardowns()), (1, 1));
    gateway.all_released().await;
    std::fs::remove_file(&out).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pcmu_decodes_to_what_mu_law_carries() {
    let gateway = start_gateway(|_| {}).await;
    let media = start_media(ServerConfig::new(tone(), Codec::Pcmu).unwrap()).await;
    let (options, _) = options(&media.url, &gateway);
    let report = within_for("play", PLAY_TIMEOUT, play(options))
        .await
        .unwrap();
    let track = &report.tracks[0];
    assert_eq!(track.track.format(), "PCMU/8000/1");
    assert_eq!(track.codec, Codec::Pcmu);
    assert_eq!(track.audio.samples, tone().through_pcmu().samples);
    // mu-law is close to the original, not equal.
    assert_ne!(track.audio.samples, tone().samples);
    assert_clean(&report, 50);
    gateway.all_released().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_with_two_tracks_each_at_once() {
    let gateway = start_gateway(|_| {}).await;
    let mut config = ServerConfig::new(tone(), Codec::L16).unwrap();
    config.tracks = 2;
    let media = start_media(config).await;
    let (first, _) = options(&media.url, &gateway);
    let (second, _) = options(&media.url, &gateway);
    let (a, b) = within_for("two plays", PLAY_TIMEOUT, async {
        tokio::join!(Box::pin(play(first)), Box::pin(play(second)))
    })
    .await;
    let mut external_ports = Vec::new();
    for report in [a.unwrap(), b.unwrap()] {
        assert_eq!(report.tracks.len(), 2);
        assert_clean(&report, 50);
        for track in &report.tracks {
            assert_eq!(
                track.audio.samples,
                tone().samples,
                "track {}",
                track.track.index
            );
            external_ports.push(track.relays.external.port());
        }
    }
    external_ports.sort_unstable();
    external_ports.dedup();
    assert_eq!(external_ports.len(), 4, "four bindings, four relay pairs");
    assert_eq!(media.stats.plays(), 2);
    gateway.all_released().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_prints_the_steps_and_writes_the_wav() {
    let gateway = start_gateway(|_| {}).await;
    let media = start_media(ServerConfig::new(tone(), Codec::L16).unwrap()).await;
    let out = temp_wav("cli.wav");
    let output = within_for(
        "gateway rtsp-get",
        PLAY_TIMEOUT,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(["rtsp-get", &media.url, "--proxy", &gateway.addr.to_string()])
            .args(["--seconds", "10", "--out", out.to_str().unwrap()])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for expected in [
        "step 1: AID 0x",
        " internal relay 127.0.0.1:",
        " external relay 127.0.0.1:",
        "step 2: confirmed source 127.0.0.2:",
        "track 0 L16/8000/1: received 50 packets, lost 0, reordered 0",
    ] {
        assert!(stdout.contains(expected), "{expected:?} in\n{stdout}");
    }
    assert_eq!(Audio::read_wav(&out).unwrap().samples, tone().samples);
    gateway.all_released().await;
    std::fs::remove_file(&out).unwrap();
}

// ---- failures, from a scripted server -------------------------------------------------------

/// How the fake server answers SETUP.
#[derive(Clone)]
enum Setup {
    Refuse,
    NoServerPort,
    /// 200 with ports, then PLAY succeeds but nothing is sent.
    Silent,
    /// Like `Silent`, once the gateway of this mode has expired the client's half-bound binding.
    AfterExpiry(Arc<EnhancedMode>),
}

/// A one-track RTSP server on 127.0.0.2 that answers SETUP as `setup` says.
async fn fake_server(setup: Setup) -> String {
    let listener = TcpListener::bind(SocketAddr::new(SERVER_HOST, 0))
        .await
        .unwrap();
    let url = format!("rtsp://{}/fake", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let setup = setup.clone();
            tokio::spawn(async move {
                let mut buffer = BytesMut::new();
                loop {
                    let request = match message::decode(&mut buffer) {
                        Ok(Some(Message::Request(request))) => request,
                        Ok(None) if stream.read_buf(&mut buffer).await.unwrap_or(0) > 0 => continue,
                        _ => return,
                    };
                    let cseq = request
                        .header(&headers::CSEQ)
                        .map(|v| v.as_str().to_owned());
                    let (status, extra, body) = fake_answer(&request, &setup).await;
                    let bytes = message::response(status, cseq.as_deref(), &extra, &body);
                    if stream.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    url
}

async fn fake_answer(
    request: &rtsp_types::Request<Vec<u8>>,
    setup: &Setup,
) -> (StatusCode, Vec<(headers::HeaderName, String)>, Vec<u8>) {
    let session = (headers::SESSION, "F00D".to_owned());
    match request.method() {
        Method::Describe => {
            let offer = sdp::Offer {
                origin: SERVER_HOST,
                codec: Codec::L16,
                payload_type: 96,
                rate: 8000,
                channels: 1,
                tracks: 1,
                seconds: 1.0,
            };
            let body = sdp::write_description(&offer, 1).into_bytes();
            (StatusCode::Ok, vec![], body)
        }
        Method::Setup => {
            let transport = request
                .header(&headers::TRANSPORT)
                .unwrap()
                .as_str()
                .to_owned();
            let with_ports = format!("{transport};server_port=6970-6971");
            match setup {
                Setup::Refuse => (StatusCode::UnsupportedTransport, vec![], vec![]),
                Setup::NoServerPort => (
                    StatusCode::Ok,
                    vec![(headers::TRANSPORT, transport), session],
                    vec![],
                ),
                Setup::Silent => (
                    StatusCode::Ok,
                    vec![(headers::TRANSPORT, with_ports), session],
                    vec![],
                ),
                Setup::AfterExpiry(mode) => {
                    // The client made its step 1 before this SETUP; answer once it expired.
                    eventually_for(
                        "the half-bound binding expires",
                        PENDING_TIMEOUT_MIN + IO_TIMEOUT,
                        || mode.live_bindings() == 0,
                    )
                    .await;
                    (
                        StatusCode::Ok,
                        vec![(headers::TRANSPORT, with_ports), session],
                        vec![],
                    )
                }
            }
        }
        _ => (StatusCode::Ok, vec![], vec![]),
    }
}

#[tokio::test]
async fn a_refused_setup_is_a_clear_error_and_releases_the_binding() {
    let gateway = start_gateway(|_| {}).await;
    let url = fake_server(Setup::Refuse).await;
    let (options, _) = options(&url, &gateway);
    let error = within_for("play", PLAY_TIMEOUT, play(options))
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            RtspError::Refused {
                method: "SETUP",
                status: 461,
                ..
            }
        ),
        "{error}"
    );
    assert_eq!(
        error.to_string(),
        "the RTSP server refused SETUP: 461 Unsupported Transport"
    );
    gateway.all_released().await;
}

#[tokio::test]
async fn a_reply_without_source_ports_is_a_clear_error() {
    let gateway = start_gateway(|_| {}).await;
    let url = fake_server(Setup::NoServerPort).await;
    let (options, _) = options(&url, &gateway);
    let error = within_for("play", PLAY_TIMEOUT, play(options))
        .await
        .unwrap_err();
    assert!(
        matches!(error, RtspError::NoSourcePorts { track: 0, .. }),
        "{error}"
    );
    assert!(
        error.to_string().contains("names no source ports"),
        "{error}"
    );
    gateway.all_released().await;
}

#[tokio::test]
async fn a_stream_that_never_starts_times_out() {
    let gateway = start_gateway(|_| {}).await;
    let url = fake_server(Setup::Silent).await;
    let (mut options, _) = options(&url, &gateway);
    options.start_timeout = Duration::from_millis(500);
    let error = within_for("play", PLAY_TIMEOUT, play(options))
        .await
        .unwrap_err();
    assert!(
        matches!(error, RtspError::NeverStarted { track: 0, .. }),
        "{error}"
    );
    assert!(error.to_string().contains("never started"), "{error}");
    gateway.all_released().await;
}

#[tokio::test]
async fn a_setup_answered_after_the_pending_timeout_finds_the_binding_expired() {
    let gateway = start_gateway(|config| config.pending_timeout = PENDING_TIMEOUT_MIN).await;
    let url = fake_server(Setup::AfterExpiry(gateway.shared_mode())).await;
    let (options, _) = options(&url, &gateway);
    let error = within_for("play", PLAY_TIMEOUT, play(options))
        .await
        .unwrap_err();
    assert!(
        matches!(error, RtspError::BindingExpired { track: 0 }),
        "{error}"
    );
    assert!(
        error.to_string().contains("expired before step 2"),
        "{error}"
    );
    gateway.all_released().await;
}
