//! The kernel relay (tc programs). Headers are read and written through the skb helpers
//! (`bpf_skb_load_bytes`/`store_bytes`), which work on non-linear skbs too, and every checksum
//! change goes through the kernel's checksum helpers, which keep `CHECKSUM_COMPLETE` skbs right.
//!
//! Inbound: [ETH][IP][UDP][payload] -> [ETH][IP'][UDP'][framing][payload]: `bpf_skb_adjust_room`
//! opens a gap after the IP header, the UDP header moves into it and the framing header takes its
//! old place. Outbound is the reverse. Only plain IPv4 (IHL 5) and IPv6 without extension headers
//! are relayed in the kernel; anything else goes to the userspace relay.

use aya_ebpf::{
    bindings::{
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT,
        bpf_adj_room_mode::BPF_ADJ_ROOM_NET,
    },
    cty::c_void,
    helpers::{bpf_check_mtu, bpf_csum_diff, bpf_redirect_neigh},
    macros::classifier,
    programs::TcContext,
};
use gateway_common::{
    Addr16, BindingKey, BindingValue, ClientSocketKey, EntryCounters, ExitReason, MonitorHook,
    OutboundKey, OutboundValue, Verdict, framing, ipv4_mapped, relay_mode,
};

use crate::{
    fanout,
    maps::{BINDINGS, EXTERNAL_ADDRS, OUTBOUND, RAW_CLIENTS, count, daemon_alive, settings, touch},
    monitor,
};

pub(crate) const ETH_HLEN: usize = 14;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_UDP: u8 = 17;
const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
pub(crate) const UDP_HLEN: usize = 8;
/// Longest framing header (RFC 1928 with an IPv6 address).
const MAX_FRAMING: usize = 22;

/// A UDP datagram in a plain IPv4 or IPv6 packet.
pub(crate) struct Datagram {
    pub(crate) v6: bool,
    /// Offset of the UDP header.
    pub(crate) l4: usize,
    pub(crate) src: Addr16,
    pub(crate) dst: Addr16,
    pub(crate) src_port_be: u16,
    pub(crate) dst_port_be: u16,
    pub(crate) udp_len: u16,
    /// The UDP length is the IP payload's and the skb holds all of it. A framed relay resizes
    /// by the UDP length and reads the framing from the payload: anything else goes to the
    /// stack, which validates lengths (a hostile remote or client cannot have the gateway emit
    /// a datagram whose lengths disagree).
    pub(crate) whole: bool,
}

#[inline(always)]
pub(crate) fn parse(ctx: &TcContext) -> Option<Datagram> {
    let ether_type = u16::from_be(ctx.load::<u16>(12).ok()?);
    let skb_len = ctx.len() as usize;
    let (v6, l4, src, dst, ip_payload) = match ether_type {
        ETH_P_IPV4 => {
            let header: [u8; IPV4_HLEN] = ctx.load(ETH_HLEN).ok()?;
            let fragment = u16::from_be_bytes([header[6], header[7]]) & 0x3fff;
            if header[0] != 0x45 || header[9] != IPPROTO_UDP || fragment != 0 {
                return None;
            }
            let src = ipv4_mapped([header[12], header[13], header[14], header[15]]);
            let dst = ipv4_mapped([header[16], header[17], header[18], header[19]]);
            let total = usize::from(u16::from_be_bytes([header[2], header[3]]));
            let payload = if total >= IPV4_HLEN && ETH_HLEN + total <= skb_len {
                total - IPV4_HLEN
            } else {
                usize::MAX
            };
            (false, ETH_HLEN + IPV4_HLEN, src, dst, payload)
        }
        ETH_P_IPV6 => {
            if ctx.load::<u8>(ETH_HLEN + 6).ok()? != IPPROTO_UDP {
                return None;
            }
            let src: Addr16 = ctx.load(ETH_HLEN + 8).ok()?;
            let dst: Addr16 = ctx.load(ETH_HLEN + 24).ok()?;
            let payload = usize::from(u16::from_be(ctx.load::<u16>(ETH_HLEN + 4).ok()?));
            let payload = if ETH_HLEN + IPV6_HLEN + payload <= skb_len {
                payload
            } else {
                usize::MAX
            };
            (true, ETH_HLEN + IPV6_HLEN, src, dst, payload)
        }
        _ => return None,
    };
    let udp: [u8; UDP_HLEN] = ctx.load(l4).ok()?;
    let udp_len = u16::from_be_bytes([udp[4], udp[5]]);
    Some(Datagram {
        v6,
        l4,
        src,
        dst,
        src_port_be: u16::from_ne_bytes([udp[0], udp[1]]),
        dst_port_be: u16::from_ne_bytes([udp[2], udp[3]]),
        udp_len,
        whole: usize::from(udp_len) >= UDP_HLEN && usize::from(udp_len) == ip_payload,
    })
}

pub(crate) fn is_ipv4_mapped(addr: &Addr16) -> bool {
    addr[..10] == [0; 10] && addr[10] == 0xff && addr[11] == 0xff
}

/// The framing header for a datagram from `remote` to a client, padded with zeros to a multiple
/// of four octets (for `bpf_csum_diff`), and its length.
#[inline(always)]
fn framing_header(value: &BindingValue, remote: &Addr16, remote_port_be: u16) -> ([u8; 24], usize) {
    let mut header = [0u8; 24];
    let port = remote_port_be.to_ne_bytes();
    if value.framing == framing::ENHANCED {
        // RSV FRAG DGID(2) AID(4)
        header[4..8].copy_from_slice(&value.aid_be.to_ne_bytes());
        (header, 8)
    } else if is_ipv4_mapped(remote) {
        // RSV(2) FRAG ATYP=1 ADDR(4) PORT(2)
        header[3] = 1;
        header[4..8].copy_from_slice(&remote[12..16]);
        header[8..10].copy_from_slice(&port);
        (header, 10)
    } else {
        // RSV(2) FRAG ATYP=4 ADDR(16) PORT(2)
        header[3] = 4;
        header[4..20].copy_from_slice(remote);
        header[20..22].copy_from_slice(&port);
        (header, 22)
    }
}

