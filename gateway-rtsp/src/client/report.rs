//! What [`super::play`] tells as it goes ([`Event`]) and at the end ([`PlayReport`]). Each
//! `Display` is one line for a person; the wording of the binding steps is what
//! `cargo xtask demo` and the README show.

use std::{fmt, net::SocketAddr, path::PathBuf, time::Duration};

use rtsp_types::Url;

use gateway_client::{Address, MulticastBinding, RelayAddrs};

use crate::{
    audio::{Audio, Codec},
    rtp_stats::StreamStats,
    sdp::SdpTrack,
    transport::{MulticastTransport, ReplyTransport},
};

/// One step of a session, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The control connection is up: the gateway connected to the RTSP server (SOCKS CONNECT).
    Control {
        /// The RTSP server.
        server: Address,
        /// The gateway.
        proxy: SocketAddr,
        /// Where the gateway connected from (its external address).
        bound: Address,
    },
    /// DESCRIBE answered.
    Described {
        /// The aggregate control URL.
        control: Url,
        /// The audio tracks offered.
        tracks: Vec<SdpTrack>,
    },
    /// Step 1 of the two-step binding for a track.
    Step1 {
        /// The track's SDP index.
        track: usize,
        /// The relay addresses: advertise `external` (and its port + 1).
        relays: RelayAddrs,
    },
    /// SETUP answered with this Transport.
    SetupReply {
        /// The track's SDP index.
        track: usize,
        /// The RTSP session id.
        session: Option<String>,
        /// The parsed Transport header.
        transport: ReplyTransport,
    },
    /// SETUP (asking for multicast) answered with this multicast Transport.
    MulticastSetupReply {
        /// The track's SDP index.
        track: usize,
        /// The RTSP session id.
        session: Option<String>,
        /// The parsed Transport header.
        transport: MulticastTransport,
    },
    /// The gateway subscribed this client to a group port (multicast-to-unicast).
    Subscribed {
        /// The track's SDP index.
        track: usize,
        /// The subscription: AID, group, internal relay, mode.
        binding: MulticastBinding,
    },
    /// Step 2 confirmed the binding with the exact source.
    Step2 {
        /// The track's SDP index.
        track: usize,
        /// The RTP source S:s.
        source: Address,
        /// The source's RTCP port.
        rtcp_port: u16,
    },
    /// With [`super::PlayOptions::raw`]: whether the step-2 reply granted header-less delivery.
    Delivery {
        /// The track's SDP index.
        track: usize,
        /// Granted: RTP and RTCP travel plain; not granted: with the 8-octet header.
        raw: bool,
    },
    /// PLAY answered; receiving.
    Playing {
        /// For how long at most.
        duration: Duration,
    },
    /// The first RTP packet of a track.
    FirstPacket {
        /// The track's SDP index.
        track: usize,
        /// Its SSRC.
        ssrc: u32,
        /// How long after PLAY.
        after: Duration,
    },
    /// The server ended a track with RTCP BYE.
    Bye {
        /// The track's SDP index.
        track: usize,
    },
    /// Something odd that does not stop the session.
    Warning(String),
    /// TEARDOWN answered (`None`: not sent, or no answer).
    TornDown {
        /// The status code.
        status: Option<u16>,
    },
    /// The bindings were released.
    Released {
        /// How many.
        bindings: usize,
    },
}

impl fmt::Display for Event {
    #[expect(
        clippy::similar_names,
        reason = "RTP and RTCP are the protocol's names"
    )]
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Control {
                server,
                proxy,
                bound,
            } => write!(
                f,
                "control: CONNECT {server} through {proxy} (the gateway connected from {bound})"
            ),
            Self::Described { control, tracks } => {
                write!(f, "DESCRIBE {control}: {} audio track(s)", tracks.len())?;
                for track in tracks {
                    write!(
                        f,
                        "; #{} {} PT {}",
                        track.index,
                        track.format(),
                        track.payload_type
                    )?;
                }
                Ok(())
            }
            Self::Step1 { track, relays } => write!(
                f,
                "step 1: AID {:#010x} internal relay {} external relay {} (client_port={}-{}) for \
                 track {track}",
                relays.aid,
                relays.internal,
                relays.external,
                relays.external.port(),
                relays.external.port().wrapping_add(1)
            ),
            Self::SetupReply {
                track,
                session,
                transport,
            } => {
                write!(f, "SETUP track {track}: 200 OK, ")?;
                match transport.ports {
                    Some((rtp, rtcp)) => write!(f, "server_port={rtp}-{rtcp}")?,
                    None => write!(f, "no server_port")?,
                }
                match &transport.source {
                    Some(source) => write!(f, " source={source}")?,
                    None => write!(f, " no source (the media comes from the RTSP server)")?,
                }
                if let Some(session) = session {
                    write!(f, ", session {session}")?;
                }
                Ok(())
            }
            Self::MulticastSetupReply { .. } | Self::Subscribed { .. } => self.fmt_multicast(f),
            Self::Step2 {
                track,
                source,
                rtcp_port,
            } => write!(
                f,
                "step 2: confirmed source {source}-{rtcp_port} for track {track}"
            ),
            Self::Delivery { track, raw: true } => write!(
                f,
                "track {track}: header-less (RAW) delivery granted: RTP and RTCP travel as plain \
                 datagrams on sockets connected to the source"
            ),
            Self::Delivery { track, raw: false } => write!(
                f,
                "track {track}: the gateway did not grant header-less (RAW) delivery; using the \
                 8-octet header"
            ),
            Self::Playing { duration } => {
                write!(
                    f,
                    "PLAY: 200 OK, receiving for up to {:.1} s",
                    duration.as_secs_f64()
                )
            }
            Self::FirstPacket { track, ssrc, after } => write!(
                f,
                "track {track}: first RTP packet {} ms after PLAY (SSRC {ssrc:#010x})",
                after.as_millis()
            ),
            Self::Bye { track } => write!(f, "track {track}: RTCP BYE, the stream ended"),
            Self::Warning(text) => write!(f, "warning: {text}"),
            Self::TornDown { status: Some(code) } => write!(f, "TEARDOWN: {code}"),
            Self::TornDown { status: None } => write!(f, "TEARDOWN: no answer"),
            Self::Released { bindings } => write!(f, "released {bindings} binding(s)"),
        }
    }
}

