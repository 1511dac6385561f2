//! Drop and admit events for `gateway monitor`: at a counted exit of the gate, the inbound
//! relay and the internal interface's program, when a watcher holds a live lease and watches the reason, the packet's addresses,
//! ports and interface go into the `MONITOR_EVENTS` ring buffer, sampled and rate-limited per
//! CPU, so a junk flood costs the fast path no more than the read of one array entry and, for a
//! watched reason, a counter.
//!
//! The event writer keeps nothing on the stack but spilled registers: the internal interface's
//! program already uses most of the 512 octets Linux 6.1 allows its call chain (see
//! `tc::internal`). The fan-out's copies are counted, not watched; the gate's
//! `multicast_to_fan_out` event shows the datagram they copy.

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, PerCpuArray, RingBuf},
    programs::{TcContext, XdpContext},
};
use gateway_common::{
    Addr16, EVENTS_RING_BYTES, ExitReason, MonitorBudget, MonitorEvent, MonitorHook,
    MonitorSettings, monitor_flow,
};

use crate::parse::{
    ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IPV4, ETH_P_IPV6, Frame, IPPROTO_TCP, IPPROTO_UDP,
    IPV4_MIN_HLEN, IPV4_OFFSET, IPV6_HLEN, VLAN_HLEN,
};

#[map(name = "MONITOR_SETTINGS")]
static MONITOR_SETTINGS: Array<MonitorSettings> = Array::with_max_entries(1, 0);

#[map(name = "MONITOR_BUDGET")]
static MONITOR_BUDGET: PerCpuArray<MonitorBudget> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "MONITOR_EVENTS")]
static MONITOR_EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

/// A context that knows the interface its packet arrived on.
pub trait Ingress: Frame {
    fn ingress_ifindex(&self) -> u32;
}

impl Ingress for XdpContext {
    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        // SAFETY: the context pointer is the kernel's, valid during the program.
        unsafe { (*self.ctx).ingress_ifindex }
    }
}

impl Ingress for TcContext {
    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        // SAFETY: as above.
        unsafe { (*self.skb.skb).ingress_ifindex }
    }
}

/// The exit `reason` of a packet of `len` octets: an event when it is watched. Sampling and
/// the rate limit are inline and read no clock, so a flood's packets over the limit cost two
/// array reads and a counter; only an event to write goes out of line.
#[inline(always)]
pub fn observe<C: Ingress>(ctx: &C, reason: ExitReason, len: usize, hook: MonitorHook) {
    let Some(settings) = MONITOR_SETTINGS.get(0) else {
        return;
    };
    if settings.lease_until_ns == 0 || !settings.watches(reason as u32) {
        return;
    }
    let Some(budget) = MONITOR_BUDGET.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: a per-CPU slot from a successful lookup: no other writer, valid during the
    // program.
    let budget = unsafe { &mut *budget };
    budget.seen += 1;
    if settings.sample_every > 1 && budget.seen % u64::from(settings.sample_every) != 0 {
        budget.sampled_out += 1;
        return;
    }
    let window = u64::from(settings.window);
    if budget.window != window {
        budget.window = window;
        budget.window_events = 0;
    }
    if budget.window_events >= u64::from(settings.events_per_second) {
        budget.rate_limited += 1;
        return;
    }
    budget.window_events += 1;
    record(
        ctx,
        reason as u32,
        u32::try_from(len).unwrap_or(u32::MAX),
        hook as u8,
    );
}

