//! `--log-format json`: every line the daemon writes is one JSON object with stable fields, and
//! the lines of a control connection carry its span (`conn`, `peer`, `user`), so one session's
//! lines can be followed. Root only.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use serde_json::Value;
use testbed::{Testbed, gateway::start_in_fw, time_scale, wait_until};

const PROXY: &str = "198.51.100.1:1080";
const WAIT: Duration = Duration::from_secs(5);

/// The daemon's log as JSON objects; panics on a line that is not one.
fn json_lines(log: &str) -> Vec<Value> {
    log.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            serde_json::from_str::<Value>(line)
                .unwrap_or_else(|error| panic!("not a JSON line ({error}): {line}"))
        })
        .collect()
}

#[test]
fn json_lines_parse_and_carry_the_connections_span() {
    let bed = Testbed::new().unwrap();
    let (gateway, _cleanup) = start_in_fw(&bed, &["--log-format", "json"]).unwrap();
    // A control connection: no authentication, then the enhanced UDP mode's entry.
    let mut stream = bed
        .client
        .run(|| TcpStream::connect(PROXY))
        .unwrap()
        .expect("connect to the gateway");
    stream.set_read_timeout(Some(WAIT * time_scale())).unwrap();
    let peer = stream.local_addr().unwrap().to_string();
    stream.write_all(&[5, 1, 0]).unwrap();
    let mut method = [0u8; 2];
    stream.read_exact(&mut method).unwrap();
    stream.write_all(&[5, 4, 0, 1, 0, 0, 0, 0, 0, 0]).unwrap();
    let mut entered = [0u8; 10];
    stream.read_exact(&mut entered).unwrap();
    assert_eq!(entered[..2], [1, 0], "enhanced mode entered");
    drop(stream);

    let request_line = |lines: &[Value]| {
        lines
            .iter()
            .find(|line| line["message"] == "request" && line["span"]["peer"] == peer)
            .cloned()
    };
    assert!(
        wait_until(WAIT, || request_line(&json_lines(&gateway.log_text()))
            .is_some()),
        "no request line of {peer}:\n{}",
        gateway.log_text()
    );
    let lines = json_lines(&gateway.log_text());
    for line in &lines {
        for field in ["timestamp", "level", "target"] {
            assert!(line.get(field).is_some(), "no `{field}`: {line}");
        }
    }
    assert!(
        lines
            .iter()
            .any(|line| line["message"] == "gateway running"),
        "the start-up lines are JSON too"
    );
    let request = request_line(&lines).unwrap();
    println!("the connection's request line: {request}");
    assert_eq!(request["level"], "INFO");
    assert_eq!(request["span"]["name"], "conn");
    assert_eq!(request["span"]["user"], "-", "anonymous");
    let conn = request["span"]["conn"]
        .as_u64()
        .expect("a connection number");
    assert!(
        request["command"].is_string(),
        "the event's own fields: {request}"
    );
    // The span list holds the connection's span too, and every line of this connection has the
    // same number.
    assert!(
        request["spans"]
            .as_array()
            .unwrap()
            .iter()
            .any(|span| span["conn"] == conn),
        "{request}"
    );
    let of_this_conn: Vec<&Value> = lines
        .iter()
        .filter(|line| line["span"]["peer"] == peer)
        .collect();
    assert!(of_this_conn.iter().all(|line| line["span"]["conn"] == conn));
}
