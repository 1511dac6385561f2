//! The media side of one track after PLAY: RTP from the binding's RTP flow into the statistics and
//! the reassembly buffer, sender reports and BYE from its RTCP flow, and receiver reports sent
//! back through the RTCP flow (from the relay's P+1 to the source's s+1, protocol.md section 3).
//! The flows hide whether the datagrams carry the header or come header-less (RAW), so nothing
//! here depends on it.

use std::time::Duration;

use tokio::time::{Instant, sleep_until};

use super::{Event, Progress};
use gateway_client::{Address, ClientError, RtpPair};

use crate::{
    RtspError,
    audio::{Codec, Reassembly},
    rtp::{self, RtcpPacket, RtpPacket},
    rtp_stats::{Arrival, Reception, StreamStats, dlsr_units},
    sdp::SdpTrack,
};

/// After a BYE, how long late packets are still taken.
const BYE_GRACE: Duration = Duration::from_millis(200);
/// Receive buffer: the largest UDP payload.
const BUFFER: usize = 65_536;

/// How one track is received.
#[derive(Clone)]
pub(super) struct Receive {
    pub(super) track: SdpTrack,
    pub(super) codec: Codec,
    /// The RTP source confirmed at step 2 (for messages).
    pub(super) source: Address,
    /// When PLAY was answered.
    pub(super) start: Instant,
    /// When to stop.
    pub(super) until: Instant,
    /// How long to wait for the first RTP packet.
    pub(super) start_timeout: Duration,
    pub(super) rtcp_interval: Duration,
    /// The CNAME of the receiver reports.
    pub(super) cname: String,
    pub(super) progress: Option<Progress>,
}

/// What one track received.
#[derive(Debug, Clone, Default)]
pub(super) struct Received {
    pub(super) stats: StreamStats,
    pub(super) ssrc: Option<u32>,
    pub(super) sender_reports: u64,
    pub(super) receiver_reports: u64,
    pub(super) bye: bool,
    /// RTP packets skipped: malformed, another payload type or another SSRC.
    pub(super) skipped: u64,
    pub(super) samples: Vec<i16>,
}

impl Receive {
    fn emit(&self, event: &Event) {
        if let Some(progress) = &self.progress {
            progress(event);
        }
    }

    fn lost(&self, error: &ClientError) -> RtspError {
        RtspError::BindingLost {
            track: self.track.index,
            reason: error.to_string(),
        }
    }

    fn max_frames(&self) -> usize {
        let span = self.until.saturating_duration_since(self.start) + Duration::from_secs(1);
        let frames = span.as_millis() * u128::from(self.track.clock_rate) / 1000;
        // At most an hour of audio.
        let cap = 3600 * u128::from(self.track.clock_rate);
        usize::try_from(frames.min(cap)).unwrap_or(usize::MAX)
    }

    /// Receives until `until`, the server's BYE (plus a grace), or an error.
    #[expect(
        clippy::similar_names,
        reason = "RTP and RTCP are the protocol's names"
    )]
    pub(super) async fn run(&self, pair: &RtpPair) -> Result<Received, RtspError> {
        let mut state = State {
            reception: Reception::new(self.track.clock_rate),
            audio: Reassembly::new(self.track.channels, self.max_frames()),
            received: Received::default(),
            reporter: crate::random_u32(),
            last_sr: None,
            next_report: None,
            bye_deadline: None,
            decoded: Vec::new(),
        };
        let mut rtp_buffer = vec![0u8; BUFFER];
        let mut rtcp_buffer = vec![0u8; BUFFER];
        let (rtp_flow, rtcp_flow) = (pair.rtp(), pair.rtcp());
        loop {
            let deadline = match (state.received.ssrc, state.bye_deadline) {
                (None, _) => (self.start + self.start_timeout).min(self.until),
                (Some(_), Some(bye)) => bye.min(self.until),
                (Some(_), None) => self.until,
            };
            let report_at = state.next_report.unwrap_or(deadline);
            tokio::select! {
                result = rtp_flow.recv(&mut rtp_buffer) => {
                    let len = result.map_err(|error| self.lost(&error))?;
                    state.on_rtp(self, &rtp_buffer[..len]);
                }
                result = rtcp_flow.recv(&mut rtcp_buffer) => {
                    let len = result.map_err(|error| self.lost(&error))?;
                    state.on_rtcp(self, &rtcp_buffer[..len]);
                }
                () = sleep_until(report_at), if state.next_report.is_some() => {
                    state.report(self, pair).await;
                    state.next_report = Some(Instant::now() + self.rtcp_interval);
                }
                () = sleep_until(deadline) => {
                    if state.received.ssrc.is_none() {
                        return Err(RtspError::NeverStarted {
                            track: self.track.index,
                            after: deadline - self.start,
                            admitted: self.source.to_string(),
                        });
                    }
                    break;
                }
            }
        }
        // A last report, so the server sees the final loss figures.
        state.report(self, pair).await;
        let mut received = state.received;
        received.stats = state.reception.stats();
        received.samples = state.audio.into_samples();
        Ok(received)
    }
}

