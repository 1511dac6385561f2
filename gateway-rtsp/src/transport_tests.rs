//! Unit tests of the Transport header: the requests and replies of protocol.md section 5, RTSP
//! 2.0 `src_addr`, IPv6 sources, and malformed or hostile values (clear errors, no panics).

use super::*;

fn ip(text: &str) -> Option<SourceHost> {
    text.parse().ok().map(SourceHost::Ip)
}

#[test]
fn client_request_names_the_pair() {
    assert_eq!(
        client_request(30000),
        "RTP/AVP;unicast;client_port=30000-30001"
    );
    let parsed = parse_request(&client_request(30000)).unwrap();
    assert_eq!(parsed.client_port, (30000, 30001));
}

#[test]
fn gstreamer_reply_without_source() {
    // testbed.md: GStreamer's rtsp-server answers with server_port and no source.
    let reply = parse_reply(
        "RTP/AVP;unicast;client_port=45962-45963;server_port=57094-57095;ssrc=B69B264D;\
         mode=\"PLAY\"",
    )
    .unwrap();
    assert_eq!(
        reply,
        ReplyTransport {
            source: None,
            ports: Some((57094, 57095)),
            ssrc: Some(0xB69B_264D),
            client_port: Some((45962, 45963)),
        }
    );
}

#[test]
fn demo_server_reply_round_trips() {
    let header = server_reply(
        (30000, 30001),
        (6000, 6001),
        "203.0.113.3".parse().unwrap(),
        7,
    );
    let reply = parse_reply(&header).unwrap();
    assert_eq!(reply.source, ip("203.0.113.3"));
    assert_eq!(reply.ports, Some((6000, 6001)));
    assert_eq!(reply.ssrc, Some(7));
    let v6 = server_reply((2, 3), (4, 5), "2001:db8:2::2".parse().unwrap(), 1);
    assert_eq!(parse_reply(&v6).unwrap().source, ip("2001:db8:2::2"));
}

#[test]
fn single_port_and_names_and_udp_spelled_out() {
    let reply = parse_reply("RTP/AVP/UDP;unicast;server_port=7000;source=media.test").unwrap();
    assert_eq!(reply.ports, Some((7000, 7001)));
    assert_eq!(reply.source, Some(SourceHost::Name("media.test".into())));
}

#[test]
fn rtsp2_src_addr() {
    let reply = parse_reply(
        "RTP/AVP;unicast;dest_addr=\"192.0.2.5:3456\"/\"192.0.2.5:3457\";\
         src_addr=\"192.0.2.224:6256\"/\"192.0.2.224:6257\";mode=\"PLAY\"",
    )
    .unwrap();
    assert_eq!(reply.source, ip("192.0.2.224"));
    assert_eq!(reply.ports, Some((6256, 6257)));
    let port_only = parse_reply("RTP/AVP;unicast;src_addr=\":6000\"").unwrap();
    assert_eq!(
        (port_only.source, port_only.ports),
        (None, Some((6000, 6001)))
    );
    let v6 = parse_reply("RTP/AVP;unicast;src_addr=\"[2001:db8::1]:6000\"").unwrap();
    assert_eq!(v6.source, ip("2001:db8::1"));
    // source= wins over src_addr's host; server_port over its ports.
    let both = parse_reply(
        "RTP/AVP;unicast;server_port=8000-8001;source=192.0.2.9;src_addr=\"192.0.2.1:6000\"",
    )
    .unwrap();
    assert_eq!(
        (both.source, both.ports),
        (ip("192.0.2.9"), Some((8000, 8001)))
    );
}

#[test]
fn ipv6_sources_with_and_without_quotes() {
    for value in [
        "RTP/AVP;unicast;server_port=6000-6001;source=2001:db8:2::2",
        "RTP/AVP;unicast;server_port=6000-6001;source=\"2001:db8:2::2\"",
        "RTP/AVP;unicast;server_port=6000-6001;source=[2001:db8:2::2]",
    ] {
        assert_eq!(
            parse_reply(value).unwrap().source,
            ip("2001:db8:2::2"),
            "{value}"
        );
    }
}

