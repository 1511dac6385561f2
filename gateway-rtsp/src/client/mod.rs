//! The socksified RTSP client behind `gateway rtsp-get`: [`play`] runs one whole session through
//! the gateway in the order protocol.md section 4 prescribes, and reports what arrived.
//!
//! 1. Control: SOCKS CONNECT to the RTSP server ([`gateway_client::Client::tcp_connect`]), OPTIONS,
//!    DESCRIBE (SDP).
//! 2. Per audio track: step 1 as an RTP pair ([`gateway_client::EnhancedSession::bind_rtp_pair`]),
//!    SETUP with `client_port` = the **external** relay pair, the reply's `server_port` and
//!    `source` (or `src_addr`), step 2 ([`gateway_client::RtpPair::connect`]) with exactly that
//!    source (the RTSP server's own address when the reply names none).
//! 3. PLAY, receive for the asked time (or until the server's BYE) with RTCP receiver reports
//!    back through each binding, TEARDOWN, UDP RELEASE.
//!
//! With [`PlayOptions::multicast`] SETUP asks for `Transport: RTP/AVP;multicast` instead, and
//! step 1 and step 2 give way to subscriptions: when the reply names a multicast destination
//! G and ports P-Q, the client subscribes to G:P (and G:Q for RTCP) through the gateway in
//! multicast-to-unicast mode ([`gateway_client::EnhancedSession::subscribe`]) before PLAY; the
//! audio is received, counted and written exactly as in the unicast path. A unicast answer
//! is [`RtspError::UnicastAnswer`], a refused subscription [`RtspError::MulticastRefused`].
//!
//! With [`PlayOptions::raw`] both binding steps ask for header-less delivery; where the step-2
//! reply grants it, RTP and RTCP arrive as plain datagrams on sockets connected to the source's
//! ports and receiver reports go plain to its RTCP port; where not, the header is used. The
//! library's flows hide the difference, so reception and statistics are the same either way.
//!
//! Progress goes to an optional callback ([`PlayOptions::progress`]) as [`Event`]s whose
//! `Display` is the line a person reads. Every network wait is bounded.

mod connection;
mod media;
mod report;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use rtsp_types::{Method, Url, headers};
use tokio::time::Instant;

pub use self::report::{Event, PlayReport, TrackReport};
use self::{
    connection::Control,
    media::{Media, Receive},
};
use super::{
    ParseError, RtspError,
    audio::{Audio, Codec},
    message, sdp,
    transport::{self, SetupTransport, SourceHost},
};
use gateway_client::{
    Address, BindOptions, BindingError, Client, ClientError, EnhancedSession, Family,
    MulticastMode, Timeouts,
};

/// A callback for progress events; the CLI prints each one as a line.
pub type Progress = Arc<dyn Fn(&Event) + Send + Sync>;

/// What [`play`] does.
#[derive(Clone)]
pub struct PlayOptions {
    /// `rtsp://HOST[:PORT]/PATH` (port 554 by default).
    pub url: String,
    /// The gateway's SOCKS address.
    pub proxy: SocketAddr,
    /// RFC 1929 user name and password; anonymous without.
    pub credentials: Option<(String, String)>,
    /// How long to receive after PLAY (less if the server ends every stream with BYE).
    pub duration: Duration,
    /// Where to write the audio: the first track to this file, track `n` (in play order, from
    /// 1) to `STEM-n.wav` beside it. `None`: no file.
    pub out: Option<PathBuf>,
    /// SDP track indexes (the `m=` line position) to play; empty: every audio track this client
    /// decodes (L16, PCMU).
    pub tracks: Vec<usize>,
    /// How long to wait for the first RTP packet after PLAY.
    pub start_timeout: Duration,
    /// How long to wait for each RTSP answer.
    pub rtsp_timeout: Duration,
    /// Interval of the RTCP receiver reports.
    pub rtcp_interval: Duration,
    /// Ask for header-less (RAW) delivery of each track's RTP pair. Granted, RTP and RTCP
    /// travel as plain datagrams between this host and the media source, which needs the gateway
    /// as this host's next hop to the source, an IP source address (not a name) and a gateway
    /// reached over the source's address family; not granted, the header is used (an
    /// [`Event::Delivery`] says which).
    pub raw: bool,
    /// Ask the RTSP server for multicast (`Transport: RTP/AVP;multicast`) and receive the group
    /// it names through the gateway in multicast-to-unicast mode. The server must answer with a
    /// multicast transport ([`RtspError::UnicastAnswer`] otherwise); no RTCP receiver reports
    /// are sent. `raw` does not apply.
    pub multicast: bool,
    /// Bounds on the gateway's control plane.
    pub gateway_timeouts: Timeouts,
    /// Called for each step.
    pub progress: Option<Progress>,
}

