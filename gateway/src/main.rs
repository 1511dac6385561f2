//! The `gateway` command: the daemon (`run`) and the operator's tools (`stats`).

use std::process::ExitCode;

mod daemon;

use std::{net::SocketAddr, path::PathBuf};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use gateway::{
    binding::PortRange,
    datapath::HostFlow,
    instance::{DEFAULT_INSTANCE, Instance},
    stats,
};
use gateway_common::DEFAULT_MAX_BINDINGS;
use ipnet::IpNet;
use tracing_subscriber::EnvFilter;

use gateway::config::parse_resolver;

#[derive(Parser)]
#[command(
    name = "gateway",
    version,
    about = "Firewall traversal gateway: SOCKS5 with the two-step UDP binding, and an eBPF gate \
             that drops every inbound UDP datagram no binding admits"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: attach the XDP gate to the external interface and serve until SIGINT or
    /// SIGTERM; SIGHUP reloads the users file and the policy. Needs root. Maps and links are
    /// pinned under /sys/fs/bpf/gateway/INSTANCE/: a stop, a crash or a failed start leaves the
    /// gate attached and dropping (the next daemon takes it over); only `gateway detach` or
    /// --remove-gate-on-exit removes it.
    Run(RunArgs),
    /// List the live bindings of a running gateway: enhanced-mode bindings with their owner (user,
    /// control peer), state and addresses, and every kernel entry with its counters.
    Bindings {
        /// Instance name of the gateway to ask.
        #[arg(long, value_name = "NAME", default_value = DEFAULT_INSTANCE)]
        instance: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove the gate of a stopped or dead gateway: its XDP and tc links (the gate opens: unsolicited
    /// UDP reaches the host again), its pinned maps, the relay ports it reserved and its run
    /// directory. The gateway installs no tc filters besides. Refuses while the instance's
    /// daemon is alive: stop it (SIGTERM) first, then detach.
    Detach {
        /// Instance name of the gateway to remove.
        #[arg(long, value_name = "NAME", default_value = DEFAULT_INSTANCE)]
        instance: String,
    },
    /// Read a password from stdin and print a users-file line `NAME:$argon2id$...`.
    Passwd {
        /// The user name (1 to 255 octets, no ':').
        name: String,
    },
    /// Print packets and bytes per datapath exit reason of a running gateway.
    Stats {
        /// Instance name of the gateway to read.
        #[arg(long, value_name = "NAME", default_value = DEFAULT_INSTANCE)]
        instance: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Play an RTSP stream through a gateway: control over SOCKS CONNECT, media over two-step
    /// RTP-pair bindings (step 1 before SETUP, step 2 with the reply's source before PLAY), RTCP
    /// receiver reports back; print the steps and per-track statistics, write the audio as WAV.
    RtspGet(gateway::rtsp::cli::RtspGetArgs),
}

/// The flags of `gateway run` (see `gateway run --help`).
#[derive(clap::Args)]
struct RunArgs {
    /// A TOML file with any of these settings (keys as the flags, `_` for `-`); flags given
    /// here win over the file. Unknown keys are errors.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Interface facing the untrusted side (where unsolicited UDP arrives and is dropped).
    #[arg(long, value_name = "IFACE")]
    external: Option<String>,
    /// Interface facing the protected clients.
    #[arg(long, value_name = "IFACE")]
    internal: Option<String>,
    /// Instance name: separates pinned objects and lock files of several gateways on one host
    /// [default: gateway].
    #[arg(long, value_name = "NAME")]
    instance: Option<String>,
    /// Capacity of the kernel binding map [default: 65536].
    #[arg(long, value_name = "N")]
    max_bindings: Option<u32>,
    /// Admit one exact UDP flow the host itself needs on the external interface (NTP, DHCP,
    /// a resolver's replies): `REMOTE_IP:PORT,LOCAL_IP:PORT`. Repeat for more. Everything else
    /// that no binding admits is dropped.
    #[arg(long = "allow-host-udp", value_name = "REMOTE,LOCAL", value_parser = HostFlow::parse)]
    allow_host_udp: Vec<HostFlow>,
    /// Address for SOCKS5 control connections (repeat for more). Default: every address of
    /// the internal interface, port 1080. Listeners are tied to the internal interface, and
    /// TCP to them arriving on the external one is dropped; an external address is refused.
    #[arg(long, value_name = "IP:PORT")]
    listen: Vec<SocketAddr>,
    /// A network control connections are accepted from (repeat for more); connections from
    /// anywhere else are closed at accept. Default: the internal interface's networks.
    /// Reloaded on SIGHUP.
    #[arg(long = "allow-clients", value_name = "CIDR")]
    allow_clients: Vec<IpNet>,
    /// Users file of NAME:ARGON2ID-HASH lines (make lines with `gateway passwd NAME`).
    /// Reloaded on SIGHUP: a removed user's sessions end; a file that does not load is
    /// refused and the previous users stay.
    #[arg(long, value_name = "FILE")]
    users: Option<PathBuf>,
    /// Accept clients without authentication (SOCKS method 00). `--allow-anonymous=false` turns
    /// off what the file turned on.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    allow_anonymous: Option<bool>,
    /// Nameserver for domain names in SOCKS requests, IP or IP:PORT (repeat for more).
    /// Default: the nameservers of /etc/resolv.conf. Their replies are allow-listed exactly.
    #[arg(long = "resolver", value_name = "IP[:PORT]", value_parser = parse_resolver)]
    resolvers: Vec<SocketAddr>,
    /// A network clients may not reach through the gateway (repeat for more). The internal
    /// interface's networks, the gateway's own addresses, loopback, multicast and broadcast
    /// are always refused. The file's list is reloaded on SIGHUP.
    #[arg(long, value_name = "CIDR")]
    deny: Vec<IpNet>,
    /// Most control connections served at once, across all listeners; more are closed at
    /// accept and counted [default: 4096].
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// Most control connections from one client address; more are closed at accept and
    /// counted [default: 256].
    #[arg(long, value_name = "N")]
    max_connections_per_client: Option<usize>,
    /// Who relays confirmed bindings: `xdp` (in the kernel) or `userspace` (for comparison
    /// and for interfaces without XDP). The XDP gate drops unsolicited UDP either way
    /// [default: xdp].
    #[arg(long, value_enum)]
    datapath: Option<daemon::DatapathKind>,
    /// XDP attach mode of the gate: `auto` (driver, else generic), `driver` or `generic`.
    /// On veth, generic mode avoids the skb copy that native XDP causes.
    #[arg(long, value_enum)]
    xdp_mode: Option<XdpModeArg>,
    /// How the tc relay programs are attached: `auto` (tcx links on Linux 6.6 and later, netlink
    /// filters before), `tcx`, or `netlink` (clsact + `cls_bpf` filters; they outlive the daemon
    /// like pinned links, and `gateway detach` removes them) [default: auto].
    #[arg(long = "tc-attach", value_enum)]
    tc_attach: Option<TcAttachArg>,
    /// Let an enhanced-mode step 2 with an unspecified REMOTE confirm a UDP Listen binding:
    /// datagrams from any remote to the relay port reach the client. Off: refused with 02.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    allow_listen: Option<bool>,
    /// Most live enhanced-mode bindings per control connection (half-bound, confirmed and
    /// one-step Opens); more get `01` and are counted [default: 1024].
    #[arg(long, value_name = "N")]
    max_bindings_per_connection: Option<usize>,
    /// Most live enhanced-mode bindings per user across all their connections; an anonymous
    /// client counts by its address [default: 8192].
    #[arg(long, value_name = "N")]
    max_bindings_per_user: Option<usize>,
    /// Most remotes one RFC 1928 UDP ASSOCIATE admits at once; datagrams to more are dropped
    /// and counted [default: 4096].
    #[arg(long, value_name = "N")]
    max_remotes_per_association: Option<usize>,
    /// Client-side relay ports of the enhanced mode, FIRST-LAST [default: 40000-49999].
    /// Reserved for the gateway at start (`net.ipv4.ip_local_reserved_ports`, released by
    /// `gateway detach`); a range holding a port in use is refused.
    #[arg(long, value_name = "FIRST-LAST", value_parser = PortRange::parse)]
    internal_ports: Option<PortRange>,
    /// Remote-side relay ports of the enhanced mode, for each external address,
    /// FIRST-LAST [default: 30000-39999]. Reserved like --internal-ports.
    #[arg(long, value_name = "FIRST-LAST", value_parser = PortRange::parse)]
    external_ports: Option<PortRange>,
    /// After a clean stop (SIGINT/SIGTERM), detach and unpin the gate, which opens the
    /// firewall. Off: the gate stays attached and dropping until `gateway detach`.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    remove_gate_on_exit: Option<bool>,
    /// Print the effective configuration (the file merged with the flags, defaults filled in)
    /// as a TOML file `--config` accepts, and exit. Needs no root.
    #[arg(long)]
    print_config: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("GATEWAY_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("gateway: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(args) => {
            let print = args.print_config;
            let daemon_args = daemon_args(args)?;
            if print {
                print!("{}", effective_config(&daemon_args)?);
                Ok(())
            } else {
                daemon::run(daemon_args)
            }
        }
        Command::Bindings { instance, json } => show_bindings(&instance, json),
        Command::Detach { instance } => detach(&instance),
        Command::Passwd { name } => passwd(&name),
        Command::Stats { instance, json } => show_stats(&instance, json),
        Command::RtspGet(args) => gateway::rtsp::cli::rtsp_get(&args)
            .map(drop)
            .map_err(Into::into),
    }
}

/// `gateway run`'s flags merged with its configuration file (a flag wins).
#[expect(
    clippy::too_many_lines,
    reason = "one line per setting: the flag, else the file, else the default"
)]
fn daemon_args(args: RunArgs) -> Result<daemon::DaemonArgs> {
    let RunArgs {
        config,
        external,
        internal,
        instance,
        max_bindings,
        allow_host_udp,
        listen,
        allow_clients,
        users,
        allow_anonymous,
        resolvers,
        deny,
        max_connections,
        max_connections_per_client,
        allow_listen,
        datapath,
        xdp_mode,
        tc_attach,
        remove_gate_on_exit,
        print_config: _,
        internal_ports,
        external_ports,
        max_bindings_per_connection,
        max_bindings_per_user,
        max_remotes_per_association,
    } = args;
    let file = match &config {
        Some(path) => gateway::config::load(path)?,
        None => gateway::config::Checked::default(),
    };
    let f = file.file;
    // A flag given on the command line wins over the file; lists replace, not merge.
    let datapath = match datapath {
        Some(datapath) => datapath,
        None if f.datapath.as_deref() == Some("userspace") => daemon::DatapathKind::Userspace,
        None => daemon::DatapathKind::Xdp,
    };
    let external = external
        .or(f.external)
        .context("no external interface: give --external IFACE (or `external` in --config)")?;
    let internal = internal
        .or(f.internal)
        .context("no internal interface: give --internal IFACE (or `internal` in --config)")?;
    Ok(daemon::DaemonArgs {
        datapath,
        xdp_mode: match xdp_mode.or_else(|| from_file(f.xdp_mode.as_deref())) {
            None | Some(XdpModeArg::Auto) => gateway::datapath::XdpAttachMode::Auto,
            Some(XdpModeArg::Driver) => gateway::datapath::XdpAttachMode::Driver,
            Some(XdpModeArg::Generic) => gateway::datapath::XdpAttachMode::Generic,
        },
        tc_mode: match tc_attach.or_else(|| from_file(f.tc_attach.as_deref())) {
            None | Some(TcAttachArg::Auto) => gateway::datapath::TcAttachMode::Auto,
            Some(TcAttachArg::Tcx) => gateway::datapath::TcAttachMode::Tcx,
            Some(TcAttachArg::Netlink) => gateway::datapath::TcAttachMode::Netlink,
        },
        access: daemon::AccessSource {
            config,
            users,
            allow_anonymous,
            deny,
            clients: allow_clients,
            external: external.clone(),
            internal: internal.clone(),
        },
        external,
        internal,
        instance: instance
            .or(f.instance)
            .unwrap_or_else(|| DEFAULT_INSTANCE.to_owned()),
        max_bindings: max_bindings
            .or(f.max_bindings)
            .unwrap_or(DEFAULT_MAX_BINDINGS),
        host_allow: or_file(allow_host_udp, file.host_flows),
        listen: or_file(listen, f.listen),
        resolvers: or_file(resolvers, file.resolvers),
        max_connections: max_connections
            .or(f.max_connections)
            .unwrap_or(gateway::server::limits::DEFAULT_MAX_CONNECTIONS),
        max_connections_per_client: max_connections_per_client
            .or(f.max_connections_per_client)
            .unwrap_or(gateway::server::limits::DEFAULT_MAX_CONNECTIONS_PER_CLIENT),
        allow_listen: allow_listen.or(f.allow_listen).unwrap_or(false),
        remove_gate_on_exit: remove_gate_on_exit
            .or(f.remove_gate_on_exit)
            .unwrap_or(false),
        max_bindings_per_connection: max_bindings_per_connection
            .or(f.max_bindings_per_connection)
            .unwrap_or(gateway::binding::Config::default().max_bindings_per_connection),
        max_bindings_per_user: max_bindings_per_user
            .or(f.max_bindings_per_user)
            .unwrap_or(gateway::binding::Config::default().max_bindings_per_user),
        max_remotes_per_association: max_remotes_per_association
            .or(f.max_remotes_per_association)
            .unwrap_or(gateway::server::AssociationLimits::default().max_remotes),
        internal_ports: internal_ports
            .or(file.internal_ports)
            .unwrap_or(gateway::binding::Config::default().internal_ports),
        external_ports: external_ports
            .or(file.external_ports)
            .unwrap_or(gateway::binding::Config::default().external_ports),
    })
}

