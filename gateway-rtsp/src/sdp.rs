//! Session descriptions (SDP, RFC 8866) as RTSP uses them (RFC 2326 appendix C): the audio
//! tracks of a DESCRIBE answer with their payload format and control URL, and the description the
//! demo server gives. Parsing and writing go through `sdp-types`.
//!
//! Pure: bytes and URLs in, values out.

use std::net::IpAddr;

use rtsp_types::Url;
use sdp_types::{Attribute, Media, Origin, RtpMap, Session, Time};

use super::{ParseError, audio::Codec};

/// One audio track of a session description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SdpTrack {
    /// The position of its `m=` line among all media (0-based).
    pub index: usize,
    /// The absolute control URL for SETUP.
    pub control: Url,
    /// The RTP payload type (the first format of the `m=` line).
    pub payload_type: u8,
    /// The encoding name (`L16`, `PCMU`, ...).
    pub encoding: String,
    /// The codec, if this crate decodes the encoding.
    pub codec: Option<Codec>,
    /// The RTP clock rate.
    pub clock_rate: u32,
    /// Channels (1 unless `a=rtpmap` says otherwise).
    pub channels: u16,
}

impl SdpTrack {
    /// `L16/8000/1`-style label.
    pub fn format(&self) -> String {
        format!("{}/{}/{}", self.encoding, self.clock_rate, self.channels)
    }
}

/// What a DESCRIBE answer offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Description {
    /// The aggregate control URL for PLAY and TEARDOWN.
    pub control: Url,
    /// The audio tracks over RTP/AVP, in `m=` order.
    pub tracks: Vec<SdpTrack>,
}

/// Resolves a control attribute against `base` (RFC 2326 C.1.1): absolute URLs as they are, `*`
/// as the base, anything else appended to the base with one `/`.
pub fn resolve_control(base: &Url, control: &str) -> Result<Url, ParseError> {
    let control = control.trim();
    let bad = |reason: &str| ParseError::Url {
        url: control.chars().take(200).collect(),
        reason: reason.to_owned(),
    };
    if control.is_empty() || control == "*" {
        return Ok(base.clone());
    }
    if control.len() > 1024 {
        return Err(bad("a control URL over 1024 octets"));
    }
    if control.contains("://") {
        let url = Url::parse(control).map_err(|error| bad(&error.to_string()))?;
        if !url.scheme().eq_ignore_ascii_case("rtsp") {
            return Err(bad("not an rtsp:// URL"));
        }
        return Ok(url);
    }
    let mut joined = base.as_str().trim_end_matches('/').to_owned();
    joined.push('/');
    joined.push_str(control.trim_start_matches('/'));
    Url::parse(&joined).map_err(|error| bad(&error.to_string()))
}

/// The audio tracks and aggregate control URL of a DESCRIBE answer's body, against `base` (the
/// answer's Content-Base, else the request URL).
pub fn parse_description(body: &[u8], base: &Url) -> Result<Description, ParseError> {
    let session = Session::parse(body).map_err(|error| ParseError::Sdp(error.to_string()))?;
    let control = match attribute(&session.attributes, "control") {
        Some(control) => resolve_control(base, control)?,
        None => base.clone(),
    };
    let mut tracks = Vec::new();
    for (index, media) in session.medias.iter().enumerate() {
        if !media.media.eq_ignore_ascii_case("audio") || media.proto != "RTP/AVP" {
            continue;
        }
        tracks.push(track(index, media, &control)?);
    }
    Ok(Description { control, tracks })
}

fn attribute<'a>(attributes: &'a [Attribute], name: &str) -> Option<&'a str> {
    attributes
        .iter()
        .find(|a| a.attribute.eq_ignore_ascii_case(name))
        .map(|a| a.value.as_deref().unwrap_or(""))
}

