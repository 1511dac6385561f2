//! Relay port allocation: single ports and aligned even/odd pairs from configurable ranges, per
//! relay address, reserved atomically on the internal and the external side.
//!
//! Owns which relay ports are taken. It must not open sockets (the caller does, from the
//! [`Action::Reserve`](super::Action::Reserve) it is given) and must never scan the whole range
//! per request: every allocation and every release is O(log n) in the range's size.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use super::types::{BindError, Family, RelayPorts};

/// An inclusive range of UDP ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortRange {
    /// First port of the range.
    pub first: u16,
    /// Last port of the range (inclusive).
    pub last: u16,
}

impl PortRange {
    /// The ports `first..=last`.
    pub const fn new(first: u16, last: u16) -> Self {
        PortRange { first, last }
    }

    /// Parses `FIRST-LAST` (a non-empty range without port 0).
    pub fn parse(text: &str) -> Result<Self, String> {
        let (first, last) = text
            .split_once('-')
            .ok_or_else(|| format!("{text:?}: expected FIRST-LAST"))?;
        let port = |s: &str| {
            s.trim()
                .parse::<u16>()
                .map_err(|_| format!("{text:?}: {s:?} is not a port"))
        };
        let range = Self::new(port(first)?, port(last)?);
        if range.first == 0 || range.first > range.last {
            return Err(format!(
                "{text:?}: must be non-empty and must not contain port 0"
            ));
        }
        Ok(range)
    }

    /// The same ports as a `RangeInclusive`.
    pub fn ports(&self) -> std::ops::RangeInclusive<u16> {
        self.first..=self.last
    }

    /// How many ports the range holds (0 if `first > last`).
    pub fn len(&self) -> usize {
        if self.first > self.last {
            0
        } else {
            usize::from(self.last - self.first) + 1
        }
    }

    /// Whether the range holds no port.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `port` lies in the range.
    pub fn contains(&self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }
}

impl std::str::FromStr for PortRange {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        Self::parse(text)
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// Bit of a slot's state: its even port is taken (or outside the range).
const EVEN: u8 = 0b01;
/// Bit of a slot's state: its odd port is taken (or outside the range).
const ODD: u8 = 0b10;

/// The ports of one relay address. Ports are grouped in slots `(2k, 2k+1)`; two ordered sets
/// hold the slots with both ports free and those with exactly one free. Single ports come from
/// half-free slots first, so aligned pairs stay available. Each set has a cursor that moves on
/// after every allocation, so a port just freed is reused last.
#[derive(Clone, Debug)]
pub struct PortPool {
    range: PortRange,
    /// Slot 0 holds the ports `base` and `base + 1`.
    base: u16,
    /// Per slot: [`EVEN`] and [`ODD`] bits set when taken or outside the range.
    taken: Vec<u8>,
    /// Slots with both ports in range and free.
    pairs: BTreeSet<u16>,
    /// Slots with exactly one port free.
    singles: BTreeSet<u16>,
    pair_cursor: u16,
    single_cursor: u16,
    free: usize,
}

impl PortPool {
    /// A pool with every port of `range` free. An empty range gives a pool that is always
    /// exhausted.
    pub fn new(range: PortRange) -> Self {
        let base = range.first & !1;
        let slots = if range.is_empty() {
            0
        } else {
            usize::from((range.last - base) / 2) + 1
        };
        let mut pool = PortPool {
            range,
            base,
            taken: vec![0; slots],
            pairs: BTreeSet::new(),
            singles: BTreeSet::new(),
            pair_cursor: 0,
            single_cursor: 0,
            free: range.len(),
        };
        for slot in 0..pool.taken.len() {
            let Ok(slot) = u16::try_from(slot) else { break };
            let (even, odd) = pool.ports_of(slot);
            let mut state = 0;
            if !range.contains(even) {
                state |= EVEN;
            }
            if odd.is_none_or(|odd| !range.contains(odd)) {
                state |= ODD;
            }
            pool.taken[usize::from(slot)] = state;
            pool.file(slot, state);
        }
        pool
    }

    /// The range this pool serves.
    pub fn range(&self) -> PortRange {
        self.range
    }

