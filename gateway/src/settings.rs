//! Every setting of `gateway run`, declared once. The one list below makes the command-line
//! flags (clap), the keys of the TOML configuration file (serde, dashes become underscores),
//! the defaults, the precedence (a flag wins over the file, which wins over the default) and
//! what `--print-config` shows. Unknown keys and bad values are errors that name the key.
//!
//! ```toml
//! external = "eth0"
//! internal = "eth1"
//! listen = ["198.51.100.1:1080"]
//! users = "/etc/gateway/users"
//! resolvers = ["192.0.2.53"]
//! deny = ["10.0.0.0/8"]
//! allow_clients = ["198.51.100.0/24"]
//! allow_host_udp = ["192.0.2.123:123,203.0.113.1:123"]
//! datapath = "kernel"
//! idle_timeout = 300
//! metrics = "127.0.0.1:9464"
//! ```

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    num::{NonZeroU8, NonZeroU32, NonZeroU64, NonZeroUsize},
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{
    attach_mode::{GateHook, TcAttachMode, XdpAttachMode},
    binding::{self, PortRange},
    host_flow::HostFlow,
    server::{AssociationLimits, Timeouts, limits},
};

#[derive(Debug, Error)]
pub enum SettingsError {
    #[error("read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("config file {path}: key `{key}`: {message}")]
    Value {
        path: String,
        key: String,
        message: String,
    },
    #[error("`{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

/// Declares the settings: each one's doc comment is its `--help`, its `#[arg]` its flag, its
/// type the value in the file, and the expression after `=` its default.
macro_rules! settings {
    ($( $(#[$meta:meta])* $field:ident : $ty:ty = $default:expr ; )*) => {
        /// One source of settings (the command line or the file): `None` where it says nothing.
        #[derive(Debug, Clone, Default, clap::Args, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct Layer {
            $( $(#[$meta])* pub $field: Option<$ty>, )*
        }

        /// The effective settings: every value from a layer or its default.
        #[derive(Debug, Clone, PartialEq, Serialize)]
        pub struct Settings {
            $( pub $field: $ty, )*
        }

        impl Layer {
            /// This layer's values, and `lower`'s where this one has none.
            #[must_use]
            pub fn over(self, lower: Layer) -> Layer {
                Layer { $( $field: self.$field.or(lower.$field), )* }
            }

            /// The settings this layer gives, defaults for the rest.
            pub fn resolve(self) -> Settings {
                Settings { $( $field: self.$field.unwrap_or_else(|| $default), )* }
            }
        }

        impl Settings {
            /// The default of every setting.
            pub fn defaults() -> Settings {
                Layer::default().resolve()
            }
        }
    };
}

settings! {
    /// Interface facing the untrusted side (where unsolicited UDP arrives and is dropped).
    /// Required.
    #[arg(long, value_name = "IFACE")]
    external: String = String::new();
    /// Interface facing the protected clients. Required.
    #[arg(long, value_name = "IFACE")]
    internal: String = String::new();
    /// Instance name: separates pinned objects and lock files of several gateways on one host.
    #[arg(long, value_name = "NAME")]
    instance: String = crate::instance::DEFAULT_INSTANCE.to_owned();
    /// Address for SOCKS5 control connections (repeat for more). Default: every address of
    /// the internal interface, port 1080. Listeners are tied to the internal interface, and
    /// TCP to them arriving on the external one is dropped; an external address is refused.
    #[arg(long, value_name = "IP:PORT")]
    listen: Vec<SocketAddr> = Vec::new();
    /// A network control connections are accepted from (repeat for more); connections from
    /// anywhere else are closed at accept. Default: the internal interface's networks.
    /// Reloaded on SIGHUP.
    #[arg(long, value_name = "CIDR")]
    allow_clients: Vec<IpNet> = Vec::new();
    /// Users file of NAME:ARGON2ID-HASH lines (make lines with `gateway passwd NAME`); empty:
    /// none. Reloaded on SIGHUP: a removed user's sessions end; a file that does not load is
    /// refused and the previous users stay.
    #[arg(long, value_name = "FILE")]
    users: PathBuf = PathBuf::new();
    /// Accept clients without authentication (SOCKS method 00). `--allow-anonymous=false`
    /// turns off what the file turned on. Reloaded on SIGHUP.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    allow_anonymous: bool = false;
    /// A network clients may not reach through the gateway (repeat for more). The internal
    /// interface's networks, the gateway host's own addresses, loopback, multicast and
    /// broadcast are always refused. Reloaded on SIGHUP.
    #[arg(long, value_name = "CIDR")]
    deny: Vec<IpNet> = Vec::new();
    /// Nameserver for domain names in SOCKS requests, IP or IP:PORT (repeat for more).
    /// Default: the nameservers of /etc/resolv.conf. Each query's reply flow is admitted
    /// exactly while the query is outstanding.
    #[arg(long = "resolver", value_name = "IP[:PORT]")]
    resolvers: Vec<Nameserver> = Vec::new();
    /// Admit one exact UDP flow the host itself needs on the external interface (NTP, DHCP):
    /// `REMOTE_IP:PORT,LOCAL_IP:PORT`. Repeat for more. Everything else that no binding admits
    /// is dropped.
    #[arg(long, value_name = "REMOTE,LOCAL")]
    allow_host_udp: Vec<HostFlow> = Vec::new();
    /// Who relays confirmed bindings: `kernel` (tc programs) or `userspace` (for comparison
    /// and for interfaces where the kernel relay cannot run). The XDP gate drops unsolicited
    /// UDP either way. `xdp` is an old name for `kernel`.
    #[arg(long, value_enum, value_name = "WHO")]
    datapath: DatapathKind = DatapathKind::Kernel;
    /// How the daemon's log lines (on stderr) are written: `text` for people, `json` for
    /// journald and log collectors (one object per line: `timestamp`, `level`, `target`,
    /// `message` and the event's fields, `span` and `spans` with the control connection's
    /// `conn`, `peer` and `user`). Not changed by SIGHUP.
    #[arg(long, value_enum, value_name = "FORMAT")]
    log_format: LogFormat = LogFormat::Text;
    /// Serve the counters for Prometheus at `http://ADDR:PORT/metrics` (the Prometheus text
    /// format, `OpenMetrics` when the scraper's Accept asks for it), or `off`. Only a loopback
    /// address or an address of the internal interface: an external or unspecified one is
    /// refused at start. Not changed by SIGHUP.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: MetricsListen = MetricsListen::default();
    /// Where the gate runs on the external interface: `auto` (XDP in driver mode on a NIC
    /// whose driver has native XDP; tc on veth and where the driver has none, since there XDP
    /// only adds an skb copy or runs on the skb anyway), `xdp` (the XDP gate in front of the tc
    /// relay, in `--xdp-mode`) or `tc` (gate and relay in one tc program, no XDP).
    #[arg(long, value_enum, value_name = "HOOK")]
    gate_hook: GateHook = GateHook::Auto;
    /// XDP attach mode of the gate when it runs in XDP: `auto` (driver, else generic), `driver`
    /// or `generic`. With `--gate-hook auto`, `generic` asks for generic XDP explicitly.
    #[arg(long, value_enum, value_name = "MODE")]
    xdp_mode: XdpAttachMode = XdpAttachMode::Auto;
    /// How the tc relay programs are attached: `auto` (tcx links on Linux 6.6 and later,
    /// netlink filters before), `tcx`, or `netlink` (clsact + `cls_bpf` filters; they outlive
    /// the daemon like pinned links, and `gateway detach` removes them).
    #[arg(long, value_enum, value_name = "HOW")]
    tc_attach: TcAttachMode = TcAttachMode::Auto;
    /// Let an enhanced-mode step 2 with an unspecified REMOTE confirm a UDP Listen binding:
    /// datagrams from any remote to the relay port reach the client. Off: refused with 02.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    allow_listen: bool = false;
    /// Client-side relay ports of the enhanced mode, FIRST-LAST. Reserved for the gateway at
    /// start (`net.ipv4.ip_local_reserved_ports`, released by `gateway detach`); a range
    /// holding a port in use is refused.
    #[arg(long, value_name = "FIRST-LAST")]
    internal_ports: PortRange = binding::Config::default().internal_ports;
    /// Remote-side relay ports of the enhanced mode, for each external address, FIRST-LAST.
    /// Reserved like --internal-ports.
    #[arg(long, value_name = "FIRST-LAST")]
    external_ports: PortRange = binding::Config::default().external_ports;
    /// Capacity of the kernel binding map (a confirmed RTP pair takes two entries).
    #[arg(long, value_name = "N")]
    max_bindings: NonZeroU32 = NonZeroU32::new(gateway_common::DEFAULT_MAX_BINDINGS)
        .unwrap_or(NonZeroU32::MIN);
    /// Most control connections served at once, across all listeners; more are closed at
    /// accept and counted.
    #[arg(long, value_name = "N")]
    max_connections: NonZeroUsize = non_zero(limits::DEFAULT_MAX_CONNECTIONS);
    /// Most control connections from one client address; more are closed at accept and
    /// counted.
    #[arg(long, value_name = "N")]
    max_connections_per_client: NonZeroUsize =
        non_zero(limits::DEFAULT_MAX_CONNECTIONS_PER_CLIENT);
    /// Most live enhanced-mode bindings per control connection (half-bound, confirmed and
    /// one-step Opens); more get `01` and are counted.
    #[arg(long, value_name = "N")]
    max_bindings_per_connection: NonZeroUsize =
        non_zero(binding::Config::default().max_bindings_per_connection);
    /// Most live enhanced-mode bindings per user across all their connections; an anonymous
    /// client counts by its address.
    #[arg(long, value_name = "N")]
    max_bindings_per_user: NonZeroUsize =
        non_zero(binding::Config::default().max_bindings_per_user);
    /// Most remotes one RFC 1928 UDP ASSOCIATE admits at once; datagrams to more are dropped
    /// and counted.
    #[arg(long, value_name = "N")]
    max_remotes_per_association: NonZeroUsize =
        non_zero(AssociationLimits::default().max_remotes);
    /// Seconds a half-bound enhanced-mode binding (step 1 done) waits for its step 2
    /// (5 to 300).
    #[arg(long, value_name = "SECONDS")]
    pending_timeout: u64 = binding::Config::default().pending_timeout.as_secs();
    /// Seconds a confirmed binding, or a remote a UDP ASSOCIATE admitted, lives without a
    /// datagram (1 to 86400).
    #[arg(long, value_name = "SECONDS")]
    idle_timeout: u64 = binding::Config::default().idle_timeout.as_secs();
    /// Seconds from accepting a control connection to its complete request; a silent or
    /// dribbling client is cut off.
    #[arg(long, value_name = "SECONDS")]
    handshake_timeout: NonZeroU64 = seconds(Timeouts::default().handshake);
    /// Seconds an outbound TCP connect of a CONNECT may take.
    #[arg(long, value_name = "SECONDS")]
    connect_timeout: NonZeroU64 = seconds(Timeouts::default().connect);
    /// Seconds a BIND waits for its peer to connect.
    #[arg(long, value_name = "SECONDS")]
    bind_accept_timeout: NonZeroU64 = seconds(Timeouts::default().bind_accept);
    /// Seconds a CONNECT or BIND relay lives with no byte in either direction.
    #[arg(long, value_name = "SECONDS")]
    tcp_idle_timeout: NonZeroU64 = seconds(Timeouts::default().tcp_idle);
    /// A multicast group prefix clients may receive (repeat for more), e.g. 233.252.0.0/24.
    /// None by default: every multicast receive bind gets `11`; a group outside every prefix
    /// gets `14`.
    #[arg(long, value_name = "CIDR")]
    allow_multicast_receive: Vec<IpNet> = Vec::new();
    /// A multicast group prefix clients may send to (repeat for more). None by default: every
    /// multicast send bind gets `12`; a group outside every prefix gets `14`.
    #[arg(long, value_name = "CIDR")]
    allow_multicast_send: Vec<IpNet> = Vec::new();
    /// Highest TTL (hop limit) a multicast send binding may ask for; more gets `15`.
    #[arg(long, value_name = "N")]
    multicast_max_ttl: NonZeroU8 = NonZeroU8::new(binding::MulticastPolicy::default().max_ttl)
        .unwrap_or(NonZeroU8::MIN);
    /// Multicast receive modes allowed: `mu` (multicast-to-unicast: each client gets the
    /// group as unicast with its AID), `mm` (multicast-to-multicast: re-sent on the internal
    /// interface, TTL 1) or `both`. A bind asking for another mode gets `11`.
    #[arg(long, value_enum, value_name = "MODES")]
    multicast_modes: MulticastModesSetting = MulticastModesSetting::Mu;
    /// Mode of a multicast receive bind that asks for none (or both): `mu` or `mm`; the other
    /// allowed one when this one is not allowed.
    #[arg(long, value_enum, value_name = "MODE")]
    multicast_default_mode: MulticastModeSetting = MulticastModeSetting::Mu;
    /// Allowed sources of one group: `GROUP=SOURCE[,SOURCE...]` (repeat for more groups). The
    /// gateway joins such a group source-specifically, and the gate drops (and counts) its
    /// datagrams from any other source, such as another gateway on the border. A group
    /// without a list accepts any source.
    #[arg(long, value_name = "GROUP=SOURCES")]
    multicast_sources: Vec<GroupSources> = Vec::new();
    /// Most subscribers of one group the kernel delivers to (at most 64); the userspace relay
    /// serves the rest.
    #[arg(long, value_name = "N")]
    multicast_kernel_subscribers: NonZeroUsize = non_zero(gateway_common::MAX_KERNEL_SUBSCRIBERS);
    /// Most multicast groups (address and port) with bindings at once; a bind for one more
    /// gets `01`. The kernel's group map holds 256.
    #[arg(long, value_name = "N")]
    multicast_max_groups: NonZeroUsize = non_zero(64);
    /// After a clean stop (SIGINT/SIGTERM), detach and unpin the gate, which opens the
    /// firewall. Off: the gate stays attached and dropping until `gateway detach`.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    remove_gate_on_exit: bool = false;
}

fn non_zero(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN)
}

fn seconds(duration: Duration) -> NonZeroU64 {
    NonZeroU64::new(duration.as_secs()).unwrap_or(NonZeroU64::MIN)
}

/// Who relays the datagrams of confirmed bindings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatapathKind {
    /// The kernel: tc programs rewrite and redirect (the XDP gate admits).
    Kernel,
    /// The userspace relay (the XDP gate still admits and drops).
    Userspace,
    /// The old name of `kernel`; accepted with a deprecation line in the log.
    #[value(hide = true)]
    Xdp,
}

impl DatapathKind {
    pub const fn describe(self) -> &'static str {
        match self {
            Self::Kernel | Self::Xdp => "the kernel (tc programs)",
            Self::Userspace => "the userspace relay",
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Where the metrics endpoint listens: `off`, or an address and port. An unspecified address
/// is refused here; whether the address is inside is checked at start, against the interfaces.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetricsListen(pub Option<SocketAddr>);

impl FromStr for MetricsListen {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        if text.is_empty() || text == "off" {
            return Ok(Self(None));
        }
        let addr: SocketAddr = text
            .parse()
            .map_err(|_| format!("{text:?} is not `off` or ADDR:PORT"))?;
        if addr.ip().to_canonical().is_unspecified() {
            return Err(format!(
                "{addr}: an unspecified address would serve the counters on every interface, \
                 the external one too; give a loopback address or an address of the internal \
                 interface"
            ));
        }
        Ok(Self(Some(addr)))
    }
}

impl fmt::Display for MetricsListen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(addr) => addr.fmt(f),
            None => f.write_str("off"),
        }
    }
}

