//! A [`Snapshot`] of every count, and its text in the Prometheus text format 0.0.4 or in
//! `OpenMetrics`, through prometheus-client. Pure: a registry is built from the snapshot for each
//! scrape, so nothing here holds state between scrapes.

use std::sync::atomic::AtomicU64;

use gateway_common::Verdict;
use prometheus_client::{
    encoding::{prometheus_text, text},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};

use super::process::ProcessStats;
use crate::{
    binding::{Census, FreePorts},
    exit_counters::ReasonTotal,
    report::Traffic,
};

/// The two text formats the endpoint serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The Prometheus text format, version 0.0.4 (the default).
    Prometheus,
    /// `OpenMetrics` 1.0 text, when the scraper's `Accept` asks for it.
    OpenMetrics,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// Every count the endpoint serves, read at one scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Packets and bytes per data-path exit reason (empty when the counters cannot be read).
    pub datapath: Vec<ReasonTotal>,
    /// What user space relayed (the enhanced mode's relay and UDP ASSOCIATE), both ways.
    pub userspace_relayed: Traffic,
    pub bindings: Census,
    pub connections_open: usize,
    pub connections_accepted: u64,
    /// Authentications by result (`succeeded`, `failed`, `rate_limited`).
    pub authentications: Vec<(&'static str, u64)>,
    /// How often each cap or limit refused something, by its name.
    pub limits_hit: Vec<(&'static str, u64)>,
    pub relay_ports_free: Vec<FreePorts>,
    pub resolver_queries: u64,
    pub resolver_failures: u64,
    pub process: Option<ProcessStats>,
}

type Labels = Vec<(&'static str, String)>;

fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let metric: Counter = Counter::default();
    metric.inc_by(value);
    registry.register(name, help, metric);
}

fn gauge(value: usize) -> Gauge {
    let metric: Gauge = Gauge::default();
    metric.set(i64::try_from(value).unwrap_or(i64::MAX));
    metric
}

/// The data path's counters: per reason and verdict, and the kernel-relayed totals (the sum of
/// every `redirect` reason, as `gateway stats` shows it).
fn register_datapath(registry: &mut Registry, datapath: &[ReasonTotal]) {
    let packets = Family::<Labels, Counter>::default();
    let bytes = Family::<Labels, Counter>::default();
    for total in datapath {
        let labels = vec![
            ("reason", total.reason.name().to_owned()),
            ("verdict", total.reason.verdict().name().to_owned()),
        ];
        packets.get_or_create(&labels).inc_by(total.packets);
        bytes.get_or_create(&labels).inc_by(total.bytes);
    }
    registry.register(
        "datapath_packets",
        "Packets that left the data path, by exit reason and verdict",
        packets,
    );
    registry.register_with_unit(
        "datapath",
        "Bytes that left the data path, by exit reason and verdict",
        Unit::Bytes,
        bytes,
    );
    let relayed = datapath
        .iter()
        .filter(|t| t.reason.verdict() == Verdict::Redirect);
    let (relayed_packets, relayed_bytes) =
        relayed.fold((0, 0), |(p, b), t| (p + t.packets, b + t.bytes));
    counter(
        registry,
        "kernel_relayed_packets",
        "Packets the kernel relayed (every redirect reason)",
        relayed_packets,
    );
    let relayed_bytes_metric: Counter = Counter::default();
    relayed_bytes_metric.inc_by(relayed_bytes);
    registry.register_with_unit(
        "kernel_relayed",
        "Bytes the kernel relayed (every redirect reason)",
        Unit::Bytes,
        relayed_bytes_metric,
    );
}

/// The control plane: relayed by user space, bindings, connections, logins, caps, ports, names.
fn register_control(registry: &mut Registry, s: &Snapshot) {
    counter(
        registry,
        "userspace_relayed_packets",
        "Datagrams user space relayed (enhanced-mode relay and UDP ASSOCIATE), both ways",
        s.userspace_relayed.packets,
    );
    let userspace_bytes: Counter = Counter::default();
    userspace_bytes.inc_by(s.userspace_relayed.bytes);
    registry.register_with_unit(
        "userspace_relayed",
        "Payload bytes user space relayed, both ways",
        Unit::Bytes,
        userspace_bytes,
    );
    let bindings = Family::<Labels, Gauge>::default();
    for (state, kind, count) in s.bindings.labelled() {
        bindings
            .get_or_create(&vec![
                ("state", state.to_owned()),
                ("kind", kind.to_owned()),
            ])
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }
    registry.register(
        "bindings",
        "Live enhanced-mode bindings by state and kind",
        bindings,
    );
    registry.register(
        "control_connections",
        "Control connections open now",
        gauge(s.connections_open),
    );
    counter(
        registry,
        "control_connections_accepted",
        "Control connections accepted (past the client networks and the caps)",
        s.connections_accepted,
    );
    let labelled = |label: &'static str, values: &[(&'static str, u64)]| {
        let family = Family::<Labels, Counter>::default();
        for (name, value) in values {
            family
                .get_or_create(&vec![(label, (*name).to_owned())])
                .inc_by(*value);
        }
        family
    };
    registry.register(
        "authentications",
        "Username/password authentications by result",
        labelled("result", &s.authentications),
    );
    registry.register(
        "limit_hits",
        "Requests, connections and datagrams refused by a cap or limit, by limit",
        labelled("limit", &s.limits_hit),
    );
    let ports = Family::<Labels, Gauge>::default();
    for free in &s.relay_ports_free {
        ports
            .get_or_create(&vec![
                ("side", free.side.to_owned()),
                ("address", free.address.to_string()),
            ])
            .set(i64::try_from(free.free).unwrap_or(i64::MAX));
    }
    registry.register(
        "relay_ports_free",
        "Free relay ports of the enhanced mode per relay address",
        ports,
    );
    counter(
        registry,
        "resolver_queries",
        "Domain names the resolver was asked for (cache hits included)",
        s.resolver_queries,
    );
    counter(
        registry,
        "resolver_failures",
        "Domain names the resolver found no address for",
        s.resolver_failures,
    );
}

