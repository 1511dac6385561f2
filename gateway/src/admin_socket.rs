//! The daemon's local control socket (`/run/gateway/NAME/control.sock`, root only): answers
//! `bindings` with a JSON document of the live bindings and kernel entries (`gateway bindings`),
//! and `upgrade` (`gateway upgrade`), the one command that changes anything: it hands the
//! daemon over to a new binary.

use std::{
    io::{self, BufRead as _, BufReader, Write as _},
    net::{IpAddr, Ipv6Addr, SocketAddr},
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde_json::json;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _},
    net::UnixListener,
};
use tracing::{debug, warn};

use crate::{
    instance::Instance,
    report::{
        Bindings, KernelEntry, Limits, MulticastGroup, MulticastMember, RelayReport, SCHEMA_VERSION,
    },
    server::Services,
};

/// Where an instance's control socket lives.
pub fn socket_path(instance: &Instance) -> PathBuf {
    instance.run_dir().join("control.sock")
}

fn ip_of(addr: &[u8; 16]) -> IpAddr {
    Ipv6Addr::from(*addr).to_canonical()
}

/// The `bindings` document.
pub fn bindings_document(services: &Services) -> Bindings {
    let mut document = summary_document(services);
    document.summary = false;
    document.enhanced_bindings = services
        .enhanced
        .as_ref()
        .map(|mode| mode.describe(services.gate.as_ref()))
        .unwrap_or_default();
    document.kernel_entries = services
        .gate
        .list()
        .into_iter()
        .map(|(key, value)| {
            let kernel_relays = value.mode == gateway_common::relay_mode::KERNEL;
            KernelEntry {
                remote: SocketAddr::new(ip_of(&key.remote_addr), u16::from_be(key.remote_port_be)),
                external_relay: SocketAddr::new(
                    ip_of(&key.relay_addr),
                    u16::from_be(key.relay_port_be),
                ),
                relayed_by: if kernel_relays { "kernel" } else { "userspace" }.to_owned(),
                client: kernel_relays.then(|| {
                    SocketAddr::new(
                        ip_of(&value.client_addr),
                        u16::from_be(value.client_port_be),
                    )
                }),
                aid: kernel_relays.then_some(u32::from_be(value.aid_be)),
                packets: value.counters.packets,
                bytes: value.counters.bytes,
                last_seen_ns: value.counters.last_seen_ns,
            }
        })
        .collect();
    document
}

/// The counts of `gateway bindings` without the lists (`--summary`): cheap at any number of
/// bindings.
pub fn summary_document(services: &Services) -> Bindings {
    let (refused_total, refused_per_client) = services.connections.refused();
    let caps_hit = services
        .enhanced
        .as_ref()
        .map_or([0; 4], |mode| mode.caps_hit());
    let relay = services.enhanced.as_ref().map(|mode| {
        let (internal_ports_in_use, external_ports_in_use) = mode.ports_in_use();
        RelayReport {
            bindings_served: mode.running_relays(),
            scheduled_checks: mode.scheduled_checks(),
            internal_ports_in_use,
            external_ports_in_use,
            datagrams_relayed: mode.relay_relayed(),
            dropped: mode
                .relay_drops()
                .into_iter()
                .map(|(drop, count)| (drop.name().to_owned(), count))
                .collect(),
        }
    });
    let multicast_groups = services
        .enhanced
        .as_ref()
        .map(|mode| mode.multicast_groups(services.gate.as_ref()))
        .unwrap_or_default()
        .into_iter()
        .map(|g| MulticastGroup {
            group: g.group,
            sources: g.sources,
            received_kernel: g.received_kernel,
            received_userspace: g.received_userspace,
            inside_sent_kernel: g.inside_sent_kernel,
            inside_sent_userspace: g.inside_sent_userspace,
            dropped_source_userspace: g.dropped_source_userspace,
            members: g
                .members
                .into_iter()
                .map(|m| MulticastMember {
                    aid: m.aid,
                    client: m.client,
                    receive: m.receive.map(str::to_owned),
                    send_ttl: m.send_ttl,
                    source: m.source,
                    in_kernel: m.in_kernel,
                    kernel_packets: m.kernel_packets,
                    userspace_packets: m.userspace_packets,
                })
                .collect(),
        })
        .collect();
    Bindings {
        version: SCHEMA_VERSION,
        enhanced_bindings: Vec::new(),
        kernel_entries: Vec::new(),
        relay,
        summary: true,
        multicast_groups,
        limits: Limits {
            connections: services.connections.held(),
            max_connections: services.connections.max_total(),
            max_connections_per_client: services.connections.max_per_client(),
            connections_refused_total_cap: refused_total,
            connections_refused_per_client_cap: refused_per_client,
            bindings_refused_connection_cap: caps_hit[0],
            bindings_refused_user_cap: caps_hit[1],
            bindings_refused_total_cap: caps_hit[2],
            bindings_refused_no_relay_port: caps_hit[3],
        },
    }
}

