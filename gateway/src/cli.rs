//! The `gateway` command line: every subcommand and flag, as clap parses them and as the man
//! pages and shell completions (`gateway-generate-docs`) describe them. Definitions only: what
//! each command does lives in the binary.

use std::{ffi::OsString, path::PathBuf};

use clap::{CommandFactory as _, Parser, Subcommand};

use crate::{instance::DEFAULT_INSTANCE, settings};

#[derive(Parser)]
#[command(
    name = "gateway",
    version,
    about = "Firewall traversal gateway: SOCKS5 with the two-step UDP binding, and an eBPF gate \
             that drops every inbound UDP datagram no binding admits"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the daemon: attach the XDP gate to the external interface and serve until SIGINT or
    /// SIGTERM; SIGHUP reloads the users file and the policy. Needs root. Maps and links are
    /// pinned under /sys/fs/bpf/gateway/INSTANCE/: a stop, a crash or a failed start leaves the
    /// gate attached and dropping (the next daemon takes it over); only `gateway detach` or
    /// --remove-gate-on-exit removes it.
    Run(Box<RunArgs>),
    /// List the live bindings of a running gateway: enhanced-mode bindings with their owner (user,
    /// control peer), state and addresses, and every kernel entry with its counters.
    Bindings {
        /// Instance name of the gateway to ask.
        #[arg(long, value_name = "NAME", default_value = DEFAULT_INSTANCE)]
        instance: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Only the counts (relay ports in use, bindings served, drops, caps hit), not one line
        /// per binding and kernel entry: cheap however many bindings there are.
        #[arg(long)]
        summary: bool,
    },
    /// Remove the gate of a stopped or dead gateway: its XDP and tc links (the gate opens: unsolicited
    /// UDP reaches the host again), its pinned maps, the relay ports it reserved and its run
    /// directory (with `--tc-attach netlink`, its tc filters too). Refuses while the instance's
    /// daemon is alive: stop it (SIGTERM) first, then detach.
    Detach {
        /// Instance name of the gateway to remove.
        #[arg(long, value_name = "NAME", default_value = DEFAULT_INSTANCE)]
        instance: String,
    },
    /// Check a configuration file without starting anything: every unknown key (with the
    /// nearest known one) and every bad value is named, then the checks a start makes across
    /// keys, and that the users file it names loads. Interfaces are not looked up (the file
    /// may be meant for another host). Exits 0 when the file is good.
    CheckConfig {
        /// The TOML file, as `gateway run --config FILE` reads it.
        file: PathBuf,
    },
    /// Watch a running gateway's data path: one line per drop or admit (time, verdict, reason,
    /// addresses and ports, interface, program), from a ring buffer the data path's programs
    /// write, sampled and rate-limited per CPU so a flood costs the fast path little.
    /// Without --reason every reason is shown except the stack's own traffic and bookkeeping
    /// (`not_udp_passed`, `inbound_to_stack`, `multicast_to_userspace`). One watcher per instance;
    /// on exit it prints what the budget left out to stderr. The fan-out's copies are counted
    /// (`gateway stats`), not watched.
    Monitor {
        /// Instance name of the gateway to watch.
        #[arg(long, value_name = "NAME", default_value = DEFAULT_INSTANCE)]
        instance: String,
        /// Only exits for these reasons (names as `gateway stats` prints them; repeat or
        /// separate with commas).
        #[arg(long, value_name = "NAME", value_delimiter = ',')]
        reason: Vec<String>,
        /// Print one JSON object per line instead of text.
        #[arg(long)]
        json: bool,
        /// Consider every Nth watched packet per CPU (1: every one).
        #[arg(long, value_name = "N", default_value_t = 1,
              value_parser = clap::value_parser!(u32).range(1..))]
        sample: u32,
        /// At most this many events per CPU per second; the rest are counted, not shown.
        #[arg(long, value_name = "N", default_value_t = 100,
              value_parser = clap::value_parser!(u32).range(1..=100_000))]
        rate: u32,
        /// Stop after this many events (default: until SIGINT or SIGTERM).
        #[arg(long, value_name = "N")]
        count: Option<u64>,
    },
    /// Read a password from stdin and print a users-file line `NAME:$argon2id$...`.
    Passwd {
        /// The user name (1 to 255 octets, no ':').
        name: String,
    },
    /// Replace a running gateway with a new binary without dropping a stream: the new daemon
    /// takes over the listening sockets, every enhanced-mode session with its bindings (AIDs,
    /// TIDs, relay ports, timers), every CONNECT tunnel and UDP ASSOCIATE; the kernel's entries
    /// and the gate stay in place. A BIND is closed (its client connects again).
    /// If the new binary refuses (it cannot read the running daemon's state version), fails or
    /// dies, the running daemon serves on and this prints why. SIGUSR2 to the daemon does the
    /// same with the binary it was started from. Prints the new daemon's pid.
    Upgrade {
        /// Instance name of the gateway to upgrade.
        #[arg(long, value_name = "NAME", default_value = DEFAULT_INSTANCE)]
        instance: String,
        /// The new binary (default: the path the running daemon was started from, where a
        /// package upgrade puts the new one). It is started with the daemon's arguments.
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
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
    /// RTP-pair bindings, statistics and WAV. Runs `gateway-rtsp-get`, installed beside
    /// `gateway` (`gateway rtsp-get --help` shows its options).
    #[command(disable_help_flag = true)]
    RtspGet {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
        args: Vec<OsString>,
    },
    /// Run an unmodified program (ffmpeg, gst-launch-1.0, curl, ...) with its TCP and UDP
    /// through a gateway: TCP as SOCKS5 CONNECT, UDP sockets on two-step bindings with
    /// header-less delivery. Runs `gateway-socksify`, installed beside `gateway` (`gateway
    /// socksify --help` shows its options).
    #[command(disable_help_flag = true)]
    Socksify {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
        args: Vec<OsString>,
    },
    /// Any other `gateway NAME ...` runs the executable `gateway-NAME` beside `gateway` or on
    /// PATH, the way `git NAME` runs `git-NAME`.
    #[command(external_subcommand)]
    External(Vec<OsString>),
}

/// The flags of `gateway run` (see `gateway run --help`): every setting, and the two that
/// only the command line has.
#[derive(clap::Args)]
pub struct RunArgs {
    /// A TOML file with any of these settings (keys as the flags, `_` for `-`); flags given
    /// here win over the file. Unknown keys are errors.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration (the file merged with the flags, defaults filled in)
    /// as a TOML file `--config` accepts, and exit. Needs no root.
    #[arg(long)]
    pub print_config: bool,
    #[command(flatten)]
    pub settings: settings::Layer,
}

/// The command line as parsed and documented: `gateway run --help` shows every default.
pub fn command() -> clap::Command {
    Cli::command().mut_subcommand("run", settings::document_defaults)
}
