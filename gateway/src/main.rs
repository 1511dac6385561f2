//! The `gateway` command: the daemon (`run`) and the operator's tools (`stats`, `monitor`, ...).

use std::process::ExitCode;

pub(crate) mod daemon;
mod sibling;

use anyhow::{Context as _, Result};
use clap::FromArgMatches as _;
use gateway::{
    cli::{Cli, Command, RunArgs},
    exit_counters,
    instance::Instance,
    settings,
};
use tracing_subscriber::EnvFilter;

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
    main_with(daemon::upgrade::Options::default())
}

/// The command with `upgrade` as this build does it (a test build writes another state
/// version; `gateway/examples/gateway_state_variant.rs`).
pub fn main_with(upgrade: daemon::upgrade::Options) -> ExitCode {
    let cli = match Cli::from_arg_matches(&gateway::cli::command().get_matches()) {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    match run(cli, upgrade) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("gateway: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli, upgrade_options: daemon::upgrade::Options) -> Result<()> {
    if !matches!(cli.command, Command::Run(_)) {
        init_logging(settings::LogFormat::Text);
    }
    match cli.command {
        Command::Run(args) => {
            let print = args.print_config;
            let (mut daemon_args, old_datapath_name) = daemon_args(*args)?;
            daemon_args.upgrade = upgrade_options;
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
        Command::Upgrade {
            instance,
            binary,
            json,
        } => upgrade(&instance, binary, json),
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
    Ok((
        daemon::DaemonArgs {
            settings,
            access,
            upgrade: daemon::upgrade::Options::default(),
        },
        old_datapath_name,
    ))
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

/// `gateway upgrade`: ask the running daemon to hand over to a new binary; prints the outcome.
fn upgrade(instance: &str, binary: Option<std::path::PathBuf>, json: bool) -> Result<()> {
    let instance = Instance::new(instance)?;
    instance.require_running()?;
    let binary = match binary {
        Some(path) => Some(
            std::fs::canonicalize(&path).with_context(|| format!("--binary {}", path.display()))?,
        ),
        None => None,
    };
    let command = format!("upgrade {}", serde_json::json!({ "binary": binary }));
    let answer = gateway::admin_socket::query_within(
        &gateway::admin_socket::socket_path(&instance),
        &command,
        gateway::admin_socket::UPGRADE_ANSWER,
    )
    .context("ask the daemon over its control socket")?;
    let value: serde_json::Value =
        serde_json::from_str(&answer).context("read the daemon's answer")?;
    if let Some(error) = value.get("error").and_then(serde_json::Value::as_str) {
        anyhow::bail!("upgrade failed, the running daemon serves on: {error}");
    }
    let done: gateway::admin_socket::UpgradeDone =
        serde_json::from_value(value.get("upgraded").cloned().unwrap_or_default())
            .context("read the daemon's answer")?;
    if json {
        println!("{}", serde_json::to_string(&done)?);
    } else {
        println!(
            "upgraded instance {}: pid {} -> {} ({}, state version {}, {} sessions, {} bindings moved)",
            instance.name(),
            done.old_pid,
            done.new_pid,
            done.binary.display(),
            done.state_version,
            done.sessions,
            done.bindings
        );
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
    let totals = exit_counters::read_exit_counters(&instance.pin_dir())?;
    let document = exit_counters::report(instance.name(), &totals);
    if json {
        println!("{}", serde_json::to_string(&document)?);
    } else {
        print!("{}", document.to_table());
    }
    Ok(())
}
