//! What the bench measured: every run of every scenario, as plain data. Summaries (median and
//! spread) are computed from these by [`crate::report`]; nothing here does I/O.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::stats::Summary;

/// One run of one stream (media relay, drop, scale).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct StreamRun {
    pub offered_pps: f64,
    pub delivered_pps: f64,
    /// `1 - delivered / offered` (0 when nothing was offered).
    pub loss: f64,
    /// System-wide busy CPU time per delivered datagram (ns).
    pub cpu_ns_per_delivered: f64,
    /// System-wide busy CPU time per offered datagram (ns): the figure for drop scenarios.
    pub cpu_ns_per_offered: f64,
    /// Average busy cores during the window (of all CPUs).
    pub busy_cores: f64,
    /// Datagrams the receiver's socket had no room for (the sink was the bottleneck).
    pub rcvbuf_errors: u64,
    /// Datagrams to closed ports in the receiver's namespace.
    pub no_ports: u64,
    /// Failed sendmmsg calls of the sender.
    pub sender_errors: u64,
    /// Datagrams the sender sent in its whole run.
    pub sender_sent: u64,
    /// Fraction of the sent datagrams that the arm's own counter saw dropped (drop scenarios).
    pub drops_verified: Option<f64>,
    /// The gateway's programs' own run time per run over the window (`kernel.bpf_stats_enabled`;
    /// the gateway's drop arms).
    pub program_ns_per_packet: Option<f64>,
}

/// The legitimate stream of the collateral damage scenario, with or without the flood.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CollateralRun {
    pub legit_pps: f64,
    pub sent: u64,
    pub received: u64,
    pub loss: f64,
    pub delay_p50_ns: u64,
    pub delay_p99_ns: u64,
    /// The junk flood's rate (0 without flood).
    pub flood_pps: f64,
}

/// One control-plane run: setups completed per second by many concurrent control connections.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ControlRun {
    pub connections: usize,
    pub completed: u64,
    pub per_second: f64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Setup latency: step 1 sent to step 2 confirmed (enhanced), or connect to the UDP
    /// ASSOCIATE reply (RFC 1928).
    pub p50_us: f64,
    pub p99_us: f64,
    /// The daemon's first distinct warnings when there were errors.
    pub daemon_log: Vec<String>,
}

/// Resident memory of the daemon with many live bindings.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MemoryResult {
    pub target: usize,
    /// Live confirmed bindings when memory was read.
    pub live: usize,
    pub per_family: BTreeMap<String, usize>,
    /// Why no more bindings fit (the first refusals), if the target was not reached.
    pub refusals: BTreeMap<String, u64>,
    pub rss_before: u64,
    pub rss_after: u64,
    pub bytes_per_binding: f64,
    /// The daemon's open descriptors with the control connections open, before and after the
    /// bindings were made, and the growth per live binding.
    pub fds_before: usize,
    pub fds_after: usize,
    pub fds_per_binding: f64,
    /// Client host addresses the bindings came from.
    pub client_addresses: usize,
    /// Kernel memory of the BINDINGS and OUTBOUND maps (bpftool's `bytes_memlock`).
    pub kernel_map_bytes: Option<u64>,
    /// External relay addresses the daemon handed out.
    pub external_ips_used: Vec<String>,
    /// Addresses fw's outside interface had (primary and added).
    pub external_ips_configured: Vec<String>,
    pub setup_seconds: f64,
    /// Warnings and errors the daemon logged while bindings were made (first few, distinct).
    pub daemon_log: Vec<String>,
}

/// The churn area: bindings made and ended, and what was left afterwards.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChurnResult {
    pub target: usize,
    /// Bindings made (and ended), by how they ended.
    pub done: usize,
    pub by_kind: BTreeMap<String, usize>,
    pub seconds: f64,
    pub per_second: f64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub bindings_left: usize,
    pub relay_entries_left: usize,
    /// Deadline checks (timers) still scheduled.
    pub timers_left: usize,
    pub internal_ports_left: usize,
    pub external_ports_left: usize,
    /// Entries left in each kernel map (bpftool).
    pub map_entries_left: BTreeMap<String, usize>,
    pub fds_before: usize,
    pub fds_after: usize,
    /// The daemon's RSS after a warm-up (1 % of the bindings) and after the churn.
    pub rss_before: u64,
    pub rss_after: u64,
}

impl ChurnResult {
    /// Everything left that should not be: bindings, relay entries, ports, map entries and
    /// descriptors beyond the start.
    pub fn leaked(&self) -> usize {
        [
            self.bindings_left,
            self.relay_entries_left,
            self.timers_left,
            self.internal_ports_left,
            self.external_ports_left,
            self.map_entries_left.values().sum(),
            self.fds_after.saturating_sub(self.fds_before),
        ]
        .iter()
        .fold(0usize, |sum, n| sum.saturating_add(*n))
    }

    /// What was left, as the progress line and the report print it.
    pub fn leftovers_text(&self) -> String {
        format!(
            "{} bindings, {} relay entries, {} timers, {} internal + {} external ports in use, \
             map entries {:?}, descriptors {} -> {}",
            self.bindings_left,
            self.relay_entries_left,
            self.timers_left,
            self.internal_ports_left,
            self.external_ports_left,
            self.map_entries_left,
            self.fds_before,
            self.fds_after,
        )
    }

    /// RSS growth over the churn, in percent of the baseline.
    pub fn rss_growth_percent(&self) -> f64 {
        #[expect(clippy::cast_precision_loss, reason = "memory sizes")]
        let growth = (self.rss_after as f64 - self.rss_before as f64)
            / (self.rss_before as f64).max(1.0)
            * 100.0;
        growth
    }
}