/// The effective configuration as TOML with the file's keys: what `--print-config` shows, and
/// a file `--config` accepts as it is.
fn effective_config(args: &daemon::DaemonArgs) -> Result<String> {
    use toml::Value;
    let strings = |items: Vec<String>| Value::Array(items.into_iter().map(Value::String).collect());
    let count = |n: usize| Value::Integer(i64::try_from(n).unwrap_or(i64::MAX));
    let range = |r: &PortRange| Value::String(format!("{}-{}", r.first, r.last));
    let lower = |debug: String| Value::String(debug.to_lowercase());
    // Lists the file may hold that `AccessSource` reads itself (a flag's list replaces the file's).
    let file = match &args.access.config {
        Some(path) => gateway::config::load(path)?.file,
        None => gateway::config::FileConfig::default(),
    };
    let deny = or_file(args.access.deny.clone(), file.deny);
    let clients = or_file(args.access.clients.clone(), file.allow_clients);
    let users = args.access.users.clone().or(file.users);
    let allow_anonymous = args
        .access
        .allow_anonymous
        .or(file.allow_anonymous)
        .unwrap_or(false);
    let mut table = toml::Table::new();
    table.insert("external".into(), Value::String(args.external.clone()));
    table.insert("internal".into(), Value::String(args.internal.clone()));
    table.insert("instance".into(), Value::String(args.instance.clone()));
    table.insert(
        "max_bindings".into(),
        Value::Integer(args.max_bindings.into()),
    );
    table.insert(
        "allow_host_udp".into(),
        strings(
            args.host_allow
                .iter()
                .map(|f| format!("{},{}", f.remote, f.local))
                .collect(),
        ),
    );
    table.insert(
        "listen".into(),
        strings(args.listen.iter().map(ToString::to_string).collect()),
    );
    if let Some(users) = users {
        table.insert("users".into(), Value::String(users.display().to_string()));
    }
    table.insert("allow_anonymous".into(), Value::Boolean(allow_anonymous));
    table.insert(
        "resolvers".into(),
        strings(args.resolvers.iter().map(ToString::to_string).collect()),
    );
    table.insert(
        "deny".into(),
        strings(deny.iter().map(ToString::to_string).collect()),
    );
    table.insert(
        "allow_clients".into(),
        strings(clients.iter().map(ToString::to_string).collect()),
    );
    table.insert("max_connections".into(), count(args.max_connections));
    table.insert(
        "max_connections_per_client".into(),
        count(args.max_connections_per_client),
    );
    table.insert(
        "max_bindings_per_connection".into(),
        count(args.max_bindings_per_connection),
    );
    table.insert(
        "max_bindings_per_user".into(),
        count(args.max_bindings_per_user),
    );
    table.insert(
        "max_remotes_per_association".into(),
        count(args.max_remotes_per_association),
    );
    table.insert("internal_ports".into(), range(&args.internal_ports));
    table.insert("external_ports".into(), range(&args.external_ports));
    table.insert("datapath".into(), lower(format!("{:?}", args.datapath)));
    table.insert("xdp_mode".into(), lower(format!("{:?}", args.xdp_mode)));
    table.insert("tc_attach".into(), lower(format!("{:?}", args.tc_mode)));
    table.insert("allow_listen".into(), Value::Boolean(args.allow_listen));
    table.insert(
        "remove_gate_on_exit".into(),
        Value::Boolean(args.remove_gate_on_exit),
    );
    toml::to_string(&table).context("write the configuration as TOML")
}

