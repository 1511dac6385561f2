//! The documents the CLI prints: `gateway stats` and `gateway bindings`, as typed values. The
//! daemon (bindings) and the CLI (stats) build them, `--json` prints them with serde, the tables
//! are rendered from them, so one schema serves scripts and people. Every document carries
//! [`SCHEMA_VERSION`]; a reader refuses another version with a clear message rather than
//! misreading it.
//!
//! Keys scripts already read stay: `kernel_relayed.packets` and `.bytes` in stats,
//! `kernel_entries` and `enhanced_bindings` in bindings.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
};

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use thiserror::Error;

/// The version of both documents; raise it when a key changes meaning or goes away.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Error)]
pub enum ReportError {
    #[error("not a gateway document: {0}")]
    Malformed(String),
    #[error(
        "the document is schema version {found}, this gateway reads version {SCHEMA_VERSION}: \
         use the `gateway` binary of the same release as the daemon"
    )]
    Version { found: u32 },
}

/// Reads a document, checking its version before anything else.
pub fn parse<T: DeserializeOwned>(text: &str) -> Result<T, ReportError> {
    #[derive(Deserialize)]
    struct Versioned {
        version: Option<u32>,
    }
    let versioned: Versioned =
        serde_json::from_str(text).map_err(|error| ReportError::Malformed(error.to_string()))?;
    match versioned.version {
        Some(SCHEMA_VERSION) => {
            serde_json::from_str(text).map_err(|error| ReportError::Malformed(error.to_string()))
        }
        Some(found) => Err(ReportError::Version { found }),
        None => Err(ReportError::Malformed("no `version` key".to_owned())),
    }
}

/// Packets and bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
}

/// One exit reason's count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReasonCount {
    /// `drop`, `pass` or `redirect`.
    pub verdict: String,
    pub packets: u64,
    pub bytes: u64,
}

/// `gateway stats --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub version: u32,
    pub instance: String,
    /// Every exit reason of the data path by name.
    pub reasons: BTreeMap<String, ReasonCount>,
    /// The sum of every `drop` reason.
    pub dropped: Traffic,
    /// The sum of every `redirect` reason: what the kernel relayed.
    pub kernel_relayed: Traffic,
}

impl Stats {
    /// The table `gateway stats` prints.
    pub fn to_table(&self) -> String {
        let mut out = format!(
            "gateway instance {}: datapath exits by reason\n",
            self.instance
        );
        let _ = writeln!(
            out,
            "kernel relayed (fast path): {} packets; dropped: {} packets",
            self.kernel_relayed.packets, self.dropped.packets
        );
        let _ = writeln!(
            out,
            "{:<30} {:<8} {:>14} {:>16}",
            "reason", "verdict", "packets", "bytes"
        );
        for (name, count) in &self.reasons {
            let _ = writeln!(
                out,
                "{name:<30} {:<8} {:>14} {:>16}",
                count.verdict, count.packets, count.bytes
            );
        }
        out
    }
}

/// `gateway bindings --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bindings {
    pub version: u32,
    pub enhanced_bindings: Vec<EnhancedBinding>,
    /// Every entry of the kernel's binding map (enhanced mode and UDP ASSOCIATE alike).
    pub kernel_entries: Vec<KernelEntry>,
    pub limits: Limits,
    /// The enhanced mode's userspace relay and relay ports (absent without the mode).
    #[serde(default)]
    pub relay: Option<RelayReport>,
    /// `gateway bindings --summary`: the lists are left out (empty), the counts are whole.
    #[serde(default)]
    pub summary: bool,
    /// Multicast groups with bindings (in the summary too: there are few).
    #[serde(default)]
    pub multicast_groups: Vec<MulticastGroup>,
}

/// One multicast group (address and port) with bindings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MulticastGroup {
    pub group: SocketAddr,
    /// The allowed sources (empty: any source).
    pub sources: Vec<IpAddr>,
    /// Datagrams of the group the kernel's gate admitted.
    pub received_kernel: u64,
    /// Datagrams of the group the userspace relay received.
    pub received_userspace: u64,
    /// Multicast-to-multicast re-sends inside, by the kernel and by user space.
    pub inside_sent_kernel: u64,
    pub inside_sent_userspace: u64,
    /// Datagrams user space dropped for a source not on the list (the gate drops the rest
    /// as `multicast_source_not_allowed`).
    pub dropped_source_userspace: u64,
    pub members: Vec<MulticastMember>,
}

