//! The daemon's handle on the kernel gate: installs and removes exact binding entries
//! (remote ip:port -> relay ip:port) in the pinned `BINDINGS` map. The relay and the binding
//! layer talk to the [`Gate`] trait, so they are testable without eBPF ([`MemoryGate`]).
//! Owns no policy: callers decide what to admit.

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
};

use aya::maps::{HashMap, MapData, MapError};
use gateway_common::{
    BindingKey, BindingValue, ClientSocketKey, EntryCounters, GroupKey, GroupSourceKey, GroupValue,
    HostAllowKey, HostAllowValue, MAX_KERNEL_SUBSCRIBERS, OutboundKey, OutboundValue,
    RawClientValue, framing, group_flags, relay_mode,
};
use thiserror::Error;

use crate::host_flow::{HostFlow, addr16};

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

/// How datagrams are framed between relay and client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Framing {
    /// The enhanced mode's 8-octet header with the AID.
    Enhanced,
    /// The RFC 1928 UDP header naming the remote.
    Socks5,
    /// No header (the enhanced mode's RAW): the client's socket talks to `remote` itself, and
    /// the kernel rewrites only the client's end of each datagram.
    Raw { remote: SocketAddr },
}

/// What the kernel needs to relay an admitted flow itself, both ways.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KernelRelay {
    pub client: SocketAddr,
    pub internal_relay: SocketAddr,
    pub aid: u32,
    pub framing: Framing,
}

impl KernelRelay {
    fn framing_code(&self) -> u32 {
        match self.framing {
            Framing::Enhanced => framing::ENHANCED,
            Framing::Socks5 => framing::SOCKS5,
            Framing::Raw { .. } => framing::RAW,
        }
    }

    /// The client's datagrams go to the internal relay, or with RAW to the remote itself.
    fn outbound_key(&self) -> OutboundKey {
        let to = match self.framing {
            Framing::Raw { remote } => remote,
            Framing::Enhanced | Framing::Socks5 => self.internal_relay,
        };
        OutboundKey {
            client_addr: addr16(self.client.ip()),
            relay_addr: addr16(to.ip()),
            client_port_be: self.client.port().to_be(),
            relay_port_be: to.port().to_be(),
        }
    }

    fn is_raw(&self) -> bool {
        matches!(self.framing, Framing::Raw { .. })
    }

    /// The kernel relays only within one family (no translation).
    fn same_family(&self, entry: &GateEntry) -> bool {
        let v4 = |ip: std::net::IpAddr| ip.to_canonical().is_ipv4();
        let families = [
            v4(self.client.ip()),
            v4(self.internal_relay.ip()),
            v4(entry.remote.ip()),
            v4(entry.relay.ip()),
        ];
        families.iter().all(|f| *f == families[0])
    }
}

#[derive(Debug, Error)]
pub enum GateError {
    #[error("install kernel entry {remote} -> {relay}: {source}")]
    Install {
        remote: SocketAddr,
        relay: SocketAddr,
        source: Box<MapError>,
    },
    #[error("the gate is closed (the daemon is stopping): {remote} -> {relay} not admitted")]
    Closed {
        remote: SocketAddr,
        relay: SocketAddr,
    },
    #[error("write the kernel entry of group {group}: {source}")]
    Group {
        group: SocketAddr,
        source: Box<MapError>,
    },
    #[error("the gate is closed (the daemon is stopping): group {group} not admitted")]
    GroupClosed { group: SocketAddr },
    #[error("allow host flow {remote} -> {local}: {source}")]
    HostFlow {
        remote: SocketAddr,
        local: SocketAddr,
        source: Box<MapError>,
    },
}

