//! The default-drop gate in the test bed: with the gateway attached in `fw`, unsolicited UDP from
//! `server` never reaches a socket in `fw` and is counted; TCP still works; a stopped daemon
//! leaves the gate dropping, and only `gateway detach` lets the same datagrams arrive; a
//! `SIGKILL`ed daemon leaves the gate closed and a new daemon takes it over. Root only.

mod common;

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use common::pinned_packets;
use testbed::{
    Testbed, addr,
    gateway::{
        GatewayDaemon, InstanceCleanup, TESTBED_ARGS, detach, gate_attached, gateway_cli,
        reason_packets, start_in_fw, stats_json, unique_instance, xdp_attached,
    },
    iface,
    traffic::{self, drain},
    wait_until,
};

const PORTS: std::ops::Range<u16> = 7001..7011;
const DATAGRAMS: usize = 1000;

const PAYLOAD: &[u8] = b"unsolicited datagram";

fn ports() -> Vec<u16> {
    PORTS.collect()
}

fn bind_sinks(bed: &Testbed, ip: IpAddr) -> Vec<UdpSocket> {
    traffic::bind_sinks(&bed.fw, ip, &ports()).unwrap()
}

fn send_from_server(bed: &Testbed, target: IpAddr) {
    traffic::send_udp(&bed.server, target, &ports(), DATAGRAMS, PAYLOAD).unwrap();
}

fn no_binding_drops(bed: &Testbed, instance: &str) -> u64 {
    reason_packets(&stats_json(&bed.fw, instance).unwrap(), "no_binding")
}

fn pinned_no_binding(cleanup: &InstanceCleanup) -> u64 {
    pinned_packets(cleanup, gateway_common::ExitReason::NoBinding)
}

/// Sends the unsolicited burst, waits until the gate has counted all of it, then checks that
/// nothing reached a socket.
fn assert_burst_dropped(bed: &Testbed, sinks: &[UdpSocket], cleanup: &InstanceCleanup, what: &str) {
    let target = sinks[0].local_addr().unwrap().ip();
    let before = pinned_no_binding(cleanup);
    send_from_server(bed, target);
    assert!(
        wait_until(Duration::from_secs(10), || pinned_no_binding(cleanup)
            >= before + DATAGRAMS as u64),
        "{what}: every datagram counted as no_binding ({} of {DATAGRAMS})",
        pinned_no_binding(cleanup) - before
    );
    assert_eq!(
        drain(sinks, 0, Duration::from_millis(200)),
        0,
        "{what}: no unsolicited datagram may reach a socket in fw"
    );
    assert_eq!(
        pinned_no_binding(cleanup) - before,
        DATAGRAMS as u64,
        "{what}"
    );
}

fn tcp_still_works(bed: &Testbed, ip: IpAddr) {
    let listener = bed
        .fw
        .run(move || TcpListener::bind(SocketAddr::new(ip, 8080)).unwrap())
        .unwrap();
    let server_side = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut buf = [0u8; 5];
        stream.read_exact(&mut buf).unwrap();
        stream.write_all(&buf).unwrap();
    });
    let echoed = bed
        .server
        .run(move || {
            let mut stream =
                TcpStream::connect_timeout(&SocketAddr::new(ip, 8080), Duration::from_secs(5))
                    .unwrap();
            stream.write_all(b"hello").unwrap();
            let mut buf = [0u8; 5];
            stream.read_exact(&mut buf).unwrap();
            buf
        })
        .unwrap();
    server_side.join().unwrap();
    assert_eq!(&echoed, b"hello");
}

