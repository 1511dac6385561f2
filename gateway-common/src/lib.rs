//! Types shared by the daemon and the eBPF programs. This crate is an ABI: every map key and value
//! is `#[repr(C)]` with explicit padding and a compile-time size check, byte order is in the field
//! names, and the list of exit reasons exists only here.
//!
//! It must stay `no_std` and free of logic beyond naming and address mapping.
#![no_std]

mod reason;

pub use reason::{DropReason, Verdict};

/// Map names, shared so user space finds the maps the eBPF object declares.
pub mod map_names {
    /// Per-CPU `{packets, bytes}` per [`super::DropReason`].
    pub const EXIT_COUNTERS: &str = "EXIT_COUNTERS";
    /// Exact bindings: [`super::BindingKey`] -> [`super::BindingValue`].
    pub const BINDINGS: &str = "BINDINGS";
    /// UDP the host itself needs: [`super::HostAllowKey`] -> [`super::HostAllowValue`].
    pub const HOST_ALLOW: &str = "HOST_ALLOW";
}

/// Name of the XDP program on the external interface.
pub const XDP_EXTERNAL_PROGRAM: &str = "gateway_external";

/// Default capacity of the binding map (overridable at load time).
pub const DEFAULT_MAX_BINDINGS: u32 = 65_536;
/// Capacity of the host allow-list.
pub const MAX_HOST_ALLOW: u32 = 1024;

/// Packets and bytes for one exit reason on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(size_of::<Counter>() == 16);

/// An address as 16 octets in network order; IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`).
pub type Addr16 = [u8; 16];

/// Maps an IPv4 address (network-order octets) to its IPv4-mapped IPv6 form.
pub const fn ipv4_mapped(octets: [u8; 4]) -> Addr16 {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

/// Key of an exact binding, as seen on a datagram arriving on the external interface:
/// source = remote, destination = external relay.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BindingKey {
    pub remote_addr: Addr16,
    pub relay_addr: Addr16,
    pub remote_port_be: u16,
    pub relay_port_be: u16,
}
const _: () = assert!(size_of::<BindingKey>() == 36);

/// What to do with a datagram that matches a binding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BindingValue {
    /// A [`Verdict`] as `u32`.
    pub verdict: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<BindingValue>() == 8);

/// Key of a host allow-list entry (UDP the gateway host itself needs, such as its resolver's
/// replies): source = remote, destination = local.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct HostAllowKey {
    pub remote_addr: Addr16,
    pub local_addr: Addr16,
    pub remote_port_be: u16,
    pub local_port_be: u16,
}
const _: () = assert!(size_of::<HostAllowKey>() == 36);

/// Value of a host allow-list entry (reserved for flags; presence admits).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostAllowValue {
    pub _reserved: u32,
}
const _: () = assert!(size_of::<HostAllowValue>() == 4);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), contain only integers and byte arrays, and have explicit
    // padding fields, so every bit pattern is valid and there are no uninitialised bytes.
    unsafe impl aya::Pod for super::Counter {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BindingKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BindingValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::HostAllowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::HostAllowValue {}
}