#[test]
fn a_reply_without_ports_parses_with_none() {
    let reply = parse_reply("RTP/AVP;unicast;client_port=30000-30001").unwrap();
    assert_eq!(reply.ports, None);
}

#[test]
fn unusable_transports_are_clear_errors() {
    for (value, says) in [
        ("RTP/AVP/TCP;unicast;interleaved=0-1", "TCP"),
        ("RTP/AVP;multicast;port=5000-5001", "multicast"),
        ("RTP/SAVP;unicast;server_port=1-2", "RTP/AVP"),
        ("RAW/RAW/UDP;unicast", "no RTP transport"),
        ("", "no RTP transport"),
        ("RTP/AVP;unicast;server_port=0-1", "server_port"),
        ("RTP/AVP;unicast;server_port=65535", "server_port"),
        ("RTP/AVP;unicast;server_port=abc", "bad server_port"),
        (
            "RTP/AVP;unicast;server_port=99999-100000",
            "bad server_port",
        ),
        ("RTP/AVP;unicast;server_port", "bad server_port"),
        (
            "RTP/AVP;unicast;server_port=6000;source=bad_host!",
            "source host",
        ),
        ("RTP/AVP;unicast;src_addr=\"host-without-port\"", "src_addr"),
        // rtsp-types 0.1 panics on these two.
        ("RTP/AVP;unicast;src_addr=\"/\"", "src_addr"),
        ("RTP/AVP;unicast;src_addr=\"a\\\"", "src_addr"),
        ("RTP/AVP;unicast;source=\"open", "unclosed quote"),
        ("RTP/AVP;unicast;ssrc=123456789", "bad ssrc"),
        ("RTP/AVP;un icast", "bad parameter"),
        ("RTP/AVP;unicast;source=h\u{e9}te", "non-ASCII"),
        ("RTP/AVP;unicast;source=a\r\nX: y", "control characters"),
    ] {
        let error = parse_reply(value).unwrap_err().to_string();
        assert!(error.contains(says), "{value:?}: {error}");
    }
    let long = format!("RTP/AVP;unicast;{}", "x;".repeat(3000));
    assert!(parse_reply(&long).unwrap_err().to_string().contains("4096"));
}

#[test]
fn requests_without_a_usable_transport_are_refused() {
    assert!(parse_request("RTP/AVP;unicast").is_err());
    assert!(parse_request("RTP/AVP/TCP;unicast;interleaved=0-1").is_err());
    // A list: the first usable one is taken.
    let list = "RTP/AVP/TCP;unicast;interleaved=0-1,RTP/AVP;unicast;client_port=4000-4001";
    assert_eq!(parse_request(list).unwrap().client_port, (4000, 4001));
}

fn multicast(value: &str) -> MulticastTransport {
    match parse_setup_reply(value) {
        Ok(SetupTransport::Multicast(multicast)) => multicast,
        other => panic!("{value:?}: {other:?}"),
    }
}

fn group(text: &str) -> IpAddr {
    text.parse().unwrap()
}

#[test]
fn the_multicast_request_names_no_ports() {
    assert_eq!(client_request_multicast(), "RTP/AVP;multicast");
    let parsed = parse(&client_request_multicast()).unwrap();
    assert!(parsed[0].multicast && !parsed[0].unicast);
    assert_eq!((parsed[0].client_port, parsed[0].port), (None, None));
}

#[test]
fn gstreamer_multicast_reply() {
    // What GStreamer's rtsp-server answers with UDP_MCAST and an address pool.
    let reply =
        multicast("RTP/AVP;multicast;destination=233.252.0.10;ttl=16;port=5000-5001;mode=\"PLAY\"");
    assert_eq!(
        reply,
        MulticastTransport {
            group: group("233.252.0.10"),
            ports: (5000, 5001),
            ttl: Some(16),
            source: None,
            ssrc: None,
        }
    );
    let with_more = multicast(
        "RTP/AVP/UDP;multicast;destination=\"233.252.0.11\";port=5002;ttl=1;ssrc=0000BEEF;\
         source=203.0.113.2",
    );
    assert_eq!(with_more.group, group("233.252.0.11"));
    assert_eq!(
        with_more.ports,
        (5002, 5003),
        "a single port: RTCP on the next"
    );
    assert_eq!(with_more.ttl, Some(1));
    assert_eq!(with_more.ssrc, Some(0xBEEF));
    assert_eq!(with_more.source, ip("203.0.113.2"));
}