fn gate_drops_until_it_is_detached(target: IpAddr) {
    let bed = Testbed::new().unwrap();
    let sinks = bind_sinks(&bed, target);
    let (mut gateway, cleanup) = start_in_fw(&bed, &[]).unwrap();
    let instance = gateway.instance.clone();

    assert_burst_dropped(&bed, &sinks, &cleanup, "gate attached");
    assert!(
        no_binding_drops(&bed, &instance) >= DATAGRAMS as u64,
        "`gateway stats` shows the drops"
    );
    tcp_still_works(&bed, target);

    assert!(
        gateway.stop(),
        "clean exit on SIGTERM:\n{}",
        gateway.log_text()
    );
    assert!(
        gateway
            .log_text()
            .contains("gate left attached and dropping"),
        "the stop says what it left:\n{}",
        gateway.log_text()
    );
    assert_burst_dropped(&bed, &sinks, &cleanup, "after SIGTERM");
    assert!(gate_attached(&bed.fw, iface::FW_OUTSIDE).unwrap());
    // The internal side's tc program stays too: inside UDP to the external address is dropped.
    let inside_sink = bed
        .fw
        .udp_socket(
            &SocketAddr::new(target, 7100).to_string(),
            Duration::from_secs(2),
        )
        .unwrap();
    let inside_to_external = |count: usize| {
        bed.client
            .run(move || {
                let any = if target.is_ipv4() {
                    "0.0.0.0:0"
                } else {
                    "[::]:0"
                };
                let socket = UdpSocket::bind(any).unwrap();
                for _ in 0..count {
                    socket.send_to(b"from inside", (target, 7100)).unwrap();
                }
            })
            .unwrap();
    };
    let inside_drops = || {
        pinned_packets(
            &cleanup,
            gateway_common::ExitReason::InsideToExternalAddress,
        )
    };
    let before = inside_drops();
    inside_to_external(10);
    assert!(
        wait_until(Duration::from_secs(5), || inside_drops() >= before + 10),
        "after SIGTERM the internal side still drops and counts UDP to external addresses"
    );
    assert_eq!(
        drain(
            std::slice::from_ref(&inside_sink),
            0,
            Duration::from_millis(100)
        ),
        0,
        "none of it reaches a socket"
    );

    let said = detach(&bed.fw, &instance).unwrap();
    println!("{target}: gateway detach said:\n{said}");
    assert!(!cleanup.pin_dir().exists(), "detach removes every pin");
    assert!(
        !gate_attached(&bed.fw, iface::FW_OUTSIDE).unwrap(),
        "no gate program stays attached"
    );
    inside_to_external(10);
    assert_eq!(
        drain(
            std::slice::from_ref(&inside_sink),
            10,
            Duration::from_secs(5)
        ),
        10,
        "no tc program stays attached: inside UDP to the external address arrives"
    );
    send_from_server(&bed, target);
    let received = drain(&sinks, DATAGRAMS, Duration::from_secs(5));
    println!("{target}: gate detached: received {received}");
    assert_eq!(
        received, DATAGRAMS,
        "without the gate the same datagrams arrive"
    );
}

#[test]
fn ipv4_unsolicited_udp_is_dropped_until_the_gate_is_detached() {
    gate_drops_until_it_is_detached(addr::FW_OUTSIDE_V4.into());
}

#[test]
fn ipv6_unsolicited_udp_is_dropped_until_the_gate_is_detached() {
    gate_drops_until_it_is_detached(addr::FW_OUTSIDE_V6.into());
}

#[test]
fn sigkill_leaves_the_gate_closed_and_a_new_daemon_takes_over() {
    let bed = Testbed::new().unwrap();
    let instance = unique_instance();
    let cleanup = InstanceCleanup {
        instance: instance.clone(),
    };
    let target: IpAddr = addr::FW_OUTSIDE_V4.into();
    let sinks = bind_sinks(&bed, target);
    let mut first = GatewayDaemon::start(&bed.fw, &instance, &TESTBED_ARGS).unwrap();
    first.kill();

    // No daemon: the CLI says so and fails, but the pinned gate still drops and counts.
    let out = gateway_cli(&bed.fw, &["stats", "--instance", &instance]).unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is running"),
        "stats explains: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_burst_dropped(&bed, &sinks, &cleanup, "after SIGKILL");

    // A new daemon takes over without manual cleanup, and keeps dropping.
    let mut second = GatewayDaemon::start(&bed.fw, &instance, &TESTBED_ARGS).unwrap();
    assert!(
        second.log_text().contains("previous daemon"),
        "takeover is logged:\n{}",
        second.log_text()
    );
    assert_burst_dropped(&bed, &sinks, &cleanup, "after the takeover");

    assert!(second.stop());
    assert_burst_dropped(
        &bed,
        &sinks,
        &cleanup,
        "after a clean stop of the new daemon",
    );
}

