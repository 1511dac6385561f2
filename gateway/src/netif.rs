//! Addresses and networks of the gateway's interfaces (getifaddrs), read at start and on reload,
//! and tying a socket to its interface.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use nix::{ifaddrs::getifaddrs, sys::socket::SockaddrStorage};

/// One address of an interface with its network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InterfaceAddress {
    pub ip: IpAddr,
    pub network: IpNet,
}

fn ip_of(addr: &SockaddrStorage) -> Option<IpAddr> {
    addr.as_sockaddr_in()
        .map(|v4| IpAddr::V4(v4.ip()))
        .or_else(|| addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
}

fn prefix_len(mask: IpAddr) -> u8 {
    let ones = match mask {
        IpAddr::V4(v4) => u32::from(v4).count_ones(),
        IpAddr::V6(v6) => u128::from(v6).count_ones(),
    };
    u8::try_from(ones).unwrap_or(0)
}

/// Every IPv4 and IPv6 address of `interface`.
pub fn addresses(interface: &str) -> std::io::Result<Vec<InterfaceAddress>> {
    collect_addresses(Some(interface))
}

/// Every IPv4 and IPv6 address of every interface of the host (in this network namespace):
/// management and container interfaces, loopback, addresses added after start.
pub fn host_addresses() -> std::io::Result<Vec<InterfaceAddress>> {
    collect_addresses(None)
}

fn collect_addresses(only: Option<&str>) -> std::io::Result<Vec<InterfaceAddress>> {
    let mut found = Vec::new();
    for ifaddr in getifaddrs().map_err(std::io::Error::from)? {
        if only.is_some_and(|name| ifaddr.interface_name != name) {
            continue;
        }
        let Some(ip) = ifaddr.address.as_ref().and_then(ip_of) else {
            continue;
        };
        let prefix = ifaddr
            .netmask
            .as_ref()
            .and_then(ip_of)
            .map_or(if ip.is_ipv4() { 32 } else { 128 }, prefix_len);
        if let Ok(network) = IpNet::new(ip, prefix) {
            found.push(InterfaceAddress {
                ip,
                network: network.trunc(),
            });
        }
    }
    Ok(found)
}

/// The first usable (not link-local) IPv4 and IPv6 address.
pub fn primary(addresses: &[InterfaceAddress]) -> (Option<Ipv4Addr>, Option<Ipv6Addr>) {
    let v4 = addresses.iter().find_map(|a| match a.ip {
        IpAddr::V4(v4) if !v4.is_link_local() => Some(v4),
        _ => None,
    });
    let v6 = addresses.iter().find_map(|a| match a.ip {
        IpAddr::V6(v6) if !v6.is_unicast_link_local() => Some(v6),
        _ => None,
    });
    (v4, v6)
}

/// A netlink socket that becomes readable whenever an address is added to or removed from any
/// interface (`RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR`). The messages themselves need not be
/// parsed: each is a cue to read the addresses again.
pub fn address_changes() -> std::io::Result<std::os::fd::OwnedFd> {
    use nix::sys::socket::{
        AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, socket,
    };
    const RTMGRP_IPV4_IFADDR: u32 = 0x10;
    const RTMGRP_IPV6_IFADDR: u32 = 0x100;
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &NetlinkAddr::new(0, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR),
    )?;
    Ok(fd)
}

/// Ties a socket to `device` (`SO_BINDTODEVICE`) when one is given: it then receives only what
/// arrived on that interface and sends only through it, whatever the weak-host model would do.
pub fn tie_to_device(socket: &impl std::os::fd::AsFd, device: Option<&str>) -> std::io::Result<()> {
    let Some(device) = device else {
        return Ok(());
    };
    nix::sys::socket::setsockopt(
        socket,
        nix::sys::socket::sockopt::BindToDevice,
        &std::ffi::OsString::from(device),
    )
    .map_err(|errno| {
        std::io::Error::new(
            std::io::Error::from(errno).kind(),
            format!("tie a socket to {device} (SO_BINDTODEVICE): {errno}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_has_its_addresses() {
        let found = addresses("lo").unwrap();
        assert!(
            found
                .iter()
                .any(|a| a.ip == IpAddr::V4(Ipv4Addr::LOCALHOST))
        );
        let lo = found.iter().find(|a| a.ip.is_ipv4()).unwrap();
        assert_eq!(lo.network, "127.0.0.0/8".parse::<IpNet>().unwrap());
        assert!(addresses("no-such-if0").unwrap().is_empty());
    }

    #[test]
    fn primary_skips_link_local() {
        let list = [
            InterfaceAddress {
                ip: "fe80::1".parse().unwrap(),
                network: "fe80::/64".parse().unwrap(),
            },
            InterfaceAddress {
                ip: "2001:db8:2::1".parse().unwrap(),
                network: "2001:db8:2::/64".parse().unwrap(),
            },
            InterfaceAddress {
                ip: "203.0.113.1".parse().unwrap(),
                network: "203.0.113.0/24".parse().unwrap(),
            },
        ];
        assert_eq!(
            primary(&list),
            (
                Some(Ipv4Addr::new(203, 0, 113, 1)),
                Some("2001:db8:2::1".parse().unwrap())
            )
        );
    }
}
