//! `gateway monitor`: watch a running gateway's drop and admit events. The watcher writes its
//! request and a lease into the instance's pinned `MONITOR_SETTINGS`, renews the lease (and
//! with it the rate limit's window) every second, reads the pinned ring buffer and prints one
//! line per event; on exit it ends the lease. The daemon ends a lease that ran out
//! ([`end_expired_lease`]), so a watcher that dies stops costing the data path.

pub mod render;

use std::{
    collections::HashMap,
    io::Write as _,
    path::Path,
    time::{Duration, SystemTime},
};

use aya::maps::{Array, Map, MapData, MapError, PerCpuArray, RingBuf};
use gateway_common::{LEASE_NS, MonitorBudget, MonitorSettings, map_names};
use thiserror::Error;
use tokio::io::{Interest, unix::AsyncFd};

use self::render::{Clocks, SelectError, Suppressed};
use crate::datapath::monotonic_ns;

#[derive(Debug, Error)]
pub enum MonitorError {
    #[error(transparent)]
    Select(#[from] SelectError),
    #[error(
        "open the pinned map {path}: {source} (a gateway of an older release has no monitor \
         maps; restart it with this release)"
    )]
    Open { path: String, source: MapError },
    #[error("{what}: {source}")]
    Map {
        what: &'static str,
        source: MapError,
    },
    #[error(
        "another `gateway monitor` (pid {0}) is watching this instance; one watcher at a time \
         (stop it, or wait for its lease to run out)"
    )]
    Watched(u32),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
}

/// What the watcher asks for.
#[derive(Debug, Clone)]
pub struct Watch {
    /// The instance's name, for the messages.
    pub instance: String,
    pub reasons: u64,
    pub sample_every: u32,
    pub events_per_second: u32,
    pub json: bool,
    /// Stop after this many events.
    pub count: Option<u64>,
}

fn open(pin_dir: &Path, name: &str) -> Result<Map, MonitorError> {
    let path = pin_dir.join(name);
    let open_error = |source| MonitorError::Open {
        path: path.display().to_string(),
        source,
    };
    Map::from_map_data(MapData::from_pin(&path).map_err(open_error)?).map_err(open_error)
}

/// The maps of one instance's monitor.
struct Maps {
    settings: Array<MapData, MonitorSettings>,
    budget: PerCpuArray<MapData, MonitorBudget>,
}

impl Maps {
    fn open(pin_dir: &Path) -> Result<Self, MonitorError> {
        let convert = |what| move |source| MonitorError::Map { what, source };
        Ok(Self {
            settings: Array::try_from(open(pin_dir, map_names::MONITOR_SETTINGS)?)
                .map_err(convert("the monitor settings"))?,
            budget: PerCpuArray::try_from(open(pin_dir, map_names::MONITOR_BUDGET)?)
                .map_err(convert("the monitor budget"))?,
        })
    }

    fn current(&self) -> Result<MonitorSettings, MonitorError> {
        self.settings
            .get(&0, 0)
            .map_err(|source| MonitorError::Map {
                what: "read the monitor settings",
                source,
            })
    }

    fn write(&mut self, settings: MonitorSettings) -> Result<(), MonitorError> {
        self.settings
            .set(0, settings, 0)
            .map_err(|source| MonitorError::Map {
                what: "write the monitor settings",
                source,
            })
    }

    fn suppressed(&self) -> Result<Suppressed, MonitorError> {
        let per_cpu = self.budget.get(&0, 0).map_err(|source| MonitorError::Map {
            what: "read the monitor budget",
            source,
        })?;
        Ok(per_cpu
            .iter()
            .fold(Suppressed::default(), |sum, cpu| Suppressed {
                emitted: sum.emitted + cpu.emitted,
                sampled_out: sum.sampled_out + cpu.sampled_out,
                rate_limited: sum.rate_limited + cpu.rate_limited,
                ring_full: sum.ring_full + cpu.ring_full,
            }))
    }
}

/// Ends the lease of a watcher that died without ending it (called by the daemon's heartbeat):
/// the programs then stop at the lease test. A watcher renewing at the same instant loses at
/// most one second of its lease, restored at its next renewal.
pub fn end_expired_lease(settings: &mut Array<MapData, MonitorSettings>, now_ns: u64) {
    if let Ok(held) = settings.get(&0, 0)
        && held.lease_until_ns != 0
        && held.lease_until_ns <= now_ns
    {
        let _ = settings.set(0, MonitorSettings::default(), 0);
    }
}

