//! Loading, attaching, pinning and detaching the eBPF datapath, and its maps.
//!
//! The XDP gate (external interface) and the tc kernel relay (ingress of both interfaces) are
//! attached as bpf links pinned under the instance's bpffs directory with every map, so a daemon
//! killed with SIGKILL leaves the gate in place (the firewall never fails open; the heartbeat
//! stops, so no binding admits anything) and the next daemon takes the links over by replacing
//! their programs. A stop, a failed start or a crash leaves the gate pinned and dropping; only
//! [`Datapath::detach`] (`gateway detach`, `--remove-gate-on-exit`) and [`remove_pins`] remove it.
//! Owns no protocol logic.

mod driver;
mod heartbeat;
mod kernel_log;
mod links;
pub mod steering;

use std::{
    fs, io,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, ProgramArray},
    programs::{ProgramError, SchedClassifier, Xdp, links::LinkError},
};
use gateway_common::{
    Addr16, BindingKey, BindingValue, ClientSocketKey, ControlPortKey,
    DEFAULT_FAIL_CLOSED_AFTER_NS, DEFAULT_MAX_BINDINGS, DatapathSettings, GroupKey, GroupSourceKey,
    GroupValue, HostAllowKey, HostAllowValue, MAX_KERNEL_SUBSCRIBERS, OutboundKey, OutboundValue,
    RawClientValue, SMALL_FANOUT_SUBSCRIBERS, TC_FANOUT_PROGRAM, TC_FANOUT_SMALL_PROGRAM,
    TC_GATE_PROGRAM, TC_INBOUND_PROGRAM, TC_INTERNAL_PROGRAM, XDP_EXTERNAL_PROGRAM, map_names,
};
use thiserror::Error;
use tracing::{info, warn};

use self::{
    heartbeat::Heartbeat,
    kernel_log::KernelLog,
    links::{LinkSlot, TcAttachment, attach_tc_ingress, attach_xdp, remove_pinned_link},
};
pub use self::{
    heartbeat::monotonic_ns,
    kernel_log::TARGET as KERNEL_LOG_TARGET,
    links::{AttachOutcome, remove_netlink_filters},
};
use crate::{
    attach_mode::{GateHook, TcAttachMode, XdpAttachMode},
    gate::{GroupMaps, KernelGate},
    host_flow::{HostFlow, addr16},
    instance::Instance,
};

/// The compiled eBPF object, built by `build.rs` (empty with `AYA_BUILD_SKIP=1`).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gateway"));

const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const XDP_EXTERNAL_LINK: &str = "xdp_external_link";
const TC_EXTERNAL_LINK: &str = "tc_external_link";
const TC_INTERNAL_LINK: &str = "tc_internal_link";
const LINKS: [&str; 3] = [XDP_EXTERNAL_LINK, TC_EXTERNAL_LINK, TC_INTERNAL_LINK];
const PINNED_MAPS: [&str; 14] = [
    map_names::EXIT_COUNTERS,
    map_names::CONTROL_PORTS,
    map_names::BINDINGS,
    map_names::OUTBOUND,
    map_names::RAW_CLIENTS,
    map_names::HOST_ALLOW,
    map_names::EXTERNAL_ADDRS,
    map_names::SETTINGS,
    map_names::HEARTBEAT,
    map_names::GROUPS,
    map_names::GROUP_SOURCES,
    map_names::MONITOR_SETTINGS,
    map_names::MONITOR_BUDGET,
    map_names::MONITOR_EVENTS,
];

#[derive(Debug, Error)]
pub enum DatapathError {
    #[error(
        "the gateway was built without its eBPF object (AYA_BUILD_SKIP=1); rebuild it after \
         `cargo xtask setup`"
    )]
    EmptyObject,
    #[error("bpffs is not mounted at {BPFFS}; mount it with `mount -t bpf bpf {BPFFS}`")]
    NoBpffs,
    #[error("interface {0:?} does not exist in this network namespace")]
    UnknownInterface(String),
    #[error("load the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("{what}: {source}")]
    Program { what: String, source: ProgramError },
    #[error("{what}: {source}")]
    Link { what: String, source: LinkError },
    #[error("{what}: {source}")]
    Map { what: String, source: MapError },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{0}")]
    Pin(String),
    #[error(
        "the kernel cannot create the {map} map with {entries} entries (--max-bindings); \
         choose a smaller --max-bindings"
    )]
    MapCapacity {
        map: String,
        entries: u32,
        source: io::Error,
    },
}

