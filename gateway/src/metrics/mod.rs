//! `gateway run --metrics ADDR:PORT`: the daemon's counts for Prometheus. Owns the endpoint:
//! which addresses it may listen on ([`check_address`]), the HTTP it speaks (`http`, pure), the
//! snapshot of every count (`collect`, which reads the pinned exit counters, the shared
//! counters, the binding table and /proc) and its rendering in the Prometheus text format
//! 0.0.4 or `OpenMetrics` (`render`, pure). It changes nothing it reads.

mod collect;
mod http;
mod listen;
mod process;
mod render;

pub use collect::snapshot;
pub use http::{MAX_REQUEST_BYTES, Route, route};
pub use listen::{AddressError, MAX_SCRAPES_AT_ONCE, READ_TIMEOUT, check_address, serve};
pub use process::ProcessStats;
pub use render::{Format, Snapshot, encode};
