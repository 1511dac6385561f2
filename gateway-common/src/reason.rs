//! The one list of exit reasons of the datapath. Every packet the programs see leaves through
//! exactly one reason, counted per CPU in `{packets, bytes}`. Values are an ABI shared with pinned
//! maps of running gateways: append only, never renumber.

/// Why a packet left the program the way it did. Despite the name (kept for Cilium familiarity)
/// it covers passes too, so every exit is counted.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
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
}

/// What the program did with a packet of a given reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass = 0,
    Drop = 1,
}

impl DropReason {
    /// Number of reasons; the size of the counter array.
    pub const COUNT: u32 = 9;

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
    ];

    pub const fn verdict(self) -> Verdict {
        match self {
            Self::NotUdpPassed | Self::HostAllowListed | Self::BindingToUserspace => Verdict::Pass,
            Self::NoBinding
            | Self::TruncatedHeader
            | Self::IpFragment
            | Self::Ipv4Options
            | Self::Ipv6ExtensionHeaders
            | Self::MalformedIpHeader => Verdict::Drop,
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
        }
    }
}

// The list is dense: ALL[i] has value i.
const _: () = {
    let mut i = 0;
    while i < DropReason::ALL.len() {
        assert!(DropReason::ALL[i] as u32 == i as u32);
        i += 1;
    }
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_round_trip() {
        for (i, reason) in DropReason::ALL.iter().enumerate() {
            assert_eq!(
                DropReason::from_u32(u32::try_from(i).unwrap()),
                Some(*reason)
            );
            for other in &DropReason::ALL[i + 1..] {
                assert_ne!(reason.name(), other.name());
            }
        }
        assert_eq!(DropReason::from_u32(DropReason::COUNT), None);
    }

    #[test]
    fn verdicts() {
        assert_eq!(DropReason::NoBinding.verdict(), Verdict::Drop);
        assert_eq!(DropReason::NotUdpPassed.verdict(), Verdict::Pass);
        assert_eq!(DropReason::HostAllowListed.verdict(), Verdict::Pass);
    }
}