/// The interface index of `name` in the current network namespace.
pub fn interface_index(name: &str) -> Result<u32, DatapathError> {
    nix::net::if_::if_nametoindex(name)
        .map_err(|_| DatapathError::UnknownInterface(name.to_owned()))
}

fn ensure_bpffs() -> Result<(), DatapathError> {
    // SAFETY: statfs is plain data; zeroes are a valid initial value.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: the path is NUL-terminated and stat is a valid out-pointer.
    let rc = unsafe { libc::statfs(c"/sys/fs/bpf".as_ptr(), &raw mut stat) };
    if rc != 0 || stat.f_type != BPF_FS_MAGIC {
        return Err(DatapathError::NoBpffs);
    }
    Ok(())
}

/// What to attach and where.
#[derive(Debug, Clone)]
pub struct DatapathConfig {
    pub instance: Instance,
    pub external_interface: String,
    pub internal_interface: String,
    pub max_bindings: u32,
    /// Exact (remote, local) UDP flows the host itself needs, admitted by the gate.
    pub host_allow: Vec<HostFlow>,
    /// The gateway's external addresses: inside hosts may not send UDP to them.
    pub external_addresses: Vec<IpAddr>,
    pub fail_closed_after_ns: u64,
    pub gate_hook: GateHook,
    pub xdp_mode: XdpAttachMode,
    pub tc_mode: TcAttachMode,
    /// The SOCKS control listeners: TCP to them from outside is dropped by the gate.
    pub control_listeners: Vec<SocketAddr>,
    /// Take over a running daemon's maps as they are (an upgrade): its bindings stay, and maps
    /// that do not fit this build are an error instead of being made afresh.
    pub adopt: bool,
}

impl DatapathConfig {
    pub fn new(instance: Instance, external_interface: String, internal_interface: String) -> Self {
        Self {
            instance,
            external_interface,
            internal_interface,
            max_bindings: DEFAULT_MAX_BINDINGS,
            host_allow: Vec::new(),
            external_addresses: Vec::new(),
            fail_closed_after_ns: DEFAULT_FAIL_CLOSED_AFTER_NS,
            gate_hook: GateHook::Auto,
            xdp_mode: XdpAttachMode::Auto,
            tc_mode: TcAttachMode::Auto,
            control_listeners: Vec::new(),
            adopt: false,
        }
    }
}

/// The loaded and attached datapath. Keep it alive for the daemon's lifetime.
pub struct Datapath {
    ebpf: Ebpf,
    /// The programs' log until [`Datapath::start_kernel_log`] hands it to its drain.
    kernel_log: Option<KernelLog>,
    links: Vec<(TcAttachment, LinkSlot)>,
    heartbeat: Heartbeat,
    pin_dir: PathBuf,
    outcome: AttachOutcome,
    /// Most subscribers of a group the kernel delivers to (0: no fan-out program loaded).
    fanout_capacity: usize,
}

