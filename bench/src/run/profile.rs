//! Area 6, where the time goes: each media relay arm (200-octet payloads, flat out) once more,
//! with `perf record -a -g -e cpu-clock` over the window (this machine has no hardware
//! counters) and the kernel's own run-time statistics of the gateway's programs
//! (`kernel.bpf_stats_enabled`). Writes a flame graph per arm (`flame-ARM.svg`) and records the
//! heaviest functions (self time) and each program's nanoseconds per run.

use std::{
    collections::BTreeMap,
    fs,
    io::BufReader,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use bench::model::{ProfileRun, Results};
use serde_json::Value;
use testbed::ChildGuard;

use super::{
    arms::{Arm, ArmGuard, ClientPath},
    env::Env,
    plan::Mode,
    relay::flat_out,
    stream::run_stream,
};

/// Payload octets of the profiled streams.
const SIZE: usize = 200;
/// Samples per second and CPU: enough for a profile, little enough not to be the load.
const FREQUENCY: &str = "999";
/// Functions kept per arm.
const TOP: usize = 12;

pub fn run(env: &Env, results: &mut Results) {
    if let Err(error) = check_perf() {
        results.errors.push(format!("profile: {error:#}"));
        return;
    }
    // The smoke run profiles one arm: the code path, not the figures.
    let arms: &[Arm] = if env.plan.mode == Mode::Smoke {
        &[Arm::Kernel]
    } else {
        &Arm::RELAYS
    };
    for &arm in arms {
        match profile_arm(env, arm) {
            Ok(profile) => {
                env.progress(&format!(
                    "profile {:<16}: {:>8.0} pps, {} samples, top: {}",
                    arm.label(),
                    profile.delivered_pps,
                    profile.samples,
                    profile.top.first().map_or_else(
                        || "-".to_owned(),
                        |(name, share)| format!("{name} {:.1} %", share * 100.0)
                    )
                ));
                results.profile.insert(arm.key().to_owned(), profile);
            }
            Err(error) => {
                let text = format!("profile {}: {error:#}", arm.key());
                env.progress(&format!("FAILED {text}"));
                results.errors.push(text);
            }
        }
    }
}

fn check_perf() -> Result<()> {
    let out = Command::new("perf")
        .arg("version")
        .output()
        .context("run perf (linux-perf; `cargo xtask setup` installs it)")?;
    if !out.status.success() {
        bail!(
            "perf version failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// `kernel.bpf_stats_enabled` on for as long as it lives, back to what it was after.
pub(super) struct BpfStats {
    before: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    pub(super) fn enable() -> Result<Self> {
        let before = fs::read_to_string(BPF_STATS)
            .context("read kernel.bpf_stats_enabled")?
            .trim()
            .to_owned();
        fs::write(BPF_STATS, "1").context("enable kernel.bpf_stats_enabled")?;
        Ok(Self { before })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = fs::write(BPF_STATS, &self.before);
    }
}

/// `(run_cnt, run_time_ns)` of every loaded program whose name starts with `gateway_`.
pub(super) fn program_stats() -> Result<BTreeMap<String, (u64, u64)>> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .context("run bpftool prog show")?;
    let programs: Value = serde_json::from_slice(&out.stdout).context("bpftool's JSON")?;
    let mut stats = BTreeMap::new();
    for program in programs.as_array().into_iter().flatten() {
        let Some(name) = program["name"].as_str() else {
            continue;
        };
        if !name.starts_with("gateway_") {
            continue;
        }
        let entry = stats.entry(name.to_owned()).or_insert((0, 0));
        entry.0 += program["run_cnt"].as_u64().unwrap_or(0);
        entry.1 += program["run_time_ns"].as_u64().unwrap_or(0);
    }
    Ok(stats)
}

fn profile_arm(env: &Env, arm: Arm) -> Result<ProfileRun> {
    let _guard = ArmGuard::start(env, arm, &[])?;
    let path = ClientPath::open(env, arm)?;
    let data = env.work_dir.join(format!("perf-{}.data", arm.key()));
    let outcome = (|| -> Result<ProfileRun> {
        let stats = BpfStats::enable()?;
        let before = program_stats()?;
        let record_for = env.plan.warmup + env.plan.window;
        let mut perf = Command::new("perf");
        perf.args([
            "record",
            "-a",
            "-g",
            "-e",
            "cpu-clock",
            "-F",
            FREQUENCY,
            "-q",
            "-o",
        ])
        .arg(&data)
        .args(["--", "sleep", &format!("{:.2}", record_for.as_secs_f64())])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        let mut perf = ChildGuard::spawn(&mut perf, "perf record")?;
        let kick = || path.kick();
        let (stream, _) = run_stream(env, &flat_out(env, &path, SIZE, &kick))?;
        let after = program_stats()?;
        drop(stats);
        if !testbed::wait_until(record_for + std::time::Duration::from_secs(20), || {
            perf.has_exited()
        }) {
            bail!("perf record did not finish");
        }
        let (samples, top, stages) = flame_graph(
            &data,
            &env.out_dir.join(format!("flame-{}.svg", arm.key())),
            arm.label(),
        )?;
        let programs = after
            .iter()
            .filter_map(|(name, &(runs, ns))| {
                let (runs_before, ns_before) = before.get(name).copied().unwrap_or((0, 0));
                let runs = runs.saturating_sub(runs_before);
                #[expect(clippy::cast_precision_loss, reason = "nanoseconds per run")]
                (runs > 0).then(|| {
                    (
                        name.clone(),
                        ns.saturating_sub(ns_before) as f64 / runs as f64,
                    )
                })
            })
            .collect();
        Ok(ProfileRun {
            delivered_pps: stream.delivered_pps,
            cpu_ns_per_delivered: stream.cpu_ns_per_delivered,
            samples,
            top,
            stages,
            program_ns_per_run: programs,
        })
    })();
    path.close(env);
    let _ = fs::remove_file(&data);
    outcome
}

/// Folds the recorded stacks, writes the flame graph to `svg`, and returns the busy sample
/// count, the heaviest functions by self time and the stages' shares (of the busy samples).
type Shares = Vec<(String, f64)>;

fn flame_graph(data: &Path, svg: &PathBuf, title: &str) -> Result<(u64, Shares, Shares)> {
    let script = Command::new("perf")
        .args([
            "script",
            "-F",
            "comm,pid,tid,cpu,time,event,ip,sym,dso",
            "-i",
        ])
        .arg(data)
        .stderr(Stdio::null())
        .output()
        .context("run perf script")?;
    if !script.status.success() || script.stdout.is_empty() {
        bail!("perf script gave nothing (was anything recorded?)");
    }
    let mut folded = Vec::new();
    inferno::collapse::Collapse::collapse(
        &mut inferno::collapse::perf::Folder::default(),
        BufReader::new(script.stdout.as_slice()),
        &mut folded,
    )
    .context("fold the stacks")?;
    let folded = String::from_utf8_lossy(&folded).into_owned();
    let (samples, top) = self_time(&folded);
    let stages = stage_shares(&folded);
    let mut options = inferno::flamegraph::Options::default();
    options.title = format!("{title}: {SIZE}-octet datagrams flat out, all CPUs (perf cpu-clock)");
    let file = fs::File::create(svg).with_context(|| format!("create {}", svg.display()))?;
    inferno::flamegraph::from_lines(&mut options, folded.lines(), file)
        .context("draw the flame graph")?;
    Ok((samples, top, stages))
}

/// Whether a folded stack is the idle loop (the kernel's `swapper` threads): not a cost.
fn is_idle(stack: &str) -> bool {
    stack.starts_with("swapper")
}

/// The busy (non-idle) sample count and the [`TOP`] functions by self time (the stack's last
/// frame), as shares of the busy samples. Folded lines are `frame;frame;...;frame COUNT`.
pub fn self_time(folded: &str) -> (u64, Vec<(String, f64)>) {
    let mut by_leaf: BTreeMap<&str, u64> = BTreeMap::new();
    let mut total = 0;
    for (stack, count) in stacks(folded) {
        let leaf = stack.rsplit(';').next().unwrap_or(stack);
        *by_leaf.entry(leaf).or_default() += count;
        total += count;
    }
    let mut top: Vec<(&str, u64)> = by_leaf.into_iter().collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    #[expect(clippy::cast_precision_loss, reason = "sample shares")]
    let top = top
        .into_iter()
        .take(TOP)
        .map(|(name, count)| (name.to_owned(), count as f64 / total.max(1) as f64))
        .collect();
    (total, top)
}

/// The busy stacks of a folded profile with their counts (malformed lines skipped).
fn stacks(folded: &str) -> impl Iterator<Item = (&str, u64)> {
    folded.lines().filter_map(|line| {
        let (stack, count) = line.rsplit_once(' ')?;
        let count = count.parse::<u64>().ok()?;
        (!is_idle(stack)).then_some((stack, count))
    })
}

/// Where the time goes, by stage of the path: a stage's share is the busy samples whose stack
/// holds one of its frames (inclusive; stages may overlap, e.g. the programs run inside the
/// receive path).
pub const STAGES: [(&str, &[&str]); 8] = [
    ("sender (sendmmsg)", &["__sys_sendmmsg"]),
    ("gateway programs", &["_gateway_"]),
    (
        "skb copy or head realloc (veth XDP, adjust_room)",
        &["veth_xdp_rcv_skb", "pskb_expand_head", "skb_copy"],
    ),
    ("IP forwarding", &["ip_forward"]),
    (
        "netfilter / conntrack",
        &["nf_hook_slow", "nf_conntrack_in"],
    ),
    ("redirect after tc", &["skb_do_redirect"]),
    (
        "UDP receive (client socket)",
        &["__udp4_lib_rcv", "__udp6_lib_rcv"],
    ),
    ("receiver (recvmmsg)", &["__sys_recvmmsg"]),
];

/// Each [`STAGES`] entry's share of the busy samples.
pub fn stage_shares(folded: &str) -> Vec<(String, f64)> {
    let mut busy = 0u64;
    let mut counts = [0u64; STAGES.len()];
    for (stack, count) in stacks(folded) {
        busy += count;
        for (i, (_, frames)) in STAGES.iter().enumerate() {
            if frames.iter().any(|frame| stack.contains(frame)) {
                counts[i] += count;
            }
        }
    }
    #[expect(clippy::cast_precision_loss, reason = "sample shares")]
    STAGES
        .iter()
        .zip(counts)
        .map(|((name, _), count)| ((*name).to_owned(), count as f64 / busy.max(1) as f64))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FOLDED: &str = "swapper;do_idle;default_idle 60\n\
                          udp-blast;__sys_sendmmsg;veth_xmit 30\n\
                          udp-blast;__sys_sendmmsg;ip_forward;veth_xmit 10\n\
                          udp-blast;__sys_sendmmsg;bpf_prog_1a2b_gateway_gate 40\n\
                          udp-blast;__sys_recvmmsg;__udp4_lib_rcv;copy 20\n\
                          garbage line\n";

    #[test]
    fn self_time_counts_the_last_busy_frame_of_each_stack() {
        let (busy, top) = self_time(FOLDED);
        assert_eq!(busy, 100, "the idle loop is not counted");
        assert_eq!(top[0], ("bpf_prog_1a2b_gateway_gate".to_owned(), 0.4));
        assert_eq!(top[1], ("veth_xmit".to_owned(), 0.4));
        assert_eq!(top[2], ("copy".to_owned(), 0.2));
        assert_eq!(top.len(), 3);
    }

    #[test]
    fn stages_are_inclusive_shares_of_the_busy_samples() {
        // In whole percent: the shares are ratios of sample counts.
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "0..=100"
        )]
        let shares: BTreeMap<String, u32> = stage_shares(FOLDED)
            .into_iter()
            .map(|(stage, share)| (stage, (share * 100.0).round() as u32))
            .collect();
        assert_eq!(shares["sender (sendmmsg)"], 80);
        assert_eq!(shares["gateway programs"], 40);
        assert_eq!(shares["IP forwarding"], 10);
        assert_eq!(shares["UDP receive (client socket)"], 20);
        assert_eq!(shares["receiver (recvmmsg)"], 20);
        assert_eq!(shares["netfilter / conntrack"], 0);
    }
}
