//! Types shared by the daemon and the eBPF programs. This crate is an ABI: every map key and value
//! is `#[repr(C)]` with explicit padding and a compile-time size check, byte order is in the field
//! names, and the list of exit reasons exists only here.
//!
//! It must stay `no_std` and free of logic beyond naming and address mapping.
#![no_std]

mod monitor;
mod reason;

pub use monitor::{
    EVENTS_RING_BYTES, LEASE_NS, MonitorBudget, MonitorEvent, MonitorHook, MonitorSettings,
    flow as monitor_flow,
};
pub use reason::{ExitReason, Verdict};

/// Map names, shared so user space finds the maps the eBPF object declares.
pub mod map_names {
    /// Per-CPU `{packets, bytes}` per [`super::ExitReason`].
    pub const EXIT_COUNTERS: &str = "EXIT_COUNTERS";
    /// Exact bindings: [`super::BindingKey`] -> [`super::BindingValue`].
    pub const BINDINGS: &str = "BINDINGS";
    /// UDP the host itself needs: [`super::HostAllowKey`] -> [`super::HostAllowValue`].
    pub const HOST_ALLOW: &str = "HOST_ALLOW";
    /// Outbound direction: [`super::OutboundKey`] -> [`super::OutboundValue`].
    pub const OUTBOUND: &str = "OUTBOUND";
    /// The gateway's external addresses ([`super::Addr16`] -> `u32`, value unused).
    pub const EXTERNAL_ADDRS: &str = "EXTERNAL_ADDRS";
    /// One [`super::DatapathSettings`] at index 0.
    pub const SETTINGS: &str = "SETTINGS";
    /// The daemon's heartbeat: `u64` `CLOCK_MONOTONIC` nanoseconds at index 0.
    pub const HEARTBEAT: &str = "HEARTBEAT";
    /// The SOCKS control listeners: [`super::ControlPortKey`] -> `u32` (value unused). TCP to
    /// them arriving on the external interface is dropped.
    pub const CONTROL_PORTS: &str = "CONTROL_PORTS";
    /// Client sockets of header-less (RAW) bindings: [`super::ClientSocketKey`] ->
    /// [`super::RawClientValue`]. Their UDP to anything but a remote or the gateway is dropped.
    pub const RAW_CLIENTS: &str = "RAW_CLIENTS";
    /// The relay addresses and their port ranges: [`super::Addr16`] -> [`super::RelaySpan`].
    pub const RELAY_ADDRS: &str = "RELAY_ADDRS";
    /// The daemon's shared relay sockets (a `SOCKMAP`), at [`super::relay_socket_index`].
    pub const RELAY_SOCKETS: &str = "RELAY_SOCKETS";
    /// Multicast groups the gateway receives: [`super::GroupKey`] -> [`super::GroupValue`].
    pub const GROUPS: &str = "GROUPS";
    /// The allowed sources of groups with a source list: [`super::GroupSourceKey`] -> `u32`
    /// (value unused).
    pub const GROUP_SOURCES: &str = "GROUP_SOURCES";
    /// The fan-out program (a `PROG_ARRAY` of one slot, 0): empty when it could not load.
    pub const FANOUT_PROGRAMS: &str = "FANOUT_PROGRAMS";
    /// `gateway monitor`'s request: one [`super::MonitorSettings`] at index 0.
    pub const MONITOR_SETTINGS: &str = "MONITOR_SETTINGS";
    /// Per CPU, one [`super::MonitorBudget`] at index 0.
    pub const MONITOR_BUDGET: &str = "MONITOR_BUDGET";
    /// The ring buffer of [`super::MonitorEvent`]s.
    pub const MONITOR_EVENTS: &str = "MONITOR_EVENTS";
}

