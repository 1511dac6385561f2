//! The demo media server: RTSP 1.0 (OPTIONS, DESCRIBE, SETUP, PLAY, TEARDOWN) streaming one
//! audio clip as RTP (L16 or PCMU) with RTCP sender reports at real-time pace, for tests and
//! `cargo xtask demo`. Not for production.
//!
//! It always answers SETUP with `server_port` and `source` (protocol.md section 5), sends media
//! to the RTSP peer's address at its `client_port`, and can send from another address than its
//! RTSP address ([`ServerConfig::media_from`]), the case where host-level workarounds break.
//! Each control connection is one RTSP session (a task; its streams stop when it closes); any
//! number of clients at once.

mod session;
mod stream;

use std::{
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use thiserror::Error;
use tokio::{net::TcpListener, task::JoinSet};
use tracing::{info, warn};

use super::audio::{Audio, Codec};

/// The path the server serves.
pub const DEFAULT_PATH: &str = "/rtsp.wav";

/// The dynamic payload type of L16.
pub const L16_PAYLOAD_TYPE: u8 = 96;

/// A configuration the server cannot stream.
#[derive(Debug, Error)]
pub enum ServerError {
    /// PCMU is 8 kHz mono (RFC 3551).
    #[error("PCMU needs 8000 Hz mono audio; this audio is {rate} Hz with {channels} channel(s)")]
    PcmuFormat {
        /// The audio's rate.
        rate: u32,
        /// The audio's channels.
        channels: u16,
    },
    /// Nothing to stream.
    #[error("the audio is empty")]
    Empty,
}

/// What the demo server streams and how.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The clip, streamed once per PLAY, then RTCP BYE.
    pub audio: Arc<Audio>,
    /// L16 (payload type 96) or PCMU (payload type 0).
    pub codec: Codec,
    /// Send RTP and RTCP from this address instead of the RTSP connection's local address (it
    /// is named in `source=`).
    pub media_from: Option<IpAddr>,
    /// Identical audio tracks per session (`trackID=0..`); 1 by default, at least 1.
    pub tracks: usize,
    /// The served path.
    pub path: String,
    /// Audio per RTP packet (payloads are also kept under 1400 octets).
    pub packet_time: Duration,
    /// Interval of the RTCP sender reports.
    pub report_interval: Duration,
}

impl ServerConfig {
    /// Streams `audio` as `codec`, one track, at `/rtsp.wav`, 20 ms packets, an SR a second.
    pub fn new(audio: Audio, codec: Codec) -> Result<Self, ServerError> {
        if audio.samples.is_empty() || audio.channels == 0 {
            return Err(ServerError::Empty);
        }
        if codec == Codec::Pcmu && (audio.rate != 8000 || audio.channels != 1) {
            return Err(ServerError::PcmuFormat {
                rate: audio.rate,
                channels: audio.channels,
            });
        }
        Ok(Self {
            audio: Arc::new(audio),
            codec,
            media_from: None,
            tracks: 1,
            path: DEFAULT_PATH.to_owned(),
            packet_time: Duration::from_millis(20),
            report_interval: Duration::from_secs(1),
        })
    }

    /// The payload type of [`ServerConfig::codec`].
    pub fn payload_type(&self) -> u8 {
        match self.codec {
            Codec::L16 => L16_PAYLOAD_TYPE,
            Codec::Pcmu => 0,
        }
    }

    /// Frames per RTP packet: the packet time, but at most 1400 octets of payload.
    pub fn frames_per_packet(&self) -> usize {
        let by_time = u128::from(self.audio.rate) * self.packet_time.as_micros() / 1_000_000;
        let by_size = 1400 / (self.codec.octets_per_sample() * usize::from(self.audio.channels));
        usize::try_from(by_time)
            .unwrap_or(usize::MAX)
            .clamp(1, by_size.max(1))
    }
}

/// Counters of a running server, for tests and the demo.
#[derive(Debug, Default)]
pub struct ServerStats {
    connections: AtomicU64,
    plays: AtomicU64,
    rtp_packets: AtomicU64,
    sender_reports: AtomicU64,
    receiver_reports: AtomicU64,
    teardowns: AtomicU64,
}

