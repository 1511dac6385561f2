//! The bench's environment: one test bed (client -- fw -- server), a tokio runtime whose threads
//! live in `client` (for the gateway client library), the `udp-blast` children, and measurement
//! windows over the kernel's own counters. Everything started here is stopped by a guard.

use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    os::fd::RawFd,
    path::PathBuf,
    process::Stdio,
    sync::mpsc::{self, Receiver, RecvTimeoutError},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use bench::procfs::{self, CpuTimes, UdpCounters};
use nix::sys::signal::Signal;
use serde_json::Value;
use testbed::{ChildGuard, Netns, Testbed};

use super::plan::Plan;

/// The test bed plus what every scenario needs.
pub struct Env {
    /// Runs futures on threads inside `client` (dropped before the namespaces).
    pub rt: tokio::runtime::Runtime,
    pub bed: Testbed,
    pub blast_bin: PathBuf,
    pub plan: Plan,
    pub work_dir: PathBuf,
    /// Where results go (the profile area writes its flame graphs there).
    pub out_dir: PathBuf,
    started: Instant,
}

impl Env {
    pub fn new(
        plan: Plan,
        blast_bin: PathBuf,
        work_dir: PathBuf,
        out_dir: PathBuf,
    ) -> Result<Self> {
        let bed = Testbed::new().context("bring up the test bed")?;
        // Many sockets per binding in the memory scenario, on both sides.
        for ns in [&bed.client, &bed.server] {
            ns.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
        }
        // The control-plane scenario opens and closes thousands of TCP connections per second.
        bed.client.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        let rt = bed
            .client
            .run(|| {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
            })?
            .context("start the client runtime")?;
        Ok(Self {
            rt,
            bed,
            blast_bin,
            plan,
            work_dir,
            out_dir,
            started: Instant::now(),
        })
    }

    /// Runs `future` on the client runtime's threads, which are in the `client` namespace (so
    /// every socket it opens is there). Bounded by `limit`.
    pub fn client<F, T>(&self, limit: Duration, future: F) -> Result<T>
    where
        F: Future<Output = Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        let handle = self.rt.spawn(async move {
            tokio::time::timeout(limit, future)
                .await
                .map_err(|_| anyhow!("timed out after {limit:?}"))?
        });
        self.rt
            .block_on(handle)
            .map_err(|error| anyhow!("client task failed: {error}"))?
    }

    /// A progress line with the elapsed time.
    pub fn progress(&self, text: &str) {
        println!(
            "bench [{:>5.1} s] {text}",
            self.started.elapsed().as_secs_f64()
        );
    }
}

/// UDP counters of `ns` (read by a thread that entered it).
pub fn udp_counters(ns: &Netns) -> Result<UdpCounters> {
    ns.run(procfs::read_udp_counters_here)?
}

/// A `udp-blast` child with its JSON events.
pub struct Blast {
    guard: ChildGuard,
    events: Receiver<Value>,
    what: String,
}

/// Where a `udp-blast` socket comes from.
#[derive(Debug, Clone, Copy)]
pub enum SocketSpec {
    Bind(SocketAddr),
    /// A descriptor of this process (a client-library socket); the child gets a duplicate.
    Fd(RawFd),
}

impl Blast {
    /// Starts `udp-blast ARGS --bind/--fd` in `ns`.
    pub fn spawn(
        env: &Env,
        ns: &Netns,
        args: &[String],
        socket: SocketSpec,
        what: &str,
    ) -> Result<Self> {
        match socket {
            SocketSpec::Bind(addr) => {
                let mut args = args.to_vec();
                args.extend(["--bind".to_owned(), addr.to_string()]);
                Self::spawn_with_fds(env, ns, &args, &[], what)
            }
            SocketSpec::Fd(fd) => Self::spawn_with_fds(env, ns, args, &[fd], what),
        }
    }

