//! The multicast fan-out (tc, external interface's ingress): one datagram to a received group
//! (`GROUPS`) becomes, in this order,
//!
//! 1. with `TO_USERSPACE`, an untouched copy back into the external interface's input, marked
//!    `FANOUT_TO_STACK_MARK` so the tc programs pass it to the stack and the userspace relay;
//! 2. with `INSIDE_MULTICAST`, a re-send on the internal interface to the same group (group MAC,
//!    `inside_source`, TTL / hop limit 1, no header);
//! 3. one unicast copy per kernel subscriber, with the 8-octet header `00 00 0000 AID`.
//!
//! Every delivery but the last is a `bpf_clone_redirect` of the skb as it is then; the last is
//! the skb itself (`bpf_redirect`). The packet is rewritten in place from one delivery to the
//! next, each rewrite reading the old values from the packet, so the checksum helpers' updates
//! chain. What the kernel cannot do right (a partial checksum, a datagram that would not fit
//! the internal link) goes to the stack whole, and the userspace relay serves everyone.
//!
//! The subscriber loop carries no state from one subscriber to the next (the verifier walks each
//! of the 64 iterations; a value carried along would multiply its paths). Each copy is counted
//! under its own reason here; the skb itself under the reason it leaves with.

use aya_ebpf::{
    bindings::{
        BPF_F_INGRESS, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_REDIRECT, TC_ACT_SHOT,
        bpf_adj_room_mode::BPF_ADJ_ROOM_NET,
    },
    helpers::{bpf_csum_diff, bpf_redirect},
    programs::TcContext,
};
use gateway_common::{
    Addr16, EntryCounters, ExitReason, FANOUT_TO_STACK_MARK, GroupKey, GroupSubscriber,
    MAX_KERNEL_SUBSCRIBERS, SMALL_FANOUT_SUBSCRIBERS, group_flags,
};

use crate::{
    gate::is_multicast,
    maps::{GROUPS, count, daemon_alive, settings, touch},
    tc::{
        Datagram, ETH_HLEN, Relayed, UDP_HLEN, action_of, checksum_is_partial, fits_link,
        is_ipv4_mapped, parse, relay_failed,
    },
};

/// What [`fanout`] returns for a datagram that is not to a received group (`TC_ACT_UNSPEC`,
/// which the fan-out never returns otherwise).
pub const NOT_A_GROUP: i32 = -1;

/// The enhanced mode's header in front of each subscriber's copy: `RSV FRAG DGID(2) AID(4)`.
const HEADER_LEN: usize = 8;
/// [`HEADER_LEN`] as the growth `bpf_check_mtu` takes.
const HEADER_GROWTH: i32 = 8;
/// Offset of the IPv4 header checksum.
const IP_CSUM: usize = ETH_HLEN + 10;
const ETH_P_IPV4: u16 = 0x0800;
const IPPROTO_UDP: u8 = 17;
const ETH_P_IPV6: u16 = 0x86dd;
/// TTL (hop limit) of the unicast copies.
const UNICAST_TTL: u8 = 64;

/// Whether the skb is the fan-out's own copy for the stack (the tc programs pass it untouched).
#[inline(always)]
pub fn is_stack_copy(ctx: &TcContext) -> bool {
    // SAFETY: a plain read of the program's context.
    unsafe { (*ctx.skb.skb).mark == FANOUT_TO_STACK_MARK }
}

/// Fans a group datagram out and counts every copy and the skb's own exit; returns the tc
/// action, or [`NOT_A_GROUP`] (nothing counted) for anything else. Out of line, so its frame is
/// a sibling of the relay's under the entry point.
/// `N` is how many subscribers of a group it delivers to at most (the verifier walks each).
#[inline(never)]
pub fn fanout<const N: usize>(ctx: &TcContext) -> i32 {
    let (action, reason) = match try_fanout::<N>(ctx) {
        Ok(Some(relayed)) => (relayed.action, relayed.reason),
        Ok(None) => return NOT_A_GROUP,
        Err(reason) => (action_of(reason), reason),
    };
    count(reason, ctx.len() as usize);
    action
}

/// Jumps to the fan-out program (slot 0 of `FANOUT_PROGRAMS`); returns only when the slot is
/// empty (the program did not load on this kernel). Called from an entry function's own frame:
/// a tail call from a subprogram is refused behind frames of 256 octets or more.
#[inline(always)]
pub fn tail_call(ctx: &TcContext) {
    // SAFETY: `ctx` is the program's own context; a failed tail call returns and changes nothing.
    unsafe { crate::maps::FANOUT_PROGRAMS.tail_call(ctx, 0) };
}