fn track(index: usize, media: &Media, aggregate: &Url) -> Result<SdpTrack, ParseError> {
    let sdp = |reason: String| ParseError::Sdp(format!("media {index}: {reason}"));
    let payload_type = media
        .fmt
        .split_whitespace()
        .next()
        .and_then(|pt| pt.parse::<u8>().ok())
        .filter(|&pt| pt <= 127)
        .ok_or_else(|| sdp(format!("no RTP payload type in {:?}", media.fmt)))?;
    let rtpmap = media
        .attributes_typed::<RtpMap>()
        .filter_map(Result::ok)
        .find(|map| map.payload_type == payload_type);
    let (encoding, clock_rate, channels) = if let Some(map) = rtpmap {
        let channels = match map.encoding_params.as_deref() {
            None => 1,
            Some(text) => text
                .trim()
                .parse::<u16>()
                .ok()
                .filter(|&c| (1..=8).contains(&c))
                .ok_or_else(|| sdp(format!("bad channel count {text:?}")))?,
        };
        (map.encoding_name, map.clock_rate, channels)
    } else {
        let (codec, rate, channels) =
            Codec::from_static_payload_type(payload_type).ok_or_else(|| {
                sdp(format!(
                    "payload type {payload_type} has no a=rtpmap and no static meaning"
                ))
            })?;
        (codec.encoding_name().to_owned(), rate, channels)
    };
    if clock_rate == 0 {
        return Err(sdp("clock rate 0".to_owned()));
    }
    let control = match attribute(&media.attributes, "control") {
        Some(control) => resolve_control(aggregate, control)?,
        None => aggregate.clone(),
    };
    Ok(SdpTrack {
        index,
        control,
        payload_type,
        codec: Codec::from_encoding_name(&encoding),
        encoding,
        clock_rate,
        channels,
    })
}

/// What the demo server describes: `tracks` audio tracks of one format, controls `trackID=N`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Offer {
    /// The server's address (origin line).
    pub origin: IpAddr,
    /// The codec.
    pub codec: Codec,
    /// The payload type.
    pub payload_type: u8,
    /// The clock rate.
    pub rate: u32,
    /// Channels.
    pub channels: u16,
    /// How many identical tracks.
    pub tracks: usize,
    /// Length in seconds (for `a=range`).
    pub seconds: f64,
}

