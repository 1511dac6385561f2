//! The `gateway` command: the daemon (`run`) and the operator's tools (`stats`, `monitor`, ...).

use std::process::ExitCode;

mod daemon;
mod sibling;

use std::{ffi::OsString, path::PathBuf};

use anyhow::{Context as _, Result};
use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
use gateway::{
    exit_counters,
    instance::{DEFAULT_INSTANCE, Instance},
    settings,
};
use tracing_subscriber::EnvFilter;

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
struct RunArgs {
    /// A TOML file with any of these settings (keys as the flags, `_` for `-`); flags given
    /// here win over the file. Unknown keys are errors.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print the effective configuration (the file merged with the flags, defaults filled in)
    /// as a TOML file `--config` accepts, and exit. Needs no root.
    #[arg(long)]
    print_config: bool,
    #[command(flatten)]
    settings: settings::Layer,
}

/// Logs to stderr, filtered by `GATEWAY_LOG` (default `info`), as `format` says.
fn init_logging(format: settings::LogFormat) {
    let filter = EnvFilter::try_from_env("GATEWAY_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        settings::LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        // The event's fields at the top level; the current span (the control connection's)
        // and the whole span list beside them.
        settings::LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
}

fn main() -> ExitCode {
    let command = Cli::command().mut_subcommand("run", settings::document_defaults);
    let cli = match Cli::from_arg_matches(&command.get_matches()) {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("gateway: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    if !matches!(cli.command, Command::Run(_)) {
        init_logging(settings::LogFormat::Text);
    }
    match cli.command {
        Command::Run(args) => {
            let print = args.print_config;
            let (daemon_args, old_datapath_name) = daemon_args(*args)?;
            // The format is a setting: logging starts once the settings are read.
            init_logging(daemon_args.settings.log_format);
            if old_datapath_name {
                tracing::warn!("`datapath = xdp` is the old name of `kernel`; write `kernel`");
            }
            if print {
                print!("{}", daemon_args.settings.to_toml());
                Ok(())
            } else {
                daemon::run(daemon_args)
            }
        }
        Command::Bindings {
            instance,
            json,
            summary,
        } => show_bindings(&instance, json, summary),
        Command::Detach { instance } => detach(&instance),
        Command::CheckConfig { file } => check_config(&file),
        Command::Monitor {
            instance,
            reason,
            json,
            sample,
            rate,
            count,
        } => {
            let watch = gateway::monitor::Watch {
                instance: instance.clone(),
                reasons: gateway::monitor::render::reason_mask(&reason)?,
                sample_every: sample,
                events_per_second: rate,
                json,
                count,
            };
            monitor(&instance, &watch)
        }
        Command::Passwd { name } => passwd(&name),
        Command::Stats { instance, json } => show_stats(&instance, json),
        Command::RtspGet { args } => sibling::run("rtsp-get", &args),
        Command::Socksify { args } => sibling::run("socksify", &args),
        Command::External(words) => match words.split_first() {
            Some((name, args)) => sibling::run(&name.to_string_lossy(), args),
            None => Ok(()),
        },
    }
}

/// `gateway run`'s flags over its configuration file over the defaults, checked; and whether
/// the old name `xdp` of the kernel data path was used.
fn daemon_args(args: RunArgs) -> Result<(daemon::DaemonArgs, bool)> {
    let mut access = daemon::AccessSource {
        config: args.config,
        flags: args.settings,
    };
    let mut settings = access.settings()?;
    let old_datapath_name = settings.datapath == settings::DatapathKind::Xdp;
    if old_datapath_name {
        settings.datapath = settings::DatapathKind::Kernel;
    }
    // SIGHUP re-reads users and policy, never which interfaces the gateway is attached to.
    access.flags.external = Some(settings.external.clone());
    access.flags.internal = Some(settings.internal.clone());
    Ok((daemon::DaemonArgs { settings, access }, old_datapath_name))
}

/// `gateway bindings`: ask the running daemon for its bindings and print them.
fn show_bindings(instance: &str, json: bool, summary: bool) -> Result<()> {
    let instance = Instance::new(instance)?;
    instance.require_running()?;
    let command = if summary { "summary" } else { "bindings" };
    let answer =
        gateway::admin_socket::query(&gateway::admin_socket::socket_path(&instance), command)
            .context("ask the daemon over its control socket")?;
    let document: gateway::report::Bindings =
        gateway::report::parse(&answer).context("read the daemon's answer")?;
    if json {
        println!("{}", serde_json::to_string(&document)?);
    } else {
        print!("{}", document.to_table());
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

/// `gateway check-config`: every problem of a configuration file, on stderr.
fn check_config(file: &std::path::Path) -> Result<()> {
    let origin = file.display().to_string();
    let text = std::fs::read_to_string(file).with_context(|| format!("read {origin}"))?;
    let mut problems: Vec<String> = settings::check_text(&text, &origin)
        .iter()
        .map(ToString::to_string)
        .collect();
    if problems.is_empty() {
        let settings = settings::parse(&text, &origin)?.resolve();
        if let Some(users) = settings.users_file()
            && let Err(error) = gateway::server::auth::Users::load(users)
        {
            problems.push(format!("config file {origin}: key `users`: {error}"));
        }
    }
    if problems.is_empty() {
        println!("{origin}: good");
        return Ok(());
    }
    for problem in &problems {
        eprintln!("gateway: {problem}");
    }
    anyhow::bail!("{} problem(s) in {origin}", problems.len())
}

/// `gateway monitor`: watch the running instance's drop and admit events.
fn monitor(instance: &str, watch: &gateway::monitor::Watch) -> Result<()> {
    let instance = Instance::new(instance)?;
    instance.require_running()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the runtime")?;
    runtime.block_on(gateway::monitor::run(&instance.pin_dir(), watch))?;
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
    let totals = exit_counters::read_exit_counters(&instance.pin_dir())?;
    let document = exit_counters::report(instance.name(), &totals);
    if json {
        println!("{}", serde_json::to_string(&document)?);
    } else {
        print!("{}", document.to_table());
    }
    Ok(())
}