#[test]
fn refuses_a_second_daemon_and_unknown_interfaces() {
    let bed = Testbed::new().unwrap();
    let (first, _cleanup) = start_in_fw(&bed, &[]).unwrap();
    let instance = first.instance.clone();

    let out = gateway_cli(
        &bed.fw,
        &[&["run", "--instance", &instance][..], &TESTBED_ARGS].concat(),
    )
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("already running") && stderr.contains(&first.pid().to_string()),
        "names the live owner: {stderr}"
    );

    let out = gateway_cli(
        &bed.fw,
        &[
            "run",
            "--instance",
            "other",
            "--external",
            "nosuch0",
            "--internal",
            iface::FW_INSIDE,
        ],
    )
    .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"nosuch0\" does not exist"));

    // A control listener outside the internal interface is refused before anything is attached.
    for (listen, says) in [
        ("203.0.113.1:1080", "external interface"),
        ("127.0.0.1:1080", "not an address of --internal"),
    ] {
        let out = gateway_cli(
            &bed.fw,
            &[
                &["run", "--instance", "other", "--listen", listen][..],
                &TESTBED_ARGS,
            ]
            .concat(),
        )
        .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(says),
            "{listen}: {stderr}"
        );
    }
}

#[test]
fn operator_allow_list_admits_exactly_one_host_flow() {
    let bed = Testbed::new().unwrap();
    let target: IpAddr = addr::FW_OUTSIDE_V4.into();
    let sinks = bind_sinks(&bed, target);
    let flow = format!("{}:5123,{target}:{}", addr::SERVER_V4, PORTS.start);
    let (gateway, _cleanup) = start_in_fw(&bed, &["--allow-host-udp", &flow]).unwrap();
    let instance = gateway.instance.clone();

    let (allowed, other_port) = bed
        .server
        .run(move || {
            let allowed = UdpSocket::bind((addr::SERVER_V4, 5123)).unwrap();
            let other = UdpSocket::bind((addr::SERVER_V4, 5124)).unwrap();
            for _ in 0..10 {
                allowed.send_to(b"ntp-like", (target, PORTS.start)).unwrap();
                // Same remote, another local port; and another remote port: both dropped.
                allowed
                    .send_to(b"ntp-like", (target, PORTS.start + 1))
                    .unwrap();
                other.send_to(b"ntp-like", (target, PORTS.start)).unwrap();
            }
            (10, 20)
        })
        .unwrap();
    let received = drain(&sinks, allowed, Duration::from_secs(5));
    assert!(
        wait_until(Duration::from_secs(5), || no_binding_drops(&bed, &instance)
            >= other_port),
        "the other flows are counted"
    );
    let received = received + drain(&sinks, 0, Duration::from_millis(100));
    let stats = stats_json(&bed.fw, &instance).unwrap();
    assert_eq!(received, allowed, "only the allow-listed flow arrives");
    assert_eq!(reason_packets(&stats, "host_allow_listed"), allowed as u64);
    assert_eq!(reason_packets(&stats, "no_binding"), other_port);
}

