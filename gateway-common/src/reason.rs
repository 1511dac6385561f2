//! The one list of exit reasons of the datapath. Every packet the programs see leaves through
//! exactly one reason, counted per CPU in `{packets, bytes}`. Values are an ABI shared with pinned
//! maps of running gateways: append only, never renumber.

/// How and why a packet left the program: dropped, passed or redirected, each for one named
/// reason, so every exit is counted.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExitReason {
    /// Not UDP (ARP, ICMP, IPv6 neighbour discovery, TCP, ...): passed to the stack.
    NotUdpPassed = 0,
    /// UDP with no admitting binding or allow-list entry: dropped.
    NoBinding = 1,
    /// A header (Ethernet, VLAN, IPv4, IPv6, extension, UDP) is cut short: dropped.
    TruncatedHeader = 2,
    /// A UDP datagram in IP fragments (we never reassemble): dropped.
    IpFragment = 3,
    /// IPv4 UDP with IP options: dropped.
    Ipv4Options = 4,
    /// IPv6 whose extension-header chain is longer than the program can bound-check: dropped.
    Ipv6ExtensionHeaders = 5,
    /// UDP on the host allow-list (resolver replies, operator entries): passed.
    HostAllowListed = 6,
    /// UDP matching a binding whose verdict is "pass to the userspace relay": passed.
    BindingToUserspace = 7,
    /// IPv4 header with an invalid header length or version: dropped.
    MalformedIpHeader = 8,
    /// A binding hit relayed to its client in the kernel (tc, inbound): redirected.
    KernelRelayedInbound = 9,
    /// A client datagram relayed to its remote in the kernel (tc, outbound): redirected.
    KernelRelayedOutbound = 10,
    /// A binding hit while the daemon's heartbeat is stale (daemon dead): dropped, fail closed.
    DaemonGone = 11,
    /// UDP from inside addressed to one of the gateway's external addresses: dropped, so no
    /// inside host can pose as a remote.
    InsideToExternalAddress = 12,
    /// A hit the framing header would push over the internal link's MTU: passed to the
    /// userspace relay.
    TooBigForKernelRelay = 13,
    /// Client datagram the kernel relay does not handle (no outbound entry, malformed or
    /// mismatched header): passed to the userspace relay, which applies the same rules.
    OutboundToUserspace = 14,
    /// A packet the tc program on the external interface leaves to the stack (not a kernel-relayed
    /// binding; the XDP gate already admitted it).
    InboundToStack = 15,
    /// The kernel could not rewrite a hit (helper failure; should not happen): dropped, since the
    /// datagram may be half rewritten.
    KernelRelayFailed = 16,
    /// A binding hit handed by XDP to the tc kernel relay: passed.
    BindingToKernelRelay = 17,
    /// A datagram whose UDP checksum is still to be completed (`CHECKSUM_PARTIAL`, from a local
    /// or virtual sender; a NIC never delivers one): moving its UDP header would break the later
    /// checksum, so it goes to the userspace relay.
    PartialChecksumToUserspace = 18,
    /// TCP to a SOCKS control listener that arrived on the external interface (the weak-host
    /// model would deliver it): dropped, so the control port answers only from inside.
    ControlPortFromOutside = 19,
    /// A header-less (RAW) binding hit relayed to its client in the kernel (tc, inbound): only
    /// the destination rewritten, the remote kept as source. Redirected.
    KernelRelayedRawInbound = 20,
    /// A RAW client's datagram to its remote relayed in the kernel (tc, outbound): only the
    /// source rewritten to the external relay address. Redirected.
    KernelRelayedRawOutbound = 21,
    /// UDP from a RAW binding's client socket to an address that is neither its remote nor the
    /// gateway: dropped, as the firewall would without the binding.
    RawToOtherDestination = 22,
    /// A RAW client's datagram too big for the external link (the kernel relay cannot fragment,
    /// and user space never sees datagrams addressed to the remote): dropped.
    RawTooBigForExternalLink = 23,
    /// A datagram to a multicast group the gateway receives, from an allowed source, handed by
    /// the gate to the tc fan-out: passed.
    MulticastToFanOut = 24,
    /// A datagram to a received group from a source not on the group's source list (another
    /// sender, or another gateway on the border injecting duplicates): dropped.
    MulticastSourceNotAllowed = 25,
    /// One copy of a group datagram delivered by the kernel to one subscriber as unicast with
    /// its AID in the 8-octet header (multicast-to-unicast): redirected.
    KernelRelayedMulticast = 26,
    /// A group datagram re-sent by the kernel on the internal interface to the group, TTL 1
    /// (multicast-to-multicast): redirected.
    KernelRelayedMulticastInside = 27,
    /// A group datagram left to the stack for the userspace relay (subscribers beyond the
    /// kernel's table, a `CHECKSUM_PARTIAL` datagram, the userspace data path): passed.
    MulticastToUserspace = 28,
}

/// What the program did with a packet of a given reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass = 0,
    Drop = 1,
    /// Rewritten and sent out of the other interface by the kernel.
    Redirect = 2,
}

impl ExitReason {
    /// Number of reasons; the size of the counter array.
    pub const COUNT: u32 = 29;

