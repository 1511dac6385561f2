//! MAC addresses the kernel fan-out writes into the frames it sends inside: an interface's own
//! (`/sys/class/net/NAME/address`) and a neighbour's, from the kernel's neighbour table (an
//! rtnetlink `RTM_GETNEIGH` dump). It only reads; it never asks the kernel to resolve (no
//! solicitation): an unknown neighbour is `None`, and the caller leaves that subscriber to the
//! userspace relay, whose socket makes the kernel resolve it.
//!
//! ```text
//! nlmsghdr  len(4) type(2) flags(2) seq(4) pid(4)
//! ndmsg     family(1) pad(3) ifindex(4) state(2) flags(1) type(1)
//! rtattr    len(2) type(2) data, each padded to 4 octets (NDA_DST 1, NDA_LLADDR 2)
//! ```

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
};

use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, recv, send, socket,
};

const NLMSG_HDRLEN: usize = 16;
const NDMSG_LEN: usize = 12;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWNEIGH: u16 = 28;
const RTM_GETNEIGH: u16 = 30;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Neighbour states whose link-layer address is usable (`NUD_VALID` without `NUD_FAILED` and
/// `NUD_INCOMPLETE`): REACHABLE, STALE, DELAY, PROBE, NOARP, PERMANENT.
const NUD_USABLE: u16 = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80;

/// The MAC address of interface `name` in this network namespace (`SIOCGIFHWADDR`: sysfs would
/// show the namespace it was mounted in, which `nsenter --net` does not change).
pub fn mac_of_interface(name: &str) -> io::Result<[u8; 6]> {
    let socket =
        std::net::UdpSocket::bind("0.0.0.0:0").or_else(|_| std::net::UdpSocket::bind("[::]:0"))?;
    // SAFETY: ifreq is plain data; zeroes are valid.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= request.ifr_name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not an interface name: {name:?}"),
        ));
    }
    for (slot, byte) in request.ifr_name.iter_mut().zip(bytes) {
        *slot = libc::c_char::from_ne_bytes([*byte]);
    }
    // SAFETY: a valid socket and a valid ifreq that outlives the call.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SIOCGIFHWADDR,
            &raw mut request,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFHWADDR filled the hardware-address member of the union.
    let address = unsafe { request.ifr_ifru.ifru_hwaddr };
    if address.sa_family != libc::ARPHRD_ETHER {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{name} is not an Ethernet interface"),
        ));
    }
    let mut mac = [0u8; 6];
    for (octet, byte) in mac.iter_mut().zip(address.sa_data) {
        *octet = byte.to_ne_bytes()[0];
    }
    Ok(mac)
}

/// The MAC address the kernel's neighbour table holds for `ip` on interface `ifindex`, if it is
/// in a usable state.
pub fn neighbour_mac(ifindex: u32, ip: IpAddr) -> io::Result<Option<[u8; 6]>> {
    let family = match ip {
        IpAddr::V4(_) => AF_INET,
        IpAddr::V6(_) => AF_INET6,
    };
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )?;
    send(
        fd.as_raw_fd(),
        &dump_request(family, ifindex, 1),
        MsgFlags::empty(),
    )?;
    let mut buf = vec![0u8; 32 * 1024];
    let mut found = None;
    loop {
        let len = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        let batch = parse_batch(buf.get(..len).unwrap_or_default())?;
        if found.is_none() {
            found = batch
                .neighbours
                .iter()
                .find(|n| n.ifindex == ifindex && n.ip == ip)
                .and_then(Neighbour::usable_mac);
        }
        if batch.done {
            return Ok(found);
        }
    }
}

/// An `RTM_GETNEIGH` dump request for one family (the kernel may or may not filter by
/// `ifindex`; the reader filters anyway).
fn dump_request(family: u8, ifindex: u32, seq: u32) -> Vec<u8> {
    let len = u32::try_from(NLMSG_HDRLEN + NDMSG_LEN).unwrap_or(u32::MAX);
    let mut msg = Vec::with_capacity(NLMSG_HDRLEN + NDMSG_LEN);
    msg.extend_from_slice(&len.to_ne_bytes());
    msg.extend_from_slice(&RTM_GETNEIGH.to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&[family, 0, 0, 0]);
    msg.extend_from_slice(&ifindex.to_ne_bytes());
    msg.extend_from_slice(&[0; 4]);
    msg
}

/// One neighbour table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Neighbour {
    ifindex: u32,
    ip: IpAddr,
    state: u16,
    lladdr: Option<Vec<u8>>,
}

impl Neighbour {
    fn usable_mac(&self) -> Option<[u8; 6]> {
        if self.state & NUD_USABLE == 0 {
            return None;
        }
        self.lladdr.as_deref()?.try_into().ok()
    }
}

