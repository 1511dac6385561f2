//! The Debian package (`$GATEWAY_DEB`, which `cargo xtask test` builds once): `dpkg -i`
//! installs it without enabling anything; the installed `gateway`, its man page, its bash
//! completion and its unit (`systemd-analyze verify`) work; the installed daemon carries a
//! two-step stream in the test bed; and `dpkg -r` leaves no link, program or pin behind even
//! with a stopped daemon's gate still pinned. Root only.
//!
//! Everything runs in a private mount namespace with its own bpffs and `/run/gateway`: the
//! package's prerm detaches every instance on the host it sees, and must see only this test's.

use std::{
    net::{SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use bytes::BytesMut;
use gateway_client::{Family, Timeouts, blocking::Client};
use gateway_proto::enhanced::DatagramHeader;
use serde_json::Value;
use testbed::{
    ChildGuard, Testbed, addr,
    gateway::{GatewayDaemon, TESTBED_ARGS, unique_instance},
    wait_until,
};

const INSTALLED: &str = "/usr/bin/gateway";

/// The package under test.
fn deb() -> PathBuf {
    let path = std::env::var_os("GATEWAY_DEB").map(PathBuf::from).expect(
        "GATEWAY_DEB names the .deb to test (`cargo xtask test` builds it; or `cargo xtask deb`)",
    );
    assert!(path.is_file(), "{} is not a file", path.display());
    path
}

/// A mount namespace of its own (bpffs and /run/gateway fresh), held by a sleeping process;
/// when it ends, so does everything pinned in that bpffs.
struct MountNs {
    holder: ChildGuard,
}

impl MountNs {
    fn new() -> Self {
        std::fs::create_dir_all("/run/gateway").unwrap();
        let holder = ChildGuard::spawn(
            Command::new("unshare").args(["--mount", "--propagation", "private", "sleep", "600"]),
            "mount namespace holder",
        )
        .unwrap();
        let ns = Self { holder };
        // The holder's namespace exists once its mount namespace differs from ours.
        let ours = std::fs::read_link("/proc/self/ns/mnt").unwrap();
        assert!(wait_until(Duration::from_secs(5), || {
            std::fs::read_link(ns.path()).is_ok_and(|theirs| theirs != ours)
        }));
        ns.run(&["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"]);
        ns.run(&["mount", "-t", "tmpfs", "tmpfs", "/run/gateway"]);
        ns
    }

    fn path(&self) -> String {
        format!("/proc/{}/ns/mnt", self.holder.pid())
    }

    /// `nsenter --mount=...`, the prefix that runs a command in this namespace.
    fn prefix(&self) -> Vec<String> {
        vec![
            "nsenter".to_owned(),
            format!("--mount={}", self.path()),
            "--".to_owned(),
        ]
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--mount={}", self.path()))
            .arg("--")
            .args(args);
        cmd
    }

    fn output(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Runs `args` here; panics with its output when it fails.
    fn run(&self, args: &[&str]) -> String {
        let out = self.output(args);
        assert!(
            out.status.success(),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for MountNs {
    fn drop(&mut self) {
        // The namespace (and its bpffs with whatever is pinned there) ends with its holder; then
        // the host's mount point made for it can go, unless something else uses it.
        self.holder
            .stop_with(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(5));
        let _ = std::fs::remove_dir("/run/gateway");
    }
}

/// Removes the package on drop (in the test's mount namespace), also when the test failed, and
/// purges what `dpkg -r` keeps (the conffile, dpkg's record), so the host is as before.
struct Installed<'a> {
    ns: &'a MountNs,
}

impl Drop for Installed<'_> {
    fn drop(&mut self) {
        if Path::new(INSTALLED).exists() {
            let _ = self.ns.output(&["dpkg", "-r", "gateway"]);
        }
        let _ = self.ns.output(&["dpkg", "--purge", "gateway"]);
    }
}

fn framed(aid: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    DatagramHeader::new(aid).encode(&mut out).unwrap();
    out.extend_from_slice(payload);
    out.to_vec()
}

/// bpftool's JSON about the pinned object `path` in `ns` (`link` or `prog`), if it is one.
fn pinned(ns: &MountNs, kind: &str, path: &str) -> Option<Value> {
    let out = ns.output(&["bpftool", "-j", kind, "show", "pinned", path]);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

/// Whether a BPF object with that id still exists.
fn exists(kind: &str, id: u64) -> bool {
    Command::new("bpftool")
        .args([kind, "show", "id", &id.to_string()])
        .output()
        .is_ok_and(|out| out.status.success())
}

/// Two-step binding, then a stream of `count` datagrams server -> client through it.
fn stream_through(bed: &Testbed, count: u32) {
    let client = bed
        .client
        .run(|| UdpSocket::bind((addr::CLIENT_V4, 0)).unwrap())
        .unwrap();
    let server = bed
        .server
        .run(|| UdpSocket::bind((addr::SERVER_V4, 0)).unwrap())
        .unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let (client_addr, server_addr) = (client.local_addr().unwrap(), server.local_addr().unwrap());
    let proxy = SocketAddr::from((addr::FW_INSIDE_V4, 1080));
    let mut session = bed
        .client
        .run(move || {
            Client::connect(proxy, None, Timeouts::default())
                .unwrap()
                .enhanced()
                .unwrap()
        })
        .unwrap();
    let mut binding = session.bind(client_addr, Family::V4).unwrap();
    let relays = session.connect(&mut binding, server_addr).unwrap();
    let mut buf = [0u8; 2048];
    for seq in 0..count {
        let payload = format!("rtp {seq:04}");
        server.send_to(payload.as_bytes(), relays.external).unwrap();
        let (len, _) = client
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("datagram {seq}: {e}"));
        assert_eq!(
            &buf[..len],
            framed(relays.aid, payload.as_bytes()).as_slice()
        );
    }
    drop(session);
}

#[test]
fn the_package_installs_works_and_removes_every_gate() {
    let deb = deb();
    assert!(
        !Path::new(INSTALLED).exists(),
        "{INSTALLED} exists already: this test installs and removes the package itself"
    );
    let ns = MountNs::new();
    let deb_text = deb.display().to_string();
    let installed = Installed { ns: &ns };
    let out = ns.run(&["dpkg", "-i", &deb_text]);
    assert!(out.contains("installed, not started"), "{out}");

    // The commands, the man page, the completion and the unit.
    let version = ns.run(&[INSTALLED, "--version"]);
    assert_eq!(
        version.trim(),
        format!("gateway {}", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(
        ns.run(&["man", "-w", "gateway-run"]).trim(),
        "/usr/share/man/man8/gateway-run.8"
    );
    let completion = ns.run(&[
        "bash",
        "-c",
        "source /usr/share/bash-completion/completions/gateway; COMP_WORDS=(gateway det); \
         COMP_CWORD=1; _gateway gateway det gateway; echo \"${COMPREPLY[@]}\"",
    ]);
    assert_eq!(completion.trim(), "detach");
    ns.run(&["/usr/bin/gateway-socksify", "--help"]);
    let verify = ns.output(&[
        "systemd-analyze",
        "verify",
        "/lib/systemd/system/gateway.service",
    ]);
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    // Installed, never enabled; the configuration is a conffile, all commented out.
    assert!(!Path::new("/etc/systemd/system/multi-user.target.wants/gateway.service").exists());
    let conffiles = ns.run(&["dpkg-query", "-W", "-f=${Conffiles}", "gateway"]);
    assert!(
        conffiles.contains("/etc/gateway/gateway.toml"),
        "{conffiles}"
    );

    // The installed daemon carries a stream; stopped, it leaves its gate pinned and attached.
    let bed = Testbed::new().unwrap();
    let instance = unique_instance();
    let prefix = ns.prefix();
    let prefix: Vec<&str> = prefix.iter().map(String::as_str).collect();
    let mut daemon = GatewayDaemon::start_program(
        &bed.fw,
        Path::new(INSTALLED),
        &instance,
        &prefix,
        &TESTBED_ARGS,
    )
    .unwrap();
    stream_through(&bed, 50);
    assert!(daemon.stop(), "{}", daemon.log_text());
    let pin_dir = format!("/sys/fs/bpf/gateway/{instance}");
    let pins = ns.run(&["ls", &pin_dir]);
    let mut links = Vec::new();
    let mut programs = Vec::new();
    for name in pins.split_whitespace() {
        if let Some(link) = pinned(&ns, "link", &format!("{pin_dir}/{name}")) {
            links.extend(link["id"].as_u64());
            programs.extend(link["prog_id"].as_u64());
        }
    }
    assert!(
        !links.is_empty() && links.iter().all(|&id| exists("link", id)),
        "the stopped daemon's gate stays linked: {pins}"
    );

    // Removal detaches it before the binaries go.
    let removed = ns.run(&["dpkg", "-r", "gateway"]);
    println!("dpkg -r:\n{removed}");
    assert!(removed.contains("removed link"), "prerm detached the gate");
    drop(installed);
    assert!(!Path::new(INSTALLED).exists());
    let gone = ns.output(&["ls", "-A", "/sys/fs/bpf/gateway"]);
    assert!(
        !gone.status.success() || gone.stdout.is_empty(),
        "pins left: {}\n{removed}",
        String::from_utf8_lossy(&gone.stdout)
    );
    assert!(
        links.iter().all(|&id| !exists("link", id)),
        "a link outlived the package"
    );
    assert!(
        wait_until(Duration::from_secs(5), || programs
            .iter()
            .all(|&id| !exists("prog", id))),
        "a program outlived the package"
    );
    let run_dir = ns.output(&["ls", "-A", "/run/gateway"]);
    assert!(run_dir.stdout.is_empty(), "run directory left");
    assert!(
        !Path::new("/etc/gateway").exists(),
        "the purge after removal leaves no configuration behind"
    );
}
