//! The gateway daemon's library: a SOCKS5 server whose firewall and media fast path live in
//! eBPF. The `gateway` binary (`main.rs`, `daemon/`) wires these together; the wire codecs are
//! in the `gateway-proto` crate, the client library in `gateway-client`.
//!
//! Below everything else (no module here imports upward):
//! - [`attach_mode`] and [`host_flow`]: what the loader, the settings and the resolver share.
//! - [`binding`]: the sans-IO binding state machine of the enhanced mode.
//! - [`netif`]: interface addresses and their changes (netlink).
//! - [`neighbour`]: MAC addresses of an interface and of its neighbours (the kernel fan-out's).
//! - [`instance`]: names a running gateway and guards it with a lock file.
//! - [`counters`]: atomic counts of control-plane decisions, for `--metrics`.
//!
//! Above them:
//! - [`gate`]: the kernel gate handle (binding entries, the resolver's per-query host flows).
//! - [`datapath`]: loads, attaches, pins and detaches the eBPF programs and their maps.
//! - [`exit_counters`]: reads the pinned exit counters of a running gateway.
//! - [`reserved_ports`]: keeps the relay port ranges out of the kernel's ephemeral ports.
//! - [`resolver`]: the RFC 5452 resolver for domain names in requests.
//! - [`server`]: the SOCKS5 server, the enhanced mode, both relays, policy and caps.
//! - [`settings`]: every setting of `gateway run`, declared once.
//! - [`cli`]: the `gateway` command line's definition (for the binary and the man pages).
//! - [`report`] and [`admin_socket`]: the typed documents of `gateway stats` and
//!   `gateway bindings`, and the daemon's local socket that serves the latter.
//! - [`metrics`]: the `--metrics` endpoint (Prometheus text and `OpenMetrics` over a small HTTP
//!   listener), built from the counts above.

pub mod admin_socket;
pub mod attach_mode;
pub mod binding;
pub mod cli;
pub mod counters;
pub mod datapath;
pub mod exit_counters;
pub mod gate;
pub mod handover;
pub mod host_flow;
pub mod instance;
pub mod metrics;
pub mod monitor;
pub mod neighbour;
pub mod netif;
pub mod report;
pub mod reserved_ports;
pub mod resolver;
pub mod server;
pub mod settings;
pub mod udp_packet;