/// Installs and removes kernel admissions. Removing an absent entry is not an error.
pub trait Gate: Send + Sync + std::fmt::Debug {
    /// Admits `entry` in the kernel with the verdict "pass to the userspace relay".
    fn install(&self, entry: GateEntry) -> Result<(), GateError>;
    /// Admits `entry` and, where the datapath relays in the kernel, has the kernel deliver it to
    /// `relay.client` and carry the client's datagrams back out. Otherwise like [`Gate::install`].
    fn install_kernel_relay(&self, entry: GateEntry, relay: KernelRelay) -> Result<(), GateError> {
        let _ = relay;
        self.install(entry)
    }
    fn remove(&self, entry: GateEntry);
    /// Whether [`Gate::install_kernel_relay`] relays in the kernel (header-less delivery needs
    /// it: user space never sees a RAW client's datagrams, which are addressed to the remote).
    fn relays_in_kernel(&self) -> bool {
        false
    }
    /// Removes the outbound entry of a client socket (association or binding end).
    fn remove_outbound(&self, relay: &KernelRelay) {
        let _ = relay;
    }
    /// The kernel's counters of an inbound entry, if it relays it.
    fn inbound_counters(&self, entry: GateEntry) -> Option<EntryCounters> {
        let _ = entry;
        None
    }
    /// Every inbound kernel entry with its value (for `gateway bindings`).
    fn list(&self) -> Vec<(BindingKey, BindingValue)> {
        Vec::new()
    }
    /// The AIDs of the bindings whose kernel-relayed flows carried a datagram, either way,
    /// after `since_ns` (`CLOCK_MONOTONIC`): one pass over the kernel's maps, however many
    /// bindings there are, and no per-binding state in user space.
    fn kernel_active_since(&self, since_ns: u64) -> Vec<u32> {
        let _ = since_ns;
        Vec::new()
    }
    /// Writes a received group's kernel entry (created or replaced) and its source list (empty:
    /// any source). The kernel's counters of the group and of subscribers that stay (same AID)
    /// are kept. `group` is the group address and port.
    fn set_group(
        &self,
        group: SocketAddr,
        value: &GroupValue,
        sources: &[IpAddr],
    ) -> Result<(), GateError> {
        let _ = (group, value, sources);
        Ok(())
    }
    /// Removes a group's kernel entry and its source list: the gate drops its datagrams again.
    fn remove_group(&self, group: SocketAddr) {
        let _ = group;
    }
    /// The kernel's entry of a group, with its counters.
    fn group(&self, group: SocketAddr) -> Option<Box<GroupValue>> {
        let _ = group;
        None
    }
    /// Stops admitting for good: removes every entry and refuses every later install (a
    /// stopping daemon's connections may still be confirming). Returns how many entries went.
    /// The operator's host flows stay; new ones are refused.
    fn close(&self) -> usize;
    /// Admits one exact host flow (the gateway's own resolver query) until
    /// [`Gate::remove_host_flow`].
    fn allow_host_flow(&self, flow: HostFlow) -> Result<(), GateError>;
    fn remove_host_flow(&self, flow: HostFlow);
}

/// The real gate: the pinned `BINDINGS` and `OUTBOUND` maps of the attached datapath.
pub struct KernelGate {
    map: Mutex<HashMap<MapData, BindingKey, BindingValue>>,
    outbound: Mutex<HashMap<MapData, OutboundKey, OutboundValue>>,
    raw_clients: Mutex<RawClients>,
    host_allow: Mutex<HashMap<MapData, HostAllowKey, HostAllowValue>>,
    groups: Mutex<Groups>,
    /// Whether confirmed bindings are relayed by the kernel (`--datapath xdp`) or by user space.
    kernel_relay: bool,
    /// Set by [`Gate::close`] while holding the map locks, so no install slips in after it.
    closed: AtomicBool,
}

impl std::fmt::Debug for KernelGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelGate")
    }
}

/// The `RAW_CLIENTS` map with how many RAW flows each client socket has: the entry exists while
/// at least one does.
struct RawClients {
    map: HashMap<MapData, ClientSocketKey, RawClientValue>,
    flows: StdHashMap<SocketAddr, usize>,
}

impl RawClients {
    fn key(client: SocketAddr) -> ClientSocketKey {
        ClientSocketKey {
            addr: addr16(client.ip()),
            port_be: client.port().to_be(),
            padding: 0,
        }
    }

    fn add(&mut self, relay: &KernelRelay) -> Result<(), MapError> {
        let flows = self.flows.entry(relay.client).or_insert(0);
        if *flows == 0 {
            let value = RawClientValue {
                internal_relay_addr: addr16(relay.internal_relay.ip()),
            };
            self.map.insert(Self::key(relay.client), value, 0)?;
        }
        *flows += 1;
        Ok(())
    }

    fn remove(&mut self, client: SocketAddr) {
        let Some(flows) = self.flows.get_mut(&client) else {
            return;
        };
        *flows -= 1;
        if *flows == 0 {
            self.flows.remove(&client);
            let _ = self.map.remove(&Self::key(client));
        }
    }

    fn clear(&mut self) {
        for client in std::mem::take(&mut self.flows).into_keys() {
            let _ = self.map.remove(&Self::key(client));
        }
    }
}

/// The `GROUPS` and `GROUP_SOURCES` maps: a group's entry and its allowed sources.
pub struct GroupMaps {
    pub groups: HashMap<MapData, GroupKey, GroupValue>,
    pub sources: HashMap<MapData, GroupSourceKey, u32>,
}

