//! A test build of `gateway` that writes and reads other handover state versions, for the
//! upgrade tests (tests/tests/upgrade.rs): the same daemon, with its state format taken from
//! its own file name, `gateway-state-wW-rA-B` (writes W, reads A..=B), and with a `-stall`
//! suffix it stops forever once the state arrives (to be killed in the middle of a handover).
//! The name, not the environment, because the old daemon starts the new one with its own
//! environment. Never installed.

#[path = "../src/main.rs"]
#[allow(
    dead_code,
    reason = "the real binary's entry point is not this build's"
)]
mod gateway_main;

use std::process::ExitCode;

use gateway::handover::Format;

/// The format and the stall flag a file name asks for; `None` for any other name.
fn variant(name: &str) -> Option<(Format, bool)> {
    let rest = name.strip_prefix("gateway-state-w")?;
    let (rest, stall) = match rest.strip_suffix("-stall") {
        Some(rest) => (rest, true),
        None => (rest, false),
    };
    let (writes, reads) = rest.split_once("-r")?;
    let (first, last) = reads.split_once('-')?;
    let format = Format {
        writes: writes.parse().ok()?,
        reads: first.parse().ok()?..=last.parse().ok()?,
    };
    Some((format, stall))
}

fn main() -> ExitCode {
    let name = std::env::current_exe()
        .ok()
        .and_then(|path| path.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let (format, stall_after_state) = variant(&name).unwrap_or((Format::CURRENT, false));
    gateway_main::main_with(gateway_main::daemon::upgrade::Options {
        format,
        stall_after_state,
    })
}
