//! The daemon's heartbeat: a dedicated thread writes `CLOCK_MONOTONIC` into the `HEARTBEAT` map
//! every [`INTERVAL`]. The programs admit nothing once it is older than the fail-closed limit, so
//! a daemon killed with SIGKILL stops admitting within that limit; a stopped one (or one whose
//! start failed) writes an expired beat and stops admitting at once. A thread, not a task: it must
//! keep beating while the runtime is busy (inserting a million entries, say).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use aya::maps::{Array, MapData};
use gateway_common::MonitorSettings;
use tracing::warn;

use crate::monitor::end_expired_lease;

pub const INTERVAL: Duration = Duration::from_millis(250);

/// `CLOCK_MONOTONIC` in nanoseconds, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |now| {
        u64::try_from(now.tv_sec()).unwrap_or(0) * 1_000_000_000
            + u64::try_from(now.tv_nsec()).unwrap_or(0)
    })
}

pub struct Heartbeat {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Heartbeat {
    /// Beats once at once, then every [`INTERVAL`] until stopped; with each beat, ends the lease
    /// of a `gateway monitor` that died.
    pub fn start(
        mut map: Array<MapData, u64>,
        mut monitor: Option<Array<MapData, MonitorSettings>>,
    ) -> Self {
        let _ = map.set(0, monotonic_ns(), 0);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("heartbeat".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    let now = monotonic_ns();
                    if let Err(error) = map.set(0, now, 0) {
                        warn!(%error, "write the heartbeat");
                    }
                    if let Some(monitor) = monitor.as_mut() {
                        end_expired_lease(monitor, now);
                    }
                    std::thread::sleep(INTERVAL);
                }
                // A stopped daemon admits nothing from now on, not only after the limit.
                if let Err(error) = map.set(0, 0, 0) {
                    warn!(%error, "expire the heartbeat");
                }
            })
            .ok();
        Self { stop, thread }
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop();
    }
}