/// Which multicast receive modes are allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MulticastModesSetting {
    /// Multicast-to-unicast only.
    Mu,
    /// Multicast-to-multicast only.
    Mm,
    /// Both.
    Both,
}

impl MulticastModesSetting {
    pub fn modes(self) -> binding::MulticastModes {
        binding::MulticastModes {
            to_unicast: self != Self::Mm,
            to_multicast: self != Self::Mu,
        }
    }
}

/// One multicast receive mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MulticastModeSetting {
    /// Multicast-to-unicast.
    Mu,
    /// Multicast-to-multicast.
    Mm,
}

impl MulticastModeSetting {
    pub fn mode(self) -> binding::MulticastMode {
        match self {
            Self::Mu => binding::MulticastMode::ToUnicast,
            Self::Mm => binding::MulticastMode::ToMulticast,
        }
    }
}

/// The allowed sources of one group: `GROUP=SOURCE[,SOURCE...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSources {
    pub group: IpAddr,
    pub sources: Vec<IpAddr>,
}

impl FromStr for GroupSources {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let (group, sources) = text
            .split_once('=')
            .ok_or_else(|| format!("{text:?} is not GROUP=SOURCE[,SOURCE...]"))?;
        let group: IpAddr = group
            .trim()
            .parse()
            .map_err(|_| format!("{group:?} is not an IP address"))?;
        if !group.is_multicast() {
            return Err(format!("{group} is not a multicast group"));
        }
        let sources = sources
            .split(',')
            .map(|source| {
                let ip: IpAddr = source
                    .trim()
                    .parse()
                    .map_err(|_| format!("{source:?} is not an IP address"))?;
                if ip.is_multicast() || ip.is_unspecified() || ip.is_ipv6() != group.is_ipv6() {
                    return Err(format!("{ip} cannot be a source of {group}"));
                }
                Ok(ip)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { group, sources })
    }
}

