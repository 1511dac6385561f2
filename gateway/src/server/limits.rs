//! Caps on what clients can make the control plane hold: control connections in total (across
//! every listener) and per client address, and password verifications in flight (Argon2 is
//! deliberately expensive: it runs on the blocking pool, a few at a time, so logins never stall
//! the relays and timers on the async workers). Each refusal is counted.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Default cap on control connections, across all listeners.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Default cap on control connections from one client address.
pub const DEFAULT_MAX_CONNECTIONS_PER_CLIENT: usize = 256;

/// Why a connection was refused at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The gateway-wide cap.
    Total,
    /// The cap of the client's address.
    PerClient,
}

/// The connection caps, shared by every listener.
#[derive(Debug)]
pub struct ConnectionLimits {
    total: Arc<Semaphore>,
    max_total: usize,
    max_per_client: usize,
    per_client: Arc<Mutex<HashMap<IpAddr, usize>>>,
    refused_total: AtomicU64,
    refused_per_client: AtomicU64,
}

/// A control connection's place under the caps; dropping it gives the place back.
#[derive(Debug)]
pub struct ConnectionSlot {
    _total: OwnedSemaphorePermit,
    client: IpAddr,
    per_client: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut per_client = self
            .per_client
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = per_client.get_mut(&self.client) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                per_client.remove(&self.client);
            }
        }
    }
}

impl ConnectionLimits {
    pub fn new(max_total: usize, max_per_client: usize) -> Self {
        Self {
            total: Arc::new(Semaphore::new(max_total)),
            max_total,
            max_per_client,
            per_client: Arc::default(),
            refused_total: AtomicU64::new(0),
            refused_per_client: AtomicU64::new(0),
        }
    }

    pub fn max_total(&self) -> usize {
        self.max_total
    }

    pub fn max_per_client(&self) -> usize {
        self.max_per_client
    }

    /// A place for a connection from `client`, or why there is none (counted).
    pub fn admit(&self, client: IpAddr) -> Result<ConnectionSlot, Refusal> {
        let client = client.to_canonical();
        let mut per_client = self
            .per_client
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let count = per_client.entry(client).or_insert(0);
        if *count >= self.max_per_client {
            self.refused_per_client.fetch_add(1, Ordering::Relaxed);
            return Err(Refusal::PerClient);
        }
        let Ok(total) = Arc::clone(&self.total).try_acquire_owned() else {
            if *count == 0 {
                per_client.remove(&client);
            }
            self.refused_total.fetch_add(1, Ordering::Relaxed);
            return Err(Refusal::Total);
        };
        *count += 1;
        Ok(ConnectionSlot {
            _total: total,
            client,
            per_client: Arc::clone(&self.per_client),
        })
    }

    /// Connections refused so far: (total cap, per-client cap).
    pub fn refused(&self) -> (u64, u64) {
        (
            self.refused_total.load(Ordering::Relaxed),
            self.refused_per_client.load(Ordering::Relaxed),
        )
    }

    /// Connections held now.
    pub fn held(&self) -> usize {
        self.max_total - self.total.available_permits()
    }
}

/// Password verifications in flight, on the blocking pool.
#[derive(Debug)]
pub struct AuthLimit {
    slots: Arc<Semaphore>,
}

impl AuthLimit {
    /// `per_core` verifications per available core (at least one in all).
    pub fn per_core(per_core: usize) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        Self {
            slots: Arc::new(Semaphore::new((cores * per_core).max(1))),
        }
    }

    /// Runs `verify` on the blocking pool once a slot is free; waiting logins queue here, not
    /// on the async workers.
    pub async fn run(&self, verify: impl FnOnce() -> bool + Send + 'static) -> bool {
        let Ok(_slot) = Arc::clone(&self.slots).acquire_owned().await else {
            return false;
        };
        tokio::task::spawn_blocking(|| at_low_priority(verify))
            .await
            .unwrap_or(false)
    }
}

/// How much nicer than the daemon a password check runs: Argon2 is made to burn CPU, and on a
/// small firewall the relay must win every time it has a datagram to move.
const AUTH_NICENESS: libc::c_int = 10;

/// Runs `f` on this (blocking-pool) thread at [`AUTH_NICENESS`] above its priority, which is
/// restored afterwards (Linux keeps the nice value per thread).
fn at_low_priority<R>(f: impl FnOnce() -> R) -> R {
    let tid = libc::id_t::try_from(nix::unistd::gettid().as_raw()).unwrap_or(0);
    // SAFETY: getpriority/setpriority only read and set this thread's nice value; errno is
    // cleared first because -1 is also a valid priority.
    let before = unsafe {
        *libc::__errno_location() = 0;
        libc::getpriority(libc::PRIO_PROCESS, tid)
    };
    let known = before != -1 || std::io::Error::last_os_error().raw_os_error() == Some(0);
    let lowered = known
        // SAFETY: as above.
        && unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, before + AUTH_NICENESS) } == 0;
    let result = f();
    // SAFETY: as above. Raising it back needs CAP_SYS_NICE; without, the thread stays nicer,
    // which costs only other blocking work some speed.
    if lowered && unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, before) } != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "cannot restore a blocking thread's priority after a password check"
        );
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_client_and_in_total() {
        let limits = ConnectionLimits::new(3, 2);
        let a: IpAddr = "198.51.100.2".parse().unwrap();
        let b: IpAddr = "198.51.100.3".parse().unwrap();
        let first = limits.admit(a).unwrap();
        let _second = limits
            .admit("::ffff:198.51.100.2".parse().unwrap())
            .unwrap();
        assert_eq!(limits.admit(a).unwrap_err(), Refusal::PerClient);
        // Another client still gets in, up to the total.
        let _third = limits.admit(b).unwrap();
        assert_eq!(limits.admit(b).unwrap_err(), Refusal::Total);
        assert_eq!(limits.refused(), (1, 1));
        assert_eq!(limits.held(), 3);
        drop(first);
        assert_eq!(limits.held(), 2);
        let _again = limits.admit(a).unwrap();
    }

    #[tokio::test]
    async fn verifications_run_off_the_async_workers() {
        let limit = AuthLimit::per_core(2);
        let worker = std::thread::current().id();
        let elsewhere = limit
            .run(move || std::thread::current().id() != worker)
            .await;
        assert!(elsewhere, "the verification ran on the blocking pool");
        let nice = || {
            let tid = libc::id_t::try_from(nix::unistd::gettid().as_raw()).unwrap();
            // SAFETY: reads this thread's nice value.
            unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) }
        };
        let daemon = nice();
        let during = Arc::new(std::sync::atomic::AtomicI32::new(i32::MIN));
        let seen = Arc::clone(&during);
        limit
            .run(move || {
                seen.store(nice(), std::sync::atomic::Ordering::Relaxed);
                true
            })
            .await;
        assert_eq!(
            during.load(std::sync::atomic::Ordering::Relaxed),
            (daemon + AUTH_NICENESS).min(19),
            "a password check yields the CPU to the relay"
        );
    }
}