#[test]
fn ipv6_groups_with_and_without_brackets() {
    for value in [
        "RTP/AVP;multicast;destination=ff0e::db8:0:1;port=5000-5001",
        "RTP/AVP;multicast;destination=[ff0e::db8:0:1];port=5000-5001",
        "RTP/AVP;multicast;destination=\"ff0e::db8:0:1\";port=5000-5001",
        "RTP/AVP;multicast;dest_addr=\"[ff0e::db8:0:1]:5000\"/\"[ff0e::db8:0:1]:5001\"",
        "RTP/AVP;multicast;dest_addr=\"[ff0e::db8:0:1]:5000\"",
    ] {
        let reply = multicast(value);
        assert_eq!(
            (reply.group, reply.ports),
            (group("ff0e::db8:0:1"), (5000, 5001)),
            "{value}"
        );
    }
    // An IPv4-mapped group is its IPv4 group.
    let mapped = multicast("RTP/AVP;multicast;destination=::ffff:233.252.0.1;port=6000");
    assert_eq!(mapped.group, group("233.252.0.1"));
}

#[test]
fn rtsp2_dest_addr_and_precedence() {
    let reply = multicast(
        "RTP/AVP;multicast;dest_addr=\"233.252.0.12:5010\"/\"233.252.0.12:5011\";ttl=127",
    );
    assert_eq!(
        (reply.group, reply.ports, reply.ttl),
        (group("233.252.0.12"), (5010, 5011), Some(127))
    );
    // destination= and port= win over dest_addr.
    let both = multicast(
        "RTP/AVP;multicast;destination=233.252.0.13;port=7000-7001;dest_addr=\"233.252.0.14:5000\"",
    );
    assert_eq!(
        (both.group, both.ports),
        (group("233.252.0.13"), (7000, 7001))
    );
}

#[test]
fn neither_flag_is_decided_by_the_destination() {
    // RFC 2326: multicast is the default; a multicast destination says so.
    let implied = multicast("RTP/AVP;destination=233.252.0.10;port=5000-5001");
    assert_eq!(implied.group, group("233.252.0.10"));
    // A unicast answer to a multicast request is reported as unicast, parsed as such.
    for value in [
        "RTP/AVP;unicast;client_port=4000-4001;server_port=6000-6001",
        "RTP/AVP;server_port=6000-6001",
        "RTP/AVP;unicast;destination=233.252.0.10;server_port=6000-6001",
        "RTP/AVP;destination=198.51.100.2;server_port=6000-6001",
    ] {
        match parse_setup_reply(value) {
            Ok(SetupTransport::Unicast(reply)) => assert_eq!(reply.ports, Some((6000, 6001))),
            other => panic!("{value:?}: {other:?}"),
        }
    }
    // The unicast-only parser still refuses multicast.
    assert!(parse_reply("RTP/AVP;multicast;destination=233.252.0.10;port=5000-5001").is_err());
}

