//! Counts of control-plane decisions that no other part keeps: authentications by result,
//! control connections accepted, UDP ASSOCIATE relaying and its cap of remotes. The place that
//! decides counts here (lock-free atomics); `gateway run --metrics` reads them. Below every
//! other module: it imports none.

use std::sync::atomic::{AtomicU64, Ordering};

/// One monotonic count.
#[derive(Debug, Default)]
pub struct Count(AtomicU64);

impl Count {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn inc(&self) {
        self.add(1);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The shared counts of one daemon.
#[derive(Debug, Default)]
pub struct Counters {
    /// RFC 1929 logins that succeeded.
    pub auth_succeeded: Count,
    /// RFC 1929 logins with a wrong name or password.
    pub auth_failed: Count,
    /// RFC 1929 logins refused unchecked: too many failures from the address.
    pub auth_rate_limited: Count,
    /// Control connections admitted past the caps and the client networks.
    pub connections_accepted: Count,
    /// Datagrams and payload bytes the RFC 1928 UDP ASSOCIATE relay sent on, both ways.
    pub associate_packets: Count,
    pub associate_bytes: Count,
    /// Datagrams dropped because their association was at its cap of remotes.
    pub associate_remote_cap: Count,
}
