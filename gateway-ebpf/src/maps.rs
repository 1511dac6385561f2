//! The maps shared by the programs, and the helpers every program uses on them (exit counters,
//! the daemon heartbeat).

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, HashMap, PerCpuArray, ProgramArray, SockMap},
};
use gateway_common::{
    Addr16, BindingKey, BindingValue, ClientSocketKey, ControlPortKey, Counter,
    DEFAULT_MAX_BINDINGS, DatapathSettings, EntryCounters, ExitReason, GroupKey, GroupSourceKey,
    GroupValue, HostAllowKey, HostAllowValue, MAX_CONTROL_PORTS, MAX_GROUP_SOURCES, MAX_GROUPS,
    MAX_HOST_ALLOW, MAX_RELAY_ADDRS, OutboundKey, OutboundValue, RELAY_SOCKET_SLOTS,
    RawClientValue, RelaySpan,
};

#[map(name = "EXIT_COUNTERS")]
pub static EXIT_COUNTERS: PerCpuArray<Counter> =
    PerCpuArray::with_max_entries(ExitReason::COUNT, 0);

#[map(name = "BINDINGS")]
pub static BINDINGS: HashMap<BindingKey, BindingValue> =
    HashMap::with_max_entries(DEFAULT_MAX_BINDINGS, BPF_F_NO_PREALLOC);

#[map(name = "OUTBOUND")]
pub static OUTBOUND: HashMap<OutboundKey, OutboundValue> =
    HashMap::with_max_entries(DEFAULT_MAX_BINDINGS, BPF_F_NO_PREALLOC);

#[map(name = "HOST_ALLOW")]
pub static HOST_ALLOW: HashMap<HostAllowKey, HostAllowValue> =
    HashMap::with_max_entries(MAX_HOST_ALLOW, BPF_F_NO_PREALLOC);

#[map(name = "EXTERNAL_ADDRS")]
pub static EXTERNAL_ADDRS: HashMap<Addr16, u32> = HashMap::with_max_entries(64, 0);

#[map(name = "CONTROL_PORTS")]
pub static CONTROL_PORTS: HashMap<ControlPortKey, u32> =
    HashMap::with_max_entries(MAX_CONTROL_PORTS, 0);

#[map(name = "RELAY_ADDRS")]
pub static RELAY_ADDRS: HashMap<Addr16, RelaySpan> = HashMap::with_max_entries(MAX_RELAY_ADDRS, 0);

#[map(name = "RELAY_SOCKETS")]
pub static RELAY_SOCKETS: SockMap = SockMap::with_max_entries(RELAY_SOCKET_SLOTS, 0);

#[map(name = "RAW_CLIENTS")]
pub static RAW_CLIENTS: HashMap<ClientSocketKey, RawClientValue> =
    HashMap::with_max_entries(DEFAULT_MAX_BINDINGS, BPF_F_NO_PREALLOC);

/// Received multicast groups. Not preallocated: a replaced entry is freed after an RCU grace
/// period, so a fan-out still reading the old one never sees it reused.
#[map(name = "GROUPS")]
pub static GROUPS: HashMap<GroupKey, GroupValue> =
    HashMap::with_max_entries(MAX_GROUPS, BPF_F_NO_PREALLOC);

#[map(name = "GROUP_SOURCES")]
pub static GROUP_SOURCES: HashMap<GroupSourceKey, u32> =
    HashMap::with_max_entries(MAX_GROUP_SOURCES, BPF_F_NO_PREALLOC);

#[map(name = "FANOUT_PROGRAMS")]
pub static FANOUT_PROGRAMS: ProgramArray = ProgramArray::with_max_entries(1, 0);

#[map(name = "SETTINGS")]
pub static SETTINGS: Array<DatapathSettings> = Array::with_max_entries(1, 0);

#[map(name = "HEARTBEAT")]
pub static HEARTBEAT: Array<u64> = Array::with_max_entries(1, 0);

#[inline(always)]
pub fn count(reason: ExitReason, bytes: usize) {
    if let Some(counter) = EXIT_COUNTERS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, so no other writer; the pointer comes from a successful lookup.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += bytes as u64;
        }
    }
}

#[inline(always)]
pub fn settings() -> DatapathSettings {
    SETTINGS.get(0).copied().unwrap_or_default()
}

/// Whether the daemon's heartbeat is fresh. A daemon that never beat (0) counts as dead.
#[inline(always)]
pub fn daemon_alive() -> bool {
    let beat = HEARTBEAT.get(0).copied().unwrap_or(0);
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    beat != 0 && now.saturating_sub(beat) <= settings().fail_closed_after_ns
}

/// Adds one datagram of `bytes` to an entry's counters (shared between CPUs: plain adds may lose
/// an increment under contention, which only blurs statistics; last-seen is what idle needs).
#[inline(always)]
pub fn touch(counters: *mut EntryCounters, bytes: u64) {
    // SAFETY: the pointer comes from a successful map lookup and stays valid during the program.
    unsafe {
        (*counters).packets += 1;
        (*counters).bytes += bytes;
        (*counters).last_seen_ns = bpf_ktime_get_ns();
    }
}
