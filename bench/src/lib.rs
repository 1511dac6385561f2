//! The benchmark of issue 8: the traffic tools (`blast`, used by the `udp-blast` binary), the
//! kernel's accounting (`procfs`), statistics (`stats`), and the report (`report`, `plot`).
//! The orchestration that brings up namespaces and arms lives in the `bench` binary.

pub mod blast;
pub mod model;
pub mod plot;
pub mod procfs;
pub mod report;
pub mod stats;
