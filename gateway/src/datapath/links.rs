//! Attaching programs as bpf links pinned in bpffs, and taking over links a dead daemon left:
//! the link stays attached (the gate never opens) while its program is replaced. Where the
//! kernel has no tcx (before 6.6), the tc programs are attached as netlink filters (clsact +
//! `cls_bpf`) at a fixed priority and handle instead: such a filter outlives its process like a
//! pinned link, a new daemon replaces its program in place, and `gateway detach` removes it.

use crate::attach_mode::{TcAttachMode, XdpAttachMode};
use std::{
    fs,
    path::{Path, PathBuf},
};

use aya::programs::{
    SchedClassifier, TcAttachType, Xdp,
    links::{FdLink, PinnedLink},
    tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle, qdisc_add_clsact},
    xdp::{XdpLink, XdpMode},
};
use tracing::warn;

use super::DatapathError;

/// How a program ended up on its interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachOutcome {
    Driver,
    /// Generic (skb) mode, because the driver refused native XDP.
    Generic,
    /// tc ingress (tcx).
    Tc,
    /// tc ingress as a netlink filter (clsact + `cls_bpf`; kernels without tcx).
    TcNetlink,
    /// A link left pinned by a previous daemon now runs our program.
    TookOver,
}

impl AttachOutcome {
    pub const fn describe(self) -> &'static str {
        match self {
            Self::Driver => "driver mode",
            Self::Generic => "generic mode (the driver has no native XDP)",
            Self::Tc => "tc ingress",
            Self::TcNetlink => "tc ingress (netlink filter)",
            Self::TookOver => "the attachment of a previous daemon (pinned link or tc filter)",
        }
    }
}

/// One pinned link: where its pin lives and which interface it belongs to (recorded in the run
/// directory, so a new daemon knows whether it may take it over).
pub struct LinkSlot {
    pub pin: PathBuf,
    record: PathBuf,
    pub interface: String,
}

impl LinkSlot {
    pub fn new(pin_dir: &Path, run_dir: &Path, name: &str, interface: &str) -> Self {
        Self {
            pin: pin_dir.join(name),
            record: run_dir.join(format!("{name}.interface")),
            interface: interface.to_owned(),
        }
    }

    /// Whether a pinned link for this interface exists (left by a previous daemon).
    fn can_take_over(&self) -> bool {
        if !self.pin.exists() {
            return false;
        }
        let recorded = fs::read_to_string(&self.record).ok();
        if recorded.as_deref() == Some(self.interface.as_str()) {
            return true;
        }
        warn!(
            link = %self.pin.display(),
            previous = recorded.as_deref().unwrap_or("unknown"),
            "a pinned link for another interface was left behind; detaching it"
        );
        remove_pinned_link(&self.pin);
        false
    }

    fn record(&self) -> Result<(), DatapathError> {
        fs::write(&self.record, &self.interface).map_err(|source| DatapathError::Io {
            what: "write",
            path: self.record.clone(),
            source,
        })
    }

    pub fn forget(&self) {
        let _ = fs::remove_file(&self.record);
        let _ = fs::remove_file(self.netlink_record());
    }

    /// The record of a netlink filter this slot attached (its interface).
    fn netlink_record(&self) -> PathBuf {
        self.record.with_extension("netlink")
    }
}

impl TcAttachMode {
    fn netlink_here(self) -> bool {
        match self {
            Self::Tcx => false,
            Self::Netlink => true,
            Self::Auto => !aya::util::KernelVersion::current()
                .is_ok_and(|version| version >= aya::util::KernelVersion::new(6, 6, 0)),
        }
    }
}

/// The priority and handle of the gateway's netlink filters: fixed, so a new daemon replaces
/// the program in place and `gateway detach` finds the filter.
const NETLINK_PRIORITY: u16 = 0x4777;
const NETLINK_HANDLE: TcHandle = TcHandle::new(0, 0x4777);

/// A tc program's attachment: a pinned tcx link, or a netlink filter on an interface.
pub enum TcAttachment {
    Pinned(PinnedLink),
    Netlink { interface: String },
}

