//! Reads the pinned exit counters of a gateway instance and renders them for people and JSON.
//! Read-only: it never changes a map.

use std::path::Path;

use aya::maps::{Map, MapData, MapError, PerCpuArray};
use gateway_common::{Counter, ExitReason, Verdict, map_names};
use thiserror::Error;

use crate::report::{ReasonCount, SCHEMA_VERSION, Stats, Traffic};

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

/// The `gateway stats` document of `totals`.
pub fn report(instance: &str, totals: &[ReasonTotal]) -> Stats {
    let sum = |verdict: Verdict| {
        totals
            .iter()
            .filter(|t| t.reason.verdict() == verdict)
            .fold(Traffic::default(), |sum, t| Traffic {
                packets: sum.packets + t.packets,
                bytes: sum.bytes + t.bytes,
            })
    };
    Stats {
        version: SCHEMA_VERSION,
        instance: instance.to_owned(),
        reasons: totals
            .iter()
            .map(|t| {
                let count = ReasonCount {
                    verdict: t.reason.verdict().name().to_owned(),
                    packets: t.packets,
                    bytes: t.bytes,
                };
                (t.reason.name().to_owned(), count)
            })
            .collect(),
        dropped: sum(Verdict::Drop),
        kernel_relayed: sum(Verdict::Redirect),
    }
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
    fn the_report_names_every_reason_and_sums_drops_and_redirects() {
        let report = report("t", &sample());
        assert_eq!(report.instance, "t");
        assert_eq!(report.reasons["no_binding"].packets, 2);
        assert_eq!(report.reasons["no_binding"].verdict, "drop");
        assert_eq!(report.reasons["not_udp_passed"].verdict, "pass");
        let expected = |verdict: Verdict| -> u64 {
            ExitReason::ALL
                .iter()
                .filter(|r| r.verdict() == verdict)
                .map(|&r| u64::from(r as u32) + 1)
                .sum()
        };
        assert_eq!(report.dropped.packets, expected(Verdict::Drop));
        assert_eq!(report.kernel_relayed.packets, expected(Verdict::Redirect));
        assert_eq!(report.reasons.len(), ExitReason::ALL.len());
        let table = report.to_table();
        assert_eq!(table.lines().count(), 3 + ExitReason::ALL.len(), "{table}");
    }
}
