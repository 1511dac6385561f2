//! The pure half of `gateway monitor`: which reasons a watcher asks for, and how one event from
//! the ring buffer reads for people and for JSON.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    time::{Duration, SystemTime},
};

use gateway_common::{ExitReason, MonitorEvent, MonitorHook, monitor_flow};
use serde::Serialize;
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SelectError {
    #[error("unknown reason {given:?}; the reasons are: {}", reason_names())]
    UnknownReason { given: String },
}

fn reason_names() -> String {
    ExitReason::ALL
        .iter()
        .map(|reason| reason.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Exits that are the stack's ordinary traffic or bookkeeping of another exit, left out unless
/// asked for by name: ARP, ICMP and TCP passed; the inbound relay's pass of what the XDP gate
/// already admitted; the fan-out's copy for the userspace relay.
const QUIET: [ExitReason; 3] = [
    ExitReason::NotUdpPassed,
    ExitReason::InboundToStack,
    ExitReason::MulticastToUserspace,
];

/// The reason bits of [`gateway_common::MonitorSettings::reasons`] for the names asked for;
/// none: every reason but the quiet ones.
pub fn reason_mask(names: &[String]) -> Result<u64, SelectError> {
    if names.is_empty() {
        return Ok(ExitReason::ALL
            .iter()
            .filter(|reason| !QUIET.contains(reason))
            .fold(0, |mask, reason| mask | 1 << *reason as u32));
    }
    names.iter().try_fold(0, |mask, name| {
        let reason = ExitReason::ALL
            .iter()
            .find(|reason| reason.name() == name.as_str())
            .ok_or_else(|| SelectError::UnknownReason {
                given: name.clone(),
            })?;
        Ok(mask | 1 << *reason as u32)
    })
}

/// Reads one ring-buffer record; `None` for a record of another size.
pub fn decode(record: &[u8]) -> Option<MonitorEvent> {
    if record.len() != size_of::<MonitorEvent>() {
        return None;
    }
    // SAFETY: the record holds exactly one event, which is plain integers and byte arrays
    // (every bit pattern valid); read_unaligned needs no alignment.
    Some(unsafe { record.as_ptr().cast::<MonitorEvent>().read_unaligned() })
}

/// One event as `gateway monitor --json` prints it (one object per line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EventLine {
    /// RFC 3339, UTC, microseconds.
    pub time: String,
    /// `drop`, `pass` or `redirect`.
    pub verdict: &'static str,
    pub reason: &'static str,
    /// `udp`, `tcp`, another IP protocol's number, or `unknown` when the program could not
    /// read the headers.
    pub protocol: String,
    /// Absent when the headers could not be read.
    pub source: Option<IpAddr>,
    /// Absent when the packet's ports could not be read (not UDP or TCP, a later fragment).
    pub source_port: Option<u16>,
    pub destination: Option<IpAddr>,
    pub destination_port: Option<u16>,
    /// The interface the packet arrived on (its index when the name is unknown here).
    pub interface: String,
    pub ifindex: u32,
    /// The program that met the exit: `xdp_gate`, `tc_gate`, `tc_inbound` or `tc_internal`.
    pub program: &'static str,
    /// The packet's length in octets.
    pub length: u32,
}

/// The clocks that turn an event's `CLOCK_MONOTONIC` time into wall-clock time: both read at
/// one instant.
#[derive(Debug, Clone, Copy)]
pub struct Clocks {
    pub monotonic_ns: u64,
    pub wall: SystemTime,
}

impl Clocks {
    fn wall_time_of(self, monotonic_ns: u64) -> SystemTime {
        let before = Duration::from_nanos(self.monotonic_ns.saturating_sub(monotonic_ns));
        let after = Duration::from_nanos(monotonic_ns.saturating_sub(self.monotonic_ns));
        (self.wall - before) + after
    }
}

fn address(addr: [u8; 16]) -> IpAddr {
    Ipv6Addr::from(addr).to_canonical()
}

/// The line of `event`; `interface` names an interface index.
pub fn line(
    event: &MonitorEvent,
    clocks: Clocks,
    interface: impl FnOnce(u32) -> Option<String>,
) -> EventLine {
    let reason = ExitReason::from_u32(event.reason);
    let addresses = event.flow & monitor_flow::ADDRESSES != 0;
    let ports = addresses && event.flow & monitor_flow::PORTS != 0;
    let protocol = match (addresses, event.protocol) {
        (false, _) => "unknown".to_owned(),
        (true, 17) => "udp".to_owned(),
        (true, 6) => "tcp".to_owned(),
        (true, other) => other.to_string(),
    };
    EventLine {
        time: humantime::format_rfc3339_micros(clocks.wall_time_of(event.time_ns)).to_string(),
        verdict: reason.map_or("unknown", |reason| reason.verdict().name()),
        reason: reason.map_or("unknown", ExitReason::name),
        protocol,
        source: addresses.then(|| address(event.src_addr)),
        source_port: ports.then(|| u16::from_be(event.src_port_be)),
        destination: addresses.then(|| address(event.dst_addr)),
        destination_port: ports.then(|| u16::from_be(event.dst_port_be)),
        interface: interface(event.ifindex).unwrap_or_else(|| event.ifindex.to_string()),
        ifindex: event.ifindex,
        program: MonitorHook::from_u8(event.hook).map_or("unknown", MonitorHook::name),
        length: event.len,
    }
}

impl EventLine {
    /// `TIME VERDICT REASON PROTO SOURCE -> DESTINATION len N on IFACE (PROGRAM)`.
    pub fn to_text(&self) -> String {
        let mut out = format!(
            "{} {:<8} {:<30} {:<4}",
            self.time, self.verdict, self.reason, self.protocol
        );
        match (self.source, self.destination) {
            (Some(source), Some(destination)) => {
                let _ = write!(
                    out,
                    " {} -> {}",
                    endpoint(source, self.source_port),
                    endpoint(destination, self.destination_port)
                );
            }
            _ => out.push_str(" (headers unreadable)"),
        }
        let _ = write!(
            out,
            " len {} on {} ({})",
            self.length, self.interface, self.program
        );
        out
    }
}

/// `ip:port` (`[ip]:port` for IPv6), or the address alone without a port.
fn endpoint(address: IpAddr, port: Option<u16>) -> String {
    match port {
        Some(port) => SocketAddr::new(address, port).to_string(),
        None => address.to_string(),
    }
}

/// What the kernel's budget left out, summed over CPUs, as the watcher reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Suppressed {
    pub emitted: u64,
    pub sampled_out: u64,
    pub rate_limited: u64,
    pub ring_full: u64,
}