    /// Starts `udp-blast ARGS --fd N...` in `ns`, the child inheriting a duplicate of each of
    /// `fds` (descriptors of this process).
    pub fn spawn_with_fds(
        env: &Env,
        ns: &Netns,
        args: &[String],
        fds: &[RawFd],
        what: &str,
    ) -> Result<Self> {
        let mut cmd = ns.command(&env.blast_bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut copies = Vec::with_capacity(fds.len());
        for &fd in fds {
            // SAFETY: fd is a descriptor this process owns; dup gives a new one without
            // FD_CLOEXEC, which the child inherits (closed here right after the spawn).
            let copy = unsafe { libc::dup(fd) };
            if copy < 0 {
                let error = std::io::Error::last_os_error();
                close_all(&copies);
                bail!("dup a socket for {what}: {error}");
            }
            cmd.args(["--fd", &copy.to_string()]);
            copies.push(copy);
        }
        let spawned = ChildGuard::spawn(&mut cmd, what);
        // Our copies; the child has its own now.
        close_all(&copies);
        let mut guard = spawned?;
        let stdout = guard
            .child_mut()
            .and_then(|child| child.stdout.take())
            .context("the child's stdout")?;
        let (tx, events) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(value) = serde_json::from_str::<Value>(&line)
                    && tx.send(value).is_err()
                {
                    break;
                }
            }
        });
        Ok(Self {
            guard,
            events,
            what: what.to_owned(),
        })
    }

    /// Waits for the event `name` (others are skipped) for at most `timeout`.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(value) if value["event"] == name => return Ok(value),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    bail!("{}: no `{name}` within {timeout:?}", self.what)
                }
                Err(RecvTimeoutError::Disconnected) => {
                    bail!("{}: exited before `{name}`", self.what)
                }
            }
        }
    }

    /// Waits for the report of a child that ends by itself.
    pub fn finish(mut self, timeout: Duration) -> Result<Value> {
        let report = self.wait_event("report", timeout);
        self.guard
            .stop_with(Signal::SIGKILL, Duration::from_secs(2));
        report
    }

    /// Asks the child to stop (SIGTERM) and returns its report.
    pub fn stop(mut self) -> Result<Value> {
        let pid = nix::unistd::Pid::from_raw(self.guard.pid());
        let _ = nix::sys::signal::kill(pid, Signal::SIGTERM);
        let report = self.wait_event("report", Duration::from_secs(5));
        self.guard
            .stop_with(Signal::SIGKILL, Duration::from_secs(2));
        report
    }
}

fn close_all(fds: &[RawFd]) {
    for &fd in fds {
        // SAFETY: a duplicate this process made and owns.
        unsafe { libc::close(fd) };
    }
}

/// Counters at one instant.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    at: Instant,
    cpu: CpuTimes,
    tx: UdpCounters,
    rx: UdpCounters,
}

impl Snapshot {
    pub fn take(tx_ns: &Netns, rx_ns: &Netns) -> Result<Self> {
        let tx = udp_counters(tx_ns)?;
        let rx = udp_counters(rx_ns)?;
        Ok(Self {
            at: Instant::now(),
            cpu: procfs::read_cpu_times()?,
            tx,
            rx,
        })
    }
}

/// What happened between two snapshots.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub secs: f64,
    /// System-wide busy CPU time in nanoseconds.
    pub busy_ns: f64,
    /// Counters of the sender's namespace.
    pub tx: UdpCounters,
    /// Counters of the receiver's namespace.
    pub rx: UdpCounters,
}

impl Window {
    pub fn between(a: &Snapshot, b: &Snapshot) -> Self {
        #[expect(clippy::cast_precision_loss, reason = "tick counts")]
        let busy = b.cpu.busy().saturating_sub(a.cpu.busy()) as f64;
        Self {
            secs: b.at.duration_since(a.at).as_secs_f64(),
            busy_ns: busy * procfs::tick_ns(),
            tx: b.tx.since(&a.tx),
            rx: b.rx.since(&a.rx),
        }
    }

    pub fn offered_pps(&self) -> f64 {
        per_second(self.tx.out_datagrams, self.secs)
    }

    pub fn delivered_pps(&self) -> f64 {
        per_second(self.rx.in_datagrams, self.secs)
    }
}

#[expect(clippy::cast_precision_loss, reason = "packet counts")]
pub fn per_second(count: u64, secs: f64) -> f64 {
    if secs > 0.0 { count as f64 / secs } else { 0.0 }
}

/// Sleeps `warmup`, then measures for `window` between two snapshots.
pub fn measure(tx_ns: &Netns, rx_ns: &Netns, warmup: Duration, window: Duration) -> Result<Window> {
    thread::sleep(warmup);
    let a = Snapshot::take(tx_ns, rx_ns)?;
    thread::sleep(window);
    let b = Snapshot::take(tx_ns, rx_ns)?;
    Ok(Window::between(&a, &b))
}
