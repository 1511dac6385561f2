//! `bench`: the benchmark of issue 8, run by `cargo xtask bench` (root). It brings up its own
//! test bed (client -- fw -- server), runs each area with arms alternating inside every run,
//! prints progress and a table, and writes `results.json` and plots to `--out`. Every loop is
//! bounded in count and time; namespaces, processes and pins are removed by guards, also when a
//! scenario fails (a failed scenario is recorded and the others still run).

mod run;

use std::{path::PathBuf, process::ExitCode, time::Instant};

use anyhow::{Context as _, Result, bail};
use bench::{model::Results, plot, report};
use clap::Parser;

use crate::run::plan::{Mode, Plan};

#[derive(Parser)]
#[command(
    name = "bench",
    about = "In-kernel relay vs userspace relay vs Dante vs plain forwarding"
)]
struct Cli {
    /// full: the figures (5 runs each); quick: 2 runs, shorter windows; smoke: a few
    /// hundred packets per scenario (for `cargo xtask test`).
    #[arg(long, value_enum, default_value = "full")]
    mode: Mode,
    /// Where results.json and the plots go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Only these areas (comma-separated: relay, drop, control, scale, churn, latency, profile,
    /// multicast).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

pub const AREAS: [&str; 8] = [
    "relay",
    "drop",
    "control",
    "scale",
    "churn",
    "latency",
    "profile",
    "multicast",
];

fn main() -> ExitCode {
    match run_main(&Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("bench: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_main(cli: &Cli) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the bench needs root (namespaces, eBPF, danted); run it through `cargo xtask bench`"
        );
    }
    for area in &cli.only {
        if !AREAS.contains(&area.as_str()) {
            bail!("unknown area {area:?}; the areas are {AREAS:?}");
        }
    }
    let fd_limit = raise_fd_limit();
    let exe = std::env::current_exe().context("locate the bench binary")?;
    let bin_dir = exe
        .parent()
        .context("the bench binary's folder")?
        .to_path_buf();
    let blast_bin = bin_dir.join("udp-blast");
    if !blast_bin.exists() {
        bail!(
            "{} is missing; build the bench crate (cargo build --release -p bench)",
            blast_bin.display()
        );
    }
    if std::env::var_os("GATEWAY_BIN").is_none() {
        // SAFETY: single-threaded here, before any thread or child is started.
        unsafe { std::env::set_var("GATEWAY_BIN", bin_dir.join("gateway")) };
    }
    let gateway_bin = testbed::gateway::gateway_bin();
    if !gateway_bin.exists() {
        bail!(
            "{} is missing; build the gateway (cargo build --release -p gateway)",
            gateway_bin.display()
        );
    }
    std::fs::create_dir_all(&cli.out).with_context(|| format!("create {}", cli.out.display()))?;
    let work_dir = std::env::temp_dir().join(format!("gateway-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work_dir)?;

    let plan = Plan::new(cli.mode);
    let wanted = |area: &str| cli.only.is_empty() || cli.only.iter().any(|a| a == area);
    let started = Instant::now();
    let mut results = Results {
        meta: run::meta(&plan),
        ..Results::default()
    };
    results.meta.fd_limit = fd_limit;
    println!(
        "bench: mode {:?}, {} run(s) per figure, {:.1} s windows; gateway {}, udp-blast {}",
        plan.mode,
        plan.runs,
        plan.window.as_secs_f64(),
        gateway_bin.display(),
        blast_bin.display()
    );
    {
        let env = run::env::Env::new(plan, blast_bin, work_dir.clone(), cli.out.clone())?;
        env.progress(&format!(
            "test bed up: {} -- {} -- {}",
            env.bed.client.name(),
            env.bed.fw.name(),
            env.bed.server.name()
        ));
        run::run_areas(&env, &mut results, &wanted);
        env.progress("tearing the test bed down");
    }
    let _ = std::fs::remove_dir_all(&work_dir);
    results.meta.duration_s = started.elapsed().as_secs_f64();
    let notes = report::auto_notes(&results);
    results.notes.extend(notes);

    let document = report::document(&results);
    let json_path = cli.out.join("results.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&document)?)
        .with_context(|| format!("write {}", json_path.display()))?;
    println!("{}", report::table(&results));
    match plot::all(&results, &cli.out) {
        Ok(files) => {
            for file in files {
                println!("bench: wrote {}", file.display());
            }
        }
        Err(error) => eprintln!("bench: plots: {error:#}"),
    }
    println!(
        "bench: wrote {} in {:.0} s",
        json_path.display(),
        results.meta.duration_s
    );
    if !results.errors.is_empty() {
        eprintln!("bench: {} scenario run(s) failed:", results.errors.len());
        for error in &results.errors {
            eprintln!("  {error}");
        }
    }
    Ok(())
}

/// Many sockets in the memory scenario (and the daemon inherits the limit): asks for 2^20 open
/// files, else raises the soft limit to the hard one. Returns the limit in force.
fn raise_fd_limit() -> u64 {
    let wanted = libc::rlimit {
        rlim_cur: 1 << 20,
        rlim_max: 1 << 20,
    };
    // SAFETY: a valid rlimit; failure (no CAP_SYS_RESOURCE) leaves the old limit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const wanted) } != 0 {
        let mut current = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: valid out-pointer, then a valid rlimit.
        unsafe {
            libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut current);
            current.rlim_cur = current.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &raw const current);
        }
    }
    let mut now = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut now) };
    now.rlim_cur
}