/// `gateway bindings`: ask the running daemon for its bindings and print them.
fn show_bindings(instance: &str, json: bool) -> Result<()> {
    let instance = Instance::new(instance)?;
    instance.require_running()?;
    let answer = gateway::control::query(&gateway::control::socket_path(&instance), "bindings")
        .context("ask the daemon over its control socket")?;
    let document: serde_json::Value =
        serde_json::from_str(&answer).context("parse the daemon's answer")?;
    if json {
        println!("{document}");
    } else {
        print!("{}", render_bindings(&document));
    }
    Ok(())
}

/// Where a daemon records the relay ports it reserved, in its run directory.
pub const RESERVED_PORTS_RECORD: &str = "reserved_ports";

/// `gateway detach`: remove what a dead instance left attached and pinned.
fn detach(instance: &str) -> Result<()> {
    let instance = Instance::new(instance)?;
    if instance.is_running() {
        anyhow::bail!(
            "gateway instance {:?} is running; stop it first (SIGTERM: the gate stays attached \
             and dropping), then run `gateway detach` to remove the gate",
            instance.name()
        );
    }
    let mut removed = gateway::datapath::remove_pins(&instance.pin_dir());
    match gateway::reserved_ports::release(&instance.run_dir().join(RESERVED_PORTS_RECORD)) {
        Ok(Some(ports)) => removed.push(format!(
            "reserved ports {}",
            gateway::reserved_ports::format(&ports)
        )),
        Ok(None) => {}
        Err(error) => eprintln!("gateway: could not release the reserved relay ports: {error}"),
    }
    for interface in gateway::datapath::remove_netlink_filters(&instance.run_dir()) {
        removed.push(format!("tc netlink filter on {interface}"));
    }
    let _ = std::fs::remove_dir_all(instance.run_dir());
    if removed.is_empty() {
        println!("nothing pinned for instance {}", instance.name());
    } else {
        for what in removed {
            println!("removed {what}");
        }
    }
    Ok(())
}

