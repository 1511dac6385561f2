//! The `LD_PRELOAD` shim's logic (`gateway socksify`), free of sockets: the socket-call state
//! machine ([`Shim`]) and the scanner of the RTSP bytes a player reads ([`scan`]). The preload
//! library in `gateway-socksify` is a thin layer of C functions over it.

mod machine;
pub mod scan;

pub use machine::{Control, Direct, Fd, Reserved, SendPlan, Shim};
