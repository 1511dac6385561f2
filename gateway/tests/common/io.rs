//! Bounded waits, reads and writes: every await of the harness ends within [`IO_TIMEOUT`] (or a
//! limit the caller names) with a panic that says what it was waiting for.

use std::{future::Future, io, net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpStream, UdpSocket},
};

/// The bound on every read, write and wait in real time.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a socket must stay quiet to count as "nothing arrived".
pub const SILENCE: Duration = Duration::from_millis(300);

/// `f`, or a panic naming `what` if it takes longer than [`IO_TIMEOUT`].
// Not an `async fn` around `within_for`: that would hold `f` twice and double the future's size.
pub fn within<T>(what: &str, f: impl Future<Output = T>) -> impl Future<Output = T> {
    within_for(what, IO_TIMEOUT, f)
}

/// `f`, or a panic naming `what` if it takes longer than `limit`.
pub async fn within_for<T>(what: &str, limit: Duration, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// Polls `condition` until it holds, for at most [`IO_TIMEOUT`].
pub async fn eventually(what: &str, condition: impl FnMut() -> bool) {
    eventually_for(what, IO_TIMEOUT, condition).await;
}

/// Polls `condition` until it holds, for at most `limit` (for waits longer than [`IO_TIMEOUT`],
/// such as an expiry), then panics naming `what`.
pub async fn eventually_for(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    within_for(what, limit, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

// ---- TCP ------------------------------------------------------------------------------------

pub async fn send(stream: &mut TcpStream, bytes: &[u8]) {
    within("write", stream.write_all(bytes)).await.unwrap();
}

pub async fn read_exact(stream: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    within("read", stream.read_exact(&mut buf)).await.unwrap();
    buf
}

/// Reads until the server closes the connection (EOF or reset) and returns what came before.
/// Panics if the connection is still open after `limit`.
pub async fn read_until_closed_within(stream: &mut TcpStream, limit: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .expect("the server did not close the connection")
        {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(error) if error.kind() == io::ErrorKind::ConnectionReset => return got,
            Err(error) => panic!("read: {error}"),
        }
    }
}

pub async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    read_until_closed_within(stream, IO_TIMEOUT).await
}

/// The server closes the connection (EOF or reset) without sending anything first.
pub async fn assert_closed(stream: &mut TcpStream) {
    let mut buf = [0u8; 64];
    match within("the server closes", stream.read(&mut buf)).await {
        Ok(0) => {}
        Err(error) if error.kind() == io::ErrorKind::ConnectionReset => {}
        other => panic!("connection still open: {other:?}"),
    }
}

// ---- UDP ------------------------------------------------------------------------------------

/// Sends `data` from `socket` to `to`.
pub async fn send_udp(socket: &UdpSocket, data: &[u8], to: SocketAddr) {
    within("send a datagram", socket.send_to(data, to))
        .await
        .unwrap();
}

/// The next datagram on `socket` and its source.
pub async fn recv_udp(socket: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 65_535];
    let (len, from) = within("receive a datagram", socket.recv_from(&mut buf))
        .await
        .unwrap();
    buf.truncate(len);
    (buf, from)
}

/// Nothing arrives on `socket` for [`SILENCE`].
pub async fn assert_silent(socket: &UdpSocket, what: &str) {
    let mut buf = vec![0u8; 65_535];
    if let Ok(received) = tokio::time::timeout(SILENCE, socket.recv_from(&mut buf)).await {
        panic!("{what}: got {received:?}");
    }
}
