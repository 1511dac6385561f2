//! The gate's decision for one frame on the external interface, the same in XDP and in tc:
//! which exact binding, host allow-list entry or control listener it meets, and so its exit.

use gateway_common::{
    Addr16, BindingKey, ControlPortKey, ExitReason, GroupKey, GroupSourceKey, HostAllowKey,
    group_flags, relay_mode,
};

use crate::{
    events,
    maps::{BINDINGS, CONTROL_PORTS, GROUP_SOURCES, GROUPS, HOST_ALLOW, daemon_alive},
    parse::{Flow, Frame, Transport, parse_flow},
};

/// Decides the exit of one frame. `Err` carries parse failures; both arms are counted alike.
#[inline(always)]
pub fn classify<F: Frame>(ctx: &F) -> Result<ExitReason, ExitReason> {
    let Some(flow) = parse_flow(ctx)? else {
        return Ok(ExitReason::NotUdpPassed);
    };
    Ok(match flow.transport {
        Transport::Udp => admit(&flow),
        Transport::Tcp if is_control_port(&flow) => ExitReason::ControlPortFromOutside,
        Transport::Tcp => ExitReason::NotUdpPassed,
    })
}

/// Whether a TCP segment from outside is addressed to a SOCKS control listener (exactly, or a
/// wildcard listener on its port).
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "the key is lent to the map helper, not copied again onto the 512-byte BPF stack"
)]
#[inline(always)]
fn is_control_port(flow: &Flow) -> bool {
    let mut key = ControlPortKey {
        addr: flow.dst_addr,
        port_be: flow.dst_port_be,
        padding: 0,
    };
    // SAFETY: presence only.
    if unsafe { CONTROL_PORTS.get(&key) }.is_some() {
        return true;
    }
    key.addr = [0; 16];
    // SAFETY: presence only.
    unsafe { CONTROL_PORTS.get(&key) }.is_some()
}

#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "the key is lent to the map helper, not copied again onto the 512-byte BPF stack"
)]
#[inline(always)]
fn admit(flow: &Flow) -> ExitReason {
    if is_multicast(&flow.dst_addr)
        && let Some(reason) = admit_group(flow)
    {
        return reason;
    }
    let mut binding_key = BindingKey {
        remote_addr: flow.src_addr,
        relay_addr: flow.dst_addr,
        remote_port_be: flow.src_port_be,
        relay_port_be: flow.dst_port_be,
    };
    // The exact binding first: relayed media, the common hit, takes one lookup. (The resolver's
    // flows never meet a binding, their ports being outside the reserved relay ranges; an
    // operator's allow-list entry for a relay port's exact flow yields to the binding.)
    // SAFETY: one field is copied out at once (here and in the two lookups below).
    let mut found = unsafe { BINDINGS.get(&binding_key) }.map(|value| value.mode);
    if found.is_none() {
        let allow_key = HostAllowKey {
            remote_addr: flow.src_addr,
            local_addr: flow.dst_addr,
            remote_port_be: flow.src_port_be,
            local_port_be: flow.dst_port_be,
        };
        // SAFETY: the value is only tested for presence.
        if unsafe { HOST_ALLOW.get(&allow_key) }.is_some() {
            return ExitReason::HostAllowListed;
        }
        // A host-level binding (remote port 0, only where policy allows it).
        binding_key.remote_port_be = 0;
        // SAFETY: as above.
        found = unsafe { BINDINGS.get(&binding_key) }.map(|value| value.mode);
    }
    if found.is_none() {
        // A Listen binding: any remote to this relay port (only where policy allows it).
        binding_key.remote_addr = [0; 16];
        // SAFETY: as above.
        found = unsafe { BINDINGS.get(&binding_key) }.map(|value| value.mode);
    }
    let Some(mode) = found else {
        return ExitReason::NoBinding;
    };
    if !daemon_alive() {
        events::stale_heartbeat(
            &flow.src_addr,
            flow.src_port_be,
            &flow.dst_addr,
            flow.dst_port_be,
        );
        return ExitReason::DaemonGone;
    }
    if mode == relay_mode::KERNEL {
        ExitReason::BindingToKernelRelay
    } else {
        ExitReason::BindingToUserspace
    }
}

/// Whether an address (IPv4-mapped for IPv4) is multicast: `224.0.0.0/4` or `ff00::/8`.
#[inline(always)]
pub fn is_multicast(addr: &Addr16) -> bool {
    if addr[..10] == [0; 10] && addr[10] == 0xff && addr[11] == 0xff {
        addr[12] & 0xf0 == 0xe0
    } else {
        addr[0] == 0xff
    }
}

/// A datagram to a multicast group: `None` when the group (address and port) is not received,
/// so the datagram meets the host allow-list like any other; otherwise the gate's exit: a
/// source not on the group's list, the daemon gone, or the tc fan-out.
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "the key is lent to the map helper, not copied again onto the 512-byte BPF stack"
)]
#[inline(always)]
fn admit_group(flow: &Flow) -> Option<ExitReason> {
    let key = GroupKey {
        group: flow.dst_addr,
        port_be: flow.dst_port_be,
        padding: 0,
    };
    // SAFETY: one field is copied out at once.
    let flags = unsafe { GROUPS.get(&key) }.map(|value| value.flags)?;
    if flags & group_flags::SOURCE_LIST != 0 {
        let source = GroupSourceKey {
            group: flow.dst_addr,
            source: flow.src_addr,
            port_be: flow.dst_port_be,
            padding: 0,
        };
        // SAFETY: presence only.
        if unsafe { GROUP_SOURCES.get(&source) }.is_none() {
            return Some(ExitReason::MulticastSourceNotAllowed);
        }
    }
    if !daemon_alive() {
        return Some(ExitReason::DaemonGone);
    }
    Some(ExitReason::MulticastToFanOut)
}
