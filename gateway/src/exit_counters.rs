//! Reads the pinned exit counters of a gateway instance and renders them for people and JSON.
//! Read-only: it never changes a map.

use std::path::Path;

use aya::maps::{Map, MapData, MapError, PerCpuArray};
use gateway_common::{Counter, ExitReason, Verdict, map_names};
use serde_json::{Value, json};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum StatsError {
    #[error("open the pinned counters {path}: {source}")]
    Open { path: String, source: MapError },
    #[error("read the counters: {0}")]
    Read(#[from] MapError),
}

/// Totals over all CPUs for one exit reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReasonTotal {
    pub reason: ExitReason,
    pub packets: u64,
    pub bytes: u64,
}

/// Sums the per-CPU `{packets, bytes}` of every reason from the map pinned in `pin_dir`.
pub fn read_exit_counters(pin_dir: &Path) -> Result<Vec<ReasonTotal>, StatsError> {
    let path = pin_dir.join(map_names::EXIT_COUNTERS);
    let open_error = |source| StatsError::Open {
        path: path.display().to_string(),
        source,
    };
    let map =
        Map::from_map_data(MapData::from_pin(&path).map_err(open_error)?).map_err(open_error)?;
    let counters: PerCpuArray<MapData, Counter> = PerCpuArray::try_from(map).map_err(open_error)?;
    let mut totals = Vec::with_capacity(ExitReason::ALL.len());
    for reason in ExitReason::ALL {
        let per_cpu = counters.get(&(reason as u32), 0)?;
        let (packets, bytes) = per_cpu
            .iter()
            .fold((0u64, 0u64), |(p, b), c| (p + c.packets, b + c.bytes));
        totals.push(ReasonTotal {
            reason,
            packets,
            bytes,
        });
    }
    Ok(totals)
}

/// `{"instance": .., "reasons": {name: {verdict, packets, bytes}}, "dropped": {packets, bytes}}`.
pub fn to_json(instance: &str, totals: &[ReasonTotal]) -> Value {
    let mut reasons = serde_json::Map::new();
    let (mut dropped_packets, mut dropped_bytes) = (0u64, 0u64);
    for total in totals {
        if total.reason.verdict() == Verdict::Drop {
            dropped_packets += total.packets;
            dropped_bytes += total.bytes;
        }
        reasons.insert(
            total.reason.name().to_owned(),
            json!({
                "verdict": total.reason.verdict().name(),
                "packets": total.packets,
                "bytes": total.bytes,
            }),
        );
    }
    let (mut fast_packets, mut fast_bytes) = (0u64, 0u64);
    for total in totals {
        if total.reason.verdict() == Verdict::Redirect {
            fast_packets += total.packets;
            fast_bytes += total.bytes;
        }
    }
    json!({
        "instance": instance,
        "reasons": reasons,
        "dropped": { "packets": dropped_packets, "bytes": dropped_bytes },
        "kernel_relayed": { "packets": fast_packets, "bytes": fast_bytes },
    })
}

/// A fixed-width table, one line per reason.
pub fn to_table(instance: &str, totals: &[ReasonTotal]) -> String {
    use std::fmt::Write as _;
    let mut out = format!("gateway instance {instance}: datapath exits by reason\n");
    let relayed: u64 = totals
        .iter()
        .filter(|t| t.reason.verdict() == Verdict::Redirect)
        .map(|t| t.packets)
        .sum();
    let dropped: u64 = totals
        .iter()
        .filter(|t| t.reason.verdict() == Verdict::Drop)
        .map(|t| t.packets)
        .sum();
    let _ = writeln!(
        out,
        "kernel relayed (fast path): {relayed} packets; dropped: {dropped} packets"
    );
    let _ = writeln!(
        out,
        "{:<30} {:<8} {:>14} {:>16}",
        "reason", "verdict", "packets", "bytes"
    );
    for total in totals {
        let _ = writeln!(
            out,
            "{:<30} {:<8} {:>14} {:>16}",
            total.reason.name(),
            total.reason.verdict().name(),
            total.packets,
            total.bytes
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<ReasonTotal> {
        ExitReason::ALL
            .iter()
            .map(|&reason| ReasonTotal {
                reason,
                packets: u64::from(reason as u32) + 1,
                bytes: 100,
            })
            .collect()
    }

    #[test]
    fn json_names_every_reason_and_sums_drops() {
        let json = to_json("t", &sample());
        assert_eq!(json["instance"], "t");
        assert_eq!(json["reasons"]["no_binding"]["packets"], 2);
        assert_eq!(json["reasons"]["no_binding"]["verdict"], "drop");
        assert_eq!(json["reasons"]["not_udp_passed"]["verdict"], "pass");
        let expected: u64 = ExitReason::ALL
            .iter()
            .filter(|r| r.verdict() == Verdict::Drop)
            .map(|&r| u64::from(r as u32) + 1)
            .sum();
        assert_eq!(json["dropped"]["packets"], expected);
        assert_eq!(
            json["reasons"].as_object().unwrap().len(),
            ExitReason::ALL.len()
        );
    }

    #[test]
    fn table_has_a_line_per_reason() {
        let table = to_table("t", &sample());
        assert_eq!(table.lines().count(), ExitReason::ALL.len() + 3);
        assert!(table.contains("ipv4_options"));
    }
}
