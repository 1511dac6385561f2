//! The soak: RTSP sessions through the kernel relay for minutes, under faults. 50 sessions at
//! once (`gateway rtsp-get` in `client`, the demo media server in `server`), each replaced as
//! it ends; one in eight killed with SIGKILL mid-stream; half of them name the server by a
//! name the gateway's resolver looks up (a fresh name each, TTL 0, so every session asks), and
//! the nameserver times out now and then: it drops the first query of one in four named
//! sessions (the resolver's retry must save the session) and every query of one in sixteen
//! (the lookup times out: the session must fail cleanly, never hang or leak); a junk flood from
//! the outside on the live bindings' relay ports (wrong source ports) and on random ports; the
//! daemon killed with SIGKILL and restarted twice (the old daemon's streams end, new ones
//! start). Checks: every completed session's audio is sample-exact; the junk is counted as
//! dropped; at the end no binding, kernel entry, relay port, scheduled check (timer) or
//! resolver allow-list entry is left and the daemon holds no more descriptors than when it was
//! idle; each daemon's RSS after its warm-up stays within 10 % of its RSS at the end of the
//! warm-up. Writes a CSV and an SVG plot (RSS, live bindings, relayed packets per second) to
//! `GATEWAY_SOAK_OUT` (default `target/soak`).
//!
//! `GATEWAY_SOAK_MINUTES` sets the length (default 2); `cargo xtask soak --minutes N` runs it
//! longer. Root only.
#![expect(
    clippy::cast_precision_loss,
    reason = "counts, sizes and rates far below 2^52, as floating point for ratios and the plot"
)]

