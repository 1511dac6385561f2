//! The rare data-path events an operator must see in the daemon's log, written with aya-log into
//! its ring buffer (`AYA_LOGS`), which the daemon drains into `tracing` (target
//! `gateway::datapath::kernel`).
//!
//! Every function here is called only on the branch that met its event, never on the per-packet
//! path, and out of line, so neither the code nor the stack of the programs' common paths grows.
//! Whether to log is one lookup in `LOG_LIMITS` and a clock read on that branch:
//!
//! - a binding hit while the heartbeat is stale (the gate fails closed): once per stale beat (the
//!   slot holds the beat it was logged for, so a daemon that beats again and stalls again is
//!   logged again);
//! - a packet shape the gate cannot handle (an IPv6 extension chain too long to walk, UDP in
//!   fragments or with IPv4 options): at most once a second per kind.
//!
//! Only the XDP gate logs. The tc relay programs use about 480 of the 512 bytes the verifier
//! allows a call chain, and Linux before 6.7 rounds every frame of the chain up to 32 bytes, so
//! an event function's frame pushes them over on Debian 12's 6.1 (`cargo xtask test --kernel
//! debian12` showed 544). What they leave to user space (a partial checksum, a size the kernel
//! relay cannot take) and a helper failing mid-rewrite are counted by reason instead.
//!
//! Two CPUs meeting the same event in the same instant may both log it (the slot is written
//! without an atomic): a rare duplicate line, never an unbounded stream.
//!
//! The binding maps are only written by user space (the programs update counters in place and
//! never insert), so a full map is the daemon's insert error, logged there.

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::map, maps::Array};
use aya_log_ebpf::{info, warn};
use gateway_common::Addr16;

use crate::maps::HEARTBEAT;

/// The kinds of event, each with its own slot in [`LOG_LIMITS`].
#[derive(Clone, Copy)]
#[repr(u32)]
enum Event {
    StaleHeartbeat = 0,
    Ipv6ExtensionChain = 1,
    UdpFragment = 2,
    Ipv4Options = 3,
}

const EVENTS: u32 = 4;

/// Shape events are logged at most this often, each kind on its own.
const SHAPE_INTERVAL_NS: u64 = 1_000_000_000;

/// aya-log's macros take a context they do not use; these functions need none.
const NO_CONTEXT: () = ();

/// Per [`Event`]: when it was last logged (`bpf_ktime_get_ns`), or, for the stale heartbeat, the
/// beat it was logged for plus one. Not pinned: each daemon's programs start with an empty one.
#[map(name = "LOG_LIMITS")]
static LOG_LIMITS: Array<u64> = Array::with_max_entries(EVENTS, 0);

/// Whether `event` may be logged now (its last line is a second old or more); claims it if so.
#[inline(always)]
fn once_a_second(event: Event) -> bool {
    let Some(slot) = LOG_LIMITS.get_ptr_mut(event as u32) else {
        return false;
    };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: the pointer comes from a successful lookup in an array map and stays valid during
    // the program; a racing writer on another CPU can at worst cause one duplicate line.
    unsafe {
        if *slot != 0 && now.saturating_sub(*slot) < SHAPE_INTERVAL_NS {
            return false;
        }
        *slot = now;
    }
    true
}

/// The gate dropped a binding hit (`remote` to `relay`) because the heartbeat is stale.
#[inline(never)]
pub fn stale_heartbeat(remote: &Addr16, remote_port_be: u16, relay: &Addr16, relay_port_be: u16) {
    let beat = HEARTBEAT.get(0).copied().unwrap_or(0);
    let Some(slot) = LOG_LIMITS.get_ptr_mut(Event::StaleHeartbeat as u32) else {
        return;
    };
    // Plus one, so a beat of 0 (a stopped daemon's expired beat) differs from the empty slot.
    let mark = beat.wrapping_add(1);
    // SAFETY: as in `once_a_second`.
    unsafe {
        if *slot == mark {
            return;
        }
        *slot = mark;
    }
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let since_ms = if beat == 0 {
        0
    } else {
        now.saturating_sub(beat) / 1_000_000
    };
    warn!(
        &NO_CONTEXT,
        "the daemon's heartbeat is stale (last beat {} ms ago, 0: expired): the gate fails closed \
         and drops binding hits, first {:i} port {} to {:i} port {} (logged once until the \
         heartbeat resumes)",
        since_ms,
        *remote,
        u16::from_be(remote_port_be),
        *relay,
        u16::from_be(relay_port_be)
    );
}

/// The gate dropped IPv6 whose extension-header chain is longer than it walks.
#[inline(never)]
pub fn ipv6_extension_chain(src: &Addr16, dst: &Addr16, walked: usize) {
    if once_a_second(Event::Ipv6ExtensionChain) {
        info!(
            &NO_CONTEXT,
            "IPv6 packet from {:i} to {:i} has more than {} extension headers: the gate cannot \
             walk the chain and drops it (at most one line a second)",
            *src,
            *dst,
            walked
        );
    }
}

/// The gate dropped a UDP fragment (it never reassembles).
#[inline(never)]
pub fn udp_fragment(src: &Addr16, dst: &Addr16) {
    if once_a_second(Event::UdpFragment) {
        info!(
            &NO_CONTEXT,
            "UDP fragment from {:i} to {:i}: the gate does not reassemble and drops it (at most \
             one line a second)",
            *src,
            *dst
        );
    }
}

/// The gate dropped IPv4 UDP with IP options.
#[inline(never)]
pub fn ipv4_options(src: &Addr16, dst: &Addr16) {
    if once_a_second(Event::Ipv4Options) {
        info!(
            &NO_CONTEXT,
            "IPv4 UDP with IP options from {:i} to {:i}: the gate drops it (at most one line a \
             second)",
            *src,
            *dst
        );
    }
}