impl Event {
    /// The lines of the multicast steps.
    fn fmt_multicast(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MulticastSetupReply {
                track,
                session,
                transport,
            } => {
                write!(
                    f,
                    "SETUP track {track}: 200 OK, multicast destination={} port={}-{}",
                    transport.group, transport.ports.0, transport.ports.1
                )?;
                if let Some(ttl) = transport.ttl {
                    write!(f, " ttl={ttl}")?;
                }
                if let Some(source) = &transport.source {
                    write!(f, " source={source}")?;
                }
                if let Some(session) = session {
                    write!(f, ", session {session}")?;
                }
                Ok(())
            }
            Self::Subscribed { track, binding } => write!(
                f,
                "subscribed: AID {:#010x} group {} {} from internal relay {} to {} for track \
             {track}",
                binding.aid,
                binding.group,
                binding
                    .mode()
                    .map_or_else(|| "send".to_owned(), |mode| mode.to_string()),
                binding.relay,
                binding.local
            ),
            _ => Ok(()),
        }
    }
}

/// What one track received.
#[derive(Debug, Clone)]
pub struct TrackReport {
    /// The track as the SDP described it.
    pub track: SdpTrack,
    /// Its codec.
    pub codec: Codec,
    /// The binding's relay addresses (step 1). For a multicast track: the RTP subscription's
    /// AID and internal relay, and the group and port as `external`.
    pub relays: RelayAddrs,
    /// The RTP subscription of a multicast track (`--multicast`).
    pub multicast: Option<MulticastBinding>,
    /// Whether the media came header-less (RAW granted) rather than with the 8-octet header.
    pub raw: bool,
    /// The RTP source confirmed at step 2.
    pub source: Address,
    /// The source's RTCP port.
    pub rtcp_port: u16,
    /// Received, lost, reordered, duplicates, jitter.
    pub stats: StreamStats,
    /// The stream's SSRC, if any packet came.
    pub ssrc: Option<u32>,
    /// RTCP sender reports received.
    pub sender_reports: u64,
    /// RTCP receiver reports sent.
    pub receiver_reports: u64,
    /// Whether the server ended the stream with BYE.
    pub bye: bool,
    /// RTP packets skipped: malformed, another payload type or another SSRC.
    pub skipped: u64,
    /// The decoded audio, placed by RTP timestamp (silence where packets were lost).
    pub audio: Audio,
    /// The WAV file written, if any.
    pub out: Option<PathBuf>,
}

impl fmt::Display for TrackReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let stats = &self.stats;
        write!(
            f,
            "track {} {}: received {} packets, lost {}, reordered {}, duplicates {}, jitter \
             {:.2} ms ({:.1} timestamp units); RTCP: {} SR received, {} RR sent; {} samples \
             ({:.2} s)",
            self.track.index,
            self.track.format(),
            stats.received,
            stats.lost,
            stats.reordered,
            stats.duplicates,
            stats.jitter_ms,
            stats.jitter,
            self.sender_reports,
            self.receiver_reports,
            self.audio.samples.len(),
            self.audio.duration().as_secs_f64(),
        )?;
        if let Some(out) = &self.out {
            write!(f, " -> {}", out.display())?;
        }
        Ok(())
    }
}

/// What a whole session received.
#[derive(Debug, Clone)]
pub struct PlayReport {
    /// The aggregate control URL.
    pub control: Url,
    /// The RTSP session id.
    pub session: Option<String>,
    /// TEARDOWN's status code, if it was answered.
    pub teardown: Option<u16>,
    /// Per track, in play order.
    pub tracks: Vec<TrackReport>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_multicast_lines_name_the_group_and_the_subscription() {
        let transport = MulticastTransport {
            group: "233.252.0.10".parse().unwrap(),
            ports: (5000, 5001),
            ttl: Some(16),
            source: None,
            ssrc: None,
        };
        assert_eq!(
            Event::MulticastSetupReply {
                track: 0,
                session: Some("abc".to_owned()),
                transport,
            }
            .to_string(),
            "SETUP track 0: 200 OK, multicast destination=233.252.0.10 port=5000-5001 ttl=16, \
             session abc"
        );
    }

    #[test]
    fn the_delivery_line_says_whether_raw_was_granted() {
        assert_eq!(
            Event::Delivery {
                track: 1,
                raw: true
            }
            .to_string(),
            "track 1: header-less (RAW) delivery granted: RTP and RTCP travel as plain datagrams \
             on sockets connected to the source"
        );
        assert_eq!(
            Event::Delivery {
                track: 0,
                raw: false
            }
            .to_string(),
            "track 0: the gateway did not grant header-less (RAW) delivery; using the 8-octet \
             header"
        );
    }
}
