//! Configuration of the binding state machine: timeouts, policy switches, caps, relay addresses,
//! port ranges and the forbidden remote networks, with validation.
//!
//! Owns the values and their checks. It must not read files or flags (the daemon's config layer
//! maps its TOML/clap values into a [`Config`]) and must not touch sockets.

use std::net::IpAddr;
use std::time::Duration;

use super::ports::PortRange;
use super::types::Family;

/// Smallest allowed `pending_timeout`.
pub const PENDING_TIMEOUT_MIN: Duration = Duration::from_secs(5);
/// Largest allowed `pending_timeout`.
pub const PENDING_TIMEOUT_MAX: Duration = Duration::from_mins(5);
/// Largest allowed `idle_timeout` (one day).
pub const IDLE_TIMEOUT_MAX: Duration = Duration::from_hours(24);

pub use ipnet::IpNet;

/// The networks a REMOTE may not name by default: unspecified, loopback, multicast and broadcast,
/// both families. The gateway's relay addresses are always forbidden besides.
pub fn default_forbidden_remotes() -> Vec<IpNet> {
    [
        "0.0.0.0/8",
        "127.0.0.0/8",
        "224.0.0.0/4",
        "255.255.255.255/32",
        "::/128",
        "::1/128",
        "ff00::/8",
    ]
    .iter()
    .filter_map(|net| net.parse().ok())
    .collect()
}

/// Which multicast-receive modes the policy allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MulticastModes {
    /// Multicast-to-unicast (per-client delivery with the header).
    pub to_unicast: bool,
    /// Multicast-to-multicast (re-sent inside to the group).
    pub to_multicast: bool,
}

/// What multicast binds may do (protocol.md section 3). Nothing by default: no group may be
/// received or sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MulticastPolicy {
    /// Groups that may be received (none: every receive bind gets `11`).
    pub receive: Vec<IpNet>,
    /// Groups that may be sent to (none: every send bind gets `12`).
    pub send: Vec<IpNet>,
    /// Highest TTL a send binding may ask for (`15` above it).
    pub max_ttl: u8,
    /// The receive modes allowed.
    pub modes: MulticastModes,
    /// The mode of a receive bind that asks for none (or both).
    pub default_mode: super::types::MulticastMode,
    /// The allowed sources of groups that have a list (group address, sources): a group
    /// without one accepts any source.
    pub sources: Vec<(IpAddr, Vec<IpAddr>)>,
}

impl Default for MulticastPolicy {
    fn default() -> Self {
        Self {
            receive: Vec::new(),
            send: Vec::new(),
            max_ttl: 8,
            modes: MulticastModes {
                to_unicast: true,
                to_multicast: false,
            },
            default_mode: super::types::MulticastMode::ToUnicast,
            sources: Vec::new(),
        }
    }
}

impl MulticastPolicy {
    /// Whether `mode` is allowed.
    pub fn allows(&self, mode: super::types::MulticastMode) -> bool {
        match mode {
            super::types::MulticastMode::ToUnicast => self.modes.to_unicast,
            super::types::MulticastMode::ToMulticast => self.modes.to_multicast,
        }
    }

    /// The allowed sources of `group` (empty: any).
    pub fn sources_of(&self, group: IpAddr) -> Vec<IpAddr> {
        self.sources
            .iter()
            .filter(|(g, _)| *g == group)
            .flat_map(|(_, sources)| sources.iter().copied())
            .collect()
    }
}

/// Everything the binding state machine needs to know about policy and resources.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// How long a half-bound binding waits for its step 2 (default 30 s, allowed 5..=300 s).
    pub pending_timeout: Duration,
    /// How long a confirmed binding lives without a datagram (default 300 s, 1 s..=1 day).
    pub idle_timeout: Duration,
    /// Whether a step 2 may confirm a UDP Listen binding (default false: `02`).
    pub allow_listen: bool,
    /// Whether a specific REMOTE may have port 0, a host-level match (default false: `02`).
    pub allow_port_zero_remote: bool,
    /// Cap on half-bound bindings per control connection.
    pub max_half_bound_per_connection: usize,
    /// Cap on half-bound bindings per authenticated user (anonymous connections are not counted
    /// per user; the per-connection and total caps still apply).
    pub max_half_bound_per_user: usize,
    /// Cap on live bindings (half-bound and confirmed, one-step Opens included) per control
    /// connection.
    pub max_bindings_per_connection: usize,
    /// Cap on live bindings per user across all their connections; an anonymous client counts
    /// by its address.
    pub max_bindings_per_user: usize,
    /// Cap on live bindings (half-bound and confirmed) on the gateway.
    pub max_bindings: usize,
    /// Cap on tombstones kept per connection; past it the oldest is forgotten (its TID is free
    /// again and a request naming its AID gets `10` instead of `17`).
    pub max_tombstones_per_connection: usize,
    /// Internal (client-side) relay ports.
    pub internal_ports: PortRange,
    /// External (remote-side) relay ports, for each external address.
    pub external_ports: PortRange,
    /// Internal relay addresses (client side). Usually one per family; several give room for
    /// more bindings than one port range holds.
    pub internal_ips: Vec<IpAddr>,
    /// External relay addresses (remote side). A client is given the same one for every binding
    /// (see [`Config::external_ip_for`]), the one its CONNECTs should leave from.
    pub external_ips: Vec<IpAddr>,
    /// When a client's external address has no port left, take one on another external address
    /// instead of refusing (default false: keeps one external address per client, as RTSP
    /// servers may require).
    pub spill_to_other_external_ips: bool,
    /// Networks a REMOTE may not name (`02`). Starts as [`default_forbidden_remotes`]; add the
    /// internal networks and the gateway's other addresses. The relay addresses above are
    /// always forbidden.
    pub forbidden_remotes: Vec<IpNet>,
    /// What multicast binds may do.
    pub multicast: MulticastPolicy,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            pending_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_mins(5),
            allow_listen: false,
            allow_port_zero_remote: false,
            max_half_bound_per_connection: 64,
            max_half_bound_per_user: 256,
            max_bindings_per_connection: 1024,
            max_bindings_per_user: 8192,
            max_bindings: 200_000,
            max_tombstones_per_connection: 1024,
            // Below Linux's default ephemeral ports (32768-60999): no socket of the host's
            // takes a relay port, whatever the reservation.
            internal_ports: PortRange::new(24_576, 32_767),
            external_ports: PortRange::new(16_384, 24_575),
            internal_ips: Vec::new(),
            external_ips: Vec::new(),
            spill_to_other_external_ips: false,
            forbidden_remotes: default_forbidden_remotes(),
            multicast: MulticastPolicy::default(),
        }
    }
}

