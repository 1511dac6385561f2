//! The `process_*` metrics of this process, from /proc (prometheus-client has no process
//! collector): parsers of the /proc texts (pure) and one read of them.

use std::path::Path;

/// What Prometheus's standard process metrics say.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessStats {
    /// User and system CPU time.
    pub cpu_seconds: f64,
    pub resident_memory_bytes: u64,
    pub open_fds: u64,
    /// Since the Unix epoch.
    pub start_time_seconds: f64,
}

/// utime, stime and starttime (clock ticks) from /proc/PID/stat. The command name may hold
/// spaces and parentheses, so fields are counted after its last `)`.
fn parse_stat(stat: &str) -> Option<(u64, u64, u64)> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    // After the name, field 3 (state) is the first: utime is field 14, stime 15, starttime 22.
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse().ok();
    Some((field(14)?, field(15)?, field(22)?))
}

/// `VmRSS` of /proc/PID/status, in bytes.
fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// `btime` of /proc/stat: the boot time, seconds since the epoch.
fn parse_boot_time(proc_stat: &str) -> Option<u64> {
    proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

/// Clock ticks per second of /proc's times.
fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        f64::from(u32::try_from(ticks).unwrap_or(100))
    } else {
        100.0
    }
}

#[expect(
    clippy::cast_precision_loss,
    reason = "tick counts far below 2^52 convert exactly"
)]
fn seconds(ticks: u64, per_second: f64) -> f64 {
    ticks as f64 / per_second
}

impl ProcessStats {
    /// This process's stats, or `None` where /proc cannot be read.
    pub fn of_self() -> Option<Self> {
        let proc = Path::new("/proc");
        let (utime, stime, start) =
            parse_stat(&std::fs::read_to_string(proc.join("self/stat")).ok()?)?;
        let ticks = clock_ticks();
        let boot = parse_boot_time(&std::fs::read_to_string(proc.join("stat")).ok()?)?;
        let open_fds = std::fs::read_dir(proc.join("self/fd")).ok()?.count();
        Some(Self {
            cpu_seconds: seconds(utime + stime, ticks),
            resident_memory_bytes: parse_vm_rss(
                &std::fs::read_to_string(proc.join("self/status")).ok()?,
            )?,
            // The listing itself holds one descriptor while it is read.
            open_fds: (open_fds as u64).saturating_sub(1),
            start_time_seconds: seconds(boot, 1.0) + seconds(start, ticks),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_proc_texts() {
        let stat = "4242 (gate way) (x) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 50 0 0 20 0 \
                    9 0 123456 104857600 2500 18446744073709551615";
        assert_eq!(parse_stat(stat), Some((250, 50, 123_456)));
        assert_eq!(parse_stat("4242 (short) S 1"), None);
        let status = "Name:\tgateway\nVmPeak:\t  20000 kB\nVmRSS:\t   10240 kB\nThreads:\t3\n";
        assert_eq!(parse_vm_rss(status), Some(10_240 * 1024));
        assert_eq!(parse_vm_rss("Name: x\n"), None);
        assert_eq!(
            parse_boot_time("cpu  1 2 3\nbtime 1700000000\nprocesses 9\n"),
            Some(1_700_000_000)
        );
    }

    #[test]
    fn this_process_has_stats() {
        let stats = ProcessStats::of_self().unwrap();
        assert!(stats.resident_memory_bytes > 0);
        assert!(stats.open_fds >= 3, "stdin, stdout, stderr at least");
        assert!(stats.start_time_seconds > 1_600_000_000.0);
    }
}
