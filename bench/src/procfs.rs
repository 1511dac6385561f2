//! Reading the kernel's own accounting: system-wide CPU time from `/proc/stat`, a namespace's UDP
//! counters from `/proc/net/snmp`, a process's resident memory from `/proc/PID/status`. The
//! parsers are pure (unit-tested on captured text); the readers only open files.

use std::{fs, path::Path};

use anyhow::{Context as _, Result, bail};

/// The aggregate `cpu` line of `/proc/stat`, in clock ticks (`USER_HZ`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTimes {
    pub user: u64,
    pub nice: u64,
    pub system: u64,
    pub idle: u64,
    pub iowait: u64,
    pub irq: u64,
    pub softirq: u64,
    pub steal: u64,
}

impl CpuTimes {
    /// Work done on behalf of anyone: user + nice + system + irq + softirq (guest time is already
    /// inside user; idle, iowait and steal are not work of this machine).
    pub fn busy(&self) -> u64 {
        self.user + self.nice + self.system + self.irq + self.softirq
    }

    /// Ticks elapsed on all CPUs together.
    pub fn total(&self) -> u64 {
        self.busy() + self.idle + self.iowait + self.steal
    }
}

/// Parses the aggregate `cpu ` line of `/proc/stat` text.
pub fn parse_proc_stat(text: &str) -> Result<CpuTimes> {
    let line = text
        .lines()
        .find(|line| line.starts_with("cpu "))
        .context("no aggregate `cpu` line in /proc/stat")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("parse /proc/stat line {line:?}"))?;
    if fields.len() < 7 {
        bail!("short /proc/stat cpu line {line:?}");
    }
    let field = |i: usize| fields.get(i).copied().unwrap_or(0);
    Ok(CpuTimes {
        user: field(0),
        nice: field(1),
        system: field(2),
        idle: field(3),
        iowait: field(4),
        irq: field(5),
        softirq: field(6),
        steal: field(7),
    })
}

/// Reads `/proc/stat` now.
pub fn read_cpu_times() -> Result<CpuTimes> {
    parse_proc_stat(&fs::read_to_string("/proc/stat").context("read /proc/stat")?)
}

/// Nanoseconds per clock tick of `/proc/stat`.
pub fn tick_ns() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    #[expect(clippy::cast_precision_loss, reason = "USER_HZ is 100 or so")]
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    1e9 / hz
}

/// The IPv4 `Udp:` counters of `/proc/net/snmp` (one network namespace).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UdpCounters {
    pub in_datagrams: u64,
    pub no_ports: u64,
    pub in_errors: u64,
    pub out_datagrams: u64,
    pub rcvbuf_errors: u64,
    pub sndbuf_errors: u64,
}

impl UdpCounters {
    /// Field-wise `self - earlier` (saturating).
    #[must_use]
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            in_datagrams: self.in_datagrams.saturating_sub(earlier.in_datagrams),
            no_ports: self.no_ports.saturating_sub(earlier.no_ports),
            in_errors: self.in_errors.saturating_sub(earlier.in_errors),
            out_datagrams: self.out_datagrams.saturating_sub(earlier.out_datagrams),
            rcvbuf_errors: self.rcvbuf_errors.saturating_sub(earlier.rcvbuf_errors),
            sndbuf_errors: self.sndbuf_errors.saturating_sub(earlier.sndbuf_errors),
        }
    }
}

/// Parses the `Udp:` header/value line pair of `/proc/net/snmp` text, by field name.
pub fn parse_snmp_udp(text: &str) -> Result<UdpCounters> {
    let mut lines = text.lines().filter(|line| line.starts_with("Udp: "));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        bail!("no Udp: lines in /proc/net/snmp");
    };
    let mut counters = UdpCounters::default();
    for (name, value) in names
        .split_whitespace()
        .zip(values.split_whitespace())
        .skip(1)
    {
        let value: u64 = value
            .parse()
            .with_context(|| format!("parse Udp {name}={value:?}"))?;
        match name {
            "InDatagrams" => counters.in_datagrams = value,
            "NoPorts" => counters.no_ports = value,
            "InErrors" => counters.in_errors = value,
            "OutDatagrams" => counters.out_datagrams = value,
            "RcvbufErrors" => counters.rcvbuf_errors = value,
            "SndbufErrors" => counters.sndbuf_errors = value,
            _ => {}
        }
    }
    Ok(counters)
}

