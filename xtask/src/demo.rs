//! `cargo xtask demo`: the project's main job in one command. Builds, brings up the three
//! namespaces, starts the gateway (XDP gate and kernel relay) in `fw` and the demo media server in
//! `server`, plays `rtsp://203.0.113.2:8554/rtsp.wav` with `gateway rtsp-get` in `client`, then
//! prints, in order: the two binding steps with the addresses exchanged, the stream statistics,
//! the gateway's per-binding counters (taken mid-stream) and per-reason counters, what happened to
//! unsolicited UDP, and whether the received audio is sample-exact. Tears everything down; exits
//! 0 only on success.

use std::{net::IpAddr, path::Path, process::Stdio, time::Duration};

use anyhow::{Context as _, Result, bail};
use testbed::{
    ChildGuard, Testbed, addr,
    gateway::{
        GatewayDaemon, InstanceCleanup, TESTBED_ARGS, gateway_bin, gateway_cli, reason_packets,
        stats_json,
    },
    iface, traffic, unique_suffix, wait_until,
};

const URL: &str = "rtsp://203.0.113.2:8554/rtsp.wav";
const PROXY: &str = "198.51.100.1:1080";
const RATE: u32 = 8000;
const SECONDS: u32 = 3;
const JUNK: usize = 1000;

pub fn run() -> Result<()> {
    crate::cargo::cargo(&["build", "--locked", "--bins"])?;
    let work = std::env::temp_dir().join(format!("gateway-demo-{}", unique_suffix()));
    std::fs::create_dir_all(&work)?;
    let result = demo(&work);
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// A tone with a rising pitch, so any misplaced sample shows.
fn write_source(path: &Path) -> Result<Vec<i16>> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: RATE,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut writer = hound::WavWriter::create(path, spec).context("create the source WAV")?;
    let samples: Vec<i16> = (0..RATE * SECONDS)
        .map(|i| {
            let t = f64::from(i) / f64::from(RATE);
            let frequency = 440.0 + 110.0 * t;
            #[expect(
                clippy::cast_possible_truncation,
                reason = "amplitude stays within i16"
            )]
            let sample = (12_000.0 * (2.0 * std::f64::consts::PI * frequency * t).sin()) as i16;
            sample
        })
        .collect();
    for sample in &samples {
        writer.write_sample(*sample)?;
    }
    writer.finalize()?;
    Ok(samples)
}

fn read_samples(path: &Path) -> Result<Vec<i16>> {
    let mut reader =
        hound::WavReader::open(path).with_context(|| format!("open {}", path.display()))?;
    reader
        .samples::<i16>()
        .collect::<Result<_, _>>()
        .context("read the received WAV")
}