/// The fan-out program: every group datagram the tc program on the external interface hands
/// over. What it cannot deliver goes to the stack whole for the userspace relay.
#[expect(
    clippy::needless_pass_by_value,
    reason = "the entry point's signature is the classifier macro's"
)]
#[aya_ebpf::macros::classifier]
pub fn gateway_fanout(ctx: TcContext) -> i32 {
    fanout_program::<MAX_KERNEL_SUBSCRIBERS>(&ctx)
}

/// [`gateway_fanout`] for at most `SMALL_FANOUT_SUBSCRIBERS` kernel subscribers, for kernels
/// whose verifier refuses the full one (the daemon then writes no more into a group's entry).
#[expect(
    clippy::needless_pass_by_value,
    reason = "the entry point's signature is the classifier macro's"
)]
#[aya_ebpf::macros::classifier]
pub fn gateway_fanout_small(ctx: TcContext) -> i32 {
    fanout_program::<SMALL_FANOUT_SUBSCRIBERS>(&ctx)
}

#[inline(always)]
fn fanout_program<const N: usize>(ctx: &TcContext) -> i32 {
    let action = fanout::<N>(ctx);
    if action == NOT_A_GROUP {
        // Not a group the gateway receives, or not parsable here (IPv6 extension headers).
        count(ExitReason::MulticastToUserspace, ctx.len() as usize);
        return aya_ebpf::bindings::TC_ACT_OK;
    }
    action
}

/// A quick look before the full parse: UDP to a multicast destination (most datagrams here are
/// unicast).
#[inline(always)]
pub fn to_multicast(ctx: &TcContext) -> bool {
    let Ok(ether_type) = ctx.load::<u16>(12) else {
        return false;
    };
    match u16::from_be(ether_type) {
        ETH_P_IPV4 => {
            ctx.load::<u8>(ETH_HLEN + 16)
                .is_ok_and(|first| first & 0xf0 == 0xe0)
                && ctx.load::<u8>(ETH_HLEN + 9).is_ok_and(|p| p == IPPROTO_UDP)
        }
        // Only UDP right after the fixed header: MLD and the rest of ICMPv6 to groups (behind
        // a hop-by-hop header) are not the fan-out's.
        ETH_P_IPV6 => {
            ctx.load::<u8>(ETH_HLEN + 24)
                .is_ok_and(|first| first == 0xff)
                && ctx.load::<u8>(ETH_HLEN + 6).is_ok_and(|p| p == IPPROTO_UDP)
        }
        _ => false,
    }
}