/// Reads the UDP counters of the network namespace of the calling thread.
pub fn read_udp_counters_here() -> Result<UdpCounters> {
    // thread-self: the namespace this thread entered with setns, not the process's.
    parse_snmp_udp(
        &fs::read_to_string("/proc/thread-self/net/snmp")
            .context("read /proc/thread-self/net/snmp")?,
    )
}

/// `VmRSS` of a `/proc/PID/status` text, in bytes.
pub fn parse_vm_rss(text: &str) -> Result<u64> {
    let line = text
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .context("no VmRSS line")?;
    let mut parts = line.split_whitespace().skip(1);
    let kib: u64 = parts
        .next()
        .context("VmRSS without a value")?
        .parse()
        .context("parse VmRSS")?;
    match parts.next() {
        Some("kB") | None => Ok(kib * 1024),
        Some(unit) => bail!("unexpected VmRSS unit {unit:?}"),
    }
}

/// Resident memory of process `pid` in bytes.
pub fn read_rss(pid: i32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    parse_vm_rss(&fs::read_to_string(Path::new(&path)).with_context(|| format!("read {path}"))?)
}

/// Open file descriptors of process `pid`.
pub fn fd_count(pid: i32) -> Result<usize> {
    let path = format!("/proc/{pid}/fd");
    Ok(fs::read_dir(&path)
        .with_context(|| format!("read {path}"))?
        .count())
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  4705 150 1120 16250 520 30 60 7 0 0\n\
                        cpu0 2000 100 500 8000 300 10 30 3 0 0\n\
                        cpu1 2705 50 620 8250 220 20 30 4 0 0\n\
                        intr 123 0 0\nctxt 456\nbtime 1700000000\n";

    #[test]
    fn proc_stat_busy_is_user_nice_system_irq_softirq() {
        let t = parse_proc_stat(STAT).unwrap();
        assert_eq!(t.user, 4705);
        assert_eq!(t.nice, 150);
        assert_eq!(t.system, 1120);
        assert_eq!(t.idle, 16250);
        assert_eq!(t.iowait, 520);
        assert_eq!(t.irq, 30);
        assert_eq!(t.softirq, 60);
        assert_eq!(t.steal, 7);
        assert_eq!(t.busy(), 4705 + 150 + 1120 + 30 + 60);
        assert_eq!(t.total(), t.busy() + 16250 + 520 + 7);
    }

    #[test]
    fn proc_stat_rejects_garbage() {
        assert!(parse_proc_stat("cpu0 1 2 3\n").is_err());
        assert!(parse_proc_stat("cpu  1 2 x 4 5 6 7\n").is_err());
        assert!(parse_proc_stat("cpu  1 2 3\n").is_err());
        // Old kernels without steal still parse.
        assert_eq!(parse_proc_stat("cpu  1 2 3 4 5 6 7\n").unwrap().steal, 0);
    }

    #[test]
    fn snmp_udp_fields_by_name() {
        let text = "Ip: Forwarding DefaultTTL\nIp: 2 64\n\
            Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors\n\
            Udp: 1000 7 3 2000 2 1 0 0 0\n\
            UdpLite: InDatagrams NoPorts\nUdpLite: 0 0\n";
        let c = parse_snmp_udp(text).unwrap();
        assert_eq!(
            c,
            UdpCounters {
                in_datagrams: 1000,
                no_ports: 7,
                in_errors: 3,
                out_datagrams: 2000,
                rcvbuf_errors: 2,
                sndbuf_errors: 1,
            }
        );
        let later = UdpCounters {
            in_datagrams: 1500,
            ..c
        };
        assert_eq!(later.since(&c).in_datagrams, 500);
        assert_eq!(c.since(&later).in_datagrams, 0);
        assert!(parse_snmp_udp("Ip: a\nIp: 1\n").is_err());
    }

    #[test]
    fn vm_rss_in_bytes() {
        let text = "Name:\tgateway\nVmPeak:\t  100 kB\nVmRSS:\t   2048 kB\nThreads:\t3\n";
        assert_eq!(parse_vm_rss(text).unwrap(), 2048 * 1024);
        assert!(parse_vm_rss("Name: x\n").is_err());
    }

    #[test]
    fn readers_work_here() {
        assert!(read_cpu_times().unwrap().total() > 0);
        assert!(read_rss(i32::try_from(std::process::id()).unwrap()).unwrap() > 0);
        assert!(tick_ns() > 0.0);
    }
}
