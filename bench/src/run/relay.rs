//! Area 1, inbound media relay: datagrams of each payload size from `server` to a receiver in
//! `client` through each arm, flat out, arms alternating within every run; plus the baseline of
//! the same sender into a local sink in `server` (whose CPU cost is subtracted from the arms').

use std::net::{IpAddr, SocketAddr};

use anyhow::Result;
use bench::model::{Results, StreamRun};
use testbed::addr;

use super::{
    arms::{Arm, ArmGuard, ClientPath, SOURCE, rotated},
    env::{Env, SocketSpec},
    stream::{StreamSpec, run_stream},
};

/// The baseline's sink in `server`.
const LOCAL_SINK: SocketAddr = SocketAddr::new(IpAddr::V4(addr::SERVER_V4), 5006);

pub fn run(env: &Env, results: &mut Results) {
    let runs = env.plan.runs;
    for run in 0..runs {
        for &size in &env.plan.sizes {
            match local_sink(env, size) {
                Ok(stream) => {
                    report(env, run, "local sink", size, &stream);
                    push(results, size, "local_sink", stream);
                }
                Err(error) => results
                    .errors
                    .push(format!("relay baseline {size} B: {error:#}")),
            }
        }
        for arm in rotated(&Arm::RELAYS, run) {
            if let Err(error) = arm_run(env, arm, run, results) {
                let text = format!("relay run {} arm {}: {error:#}", run + 1, arm.key());
                env.progress(&format!("FAILED {text}"));
                results.errors.push(text);
            }
        }
    }
}

fn push(results: &mut Results, size: usize, arm: &str, stream: StreamRun) {
    results
        .relay
        .entry(size)
        .or_default()
        .entry(arm.to_owned())
        .or_default()
        .push(stream);
}

fn report(env: &Env, run: usize, what: &str, size: usize, s: &StreamRun) {
    env.progress(&format!(
        "relay run {}/{} {what:<16} {size:>4} B: offered {:>8.0} pps, delivered {:>8.0} pps, \
         loss {:5.2} %, {:6.0} ns CPU/pkt",
        run + 1,
        env.plan.runs,
        s.offered_pps,
        s.delivered_pps,
        s.loss * 100.0,
        s.cpu_ns_per_delivered
    ));
}

/// The sender into a sink in its own namespace.
fn local_sink(env: &Env, size: usize) -> Result<StreamRun> {
    let spec = StreamSpec {
        sender_ns: &env.bed.server,
        sender_bind: SOURCE,
        to: Some(LOCAL_SINK),
        size,
        rate: 0,
        stamps: false,
        receiver_ns: &env.bed.server,
        sink: Some(SocketSpec::Bind(LOCAL_SINK)),
        sink_ts_offset: None,
        kick: None,
    };
    Ok(run_stream(env, &spec)?.0)
}

/// The media source in `server` flat out at `size` octets through `path` into the client's
/// socket (`kick` until the sender starts).
pub fn flat_out<'a>(
    env: &'a Env,
    path: &ClientPath,
    size: usize,
    kick: &'a dyn Fn() -> Result<()>,
) -> StreamSpec<'a> {
    StreamSpec {
        sender_ns: &env.bed.server,
        sender_bind: SOURCE,
        to: path.inbound_to(),
        size,
        rate: 0,
        stamps: false,
        receiver_ns: &env.bed.client,
        sink: Some(path.sink_socket()),
        sink_ts_offset: None,
        kick: Some(kick),
    }
}

fn arm_run(env: &Env, arm: Arm, run: usize, results: &mut Results) -> Result<()> {
    let _guard = ArmGuard::start(env, arm, &[])?;
    let path = ClientPath::open(env, arm)?;
    let outcome = (|| -> Result<()> {
        for &size in &env.plan.sizes {
            let kick = || path.kick();
            let (stream, _) = run_stream(env, &flat_out(env, &path, size, &kick))?;
            report(env, run, arm.label(), size, &stream);
            push(results, size, arm.key(), stream);
        }
        Ok(())
    })();
    path.close(env);
    outcome
}
