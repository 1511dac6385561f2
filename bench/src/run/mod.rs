//! The scenarios of the bench, one module per area, over a shared environment.

pub mod arms;
pub mod churn;
pub mod control;
pub mod drop;
pub mod env;
pub mod latency;
pub mod multicast;
pub mod pass_xdp;
pub mod plan;
pub mod profile;
pub mod relay;
pub mod scale;
pub mod stream;

use bench::model::{Meta, Results};

use self::{env::Env, plan::Plan};

/// How and where this run happens.
pub fn meta(plan: &Plan) -> Meta {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|text| text.trim().to_owned())
        .unwrap_or_default();
    Meta {
        mode: format!("{:?}", plan.mode).to_lowercase(),
        runs: plan.runs,
        window_s: plan.window.as_secs_f64(),
        warmup_s: plan.warmup.as_secs_f64(),
        cpus: std::thread::available_parallelism().map_or(0, usize::from),
        kernel,
        started_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        duration_s: 0.0,
        fd_limit: 0,
    }
}

/// Runs the wanted areas in order; a failing area is recorded and the next one runs.
pub fn run_areas(env: &Env, results: &mut Results, wanted: &dyn Fn(&str) -> bool) {
    if wanted("relay") {
        env.progress("area 1/8: inbound media relay");
        relay::run(env, results);
    }
    if wanted("drop") {
        env.progress("area 2/8: unsolicited drop and collateral damage");
        drop::run(env, results);
    }
    if wanted("control") {
        env.progress("area 3/8: control plane");
        control::run(env, results);
    }
    if wanted("scale") {
        env.progress("area 4/8: kernel relay with many installed entries");
        scale::run(env, results);
    }
    if wanted("churn") {
        env.progress("area 5/8: churn (a million bindings made and ended, then what is left)");
        churn::run(env, results);
    }
    if wanted("latency") {
        env.progress("area 6/8: added latency (UDP echo)");
        latency::run(env, results);
    }
    if wanted("profile") {
        env.progress("area 7/8: where the time goes (perf flame graphs, program run time)");
        profile::run(env, results);
    }
    if wanted("multicast") {
        env.progress("area 8/8: multicast fan-out (1, 8, 64 subscribers)");
        multicast::run(env, results);
    }
}
