//! Multicast RTSP through the firewall (issue 18), end to end in the test bed: `GStreamer`'s RTSP
//! server in `server` offers only multicast (an address pool in 233.252.0.0/24) and sends the
//! stream to the group on its link; `gateway rtsp-get --multicast` in `client` asks for
//! `RTP/AVP;multicast`, subscribes to the group the SETUP reply names through the gateway in
//! `fw` in multicast-to-unicast (MU) mode, and must write the file's audio sample-exact. Without
//! a receive policy the gateway refuses the subscription with reply `11`, and rtsp-get says so.
//!
//! Every process and namespace is removed by guards, also on panic; every wait is bounded.
//! Root only.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    time::Duration,
};

use gateway_rtsp::{
    audio::Audio,
    rtp::RtpPacket,
    transport::{SetupTransport, parse_setup_reply},
};
use testbed::{
    ChildGuard, Testbed, addr,
    gateway::{GatewayDaemon, InstanceCleanup, gateway_bin, start_in_fw},
    iface,
    peers::{GstRtspMulticastServer, MulticastPool},
    unique_suffix, wait_until,
};

const PROXY: &str = "198.51.100.1:1080";
const RTSP_PORT: u16 = 8554;
const URL: &str = "rtsp://203.0.113.2:8554/rtsp.wav";
const POOL: MulticastPool = MulticastPool {
    first: Ipv4Addr::new(233, 252, 0, 10),
    last: Ipv4Addr::new(233, 252, 0, 20),
    min_port: 5000,
    max_port: 5100,
    ttl: 16,
};
/// The daemon's multicast policy for the played test (the flags of issue 18's daemon half).
const MULTICAST_POLICY: [&str; 8] = [
    "--allow-multicast-receive",
    "233.252.0.0/24",
    "--multicast-modes",
    "mu",
    "--multicast-default-mode",
    "mu",
    "--multicast-max-ttl",
    "16",
];
/// Bound on one rtsp-get run: its own waits are bounded (5 s to the first packet, 10 s per RTSP
/// answer, the asked seconds), this is the outer guard.
const RTSP_GET_BOUND: Duration = Duration::from_mins(1);

struct Setup {
    // Field order is drop order: the gateway stops before its pins are removed and before the
    // namespaces go.
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
    let dir = std::env::temp_dir().join(format!("gateway-mcast-rtsp-{}", unique_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let (gateway, cleanup) = start_in_fw(&bed, extra).unwrap();
    Setup {
        gateway,
        _cleanup: cleanup,
        dir,
        bed,
    }
}

/// The daemon's `run` must know the multicast policy flags; a daemon without multicast support
/// fails here with a clear message rather than with an unknown-argument error at start-up.
fn require_multicast_policy_flags() {
    let help = Command::new(gateway_bin())
        .args(["run", "--help"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&help.stdout);
    for flag in ["--allow-multicast-receive", "--multicast-modes"] {
        assert!(
            text.contains(flag),
            "`gateway run` has no {flag}: the daemon's multicast support (issue 18) is not in \
             this build"
        );
    }
}

/// A 2-second 8 kHz tone the server streams and the client must reproduce.
fn source_wav(dir: &Path) -> (PathBuf, Audio) {
    let path = dir.join("source.wav");
    let audio = Audio::tone(8000, 2.0, 523.25);
    audio.write_wav(&path).unwrap();
    (path, audio)
}

fn gst_server(bed: &Testbed, dir: &Path, wav: &Path) -> GstRtspMulticastServer {
    GstRtspMulticastServer::start(&bed.server, RTSP_PORT, wav, POOL, &dir.join("gst.log")).unwrap()
}

/// Runs `gateway rtsp-get URL --multicast` in `client`, bounded; returns its exit status (`None`
/// if it had to be killed) and its stdout and stderr.
fn rtsp_get_multicast(setup: &Setup, out: &Path, seconds: &str) -> (Option<ExitStatus>, String) {
    let stdout = setup.dir.join("rtsp-get.out");
    let stderr = setup.dir.join("rtsp-get.err");
    let mut cmd = setup.bed.client.command(gateway_bin());
    cmd.args(["rtsp-get", URL, "--proxy", PROXY, "--multicast", "--out"])
        .arg(out)
        .args(["--seconds", seconds])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(std::fs::File::create(&stderr).unwrap());
    let mut child = ChildGuard::spawn(&mut cmd, "gateway rtsp-get --multicast").unwrap();
    let status = if wait_until(RTSP_GET_BOUND, || child.has_exited()) {
        child
            .child_mut()
            .and_then(|child| child.try_wait().ok().flatten())
    } else {
        None
    };
    // Dropping the guard kills it if it is still running.
    drop(child);
    let text = std::fs::read_to_string(&stdout).unwrap_or_default()
        + &std::fs::read_to_string(&stderr).unwrap_or_default();
    (status, text)
}

/// The groups `fw`'s external interface has joined (`ip maddr show dev outside0`).
fn joined_groups(setup: &Setup) -> String {
    let out = setup
        .bed
        .fw
        .command("ip")
        .args(["maddr", "show", "dev", iface::FW_OUTSIDE])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|line| line.contains("233.252.0."))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn gstreamer_multicast_stream_plays_through_mu() {
    require_multicast_policy_flags();
    let mut setup = setup(&MULTICAST_POLICY);
    let (wav, sent) = source_wav(&setup.dir);
    let _gst = gst_server(&setup.bed, &setup.dir, &wav);
    let out = setup.dir.join("multicast.wav");
    let (status, text) = rtsp_get_multicast(&setup, &out, "4");
    println!("{text}");
    assert!(
        status.is_some_and(|status| status.success()),
        "rtsp-get --multicast played ({status:?}):\n{text}\ngst: {}",
        std::fs::read_to_string(setup.dir.join("gst.log")).unwrap_or_default()
    );
    for line in [
        // The server named a group from its pool, and the gateway subscribed us in MU mode.
        "multicast destination=233.252.0.",
        "subscribed: AID",
        "multicast-to-unicast (MU)",
        "PLAY: 200 OK",
        "lost 0",
    ] {
        assert!(text.contains(line), "{line:?} in:\n{text}");
    }
    let received = Audio::read_wav(&out).unwrap();
    let verdict = sent.compare(&received);
    println!(
        "GStreamer multicast through MU: {verdict}, {:?}",
        received.duration()
    );
    assert!(
        verdict.is_sample_exact() && received.duration() >= Duration::from_millis(1500),
        "the file's audio arrives sample-exact and about whole: {verdict}, {:?}",
        received.duration()
    );
    // rtsp-get released its subscriptions: the gateway leaves the group once nobody receives it.
    assert!(
        wait_until(Duration::from_secs(5), || joined_groups(&setup).is_empty()),
        "fw left the group after the release:\n{}",
        joined_groups(&setup)
    );
    assert!(setup.gateway.is_running(), "the gateway still runs");
}

#[test]
fn without_a_receive_policy_the_subscription_is_refused_with_reply_11() {
    // No --allow-multicast-receive: no group may be received.
    let mut setup = setup(&[]);
    let (wav, _) = source_wav(&setup.dir);
    let _gst = gst_server(&setup.bed, &setup.dir, &wav);
    let out = setup.dir.join("refused.wav");
    let (status, text) = rtsp_get_multicast(&setup, &out, "2");
    println!("{text}");
    assert!(
        status.is_some_and(|status| !status.success()),
        "rtsp-get fails ({status:?}):\n{text}"
    );
    for says in [
        "multicast destination=233.252.0.",
        "the gateway refused the multicast subscription to 233.252.0.",
        "multicast receive not allowed (11)",
        "--allow-multicast-receive",
    ] {
        assert!(text.contains(says), "{says:?} in:\n{text}");
    }
    assert!(
        !text.contains("PLAY: 200 OK"),
        "no PLAY after a refusal:\n{text}"
    );
    assert!(joined_groups(&setup).is_empty(), "fw joined nothing");
    assert!(setup.gateway.is_running(), "the gateway still runs");
}

/// One RTSP request on `stream` and its answer's header block (these answers have no body).
fn rtsp_exchange(stream: &mut TcpStream, request: &str) -> String {
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let mut chunk = [0u8; 2048];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).expect("an RTSP answer in time");
        assert!(n > 0, "the RTSP server closed the connection");
        answer.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8_lossy(&answer).into_owned()
}

fn header<'a>(answer: &'a str, name: &str) -> &'a str {
    answer
        .lines()
        .find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name).then_some(value.trim())
        })
        .unwrap_or_else(|| panic!("no {name} in {answer}"))
}