impl fmt::Display for GroupSources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}=", self.group)?;
        for (i, source) in self.sources.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{source}")?;
        }
        Ok(())
    }
}

/// A nameserver: `IP` or `IP:PORT` (port 53 when absent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nameserver(pub SocketAddr);

impl FromStr for Nameserver {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        text.parse::<SocketAddr>()
            .or_else(|_| text.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
            .map(Nameserver)
            .map_err(|_| format!("{text:?} is not an IP or IP:PORT"))
    }
}

impl fmt::Display for Nameserver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Values written as text in the file, as on the command line.
macro_rules! serde_as_text {
    ($($ty:ty),*) => {$(
        impl Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    )*};
}
serde_as_text!(Nameserver, PortRange, HostFlow, GroupSources, MetricsListen);

impl Settings {
    /// The checks no single value's type makes: what a start needs, and the timeouts' ranges.
    pub fn check(&self) -> Result<(), SettingsError> {
        let invalid = |key, message: &str| {
            Err(SettingsError::Invalid {
                key,
                message: message.to_owned(),
            })
        };
        if self.external.is_empty() {
            return invalid("external", "no external interface: give --external IFACE");
        }
        if self.internal.is_empty() {
            return invalid("internal", "no internal interface: give --internal IFACE");
        }
        let pending = Duration::from_secs(self.pending_timeout);
        if !(binding::PENDING_TIMEOUT_MIN..=binding::PENDING_TIMEOUT_MAX).contains(&pending) {
            return invalid("pending_timeout", "must be 5 to 300 seconds");
        }
        if self.multicast_kernel_subscribers.get() > gateway_common::MAX_KERNEL_SUBSCRIBERS {
            return invalid("multicast_kernel_subscribers", "must be 1 to 64");
        }
        if self.multicast_max_groups.get() > gateway_common::MAX_GROUPS as usize {
            return invalid("multicast_max_groups", "must be 1 to 256");
        }
        for prefix in self
            .allow_multicast_receive
            .iter()
            .chain(&self.allow_multicast_send)
        {
            if !prefix.network().is_multicast() || !prefix.broadcast().is_multicast() {
                return invalid(
                    "allow_multicast_receive",
                    &format!("{prefix} is not inside 224.0.0.0/4 or ff00::/8"),
                );
            }
        }
        let idle = Duration::from_secs(self.idle_timeout);
        if !(Duration::from_secs(1)..=binding::IDLE_TIMEOUT_MAX).contains(&idle) {
            return invalid("idle_timeout", "must be 1 to 86400 seconds");
        }
        Ok(())
    }

