//! The media side of one track after PLAY: RTP from the binding's RTP flow into the statistics and
//! the reassembly buffer, sender reports and BYE from its RTCP flow, and receiver reports sent
//! back through the RTCP flow (from the relay's P+1 to the source's s+1, protocol.md section 3).
//! The flows hide whether the datagrams carry the header or come header-less (RAW), so nothing
//! here depends on it. A multicast track ([`Media::Multicast`]) receives RTP (and RTCP, when its
//! port was subscribed too) multicast-to-unicast through the gateway and sends no receiver
//! reports: they would go to the group, which needs a send binding this client does not make.

use std::time::Duration;

use tokio::time::{Instant, sleep_until};

use super::{Event, Progress};
use gateway_client::{
    Address, ClientError, MulticastBinding, MulticastReceiver, RelayAddrs, RtpPair,
};

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

/// How one track's media comes through the gateway.
#[derive(Debug)]
pub(super) enum Media {
    /// A unicast RTP pair (two-step binding).
    Pair(RtpPair),
    /// Multicast-to-unicast subscriptions to the group's RTP port and, if made, its RTCP port.
    Multicast {
        rtp: MulticastReceiver,
        rtcp: Option<MulticastReceiver>,
    },
}

impl Media {
    /// The next RTP datagram's payload.
    async fn recv_rtp(&self, buf: &mut [u8]) -> Result<usize, ClientError> {
        match self {
            Self::Pair(pair) => pair.rtp().recv(buf).await,
            Self::Multicast { rtp, .. } => rtp.recv(buf).await,
        }
    }

    /// The next RTCP datagram's payload; never resolves for a multicast track without RTCP.
    async fn recv_rtcp(&self, buf: &mut [u8]) -> Result<usize, ClientError> {
        match self {
            Self::Pair(pair) => pair.rtcp().recv(buf).await,
            Self::Multicast {
                rtcp: Some(rtcp), ..
            } => rtcp.recv(buf).await,
            Self::Multicast { rtcp: None, .. } => std::future::pending().await,
        }
    }

    /// Sends an RTCP packet back to the source; `None` where this track sends none (multicast).
    async fn send_rtcp(&self, packet: &[u8]) -> Option<Result<usize, ClientError>> {
        match self {
            Self::Pair(pair) => Some(pair.rtcp().send(packet).await),
            Self::Multicast { .. } => None,
        }
    }

    /// The relay addresses: a pair's; for a multicast track the RTP subscription's AID, internal
    /// relay and, as `external`, the group and port.
    pub(super) fn relay_addrs(&self) -> RelayAddrs {
        match self {
            Self::Pair(pair) => pair.relay_addrs(),
            Self::Multicast { rtp, .. } => {
                let binding = rtp.binding();
                RelayAddrs {
                    aid: binding.aid,
                    internal: binding.relay,
                    external: binding.group,
                }
            }
        }
    }

    /// The RTP subscription of a multicast track.
    pub(super) fn multicast(&self) -> Option<MulticastBinding> {
        match self {
            Self::Pair(_) => None,
            Self::Multicast { rtp, .. } => Some(rtp.binding()),
        }
    }

    /// UDP RELEASE of every binding; returns how many were released and the failures.
    pub(super) async fn release(&self) -> (usize, Vec<(u32, ClientError)>) {
        let mut released = 0;
        let mut failed = Vec::new();
        match self {
            Self::Pair(pair) => match pair.release().await {
                Ok(()) => released += 1,
                Err(error) => failed.push((pair.relay_addrs().aid, error)),
            },
            Self::Multicast { rtp, rtcp } => {
                for receiver in std::iter::once(rtp).chain(rtcp) {
                    match receiver.release().await {
                        Ok(()) => released += 1,
                        Err(error) => failed.push((receiver.binding().aid, error)),
                    }
                }
            }
        }
        (released, failed)
    }
}

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
    pub(super) async fn run(&self, media: &Media) -> Result<Received, RtspError> {
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
        loop {
            let deadline = match (state.received.ssrc, state.bye_deadline) {
                (None, _) => (self.start + self.start_timeout).min(self.until),
                (Some(_), Some(bye)) => bye.min(self.until),
                (Some(_), None) => self.until,
            };
            let report_at = state.next_report.unwrap_or(deadline);
            tokio::select! {
                result = media.recv_rtp(&mut rtp_buffer) => {
                    let len = result.map_err(|error| self.lost(&error))?;
                    state.on_rtp(self, &rtp_buffer[..len]);
                }
                result = media.recv_rtcp(&mut rtcp_buffer) => {
                    let len = result.map_err(|error| self.lost(&error))?;
                    state.on_rtcp(self, &rtcp_buffer[..len]);
                }
                () = sleep_until(report_at), if state.next_report.is_some() => {
                    state.report(self, media).await;
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
        state.report(self, media).await;
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
    async fn report(&mut self, receive: &Receive, media: &Media) {
        let Some(ssrc) = self.received.ssrc else {
            return;
        };
        let (lsr, dlsr) = self
            .last_sr
            .map_or((0, 0), |(lsr, at)| (lsr, dlsr_units(at.elapsed())));
        let block = self.reception.report_block(ssrc, lsr, dlsr);
        let packet = rtp::receiver_report(self.reporter, &[block], &receive.cname);
        match media.send_rtcp(&packet).await {
            None => {}
            Some(Ok(_)) => self.received.receiver_reports += 1,
            Some(Err(error)) => {
                tracing::debug!(%error, track = receive.track.index, "RTCP receiver report not sent");
            }
        }
    }
}