/// Ones-complement sum of `len` (8, 12 or 24) octets of `bytes`, for the checksum helpers.
#[expect(
    clippy::cast_ptr_alignment,
    reason = "bpf_csum_diff is declared with `*mut u32` but reads octets: no alignment needed"
)]
#[inline(always)]
fn sum_of(bytes: &[u8; 24], len: usize) -> i64 {
    let ptr = bytes.as_ptr().cast_mut().cast::<u32>();
    // SAFETY: `ptr` points to 24 readable octets; every size used is at most 24 and a multiple
    // of four. A null `from` with size 0 means "add `to`".
    unsafe {
        match len {
            8 => bpf_csum_diff(core::ptr::null_mut(), 0, ptr, 8, 0),
            12 => bpf_csum_diff(core::ptr::null_mut(), 0, ptr, 12, 0),
            _ => bpf_csum_diff(core::ptr::null_mut(), 0, ptr, 24, 0),
        }
    }
}

/// Whether the UDP checksum field holds only the folded pseudo-header sum, which is what a
/// `CHECKSUM_PARTIAL` skb carries until the checksum is completed. (A complete checksum equals it
/// with probability 2^-16; such a datagram merely takes the userspace path.)
#[expect(
    clippy::cast_ptr_alignment,
    clippy::cast_sign_loss,
    clippy::cast_possible_truncation,
    reason = "bpf_csum_diff reads octets through its `*mut u32`; its non-negative 32-bit sum is \
              folded to 16 bits before the last cast"
)]
#[inline(always)]
pub(crate) fn checksum_is_partial(ctx: &TcContext, packet: &Datagram) -> bool {
    let Ok(check) = ctx.load::<u16>(packet.l4 + 6) else {
        return false;
    };
    if check == 0 {
        return false;
    }
    let len_be = packet.udp_len.to_be().to_ne_bytes();
    let sum = if packet.v6 {
        // src(16) dst(16) length(4) zero(3) next-header(1)
        let mut pseudo = [0u8; 40];
        pseudo[..16].copy_from_slice(&packet.src);
        pseudo[16..32].copy_from_slice(&packet.dst);
        pseudo[34] = len_be[0];
        pseudo[35] = len_be[1];
        pseudo[39] = IPPROTO_UDP;
        // SAFETY: 40 readable octets on the stack.
        unsafe {
            bpf_csum_diff(
                core::ptr::null_mut(),
                0,
                pseudo.as_mut_ptr().cast::<u32>(),
                40,
                0,
            )
        }
    } else {
        // src(4) dst(4) zero(1) protocol(1) length(2)
        let mut pseudo = [0u8; 12];
        pseudo[..4].copy_from_slice(&packet.src[12..16]);
        pseudo[4..8].copy_from_slice(&packet.dst[12..16]);
        pseudo[9] = IPPROTO_UDP;
        pseudo[10] = len_be[0];
        pseudo[11] = len_be[1];
        // SAFETY: 12 readable octets on the stack.
        unsafe {
            bpf_csum_diff(
                core::ptr::null_mut(),
                0,
                pseudo.as_mut_ptr().cast::<u32>(),
                12,
                0,
            )
        }
    };
    let mut folded = sum as u64 & 0xffff_ffff;
    folded = (folded & 0xffff) + (folded >> 16);
    folded = (folded & 0xffff) + (folded >> 16);
    check == folded as u16
}

pub(crate) fn action_of(reason: ExitReason) -> i32 {
    match reason.verdict() {
        Verdict::Pass => TC_ACT_OK,
        Verdict::Drop => TC_ACT_SHOT,
        // The redirect helper's own return value is the action on success.
        Verdict::Redirect => aya_ebpf::bindings::TC_ACT_REDIRECT,
    }
}

/// A program's exit: the tc action and the reason it is counted under. A plain C struct, since
/// the out-of-line functions that return it get BTF the kernel must accept.
#[repr(C)]
struct Exit {
    action: i32,
    reason: u32,
}

/// A redirect: the helper's action and the reason it is counted under.
pub(crate) struct Relayed {
    pub(crate) action: i32,
    pub(crate) reason: ExitReason,
}

impl Exit {
    #[inline(always)]
    fn from(result: Result<Relayed, ExitReason>) -> Self {
        let (action, reason) = match result {
            Ok(relayed) => (relayed.action, relayed.reason),
            Err(reason) => (action_of(reason), reason),
        };
        Self {
            action,
            reason: reason as u32,
        }
    }
}

/// Redirects the rewritten packet out of `ifindex`, resolving the next hop's MAC address.
#[expect(
    clippy::cast_possible_truncation,
    reason = "bpf_redirect_neigh returns a tc action"
)]
#[inline(always)]
fn redirect(ifindex: u32, reason: ExitReason) -> Relayed {
    // SAFETY: no pointers are passed.
    let action = unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) };
    Relayed {
        action: action as i32,
        reason,
    }
}