    /// How many ports are free.
    pub fn free(&self) -> usize {
        self.free
    }

    /// How many aligned pairs are free.
    pub fn free_pairs(&self) -> usize {
        self.pairs.len()
    }

    /// Takes one free port, or `None` when the pool is exhausted.
    pub fn alloc(&mut self) -> Option<u16> {
        if let Some(slot) = next_from(&self.singles, self.single_cursor) {
            self.single_cursor = slot.wrapping_add(1);
            let state = self.taken[usize::from(slot)];
            let (even, odd) = self.ports_of(slot);
            let (bit, port) = if state & EVEN == 0 {
                (EVEN, Some(even))
            } else {
                (ODD, odd)
            };
            let port = port?;
            self.set(slot, state | bit);
            return Some(port);
        }
        let slot = next_from(&self.pairs, self.pair_cursor)?;
        self.pair_cursor = slot.wrapping_add(1);
        let (even, _) = self.ports_of(slot);
        let state = self.taken[usize::from(slot)];
        self.set(slot, state | EVEN);
        Some(even)
    }

    /// Takes an aligned pair and returns its even port P (P+1 is taken too), or `None` when no
    /// aligned pair is free.
    pub fn alloc_pair(&mut self) -> Option<u16> {
        let slot = next_from(&self.pairs, self.pair_cursor)?;
        self.pair_cursor = slot.wrapping_add(1);
        let (even, _) = self.ports_of(slot);
        self.set(slot, EVEN | ODD);
        Some(even)
    }

    /// Returns `port` to the pool. Returns false (and changes nothing) if it was not taken.
    pub fn release(&mut self, port: u16) -> bool {
        if !self.range.contains(port) {
            return false;
        }
        let slot = (port - self.base) / 2;
        let bit = if port.is_multiple_of(2) { EVEN } else { ODD };
        let state = self.taken[usize::from(slot)];
        if state & bit == 0 {
            return false;
        }
        self.set(slot, state & !bit);
        true
    }

    /// Returns the pair `port`, `port + 1`. Returns false (and changes nothing) unless both
    /// were taken and `port` is even.
    pub fn release_pair(&mut self, port: u16) -> bool {
        if !port.is_multiple_of(2) || !self.range.contains(port) || !self.range.contains(port + 1) {
            return false;
        }
        let slot = (port - self.base) / 2;
        if self.taken[usize::from(slot)] != EVEN | ODD {
            return false;
        }
        self.set(slot, 0);
        true
    }

    /// Takes exactly `port` (a binding handed over by another daemon). False (nothing taken)
    /// if it is outside the range or taken.
    pub fn take(&mut self, port: u16) -> bool {
        if !self.range.contains(port) {
            return false;
        }
        let slot = (port - self.base) / 2;
        let bit = if port.is_multiple_of(2) { EVEN } else { ODD };
        let state = self.taken[usize::from(slot)];
        if state & bit != 0 {
            return false;
        }
        self.set(slot, state | bit);
        true
    }

    /// Takes exactly the aligned pair `port`, `port + 1`. False (nothing taken) unless `port`
    /// is even and both are in range and free.
    pub fn take_pair(&mut self, port: u16) -> bool {
        if !port.is_multiple_of(2) || !self.range.contains(port) || !self.range.contains(port + 1) {
            return false;
        }
        let slot = (port - self.base) / 2;
        if self.taken[usize::from(slot)] != 0 {
            return false;
        }
        self.set(slot, EVEN | ODD);
        true
    }

    /// The even and (if it exists) odd port of `slot`.
    fn ports_of(&self, slot: u16) -> (u16, Option<u16>) {
        let even = self.base + 2 * slot;
        (even, even.checked_add(1))
    }

    /// Moves `slot` to its new `state`, keeping the sets and the free count in step.
    fn set(&mut self, slot: u16, state: u8) {
        let old = self.taken[usize::from(slot)];
        self.unfile(slot, old);
        self.taken[usize::from(slot)] = state;
        self.file(slot, state);
        let free_in = |s: u8| 2 - (s.count_ones() as usize);
        self.free = self.free + free_in(state) - free_in(old);
    }

