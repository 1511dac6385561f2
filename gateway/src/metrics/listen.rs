//! The endpoint's listener: where it may listen ([`check_address`]: loopback or an address of
//! the internal interface, never the external side or an unspecified address) and the accept
//! loop ([`serve`]) with a bounded request, a read timeout and a few connections at once.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use thiserror::Error;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tracing::{debug, warn};

use super::{
    http::{MAX_REQUEST_BYTES, Route, route},
    render::{Snapshot, encode},
};

/// Scrapes served at once; a connection beyond them is closed at accept.
pub const MAX_SCRAPES_AT_ONCE: usize = 4;
/// From accept to the whole request, and for writing the answer.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Error, PartialEq, Eq)]
pub enum AddressError {
    #[error(
        "--metrics {0}: an unspecified address would serve the counters on every interface, the \
         external one too; give a loopback address or an address of --internal"
    )]
    Unspecified(SocketAddr),
    #[error(
        "--metrics {0} is an address of the external interface: the counters are served only \
         inside; give a loopback address or an address of --internal"
    )]
    External(SocketAddr),
    #[error(
        "--metrics {0} is neither loopback nor an address of --internal: give a loopback address \
         or an address of the internal interface"
    )]
    NotInternal(SocketAddr),
}

/// Whether the endpoint may listen on `addr`, given the addresses of the internal and the
/// external interface.
pub fn check_address(
    addr: SocketAddr,
    internal: &[IpAddr],
    external: &[IpAddr],
) -> Result<(), AddressError> {
    let ip = addr.ip().to_canonical();
    if ip.is_unspecified() {
        return Err(AddressError::Unspecified(addr));
    }
    if external.iter().any(|e| e.to_canonical() == ip) {
        return Err(AddressError::External(addr));
    }
    if ip.is_loopback() || internal.iter().any(|i| i.to_canonical() == ip) {
        return Ok(());
    }
    Err(AddressError::NotInternal(addr))
}

/// Serves `GET /metrics` on `listener` with what `scrape` reads, until the task is dropped.
pub async fn serve(listener: TcpListener, scrape: Arc<dyn Fn() -> Snapshot + Send + Sync>) {
    let slots = Arc::new(Semaphore::new(MAX_SCRAPES_AT_ONCE));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(%error, "metrics: accept failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            debug!(%peer, "metrics: too many scrapes at once; closing");
            continue;
        };
        let scrape = Arc::clone(&scrape);
        tokio::spawn(async move {
            if let Err(error) = answer(stream, scrape).await {
                debug!(%peer, %error, "metrics: scrape ended early");
            }
            drop(slot);
        });
    }
}

/// Reads one request (bounded in size and time) and writes its answer.
async fn answer(
    mut stream: TcpStream,
    scrape: Arc<dyn Fn() -> Snapshot + Send + Sync>,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let read = tokio::time::timeout(READ_TIMEOUT, async {
        let mut chunk = [0u8; 1024];
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(Route::BadRequest);
            }
            let room = MAX_REQUEST_BYTES - buf.len();
            buf.extend_from_slice(&chunk[..n.min(room)]);
            match route(&buf) {
                Route::Incomplete => {}
                done => return Ok::<_, std::io::Error>(done),
            }
        }
    })
    .await;
    let Ok(found) = read else {
        return Err(std::io::ErrorKind::TimedOut.into());
    };
    let found = found?;
    let response = match found {
        Route::Metrics(format) => {
            // Map reads, /proc and the binding table's lock stay off the async workers.
            let body = tokio::task::spawn_blocking(move || encode(&scrape(), format))
                .await
                .map_err(std::io::Error::other)?;
            found.response(format.content_type(), body.as_bytes())
        }
        other => other.response("", b""),
    };
    tokio::time::timeout(READ_TIMEOUT, stream.write_all(&response))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_and_internal_addresses() {
        let internal: Vec<IpAddr> = vec![
            "198.51.100.1".parse().unwrap(),
            "2001:db8:1::1".parse().unwrap(),
        ];
        let external: Vec<IpAddr> = vec!["203.0.113.1".parse().unwrap()];
        let check = |text: &str| check_address(text.parse().unwrap(), &internal, &external);
        assert_eq!(check("127.0.0.1:9464"), Ok(()));
        assert_eq!(check("[::1]:9464"), Ok(()));
        assert_eq!(check("198.51.100.1:9464"), Ok(()));
        assert_eq!(check("[2001:db8:1::1]:9464"), Ok(()));
        assert_eq!(check("[::ffff:198.51.100.1]:9464"), Ok(()));
        assert!(matches!(
            check("0.0.0.0:9464"),
            Err(AddressError::Unspecified(_))
        ));
        assert!(matches!(
            check("[::]:9464"),
            Err(AddressError::Unspecified(_))
        ));
        assert!(matches!(
            check("203.0.113.1:9464"),
            Err(AddressError::External(_))
        ));
        assert!(matches!(
            check("[::ffff:203.0.113.1]:9464"),
            Err(AddressError::External(_))
        ));
        assert!(matches!(
            check("192.0.2.9:9464"),
            Err(AddressError::NotInternal(_))
        ));
        let message = check("203.0.113.1:9464").unwrap_err().to_string();
        assert!(
            message.contains("external") && message.contains("--internal"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn serves_metrics_and_refuses_the_rest_over_tcp() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, Arc::new(Snapshot::default)));
        let ask = |request: &'static [u8]| async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream.write_all(request).await.unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.unwrap();
            answer
        };
        let ok = ask(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("gateway_control_connections 0"), "{ok}");
        let om =
            ask(b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text\r\n\r\n").await;
        assert!(
            om.contains("Content-Type: application/openmetrics-text") && om.ends_with("# EOF\n")
        );
        assert!(
            ask(b"GET /x HTTP/1.1\r\n\r\n")
                .await
                .starts_with("HTTP/1.1 404 ")
        );
        assert!(
            ask(b"DELETE /metrics HTTP/1.1\r\n\r\n")
                .await
                .starts_with("HTTP/1.1 405 ")
        );
        assert!(
            ask(b"\x00\x01junk\r\n\r\n")
                .await
                .starts_with("HTTP/1.1 400 ")
        );
        server.abort();
    }
}
