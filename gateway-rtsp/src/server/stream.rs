//! One track's media after PLAY: RTP packets of the clip at real-time pace from the source port
//! S, RTCP sender reports from S+1 every interval, a final SR and BYE at the end, and the client's
//! receiver reports counted as they come back to S+1.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::{
    net::UdpSocket,
    time::{Instant, sleep_until},
};
use tracing::{debug, info};

use super::{ServerConfig, ServerStats};
use crate::rtp::{self, RtcpPacket, RtpPacket, SenderInfo};

/// Seconds from 1900 (NTP) to 1970 (Unix).
const NTP_UNIX_OFFSET: u64 = 2_208_988_800;

/// How many times to look for a free even/odd pair of ports.
const PAIR_ATTEMPTS: usize = 64;

/// Two UDP sockets on `ip`, ports S (even) and S+1: RTP and RTCP.
pub(super) async fn bind_pair(ip: IpAddr) -> std::io::Result<(UdpSocket, UdpSocket)> {
    for _ in 0..PAIR_ATTEMPTS {
        let first = UdpSocket::bind(SocketAddr::new(ip, 0)).await?;
        let port = first.local_addr()?.port();
        let (even, odd) = if port % 2 == 0 {
            (port, port.checked_add(1))
        } else {
            (port.saturating_sub(1), Some(port))
        };
        let (Some(odd), true) = (odd, even != 0) else {
            continue;
        };
        let other = if port == even { odd } else { even };
        match UdpSocket::bind(SocketAddr::new(ip, other)).await {
            Ok(second) if port == even => return Ok((first, second)),
            Ok(second) => return Ok((second, first)),
            Err(error) if error.kind() == std::io::ErrorKind::AddrInUse => {}
            Err(error) => return Err(error),
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!("no free even/odd UDP port pair on {ip}"),
    ))
}

/// Now as a 64-bit NTP timestamp.
fn ntp_now() -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let seconds = now.as_secs() + NTP_UNIX_OFFSET;
    let fraction = (u64::from(now.subsec_nanos()) << 32) / 1_000_000_000;
    (seconds << 32) | fraction
}

/// One set-up track, ready to stream.
#[derive(Debug)]
pub(super) struct Stream {
    pub(super) rtp: UdpSocket,
    pub(super) rtcp: UdpSocket,
    pub(super) client_rtp: SocketAddr,
    pub(super) client_rtcp: SocketAddr,
    pub(super) ssrc: u32,
    pub(super) first_sequence: u16,
    pub(super) first_timestamp: u32,
    pub(super) track: usize,
    pub(super) config: Arc<ServerConfig>,
    pub(super) stats: Arc<ServerStats>,
}

impl Stream {
    /// The RTP timestamp `elapsed` after the first packet.
    fn timestamp_at(&self, elapsed: Duration) -> u32 {
        let units = elapsed.as_micros() * u128::from(self.config.audio.rate) / 1_000_000;
        let units = u32::try_from(units % (1 << 32)).unwrap_or(0);
        self.first_timestamp.wrapping_add(units)
    }

    async fn send_report(&self, start: Instant, packets: u32, octets: u32) {
        let info = SenderInfo {
            ssrc: self.ssrc,
            ntp: ntp_now(),
            rtp_timestamp: self.timestamp_at(start.elapsed()),
            packets,
            octets,
        };
        let report = rtp::sender_report(&info, &[], "demo-media-server");
        if self.rtcp.send_to(&report, self.client_rtcp).await.is_ok() {
            ServerStats::bump(&self.stats.sender_reports);
        }
    }

    fn on_rtcp(&self, data: &[u8], from: SocketAddr) {
        if from.ip() != self.client_rtcp.ip() {
            return;
        }
        let Ok(packets) = rtp::parse_rtcp(data) else {
            return;
        };
        for packet in packets {
            if let RtcpPacket::ReceiverReport { ssrc, reports } = packet {
                ServerStats::bump(&self.stats.receiver_reports);
                for block in reports.iter().filter(|block| block.ssrc == self.ssrc) {
                    debug!(
                        track = self.track,
                        reporter = ssrc,
                        lost = block.cumulative_lost,
                        jitter = block.jitter,
                        "RTCP receiver report"
                    );
                }
            }
        }
    }

    /// Streams the clip once, then BYE; then keeps counting receiver reports until aborted.
    pub(super) async fn run(self) {
        let audio = Arc::clone(&self.config.audio);
        let channels = usize::from(audio.channels.max(1));
        let frames = audio.frames();
        let per_packet = self.config.frames_per_packet();
        let codec = self.config.codec;
        let start = Instant::now();
        let mut position = 0usize;
        let mut sequence = self.first_sequence;
        let (mut packets, mut octets) = (0u32, 0u32);
        let mut next_report = start;
        let mut payload = Vec::with_capacity(1500);
        let mut datagram = Vec::with_capacity(1500);
        let mut buffer = vec![0u8; 2048];
        if let Ok(from) = self.rtp.local_addr() {
            info!(track = self.track, to = %self.client_rtp, %from, "streaming");
        }
        while position < frames {
            let due = start + frame_time(position, audio.rate);
            tokio::select! {
                () = sleep_until(due) => {
                    let end = (position + per_packet).min(frames);
                    payload.clear();
                    codec.encode(&audio.samples[position * channels..end * channels], &mut payload);
                    datagram.clear();
                    let offset = u32::try_from(position % (1 << 32)).unwrap_or(0);
                    RtpPacket {
                        marker: position == 0,
                        payload_type: self.config.payload_type(),
                        sequence,
                        timestamp: self.first_timestamp.wrapping_add(offset),
                        ssrc: self.ssrc,
                        payload: &payload,
                    }
                    .write(&mut datagram);
                    if self.rtp.send_to(&datagram, self.client_rtp).await.is_ok() {
                        ServerStats::bump(&self.stats.rtp_packets);
                    }
                    sequence = sequence.wrapping_add(1);
                    packets = packets.wrapping_add(1);
                    octets = octets.wrapping_add(u32::try_from(payload.len()).unwrap_or(0));
                    position = end;
                    if Instant::now() >= next_report {
                        self.send_report(start, packets, octets).await;
                        next_report = Instant::now() + self.config.report_interval;
                    }
                }
                received = self.rtcp.recv_from(&mut buffer) => {
                    if let Ok((len, from)) = received {
                        self.on_rtcp(&buffer[..len], from);
                    }
                }
            }
        }
        self.send_report(start, packets, octets).await;
        let _ = self
            .rtcp
            .send_to(&rtp::bye(self.ssrc), self.client_rtcp)
            .await;
        info!(track = self.track, packets, "stream ended (BYE)");
        loop {
            match self.rtcp.recv_from(&mut buffer).await {
                Ok((len, from)) => self.on_rtcp(&buffer[..len], from),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

/// When frame `position` is due, from the start of the stream.
fn frame_time(position: usize, rate: u32) -> Duration {
    let position = u64::try_from(position).unwrap_or(u64::MAX);
    Duration::from_micros(position.saturating_mul(1_000_000) / u64::from(rate.max(1)))
}
