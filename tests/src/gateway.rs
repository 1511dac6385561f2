//! Running the gateway binary inside a test namespace, and cleaning up what it pins, also when it
//! was killed or the test failed.

use std::{
    fs,
    path::PathBuf,
    process::{Output, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use nix::sys::signal::Signal;
use serde_json::Value;

use crate::{ChildGuard, Netns, unique_suffix, wait_until};

/// Path of the gateway binary: `$GATEWAY_BIN` (set by `cargo xtask test`) or the debug build.
pub fn gateway_bin() -> PathBuf {
    std::env::var_os("GATEWAY_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/gateway"),
        PathBuf::from,
    )
}

/// A fresh instance name, so tests never share pinned objects.
pub fn unique_instance() -> String {
    format!("test-{}", unique_suffix())
}

/// Removes an instance's pinned objects and run directory on drop. Unpinning the link detaches
/// the program, so nothing a test attached outlives it.
#[derive(Debug)]
pub struct InstanceCleanup {
    pub instance: String,
}

impl InstanceCleanup {
    pub fn pin_dir(&self) -> PathBuf {
        PathBuf::from("/sys/fs/bpf/gateway").join(&self.instance)
    }
}

impl Drop for InstanceCleanup {
    fn drop(&mut self) {
        let dir = self.pin_dir();
        if let Ok(entries) = fs::read_dir(&dir) {
            for entry in entries.flatten() {
                let _ = fs::remove_file(entry.path());
            }
        }
        let _ = fs::remove_dir(&dir);
        let _ = fs::remove_dir("/sys/fs/bpf/gateway");
        let _ = fs::remove_dir_all(PathBuf::from("/run/gateway").join(&self.instance));
        let _ = fs::remove_dir("/run/gateway");
    }
}

/// What the daemon logs once everything is attached.
const READY_LINE: &str = "gateway running";

/// A gateway daemon running in a namespace.
#[derive(Debug)]
pub struct GatewayDaemon {
    child: ChildGuard,
    pub instance: String,
    log: PathBuf,
}

impl GatewayDaemon {
    /// Starts `gateway run --instance INSTANCE ARGS...` in `ns` and waits until it reports that it
    /// runs (the gate is attached; the maps are pinned earlier than that).
    pub fn start(ns: &Netns, instance: &str, args: &[&str]) -> Result<Self> {
        let log = std::env::temp_dir().join(format!("gateway-{instance}-{}.log", unique_suffix()));
        let log_file =
            fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let mut cmd = ns.command(gateway_bin());
        cmd.args(["run", "--instance", instance])
            .args(args)
            .env("GATEWAY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        let mut daemon = Self {
            child: ChildGuard::spawn(&mut cmd, "gateway daemon")?,
            instance: instance.to_owned(),
            log,
        };
        let ready = wait_until(Duration::from_secs(10), || {
            daemon.child.has_exited() || daemon.log_text().contains(READY_LINE)
        });
        if !ready || daemon.child.has_exited() {
            bail!("gateway did not come up; its log:\n{}", daemon.log_text());
        }
        Ok(daemon)
    }

    pub fn pid(&self) -> i32 {
        self.child.pid()
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Graceful stop (SIGTERM); returns whether it exited successfully.
    pub fn stop(&mut self) -> bool {
        self.child
            .stop_with(Signal::SIGTERM, Duration::from_secs(10))
            .is_some_and(|status| status.success())
    }

    /// SIGKILL: the daemon gets no chance to clean up.
    pub fn kill(&mut self) {
        self.child
            .stop_with(Signal::SIGKILL, Duration::from_secs(5));
    }
}

impl Drop for GatewayDaemon {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.log);
    }
}

/// Runs the gateway CLI in `ns` and returns its output whatever the exit status.
pub fn gateway_cli(ns: &Netns, args: &[&str]) -> Result<Output> {
    ns.command(gateway_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("run the gateway CLI")
}

/// `gateway stats --instance INSTANCE --json`, parsed.
pub fn stats_json(ns: &Netns, instance: &str) -> Result<Value> {
    let out = gateway_cli(ns, &["stats", "--instance", instance, "--json"])?;
    if !out.status.success() {
        bail!(
            "gateway stats failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("parse gateway stats --json")
}

/// Packets counted for one exit reason in a `stats --json` document.
pub fn reason_packets(stats: &Value, reason: &str) -> u64 {
    stats["reasons"][reason]["packets"].as_u64().unwrap_or(0)
}

/// Flags every test-bed gateway uses: its two interfaces and anonymous access.
pub const TESTBED_ARGS: [&str; 5] = [
    "--external",
    crate::iface::FW_OUTSIDE,
    "--internal",
    crate::iface::FW_INSIDE,
    "--allow-anonymous",
];

/// Starts a gateway in the bed's `fw` with [`TESTBED_ARGS`] and `extra` under a fresh instance
/// name; the cleanup guard removes its pins whatever happens.
pub fn start_in_fw(
    bed: &crate::Testbed,
    extra: &[&str],
) -> Result<(GatewayDaemon, InstanceCleanup)> {
    let instance = unique_instance();
    let cleanup = InstanceCleanup {
        instance: instance.clone(),
    };
    let args: Vec<&str> = TESTBED_ARGS
        .iter()
        .copied()
        .chain(extra.iter().copied())
        .collect();
    let gateway = GatewayDaemon::start(&bed.fw, &instance, &args)?;
    Ok((gateway, cleanup))
}
