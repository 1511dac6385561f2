//! Helpers the integration test files share that need the gateway crate (the testbed library
//! must build without it).

use gateway_common::ExitReason;
use testbed::gateway::InstanceCleanup;

/// Packets counted for `reason` in the instance's pinned counters (0 when nothing is pinned).
/// Needs no running daemon: the gate counts after a stop or a kill too.
pub fn pinned_packets(cleanup: &InstanceCleanup, reason: ExitReason) -> u64 {
    gateway::exit_counters::read_exit_counters(&cleanup.pin_dir()).map_or(0, |totals| {
        totals
            .iter()
            .find(|total| total.reason == reason)
            .map_or(0, |total| total.packets)
    })
}
