//! `gateway run --metrics`: the endpoint scraped from inside while a kernel-relayed stream and
//! an unsolicited flood arrive, what it serves checked by `promtool`, and what an attacker on
//! the external side gets (nothing), and the addresses a start refuses. Root only.

mod common;

use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::Duration,
};

use common::pinned_packets;
use gateway_client::{Client, Family};
use gateway_common::ExitReason;
use nix::sched::{CloneFlags, setns};
use testbed::{
    Netns, Testbed, addr,
    gateway::{
        InstanceCleanup, TESTBED_ARGS, gateway_bin, start_expecting_failure, start_in_fw,
        stats_json, unique_instance,
    },
    iface, send_paced, time_scale, traffic, wait_until,
};

/// Bound on waiting for something that must happen.
const WAIT: Duration = Duration::from_secs(10);
const METRICS_PORT: u16 = 9464;
const STREAM: usize = 300;
const FLOOD: usize = 500;
const SINK_PORTS: [u16; 2] = [7301, 7302];

fn metrics_inside() -> SocketAddr {
    SocketAddr::new(addr::FW_INSIDE_V4.into(), METRICS_PORT)
}

/// The flag that puts the endpoint on the internal address.
fn metrics_flag() -> [String; 2] {
    ["--metrics".to_owned(), metrics_inside().to_string()]
}

/// One HTTP/1.1 request to `to` from `ns`, with `accept` as its Accept header: the status line,
/// the headers and the body; `None` when nothing answers within 2 s.
fn http_get(ns: &Netns, to: SocketAddr, path: &str, accept: &str) -> Option<(String, String)> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {to}\r\nAccept: {accept}\r\n\r\n");
    ns.run(move || {
        let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(2)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        stream.write_all(request.as_bytes()).ok()?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).ok()?;
        let (head, body) = answer.split_once("\r\n\r\n")?;
        Some((head.to_owned(), body.to_owned()))
    })
    .unwrap()
}

/// The Prometheus text of the endpoint, scraped from the client's namespace.
fn scrape(bed: &Testbed) -> String {
    let (head, body) =
        http_get(&bed.client, metrics_inside(), "/metrics", "text/plain").expect("a scrape");
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    body
}