#[expect(
    clippy::needless_pass_by_value,
    reason = "the entry point's signature is the classifier macro's"
)]
#[classifier]
pub fn gateway_inbound(ctx: TcContext) -> i32 {
    let len = ctx.len() as usize;
    if fanout::is_stack_copy(&ctx) {
        count(ExitReason::MulticastToUserspace, len);
        return TC_ACT_OK;
    }
    // A datagram to a group (the XDP gate admitted it): the fan-out program, or, when it is not
    // loaded, the userspace relay.
    if fanout::to_multicast(&ctx) {
        fanout::tail_call(&ctx);
        count(ExitReason::MulticastToUserspace, len);
        monitor::observe(
            &ctx,
            ExitReason::MulticastToUserspace,
            len,
            MonitorHook::TcInbound,
        );
        return TC_ACT_OK;
    }
    let exit = inbound(&ctx);
    count_and_observe(&ctx, exit.reason, len, MonitorHook::TcInbound);
    exit.action
}

#[expect(
    clippy::needless_pass_by_value,
    reason = "the entry point's signature is the classifier macro's"
)]
#[classifier]
pub fn gateway_internal(ctx: TcContext) -> i32 {
    let len = ctx.len() as usize;
    let exit = internal(&ctx);
    count_and_observe(&ctx, exit.reason, len, MonitorHook::TcInternal);
    exit.action
}

/// The gate and the inbound relay in one tc program, on the external interface's ingress, for
/// links where XDP only adds work (veth copies every skb for an attached XDP program; generic
/// XDP runs on the skb anyway). The gate's decision and its counted reason are the XDP gate's;
/// a kernel-relayed hit then goes through the same relay as behind the XDP gate.
#[expect(
    clippy::needless_pass_by_value,
    reason = "the entry point's signature is the classifier macro's"
)]
#[classifier]
pub fn gateway_gate(ctx: TcContext) -> i32 {
    let len = ctx.len() as usize;
    if fanout::is_stack_copy(&ctx) {
        count(ExitReason::MulticastToUserspace, len);
        return TC_ACT_OK;
    }
    let reason = ExitReason::from_u32(gate(&ctx)).unwrap_or(ExitReason::KernelRelayFailed);
    count(reason, len);
    monitor::observe(&ctx, reason, len, MonitorHook::TcGate);
    match reason.verdict() {
        Verdict::Drop => TC_ACT_SHOT,
        Verdict::Pass | Verdict::Redirect if reason == ExitReason::BindingToKernelRelay => {
            let exit = inbound(&ctx);
            count_and_observe(&ctx, exit.reason, len, MonitorHook::TcGate);
            exit.action
        }
        Verdict::Pass | Verdict::Redirect if reason == ExitReason::MulticastToFanOut => {
            // The fan-out program does not return here; without it, the userspace relay
            // serves the group.
            fanout::tail_call(&ctx);
            count(ExitReason::MulticastToUserspace, len);
            monitor::observe(
                &ctx,
                ExitReason::MulticastToUserspace,
                len,
                MonitorHook::TcGate,
            );
            TC_ACT_OK
        }
        Verdict::Pass | Verdict::Redirect => TC_ACT_OK,
    }
}

/// How much of a frame the tc gate may pull into the skb's linear part to read its headers
/// (Ethernet, VLAN tags, IPv6 with its bounded extension chain, the ports): a driver may leave
/// headers in page fragments, which direct reads cannot see.
const GATE_MAX_PULL: u32 = 512;

/// The gate's exit reason (as `u32`: this function is out of line, and its return type must be
/// one the kernel's BTF check accepts). Out of line so that its frame and the relay's are
/// siblings under the entry point, not stacked.
#[inline(never)]
fn gate(ctx: &TcContext) -> u32 {
    let reason = match crate::gate::classify(ctx) {
        Ok(reason) | Err(reason) => reason,
    };
    // Cut short only in the linear part: pull the headers in and decide again (rare: most
    // drivers and veth put the headers in the linear part).
    if reason == ExitReason::TruncatedHeader && ctx.data_end() - ctx.data() < ctx.len() as usize {
        if ctx.pull_data(ctx.len().min(GATE_MAX_PULL)).is_err() {
            return ExitReason::TruncatedHeader as u32;
        }
        return match crate::gate::classify(ctx) {
            Ok(reason) | Err(reason) => reason as u32,
        };
    }
    reason as u32
}

/// Counts an exit and shows it to a watcher.
#[inline(always)]
fn count_and_observe(ctx: &TcContext, reason: u32, len: usize, hook: MonitorHook) {
    if let Some(reason) = ExitReason::from_u32(reason) {
        count(reason, len);
        monitor::observe(ctx, reason, len, hook);
    }
}

/// Out of line to keep each program's stack under the limit.
#[inline(never)]
fn inbound(ctx: &TcContext) -> Exit {
    Exit::from(try_inbound(ctx))
}

/// Inline, unlike `inbound`: before Linux 6.7 the verifier counts every frame of a call chain
/// rounded up to 32 bytes, also the zero-stack `memset`/`memmove` ones, so
/// `gateway_internal` -> `internal` -> `memset` came to 32 + 480 + 32 = 544 > 512 on Debian 12's
/// 6.1 (`cargo xtask test --kernel debian12`); in one frame the chain is 480 + 32.
#[inline(always)]
fn internal(ctx: &TcContext) -> Exit {
    Exit::from(try_internal(ctx))
}

