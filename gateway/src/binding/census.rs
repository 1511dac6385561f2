//! What the live bindings are, counted: by state and kind, and the free relay ports of every
//! relay address. Read-only views of [`Bindings`] for `--metrics`; no I/O.

use std::net::IpAddr;

use super::{Bindings, flags, record::State};

/// A binding's state, as metrics label it.
pub const STATES: [&str; 2] = ["half_bound", "confirmed"];
/// A binding's kind, as metrics label it.
pub const KINDS: [&str; 4] = ["unicast", "rtp_pair", "raw", "multicast"];

/// Live bindings by state (index into [`STATES`]) and kind (index into [`KINDS`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Census {
    pub counts: [[usize; KINDS.len()]; STATES.len()],
}

impl Census {
    /// Every (state, kind, count), zeros included, so a series never disappears.
    pub fn labelled(&self) -> impl Iterator<Item = (&'static str, &'static str, usize)> + '_ {
        STATES.iter().enumerate().flat_map(move |(s, state)| {
            KINDS
                .iter()
                .enumerate()
                .map(move |(k, kind)| (*state, *kind, self.counts[s][k]))
        })
    }
}

/// The kind of a binding with `flags`: multicast wins over the rest, then an RTP pair, then
/// header-less delivery.
fn kind_of(binding_flags: u16) -> usize {
    if binding_flags & flags::MULTICAST_ANY != 0 {
        3
    } else if binding_flags & flags::RTP_PAIR != 0 {
        1
    } else if binding_flags & flags::RAW != 0 {
        2
    } else {
        0
    }
}

/// The free ports of one relay address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreePorts {
    /// `internal` (client side) or `external` (remote side).
    pub side: &'static str,
    pub address: IpAddr,
    pub free: usize,
}

impl Bindings {
    /// Live bindings by state and kind.
    pub fn census(&self) -> Census {
        let mut census = Census::default();
        for binding in self.live.values() {
            let state = match binding.state {
                State::HalfBound { .. } => 0,
                State::Confirmed { .. } => 1,
            };
            census.counts[state][kind_of(binding.flags)] += 1;
        }
        census
    }

    /// Free relay ports of every relay address.
    pub fn free_ports(&self) -> Vec<FreePorts> {
        self.ports.free_per_address()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_labels() {
        assert_eq!(KINDS[kind_of(flags::RECEIVE | flags::SEND)], "unicast");
        assert_eq!(KINDS[kind_of(flags::RECEIVE | flags::RTP_PAIR)], "rtp_pair");
        assert_eq!(KINDS[kind_of(flags::SEND | flags::RAW)], "raw");
        assert_eq!(
            KINDS[kind_of(flags::RECEIVE | flags::MULTICAST | flags::MULTICAST_TO_UNICAST)],
            "multicast"
        );
        let mut census = Census::default();
        census.counts[1][1] = 3;
        let all: Vec<_> = census.labelled().collect();
        assert_eq!(all.len(), STATES.len() * KINDS.len());
        assert!(all.contains(&("confirmed", "rtp_pair", 3)));
        assert!(all.contains(&("half_bound", "unicast", 0)));
    }
}