    /// The users file, if one is set.
    pub fn users_file(&self) -> Option<&Path> {
        (!self.users.as_os_str().is_empty()).then_some(self.users.as_path())
    }

    /// The SOCKS server's timeouts.
    pub fn timeouts(&self) -> Timeouts {
        Timeouts {
            handshake: Duration::from_secs(self.handshake_timeout.get()),
            connect: Duration::from_secs(self.connect_timeout.get()),
            bind_accept: Duration::from_secs(self.bind_accept_timeout.get()),
            tcp_idle: Duration::from_secs(self.tcp_idle_timeout.get()),
        }
    }

    /// The effective settings as a TOML file `--config` accepts as it is.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|error| format!("# cannot write as TOML: {error}\n"))
    }
}

/// Reads and parses a configuration file.
pub fn load(path: &Path) -> Result<Layer, SettingsError> {
    let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text, &path.display().to_string())
}

/// Parses configuration text; `origin` names it in errors.
pub fn parse(text: &str, origin: &str) -> Result<Layer, SettingsError> {
    toml::from_str(text).map_err(|error: toml::de::Error| {
        let message = error.message().trim().replace('\n', " ");
        match error.span().and_then(|span| key_at(text, span.start)) {
            Some(key) => SettingsError::Value {
                path: origin.to_owned(),
                key,
                message,
            },
            None => SettingsError::Parse {
                path: origin.to_owned(),
                message: error.to_string().trim().replace('\n', " "),
            },
        }
    })
}

