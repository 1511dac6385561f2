//! One measured stream: a `udp-blast` sink (or none), a `udp-blast` sender, and a window over the
//! kernel's counters: offered = UDP `OutDatagrams` of the sender's namespace, delivered = UDP
//! `InDatagrams` of the receiver's namespace, CPU = busy time of all CPUs from `/proc/stat`.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context as _, Result, bail};
use bench::model::StreamRun;
use testbed::Netns;

use super::env::{Blast, Env, SocketSpec, measure};

/// What to send where.
pub struct StreamSpec<'a> {
    pub sender_ns: &'a Netns,
    pub sender_bind: SocketAddr,
    /// `None`: learn the destination from the first datagram (Dante).
    pub to: Option<SocketAddr>,
    pub size: usize,
    /// 0: flat out.
    pub rate: u64,
    pub stamps: bool,
    /// Whose counters count as delivered.
    pub receiver_ns: &'a Netns,
    /// The sink's socket (none for drop scenarios).
    pub sink: Option<SocketSpec>,
    pub sink_ts_offset: Option<usize>,
    /// Called until the sender starts (Dante needs the client's first datagram).
    pub kick: Option<&'a dyn Fn() -> Result<()>>,
}

/// Reports of the children, for scenarios that look further (delay, sent counts).
pub struct StreamReports {
    pub sender: serde_json::Value,
    pub sink: Option<serde_json::Value>,
}

/// Runs one stream and measures one window of it.
#[expect(clippy::too_many_lines, reason = "start, measure, collect, in order")]
pub fn run_stream(env: &Env, spec: &StreamSpec<'_>) -> Result<(StreamRun, StreamReports)> {
    let plan = &env.plan;
    let mut sink = match spec.sink {
        Some(socket) => {
            let mut args = vec![
                "sink".to_owned(),
                "--duration".to_owned(),
                format!("{}", plan.sender_time().as_secs_f64() + 20.0),
            ];
            if let Some(offset) = spec.sink_ts_offset {
                args.extend(["--ts-offset".to_owned(), offset.to_string()]);
            }
            let mut sink = Blast::spawn(env, spec.receiver_ns, &args, socket, "udp-blast sink")?;
            sink.wait_event("ready", Duration::from_secs(5))?;
            Some(sink)
        }
        None => None,
    };
    let to = spec
        .to
        .map_or_else(|| "learn".to_owned(), |to| to.to_string());
    let mut args = vec![
        "send".to_owned(),
        "--to".to_owned(),
        to,
        "--size".to_owned(),
        spec.size.to_string(),
        "--duration".to_owned(),
        format!("{}", plan.sender_time().as_secs_f64()),
        "--rate".to_owned(),
        plan.rate(spec.rate).to_string(),
    ];
    if spec.stamps {
        args.push("--stamps".to_owned());
    }
    let mut sender = Blast::spawn(
        env,
        spec.sender_ns,
        &args,
        SocketSpec::Bind(spec.sender_bind),
        "udp-blast send",
    )?;
    sender.wait_event("ready", Duration::from_secs(5))?;
    let mut started = false;
    for _ in 0..20 {
        if let Some(kick) = spec.kick {
            kick()?;
        }
        if sender
            .wait_event("started", Duration::from_millis(250))
            .is_ok()
        {
            started = true;
            break;
        }
    }
    if !started {
        bail!("the sender did not start (no datagram to learn its destination from?)");
    }
    let window = measure(spec.sender_ns, spec.receiver_ns, plan.warmup, plan.window)?;
    let sender_report = sender
        .finish(plan.sender_time() + Duration::from_secs(10))
        .context("the sender's report")?;
    let sink_report = match sink.take() {
        Some(sink) => {
            std::thread::sleep(Duration::from_millis(150));
            Some(sink.stop().context("the sink's report")?)
        }
        None => None,
    };
    let offered = window.offered_pps();
    let delivered = window.delivered_pps();
    let run = StreamRun {
        offered_pps: offered,
        delivered_pps: delivered,
        loss: if offered > 0.0 {
            (1.0 - delivered / offered).max(0.0)
        } else {
            0.0
        },
        cpu_ns_per_delivered: if delivered > 0.0 {
            window.busy_ns / (delivered * window.secs)
        } else {
            f64::NAN
        },
        cpu_ns_per_offered: if offered > 0.0 {
            window.busy_ns / (offered * window.secs)
        } else {
            f64::NAN
        },
        busy_cores: window.busy_ns / (window.secs * 1e9),
        rcvbuf_errors: window.rx.rcvbuf_errors,
        no_ports: window.rx.no_ports,
        sender_errors: sender_report["errors"].as_u64().unwrap_or(0),
        sender_sent: sender_report["sent"].as_u64().unwrap_or(0),
        drops_verified: None,
        program_ns_per_packet: None,
    };
    Ok((
        run,
        StreamReports {
            sender: sender_report,
            sink: sink_report,
        },
    ))
}