/// Rewrites one kernel-mode binding hit for its client and redirects it.
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss,
    reason = "the framing header is at most 22 octets and UDP lengths are bounded by the packet \
              (64 KiB); the checksum helpers take the 32-bit sum of bpf_csum_diff as a u64, and \
              bpf_redirect_neigh returns a tc action"
)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "the key is lent to the map helper, not copied again onto the 512-byte BPF stack"
)]
#[inline(always)]
fn try_inbound(ctx: &TcContext) -> Result<Relayed, ExitReason> {
    let packet = parse(ctx).ok_or(ExitReason::InboundToStack)?;
    let key = BindingKey {
        remote_addr: packet.src,
        relay_addr: packet.dst,
        remote_port_be: packet.src_port_be,
        relay_port_be: packet.dst_port_be,
    };
    let value_ptr = BINDINGS
        .get_ptr_mut(&key)
        .ok_or(ExitReason::InboundToStack)?;
    // SAFETY: a successful lookup; the entry stays valid for the program's run (RCU).
    let value: &BindingValue = unsafe { &*value_ptr };
    if value.mode != relay_mode::KERNEL {
        return Err(ExitReason::InboundToStack);
    }
    if !daemon_alive() {
        // Not logged here: the XDP gate dropped (and logged) the same hit before tc saw it;
        // this check only closes the race with a heartbeat expiring in between.
        return Err(ExitReason::DaemonGone);
    }
    // The kernel does not translate between families: such bindings stay in user space.
    if is_ipv4_mapped(&value.client_addr) == packet.v6
        || is_ipv4_mapped(&value.internal_relay_addr) == packet.v6
    {
        return Err(ExitReason::InboundToStack);
    }
    let settings = settings();
    if value.framing == framing::RAW {
        return raw_inbound(ctx, &packet, value_ptr, settings.internal_ifindex);
    }
    if !packet.whole {
        return Err(ExitReason::InboundToStack);
    }
    if checksum_is_partial(ctx, &packet) {
        return Err(ExitReason::PartialChecksumToUserspace);
    }
    let (header, header_len) = framing_header(value, &packet.src, packet.src_port_be);
    if !fits_link(ctx, settings.internal_ifindex, header_len as i32) {
        return Err(ExitReason::TooBigForKernelRelay);
    }
    let grow = header_len;
    let l4 = packet.l4;
    let old_csum: u16 = ctx.load(l4 + 6).map_err(|_| ExitReason::InboundToStack)?;
    let old_len_be = packet.udp_len.to_be();
    let new_len_be = (packet.udp_len + grow as u16).to_be();

    ctx.adjust_room(grow as i32, BPF_ADJ_ROOM_NET, 0)
        .map_err(|_| ExitReason::InboundToStack)?;
    // From here on the packet is being rewritten: any failure is a drop.
    let failed = relay_failed;
    let udp: [u8; UDP_HLEN] = ctx.load(l4 + grow).map_err(failed)?;
    ctx.store(l4, &udp, 0).map_err(failed)?;
    store_framing(ctx, l4 + UDP_HLEN, &header, header_len).map_err(failed)?;

    let csum_off = l4 + 6;
    let l4_flags = u64::from(BPF_F_MARK_MANGLED_0);
    let has_csum = packet.v6 || old_csum != 0;
    if packet.v6 {
        rewrite_ipv6_addrs(
            ctx,
            &packet,
            &value.internal_relay_addr,
            &value.client_addr,
            csum_off,
        )
        .map_err(failed)?;
        let payload_len: u16 = ctx.load(ETH_HLEN + 4).map_err(failed)?;
        let new_payload_len = (u16::from_be(payload_len) + grow as u16).to_be();
        ctx.store(ETH_HLEN + 4, &new_payload_len, 0)
            .map_err(failed)?;
    } else {
        rewrite_ipv4(
            ctx,
            &value.internal_relay_addr,
            &value.client_addr,
            grow as i32,
            has_csum,
            csum_off,
        )
        .map_err(failed)?;
    }
    let ports = UdpRewrite {
        l4,
        old_src_port_be: packet.src_port_be,
        new_src_port_be: value.internal_relay_port_be,
        old_dst_port_be: packet.dst_port_be,
        new_dst_port_be: value.client_port_be,
        old_len_be,
        new_len_be,
    };
    ports.apply(ctx, has_csum).map_err(failed)?;
    if has_csum {
        let added = sum_of(&header, padded(header_len));
        ctx.l4_csum_replace(csum_off, 0, added as u64, l4_flags)
            .map_err(failed)?;
    }
    touch(
        // SAFETY: the entry pointer from the lookup above.
        unsafe { &raw mut (*value_ptr).counters },
        u64::from(packet.udp_len) - UDP_HLEN as u64,
    );
    Ok(redirect(
        settings.internal_ifindex,
        ExitReason::KernelRelayedInbound,
    ))
}

/// Header-less (RAW) delivery of a binding hit: only the destination changes (external relay ->
/// client), the remote stays the source. No length changes, so a `CHECKSUM_PARTIAL` skb stays
/// right too: the checksum helpers update its pseudo-header sum and leave the ports to whoever
/// completes it.
#[inline(always)]
fn raw_inbound(
    ctx: &TcContext,
    packet: &Datagram,
    value_ptr: *mut BindingValue,
    internal_ifindex: u32,
) -> Result<Relayed, ExitReason> {
    // SAFETY: a successful lookup by the caller; valid for the program's run (RCU).
    let value: &BindingValue = unsafe { &*value_ptr };
    let rewrite = RawRewrite {
        end: Endpoint::Destination,
        addr: &value.client_addr,
        port_be: value.client_port_be,
        // SAFETY: the entry pointer from the caller's lookup.
        counters: unsafe { &raw mut (*value_ptr).counters },
        ifindex: internal_ifindex,
        too_big: ExitReason::TooBigForKernelRelay,
        relayed: ExitReason::KernelRelayedRawInbound,
    };
    rewrite.apply(ctx, packet)
}