    /// Every reason, in numeric order.
    pub const ALL: [Self; Self::COUNT as usize] = [
        Self::NotUdpPassed,
        Self::NoBinding,
        Self::TruncatedHeader,
        Self::IpFragment,
        Self::Ipv4Options,
        Self::Ipv6ExtensionHeaders,
        Self::HostAllowListed,
        Self::BindingToUserspace,
        Self::MalformedIpHeader,
        Self::KernelRelayedInbound,
        Self::KernelRelayedOutbound,
        Self::DaemonGone,
        Self::InsideToExternalAddress,
        Self::TooBigForKernelRelay,
        Self::OutboundToUserspace,
        Self::InboundToStack,
        Self::KernelRelayFailed,
        Self::BindingToKernelRelay,
        Self::PartialChecksumToUserspace,
        Self::ControlPortFromOutside,
        Self::KernelRelayedRawInbound,
        Self::KernelRelayedRawOutbound,
        Self::RawToOtherDestination,
        Self::RawTooBigForExternalLink,
        Self::MulticastToFanOut,
        Self::MulticastSourceNotAllowed,
        Self::KernelRelayedMulticast,
        Self::KernelRelayedMulticastInside,
        Self::MulticastToUserspace,
    ];

    pub const fn verdict(self) -> Verdict {
        match self {
            Self::NotUdpPassed
            | Self::HostAllowListed
            | Self::BindingToUserspace
            | Self::TooBigForKernelRelay
            | Self::OutboundToUserspace
            | Self::InboundToStack
            | Self::BindingToKernelRelay
            | Self::PartialChecksumToUserspace
            | Self::MulticastToFanOut
            | Self::MulticastToUserspace => Verdict::Pass,
            Self::NoBinding
            | Self::TruncatedHeader
            | Self::IpFragment
            | Self::Ipv4Options
            | Self::Ipv6ExtensionHeaders
            | Self::MalformedIpHeader
            | Self::DaemonGone
            | Self::InsideToExternalAddress
            | Self::KernelRelayFailed
            | Self::ControlPortFromOutside
            | Self::RawToOtherDestination
            | Self::RawTooBigForExternalLink
            | Self::MulticastSourceNotAllowed => Verdict::Drop,
            Self::KernelRelayedInbound
            | Self::KernelRelayedOutbound
            | Self::KernelRelayedRawInbound
            | Self::KernelRelayedRawOutbound
            | Self::KernelRelayedMulticast
            | Self::KernelRelayedMulticastInside => Verdict::Redirect,
        }
    }

    /// Stable name for people and JSON.
    pub const fn name(self) -> &'static str {
        match self {
            Self::NotUdpPassed => "not_udp_passed",
            Self::NoBinding => "no_binding",
            Self::TruncatedHeader => "truncated_header",
            Self::IpFragment => "ip_fragment",
            Self::Ipv4Options => "ipv4_options",
            Self::Ipv6ExtensionHeaders => "ipv6_extension_headers",
            Self::HostAllowListed => "host_allow_listed",
            Self::BindingToUserspace => "binding_to_userspace",
            Self::MalformedIpHeader => "malformed_ip_header",
            Self::KernelRelayedInbound => "kernel_relayed_inbound",
            Self::KernelRelayedOutbound => "kernel_relayed_outbound",
            Self::DaemonGone => "daemon_gone",
            Self::InsideToExternalAddress => "inside_to_external_address",
            Self::TooBigForKernelRelay => "too_big_for_kernel_relay",
            Self::OutboundToUserspace => "outbound_to_userspace",
            Self::InboundToStack => "inbound_to_stack",
            Self::KernelRelayFailed => "kernel_relay_failed",
            Self::BindingToKernelRelay => "binding_to_kernel_relay",
            Self::PartialChecksumToUserspace => "partial_checksum_to_userspace",
            Self::ControlPortFromOutside => "control_port_from_outside",
            Self::KernelRelayedRawInbound => "kernel_relayed_raw_inbound",
            Self::KernelRelayedRawOutbound => "kernel_relayed_raw_outbound",
            Self::RawToOtherDestination => "raw_to_other_destination",
            Self::RawTooBigForExternalLink => "raw_too_big_for_external_link",
            Self::MulticastToFanOut => "multicast_to_fan_out",
            Self::MulticastSourceNotAllowed => "multicast_source_not_allowed",
            Self::KernelRelayedMulticast => "kernel_relayed_multicast",
            Self::KernelRelayedMulticastInside => "kernel_relayed_multicast_inside",
            Self::MulticastToUserspace => "multicast_to_userspace",
        }
    }

    pub const fn from_u32(value: u32) -> Option<Self> {
        if value < Self::COUNT {
            Some(Self::ALL[value as usize])
        } else {
            None
        }
    }
}

impl Verdict {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::Drop => "drop",
            Self::Redirect => "redirect",
        }
    }
}

// The list is dense: ALL[i] has value i.
const _: () = {
    let mut i = 0;
    while i < ExitReason::ALL.len() {
        assert!(ExitReason::ALL[i] as usize == i);
        i += 1;
    }
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_round_trip() {
        for (i, reason) in ExitReason::ALL.iter().enumerate() {
            assert_eq!(
                ExitReason::from_u32(u32::try_from(i).unwrap()),
                Some(*reason)
            );
            for other in &ExitReason::ALL[i + 1..] {
                assert_ne!(reason.name(), other.name());
            }
        }
        assert_eq!(ExitReason::from_u32(ExitReason::COUNT), None);
    }

    #[test]
    fn verdicts() {
        assert_eq!(ExitReason::NoBinding.verdict(), Verdict::Drop);
        assert_eq!(ExitReason::NotUdpPassed.verdict(), Verdict::Pass);
        assert_eq!(ExitReason::HostAllowListed.verdict(), Verdict::Pass);
    }
}
