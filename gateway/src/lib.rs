//! The gateway: a SOCKS5 daemon whose firewall and media fast path live in eBPF.
//!
//! - [`datapath`] loads, attaches, pins and detaches the eBPF programs and their maps.
//! - [`instance`] names a running gateway and guards it with a lock file.
//! - [`stats`] reads the pinned exit counters of a running gateway.
//! - [`reserved_ports`] keeps the relay port ranges out of the kernel's ephemeral ports.
//! - [`socks`] and [`binding`] are the sans-IO protocol core.

pub mod attach_mode;
pub mod binding;

pub mod admin_socket;
pub mod datapath;
pub mod exit_counters;
pub mod gate;
pub mod host_flow;
pub mod instance;
pub mod netif;
pub mod report;
pub mod reserved_ports;
pub mod resolver;
pub mod server;
pub mod settings;