/// One binding on a multicast group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MulticastMember {
    pub aid: u32,
    pub client: SocketAddr,
    /// `mu` or `mm` for a receiving binding.
    pub receive: Option<String>,
    /// The TTL of a sending binding.
    pub send_ttl: Option<u8>,
    /// The one source a source-specific receive takes (none: every admitted source).
    #[serde(default)]
    pub source: Option<IpAddr>,
    /// Whether the kernel delivers to it (else the userspace relay).
    pub in_kernel: bool,
    /// Datagrams delivered to it by the kernel and by user space.
    pub kernel_packets: u64,
    pub userspace_packets: u64,
}

/// What the enhanced mode's userspace relay serves and did, and the relay ports in use.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayReport {
    /// Bindings in the relay's table (each holds no socket).
    pub bindings_served: usize,
    /// Deadline checks the binding table has scheduled (none once every binding is gone).
    pub scheduled_checks: usize,
    pub internal_ports_in_use: usize,
    pub external_ports_in_use: usize,
    /// Datagrams the userspace relay sent on, both ways.
    pub datagrams_relayed: u64,
    /// Datagrams it dropped, by reason.
    pub dropped: BTreeMap<String, u64>,
}

/// One enhanced-mode binding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnhancedBinding {
    pub aid: u32,
    pub tid: u16,
    /// `half-bound` or `confirmed`.
    pub state: String,
    /// The authenticated user; `None` for an anonymous client.
    pub user: Option<String>,
    /// The control connection's peer.
    pub control_peer: Option<SocketAddr>,
    /// The client's LOCAL.
    pub client: SocketAddr,
    pub internal_relay: SocketAddr,
    pub external_relay: SocketAddr,
    pub rtp_pair: bool,
    /// What a confirmed binding admits (exact remote, host, or any for Listen).
    pub remote: Option<String>,
    pub flags: u16,
    /// The kernel flows relaying it, with their inbound counters.
    pub kernel_flows: Vec<KernelFlow>,
}

/// One kernel-relayed flow of an enhanced-mode binding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelFlow {
    pub remote: SocketAddr,
    pub external_relay: SocketAddr,
    pub client: SocketAddr,
    pub internal_relay: SocketAddr,
    pub inbound_packets: u64,
    pub inbound_bytes: u64,
}

/// One entry of the kernel's binding map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelEntry {
    pub remote: SocketAddr,
    pub external_relay: SocketAddr,
    /// `kernel` or `userspace`.
    pub relayed_by: String,
    /// The client the kernel relays to (kernel entries only).
    pub client: Option<SocketAddr>,
    pub aid: Option<u32>,
    pub packets: u64,
    pub bytes: u64,
    pub last_seen_ns: u64,
}

/// The caps and how often each was hit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub connections: usize,
    pub max_connections: usize,
    pub max_connections_per_client: usize,
    pub connections_refused_total_cap: u64,
    pub connections_refused_per_client_cap: u64,
    pub bindings_refused_connection_cap: u64,
    pub bindings_refused_user_cap: u64,
    pub bindings_refused_total_cap: u64,
    /// Refused because no relay port (`01`) or aligned pair (`16`) was free.
    #[serde(default)]
    pub bindings_refused_no_relay_port: u64,
}

impl Bindings {
    /// The multicast groups' lines of [`Bindings::to_table`].
    fn multicast_table(&self, out: &mut String) {
        for g in &self.multicast_groups {
            let sources = if g.sources.is_empty() {
                "any".to_owned()
            } else {
                g.sources
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            };
            let _ = writeln!(
                out,
                "multicast group {} sources {} members {}: received {} (kernel) {} (userspace), \
                 re-sent inside {} (kernel) {} (userspace), source drops {}",
                g.group,
                sources,
                g.members.len(),
                g.received_kernel,
                g.received_userspace,
                g.inside_sent_kernel,
                g.inside_sent_userspace,
                g.dropped_source_userspace,
            );
            for m in &g.members {
                let _ = writeln!(
                    out,
                    "  aid {:#010x} client {} receive {} source {} send-ttl {} by {} delivered {} \
                     (kernel) {} (userspace)",
                    m.aid,
                    m.client,
                    m.receive.clone().unwrap_or_else(|| "-".to_owned()),
                    m.source.map_or_else(|| "any".to_owned(), |s| s.to_string()),
                    m.send_ttl.map_or_else(|| "-".to_owned(), |t| t.to_string()),
                    if m.in_kernel { "kernel" } else { "userspace" },
                    m.kernel_packets,
                    m.userspace_packets,
                );
            }
        }
    }