/// What one read of the dump held.
#[derive(Debug, Default)]
struct Batch {
    neighbours: Vec<Neighbour>,
    /// `NLMSG_DONE` was among them.
    done: bool,
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("rtnetlink: {what}"))
}

fn u16_at(buf: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(buf.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}

/// Parses the netlink messages of one read.
fn parse_batch(buf: &[u8]) -> io::Result<Batch> {
    let mut batch = Batch::default();
    let mut offset = 0;
    while offset + NLMSG_HDRLEN <= buf.len() {
        let len = u32_at(buf, offset).ok_or_else(|| invalid("cut message"))? as usize;
        let kind = u16_at(buf, offset + 4).ok_or_else(|| invalid("cut message"))?;
        if len < NLMSG_HDRLEN || offset + len > buf.len() {
            return Err(invalid("message length"));
        }
        let body = &buf[offset + NLMSG_HDRLEN..offset + len];
        match kind {
            NLMSG_DONE => batch.done = true,
            NLMSG_ERROR => {
                let errno = u32_at(body, 0).ok_or_else(|| invalid("cut error"))?;
                #[expect(
                    clippy::cast_possible_wrap,
                    reason = "the kernel's error is a negative errno in an i32"
                )]
                let errno = errno as i32;
                if errno != 0 {
                    return Err(io::Error::from_raw_os_error(-errno));
                }
            }
            RTM_NEWNEIGH => {
                if let Some(neighbour) = parse_neighbour(body)? {
                    batch.neighbours.push(neighbour);
                }
            }
            _ => {}
        }
        offset += (len + 3) & !3;
    }
    Ok(batch)
}