/// The SDP text of `offer`.
pub fn write_description(offer: &Offer, session_id: u32) -> String {
    let mut session = Session::new(
        Origin::with_ip_addr(session_id, 1, offer.origin),
        "gateway demo media server",
    );
    session.add_time(Time::new(0, 0));
    session.add_attribute_with_value("control", "*");
    session.add_attribute_with_value("range", format!("npt=0-{:.3}", offer.seconds));
    for track in 0..offer.tracks {
        let mut media = Media::new(
            sdp_types::MediaType::Audio,
            0,
            sdp_types::TransportProto::RtpAvp,
            offer.payload_type,
        );
        let map = RtpMap::with_encoding_params(
            offer.payload_type,
            offer.codec.encoding_name(),
            offer.rate,
            offer.channels,
        );
        media.add_attribute(map);
        media.add_attribute_with_value("control", format!("trackID={track}"));
        session.add_media(media);
    }
    let mut text = Vec::new();
    // Writing to a Vec cannot fail.
    let _ = session.write(&mut text);
    String::from_utf8_lossy(&text).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(text: &str) -> Url {
        Url::parse(text).unwrap()
    }

    const GSTREAMER: &str = "v=0\r\no=- 1188340656180883 1 IN IP4 203.0.113.2\r\ns=Session streamed with GStreamer\r\n\
        i=rtsp-server\r\nt=0 0\r\na=tool:GStreamer\r\na=type:broadcast\r\na=control:*\r\n\
        a=range:npt=now-\r\nm=audio 0 RTP/AVP 96\r\nc=IN IP4 0.0.0.0\r\nb=AS:128\r\n\
        a=rtpmap:96 L16/8000\r\na=control:stream=0\r\n";

    #[test]
    fn gstreamer_description() {
        let base = url("rtsp://203.0.113.2:8554/rtsp.wav/");
        let description = parse_description(GSTREAMER.as_bytes(), &base).unwrap();
        assert_eq!(description.control, base);
        assert_eq!(
            description.tracks,
            vec![SdpTrack {
                index: 0,
                control: url("rtsp://203.0.113.2:8554/rtsp.wav/stream=0"),
                payload_type: 96,
                encoding: "L16".into(),
                codec: Some(Codec::L16),
                clock_rate: 8000,
                channels: 1,
            }]
        );
        assert_eq!(description.tracks[0].format(), "L16/8000/1");
    }

    #[test]
    fn gstreamer_multicast_description() {
        // GStreamer's server with an address pool (UDP_MCAST only): c= names the group/TTL.
        let body = "v=0\r\no=- 6273596659437435735 1 IN IP4 203.0.113.2\r\n\
            s=Session streamed with GStreamer\r\ni=rtsp-server\r\nt=0 0\r\na=tool:GStreamer\r\n\
            a=type:broadcast\r\na=control:*\r\na=range:npt=0-2\r\nm=audio 0 RTP/AVP 96\r\n\
            c=IN IP4 233.252.0.10/16\r\nb=AS:128\r\na=rtpmap:96 L16/8000/1\r\n\
            a=control:stream=0\r\na=ts-refclk:local\r\na=mediaclk:sender\r\n\
            a=ssrc:31285020 cname:user2600056500@host-a10d339d\r\n";
        let base = url("rtsp://203.0.113.2:8554/rtsp.wav/");
        let description = parse_description(body.as_bytes(), &base).unwrap();
        assert_eq!(description.tracks.len(), 1);
        assert_eq!(description.tracks[0].codec, Some(Codec::L16));
        assert_eq!(
            description.tracks[0].control,
            url("rtsp://203.0.113.2:8554/rtsp.wav/stream=0")
        );
    }

    #[test]
    fn base_without_slash_and_absolute_controls() {
        let base = url("rtsp://h:554/a.wav");
        assert_eq!(
            resolve_control(&base, "trackID=1").unwrap(),
            url("rtsp://h:554/a.wav/trackID=1")
        );
        assert_eq!(resolve_control(&base, "*").unwrap(), base);
        assert_eq!(
            resolve_control(&base, "rtsp://other:1/x").unwrap(),
            url("rtsp://other:1/x")
        );
        assert!(resolve_control(&base, "http://other/x").is_err());
        assert!(resolve_control(&base, &"x".repeat(2000)).is_err());
    }

    #[test]
    fn static_pcmu_and_other_media() {
        let sdp = "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=x\r\nt=0 0\r\n\
            m=video 0 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\na=control:v\r\n\
            m=audio 0 RTP/AVP 0\r\na=control:a\r\n\
            m=audio 0 RTP/AVP 97\r\na=rtpmap:97 opus/48000/2\r\na=control:o\r\n";
        let description = parse_description(sdp.as_bytes(), &url("rtsp://h/s")).unwrap();
        let tracks = description.tracks;
        assert_eq!(tracks.len(), 2);
        assert_eq!((tracks[0].index, tracks[0].codec), (1, Some(Codec::Pcmu)));
        assert_eq!(tracks[0].format(), "PCMU/8000/1");
        assert_eq!((tracks[1].index, tracks[1].codec), (2, None));
        assert_eq!(tracks[1].channels, 2);
    }

    #[test]
    fn demo_offer_round_trips() {
        let offer = Offer {
            origin: "203.0.113.2".parse().unwrap(),
            codec: Codec::L16,
            payload_type: 96,
            rate: 8000,
            channels: 1,
            tracks: 2,
            seconds: 3.0,
        };
        let text = write_description(&offer, 42);
        let base = url("rtsp://203.0.113.2:8554/rtsp.wav/");
        let description = parse_description(text.as_bytes(), &base).unwrap();
        assert_eq!(description.tracks.len(), 2);
        assert_eq!(
            description.tracks[1].control,
            url("rtsp://203.0.113.2:8554/rtsp.wav/trackID=1")
        );
        assert_eq!(description.tracks[0].format(), "L16/8000/1");
    }

    #[test]
    fn malformed_descriptions_are_errors() {
        let base = url("rtsp://h/s");
        for sdp in [
            "",
            "not sdp at all",
            "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=x\r\nm=audio 0 RTP/AVP\r\n",
            "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=x\r\nm=audio 0 RTP/AVP 96\r\n",
            "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=x\r\nm=audio 0 RTP/AVP 200\r\n",
            "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=x\r\nm=audio 0 RTP/AVP 96\r\na=rtpmap:96 L16/0\r\n",
            "v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=x\r\nm=audio 0 RTP/AVP 96\r\na=rtpmap:96 L16/8000/99\r\n",
        ] {
            assert!(parse_description(sdp.as_bytes(), &base).is_err(), "{sdp:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_descriptions_never_panic(body in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = parse_description(&body, &url("rtsp://h/s"));
        }

        #[test]
        fn sdp_like_descriptions_never_panic(
            lines in proptest::collection::vec("(v=0|o=- 1 1 IN IP4 [0-9.]{0,9}|s=x|t=0 0|m=audio [0-9]{0,6} RTP/AVP [0-9 ]{0,6}|a=rtpmap:[0-9]{0,4} [A-Z0-9]{0,4}/[0-9]{0,6}(/[0-9]{0,3})?|a=control:[ -~]{0,12}|c=IN IP4 [0-9./]{0,12})", 0..10)
        ) {
            let _ = parse_description(lines.join("\r\n").as_bytes(), &url("rtsp://h/s"));
        }
    }
}