#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "the key is lent to the map helper, not copied again onto the 512-byte BPF stack"
)]
#[expect(
    clippy::too_many_lines,
    reason = "one fan-out in the order the copies leave, read top to bottom; the subscriber loop \
              stays in this function (moved into a method over a struct of its state, it made \
              every tc program fail to load; not analysed further)"
)]
#[inline(always)]
fn try_fanout<const N: usize>(ctx: &TcContext) -> Result<Option<Relayed>, ExitReason> {
    if !to_multicast(ctx) {
        return Ok(None);
    }
    let Some(packet) = parse(ctx) else {
        return Ok(None);
    };
    if !is_multicast(&packet.dst) {
        return Ok(None);
    }
    let key = GroupKey {
        group: packet.dst,
        port_be: packet.dst_port_be,
        padding: 0,
    };
    let Some(value_ptr) = GROUPS.get_ptr_mut(&key) else {
        return Ok(None);
    };
    if !daemon_alive() {
        // The gate dropped it already; this closes the race with a beat expiring in between.
        return Err(ExitReason::DaemonGone);
    }
    let payload = u64::from(packet.udp_len).saturating_sub(UDP_HLEN as u64);
    // SAFETY: a successful lookup; the entry stays valid for the program's run (RCU). Only
    // fields are read through it, and counters written.
    let (flags, subscribers, inside_ok) = unsafe {
        touch(&raw mut (*value_ptr).received, payload);
        (
            (*value_ptr).flags,
            (*value_ptr).kernel_subscribers,
            is_ipv4_mapped(&(*value_ptr).inside_source) != packet.v6,
        )
    };
    if !packet.whole || checksum_is_partial(ctx, &packet) {
        return Err(ExitReason::MulticastToUserspace);
    }
    let inside = flags & group_flags::INSIDE_MULTICAST != 0 && inside_ok;
    let to_userspace = flags & group_flags::TO_USERSPACE != 0;
    // The daemon writes at most N (it knows which of the programs loaded).
    let subscribers = (subscribers as usize).min(N).min(MAX_KERNEL_SUBSCRIBERS);
    if subscribers == 0 && !inside {
        return Err(if to_userspace {
            // The stack gets the datagram itself: no copy needed.
            ExitReason::MulticastToUserspace
        } else {
            ExitReason::NoBinding
        });
    }
    let settings = settings();
    let internal = settings.internal_ifindex;
    let too_big = (subscribers > 0 && !fits_link(ctx, internal, HEADER_GROWTH))
        || (inside && !fits_link(ctx, internal, 0));
    if too_big {
        // Nothing delivered yet: the userspace relay serves every subscriber.
        return Err(ExitReason::MulticastToUserspace);
    }
    // IPv4 UDP may carry no checksum (0), and then keeps none: every UDP checksum update below
    // passes `BPF_F_MARK_MANGLED_0`, with which the helper leaves a zero checksum alone. No
    // branch on it: one would double the verifier's walk of the subscriber loop.

    if to_userspace {
        // SAFETY: a plain read of the program's context.
        let mark = unsafe { (*ctx.skb.skb).mark };
        ctx.set_mark(FANOUT_TO_STACK_MARK);
        send_copy(
            ctx,
            settings.external_ifindex,
            u64::from(BPF_F_INGRESS),
            ExitReason::MulticastToUserspace,
        );
        ctx.set_mark(mark);
    }
    if inside {
        // SAFETY: the entry pointer from the lookup above.
        let (source, mac) = unsafe { (&(*value_ptr).inside_source, &(*value_ptr).internal_mac) };
        to_group(ctx, &packet, source, mac).map_err(relay_failed)?;
        let reason = ExitReason::KernelRelayedMulticastInside;
        // SAFETY: the entry pointer from the lookup above.
        let inside_sent = unsafe { &raw mut (*value_ptr).inside_sent };
        if subscribers == 0 {
            touch(inside_sent, payload);
            return Ok(Some(send(internal, reason)));
        }
        if send_copy(ctx, internal, 0, reason) {
            touch(inside_sent, payload);
        }
    }

    open_header(ctx, &packet).map_err(relay_failed)?;
    let last = subscribers - 1;
    for i in 0..N {
        if i >= subscribers {
            break;
        }
        // SAFETY: the entry pointer from the lookup above; `get` bounds the index.
        let Some(subscriber) = (unsafe { (*value_ptr).subscribers.get(i) }) else {
            break;
        };
        let subscriber_ptr = core::ptr::from_ref::<GroupSubscriber>(subscriber).cast_mut();
        if !same_family(subscriber, packet.v6) {
            if i == last {
                // Never written by the daemon; the skb, rewritten for no one, is dropped.
                return Err(ExitReason::NoBinding);
            }
            continue;
        }
        // SAFETY: the entry pointer from the lookup above.
        let mac = unsafe { &(*value_ptr).internal_mac };
        to_subscriber(ctx, &packet, subscriber, mac).map_err(relay_failed)?;
        // SAFETY: a pointer into the entry, valid for the program's run.
        let counters: *mut EntryCounters = unsafe { &raw mut (*subscriber_ptr).counters };
        if i == last {
            touch(counters, payload);
            return Ok(Some(send(internal, ExitReason::KernelRelayedMulticast)));
        }
        if send_copy(ctx, internal, 0, ExitReason::KernelRelayedMulticast) {
            touch(counters, payload);
        }
    }
    // Not reached: the loop returns at `last`.
    Err(ExitReason::KernelRelayFailed)
}

/// Whether a subscriber's addresses are of the datagram's family (the kernel does not
/// translate; the daemon never writes such a subscriber).
#[inline(always)]
fn same_family(subscriber: &GroupSubscriber, v6: bool) -> bool {
    is_ipv4_mapped(&subscriber.client_addr) != v6
        && is_ipv4_mapped(&subscriber.internal_relay_addr) != v6
}

/// Sends a copy of the skb as it is now out of `ifindex` (`flags`: `BPF_F_INGRESS` for the
/// interface's input) and counts it: under `reason`, or `KernelRelayFailed` when the helper
/// fails (the skb itself is unchanged then).
#[inline(always)]
fn send_copy(ctx: &TcContext, ifindex: u32, flags: u64, reason: ExitReason) -> bool {
    let sent = ctx.clone_redirect(ifindex, flags).is_ok();
    count(
        if sent {
            reason
        } else {
            ExitReason::KernelRelayFailed
        },
        ctx.len() as usize,
    );
    sent
}

