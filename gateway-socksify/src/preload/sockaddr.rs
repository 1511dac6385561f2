//! C socket addresses to and from `std::net::SocketAddr`, and the socket's own type and family.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use libc::{
    AF_INET, AF_INET6, c_int, sockaddr, sockaddr_in, sockaddr_in6, sockaddr_storage, socklen_t,
};

#[expect(clippy::cast_possible_truncation, reason = "AF_INET is 2")]
const FAMILY_V4: libc::sa_family_t = AF_INET as libc::sa_family_t;
#[expect(clippy::cast_possible_truncation, reason = "AF_INET6 is 10")]
const FAMILY_V6: libc::sa_family_t = AF_INET6 as libc::sa_family_t;

/// The address at `addr` (`len` octets), if it is IPv4 or IPv6.
///
/// # Safety
/// `addr` is null or points to `len` readable octets.
pub unsafe fn read(addr: *const sockaddr, len: socklen_t) -> Option<SocketAddr> {
    if addr.is_null() || (len as usize) < size_of::<libc::sa_family_t>() {
        return None;
    }
    // SAFETY: at least the family field is readable (checked above).
    let family = c_int::from(unsafe { (*addr).sa_family });
    match family {
        AF_INET if len as usize >= size_of::<sockaddr_in>() => {
            // SAFETY: a sockaddr_in's worth of octets; read unaligned, as callers may pass any.
            let v4 = unsafe { addr.cast::<sockaddr_in>().read_unaligned() };
            let ip = Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(v4.sin_port),
            )))
        }
        AF_INET6 if len as usize >= size_of::<sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let v6 = unsafe { addr.cast::<sockaddr_in6>().read_unaligned() };
            let ip = Ipv6Addr::from(v6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(v6.sin6_port),
                v6.sin6_flowinfo,
                v6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// `addr` as a C address of `family` (IPv4 addresses IPv4-mapped for an IPv6 socket), and its
/// length.
pub fn encode(addr: SocketAddr, family: c_int) -> (sockaddr_storage, socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: sockaddr_storage = unsafe { std::mem::zeroed() };
    let as_v6 = family == AF_INET6;
    let len = match (addr, as_v6) {
        (SocketAddr::V4(v4), false) => {
            let out = sockaddr_in {
                sin_family: FAMILY_V4,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*v4.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
            unsafe { (&raw mut storage).cast::<sockaddr_in>().write(out) };
            size_of::<sockaddr_in>()
        }
        (addr, _) => {
            let (ip, flowinfo, scope) = match addr {
                SocketAddr::V6(v6) => (*v6.ip(), v6.flowinfo(), v6.scope_id()),
                SocketAddr::V4(v4) => (v4.ip().to_ipv6_mapped(), 0, 0),
            };
            let out = sockaddr_in6 {
                sin6_family: FAMILY_V6,
                sin6_port: addr.port().to_be(),
                sin6_flowinfo: flowinfo,
                sin6_addr: libc::in6_addr {
                    s6_addr: ip.octets(),
                },
                sin6_scope_id: scope,
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { (&raw mut storage).cast::<sockaddr_in6>().write(out) };
            size_of::<sockaddr_in6>()
        }
    };
    (storage, socklen_t::try_from(len).unwrap_or(0))
}

/// Writes `addr` where a `getsockname`-style call returns it: at most `*len` octets, `*len` set
/// to the full length.
///
/// # Safety
/// `out` points to `*len` writable octets and `len` is valid.
pub unsafe fn write(addr: SocketAddr, family: c_int, out: *mut sockaddr, len: *mut socklen_t) {
    if out.is_null() || len.is_null() {
        return;
    }
    let (storage, full) = encode(addr, family);
    // SAFETY: `len` is valid (checked above); `out` has `*len` writable octets.
    unsafe {
        let room = (*len).min(full) as usize;
        std::ptr::copy_nonoverlapping((&raw const storage).cast::<u8>(), out.cast::<u8>(), room);
        *len = full;
    }
}

/// A socket's `SO_TYPE` (`SOCK_STREAM`, `SOCK_DGRAM`, ...) and `SO_DOMAIN`, if it is a socket.
pub fn kind(fd: c_int) -> Option<(c_int, c_int)> {
    let get = |option| {
        let mut value: c_int = 0;
        let mut len = socklen_t::try_from(size_of::<c_int>()).unwrap_or(4);
        // SAFETY: a c_int out-parameter of the given size.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                option,
                (&raw mut value).cast(),
                &raw mut len,
            )
        };
        (rc == 0).then_some(value)
    };
    Some((get(libc::SO_TYPE)?, get(libc::SO_DOMAIN)?))
}

/// Whether the socket family is IP.
pub fn is_ip(family: c_int) -> bool {
    family == AF_INET || family == AF_INET6
}

/// The wildcard address of `family`, port 0.
pub fn wildcard(family: c_int) -> SocketAddr {
    if family == AF_INET6 {
        SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0)
    } else {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for (text, family) in [
            ("203.0.113.2:6000", AF_INET),
            ("[2001:db8::2]:6000", AF_INET6),
        ] {
            let addr: SocketAddr = text.parse().unwrap();
            let (storage, len) = encode(addr, family);
            // SAFETY: encode wrote `len` octets of a valid address.
            let back = unsafe { read((&raw const storage).cast(), len) };
            assert_eq!(back, Some(addr));
        }
        let (storage, len) = encode("203.0.113.2:6000".parse().unwrap(), AF_INET6);
        // SAFETY: as above.
        let mapped = unsafe { read((&raw const storage).cast(), len) }.unwrap();
        assert_eq!(
            mapped.ip().to_canonical(),
            "203.0.113.2".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn short_buffers_are_not_read() {
        let (storage, _) = encode("203.0.113.2:6000".parse().unwrap(), AF_INET);
        // SAFETY: reads at most 4 octets of the storage.
        assert_eq!(unsafe { read((&raw const storage).cast(), 4) }, None);
        // SAFETY: a null address is never read.
        assert_eq!(unsafe { read(std::ptr::null(), 16) }, None);
    }
}