/// One RAW relay: which end of the datagram becomes what, the entry's counters, where it goes
/// and how its exits are counted.
struct RawRewrite<'a> {
    end: Endpoint,
    addr: &'a Addr16,
    port_be: u16,
    counters: *mut EntryCounters,
    ifindex: u32,
    too_big: ExitReason,
    relayed: ExitReason,
}

impl RawRewrite<'_> {
    #[inline(always)]
    fn apply(&self, ctx: &TcContext, packet: &Datagram) -> Result<Relayed, ExitReason> {
        if !fits_link(ctx, self.ifindex, 0) {
            return Err(self.too_big);
        }
        rewrite_endpoint(ctx, packet, self.end, self.addr, self.port_be).map_err(relay_failed)?;
        // A UDP length below the header's counts as no payload.
        let payload = u64::from(packet.udp_len).saturating_sub(UDP_HLEN as u64);
        touch(self.counters, payload);
        Ok(redirect(self.ifindex, self.relayed))
    }
}

/// Whether the packet, grown by `grow` octets, fits the MTU of the link out of `ifindex`.
#[inline(always)]
pub(crate) fn fits_link(ctx: &TcContext, ifindex: u32, grow: i32) -> bool {
    let mut mtu_len: u32 = 0;
    let skb = ctx.skb.skb.cast::<c_void>();
    // SAFETY: the skb pointer is the program's context.
    unsafe { bpf_check_mtu(skb, ifindex, &raw mut mtu_len, grow, 0) == 0 }
}

/// Which end of a datagram a RAW rewrite changes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Source,
    Destination,
}

/// Rewrites one end (address and port) of a datagram in place, with the IPv4 header checksum
/// and the UDP checksum: the address as pseudo-header data (kept right for complete and for
/// partial checksums), the port as UDP data (a partial checksum covers it when completed).
#[expect(
    clippy::cast_ptr_alignment,
    clippy::cast_sign_loss,
    reason = "bpf_csum_diff reads octets through its `*mut u32` and returns a 32-bit sum, which \
              the checksum helper takes as is"
)]
#[inline(always)]
fn rewrite_endpoint(
    ctx: &TcContext,
    packet: &Datagram,
    end: Endpoint,
    new_addr: &Addr16,
    new_port_be: u16,
) -> Result<(), i64> {
    const IP_CSUM: usize = ETH_HLEN + 10;
    let csum_off = packet.l4 + 6;
    let old_csum: u16 = ctx.load(csum_off)?;
    // IPv4 UDP may carry no checksum (0); IPv6 UDP always does.
    let has_csum = packet.v6 || old_csum != 0;
    let pseudo = u64::from(BPF_F_MARK_MANGLED_0 | BPF_F_PSEUDO_HDR);
    let source = end == Endpoint::Source;
    if packet.v6 {
        let (offset, old) = if source {
            (ETH_HLEN + 8, &packet.src)
        } else {
            (ETH_HLEN + 24, &packet.dst)
        };
        ctx.store(offset, new_addr, 0)?;
        // SAFETY: both pointers are 16 readable octets (stack or map value).
        let diff = unsafe {
            bpf_csum_diff(
                old.as_ptr().cast_mut().cast::<u32>(),
                16,
                new_addr.as_ptr().cast_mut().cast::<u32>(),
                16,
                0,
            )
        };
        ctx.l4_csum_replace(csum_off, 0, diff as u64, pseudo)?;
    } else {
        let offset = ETH_HLEN + if source { 12 } else { 16 };
        let old: u32 = ctx.load(offset)?;
        let new = u32::from_ne_bytes([new_addr[12], new_addr[13], new_addr[14], new_addr[15]]);
        ctx.store(offset, &new, 0)?;
        ctx.l3_csum_replace(IP_CSUM, u64::from(old), u64::from(new), 4)?;
        if has_csum {
            ctx.l4_csum_replace(csum_off, u64::from(old), u64::from(new), pseudo | 4)?;
        }
    }
    let port_off = packet.l4 + if source { 0 } else { 2 };
    let old_port: u16 = ctx.load(port_off)?;
    ctx.store(port_off, &new_port_be, 0)?;
    if has_csum {
        ctx.l4_csum_replace(
            csum_off,
            u64::from(old_port),
            u64::from(new_port_be),
            u64::from(BPF_F_MARK_MANGLED_0) | 2,
        )?;
    }
    Ok(())
}

/// A helper failed mid-rewrite: the datagram may be half rewritten, so it is dropped (and
/// counted). Not logged through aya-log: the tc programs are at 6.1's 512-octet stack limit
/// (frames rounded to 32), and a log call's frame would push them over.
#[inline(always)]
pub(crate) fn relay_failed(_error: i64) -> ExitReason {
    ExitReason::KernelRelayFailed
}

/// New UDP ports and length, with their part of the UDP checksum (the length is in the header
/// and in the pseudo-header).
struct UdpRewrite {
    l4: usize,
    old_src_port_be: u16,
    new_src_port_be: u16,
    old_dst_port_be: u16,
    new_dst_port_be: u16,
    old_len_be: u16,
    new_len_be: u16,
}

impl UdpRewrite {
    #[inline(always)]
    fn apply(&self, ctx: &TcContext, has_csum: bool) -> Result<(), i64> {
        ctx.store(self.l4, &self.new_src_port_be, 0)?;
        ctx.store(self.l4 + 2, &self.new_dst_port_be, 0)?;
        ctx.store(self.l4 + 4, &self.new_len_be, 0)?;
        if !has_csum {
            return Ok(());
        }
        let csum_off = self.l4 + 6;
        let flags = u64::from(BPF_F_MARK_MANGLED_0);
        let pseudo = u64::from(BPF_F_PSEUDO_HDR);
        for (old, new, flags) in [
            (self.old_src_port_be, self.new_src_port_be, flags | 2),
            (self.old_dst_port_be, self.new_dst_port_be, flags | 2),
            (self.old_len_be, self.new_len_be, flags | 2),
            (self.old_len_be, self.new_len_be, flags | pseudo | 2),
        ] {
            ctx.l4_csum_replace(csum_off, u64::from(old), u64::from(new), flags)?;
        }
        Ok(())
    }
}