impl std::fmt::Debug for PlayOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlayOptions")
            .field("url", &self.url)
            .field("proxy", &self.proxy)
            .field("user", &self.credentials.as_ref().map(|(user, _)| user))
            .field("duration", &self.duration)
            .field("out", &self.out)
            .field("tracks", &self.tracks)
            .field("raw", &self.raw)
            .field("multicast", &self.multicast)
            .finish_non_exhaustive()
    }
}

impl PlayOptions {
    /// Options with defaults: anonymous, 5 s of media, no file, every track, 5 s start timeout,
    /// 10 s per RTSP answer, a receiver report every second, the 8-octet header.
    pub fn new(url: impl Into<String>, proxy: SocketAddr) -> Self {
        Self {
            url: url.into(),
            proxy,
            credentials: None,
            duration: Duration::from_secs(5),
            out: None,
            tracks: Vec::new(),
            start_timeout: Duration::from_secs(5),
            rtsp_timeout: Duration::from_secs(10),
            rtcp_interval: Duration::from_secs(1),
            raw: false,
            multicast: false,
            gateway_timeouts: Timeouts::default(),
            progress: None,
        }
    }

    fn emit(&self, event: &Event) {
        if let Some(progress) = &self.progress {
            progress(event);
        }
    }
}

/// An RTSP URL and the address to CONNECT to.
fn target(url: &str) -> Result<(Url, Address), ParseError> {
    let bad = |reason: &str| ParseError::Url {
        url: url.chars().take(200).collect(),
        reason: reason.to_owned(),
    };
    let parsed = Url::parse(url).map_err(|error| bad(&error.to_string()))?;
    if !parsed.scheme().eq_ignore_ascii_case("rtsp") {
        return Err(bad("only rtsp:// URLs (RTSP over TCP) are supported"));
    }
    let host = parsed
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| bad("no host"))?;
    let port = parsed.port().unwrap_or(554);
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let address = match bare.parse() {
        Ok(ip) => Address::Ip(SocketAddr::new(ip, port)),
        Err(_) => Address::Domain(host.to_owned(), port),
    };
    Ok((parsed, address))
}

/// `address` with another port.
fn with_port(address: &Address, port: u16) -> Address {
    match address {
        Address::Ip(addr) => Address::Ip(SocketAddr::new(addr.ip(), port)),
        Address::Domain(name, _) => Address::Domain(name.clone(), port),
    }
}

fn gateway(operation: impl Into<String>) -> impl FnOnce(ClientError) -> RtspError {
    let operation = operation.into();
    move |error| RtspError::Gateway { operation, error }
}

/// The tracks to play: those asked for, or every decodable one.
fn choose(
    tracks: &[sdp::SdpTrack],
    asked: &[usize],
) -> Result<Vec<(sdp::SdpTrack, Codec)>, RtspError> {
    let mut chosen = Vec::new();
    for track in tracks {
        if !asked.is_empty() && !asked.contains(&track.index) {
            continue;
        }
        match track.codec {
            Some(codec) => chosen.push((track.clone(), codec)),
            None if asked.contains(&track.index) => {
                return Err(ParseError::Sdp(format!(
                    "track {} is {}; this client decodes L16 and PCMU",
                    track.index,
                    track.format()
                ))
                .into());
            }
            None => {}
        }
    }
    if let Some(missing) = asked.iter().find(|&&i| tracks.iter().all(|t| t.index != i)) {
        return Err(ParseError::Sdp(format!("no audio track {missing} in the description")).into());
    }
    if chosen.is_empty() {
        return Err(ParseError::Sdp("no L16 or PCMU audio track to play".to_owned()).into());
    }
    Ok(chosen)
}