impl Datapath {
    /// Loads the object (reusing maps pinned by a dead daemon, cleared of its bindings), writes
    /// the settings, starts the heartbeat, then attaches or takes over the three links.
    #[expect(
        clippy::too_many_lines,
        reason = "one start-up sequence, in order, read top to bottom"
    )]
    pub fn attach(config: &DatapathConfig) -> Result<Self, DatapathError> {
        if EBPF_OBJECT.is_empty() {
            return Err(DatapathError::EmptyObject);
        }
        ensure_bpffs()?;
        let external_ifindex = interface_index(&config.external_interface)?;
        let internal_ifindex = interface_index(&config.internal_interface)?;
        let pin_dir = config.instance.pin_dir();
        let run_dir = config.instance.run_dir();
        for dir in [&pin_dir, &run_dir] {
            fs::create_dir_all(dir).map_err(|source| DatapathError::Io {
                what: "create",
                path: dir.clone(),
                source,
            })?;
        }

        let mut ebpf = match load(&pin_dir, config.max_bindings) {
            Ok(ebpf) => ebpf,
            // Made afresh, the maps would drop every binding of the running daemon.
            Err(error) if config.adopt => return Err(error),
            Err(error) if PINNED_MAPS.iter().any(|map| pin_dir.join(map).exists()) => {
                // Maps pinned by an older build may not match this object: start them afresh.
                warn!(%error, "pinned maps do not fit this build; recreating them");
                for map in PINNED_MAPS {
                    let _ = fs::remove_file(pin_dir.join(map));
                }
                load(&pin_dir, config.max_bindings)?
            }
            Err(error) => return Err(error),
        };
        // Bindings belong to control connections; a new daemon has none, unless it takes them
        // over with the connections.
        let stale = if config.adopt {
            0
        } else {
            clear::<BindingKey, BindingValue>(&mut ebpf, map_names::BINDINGS)?
            + clear::<OutboundKey, OutboundValue>(&mut ebpf, map_names::OUTBOUND)?
            + clear::<ClientSocketKey, RawClientValue>(&mut ebpf, map_names::RAW_CLIENTS)?
            // Groups belong to subscribers' control connections too.
            + clear::<GroupKey, GroupValue>(&mut ebpf, map_names::GROUPS)?
            + clear::<GroupSourceKey, u32>(&mut ebpf, map_names::GROUP_SOURCES)?
        };
        if stale > 0 {
            warn!(
                count = stale,
                "removed kernel entries left by a previous daemon"
            );
        }
        let fanout_capacity = load_fanout(&mut ebpf);
        fill_host_allow(&mut ebpf, &config.host_allow)?;
        let external: Vec<(Addr16, u32)> = config
            .external_addresses
            .iter()
            .map(|ip| (addr16(*ip), 0))
            .collect();
        replace_entries(
            &mut ebpf,
            map_names::EXTERNAL_ADDRS,
            &external,
            "external address",
        )?;
        fill_control_ports(&mut ebpf, &config.control_listeners)?;
        let settings = DatapathSettings {
            internal_ifindex,
            external_ifindex,
            fail_closed_after_ns: config.fail_closed_after_ns,
        };
        array_map::<DatapathSettings>(&mut ebpf, map_names::SETTINGS)?
            .set(0, settings, 0)
            .map_err(|source| DatapathError::Map {
                what: "write the datapath settings".to_owned(),
                source,
            })?;
        let heartbeat_map = ebpf
            .take_map(map_names::HEARTBEAT)
            .ok_or_else(|| DatapathError::Pin("map HEARTBEAT missing".to_owned()))
            .and_then(|map| {
                Array::try_from(map).map_err(|source| DatapathError::Map {
                    what: "open HEARTBEAT".to_owned(),
                    source,
                })
            })?;
        let monitor_map = ebpf
            .take_map(map_names::MONITOR_SETTINGS)
            .and_then(|map| Array::try_from(map).ok());
        if monitor_map.is_none() {
            warn!("the monitor's settings map is missing: a watcher that dies is not noticed");
        }
        let heartbeat = Heartbeat::start(heartbeat_map, monitor_map);
        let kernel_log = KernelLog::take(&mut ebpf)
            .inspect_err(
                |error| warn!(%error, "the programs' log cannot be read; their events are lost"),
            )
            .ok();

        let mut links = Vec::new();
        let xdp_slot = LinkSlot::new(
            &pin_dir,
            &run_dir,
            XDP_EXTERNAL_LINK,
            &config.external_interface,
        );
        let external = &config.external_interface;
        let xdp_outcome = match gate_hook_here(config) {
            GateHook::Tc => None,
            GateHook::Xdp | GateHook::Auto => {
                let auto = config.gate_hook == GateHook::Auto;
                let mode = if auto && config.xdp_mode == XdpAttachMode::Auto {
                    // Generic XDP would only add work in front of tc: tc gates instead.
                    XdpAttachMode::Driver
                } else {
                    config.xdp_mode
                };
                match attach_xdp(
                    program_mut(&mut ebpf, XDP_EXTERNAL_PROGRAM)?,
                    &xdp_slot,
                    mode,
                ) {
                    Ok((link, outcome)) => {
                        links.push((TcAttachment::Pinned(link), xdp_slot));
                        Some(outcome)
                    }
                    Err(error) if auto => {
                        info!(interface = %external, %error, "no native XDP here; the gate runs in tc");
                        None
                    }
                    Err(error) => return Err(error),
                }
            }
        };
        let external_program = if xdp_outcome.is_some() {
            TC_INBOUND_PROGRAM
        } else {
            TC_GATE_PROGRAM
        };
        for (program, link_name, interface) in [
            (external_program, TC_EXTERNAL_LINK, external),
            (
                TC_INTERNAL_PROGRAM,
                TC_INTERNAL_LINK,
                &config.internal_interface,
            ),
        ] {
            let slot = LinkSlot::new(&pin_dir, &run_dir, link_name, interface);
            let (link, tc_outcome) =
                attach_tc_ingress(program_mut(&mut ebpf, program)?, &slot, config.tc_mode)?;
            info!(%interface, program, mode = tc_outcome.describe(), "tc program attached");
            links.push((link, slot));
        }
        let outcome = if let Some(outcome) = xdp_outcome {
            info!(interface = %external, hook = "xdp", mode = outcome.describe(), "gate attached: unsolicited inbound UDP is dropped");
            outcome
        } else {
            // The tc gate runs now: a previous daemon's XDP link (if any) may go.
            let xdp_slot = LinkSlot::new(&pin_dir, &run_dir, XDP_EXTERNAL_LINK, external);
            if xdp_slot.pin.exists() {
                remove_pinned_link(&xdp_slot.pin);
                xdp_slot.forget();
                info!(interface = %external, "the previous daemon's XDP gate removed; tc gates now");
            }
            info!(interface = %external, hook = "tc", "gate attached: unsolicited inbound UDP is dropped");
            AttachOutcome::Tc
        };
        Ok(Self {
            ebpf,
            kernel_log,
            links,
            heartbeat,
            pin_dir,
            outcome,
            fanout_capacity,
        })
    }

    /// Most subscribers of a group the kernel delivers to: 64, fewer where the verifier
    /// refused the full fan-out, 0 where no fan-out program loaded (the userspace relay then
    /// serves every subscriber).
    pub fn fanout_capacity(&self) -> usize {
        self.fanout_capacity
    }

    /// Starts draining the programs' rare events (rate-limited in the kernel) into `tracing`
    /// under [`KERNEL_LOG_TARGET`], on the tokio runtime this is called from, for the rest of
    /// the daemon's life. Once; later calls do nothing.
    pub fn start_kernel_log(&mut self) {
        if let Some(kernel_log) = self.kernel_log.take()
            && let Err(error) = kernel_log.spawn_drain()
        {
            warn!(%error, "the programs' log cannot be drained; their events are lost");
        }
    }

    pub fn outcome(&self) -> AttachOutcome {
        self.outcome
    }

    /// Hands the binding maps and the host allow-list to a [`KernelGate`], which owns them from
    /// then on.
    pub fn take_gate(&mut self) -> Result<KernelGate, DatapathError> {
        let inbound = take_hash(&mut self.ebpf, map_names::BINDINGS)?;
        let outbound = take_hash(&mut self.ebpf, map_names::OUTBOUND)?;
        let raw_clients = take_hash(&mut self.ebpf, map_names::RAW_CLIENTS)?;
        let host_allow = take_hash(&mut self.ebpf, map_names::HOST_ALLOW)?;
        let groups = GroupMaps {
            groups: take_hash(&mut self.ebpf, map_names::GROUPS)?,
            sources: take_hash(&mut self.ebpf, map_names::GROUP_SOURCES)?,
        };
        Ok(KernelGate::new(
            inbound,
            outbound,
            raw_clients,
            host_allow,
            groups,
        ))
    }

    /// A stop that keeps the firewall closed: the heartbeat ends with an expired beat, so no
    /// binding left in a map admits anything; the links stay pinned and the gate keeps dropping
    /// until the next daemon takes it over or `gateway detach` removes it. (The resolver's query
    /// flows leave the allow-list with their queries.)
    pub fn stop(mut self) {
        self.heartbeat.stop();
        info!("gate left attached and dropping (remove it with `gateway detach`)");
    }

    /// Leaves the gate to another daemon of this instance (the next after an upgrade, or the
    /// previous one when taking over failed): nothing is written, the heartbeat is not
    /// stopped (the other daemon's beats), nothing is detached. Call just before the process
    /// exits: the heartbeat thread ends with it.
    pub fn leave_to_other_daemon(self) {
        std::mem::forget(self);
    }

    /// Removes the gate: stop the heartbeat, detach the programs and unpin the links and the
    /// maps. Only on an explicit request (`--remove-gate-on-exit`); the firewall is open after.
    pub fn detach(mut self) {
        self.heartbeat.stop();
        for (link, slot) in self.links.drain(..) {
            match link {
                TcAttachment::Pinned(link) => match link.unpin() {
                    Ok(fd_link) => drop(fd_link),
                    Err(error) => warn!(%error, "unpin a link"),
                },
                TcAttachment::Netlink { interface } => {
                    links::remove_netlink_filter(&interface);
                }
            }
            slot.forget();
        }
        remove_pins(&self.pin_dir);
        info!("datapath detached and unpinned: the gate is open");
    }
}