/// The receiving state of one track.
struct State {
    reception: Reception,
    audio: Reassembly,
    received: Received,
    /// This receiver's SSRC.
    reporter: u32,
    /// The last sender report's compact NTP time and when it arrived.
    last_sr: Option<(u32, Instant)>,
    next_report: Option<Instant>,
    bye_deadline: Option<Instant>,
    decoded: Vec<i16>,
}

impl State {
    fn on_rtp(&mut self, receive: &Receive, data: &[u8]) {
        let Ok(packet) = RtpPacket::parse(data) else {
            self.received.skipped += 1;
            return;
        };
        if packet.payload_type != receive.track.payload_type
            || self.received.ssrc.is_some_and(|ssrc| ssrc != packet.ssrc)
        {
            self.received.skipped += 1;
            return;
        }
        let now = Instant::now();
        if self.received.ssrc.is_none() {
            self.received.ssrc = Some(packet.ssrc);
            self.next_report = Some(now + receive.rtcp_interval);
            receive.emit(&Event::FirstPacket {
                track: receive.track.index,
                ssrc: packet.ssrc,
                after: now - receive.start,
            });
        }
        let arrival =
            self.reception
                .on_packet(packet.sequence, packet.timestamp, now - receive.start);
        if arrival != Arrival::Duplicate {
            self.decoded.clear();
            receive.codec.decode(packet.payload, &mut self.decoded);
            self.audio.place(packet.timestamp, &self.decoded);
        }
    }

    fn on_rtcp(&mut self, receive: &Receive, data: &[u8]) {
        let Ok(packets) = rtp::parse_rtcp(data) else {
            return;
        };
        let ssrc = self.received.ssrc;
        for packet in packets {
            match packet {
                RtcpPacket::SenderReport { info, .. } if ssrc.is_none_or(|s| s == info.ssrc) => {
                    self.received.sender_reports += 1;
                    self.last_sr = Some((info.compact_ntp(), Instant::now()));
                }
                RtcpPacket::Bye { ssrcs }
                    if ssrc.is_some_and(|s| ssrcs.contains(&s)) && !self.received.bye =>
                {
                    self.received.bye = true;
                    self.bye_deadline = Some(Instant::now() + BYE_GRACE);
                    receive.emit(&Event::Bye {
                        track: receive.track.index,
                    });
                }
                _ => {}
            }
        }
    }

    /// Sends one receiver report (RR + SDES CNAME) on the source. A failed send is not fatal:
    /// reports are advisory.
    async fn report(&mut self, receive: &Receive, pair: &RtpPair) {
        let Some(ssrc) = self.received.ssrc else {
            return;
        };
        let (lsr, dlsr) = self
            .last_sr
            .map_or((0, 0), |(lsr, at)| (lsr, dlsr_units(at.elapsed())));
        let block = self.reception.report_block(ssrc, lsr, dlsr);
        let packet = rtp::receiver_report(self.reporter, &[block], &receive.cname);
        match pair.rtcp().send(&packet).await {
            Ok(_) => self.received.receiver_reports += 1,
            Err(error) => {
                tracing::debug!(%error, track = receive.track.index, "RTCP receiver report not sent");
            }
        }
    }
}