/// Every problem of configuration text, one per bad key (not only the first, as a start
/// reports): a syntax error, an unknown key (with the nearest known one), a bad value, then,
/// when every value is good, what [`Settings::check`] finds. Empty: the file is good.
pub fn check_text(text: &str, origin: &str) -> Vec<SettingsError> {
    let table: toml::Table = match text.parse() {
        Ok(table) => table,
        Err(error) => {
            return vec![SettingsError::Parse {
                path: origin.to_owned(),
                message: error.to_string().trim().replace('\n', " "),
            }];
        }
    };
    let known = toml::Table::try_from(Settings::defaults()).unwrap_or_default();
    let mut problems = Vec::new();
    let mut good = toml::Table::new();
    for (key, value) in &table {
        let error = |message: String| SettingsError::Value {
            path: origin.to_owned(),
            key: key.clone(),
            message,
        };
        if !known.contains_key(key) {
            let nearest = known
                .keys()
                .map(|k| (strsim::levenshtein(k, key), k))
                .min()
                .filter(|(distance, _)| *distance <= 3)
                .map_or_else(String::new, |(_, k)| format!(" (did you mean `{k}`?)"));
            problems.push(error(format!("unknown key{nearest}")));
            continue;
        }
        // Each key alone, so one bad value does not hide the next.
        let single = toml::Table::from_iter([(key.clone(), value.clone())]);
        match toml::Value::Table(single).try_into::<Layer>() {
            Ok(_) => {
                good.insert(key.clone(), value.clone());
            }
            Err(e) => problems.push(error(e.message().trim().replace('\n', " "))),
        }
    }
    // The checks across keys, on the good values (a bad one is named above already).
    match toml::Value::Table(good).try_into::<Layer>() {
        Ok(layer) => problems.extend(layer.resolve().check().err()),
        Err(e) => problems.push(SettingsError::Parse {
            path: origin.to_owned(),
            message: e.message().trim().replace('\n', " "),
        }),
    }
    problems
}