/// Writes the event, within the lease.
#[inline(never)]
fn record<C: Ingress>(ctx: &C, reason: u32, len: u32, hook: u8) {
    let (Some(settings), Some(budget)) = (MONITOR_SETTINGS.get(0), MONITOR_BUDGET.get_ptr_mut(0))
    else {
        return;
    };
    // SAFETY: as in `observe`.
    let budget = unsafe { &mut *budget };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if now >= settings.lease_until_ns {
        return;
    }
    let Some(mut entry) = MONITOR_EVENTS.reserve::<MonitorEvent>(0) else {
        budget.ring_full += 1;
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: the entry is reserved ring-buffer memory the size of an event; every field is
    // written before it is submitted.
    unsafe {
        // Word by word and volatile, so no `memset` subprogram adds a frame to the chain.
        let words = event.cast::<u64>();
        for word in 0..size_of::<MonitorEvent>() / 8 {
            write_volatile(words.add(word), 0);
        }
        (*event).time_ns = now;
        (*event).reason = reason;
        (*event).ifindex = ctx.ingress_ifindex();
        (*event).len = len;
        (*event).hook = hook;
        (*event).flow = read_flow(ctx, event);
    }
    entry.submit(0);
    budget.emitted += 1;
}

/// Copies `N` octets from packet address `from` to `to` one by one: neither a temporary on the
/// stack nor a `memcpy` subprogram (volatile, so the loop is not turned into one).
///
/// # Safety
/// `from..from + N` is inside the packet; `to..to + N` is writable.
#[inline(always)]
unsafe fn copy_octets<const N: usize>(from: usize, to: *mut u8) {
    for index in 0..N {
        // SAFETY: the caller's contract.
        unsafe { write_volatile(to.add(index), read_volatile((from + index) as *const u8)) };
    }
}

/// Writes the IPv4 address at packet address `from` IPv4-mapped into `to` (zeroed).
///
/// # Safety
/// `from..from + 4` is inside the packet; `to` is writable and zeroed.
#[inline(always)]
unsafe fn copy_ipv4_mapped(from: usize, to: *mut Addr16) {
    // SAFETY: the caller's contract.
    unsafe {
        let to = to.cast::<u8>();
        write_volatile(to.add(10), 0xff);
        write_volatile(to.add(11), 0xff);
        copy_octets::<4>(from, to.add(12));
    }
}

/// Copies the packet's addresses, protocol and ports into `event`, straight from the packet to
/// the ring buffer (the gate's own parser keeps a flow on the stack, which the XDP gate's frame
/// has no room left for); returns the [`monitor_flow`] bits of what it could read. Only the
/// shape matters here, not its validity: the exit reason already says what the gate found.
///
/// # Safety
/// `event` points to a reserved, writable event.
#[inline(always)]
unsafe fn read_flow<C: Frame>(ctx: &C, event: *mut MonitorEvent) -> u8 {
    // SAFETY: every read is inside the packet bounds checked just before it (the verifier
    // checks so too); `event` is writable (the caller's contract).
    unsafe {
        let start = ctx.start();
        let end = ctx.end();
        if start + ETH_HLEN > end {
            return 0;
        }
        let mut l3 = ETH_HLEN;
        let mut ether_type = u16::from_be_bytes(*((start + 12) as *const [u8; 2]));
        for _ in 0..2 {
            if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
                if start + l3 + VLAN_HLEN > end {
                    return 0;
                }
                ether_type = u16::from_be_bytes(*((start + l3 + 2) as *const [u8; 2]));
                l3 += VLAN_HLEN;
            }
        }
        let (l4, protocol, later_fragment) = match ether_type {
            ETH_P_IPV4 => {
                let ip = start + l3;
                if ip + IPV4_MIN_HLEN > end {
                    return 0;
                }
                let header_len = usize::from(*(ip as *const u8) & 0x0f) * 4;
                let offset = u16::from_be_bytes(*((ip + 6) as *const [u8; 2])) & IPV4_OFFSET;
                copy_ipv4_mapped(ip + 12, &raw mut (*event).src_addr);
                copy_ipv4_mapped(ip + 16, &raw mut (*event).dst_addr);
                (l3 + header_len, *((ip + 9) as *const u8), offset != 0)
            }
            ETH_P_IPV6 => {
                let ip = start + l3;
                if ip + IPV6_HLEN > end {
                    return 0;
                }
                copy_octets::<16>(ip + 8, (&raw mut (*event).src_addr).cast());
                copy_octets::<16>(ip + 24, (&raw mut (*event).dst_addr).cast());
                (l3 + IPV6_HLEN, *((ip + 6) as *const u8), false)
            }
            _ => return 0,
        };
        (*event).protocol = protocol;
        if later_fragment || (protocol != IPPROTO_UDP && protocol != IPPROTO_TCP) {
            return monitor_flow::ADDRESSES;
        }
        let ports = start + l4;
        if ports + 4 > end {
            return monitor_flow::ADDRESSES;
        }
        (*event).src_port_be = u16::from_ne_bytes(*(ports as *const [u8; 2]));
        (*event).dst_port_be = u16::from_ne_bytes(*((ports + 2) as *const [u8; 2]));
        monitor_flow::ADDRESSES | monitor_flow::PORTS
    }
}
