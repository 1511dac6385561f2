//! Which driver runs an interface (`ETHTOOL_GDRVINFO`), in the daemon's network namespace (sysfs
//! would show the namespace /sys was mounted in).

use std::os::fd::AsRawFd as _;

const ETHTOOL_GDRVINFO: u32 = 0x0000_0003;

/// `struct ethtool_drvinfo` of `<linux/ethtool.h>`.
#[repr(C)]
struct DriverInfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

/// The driver's name (`veth`, `virtio_net`, `ixgbe`, ...), or `None` where the interface does
/// not answer the ethtool call.
pub fn driver_name(interface: &str) -> Option<String> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0")
        .or_else(|_| std::net::UdpSocket::bind("[::]:0"))
        .ok()?;
    // SAFETY: plain data; zeroes are valid.
    let mut info: DriverInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    // SAFETY: plain data; zeroes are valid.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = interface.as_bytes();
    if name.len() >= request.ifr_name.len() {
        return None;
    }
    for (slot, byte) in request.ifr_name.iter_mut().zip(name) {
        *slot = byte.cast_signed();
    }
    request.ifr_ifru.ifru_data = (&raw mut info).cast();
    // SAFETY: the request names an interface and points at a DriverInfo that outlives the call.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCETHTOOL, &raw mut request) };
    if rc != 0 {
        return None;
    }
    let end = info.driver.iter().position(|&b| b == 0).unwrap_or(32);
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_and_too_long_interface_names_have_no_driver() {
        assert_eq!(driver_name("no-such-if0"), None);
        assert_eq!(driver_name("a-name-longer-than-ifnamsiz"), None);
    }
}
