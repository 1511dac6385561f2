//! Running the gateway binary inside a test namespace, and cleaning up what it pins, also when it
//! was killed or the test failed.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Output, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use nix::sys::signal::Signal;
use serde_json::Value;

use crate::{ChildGuard, Netns, time_scale, unique_suffix, wait_until};

/// `gateway run`'s default `--handshake-timeout` (its `--help` shows it), stretched in slow VMs.
const DEFAULT_HANDSHAKE_TIMEOUT_SECS: u64 = 10;

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
        Self::start_with_prefix(ns, instance, &[], args)
    }

    /// [`GatewayDaemon::start`] under a wrapper command (`prefix`, e.g. `prlimit ... --`), which
    /// must exec the gateway so the pid is the daemon's.
    pub fn start_with_prefix(
        ns: &Netns,
        instance: &str,
        prefix: &[&str],
        args: &[&str],
    ) -> Result<Self> {
        Self::start_program(ns, &gateway_bin(), instance, prefix, args)
    }

    /// [`GatewayDaemon::start_with_prefix`] with another gateway binary (an installed one).
    pub fn start_program(
        ns: &Netns,
        program: &Path,
        instance: &str,
        prefix: &[&str],
        args: &[&str],
    ) -> Result<Self> {
        let mut daemon = Self::spawn_program(ns, program, instance, prefix, args)?;
        let ready = wait_until(Duration::from_secs(10), || {
            daemon.child.has_exited() || daemon.log_text().contains(READY_LINE)
        });
        if !ready || daemon.child.has_exited() {
            bail!("gateway did not come up; its log:\n{}", daemon.log_text());
        }
        Ok(daemon)
    }

    /// Starts `gateway run --instance INSTANCE ARGS...` in `ns` (under `prefix`, if any) with its
    /// output in a log file, without waiting for anything.
    pub fn spawn(ns: &Netns, instance: &str, prefix: &[&str], args: &[&str]) -> Result<Self> {
        Self::spawn_program(ns, &gateway_bin(), instance, prefix, args)
    }

    /// [`GatewayDaemon::spawn`] with another gateway binary (an installed one).
    pub fn spawn_program(
        ns: &Netns,
        program: &Path,
        instance: &str,
        prefix: &[&str],
        args: &[&str],
    ) -> Result<Self> {
        let log = std::env::temp_dir().join(format!("gateway-{instance}-{}.log", unique_suffix()));
        let log_file =
            fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let mut cmd = match prefix.split_first() {
            Some((wrapper, rest)) => {
                let mut cmd = ns.command(wrapper);
                cmd.args(rest).arg(program);
                cmd
            }
            None => ns.command(program),
        };
        cmd.args(["run", "--instance", instance]).args(args);
        // The gate's hook, forced for a whole test run (`cargo xtask test` runs the relay's
        // end-to-end files once per hook).
        if let Ok(hook) = std::env::var(GATE_HOOK_ENV)
            && !hook.is_empty()
            && !args.contains(&"--gate-hook")
        {
            cmd.arg("--gate-hook").arg(hook);
        }
        // Password checks are CPU work, stretched with everything else in a slow (emulated) VM:
        // the daemon's handshake bound grows with the tests' waits unless a test sets its own.
        let scale = time_scale();
        if scale > 1 && !args.contains(&"--handshake-timeout") {
            cmd.arg("--handshake-timeout")
                .arg((DEFAULT_HANDSHAKE_TIMEOUT_SECS * u64::from(scale)).to_string());
        }
        cmd.env("GATEWAY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        Ok(Self {
            child: ChildGuard::spawn(&mut cmd, "gateway daemon")?,
            instance: instance.to_owned(),
            log,
        })
    }

    /// Waits (bounded by `timeout`) for the daemon to exit on its own; its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut status = None;
        wait_until(timeout, || {
            status = self
                .child
                .child_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            status.is_some()
        });
        status
    }

    pub fn pid(&self) -> i32 {
        self.child.pid()
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `signal` without waiting (SIGHUP to reload, say).
    pub fn signal(&self, signal: Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal);
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        !self.child.has_exited()
    }

    /// Polls the log until it contains `needle` `count` times, for at most `timeout`.
    pub fn wait_for_log(&self, needle: &str, count: usize, timeout: Duration) -> bool {
        wait_until(timeout, || self.log_text().matches(needle).count() >= count)
    }

    /// Graceful stop (SIGTERM); returns whether it exited successfully. The gate stays
    /// attached and dropping: [`detach`] removes it.
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