const fn padded(len: usize) -> usize {
    (len + 3) & !3
}

#[inline(always)]
fn store_framing(ctx: &TcContext, offset: usize, header: &[u8; 24], len: usize) -> Result<(), i64> {
    let ptr = header.as_ptr();
    // SAFETY: `header` has 24 octets; each cast views a prefix of it.
    unsafe {
        match len {
            8 => ctx.store(offset, &*ptr.cast::<[u8; 8]>(), 0),
            10 => ctx.store(offset, &*ptr.cast::<[u8; 10]>(), 0),
            _ => ctx.store(offset, &*ptr.cast::<[u8; MAX_FRAMING]>(), 0),
        }
    }
}

/// IPv4: new source and destination addresses and total length (`+delta`), with the IP checksum
/// and, when present, the UDP pseudo-header part of the UDP checksum.
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "an IPv4 total length grown or shrunk by at most 22 octets stays in 16 bits"
)]
#[inline(always)]
fn rewrite_ipv4(
    ctx: &TcContext,
    new_src: &Addr16,
    new_dst: &Addr16,
    delta: i32,
    has_csum: bool,
    csum_off: usize,
) -> Result<(), i64> {
    const IP_CSUM: usize = ETH_HLEN + 10;
    let old_src: u32 = ctx.load(ETH_HLEN + 12)?;
    let old_dst: u32 = ctx.load(ETH_HLEN + 16)?;
    let old_total: u16 = ctx.load(ETH_HLEN + 2)?;
    let src = u32::from_ne_bytes([new_src[12], new_src[13], new_src[14], new_src[15]]);
    let dst = u32::from_ne_bytes([new_dst[12], new_dst[13], new_dst[14], new_dst[15]]);
    let total = ((i32::from(u16::from_be(old_total)) + delta) as u16).to_be();
    ctx.store(ETH_HLEN + 12, &src, 0)?;
    ctx.store(ETH_HLEN + 16, &dst, 0)?;
    ctx.store(ETH_HLEN + 2, &total, 0)?;
    ctx.l3_csum_replace(IP_CSUM, u64::from(old_src), u64::from(src), 4)?;
    ctx.l3_csum_replace(IP_CSUM, u64::from(old_dst), u64::from(dst), 4)?;
    ctx.l3_csum_replace(IP_CSUM, u64::from(old_total), u64::from(total), 2)?;
    if has_csum {
        let flags = u64::from(BPF_F_MARK_MANGLED_0 | BPF_F_PSEUDO_HDR);
        ctx.l4_csum_replace(csum_off, u64::from(old_src), u64::from(src), flags | 4)?;
        ctx.l4_csum_replace(csum_off, u64::from(old_dst), u64::from(dst), flags | 4)?;
    }
    Ok(())
}

/// IPv6: new source and destination addresses, with the UDP pseudo-header part of the checksum.
#[expect(
    clippy::cast_ptr_alignment,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "bpf_csum_diff reads octets through its `*mut u32` and returns a 32-bit sum, which \
              seeds the next call and the checksum helper as is"
)]
#[inline(always)]
fn rewrite_ipv6_addrs(
    ctx: &TcContext,
    packet: &Datagram,
    new_src: &Addr16,
    new_dst: &Addr16,
    csum_off: usize,
) -> Result<(), i64> {
    ctx.store(ETH_HLEN + 8, new_src, 0)?;
    ctx.store(ETH_HLEN + 24, new_dst, 0)?;
    // SAFETY: each pointer is 16 readable octets (stack or map value); the second call seeds
    // with the first's sum.
    let diff = unsafe {
        let first = bpf_csum_diff(
            packet.src.as_ptr().cast_mut().cast::<u32>(),
            16,
            new_src.as_ptr().cast_mut().cast::<u32>(),
            16,
            0,
        );
        bpf_csum_diff(
            packet.dst.as_ptr().cast_mut().cast::<u32>(),
            16,
            new_dst.as_ptr().cast_mut().cast::<u32>(),
            16,
            first as u32,
        )
    };
    ctx.l4_csum_replace(
        csum_off,
        0,
        diff as u64,
        u64::from(BPF_F_MARK_MANGLED_0 | BPF_F_PSEUDO_HDR),
    )
}

/// IPv6 extension headers walked on the internal side before the datagram is called UDP.
const MAX_IPV6_EXT_HEADERS: usize = 6;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTH: u8 = 51;

/// Whether `next` names an IPv6 extension header (RFC 8200 and the IANA list): hop-by-hop,
/// routing, fragment, AH, destination options, mobility, HIP, shim6 and the two experimental.
#[inline(always)]
fn is_ipv6_extension(next: u8) -> bool {
    matches!(next, 0 | 43 | 44 | 51 | 60 | 135 | 139 | 140 | 253 | 254)
}