#[expect(
    clippy::too_many_lines,
    reason = "the demo's steps in the order they are printed"
)]
fn demo(work: &Path) -> Result<()> {
    let bed = Testbed::new().context("bring up the testbed")?;
    println!(
        "demo: testbed {} (198.51.100.2) -- {} (198.51.100.1 | 203.0.113.1) -- {} (203.0.113.2), forwarding off in fw",
        bed.client.name(),
        bed.fw.name(),
        bed.server.name()
    );
    let instance = format!("demo-{}", unique_suffix());
    let _cleanup = InstanceCleanup {
        instance: instance.clone(),
    };
    let mut gateway = GatewayDaemon::start(&bed.fw, &instance, &TESTBED_ARGS)?;
    // The daemon says where it put the gate (tc on veth by default).
    let hook = if gateway.log_text().contains("hook=\"xdp\"") {
        "XDP"
    } else {
        "tc"
    };
    println!(
        "demo: gateway running in {} ({hook} gate on {}, kernel relay)",
        bed.fw.name(),
        iface::FW_OUTSIDE
    );

    let source = work.join("source.wav");
    let sent = write_source(&source)?;
    let mut server_cmd = bed
        .server
        .command(gateway_bin().with_file_name("demo-media-server"));
    server_cmd
        .args(["--listen", "203.0.113.2:8554", "--wav"])
        .arg(&source)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _server = ChildGuard::spawn(&mut server_cmd, "demo-media-server")?;
    let listening = bed.server.run(|| {
        wait_until(Duration::from_secs(10), || {
            std::net::TcpStream::connect_timeout(
                &"203.0.113.2:8554".parse().expect("address"),
                Duration::from_millis(100),
            )
            .is_ok()
        })
    })?;
    if !listening {
        bail!("the demo media server did not start");
    }
    println!("demo: demo media server serving {URL} ({SECONDS} s of L16 audio)");

    let received_path = work.join("received.wav");
    let mut player = bed.client.command(gateway_bin());
    player
        .args(["rtsp-get", URL, "--proxy", PROXY, "--out"])
        .arg(&received_path)
        .args(["--seconds", &(SECONDS + 2).to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    println!("demo: client: gateway rtsp-get {URL} --proxy {PROXY}");
    let child = player.spawn().context("start gateway rtsp-get")?;
    // Mid-stream: once both bindings of the RTP pair are confirmed.
    let confirmed = || {
        gateway_cli(&bed.fw, &["bindings", "--instance", &instance, "--json"])
            .ok()
            .and_then(|out| serde_json::from_slice::<serde_json::Value>(&out.stdout).ok())
            .is_some_and(|doc| {
                doc["enhanced_bindings"]
                    .as_array()
                    .is_some_and(|b| b.iter().any(|b| b["state"] == "confirmed"))
            })
    };
    if !wait_until(Duration::from_secs(10), confirmed) {
        println!("demo: no confirmed binding seen within 10 s");
    }
    let mid_stream = gateway_cli(&bed.fw, &["bindings", "--instance", &instance])?;
    let finished = child
        .wait_with_output()
        .context("wait for gateway rtsp-get")?;
    let output = String::from_utf8_lossy(&finished.stdout).into_owned()
        + &String::from_utf8_lossy(&finished.stderr);

    println!("\n== 1. the two binding steps ==");
    for line in output
        .lines()
        .filter(|l| l.contains("step 1") || l.contains("SETUP") || l.contains("step 2"))
    {
        println!("{line}");
    }
    println!("\n== 2. the stream ==");
    for line in output.lines().filter(|l| {
        l.contains("received")
            || l.contains("PLAY")
            || l.contains("TEARDOWN")
            || l.contains("released")
    }) {
        println!("{line}");
    }
    if !finished.status.success() {
        bail!(
            "gateway rtsp-get failed:\n{output}\ngateway log:\n{}",
            gateway.log_text()
        );
    }
    println!("\n== 3. the gateway's bindings, mid-stream (gateway bindings) ==");
    print!("{}", String::from_utf8_lossy(&mid_stream.stdout));

    // Unsolicited UDP at the relay ports while nothing is bound: the gate drops it.
    let sinkless_before = reason_packets(&stats_json(&bed.fw, &instance)?, "no_binding");
    traffic::send_udp(
        &bed.server,
        IpAddr::from(addr::FW_OUTSIDE_V4),
        &[16384, 16385, 5004],
        JUNK,
        b"unsolicited",
    )?;
    let junk_counted = || {
        stats_json(&bed.fw, &instance).is_ok_and(|stats| {
            reason_packets(&stats, "no_binding") - sinkless_before >= JUNK as u64
        })
    };
    wait_until(Duration::from_secs(10), junk_counted);
    let stats = stats_json(&bed.fw, &instance)?;
    let junk_dropped = reason_packets(&stats, "no_binding") - sinkless_before;
    println!("\n== 4. per-reason counters (gateway stats) ==");
    let table = gateway_cli(&bed.fw, &["stats", "--instance", &instance])?;
    print!("{}", String::from_utf8_lossy(&table.stdout));
    println!(
        "unsolicited: {JUNK} datagrams from 203.0.113.2 to the relay ports after the stream: {junk_dropped} dropped by the gate"
    );

    println!("\n== 5. the audio ==");
    let received = read_samples(&received_path)?;
    let exact = received == sent;
    let first_diff = received.iter().zip(&sent).position(|(a, b)| a != b);
    println!(
        "sent {} samples, received {} samples: {}",
        sent.len(),
        received.len(),
        if exact {
            "sample-exact".to_owned()
        } else {
            format!("DIFFERENT (first difference at sample {first_diff:?})")
        }
    );
    let relayed = reason_packets(&stats, "kernel_relayed_inbound");
    let userspace = reason_packets(&stats, "binding_to_userspace");
    println!(
        "kernel relay carried {relayed} inbound datagrams; the userspace relay carried {userspace}"
    );

    if !gateway.stop() {
        bail!("the gateway did not stop cleanly:\n{}", gateway.log_text());
    }
    println!("\ndemo: gateway stopped; its gate stays attached and dropping until detached");
    testbed::gateway::detach(&bed.fw, &gateway.instance)
        .context("gateway detach after the demo")?;
    println!("demo: `gateway detach` removed the gate and its pins; testbed torn down");
    let junk_ok = u64::try_from(JUNK).is_ok_and(|junk| junk_dropped == junk);
    if !exact || relayed == 0 || !junk_ok {
        bail!(
            "demo failed: audio exact {exact}, kernel relayed {relayed}, unsolicited dropped {junk_dropped}/{JUNK}"
        );
    }
    println!("demo: OK");
    Ok(())
}
