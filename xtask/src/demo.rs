//! `cargo xtask demo` (first form, until the RTSP flow exists): build, bring up the three
//! namespaces, attach the gateway in `fw`, send unsolicited UDP from `server` to a listening
//! socket in `fw`, and show that nothing arrived and every datagram was counted. Tears down.

use std::{net::IpAddr, process::Command, time::Duration};

use anyhow::{Context as _, Result, bail};
use integration_tests::{
    Testbed, addr,
    gateway::{GatewayDaemon, InstanceCleanup, gateway_cli, reason_packets, stats_json},
    iface, traffic, unique_suffix,
};

const PORTS: [u16; 4] = [5004, 5005, 6970, 6971];
const DATAGRAMS: usize = 1000;

pub fn run() -> Result<()> {
    crate::test::cargo(&["build", "--locked", "--package", "gateway"])?;
    let bed = Testbed::new().context("bring up the testbed")?;
    println!(
        "demo: testbed {} (198.51.100.2) -- {} (198.51.100.1 | 203.0.113.1) -- {} (203.0.113.2)",
        bed.client.name(),
        bed.fw.name(),
        bed.server.name()
    );
    let instance = format!("demo-{}", unique_suffix());
    let _cleanup = InstanceCleanup {
        instance: instance.clone(),
    };
    let mut gateway = GatewayDaemon::start(
        &bed.fw,
        &instance,
        &[
            "--external",
            iface::FW_OUTSIDE,
            "--internal",
            iface::FW_INSIDE,
            "--allow-anonymous",
        ],
    )?;
    println!(
        "demo: gateway attached to {} in {}",
        iface::FW_OUTSIDE,
        bed.fw.name()
    );

    let mut ok = true;
    for target in [
        IpAddr::from(addr::FW_OUTSIDE_V4),
        IpAddr::from(addr::FW_OUTSIDE_V6),
    ] {
        let sinks = traffic::bind_sinks(&bed.fw, target, &PORTS)?;
        let before = reason_packets(&stats_json(&bed.fw, &instance)?, "no_binding");
        traffic::send_udp(&bed.server, target, &PORTS, DATAGRAMS, b"unsolicited media")?;
        let received = traffic::drain(&sinks, 0, Duration::from_millis(500));
        let dropped = reason_packets(&stats_json(&bed.fw, &instance)?, "no_binding") - before;
        println!(
            "demo: {DATAGRAMS} unsolicited datagrams from {} to {target} ports {PORTS:?}: \
             {received} reached the listening sockets, {dropped} dropped by XDP (no_binding)",
            if target.is_ipv4() {
                addr::SERVER_V4.to_string()
            } else {
                addr::SERVER_V6.to_string()
            },
        );
        ok &= received == 0 && dropped == DATAGRAMS as u64;
    }

    let table = gateway_cli(&bed.fw, &["stats", "--instance", &instance])?;
    println!(
        "demo: `gateway stats`:\n{}",
        String::from_utf8_lossy(&table.stdout)
    );
    let bpftool = Command::new("nsenter")
        .arg(format!("--net={}", bed.fw.path().display()))
        .args(["bpftool", "net", "list"])
        .output();
    if let Ok(out) = bpftool {
        println!(
            "demo: bpftool net list in {}:\n{}",
            bed.fw.name(),
            String::from_utf8_lossy(&out.stdout).trim_end()
        );
    }
    if !gateway.stop() {
        bail!("the gateway did not stop cleanly:\n{}", gateway.log_text());
    }
    println!("demo: gateway stopped, pins removed, testbed torn down");
    if !ok {
        bail!("demo failed: some unsolicited datagram got through or was not counted");
    }
    println!("demo: OK");
    Ok(())
}