/// Prometheus's standard process metrics (no prefix).
fn register_process(registry: &mut Registry, process: &ProcessStats) {
    let cpu = Counter::<f64, AtomicU64>::default();
    cpu.inc_by(process.cpu_seconds);
    registry.register_with_unit(
        "process_cpu",
        "Total user and system CPU time spent",
        Unit::Seconds,
        cpu,
    );
    let resident = gauge(usize::try_from(process.resident_memory_bytes).unwrap_or(usize::MAX));
    registry.register_with_unit(
        "process_resident_memory",
        "Resident memory size",
        Unit::Bytes,
        resident,
    );
    registry.register(
        "process_open_fds",
        "Open file descriptors",
        gauge(usize::try_from(process.open_fds).unwrap_or(usize::MAX)),
    );
    let start = Gauge::<f64, AtomicU64>::default();
    start.set(process.start_time_seconds);
    registry.register_with_unit(
        "process_start_time",
        "Start time of the process since the Unix epoch",
        Unit::Seconds,
        start,
    );
}

/// The text of `snapshot` in `format` (`OpenMetrics` ends with `# EOF`).
pub fn encode(snapshot: &Snapshot, format: Format) -> String {
    let mut root = Registry::default();
    if let Some(process) = &snapshot.process {
        register_process(&mut root, process);
    }
    let gateway = root.sub_registry_with_prefix("gateway");
    register_datapath(gateway, &snapshot.datapath);
    register_control(gateway, snapshot);
    let mut out = String::new();
    let written = match format {
        Format::Prometheus => prometheus_text::encode(&mut out, &root),
        Format::OpenMetrics => text::encode(&mut out, &root),
    };
    // Writing into a String cannot fail; should it, the scraper sees a short body.
    let _ = written;
    out
}

#[cfg(test)]
mod tests {
    use gateway_common::ExitReason;

    use super::*;

    fn sample() -> Snapshot {
        Snapshot {
            datapath: ExitReason::ALL
                .iter()
                .map(|&reason| ReasonTotal {
                    reason,
                    packets: 2,
                    bytes: 200,
                })
                .collect(),
            userspace_relayed: Traffic {
                packets: 7,
                bytes: 700,
            },
            connections_open: 3,
            connections_accepted: 9,
            authentications: vec![("succeeded", 4), ("failed", 1), ("rate_limited", 0)],
            limits_hit: vec![("connections_total", 5)],
            relay_ports_free: vec![FreePorts {
                side: "external",
                address: "203.0.113.1".parse().unwrap(),
                free: 1000,
            }],
            resolver_queries: 6,
            resolver_failures: 2,
            process: Some(ProcessStats {
                cpu_seconds: 1.5,
                resident_memory_bytes: 4096,
                open_fds: 12,
                start_time_seconds: 1.7e9,
            }),
            ..Snapshot::default()
        }
    }

    #[test]
    fn the_text_format_names_every_series() {
        let text = encode(&sample(), Format::Prometheus);
        let redirects = ExitReason::ALL
            .iter()
            .filter(|r| r.verdict() == Verdict::Redirect)
            .count();
        for line in [
            "gateway_datapath_packets_total{reason=\"no_binding\",verdict=\"drop\"} 2".to_owned(),
            "gateway_datapath_bytes_total{reason=\"kernel_relayed_inbound\",verdict=\"redirect\"} 200".to_owned(),
            format!("gateway_kernel_relayed_packets_total {}", 2 * redirects),
            format!("gateway_kernel_relayed_bytes_total {}", 200 * redirects),
            "gateway_userspace_relayed_packets_total 7".to_owned(),
            "gateway_userspace_relayed_bytes_total 700".to_owned(),
            "gateway_bindings{state=\"confirmed\",kind=\"rtp_pair\"} 0".to_owned(),
            "gateway_control_connections 3".to_owned(),
            "gateway_control_connections_accepted_total 9".to_owned(),
            "gateway_authentications_total{result=\"succeeded\"} 4".to_owned(),
            "gateway_limit_hits_total{limit=\"connections_total\"} 5".to_owned(),
            "gateway_relay_ports_free{side=\"external\",address=\"203.0.113.1\"} 1000".to_owned(),
            "gateway_resolver_queries_total 6".to_owned(),
            "gateway_resolver_failures_total 2".to_owned(),
            "process_cpu_seconds_total 1.5".to_owned(),
            "process_resident_memory_bytes 4096".to_owned(),
            "process_open_fds 12".to_owned(),
            "process_start_time_seconds 1700000000.0".to_owned(),
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        assert!(!text.contains("# EOF"));
    }

    #[test]
    fn openmetrics_ends_with_eof() {
        let text = encode(&sample(), Format::OpenMetrics);
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(
            text.contains("# UNIT gateway_datapath_bytes bytes"),
            "{text}"
        );
        assert!(
            Format::OpenMetrics
                .content_type()
                .starts_with("application/openmetrics-text")
        );
        assert!(Format::Prometheus.content_type().contains("version=0.0.4"));
    }
}
