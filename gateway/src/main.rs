//! The `gateway` command: the daemon (`run`) and the operator's tools (`stats`).

use std::process::ExitCode;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use gateway::{
    datapath::{Datapath, DatapathConfig, HostFlow, interface_index},
    instance::{DEFAULT_INSTANCE, Instance},
    stats,
};
use gateway_common::DEFAULT_MAX_BINDINGS;
use tracing::info;
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
    /// SIGTERM. Needs root. Maps and the link are pinned under /sys/fs/bpf/gateway/INSTANCE/, so
    /// the gate stays closed even if the daemon is killed; the next daemon takes it over.
    Run {
        /// Interface facing the untrusted side (where unsolicited UDP arrives and is dropped).
        #[arg(long, value_name = "IFACE")]
        external: String,
        /// Interface facing the protected clients.
        #[arg(long, value_name = "IFACE")]
        internal: String,
        /// Instance name: separates pinned objects and lock files of several gateways on one host.
        #[arg(long, value_name = "NAME", default_value = DEFAULT_INSTANCE)]
        instance: String,
        /// Capacity of the kernel binding map.
        #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_BINDINGS)]
        max_bindings: u32,
        /// Admit one exact UDP flow the host itself needs on the external interface (NTP, DHCP,
        /// a resolver's replies): REMOTE_IP:PORT,LOCAL_IP:PORT. Repeat for more. Everything else
        /// that no binding admits is dropped.
        #[arg(long = "allow-host-udp", value_name = "REMOTE,LOCAL", value_parser = HostFlow::parse)]
        allow_host_udp: Vec<HostFlow>,
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
        Command::Run {
            external,
            internal,
            instance,
            max_bindings,
            allow_host_udp,
        } => run_daemon(
            &external,
            &internal,
            &instance,
            max_bindings,
            allow_host_udp,
        ),
        Command::Stats { instance, json } => {
            let instance = Instance::new(&instance)?;
            instance.require_running()?;
            let totals = stats::read_exit_counters(&instance.pin_dir())?;
            if json {
                println!("{}", stats::to_json(instance.name(), &totals));
            } else {
                print!("{}", stats::to_table(instance.name(), &totals));
            }
            Ok(())
        }
    }
}

fn run_daemon(
    external: &str,
    internal: &str,
    instance: &str,
    max_bindings: u32,
    host_allow: Vec<HostFlow>,
) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("`gateway run` needs root (it loads and attaches eBPF programs)");
    }
    let instance = Instance::new(instance)?;
    interface_index(external).context("--external")?;
    interface_index(internal).context("--internal")?;
    if external == internal {
        bail!("--external and --internal must be different interfaces (both are {external})");
    }
    let lock = instance.lock()?;
    let mut config = DatapathConfig::new(instance.clone(), external.to_owned());
    config.max_bindings = max_bindings;
    config.host_allow = host_allow;
    let datapath = match Datapath::attach(&config) {
        Ok(datapath) => datapath,
        Err(error) => {
            lock.release();
            return Err(error).with_context(|| format!("attach the gateway to {external}"));
        }
    };
    info!(instance = instance.name(), %external, %internal, pid = std::process::id(), "gateway running");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    let signal = runtime.block_on(wait_for_shutdown_signal());
    info!(signal = signal?, "shutting down");
    datapath.detach();
    lock.release();
    Ok(())
}

async fn wait_for_shutdown_signal() -> Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("install the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("install the SIGINT handler")?;
    Ok(tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    })
}