/// The value of `series` (name and labels, as written) in `text`, a whole number; 0 when absent.
fn value(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn reason_series(reason: ExitReason) -> String {
    format!(
        "gateway_datapath_packets_total{{reason=\"{}\",verdict=\"{}\"}}",
        reason.name(),
        reason.verdict().name()
    )
}

/// A confirmed enhanced-mode binding held by a client in `client`, counting what reaches its
/// socket, until dropped.
struct LiveBinding {
    external: SocketAddr,
    received: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl LiveBinding {
    fn start(bed: &Testbed, remote: SocketAddr) -> Self {
        let path = bed.client.path();
        let received = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = {
            let (received, stop) = (Arc::clone(&received), Arc::clone(&stop));
            std::thread::spawn(move || {
                setns(File::open(&path).unwrap(), CloneFlags::CLONE_NEWNET).unwrap();
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    let proxy = SocketAddr::new(addr::FW_INSIDE_V4.into(), 1080);
                    let session = Client::connect(proxy, None)
                        .await
                        .unwrap()
                        .enhanced()
                        .await
                        .unwrap();
                    let binding = session.udp_socket(Family::V4).await.unwrap();
                    let relay = binding.bind().await.unwrap();
                    binding.connect(remote).await.unwrap();
                    ready_tx.send(relay.external).unwrap();
                    let mut buf = vec![0u8; 2048];
                    while !stop.load(Ordering::Relaxed) {
                        let got = tokio::time::timeout(
                            Duration::from_millis(50),
                            binding.socket().recv(&mut buf),
                        )
                        .await;
                        if matches!(got, Ok(Ok(_))) {
                            received.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            })
        };
        let external = ready_rx
            .recv_timeout(WAIT * time_scale())
            .expect("the binding is confirmed");
        Self {
            external,
            received,
            stop,
            thread: Some(thread),
        }
    }

    fn received(&self) -> usize {
        self.received.load(Ordering::Relaxed)
    }
}

impl Drop for LiveBinding {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[test]
fn the_scrape_counts_a_kernel_relayed_stream_and_an_unsolicited_flood() {
    let bed = Testbed::new().unwrap();
    let flag = metrics_flag();
    let (gateway, cleanup) = start_in_fw(&bed, &[&flag[0], &flag[1]]).unwrap();
    assert!(
        gateway.wait_for_log("metrics endpoint listening", 1, WAIT),
        "the endpoint's address is logged:\n{}",
        gateway.log_text()
    );

    // A stream through a kernel-relayed binding, scraped while it flows.
    let source = bed
        .server
        .udp_socket("203.0.113.2:6100", Duration::from_secs(2))
        .unwrap();
    let binding = LiveBinding::start(&bed, source.local_addr().unwrap());
    let before = scrape(&bed);
    assert_eq!(
        value(
            &before,
            "gateway_bindings{state=\"confirmed\",kind=\"unicast\"}"
        ),
        1,
        "the live binding is served:\n{before}"
    );
    assert_eq!(value(&before, "gateway_control_connections"), 1);
    let inbound = reason_series(ExitReason::KernelRelayedInbound);
    let sender = {
        let (source, to) = (source.try_clone().unwrap(), binding.external);
        std::thread::spawn(move || {
            send_paced(&source, to, STREAM, |i| format!("m{i}").into_bytes());
        })
    };
    let during = scrape(&bed);
    sender.join().unwrap();
    assert!(
        wait_until(WAIT, || binding.received() >= STREAM),
        "the client got {} of {STREAM}",
        binding.received()
    );
    let mut after = String::new();
    assert!(
        wait_until(WAIT, || {
            after = scrape(&bed);
            value(&after, &inbound) >= value(&before, &inbound) + STREAM as u64
        }),
        "kernel_relayed_inbound grew by the stream:\nbefore\n{before}\nafter\n{after}"
    );
    assert_eq!(
        value(&after, &inbound) - value(&before, &inbound),
        STREAM as u64,
        "exactly the stream went through the kernel relay"
    );
    let total = "gateway_kernel_relayed_packets_total";
    assert!(value(&during, total) <= value(&after, total));
    assert!(
        value(&after, total) >= value(&before, total) + STREAM as u64,
        "the kernel-relayed total grew by at least the stream"
    );
    assert_eq!(
        value(&after, "gateway_userspace_relayed_packets_total"),
        value(&before, "gateway_userspace_relayed_packets_total"),
        "none of it went through user space"
    );

    // 500 unsolicited datagrams from outside: +500 under no_binding, as the pinned counter says.
    let no_binding = reason_series(ExitReason::NoBinding);
    let pinned_before = pinned_packets(&cleanup, ExitReason::NoBinding);
    let before = scrape(&bed);
    traffic::send_udp(
        &bed.server,
        addr::FW_OUTSIDE_V4.into(),
        &SINK_PORTS,
        FLOOD,
        b"unsolicited",
    )
    .unwrap();
    assert!(
        wait_until(WAIT, || pinned_packets(&cleanup, ExitReason::NoBinding)
            >= pinned_before + FLOOD as u64),
        "the gate counted the flood"
    );
    let after = scrape(&bed);
    assert_eq!(
        value(&after, &no_binding) - value(&before, &no_binding),
        FLOOD as u64,
        "+{FLOOD} under no_binding:\n{after}"
    );
    // The reason names are those of `gateway stats --json`.
    let stats = stats_json(&bed.fw, &gateway.instance).unwrap();
    for (name, count) in stats["reasons"].as_object().unwrap() {
        let series = format!(
            "gateway_datapath_packets_total{{reason=\"{name}\",verdict=\"{}\"}}",
            count["verdict"].as_str().unwrap()
        );
        assert!(after.contains(&series), "{series} in the scrape");
    }
    drop(binding);
    drop(gateway);
}

/// `promtool check metrics` on `text`: its exit status and what it said.
fn promtool_check(text: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; `cargo xtask setup` installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), said)
}

#[test]
fn promtool_accepts_what_the_endpoint_serves() {
    let bed = Testbed::new().unwrap();
    let flag = metrics_flag();
    let (gateway, _cleanup) = start_in_fw(&bed, &[&flag[0], &flag[1]]).unwrap();
    let text = scrape(&bed);
    let (ok, said) = promtool_check(&text);
    assert!(ok, "promtool check metrics: {said}\n{text}");
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
        "gateway_resolver_queries_total",
        "gateway_authentications_total{result=\"failed\"}",
        "gateway_limit_hits_total{limit=\"connections_total\"}",
        "gateway_relay_ports_free{side=\"external\",address=\"203.0.113.1\"}",
    ] {
        assert!(text.contains(name), "{name} in\n{text}");
    }

    let (head, body) = http_get(
        &bed.client,
        metrics_inside(),
        "/metrics",
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
    )
    .expect("an OpenMetrics scrape");
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert!(
        head.lines().any(|l| l.eq_ignore_ascii_case(
            "content-type: application/openmetrics-text; version=1.0.0; charset=utf-8"
        )),
        "{head}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
    assert!(
        body.contains("# UNIT gateway_datapath_bytes bytes"),
        "{body}"
    );
    // promtool 2.42 (bookworm) reads OpenMetrics with its text parser, which looks for a
    // counter's help under its sample's name (`x_total`, where OpenMetrics writes `# HELP x`):
    // that complaint, and no other, is what it may have.
    let (ok, said) = promtool_check(&body);
    assert!(
        ok || said.lines().all(|l| l.ends_with("_total no help text")),
        "promtool check metrics on OpenMetrics: {said}\n{body}"
    );
    // What that parser cannot check: each counter family's samples are `FAMILY_total`.
    let mut counter_family = None;
    for line in body.lines() {
        if let Some(declared) = line.strip_prefix("# TYPE ") {
            counter_family = declared.strip_suffix(" counter");
        } else if let Some(family) = counter_family.filter(|_| !line.starts_with('#')) {
            assert!(
                line.starts_with(&format!("{family}_total")),
                "{line} of {family}"
            );
        }
    }

    let (head, _) = http_get(&bed.client, metrics_inside(), "/", "*/*").unwrap();
    assert!(head.starts_with("HTTP/1.1 404 "), "{head}");
    drop(gateway);
}

#[test]
fn the_endpoint_never_answers_the_external_side() {
    let bed = Testbed::new().unwrap();
    let flag = metrics_flag();
    let (gateway, cleanup) = start_in_fw(&bed, &[&flag[0], &flag[1]]).unwrap();
    assert!(http_get(&bed.client, metrics_inside(), "/metrics", "*/*").is_some());
    // The server routes the internal prefix via fw's external address (the weak-host model
    // would deliver the SYN), and tries fw's external address too.
    let before = pinned_packets(&cleanup, ExitReason::ControlPortFromOutside);
    let outside = SocketAddr::new(addr::FW_OUTSIDE_V4.into(), METRICS_PORT);
    for to in [metrics_inside(), outside] {
        assert_eq!(
            http_get(&bed.server, to, "/metrics", "*/*"),
            None,
            "{to}: no answer to a host outside"
        );
    }
    assert!(
        wait_until(WAIT, || pinned_packets(
            &cleanup,
            ExitReason::ControlPortFromOutside
        ) > before),
        "the SYN from outside is dropped and counted as control_port_from_outside"
    );
    let listening = testbed::run_checked(bed.fw.command("ss").args(["-Htln"])).unwrap();
    let listening = String::from_utf8_lossy(&listening.stdout);
    let tied = format!("{}%{}:{METRICS_PORT}", addr::FW_INSIDE_V4, iface::FW_INSIDE);
    assert!(
        listening.contains(&tied),
        "{tied} in `ss -tln`:\n{listening}"
    );
    drop(gateway);
}

#[test]
fn a_loopback_endpoint_answers_on_the_firewall_host_only() {
    let bed = Testbed::new().unwrap();
    let loopback = SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), METRICS_PORT);
    let (gateway, _cleanup) = start_in_fw(&bed, &["--metrics", &loopback.to_string()]).unwrap();
    let (head, body) = http_get(&bed.fw, loopback, "/metrics", "*/*").expect("a local scrape");
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert!(body.contains("gateway_control_connections 0"), "{body}");
    assert_eq!(
        http_get(&bed.client, metrics_inside(), "/metrics", "*/*"),
        None,
        "nothing listens on the internal address"
    );
    drop(gateway);
}

#[test]
fn an_external_or_unspecified_metrics_address_is_refused_at_start() {
    let bed = Testbed::new().unwrap();
    let args = |metrics: &str| -> Vec<String> {
        TESTBED_ARGS
            .iter()
            .map(ToString::to_string)
            .chain(["--metrics".to_owned(), metrics.to_owned()])
            .collect()
    };
    for (metrics, says) in [
        ("203.0.113.1:9464", "address of the external interface"),
        (
            "192.0.2.9:9464",
            "neither loopback nor an address of --internal",
        ),
        ("0.0.0.0:9464", "unspecified address"),
        ("[::]:9464", "unspecified address"),
    ] {
        let args = args(metrics);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let instance = unique_instance();
        let cleanup = InstanceCleanup {
            instance: instance.clone(),
        };
        let (status, log) = start_expecting_failure(&bed.fw, &instance, &args).unwrap();
        assert!(!status.success(), "{metrics}: refused");
        assert!(
            log.contains(says),
            "{metrics}: the refusal says why:\n{log}"
        );
        // This instance pinned nothing: it attached nothing. (A global look at the links would
        // also see the previous test's gate while its namespaces go away.)
        assert!(
            !cleanup.pin_dir().exists(),
            "{metrics}: refused before anything is attached"
        );
    }

    // check-config takes the key, and refuses an unspecified address with it named.
    let file = std::env::temp_dir().join(format!("gateway-metrics-{}.toml", unique_instance()));
    let check = |metrics: &str| {
        std::fs::write(
            &file,
            format!("external = \"eth0\"\ninternal = \"eth1\"\nmetrics = \"{metrics}\"\n"),
        )
        .unwrap();
        Command::new(gateway_bin())
            .arg("check-config")
            .arg(&file)
            .output()
            .unwrap()
    };
    assert!(check("127.0.0.1:9464").status.success());
    let refused = check("0.0.0.0:9464");
    let _ = std::fs::remove_file(&file);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("key `metrics`"));
}