    fn file(&mut self, slot: u16, state: u8) {
        match state.count_ones() {
            0 => {
                self.pairs.insert(slot);
            }
            1 => {
                self.singles.insert(slot);
            }
            _ => {}
        }
    }

    fn unfile(&mut self, slot: u16, state: u8) {
        match state.count_ones() {
            0 => {
                self.pairs.remove(&slot);
            }
            1 => {
                self.singles.remove(&slot);
            }
            _ => {}
        }
    }
}

/// The first member of `set` at or after `cursor`, wrapping around.
fn next_from(set: &BTreeSet<u16>, cursor: u16) -> Option<u16> {
    set.range(cursor..)
        .next()
        .or_else(|| set.iter().next())
        .copied()
}

/// One pool per relay address, for one side (internal or external).
#[derive(Clone, Debug)]
struct Side {
    pools: Vec<(IpAddr, PortPool)>,
    /// Where the next search for a free port starts (internal side: spreads the load).
    cursor: usize,
}

impl Side {
    fn new(ips: &[IpAddr], range: PortRange) -> Self {
        Side {
            pools: ips.iter().map(|ip| (*ip, PortPool::new(range))).collect(),
            cursor: 0,
        }
    }

    /// Takes a port (or pair) on `preferred` if given, else (or also, when `spill`) on any
    /// address of `family`, starting at the cursor.
    fn alloc(
        &mut self,
        family: Family,
        preferred: Option<IpAddr>,
        spill: bool,
        pair: bool,
    ) -> Option<SocketAddr> {
        let take = |pool: &mut PortPool| {
            if pair {
                pool.alloc_pair()
            } else {
                pool.alloc()
            }
        };
        if let Some(ip) = preferred
            && let Some((_, pool)) = self.pools.iter_mut().find(|(p, _)| *p == ip)
            && let Some(port) = take(pool)
        {
            return Some(SocketAddr::new(ip, port));
        }
        if preferred.is_some() && !spill {
            return None;
        }
        let count = self.pools.len();
        for step in 0..count {
            let index = (self.cursor + step) % count;
            let (ip, pool) = &mut self.pools[index];
            if Family::of(*ip) != family || Some(*ip) == preferred {
                continue;
            }
            if let Some(port) = take(pool) {
                self.cursor = (index + 1) % count;
                return Some(SocketAddr::new(*ip, port));
            }
        }
        None
    }

    fn release(&mut self, addr: SocketAddr, pair: bool) -> bool {
        let Some((_, pool)) = self.pools.iter_mut().find(|(ip, _)| *ip == addr.ip()) else {
            return false;
        };
        if pair {
            pool.release_pair(addr.port())
        } else {
            pool.release(addr.port())
        }
    }

    /// Takes exactly `addr` (with `pair`, its aligned pair).
    fn take(&mut self, addr: SocketAddr, pair: bool) -> bool {
        let Some((_, pool)) = self.pools.iter_mut().find(|(ip, _)| *ip == addr.ip()) else {
            return false;
        };
        if pair {
            pool.take_pair(addr.port())
        } else {
            pool.take(addr.port())
        }
    }

    fn taken(&self) -> usize {
        self.pools
            .iter()
            .map(|(_, pool)| pool.range().len() - pool.free())
            .sum()
    }

    fn has_family(&self, family: Family) -> bool {
        self.pools.iter().any(|(ip, _)| Family::of(*ip) == family)
    }
}

/// Internal and external relay ports of the whole gateway.
#[derive(Clone, Debug)]
pub(crate) struct RelayAllocator {
    internal: Side,
    external: Side,
    spill: bool,
}

impl RelayAllocator {
    pub(crate) fn new(
        internal_ips: &[IpAddr],
        internal: PortRange,
        external_ips: &[IpAddr],
        external: PortRange,
        spill: bool,
    ) -> Self {
        RelayAllocator {
            internal: Side::new(internal_ips, internal),
            external: Side::new(external_ips, external),
            spill,
        }
    }