/// The key of the `key = value` line holding byte `offset` of `text`.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let start = text.get(..offset)?.rfind('\n').map_or(0, |i| i + 1);
    let line = text[start..].lines().next()?;
    let key = line.split_once('=')?.0.trim().trim_matches('"');
    (!key.is_empty() && !key.starts_with('#')).then(|| key.to_owned())
}

/// The help of `gateway run` with each setting's default appended, from [`Settings::defaults`]
/// (so a default is written in one place).
#[must_use]
pub fn document_defaults(command: clap::Command) -> clap::Command {
    let defaults = toml::Table::try_from(Settings::defaults()).unwrap_or_default();
    command.mut_args(|arg| {
        let shown = match defaults.get(arg.get_id().as_str()) {
            Some(toml::Value::String(text)) if !text.is_empty() => text.clone(),
            Some(toml::Value::Array(items)) if !items.is_empty() => items
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            Some(value @ (toml::Value::Integer(_) | toml::Value::Boolean(_))) => value.to_string(),
            _ => return arg,
        };
        let with_default = |help: Option<&clap::builder::StyledStr>| {
            format!(
                "{} [default: {shown}]",
                help.map(ToString::to_string).unwrap_or_default()
            )
        };
        let help = with_default(arg.get_help());
        let long = arg.get_long_help().map(|long| with_default(Some(long)));
        let arg = arg.help(help);
        match long {
            Some(long) => arg.long_help(long),
            None => arg,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_file_parses() {
        let layer = parse(
            r#"
            external = "eth0"
            internal = "eth1"
            listen = ["198.51.100.1:1080", "[2001:db8:1::1]:1080"]
            allow_anonymous = true
            resolvers = ["192.0.2.53", "[2001:db8::53]:5353"]
            deny = ["10.0.0.0/8"]
            allow_clients = ["198.51.100.0/25", "2001:db8:1::/64"]
            allow_host_udp = ["192.0.2.123:123,203.0.113.1:123"]
            datapath = "userspace"
            max_connections = 10
            idle_timeout = 60
            remove_gate_on_exit = true
            metrics = "127.0.0.1:9464"
            "#,
            "test.toml",
        )
        .unwrap();
        let settings = layer.resolve();
        settings.check().unwrap();
        assert_eq!(settings.external, "eth0");
        assert_eq!(settings.listen.len(), 2);
        assert_eq!(settings.resolvers[0].0, "192.0.2.53:53".parse().unwrap());
        assert_eq!(settings.resolvers[1].0.port(), 5353);
        assert_eq!(settings.allow_host_udp.len(), 1);
        assert_eq!(settings.datapath, DatapathKind::Userspace);
        assert_eq!(settings.allow_clients.len(), 2);
        assert_eq!(settings.idle_timeout, 60);
        assert!(settings.remove_gate_on_exit);
        assert_eq!(settings.max_connections.get(), 10);
        assert_eq!(settings.metrics.0, Some("127.0.0.1:9464".parse().unwrap()));
    }

    #[test]
    fn metrics_is_off_by_default_and_never_unspecified() {
        assert_eq!(Settings::defaults().metrics, MetricsListen(None));
        assert!(Settings::defaults().to_toml().contains("metrics = \"off\""));
        assert_eq!("off".parse::<MetricsListen>(), Ok(MetricsListen(None)));
        for unspecified in ["0.0.0.0:9464", "[::]:9464", "[::ffff:0.0.0.0]:9464"] {
            let error = unspecified.parse::<MetricsListen>().unwrap_err();
            assert!(error.contains("unspecified"), "{unspecified}: {error}");
        }
        let base = "external = \"a\"\ninternal = \"b\"\n";
        assert!(error_of(&format!("{base}metrics = \"0.0.0.0:9464\"\n")).contains("`metrics`"));
        assert!(error_of(&format!("{base}metrics = \"nowhere\"\n")).contains("`metrics`"));
        assert!(check_text(&format!("{base}metrics = \"[::1]:9464\"\n"), "gw.toml").is_empty());
    }

    fn error_of(text: &str) -> String {
        parse(text, "gw.toml")
            .map(Layer::resolve)
            .and_then(|settings| settings.check())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn errors_name_the_key() {
        let base = "external = \"a\"\ninternal = \"b\"\n";
        for (text, key) in [
            ("extrnal = \"eth0\"", "extrnal"),
            ("max_connections = \"many\"", "max_connections"),
            ("max_connections = 0", "max_connections"),
            ("max_bindings_per_user = 0", "max_bindings_per_user"),
            ("resolvers = [\"192.0.2.53\", \"nope\"]", "resolvers"),
            ("allow_host_udp = [\"192.0.2.1:53\"]", "allow_host_udp"),
            ("datapath = \"dpdk\"", "datapath"),
            ("deny = [\"10.0.0.0/33\"]", "deny"),
            ("allow_clients = [\"inside\"]", "allow_clients"),
            ("tc_attach = \"ebpf\"", "tc_attach"),
            ("external_ports = \"40000-30000\"", "external_ports"),
            ("pending_timeout = 1", "pending_timeout"),
            ("idle_timeout = 0", "idle_timeout"),
            ("handshake_timeout = 0", "handshake_timeout"),
        ] {
            let error = error_of(&format!("{base}{text}\n"));
            assert!(error.contains(&format!("`{key}`")), "{text}: {error}");
        }
        assert!(error_of("internal = \"b\"").contains("`external`"));
        assert!(parse("xdp_mode = \"generic\"", "gw.toml").is_ok());
        assert!(
            parse("datapath = \"xdp\"", "gw.toml").is_ok(),
            "the old name"
        );
    }

    #[test]
    fn a_flag_wins_over_the_file_and_the_file_over_the_default() {
        let file = parse(
            "external = \"eth0\"\ninternal = \"eth1\"\nmax_connections = 10\nallow_anonymous = true\n\
             deny = [\"10.0.0.0/8\"]\n",
            "gw.toml",
        )
        .unwrap();
        let flags = Layer {
            max_connections: Some(non_zero(20)),
            allow_anonymous: Some(false),
            ..Layer::default()
        };
        let settings = flags.over(file).resolve();
        assert_eq!(settings.max_connections.get(), 20);
        assert!(!settings.allow_anonymous, "a flag turns a boolean off");
        assert_eq!(settings.deny.len(), 1, "from the file");
        assert_eq!(
            settings.max_connections_per_client,
            Settings::defaults().max_connections_per_client
        );
    }

    #[test]
    fn the_printed_settings_read_back_the_same() {
        let mut settings = Settings::defaults();
        settings.external = "eth0".into();
        settings.internal = "eth1".into();
        settings.allow_host_udp = vec![HostFlow::parse("192.0.2.123:123,203.0.113.1:123").unwrap()];
        settings.resolvers = vec!["[2001:db8::53]:5353".parse().unwrap()];
        settings.users = "/etc/gateway/users".into();
        let again = parse(&settings.to_toml(), "printed").unwrap().resolve();
        assert_eq!(again, settings);
    }

    #[test]
    fn an_empty_file_is_all_defaults() {
        let settings = parse("", "empty.toml").unwrap().resolve();
        assert_eq!(settings, Settings::defaults());
        assert!(settings.users_file().is_none());
    }
}
