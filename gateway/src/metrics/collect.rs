//! One [`Snapshot`] of a running daemon: the pinned exit counters (as `gateway stats` reads
//! them), the shared counters, the connection caps, the binding table and /proc. Reads only.

use std::path::Path;

use tracing::debug;

use super::{process::ProcessStats, render::Snapshot};
use crate::{
    exit_counters,
    report::Traffic,
    server::{Services, enhanced::EnhancedMode},
};

/// Everything the endpoint serves, read now; `pin_dir` holds the instance's pinned maps.
pub fn snapshot(services: &Services, pin_dir: &Path) -> Snapshot {
    let datapath = exit_counters::read_exit_counters(pin_dir).unwrap_or_else(|error| {
        debug!(%error, "metrics: the exit counters cannot be read");
        Vec::new()
    });
    let counters = &services.counters;
    let enhanced = services.enhanced.as_deref();
    let userspace_relayed = Traffic {
        packets: counters.associate_packets.get() + enhanced.map_or(0, EnhancedMode::relay_relayed),
        bytes: counters.associate_bytes.get()
            + enhanced.map_or(0, EnhancedMode::relay_relayed_bytes),
    };
    let (refused_total, refused_per_client) = services.connections.refused();
    let caps = enhanced.map_or([0; 4], EnhancedMode::caps_hit);
    let (resolver_queries, resolver_failures) = services.resolver.lookup_counts();
    Snapshot {
        datapath,
        userspace_relayed,
        bindings: enhanced.map(EnhancedMode::census).unwrap_or_default(),
        connections_open: services.connections.held(),
        connections_accepted: counters.connections_accepted.get(),
        authentications: vec![
            ("succeeded", counters.auth_succeeded.get()),
            ("failed", counters.auth_failed.get()),
            ("rate_limited", counters.auth_rate_limited.get()),
        ],
        // The names of `gateway bindings`' limits, without its `refused` wording.
        limits_hit: vec![
            ("connections_total", refused_total),
            ("connections_per_client", refused_per_client),
            ("bindings_per_connection", caps[0]),
            ("bindings_per_user", caps[1]),
            ("bindings_total", caps[2]),
            ("relay_ports", caps[3]),
            ("association_remotes", counters.associate_remote_cap.get()),
        ],
        relay_ports_free: enhanced.map(EnhancedMode::free_ports).unwrap_or_default(),
        resolver_queries,
        resolver_failures,
        process: ProcessStats::of_self(),
    }
}
