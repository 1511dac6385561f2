//! Project automation for what cargo alone cannot do: installing the toolchain pieces and Debian
//! packages the project needs, running the root-only test layers, the namespace testbed and the
//! demo. It must build with the stable toolchain and no bpf-linker, because `setup` installs it.

mod bench;
mod cargo;
mod clippy;
mod deb;
mod demo;
mod fuzz;
mod kernel_vm;
mod setup;
mod test;

use std::{path::PathBuf, process::ExitCode, time::Duration};

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
    /// With --kernel or --kernel-deb: boot that kernel in qemu instead and run the data-path and
    /// gate/relay integration tests there (a separate run; the plain command is unchanged).
    #[command(group(clap::ArgGroup::new("vm").args(["kernel", "kernel_deb"])))]
    Test {
        /// Only run integration test files whose name contains this string (with --kernel: any
        /// file, not only the default VM set, and a comma-separated list picks several).
        #[arg(long)]
        filter: Option<String>,
        /// Skip the unit tests (integration tests only; a --kernel run has no unit tests).
        #[arg(long)]
        skip_unit: bool,
        /// Run the integration tests on this kernel, booted in qemu (KVM when /dev/kvm is
        /// usable): `debian12` is Debian 12's linux-image-amd64 (6.1, no tcx: the gateway
        /// attaches tc programs by netlink), downloaded from the Debian archive with apt-get and
        /// cached under target/kernel-vm. Runs `datapath`, `xdp_gate`, `kernel_relay`, `no_way_in`,
        /// `enhanced_testbed` and `raw_testbed`; installs qemu-system-x86, busybox-static and kmod when missing.
        #[arg(long, value_enum)]
        kernel: Option<KernelName>,
        /// Like --kernel, with a Debian linux-image-*.deb on disk (for example one fetched with
        /// `apt-get download linux-image-6.1.0-NN-amd64` on another release).
        #[arg(long, value_name = "PATH")]
        kernel_deb: Option<PathBuf>,
        /// With --kernel/--kernel-deb: kill the VM (qemu, by pid) after this many seconds
        /// [default: 1800 with KVM, 7200 under software emulation].
        #[arg(long, value_name = "SECONDS", requires = "vm")]
        vm_timeout: Option<u64>,
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
    /// Benchmarks (root, about 25 minutes; `--quick` about 8): the in-kernel relay in each mode
    /// vs the userspace relay, Dante, plain forwarding (also with a pass-through XDP program) and
    /// an nftables DNAT hole; drop cost, control plane, scale, latency; a profile of each
    /// relay arm (perf flame graphs, the programs' own run time); and the multicast fan-out to
    /// 1, 8 and 64 subscribers. Prints a table with every
    /// target met or missed and writes results.json, plots (SVG, PNG) and flame graphs to --out.
    Bench {
        /// Fewer runs and shorter windows.
        #[arg(long)]
        quick: bool,
        /// Only these areas, comma-separated: relay, drop, control, scale, churn, latency,
        /// profile, multicast.
        #[arg(long)]
        only: Option<String>,
        /// Where results.json, the plots and the flame graphs go (relative to the workspace).
        #[arg(long, value_name = "DIR", default_value = "target/bench")]
        out: PathBuf,
    },
    /// Build the Debian package target/debian/gateway_VERSION-1_amd64.deb (release binaries,
    /// preload library, gateway.service, /etc/gateway/gateway.toml, man pages, completions)
    /// with cargo-deb (installed by setup).
    Deb,
    /// Build the Debian package and install it with dpkg; the unit is neither enabled nor
    /// started unless --enable. Undo: `dpkg -r gateway`.
    Install {
        /// Also enable and start gateway.service (where systemd is PID 1; elsewhere says so and
        /// does nothing more). The configuration file must pass `gateway check-config`.
        #[arg(long)]
        enable: bool,
    },
    /// Build the daemon in release mode and run `gateway run ARGS` on this host's interfaces in
    /// the foreground (e.g. `cargo xtask run -- --external eth0 --internal eth1`).
    Run {
        /// The arguments of `gateway run`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Coverage-guided fuzzing (cargo-fuzz, libFuzzer, nightly) of every decoder of untrusted
    /// bytes: SOCKS5 server and client, the RFC 1928 UDP header, the enhanced mode's control
    /// packets and datagram header, RTSP messages, Transport and SDP, DNS replies, the TOML
    /// configuration and the socksify shim's state machine. Builds the targets in fuzz/, runs
    /// each for --seconds on its committed seeds (fuzz/corpus) and prints per target executions
    /// per second, coverage and crashes (inputs under target/fuzz/artifacts). Fails on a crash.
    Fuzz {
        /// How long each target runs.
        #[arg(long, value_name = "N", default_value_t = 60)]
        seconds: u64,
        /// Only this target.
        #[arg(long, value_name = "NAME")]
        target: Option<String>,
    },
    /// The soak (root): 50 RTSP sessions at once through the kernel relay for --minutes, each
    /// replaced as it ends, one in eight killed mid-stream, a junk flood on the relay ports, the
    /// daemon killed and restarted twice. Checks sample-exact audio, nothing left behind (no
    /// binding, kernel entry, relay port, timer or descriptor) and RSS within 10 % after
    /// warm-up; prints a summary and writes soak.csv, soak.svg and summary.txt to --out.
    Soak {
        /// How long it runs.
        #[arg(long, value_name = "N", default_value_t = 30.0)]
        minutes: f64,
        /// Where the summary, the CSV and the plot go.
        #[arg(long, value_name = "DIR", default_value = "target/soak")]
        out: std::path::PathBuf,
    },
    /// Run clippy with `-D warnings` on the host crates, then on the eBPF crate for
    /// bpfel-unknown-none (nightly, `-Z build-std=core`) with the lints that fit BPF code.
    Clippy,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum KernelName {
    /// Debian 12 (bookworm): linux-image-amd64, Linux 6.1.
    Debian12,
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
        Command::Test {
            filter,
            skip_unit,
            kernel,
            kernel_deb,
            vm_timeout,
        } => {
            require_root("test")?;
            setup::run()?;
            let kernel = match (kernel, kernel_deb) {
                (Some(KernelName::Debian12), _) => Some(kernel_vm::Kernel::Debian12),
                (None, Some(path)) => Some(kernel_vm::Kernel::Deb(path)),
                (None, None) => None,
            };
            match kernel {
                Some(kernel) => kernel_vm::run(&kernel_vm::Options {
                    kernel,
                    filter: filter.as_deref(),
                    timeout: vm_timeout.map(Duration::from_secs),
                }),
                None => test::run(filter.as_deref(), skip_unit),
            }
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
        Command::Bench { quick, only, out } => {
            require_root("bench")?;
            setup::run()?;
            let out = setup::workspace_root().join(out);
            bench::run(if quick { "quick" } else { "full" }, only.as_deref(), &out)
        }
        Command::Deb => {
            require_root("deb")?;
            setup::run()?;
            deb::deb()
        }
        Command::Install { enable } => {
            require_root("install")?;
            setup::run()?;
            deb::install(enable)
        }
        Command::Run { args } => {
            require_root("run")?;
            setup::run()?;
            deb::run(&args)
        }
        Command::Clippy => clippy::run(),
        Command::Fuzz { seconds, target } => {
            setup::ensure_cargo_fuzz()?;
            fuzz::run(seconds, target.as_deref())
        }
        Command::Soak { minutes, out } => {
            require_root("soak")?;
            test::soak(minutes, &out)
        }
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