/// One latency run: a paced echo through an arm.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PingRun {
    pub rate: u64,
    pub sent: u64,
    pub received: u64,
    pub loss: f64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
}

/// One relay arm profiled: what it delivered meanwhile, where the CPU time went (perf's
/// samples, heaviest functions by self time) and what the gateway's programs cost per run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProfileRun {
    pub delivered_pps: f64,
    pub cpu_ns_per_delivered: f64,
    /// Busy (non-idle) perf samples over all CPUs in the window.
    pub samples: u64,
    /// Function -> share of the busy samples spent in it (self time), heaviest first.
    pub top: Vec<(String, f64)>,
    /// Stage of the path -> share of the busy samples whose stack holds it (inclusive).
    pub stages: Vec<(String, f64)>,
    /// Program name -> nanoseconds per run (`kernel.bpf_stats_enabled`).
    pub program_ns_per_run: BTreeMap<String, f64>,
}

/// One multicast run: a group stream from `server` fanned out to `subscribers` bindings
/// (multicast-to-unicast, each its own control connection and socket in `client`).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct MulticastRun {
    pub subscribers: usize,
    /// Datagrams per second the sender sent to the group (UDP `OutDatagrams` of `server`).
    pub offered_pps: f64,
    /// Datagrams per second delivered, summed over the subscribers (UDP `InDatagrams` of
    /// `client`).
    pub delivered_pps: f64,
    /// `delivered_pps / subscribers`.
    pub per_subscriber_pps: f64,
    /// `1 - delivered / (offered * subscribers)` (0 when nothing was offered).
    pub loss: f64,
    /// System-wide busy CPU time per delivered datagram (ns).
    pub cpu_ns_per_delivered: f64,
    /// System-wide busy CPU time per offered (group) datagram (ns).
    pub cpu_ns_per_offered: f64,
    pub busy_cores: f64,
    /// Datagrams the subscribers' sockets had no room for.
    pub rcvbuf_errors: u64,
    /// The fewest and the most datagrams one subscriber's socket read in the whole run.
    pub sink_min: u64,
    pub sink_max: u64,
    /// Over the whole sender run (not only the window), from `gateway stats` and `gateway
    /// bindings`: unicast copies the kernel made (`kernel_relayed_multicast`), group datagrams
    /// handed to the userspace relay (`multicast_to_userspace`), and copies the userspace
    /// relay delivered (the members' `userspace_packets`).
    pub kernel_copies: u64,
    pub to_userspace: u64,
    pub userspace_copies: u64,
    /// `kernel_copies / (kernel_copies + userspace_copies)`; NaN when neither delivered.
    pub kernel_share: f64,
    /// Members the daemon reported as served by the kernel.
    pub members_in_kernel: usize,
    /// Datagrams the sender sent in its whole run.
    pub sender_sent: u64,
}

/// `kernel / (kernel + userspace)` copies: the kernel's share of a fan-out; NaN when neither
/// delivered anything.
#[expect(clippy::cast_precision_loss, reason = "packet counts")]
pub fn kernel_share(kernel: u64, userspace: u64) -> f64 {
    let total = kernel.saturating_add(userspace);
    if total == 0 {
        f64::NAN
    } else {
        kernel as f64 / total as f64
    }
}

/// How and where the bench ran.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Meta {
    pub mode: String,
    pub runs: usize,
    pub window_s: f64,
    pub warmup_s: f64,
    pub cpus: usize,
    pub kernel: String,
    pub started_unix: u64,
    pub duration_s: f64,
    /// The open-file limit the bench and the daemons it starts run with.
    pub fd_limit: u64,
}

/// Everything measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Results {
    pub meta: Meta,
    /// Payload size -> arm (`kernel`, `userspace`, `dante`, `plain`, `local_sink`) -> runs.
    pub relay: BTreeMap<usize, BTreeMap<String, Vec<StreamRun>>>,
    /// Arm (`xdp`, `nft`, `closed`, `null_device`) -> runs.
    pub drop: BTreeMap<String, Vec<StreamRun>>,
    /// `quiet` / `flood` -> runs of the legitimate stream.
    pub collateral: BTreeMap<String, Vec<CollateralRun>>,
    /// `enhanced`, `gateway_associate`, `dante_associate` -> runs.
    pub control: BTreeMap<String, Vec<ControlRun>>,
    pub memory: Option<MemoryResult>,
    pub churn: Option<ChurnResult>,
    /// Installed entries -> runs of the in-kernel relay (200-octet payloads).
    pub scale: BTreeMap<u64, Vec<StreamRun>>,
    /// Arm -> `low` / `half` -> runs.
    pub latency: BTreeMap<String, BTreeMap<String, Vec<PingRun>>>,
    /// Relay arm -> its profile (200-octet payloads).
    pub profile: BTreeMap<String, ProfileRun>,
    /// Subscribers -> runs of the multicast fan-out.
    pub multicast: BTreeMap<usize, Vec<MulticastRun>>,
    /// Scenarios or runs that failed, with why.
    pub errors: Vec<String>,
    /// Observations the reader needs (limits hit, substitutions).
    pub notes: Vec<String>,
}

/// The summary of `f` over `runs`.
pub fn summary<T>(runs: &[T], f: impl Fn(&T) -> f64) -> Option<Summary> {
    Summary::of(&runs.iter().map(f).collect::<Vec<_>>())
}

/// The median of `f` over `runs`, NaN when there are none.
pub fn median_of<T>(runs: &[T], f: impl Fn(&T) -> f64) -> f64 {
    summary(runs, f).map_or(f64::NAN, |s| s.median)
}