/// Serves the control socket until the task is dropped.
pub async fn serve(path: PathBuf, services: Arc<Services>) -> io::Result<()> {
    serve_listener(bind(&path)?, services).await
}

/// The control socket at `path` (root only), replacing a stale one.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// How long `upgrade` waits for the daemon's answer (the new binary loads and verifies the
/// programs first).
pub const UPGRADE_ANSWER: Duration = Duration::from_mins(5);

/// A request to hand over to a new binary (`gateway upgrade`, SIGUSR2), with where the
/// outcome goes: the new daemon's pid, or why the old one keeps serving.
#[derive(Debug)]
pub struct UpgradeRequest {
    /// `None`: the binary the daemon was started from.
    pub binary: Option<PathBuf>,
    pub reply: tokio::sync::oneshot::Sender<Result<UpgradeDone, String>>,
}

/// A finished upgrade.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct UpgradeDone {
    pub old_pid: u32,
    pub new_pid: u32,
    pub binary: PathBuf,
    pub state_version: u32,
    pub sessions: usize,
    pub bindings: usize,
}

async fn upgrade_reply(services: &Services, argument: &str) -> String {
    #[derive(serde::Deserialize)]
    struct Args {
        binary: Option<PathBuf>,
    }
    let args: Args = match serde_json::from_str(argument) {
        Ok(args) => args,
        Err(error) => return json!({ "error": format!("upgrade: {error}") }).to_string(),
    };
    let Some(requests) = &services.upgrades else {
        return json!({ "error": "this daemon cannot upgrade" }).to_string();
    };
    let (reply, answer) = tokio::sync::oneshot::channel();
    if requests
        .try_send(UpgradeRequest {
            binary: args.binary,
            reply,
        })
        .is_err()
    {
        return json!({ "error": "an upgrade is already under way" }).to_string();
    }
    match tokio::time::timeout(UPGRADE_ANSWER, answer).await {
        Ok(Ok(Ok(done))) => json!({ "upgraded": done }).to_string(),
        Ok(Ok(Err(error))) => json!({ "error": error }).to_string(),
        Ok(Err(_)) | Err(_) => json!({ "error": "no answer from the daemon" }).to_string(),
    }
}

/// Serves the control socket on `listener` until the task is dropped.
pub async fn serve_listener(listener: UnixListener, services: Arc<Services>) -> io::Result<()> {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // EMFILE and friends: the socket must outlive a burst, so back off and go on.
                warn!(%error, "control socket: accept failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let services = Arc::clone(&services);
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            let mut reader = tokio::io::BufReader::new(read);
            let read =
                tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line)).await;
            let reply = match (read, line.trim()) {
                (Ok(Ok(_)), "bindings") => serde_json::to_string(&bindings_document(&services))
                    .unwrap_or_else(|error| json!({ "error": error.to_string() }).to_string()),
                (Ok(Ok(_)), "summary") => serde_json::to_string(&summary_document(&services))
                    .unwrap_or_else(|error| json!({ "error": error.to_string() }).to_string()),
                (Ok(Ok(_)), command) if command.starts_with("upgrade ") => {
                    upgrade_reply(&services, &command["upgrade ".len()..]).await
                }
                (Ok(Ok(_)), other) => {
                    json!({ "error": format!("unknown command {other:?}") }).to_string()
                }
                _ => return,
            };
            if let Err(error) = write.write_all(format!("{reply}\n").as_bytes()).await {
                debug!(%error, "control socket client went away");
            }
        });
    }
}

/// Sends one command to a running daemon and returns its one-line answer.
pub fn query(path: &Path, command: &str) -> io::Result<String> {
    // The daemon answers once the whole document is built: a listing of 100,000 bindings takes
    // a while.
    query_within(path, command, Duration::from_mins(1))
}

/// [`query`] waiting up to `timeout` for the answer.
pub fn query_within(path: &Path, command: &str, timeout: Duration) -> io::Result<String> {
    let mut stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(format!("{command}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    Ok(line)
}