#[test]
fn refuses_without_root() {
    let bed = Testbed::new().unwrap();
    let out = bed
        .fw
        .command("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(testbed::gateway::gateway_bin())
        .args(["run", "--instance", "unprivileged"])
        .args(TESTBED_ARGS)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs root"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn detach_removes_what_a_dead_daemon_left() {
    let bed = Testbed::new().unwrap();
    let target: IpAddr = addr::FW_OUTSIDE_V4.into();
    let sinks = bind_sinks(&bed, target);
    let (mut gateway, cleanup) = start_in_fw(&bed, &[]).unwrap();
    let instance = gateway.instance.clone();

    let refused = gateway_cli(&bed.fw, &["detach", "--instance", &instance]).unwrap();
    assert!(
        !refused.status.success(),
        "a live daemon is not detached behind its back"
    );

    // Without tcx (before Linux 6.6, e.g. Debian 12's 6.1) the tc programs are netlink filters,
    // recorded in the run directory, instead of pinned tcx links.
    let netlink = gateway.log_text().contains("(netlink filter)");
    // Where the gate runs in XDP its link is pinned too.
    let xdp = gateway.log_text().contains("hook=\"xdp\"");
    assert!(
        xdp || gateway.log_text().contains("hook=\"tc\""),
        "the log names the gate's hook:\n{}",
        gateway.log_text()
    );
    gateway.kill();
    assert_burst_dropped(&bed, &sinks, &cleanup, "the gate outlives the daemon");

    let out = gateway_cli(&bed.fw, &["detach", "--instance", &instance]).unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}");
    let tc = if netlink {
        [
            format!("tc netlink filter on {}", iface::FW_OUTSIDE),
            format!("tc netlink filter on {}", iface::FW_INSIDE),
        ]
    } else {
        ["tc_external_link".to_owned(), "tc_internal_link".to_owned()]
    };
    for what in ["BINDINGS"]
        .into_iter()
        .chain(xdp.then_some("xdp_external_link"))
        .chain(tc.iter().map(String::as_str))
    {
        assert!(said.contains(what), "detach says it removed {what}: {said}");
    }
    assert!(!cleanup.pin_dir().exists());
    send_from_server(&bed, target);
    assert_eq!(
        drain(&sinks, DATAGRAMS, Duration::from_secs(5)),
        DATAGRAMS,
        "after detach the datagrams arrive again"
    );
    let again = gateway_cli(&bed.fw, &["detach", "--instance", &instance]).unwrap();
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing pinned"));
}

#[test]
fn config_file_runs_the_gateway_and_bad_keys_are_refused() {
    let bed = Testbed::new().unwrap();
    let instance = unique_instance();
    let _cleanup = InstanceCleanup {
        instance: instance.clone(),
    };
    let dir = std::env::temp_dir().join(format!("gateway-config-{instance}"));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        format!(
            "external = \"{}\"\ninternal = \"{}\"\nallow_anonymous = true\ninstance = \"{instance}\"\n",
            iface::FW_OUTSIDE,
            iface::FW_INSIDE
        ),
    )
    .unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "external = \"outside0\"\nresolvers = [\"not-an-ip\"]\n",
    )
    .unwrap();
    let typo = dir.join("typo.toml");
    std::fs::write(&typo, "externall = \"outside0\"\n").unwrap();

    for (file, expected) in [(&bad, "key `resolvers`"), (&typo, "externall")] {
        let out = gateway_cli(&bed.fw, &["run", "--config", file.to_str().unwrap()]).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            stderr.contains(expected),
            "the error names the key {expected}: {stderr}"
        );
    }
    let gateway =
        GatewayDaemon::start(&bed.fw, &instance, &["--config", good.to_str().unwrap()]).unwrap();
    let before = no_binding_drops(&bed, &instance);
    send_from_server(&bed, addr::FW_OUTSIDE_V4.into());
    assert_eq!(no_binding_drops(&bed, &instance) - before, DATAGRAMS as u64);
    drop(gateway);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The tc filters on `interface`'s ingress, as `tc filter show` lists them.
