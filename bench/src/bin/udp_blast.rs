//! `udp-blast`: the benchmark's UDP sender, sink (one socket or several), echo server and pinger (sendmmsg/recvmmsg,
//! large buffers, bounded by time and count, stopped early by SIGTERM). It prints JSON lines on
//! stdout: `{"event":"ready"}` once it receives, `{"event":"started",...}` once it sends, and
//! `{"event":"report",...}` at the end. Run it in a namespace with `nsenter --net=...`, or hand
//! it an inherited socket with `--fd`.

use std::{
    io::Write as _,
    net::{SocketAddr, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use bench::blast::{self, mmsg};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(
    name = "udp-blast",
    about = "UDP sender, sink, echo server and pinger for the benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct Socket {
    /// Bind a new socket here.
    #[arg(long, value_name = "IP:PORT", conflicts_with = "fd")]
    bind: Option<SocketAddr>,
    /// Use this inherited UDP socket instead (for example a binding's socket of the client
    /// library).
    #[arg(long, value_name = "FD")]
    fd: Option<i32>,
}

impl Socket {
    fn open(&self) -> Result<UdpSocket> {
        match (self.bind, self.fd) {
            (Some(addr), None) => UdpSocket::bind(addr).with_context(|| format!("bind {addr}")),
            (None, Some(fd)) => {
                if fd < 3 {
                    bail!("--fd {fd} is a standard stream");
                }
                // SAFETY: the caller passed this descriptor to us for our exclusive use.
                Ok(unsafe { UdpSocket::from_raw_fd(fd) })
            }
            _ => bail!("give --bind or --fd"),
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Send datagrams, flat out or at --rate, for --duration seconds.
    Send {
        #[command(flatten)]
        socket: Socket,
        /// Destination, or `learn`: wait for a datagram and send to its source.
        #[arg(long, value_name = "IP:PORT|learn")]
        to: String,
        /// Payload octets after the prefix.
        #[arg(long, default_value_t = 200)]
        size: usize,
        /// Hex octets put in front of every payload (a relay's header).
        #[arg(long, default_value = "")]
        prefix: String,
        #[arg(long, default_value_t = 2.0)]
        duration: f64,
        /// Datagrams per second (0: as fast as possible).
        #[arg(long, default_value_t = 0)]
        rate: u64,
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Stamp a sequence number and the send time after the prefix.
        #[arg(long)]
        stamps: bool,
        #[arg(long, default_value_t = 200_000_000)]
        max_packets: u64,
    },
    /// Count datagrams (and one-way delay from stamps) until --duration or SIGTERM.
    Sink {
        #[command(flatten)]
        socket: Socket,
        #[arg(long, default_value_t = 30.0)]
        duration: f64,
        /// Offset of the stamp in received datagrams.
        #[arg(long)]
        ts_offset: Option<usize>,
    },
    /// Count datagrams on several inherited sockets (one thread) until --duration or SIGTERM.
    Sinks {
        /// An inherited UDP socket (repeat for more).
        #[arg(long = "fd", value_name = "FD", required = true)]
        fds: Vec<i32>,
        #[arg(long, default_value_t = 30.0)]
        duration: f64,
        /// Receive buffer of each socket, in octets.
        #[arg(long, default_value_t = 4 << 20)]
        buffer: i32,
    },
    /// Send every datagram back to its source until --duration or SIGTERM.
    Echo {
        #[command(flatten)]
        socket: Socket,
        #[arg(long, default_value_t = 60.0)]
        duration: f64,
    },
    /// Round-trip times to an echo server, possibly through a relay.
    Ping {
        #[command(flatten)]
        socket: Socket,
        #[arg(long)]
        to: SocketAddr,
        /// Hex header put in front of every request.
        #[arg(long, default_value = "")]
        prefix: String,
        /// Octets of relay header in front of every reply.
        #[arg(long, default_value_t = 0)]
        strip: usize,
        #[arg(long, default_value_t = 200)]
        size: usize,
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        #[arg(long, default_value_t = 2.0)]
        duration: f64,
    },
}

fn emit(value: &Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

fn report(event: impl serde::Serialize) -> Result<()> {
    let mut value = serde_json::to_value(event)?;
    value["event"] = json!("report");
    emit(&value);
    Ok(())
}

fn seconds(value: f64) -> Result<Duration> {
    if !(0.0..=3600.0).contains(&value) {
        bail!("duration {value} s is outside 0..=3600");
    }
    Ok(Duration::from_secs_f64(value))
}

fn hex(text: &str) -> Result<Vec<u8>> {
    let text: String = text
        .chars()
        .filter(|c| !c.is_whitespace() && *c != ':')
        .collect();
    if !text.len().is_multiple_of(2) {
        bail!("odd number of hex digits in {text:?}");
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).with_context(|| format!("hex {text:?}")))
        .collect()
}

fn main() -> ExitCode {
    mmsg::install_stop_handler();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("udp-blast: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Send {
            socket,
            to,
            size,
            prefix,
            duration,
            rate,
            batch,
            stamps,
            max_packets,
        } => {
            let socket = socket.open()?;
            let to = if to == "learn" {
                None
            } else {
                Some(to.parse().with_context(|| format!("--to {to}"))?)
            };
            let config = blast::SendConfig {
                to,
                prefix: hex(&prefix)?,
                size,
                duration: seconds(duration)?,
                rate,
                batch: batch.clamp(1, 1024),
                stamps,
                max_packets,
            };
            emit(&json!({"event": "ready"}));
            let result = blast::send(&socket, &config, |to| {
                emit(&json!({"event": "started", "to": to.to_string()}));
            })?;
            report(result)
        }
        Command::Sink {
            socket,
            duration,
            ts_offset,
        } => {
            let socket = socket.open()?;
            let config = blast::SinkConfig {
                duration: seconds(duration)?,
                ts_offset,
            };
            let result = blast::sink(socket.as_raw_fd(), &config, || {
                emit(&json!({"event": "ready"}));
            });
            report(result)
        }
        Command::Sinks {
            fds,
            duration,
            buffer,
        } => run_sinks(&fds, duration, buffer),
        Command::Echo { socket, duration } => {
            let socket = socket.open()?;
            let result = blast::echo(&socket, seconds(duration)?, || {
                emit(&json!({"event": "ready"}));
            });
            report(result)
        }
        Command::Ping {
            socket,
            to,
            prefix,
            strip,
            size,
            rate,
            duration,
        } => {
            let socket = socket.open()?;
            let config = blast::PingConfig {
                to,
                prefix: hex(&prefix)?,
                strip,
                size,
                rate,
                duration: seconds(duration)?,
            };
            emit(&json!({"event": "ready"}));
            let result = blast::ping(&socket, &config)?;
            report(result)
        }
    }
}

/// `udp-blast sinks`: every inherited socket read by one thread.
fn run_sinks(fds: &[i32], duration: f64, buffer: i32) -> Result<()> {
    let sockets = fds
        .iter()
        .map(|&fd| {
            Socket {
                bind: None,
                fd: Some(fd),
            }
            .open()
        })
        .collect::<Result<Vec<_>>>()?;
    let raw: Vec<i32> = sockets
        .iter()
        .map(std::os::fd::AsRawFd::as_raw_fd)
        .collect();
    let config = blast::SinksConfig {
        duration: seconds(duration)?,
        buffer,
    };
    let result = blast::sinks(&raw, &config, || {
        emit(&json!({"event": "ready"}));
    });
    drop(sockets);
    report(result)
}