/// The gateway's netlink filter on `interface`'s ingress, as a link handle (dropping it
/// detaches the filter).
fn netlink_filter(interface: &str) -> std::io::Result<SchedClassifierLink> {
    SchedClassifierLink::attached(
        interface,
        TcAttachType::Ingress,
        NETLINK_PRIORITY,
        NETLINK_HANDLE,
        None,
    )
}

/// Removes the gateway's netlink filter from `interface`'s ingress, if there is one.
pub fn remove_netlink_filter(interface: &str) {
    if let Ok(filter) = netlink_filter(interface) {
        drop(filter);
    }
}

/// Removes every netlink filter recorded in `run_dir` (a dead or stopped daemon's); returns the
/// interfaces it removed them from.
pub fn remove_netlink_filters(run_dir: &Path) -> Vec<String> {
    let mut removed = Vec::new();
    let Ok(entries) = fs::read_dir(run_dir) else {
        return removed;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "netlink")
            && let Ok(interface) = fs::read_to_string(&path)
        {
            remove_netlink_filter(interface.trim());
            removed.push(interface.trim().to_owned());
            let _ = fs::remove_file(&path);
        }
    }
    removed
}

/// Attaches (or takes over) a tc program on `slot.interface`'s ingress as a netlink filter that
/// outlives this process.
fn attach_tc_netlink(
    program: &mut SchedClassifier,
    slot: &LinkSlot,
) -> Result<(TcAttachment, AttachOutcome), DatapathError> {
    let interface = slot.interface.as_str();
    // Present already when a previous daemon left its filter: not an error.
    let _ = qdisc_add_clsact(interface);
    // A filter at our priority and handle (a previous daemon's) gets the new program in place;
    // otherwise a new one is made.
    let replaced = netlink_filter(interface)
        .ok()
        .and_then(|existing| program.attach_to_link(existing).ok());
    let (id, outcome) = if let Some(id) = replaced {
        (id, AttachOutcome::TookOver)
    } else {
        let id = program
            .attach_with_options(
                interface,
                TcAttachType::Ingress,
                TcAttachOptions::Netlink(NlOptions {
                    priority: NETLINK_PRIORITY,
                    handle: NETLINK_HANDLE,
                    classid: None,
                }),
            )
            .map_err(|source| DatapathError::Program {
                what: format!("attach tc ingress to {interface} as a netlink filter"),
                source,
            })?;
        (id, AttachOutcome::TcNetlink)
    };
    let link = program
        .take_link(id)
        .map_err(|source| DatapathError::Program {
            what: "take the tc filter".to_owned(),
            source,
        })?;
    // Never detached by this process: the filter stays when the daemon dies (fail closed).
    std::mem::forget(link);
    fs::write(slot.netlink_record(), interface).map_err(|source| DatapathError::Io {
        what: "write",
        path: slot.netlink_record(),
        source,
    })?;
    Ok((
        TcAttachment::Netlink {
            interface: interface.to_owned(),
        },
        outcome,
    ))
}

fn pin(fd_link: FdLink, path: &Path) -> Result<PinnedLink, DatapathError> {
    fd_link
        .pin(path)
        .map_err(|error| DatapathError::Pin(format!("pin the link at {}: {error}", path.display())))
}

fn reopen(path: &Path) -> Result<PinnedLink, DatapathError> {
    PinnedLink::from_pin(path).map_err(|source| DatapathError::Link {
        what: format!("open the pinned link {}", path.display()),
        source,
    })
}

