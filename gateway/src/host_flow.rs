//! Exact host UDP flows for the allow-list, and the 16-octet address form the maps use.

use std::net::{IpAddr, SocketAddr};

use gateway_common::{Addr16, HostAllowKey, ipv4_mapped};

/// One exact UDP flow for the host allow-list: datagrams from `remote` to `local`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HostFlow {
    pub remote: SocketAddr,
    pub local: SocketAddr,
}

impl HostFlow {
    /// Parses `REMOTE_IP:PORT,LOCAL_IP:PORT` (IPv6 in brackets).
    pub fn parse(text: &str) -> Result<Self, String> {
        let (remote, local) = text
            .split_once(',')
            .ok_or_else(|| format!("{text:?}: expected REMOTE_IP:PORT,LOCAL_IP:PORT"))?;
        let parse = |what: &str, value: &str| -> Result<SocketAddr, String> {
            value
                .trim()
                .parse()
                .map_err(|_| format!("{text:?}: {what} {value:?} is not an IP:PORT"))
        };
        let flow = Self {
            remote: parse("remote", remote)?,
            local: parse("local", local)?,
        };
        if flow.remote.port() == 0 || flow.local.port() == 0 {
            return Err(format!("{text:?}: ports must be exact (not 0)"));
        }
        Ok(flow)
    }

    pub fn key(&self) -> HostAllowKey {
        HostAllowKey {
            remote_addr: addr16(self.remote.ip()),
            local_addr: addr16(self.local.ip()),
            remote_port_be: self.remote.port().to_be(),
            local_port_be: self.local.port().to_be(),
        }
    }
}

impl std::str::FromStr for HostFlow {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        Self::parse(text)
    }
}

impl std::fmt::Display for HostFlow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{},{}", self.remote, self.local)
    }
}

/// An address as the kernel maps store it: 16 octets, IPv4 mapped.
pub fn addr16(ip: IpAddr) -> Addr16 {
    match ip {
        IpAddr::V4(v4) => ipv4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(v6.octets(), |v4| ipv4_mapped(v4.octets())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_flows_parse_exactly() {
        let flow = HostFlow::parse("192.0.2.123:123,203.0.113.1:123").unwrap();
        assert_eq!(flow.remote, "192.0.2.123:123".parse().unwrap());
        let key = flow.key();
        assert_eq!(key.remote_addr, ipv4_mapped([192, 0, 2, 123]));
        assert_eq!(key.local_port_be.to_ne_bytes(), [0, 123]);
        let v6 = HostFlow::parse("[2001:db8::53]:53, [2001:db8:2::1]:4053").unwrap();
        assert_eq!(v6.local.port(), 4053);
        for bad in [
            "",
            "192.0.2.1:53",
            "192.0.2.1:0,203.0.113.1:5",
            "x,y",
            "192.0.2.1,203.0.113.1",
        ] {
            assert!(HostFlow::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mapped_addresses() {
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(addr16(mapped), addr16("192.0.2.1".parse().unwrap()));
        assert_eq!(addr16("2001:db8::1".parse().unwrap())[0], 0x20);
    }
}
