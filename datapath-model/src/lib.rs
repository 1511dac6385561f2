//! The datapath's specification as plain Rust, and the differential test of the eBPF programs
//! against it.
//!
//! - [`spec`]: what each program must do with any frame, given the maps (the model).
//! - [`world`]: the map contents both are run against.
//! - [`frames`]: hostile frames from any bytes (a fuzzer's input or a seeded generator).
//! - `kernel` (feature `kernel`, root only): the programs run by `BPF_PROG_TEST_RUN` and
//!   compared with the model, verdict, counted reasons and rewritten bytes.
//!
//! The model is written from the documented rules, not from the programs: where the two
//! disagree, the programs are wrong until the documents say otherwise.

pub mod checksum;
pub mod frames;
#[cfg(feature = "kernel")]
pub mod kernel;
pub mod spec;
pub mod world;
