//! Bidirectional TCP relay for CONNECT and BIND, closed when both directions are done or when
//! no byte moved in either direction for the idle timeout. A quiesce (an upgrade) stops it
//! between two reads, with every byte it read already written: the two sockets then move to
//! the next daemon, which relays on ([`Tunnel`]).

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

use super::handover::Quiesce;

const BUFFER: usize = 64 * 1024;

/// Where a relay starts: the bytes moved so far, which directions are still open, and how
/// long it has been quiet.
#[derive(Debug, Clone, Copy)]
pub struct Tunnel {
    pub up_open: bool,
    pub down_open: bool,
    pub up_bytes: u64,
    pub down_bytes: u64,
    pub idle_for: Duration,
}

impl Tunnel {
    /// A new tunnel: both directions open, nothing moved.
    pub const NEW: Tunnel = Tunnel {
        up_open: true,
        down_open: true,
        up_bytes: 0,
        down_bytes: 0,
        idle_for: Duration::ZERO,
    };
}

/// How a relay ended.
#[derive(Debug)]
pub enum RelayEnd {
    /// Both directions done, or idle: bytes moved (client to target, target to client).
    Closed { up: u64, down: u64 },
    /// Stopped by the quiesce between reads: the sockets and where the relay stands.
    Quiesced {
        client: TcpStream,
        target: TcpStream,
        tunnel: Tunnel,
    },
}

/// Relays until both sides are closed or the relay was idle for `idle`. Returns the bytes moved
/// (client to target, target to client). `early` are bytes the client sent before the reply.
pub async fn relay(
    client: TcpStream,
    target: TcpStream,
    early: &[u8],
    idle: Duration,
) -> (u64, u64) {
    match relay_from(client, target, early, idle, Tunnel::NEW, None).await {
        RelayEnd::Closed { up, down } => (up, down),
        RelayEnd::Quiesced { tunnel, .. } => (tunnel.up_bytes, tunnel.down_bytes),
    }
}

/// [`relay`] from where `start` says, stopping at `quiesce` (if given) between reads.
pub async fn relay_from(
    client: TcpStream,
    mut target: TcpStream,
    early: &[u8],
    idle: Duration,
    start: Tunnel,
    quiesce: Option<&Quiesce>,
) -> RelayEnd {
    let started = Instant::now();
    // Milliseconds after `started` of the last byte; negative history counts as quiet already.
    let quiet_before = start.idle_for;
    let last_activity = Arc::new(AtomicU64::new(0));
    if !early.is_empty() && target.write_all(early).await.is_err() {
        return RelayEnd::Closed { up: 0, down: 0 };
    }
    let (mut client_read, mut client_write) = client.into_split();
    let (mut target_read, mut target_write) = target.into_split();
    // Without a quiesce: a signal that never comes (its sender lives as long as the relay).
    let (_never, never) = tokio::sync::watch::channel(false);
    let stop = quiesce.map_or(never, Quiesce::subscribe);
    let up = pump(
        &mut client_read,
        &mut target_write,
        Arc::clone(&last_activity),
        started,
        start.up_open,
        stop.clone(),
    );
    let down = pump(
        &mut target_read,
        &mut client_write,
        Arc::clone(&last_activity),
        started,
        start.down_open,
        stop.clone(),
    );
    let watchdog = async {
        loop {
            let moved = last_activity.load(Ordering::Relaxed);
            let quiet = if moved == 0 {
                started.elapsed() + quiet_before
            } else {
                started
                    .elapsed()
                    .saturating_sub(Duration::from_millis(moved))
            };
            if quiet >= idle {
                return;
            }
            tokio::time::sleep(idle.saturating_sub(quiet)).await;
        }
    };
    let ((up, up_open), (down, down_open)) = tokio::select! {
        both = async { tokio::join!(up, down) } => both,
        () = watchdog => return RelayEnd::Closed { up: 0, down: 0 },
    };
    let up_bytes = start.up_bytes + up + early.len() as u64;
    let down_bytes = start.down_bytes + down;
    if !(up_open || down_open) {
        return RelayEnd::Closed {
            up: up_bytes,
            down: down_bytes,
        };
    }
    let moved = last_activity.load(Ordering::Relaxed);
    let idle_for = if moved == 0 {
        started.elapsed() + quiet_before
    } else {
        started
            .elapsed()
            .saturating_sub(Duration::from_millis(moved))
    };
    let (Ok(client), Ok(target)) = (
        client_read.reunite(client_write),
        target_read.reunite(target_write),
    ) else {
        return RelayEnd::Closed {
            up: up_bytes,
            down: down_bytes,
        };
    };
    RelayEnd::Quiesced {
        client,
        target,
        tunnel: Tunnel {
            up_open,
            down_open,
            up_bytes,
            down_bytes,
            idle_for,
        },
    }
}

/// Copies `from` to `to` until EOF (then half-closes `to`; returns open = false) or until
/// `stop` (returns open = true: this direction continues elsewhere). A read is never cut
/// short: `stop` is looked at only between a write and the next read.
async fn pump(
    from: &mut (impl AsyncRead + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
    last_activity: Arc<AtomicU64>,
    started: Instant,
    open: bool,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> (u64, bool) {
    if !open {
        return (0, false);
    }
    let mut buf = vec![0u8; BUFFER];
    let mut total = 0u64;
    loop {
        let n = tokio::select! {
            biased;
            () = super::handover::quiesced(&mut stop) => return (total, true),
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
        };
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        total += n as u64;
        let millis = u64::try_from(started.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        last_activity.store(millis, Ordering::Relaxed);
    }
    // Half-close so the other side sees EOF, as a direct connection would.
    let _ = to.shutdown().await;
    (total, false)
}
