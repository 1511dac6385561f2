//! The gateway's datapath. `gateway_external` runs in XDP on the external interface: it admits
//! inbound UDP only when an exact binding or a host allow-list entry names it, drops every other
//! UDP datagram, passes non-UDP traffic, and counts every exit by reason.
//!
//! No logging on the per-packet path; malformed input is a counted drop.
#![no_std]
#![no_main]

mod parse;

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, xdp_action},
    macros::{map, xdp},
    maps::{HashMap, PerCpuArray},
    programs::XdpContext,
};
use gateway_common::{
    BindingKey, BindingValue, Counter, DEFAULT_MAX_BINDINGS, DropReason, HostAllowKey,
    HostAllowValue, MAX_HOST_ALLOW, Verdict,
};

use crate::parse::{UdpFlow, parse_udp_flow};

#[map(name = "EXIT_COUNTERS")]
static EXIT_COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(DropReason::COUNT, 0);

#[map(name = "BINDINGS")]
static BINDINGS: HashMap<BindingKey, BindingValue> =
    HashMap::with_max_entries(DEFAULT_MAX_BINDINGS, BPF_F_NO_PREALLOC);

#[map(name = "HOST_ALLOW")]
static HOST_ALLOW: HashMap<HostAllowKey, HostAllowValue> =
    HashMap::with_max_entries(MAX_HOST_ALLOW, BPF_F_NO_PREALLOC);

#[xdp]
pub fn gateway_external(ctx: XdpContext) -> u32 {
    let reason = match classify(&ctx) {
        Ok(reason) | Err(reason) => reason,
    };
    count(reason, ctx.data_end() - ctx.data());
    match reason.verdict() {
        Verdict::Pass => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
    }
}

/// Decides the exit of one frame. `Err` carries parse failures; both arms are counted alike.
#[inline(always)]
fn classify(ctx: &XdpContext) -> Result<DropReason, DropReason> {
    let flow = match parse_udp_flow(ctx)? {
        Some(flow) => flow,
        None => return Ok(DropReason::NotUdpPassed),
    };
    Ok(admit(&flow))
}

#[inline(always)]
fn admit(flow: &UdpFlow) -> DropReason {
    let allow_key = HostAllowKey {
        remote_addr: flow.src_addr,
        local_addr: flow.dst_addr,
        remote_port_be: flow.src_port_be,
        local_port_be: flow.dst_port_be,
    };
    // SAFETY: the value is only tested for presence, never read after a concurrent delete.
    if unsafe { HOST_ALLOW.get(&allow_key) }.is_some() {
        return DropReason::HostAllowListed;
    }
    let binding_key = BindingKey {
        remote_addr: flow.src_addr,
        relay_addr: flow.dst_addr,
        remote_port_be: flow.src_port_be,
        relay_port_be: flow.dst_port_be,
    };
    // SAFETY: as above; the value is copied out immediately.
    if unsafe { BINDINGS.get(&binding_key) }.is_some() {
        return DropReason::BindingToUserspace;
    }
    DropReason::NoBinding
}

#[inline(always)]
fn count(reason: DropReason, bytes: usize) {
    if let Some(counter) = EXIT_COUNTERS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, so no other writer; the pointer comes from a successful lookup.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += bytes as u64;
        }
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