/// One set-up track.
struct Active {
    track: sdp::SdpTrack,
    codec: Codec,
    media: Media,
    source: Address,
    rtcp_port: u16,
    /// Whether step 2 made the pair header-less (kept: a released pair is no longer raw).
    raw: bool,
}

/// Plays `options.url` through the gateway and returns what arrived, per track.
///
/// # Examples
///
/// ```no_run
/// use gateway_rtsp::client::{PlayOptions, play};
/// # async fn demo() -> Result<(), gateway_rtsp::RtspError> {
/// let mut options = PlayOptions::new(
///     "rtsp://203.0.113.2:8554/rtsp.wav",
///     "198.51.100.1:1080".parse().expect("an address"),
/// );
/// options.out = Some("received.wav".into());
/// let report = play(options).await?;
/// for track in &report.tracks {
///     println!("{track}");
/// }
/// # Ok(())
/// # }
/// ```
pub async fn play(options: PlayOptions) -> Result<PlayReport, RtspError> {
    let (url, server) = target(&options.url)?;
    let mut control = open_control(&options, &server).await?;
    // OPTIONS is a courtesy; a server that refuses it may still play.
    control.request(Method::Options, &url, Vec::new()).await?;
    let describe = control
        .expect_success(
            Method::Describe,
            &url,
            vec![(headers::ACCEPT, "application/sdp".to_owned())],
        )
        .await?;
    let base = message::content_base(&describe, &url)?;
    let description = sdp::parse_description(describe.body(), &base)?;
    let chosen = choose(&description.tracks, &options.tracks)?;
    options.emit(&Event::Described {
        control: description.control.clone(),
        tracks: description.tracks.clone(),
    });

    let session = Client::connect_with(
        options.proxy,
        options.credentials.clone(),
        options.gateway_timeouts,
    )
    .await
    .map_err(gateway("connect and authenticate (enhanced mode)"))?
    .enhanced()
    .await
    .map_err(gateway("enter the enhanced UDP mode"))?;
    let family = match &server {
        Address::Ip(addr) => Family::of(addr.ip()),
        Address::Domain(..) => Family::V4,
    };
    let mut active = Vec::new();
    let mut outcome = async {
        for (track, codec) in chosen {
            let track = if options.multicast {
                setup_multicast(&options, &mut control, &session, track, codec).await
            } else {
                setup(
                    &options,
                    &mut control,
                    &session,
                    family,
                    &server,
                    track,
                    codec,
                )
                .await
            };
            active.push(track?);
        }
        let range = vec![(headers::RANGE, "npt=0-".to_owned())];
        control
            .expect_success(Method::Play, &description.control, range)
            .await
    }
    .await
    .map(|_| Vec::new());
    if outcome.is_ok() {
        options.emit(&Event::Playing {
            duration: options.duration,
        });
        outcome = receive(&options, &session, &mut active).await;
    }
    // TEARDOWN and release whatever happened; the first error wins.
    let teardown = finish(&options, &mut control, &description.control, &active).await;
    session.close();
    let tracks = reports(&options, active, outcome?)?;
    Ok(PlayReport {
        control: description.control,
        session: control.session,
        teardown,
        tracks,
    })
}

/// The RTSP control connection: authenticate to the gateway and CONNECT to the server.
async fn open_control(options: &PlayOptions, server: &Address) -> Result<Control, RtspError> {
    let client = Client::connect_with(
        options.proxy,
        options.credentials.clone(),
        options.gateway_timeouts,
    )
    .await
    .map_err(gateway("connect and authenticate"))?;
    let (stream, bound) = client
        .tcp_connect(server.clone())
        .await
        .map_err(gateway(format!("CONNECT to {server}")))?;
    options.emit(&Event::Control {
        server: server.clone(),
        proxy: options.proxy,
        bound,
    });
    Ok(Control::new(stream, options.rtsp_timeout))
}

