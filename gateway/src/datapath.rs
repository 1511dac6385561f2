//! Loading, attaching, pinning and detaching the eBPF datapath, and its maps.
//!
//! The XDP program's link and maps are pinned under the instance's bpffs directory, so a daemon
//! killed with SIGKILL leaves the gate in place (the firewall never fails open) and the next
//! daemon takes the link over by replacing its program. A clean stop unpins everything.
//! Owns no protocol logic.

use std::{
    fs, io,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, MapError},
    programs::{
        ProgramError, Xdp,
        links::{FdLink, LinkError, PinnedLink},
        xdp::{XdpLink, XdpMode},
    },
};
use gateway_common::{
    Addr16, BindingKey, BindingValue, DEFAULT_MAX_BINDINGS, HostAllowKey, HostAllowValue,
    XDP_EXTERNAL_PROGRAM, ipv4_mapped, map_names,
};
use thiserror::Error;
use tracing::{info, warn};

use crate::{gate::KernelGate, instance::Instance};

/// The compiled eBPF object, built by `build.rs` (empty with `AYA_BUILD_SKIP=1`).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gateway"));

const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const XDP_LINK_PIN: &str = "xdp_external_link";
/// Records which interface the pinned link belongs to, for takeover.
const EXTERNAL_IFACE_FILE: &str = "external_interface";
const PINNED_MAPS: [&str; 3] = [
    map_names::EXIT_COUNTERS,
    map_names::BINDINGS,
    map_names::HOST_ALLOW,
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
}

/// The interface index of `name` in the current network namespace.
pub fn interface_index(name: &str) -> Result<u32, DatapathError> {
    nix::net::if_::if_nametoindex(name)
        .map_err(|_| DatapathError::UnknownInterface(name.to_owned()))
}

fn ensure_bpffs() -> Result<(), DatapathError> {
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    let path = c"/sys/fs/bpf";
    // SAFETY: path is NUL-terminated and stat is a valid out-pointer.
    let rc = unsafe { libc::statfs(path.as_ptr(), &raw mut stat) };
    if rc != 0 || i64::from(stat.f_type) != BPF_FS_MAGIC {
        return Err(DatapathError::NoBpffs);
    }
    Ok(())
}

/// How the XDP program ended up on the external interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachOutcome {
    Driver,
    /// Generic (skb) mode, because the driver refused native XDP.
    Generic,
    /// A link left pinned by a previous daemon now runs our program.
    TookOver,
}

impl AttachOutcome {
    pub const fn describe(self) -> &'static str {
        match self {
            Self::Driver => "driver mode",
            Self::Generic => "generic mode (the driver has no native XDP)",
            Self::TookOver => "the pinned link of a previous daemon (its mode is kept)",
        }
    }
}

/// What to attach and where.
#[derive(Debug, Clone)]
pub struct DatapathConfig {
    pub instance: Instance,
    pub external_interface: String,
    pub max_bindings: u32,
    /// Exact (remote, local) UDP flows the host itself needs, admitted by the gate.
    pub host_allow: Vec<HostFlow>,
}

/// One exact UDP flow for the host allow-list: datagrams from `remote` to `local`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostFlow {
    pub remote: SocketAddr,
    pub local: SocketAddr,
}

impl HostFlow {
    /// Parses `REMOTE_IP:PORT,LOCAL_IP:PORT` (IPv6 in brackets).
    pub fn parse(text: &str) -> Result<Self, String> {
        let (remote, local) = text
            .split_once(',')
            .ok_or_else(|| format!("{text:?}: expected REMOTE_IP:PORT,LOCAL_IP:PORT"))?;
        let parse = |what: &str, value: &str| -> Result<SocketAddr, String> {
            value
                .trim()
                .parse()
                .map_err(|_| format!("{text:?}: {what} {value:?} is not an IP:PORT"))
        };
        let flow = Self {
            remote: parse("remote", remote)?,
            local: parse("local", local)?,
        };
        if flow.remote.port() == 0 || flow.local.port() == 0 {
            return Err(format!("{text:?}: ports must be exact (not 0)"));
        }
        Ok(flow)
    }