/// The skb itself out of `ifindex` (its MAC addresses are already the next hop's). Returns a
/// constant action, not the helper's value: `gateway_inbound` goes on to the binding relay
/// when the fan-out returns [`NOT_A_GROUP`], and an action the verifier cannot tell from it
/// would have it walk that relay again after every exit of the fan-out.
#[inline(always)]
fn send(ifindex: u32, reason: ExitReason) -> Relayed {
    // SAFETY: no pointers are passed.
    let action = unsafe { bpf_redirect(ifindex, 0) };
    if action == i64::from(TC_ACT_REDIRECT) {
        Relayed {
            action: TC_ACT_REDIRECT,
            reason,
        }
    } else {
        // Only for flags the helper does not know (none are passed).
        Relayed {
            action: TC_ACT_SHOT,
            reason: ExitReason::KernelRelayFailed,
        }
    }
}

/// Multicast-to-multicast: the group's MAC from the internal interface's, the gateway's inside
/// address as the source, TTL (hop limit) 1.
#[inline(always)]
fn to_group(
    ctx: &TcContext,
    packet: &Datagram,
    source: &Addr16,
    internal_mac: &[u8; 6],
) -> Result<(), i64> {
    let group = &packet.dst;
    let mac = if packet.v6 {
        [0x33, 0x33, group[12], group[13], group[14], group[15]]
    } else {
        [0x01, 0x00, 0x5e, group[13] & 0x7f, group[14], group[15]]
    };
    set_macs(ctx, &mac, internal_mac)?;
    set_addresses(ctx, packet, source, group)?;
    set_hop_limit(ctx, packet.v6, 1)
}

/// Opens the 8-octet header after the UDP header (AID 0, so the checksum does not change for
/// its octets), with the IP and UDP lengths.
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    reason = "the header is 8 octets; UDP lengths are bounded by the packet"
)]
#[inline(always)]
fn open_header(ctx: &TcContext, packet: &Datagram) -> Result<(), i64> {
    let l4 = packet.l4;
    ctx.adjust_room(HEADER_LEN as i32, BPF_ADJ_ROOM_NET, 0)?;
    let udp: [u8; UDP_HLEN] = ctx.load(l4 + HEADER_LEN)?;
    ctx.store(l4, &udp, 0)?;
    ctx.store(l4 + UDP_HLEN, &[0u8; HEADER_LEN], 0)?;
    if packet.v6 {
        let payload_len: u16 = ctx.load(ETH_HLEN + 4)?;
        let grown = (u16::from_be(payload_len) + HEADER_LEN as u16).to_be();
        ctx.store(ETH_HLEN + 4, &grown, 0)?;
    } else {
        let total: u16 = ctx.load(ETH_HLEN + 2)?;
        let grown = (u16::from_be(total) + HEADER_LEN as u16).to_be();
        ctx.store(ETH_HLEN + 2, &grown, 0)?;
        ctx.l3_csum_replace(IP_CSUM, u64::from(total), u64::from(grown), 2)?;
    }
    let old_len = packet.udp_len.to_be();
    let new_len = (packet.udp_len + HEADER_LEN as u16).to_be();
    ctx.store(l4 + 4, &new_len, 0)?;
    let csum_off = l4 + 6;
    let flags = u64::from(BPF_F_MARK_MANGLED_0) | 2;
    // The length is in the UDP header and in the pseudo-header.
    ctx.l4_csum_replace(csum_off, u64::from(old_len), u64::from(new_len), flags)?;
    ctx.l4_csum_replace(
        csum_off,
        u64::from(old_len),
        u64::from(new_len),
        flags | u64::from(BPF_F_PSEUDO_HDR),
    )?;
    Ok(())
}