/// TEARDOWN (if a session was set up) and UDP RELEASE of every binding; returns TEARDOWN's
/// status. Failures here are warnings: the gateway releases the bindings when the session's
/// control connection closes anyway.
async fn finish(
    options: &PlayOptions,
    control: &mut Control,
    aggregate: &Url,
    active: &[Active],
) -> Option<u16> {
    let mut teardown = None;
    if control.session.is_some() {
        match control
            .request(Method::Teardown, aggregate, Vec::new())
            .await
        {
            Ok(response) => teardown = Some(u16::from(response.status())),
            Err(error) => options.emit(&Event::Warning(format!("TEARDOWN: {error}"))),
        }
    }
    options.emit(&Event::TornDown { status: teardown });
    let mut released = 0;
    for track in active {
        let (count, failed) = track.media.release().await;
        released += count;
        for (aid, error) in failed {
            options.emit(&Event::Warning(format!(
                "release of AID {aid:#010x}: {error}"
            )));
        }
    }
    options.emit(&Event::Released { bindings: released });
    teardown
}

/// The per-track reports, writing the WAV files.
fn reports(
    options: &PlayOptions,
    active: Vec<Active>,
    received: Vec<media::Received>,
) -> Result<Vec<TrackReport>, RtspError> {
    let mut tracks = Vec::new();
    for (position, (track, received)) in active.into_iter().zip(received).enumerate() {
        let audio = Audio {
            rate: track.track.clock_rate,
            channels: track.track.channels,
            samples: received.samples,
        };
        let out = options.out.as_deref().map(|out| track_path(out, position));
        if let Some(path) = &out {
            audio.write_wav(path)?;
        }
        tracks.push(TrackReport {
            relays: track.media.relay_addrs(),
            multicast: track.media.multicast(),
            raw: track.raw,
            track: track.track,
            codec: track.codec,
            source: track.source,
            rtcp_port: track.rtcp_port,
            stats: received.stats,
            ssrc: received.ssrc,
            sender_reports: received.sender_reports,
            receiver_reports: received.receiver_reports,
            bye: received.bye,
            skipped: received.skipped,
            audio,
            out,
        });
    }
    Ok(tracks)
}

/// The output file of the track at `position` in play order.
fn track_path(out: &Path, position: usize) -> PathBuf {
    if position == 0 {
        return out.to_owned();
    }
    let stem = out.file_stem().map_or_else(
        || "track".to_owned(),
        |stem| stem.to_string_lossy().into_owned(),
    );
    let extension = out.extension().map_or_else(
        || "wav".to_owned(),
        |ext| ext.to_string_lossy().into_owned(),
    );
    out.with_file_name(format!("{stem}-{position}.{extension}"))
}

/// Step 1, SETUP, step 2 for one track.
#[expect(
    clippy::similar_names,
    reason = "RTP and RTCP are the protocol's names"
)]
async fn setup(
    options: &PlayOptions,
    control: &mut Control,
    session: &gateway_client::EnhancedSession,
    family: Family,
    server: &Address,
    track: sdp::SdpTrack,
    codec: Codec,
) -> Result<Active, RtspError> {
    let index = track.index;
    let pair = session
        .bind_rtp_pair_with(family, BindOptions { raw: options.raw })
        .await
        .map_err(gateway(format!(
            "step 1 (UDP BIND, RTP pair) for track {index}"
        )))?;
    let relays = pair.relay_addrs();
    options.emit(&Event::Step1 {
        track: index,
        relays,
    });
    let reply = control
        .expect_success(
            Method::Setup,
            &track.control,
            vec![(
                headers::TRANSPORT,
                transport::client_request(relays.external.port()),
            )],
        )
        .await?;
    if control.session.is_none() {
        control.session = message::session(&reply)?.map(|(id, _)| id);
    }
    let header = reply
        .header(&headers::TRANSPORT)
        .map(|value| value.as_str().to_owned())
        .unwrap_or_default();
    let no_ports = || RtspError::NoSourcePorts {
        track: index,
        transport: header.clone(),
    };
    if header.is_empty() {
        return Err(no_ports());
    }
    let parsed = transport::parse_reply(&header)?;
    let (rtp_port, rtcp_port) = parsed.ports.ok_or_else(no_ports)?;
    let source = match &parsed.source {
        Some(SourceHost::Ip(ip)) => Address::Ip(SocketAddr::new(*ip, rtp_port)),
        Some(SourceHost::Name(name)) => Address::Domain(name.clone(), rtp_port),
        None => with_port(server, rtp_port),
    };
    options.emit(&Event::SetupReply {
        track: index,
        session: control.session.clone(),
        transport: parsed.clone(),
    });
    if Some(rtcp_port) != rtp_port.checked_add(1) {
        options.emit(&Event::Warning(format!(
            "track {index}: the server's RTCP port {rtcp_port} is not {rtp_port}+1; its RTCP \
             cannot pass the RTP-pair binding"
        )));
    }
    match pair.connect(source.clone()).await {
        Ok(_) => {}
        Err(ClientError::Binding(BindingError::Expired)) => {
            return Err(RtspError::BindingExpired { track: index });
        }
        Err(error) => {
            return Err(gateway(format!("step 2 (UDP BIND, Open) naming {source}"))(
                error,
            ));
        }
    }
    options.emit(&Event::Step2 {
        track: index,
        source: source.clone(),
        rtcp_port,
    });
    let raw = pair.is_raw();
    if options.raw {
        options.emit(&Event::Delivery { track: index, raw });
    }
    Ok(Active {
        track,
        codec,
        media: Media::Pair(pair),
        source,
        rtcp_port,
        raw,
    })
}