/// Name of the XDP program on the external interface (the gate).
pub const XDP_EXTERNAL_PROGRAM: &str = "gateway_external";
/// Name of the tc program on the external interface's ingress (kernel relay, inbound).
pub const TC_INBOUND_PROGRAM: &str = "gateway_inbound";
/// Name of the tc program that is the gate and the inbound relay in one, on the external
/// interface's ingress where the gate runs in tc instead of XDP.
pub const TC_GATE_PROGRAM: &str = "gateway_gate";
/// Name of the tc program on the internal interface's ingress (kernel relay, outbound, and the
/// drop of inside datagrams to external addresses).
pub const TC_INTERNAL_PROGRAM: &str = "gateway_internal";
/// Name of the tc program that fans a received group's datagrams out, tail-called from the
/// external interface's tc program through [`map_names::FANOUT_PROGRAMS`]. Loaded apart, so a
/// kernel whose verifier refuses it (Linux 6.1 runs out of its instruction budget) still runs
/// the gate and the relay; group datagrams then go to the userspace relay.
pub const TC_FANOUT_PROGRAM: &str = "gateway_fanout";
/// The same fan-out for at most [`SMALL_FANOUT_SUBSCRIBERS`] kernel subscribers: loaded where
/// the verifier refuses [`TC_FANOUT_PROGRAM`] (its walk of 64 subscribers is 963,837
/// instructions on Linux 6.1, near the 1,000,000 limit; 425,000 on 6.18).
pub const TC_FANOUT_SMALL_PROGRAM: &str = "gateway_fanout_small";

/// Name of the `sk_lookup` program in the daemon's network namespace: UDP to a relay port goes
/// to the daemon's shared relay socket of its family and side.
pub const SK_LOOKUP_PROGRAM: &str = "gateway_relay_lookup";

/// Without a heartbeat for this long, bindings admit nothing (the daemon is presumed dead).
pub const DEFAULT_FAIL_CLOSED_AFTER_NS: u64 = 2_000_000_000;

/// Default capacity of the binding map (overridable at load time).
pub const DEFAULT_MAX_BINDINGS: u32 = 65_536;
/// Capacity of the host allow-list.
pub const MAX_HOST_ALLOW: u32 = 1024;
/// Capacity of the control-listener map.
pub const MAX_CONTROL_PORTS: u32 = 64;

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

/// Per-entry traffic counters, updated by the kernel relay (and read by the daemon for the idle
/// timeout).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EntryCounters {
    pub packets: u64,
    pub bytes: u64,
    /// `CLOCK_MONOTONIC` nanoseconds of the last datagram (0: none yet).
    pub last_seen_ns: u64,
}
const _: () = assert!(size_of::<EntryCounters>() == 24);

/// Who relays a binding's datagrams.
pub mod relay_mode {
    /// The XDP gate admits; the datagram goes up to the userspace relay's socket.
    pub const USERSPACE: u32 = 0;
    /// The tc programs rewrite and redirect in the kernel.
    pub const KERNEL: u32 = 1;
}

/// How datagrams are framed between relay and client.
pub mod framing {
    /// The enhanced mode's 8-octet header `RSV FRAG DGID(2) AID(4)`.
    pub const ENHANCED: u32 = 1;
    /// The RFC 1928 header `RSV(2) FRAG ATYP ADDR PORT` (10 octets for IPv4, 22 for IPv6).
    pub const SOCKS5: u32 = 2;
    /// No header (the enhanced mode's RAW flag): inbound only the destination is rewritten
    /// (external relay -> client), outbound only the source (client -> external relay); the
    /// client's socket talks to the remote's own address.
    pub const RAW: u32 = 3;
}

/// Where and how a datagram that matches a binding is delivered.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BindingValue {
    pub client_addr: Addr16,
    pub internal_relay_addr: Addr16,
    pub client_port_be: u16,
    pub internal_relay_port_be: u16,
    /// The association id in network order (as it goes into the header).
    pub aid_be: u32,
    /// A [`relay_mode`] value.
    pub mode: u32,
    /// A [`framing`] value.
    pub framing: u32,
    /// Inbound (remote to client) traffic.
    pub counters: EntryCounters,
}
const _: () = assert!(size_of::<BindingValue>() == 72);

/// Key of the outbound direction, as seen on a datagram arriving on the internal interface:
/// source = client, destination = internal relay (for [`framing::RAW`]: the remote itself, which
/// is never a gateway address, so the two kinds of key cannot collide).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct OutboundKey {
    pub client_addr: Addr16,
    pub relay_addr: Addr16,
    pub client_port_be: u16,
    pub relay_port_be: u16,
}
const _: () = assert!(size_of::<OutboundKey>() == 36);

/// Where a client's datagram goes. For [`framing::ENHANCED`] (Open binding) the destination is
/// `remote`; for [`framing::SOCKS5`] it is named in the header and must have an inbound entry
/// towards `external_relay` (the client sent to it before, so it is admitted).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutboundValue {
    pub remote_addr: Addr16,
    pub external_relay_addr: Addr16,
    pub remote_port_be: u16,
    pub external_relay_port_be: u16,
    pub aid_be: u32,
    /// A [`framing`] value.
    pub framing: u32,
    pub padding: u32,
    /// Outbound (client to remote) traffic.
    pub counters: EntryCounters,
}
const _: () = assert!(size_of::<OutboundValue>() == 72);