impl ServerStats {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// RTSP connections accepted.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// PLAY requests answered 200.
    pub fn plays(&self) -> u64 {
        self.plays.load(Ordering::Relaxed)
    }

    /// RTP packets sent.
    pub fn rtp_packets(&self) -> u64 {
        self.rtp_packets.load(Ordering::Relaxed)
    }

    /// RTCP sender reports sent.
    pub fn sender_reports(&self) -> u64 {
        self.sender_reports.load(Ordering::Relaxed)
    }

    /// RTCP receiver reports received (from the client's address, on a stream's RTCP port).
    pub fn receiver_reports(&self) -> u64 {
        self.receiver_reports.load(Ordering::Relaxed)
    }

    /// TEARDOWN requests answered.
    pub fn teardowns(&self) -> u64 {
        self.teardowns.load(Ordering::Relaxed)
    }
}

/// The demo media server on a bound listener.
///
/// # Examples
///
/// ```no_run
/// use gateway_rtsp::{audio::{Audio, Codec}, server::{DemoServer, ServerConfig}};
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let config = ServerConfig::new(Audio::tone(8000, 3.0, 440.0), Codec::L16)?;
/// let server = DemoServer::bind("127.0.0.1:8554".parse()?, config).await?;
/// println!("serving {}", server.url()?);
/// server.run(std::future::pending()).await;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct DemoServer {
    listener: TcpListener,
    config: Arc<ServerConfig>,
    stats: Arc<ServerStats>,
}

impl DemoServer {
    /// Binds the RTSP listener.
    pub async fn bind(addr: SocketAddr, config: ServerConfig) -> io::Result<Self> {
        Ok(Self::from_listener(TcpListener::bind(addr).await?, config))
    }

    /// Serves on an already bound listener.
    pub fn from_listener(listener: TcpListener, config: ServerConfig) -> Self {
        Self {
            listener,
            config: Arc::new(config),
            stats: Arc::default(),
        }
    }

    /// The RTSP address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// `rtsp://ADDR:PORT/PATH`.
    pub fn url(&self) -> io::Result<String> {
        Ok(format!("rtsp://{}{}", self.local_addr()?, self.config.path))
    }

    /// The server's counters (shared; they keep counting while it runs).
    pub fn stats(&self) -> Arc<ServerStats> {
        Arc::clone(&self.stats)
    }

    /// Serves until `shutdown` resolves, then stops every session.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        ServerStats::bump(&self.stats.connections);
                        info!(%peer, "RTSP connection");
                        connections.spawn(session::serve_connection(
                            stream,
                            peer,
                            Arc::clone(&self.config),
                            Arc::clone(&self.stats),
                        ));
                    }
                    Err(error) => {
                        warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        // Dropping the set aborts every connection task, and with them their streams.
    }
}

/// Serves `config` on `listener` until `shutdown` resolves: [`DemoServer::run`] in one call.
pub async fn serve(
    listener: TcpListener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
) {
    DemoServer::from_listener(listener, config)
        .run(shutdown)
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_follow_the_packet_time_and_the_size_cap() {
        let mut config = ServerConfig::new(Audio::tone(8000, 1.0, 440.0), Codec::L16).unwrap();
        assert_eq!(config.frames_per_packet(), 160);
        assert_eq!(config.payload_type(), 96);
        config.audio = Arc::new(Audio {
            rate: 44100,
            channels: 2,
            samples: vec![0; 8],
        });
        // 882 frames of 4 octets would be 3528 octets: capped at 350 frames.
        assert_eq!(config.frames_per_packet(), 350);
    }

    #[test]
    fn pcmu_needs_8k_mono_and_audio_is_needed() {
        let stereo = Audio {
            rate: 8000,
            channels: 2,
            samples: vec![0; 4],
        };
        assert!(matches!(
            ServerConfig::new(stereo, Codec::Pcmu),
            Err(ServerError::PcmuFormat { .. })
        ));
        let config = ServerConfig::new(Audio::tone(8000, 0.1, 440.0), Codec::Pcmu).unwrap();
        assert_eq!(config.payload_type(), 0);
        assert!(matches!(
            ServerConfig::new(Audio::tone(8000, 0.0, 440.0), Codec::L16),
            Err(ServerError::Empty)
        ));
    }
}