    /// The table `gateway bindings` prints.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        if !self.summary {
            let _ = writeln!(
                out,
                "enhanced-mode bindings: {}",
                self.enhanced_bindings.len()
            );
        }
        let or_dash = |value: Option<String>| value.unwrap_or_else(|| "-".to_owned());
        for b in &self.enhanced_bindings {
            let _ = writeln!(
                out,
                "  aid {:#010x} tid {} {} user {} peer {} client {} relay {} / {} remote {}",
                b.aid,
                b.tid,
                b.state,
                or_dash(b.user.clone()),
                or_dash(b.control_peer.map(|p| p.to_string())),
                b.client,
                b.internal_relay,
                b.external_relay,
                or_dash(b.remote.clone()),
            );
        }
        if let Some(relay) = &self.relay {
            let _ = writeln!(
                out,
                "relay ports in use: {} internal, {} external; userspace relay: {} bindings, {} \
                 datagrams relayed, {} dropped",
                relay.internal_ports_in_use,
                relay.external_ports_in_use,
                relay.bindings_served,
                relay.datagrams_relayed,
                relay.dropped.values().sum::<u64>(),
            );
        }
        self.multicast_table(&mut out);
        if !self.summary {
            let _ = writeln!(out, "kernel entries: {}", self.kernel_entries.len());
        }
        for e in &self.kernel_entries {
            let _ = writeln!(
                out,
                "  {} -> {} by {} client {} packets {} bytes {}",
                e.remote,
                e.external_relay,
                e.relayed_by,
                or_dash(e.client.map(|c| c.to_string())),
                e.packets,
                e.bytes,
            );
        }
        let l = &self.limits;
        let _ = writeln!(
            out,
            "control connections: {} of {} ({} per client); refused: {} at the total cap, {} at \
             the per-client cap; bindings refused: {} connection cap, {} user cap, {} total cap, \
             {} no relay port",
            l.connections,
            l.max_connections,
            l.max_connections_per_client,
            l.connections_refused_total_cap,
            l.connections_refused_per_client_cap,
            l.bindings_refused_connection_cap,
            l.bindings_refused_user_cap,
            l.bindings_refused_total_cap,
            l.bindings_refused_no_relay_port,
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bindings() -> Bindings {
        let sa = |text: &str| text.parse::<SocketAddr>().unwrap();
        Bindings {
            version: SCHEMA_VERSION,
            enhanced_bindings: vec![EnhancedBinding {
                aid: 0xe592_07ab,
                tid: 1,
                state: "confirmed".into(),
                user: None,
                control_peer: Some(sa("198.51.100.2:37066")),
                client: sa("198.51.100.2:55370"),
                internal_relay: sa("198.51.100.1:24600"),
                external_relay: sa("203.0.113.1:16400"),
                rtp_pair: true,
                remote: Some("Exact(203.0.113.2:60324)".into()),
                flags: 0x0b,
                kernel_flows: vec![],
            }],
            kernel_entries: vec![KernelEntry {
                remote: sa("203.0.113.2:60324"),
                external_relay: sa("203.0.113.1:16400"),
                relayed_by: "kernel".into(),
                client: Some(sa("198.51.100.2:55370")),
                aid: Some(0xe592_07ab),
                packets: 75,
                bytes: 24_900,
                last_seen_ns: 1,
            }],
            limits: Limits {
                max_connections: 4096,
                ..Limits::default()
            },
            relay: Some(RelayReport {
                bindings_served: 1,
                scheduled_checks: 1,
                internal_ports_in_use: 2,
                external_ports_in_use: 2,
                datagrams_relayed: 5,
                dropped: BTreeMap::from([("unknown_port".to_owned(), 3)]),
            }),
            summary: false,
            multicast_groups: vec![MulticastGroup {
                group: sa("233.252.0.7:5004"),
                sources: vec!["203.0.113.2".parse().unwrap()],
                received_kernel: 40,
                received_userspace: 0,
                inside_sent_kernel: 0,
                inside_sent_userspace: 0,
                dropped_source_userspace: 0,
                members: vec![MulticastMember {
                    aid: 0x0102_0304,
                    client: sa("198.51.100.2:5000"),
                    receive: Some("mu".into()),
                    send_ttl: None,
                    source: Some("203.0.113.2".parse().unwrap()),
                    in_kernel: true,
                    kernel_packets: 40,
                    userspace_packets: 0,
                }],
            }],
        }
    }

    #[test]
    fn bindings_render_from_the_typed_document_and_read_back() {
        let document = bindings();
        let json = serde_json::to_string(&document).unwrap();
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        // The keys scripts read.
        assert!(value["kernel_entries"].is_array() && value["enhanced_bindings"].is_array());
        assert_eq!(value["relay"]["internal_ports_in_use"], 2);
        assert_eq!(value["relay"]["dropped"]["unknown_port"], 3);
        assert_eq!(value["version"], SCHEMA_VERSION);
        assert_eq!(parse::<Bindings>(&json).unwrap(), document);
        let table = document.to_table();
        assert!(table.contains("enhanced-mode bindings: 1"), "{table}");
        assert!(
            table.contains(
                "relay ports in use: 2 internal, 2 external; userspace relay: 1 bindings"
            ),
            "{table}"
        );
        assert!(
            table.contains("aid 0xe59207ab tid 1 confirmed user - peer 198.51.100.2:37066"),
            "{table}"
        );
        assert!(
            table.contains(
                "203.0.113.2:60324 -> 203.0.113.1:16400 by kernel client 198.51.100.2:55370 \
                 packets 75 bytes 24900"
            ),
            "{table}"
        );
        assert!(table.contains("control connections: 0 of 4096"), "{table}");
        assert_eq!(
            value["multicast_groups"][0]["members"][0]["in_kernel"],
            true
        );
        assert!(
            table.contains(
                "multicast group 233.252.0.7:5004 sources 203.0.113.2 members 1: received 40 \
                 (kernel) 0 (userspace)"
            ),
            "{table}"
        );
        assert!(
            table.contains(
                "aid 0x01020304 client 198.51.100.2:5000 receive mu source 203.0.113.2 send-ttl - \
                 by kernel \
                 delivered 40 (kernel) 0 (userspace)"
            ),
            "{table}"
        );
    }

    #[test]
    fn a_summary_prints_the_counts_and_no_list_lengths() {
        let document = Bindings {
            enhanced_bindings: Vec::new(),
            kernel_entries: Vec::new(),
            summary: true,
            ..bindings()
        };
        let table = document.to_table();
        assert!(!table.contains("enhanced-mode bindings:"), "{table}");
        assert!(!table.contains("kernel entries:"), "{table}");
        assert!(table.contains("userspace relay: 1 bindings"), "{table}");
        let json = serde_json::to_string(&document).unwrap();
        assert_eq!(parse::<Bindings>(&json).unwrap(), document);
    }

    #[test]
    fn stats_keep_the_keys_scripts_read() {
        let mut reasons = BTreeMap::new();
        reasons.insert(
            "kernel_relayed_inbound".to_owned(),
            ReasonCount {
                verdict: "redirect".into(),
                packets: 156,
                bytes: 56_648,
            },
        );
        let stats = Stats {
            version: SCHEMA_VERSION,
            instance: "gw".into(),
            reasons,
            dropped: Traffic::default(),
            kernel_relayed: Traffic {
                packets: 156,
                bytes: 56_648,
            },
        };
        let value = serde_json::to_value(&stats).unwrap();
        assert_eq!(value["kernel_relayed"]["packets"], 156);
        assert_eq!(value["kernel_relayed"]["bytes"], 56_648);
        let table = stats.to_table();
        assert!(
            table.contains("kernel relayed (fast path): 156 packets"),
            "{table}"
        );
        assert!(table.contains("kernel_relayed_inbound"), "{table}");
    }

    #[test]
    fn another_version_or_no_version_is_refused_clearly() {
        let mut value = serde_json::to_value(bindings()).unwrap();
        value["version"] = serde_json::json!(SCHEMA_VERSION + 1);
        let error = parse::<Bindings>(&value.to_string())
            .unwrap_err()
            .to_string();
        assert!(
            error.contains(&format!("version {}", SCHEMA_VERSION + 1))
                && error.contains("same release"),
            "{error}"
        );
        value.as_object_mut().unwrap().remove("version");
        assert!(parse::<Bindings>(&value.to_string()).is_err());
        assert!(parse::<Stats>("not json").is_err());
    }
}
