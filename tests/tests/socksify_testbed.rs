//! `gateway socksify` end to end in the test bed: unmodified programs in `client` (ffmpeg,
//! gst-launch-1.0, curl) run under the preload shim and reach servers in `server` only through
//! the gateway in `fw`, where forwarding is off: RTSP with RTP over UDP (two-step bindings,
//! header-less delivery), RTSP interleaved on the proxied TCP connection, HTTP through CONNECT.
//! What a player writes is compared sample by sample with what the server streams; the RTP
//! stream is measured on the wire apart from the players (tcpdump in `server`: what the server
//! sent; in `client`: what reached the player), for its first sequence number, packets and
//! losses. Root only.
//!
//! Every scenario also has an `#[ignore]`d control, `control_*`: the same player, flags, peers,
//! captures and comparisons with no gateway and no shim, forwarding on in `fw`. When a test fails,
//! its control tells a fault of the shim from one of the player, the peer or this harness:
//! `cargo test --locked -p testbed --test socksify_testbed -- --ignored --test-threads=1`.

use std::{
    fmt::Write as _,
    fs,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use gateway::report::{Bindings, Stats};
use gateway_rtsp::audio::Audio;
use testbed::{
    Testbed, addr,
    capture::{HostCaptures, Wire},
    gateway::{GatewayDaemon, InstanceCleanup, gateway_bin, gateway_cli, start_in_fw},
    pcap::{Datagram, RtpFlow, rtp_flows},
    peers::{DemoMediaServer, GstRtspServer, HttpServer},
    players::{Player, ffmpeg_rtsp, gst_launch_rtsp, require, require_ffmpeg, require_gst_launch},
    send_paced, unique_suffix, wait_until,
};

const PROXY: &str = "198.51.100.1:1080";
const RTSP_PORT: u16 = 8554;
/// L16 as both RTSP servers send it.
const L16_PAYLOAD_TYPE: u8 = 96;
const RATE: u32 = 8000;
/// What every server streams, 10 s: longer than any player records, so an output is a prefix,
/// and the stream is still running when gst-launch gets its SIGINT: its file shows
/// [`GST_AT_LEAST`] only once filesink flushed a 64 KiB block (4.1 s of audio), which rtspsrc's
/// 2 s jitter buffer delays to about 6 s into the stream. With a 6 s source the SIGINT raced
/// the stream's end (BYE, EOS, TEARDOWN), and gst-launch now and then failed on a connection
/// already closing.
const SOURCE_FRAMES: usize = 10 * 8000;
/// ffmpeg's `-t`: it records this long, then sends TEARDOWN.
const FFMPEG_SECONDS: &str = "4";
/// The least audio each player must write.
const FFMPEG_AT_LEAST: Duration = Duration::from_millis(3500);
const GST_AT_LEAST: Duration = Duration::from_secs(3);
/// Bound on a player's run, on the audio's reaching a player, on a counter's rising.
const PLAYER_TIMEOUT: Duration = Duration::from_secs(30);
const WAIT: Duration = Duration::from_secs(5);

/// How the player in `client` reaches `server`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// Under `gateway socksify`, through the gateway in `fw`, forwarding off: the tests.
    Socksify,
    /// Directly, forwarding on in `fw`, no gateway: the controls.
    Forwarded,
}