    pub fn key(&self) -> HostAllowKey {
        HostAllowKey {
            remote_addr: addr16(self.remote.ip()),
            local_addr: addr16(self.local.ip()),
            remote_port_be: self.remote.port().to_be(),
            local_port_be: self.local.port().to_be(),
        }
    }
}

/// An address as the kernel maps store it: 16 octets, IPv4 mapped.
pub fn addr16(ip: IpAddr) -> Addr16 {
    match ip {
        IpAddr::V4(v4) => ipv4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(v6.octets(), |v4| ipv4_mapped(v4.octets())),
    }
}

impl DatapathConfig {
    pub fn new(instance: Instance, external_interface: String) -> Self {
        Self {
            instance,
            external_interface,
            max_bindings: DEFAULT_MAX_BINDINGS,
            host_allow: Vec::new(),
        }
    }
}

/// The loaded and attached datapath. Keep it alive for the daemon's lifetime.
pub struct Datapath {
    ebpf: Ebpf,
    link: Option<PinnedLink>,
    pin_dir: PathBuf,
    iface_record: PathBuf,
    outcome: AttachOutcome,
}

impl Datapath {
    /// Loads the object (reusing maps pinned by a dead daemon), attaches or takes over the XDP
    /// link on the external interface and pins it.
    pub fn attach(config: &DatapathConfig) -> Result<Self, DatapathError> {
        if EBPF_OBJECT.is_empty() {
            return Err(DatapathError::EmptyObject);
        }
        ensure_bpffs()?;
        interface_index(&config.external_interface)?;
        let pin_dir = config.instance.pin_dir();
        fs::create_dir_all(&pin_dir).map_err(|source| DatapathError::Io {
            what: "create",
            path: pin_dir.clone(),
            source,
        })?;

        let mut ebpf = match load(&pin_dir, config.max_bindings) {
            Ok(ebpf) => ebpf,
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
        clear_bindings(&mut ebpf)?;
        fill_host_allow(&mut ebpf, &config.host_allow)?;

        let program: &mut Xdp = ebpf
            .program_mut(XDP_EXTERNAL_PROGRAM)
            .ok_or_else(|| {
                DatapathError::Pin(format!(
                    "program {XDP_EXTERNAL_PROGRAM} missing from the object"
                ))
            })?
            .try_into()
            .map_err(|source| DatapathError::Program {
                what: format!("{XDP_EXTERNAL_PROGRAM} is not an XDP program"),
                source,
            })?;
        program.load().map_err(|source| DatapathError::Program {
            what: format!("load {XDP_EXTERNAL_PROGRAM} into the kernel (verifier)"),
            source,
        })?;

        let link_path = pin_dir.join(XDP_LINK_PIN);
        let iface_record = config.instance.run_dir().join(EXTERNAL_IFACE_FILE);
        let previous_iface = fs::read_to_string(&iface_record).ok();
        let (link, outcome) = if link_path.exists()
            && previous_iface.as_deref() == Some(config.external_interface.as_str())
        {
            (take_over(program, &link_path)?, AttachOutcome::TookOver)
        } else {
            if link_path.exists() {
                warn!(
                    previous = previous_iface.as_deref().unwrap_or("unknown"),
                    "a pinned link for another interface was left behind; detaching it"
                );
                remove_pinned_link(&link_path);
            }
            attach_fresh(program, &config.external_interface, &link_path)?
        };
        fs::write(&iface_record, &config.external_interface).map_err(|source| {
            DatapathError::Io {
                what: "write",
                path: iface_record.clone(),
                source,
            }
        })?;
        info!(
            interface = %config.external_interface,
            mode = outcome.describe(),
            "XDP gate attached: unsolicited inbound UDP is dropped"
        );
        Ok(Self {
            ebpf,
            link: Some(link),
            pin_dir,
            iface_record,
            outcome,
        })
    }

    pub fn outcome(&self) -> AttachOutcome {
        self.outcome
    }

    /// The host allow-list map (UDP the gateway host itself needs).
    pub fn host_allow(
        &mut self,
    ) -> Result<HashMap<&mut MapData, HostAllowKey, HostAllowValue>, DatapathError> {
        map_mut(&mut self.ebpf, map_names::HOST_ALLOW)
    }

    /// Hands the exact-binding map to a [`KernelGate`], which owns it from then on.
    pub fn take_gate(&mut self) -> Result<KernelGate, DatapathError> {
        let map = self.ebpf.take_map(map_names::BINDINGS).ok_or_else(|| {
            DatapathError::Pin(format!("map {} already taken", map_names::BINDINGS))
        })?;
        let map = HashMap::try_from(map).map_err(|source| DatapathError::Map {
            what: format!("open map {}", map_names::BINDINGS),
            source,
        })?;
        Ok(KernelGate::new(map))
    }

    /// Clean stop: detach the program and unpin the link and the maps.
    pub fn detach(mut self) {
        if let Some(link) = self.link.take() {
            match link.unpin() {
                Ok(fd_link) => drop(fd_link),
                Err(error) => warn!(%error, "unpin the XDP link"),
            }
        }
        remove_pins(&self.pin_dir);
        let _ = fs::remove_file(&self.iface_record);
        info!("XDP gate detached and unpinned");
    }
}

fn load(pin_dir: &Path, max_bindings: u32) -> Result<Ebpf, DatapathError> {
    let paths: Vec<(&str, PathBuf)> = PINNED_MAPS
        .iter()
        .map(|name| (*name, pin_dir.join(name)))
        .collect();
    let mut loader = EbpfLoader::new();
    loader.map_max_entries(map_names::BINDINGS, max_bindings);
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    Ok(loader.load(EBPF_OBJECT)?)
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

/// Bindings belong to control connections; a new daemon has none, so entries a dead daemon left
/// must not keep admitting traffic.
fn clear_bindings(ebpf: &mut Ebpf) -> Result<(), DatapathError> {
    let mut bindings: HashMap<_, BindingKey, BindingValue> = map_mut(ebpf, map_names::BINDINGS)?;
    let stale: Vec<BindingKey> = bindings.keys().filter_map(Result::ok).collect();
    for key in &stale {
        let _ = bindings.remove(key);
    }
    if !stale.is_empty() {
        warn!(
            count = stale.len(),
            "removed binding entries left by a previous daemon"
        );
    }
    Ok(())
}

/// Replaces the allow-list with exactly the configured flows (before the program runs).
fn fill_host_allow(ebpf: &mut Ebpf, flows: &[HostFlow]) -> Result<(), DatapathError> {
    let mut allow: HashMap<_, HostAllowKey, HostAllowValue> = map_mut(ebpf, map_names::HOST_ALLOW)?;
    let stale: Vec<HostAllowKey> = allow.keys().filter_map(Result::ok).collect();
    for key in &stale {
        let _ = allow.remove(key);
    }
    for flow in flows {
        allow
            .insert(flow.key(), HostAllowValue::default(), 0)
            .map_err(|source| DatapathError::Map {
                what: format!(
                    "add host allow-list entry {} -> {}",
                    flow.remote, flow.local
                ),
                source,
            })?;
        info!(remote = %flow.remote, local = %flow.local, "host UDP flow allowed");
    }
    Ok(())
}

fn take_over(program: &mut Xdp, link_path: &Path) -> Result<PinnedLink, DatapathError> {
    let pinned = PinnedLink::from_pin(link_path).map_err(|source| DatapathError::Link {
        what: format!("open the pinned link {}", link_path.display()),
        source,
    })?;
    let xdp_link =
        XdpLink::try_from(FdLink::from(pinned)).map_err(|source| DatapathError::Link {
            what: "the pinned link is not an XDP link".to_owned(),
            source,
        })?;
    let link_id = program
        .attach_to_link(xdp_link)
        .map_err(|source| DatapathError::Program {
            what: "replace the program in the pinned XDP link".to_owned(),
            source,
        })?;
    // The pin still exists; reopen it to hold the link as pinned.
    let _ = program.take_link(link_id);
    PinnedLink::from_pin(link_path).map_err(|source| DatapathError::Link {
        what: format!("reopen the pinned link {}", link_path.display()),
        source,
    })
}

fn attach_fresh(
    program: &mut Xdp,
    interface: &str,
    link_path: &Path,
) -> Result<(PinnedLink, AttachOutcome), DatapathError> {
    let (link_id, outcome) = match program.attach(interface, XdpMode::Driver) {
        Ok(id) => (id, AttachOutcome::Driver),
        Err(driver_error) => {
            warn!(%interface, error = %driver_error, "driver-mode XDP refused; trying generic mode");
            let id = program
                .attach(interface, XdpMode::Skb)
                .map_err(|source| DatapathError::Program {
                    what: format!(
                        "attach XDP to {interface} (driver mode failed: {driver_error}; generic mode failed too; \
                         is another XDP program attached?)"
                    ),
                    source,
                })?;
            (id, AttachOutcome::Generic)
        }
    };
    let link = program
        .take_link(link_id)
        .map_err(|source| DatapathError::Program {
            what: "take the XDP link".to_owned(),
            source,
        })?;
    let fd_link = FdLink::try_from(link).map_err(|source| DatapathError::Link {
        what: "the kernel gave a netlink XDP attachment, which cannot be pinned".to_owned(),
        source,
    })?;
    let pinned = fd_link.pin(link_path).map_err(|error| {
        DatapathError::Pin(format!(
            "pin the XDP link at {}: {error}",
            link_path.display()
        ))
    })?;
    Ok((pinned, outcome))
}

fn remove_pinned_link(link_path: &Path) {
    if let Ok(pinned) = PinnedLink::from_pin(link_path)
        && let Ok(fd_link) = pinned.unpin()
    {
        drop(fd_link);
    } else {
        let _ = fs::remove_file(link_path);
    }
}

/// Removes an instance's pins: link (detaching it), maps, the directory, and the shared parent
/// directory when it is empty. Also used by tests to clean up after a failure.
pub fn remove_pins(pin_dir: &Path) {
    remove_pinned_link(&pin_dir.join(XDP_LINK_PIN));
    for map in PINNED_MAPS {
        let _ = fs::remove_file(pin_dir.join(map));
    }
    let _ = fs::remove_dir(pin_dir);
    if let Some(parent) = pin_dir.parent() {
        let _ = fs::remove_dir(parent);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_flows_parse_exactly() {
        let flow = HostFlow::parse("192.0.2.123:123,203.0.113.1:123").unwrap();
        assert_eq!(flow.remote, "192.0.2.123:123".parse().unwrap());
        let key = flow.key();
        assert_eq!(key.remote_addr, ipv4_mapped([192, 0, 2, 123]));
        assert_eq!(key.local_port_be.to_ne_bytes(), [0, 123]);
        let v6 = HostFlow::parse("[2001:db8::53]:53, [2001:db8:2::1]:4053").unwrap();
        assert_eq!(v6.local.port(), 4053);
        for bad in [
            "",
            "192.0.2.1:53",
            "192.0.2.1:0,203.0.113.1:5",
            "x,y",
            "192.0.2.1,203.0.113.1",
        ] {
            assert!(HostFlow::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mapped_addresses() {
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(addr16(mapped), addr16("192.0.2.1".parse().unwrap()));
        assert_eq!(addr16("2001:db8::1".parse().unwrap())[0], 0x20);
    }
}