/// One `RTM_NEWNEIGH` body; `None` for families other than IPv4 and IPv6 (bridge entries).
fn parse_neighbour(body: &[u8]) -> io::Result<Option<Neighbour>> {
    if body.len() < NDMSG_LEN {
        return Err(invalid("cut ndmsg"));
    }
    let family = body[0];
    let ifindex = u32_at(body, 4).ok_or_else(|| invalid("cut ndmsg"))?;
    let state = u16_at(body, 8).ok_or_else(|| invalid("cut ndmsg"))?;
    let mut dst = None;
    let mut lladdr = None;
    let mut offset = NDMSG_LEN;
    while offset + 4 <= body.len() {
        let len = usize::from(u16_at(body, offset).ok_or_else(|| invalid("cut rtattr"))?);
        let kind = u16_at(body, offset + 2).ok_or_else(|| invalid("cut rtattr"))?;
        if len < 4 || offset + len > body.len() {
            return Err(invalid("rtattr length"));
        }
        let data = &body[offset + 4..offset + len];
        match kind {
            NDA_DST => dst = Some(data),
            NDA_LLADDR => lladdr = Some(data.to_vec()),
            _ => {}
        }
        offset += (len + 3) & !3;
    }
    let ip = match (family, dst) {
        (AF_INET, Some(dst)) => {
            let octets: [u8; 4] = dst.try_into().map_err(|_| invalid("NDA_DST length"))?;
            IpAddr::V4(Ipv4Addr::from(octets))
        }
        (AF_INET6, Some(dst)) => {
            let octets: [u8; 16] = dst.try_into().map_err(|_| invalid("NDA_DST length"))?;
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        (AF_INET | AF_INET6, None) => return Err(invalid("neighbour without NDA_DST")),
        _ => return Ok(None),
    };
    Ok(Some(Neighbour {
        ifindex,
        ip,
        state,
        lladdr,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, data: &[u8]) -> Vec<u8> {
        let len = u16::try_from(4 + data.len()).unwrap();
        let mut out = len.to_ne_bytes().to_vec();
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(data);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out
    }

    fn message(kind: u16, body: &[u8]) -> Vec<u8> {
        let len = u32::try_from(NLMSG_HDRLEN + body.len()).unwrap();
        let mut out = len.to_ne_bytes().to_vec();
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&2u16.to_ne_bytes()); // NLM_F_MULTI
        out.extend_from_slice(&1u32.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out.extend_from_slice(body);
        out
    }

    fn neighbour(family: u8, ifindex: u32, state: u16, attrs: &[Vec<u8>]) -> Vec<u8> {
        let mut body = vec![family, 0, 0, 0];
        body.extend_from_slice(&ifindex.to_ne_bytes());
        body.extend_from_slice(&state.to_ne_bytes());
        body.extend_from_slice(&[0, 1]);
        for attr in attrs {
            body.extend_from_slice(attr);
        }
        message(RTM_NEWNEIGH, &body)
    }

    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x2a];

    #[test]
    fn a_dump_is_parsed_into_usable_entries() {
        let mut buf = neighbour(
            AF_INET,
            3,
            0x02,
            &[attr(NDA_DST, &[198, 51, 100, 2]), attr(NDA_LLADDR, &MAC)],
        );
        // An IPv6 neighbour, STALE, with a cache-info attribute between.
        let v6: Ipv6Addr = "2001:db8:1::2".parse().unwrap();
        buf.extend(neighbour(
            AF_INET6,
            3,
            0x04,
            &[
                attr(NDA_DST, &v6.octets()),
                attr(3, &[0; 16]),
                attr(NDA_LLADDR, &MAC),
            ],
        ));
        // INCOMPLETE: no usable address. FAILED with a stale address: not usable either.
        buf.extend(neighbour(
            AF_INET,
            3,
            0x01,
            &[attr(NDA_DST, &[198, 51, 100, 3])],
        ));
        buf.extend(neighbour(
            AF_INET,
            3,
            0x20,
            &[attr(NDA_DST, &[198, 51, 100, 4]), attr(NDA_LLADDR, &MAC)],
        ));
        // A bridge FDB entry (AF_BRIDGE 7) is skipped.
        buf.extend(neighbour(7, 3, 0x80, &[attr(NDA_LLADDR, &MAC)]));
        buf.extend(message(NLMSG_DONE, &0u32.to_ne_bytes()));

        let batch = parse_batch(&buf).unwrap();
        assert!(batch.done);
        let usable: Vec<(IpAddr, Option<[u8; 6]>)> = batch
            .neighbours
            .iter()
            .map(|n| (n.ip, n.usable_mac()))
            .collect();
        assert_eq!(
            usable,
            [
                ("198.51.100.2".parse().unwrap(), Some(MAC)),
                (IpAddr::V6(v6), Some(MAC)),
                ("198.51.100.3".parse().unwrap(), None),
                ("198.51.100.4".parse().unwrap(), None),
            ]
        );
        assert!(batch.neighbours.iter().all(|n| n.ifindex == 3));
    }

    #[test]
    fn errors_and_malformed_messages_are_reported() {
        let error = message(NLMSG_ERROR, &(-libc::EPERM).to_ne_bytes());
        let err = parse_batch(&error).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
        // An acknowledgement (error 0) is no error.
        assert!(
            !parse_batch(&message(NLMSG_ERROR, &0i32.to_ne_bytes()))
                .unwrap()
                .done
        );

        let mut cut = neighbour(AF_INET, 3, 0x02, &[attr(NDA_DST, &[198, 51, 100, 2])]);
        cut.truncate(cut.len() - 2);
        assert!(parse_batch(&cut).is_err());
        // An attribute claiming more than the message holds.
        let mut long = neighbour(AF_INET, 3, 0x02, &[attr(NDA_DST, &[198, 51, 100, 2])]);
        let at = NLMSG_HDRLEN + NDMSG_LEN;
        long[at..at + 2].copy_from_slice(&64u16.to_ne_bytes());
        assert!(parse_batch(&long).is_err());
        // A wrong address length.
        let short = neighbour(AF_INET, 3, 0x02, &[attr(NDA_DST, &[198, 51, 100])]);
        assert!(parse_batch(&short).is_err());
    }

    #[test]
    fn the_request_is_a_dump_of_one_family() {
        let request = dump_request(AF_INET6, 7, 9);
        assert_eq!(request.len(), 28);
        assert_eq!(u32_at(&request, 0), Some(28));
        assert_eq!(u16_at(&request, 4), Some(RTM_GETNEIGH));
        assert_eq!(u16_at(&request, 6), Some(NLM_F_REQUEST | NLM_F_DUMP));
        assert_eq!(request[16], AF_INET6);
        assert_eq!(u32_at(&request, 20), Some(7));
    }

    #[test]
    fn only_ethernet_interfaces_that_exist_have_a_mac() {
        assert!(mac_of_interface("").is_err());
        assert!(mac_of_interface("no-such-if0").is_err());
        assert!(mac_of_interface("an-interface-name-too-long").is_err());
    }

    #[test]
    fn loopback_has_a_mac_and_the_table_can_be_read() {
        // Loopback is not Ethernet: no MAC to send frames from.
        assert!(mac_of_interface("lo").is_err());
        // A dump succeeds (unprivileged too); nothing is a neighbour of 192.0.2.1 on lo.
        assert_eq!(
            neighbour_mac(1, "192.0.2.1".parse().unwrap()).unwrap(),
            None
        );
        assert_eq!(
            neighbour_mac(1, "2001:db8::1".parse().unwrap()).unwrap(),
            None
        );
    }
}
