//! What was on the wire, measured apart from the programs under test: `tcpdump` writing a pcap
//! file of one interface in a namespace ([`Capture`], stopped by pid on drop), and the pair the
//! media tests use, on `server`'s and on `client`'s interface ([`HostCaptures`]). Reading the
//! files is [`crate::pcap`]'s.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use nix::sys::signal::Signal;

use crate::{
    ChildGuard, Netns, Testbed, iface,
    pcap::{Datagram, read},
    wait_until,
};

/// `tcpdump` writing a pcap file of one interface in a namespace, packet-buffered (`-U`), so the
/// file can be read while it runs. Stopped by pid (SIGINT, then harder) on drop.
pub struct Capture {
    child: ChildGuard,
    path: PathBuf,
    log: PathBuf,
}

/// What a stopped capture holds.
#[derive(Debug)]
pub struct Captured {
    pub datagrams: Vec<Datagram>,
    /// tcpdump's own count of packets the kernel dropped before it read them.
    pub dropped_by_kernel: u64,
}

impl Capture {
    /// Starts `tcpdump -i INTERFACE -w PATH FILTER` in `ns` and waits (bounded) until it
    /// captures. Its messages go to `PATH.log`.
    pub fn start(ns: &Netns, interface: &str, filter: &str, path: &Path) -> Result<Self> {
        let log = path.with_extension("log");
        let log_file =
            fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let mut cmd = ns.command("tcpdump");
        // --immediate-mode: each packet is handed over as it arrives, not in blocks up to a
        // second late (TPACKET_V3), which SIGINT would throw away unwritten.
        // -Z root: Debian's tcpdump would drop to its own user and could not write the file.
        cmd.args([
            "-i",
            interface,
            "-n",
            "--immediate-mode",
            "-U",
            "-Z",
            "root",
            "-w",
        ])
        .arg(path)
        .arg(filter)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file);
        let mut child = ChildGuard::spawn(&mut cmd, &format!("tcpdump in {}", ns.name()))
            .context("start tcpdump (is it installed? `cargo xtask setup`)")?;
        let listening = wait_until(Duration::from_secs(10), || {
            child.has_exited()
                || fs::read_to_string(&log).is_ok_and(|text| text.contains("listening on"))
        });
        if !listening || child.has_exited() {
            bail!(
                "tcpdump did not start capturing on {interface} in {}: {}",
                ns.name(),
                fs::read_to_string(&log).unwrap_or_default()
            );
        }
        Ok(Self {
            child,
            path: path.to_owned(),
            log,
        })
    }

    /// The datagrams written so far (the capture goes on).
    pub fn datagrams(&self) -> Result<Vec<Datagram>> {
        read(&self.path)
    }

    /// Stops tcpdump with SIGINT and reads the file. What arrives while it stops may be left
    /// out: stop a capture once what it must show has been sent.
    pub fn stop(mut self) -> Result<Captured> {
        let status = self.child.stop_with(Signal::SIGINT, Duration::from_secs(5));
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        ensure!(
            status.is_some_and(|status| status.success()),
            "tcpdump ended with {status:?}: {log}"
        );
        let dropped_by_kernel = log
            .lines()
            .find_map(|line| line.strip_suffix(" packets dropped by kernel"))
            .and_then(|count| count.trim().parse().ok())
            .with_context(|| format!("tcpdump's counts: {log}"))?;
        Ok(Captured {
            datagrams: read(&self.path)?,
            dropped_by_kernel,
        })
    }
}

/// UDP captured on `server`'s interface (what the server sent) and on `client`'s (what reached
/// the client).
pub struct HostCaptures {
    pub server: Capture,
    pub client: Capture,
}

/// What a pair of captures holds.
#[derive(Debug)]
pub struct Wire {
    /// On `server`'s interface.
    pub sent: Vec<Datagram>,
    /// On `client`'s interface.
    pub received: Vec<Datagram>,
}

impl HostCaptures {
    /// Captures UDP on both hosts' interfaces, into `DIR/server.pcap` and `DIR/client.pcap`.
    pub fn start(bed: &Testbed, dir: &Path) -> Result<Self> {
        Ok(Self {
            server: Capture::start(&bed.server, iface::HOST, "udp", &dir.join("server.pcap"))?,
            client: Capture::start(&bed.client, iface::HOST, "udp", &dir.join("client.pcap"))?,
        })
    }

    /// Stops the client's capture first, so a stream still running shows in the server's
    /// capture beyond what reached the client, never the other way round. Fails when the kernel
    /// dropped packets before tcpdump read them.
    pub fn stop(self) -> Result<Wire> {
        let received = self.client.stop()?;
        let sent = self.server.stop()?;
        ensure!(
            (sent.dropped_by_kernel, received.dropped_by_kernel) == (0, 0),
            "tcpdump missed packets: {} on the server's side, {} on the client's",
            sent.dropped_by_kernel,
            received.dropped_by_kernel
        );
        Ok(Wire {
            sent: sent.datagrams,
            received: received.datagrams,
        })
    }
}
