//! The gateway's datapath.
//!
//! - `gateway_external` (XDP, external interface): the gate. Admits inbound UDP only when an
//!   exact binding or a host allow-list entry names it, drops every other UDP datagram and every
//!   TCP segment to a SOCKS control listener, passes other traffic, and fails closed when the
//!   daemon's heartbeat stops.
//! - `gateway_inbound` (tc ingress, external interface): relays kernel-mode binding hits to their
//!   client: rewrite, frame, fix checksums, `bpf_redirect_neigh` out of the internal interface.
//! - `gateway_gate` (tc ingress, external interface): the gate and `gateway_inbound` in one
//!   program, for links where XDP only adds a copy (veth, generic XDP); attached instead of the
//!   other two there.
//! - The multicast fan-out (`fanout`, run by both tc programs on the external interface): a
//!   datagram to a received group is copied to the userspace relay, re-sent inside to the group
//!   and delivered as unicast with the 8-octet header to each subscriber the kernel serves.
//! - `gateway_internal` (tc ingress, internal interface): drops UDP from inside to the gateway's
//!   external addresses, and relays bound clients' datagrams to their remotes in the kernel.
//! - `gateway_relay_lookup` (`sk_lookup`, the daemon's network namespace): steers what reaches
//!   the host for a relay port to the daemon's shared relay socket of that family and side.
//!
//! Every exit is counted by reason; malformed input is a counted drop or goes to user space. No
//! logging on the per-packet path: the rare events an operator must see are logged, rate-limited,
//! from the branches that meet them (`events`); `gateway monitor` watches the external
//! programs' exits, sampled and rate-limited (`monitor`).
#![no_std]
#![no_main]
mod events;
mod fanout;
mod gate;
mod maps;
mod monitor;
mod parse;
mod steer;
mod tc;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use gateway_common::{MonitorHook, Verdict};

use crate::maps::count;

#[expect(
    clippy::needless_pass_by_value,
    reason = "the entry point's signature is the xdp macro's"
)]
#[xdp]
pub fn gateway_external(ctx: XdpContext) -> u32 {
    let reason = match gate::classify(&ctx) {
        Ok(reason) | Err(reason) => reason,
    };
    let len = ctx.data_end() - ctx.data();
    count(reason, len);
    monitor::observe(&ctx, reason, len, MonitorHook::XdpGate);
    match reason.verdict() {
        Verdict::Pass | Verdict::Redirect => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
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