/// Runs `gateway run` in `ns` expecting it to fail at start: returns its exit status and log
/// once it has exited (bounded by 20 s; a daemon that comes up instead fails the test).
pub fn start_expecting_failure(
    ns: &Netns,
    instance: &str,
    args: &[&str],
) -> Result<(std::process::ExitStatus, String)> {
    let mut daemon = GatewayDaemon::spawn(ns, instance, &[], args)?;
    match daemon.wait_exit(Duration::from_secs(20)) {
        Some(status) => Ok((status, daemon.log_text())),
        None => bail!("gateway did not exit; its log:\n{}", daemon.log_text()),
    }
}

/// `gateway detach --instance INSTANCE` in `ns`: removes the gate of a stopped daemon. Fails
/// with the CLI's stderr when it refuses.
pub fn detach(ns: &Netns, instance: &str) -> Result<String> {
    let out = gateway_cli(ns, &["detach", "--instance", instance])?;
    if !out.status.success() {
        bail!(
            "gateway detach failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A users-file line made with `gateway passwd`, as an operator would.
pub fn passwd_line(name: &str, password: &str) -> Result<String> {
    use std::io::Write as _;
    let mut child = std::process::Command::new(gateway_bin())
        .args(["passwd", name])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("run gateway passwd")?;
    child
        .stdin
        .take()
        .context("stdin of gateway passwd")?
        .write_all(format!("{password}\n").as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "gateway passwd failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Names the gate hook (`xdp`, `tc`) every test-bed daemon of this test run is started with;
/// unset: the daemon's default (`auto`).
pub const GATE_HOOK_ENV: &str = "GATEWAY_TEST_GATE_HOOK";

/// Whether the gateway's gate runs on `interface`'s input in `ns`: an XDP program, a tc netlink
/// filter of ours, or a tcx link to one of the external interface's programs. (A tcx link's
/// interface is not shown by the tools at hand, so any live link to those programs counts: the
/// test-bed tests run one gateway at a time.)
pub fn gate_attached(ns: &Netns, interface: &str) -> Result<bool> {
    if xdp_attached(ns, interface)? {
        return Ok(true);
    }
    let filters = crate::run_checked(
        ns.command("tc")
            .args(["filter", "show", "dev", interface, "ingress"]),
    )?;
    if String::from_utf8_lossy(&filters.stdout).contains("gateway_") {
        return Ok(true);
    }
    let bpftool = |args: &[&str]| -> Result<Value> {
        let out = crate::run_checked(std::process::Command::new("bpftool").arg("-j").args(args))?;
        serde_json::from_slice(&out.stdout).context("bpftool's JSON")
    };
    // The external interface's tc programs, by the names the eBPF object gives them.
    let external_programs: Vec<u64> = bpftool(&["prog", "show"])?
        .as_array()
        .into_iter()
        .flatten()
        .filter(|program| {
            program["name"]
                .as_str()
                .is_some_and(|name| ["gateway_gate", "gateway_inbound"].contains(&name))
        })
        .filter_map(|program| program["id"].as_u64())
        .collect();
    Ok(bpftool(&["link", "show"])?
        .as_array()
        .into_iter()
        .flatten()
        .any(|link| {
            link["prog_id"]
                .as_u64()
                .is_some_and(|id| external_programs.contains(&id))
        }))
}

/// Whether an XDP program is attached to `interface` in `ns` (`ip link` shows `prog/xdp`).
pub fn xdp_attached(ns: &Netns, interface: &str) -> Result<bool> {
    let out = crate::run_checked(
        ns.command("ip")
            .args(["-d", "link", "show", "dev", interface]),
    )?;
    Ok(String::from_utf8_lossy(&out.stdout).contains("prog/xdp"))
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