/// The one sender of a source-specific group (`source=` of the reply), which the subscriptions
/// are narrowed to; a name cannot be (the gateway takes addresses), so it is said and ignored.
fn multicast_source(
    options: &PlayOptions,
    index: usize,
    source: Option<&transport::SourceHost>,
) -> Option<std::net::IpAddr> {
    match source? {
        transport::SourceHost::Ip(ip) => Some(*ip),
        transport::SourceHost::Name(name) => {
            options.emit(&Event::Warning(format!(
                "track {index}: source={name} is a name, not an address: any source of the \
                 group is received"
            )));
            None
        }
    }
}

/// SETUP asking for multicast, then the subscriptions to the group the reply names (RTP on P,
/// RTCP on Q if the gateway lets it), multicast-to-unicast, for one track.
#[expect(
    clippy::similar_names,
    reason = "RTP and RTCP are the protocol's names"
)]
async fn setup_multicast(
    options: &PlayOptions,
    control: &mut Control,
    session: &EnhancedSession,
    track: sdp::SdpTrack,
    codec: Codec,
) -> Result<Active, RtspError> {
    let index = track.index;
    let reply = control
        .expect_success(
            Method::Setup,
            &track.control,
            vec![(headers::TRANSPORT, transport::client_request_multicast())],
        )
        .await?;
    if control.session.is_none() {
        control.session = message::session(&reply)?.map(|(id, _)| id);
    }
    let header = reply
        .header(&headers::TRANSPORT)
        .map(|value| value.as_str().to_owned())
        .unwrap_or_default();
    let unicast = || RtspError::UnicastAnswer {
        track: index,
        transport: header.clone(),
    };
    if header.is_empty() {
        return Err(unicast());
    }
    let SetupTransport::Multicast(parsed) = transport::parse_setup_reply(&header)? else {
        return Err(unicast());
    };
    options.emit(&Event::MulticastSetupReply {
        track: index,
        session: control.session.clone(),
        transport: parsed.clone(),
    });
    let (rtp_port, rtcp_port) = parsed.ports;
    let group = SocketAddr::new(parsed.group, rtp_port);
    let refused = |group: SocketAddr| {
        move |error| match error {
            ClientError::Binding(refusal) => RtspError::MulticastRefused {
                track: index,
                group,
                refusal,
            },
            error => gateway(format!(
                "subscribe to {group} (multicast-to-unicast) for track {index}"
            ))(error),
        }
    };
    let rtp = session
        .subscribe(group, Some(MulticastMode::ToUnicast))
        .await
        .map_err(refused(group))?;
    let source = multicast_source(options, index, parsed.source.as_ref());
    if let Some(source) = source {
        rtp.only_from(source).await.map_err(refused(group))?;
    }
    options.emit(&Event::Subscribed {
        track: index,
        binding: rtp.binding(),
    });
    let rtcp_group = SocketAddr::new(parsed.group, rtcp_port);
    let rtcp = match session
        .subscribe(rtcp_group, Some(MulticastMode::ToUnicast))
        .await
    {
        Ok(rtcp) => {
            if let Some(source) = source
                && let Err(error) = rtcp.only_from(source).await
            {
                options.emit(&Event::Warning(format!(
                    "track {index}: RTCP of {rtcp_group} from any source: naming {source}: \
                     {error}"
                )));
            }
            options.emit(&Event::Subscribed {
                track: index,
                binding: rtcp.binding(),
            });
            Some(rtcp)
        }
        Err(error) => {
            options.emit(&Event::Warning(format!(
                "track {index}: no RTCP: subscribing to {rtcp_group}: {error}"
            )));
            None
        }
    };
    Ok(Active {
        track,
        codec,
        media: Media::Multicast { rtp, rtcp },
        source: Address::Ip(group),
        rtcp_port,
        raw: false,
    })
}

