//! Real peers for the test bed: a DNS server for `.test` names (dnsmasq), an HTTP server
//! (Python's http.server), a UDP echo server, two RTSP servers (the project's demo media server
//! and `GStreamer`'s, unicast or multicast). Each stops when dropped.

use std::{
    fs,
    net::{SocketAddr, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::{ChildGuard, Netns, addr, iface, run_checked, unique_suffix, wait_until};

/// dnsmasq answering `NAME.test` with the server's addresses, listening on 203.0.113.53:53 in
/// `server`.
pub struct Dnsmasq {
    _child: ChildGuard,
}

/// Adds the test bed's nameserver address (203.0.113.53) to `server`, for a nameserver there.
pub fn add_nameserver_address(server: &Netns) -> Result<()> {
    run_checked(server.command("ip").args([
        "addr",
        "add",
        &format!("{}/24", addr::SERVER_DNS_V4),
        "dev",
        iface::HOST,
    ]))?;
    Ok(())
}

impl Dnsmasq {
    /// `names` are answered with both of `server`'s addresses (A and AAAA).
    pub fn start(server: &Netns, names: &[&str]) -> Result<Self> {
        add_nameserver_address(server)?;
        let mut cmd = server.command("dnsmasq");
        cmd.args([
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            &format!("--listen-address={}", addr::SERVER_DNS_V4),
            "--port=53",
            "--pid-file=",
            "--user=root",
            "--log-facility=-",
        ]);
        for name in names {
            cmd.arg(format!("--address=/{name}/{}", addr::SERVER_V4));
            cmd.arg(format!("--address=/{name}/{}", addr::SERVER_V6));
        }
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        let child = ChildGuard::spawn(&mut cmd, "dnsmasq")?;
        // Ready when its port answers (a TCP connect to port 53 works once it listens).
        let target = SocketAddr::new(addr::SERVER_DNS_V4.into(), 53);
        let ready = server.run(move || {
            wait_until(Duration::from_secs(5), || {
                TcpStream::connect_timeout(&target, Duration::from_millis(100)).is_ok()
            })
        })?;
        if !ready {
            bail!("dnsmasq did not start");
        }
        Ok(Self { _child: child })
    }
}

/// Python's http.server serving a directory with one file, on port 80 (IPv4 and IPv6).
pub struct HttpServer {
    _child: ChildGuard,
    dir: PathBuf,
}

impl HttpServer {
    /// Serves `body` as `/index.txt`.
    pub fn start(server: &Netns, body: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("gateway-http-{}", unique_suffix()));
        fs::create_dir_all(&dir)?;
        fs::write(dir.join("index.txt"), body)?;
        // Debian's python3 (the separate CPython on PATH lacks nothing here, but be explicit).
        let mut cmd = server.command("/usr/bin/python3");
        cmd.args(["-m", "http.server", "80", "--bind", "::", "--directory"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = ChildGuard::spawn(&mut cmd, "http.server")?;
        let target = SocketAddr::new(addr::SERVER_V4.into(), 80);
        let ready = server.run(move || {
            wait_until(Duration::from_secs(10), || {
                TcpStream::connect_timeout(&target, Duration::from_millis(100)).is_ok()
            })
        })?;
        if !ready {
            bail!("http.server did not start");
        }
        Ok(Self { _child: child, dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A UDP echo server on a thread: sends every datagram back to its sender, prefixed with
/// `prefix`. Records who sent to it.
pub struct UdpEcho {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<SocketAddr>>>,
    pub addr: SocketAddr,
}

impl UdpEcho {
    pub fn start(ns: &Netns, bind: SocketAddr, prefix: &'static [u8]) -> Result<Self> {
        let socket = ns
            .run(move || UdpSocket::bind(bind))?
            .with_context(|| format!("bind echo {bind}"))?;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let addr = socket.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut buf = vec![0u8; 65_536];
            while !stop_flag.load(Ordering::Relaxed) {
                if let Ok((len, from)) = socket.recv_from(&mut buf) {
                    if !seen.contains(&from) {
                        seen.push(from);
                    }
                    let mut reply = prefix.to_vec();
                    reply.extend_from_slice(&buf[..len]);
                    let _ = socket.send_to(&reply, from);
                }
            }
            seen
        });
        Ok(Self {
            stop,
            thread: Some(thread),
            addr,
        })
    }

    /// Stops the server and returns every source address it heard from.
    pub fn stop(mut self) -> Vec<SocketAddr> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The project's demo media server (`demo-media-server`, beside the gateway binary) streaming a
/// WAV file at `rtsp://203.0.113.2:PORT/rtsp.wav`; its log, which names the `ssrc=` of each
/// SETUP reply, in a file.
pub struct DemoMediaServer {
    _child: ChildGuard,
    log: PathBuf,
}

impl DemoMediaServer {
    /// Starts it in `server` and waits until its port accepts connections.
    pub fn start(server: &Netns, port: u16, wav: &Path, log: &Path) -> Result<Self> {
        let log_file =
            fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
        let mut cmd =
            server.command(crate::gateway::gateway_bin().with_file_name("demo-media-server"));
        cmd.arg("--listen")
            .arg(format!("{}:{port}", addr::SERVER_V4))
            .arg("--wav")
            .arg(wav)
            .env("GATEWAY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        let child = ChildGuard::spawn(&mut cmd, "demo-media-server")?;
        wait_for_tcp(server, SocketAddr::new(addr::SERVER_V4.into(), port))?;
        Ok(Self {
            _child: child,
            log: log.to_owned(),
        })
    }

    /// The SSRC its first SETUP reply named.
    pub fn first_ssrc(&self) -> Result<u32> {
        let text = fs::read_to_string(&self.log)?;
        let hex = text
            .split_once("ssrc=")
            .and_then(|(_, rest)| rest.get(..8))
            .with_context(|| format!("no SETUP in the demo server's log:\n{text}"))?;
        u32::from_str_radix(hex, 16).with_context(|| format!("ssrc={hex}"))
    }
}

/// `GStreamer`'s RTSP server (`tests/peers/gst_rtsp_server.py` under Debian's python3 with
/// python3-gi) streaming a WAV file at `rtsp://203.0.113.2:PORT/rtsp.wav` as L16, payload type
/// 96; its replies name no `source=`.
pub struct GstRtspServer {
    _child: ChildGuard,
}

impl GstRtspServer {
    /// Starts it in `server` and waits until its port accepts connections.
    pub fn start(server: &Netns, port: u16, wav: &Path) -> Result<Self> {
        crate::players::require(
            "/usr/bin/python3",
            &[
                "-c",
                "import gi; gi.require_version('GstRtspServer', '1.0'); \
                 from gi.repository import GstRtspServer",
            ],
            "gir1.2-gst-rtsp-server-1.0 (with python3-gi)",
        )?;
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("peers/gst_rtsp_server.py");
        let mut cmd = server.command("/usr/bin/python3");
        cmd.arg(&script)
            .arg(addr::SERVER_V4.to_string())
            .arg(port.to_string())
            .arg(wav)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = ChildGuard::spawn(&mut cmd, "GStreamer RTSP server")?;
        wait_for_tcp(server, SocketAddr::new(addr::SERVER_V4.into(), port))?;
        Ok(Self { _child: child })
    }
}

/// The multicast address pool of [`GstRtspMulticastServer`]: groups `first..=last` (from
/// 233.252.0.0/24), ports `min_port..=max_port`, sent with `ttl`.
#[derive(Debug, Clone, Copy)]
pub struct MulticastPool {
    pub first: std::net::Ipv4Addr,
    pub last: std::net::Ipv4Addr,
    pub min_port: u16,
    pub max_port: u16,
    pub ttl: u8,
}

/// `GStreamer`'s RTSP server offering multicast only (`tests/peers/gst_rtsp_multicast_server.py`:
/// `UDP_MCAST` and an address pool), streaming a WAV file at `rtsp://203.0.113.2:PORT/rtsp.wav`
/// as L16, payload type 96. Its SETUP replies are `RTP/AVP;multicast;destination=G;ttl=N;
/// port=P-P+1`; it sends the stream to the group on `server`'s interface, so `server` gets a
/// multicast route there first (dropped with the namespace).
pub struct GstRtspMulticastServer {
    _child: ChildGuard,
}

impl GstRtspMulticastServer {
    /// Adds the multicast route in `server`, starts the server there and waits until its port
    /// accepts connections. Its output goes to `log`.
    pub fn start(
        server: &Netns,
        port: u16,
        wav: &Path,
        pool: MulticastPool,
        log: &Path,
    ) -> Result<Self> {
        crate::players::require(
            "/usr/bin/python3",
            &[
                "-c",
                "import gi; gi.require_version('GstRtsp', '1.0'); \
                 gi.require_version('GstRtspServer', '1.0'); \
                 from gi.repository import GstRtsp, GstRtspServer",
            ],
            "gir1.2-gst-rtsp-server-1.0 (with python3-gi)",
        )?;
        // The sender's route for the groups (testbed.md: "Multicast in namespaces").
        run_checked(server.command("ip").args([
            "route",
            "replace",
            "224.0.0.0/4",
            "dev",
            iface::HOST,
        ]))?;
        let log_file =
            fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
        let script =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("peers/gst_rtsp_multicast_server.py");
        let mut cmd = server.command("/usr/bin/python3");
        cmd.arg(&script)
            .arg(addr::SERVER_V4.to_string())
            .arg(port.to_string())
            .arg(wav)
            .arg(pool.first.to_string())
            .arg(pool.last.to_string())
            .arg(pool.min_port.to_string())
            .arg(pool.max_port.to_string())
            .arg(pool.ttl.to_string())
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        let child = ChildGuard::spawn(&mut cmd, "GStreamer multicast RTSP server")?;
        wait_for_tcp(server, SocketAddr::new(addr::SERVER_V4.into(), port))?;
        Ok(Self { _child: child })
    }
}

/// Waits (bounded) until `target` accepts TCP connections from inside `ns`.
fn wait_for_tcp(ns: &Netns, target: SocketAddr) -> Result<()> {
    let ready = ns.run(move || {
        wait_until(Duration::from_secs(10), || {
            TcpStream::connect_timeout(&target, Duration::from_millis(100)).is_ok()
        })
    })?;
    if !ready {
        bail!("nothing listens on {target} in {}", ns.name());
    }
    Ok(())
}
