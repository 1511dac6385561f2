//! SOCKS5 (RFC 1928), username/password authentication (RFC 1929) and the enhanced UDP mode
//! (docs/protocol.md): sans-IO codecs, shared by the gateway's server and its client library.
//!
//! This crate owns the wire formats, nothing else: every message as a typed value, a decoder
//! from `&mut impl bytes::Buf` that returns `Ok(None)` ("need more bytes", nothing consumed) until
//! a whole message is there, an encoder into `&mut impl bytes::BufMut`, and [`ProtocolError`] for
//! malformed input with the SOCKS reply it calls for. Datagram headers are decoded from complete
//! datagrams, so a short one is an error rather than `Ok(None)`.
//!
//! It must not do I/O, read a clock, spawn tasks, log, or decide policy: no tokio here, no
//! sockets, no `Instant`. Whether a method is acceptable, a user valid, an address allowed or a
//! binding known is decided by the server and the binding state machine; this module only says
//! what the bytes mean.
//!
//! Decoders look at the buffer through `Buf::chunk` (and `Buf::chunks_vectored` when the bytes
//! are not contiguous, as in a `Chain`), so any buffer type from `bytes`, `&[u8]` and
//! `VecDeque<u8>` work.

mod addr;
mod auth;
mod codec;
pub mod enhanced;
mod error;
mod udp;
mod wire;

#[cfg(test)]
mod strategies;

pub use self::addr::{Address, AddressType, Family};
pub use self::auth::{AUTH_VERSION, AuthReply, AuthRequest};
pub use self::codec::{
    Command, Greeting, Method, MethodSelection, Reply, ReplyCode, Request, SOCKS_VERSION,
};
pub use self::error::ProtocolError;
pub use self::udp::UdpHeader;