/// Whether an inside packet is UDP (or may be: a chain too long or cut short to tell) to one of
/// the gateway's external addresses, whatever its IPv4 options, fragmentation or IPv6 extension
/// headers. Every fragment carries the protocol (IPv4 header, IPv6 fragment header's next
/// header), so later fragments are caught too.
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "the key is lent to the map helper, not copied again onto the 512-byte BPF stack"
)]
#[inline(always)]
fn inside_to_external_udp(ctx: &TcContext) -> bool {
    let Ok(ether_type) = ctx.load::<u16>(12) else {
        return false;
    };
    match u16::from_be(ether_type) {
        ETH_P_IPV4 => {
            let Ok(header) = ctx.load::<[u8; IPV4_HLEN]>(ETH_HLEN) else {
                return false;
            };
            let dst = ipv4_mapped([header[16], header[17], header[18], header[19]]);
            // SAFETY: presence only.
            header[9] == IPPROTO_UDP && unsafe { EXTERNAL_ADDRS.get(&dst) }.is_some()
        }
        ETH_P_IPV6 => {
            let Ok(dst) = ctx.load::<Addr16>(ETH_HLEN + 24) else {
                return false;
            };
            // SAFETY: presence only.
            if unsafe { EXTERNAL_ADDRS.get(&dst) }.is_none() {
                return false;
            }
            let Ok(mut next) = ctx.load::<u8>(ETH_HLEN + 6) else {
                return true;
            };
            let mut offset = ETH_HLEN + IPV6_HLEN;
            for _ in 0..MAX_IPV6_EXT_HEADERS {
                if !is_ipv6_extension(next) {
                    return next == IPPROTO_UDP;
                }
                let Ok(ext) = ctx.load::<[u8; 2]>(offset) else {
                    return true;
                };
                offset += match next {
                    IPV6_FRAGMENT => 8,
                    IPV6_AUTH => (usize::from(ext[1]) + 2) * 4,
                    _ => (usize::from(ext[1]) + 1) * 8,
                };
                next = ext[0];
            }
            // A chain too long to finish may hide UDP: fail closed.
            next == IPPROTO_UDP || is_ipv6_extension(next)
        }
        _ => false,
    }
}

/// Drops inside datagrams to external addresses; relays bound clients' datagrams in the kernel.
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss,
    reason = "the framing header is at most 22 octets and UDP lengths are bounded by the packet \
              (64 KiB); the checksum helpers take the 32-bit sum of bpf_csum_diff as a u64, and \
              bpf_redirect_neigh returns a tc action"
)]
#[expect(
    clippy::too_many_lines,
    reason = "one outbound rewrite in the order the packet is changed, read top to bottom"
)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "the key is lent to the map helper, not copied again onto the 512-byte BPF stack"
)]
#[inline(always)]
fn try_internal(ctx: &TcContext) -> Result<Relayed, ExitReason> {
    if inside_to_external_udp(ctx) {
        return Err(ExitReason::InsideToExternalAddress);
    }
    let packet = parse(ctx).ok_or(ExitReason::NotUdpPassed)?;
    let key = OutboundKey {
        client_addr: packet.src,
        relay_addr: packet.dst,
        client_port_be: packet.src_port_be,
        relay_port_be: packet.dst_port_be,
    };
    let Some(value_ptr) = OUTBOUND.get_ptr_mut(&key) else {
        return Err(unrelayed_outbound(&packet));
    };
    // SAFETY: a successful lookup; the entry stays valid for the program's run (RCU).
    let value: &OutboundValue = unsafe { &*value_ptr };
    if value.framing == framing::RAW {
        return raw_outbound(ctx, &packet, value_ptr);
    }
    if !daemon_alive() || !packet.whole {
        return Err(ExitReason::OutboundToUserspace);
    }
    let l4 = packet.l4;
    let first: [u8; 4] = ctx
        .load(l4 + UDP_HLEN)
        .map_err(|_| ExitReason::OutboundToUserspace)?;
    // RSV and FRAG must be zero in both framings.
    if first[0] != 0 || first[1] != 0 || (value.framing == framing::SOCKS5 && first[2] != 0) {
        return Err(ExitReason::OutboundToUserspace);
    }
    let mut header = [0u8; 24];
    let (header_len, dest, dest_port_be) = if value.framing == framing::ENHANCED {
        let bytes: [u8; 8] = ctx
            .load(l4 + UDP_HLEN)
            .map_err(|_| ExitReason::OutboundToUserspace)?;
        // DGID must be 0 (a whole datagram) and the AID the binding's, as in the userspace relay.
        if bytes[2] != 0 || bytes[3] != 0 || bytes[4..8] != value.aid_be.to_ne_bytes() {
            return Err(ExitReason::OutboundToUserspace);
        }
        header[..8].copy_from_slice(&bytes);
        (8, value.remote_addr, value.remote_port_be)
    } else if first[3] == 1 {
        let bytes: [u8; 10] = ctx
            .load(l4 + UDP_HLEN)
            .map_err(|_| ExitReason::OutboundToUserspace)?;
        header[..10].copy_from_slice(&bytes);
        let dest = ipv4_mapped([bytes[4], bytes[5], bytes[6], bytes[7]]);
        (10, dest, u16::from_ne_bytes([bytes[8], bytes[9]]))
    } else if first[3] == 4 {
        let bytes: [u8; 22] = ctx
            .load(l4 + UDP_HLEN)
            .map_err(|_| ExitReason::OutboundToUserspace)?;
        header[..22].copy_from_slice(&bytes);
        let mut dest = [0u8; 16];
        dest.copy_from_slice(&bytes[4..20]);
        (22, dest, u16::from_ne_bytes([bytes[20], bytes[21]]))
    } else {
        return Err(ExitReason::OutboundToUserspace);
    };
    if usize::from(packet.udp_len) < UDP_HLEN + header_len {
        return Err(ExitReason::OutboundToUserspace);
    }
    // No family translation in the kernel.
    if is_ipv4_mapped(&dest) == packet.v6 || is_ipv4_mapped(&value.external_relay_addr) == packet.v6
    {
        return Err(ExitReason::OutboundToUserspace);
    }
    // RFC 1928: only to a remote the association admits (it has an inbound entry).
    if value.framing == framing::SOCKS5 {
        let inbound = BindingKey {
            remote_addr: dest,
            relay_addr: value.external_relay_addr,
            remote_port_be: dest_port_be,
            relay_port_be: value.external_relay_port_be,
        };
        // SAFETY: presence only.
        if unsafe { BINDINGS.get(&inbound) }.is_none() {
            return Err(ExitReason::OutboundToUserspace);
        }
    }
    if checksum_is_partial(ctx, &packet) {
        return Err(ExitReason::PartialChecksumToUserspace);
    }
    let settings = settings();
    let shrink = header_len;
    let old_csum: u16 = ctx
        .load(l4 + 6)
        .map_err(|_| ExitReason::OutboundToUserspace)?;
    let has_csum = packet.v6 || old_csum != 0;
    let old_len_be = packet.udp_len.to_be();
    let new_len_be = (packet.udp_len - shrink as u16).to_be();

    // Move the UDP header over the framing, then cut the gap right after the IP header.
    let udp: [u8; UDP_HLEN] = ctx.load(l4).map_err(|_| ExitReason::OutboundToUserspace)?;
    let failed = relay_failed;
    ctx.store(l4 + shrink, &udp, 0).map_err(failed)?;
    ctx.adjust_room(-(shrink as i32), BPF_ADJ_ROOM_NET, 0)
        .map_err(failed)?;

    let csum_off = l4 + 6;
    let l4_flags = u64::from(BPF_F_MARK_MANGLED_0);
    if packet.v6 {
        rewrite_ipv6_addrs(ctx, &packet, &value.external_relay_addr, &dest, csum_off)
            .map_err(failed)?;
        let payload_len: u16 = ctx.load(ETH_HLEN + 4).map_err(failed)?;
        let new_payload_len = (u16::from_be(payload_len) - shrink as u16).to_be();
        ctx.store(ETH_HLEN + 4, &new_payload_len, 0)
            .map_err(failed)?;
    } else {
        rewrite_ipv4(
            ctx,
            &value.external_relay_addr,
            &dest,
            -(shrink as i32),
            has_csum,
            csum_off,
        )
        .map_err(failed)?;
    }
    let ports = UdpRewrite {
        l4,
        old_src_port_be: packet.src_port_be,
        new_src_port_be: value.external_relay_port_be,
        old_dst_port_be: packet.dst_port_be,
        new_dst_port_be: dest_port_be,
        old_len_be,
        new_len_be,
    };
    ports.apply(ctx, has_csum).map_err(failed)?;
    if has_csum {
        // The framing octets left the checksummed data.
        let removed = sum_of(&header, padded(header_len));
        ctx.l4_csum_replace(csum_off, 0, u64::from(!(removed as u32)), l4_flags)
            .map_err(failed)?;
    }
    touch(
        // SAFETY: the entry pointer from the lookup above.
        unsafe { &raw mut (*value_ptr).counters },
        u64::from(packet.udp_len) - (UDP_HLEN + header_len) as u64,
    );
    Ok(redirect(
        settings.external_ifindex,
        ExitReason::KernelRelayedOutbound,
    ))
}

