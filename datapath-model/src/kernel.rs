//! The programs themselves, run by the kernel (`BPF_PROG_TEST_RUN`) on the model's frames with
//! the model's map contents, and compared with the model: return value, frame as left, and the
//! exit counters (the ones the model names on every frame, all of them every [`FULL_CHECK_EVERY`]
//! frames and at the end). Root only.

use std::fmt::{self, Write as _};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use gateway_common::{
    Addr16, BindingKey, BindingValue, ClientSocketKey, ControlPortKey, Counter, DatapathSettings,
    ExitReason, GroupKey, GroupSourceKey, GroupValue, HostAllowKey, HostAllowValue, OutboundKey,
    OutboundValue, RawClientValue, TC_GATE_PROGRAM, TC_INBOUND_PROGRAM, TC_INTERNAL_PROGRAM,
    XDP_EXTERNAL_PROGRAM, group_flags, map_names, relay_mode,
};

use crate::{
    spec::{self, Outcome, Program},
    world::World,
};

/// How often every exit counter is compared (a counted reason the model does not name shows up
/// there).
pub const FULL_CHECK_EVERY: u64 = 256;

impl Program {
    fn name(self) -> &'static str {
        match self {
            Self::XdpGate => XDP_EXTERNAL_PROGRAM,
            Self::TcGate => TC_GATE_PROGRAM,
            Self::TcInbound => TC_INBOUND_PROGRAM,
            Self::TcInternal => TC_INTERNAL_PROGRAM,
        }
    }
}

/// A frame on which the programs and the model disagree.
#[derive(Debug)]
pub struct Disagreement {
    pub program: Program,
    pub frame: Vec<u8>,
    pub model: Outcome,
    pub kernel: Option<Outcome>,
    pub what: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut text, b| {
        let _ = write!(text, "{b:02x}");
        text
    })
}

impl fmt::Display for Disagreement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:?} disagrees with the model: {}",
            self.program, self.what
        )?;
        writeln!(
            f,
            "  frame ({} octets): {}",
            self.frame.len(),
            hex(&self.frame)
        )?;
        writeln!(
            f,
            "  model:  action {} counted {:?}\n          frame {}",
            self.model.action,
            self.model.counted,
            hex(&self.model.frame)
        )?;
        if let Some(kernel) = &self.kernel {
            writeln!(
                f,
                "  kernel: action {} counted {:?}\n          frame {}",
                kernel.action,
                kernel.counted,
                hex(&kernel.frame)
            )?;
        }
        Ok(())
    }
}

/// What a run compared.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Frames run through all four programs and compared.
    pub frames: u64,
    /// Frames the model has a program rewrite (and the rewritten bytes compared).
    pub rewritten: u64,
    /// Frames the kernel refused to test-run in tc (see [`tc_test_run_takes`]).
    pub refused: u64,
    /// Frames counted per exit reason, over all programs.
    pub per_reason: [u64; ExitReason::COUNT as usize],
}

/// The four programs, each loaded from its own copy of the object (its own maps and counters).
pub struct Kernel {
    loaded: Vec<(Program, Ebpf)>,
    /// What the model says every counter of each program must hold.
    expected: Vec<[Counter; ExitReason::COUNT as usize]>,
    pub tally: Tally,
}

fn insert<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &str,
    key: K,
    value: V,
) -> Result<(), String> {
    let mut map: HashMap<&mut MapData, K, V> =
        HashMap::try_from(ebpf.map_mut(name).ok_or_else(|| format!("no map {name}"))?)
            .map_err(|e| format!("map {name}: {e}"))?;
    map.insert(key, value, 0)
        .map_err(|e| format!("insert into {name}: {e}"))
}

