//! `gateway monitor`'s ABI: what a watcher asks the programs for ([`MonitorSettings`]), the
//! events they write for it ([`MonitorEvent`] in a ring buffer), and what their budget left out
//! ([`MonitorBudget`], per CPU).
//!
//! Nobody watching costs each packet one array read: the lease is 0. A watcher renews its lease
//! and advances the rate limit's window every second; the daemon ends a lease that ran out, so
//! a watcher that dies stops costing within [`LEASE_NS`] and a heartbeat. The programs read no
//! clock until an event is to be written: a packet over the rate limit costs a per-CPU counter.

use crate::{Addr16, ExitReason};

/// How long a watcher's lease lasts past its last renewal.
pub const LEASE_NS: u64 = 3_000_000_000;

/// The ring buffer's size in bytes (a power of two and a multiple of the page size): 4,096
/// events, 40 seconds of the default rate on one CPU, while the watcher is slow to read.
pub const EVENTS_RING_BYTES: u32 = 256 * 1024;

/// What a watcher asks for, at index 0 of [`crate::map_names::MONITOR_SETTINGS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MonitorSettings {
    /// `CLOCK_MONOTONIC` nanoseconds until which the watcher is alive; 0 or past: no events.
    pub lease_until_ns: u64,
    /// Bit `r` set: exits for reason `r` are watched.
    pub reasons: u64,
    /// Every `sample_every`-th watched packet per CPU is considered (0 and 1: every one).
    pub sample_every: u32,
    /// At most this many events per CPU per second; the rest are counted as rate-limited.
    pub events_per_second: u32,
    /// The watcher's process id, so a second watcher can say who holds the instance.
    pub watcher_pid: u32,
    /// The rate limit's window: the watcher advances it every second, and each CPU's count of
    /// events restarts when it changes.
    pub window: u32,
}
const _: () = assert!(size_of::<MonitorSettings>() == 32);
const _: () = assert!(ExitReason::COUNT <= 64);

impl MonitorSettings {
    /// Whether exits for `reason` are watched (the lease aside).
    pub const fn watches(&self, reason: u32) -> bool {
        reason < 64 && self.reasons & (1 << reason) != 0
    }
}

/// Per CPU: the sampling counter, the rate limit's window, and what the budget left out.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MonitorBudget {
    /// Watched packets seen (the sampling counter).
    pub seen: u64,
    /// The [`MonitorSettings::window`] that `window_events` counts in.
    pub window: u64,
    /// Events written in that window.
    pub window_events: u64,
    /// Events written.
    pub emitted: u64,
    /// Watched packets skipped by sampling.
    pub sampled_out: u64,
    /// Watched packets over the rate limit.
    pub rate_limited: u64,
    /// Events lost because the ring buffer was full (the watcher reads too slowly).
    pub ring_full: u64,
}
const _: () = assert!(size_of::<MonitorBudget>() == 56);

/// The program that met the exit.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MonitorHook {
    /// `gateway_external`: the XDP gate.
    XdpGate = 0,
    /// `gateway_gate`: the gate and inbound relay in tc.
    TcGate = 1,
    /// `gateway_inbound`: the inbound relay behind the XDP gate.
    TcInbound = 2,
    /// `gateway_internal`: the internal interface's drops and outbound relay.
    TcInternal = 3,
}

impl MonitorHook {
    pub const fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::XdpGate),
            1 => Some(Self::TcGate),
            2 => Some(Self::TcInbound),
            3 => Some(Self::TcInternal),
            _ => None,
        }
    }

    /// Stable name for people and JSON.
    pub const fn name(self) -> &'static str {
        match self {
            Self::XdpGate => "xdp_gate",
            Self::TcGate => "tc_gate",
            Self::TcInbound => "tc_inbound",
            Self::TcInternal => "tc_internal",
        }
    }
}

/// One exit, as the program saw the packet when it left (a relayed packet with its rewritten
/// addresses).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MonitorEvent {
    /// `CLOCK_MONOTONIC` nanoseconds.
    pub time_ns: u64,
    /// IPv4-mapped for IPv4; zero when the headers could not be read.
    pub src_addr: Addr16,
    pub dst_addr: Addr16,
    /// An [`ExitReason`].
    pub reason: u32,
    /// The interface the packet arrived on.
    pub ifindex: u32,
    /// The packet's length in octets.
    pub len: u32,
    pub src_port_be: u16,
    pub dst_port_be: u16,
    /// The IP protocol (IPv6: the first next-header value), when [`flow::ADDRESSES`] is set.
    pub protocol: u8,
    /// A [`MonitorHook`].
    pub hook: u8,
    /// Which of the packet's fields the program could read: [`flow`] bits.
    pub flow: u8,
    pub padding: [u8; 5],
}

/// Bits of [`MonitorEvent::flow`].
pub mod flow {
    /// The addresses and the protocol are the packet's.
    pub const ADDRESSES: u8 = 1;
    /// The ports are the packet's (UDP or TCP right after the IP header, not a later fragment).
    pub const PORTS: u8 = 2;
}
const _: () = assert!(size_of::<MonitorEvent>() == 64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_reasons_asked_for_are_watched() {
        let settings = MonitorSettings {
            reasons: 1 << ExitReason::NoBinding as u32,
            ..MonitorSettings::default()
        };
        assert!(settings.watches(ExitReason::NoBinding as u32));
        assert!(!settings.watches(ExitReason::NotUdpPassed as u32));
        assert!(!settings.watches(64));
    }

    #[test]
    fn hooks_round_trip_through_their_number() {
        for hook in [
            MonitorHook::XdpGate,
            MonitorHook::TcGate,
            MonitorHook::TcInbound,
            MonitorHook::TcInternal,
        ] {
            assert_eq!(MonitorHook::from_u8(hook as u8), Some(hook));
        }
        assert_eq!(MonitorHook::from_u8(4), None);
    }
}
