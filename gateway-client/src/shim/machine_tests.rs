//! The shim's socket-call logic against a scripted gateway: the call sequences of ffmpeg and
//! `GStreamer`, re-binds, sends before bind, close during step 1, fork, refusals and RAW denied.

use super::*;

const SERVER: &str = "203.0.113.2";

fn sa(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

/// A gateway that hands out external pairs from 16400 and records every call.
#[derive(Default)]
struct Fake {
    calls: Vec<String>,
    next_external: u16,
    /// Refuse pairs (`16`).
    no_pairs: bool,
    /// Refuse every bind.
    refuse: bool,
    /// Do not echo RAW.
    no_raw: bool,
    notices: Vec<String>,
}

impl Control for Fake {
    type Binding = u16;

    fn reserve(&mut self, local_port: u16, pair: bool) -> Result<Reserved<u16>, String> {
        self.calls.push(format!("reserve {local_port} pair={pair}"));
        if self.refuse || (pair && self.no_pairs) {
            return Err("refused".into());
        }
        let external = 16400 + self.next_external;
        self.next_external += 2;
        Ok(Reserved {
            binding: external,
            external: SocketAddr::new(SERVER.replace(".2", ".1").parse().unwrap(), external),
            raw: !self.no_raw,
        })
    }

    fn confirm(&mut self, binding: &mut u16, remote: SocketAddr) -> Result<bool, String> {
        self.calls.push(format!("confirm {binding} {remote}"));
        Ok(!self.no_raw)
    }

    fn open(&mut self, local_port: u16, remote: SocketAddr) -> Result<Reserved<u16>, String> {
        self.calls.push(format!("open {local_port} {remote}"));
        if self.refuse {
            return Err("refused".into());
        }
        Ok(Reserved {
            binding: 20000,
            external: sa("203.0.113.1:20000"),
            raw: !self.no_raw,
        })
    }

    fn release(&mut self, binding: u16) {
        self.calls.push(format!("release {binding}"));
    }

    fn forget_connection(&mut self) {
        self.calls.push("forget".into());
    }

    fn notice(&mut self, text: &str) {
        self.notices.push(text.to_owned());
    }
}

fn shim() -> Shim<u16> {
    Shim::new(Direct::new(
        sa("198.51.100.1:1080"),
        vec![("198.51.100.0".parse().unwrap(), 24)],
    ))
}

/// `bind` as the library does it: ask, bind for real (here: always succeeds), report.
fn bind(
    shim: &mut Shim<u16>,
    gw: &mut Fake,
    fd: Fd,
    requested: &str,
    real_port_if_zero: u16,
) -> SocketAddr {
    let real = shim.bind_address(fd, sa(requested));
    let local = if real.port() == 0 {
        SocketAddr::new(real.ip(), real_port_if_zero)
    } else {
        real
    };
    shim.bound(gw, fd, Some(local));
    real
}

fn setup_reply(client_port: u16, server_port: u16, source: Option<&str>) -> Vec<u8> {
    let source = source.map(|s| format!(";source={s}")).unwrap_or_default();
    format!(
        "RTSP/1.0 200 OK\r\nCSeq: 4\r\nTransport: RTP/AVP;unicast;client_port={client_port}-{};server_port={server_port}-{}{source}\r\nSession: 1\r\n\r\n",
        client_port + 1,
        server_port + 1
    )
    .into_bytes()
}

#[test]
fn ffmpeg_sequence_binds_a_pair_and_confirms_from_the_setup_reply() {
    let (mut shim, mut gw) = (shim(), Fake::default());
    // bind(0.0.0.0:5000) + getsockname: step 1, the external P is reported.
    bind(&mut shim, &mut gw, 3, "0.0.0.0:5000", 0);
    assert_eq!(shim.sockname(&mut gw, 3), Some(sa("203.0.113.1:16400")));
    // Then bind(P0 + 1): the pair's RTCP half, reported as P+1; no second binding.
    assert_eq!(
        bind(&mut shim, &mut gw, 4, "0.0.0.0:5001", 0),
        sa("0.0.0.0:5001")
    );
    assert_eq!(shim.sockname(&mut gw, 4), Some(sa("203.0.113.1:16401")));
    assert_eq!(gw.calls, ["reserve 5000 pair=true"]);
    // The RTSP connection is proxied; its SETUP reply confirms step 2 before PLAY.
    assert!(shim.proxies_tcp(sa("203.0.113.2:8554")));
    shim.tcp_connected(7, sa("203.0.113.2:8554"));
    assert_eq!(shim.peer(7), Some(sa("203.0.113.2:8554")));
    shim.tcp_received(&mut gw, 7, &setup_reply(16400, 6000, None));
    assert_eq!(gw.calls[1], "confirm 16400 203.0.113.2:6000");
    // The punch datagrams to server_port and server_port + 1 go as they are.
    assert_eq!(
        shim.before_send(&mut gw, 3, sa("203.0.113.2:6000")),
        SendPlan::Send
    );
    assert_eq!(
        shim.before_send(&mut gw, 4, sa("203.0.113.2:6001")),
        SendPlan::Send
    );
    assert_eq!(gw.calls.len(), 2, "no second step 2");
    // Closing: the binding goes with its last socket.
    shim.closing(&mut gw, 3);
    assert_eq!(gw.calls.len(), 2);
    shim.closing(&mut gw, 4);
    assert_eq!(gw.calls[2], "release 16400");
    assert_eq!(shim.bindings(), 0);
}

#[test]
fn gstreamer_binds_rtcp_to_the_reported_port_plus_one() {
    let (mut shim, mut gw) = (shim(), Fake::default());
    // bind(0.0.0.0:0) gets an odd port; the shim reports an even P, so GStreamer keeps it.
    bind(&mut shim, &mut gw, 3, "0.0.0.0:0", 40001);
    assert_eq!(shim.sockname(&mut gw, 3), Some(sa("203.0.113.1:16400")));
    // GStreamer binds RTCP to the port it was told + 1: really bound to L + 1.
    assert_eq!(
        bind(&mut shim, &mut gw, 4, "0.0.0.0:16401", 0),
        sa("0.0.0.0:40002")
    );
    assert_eq!(shim.sockname(&mut gw, 4), Some(sa("203.0.113.1:16401")));
    // Its first datagrams go out right after PLAY; the SETUP reply confirmed already.
    shim.tcp_connected(9, sa("203.0.113.2:8554"));
    shim.tcp_received(&mut gw, 9, &setup_reply(16400, 7000, None));
    shim.before_send(&mut gw, 3, sa("203.0.113.2:7000"));
    assert_eq!(
        gw.calls,
        ["reserve 40001 pair=true", "confirm 16400 203.0.113.2:7000"]
    );
}

#[test]
fn a_failed_rtcp_bind_can_be_tried_again() {
    let (mut shim, mut gw) = (shim(), Fake::default());
    bind(&mut shim, &mut gw, 3, "0.0.0.0:0", 40001);
    shim.sockname(&mut gw, 3);
    assert_eq!(
        shim.bind_address(4, sa("0.0.0.0:16401")),
        sa("0.0.0.0:40002")
    );
    shim.bound(&mut gw, 4, None);
    assert_eq!(
        shim.sockname(&mut gw, 4),
        None,
        "not a member after the failed bind"
    );
    assert_eq!(
        bind(&mut shim, &mut gw, 5, "0.0.0.0:16401", 0),
        sa("0.0.0.0:40002")
    );
    assert_eq!(shim.sockname(&mut gw, 5), Some(sa("203.0.113.1:16401")));
}

/// Found by the `shim` fuzz target: the RTP socket closes while its RTCP half's bind is out, and
/// that bind fails; no socket holds the binding any more, so it must go.
#[test]
fn a_binding_whose_rtp_closed_goes_when_its_rtcp_bind_fails() {
    let (mut shim, mut gw) = (shim(), Fake::default());
    bind(&mut shim, &mut gw, 3, "0.0.0.0:0", 40001);
    assert_eq!(shim.sockname(&mut gw, 3), Some(sa("203.0.113.1:16400")));
    assert_eq!(
        shim.bind_address(4, sa("0.0.0.0:16401")),
        sa("0.0.0.0:40002")
    );
    shim.closing(&mut gw, 3);
    assert_eq!(shim.bindings(), 1, "the RTCP half's bind is still out");
    shim.bound(&mut gw, 4, None);
    assert_eq!(shim.bindings(), 0);
    assert_eq!(gw.calls, ["reserve 40001 pair=true", "release 16400"]);
}

#[test]
fn rebinds_until_a_pair_release_what_they_drop() {
    let (mut shim, mut gw) = (shim(), Fake::default());
    for (fd, port) in [(3, 40001), (4, 40011), (5, 40021)] {
        bind(&mut shim, &mut gw, fd, "0.0.0.0:0", port);
        shim.sockname(&mut gw, fd);
        shim.closing(&mut gw, fd);
    }
    assert_eq!(shim.bindings(), 0);
    let released = gw.calls.iter().filter(|c| c.starts_with("release")).count();
    assert_eq!(released, 3, "{:?}", gw.calls);
}

#[test]
fn a_send_before_bind_is_a_one_step_open() {
    let (mut shim, mut gw) = (shim(), Fake::default());
    assert_eq!(
        shim.before_send(&mut gw, 3, sa("203.0.113.2:6000")),
        SendPlan::BindFirst
    );
    shim.bound(&mut gw, 3, Some(sa("0.0.0.0:33333")));
    assert_eq!(
        shim.before_send(&mut gw, 3, sa("203.0.113.2:6000")),
        SendPlan::Send
    );
    assert_eq!(gw.calls, ["open 33333 203.0.113.2:6000"]);
    assert_eq!(shim.sockname(&mut gw, 3), Some(sa("203.0.113.1:20000")));
    // More datagrams: nothing more to ask.
    shim.before_send(&mut gw, 3, sa("203.0.113.2:6000"));
    assert_eq!(gw.calls.len(), 1);
}

#[test]
fn a_bound_socket_that_sends_first_opens_with_that_remote() {
    let (mut shim, mut gw) = (shim(), Fake::default());
    bind(&mut shim, &mut gw, 3, "0.0.0.0:5000", 0);
    shim.before_send(&mut gw, 3, sa("[::ffff:203.0.113.2]:6000"));
    assert_eq!(
        gw.calls,
        ["open 5000 203.0.113.2:6000"],
        "IPv4-mapped is IPv4"
    );
}

#[test]
fn without_a_setup_reply_the_first_datagram_confirms() {
    let (mut shim, mut gw) = (shim(), Fake::default());
    bind(&mut shim, &mut gw, 3, "0.0.0.0:5000", 0);
    shim.sockname(&mut gw, 3);
    bind(&mut shim, &mut gw, 4, "0.0.0.0:5001", 0);
    // RTCP first: the pair's remote is the RTP port, one below.
    shim.before_send(&mut gw, 4, sa("203.0.113.2:6001"));
    shim.before_send(&mut gw, 3, sa("203.0.113.2:6000"));
    assert_eq!(
        gw.calls,
        ["reserve 5000 pair=true", "confirm 16400 203.0.113.2:6000"]
    );
}

#[test]
fn a_setup_reply_with_source_names_the_media_host() {
    let (mut shim, mut gw) = (shim(), Fake::default());
    bind(&mut shim, &mut gw, 3, "0.0.0.0:5000", 0);
    shim.sockname(&mut gw, 3);
    shim.tcp_connected(7, sa("203.0.113.2:8554"));
    let reply = setup_reply(16400, 6000, Some("203.0.113.3"));
    // Byte by byte, as a slow connection would deliver it.
    for byte in &reply {
        shim.tcp_received(&mut gw, 7, std::slice::from_ref(byte));
    }
    assert_eq!(gw.calls[1], "confirm 16400 203.0.113.3:6000");
    // A reply for a port the shim does not know confirms nothing.
    shim.tcp_received(&mut gw, 7, &setup_reply(17000, 6000, None));
    assert_eq!(gw.calls.len(), 2);
}

#[test]
fn close_during_step_one_releases() {
    let (mut shim, mut gw) = (shim(), Fake::default());
    bind(&mut shim, &mut gw, 3, "0.0.0.0:5000", 0);
    shim.sockname(&mut gw, 3);
    shim.closing(&mut gw, 3);
    assert_eq!(gw.calls, ["reserve 5000 pair=true", "release 16400"]);
}

#[test]
fn a_forked_child_forgets_the_parents_bindings() {
    let (mut shim, mut gw) = (shim(), Fake::default());
    bind(&mut shim, &mut gw, 3, "0.0.0.0:5000", 0);
    shim.sockname(&mut gw, 3);
    shim.forked_child(&mut gw);
    assert_eq!(gw.calls.last().unwrap(), "forget");
    // Closing the inherited socket releases nothing (it is the parent's binding).
    shim.closing(&mut gw, 3);
    assert!(!gw.calls.iter().any(|c| c.starts_with("release")));
    // The child's own sockets get their own bindings.
    bind(&mut shim, &mut gw, 8, "0.0.0.0:6000", 0);
    assert!(shim.sockname(&mut gw, 8).is_some());
}

#[test]
fn a_refused_bind_leaves_the_socket_alone_and_says_so_once() {
    let mut gw = Fake {
        refuse: true,
        ..Fake::default()
    };
    let mut shim = shim();
    for fd in [3, 4] {
        bind(
            &mut shim,
            &mut gw,
            fd,
            "0.0.0.0:0",
            40000 + u16::try_from(fd).unwrap() * 2,
        );
        assert_eq!(shim.sockname(&mut gw, fd), None, "the real address");
        assert_eq!(
            shim.before_send(&mut gw, fd, sa("203.0.113.2:6000")),
            SendPlan::Send
        );
    }
    assert_eq!(gw.notices.len(), 1, "{:?}", gw.notices);
    assert!(gw.notices[0].contains("refused"));
}

#[test]
fn without_raw_the_binding_is_released_and_the_user_told() {
    let mut gw = Fake {
        no_raw: true,
        ..Fake::default()
    };
    let mut shim = shim();
    bind(&mut shim, &mut gw, 3, "0.0.0.0:5000", 0);
    assert_eq!(shim.sockname(&mut gw, 3), None);
    assert_eq!(gw.calls, ["reserve 5000 pair=true", "release 16400"]);
    assert_eq!(gw.notices.len(), 1);
    assert!(gw.notices[0].contains("RAW"), "{:?}", gw.notices);
}

#[test]
fn no_aligned_pair_falls_back_to_a_single_binding() {
    let mut gw = Fake {
        no_pairs: true,
        ..Fake::default()
    };
    let mut shim = shim();
    bind(&mut shim, &mut gw, 3, "0.0.0.0:5000", 0);
    assert!(shim.sockname(&mut gw, 3).is_some());
    assert_eq!(
        gw.calls,
        ["reserve 5000 pair=true", "reserve 5000 pair=false"]
    );
    // Not a pair: the next port is a socket of its own.
    bind(&mut shim, &mut gw, 4, "0.0.0.0:5001", 0);
    shim.sockname(&mut gw, 4);
    assert_eq!(gw.calls[2], "reserve 5001 pair=true");
}

#[test]
fn direct_destinations_never_touch_the_gateway() {
    let (mut shim, mut gw) = (shim(), Fake::default());
    bind(&mut shim, &mut gw, 3, "0.0.0.0:5353", 0);
    for to in [
        "127.0.0.1:53",
        "198.51.100.9:53",
        "224.0.0.251:5353",
        "198.51.100.1:1080",
        "[ff02::fb]:5353",
        "[fe80::1]:53",
    ] {
        assert_eq!(shim.before_send(&mut gw, 3, sa(to)), SendPlan::Send, "{to}");
        assert!(!shim.proxies_tcp(sa(to)), "{to}");
    }
    assert!(gw.calls.is_empty(), "{:?}", gw.calls);
    // A socket bound to loopback is never proxied.
    bind(&mut shim, &mut gw, 4, "127.0.0.1:7000", 0);
    assert_eq!(shim.sockname(&mut gw, 4), None);
    assert!(gw.calls.is_empty());
    // One bound to the host's own address (on a direct network) is: its remotes are outside.
    bind(&mut shim, &mut gw, 5, "198.51.100.2:7002", 0);
    assert!(shim.sockname(&mut gw, 5).is_some());
    assert_eq!(gw.calls, ["reserve 7002 pair=true"]);
    assert!(shim.proxies_tcp(sa("203.0.113.2:80")));
}
