//! Fetches a URL's path over HTTP/1.0 through a gateway, with the synchronous client core: the
//! gateway resolves the host name (socks5h) and connects.
//!
//! ```text
//! cargo run -p gateway-client --example http_get -- 198.51.100.1:1080 web.test 80 /index.txt
//! ```
//!
//! Set `GATEWAY_USER` and `GATEWAY_PASSWORD` for a gateway that wants a password.

use std::io::{Read as _, Write as _};

use gateway_client::{Address, Timeouts, blocking::Client};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: http_get PROXY_ADDR:PORT HOST PORT PATH";
    let proxy = args.next().ok_or(usage)?.parse()?;
    let host = args.next().ok_or(usage)?;
    let port: u16 = args.next().ok_or(usage)?.parse()?;
    let path = args.next().ok_or(usage)?;
    let credentials = std::env::var("GATEWAY_USER")
        .ok()
        .map(|user| (user, std::env::var("GATEWAY_PASSWORD").unwrap_or_default()));
    let client = Client::connect(proxy, credentials, Timeouts::default())?;
    let (mut stream, bound) = client.tcp_connect(Address::Domain(host.clone(), port))?;
    eprintln!("connected through the gateway, which connected from {bound}");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    std::io::stdout().write_all(&response)?;
    Ok(())
}
