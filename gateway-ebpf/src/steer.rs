//! `gateway_relay_lookup` (`sk_lookup`, attached to the daemon's network namespace): a UDP
//! datagram delivered locally to a relay port of one of the gateway's relay addresses goes to the
//! daemon's one shared relay socket of that family and side, whatever socket (if any) is bound
//! to the port. That is what lets a binding hold no socket: the daemon demultiplexes by the
//! original destination (`IP_RECVORIGDSTADDR`).
//!
//! Only steers; it never drops (the gate on the external interface decides what is admitted,
//! and the daemon counts what it cannot place). Every other lookup passes untouched, so other
//! programs and sockets of the namespace keep working.

use aya_ebpf::{
    bindings::{bpf_sk_lookup, sk_action},
    macros::sk_lookup,
    programs::SkLookupContext,
};
use core::ptr::read_volatile;

use gateway_common::{ipv4_mapped, relay_socket_index};

use crate::maps::{RELAY_ADDRS, RELAY_SOCKETS};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPPROTO_UDP: u32 = 17;

/// `BPF_SK_LOOKUP_F_REPLACE` of the kernel's UAPI: override a socket selected before.
const BPF_SK_LOOKUP_F_REPLACE: u64 = 1;

#[expect(
    clippy::needless_pass_by_value,
    reason = "the entry point's signature is the sk_lookup macro's"
)]
#[sk_lookup]
pub fn gateway_relay_lookup(ctx: SkLookupContext) -> u32 {
    let lookup: *const bpf_sk_lookup = ctx.lookup;
    // Every field is read up front, one 32-bit load at a constant offset each: the verifier
    // allows no wider context loads and no context pointer chosen by a branch (which the
    // compiler would make of loads in two arms).
    // SAFETY: the kernel hands every sk_lookup program a valid, readable context; these are
    // field addresses within it.
    let (protocol, family, local_v4, local_v6, local_port) = unsafe {
        (
            read_volatile(&raw const (*lookup).protocol),
            read_volatile(&raw const (*lookup).family),
            read_volatile(&raw const (*lookup).local_ip4),
            [
                read_volatile(&raw const (*lookup).local_ip6[0]),
                read_volatile(&raw const (*lookup).local_ip6[1]),
                read_volatile(&raw const (*lookup).local_ip6[2]),
                read_volatile(&raw const (*lookup).local_ip6[3]),
            ],
            read_volatile(&raw const (*lookup).local_port),
        )
    };
    if protocol != IPPROTO_UDP {
        return sk_action::SK_PASS;
    }
    let (key, is_v6) = match family {
        AF_INET => (ipv4_mapped(local_v4.to_ne_bytes()), false),
        AF_INET6 => {
            let mut key = [0u8; 16];
            key[..4].copy_from_slice(&local_v6[0].to_ne_bytes());
            key[4..8].copy_from_slice(&local_v6[1].to_ne_bytes());
            key[8..12].copy_from_slice(&local_v6[2].to_ne_bytes());
            key[12..].copy_from_slice(&local_v6[3].to_ne_bytes());
            (key, true)
        }
        _ => return sk_action::SK_PASS,
    };
    // SAFETY: a lookup in a map of plain values.
    let Some(span) = (unsafe { RELAY_ADDRS.get(key) }) else {
        return sk_action::SK_PASS;
    };
    let Ok(port) = u16::try_from(local_port) else {
        return sk_action::SK_PASS;
    };
    let Some(side) = span.side_of(port) else {
        return sk_action::SK_PASS;
    };
    let slot = relay_socket_index(is_v6, side);
    // No socket in the slot (the daemon has none of that family): normal lookup. REPLACE: a
    // daemon's program runs after those attached before it, so during an upgrade the new
    // daemon's sockets take the relay ports over from the old one's (whose program selected
    // first).
    let _ = RELAY_SOCKETS.redirect_sk_lookup(&ctx, slot, BPF_SK_LOOKUP_F_REPLACE);
    sk_action::SK_PASS
}