fn install(ebpf: &mut Ebpf, world: &World) -> Result<(), String> {
    for b in &world.bindings {
        let key = BindingKey {
            remote_addr: b.remote.addr,
            relay_addr: b.relay.addr,
            remote_port_be: b.remote.port.to_be(),
            relay_port_be: b.relay.port.to_be(),
        };
        let value = BindingValue {
            client_addr: b.client.addr,
            internal_relay_addr: b.internal_relay.addr,
            client_port_be: b.client.port.to_be(),
            internal_relay_port_be: b.internal_relay.port.to_be(),
            aid_be: b.aid.to_be(),
            mode: if b.kernel {
                relay_mode::KERNEL
            } else {
                relay_mode::USERSPACE
            },
            framing: b.framing,
            ..BindingValue::default()
        };
        insert(ebpf, map_names::BINDINGS, key, value)?;
    }
    for o in &world.outbound {
        let key = OutboundKey {
            client_addr: o.client.addr,
            relay_addr: o.to.addr,
            client_port_be: o.client.port.to_be(),
            relay_port_be: o.to.port.to_be(),
        };
        let value = OutboundValue {
            remote_addr: o.remote.addr,
            external_relay_addr: o.external_relay.addr,
            remote_port_be: o.remote.port.to_be(),
            external_relay_port_be: o.external_relay.port.to_be(),
            aid_be: o.aid.to_be(),
            framing: o.framing,
            ..OutboundValue::default()
        };
        insert(ebpf, map_names::OUTBOUND, key, value)?;
    }
    for (remote, local) in &world.host_allow {
        let key = HostAllowKey {
            remote_addr: remote.addr,
            local_addr: local.addr,
            remote_port_be: remote.port.to_be(),
            local_port_be: local.port.to_be(),
        };
        insert(ebpf, map_names::HOST_ALLOW, key, HostAllowValue::default())?;
    }
    for at in &world.control_ports {
        let key = ControlPortKey {
            addr: at.addr,
            port_be: at.port.to_be(),
            padding: 0,
        };
        insert(ebpf, map_names::CONTROL_PORTS, key, 0u32)?;
    }
    for addr in &world.external_addrs {
        insert::<Addr16, u32>(ebpf, map_names::EXTERNAL_ADDRS, *addr, 0)?;
    }
    for (socket, relay) in &world.raw_clients {
        let key = ClientSocketKey {
            addr: socket.addr,
            port_be: socket.port.to_be(),
            padding: 0,
        };
        let value = RawClientValue {
            internal_relay_addr: *relay,
        };
        insert(ebpf, map_names::RAW_CLIENTS, key, value)?;
    }
    install_groups(ebpf, world)?;
    install_settings(ebpf, world)
}

fn install_groups(ebpf: &mut Ebpf, world: &World) -> Result<(), String> {
    for g in &world.groups {
        let key = GroupKey {
            group: g.group.addr,
            port_be: g.group.port.to_be(),
            padding: 0,
        };
        let flags = if g.sources.is_some() {
            group_flags::SOURCE_LIST
        } else {
            0
        };
        let value = GroupValue {
            flags,
            ..GroupValue::default()
        };
        insert(ebpf, map_names::GROUPS, key, value)?;
        for source in g.sources.iter().flatten() {
            let key = GroupSourceKey {
                group: g.group.addr,
                source: *source,
                port_be: g.group.port.to_be(),
                padding: 0,
            };
            insert(ebpf, map_names::GROUP_SOURCES, key, 0u32)?;
        }
    }
    Ok(())
}

fn install_settings(ebpf: &mut Ebpf, world: &World) -> Result<(), String> {
    let mut settings: Array<&mut MapData, DatapathSettings> =
        Array::try_from(ebpf.map_mut(map_names::SETTINGS).ok_or("no SETTINGS map")?)
            .map_err(|e| e.to_string())?;
    // Loopback (ifindex 1) both ways: its MTU fits every frame; a test run does not redirect.
    let value = DatapathSettings {
        internal_ifindex: 1,
        external_ifindex: 1,
        fail_closed_after_ns: u64::MAX,
    };
    settings.set(0, value, 0).map_err(|e| e.to_string())?;
    set_heartbeat(ebpf, world.daemon_alive)
}