/// Attaches (or takes over) the XDP program on `slot.interface`.
pub fn attach_xdp(
    program: &mut Xdp,
    slot: &LinkSlot,
    mode: XdpAttachMode,
) -> Result<(PinnedLink, AttachOutcome), DatapathError> {
    let interface = slot.interface.as_str();
    if slot.can_take_over() {
        let fd_link = FdLink::from(reopen(&slot.pin)?);
        let link = XdpLink::try_from(fd_link).map_err(|source| DatapathError::Link {
            what: "the pinned link is not an XDP link".to_owned(),
            source,
        })?;
        let id = program
            .attach_to_link(link)
            .map_err(|source| DatapathError::Program {
                what: "replace the program in the pinned XDP link".to_owned(),
                source,
            })?;
        let _ = program.take_link(id);
        slot.record()?;
        return Ok((reopen(&slot.pin)?, AttachOutcome::TookOver));
    }
    let first = if mode == XdpAttachMode::Generic {
        XdpMode::Skb
    } else {
        XdpMode::Driver
    };
    let attached = program.attach(interface, first);
    let (id, outcome) = match attached {
        Ok(id) if first == XdpMode::Skb => (id, AttachOutcome::Generic),
        Ok(id) => (id, AttachOutcome::Driver),
        Err(driver_error) if mode == XdpAttachMode::Auto => {
            warn!(%interface, error = %driver_error, "driver-mode XDP refused; trying generic mode");
            let id = program.attach(interface, XdpMode::Skb).map_err(|source| DatapathError::Program {
                what: format!(
                    "attach XDP to {interface} (driver mode failed: {driver_error}; generic mode failed \
                     too; is another XDP program attached?)"
                ),
                source,
            })?;
            (id, AttachOutcome::Generic)
        }
        Err(source) => {
            return Err(DatapathError::Program {
                what: format!("attach XDP to {interface} in {mode:?} mode"),
                source,
            });
        }
    };
    let link = program
        .take_link(id)
        .map_err(|source| DatapathError::Program {
            what: "take the XDP link".to_owned(),
            source,
        })?;
    let fd_link = FdLink::try_from(link).map_err(|source| DatapathError::Link {
        what: "the kernel gave a netlink XDP attachment, which cannot be pinned".to_owned(),
        source,
    })?;
    let pinned = pin(fd_link, &slot.pin)?;
    slot.record()?;
    Ok((pinned, outcome))
}

/// Attaches (or takes over) a tc program on `slot.interface`'s ingress: a tcx link, or a
/// netlink filter where `mode` asks for one.
pub fn attach_tc_ingress(
    program: &mut SchedClassifier,
    slot: &LinkSlot,
    mode: TcAttachMode,
) -> Result<(TcAttachment, AttachOutcome), DatapathError> {
    if mode.netlink_here() {
        return attach_tc_netlink(program, slot);
    }
    attach_tcx(program, slot).map(|(link, outcome)| (TcAttachment::Pinned(link), outcome))
}

/// Attaches (or takes over) a tc program on `slot.interface`'s ingress, as a tcx link.
fn attach_tcx(
    program: &mut SchedClassifier,
    slot: &LinkSlot,
) -> Result<(PinnedLink, AttachOutcome), DatapathError> {
    let interface = slot.interface.as_str();
    if slot.can_take_over() {
        let fd_link = FdLink::from(reopen(&slot.pin)?);
        let link =
            SchedClassifierLink::try_from(fd_link).map_err(|source| DatapathError::Link {
                what: "the pinned link is not a tc link".to_owned(),
                source,
            })?;
        let id = program
            .attach_to_link(link)
            .map_err(|source| DatapathError::Program {
                what: "replace the program in the pinned tc link".to_owned(),
                source,
            })?;
        let _ = program.take_link(id);
        slot.record()?;
        return Ok((reopen(&slot.pin)?, AttachOutcome::TookOver));
    }
    let id = program
        .attach(interface, TcAttachType::Ingress)
        .map_err(|source| DatapathError::Program {
            what: format!("attach tc ingress to {interface}"),
            source,
        })?;
    let link = program
        .take_link(id)
        .map_err(|source| DatapathError::Program {
            what: "take the tc link".to_owned(),
            source,
        })?;
    let fd_link = FdLink::try_from(link).map_err(|source| DatapathError::Link {
        what:
            "the kernel gave a netlink tc attachment, which cannot be pinned (tcx needs Linux 6.6)"
                .to_owned(),
        source,
    })?;
    let pinned = pin(fd_link, &slot.pin)?;
    slot.record()?;
    Ok((pinned, AttachOutcome::Tc))
}

/// Unpins a link; with no other holder the kernel detaches its program.
pub fn remove_pinned_link(path: &Path) {
    if let Ok(pinned) = PinnedLink::from_pin(path)
        && let Ok(fd_link) = pinned.unpin()
    {
        drop(fd_link);
    } else {
        let _ = fs::remove_file(path);
    }
}
