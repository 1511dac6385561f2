//! Which destinations a client may reach through the gateway (CONNECT targets, UDP remotes,
//! BIND peers). By default: not the gateway's own addresses, not loopback, unspecified,
//! multicast, broadcast or link-local, and not the configured internal networks.

use std::net::IpAddr;

use ipnet::IpNet;

#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// The gateway's own addresses (external and internal).
    pub own_addresses: Vec<IpAddr>,
    /// Networks clients may not reach (the internal networks, operator additions).
    pub deny: Vec<IpNet>,
    /// Tests only: admit loopback destinations.
    pub allow_loopback: bool,
}

impl Policy {
    /// Whether a client may send to or connect to `ip`.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        let special = match ip {
            IpAddr::V4(v4) => {
                (v4.is_loopback() && !self.allow_loopback)
                    || v4.is_unspecified()
                    || v4.is_multicast()
                    || v4.is_broadcast()
                    || v4.is_link_local()
            }
            IpAddr::V6(v6) => {
                (v6.is_loopback() && !self.allow_loopback)
                    || v6.is_unspecified()
                    || v6.is_multicast()
                    || v6.is_unicast_link_local()
            }
        };
        !special
            && !self
                .own_addresses
                .iter()
                .any(|own| (*own).to_canonical() == ip)
            && !self.deny.iter().any(|net| net.contains(&ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_blocks_special_and_own_addresses() {
        let policy = Policy {
            own_addresses: vec![
                "203.0.113.1".parse().unwrap(),
                "198.51.100.1".parse().unwrap(),
            ],
            deny: vec!["198.51.100.0/24".parse().unwrap()],
            allow_loopback: false,
        };
        for blocked in [
            "127.0.0.1",
            "::1",
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "ff02::1",
            "255.255.255.255",
            "169.254.1.1",
            "fe80::1",
            "203.0.113.1",
            "::ffff:203.0.113.1",
            "198.51.100.7",
        ] {
            assert!(!policy.allows(blocked.parse().unwrap()), "{blocked}");
        }
        for allowed in [
            "203.0.113.2",
            "2001:db8:2::2",
            "::ffff:203.0.113.2",
            "192.0.2.1",
        ] {
            assert!(policy.allows(allowed.parse().unwrap()), "{allowed}");
        }
    }

    #[test]
    fn allow_loopback_admits_only_loopback() {
        let policy = Policy {
            own_addresses: vec![],
            deny: vec!["127.0.0.2/32".parse().unwrap()],
            allow_loopback: true,
        };
        for allowed in ["127.0.0.1", "::1", "::ffff:127.0.0.1", "192.0.2.1"] {
            assert!(policy.allows(allowed.parse().unwrap()), "{allowed}");
        }
        // Only loopback is affected: everything else special stays refused, and deny still applies.
        for blocked in [
            "127.0.0.2",
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "255.255.255.255",
            "169.254.1.1",
            "fe80::1",
        ] {
            assert!(!policy.allows(blocked.parse().unwrap()), "{blocked}");
        }
        let default = Policy::default();
        assert!(!default.allow_loopback);
        assert!(!default.allows("127.0.0.1".parse().unwrap()));
    }
}