/// Receives every track at once, each in its own task.
async fn receive(
    options: &PlayOptions,
    session: &gateway_client::EnhancedSession,
    active: &mut Vec<Active>,
) -> Result<Vec<media::Received>, RtspError> {
    let start = Instant::now();
    let cname = format!("rtsp-get@{}", session.local_ip());
    let mut tasks = tokio::task::JoinSet::new();
    for (position, track) in active.drain(..).enumerate() {
        let receive = Receive {
            track: track.track.clone(),
            codec: track.codec,
            source: track.source.clone(),
            start,
            until: start + options.duration,
            start_timeout: options.start_timeout,
            rtcp_interval: options.rtcp_interval,
            cname: cname.clone(),
            progress: options.progress.clone(),
        };
        tasks.spawn(async move {
            let result = receive.run(&track.media).await;
            (position, track, result)
        });
    }
    let mut done = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let (position, track, result) = joined.map_err(|error| RtspError::BindingLost {
            track: usize::MAX,
            reason: format!("the receiving task failed: {error}"),
        })?;
        done.push((position, track, result));
    }
    done.sort_by_key(|(position, ..)| *position);
    let mut received = Vec::new();
    let mut first_error = None;
    for (_, track, result) in done {
        active.push(track);
        match result {
            Ok(value) => received.push(value),
            Err(error) => {
                first_error.get_or_insert(error);
            }
        }
    }
    first_error.map_or(Ok(received), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_the_server_to_connect_to() {
        let (_, address) = target("rtsp://203.0.113.2:8554/rtsp.wav").unwrap();
        assert_eq!(address, Address::Ip("203.0.113.2:8554".parse().unwrap()));
        let (_, address) = target("rtsp://[2001:db8:2::2]/a").unwrap();
        assert_eq!(address, Address::Ip("[2001:db8:2::2]:554".parse().unwrap()));
        let (_, address) = target("rtsp://media.test:9/a").unwrap();
        assert_eq!(address, Address::Domain("media.test".into(), 9));
        for bad in ["http://h/a", "rtsp:///a", "not a url", "rtsp://h:99999/a"] {
            assert!(target(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn later_tracks_get_numbered_files() {
        let out = Path::new("/tmp/x/out.wav");
        assert_eq!(track_path(out, 0), out);
        assert_eq!(track_path(out, 2), Path::new("/tmp/x/out-2.wav"));
        assert_eq!(track_path(Path::new("a"), 1), Path::new("a-1.wav"));
    }

    #[test]
    fn tracks_are_chosen_by_index_and_codec() {
        let base = Url::parse("rtsp://h/s/").unwrap();
        let track = |index, codec| sdp::SdpTrack {
            index,
            control: base.clone(),
            payload_type: 96,
            encoding: "X".into(),
            codec,
            clock_rate: 8000,
            channels: 1,
        };
        let tracks = [
            track(0, None),
            track(1, Some(Codec::L16)),
            track(3, Some(Codec::Pcmu)),
        ];
        let all = choose(&tracks, &[]).unwrap();
        assert_eq!(all.iter().map(|(t, _)| t.index).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(choose(&tracks, &[3]).unwrap()[0].1, Codec::Pcmu);
        assert!(choose(&tracks, &[0]).is_err(), "undecodable");
        assert!(choose(&tracks, &[2]).is_err(), "absent");
        assert!(choose(&tracks[..1], &[]).is_err(), "nothing to play");
    }
}