/// The group maps, behind one lock.
struct Groups {
    maps: GroupMaps,
}

fn group_key(group: SocketAddr) -> GroupKey {
    GroupKey {
        group: addr16(group.ip()),
        port_be: group.port().to_be(),
        padding: 0,
    }
}

/// `value` with the kernel's counters of `old` carried over: the group's, and each subscriber's
/// whose AID was there before. The source-list flag follows `has_sources`.
fn merged_group(
    value: &GroupValue,
    old: Option<&GroupValue>,
    has_sources: bool,
) -> Box<GroupValue> {
    let mut new = Box::new(*value);
    new.flags &= !group_flags::SOURCE_LIST;
    if has_sources {
        new.flags |= group_flags::SOURCE_LIST;
    }
    let Some(old) = old else {
        return new;
    };
    new.received = old.received;
    new.inside_sent = old.inside_sent;
    let old_in_use = old
        .subscribers
        .get(..old.kernel_subscribers as usize)
        .unwrap_or(&old.subscribers);
    let in_use = (new.kernel_subscribers as usize).min(MAX_KERNEL_SUBSCRIBERS);
    for subscriber in &mut new.subscribers[..in_use] {
        if let Some(staying) = old_in_use.iter().find(|o| o.aid_be == subscriber.aid_be) {
            subscriber.counters = staying.counters;
        }
    }
    new
}

impl Groups {
    /// The source keys of one group now in the kernel.
    fn sources_of(&self, key: &GroupKey) -> Vec<GroupSourceKey> {
        self.maps
            .sources
            .keys()
            .filter_map(Result::ok)
            .filter(|source| source.group == key.group && source.port_be == key.port_be)
            .collect()
    }

    fn set(
        &mut self,
        key: GroupKey,
        value: &GroupValue,
        sources: &[IpAddr],
    ) -> Result<(), MapError> {
        let old_sources = self.sources_of(&key);
        let new_sources: Vec<GroupSourceKey> = sources
            .iter()
            .map(|source| GroupSourceKey {
                group: key.group,
                source: addr16(*source),
                port_be: key.port_be,
                padding: 0,
            })
            .collect();
        // New sources first, then the entry, then the sources that left: a moment of both
        // lists, never one of neither with the flag set.
        for source in &new_sources {
            self.maps.sources.insert(source, 0, 0)?;
        }
        let old = self.maps.groups.get(&key, 0).ok();
        let merged = merged_group(value, old.as_ref(), !new_sources.is_empty());
        self.maps.groups.insert(key, merged.as_ref(), 0)?;
        for source in old_sources.iter().filter(|s| !new_sources.contains(s)) {
            let _ = self.maps.sources.remove(source);
        }
        Ok(())
    }

    fn remove(&mut self, key: &GroupKey) -> bool {
        let removed = self.maps.groups.remove(key).is_ok();
        for source in self.sources_of(key) {
            let _ = self.maps.sources.remove(&source);
        }
        removed
    }

    fn clear(&mut self) -> usize {
        let keys: Vec<GroupKey> = self.maps.groups.keys().filter_map(Result::ok).collect();
        let removed = keys.iter().filter(|key| self.remove(key)).count();
        let stray: Vec<GroupSourceKey> = self.maps.sources.keys().filter_map(Result::ok).collect();
        for source in &stray {
            let _ = self.maps.sources.remove(source);
        }
        removed
    }
}

impl KernelGate {
    pub fn new(
        map: HashMap<MapData, BindingKey, BindingValue>,
        outbound: HashMap<MapData, OutboundKey, OutboundValue>,
        raw_clients: HashMap<MapData, ClientSocketKey, RawClientValue>,
        host_allow: HashMap<MapData, HostAllowKey, HostAllowValue>,
        groups: GroupMaps,
    ) -> Self {
        // RAW flows a previous daemon handed over are in the outbound map already: the count
        // per client socket starts from them (a fresh start has none).
        let mut flows = StdHashMap::new();
        for (key, value) in outbound.iter().filter_map(Result::ok) {
            if value.framing == framing::RAW {
                let client = SocketAddr::new(
                    std::net::Ipv6Addr::from(key.client_addr).to_canonical(),
                    u16::from_be(key.client_port_be),
                );
                *flows.entry(client).or_insert(0) += 1;
            }
        }
        Self {
            map: Mutex::new(map),
            outbound: Mutex::new(outbound),
            raw_clients: Mutex::new(RawClients {
                map: raw_clients,
                flows,
            }),
            host_allow: Mutex::new(host_allow),
            groups: Mutex::new(Groups { maps: groups }),
            kernel_relay: true,
            closed: AtomicBool::new(false),
        }
    }

