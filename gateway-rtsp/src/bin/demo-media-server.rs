//! `demo-media-server`: the demo RTSP media server of [`gateway_rtsp::server`], for tests and
//! `cargo xtask demo`. Serves `rtsp://HOST:PORT/rtsp.wav` until SIGINT or SIGTERM.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use anyhow::{Context as _, Result};
use clap::Parser;
use gateway_rtsp::{
    audio::{Audio, Codec},
    server::{DemoServer, ServerConfig},
};
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "demo-media-server",
    version,
    about = "Demo RTSP 1.0 media server: streams a WAV file (or a generated tone) as RTP L16 or \
             PCMU with RTCP sender reports, always answering SETUP with source= and server_port="
)]
struct Cli {
    /// RTSP address to listen on.
    #[arg(long, value_name = "ADDR:PORT", default_value = "0.0.0.0:8554")]
    listen: SocketAddr,
    /// Send RTP and RTCP from this address instead of the RTSP address (named in source=).
    #[arg(long, value_name = "IP")]
    media_from: Option<IpAddr>,
    /// WAV file to stream (16-bit PCM best; 8/24/32-bit and float are converted). Default: a
    /// 440 Hz tone at 8 kHz mono.
    #[arg(long, value_name = "FILE")]
    wav: Option<PathBuf>,
    /// Payload format: l16 (payload type 96, the file's rate and channels) or pcmu (payload
    /// type 0, 8 kHz mono only).
    #[arg(long, value_enum, default_value = "l16")]
    codec: Codec,
    /// Length of the generated tone in seconds (without --wav).
    #[arg(long, value_name = "N", default_value_t = 10.0)]
    seconds: f64,
    /// Identical audio tracks per session (trackID=0, 1, ...).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=8))]
    tracks: u16,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("GATEWAY_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let audio = if let Some(path) = &cli.wav {
        Audio::read_wav(path)?
    } else {
        anyhow::ensure!(
            cli.seconds > 0.0 && cli.seconds <= 3600.0,
            "--seconds must be within 0..=3600"
        );
        Audio::tone(8000, cli.seconds, 440.0)
    };
    let mut config = ServerConfig::new(audio, cli.codec)?;
    config.media_from = cli.media_from;
    config.tracks = usize::from(cli.tracks);
    let summary = format!(
        "{}/{}/{}, {:.2} s, {} track(s), media from {}",
        cli.codec.encoding_name(),
        config.audio.rate,
        config.audio.channels,
        config.audio.duration().as_secs_f64(),
        config.tracks,
        cli.media_from
            .map_or_else(|| "the RTSP address".to_owned(), |ip| ip.to_string()),
    );
    let server = DemoServer::bind(cli.listen, config)
        .await
        .with_context(|| format!("listen on {}", cli.listen))?;
    println!("serving {} ({summary})", server.url()?);
    let mut terminate = signal(SignalKind::terminate()).context("install the SIGTERM handler")?;
    server
        .run(async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
        })
        .await;
    Ok(())
}
