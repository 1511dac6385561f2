//! RTSP through the firewall, end to end in the test bed: `gateway rtsp-get` in `client` plays a
//! stream from a media server in `server` through the gateway in `fw`, over UDP, admitted
//! exactly and relayed in the kernel. The demo media server (one and two tracks, two clients at
//! once, media sent from a second address, the userspace datapath), and `GStreamer`'s RTSP server as
//! a real peer. Root only.

use std::{
    path::{Path, PathBuf},
    process::{Output, Stdio},
    thread,
    time::Duration,
};

use gateway_rtsp::audio::{Audio, Match};
use testbed::{
    ChildGuard, Testbed,
    gateway::{
        GatewayDaemon, InstanceCleanup, gateway_bin, reason_packets, start_in_fw, stats_json,
    },
    unique_suffix, wait_until,
};

const PROXY: &str = "198.51.100.1:1080";
const URL: &str = "rtsp://203.0.113.2:8554/rtsp.wav";

struct Setup {
    gateway: GatewayDaemon,
    _cleanup: InstanceCleanup,
    dir: PathBuf,
    bed: Testbed,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn setup(extra: &[&str]) -> Setup {
    let bed = Testbed::new().unwrap();
    // A second address on the server: the media may come from it.
    bed.add_second_server_address().unwrap();
    let (gateway, cleanup) = start_in_fw(&bed, extra).unwrap();
    let dir = std::env::temp_dir().join(format!("gateway-rtsp-{}", unique_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    Setup {
        gateway,
        _cleanup: cleanup,
        dir,
        bed,
    }
}

fn demo_server_bin() -> PathBuf {
    gateway_bin().with_file_name("demo-media-server")
}

/// Starts the demo media server in `server` on 203.0.113.2:8554 with `args`, ready when its port
/// accepts connections.
fn demo_server(setup: &Setup, args: &[&str]) -> ChildGuard {
    let mut cmd = setup.bed.server.command(demo_server_bin());
    cmd.args(["--listen", "203.0.113.2:8554"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let guard = ChildGuard::spawn(&mut cmd, "demo-media-server").unwrap();
    wait_for_port(setup);
    guard
}

fn wait_for_port(setup: &Setup) {
    let ready = setup
        .bed
        .server
        .run(|| {
            wait_until(Duration::from_secs(10), || {
                std::net::TcpStream::connect_timeout(
                    &"203.0.113.2:8554".parse().unwrap(),
                    Duration::from_millis(100),
                )
                .is_ok()
            })
        })
        .unwrap();
    assert!(ready, "the RTSP server listens");
}

fn rtsp_get(setup: &Setup, out: &Path, seconds: &str) -> Output {
    rtsp_get_with(setup, out, seconds, &[])
}

fn rtsp_get_with(setup: &Setup, out: &Path, seconds: &str, extra: &[&str]) -> Output {
    setup
        .bed
        .client
        .command(gateway_bin())
        .args(["rtsp-get", URL, "--proxy", PROXY, "--out"])
        .arg(out)
        .args(["--seconds", seconds])
        .args(extra)
        .output()
        .unwrap()
}

fn assert_played(out: &Output) -> String {
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "rtsp-get failed:\n{text}");
    text
}

/// A 2-second 8 kHz source the server streams and the client must reproduce.
fn source_wav(setup: &Setup) -> (PathBuf, Audio) {
    let path = setup.dir.join("source.wav");
    let audio = Audio::tone(8000, 2.0, 523.25);
    audio.write_wav(&path).unwrap();
    (path, audio)
}

fn assert_sample_exact(sent: &Audio, received_path: &Path) {
    let received = Audio::read_wav(received_path).unwrap();
    let verdict = sent.compare(&received);
    println!("{}: {verdict:?}", received_path.display());
    assert!(
        matches!(verdict, Match::Exact),
        "received audio equals what was sent: {verdict:?}"
    );
}

#[test]
fn demo_flow_is_sample_exact_through_the_kernel_relay() {
    let setup = setup(&[]);
    let (wav, sent) = source_wav(&setup);
    let _server = demo_server(&setup, &["--wav", wav.to_str().unwrap()]);
    let out = setup.dir.join("received.wav");
    let text = assert_played(&rtsp_get(&setup, &out, "5"));
    println!("{text}");
    for line in [
        "step 1: AID",
        "step 2: confirmed source 203.0.113.2:",
        "lost 0",
    ] {
        assert!(text.contains(line), "{line:?} in:\n{text}");
    }
    assert_sample_exact(&sent, &out);
    let stats = stats_json(&setup.bed.fw, &setup.gateway.instance).unwrap();
    let relayed = reason_packets(&stats, "kernel_relayed_inbound");
    println!(
        "kernel relayed {relayed} inbound datagrams, {} outbound",
        reason_packets(&stats, "kernel_relayed_outbound")
    );
    assert!(
        relayed >= 100,
        "the RTP stream went through the kernel relay ({relayed})"
    );
    assert_eq!(
        reason_packets(&stats, "binding_to_userspace"),
        0,
        "the userspace relay carried none"
    );
    assert!(
        reason_packets(&stats, "kernel_relayed_outbound") > 0,
        "receiver reports went back in the kernel"
    );
}

#[test]
fn media_from_a_second_server_address() {
    let setup = setup(&[]);
    let (wav, sent) = source_wav(&setup);
    let _server = demo_server(
        &setup,
        &[
            "--wav",
            wav.to_str().unwrap(),
            "--media-from",
            "203.0.113.3",
        ],
    );
    let out = setup.dir.join("received.wav");
    let text = assert_played(&rtsp_get(&setup, &out, "5"));
    assert!(
        text.contains("step 2: confirmed source 203.0.113.3:"),
        "{text}"
    );
    assert_sample_exact(&sent, &out);
}

#[test]
fn two_tracks_and_two_clients_at_once() {
    let setup = setup(&[]);
    let (wav, sent) = source_wav(&setup);
    let _server = demo_server(&setup, &["--wav", wav.to_str().unwrap(), "--tracks", "2"]);
    let outs: Vec<PathBuf> = (0..2)
        .map(|i| setup.dir.join(format!("client{i}.wav")))
        .collect();
    let results: Vec<Output> = thread::scope(|scope| {
        let handles: Vec<_> = outs
            .iter()
            .map(|out| scope.spawn(|| rtsp_get(&setup, out, "5")))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (out, result) in outs.iter().zip(&results) {
        let text = assert_played(result);
        assert_eq!(
            text.matches("step 2: confirmed").count(),
            2,
            "two tracks:\n{text}"
        );
        assert_sample_exact(&sent, out);
        let second = PathBuf::from(format!("{}-1.wav", out.with_extension("").display()));
        assert_sample_exact(&sent, &second);
    }
}

#[test]
fn userspace_datapath_gives_the_same_audio() {
    let setup = setup(&["--datapath", "userspace"]);
    let (wav, sent) = source_wav(&setup);
    let _server = demo_server(&setup, &["--wav", wav.to_str().unwrap()]);
    let out = setup.dir.join("received.wav");
    assert_played(&rtsp_get(&setup, &out, "5"));
    assert_sample_exact(&sent, &out);
    let stats = stats_json(&setup.bed.fw, &setup.gateway.instance).unwrap();
    assert_eq!(reason_packets(&stats, "kernel_relayed_inbound"), 0);
    assert!(reason_packets(&stats, "binding_to_userspace") >= 100);
}

#[test]
fn gstreamer_rtsp_server_interop() {
    let setup = setup(&[]);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("peers/gst_rtsp_server.py");
    let mut cmd = setup.bed.server.command("/usr/bin/python3");
    cmd.arg(&script)
        .args(["203.0.113.2", "8554"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _gst = ChildGuard::spawn(&mut cmd, "GStreamer RTSP server").unwrap();
    wait_for_port(&setup);
    let out = setup.dir.join("gst.wav");
    let text = assert_played(&rtsp_get(&setup, &out, "3"));
    println!("{text}");
    // GStreamer names no source=: the media source is the RTSP server's own address.
    assert!(
        text.contains("step 2: confirmed source 203.0.113.2:"),
        "{text}"
    );
    let received = Audio::read_wav(&out).unwrap();
    assert!(
        received.duration() >= Duration::from_millis(1500),
        "about 3 s of audio, got {:?}",
        received.duration()
    );
    let loud = received
        .samples
        .iter()
        .filter(|s| s.unsigned_abs() > 1000)
        .count();
    assert!(loud > received.samples.len() / 4, "a tone, not silence");
    let stats = stats_json(&setup.bed.fw, &setup.gateway.instance).unwrap();
    assert!(
        reason_packets(&stats, "kernel_relayed_inbound") > 10,
        "relayed in the kernel"
    );
}

// ---- header-less (RAW) delivery -----------------------------------------------------------------

const RAW_GRANTED: &str = "header-less (RAW) delivery granted";

/// The stream went through the kernel relay without a header, both ways, and the userspace
/// relay carried none of it.
fn assert_raw_in_the_kernel(setup: &Setup, at_least: u64) {
    let stats = stats_json(&setup.bed.fw, &setup.gateway.instance).unwrap();
    let inbound = reason_packets(&stats, "kernel_relayed_raw_inbound");
    let outbound = reason_packets(&stats, "kernel_relayed_raw_outbound");
    println!("kernel relayed {inbound} RAW datagrams inbound, {outbound} outbound");
    assert!(
        inbound >= at_least,
        "RTP relayed header-less in the kernel ({inbound})"
    );
    assert!(
        outbound > 0,
        "receiver reports went back header-less in the kernel"
    );
    for reason in [
        "kernel_relayed_inbound",
        "binding_to_userspace",
        "partial_checksum_to_userspace",
        "raw_to_other_destination",
    ] {
        assert_eq!(reason_packets(&stats, reason), 0, "{reason}");
    }
}

fn raw_demo_flow(offloading_server: bool) {
    let setup = setup(&[]);
    if offloading_server {
        // The server leaves its UDP checksums to the device (CHECKSUM_PARTIAL skbs, as from any
        // container or VM); fw completes them in software on the way out, so the client's stack
        // verifies every one.
        setup
            .bed
            .server
            .set_tx_checksum_offload(testbed::iface::HOST, true)
            .unwrap();
        setup
            .bed
            .fw
            .set_tx_checksum_offload(testbed::iface::FW_INSIDE, false)
            .unwrap();
    }
    let (wav, sent) = source_wav(&setup);
    let _server = demo_server(&setup, &["--wav", wav.to_str().unwrap()]);
    let out = setup.dir.join("received.wav");
    let text = assert_played(&rtsp_get_with(&setup, &out, "5", &["--raw"]));
    println!("{text}");
    for line in [
        RAW_GRANTED,
        "step 2: confirmed source 203.0.113.2:",
        "lost 0",
    ] {
        assert!(text.contains(line), "{line:?} in:\n{text}");
    }
    assert_sample_exact(&sent, &out);
    // 2 s of 8 kHz audio in 20 ms packets.
    assert_raw_in_the_kernel(&setup, 100);
}

#[test]
fn raw_demo_flow_is_sample_exact_in_the_kernel() {
    raw_demo_flow(false);
}

#[test]
fn raw_demo_flow_from_an_offloading_server_stays_in_the_kernel() {
    raw_demo_flow(true);
}

#[test]
fn raw_gstreamer_rtsp_server_is_sample_exact() {
    let setup = setup(&[]);
    let (wav, sent) = source_wav(&setup);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("peers/gst_rtsp_server.py");
    let mut cmd = setup.bed.server.command("/usr/bin/python3");
    cmd.arg(&script)
        .args(["203.0.113.2", "8554"])
        .arg(&wav)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _gst = ChildGuard::spawn(&mut cmd, "GStreamer RTSP server").unwrap();
    wait_for_port(&setup);
    let out = setup.dir.join("gst-raw.wav");
    let text = assert_played(&rtsp_get_with(&setup, &out, "4", &["--raw"]));
    println!("{text}");
    assert!(text.contains(RAW_GRANTED), "{text}");
    let received = Audio::read_wav(&out).unwrap();
    let verdict = sent.compare(&received);
    println!(
        "GStreamer through RAW: {verdict:?}, {:?}",
        received.duration()
    );
    assert!(
        verdict.is_sample_exact() && received.duration() >= Duration::from_millis(1500),
        "GStreamer's stream of the file arrives sample-exact: {verdict:?}"
    );
    // GStreamer packs the 2 s into some 25 larger packets.
    assert_raw_in_the_kernel(&setup, 20);
}