/// A configuration value that cannot work; each names the key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `pending_timeout` outside 5..=300 s.
    #[error("pending_timeout: {0:?} is outside 5..=300 s")]
    PendingTimeout(Duration),
    /// `idle_timeout` outside 1 s..=1 day.
    #[error("idle_timeout: {0:?} is outside 1 s..=86400 s")]
    IdleTimeout(Duration),
    /// A port range is empty or contains port 0.
    #[error("{key}: {first}..={last} must be non-empty and must not contain port 0")]
    PortRange {
        /// `internal_ports` or `external_ports`.
        key: &'static str,
        /// First port.
        first: u16,
        /// Last port.
        last: u16,
    },
    /// No relay address given.
    #[error("{0}: at least one address is needed")]
    NoAddress(&'static str),
    /// An unspecified, multicast or IPv4-mapped relay address, or one listed twice.
    #[error(
        "{key}: {ip} cannot be a relay address (unspecified, multicast, IPv4-mapped or duplicate)"
    )]
    BadAddress {
        /// `internal_ips` or `external_ips`.
        key: &'static str,
        /// The address.
        ip: IpAddr,
    },
    /// The same address is internal and external while the port ranges overlap.
    #[error(
        "internal_ips/external_ips: {0} is in both lists while internal_ports and external_ports overlap"
    )]
    SharedAddressOverlap(IpAddr),
}

impl Config {
    /// Checks every value; [`Bindings::new`](super::Bindings::new) calls it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.pending_timeout < PENDING_TIMEOUT_MIN || self.pending_timeout > PENDING_TIMEOUT_MAX
        {
            return Err(ConfigError::PendingTimeout(self.pending_timeout));
        }
        if self.idle_timeout < Duration::from_secs(1) || self.idle_timeout > IDLE_TIMEOUT_MAX {
            return Err(ConfigError::IdleTimeout(self.idle_timeout));
        }
        for (key, range) in [
            ("internal_ports", self.internal_ports),
            ("external_ports", self.external_ports),
        ] {
            if range.first == 0 || range.first > range.last {
                return Err(ConfigError::PortRange {
                    key,
                    first: range.first,
                    last: range.last,
                });
            }
        }
        for (key, ips) in [
            ("internal_ips", &self.internal_ips),
            ("external_ips", &self.external_ips),
        ] {
            if ips.is_empty() {
                return Err(ConfigError::NoAddress(key));
            }
            for (i, ip) in ips.iter().enumerate() {
                let mapped = ip.to_canonical() != *ip;
                if ip.is_unspecified() || ip.is_multicast() || mapped || ips[..i].contains(ip) {
                    return Err(ConfigError::BadAddress { key, ip: *ip });
                }
            }
        }
        let overlap = self.internal_ports.first <= self.external_ports.last
            && self.external_ports.first <= self.internal_ports.last;
        if overlap
            && let Some(ip) = self
                .internal_ips
                .iter()
                .find(|ip| self.external_ips.contains(ip))
        {
            return Err(ConfigError::SharedAddressOverlap(*ip));
        }
        Ok(())
    }

    /// The external relay address of `family` that a client at `peer_ip` gets: a fixed choice per
    /// client address, so the daemon can make the same client's CONNECTs leave from it too.
    pub fn external_ip_for(&self, peer_ip: IpAddr, family: Family) -> Option<IpAddr> {
        let candidates = self
            .external_ips
            .iter()
            .filter(|ip| Family::of(**ip) == family);
        let count = candidates.clone().count();
        if count == 0 {
            return None;
        }
        let index = usize::try_from(spread(peer_ip.to_canonical()) % count as u64).unwrap_or(0);
        candidates.clone().nth(index).copied()
    }

    /// Whether a REMOTE may name `ip`: not a forbidden network, not a relay address, not
    /// unspecified.
    pub fn remote_allowed(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        !(ip.is_unspecified()
            || self.internal_ips.contains(&ip)
            || self.external_ips.contains(&ip)
            || self.forbidden_remotes.iter().any(|net| net.contains(&ip)))
    }
}

/// FNV-1a over the address octets, finished with the `SplitMix64` mixer: a stable, cheap spread
/// of clients over external addresses (FNV-1a alone spreads similar addresses poorly modulo
/// small counts).
fn spread(ip: IpAddr) -> u64 {
    let octets: Vec<u8> = match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    let mut hash = octets.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    });
    hash = (hash ^ (hash >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash = (hash ^ (hash >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}