/// Whether a process with this id exists.
fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Watches the instance pinned in `pin_dir` until SIGINT, SIGTERM or `watch.count` events,
/// printing to stdout; the summary of what the budget left out goes to stderr.
pub async fn run(pin_dir: &Path, watch: &Watch) -> Result<(), MonitorError> {
    let mut maps = Maps::open(pin_dir)?;
    let own_pid = std::process::id();
    let held = maps.current()?;
    if held.lease_until_ns > monotonic_ns()
        && held.watcher_pid != own_pid
        && alive(held.watcher_pid)
    {
        return Err(MonitorError::Watched(held.watcher_pid));
    }
    let mut ring =
        RingBuf::try_from(open(pin_dir, map_names::MONITOR_EVENTS)?).map_err(|source| {
            MonitorError::Map {
                what: "the monitor ring buffer",
                source,
            }
        })?;
    // What an earlier watcher left unread is not this watch's.
    while ring.next().is_some() {}
    // Each renewal starts a new rate-limit window.
    let request = |window| MonitorSettings {
        lease_until_ns: monotonic_ns() + LEASE_NS,
        reasons: watch.reasons,
        sample_every: watch.sample_every,
        events_per_second: watch.events_per_second,
        watcher_pid: own_pid,
        window,
    };
    let start = maps.suppressed()?;
    maps.write(request(held.window.wrapping_add(1)))?;
    eprintln!(
        "gateway monitor: watching instance {} (every {} watched packet(s) per CPU considered, \
         at most {} events per CPU per second); SIGINT or SIGTERM stops",
        watch.instance, watch.sample_every, watch.events_per_second
    );
    let outcome = watch_events(ring, &mut maps, watch, held.window.wrapping_add(1), request).await;
    // End the lease whatever happened, so the data path stops at once.
    let ended = maps.write(MonitorSettings::default());
    if let Ok(now) = maps.suppressed() {
        eprintln!("gateway monitor: {}", now.since(start).summary());
    }
    outcome.and(ended)
}

async fn watch_events(
    ring: RingBuf<MapData>,
    maps: &mut Maps,
    watch: &Watch,
    mut window: u32,
    request: impl Fn(u32) -> MonitorSettings,
) -> Result<(), MonitorError> {
    let io = |what| move |source| MonitorError::Io { what, source };
    // SAFETY: the AsyncFd owns the ring buffer and with it the map's fd, which stays open and
    // the same for the AsyncFd's whole life.
    let mut ring =
        unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }.map_err(|error| {
            MonitorError::Io {
                what: "wait for the ring buffer",
                source: error.into(),
            }
        })?;
    let mut renew = tokio::time::interval(Duration::from_secs(1));
    // The first tick is at once: the request is fresh.
    renew.tick().await;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(io("handle SIGTERM"))?;
    let mut names = HashMap::new();
    let mut shown = 0u64;
    let mut stdout = std::io::stdout().lock();
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = terminate.recv() => return Ok(()),
            _ = renew.tick() => {
                window = window.wrapping_add(1);
                maps.write(request(window))?;
            }
            guard = ring.readable_mut() => {
                let mut guard = guard.map_err(io("wait for the ring buffer"))?;
                let clocks = Clocks { monotonic_ns: monotonic_ns(), wall: SystemTime::now() };
                while let Some(record) = guard.get_inner_mut().next() {
                    let Some(event) = render::decode(&record) else { continue };
                    let line = render::line(&event, clocks, |index| {
                        names.entry(index).or_insert_with(|| interface_name(index)).clone()
                    });
                    let text = if watch.json {
                        serde_json::to_string(&line).unwrap_or_default()
                    } else {
                        line.to_text()
                    };
                    // A closed stdout (a pipe to `head`) ends the watch.
                    if writeln!(stdout, "{text}").and_then(|()| stdout.flush()).is_err() {
                        return Ok(());
                    }
                    shown += 1;
                    if watch.count.is_some_and(|count| shown >= count) {
                        return Ok(());
                    }
                }
                guard.clear_ready();
            }
        }
    }
}

fn interface_name(index: u32) -> Option<String> {
    nix::net::if_::if_indextoname(index)
        .ok()
        .map(|name| name.to_string_lossy().into_owned())
}