    /// Keeps every datagram in the userspace relay (the XDP gate still drops the rest).
    #[must_use]
    pub fn userspace_only(mut self) -> Self {
        self.kernel_relay = false;
        self
    }
}

impl KernelGate {
    fn refuse_if_closed(&self, entry: GateEntry) -> Result<(), GateError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(GateError::Closed {
                remote: entry.remote,
                relay: entry.relay,
            });
        }
        Ok(())
    }
}

impl Gate for KernelGate {
    fn install(&self, entry: GateEntry) -> Result<(), GateError> {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        self.refuse_if_closed(entry)?;
        map.insert(entry.key(), BindingValue::default(), 0)
            .map_err(|source| GateError::Install {
                remote: entry.remote,
                relay: entry.relay,
                source: Box::new(source),
            })
    }

    fn install_kernel_relay(&self, entry: GateEntry, relay: KernelRelay) -> Result<(), GateError> {
        if !self.kernel_relay || !relay.same_family(&entry) {
            return self.install(entry);
        }
        let map_error = |source| GateError::Install {
            remote: entry.remote,
            relay: entry.relay,
            source: Box::new(source),
        };
        // Outbound first: when the first answer arrives, the client can already send back.
        // Both locks are held, in the order `close` takes them, so a close cannot interleave.
        let mut inbound_map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        let mut outbound_map = self.outbound.lock().unwrap_or_else(PoisonError::into_inner);
        self.refuse_if_closed(entry)?;
        let outbound = OutboundValue {
            remote_addr: addr16(entry.remote.ip()),
            external_relay_addr: addr16(entry.relay.ip()),
            remote_port_be: entry.remote.port().to_be(),
            external_relay_port_be: entry.relay.port().to_be(),
            aid_be: relay.aid.to_be(),
            framing: relay.framing_code(),
            padding: 0,
            counters: EntryCounters::default(),
        };
        outbound_map
            .insert(relay.outbound_key(), outbound, 0)
            .map_err(map_error)?;
        if relay.is_raw() {
            let added = self
                .raw_clients
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .add(&relay);
            if let Err(error) = added {
                let _ = outbound_map.remove(&relay.outbound_key());
                return Err(map_error(error));
            }
        }
        let inbound = BindingValue {
            client_addr: addr16(relay.client.ip()),
            internal_relay_addr: addr16(relay.internal_relay.ip()),
            client_port_be: relay.client.port().to_be(),
            internal_relay_port_be: relay.internal_relay.port().to_be(),
            aid_be: relay.aid.to_be(),
            mode: relay_mode::KERNEL,
            framing: relay.framing_code(),
            counters: EntryCounters::default(),
        };
        inbound_map
            .insert(entry.key(), inbound, 0)
            .map_err(map_error)
    }

    fn remove(&self, entry: GateEntry) {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = map.remove(&entry.key());
    }

    fn relays_in_kernel(&self) -> bool {
        self.kernel_relay
    }

    fn remove_outbound(&self, relay: &KernelRelay) {
        let mut map = self.outbound.lock().unwrap_or_else(PoisonError::into_inner);
        if map.remove(&relay.outbound_key()).is_ok() && relay.is_raw() {
            self.raw_clients
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(relay.client);
        }
    }

    fn inbound_counters(&self, entry: GateEntry) -> Option<EntryCounters> {
        let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(&entry.key(), 0).ok().map(|value| value.counters)
    }

    fn list(&self) -> Vec<(BindingKey, BindingValue)> {
        let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        map.iter().filter_map(Result::ok).collect()
    }

    fn kernel_active_since(&self, since_ns: u64) -> Vec<u32> {
        let mut active = Vec::new();
        {
            let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
            active.extend(
                map.iter()
                    .filter_map(Result::ok)
                    .filter(|(_, value)| {
                        value.mode == gateway_common::relay_mode::KERNEL
                            && value.counters.last_seen_ns > since_ns
                    })
                    .map(|(_, value)| u32::from_be(value.aid_be)),
            );
        }
        let outbound = self.outbound.lock().unwrap_or_else(PoisonError::into_inner);
        active.extend(
            outbound
                .iter()
                .filter_map(Result::ok)
                .filter(|(_, value)| value.counters.last_seen_ns > since_ns)
                .map(|(_, value)| u32::from_be(value.aid_be)),
        );
        active.sort_unstable();
        active.dedup();
        active
    }