/// A heartbeat of 1 ns after boot never goes stale with an unbounded fail-closed delay; 0 is a
/// daemon that never beat.
fn set_heartbeat(ebpf: &mut Ebpf, alive: bool) -> Result<(), String> {
    let mut heartbeat: Array<&mut MapData, u64> = Array::try_from(
        ebpf.map_mut(map_names::HEARTBEAT)
            .ok_or("no HEARTBEAT map")?,
    )
    .map_err(|e| e.to_string())?;
    heartbeat
        .set(0, u64::from(alive), 0)
        .map_err(|e| e.to_string())
}

/// Whether the kernel's test run takes `frame` for a tc program: it builds an skb and refuses
/// one whose ether type announces an IP header the frame does not hold (real ingress never
/// hands tc such a frame cut inside a VLAN tag; a cut IP header meets the same parser in XDP).
pub fn tc_test_run_takes(frame: &[u8]) -> bool {
    let ether_type = u16::from_be_bytes([frame[12], frame[13]]);
    match ether_type {
        0x0800 => frame.len() >= 14 + 20,
        0x86dd => frame.len() >= 14 + 40,
        _ => true,
    }
}

impl Kernel {
    /// Loads each program from `object` and installs `world` into its maps.
    pub fn load(object: &[u8], world: &World) -> Result<Self, String> {
        if object.is_empty() {
            return Err("the eBPF object is empty (built with AYA_BUILD_SKIP=1?)".into());
        }
        let mut loaded = Vec::new();
        for program in Program::ALL {
            let mut ebpf = EbpfLoader::new()
                .load(object)
                .map_err(|e| format!("load the eBPF object: {e}"))?;
            let name = program.name();
            let prog = ebpf
                .program_mut(name)
                .ok_or_else(|| format!("no program {name}"))?;
            let loaded_ok = if program == Program::XdpGate {
                <&mut Xdp>::try_from(prog)
                    .map_err(|e| e.to_string())?
                    .load()
            } else {
                <&mut SchedClassifier>::try_from(prog)
                    .map_err(|e| e.to_string())?
                    .load()
            };
            loaded_ok.map_err(|e| format!("the verifier refuses {name}: {e:?}"))?;
            install(&mut ebpf, world)?;
            loaded.push((program, ebpf));
        }
        let mut kernel = Self {
            expected: vec![[Counter::default(); ExitReason::COUNT as usize]; loaded.len()],
            loaded,
            tally: Tally::default(),
        };
        kernel.expected = (0..kernel.loaded.len())
            .map(|i| kernel.all_counters(i))
            .collect::<Result<_, _>>()?;
        Ok(kernel)
    }

    /// Makes the daemon's heartbeat fresh or stale in every program's maps.
    pub fn set_daemon_alive(&mut self, alive: bool) -> Result<(), String> {
        for (_, ebpf) in &mut self.loaded {
            set_heartbeat(ebpf, alive)?;
        }
        Ok(())
    }

    fn counter(&self, index: usize, reason: ExitReason) -> Result<Counter, String> {
        let ebpf = &self.loaded[index].1;
        let map = ebpf
            .map(map_names::EXIT_COUNTERS)
            .ok_or("no EXIT_COUNTERS map")?;
        let counters: PerCpuArray<&MapData, Counter> =
            PerCpuArray::try_from(map).map_err(|e| e.to_string())?;
        let per_cpu = counters
            .get(&(reason as u32), 0)
            .map_err(|e| e.to_string())?;
        Ok(per_cpu.iter().fold(Counter::default(), |sum, c| Counter {
            packets: sum.packets + c.packets,
            bytes: sum.bytes + c.bytes,
        }))
    }

    fn all_counters(&self, index: usize) -> Result<[Counter; ExitReason::COUNT as usize], String> {
        let mut all = [Counter::default(); ExitReason::COUNT as usize];
        for reason in ExitReason::ALL {
            all[reason as usize] = self.counter(index, reason)?;
        }
        Ok(all)
    }