/// A client socket (address and UDP port) of a RAW binding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClientSocketKey {
    pub addr: Addr16,
    pub port_be: u16,
    pub padding: u16,
}
const _: () = assert!(size_of::<ClientSocketKey>() == 20);

/// What a RAW client socket may still send to besides its remotes: the gateway's internal relay
/// address it was given (header-path traffic), which goes to the userspace relay.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawClientValue {
    pub internal_relay_addr: Addr16,
}
const _: () = assert!(size_of::<RawClientValue>() == 16);

/// Settings of the datapath, written by the daemon at start.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatapathSettings {
    /// Where inbound datagrams are redirected.
    pub internal_ifindex: u32,
    /// Where outbound datagrams are redirected.
    pub external_ifindex: u32,
    /// Fail closed when the heartbeat is older than this.
    pub fail_closed_after_ns: u64,
}
const _: () = assert!(size_of::<DatapathSettings>() == 16);

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
    pub reserved: u32,
}
const _: () = assert!(size_of::<HostAllowValue>() == 4);

/// A SOCKS control listener: its address (all zeros for a wildcard listener) and TCP port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ControlPortKey {
    pub addr: Addr16,
    pub port_be: u16,
    pub padding: u16,
}
const _: () = assert!(size_of::<ControlPortKey>() == 20);

/// The relay ports of one relay address: internal (client side) and external (remote side),
/// each inclusive, `first > last` for none. An address may be both (tests on loopback), with
/// ranges that do not overlap.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelaySpan {
    pub internal_first: u16,
    pub internal_last: u16,
    pub external_first: u16,
    pub external_last: u16,
}
const _: () = assert!(size_of::<RelaySpan>() == 8);

impl RelaySpan {
    /// No port of either side.
    pub const NONE: Self = Self {
        internal_first: 1,
        internal_last: 0,
        external_first: 1,
        external_last: 0,
    };

    /// The side whose range holds `port`, if one does.
    pub const fn side_of(&self, port: u16) -> Option<RelaySide> {
        if self.internal_first <= port && port <= self.internal_last {
            Some(RelaySide::Inside)
        } else if self.external_first <= port && port <= self.external_last {
            Some(RelaySide::Outside)
        } else {
            None
        }
    }
}

/// Which side of the gateway a relay socket serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RelaySide {
    /// Client side: internal relay addresses.
    Inside,
    /// Remote side: external relay addresses.
    Outside,
}

/// Slots of the relay socket map: one socket per address family and side.
pub const RELAY_SOCKET_SLOTS: u32 = 4;

/// The slot of the shared relay socket for a family (`ipv6`) and side.
pub const fn relay_socket_index(ipv6: bool, side: RelaySide) -> u32 {
    let family = if ipv6 { 2 } else { 0 };
    match side {
        RelaySide::Inside => family,
        RelaySide::Outside => family + 1,
    }
}

/// Most relay addresses (internal and external together) one daemon serves.
pub const MAX_RELAY_ADDRS: u32 = 64;

/// Most multicast groups (address and port) the gateway receives at once.
pub const MAX_GROUPS: u32 = 256;
/// Capacity of the per-group source lists, all groups together.
pub const MAX_GROUP_SOURCES: u32 = 1024;
/// Most subscribers of one group the kernel delivers to (multicast-to-unicast); the userspace
/// relay serves the rest.
pub const MAX_KERNEL_SUBSCRIBERS: usize = 64;
/// Kernel subscribers per group of [`TC_FANOUT_SMALL_PROGRAM`].
pub const SMALL_FANOUT_SUBSCRIBERS: usize = 16;

/// `skb->mark` of the copy of a group datagram the fan-out hands back to the external
/// interface's input for the userspace relay: the programs pass a packet with this mark
/// untouched. A mark never comes from the wire (a NIC starts it at 0, and crossing network
/// namespaces clears it).
pub const FANOUT_TO_STACK_MARK: u32 = 0x6777_6d63;

/// Key of a multicast group the gateway receives, as seen on a datagram arriving on the external
/// interface: destination = group and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GroupKey {
    pub group: Addr16,
    pub port_be: u16,
    pub padding: u16,
}
const _: () = assert!(size_of::<GroupKey>() == 20);

/// Key of one allowed source of a group with a source list.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GroupSourceKey {
    pub group: Addr16,
    pub source: Addr16,
    pub port_be: u16,
    pub padding: u16,
}
const _: () = assert!(size_of::<GroupSourceKey>() == 36);

