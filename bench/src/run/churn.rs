//! Area 5, churn: a million bindings made and ended every way a binding ends (two-step Opens,
//! one-step Opens and RTP pairs released; bindings live when their connection closes; half-bound
//! and idle bindings left to expire), then a count of what is left: bindings, relay entries and
//! relay ports in use (the daemon's report), entries of the kernel maps (bpftool) and the
//! daemon's descriptors (`/proc`), and its resident memory against a baseline taken after a
//! warm-up of 1 % of the bindings.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use bench::{
    model::{ChurnResult, Results},
    procfs,
};
use gateway_client::{BindOptions, Family, Timeouts, blocking};
use testbed::{addr, gateway::gateway_cli};

use super::{
    arms::{Arm, ArmGuard, PROXY},
    env::Env,
};

/// Load threads (one control connection each at a time).
const THREADS: usize = 8;
/// Per thread: a connection closes (with two bindings live) after this many bindings.
const RECONNECT_EVERY: usize = 500;
/// A lingering connection is left with expiring bindings this many times per thread.
const LINGERS_PER_THREAD: usize = 5;
/// Bindings a lingering connection leaves to expire (half of them half-bound).
const LINGERING: usize = 20;
/// The daemon's timeouts in this area, so expiries happen within the run.
const PENDING_TIMEOUT: &str = "5";
const IDLE_TIMEOUT: &str = "2";

pub fn run(env: &Env, results: &mut Results) {
    match churn(env) {
        Ok(churn) => {
            env.progress(&format!(
                "churn: {} bindings in {:.1} s ({:.0}/s), {} errors; left: {}; RSS {} -> {} KiB",
                churn.done,
                churn.seconds,
                churn.per_second,
                churn.errors,
                churn.leftovers_text(),
                churn.rss_before / 1024,
                churn.rss_after / 1024,
            ));
            results.churn = Some(churn);
        }
        Err(error) => {
            let text = format!("churn: {error:#}");
            env.progress(&format!("FAILED {text}"));
            results.errors.push(text);
        }
    }
}

/// What one load thread did.
#[derive(Default)]
struct Made {
    by_kind: BTreeMap<&'static str, usize>,
    errors: u64,
    first_error: Option<String>,
    /// Connections left open with expiring bindings (closed after the expiry).
    lingering: Vec<blocking::Session>,
}

impl Made {
    fn count(&mut self, kind: &'static str, n: usize, shared: &AtomicUsize) {
        *self.by_kind.entry(kind).or_default() += n;
        shared.fetch_add(n, Ordering::Relaxed);
    }

    fn error(&mut self, error: impl std::fmt::Display) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(error.to_string());
        }
    }
}

fn session() -> Result<blocking::Session> {
    Ok(blocking::Client::connect(PROXY, None, Timeouts::default())?.enhanced()?)
}

/// One load thread: cycles of every kind until `quota` bindings were made (by all threads).
fn load(thread: usize, quota: usize, made_so_far: &AtomicUsize) -> Made {
    let mut made = Made::default();
    let base = 1024 + u16::try_from(thread * 6000).unwrap_or(0);
    let local = |n: usize| {
        SocketAddr::new(
            IpAddr::V4(addr::CLIENT_V4),
            base + u16::try_from(n % 3000).unwrap_or(0) * 2,
        )
    };
    let remote = |n: usize| {
        SocketAddr::new(
            IpAddr::V4(addr::SERVER_V4),
            5000 + u16::try_from(n % 1000).unwrap_or(0) * 2,
        )
    };
    let mut session = match session() {
        Ok(session) => session,
        Err(error) => {
            made.error(error);
            return made;
        }
    };
    let mut n = 0usize;
    let mut since_linger = 0usize;
    let linger_every = (quota / THREADS / LINGERS_PER_THREAD).max(30);
    while made_so_far.load(Ordering::Relaxed) < quota && made.errors < 100 {
        let cycle = (|| -> Result<()> {
            let mut two = session.bind(local(n), Family::V4)?;
            session.connect(&mut two, remote(n))?;
            session.release(two)?;
            let one = session.open(local(n + 1), remote(n + 1))?;
            session.release(one)?;
            let mut pair =
                session.bind_pair_with(local(n + 2), Family::V4, BindOptions::default())?;
            session.connect(&mut pair, remote(n + 2))?;
            session.release(pair)?;
            Ok(())
        })();
        match cycle {
            Ok(()) => made.count("released", 3, made_so_far),
            Err(error) => made.error(format!("{error:#}")),
        }
        n += 3;
        since_linger += 3;
        if n % RECONNECT_EVERY < 3 {
            // Two bindings live (one confirmed, one half-bound) when the connection closes.
            let live = (|| -> Result<()> {
                let mut confirmed = session.bind(local(n), Family::V4)?;
                session.connect(&mut confirmed, remote(n))?;
                let _half = session.bind(local(n + 1), Family::V4)?;
                Ok(())
            })();
            match live {
                Ok(()) => made.count("closed with the connection", 2, made_so_far),
                Err(error) => made.error(format!("{error:#}")),
            }
            n += 2;
            match self::session() {
                Ok(next) => session = next,
                Err(error) => {
                    made.error(format!("{error:#}"));
                    break;
                }
            }
        }
        if since_linger >= linger_every {
            since_linger = 0;
            let expiring = (|| -> Result<()> {
                for i in 0..LINGERING / 2 {
                    let _half = session.bind(local(n + 2 * i), Family::V4)?;
                    let mut idle = session.bind(local(n + 2 * i + 1), Family::V4)?;
                    session.connect(&mut idle, remote(n + 2 * i + 1))?;
                }
                Ok(())
            })();
            match expiring {
                Ok(()) => made.count("expired", LINGERING, made_so_far),
                Err(error) => made.error(format!("{error:#}")),
            }
            n += LINGERING;
            match self::session() {
                Ok(next) => made.lingering.push(std::mem::replace(&mut session, next)),
                Err(error) => {
                    made.error(format!("{error:#}"));
                    break;
                }
            }
        }
    }
    made
}