/// Multicast-to-unicast: one subscriber's MACs, addresses, ports, TTL and AID.
#[inline(always)]
fn to_subscriber(
    ctx: &TcContext,
    packet: &Datagram,
    subscriber: &GroupSubscriber,
    internal_mac: &[u8; 6],
) -> Result<(), i64> {
    let l4 = packet.l4;
    set_macs(ctx, &subscriber.client_mac, internal_mac)?;
    set_addresses(
        ctx,
        packet,
        &subscriber.internal_relay_addr,
        &subscriber.client_addr,
    )?;
    set_hop_limit(ctx, packet.v6, UNICAST_TTL)?;
    set_field(ctx, l4, l4 + 6, subscriber.internal_relay_port_be)?;
    set_field(ctx, l4 + 2, l4 + 6, subscriber.client_port_be)?;
    // The AID: the last four octets of the header.
    let aid_off = l4 + UDP_HLEN + 4;
    let old: u32 = ctx.load(aid_off)?;
    ctx.store(aid_off, &subscriber.aid_be, 0)?;
    ctx.l4_csum_replace(
        l4 + 6,
        u64::from(old),
        u64::from(subscriber.aid_be),
        u64::from(BPF_F_MARK_MANGLED_0) | 4,
    )?;
    Ok(())
}

/// Ethernet destination and source.
#[inline(always)]
fn set_macs(ctx: &TcContext, dst: &[u8; 6], src: &[u8; 6]) -> Result<(), i64> {
    ctx.store(0, dst, 0)?;
    ctx.store(6, src, 0)
}

/// A 16-bit UDP header field (a port) covered by the UDP checksum.
#[inline(always)]
fn set_field(ctx: &TcContext, offset: usize, csum_off: usize, new_be: u16) -> Result<(), i64> {
    let old: u16 = ctx.load(offset)?;
    ctx.store(offset, &new_be, 0)?;
    ctx.l4_csum_replace(
        csum_off,
        u64::from(old),
        u64::from(new_be),
        u64::from(BPF_F_MARK_MANGLED_0) | 2,
    )?;
    Ok(())
}

/// TTL (IPv4, with the header checksum) or hop limit (IPv6).
#[inline(always)]
fn set_hop_limit(ctx: &TcContext, v6: bool, hops: u8) -> Result<(), i64> {
    if v6 {
        return ctx.store(ETH_HLEN + 7, &hops, 0);
    }
    // TTL and protocol are one 16-bit word of the checksum.
    let old: [u8; 2] = ctx.load(ETH_HLEN + 8)?;
    let new = [hops, old[1]];
    ctx.store(ETH_HLEN + 8, &new, 0)?;
    ctx.l3_csum_replace(
        IP_CSUM,
        u64::from(u16::from_ne_bytes(old)),
        u64::from(u16::from_ne_bytes(new)),
        2,
    )
}

/// New source and destination addresses, with the IPv4 header checksum and the UDP
/// pseudo-header part of the UDP checksum; the old ones are read from the packet.
#[expect(
    clippy::cast_ptr_alignment,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "bpf_csum_diff reads octets through its `*mut u32` and returns a 32-bit sum, which \
              seeds the next call and the checksum helper as is"
)]
#[inline(always)]
fn set_addresses(
    ctx: &TcContext,
    packet: &Datagram,
    new_src: &Addr16,
    new_dst: &Addr16,
) -> Result<(), i64> {
    let csum_off = packet.l4 + 6;
    let pseudo = u64::from(BPF_F_MARK_MANGLED_0 | BPF_F_PSEUDO_HDR);
    if packet.v6 {
        let old_src: Addr16 = ctx.load(ETH_HLEN + 8)?;
        let old_dst: Addr16 = ctx.load(ETH_HLEN + 24)?;
        ctx.store(ETH_HLEN + 8, new_src, 0)?;
        ctx.store(ETH_HLEN + 24, new_dst, 0)?;
        // SAFETY: each pointer is 16 readable octets (stack or map value); the second call
        // seeds with the first's sum.
        let diff = unsafe {
            let first = bpf_csum_diff(
                old_src.as_ptr().cast_mut().cast::<u32>(),
                16,
                new_src.as_ptr().cast_mut().cast::<u32>(),
                16,
                0,
            );
            bpf_csum_diff(
                old_dst.as_ptr().cast_mut().cast::<u32>(),
                16,
                new_dst.as_ptr().cast_mut().cast::<u32>(),
                16,
                first as u32,
            )
        };
        return ctx.l4_csum_replace(csum_off, 0, diff as u64, pseudo);
    }
    for (offset, new) in [(ETH_HLEN + 12, new_src), (ETH_HLEN + 16, new_dst)] {
        let old: u32 = ctx.load(offset)?;
        let new = u32::from_ne_bytes([new[12], new[13], new[14], new[15]]);
        ctx.store(offset, &new, 0)?;
        ctx.l3_csum_replace(IP_CSUM, u64::from(old), u64::from(new), 4)?;
        ctx.l4_csum_replace(csum_off, u64::from(old), u64::from(new), pseudo | 4)?;
    }
    Ok(())
}
