//! Bidirectional TCP relay for CONNECT and BIND, closed when both directions are done or when
//! no byte moved in either direction for the idle timeout.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
};

const BUFFER: usize = 64 * 1024;

/// Relays until both sides are closed or the relay was idle for `idle`. Returns the bytes moved
/// (client to target, target to client). `early` are bytes the client sent before the reply.
pub async fn relay(
    client: TcpStream,
    target: TcpStream,
    early: &[u8],
    idle: Duration,
) -> (u64, u64) {
    let started = Instant::now();
    let last_activity = Arc::new(AtomicU64::new(0));
    let (mut client_read, mut client_write) = client.into_split();
    let (mut target_read, mut target_write) = target.into_split();
    if !early.is_empty() && target_write.write_all(early).await.is_err() {
        return (0, 0);
    }
    let up = pump(
        &mut client_read,
        &mut target_write,
        Arc::clone(&last_activity),
        started,
    );
    let down = pump(
        &mut target_read,
        &mut client_write,
        Arc::clone(&last_activity),
        started,
    );
    let watchdog = async {
        loop {
            let last = Duration::from_millis(last_activity.load(Ordering::Relaxed));
            let quiet = started.elapsed().saturating_sub(last);
            if quiet >= idle {
                return;
            }
            tokio::time::sleep(idle.saturating_sub(quiet)).await;
        }
    };
    tokio::select! {
        (up, down) = async { tokio::join!(up, down) } => (up + early.len() as u64, down),
        () = watchdog => (0, 0),
    }
}

async fn pump(
    from: &mut (impl AsyncRead + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
    last_activity: Arc<AtomicU64>,
    started: Instant,
) -> u64 {
    let mut buf = vec![0u8; BUFFER];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        total += n as u64;
        let millis = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        last_activity.store(millis, Ordering::Relaxed);
    }
    // Half-close so the other side sees EOF, as a direct connection would.
    let _ = to.shutdown().await;
    total
}