/// The hook `config` asks for, with `auto` resolved as far as the driver tells: tc on veth
/// (where an XDP program makes veth copy every skb), XDP to be tried elsewhere.
fn gate_hook_here(config: &DatapathConfig) -> GateHook {
    match config.gate_hook {
        GateHook::Auto if config.xdp_mode == XdpAttachMode::Generic => GateHook::Xdp,
        GateHook::Auto
            if driver::driver_name(&config.external_interface).as_deref() == Some("veth") =>
        {
            GateHook::Tc
        }
        hook => hook,
    }
}

/// The maps sized from `--max-bindings`.
const SIZED_MAPS: [&str; 3] = [
    map_names::BINDINGS,
    map_names::OUTBOUND,
    map_names::RAW_CLIENTS,
];

fn load(pin_dir: &Path, max_bindings: u32) -> Result<Ebpf, DatapathError> {
    let paths: Vec<(&str, PathBuf)> = PINNED_MAPS
        .iter()
        .map(|name| (*name, pin_dir.join(name)))
        .collect();
    let mut loader = EbpfLoader::new();
    for map in SIZED_MAPS {
        loader.map_max_entries(map, max_bindings);
    }
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader.load(EBPF_OBJECT).map_err(|error| match error {
        aya::EbpfError::MapError(MapError::CreateError { name, io_error })
            if SIZED_MAPS.contains(&name.as_str()) =>
        {
            DatapathError::MapCapacity {
                map: name,
                entries: max_bindings,
                source: io_error,
            }
        }
        other => DatapathError::Load(other),
    })?;
    let xdp: &mut Xdp = typed_program(&mut ebpf, XDP_EXTERNAL_PROGRAM)?;
    xdp.load().map_err(|source| DatapathError::Program {
        what: format!("load {XDP_EXTERNAL_PROGRAM} into the kernel (verifier)"),
        source,
    })?;
    for name in [TC_GATE_PROGRAM, TC_INBOUND_PROGRAM, TC_INTERNAL_PROGRAM] {
        let program: &mut SchedClassifier = typed_program(&mut ebpf, name)?;
        program.load().map_err(|source| DatapathError::Program {
            what: format!("load {name} into the kernel (verifier)"),
            source,
        })?;
    }
    Ok(ebpf)
}

