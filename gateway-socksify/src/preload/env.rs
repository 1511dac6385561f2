//! The environment `gateway socksify` hands the preload library: one definition of each name,
//! shared by the command and the library.

/// The gateway's SOCKS address, `IP:PORT`. Without it the library does nothing.
pub const PROXY: &str = "GATEWAY_SOCKSIFY_PROXY";
/// User name for RFC 1929 authentication.
pub const USER: &str = "GATEWAY_SOCKSIFY_USER";
/// The password itself (set by the user, never by the command line).
pub const PASSWORD: &str = "GATEWAY_SOCKSIFY_PASSWORD";
/// A file whose first line is the password.
pub const PASSWORD_FILE: &str = "GATEWAY_SOCKSIFY_PASSWORD_FILE";
/// More networks reached directly, comma-separated CIDRs (the host's own links always are).
pub const DIRECT: &str = "GATEWAY_SOCKSIFY_DIRECT";
/// `error`, `warn` (default), `info` or `debug`.
pub const LOG_LEVEL: &str = "GATEWAY_SOCKSIFY_LOG";
/// Diagnostics go to this file (appended) instead of stderr.
pub const LOG_FILE: &str = "GATEWAY_SOCKSIFY_LOG_FILE";