struct Setup {
    route: Route,
    gateway: Option<(GatewayDaemon, InstanceCleanup)>,
    dir: PathBuf,
    bed: Testbed,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn setup(route: Route) -> Setup {
    let bed = Testbed::new().unwrap();
    let gateway = match route {
        Route::Socksify => {
            require_socksify();
            Some(start_in_fw(&bed, &[]).unwrap())
        }
        Route::Forwarded => {
            bed.fw.sysctl("net.ipv4.ip_forward", "1").unwrap();
            None
        }
    };
    let dir = std::env::temp_dir().join(format!("gateway-socksify-{}", unique_suffix()));
    fs::create_dir_all(&dir).unwrap();
    Setup {
        route,
        gateway,
        dir,
        bed,
    }
}

fn require_socksify() {
    let out = Command::new(gateway_bin())
        .args(["socksify", "--help"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "`{} socksify --help` fails: the preload shim is not built here \
         (`cargo build --locked --bins`): {}",
        gateway_bin().display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

impl Setup {
    /// `program ARGS...` started in `client`: under `gateway socksify` (its log in
    /// `DIR/NAME.socksify.log`) or, in a control, as it is.
    fn player<S: AsRef<std::ffi::OsStr>>(&self, name: &str, program: &str, args: &[S]) -> Player {
        let (mut cmd, log) = match self.route {
            Route::Socksify => {
                let log = self.dir.join(format!("{name}.socksify.log"));
                let mut cmd = self.bed.client.command(gateway_bin());
                cmd.args(["socksify", "--proxy", PROXY, "--log-file"])
                    .arg(&log)
                    .arg("--")
                    .arg(program);
                (cmd, Some(log))
            }
            Route::Forwarded => (self.bed.client.command(program), None),
        };
        cmd.args(args);
        let player = Player::spawn(&mut cmd, name, &self.dir).unwrap();
        match log {
            Some(log) => player.with_log(log),
            None => player,
        }
    }

    /// Waits (bounded) for `player` to exit by itself and succeed.
    fn succeeds(&self, player: &mut Player) {
        if let Err(error) = player.succeeds(PLAYER_TIMEOUT) {
            panic!("{error:#}{}", self.gateway_log());
        }
    }

    fn gateway_log(&self) -> String {
        self.gateway
            .as_ref()
            .map_or_else(String::new, |(gateway, _)| {
                format!("--- gateway log:\n{}", gateway.log_text())
            })
    }

    /// `gateway stats --json`, when the route has a gateway.
    fn stats(&self) -> Option<Stats> {
        self.document("stats")
            .map(|text| gateway::report::parse(&text).unwrap())
    }

    /// `gateway bindings --json`, when the route has a gateway.
    fn bindings(&self) -> Option<Bindings> {
        self.document("bindings")
            .map(|text| gateway::report::parse(&text).unwrap())
    }

    fn document(&self, command: &str) -> Option<String> {
        let (gateway, _) = self.gateway.as_ref()?;
        let out = gateway_cli(
            &self.bed.fw,
            &[command, "--instance", &gateway.instance, "--json"],
        )
        .unwrap();
        assert!(out.status.success(), "gateway {command} --json: {out:?}");
        Some(String::from_utf8(out.stdout).unwrap())
    }

    fn no_binding_drops(&self) -> Option<u64> {
        self.stats()
            .map(|stats| stats.reasons["no_binding"].packets)
    }
}

// ---- sources and servers ------------------------------------------------------------------------

/// 10 s of 8 kHz mono noise from `seed`, written to `DIR/NAME.wav`. Noise, not a tone: no stretch
/// of it looks like another, so a shift, a lost or a repeated packet, or another stream's
/// samples can never pass for a match (a tone matches itself a period later).
fn source(setup: &Setup, name: &str, seed: u32) -> (PathBuf, Audio) {
    let mut state = seed;
    let samples = (0..SOURCE_FRAMES)
        .map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            u16::try_from(state >> 16).unwrap().cast_signed() / 2
        })
        .collect();
    let audio = Audio {
        rate: RATE,
        channels: 1,
        samples,
    };
    let path = setup.dir.join(format!("{name}.wav"));
    audio.write_wav(&path).unwrap();
    (path, audio)
}

fn url(port: u16) -> String {
    format!("rtsp://{}:{port}/rtsp.wav", addr::SERVER_V4)
}

/// The demo media server streaming `wav` on 203.0.113.2:PORT, its log in `DIR/demo-PORT.log`.
fn demo_server(setup: &Setup, port: u16, wav: &Path) -> DemoMediaServer {
    let log = setup.dir.join(format!("demo-{port}.log"));
    DemoMediaServer::start(&setup.bed.server, port, wav, &log).unwrap()
}

// ---- players ------------------------------------------------------------------------------------

/// ffmpeg recording [`FFMPEG_SECONDS`] of `url` into `out`, started.
fn ffmpeg(setup: &Setup, name: &str, url: &str, transport: &str, out: &Path) -> Player {
    require_ffmpeg().unwrap();
    setup.player(
        name,
        "ffmpeg",
        &ffmpeg_rtsp(url, transport, FFMPEG_SECONDS, out),
    )
}

/// gst-launch-1.0 writing `url`'s audio into `out`, started.
fn gst_launch(setup: &Setup, name: &str, url: &str, out: &Path) -> Player {
    require_gst_launch().unwrap();
    setup.player(name, "gst-launch-1.0", &gst_launch_rtsp(url, out))
}

/// Lets gst-launch-1.0 write [`GST_AT_LEAST`] of audio (the file's size, polled; filesink
/// writes in blocks of 64 KiB), then ends it with SIGINT to its pid.
fn finish_gst_launch(setup: &Setup, player: &mut Player, out: &Path) {
    let enough = 44 + 2 * u64::from(RATE) * GST_AT_LEAST.as_secs();
    if let Err(error) =
        player.interrupt_once_written(out, enough, PLAYER_TIMEOUT, Duration::from_secs(10))
    {
        panic!("{error:#}{}", setup.gateway_log());
    }
}

// ---- the wire -----------------------------------------------------------------------------------

fn start_captures(setup: &Setup) -> HostCaptures {
    HostCaptures::start(&setup.bed, &setup.dir).unwrap()
}

/// The L16 RTP flows from the server's even (RTP) ports.
fn media_flows(datagrams: &[Datagram]) -> Vec<RtpFlow> {
    rtp_flows(datagrams, L16_PAYLOAD_TYPE)
        .into_iter()
        .filter(|flow| flow.src.ip() == IpAddr::from(addr::SERVER_V4) && flow.src.port() % 2 == 0)
        .collect()
}

fn describe(flows: &[RtpFlow]) -> String {
    flows
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Finds the RTP stream of `ssrc` (or the only one) in both captures, prints its packets, losses
/// and first sequence numbers, and checks that the first packet the player received is the
/// first the server sent. What reached the player.
fn stream(name: &str, wire: &Wire, ssrc: Option<u32>) -> RtpFlow {
    let sent_flows = media_flows(&wire.sent);
    let sent = match ssrc {
        Some(ssrc) => sent_flows.iter().find(|flow| flow.ssrc == ssrc),
        None if sent_flows.len() == 1 => sent_flows.first(),
        None => None,
    }
    .unwrap_or_else(|| {
        panic!(
            "{name}: one RTP stream from the server (SSRC {ssrc:08x?}): {}",
            describe(&sent_flows)
        )
    })
    .clone();
    let received: Vec<RtpFlow> = media_flows(&wire.received)
        .into_iter()
        .filter(|flow| flow.ssrc == sent.ssrc)
        .collect();
    assert!(
        received.len() == 1 && received[0].dst.ip() == IpAddr::from(addr::CLIENT_V4),
        "{name}: the stream {} reached the player at one address: {}",
        describe(std::slice::from_ref(&sent)),
        describe(&received)
    );
    let received = received[0].clone();
    println!(
        "{name}: server sent {} RTP packets {} -> {} (SSRC {:08x}), first sequence {}; player \
         received {} at {}, first sequence {}, lost {}",
        sent.packets(),
        sent.src,
        sent.dst,
        sent.ssrc,
        sent.first_sequence(),
        received.packets(),
        received.dst,
        received.first_sequence(),
        received.lost_against(&sent)
    );
    assert_eq!(
        received.first_sequence(),
        sent.first_sequence(),
        "{name}: the first RTP packet the player received is the first the server sent"
    );
    received
}

fn assert_sample_exact(name: &str, sent: &Audio, out: &Path, at_least: Duration) {
    let received = Audio::read_wav(out).unwrap_or_else(|error| panic!("{name}: {error}"));
    let verdict = sent.compare(&received);
    println!(
        "{name}: {verdict}, {:.3} s written",
        received.duration().as_secs_f64()
    );
    assert!(
        verdict.is_sample_exact(),
        "{name}: the audio is the server's from its first sample on: {verdict}"
    );
    assert!(
        received.duration() >= at_least,
        "{name}: at least {at_least:?} of audio, got {:?}",
        received.duration()
    );
}

/// Through the gateway: `kernel_relayed.packets` grew by at least `packets` (what reached the
/// players crossed `fw`, where only the gateway relays).
fn assert_kernel_relayed(setup: &Setup, before: Option<&Stats>, packets: usize) {
    let (Some(before), Some(after)) = (before, setup.stats()) else {
        return;
    };
    let relayed = after.kernel_relayed.packets - before.kernel_relayed.packets;
    println!("kernel relayed {relayed} packets; the players received {packets} RTP packets");
    assert!(
        relayed >= u64::try_from(packets).unwrap(),
        "kernel_relayed.packets grew by {relayed}, less than the {packets} RTP packets received"
    );
}

// ---- scenarios ----------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum RtspServer {
    Demo,
    GStreamer,
}

#[derive(Debug, Clone, Copy)]
enum Program {
    Ffmpeg,
    GstLaunch,
}

/// One player, one server, RTP over UDP: sample-exact from the first sample, the first packet
/// received the first sent, and the stream relayed in the kernel. `GStreamer`'s server starts its
/// stream of a file at the file's first sample (seen with both players in the controls, and
/// with `gateway rtsp-get --raw` in `rtsp_testbed`), so its output is held to the same
/// sample-exact standard.
fn play_over_udp(route: Route, server: RtspServer, program: Program) {
    let setup = setup(route);
    let (wav, sent) = source(&setup, "source", 1);
    let (_demo, _gst) = match server {
        RtspServer::Demo => (Some(demo_server(&setup, RTSP_PORT, &wav)), None),
        RtspServer::GStreamer => (
            None,
            Some(GstRtspServer::start(&setup.bed.server, RTSP_PORT, &wav).unwrap()),
        ),
    };
    let captures = start_captures(&setup);
    let before = setup.stats();
    let out = setup.dir.join("played.wav");
    let (name, at_least) = match program {
        Program::Ffmpeg => {
            let mut player = ffmpeg(&setup, "ffmpeg", &url(RTSP_PORT), "udp", &out);
            setup.succeeds(&mut player);
            ("ffmpeg", FFMPEG_AT_LEAST)
        }
        Program::GstLaunch => {
            let mut player = gst_launch(&setup, "gst-launch", &url(RTSP_PORT), &out);
            finish_gst_launch(&setup, &mut player, &out);
            ("gst-launch", GST_AT_LEAST)
        }
    };
    let wire = captures.stop().unwrap();
    let stream = stream(&format!("{name} from {server:?}"), &wire, None);
    assert_sample_exact(name, &sent, &out, at_least);
    assert_kernel_relayed(&setup, before.as_ref(), stream.packets());
}

#[test]
fn ffmpeg_over_udp_from_the_demo_server_is_sample_exact_from_the_first_packet() {
    play_over_udp(Route::Socksify, RtspServer::Demo, Program::Ffmpeg);
}

#[test]
#[ignore = "control without the gateway: --ignored"]
fn control_ffmpeg_over_udp_from_the_demo_server() {
    play_over_udp(Route::Forwarded, RtspServer::Demo, Program::Ffmpeg);
}

#[test]
fn ffmpeg_over_udp_from_gstreamers_server_is_sample_exact() {
    play_over_udp(Route::Socksify, RtspServer::GStreamer, Program::Ffmpeg);
}

#[test]
#[ignore = "control without the gateway: --ignored"]
fn control_ffmpeg_over_udp_from_gstreamers_server() {
    play_over_udp(Route::Forwarded, RtspServer::GStreamer, Program::Ffmpeg);
}

#[test]
fn gst_launch_over_udp_from_the_demo_server_is_sample_exact_from_the_first_packet() {
    play_over_udp(Route::Socksify, RtspServer::Demo, Program::GstLaunch);
}

#[test]
#[ignore = "control without the gateway: --ignored"]
fn control_gst_launch_over_udp_from_the_demo_server() {
    play_over_udp(Route::Forwarded, RtspServer::Demo, Program::GstLaunch);
}

#[test]
fn gst_launch_over_udp_from_gstreamers_server_is_sample_exact() {
    play_over_udp(Route::Socksify, RtspServer::GStreamer, Program::GstLaunch);
}

#[test]
#[ignore = "control without the gateway: --ignored"]
fn control_gst_launch_over_udp_from_gstreamers_server() {
    play_over_udp(Route::Forwarded, RtspServer::GStreamer, Program::GstLaunch);
}

/// ffmpeg and gst-launch-1.0 at once, each from its own demo server with its own noise: each
/// writes exactly its own source, and each server's stream reaches only its player.
fn two_players_at_once(route: Route) {
    let setup = setup(route);
    let (wav_ffmpeg, sent_ffmpeg) = source(&setup, "source-ffmpeg", 2);
    let (wav_gst, sent_gst) = source(&setup, "source-gst", 3);
    let ffmpeg_server = demo_server(&setup, RTSP_PORT, &wav_ffmpeg);
    let gst_server = demo_server(&setup, RTSP_PORT + 1, &wav_gst);
    let captures = start_captures(&setup);
    let before = setup.stats();
    let (out_ffmpeg, out_gst) = (setup.dir.join("ffmpeg.wav"), setup.dir.join("gst.wav"));
    let mut ffmpeg = ffmpeg(&setup, "ffmpeg", &url(RTSP_PORT), "udp", &out_ffmpeg);
    let mut gst = gst_launch(&setup, "gst-launch", &url(RTSP_PORT + 1), &out_gst);
    setup.succeeds(&mut ffmpeg);
    finish_gst_launch(&setup, &mut gst, &out_gst);
    let wire = captures.stop().unwrap();
    let ffmpeg_stream = stream("ffmpeg", &wire, Some(ffmpeg_server.first_ssrc().unwrap()));
    let gst_stream = stream("gst-launch", &wire, Some(gst_server.first_ssrc().unwrap()));
    assert_ne!(
        ffmpeg_stream.dst, gst_stream.dst,
        "each stream to its own player's socket"
    );
    assert_sample_exact("ffmpeg", &sent_ffmpeg, &out_ffmpeg, FFMPEG_AT_LEAST);
    assert_sample_exact("gst-launch", &sent_gst, &out_gst, GST_AT_LEAST);
    assert_kernel_relayed(
        &setup,
        before.as_ref(),
        ffmpeg_stream.packets() + gst_stream.packets(),
    );
}

#[test]
fn ffmpeg_and_gst_launch_at_once_each_get_only_their_own_stream() {
    two_players_at_once(Route::Socksify);
}

#[test]
#[ignore = "control without the gateway: --ignored"]
fn control_ffmpeg_and_gst_launch_at_once() {
    two_players_at_once(Route::Forwarded);
}

/// The port in `server` the second stream comes from.
const SECOND_STREAM_FROM: u16 = 7777;
const SECOND_STREAM_PER_PORT: usize = 100;

/// A second stream's packet: L16 as the real one, another SSRC, a loud constant (no noise).
fn second_stream_packet(n: usize) -> Vec<u8> {
    let n = u32::try_from(n).unwrap();
    let mut packet = vec![0x80, L16_PAYLOAD_TYPE];
    packet.extend_from_slice(&u16::try_from(n % 65_536).unwrap().to_be_bytes());
    packet.extend_from_slice(&(n * 160).to_be_bytes());
    packet.extend_from_slice(&0x0bad_f00d_u32.to_be_bytes());
    packet.extend(std::iter::repeat_n([0x40, 0x00], 160).flatten());
    packet
}

/// Where the second stream goes: the player's external relay ports (RTP and RTCP) from
/// `gateway bindings --json`; in the control, which has no relay, the player's own ports.
fn second_stream_targets(setup: &Setup, playing: &RtpFlow) -> Vec<SocketAddr> {
    if setup.gateway.is_none() {
        let rtcp = SocketAddr::new(playing.dst.ip(), playing.dst.port() + 1);
        return vec![playing.dst, rtcp];
    }
    let mut relays = Vec::new();
    wait_until(WAIT, || {
        relays = setup
            .bindings()
            .unwrap()
            .kernel_entries
            .iter()
            .filter(|entry| entry.remote.ip() == IpAddr::from(addr::SERVER_V4))
            .map(|entry| entry.external_relay)
            .collect();
        relays.sort_unstable();
        relays.dedup();
        relays.len() >= 2
    });
    assert!(
        relays.len() >= 2,
        "the player's RTP and RTCP relays in gateway bindings: {relays:?}"
    );
    relays
}

/// During playback, a second stream from another port of the server to the player's relay
/// ports: the gate drops every datagram of it (`no_binding` grows by exactly what was sent),
/// none reaches `client`, and the player's audio stays sample-exact. In the control, without
/// the gateway, the same datagrams do reach the player.
fn second_stream_during_playback(route: Route) {
    let setup = setup(route);
    let (wav, sent) = source(&setup, "source", 4);
    let _server = demo_server(&setup, RTSP_PORT, &wav);
    let captures = start_captures(&setup);
    let out = setup.dir.join("played.wav");
    let mut player = ffmpeg(&setup, "ffmpeg", &url(RTSP_PORT), "udp", &out);
    let mut playing = None;
    wait_until(PLAYER_TIMEOUT, || {
        playing = captures.client.datagrams().ok().and_then(|datagrams| {
            media_flows(&datagrams)
                .into_iter()
                .find(|flow| flow.packets() >= 5)
        });
        playing.is_some() || player.has_exited()
    });
    let playing = playing.unwrap_or_else(|| {
        panic!(
            "no stream reached ffmpeg\n{}{}",
            player.report(),
            setup.gateway_log()
        )
    });
    let targets = second_stream_targets(&setup, &playing);
    let dropped_before = setup.no_binding_drops();
    let socket = setup
        .bed
        .server
        .udp_socket(
            &format!("{}:{SECOND_STREAM_FROM}", addr::SERVER_V4),
            Duration::from_secs(1),
        )
        .unwrap();
    for (i, target) in targets.iter().enumerate() {
        send_paced(&socket, *target, SECOND_STREAM_PER_PORT, |n| {
            second_stream_packet(i * SECOND_STREAM_PER_PORT + n)
        });
    }
    let second = targets.len() * SECOND_STREAM_PER_PORT;
    println!("sent {second} datagrams from port {SECOND_STREAM_FROM} to {targets:?}");
    if let Some(before) = dropped_before {
        let second = u64::try_from(second).unwrap();
        let mut dropped = 0;
        wait_until(WAIT, || {
            dropped = setup.no_binding_drops().unwrap() - before;
            dropped >= second
        });
        println!("no_binding grew by {dropped}");
        assert_eq!(dropped, second, "no_binding grew by what was sent");
    }
    setup.succeeds(&mut player);
    let wire = captures.stop().unwrap();
    let from_second = |datagrams: &[Datagram]| {
        datagrams
            .iter()
            .filter(|d| d.src.port() == SECOND_STREAM_FROM)
            .count()
    };
    assert_eq!(from_second(&wire.sent), second, "the server sent all of it");
    let reached = from_second(&wire.received);
    stream("ffmpeg", &wire, None);
    match route {
        Route::Socksify => {
            assert_eq!(reached, 0, "none of the second stream reached client");
            assert_sample_exact("ffmpeg", &sent, &out, FFMPEG_AT_LEAST);
        }
        Route::Forwarded => {
            assert_eq!(
                reached, second,
                "without the gateway the second stream reaches the player"
            );
            let verdict = Audio::read_wav(&out).map(|audio| sent.compare(&audio).to_string());
            println!("without the gateway, ffmpeg's audio: {verdict:?}");
        }
    }
}

#[test]
fn a_second_stream_to_the_players_relay_ports_is_dropped_and_counted() {
    second_stream_during_playback(Route::Socksify);
}

#[test]
#[ignore = "control without the gateway: --ignored"]
fn control_a_second_stream_reaches_the_player_without_the_gateway() {
    second_stream_during_playback(Route::Forwarded);
}

/// curl fetches a file from Python's http.server in `server`. Through the gateway, with
/// forwarding off, only CONNECT can carry it: curl alone cannot reach the server.
fn curl_gets_a_file(route: Route, server: IpAddr) {
    require("curl", &["--version"], "curl").unwrap();
    let setup = setup(route);
    let body = (0..2000).fold(String::new(), |mut body, i| {
        let _ = writeln!(body, "line {i:04} of the file http.server serves in server");
        body
    });
    let _http = HttpServer::start(&setup.bed.server, &body).unwrap();
    let url = format!("http://{}/index.txt", SocketAddr::new(server, 80));
    if route == Route::Socksify {
        let mut alone = Player::spawn(
            setup.bed.client.command("curl").args([
                "-s",
                "-o",
                "/dev/null",
                "--connect-timeout",
                "2",
                &url,
            ]),
            "curl-alone",
            &setup.dir,
        )
        .unwrap();
        let status = alone.wait(PLAYER_TIMEOUT);
        assert!(
            status.is_some_and(|status| !status.success()),
            "curl alone cannot reach the server: {status:?}"
        );
    }
    let mut curl = setup.player("curl", "curl", &["-s", "-f", "--max-time", "20", &url]);
    setup.succeeds(&mut curl);
    let got = curl.stdout();
    assert!(
        got == body.as_bytes(),
        "curl printed the file ({} octets): {} octets\n{}",
        body.len(),
        got.len(),
        curl.report()
    );
}

#[test]
fn curl_gets_a_file_through_connect() {
    curl_gets_a_file(Route::Socksify, addr::SERVER_V4.into());
}

/// The same over IPv6: curl's `AF_INET6` socket connects to the (IPv4) gateway IPv4-mapped and
/// CONNECTs to the server's IPv6 address.
#[test]
fn curl_gets_a_file_through_connect_over_ipv6() {
    curl_gets_a_file(Route::Socksify, addr::SERVER_V6.into());
}

#[test]
#[ignore = "control without the gateway: --ignored"]
fn control_curl_gets_a_file() {
    curl_gets_a_file(Route::Forwarded, addr::SERVER_V4.into());
}

/// ffmpeg with `-rtsp_transport tcp`: RTP interleaved on the RTSP connection, which the shim
/// carries through CONNECT; no RTP over UDP on either wire. `GStreamer`'s server, as the demo
/// server speaks RTP over UDP only.
fn ffmpeg_over_tcp(route: Route) {
    let setup = setup(route);
    let (wav, sent) = source(&setup, "source", 5);
    let _server = GstRtspServer::start(&setup.bed.server, RTSP_PORT, &wav).unwrap();
    let captures = start_captures(&setup);
    let out = setup.dir.join("played.wav");
    let mut player = ffmpeg(&setup, "ffmpeg", &url(RTSP_PORT), "tcp", &out);
    setup.succeeds(&mut player);
    let wire = captures.stop().unwrap();
    assert!(
        media_flows(&wire.sent).is_empty() && media_flows(&wire.received).is_empty(),
        "no RTP over UDP: {} / {}",
        describe(&media_flows(&wire.sent)),
        describe(&media_flows(&wire.received))
    );
    assert_sample_exact("ffmpeg over TCP", &sent, &out, FFMPEG_AT_LEAST);
}

#[test]
fn ffmpeg_over_rtsp_interleaved_tcp_is_sample_exact() {
    ffmpeg_over_tcp(Route::Socksify);
}

#[test]
#[ignore = "control without the gateway: --ignored"]
fn control_ffmpeg_over_rtsp_interleaved_tcp() {
    ffmpeg_over_tcp(Route::Forwarded);
}
