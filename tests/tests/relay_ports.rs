//! The relay port ranges belong to the gateway: reserved in the kernel at start (so no ephemeral
//! bind on the host takes one), refused when a port in them is in use, released by `gateway
//! detach` and not before. Root only.

use std::{net::UdpSocket, time::Duration};

use testbed::{
    Netns, Testbed, addr,
    gateway::{TESTBED_ARGS, detach, start_expecting_failure, start_in_fw, unique_instance},
    run_checked,
};

fn reserved(ns: &Netns) -> String {
    let out = run_checked(
        ns.command("sysctl")
            .args(["-n", "net.ipv4.ip_local_reserved_ports"]),
    )
    .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn relay_ports_are_reserved_from_start_until_detach() {
    let bed = Testbed::new().unwrap();
    assert_eq!(reserved(&bed.fw), "", "a fresh namespace reserves nothing");
    // The default ranges lie below Linux's default ephemeral ports; a host whose ephemeral
    // range was widened over them is kept out by the reservation.
    run_checked(
        bed.fw
            .command("sysctl")
            .args(["-w", "net.ipv4.ip_local_port_range=16384 33791"]),
    )
    .unwrap();
    let (mut gateway, _cleanup) = start_in_fw(&bed, &[]).unwrap();
    assert_eq!(
        reserved(&bed.fw),
        "16384-32767",
        "both default ranges reserved"
    );
    // The kernel no longer hands them out as ephemeral ports: it is left 32768-33791.
    let picked: Vec<u16> = bed
        .fw
        .run(|| {
            (0..200)
                .map(|_| {
                    UdpSocket::bind((addr::FW_INSIDE_V4, 0))
                        .unwrap()
                        .local_addr()
                        .unwrap()
                        .port()
                })
                .collect()
        })
        .unwrap();
    assert!(
        picked.iter().all(|port| (32768..=33791).contains(port)),
        "no ephemeral port from the relay ranges: {picked:?}"
    );
    assert!(gateway.stop());
    assert_eq!(reserved(&bed.fw), "16384-32767", "a stop keeps them");
    let said = detach(&bed.fw, &gateway.instance).unwrap();
    assert!(said.contains("reserved ports 16384-32767"), "{said}");
    assert_eq!(
        reserved(&bed.fw),
        "",
        "detach releases exactly what it reserved"
    );
}

#[test]
fn a_relay_range_holding_a_port_in_use_is_refused() {
    let bed = Testbed::new().unwrap();
    let busy = bed
        .fw
        .udp_socket("198.51.100.1:20000", Duration::from_secs(1))
        .unwrap();
    let instance = unique_instance();
    let _cleanup = testbed::gateway::InstanceCleanup {
        instance: instance.clone(),
    };
    let (status, log) = start_expecting_failure(&bed.fw, &instance, &TESTBED_ARGS).unwrap();
    assert!(!status.success());
    assert!(
        log.contains("ports in use: udp 20000") && log.contains("--external-ports"),
        "the refusal names the port and the way out:\n{log}"
    );
    assert_eq!(reserved(&bed.fw), "", "nothing reserved");
    drop(busy);
    // A range over the resolver's query ports is refused too, naming both.
    let (status, log) = start_expecting_failure(
        &bed.fw,
        &instance,
        &[&TESTBED_ARGS[..], &["--external-ports", "55000-56999"]].concat(),
    )
    .unwrap();
    assert!(!status.success());
    assert!(
        log.contains("overlaps the resolver's query ports 50000-60999"),
        "{log}"
    );
    // Another range works.
    let (_gateway, _cleanup2) = start_in_fw(&bed, &["--external-ports", "12000-15999"]).unwrap();
    assert_eq!(reserved(&bed.fw), "12000-15999,24576-32767");
}