/// Bits of [`GroupValue::flags`].
pub mod group_flags {
    /// Multicast-to-multicast: re-send each datagram on the internal interface to the group,
    /// TTL (hop limit) 1, from [`super::GroupValue::inside_source`], no header.
    pub const INSIDE_MULTICAST: u32 = 1;
    /// The userspace relay needs the datagram too (subscribers beyond the kernel's table): a
    /// copy marked [`super::FANOUT_TO_STACK_MARK`] goes back to the input for the stack.
    pub const TO_USERSPACE: u32 = 2;
    /// Only sources in `GROUP_SOURCES` are admitted (checked by the gate).
    pub const SOURCE_LIST: u32 = 4;
}

/// One subscriber the kernel delivers a group's datagrams to (multicast-to-unicast), with the
/// enhanced mode's 8-octet header carrying its AID.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupSubscriber {
    pub client_addr: Addr16,
    pub internal_relay_addr: Addr16,
    /// The next hop's MAC address towards the client (from the daemon's neighbour table).
    pub client_mac: [u8; 6],
    pub client_port_be: u16,
    pub internal_relay_port_be: u16,
    pub padding: u16,
    /// The association id in network order (as it goes into the header).
    pub aid_be: u32,
    /// What the kernel delivered to this subscriber.
    pub counters: EntryCounters,
}
const _: () = assert!(size_of::<GroupSubscriber>() == 72);

/// A group the gateway receives: how its datagrams are delivered inside.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupValue {
    /// [`group_flags`] bits.
    pub flags: u32,
    /// How many of `subscribers` (from the front) are in use.
    pub kernel_subscribers: u32,
    /// The internal interface's MAC address (the source of every frame sent inside).
    pub internal_mac: [u8; 6],
    pub padding: [u8; 2],
    /// Source address of multicast-to-multicast re-sends (the gateway's internal address of
    /// the group's family).
    pub inside_source: Addr16,
    /// Every datagram of the group the gate admitted.
    pub received: EntryCounters,
    /// Multicast-to-multicast re-sends.
    pub inside_sent: EntryCounters,
    pub subscribers: [GroupSubscriber; MAX_KERNEL_SUBSCRIBERS],
}
const _: () = assert!(size_of::<GroupValue>() == 80 + 72 * MAX_KERNEL_SUBSCRIBERS);

impl Default for GroupValue {
    fn default() -> Self {
        Self {
            flags: 0,
            kernel_subscribers: 0,
            internal_mac: [0; 6],
            padding: [0; 2],
            inside_source: [0; 16],
            received: EntryCounters::default(),
            inside_sent: EntryCounters::default(),
            subscribers: [GroupSubscriber::default(); MAX_KERNEL_SUBSCRIBERS],
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), contain only integers and byte arrays, and have explicit
    // padding fields, so every bit pattern is valid and there are no uninitialised bytes.
    unsafe impl aya::Pod for super::Counter {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BindingKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RelaySpan {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BindingValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::HostAllowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::HostAllowValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OutboundKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OutboundValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DatapathSettings {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::EntryCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ControlPortKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ClientSocketKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RawClientValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::GroupKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::GroupSourceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::GroupValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::MonitorSettings {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::MonitorBudget {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_span_sorts_ports_into_sides() {
        let span = RelaySpan {
            internal_first: 100,
            internal_last: 199,
            external_first: 200,
            external_last: 200,
        };
        assert_eq!(span.side_of(99), None);
        assert_eq!(span.side_of(100), Some(RelaySide::Inside));
        assert_eq!(span.side_of(199), Some(RelaySide::Inside));
        assert_eq!(span.side_of(200), Some(RelaySide::Outside));
        assert_eq!(span.side_of(201), None);
        for port in [0, 1, 100, 65_535] {
            assert_eq!(RelaySpan::NONE.side_of(port), None);
        }
    }

    #[test]
    fn every_family_and_side_has_its_own_slot() {
        let slots = [
            relay_socket_index(false, RelaySide::Inside),
            relay_socket_index(false, RelaySide::Outside),
            relay_socket_index(true, RelaySide::Inside),
            relay_socket_index(true, RelaySide::Outside),
        ];
        for (i, slot) in slots.iter().enumerate() {
            assert!(*slot < RELAY_SOCKET_SLOTS);
            assert!(!slots[..i].contains(slot));
        }
    }
}
