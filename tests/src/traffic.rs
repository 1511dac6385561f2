//! Small, bounded UDP traffic helpers for tests and the demo: sinks bound in one namespace and a
//! sender in another. Counts are exact; loops are bounded in count and time.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use nix::sys::socket::{setsockopt, sockopt::RcvBuf};

use crate::Netns;

/// Non-blocking UDP sockets bound in `ns` on `ip`, one per port, with large receive buffers.
pub fn bind_sinks(ns: &Netns, ip: IpAddr, ports: &[u16]) -> Result<Vec<UdpSocket>> {
    let ports = ports.to_vec();
    ns.run(move || -> Result<Vec<UdpSocket>> {
        ports
            .into_iter()
            .map(|port| {
                let socket = UdpSocket::bind(SocketAddr::new(ip, port))
                    .with_context(|| format!("bind UDP {ip}:{port}"))?;
                setsockopt(&socket, RcvBuf, &(4 << 20)).context("SO_RCVBUF")?;
                socket.set_nonblocking(true)?;
                Ok(socket)
            })
            .collect()
    })?
}

/// Sends `count` datagrams of `payload` from an ephemeral socket in `ns`, round-robin over
/// `ports` of `target`.
pub fn send_udp(
    ns: &Netns,
    target: IpAddr,
    ports: &[u16],
    count: usize,
    payload: &'static [u8],
) -> Result<()> {
    let ports = ports.to_vec();
    ns.run(move || -> Result<()> {
        let any: IpAddr = if target.is_ipv4() {
            Ipv4Addr::UNSPECIFIED.into()
        } else {
            Ipv6Addr::UNSPECIFIED.into()
        };
        let socket = UdpSocket::bind(SocketAddr::new(any, 0)).context("bind sender")?;
        for i in 0..count {
            let port = ports[i % ports.len()];
            socket
                .send_to(payload, SocketAddr::new(target, port))
                .with_context(|| format!("send to {target}:{port}"))?;
            // Paced like `send_paced`: a slow (emulated) receiver's backlog would otherwise
            // drop part of the burst before the gate could count it.
            if i % 20 == 19 {
                std::thread::sleep(Duration::from_millis(2) * crate::time_scale());
            }
        }
        Ok(())
    })?
}

/// Drains `sinks` until `expected` datagrams arrived (when `expected > 0`) or `wait` passed;
/// returns how many arrived.
pub fn drain(sinks: &[UdpSocket], expected: usize, wait: Duration) -> usize {
    let deadline = Instant::now() + wait * crate::time_scale();
    let mut received = 0;
    let mut buf = [0u8; 2048];
    loop {
        for sink in sinks {
            while sink.recv_from(&mut buf).is_ok() {
                received += 1;
            }
        }
        if (expected > 0 && received >= expected) || Instant::now() >= deadline {
            return received;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