use std::{
    collections::HashSet,
    fmt::Write as _,
    net::UdpSocket,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use gateway_rtsp::audio::{Audio, Match};
use hickory_proto::{
    op::{Message, Query},
    rr::RecordType,
};
use nameserver::{ScriptedNameserver, a_record, reply};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde_json::Value;
use testbed::{
    ChildGuard, Testbed, addr,
    gateway::{GatewayDaemon, InstanceCleanup, TESTBED_ARGS, gateway_bin, gateway_cli, stats_json},
    unique_suffix, wait_until,
};

#[path = "common/nameserver.rs"]
mod nameserver;

const SESSIONS: usize = 50;
const PROXY: &str = "198.51.100.1:1080";
const URL_PATH: &str = ":8554/rtsp.wav";
/// Session `n` (odd) names the server `s{n}.media.test`.
const NAME_SUFFIX: &str = ".media.test";
/// The nameserver drops the first query of one named session in this many ...
const DELAY_ONE_IN: u64 = 4;
/// ... and every query of one session in this many (a subset of the above).
const NEVER_ANSWER_ONE_IN: u64 = 16;
/// A session plays the whole 2-second source and stops by itself after this.
const SESSION_SECONDS: &str = "4";
/// Kill one session in this many with SIGKILL mid-stream.
const KILL_ONE_IN: u64 = 8;
/// How long each daemon runs before its RSS counts (sessions ramp up, allocator settles).
const WARM_UP: Duration = Duration::from_secs(20);
/// Junk datagrams per second from the outside.
const JUNK_PER_SECOND: u64 = 400;

fn minutes() -> f64 {
    std::env::var("GATEWAY_SOAK_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .filter(|m: &f64| *m > 0.0)
        .unwrap_or(2.0)
}

fn out_dir() -> PathBuf {
    std::env::var_os("GATEWAY_SOAK_OUT").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/soak"),
        PathBuf::from,
    )
}

/// One reading, every second.
#[derive(Clone, Debug)]
struct Sample {
    at: f64,
    daemon: usize,
    rss_kib: u64,
    fds: usize,
    bindings: usize,
    relayed_pps: f64,
}

fn rss_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

fn bindings_json(bed: &Testbed, instance: &str) -> Option<Value> {
    let out = gateway_cli(&bed.fw, &["bindings", "--instance", instance, "--json"]).ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

fn relayed_packets(bed: &Testbed, instance: &str) -> Option<u64> {
    stats_json(&bed.fw, instance).ok()?["kernel_relayed"]["packets"].as_u64()
}

fn array_len(document: &Value, key: &str) -> usize {
    document[key].as_array().map_or(0, Vec::len)
}

/// The external relay ports of the live bindings (the junk's targets).
fn relay_ports(document: &Value) -> Vec<u16> {
    document["enhanced_bindings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| {
            b["external_relay"]
                .as_str()?
                .rsplit(':')
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// What is left once everything stopped: (bindings, kernel entries, relay ports, checks).
fn leftovers(document: &Value) -> (usize, usize, u64, u64) {
    let relay = &document["relay"];
    let ports = relay["internal_ports_in_use"].as_u64().unwrap_or(0)
        + relay["external_ports_in_use"].as_u64().unwrap_or(0);
    (
        array_len(document, "enhanced_bindings"),
        array_len(document, "kernel_entries"),
        ports,
        relay["scheduled_checks"].as_u64().unwrap_or(0),
    )
}

/// What the nameserver does to a session's lookups, by its number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lookup {
    /// The session names the server by address.
    ByAddress,
    Answered,
    /// The first query is dropped; the resolver's second attempt is answered.
    FirstDropped,
    /// Every query is dropped: the lookup times out and the session must fail.
    NeverAnswered,
}

impl Lookup {
    fn of(n: u64) -> Self {
        if n.is_multiple_of(2) {
            Self::ByAddress
        } else if n % NEVER_ANSWER_ONE_IN == 5 {
            Self::NeverAnswered
        } else if n % DELAY_ONE_IN == 1 {
            Self::FirstDropped
        } else {
            Self::Answered
        }
    }

    fn url(n: u64) -> String {
        if Self::of(n) == Self::ByAddress {
            format!("rtsp://{}{URL_PATH}", addr::SERVER_V4)
        } else {
            format!("rtsp://s{n}{NAME_SUFFIX}{URL_PATH}")
        }
    }
}

/// The session number a query is for (`s{n}.media.test.`).
fn session_of(question: &Query) -> Option<u64> {
    let asked = question.name().to_ascii();
    asked
        .strip_prefix('s')?
        .strip_suffix('.')?
        .strip_suffix(NAME_SUFFIX)?
        .parse()
        .ok()
}

/// Answers `s{n}.media.test` with the server's IPv4 address (TTL 0, so nothing is cached) and
/// no IPv6 address, dropping queries as [`Lookup`] says; counts what it dropped.
fn flaky_script(
    dropped: Arc<AtomicU64>,
) -> impl FnMut(&Message, &Query) -> Vec<Vec<u8>> + Send + 'static {
    let mut delayed = HashSet::new();
    move |query, question| {
        let drop_it = match session_of(question).map(|n| (n, Lookup::of(n))) {
            Some((_, Lookup::NeverAnswered)) => true,
            // The first A query of the session (its CONNECT's lookup).
            Some((n, Lookup::FirstDropped)) => {
                question.query_type() == RecordType::A && delayed.insert(n)
            }
            _ => false,
        };
        if drop_it {
            dropped.fetch_add(1, Ordering::Relaxed);
            return Vec::new();
        }
        let answers = if question.query_type() == RecordType::A {
            vec![a_record(question.name(), addr::SERVER_V4, 0)]
        } else {
            Vec::new()
        };
        vec![reply(query, question.clone(), answers)]
    }
}

struct Session {
    child: Child,
    out: PathBuf,
    started: Instant,
    daemon: usize,
    kill_at: Option<Instant>,
    lookup: Lookup,
}

#[derive(Debug, Default)]
struct Totals {
    started: u64,
    exact: u64,
    /// Sample-exact sessions whose first DNS query was dropped.
    exact_after_retry: u64,
    /// Sessions whose name never resolved and that failed, as they must.
    resolver_timeouts: u64,
    killed: u64,
    ended_by_restart: u64,
    failed: Vec<String>,
}

struct Daemon {
    gateway: GatewayDaemon,
    started: Instant,
    idle_fds: usize,
    idle_host_flows: usize,
}

fn start_daemon(bed: &Testbed, pins: &InstanceCleanup) -> Daemon {
    let instance = pins.instance.as_str();
    let resolver = addr::SERVER_DNS_V4.to_string();
    let args: Vec<&str> = TESTBED_ARGS
        .iter()
        .copied()
        .chain(["--resolver", &resolver])
        .collect();
    let gateway = GatewayDaemon::start(&bed.fw, instance, &args).unwrap();
    let started = Instant::now();
    let idle_fds = fd_count(gateway.pid());
    Daemon {
        gateway,
        started,
        idle_fds,
        idle_host_flows: host_flows(pins).unwrap_or(0),
    }
}

/// Entries in the kernel's host allow-list (the resolver adds one per query in flight), read
/// from the pinned map with bpftool.
fn host_flows(pins: &InstanceCleanup) -> Option<usize> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(pins.pin_dir().join(gateway_common::map_names::HOST_ALLOW))
        .output()
        .ok()?;
    let entries: Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(entries.as_array()?.len())
}

fn spawn_session(bed: &Testbed, dir: &Path, n: u64, daemon: usize) -> Session {
    let out = dir.join(format!("s{n}.wav"));
    let child = bed
        .client
        .command(gateway_bin())
        .args(["rtsp-get", &Lookup::url(n), "--proxy", PROXY, "--out"])
        .arg(&out)
        .args(["--seconds", SESSION_SECONDS])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    // Deterministic choice: every KILL_ONE_IN-th session, at 0.5 to 2 s.
    let kill_at =
        (n % KILL_ONE_IN == 3).then(|| started + Duration::from_millis(500 + (n * 137) % 1500));
    Session {
        child,
        out,
        started,
        daemon,
        kill_at,
        lookup: Lookup::of(n),
    }
}

/// Handles a session that ended (or kills it when due); `true` when it is finished.
fn reap(session: &mut Session, sent: &Audio, current_daemon: usize, totals: &mut Totals) -> bool {
    if let Some(at) = session.kill_at
        && Instant::now() >= at
    {
        let pid = i32::try_from(session.child.id()).unwrap();
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        let _ = session.child.wait();
        totals.killed += 1;
        return true;
    }
    let Ok(Some(status)) = session.child.try_wait() else {
        // A session that outlived its daemon by far is broken: stop it.
        if session.started.elapsed() > Duration::from_mins(1) {
            let _ = session.child.kill();
            let _ = session.child.wait();
            totals
                .failed
                .push(format!("{} hung", session.out.display()));
            return true;
        }
        return false;
    };
    if session.daemon != current_daemon {
        totals.ended_by_restart += 1;
    } else if session.lookup == Lookup::NeverAnswered {
        if status.success() {
            totals.failed.push(format!(
                "{}: played though its name never resolved",
                session.out.display()
            ));
        } else {
            totals.resolver_timeouts += 1;
        }
    } else if !status.success() {
        totals
            .failed
            .push(format!("{}: rtsp-get {status}", session.out.display()));
    } else {
        match Audio::read_wav(&session.out).map(|received| sent.compare(&received)) {
            Ok(Match::Exact) => {
                totals.exact += 1;
                totals.exact_after_retry += u64::from(session.lookup == Lookup::FirstDropped);
            }
            other => totals
                .failed
                .push(format!("{}: {other:?}", session.out.display())),
        }
    }
    let _ = std::fs::remove_file(&session.out);
    true
}

/// Junk from the outside, sent from the calling thread (moved into `server`): to the live
/// bindings' relay ports from a wrong source port, and to random ports, until `stop`.
fn junk_flood(bed: &Testbed, stop: &AtomicBool, targets: &Mutex<Vec<u16>>, sent: &AtomicU64) {
    let file = std::fs::File::open(bed.server.path()).unwrap();
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
    let socket = UdpSocket::bind("203.0.113.2:0").unwrap();
    let mut n: u64 = 0;
    let started = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let ports = targets.lock().unwrap().clone();
        let port = if n.is_multiple_of(2) && !ports.is_empty() {
            ports[usize::try_from(n / 2).unwrap() % ports.len()]
        } else {
            u16::try_from(1024 + (n * 7919) % 60000).unwrap()
        };
        if socket
            .send_to(b"junk junk junk", ("203.0.113.1", port))
            .is_ok()
        {
            sent.fetch_add(1, Ordering::Relaxed);
        }
        n += 1;
        // Paced: n datagrams by n / rate seconds.
        let due = Duration::from_secs_f64(n as f64 / JUNK_PER_SECOND as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            thread::sleep(wait.min(Duration::from_millis(50)));
        }
    }
}