/// An inside datagram with no outbound entry: a RAW client socket may send only to its remotes
/// (entries) and to the gateway's internal relay address (the userspace relay); anything else
/// from it is dropped, as the firewall would without the binding. Other sockets' datagrams go to
/// the stack as before.
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "the key is lent to the map helper, not copied again onto the 512-byte BPF stack"
)]
#[inline(always)]
fn unrelayed_outbound(packet: &Datagram) -> ExitReason {
    let key = ClientSocketKey {
        addr: packet.src,
        port_be: packet.src_port_be,
        padding: 0,
    };
    // SAFETY: one field is compared, within the program's run.
    match unsafe { RAW_CLIENTS.get(&key) } {
        Some(raw) if raw.internal_relay_addr != packet.dst => ExitReason::RawToOtherDestination,
        _ => ExitReason::OutboundToUserspace,
    }
}

/// A RAW client's datagram to its remote: only the source changes (client -> external relay).
/// With the daemon gone it is dropped (fail closed: the stack would forward it unchanged where
/// forwarding is on).
#[inline(always)]
fn raw_outbound(
    ctx: &TcContext,
    packet: &Datagram,
    value_ptr: *mut OutboundValue,
) -> Result<Relayed, ExitReason> {
    if !daemon_alive() {
        return Err(ExitReason::DaemonGone);
    }
    // SAFETY: a successful lookup by the caller; valid for the program's run (RCU).
    let value: &OutboundValue = unsafe { &*value_ptr };
    // No family translation in the kernel (the daemon installs no such entry; if one were
    // there, half an address would be written).
    if is_ipv4_mapped(&value.external_relay_addr) == packet.v6 {
        return Err(ExitReason::OutboundToUserspace);
    }
    let rewrite = RawRewrite {
        end: Endpoint::Source,
        addr: &value.external_relay_addr,
        port_be: value.external_relay_port_be,
        // SAFETY: the entry pointer from the caller's lookup.
        counters: unsafe { &raw mut (*value_ptr).counters },
        ifindex: settings().external_ifindex,
        too_big: ExitReason::RawTooBigForExternalLink,
        relayed: ExitReason::KernelRelayedRawOutbound,
    };
    rewrite.apply(ctx, packet)
}