/// Loads the multicast fan-out and puts it in the slot the external tc program tail-calls. A
/// kernel whose verifier refuses it keeps the gate and the relay: the slot stays empty and the
/// userspace relay fans groups out. The slot's map is not pinned, so when the daemon's
/// descriptors close (a stop, a crash) the kernel empties it and group datagrams stop at once.
fn load_fanout(ebpf: &mut Ebpf) -> usize {
    let mut refusals = Vec::new();
    for (name, capacity) in [
        (TC_FANOUT_PROGRAM, MAX_KERNEL_SUBSCRIBERS),
        (TC_FANOUT_SMALL_PROGRAM, SMALL_FANOUT_SUBSCRIBERS),
    ] {
        match load_fanout_program(ebpf, name) {
            Ok(()) => {
                if refusals.is_empty() {
                    info!(program = name, capacity, "multicast fan-out in the kernel");
                } else {
                    warn!(refused = ?refusals, program = name, capacity,
                        "the kernel fans groups out to fewer subscribers on this kernel; the \
                         userspace relay serves the rest");
                }
                return capacity;
            }
            Err(error) => refusals.push(format!("{name}: {error}")),
        }
    }
    warn!(refused = ?refusals,
        "no multicast fan-out in the kernel on this kernel: the userspace relay fans groups out");
    0
}

