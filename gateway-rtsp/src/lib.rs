//! RTSP through the gateway (protocol.md sections 4 and 5): `gateway rtsp-get`, an RTSP 1.0
//! client (RFC 2326) whose control connection is a SOCKS CONNECT and whose media arrives through
//! two-step RTP-pair bindings, and a demo media server for tests and `cargo xtask demo`.
//!
//! - [`client`]: [`client::play`] runs a whole session (DESCRIBE, step 1, SETUP, step 2, PLAY,
//!   receive with RTCP receiver reports, TEARDOWN, release) and returns a [`client::PlayReport`].
//! - [`cli`]: the `gateway rtsp-get` subcommand ([`cli::RtspGetArgs`], [`cli::rtsp_get`]).
//! - [`server`]: [`server::DemoServer`], the demo media server (OPTIONS, DESCRIBE, SETUP, PLAY,
//!   TEARDOWN; RTP L16 or PCMU with RTCP sender reports at real-time pace).
//! - Pure parts, unit-tested against malformed and hostile input: [`message`] (framing),
//!   [`transport`] (the Transport header), [`sdp`], [`rtp`] (RTP/RTCP), [`rtp_stats`] (loss,
//!   reordering, jitter), [`audio`] (L16, PCMU, WAV, reassembly).
//!
//! This module uses the gateway only through [`gateway_client`], over the network, like any
//! socksified application; it must not reach into the server or the binding state machine.

pub mod audio;
pub mod cli;
pub mod client;
mod error;
pub mod message;
pub mod rtp;
pub mod rtp_stats;
pub mod sdp;
pub mod server;
pub mod transport;

pub use error::{ParseError, RtspError};

/// A random 32-bit value (SSRCs, session ids): `SipHash` with fresh per-process random keys over
/// the clock, as the binding module makes AIDs. Not for secrets.
pub(crate) fn random_u32() -> u32 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    hasher.write_u128(now.as_nanos());
    u32::try_from(hasher.finish() >> 32).unwrap_or(0)
}
