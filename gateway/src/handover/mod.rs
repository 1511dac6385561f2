//! Upgrades that drop no stream: the old daemon hands its listening sockets, its live control
//! connections and its state to a new daemon over a Unix socket pair, and exits only once the
//! new one has taken everything over. The kernel's maps and the pinned gate stay in place the
//! whole time.
//!
//! The protocol (old daemon O, new daemon N, started by O with one end of the pair):
//! 1. N attaches to the pinned gate without clearing it, then waits for O's `Offer` (the state
//!    format O writes). N answers `Accept`, or `Refuse` when it cannot read that format; O then
//!    keeps serving as if nothing happened.
//! 2. O quiesces: its listeners stop accepting (the kernel queues new connections), every
//!    control connection finishes the request in flight and stops at the next message
//!    boundary, a relay that cannot move is closed. O serialises what is left.
//! 3. O sends the descriptors (`SCM_RIGHTS`) and the state, then `StateEnd`.
//! 4. N rebuilds the bindings, relays and sessions, tells the service manager `MAINPID=`
//!    and `READY=1`, and sends `Ready`. O sends `Done` and exits without touching the kernel;
//!    N serves from then on.
//!
//! Any failure before `Ready` (N refuses, fails, dies or is too slow) leaves O serving: O still
//! holds every descriptor it sent and resumes its sessions from the same state.
//!
//! Files: `wire` (the socket pair, framing and descriptor passing), `state` (the versioned
//! state document).

pub mod state;
pub mod wire;

use std::ops::RangeInclusive;

/// The environment variable that tells a new daemon which descriptor is its end of the pair.
pub const CHANNEL_FD_ENV: &str = "GATEWAY_HANDOVER_FD";

/// Which state format a build writes and which it can read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Format {
    pub writes: u32,
    pub reads: RangeInclusive<u32>,
}

impl Format {
    /// This build's: the state document of [`state::DaemonState`].
    pub const CURRENT: Format = Format {
        writes: state::VERSION,
        reads: state::VERSION..=state::VERSION,
    };

    /// Whether a state of `version` can be read by this build.
    pub fn can_read(&self, version: u32) -> bool {
        self.reads.contains(&version)
    }
}

impl Default for Format {
    fn default() -> Self {
        Self::CURRENT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_build_reads_what_it_writes_and_nothing_newer() {
        let current = Format::CURRENT;
        assert!(current.can_read(current.writes));
        assert!(!current.can_read(current.writes + 1));
        let next = Format {
            writes: current.writes + 1,
            reads: current.writes..=current.writes + 1,
        };
        assert!(
            next.can_read(current.writes),
            "the next build reads the old state"
        );
        assert!(!current.can_read(next.writes), "a downgrade is refused");
    }
}
