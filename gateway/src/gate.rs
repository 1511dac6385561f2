//! The daemon's handle on the kernel gate: installs and removes exact binding entries
//! (remote ip:port -> relay ip:port) in the pinned `BINDINGS` map. The relay and the binding
//! layer talk to the [`Gate`] trait, so they are testable without eBPF ([`MemoryGate`]).
//! Owns no policy: callers decide what to admit.

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
};

use aya::maps::{HashMap, MapData, MapError};
use gateway_common::{BindingKey, BindingValue};
use thiserror::Error;

use crate::datapath::addr16;

/// One exact admission: datagrams from `remote` to the external relay address `relay`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GateEntry {
    pub remote: SocketAddr,
    pub relay: SocketAddr,
}

impl GateEntry {
    pub fn key(&self) -> BindingKey {
        BindingKey {
            remote_addr: addr16(self.remote.ip()),
            relay_addr: addr16(self.relay.ip()),
            remote_port_be: self.remote.port().to_be(),
            relay_port_be: self.relay.port().to_be(),
        }
    }
}

#[derive(Debug, Error)]
pub enum GateError {
    #[error("install kernel entry {remote} -> {relay}: {source}")]
    Install {
        remote: SocketAddr,
        relay: SocketAddr,
        source: MapError,
    },
}

/// Installs and removes kernel admissions. Removing an absent entry is not an error.
pub trait Gate: Send + Sync + std::fmt::Debug {
    /// Admits `entry` in the kernel with the verdict "pass to the userspace relay".
    fn install(&self, entry: GateEntry) -> Result<(), GateError>;
    fn remove(&self, entry: GateEntry);
}

/// The real gate: the pinned `BINDINGS` map of the attached datapath.
pub struct KernelGate {
    map: Mutex<HashMap<MapData, BindingKey, BindingValue>>,
}

impl std::fmt::Debug for KernelGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelGate")
    }
}

impl KernelGate {
    pub fn new(map: HashMap<MapData, BindingKey, BindingValue>) -> Self {
        Self {
            map: Mutex::new(map),
        }
    }
}

impl Gate for KernelGate {
    fn install(&self, entry: GateEntry) -> Result<(), GateError> {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        map.insert(entry.key(), BindingValue::default(), 0)
            .map_err(|source| GateError::Install {
                remote: entry.remote,
                relay: entry.relay,
                source,
            })
    }

    fn remove(&self, entry: GateEntry) {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = map.remove(&entry.key());
    }
}

/// An in-memory gate for tests and for running without eBPF: records what is admitted.
#[derive(Debug, Default, Clone)]
pub struct MemoryGate {
    entries: Arc<Mutex<HashSet<GateEntry>>>,
}

impl MemoryGate {
    pub fn entries(&self) -> HashSet<GateEntry> {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn contains(&self, entry: &GateEntry) -> bool {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(entry)
    }
}

impl Gate for MemoryGate {
    fn install(&self, entry: GateEntry) -> Result<(), GateError> {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(entry);
        Ok(())
    }

    fn remove(&self, entry: GateEntry) {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_exact_and_ipv4_mapped() {
        let entry = GateEntry {
            remote: "203.0.113.2:6000".parse().unwrap(),
            relay: "203.0.113.1:30000".parse().unwrap(),
        };
        let key = entry.key();
        assert_eq!(&key.remote_addr[10..], &[0xff, 0xff, 203, 0, 113, 2]);
        assert_eq!(key.remote_port_be.to_ne_bytes(), 6000u16.to_be_bytes());
        assert_eq!(key.relay_port_be.to_ne_bytes(), 30000u16.to_be_bytes());
    }

    #[test]
    fn memory_gate_records() {
        let gate = MemoryGate::default();
        let entry = GateEntry {
            remote: "[2001:db8:2::2]:53".parse().unwrap(),
            relay: "[2001:db8:2::1]:40000".parse().unwrap(),
        };
        gate.install(entry).unwrap();
        assert!(gate.contains(&entry));
        gate.remove(entry);
        assert!(gate.entries().is_empty());
    }
}
