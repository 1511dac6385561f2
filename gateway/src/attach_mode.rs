//! How the daemon attaches its programs: settings the loader reads and the configuration
//! declares, so they live below both.

/// How the tc programs are attached.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum TcAttachMode {
    /// tcx links where the kernel has them (6.6 and later), netlink filters before.
    #[default]
    Auto,
    /// tcx links only.
    Tcx,
    /// Netlink filters (clsact + `cls_bpf`), also where tcx exists.
    Netlink,
}

/// Which XDP attach mode to use.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum XdpAttachMode {
    /// Driver (native) mode, falling back to generic mode when the driver refuses.
    #[default]
    Auto,
    /// Driver mode only.
    Driver,
    /// Generic (skb) mode only. On veth this avoids the skb copy native XDP causes.
    Generic,
}

/// Where the gate runs on the external interface.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum GateHook {
    /// XDP in driver mode where the driver has native XDP and is not veth; tc everywhere else
    /// (veth copies every skb for an XDP program, and generic XDP runs on the skb anyway).
    /// `--xdp-mode generic` asks for XDP in generic mode explicitly.
    #[default]
    Auto,
    /// The XDP gate in front of the tc relay (with `--xdp-mode`).
    Xdp,
    /// Gate and relay in one tc program; no XDP.
    Tc,
}
