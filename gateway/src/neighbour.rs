//! PLACEHOLDER replaced by the kernel branch's neighbour module.
use std::{io, net::IpAddr};
pub fn neighbour_mac(_ifindex: u32, _ip: IpAddr) -> io::Result<Option<[u8; 6]>> {
    Ok(None)
}
pub fn mac_of_interface(_name: &str) -> io::Result<[u8; 6]> {
    Err(io::Error::other("placeholder"))
}
