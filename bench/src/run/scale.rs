//! Area 4, scale: the in-kernel relay's packets per second (200-octet payloads, flat out) with 1,
//! 10,000 and 1,000,000 entries in the BINDINGS map. One real two-step binding carries the
//! stream; the other entries are dummies written straight into the pinned map (keys from
//! 192.0.2.0/24, which nothing sends from), inserted and removed by the bench.

use std::{net::Ipv4Addr, path::Path, time::Instant};

use anyhow::{Context as _, Result};
use aya::maps::{HashMap, Map, MapData};
use bench::model::Results;
use gateway_common::{BindingKey, BindingValue, framing, ipv4_mapped, map_names, relay_mode};
use testbed::addr;

use super::{
    arms::{Arm, ArmGuard, ClientPath, SOURCE},
    env::Env,
    stream::{StreamSpec, run_stream},
};

type Bindings = HashMap<MapData, BindingKey, BindingValue>;

/// The dummy entry number `i`: remote 192.0.2.(i % 256):(1024 + i / 256), relay fw's outside
/// address on port 30000 + i % 10000.
pub fn dummy_key(i: u64) -> BindingKey {
    let host = u8::try_from(i % 256).unwrap_or(0);
    let port = u16::try_from(1024 + i / 256).unwrap_or(u16::MAX);
    let relay_port = u16::try_from(30_000 + i % 10_000).unwrap_or(30_000);
    BindingKey {
        remote_addr: ipv4_mapped(Ipv4Addr::new(192, 0, 2, host).octets()),
        relay_addr: ipv4_mapped(addr::FW_OUTSIDE_V4.octets()),
        remote_port_be: port.to_be(),
        relay_port_be: relay_port.to_be(),
    }
}

fn dummy_value(i: u64) -> BindingValue {
    BindingValue {
        client_addr: ipv4_mapped(addr::CLIENT_V4.octets()),
        internal_relay_addr: ipv4_mapped(addr::FW_INSIDE_V4.octets()),
        client_port_be: 9u16.to_be(),
        internal_relay_port_be: 40_000u16.to_be(),
        aid_be: u32::try_from(i & 0xffff_ffff).unwrap_or(0).to_be(),
        mode: relay_mode::KERNEL,
        framing: framing::ENHANCED,
        counters: gateway_common::EntryCounters::default(),
    }
}

fn open_bindings(pin_dir: &Path) -> Result<Bindings> {
    let path = pin_dir.join(map_names::BINDINGS);
    let map = Map::from_map_data(
        MapData::from_pin(&path).with_context(|| format!("open {}", path.display()))?,
    )?;
    Ok(HashMap::try_from(map)?)
}

/// Grows or shrinks the dummy entries from `have` to `want`.
fn set_dummies(map: &mut Bindings, have: &mut u64, want: u64) -> Result<()> {
    while *have < want {
        map.insert(dummy_key(*have), dummy_value(*have), 0)
            .with_context(|| format!("insert dummy entry {have}"))?;
        *have += 1;
    }
    while *have > want {
        *have -= 1;
        map.remove(&dummy_key(*have))
            .with_context(|| format!("remove dummy entry {have}"))?;
    }
    Ok(())
}

pub fn run(env: &Env, results: &mut Results) {
    if let Err(error) = scale(env, results) {
        let text = format!("scale: {error:#}");
        env.progress(&format!("FAILED {text}"));
        results.errors.push(text);
    }
}

fn scale(env: &Env, results: &mut Results) -> Result<()> {
    let largest = env.plan.scale_entries.iter().copied().max().unwrap_or(1);
    let max = (largest + 65_536).to_string();
    let guard = ArmGuard::start(env, Arm::Kernel, &["--max-bindings", &max])?;
    let pin_dir = guard.cleanup.as_ref().context("pins")?.pin_dir();
    let path = ClientPath::open(env, Arm::Kernel)?;
    let mut map = open_bindings(&pin_dir)?;
    let mut have = 0u64;
    let outcome = (|| -> Result<()> {
        for run in 0..env.plan.runs {
            // Ascending, then descending: the order alternates and each step is one change.
            let mut order = env.plan.scale_entries.clone();
            if run % 2 == 1 {
                order.reverse();
            }
            for entries in order {
                let started = Instant::now();
                // The real binding is one entry.
                set_dummies(&mut map, &mut have, entries.saturating_sub(1))?;
                let changed = started.elapsed();
                let spec = StreamSpec {
                    sender_ns: &env.bed.server,
                    sender_bind: SOURCE,
                    to: path.inbound_to(),
                    size: 200,
                    rate: 0,
                    stamps: false,
                    receiver_ns: &env.bed.client,
                    sink: Some(path.sink_socket()),
                    sink_ts_offset: None,
                    kick: None,
                };
                let (stream, _) = run_stream(env, &spec)?;
                env.progress(&format!(
                    "scale run {}/{} {entries:>8} entries (set in {:.1} s): {:>8.0} pps delivered, \
                     loss {:.2} %, {:.0} ns CPU/pkt",
                    run + 1,
                    env.plan.runs,
                    changed.as_secs_f64(),
                    stream.delivered_pps,
                    stream.loss * 100.0,
                    stream.cpu_ns_per_delivered
                ));
                results.scale.entry(entries).or_default().push(stream);
            }
        }
        Ok(())
    })();
    let cleanup = set_dummies(&mut map, &mut have, 0);
    path.close(env);
    drop(guard);
    outcome.and(cleanup)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dummy_keys_are_distinct_and_in_the_documentation_range() {
        let keys: std::collections::HashSet<_> = (0..1_000_000)
            .map(|i| {
                let key = dummy_key(i);
                assert_eq!(&key.remote_addr[..15], &ipv4_mapped([192, 0, 2, 0])[..15]);
                (key.remote_addr, key.remote_port_be, key.relay_port_be)
            })
            .collect();
        assert_eq!(keys.len(), 1_000_000);
    }
}