#[test]
#[expect(clippy::too_many_lines, reason = "one soak, its phases in order")]
fn rtsp_sessions_under_faults_for_minutes() {
    let length = Duration::from_secs_f64(minutes() * 60.0);
    let bed = Testbed::new().unwrap();
    let instance = testbed::gateway::unique_instance();
    let cleanup = InstanceCleanup {
        instance: instance.clone(),
    };
    let dir = std::env::temp_dir().join(format!("gateway-soak-{}", unique_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let sent = Audio::tone(8000, 2.0, 523.25);
    let wav = dir.join("source.wav");
    sent.write_wav(&wav).unwrap();
    let mut server_cmd = bed
        .server
        .command(gateway_bin().with_file_name("demo-media-server"));
    server_cmd
        .args(["--listen", "203.0.113.2:8554", "--wav"])
        .arg(&wav)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _server = ChildGuard::spawn(&mut server_cmd, "demo-media-server").unwrap();
    let listening = bed
        .server
        .run(|| {
            wait_until(Duration::from_secs(10), || {
                std::net::TcpStream::connect("203.0.113.2:8554").is_ok()
            })
        })
        .unwrap();
    assert!(listening, "the media server listens");

    let dropped_queries = Arc::new(AtomicU64::new(0));
    let nameserver =
        ScriptedNameserver::start(&bed.server, flaky_script(Arc::clone(&dropped_queries)));
    let mut daemons = vec![start_daemon(&bed, &cleanup)];
    let restarts_at = [length / 3, length * 2 / 3];
    let stop_junk = AtomicBool::new(false);
    let junk_targets = Mutex::new(Vec::new());
    let junk_sent = AtomicU64::new(0);
    let mut samples: Vec<Sample> = Vec::new();
    let mut totals = Totals::default();
    let soak_started = Instant::now();
    thread::scope(|scope| {
        scope.spawn(|| junk_flood(&bed, &stop_junk, &junk_targets, &junk_sent));
        let mut sessions: Vec<Session> = Vec::new();
        let mut next_sample = Instant::now();
        let mut last_relayed: Option<(Instant, u64)> = None;
        let mut restarted = 0;
        while soak_started.elapsed() < length {
            if restarted < restarts_at.len() && soak_started.elapsed() >= restarts_at[restarted] {
                let old = daemons.last_mut().unwrap();
                old.gateway.kill();
                daemons.push(start_daemon(&bed, &cleanup));
                restarted += 1;
                last_relayed = None;
            }
            let current = daemons.len() - 1;
            sessions.retain_mut(|s| !reap(s, &sent, current, &mut totals));
            while sessions.len() < SESSIONS {
                sessions.push(spawn_session(&bed, &dir, totals.started, current));
                totals.started += 1;
            }
            if Instant::now() >= next_sample {
                next_sample += Duration::from_secs(1);
                let daemon = daemons.last().unwrap();
                let pid = daemon.gateway.pid();
                let document = bindings_json(&bed, &instance).unwrap_or(Value::Null);
                *junk_targets.lock().unwrap() = relay_ports(&document);
                let relayed = relayed_packets(&bed, &instance).unwrap_or(0);
                let now = Instant::now();
                let relayed_pps = last_relayed.map_or(0.0, |(then, before): (Instant, u64)| {
                    relayed.saturating_sub(before) as f64 / (now - then).as_secs_f64()
                });
                last_relayed = Some((now, relayed));
                samples.push(Sample {
                    at: soak_started.elapsed().as_secs_f64(),
                    daemon: current,
                    rss_kib: rss_kib(pid).unwrap_or(0),
                    fds: fd_count(pid),
                    bindings: array_len(&document, "enhanced_bindings"),
                    relayed_pps,
                });
            }
            thread::sleep(Duration::from_millis(20));
        }
        // Let the last sessions finish (or be killed), then stop the junk.
        let drained = wait_until(Duration::from_secs(90), || {
            let current = daemons.len() - 1;
            sessions.retain_mut(|s| !reap(s, &sent, current, &mut totals));
            sessions.is_empty()
        });
        for mut s in sessions.drain(..) {
            let _ = s.child.kill();
            let _ = s.child.wait();
        }
        stop_junk.store(true, Ordering::Relaxed);
        assert!(drained, "every session ended");
    });

    let daemon = daemons.last_mut().unwrap();
    let pid = daemon.gateway.pid();
    let mut left = (0, 0, 0, 0);
    let mut flows_left = None;
    let clean = wait_until(Duration::from_mins(1), || {
        left = bindings_json(&bed, &instance).map_or((1, 1, 1, 1), |d| leftovers(&d));
        flows_left = host_flows(&cleanup);
        left == (0, 0, 0, 0)
            && fd_count(pid) <= daemon.idle_fds
            && flows_left.is_some_and(|n| n <= daemon.idle_host_flows)
    });
    let final_fds = fd_count(pid);
    let queries = nameserver.seen().len();
    drop(nameserver);
    let stats = stats_json(&bed.fw, &instance).unwrap_or_else(|error| {
        let log = daemon.gateway.log_text();
        let tail = &log[log.len().saturating_sub(4000)..];
        panic!("{error}; the daemon's log ends:\n{tail}")
    });
    let dropped_junk = testbed::gateway::reason_packets(&stats, "no_binding");

    // Each daemon's RSS after its warm-up, against its RSS when the warm-up ended.
    let mut rss_report = String::new();
    let mut rss_ok = true;
    for (index, d) in daemons.iter().enumerate() {
        let start = d.started.duration_since(soak_started).as_secs_f64();
        let lived: Vec<&Sample> = samples.iter().filter(|s| s.daemon == index).collect();
        let after: Vec<&Sample> = lived
            .iter()
            .copied()
            .filter(|s| s.at >= start + WARM_UP.as_secs_f64() && s.rss_kib > 0)
            .collect();
        let (Some(base), Some(peak)) = (after.first(), after.iter().map(|s| s.rss_kib).max())
        else {
            let _ = writeln!(rss_report, "daemon {index}: too short-lived to judge");
            continue;
        };
        let ratio = peak as f64 / base.rss_kib as f64;
        rss_ok &= ratio <= 1.10;
        let _ = writeln!(
            rss_report,
            "daemon {index}: RSS {} KiB after warm-up, peak {peak} KiB ({:+.1} %) over {} s",
            base.rss_kib,
            (ratio - 1.0) * 100.0,
            after.len()
        );
    }

    let out = out_dir();
    std::fs::create_dir_all(&out).unwrap();
    write_csv(&out.join("soak.csv"), &samples);
    write_svg(
        &out.join("soak.svg"),
        &samples,
        &daemons_started(&daemons, soak_started),
    );
    let unique_daemons: HashSet<usize> = samples.iter().map(|s| s.daemon).collect();
    let summary = format!(
        "soak: {:.1} min, {} sessions started ({} at once), {} sample-exact, {} killed mid-stream, \
         {} ended by a daemon restart, {} failed; DNS: {queries} queries, {} dropped, {} sessions \
         sample-exact after a dropped query, {} failed cleanly on a name that never resolved; \
         {} daemons ({} sampled); junk sent {}, counted no_binding {dropped_junk} (the counters \
         outlive a restart); left at the end: bindings, kernel entries, relay ports, scheduled \
         checks = {left:?}, resolver allow-list entries {flows_left:?}, descriptors {final_fds} \
         (idle {}); plot {}\n{rss_report}",
        length.as_secs_f64() / 60.0,
        totals.started,
        SESSIONS,
        totals.exact,
        totals.killed,
        totals.ended_by_restart,
        totals.failed.len(),
        dropped_queries.load(Ordering::Relaxed),
        totals.exact_after_retry,
        totals.resolver_timeouts,
        daemons.len(),
        unique_daemons.len(),
        junk_sent.load(Ordering::Relaxed),
        daemons.last().unwrap().idle_fds,
        out.join("soak.svg").display(),
    );
    println!("{summary}");
    std::fs::write(out.join("summary.txt"), &summary).unwrap();
    let _ = std::fs::remove_dir_all(&dir);

    assert!(
        totals.failed.is_empty(),
        "failed sessions: {:#?}",
        totals.failed
    );
    assert!(totals.exact >= 20, "too few sessions completed: {totals:?}");
    assert!(
        totals.exact_after_retry >= 1 && totals.resolver_timeouts >= 1,
        "the resolver's faults were met: {totals:?}"
    );
    assert_eq!(daemons.len(), 3, "killed and restarted twice");
    assert!(
        dropped_junk >= junk_sent.load(Ordering::Relaxed),
        "every junk datagram is counted as dropped"
    );
    assert!(
        clean,
        "nothing left behind: {left:?}, {final_fds} descriptors (idle {}), resolver allow-list \
         entries {flows_left:?} (idle {})",
        daemons.last().unwrap().idle_fds,
        daemons.last().unwrap().idle_host_flows
    );
    assert!(rss_ok, "RSS within 10 % after warm-up:\n{rss_report}");
}

fn daemons_started(daemons: &[Daemon], soak_started: Instant) -> Vec<f64> {
    daemons
        .iter()
        .map(|d| d.started.duration_since(soak_started).as_secs_f64())
        .collect()
}

fn write_csv(path: &Path, samples: &[Sample]) {
    let mut text = String::from("seconds,daemon,rss_kib,fds,bindings,relayed_pps\n");
    for s in samples {
        let _ = writeln!(
            text,
            "{:.1},{},{},{},{},{:.0}",
            s.at, s.daemon, s.rss_kib, s.fds, s.bindings, s.relayed_pps
        );
    }
    std::fs::write(path, text).unwrap();
}

/// What one panel of the plot shows of a sample.
type Reading = Box<dyn Fn(&Sample) -> f64>;

/// Three stacked panels (RSS, live bindings, relayed packets per second) over time, a dashed
/// line at each daemon start.
fn write_svg(path: &Path, samples: &[Sample], starts: &[f64]) {
    const W: f64 = 800.0;
    const PANEL: f64 = 160.0;
    const LEFT: f64 = 70.0;
    let end = samples.last().map_or(1.0, |s| s.at).max(1.0);
    let x = |t: f64| LEFT + t / end * (W - LEFT - 10.0);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
        PANEL * 3.0 + 40.0
    );
    let panels: [(&str, Reading); 3] = [
        ("daemon RSS (KiB)", Box::new(|s: &Sample| s.rss_kib as f64)),
        ("live bindings", Box::new(|s: &Sample| s.bindings as f64)),
        (
            "kernel-relayed packets/s",
            Box::new(|s: &Sample| s.relayed_pps),
        ),
    ];
    for (i, (title, value)) in panels.iter().enumerate() {
        let top = 10.0 + PANEL * i as f64;
        let bottom = top + PANEL - 30.0;
        let max = samples.iter().map(value).fold(1.0, f64::max) * 1.1;
        let y = |v: f64| bottom - v / max * (bottom - top - 15.0);
        let _ = writeln!(
            svg,
            "<text x=\"{LEFT}\" y=\"{}\">{title} (max {:.0})</text>\n<line x1=\"{LEFT}\" y1=\"{bottom}\" x2=\"{}\" y2=\"{bottom}\" stroke=\"black\"/>",
            top + 10.0,
            max / 1.1,
            W - 10.0
        );
        for start in starts.iter().skip(1) {
            let _ = writeln!(
                svg,
                "<line x1=\"{0:.1}\" y1=\"{top}\" x2=\"{0:.1}\" y2=\"{bottom}\" stroke=\"gray\" stroke-dasharray=\"4\"/>",
                x(*start)
            );
        }
        let points = samples.iter().fold(String::new(), |mut points, s| {
            let _ = write!(points, "{:.1},{:.1} ", x(s.at), y(value(s)));
            points
        });
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\" points=\"{points}\"/>"
        );
    }
    let _ = writeln!(
        svg,
        "<text x=\"{LEFT}\" y=\"{}\">seconds (0 to {end:.0}); dashed: daemon killed and restarted</text>\n</svg>",
        PANEL * 3.0 + 25.0
    );
    std::fs::write(path, svg).unwrap();
}