/// Loads fan-out program `name` and puts it in slot 0 of `FANOUT_PROGRAMS`.
fn load_fanout_program(ebpf: &mut Ebpf, name: &str) -> Result<(), DatapathError> {
    let program = typed_program::<SchedClassifier>(ebpf, name)?;
    program.load().map_err(|source| DatapathError::Program {
        what: format!("load {name} into the kernel (verifier)"),
        source,
    })?;
    let fd = program
        .fd()
        .map_err(|source| DatapathError::Program {
            what: format!("take the descriptor of {name}"),
            source,
        })?
        .try_clone()
        .map_err(|source| DatapathError::Io {
            what: "duplicate the descriptor of",
            path: name.into(),
            source,
        })?;
    ebpf.map_mut(map_names::FANOUT_PROGRAMS)
        .ok_or_else(|| MapError::InvalidName {
            name: map_names::FANOUT_PROGRAMS.to_owned(),
        })
        .and_then(ProgramArray::try_from)
        .and_then(|mut array| array.set(0, &fd, 0))
        .map_err(|source| DatapathError::Map {
            what: format!("install {name} in {}", map_names::FANOUT_PROGRAMS),
            source,
        })
}

fn typed_program<'a, P>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut P, DatapathError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| DatapathError::Pin(format!("program {name} missing from the object")))?
        .try_into()
        .map_err(|source| DatapathError::Program {
            what: format!("{name} has an unexpected program type"),
            source,
        })
}

fn program_mut<'a, P>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut P, DatapathError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    typed_program(ebpf, name)
}

fn map_mut<'a, K: aya::Pod, V: aya::Pod>(
    ebpf: &'a mut Ebpf,
    name: &str,
) -> Result<HashMap<&'a mut MapData, K, V>, DatapathError> {
    let map = ebpf
        .map_mut(name)
        .ok_or_else(|| DatapathError::Pin(format!("map {name} missing from the object")))?;
    HashMap::try_from(map).map_err(|source| DatapathError::Map {
        what: format!("open map {name}"),
        source,
    })
}

fn array_map<'a, V: aya::Pod>(
    ebpf: &'a mut Ebpf,
    name: &str,
) -> Result<Array<&'a mut MapData, V>, DatapathError> {
    let map = ebpf
        .map_mut(name)
        .ok_or_else(|| DatapathError::Pin(format!("map {name} missing from the object")))?;
    Array::try_from(map).map_err(|source| DatapathError::Map {
        what: format!("open map {name}"),
        source,
    })
}

fn take_hash<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &str,
) -> Result<HashMap<MapData, K, V>, DatapathError> {
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| DatapathError::Pin(format!("map {name} already taken")))?;
    HashMap::try_from(map).map_err(|source| DatapathError::Map {
        what: format!("open map {name}"),
        source,
    })
}

/// Empties a hash map; returns how many entries it had.
fn clear<K: aya::Pod, V: aya::Pod>(ebpf: &mut Ebpf, name: &str) -> Result<usize, DatapathError> {
    let mut map: HashMap<_, K, V> = map_mut(ebpf, name)?;
    let keys: Vec<K> = map.keys().filter_map(Result::ok).collect();
    for key in &keys {
        let _ = map.remove(key);
    }
    Ok(keys.len())
}

