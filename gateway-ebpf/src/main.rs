//! The gateway's datapath.
//!
//! - `gateway_external` (XDP, external interface): the gate. Admits inbound UDP only when an
//!   exact binding or a host allow-list entry names it, drops every other UDP datagram and every
//!   TCP segment to a SOCKS control listener, passes other traffic, and fails closed when the
//!   daemon's heartbeat stops.
//! - `gateway_inbound` (tc ingress, external interface): relays kernel-mode binding hits to their
//!   client: rewrite, frame, fix checksums, `bpf_redirect_neigh` out of the internal interface.
//! - `gateway_internal` (tc ingress, internal interface): drops UDP from inside to the gateway's
//!   external addresses, and relays bound clients' datagrams to their remotes in the kernel.
//!
//! Every exit is counted by reason; malformed input is a counted drop or goes to user space. No
//! logging on the per-packet path: the rare events an operator must see are logged, rate-limited,
//! from the branches that meet them (`events`).
#![no_std]
#![no_main]
mod events;
mod maps;
mod parse;
mod tc;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use gateway_common::{BindingKey, ControlPortKey, ExitReason, HostAllowKey, Verdict, relay_mode};

use crate::{
    maps::{BINDINGS, CONTROL_PORTS, HOST_ALLOW, count, daemon_alive},
    parse::{Flow, Transport, parse_flow},
};

#[expect(
    clippy::needless_pass_by_value,
    reason = "the entry point's signature is the xdp macro's"
)]
#[xdp]
pub fn gateway_external(ctx: XdpContext) -> u32 {
    let reason = match classify(&ctx) {
        Ok(reason) | Err(reason) => reason,
    };
    count(reason, ctx.data_end() - ctx.data());
    match reason.verdict() {
        Verdict::Pass | Verdict::Redirect => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
    }
}

/// Decides the exit of one frame. `Err` carries parse failures; both arms are counted alike.
#[inline(always)]
fn classify(ctx: &XdpContext) -> Result<ExitReason, ExitReason> {
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
    let mut binding_key = BindingKey {
        remote_addr: flow.src_addr,
        relay_addr: flow.dst_addr,
        remote_port_be: flow.src_port_be,
        relay_port_be: flow.dst_port_be,
    };
    // SAFETY: one field is copied out at once (here and in the two lookups below).
    let mut found = unsafe { BINDINGS.get(&binding_key) }.map(|value| value.mode);
    if found.is_none() {
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