/// `gateway passwd`: read a password from stdin and print a users-file line.
fn passwd(name: &str) -> Result<()> {
    let mut password = String::new();
    std::io::stdin()
        .read_line(&mut password)
        .context("read the password from stdin")?;
    let password = password.trim_end_matches(['\n', '\r']);
    let line =
        gateway::server::auth::hash_line(name, password.as_bytes()).map_err(anyhow::Error::msg)?;
    println!("{line}");
    Ok(())
}

/// `gateway stats`: print the running instance's per-reason counters.
fn show_stats(instance: &str, json: bool) -> Result<()> {
    let instance = Instance::new(instance)?;
    instance.require_running()?;
    let totals = stats::read_exit_counters(&instance.pin_dir())?;
    if json {
        println!("{}", stats::to_json(instance.name(), &totals));
    } else {
        print!("{}", stats::to_table(instance.name(), &totals));
    }
    Ok(())
}

/// The `gateway bindings` table.
fn render_bindings(document: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let empty = Vec::new();
    let enhanced = document["enhanced_bindings"].as_array().unwrap_or(&empty);
    let _ = writeln!(out, "enhanced-mode bindings: {}", enhanced.len());
    for b in enhanced {
        let _ = writeln!(
            out,
            "  aid {:#010x} tid {} {} user {} peer {} client {} relay {} / {} remote {}",
            b["aid"].as_u64().unwrap_or(0),
            b["tid"],
            b["state"].as_str().unwrap_or("?"),
            b["user"].as_str().unwrap_or("-"),
            b["control_peer"].as_str().unwrap_or("-"),
            b["client"].as_str().unwrap_or("-"),
            b["internal_relay"].as_str().unwrap_or("-"),
            b["external_relay"].as_str().unwrap_or("-"),
            b["remote"].as_str().unwrap_or("-"),
        );
    }
    let kernel = document["kernel_entries"].as_array().unwrap_or(&empty);
    let _ = writeln!(out, "kernel entries: {}", kernel.len());
    for e in kernel {
        let _ = writeln!(
            out,
            "  {} -> {} by {} client {} packets {} bytes {}",
            e["remote"].as_str().unwrap_or("?"),
            e["external_relay"].as_str().unwrap_or("?"),
            e["relayed_by"].as_str().unwrap_or("?"),
            e["client"].as_str().unwrap_or("-"),
            e["packets"],
            e["bytes"],
        );
    }
    out
}

/// A list given on the command line replaces the file's list; otherwise the file's applies.
fn or_file<T>(cli: Vec<T>, from_file: Vec<T>) -> Vec<T> {
    if cli.is_empty() { from_file } else { cli }
}

/// A file's value for a flag of choices (checked by the config parser already).
fn from_file<T: clap::ValueEnum>(value: Option<&str>) -> Option<T> {
    value.and_then(|value| T::from_str(value, true).ok())
}

/// `--xdp-mode` (and the file's `xdp_mode`).
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum XdpModeArg {
    Auto,
    Driver,
    Generic,
}

/// `--tc-attach` (and the file's `tc_attach`).
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum TcAttachArg {
    Auto,
    Tcx,
    Netlink,
}