fn tc_filters(bed: &Testbed, interface: &str) -> String {
    let out = testbed::run_checked(
        bed.fw
            .command("tc")
            .args(["filter", "show", "dev", interface, "ingress"]),
    )
    .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn netlink_filters_stay_after_a_stop_and_go_with_detach() {
    let bed = Testbed::new().unwrap();
    let (mut gateway, cleanup) = start_in_fw(&bed, &["--tc-attach", "netlink"]).unwrap();
    for interface in [iface::FW_INSIDE, iface::FW_OUTSIDE] {
        assert!(
            tc_filters(&bed, interface).contains("gateway_"),
            "{interface}: {}",
            tc_filters(&bed, interface)
        );
    }
    assert!(gateway.stop());
    assert!(
        tc_filters(&bed, iface::FW_INSIDE).contains("gateway_internal"),
        "the filter outlives the daemon"
    );
    let said = detach(&bed.fw, &cleanup.instance).unwrap();
    assert!(said.contains("tc netlink filter on"), "{said}");
    for interface in [iface::FW_INSIDE, iface::FW_OUTSIDE] {
        assert!(
            !tc_filters(&bed, interface).contains("gateway_"),
            "{interface}: detach removed the filter"
        );
    }
}

/// The daemon's start line for the gate, naming its hook.
fn gate_hook_logged(gateway: &GatewayDaemon) -> Option<&'static str> {
    let log = gateway.log_text();
    let line = log.lines().find(|line| line.contains("gate attached"))?;
    ["xdp", "tc"]
        .into_iter()
        .find(|hook| line.contains(&format!("hook=\"{hook}\"")))
}

#[test]
fn the_gate_hook_changes_across_restarts_without_an_open_moment() {
    let bed = Testbed::new().unwrap();
    let instance = unique_instance();
    let cleanup = InstanceCleanup {
        instance: instance.clone(),
    };
    let target: IpAddr = addr::FW_OUTSIDE_V4.into();
    let sinks = bind_sinks(&bed, target);
    let start = |hook: &str| {
        let args: Vec<&str> = TESTBED_ARGS
            .iter()
            .copied()
            .chain(["--gate-hook", hook])
            .collect();
        GatewayDaemon::start(&bed.fw, &instance, &args).unwrap()
    };

    // On veth, `auto` puts the gate in tc: no XDP program.
    let mut auto = start("auto");
    assert_eq!(gate_hook_logged(&auto), Some("tc"), "{}", auto.log_text());
    assert!(!xdp_attached(&bed.fw, iface::FW_OUTSIDE).unwrap());
    assert_burst_dropped(&bed, &sinks, &cleanup, "tc gate");
    auto.kill();

    // Forced into XDP after a crash: takes over the tc link, adds the XDP gate.
    let mut xdp = start("xdp");
    assert_eq!(gate_hook_logged(&xdp), Some("xdp"), "{}", xdp.log_text());
    assert!(xdp_attached(&bed.fw, iface::FW_OUTSIDE).unwrap());
    assert_burst_dropped(&bed, &sinks, &cleanup, "XDP gate after the tc gate");
    xdp.kill();
    assert_burst_dropped(&bed, &sinks, &cleanup, "the XDP gate of a killed daemon");

    // Back to tc: the tc program gates before the old XDP gate is removed.
    let mut tc = start("tc");
    assert_eq!(gate_hook_logged(&tc), Some("tc"), "{}", tc.log_text());
    assert!(
        tc.log_text().contains("XDP gate removed"),
        "the removal of the old XDP gate is logged:\n{}",
        tc.log_text()
    );
    assert!(!xdp_attached(&bed.fw, iface::FW_OUTSIDE).unwrap());
    assert_burst_dropped(&bed, &sinks, &cleanup, "tc gate after the XDP gate");
    assert!(tc.stop());
    assert_burst_dropped(&bed, &sinks, &cleanup, "after a clean stop of the tc gate");
    detach(&bed.fw, &instance).unwrap();
    assert!(!gate_attached(&bed.fw, iface::FW_OUTSIDE).unwrap());
}