    /// Whether an internal relay address of `family` exists.
    pub(crate) fn has_internal(&self, family: Family) -> bool {
        self.internal.has_family(family)
    }

    /// Whether an external relay address of `family` exists.
    pub(crate) fn has_external(&self, family: Family) -> bool {
        self.external.has_family(family)
    }

    /// Reserves an internal port of `internal_family` and an external port on `external_ip`
    /// (or, with spill, another external address of its family), both or neither. Exhaustion
    /// gives `01` for single ports and `16` for pairs.
    pub(crate) fn reserve(
        &mut self,
        internal_family: Family,
        external_ip: IpAddr,
        pair: bool,
    ) -> Result<RelayPorts, BindError> {
        let exhausted = if pair {
            BindError::PairUnavailable
        } else {
            BindError::PortsExhausted
        };
        let external_family = Family::of(external_ip);
        let external = self
            .external
            .alloc(external_family, Some(external_ip), self.spill, pair)
            .ok_or(exhausted)?;
        let Some(internal) = self.internal.alloc(internal_family, None, true, pair) else {
            self.external.release(external, pair);
            return Err(exhausted);
        };
        Ok(RelayPorts {
            internal,
            external,
            pair,
        })
    }

    /// Takes exactly `ports` (a binding handed over by another daemon), both sides or
    /// neither. False if a part is not an address of this allocator, out of range or taken.
    pub(crate) fn take(&mut self, ports: &RelayPorts) -> bool {
        if !self.internal.take(ports.internal, ports.pair) {
            return false;
        }
        if !self.external.take(ports.external, ports.pair) {
            self.internal.release(ports.internal, ports.pair);
            return false;
        }
        true
    }

    /// Returns both sides of `ports`. Returns false if any part was not taken.
    pub(crate) fn release(&mut self, ports: &RelayPorts) -> bool {
        let internal = self.internal.release(ports.internal, ports.pair);
        let external = self.external.release(ports.external, ports.pair);
        internal && external
    }

    /// How many internal and external relay ports are taken.
    pub(crate) fn taken(&self) -> (usize, usize) {
        (self.internal.taken(), self.external.taken())
    }

    /// Free ports of every relay address: internal side first, each side in address order.
    pub(crate) fn free_per_address(&self) -> Vec<super::FreePorts> {
        let side = |pools: &[(IpAddr, PortPool)], side: &'static str| {
            pools
                .iter()
                .map(move |(address, pool)| super::FreePorts {
                    side,
                    address: *address,
                    free: pool.free(),
                })
                .collect::<Vec<_>>()
        };
        let mut all = side(&self.internal.pools, "internal");
        all.extend(side(&self.external.pools, "external"));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn singles_fill_half_slots_first_and_pairs_stay_aligned() {
        let mut pool = PortPool::new(PortRange::new(1001, 1006));
        // Slots: (1000,1001) with 1000 outside, (1002,1003), (1004,1005), (1006,1007) with 1007 outside.
        assert_eq!(pool.free(), 6);
        assert_eq!(pool.free_pairs(), 2);
        let a = pool.alloc().unwrap();
        let b = pool.alloc().unwrap();
        assert_eq!([a, b], [1001, 1006]);
        assert_eq!(pool.free_pairs(), 2);
        let p = pool.alloc_pair().unwrap();
        assert_eq!(p % 2, 0);
        let q = pool.alloc_pair().unwrap();
        assert_eq!(q % 2, 0);
        assert_ne!(p, q);
        assert_eq!(pool.alloc_pair(), None);
        assert_eq!(pool.alloc(), None);
        assert_eq!(pool.free(), 0);
        assert!(pool.release_pair(p));
        assert!(!pool.release_pair(p), "double release is refused");
        assert!(!pool.release(p), "double release is refused");
        assert_eq!(pool.free(), 2);
        assert_eq!(pool.alloc_pair(), Some(p));
    }

