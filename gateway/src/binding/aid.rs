//! Sources of association ids. The state machine draws AIDs from an injected source so tests are
//! deterministic; [`HashAids`] is a default for the daemon seeded by the standard library's
//! per-process random hash keys.
//!
//! Owns the drawing only; uniqueness and non-zero are checked by the state machine. It must not
//! be used where secrecy matters (AIDs are not secrets: another connection naming them gets `10`).

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

/// Draws candidate association ids. The state machine rejects 0 and ids in use and draws again,
/// a bounded number of times.
pub trait AidSource {
    /// One candidate id.
    fn next_aid(&mut self) -> u32;
}

impl<F: FnMut() -> u32> AidSource for F {
    fn next_aid(&mut self) -> u32 {
        self()
    }
}

/// Pseudo-random AIDs: `SipHash`, keyed randomly per process by [`RandomState`], over a counter.
#[derive(Clone, Debug)]
pub struct HashAids {
    state: RandomState,
    counter: u64,
}

impl HashAids {
    /// A source with fresh random keys.
    pub fn new() -> Self {
        HashAids {
            state: RandomState::new(),
            counter: 0,
        }
    }
}

impl Default for HashAids {
    fn default() -> Self {
        Self::new()
    }
}

impl AidSource for HashAids {
    fn next_aid(&mut self) -> u32 {
        self.counter = self.counter.wrapping_add(1);
        let mut hasher = self.state.build_hasher();
        hasher.write_u64(self.counter);
        let hash = hasher.finish();
        // Fold the 64-bit hash into 32 bits; truncation is the point.
        #[expect(clippy::cast_possible_truncation, reason = "folding a hash")]
        let folded = (hash ^ (hash >> 32)) as u32;
        folded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_aids_vary() {
        let mut aids = HashAids::new();
        let drawn: std::collections::HashSet<u32> = (0..1000).map(|_| aids.next_aid()).collect();
        assert!(drawn.len() > 990);
    }
}