/// Makes the pinned `EXTERNAL_ADDRS` of the gateway at `pin_dir` hold exactly `addresses` (the
/// external interface's now), new ones first, so no inside host can pose as a remote through an
/// address the interface gained after start. Returns how many were added and removed.
pub fn sync_external_addresses(
    pin_dir: &Path,
    addresses: &[IpAddr],
) -> Result<(usize, usize), DatapathError> {
    let path = pin_dir.join(map_names::EXTERNAL_ADDRS);
    let open = |source| DatapathError::Map {
        what: format!("open {}", path.display()),
        source,
    };
    let data = MapData::from_pin(&path).map_err(open)?;
    let map = aya::maps::Map::from_map_data(data).map_err(open)?;
    let mut external: HashMap<MapData, Addr16, u32> = HashMap::try_from(map).map_err(open)?;
    let wanted: Vec<Addr16> = addresses.iter().map(|ip| addr16(*ip)).collect();
    let present: Vec<Addr16> = external.keys().filter_map(Result::ok).collect();
    let mut added = 0;
    for key in wanted.iter().filter(|key| !present.contains(key)) {
        external
            .insert(key, 0, 0)
            .map_err(|source| DatapathError::Map {
                what: "add an external address".to_owned(),
                source,
            })?;
        added += 1;
    }
    let mut removed = 0;
    for key in present.iter().filter(|key| !wanted.contains(key)) {
        if external.remove(key).is_ok() {
            removed += 1;
        }
    }
    Ok((added, removed))
}

/// The raw octets of a map key or value (`aya::Pod` types have no hidden padding: every
/// padding field is explicit and zeroed).
fn pod_bytes<T: aya::Pod>(value: &T) -> &[u8] {
    // SAFETY: `T` is plain data of `size_of::<T>()` initialised octets, borrowed for the slice's life.
    unsafe { std::slice::from_raw_parts(std::ptr::from_ref(value).cast::<u8>(), size_of::<T>()) }
}

/// Makes map `name` hold exactly `wanted`: new entries first, then the ones not wanted go, so
/// a running program never sees a moment with neither (a daemon taking over a live gate).
fn replace_entries<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &str,
    wanted: &[(K, V)],
    what: &str,
) -> Result<(), DatapathError> {
    let mut map: HashMap<_, K, V> = map_mut(ebpf, name)?;
    for (key, value) in wanted {
        map.insert(key, value, 0)
            .map_err(|source| DatapathError::Map {
                what: format!("add {what}"),
                source,
            })?;
    }
    let stale: Vec<K> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|key| !wanted.iter().any(|(k, _)| pod_bytes(k) == pod_bytes(key)))
        .collect();
    for key in &stale {
        let _ = map.remove(key);
    }
    Ok(())
}

/// Makes the allow-list exactly the configured flows.
fn fill_host_allow(ebpf: &mut Ebpf, flows: &[HostFlow]) -> Result<(), DatapathError> {
    let wanted: Vec<(HostAllowKey, HostAllowValue)> = flows
        .iter()
        .map(|flow| (flow.key(), HostAllowValue::default()))
        .collect();
    replace_entries(
        ebpf,
        map_names::HOST_ALLOW,
        &wanted,
        "a host allow-list entry",
    )?;
    for flow in flows {
        info!(remote = %flow.remote, local = %flow.local, "host UDP flow allowed");
    }
    Ok(())
}

/// Makes the control-listener map exactly `listeners` (wildcards as all-zero addresses).
fn fill_control_ports(ebpf: &mut Ebpf, listeners: &[SocketAddr]) -> Result<(), DatapathError> {
    let wanted: Vec<(ControlPortKey, u32)> = listeners
        .iter()
        .map(|listener| {
            let ip = listener.ip();
            let key = ControlPortKey {
                addr: if ip.to_canonical().is_unspecified() {
                    [0; 16]
                } else {
                    addr16(ip)
                },
                port_be: listener.port().to_be(),
                padding: 0,
            };
            (key, 0)
        })
        .collect();
    replace_entries(
        ebpf,
        map_names::CONTROL_PORTS,
        &wanted,
        "a control listener",
    )
}

/// Removes an instance's pins: links (detaching them), maps, the directory, and the shared parent
/// directory when it is empty. Returns what it removed. Also `gateway detach` and test cleanup.
pub fn remove_pins(pin_dir: &Path) -> Vec<String> {
    let mut removed = Vec::new();
    for link in LINKS {
        let path = pin_dir.join(link);
        if path.exists() {
            remove_pinned_link(&path);
            removed.push(format!("link {}", path.display()));
        }
    }
    for map in PINNED_MAPS {
        let path = pin_dir.join(map);
        if fs::remove_file(&path).is_ok() {
            removed.push(format!("map {}", path.display()));
        }
    }
    let _ = fs::remove_dir(pin_dir);
    if let Some(parent) = pin_dir.parent() {
        let _ = fs::remove_dir(parent);
    }
    removed
}