    fn set_group(
        &self,
        group: SocketAddr,
        value: &GroupValue,
        sources: &[IpAddr],
    ) -> Result<(), GateError> {
        let mut groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
        if self.closed.load(Ordering::Acquire) {
            return Err(GateError::GroupClosed { group });
        }
        groups
            .set(group_key(group), value, sources)
            .map_err(|source| GateError::Group {
                group,
                source: Box::new(source),
            })
    }

    fn remove_group(&self, group: SocketAddr) {
        let mut groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
        groups.remove(&group_key(group));
    }

    fn group(&self, group: SocketAddr) -> Option<Box<GroupValue>> {
        let groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
        groups
            .maps
            .groups
            .get(&group_key(group), 0)
            .ok()
            .map(Box::new)
    }

    fn close(&self) -> usize {
        let mut inbound = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        let mut outbound = self.outbound.lock().unwrap_or_else(PoisonError::into_inner);
        let mut groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
        self.closed.store(true, Ordering::Release);
        let groups_removed = groups.clear();
        let keys: Vec<BindingKey> = inbound.keys().filter_map(Result::ok).collect();
        for key in &keys {
            let _ = inbound.remove(key);
        }
        let out_keys: Vec<OutboundKey> = outbound.keys().filter_map(Result::ok).collect();
        for key in &out_keys {
            let _ = outbound.remove(key);
        }
        self.raw_clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        keys.len() + out_keys.len() + groups_removed
    }

    fn allow_host_flow(&self, flow: HostFlow) -> Result<(), GateError> {
        let mut allow = self
            .host_allow
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.refuse_if_closed(GateEntry {
            remote: flow.remote,
            relay: flow.local,
        })?;
        allow
            .insert(flow.key(), HostAllowValue::default(), 0)
            .map_err(|source| GateError::HostFlow {
                remote: flow.remote,
                local: flow.local,
                source: Box::new(source),
            })
    }

    fn remove_host_flow(&self, flow: HostFlow) {
        let mut allow = self
            .host_allow
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let _ = allow.remove(&flow.key());
    }
}

/// An in-memory gate for tests and for running without eBPF: records what is admitted.
#[derive(Debug, Default, Clone)]
pub struct MemoryGate {
    entries: Arc<Mutex<HashSet<GateEntry>>>,
    kernel_relays: Arc<Mutex<HashSet<KernelRelay>>>,
    host_flows: Arc<Mutex<HashSet<HostFlow>>>,
    closed: Arc<AtomicBool>,
}

impl MemoryGate {
    pub fn entries(&self) -> HashSet<GateEntry> {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Client sockets that have an outbound kernel entry.
    pub fn kernel_relays(&self) -> HashSet<KernelRelay> {
        self.kernel_relays
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Host flows admitted now (the resolver's outstanding queries).
    pub fn host_flows(&self) -> HashSet<HostFlow> {
        self.host_flows
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
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if self.closed.load(Ordering::Acquire) {
            return Err(GateError::Closed {
                remote: entry.remote,
                relay: entry.relay,
            });
        }
        entries.insert(entry);
        Ok(())
    }

    fn install_kernel_relay(&self, entry: GateEntry, relay: KernelRelay) -> Result<(), GateError> {
        self.kernel_relays
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(relay);
        self.install(entry)
    }

    fn remove(&self, entry: GateEntry) {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&entry);
    }

    fn relays_in_kernel(&self) -> bool {
        true
    }

    fn remove_outbound(&self, relay: &KernelRelay) {
        self.kernel_relays
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(relay);
    }

    fn close(&self) -> usize {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        self.closed.store(true, Ordering::Release);
        let removed = entries.len();
        entries.clear();
        self.kernel_relays
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        removed
    }

    fn allow_host_flow(&self, flow: HostFlow) -> Result<(), GateError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(GateError::Closed {
                remote: flow.remote,
                relay: flow.local,
            });
        }
        self.host_flows
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(flow);
        Ok(())
    }

    fn remove_host_flow(&self, flow: HostFlow) {
        self.host_flows
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&flow);
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

    #[test]
    fn a_closed_gate_is_empty_and_admits_nothing_more() {
        let gate = MemoryGate::default();
        let entry = GateEntry {
            remote: "203.0.113.2:6000".parse().unwrap(),
            relay: "203.0.113.1:30000".parse().unwrap(),
        };
        gate.install(entry).unwrap();
        assert_eq!(gate.close(), 1);
        assert!(gate.entries().is_empty());
        assert!(matches!(gate.install(entry), Err(GateError::Closed { .. })));
        assert!(gate.entries().is_empty());
    }
}
