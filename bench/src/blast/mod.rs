//! The project's own traffic tools (`udp-blast`): a sender (flat out or paced, optionally
//! stamping a sequence number and the send time into each datagram), a sink (counts, optionally
//! one-way delay from the stamps), an echo server, and a pinger (round-trip time). All use
//! `sendmmsg`/`recvmmsg`, large socket buffers, and stop at a deadline, a packet bound or
//! SIGTERM, whichever comes first. They report one JSON object at the end.
//!
//! Stamp layout, at `ts_offset` octets into the datagram: `seq u64 LE | sent_ns u64 LE`.

pub mod mmsg;

use std::{
    net::{SocketAddr, UdpSocket},
    os::fd::{AsRawFd as _, RawFd},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use self::mmsg::{Batch, now_ns, stop_requested, wait_any_readable, wait_readable};
use crate::stats::Percentiles;

/// Octets a stamp takes.
pub const STAMP_LEN: usize = 16;
/// Most delay samples a sink or pinger keeps (later ones are counted but not kept).
pub const MAX_SAMPLES: usize = 4_000_000;
/// Socket buffers the tools ask for.
pub const SOCKET_BUFFER: i32 = 32 << 20;

/// Writes the stamp into `buf` at `offset` (if it fits).
pub fn write_stamp(buf: &mut [u8], offset: usize, seq: u64, sent_ns: u64) {
    if let Some(slot) = buf.get_mut(offset..offset + STAMP_LEN) {
        slot[..8].copy_from_slice(&seq.to_le_bytes());
        slot[8..].copy_from_slice(&sent_ns.to_le_bytes());
    }
}

/// Reads a stamp written by [`write_stamp`].
pub fn read_stamp(buf: &[u8], offset: usize) -> Option<(u64, u64)> {
    let slot = buf.get(offset..offset + STAMP_LEN)?;
    let seq = u64::from_le_bytes(slot[..8].try_into().ok()?);
    let sent = u64::from_le_bytes(slot[8..].try_into().ok()?);
    Some((seq, sent))
}

/// What the sender does.
#[derive(Debug, Clone)]
pub struct SendConfig {
    /// Destination; `None`: learn it from the first datagram that arrives (within 10 s).
    pub to: Option<SocketAddr>,
    /// Header octets at the start of every datagram.
    pub prefix: Vec<u8>,
    /// Octets after the prefix.
    pub size: usize,
    pub duration: Duration,
    /// Datagrams per second; 0 = as fast as possible.
    pub rate: u64,
    pub batch: usize,
    /// Stamp every datagram right after the prefix.
    pub stamps: bool,
    /// Hard bound on datagrams.
    pub max_packets: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SendReport {
    pub sent: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed_s: f64,
    pub pps: f64,
    pub to: String,
}

/// Learns the destination (when asked), then sends. `started` is called once sending begins.
pub fn send(
    socket: &UdpSocket,
    config: &SendConfig,
    started: impl FnOnce(SocketAddr),
) -> Result<SendReport> {
    let fd = socket.as_raw_fd();
    mmsg::set_buffers(fd, SOCKET_BUFFER);
    let to = match config.to {
        Some(to) => to,
        None => learn_peer(socket)?,
    };
    socket
        .connect(to)
        .with_context(|| format!("connect the sender to {to}"))?;
    mmsg::tight_timer_slack();
    let len = config.prefix.len() + config.size;
    let mut batch = Batch::new(config.batch, len);
    for i in 0..batch.capacity() {
        let buf = batch.buffer_mut(i);
        buf[..config.prefix.len()].copy_from_slice(&config.prefix);
        for (j, octet) in buf[config.prefix.len()..].iter_mut().enumerate() {
            *octet = u8::try_from(j & 0x7f).unwrap_or(0);
        }
    }
    let lens = vec![len; batch.capacity()];
    started(to);
    let start = Instant::now();
    let deadline = start + config.duration;
    let (mut sent, mut errors, mut first_error) = (0u64, 0u64, None);
    let interval_ns = if config.rate == 0 {
        0
    } else {
        1_000_000_000 / config.rate.max(1)
    };
    while !stop_requested() && sent < config.max_packets {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let mut count = batch.capacity() as u64;
        if config.rate > 0 {
            let elapsed = u64::try_from(now.duration_since(start).as_nanos()).unwrap_or(u64::MAX);
            let due = elapsed / interval_ns + 1;
            if due <= sent {
                // Sleep until the next datagram is due (timer slack is 1 ns).
                let next = (sent * interval_ns).saturating_sub(elapsed);
                thread::sleep(Duration::from_nanos(next.min(1_000_000)));
                continue;
            }
            count = count.min(due - sent);
        }
        count = count.min(config.max_packets - sent);
        let count = usize::try_from(count).unwrap_or(1);
        if config.stamps {
            let stamp_at = now_ns();
            for i in 0..count {
                write_stamp(
                    batch.buffer_mut(i),
                    config.prefix.len(),
                    sent + i as u64,
                    stamp_at,
                );
            }
        }
        match batch.send(fd, count, &lens, false) {
            Ok(n) => sent += n as u64,
            Err(error) => {
                errors += 1;
                if first_error.is_none() {
                    first_error = Some(error.to_string());
                }
                if errors > 1_000_000 {
                    bail!("the sender keeps failing: {error}");
                }
            }
        }
    }
    let elapsed_s = start.elapsed().as_secs_f64();
    Ok(SendReport {
        sent,
        errors,
        first_error,
        elapsed_s,
        pps: rate_of(sent, elapsed_s),
        to: to.to_string(),
    })
}

fn rate_of(count: u64, seconds: f64) -> f64 {
    #[expect(clippy::cast_precision_loss, reason = "packet counts")]
    let count = count as f64;
    if seconds > 0.0 { count / seconds } else { 0.0 }
}

/// Waits (up to 10 s, or a stop) for one datagram and returns its source.
fn learn_peer(socket: &UdpSocket) -> Result<SocketAddr> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut batch = Batch::new(1, 2048);
    while Instant::now() < deadline && !stop_requested() {
        if batch.recv(socket.as_raw_fd(), true)? > 0
            && let Some(from) = batch.name(0).to_socket_addr()
        {
            return Ok(from);
        }
        wait_readable(socket.as_raw_fd(), Duration::from_millis(50));
    }
    bail!("no datagram arrived to learn the destination from")
}

/// What the sink does.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// Longest run; a stop ends it earlier.
    pub duration: Duration,
    /// Where the stamp sits in received datagrams (`None`: no delay measurement).
    pub ts_offset: Option<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SinkReport {
    pub received: u64,
    pub bytes: u64,
    pub elapsed_s: f64,
    /// One-way delay, when stamps were read.
    pub delay: Option<Percentiles>,
    /// Highest sequence number seen + 1 (0 without stamps).
    pub seq_span: u64,
}

/// Receives on `fd` until the deadline or a stop. `ready` is called before the first receive.
pub fn sink(fd: RawFd, config: &SinkConfig, ready: impl FnOnce()) -> SinkReport {
    mmsg::set_buffers(fd, SOCKET_BUFFER);
    let mut batch = Batch::new(64, 2048);
    let mut delays = Vec::new();
    let (mut received, mut bytes, mut seq_span) = (0u64, 0u64, 0u64);
    ready();
    let start = Instant::now();
    let deadline = start + config.duration;
    while !stop_requested() && Instant::now() < deadline {
        let n = match batch.recv(fd, false) {
            Ok(n) => n,
            Err(error) => {
                eprintln!("udp-blast sink: {error}");
                thread::sleep(Duration::from_millis(10));
                0
            }
        };
        if n == 0 {
            wait_readable(fd, Duration::from_millis(100));
            continue;
        }
        let at = now_ns();
        for i in 0..n {
            let len = batch.received_len(i);
            received += 1;
            bytes += len as u64;
            if let Some(offset) = config.ts_offset
                && let Some((seq, sent)) = read_stamp(batch.data(i, len), offset)
            {
                seq_span = seq_span.max(seq + 1);
                if delays.len() < MAX_SAMPLES {
                    delays.push(at.saturating_sub(sent));
                }
            }
        }
    }
    SinkReport {
        received,
        bytes,
        elapsed_s: start.elapsed().as_secs_f64(),
        delay: Percentiles::of(&mut delays),
        seq_span,
    }
}

/// What a sink over several sockets does.
#[derive(Debug, Clone)]
pub struct SinksConfig {
    /// Longest run; a stop ends it earlier.
    pub duration: Duration,
    /// Receive buffer of each socket (many sockets: less than [`SOCKET_BUFFER`] each).
    pub buffer: i32,
}

#[derive(Debug, Clone, Serialize)]
pub struct SinksReport {
    pub sockets: usize,
    /// Datagrams read from all sockets together.
    pub received: u64,
    pub bytes: u64,
    /// The fewest and the most datagrams one socket got.
    pub per_socket_min: u64,
    pub per_socket_max: u64,
    /// Failed `recvmmsg` calls.
    pub errors: u64,
    pub elapsed_s: f64,
}

/// Receives on every socket of `fds` (one thread, each socket in turn, a `poll` over all of
/// them when none had anything) until the deadline or a stop. `ready` is called before the
/// first receive.
pub fn sinks(fds: &[RawFd], config: &SinksConfig, ready: impl FnOnce()) -> SinksReport {
    for &fd in fds {
        mmsg::set_buffers(fd, config.buffer);
    }
    let mut batch = Batch::new(64, 2048);
    let mut counts = vec![0u64; fds.len()];
    let (mut bytes, mut errors) = (0u64, 0u64);
    ready();
    let start = Instant::now();
    let deadline = start + config.duration;
    while !stop_requested() && Instant::now() < deadline {
        let mut got = 0usize;
        for (count, &fd) in counts.iter_mut().zip(fds) {
            let n = batch.recv(fd, false).unwrap_or_else(|_| {
                errors += 1;
                0
            });
            for i in 0..n {
                bytes += batch.received_len(i) as u64;
            }
            *count += n as u64;
            got += n;
        }
        if got == 0 {
            wait_any_readable(fds, Duration::from_millis(100));
        }
    }
    SinksReport {
        sockets: fds.len(),
        received: counts.iter().sum(),
        bytes,
        per_socket_min: counts.iter().copied().min().unwrap_or(0),
        per_socket_max: counts.iter().copied().max().unwrap_or(0),
        errors,
        elapsed_s: start.elapsed().as_secs_f64(),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct EchoReport {
    pub echoed: u64,
    pub errors: u64,
}

/// Sends every datagram back to its source until the deadline or a stop.
pub fn echo(socket: &UdpSocket, duration: Duration, ready: impl FnOnce()) -> EchoReport {
    let fd = socket.as_raw_fd();
    mmsg::set_buffers(fd, SOCKET_BUFFER);
    let mut batch = Batch::new(64, 2048);
    let mut lens = vec![0usize; batch.capacity()];
    let (mut echoed, mut errors) = (0u64, 0u64);
    ready();
    let deadline = Instant::now() + duration;
    while !stop_requested() && Instant::now() < deadline {
        let n = batch.recv(fd, true).unwrap_or(0);
        if n == 0 {
            wait_readable(fd, Duration::from_millis(100));
            continue;
        }
        for (i, len) in lens.iter_mut().enumerate().take(n) {
            *len = batch.received_len(i);
            let name = batch.name(i);
            batch.set_name(i, name);
        }
        let mut done = 0;
        while done < n {
            // Echo what is left of the batch; a partial send leaves the rest for another call.
            match batch.send(fd, n, &lens, true) {
                Ok(k) if k >= n => done = n,
                Ok(_) | Err(_) => {
                    errors += 1;
                    done = n;
                }
            }
        }
        echoed += n as u64;
    }
    EchoReport { echoed, errors }
}

/// What the pinger does.
#[derive(Debug, Clone)]
pub struct PingConfig {
    pub to: SocketAddr,
    /// Header octets prepended to every request (the relay's framing).
    pub prefix: Vec<u8>,
    /// Octets of every reply before the echoed request data (the relay's framing inbound).
    pub strip: usize,
    /// Octets after the prefix (at least the stamp).
    pub size: usize,
    pub rate: u64,
    pub duration: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct PingReport {
    pub sent: u64,
    pub received: u64,
    pub rtt: Option<Percentiles>,
    pub elapsed_s: f64,
}

/// Sends stamped requests at `rate` from one thread and measures replies on another.
pub fn ping(socket: &UdpSocket, config: &PingConfig) -> Result<PingReport> {
    let fd = socket.as_raw_fd();
    mmsg::set_buffers(fd, SOCKET_BUFFER);
    let reply_socket = socket.try_clone().context("clone the pinger socket")?;
    let send_config = SendConfig {
        to: Some(config.to),
        prefix: config.prefix.clone(),
        size: config.size.max(STAMP_LEN),
        duration: config.duration,
        rate: config.rate.max(1),
        batch: 16,
        stamps: true,
        max_packets: config.rate.max(1) * (config.duration.as_secs() + 2),
    };
    // The relay strips the request's prefix before the echo server sees it and puts its own
    // inbound header (`strip` octets) in front of the echoed data.
    let stamp_at = config.strip;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done_rx = std::sync::Arc::clone(&done);
    let grace = Duration::from_millis(300);
    let reader = thread::spawn(move || {
        let fd = reply_socket.as_raw_fd();
        let mut batch = Batch::new(64, 2048);
        let mut rtts = Vec::new();
        let mut received = 0u64;
        let mut finish_by: Option<Instant> = None;
        loop {
            if done_rx.load(std::sync::atomic::Ordering::Relaxed) && finish_by.is_none() {
                finish_by = Some(Instant::now() + grace);
            }
            if finish_by.is_some_and(|t| Instant::now() >= t) {
                break;
            }
            let n = batch.recv(fd, false).unwrap_or(0);
            if n == 0 {
                wait_readable(fd, Duration::from_millis(20));
                continue;
            }
            let at = now_ns();
            for i in 0..n {
                let len = batch.received_len(i);
                if let Some((_, sent)) = read_stamp(batch.data(i, len), stamp_at) {
                    received += 1;
                    if rtts.len() < MAX_SAMPLES {
                        rtts.push(at.saturating_sub(sent));
                    }
                }
            }
        }
        (received, rtts)
    });
    let report = send(socket, &send_config, |_| {});
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (received, mut rtts) = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the pinger's reader panicked"))?;
    let report = report?;
    Ok(PingReport {
        sent: report.sent,
        received,
        rtt: Percentiles::of(&mut rtts),
        elapsed_s: report.elapsed_s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip_and_do_not_overrun() {
        let mut buf = vec![0u8; 40];
        write_stamp(&mut buf, 8, 7, 123_456_789);
        assert_eq!(read_stamp(&buf, 8), Some((7, 123_456_789)));
        assert_eq!(read_stamp(&buf, 30), None);
        let mut short = vec![0u8; 10];
        write_stamp(&mut short, 0, 1, 2);
        assert_eq!(short, vec![0u8; 10]);
    }
}
