//! The harness of the in-process tests (`socks_server.rs`, `client_library.rs`, `enhanced_mode.rs`,
//! `rtsp_loopback.rs`): a gateway on loopback (`server::run` with a `MemoryGate`, optionally a
//! users file, a nameserver and the enhanced mode on the binary's own relay ports), peers (TCP and
//! UDP echoes, a fake nameserver), raw SOCKS5 and enhanced-mode bytes written independently of the
//! crate's codec, and bounded reads. Every wait is bounded.

// Each test binary compiles this module and uses only part of it, so without this every binary
// would warn about the helpers that only the others use.
#![allow(dead_code)]

pub mod enhanced;
pub mod gateway;
pub mod io;
pub mod peers;
pub mod socks;