/// The daemon's `gateway bindings --json`.
fn bindings_doc(env: &Env, instance: &str) -> Result<serde_json::Value> {
    let out = gateway_cli(&env.bed.fw, &["bindings", "--instance", instance, "--json"])?;
    if !out.status.success() {
        bail!("gateway bindings: {}", String::from_utf8_lossy(&out.stderr));
    }
    serde_json::from_slice(&out.stdout).context("parse gateway bindings --json")
}

/// Entries of a pinned map, counted by bpftool.
fn map_entries(pin_dir: &Path, map: &str) -> Result<usize> {
    let out = std::process::Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(pin_dir.join(map))
        .arg("-j")
        .output()
        .context("bpftool map dump")?;
    let value: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parse bpftool's dump")?;
    value
        .as_array()
        .map(Vec::len)
        .context("bpftool's dump is not a list")
}

/// Runs the load threads until they made `quota` bindings together.
fn run_load(env: &Env, quota: usize) -> Result<Vec<Made>> {
    env.client(Duration::from_mins(30), async move {
        tokio::task::spawn_blocking(move || {
            let made = AtomicUsize::new(0);
            std::thread::scope(|scope| {
                let handles: Vec<_> = (0..THREADS)
                    .map(|thread| {
                        let made = &made;
                        scope.spawn(move || load(thread, quota, made))
                    })
                    .collect();
                handles
                    .into_iter()
                    .filter_map(|handle| handle.join().ok())
                    .collect::<Vec<_>>()
            })
        })
        .await
        .context("load threads")
    })
}

/// The daemon's bindings document once no binding is left (or after 30 s).
fn settled(env: &Env, instance: &str) -> Result<serde_json::Value> {
    let start = Instant::now();
    loop {
        let doc = bindings_doc(env, instance)?;
        let empty = doc["enhanced_bindings"]
            .as_array()
            .is_some_and(Vec::is_empty);
        if empty || start.elapsed() > Duration::from_secs(30) {
            return Ok(doc);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// What the churn left, from the daemon's report and bpftool.
fn leftovers(result: &mut ChurnResult, doc: &serde_json::Value, pin_dir: &Path) -> Result<()> {
    let count = |value: &serde_json::Value| {
        value
            .as_u64()
            .map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX))
    };
    result.bindings_left = doc["enhanced_bindings"]
        .as_array()
        .map_or(usize::MAX, Vec::len);
    result.relay_entries_left = count(&doc["relay"]["bindings_served"]);
    result.timers_left = count(&doc["relay"]["scheduled_checks"]);
    result.internal_ports_left = count(&doc["relay"]["internal_ports_in_use"]);
    result.external_ports_left = count(&doc["relay"]["external_ports_in_use"]);
    for map in ["BINDINGS", "OUTBOUND", "RAW_CLIENTS"] {
        result
            .map_entries_left
            .insert(map.to_owned(), map_entries(pin_dir, map)?);
    }
    Ok(())
}

fn churn(env: &Env) -> Result<ChurnResult> {
    let target = env.plan.churn_bindings;
    let guard = ArmGuard::start(
        env,
        Arm::Kernel,
        &[
            "--pending-timeout",
            PENDING_TIMEOUT,
            "--idle-timeout",
            IDLE_TIMEOUT,
            "--max-connections-per-client",
            "1024",
        ],
    )?;
    let pid = guard.daemon_pid().context("daemon pid")?;
    let pin_dir = guard.cleanup.as_ref().context("pins")?.pin_dir();
    let instance = guard.gateway.as_ref().context("gateway")?.instance.clone();
    let fds_before = procfs::fd_count(pid)?;
    // Warm-up (1 %): one-time allocations go into the baseline.
    drop(run_load(env, (target / 100).max(THREADS * 3))?);
    settled(env, &instance)?;
    std::thread::sleep(Duration::from_millis(300));
    let rss_before = procfs::read_rss(pid)?;
    let started = Instant::now();
    let outcomes = run_load(env, target)?;
    let seconds = started.elapsed().as_secs_f64();
    let doc = settled(env, &instance)?;
    let mut result = ChurnResult {
        target,
        seconds,
        rss_before,
        fds_before,
        ..ChurnResult::default()
    };
    let mut lingering = Vec::new();
    for outcome in outcomes {
        for (kind, n) in outcome.by_kind {
            *result.by_kind.entry(kind.to_owned()).or_default() += n;
            result.done += n;
        }
        result.errors += outcome.errors;
        if result.first_error.is_none() {
            result.first_error = outcome.first_error;
        }
        lingering.extend(outcome.lingering);
    }
    #[expect(clippy::cast_precision_loss, reason = "a rate")]
    {
        result.per_second = result.done as f64 / seconds.max(f64::EPSILON);
    }
    leftovers(&mut result, &doc, &pin_dir)?;
    // The lingering connections close last; then the descriptors are counted.
    drop(lingering);
    let start = Instant::now();
    loop {
        result.fds_after = procfs::fd_count(pid)?;
        if result.fds_after <= fds_before || start.elapsed() > Duration::from_secs(10) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    result.rss_after = procfs::read_rss(pid)?;
    Ok(result)
}
