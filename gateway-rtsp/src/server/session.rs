//! One RTSP control connection of the demo server, which is one RTSP session: requests in, answers
//! out, and the media streams of its tracks, which stop at TEARDOWN or when the connection closes.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use bytes::BytesMut;
use rtsp_types::{
    Message, Method, Request, StatusCode, Url,
    headers::{self, HeaderName},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    task::JoinHandle,
};
use tracing::{debug, info};

use super::{ServerConfig, ServerStats, stream};
use crate::{message, random_u32, sdp, transport};

/// A set-up track: its sockets wait in a stream for PLAY.
struct Track {
    stream: Option<stream::Stream>,
    rtp_info: String,
}

/// The session's state; its streams stop when it is dropped.
struct Session {
    id: Option<String>,
    tracks: BTreeMap<usize, Track>,
    playing: Vec<JoinHandle<()>>,
}

impl Session {
    fn stop(&mut self) {
        for task in self.playing.drain(..) {
            task.abort();
        }
        self.tracks.clear();
        self.id = None;
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What a request gets: a status, extra headers, a body.
type Answer = (StatusCode, Vec<(HeaderName, String)>, Vec<u8>);

fn status(code: StatusCode) -> Answer {
    (code, Vec::new(), Vec::new())
}

/// Serves one connection until the peer closes it or sends something that is not RTSP.
pub(super) async fn serve_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    config: Arc<ServerConfig>,
    stats: Arc<ServerStats>,
) {
    let Ok(local) = stream.local_addr() else {
        return;
    };
    let mut session = Session {
        id: None,
        tracks: BTreeMap::new(),
        playing: Vec::new(),
    };
    let mut buffer = BytesMut::with_capacity(4096);
    loop {
        let request = match message::decode(&mut buffer) {
            Ok(Some(Message::Request(request))) => request,
            Ok(Some(_)) => continue,
            Ok(None) => match stream.read_buf(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            },
            Err(error) => {
                debug!(%peer, %error, "not RTSP; closing");
                let answer = message::response(StatusCode::BadRequest, None, &[], b"");
                let _ = stream.write_all(&answer).await;
                break;
            }
        };
        let cseq = request
            .header(&headers::CSEQ)
            .map(|value| value.as_str().to_owned());
        let (code, extra, body) =
            answer(&request, &mut session, peer, local, &config, &stats).await;
        let bytes = message::response(code, cseq.as_deref(), &extra, &body);
        if stream.write_all(&bytes).await.is_err() {
            break;
        }
    }
    info!(%peer, "RTSP connection closed");
}

/// The track index a URL names under the served path: `.../trackID=N`, or 0 for the path itself.
fn track_of(url: Option<&Url>, config: &ServerConfig) -> Option<usize> {
    let path = url?.path();
    let rest = path.strip_prefix(config.path.as_str())?;
    let rest = rest.trim_start_matches('/');
    if rest.is_empty() {
        return Some(0);
    }
    rest.strip_prefix("trackID=")?.parse().ok()
}

fn serves(url: Option<&Url>, config: &ServerConfig) -> bool {
    url.is_some_and(|url| url.path().trim_end_matches('/') == config.path)
}

async fn answer(
    request: &Request<Vec<u8>>,
    session: &mut Session,
    peer: SocketAddr,
    local: SocketAddr,
    config: &Arc<ServerConfig>,
    stats: &Arc<ServerStats>,
) -> Answer {
    let url = request.request_uri();
    let given_session = request.header(&headers::SESSION).map(|value| {
        value
            .as_str()
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_owned()
    });
    if given_session.is_some() && given_session != session.id {
        return status(StatusCode::SessionNotFound);
    }
    match request.method() {
        Method::Options => (
            StatusCode::Ok,
            vec![(
                headers::PUBLIC,
                "OPTIONS, DESCRIBE, SETUP, PLAY, TEARDOWN".to_owned(),
            )],
            Vec::new(),
        ),
        Method::Describe => {
            let Some(url) = url.filter(|_| serves(url, config)) else {
                return status(StatusCode::NotFound);
            };
            let offer = sdp::Offer {
                origin: local.ip(),
                codec: config.codec,
                payload_type: config.payload_type(),
                rate: config.audio.rate,
                channels: config.audio.channels,
                tracks: config.tracks.max(1),
                seconds: config.audio.duration().as_secs_f64(),
            };
            let body = sdp::write_description(&offer, random_u32()).into_bytes();
            let base = format!("{}/", url.as_str().trim_end_matches('/'));
            (
                StatusCode::Ok,
                vec![
                    (headers::CONTENT_TYPE, "application/sdp".to_owned()),
                    (headers::CONTENT_BASE, base),
                ],
                body,
            )
        }
        Method::Setup => setup(request, session, peer, local, config, stats).await,
        Method::Play => play(session, config, stats),
        Method::Teardown => {
            session.stop();
            ServerStats::bump(&stats.teardowns);
            status(StatusCode::Ok)
        }
        _ => status(StatusCode::NotImplemented),
    }
}

#[expect(
    clippy::similar_names,
    reason = "RTP and RTCP are the protocol's names"
)]
async fn setup(
    request: &Request<Vec<u8>>,
    session: &mut Session,
    peer: SocketAddr,
    local: SocketAddr,
    config: &Arc<ServerConfig>,
    stats: &Arc<ServerStats>,
) -> Answer {
    let Some(track) = track_of(request.request_uri(), config).filter(|&t| t < config.tracks.max(1))
    else {
        return status(StatusCode::NotFound);
    };
    if !session.playing.is_empty() {
        return status(StatusCode::MethodNotValidInThisState);
    }
    let Some(requested) = request
        .header(&headers::TRANSPORT)
        .and_then(|value| transport::parse_request(value.as_str()).ok())
    else {
        return status(StatusCode::UnsupportedTransport);
    };
    let media_ip: IpAddr = config.media_from.unwrap_or(local.ip());
    let Ok((rtp, rtcp)) = stream::bind_pair(media_ip).await else {
        return status(StatusCode::InternalServerError);
    };
    let (Ok(rtp_addr), Ok(rtcp_addr)) = (rtp.local_addr(), rtcp.local_addr()) else {
        return status(StatusCode::InternalServerError);
    };
    let id = session
        .id
        .get_or_insert_with(|| format!("{:08X}", random_u32()))
        .clone();
    let ssrc = random_u32();
    let first_sequence = u16::try_from(random_u32() >> 16).unwrap_or(0);
    let first_timestamp = random_u32();
    let (client_rtp, client_rtcp) = requested.client_port;
    let reply = transport::server_reply(
        requested.client_port,
        (rtp_addr.port(), rtcp_addr.port()),
        media_ip,
        ssrc,
    );
    info!(%peer, track, %reply, "SETUP");
    let url = request
        .request_uri()
        .map(Url::as_str)
        .unwrap_or_default()
        .to_owned();
    session.tracks.insert(
        track,
        Track {
            stream: Some(stream::Stream {
                rtp,
                rtcp,
                // Media goes to the RTSP peer's address: servers commonly refuse any other.
                client_rtp: SocketAddr::new(peer.ip(), client_rtp),
                client_rtcp: SocketAddr::new(peer.ip(), client_rtcp),
                ssrc,
                first_sequence,
                first_timestamp,
                track,
                config: Arc::clone(config),
                stats: Arc::clone(stats),
            }),
            rtp_info: format!("url={url};seq={first_sequence};rtptime={first_timestamp}"),
        },
    );
    (
        StatusCode::Ok,
        vec![
            (headers::TRANSPORT, reply),
            (headers::SESSION, format!("{id};timeout=60")),
        ],
        Vec::new(),
    )
}

fn play(session: &mut Session, config: &ServerConfig, stats: &Arc<ServerStats>) -> Answer {
    if session.id.is_none() || session.tracks.is_empty() {
        return status(StatusCode::MethodNotValidInThisState);
    }
    let mut rtp_info = Vec::new();
    for track in session.tracks.values_mut() {
        rtp_info.push(track.rtp_info.clone());
        if let Some(stream) = track.stream.take() {
            session.playing.push(tokio::spawn(stream.run()));
        }
    }
    ServerStats::bump(&stats.plays);
    let id = session.id.clone().unwrap_or_default();
    (
        StatusCode::Ok,
        vec![
            (
                headers::RANGE,
                format!("npt=0.000-{:.3}", config.audio.duration().as_secs_f64()),
            ),
            (headers::RTP_INFO, rtp_info.join(",")),
            (headers::SESSION, format!("{id};timeout=60")),
        ],
        Vec::new(),
    )
}
