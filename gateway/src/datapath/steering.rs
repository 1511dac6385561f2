//! Relay steering: the `sk_lookup` program that hands every UDP datagram for a relay port to the
//! daemon's shared relay socket of its family and side, so no binding needs a socket of its own.
//!
//! Loaded on its own (not with the gate's links), attached to the calling thread's network
//! namespace by an fd-based link: it lives exactly as long as the [`Steering`] value, so a dead
//! daemon leaves nothing behind (and the gate, pinned separately, stays closed). Several daemons
//! (or in-process test gateways) in one namespace each steer only their own addresses and ports.

use std::{collections::HashMap, fs::File, net::IpAddr, os::fd::AsRawFd};

use aya::{
    EbpfLoader,
    maps::{HashMap as BpfHashMap, SockMap},
    programs::{SkLookup, sk_lookup::SkLookupLink},
};
use gateway_common::{
    Addr16, MAX_RELAY_ADDRS, RelaySide, RelaySpan, SK_LOOKUP_PROGRAM, map_names, relay_socket_index,
};

use super::{DatapathError, EBPF_OBJECT};
use crate::host_flow::addr16;

/// Which ports of an address the relay owns on one side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayPortRange {
    pub ip: IpAddr,
    pub side: RelaySide,
    pub first: u16,
    pub last: u16,
}

/// The attached steering program; detached when dropped. Only its link is kept (one
/// descriptor): the link holds the program, and the program its two maps, which nothing writes
/// after start.
pub struct Steering {
    _link: SkLookupLink,
}

impl std::fmt::Debug for Steering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Steering").finish_non_exhaustive()
    }
}

/// The per-address spans for `ranges`: one entry per address, both sides merged.
pub fn spans(ranges: &[RelayPortRange]) -> HashMap<IpAddr, RelaySpan> {
    let mut spans: HashMap<IpAddr, RelaySpan> = HashMap::new();
    for range in ranges {
        let span = spans
            .entry(range.ip.to_canonical())
            .or_insert(RelaySpan::NONE);
        match range.side {
            RelaySide::Inside => {
                span.internal_first = range.first;
                span.internal_last = range.last;
            }
            RelaySide::Outside => {
                span.external_first = range.first;
                span.external_last = range.last;
            }
        }
    }
    spans
}

impl Steering {
    /// Loads the program, fills its address map from `ranges`, puts each shared socket in its
    /// slot (`ipv6`, side) and attaches to this thread's network namespace.
    pub fn attach(
        ranges: &[RelayPortRange],
        sockets: &[(bool, RelaySide, &dyn AsRawFd)],
    ) -> Result<Self, DatapathError> {
        if EBPF_OBJECT.is_empty() {
            return Err(DatapathError::EmptyObject);
        }
        let spans = spans(ranges);
        if spans.len() > MAX_RELAY_ADDRS as usize {
            return Err(DatapathError::Pin(format!(
                "{} relay addresses; at most {MAX_RELAY_ADDRS} are supported",
                spans.len()
            )));
        }
        let mut ebpf = EbpfLoader::new().load(EBPF_OBJECT)?;
        {
            let map = ebpf.map_mut(map_names::RELAY_ADDRS).ok_or_else(|| {
                DatapathError::Pin(format!("map {} missing", map_names::RELAY_ADDRS))
            })?;
            let mut addrs: BpfHashMap<_, Addr16, RelaySpan> =
                BpfHashMap::try_from(map).map_err(|source| DatapathError::Map {
                    what: format!("open map {}", map_names::RELAY_ADDRS),
                    source,
                })?;
            for (ip, span) in &spans {
                addrs
                    .insert(addr16(*ip), *span, 0)
                    .map_err(|source| DatapathError::Map {
                        what: format!("add relay address {ip}"),
                        source,
                    })?;
            }
        }
        {
            let map = ebpf.map_mut(map_names::RELAY_SOCKETS).ok_or_else(|| {
                DatapathError::Pin(format!("map {} missing", map_names::RELAY_SOCKETS))
            })?;
            let mut slots = SockMap::try_from(map).map_err(|source| DatapathError::Map {
                what: format!("open map {}", map_names::RELAY_SOCKETS),
                source,
            })?;
            for (ipv6, side, socket) in sockets {
                let slot = relay_socket_index(*ipv6, *side);
                slots
                    .set(slot, &socket.as_raw_fd(), 0)
                    .map_err(|source| DatapathError::Map {
                        what: format!("put the shared relay socket in slot {slot}"),
                        source,
                    })?;
            }
        }
        let program: &mut SkLookup = super::typed_program(&mut ebpf, SK_LOOKUP_PROGRAM)?;
        program.load().map_err(|source| DatapathError::Program {
            what: format!("load {SK_LOOKUP_PROGRAM} into the kernel (verifier)"),
            source,
        })?;
        let netns_path = "/proc/thread-self/ns/net";
        let netns = File::open(netns_path).map_err(|source| DatapathError::Io {
            what: "open",
            path: netns_path.into(),
            source,
        })?;
        let attached = program
            .attach(&netns)
            .map_err(|source| DatapathError::Program {
                what: format!("attach {SK_LOOKUP_PROGRAM} to this network namespace"),
                source,
            })?;
        let link = program
            .take_link(attached)
            .map_err(|source| DatapathError::Program {
                what: format!("keep the link of {SK_LOOKUP_PROGRAM}"),
                source,
            })?;
        // The object's other maps and programs go now; the link keeps what steering needs.
        drop(ebpf);
        Ok(Self { _link: link })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_on_both_sides_gets_one_span_with_both_ranges() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let other: IpAddr = "192.0.2.1".parse().unwrap();
        let spans = spans(&[
            RelayPortRange {
                ip,
                side: RelaySide::Inside,
                first: 100,
                last: 149,
            },
            RelayPortRange {
                ip,
                side: RelaySide::Outside,
                first: 150,
                last: 199,
            },
            RelayPortRange {
                ip: other,
                side: RelaySide::Outside,
                first: 16_384,
                last: 24_575,
            },
        ]);
        assert_eq!(spans.len(), 2);
        assert_eq!(spans[&ip].side_of(120), Some(RelaySide::Inside));
        assert_eq!(spans[&ip].side_of(150), Some(RelaySide::Outside));
        assert_eq!(spans[&other].side_of(120), None);
        assert_eq!(spans[&other].side_of(16_384), Some(RelaySide::Outside));
    }
}