#[test]
fn unusable_multicast_transports_are_clear_errors() {
    for (value, says) in [
        ("RTP/AVP;multicast;port=5000-5001", "without destination"),
        ("RTP/AVP;multicast;destination=233.252.0.10", "without port"),
        ("RTP/AVP;multicast", "without destination"),
        (
            "RTP/AVP;multicast;destination=203.0.113.2;port=5000",
            "not a multicast group",
        ),
        (
            "RTP/AVP;multicast;destination=2001:db8::1;port=5000",
            "not a multicast group",
        ),
        (
            "RTP/AVP;multicast;destination=group.test;port=5000",
            "not an IP address",
        ),
        (
            "RTP/AVP;multicast;destination=233.252.0.10;port=0-1",
            "bad port",
        ),
        (
            "RTP/AVP;multicast;destination=233.252.0.10;port=65535",
            "bad port",
        ),
        (
            "RTP/AVP;multicast;destination=233.252.0.10;port=x",
            "bad port",
        ),
        (
            "RTP/AVP;multicast;destination=233.252.0.10;port",
            "bad port",
        ),
        (
            "RTP/AVP;multicast;destination=233.252.0.10;port=5000;ttl=256",
            "bad ttl",
        ),
        (
            "RTP/AVP;multicast;destination=233.252.0.10;port=5000;ttl=-1",
            "bad ttl",
        ),
        (
            "RTP/AVP;multicast;destination=233.252.0.10;port=5000;ttl=",
            "bad ttl",
        ),
        (
            "RTP/AVP;multicast;destination=233.252.0.10;port=5000;ttl=0016",
            "bad ttl",
        ),
        ("RTP/AVP;multicast;destination", "bad destination"),
        ("RTP/AVP;multicast;dest_addr=\"233.252.0.10\"", "dest_addr"),
        (
            "RTP/AVP;multicast;dest_addr=\"233.252.0.10:0\"",
            "dest_addr",
        ),
        (
            "RTP/AVP;multicast;dest_addr=\"203.0.113.2:5000\"",
            "not a multicast group",
        ),
        (
            "RTP/AVP;unicast;multicast;destination=233.252.0.10;port=5000",
            "both",
        ),
        (
            "RTP/AVP/TCP;multicast;destination=233.252.0.10;port=5000",
            "TCP",
        ),
        (
            "RTP/SAVP;multicast;destination=233.252.0.10;port=5000",
            "RTP/AVP",
        ),
        (
            "RTP/AVP;multicast;destination=233.252.0.10;port=5000;source=bad_host!",
            "source host",
        ),
        (
            "RTP/AVP;multicast;destination=\"233.252.0.10;port=5000",
            "unclosed quote",
        ),
    ] {
        let error = parse_setup_reply(value).unwrap_err().to_string();
        assert!(error.contains(says), "{value:?}: {error}");
    }
}

proptest::proptest! {
    #[test]
    fn multicast_like_headers_never_panic(
        value in "RTP/AVP(/UDP|/TCP)?(;(unicast|multicast|port=[0-9-]{0,12}|ttl=[0-9-]{0,4}|destination=[a-f0-9.:\\[\\]\"]{0,16}|dest_addr=[\"a-f0-9.:/\\[\\]]{0,24}|source=[a-z0-9.:]{0,10}))*"
    ) {
        let _ = parse_setup_reply(&value);
    }

    #[test]
    fn any_group_and_ports_round_trip(
        octets in proptest::array::uniform4(0u8..=255),
        rtp in 1u16..65535,
        ttl in proptest::option::of(0u8..=255),
    ) {
        let ip = std::net::Ipv4Addr::new(0xE0 | (octets[0] & 0x0F), octets[1], octets[2], octets[3]);
        let ttl_text = ttl.map(|t| format!(";ttl={t}")).unwrap_or_default();
        let reply = multicast(&format!("RTP/AVP;multicast;destination={ip};port={rtp}{ttl_text}"));
        proptest::prop_assert_eq!(reply.group, IpAddr::V4(ip));
        proptest::prop_assert_eq!(reply.ports, (rtp, rtp + 1));
        proptest::prop_assert_eq!(reply.ttl, ttl);
    }
}

proptest::proptest! {
    #[test]
    fn arbitrary_headers_never_panic(value in "[ -~]{0,120}") {
        let _ = parse_reply(&value);
        let _ = parse_setup_reply(&value);
        let _ = parse_request(&value);
    }

    #[test]
    fn transport_like_headers_never_panic(
        value in "RTP/AVP(/UDP|/TCP)?(;(unicast|multicast|server_port=[0-9-]{0,12}|source=[a-z0-9.:\\[\\]\"]{0,10}|src_addr=[\"a-z0-9.:/\\[\\]]{0,20}|ssrc=[0-9A-Fa-f]{0,9}|mode=\"?PLAY\"?))*"
    ) {
        let _ = parse_reply(&value);
    }
}