/// Removes a directory on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The bed itself, without a gateway (whose gate would drop the group's datagrams it has not
/// subscribed to): a socket in `fw` that joins the group on the external interface receives the
/// server's RTP. So the played test can fail only for the gateway.
#[test]
fn the_servers_group_reaches_fws_external_interface() {
    let bed = Testbed::new().unwrap();
    let dir = TempDir(std::env::temp_dir().join(format!("gateway-mcast-bed-{}", unique_suffix())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let (wav, _) = source_wav(&dir.0);
    let _gst = gst_server(&bed, &dir.0, &wav);
    let outside = addr::FW_OUTSIDE_V4;
    let (setup_reply, first) = bed
        .fw
        .run(move || {
            let server = SocketAddr::new(addr::SERVER_V4.into(), RTSP_PORT);
            let mut rtsp = TcpStream::connect_timeout(&server, Duration::from_secs(5)).unwrap();
            rtsp.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let answer = rtsp_exchange(
                &mut rtsp,
                &format!(
                    "SETUP {URL}/stream=0 RTSP/1.0\r\nCSeq: 1\r\n\
                     Transport: RTP/AVP;multicast\r\n\r\n"
                ),
            );
            let transport = header(&answer, "Transport").to_owned();
            let SetupTransport::Multicast(multicast) = parse_setup_reply(&transport).unwrap()
            else {
                panic!("a multicast answer: {answer}")
            };
            let std::net::IpAddr::V4(group) = multicast.group else {
                panic!("an IPv4 group: {transport}")
            };
            let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, multicast.ports.0)).unwrap();
            socket.join_multicast_v4(&group, &outside).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let session = header(&answer, "Session")
                .split(';')
                .next()
                .unwrap()
                .to_owned();
            let played = rtsp_exchange(
                &mut rtsp,
                &format!("PLAY {URL} RTSP/1.0\r\nCSeq: 2\r\nSession: {session}\r\n\r\n"),
            );
            assert!(played.starts_with("RTSP/1.0 200"), "{played}");
            let mut buf = vec![0u8; 65_536];
            let (len, from) = socket.recv_from(&mut buf).expect("the group's RTP in fw");
            let packet = RtpPacket::parse(&buf[..len]).unwrap();
            (transport, (from, packet.payload_type, group))
        })
        .unwrap();
    println!("{setup_reply}: first RTP from {} (PT {})", first.0, first.1);
    assert!(setup_reply.contains("ttl=16"), "{setup_reply}");
    assert_eq!(first.0.ip(), std::net::IpAddr::from(addr::SERVER_V4));
    assert_eq!(first.1, 96);
    assert!(POOL.first <= first.2 && first.2 <= POOL.last, "{}", first.2);
}