    #[test]
    fn single_splits_a_pair_only_when_no_half_slot_is_left() {
        let mut pool = PortPool::new(PortRange::new(2000, 2003));
        let a = pool.alloc().unwrap();
        assert_eq!(pool.free_pairs(), 1);
        let b = pool.alloc().unwrap();
        assert_eq!(a / 2, b / 2, "second single fills the same slot");
        assert_eq!(pool.free_pairs(), 1);
        assert!(pool.release(a));
        assert!(pool.release(b));
        assert_eq!(pool.free_pairs(), 2);
        assert!(!pool.release(1999));
        assert!(!pool.release(2004));
    }

    #[test]
    fn cursor_delays_reuse() {
        let mut pool = PortPool::new(PortRange::new(3000, 3009));
        let first = pool.alloc_pair().unwrap();
        assert!(pool.release_pair(first));
        let second = pool.alloc_pair().unwrap();
        assert_ne!(
            first, second,
            "a just-freed pair is not handed out again at once"
        );
    }

    #[test]
    fn range_up_to_65535_and_single_port() {
        let mut pool = PortPool::new(PortRange::new(65_535, 65_535));
        assert_eq!(pool.free(), 1);
        assert_eq!(pool.alloc_pair(), None);
        assert_eq!(pool.alloc(), Some(65_535));
        assert_eq!(pool.alloc(), None);
        assert!(pool.release(65_535));
        let mut pool = PortPool::new(PortRange::new(65_534, 65_535));
        assert_eq!(pool.alloc_pair(), Some(65_534));
        assert!(!pool.release_pair(65_535));
        assert!(pool.release_pair(65_534));
        let empty = PortPool::new(PortRange::new(5, 4));
        assert_eq!(empty.free(), 0);
    }

    #[test]
    fn full_range_exhausts_and_refills() {
        let range = PortRange::new(1, 65_535);
        let mut pool = PortPool::new(range);
        let mut got = Vec::new();
        while let Some(port) = pool.alloc() {
            got.push(port);
        }
        assert_eq!(got.len(), range.len());
        for port in got {
            assert!(pool.release(port));
        }
        assert_eq!(pool.free(), range.len());
        assert_eq!(pool.free_pairs(), 32_767);
    }

    #[test]
    fn reserve_is_atomic() {
        let ip = |d| IpAddr::V4(Ipv4Addr::new(10, 0, 0, d));
        let mut alloc = RelayAllocator::new(
            &[ip(1)],
            PortRange::new(100, 100),
            &[ip(2)],
            PortRange::new(200, 203),
            false,
        );
        let first = alloc.reserve(Family::V4, ip(2), false).unwrap();
        assert_eq!(alloc.taken(), (1, 1));
        assert_eq!(
            alloc.reserve(Family::V4, ip(2), false),
            Err(BindError::PortsExhausted)
        );
        assert_eq!(
            alloc.taken(),
            (1, 1),
            "external port returned when internal failed"
        );
        assert_eq!(
            alloc.reserve(Family::V4, ip(2), true),
            Err(BindError::PairUnavailable)
        );
        assert!(alloc.release(&first));
        assert!(!alloc.release(&first));
        assert_eq!(alloc.taken(), (0, 0));
    }

    #[test]
    fn spill_moves_to_another_external_address() {
        let ip = |d| IpAddr::V4(Ipv4Addr::new(10, 0, 0, d));
        let mut strict = RelayAllocator::new(
            &[ip(1)],
            PortRange::new(100, 199),
            &[ip(2), ip(3)],
            PortRange::new(200, 200),
            false,
        );
        assert_eq!(
            strict
                .reserve(Family::V4, ip(2), false)
                .unwrap()
                .external
                .ip(),
            ip(2)
        );
        assert!(strict.reserve(Family::V4, ip(2), false).is_err());
        let mut spill = RelayAllocator::new(
            &[ip(1)],
            PortRange::new(100, 199),
            &[ip(2), ip(3)],
            PortRange::new(200, 200),
            true,
        );
        assert_eq!(
            spill
                .reserve(Family::V4, ip(2), false)
                .unwrap()
                .external
                .ip(),
            ip(2)
        );
        assert_eq!(
            spill
                .reserve(Family::V4, ip(2), false)
                .unwrap()
                .external
                .ip(),
            ip(3)
        );
        assert!(spill.reserve(Family::V4, ip(2), false).is_err());
    }
}
