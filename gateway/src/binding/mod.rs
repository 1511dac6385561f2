//! The two-step binding state machine (sans-IO) of the enhanced UDP mode, and the relay port
//! allocator it reserves ports from (protocol.md section 4).
//!
//! Owns every UDP binding of the gateway: which control connection made it, its TID and AID, its
//! relay ports, whether it is half-bound or confirmed, tombstones of expired ones, caps and
//! expiry. The caller (the enhanced-mode connection task and the relay) feeds it requests,
//! releases, connection closes, traffic and timeouts, each with `now`, and applies the
//! [`Decision`]s it returns: relay ports to serve or stop serving, kernel entries to install or
//! remove, replies to send.
//!
//! It must not do I/O, read a clock, spawn tasks or depend on the SOCKS codec; it knows nothing
//! of sockets or eBPF maps beyond the data it hands back. Domain names are resolved by the caller.
//!
//! Files: `types` (requests, codes, decisions), `config` (policy, caps, addresses), `ports`
//! (relay port pools), `aid` (association id sources), `record` (one binding's data), `rules`
//! (the first-match rules for one UDP BIND), `multicast` (multicast binds and SET TTL),
//! `machine` ([`Bindings`]: inputs, expiry, teardown), `census` (counts by state and kind, free
//! ports, for metrics).

mod aid;
mod census;
mod config;
mod machine;
mod multicast;
mod ports;
mod record;
mod rules;
mod snapshot;
mod types;

#[cfg(test)]
mod tests;

pub use aid::{AidSource, HashAids};
pub use census::{Census, FreePorts};
pub use config::{
    Config, ConfigError, IDLE_TIMEOUT_MAX, IpNet, MulticastModes, MulticastPolicy,
    PENDING_TIMEOUT_MAX, PENDING_TIMEOUT_MIN, default_forbidden_remotes,
};
pub use machine::Bindings;
pub use ports::{PortPool, PortRange};
pub use snapshot::{
    BindingSnapshot, RemoteSnapshot, RestoreError, StateSnapshot, TableSnapshot, TombstoneSnapshot,
};
pub use types::{
    Action, BindError, BindRequest, BindingInfo, BindingState, ConnId, Decision, Expired,
    ExpiryReason, Family, KernelEntry, Membership, MulticastMode, RelayPorts, Remote, RemoteMatch,
    Reply, ReplyCode, flags,
};