    fn test_run(&self, index: usize, frame: &[u8]) -> Result<(u32, Vec<u8>), String> {
        let (program, ebpf) = &self.loaded[index];
        let mut out = vec![0u8; frame.len() + 64];
        let options = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        };
        let prog = ebpf.program(program.name()).ok_or("program gone")?;
        let result = if *program == Program::XdpGate {
            <&Xdp>::try_from(prog)
                .map_err(|e| e.to_string())?
                .test_run(options)
        } else {
            <&SchedClassifier>::try_from(prog)
                .map_err(|e| e.to_string())?
                .test_run(options)
        }
        .map_err(|e| e.to_string())?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out))
    }

    /// Runs `frame` through every program and compares each with the model.
    pub fn check(&mut self, world: &World, frame: &[u8]) -> Result<(), Box<Disagreement>> {
        let mut rewritten = false;
        for index in 0..self.loaded.len() {
            let program = self.loaded[index].0;
            let model = spec::run(program, world, frame);
            let disagree = |what: String, kernel: Option<Outcome>| {
                Box::new(Disagreement {
                    program,
                    frame: frame.to_vec(),
                    model: model.clone(),
                    kernel,
                    what,
                })
            };
            if program != Program::XdpGate && !tc_test_run_takes(frame) {
                // Refused frames are tried anyway: the kernel must refuse them, not run them.
                match self.test_run(index, frame) {
                    Err(_) => {
                        self.tally.refused += 1;
                        continue;
                    }
                    Ok(_) => {
                        return Err(disagree(
                            "the test run took a frame it refuses".into(),
                            None,
                        ));
                    }
                }
            }
            let (action, out) = self
                .test_run(index, frame)
                .map_err(|e| disagree(format!("test run failed: {e}"), None))?;
            let len = u64::try_from(frame.len()).unwrap_or(u64::MAX);
            let before = self.expected[index];
            for &reason in &model.counted {
                let slot = &mut self.expected[index][reason as usize];
                slot.packets += 1;
                slot.bytes += len;
                self.tally.per_reason[reason as usize] += 1;
            }
            let mut counted = model.counted.clone();
            for &reason in &model.counted {
                let now = self
                    .counter(index, reason)
                    .map_err(|e| disagree(format!("read counters: {e}"), None))?;
                let expected = self.expected[index][reason as usize];
                if now != expected {
                    // What the program counted instead: every counter against before the frame.
                    let all = self
                        .all_counters(index)
                        .map_err(|e| disagree(format!("read counters: {e}"), None))?;
                    counted = ExitReason::ALL
                        .into_iter()
                        .filter(|r| all[*r as usize] != before[*r as usize])
                        .collect();
                    let kernel = Outcome {
                        action,
                        counted,
                        frame: out,
                    };
                    return Err(disagree(
                        format!("{reason:?} counted {now:?}, the model says {expected:?}"),
                        Some(kernel),
                    ));
                }
            }
            counted.dedup();
            let kernel = Outcome {
                action,
                counted,
                frame: out,
            };
            if kernel.action != model.action {
                return Err(disagree("verdict".into(), Some(kernel)));
            }
            if kernel.frame != model.frame {
                return Err(disagree("frame as left".into(), Some(kernel)));
            }
            rewritten |= model.frame != frame;
        }
        self.tally.frames += 1;
        self.tally.rewritten += u64::from(rewritten);
        if self.tally.frames.is_multiple_of(FULL_CHECK_EVERY) {
            self.check_all_counters().map_err(|what| {
                Box::new(Disagreement {
                    program: Program::XdpGate,
                    frame: frame.to_vec(),
                    model: spec::run(Program::XdpGate, world, frame),
                    kernel: None,
                    what: format!("in the last {FULL_CHECK_EVERY} frames: {what}"),
                })
            })?;
        }
        Ok(())
    }

    /// Compares every counter of every program with what the model says they hold.
    pub fn check_all_counters(&self) -> Result<(), String> {
        for index in 0..self.loaded.len() {
            let now = self.all_counters(index)?;
            for reason in ExitReason::ALL {
                let (now, expected) = (now[reason as usize], self.expected[index][reason as usize]);
                if now != expected {
                    return Err(format!(
                        "{:?} counted {reason:?} {now:?}, the model says {expected:?}",
                        self.loaded[index].0
                    ));
                }
            }
        }
        Ok(())
    }
}