impl Suppressed {
    /// What happened since `earlier`.
    #[must_use]
    pub fn since(self, earlier: Self) -> Self {
        Self {
            emitted: self.emitted.saturating_sub(earlier.emitted),
            sampled_out: self.sampled_out.saturating_sub(earlier.sampled_out),
            rate_limited: self.rate_limited.saturating_sub(earlier.rate_limited),
            ring_full: self.ring_full.saturating_sub(earlier.ring_full),
        }
    }

    pub fn summary(self) -> String {
        format!(
            "{} events written by the kernel, {} sampled out, {} over the rate limit, {} lost to \
             a full ring buffer",
            self.emitted, self.sampled_out, self.rate_limited, self.ring_full
        )
    }
}

#[cfg(test)]
mod tests {
    use gateway_common::ipv4_mapped;

    use super::*;

    fn event() -> MonitorEvent {
        MonitorEvent {
            time_ns: 5_000_000_000,
            src_addr: ipv4_mapped([203, 0, 113, 10]),
            dst_addr: ipv4_mapped([198, 51, 100, 1]),
            reason: ExitReason::NoBinding as u32,
            ifindex: 7,
            len: 70,
            src_port_be: 40_001u16.to_be(),
            dst_port_be: 50_000u16.to_be(),
            protocol: 17,
            hook: MonitorHook::XdpGate as u8,
            flow: monitor_flow::ADDRESSES | monitor_flow::PORTS,
            padding: [0; 5],
        }
    }

