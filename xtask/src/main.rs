//! Project automation for what cargo alone cannot do: installing the toolchain pieces and Debian
//! packages the project needs, running the root-only test layers, the namespace testbed and the
//! demo. It must build with the stable toolchain and no bpf-linker, because `setup` installs it.

mod bench;
mod cargo;
mod clippy;
mod demo;
mod setup;
mod test;

use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Build, set up, test and demonstrate the gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what the project needs (rust-src for nightly, bpf-linker, bpffs, Debian packages).
    /// Idempotent and quiet when everything is present.
    Setup,
    /// Run setup, build, the unit tests, then each root-only integration test one at a time.
    Test {
        /// Only run integration test files whose name contains this string.
        #[arg(long)]
        filter: Option<String>,
        /// Skip the unit tests (integration tests only).
        #[arg(long)]
        skip_unit: bool,
    },
    /// Bring the three-namespace testbed (client -- fw -- server) up or down.
    Testbed {
        #[arg(value_enum)]
        action: TestbedAction,
    },
    /// Set up, build, bring up the testbed, start the gateway in `fw` and the demo media server
    /// in `server`, play an RTSP stream with `gateway rtsp-get` in `client` through the two-step
    /// binding and the kernel relay, show the bindings, the per-reason counters and what
    /// happened to unsolicited UDP, check the audio is sample-exact; tears everything down.
    Demo,
    /// Benchmarks (root, about 15 minutes; `--quick` about 5): in-kernel relay vs userspace relay
    /// vs Dante vs plain forwarding, drop cost, control plane, scale, latency. Prints a table and
    /// writes target/bench/results.json and plots (SVG, PNG).
    Bench {
        /// Fewer runs and shorter windows.
        #[arg(long)]
        quick: bool,
        /// Only these areas, comma-separated: relay, drop, control, scale, latency.
        #[arg(long)]
        only: Option<String>,
    },
    /// Run clippy with `-D warnings` on the host crates, then on the eBPF crate for
    /// bpfel-unknown-none (nightly, `-Z build-std=core`) with the lints that fit BPF code.
    Clippy,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum TestbedAction {
    Up,
    Down,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Setup => {
            require_root("setup")?;
            setup::run()
        }
        Command::Test { filter, skip_unit } => {
            require_root("test")?;
            setup::run()?;
            test::run(filter.as_deref(), skip_unit)
        }
        Command::Testbed { action } => {
            require_root("testbed")?;
            match action {
                TestbedAction::Up => {
                    let names = testbed::Testbed::up_persistent()?;
                    println!(
                        "testbed up: namespaces {} -- {} -- {}",
                        names.client, names.fw, names.server
                    );
                    println!("enter one with: nsenter --net=/run/netns/{} bash", names.fw);
                    Ok(())
                }
                TestbedAction::Down => {
                    testbed::Testbed::down_persistent()?;
                    println!("testbed down");
                    Ok(())
                }
            }
        }
        Command::Demo => {
            require_root("demo")?;
            setup::run()?;
            demo::run()
        }
        Command::Bench { quick, only } => {
            require_root("bench")?;
            setup::run()?;
            let out = setup::workspace_root().join("target/bench");
            bench::run(if quick { "quick" } else { "full" }, only.as_deref(), &out)
        }
        Command::Clippy => clippy::run(),
    }
}

fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "`cargo xtask {what}` needs root (it installs packages, loads eBPF programs and \
             creates network namespaces); run it as root, e.g. with sudo -E"
        );
    }
    Ok(())
}