    fn clocks() -> Clocks {
        Clocks {
            monotonic_ns: 6_000_000_000,
            wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_000_000),
        }
    }

    #[test]
    fn no_names_watch_every_reason_but_the_quiet_ones() {
        let mask = reason_mask(&[]).unwrap();
        for reason in ExitReason::ALL {
            assert_eq!(
                mask & 1 << reason as u32 != 0,
                !QUIET.contains(&reason),
                "{}",
                reason.name()
            );
        }
    }

    #[test]
    fn names_select_their_reasons_and_a_wrong_one_lists_the_right_ones() {
        let names = ["no_binding".to_owned(), "not_udp_passed".to_owned()];
        assert_eq!(
            reason_mask(&names).unwrap(),
            1 << ExitReason::NoBinding as u32 | 1 << ExitReason::NotUdpPassed as u32
        );
        let error = reason_mask(&["no_bindings".to_owned()]).unwrap_err();
        assert!(error.to_string().contains("no_binding, truncated_header"));
    }

    #[test]
    fn a_record_of_another_size_is_not_an_event() {
        assert_eq!(decode(&[0; 63]), None);
        let event = event();
        // SAFETY: the event is plain data of its size.
        let bytes = unsafe {
            std::slice::from_raw_parts((&raw const event).cast::<u8>(), size_of::<MonitorEvent>())
        };
        assert_eq!(decode(bytes), Some(event));
    }

    #[test]
    fn an_event_reads_with_its_addresses_ports_reason_and_wall_time() {
        let line = line(&event(), clocks(), |index| {
            (index == 7).then(|| "ext0".to_owned())
        });
        assert_eq!(line.verdict, "drop");
        assert_eq!(line.reason, "no_binding");
        assert_eq!(line.source, Some("203.0.113.10".parse().unwrap()));
        assert_eq!(line.source_port, Some(40001));
        assert_eq!(line.destination, Some("198.51.100.1".parse().unwrap()));
        assert_eq!(line.destination_port, Some(50000));
        // One second before the clocks were read.
        assert_eq!(line.time, "2026-11-30T00:53:19.000000Z");
        assert_eq!(
            line.to_text(),
            "2026-11-30T00:53:19.000000Z drop     no_binding                     udp  \
             203.0.113.10:40001 -> 198.51.100.1:50000 len 70 on ext0 (xdp_gate)"
        );
        let json = serde_json::to_value(&line).unwrap();
        assert_eq!(json["source"], "203.0.113.10");
        assert_eq!(json["source_port"], 40001);
        assert_eq!(json["interface"], "ext0");
        assert_eq!(json["program"], "xdp_gate");
    }

    #[test]
    fn unreadable_headers_and_unknown_interfaces_still_make_a_line() {
        let mut event = event();
        event.flow = 0;
        let line = line(&event, clocks(), |_| None);
        assert_eq!((line.source, line.source_port), (None, None));
        assert_eq!(line.protocol, "unknown");
        assert_eq!(line.interface, "7");
        assert!(line.to_text().contains("(headers unreadable)"));
    }

    #[test]
    fn ipv6_addresses_stay_ipv6() {
        let mut event = event();
        event.src_addr = "2001:db8::10".parse::<Ipv6Addr>().unwrap().octets();
        let line = line(&event, clocks(), |_| None);
        assert!(line.to_text().contains(" [2001:db8::10]:40001 -> "));
    }

    #[test]
    fn without_ports_the_addresses_and_protocol_number_remain() {
        let mut event = event();
        event.flow = monitor_flow::ADDRESSES;
        event.protocol = 1;
        let line = line(&event, clocks(), |_| None);
        assert_eq!(line.protocol, "1");
        assert_eq!(line.source_port, None);
        assert!(
            line.to_text()
                .contains(" 203.0.113.10 -> 198.51.100.1 len ")
        );
    }

    #[test]
    fn suppressed_counts_are_reported_since_the_watch_began() {
        let before = Suppressed {
            emitted: 5,
            sampled_out: 10,
            rate_limited: 0,
            ring_full: 1,
        };
        let now = Suppressed {
            emitted: 8,
            sampled_out: 30,
            rate_limited: 4,
            ring_full: 1,
        };
        assert_eq!(
            now.since(before),
            Suppressed {
                emitted: 3,
                sampled_out: 20,
                rate_limited: 4,
                ring_full: 0,
            }
        );
    }
}
