//! The errors of the RTSP module: [`ParseError`] for bytes that are not what they claim to be
//! (pure parsers), [`RtspError`] for a client session that could not be played, each saying what
//! failed and, where it helps, what to do about it.

use std::{io, path::PathBuf, time::Duration};

use thiserror::Error;

use super::audio::AudioError;
use gateway_client::{BindingError, ClientError};

/// A message, header, description or packet that does not parse. Never a panic: hostile input
/// ends here.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ParseError {
    /// A malformed RTP packet.
    #[error("malformed RTP packet: {0}")]
    Rtp(&'static str),
    /// A malformed RTCP packet.
    #[error("malformed RTCP packet: {0}")]
    Rtcp(&'static str),
    /// Bytes on the control connection that are not an RTSP message (their start, escaped).
    #[error("malformed RTSP message starting {0:?}")]
    Message(String),
    /// An RTSP message (headers and body) larger than the limit.
    #[error("RTSP message larger than {0} octets")]
    TooLarge(usize),
    /// A header that is missing or does not parse.
    #[error("RTSP {name} header {value:?}: {reason}")]
    Header {
        /// The header.
        name: &'static str,
        /// Its value (cut to 200 characters).
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// A session description that does not parse or describes nothing playable.
    #[error("SDP: {0}")]
    Sdp(String),
    /// An RTSP URL that does not parse or names no host.
    #[error("URL {url:?}: {reason}")]
    Url {
        /// The URL as given.
        url: String,
        /// What is wrong.
        reason: String,
    },
}

/// What an operator can do about a refused multicast subscription.
fn multicast_hint(refusal: BindingError) -> &'static str {
    match refusal {
        BindingError::MulticastReceiveNotAllowed => {
            "; the gateway's policy does not allow receiving this group (or it has no multicast \
             support): allow it with --allow-multicast-receive PREFIX"
        }
        BindingError::BadMulticastAddress => {
            "; the group is not a multicast address or lies outside the gateway's policy"
        }
        BindingError::NotAllowed => {
            "; multicast-to-unicast may be disabled (--multicast-modes), or this client is not \
             allowed"
        }
        _ => "",
    }
}

impl ParseError {
    /// [`ParseError::Header`], the value cut short.
    pub(crate) fn header(name: &'static str, value: &str, reason: impl Into<String>) -> Self {
        Self::Header {
            name,
            value: value.chars().take(200).collect(),
            reason: reason.into(),
        }
    }
}

/// Why `rtsp-get` (see [`super::client::play`]) failed.
#[derive(Debug, Error)]
pub enum RtspError {
    /// A request to the gateway failed (connect, authentication, CONNECT, a binding step).
    #[error("gateway: {operation}: {error}")]
    Gateway {
        /// What was being done.
        operation: String,
        /// The client library's error (its text is part of this one's).
        error: ClientError,
    },
    /// The step 2 came too late: the gateway had expired the half-bound binding (`17`).
    #[error(
        "track {track}: the two-step binding expired before step 2 (gateway reply 17): the SETUP \
         exchange took longer than the gateway's pending timeout"
    )]
    BindingExpired {
        /// The track's index in the SDP.
        track: usize,
    },
    /// The enhanced-mode control connection ended while media was flowing.
    #[error("track {track}: the binding ended while receiving: {reason}")]
    BindingLost {
        /// The track's index in the SDP.
        track: usize,
        /// Why.
        reason: String,
    },
    /// The RTSP server answered a request with a non-2xx status.
    #[error("the RTSP server refused {method}: {status} {reason}")]
    Refused {
        /// The request method.
        method: &'static str,
        /// The status code.
        status: u16,
        /// The reason phrase.
        reason: String,
    },
    /// The SETUP reply names no source ports, so the binding cannot be confirmed exactly.
    #[error(
        "track {track}: the SETUP reply names no source ports (no server_port or src_addr in \
         Transport {transport:?}); the gateway admits a stream only from a named source port"
    )]
    NoSourcePorts {
        /// The track's index in the SDP.
        track: usize,
        /// The reply's Transport header (empty if there was none).
        transport: String,
    },
    /// Multicast was asked for (`--multicast`), and the SETUP reply is not a multicast
    /// transport.
    #[error(
        "track {track}: multicast was asked for, but the RTSP server answered with a unicast \
         transport (Transport {transport:?}); play without --multicast, or configure the server \
         for multicast"
    )]
    UnicastAnswer {
        /// The track's index in the SDP.
        track: usize,
        /// The reply's Transport header (empty if there was none).
        transport: String,
    },
    /// The gateway refused to subscribe to the group the SETUP reply named.
    #[error(
        "track {track}: the gateway refused the multicast subscription to {group} \
         (multicast-to-unicast): {refusal}{hint}",
        hint = multicast_hint(*.refusal)
    )]
    MulticastRefused {
        /// The track's index in the SDP.
        track: usize,
        /// The group and port.
        group: std::net::SocketAddr,
        /// The gateway's reply code.
        refusal: BindingError,
    },
    /// PLAY succeeded but no RTP packet came.
    #[error(
        "track {track}: no RTP packet within {after:?} after PLAY: the stream never started (the \
         binding admits only {admitted} and the next port)"
    )]
    NeverStarted {
        /// The track's index in the SDP.
        track: usize,
        /// How long it waited.
        after: Duration,
        /// The RTP source the binding was confirmed with.
        admitted: String,
    },
    /// The RTSP server did not answer in time.
    #[error("no answer to {method} within {after:?}")]
    Timeout {
        /// The request method.
        method: &'static str,
        /// How long it waited.
        after: Duration,
    },
    /// The RTSP server closed the control connection.
    #[error("the RTSP server closed the control connection while {0} was pending")]
    Closed(&'static str),
    /// An answer that does not parse, or an SDP without anything to play.
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// Writing the received audio failed.
    #[error(transparent)]
    Audio(#[from] AudioError),
    /// The password file could not be read.
    #[error("password file {path}: {error}")]
    PasswordFile {
        /// The file.
        path: PathBuf,
        /// Why.
        error: io::Error,
    },
    /// A socket error on the control connection, or no runtime could be started.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multicast_errors_say_what_happened_and_what_to_do() {
        let unicast = RtspError::UnicastAnswer {
            track: 0,
            transport: "RTP/AVP;unicast;server_port=6000-6001".to_owned(),
        }
        .to_string();
        assert!(
            unicast.contains("answered with a unicast transport"),
            "{unicast}"
        );
        assert!(unicast.contains("server_port=6000-6001"), "{unicast}");
        let group = "233.252.0.10:5000".parse().unwrap();
        let refused = RtspError::MulticastRefused {
            track: 1,
            group,
            refusal: BindingError::MulticastReceiveNotAllowed,
        }
        .to_string();
        assert_eq!(
            refused,
            "track 1: the gateway refused the multicast subscription to 233.252.0.10:5000 \
             (multicast-to-unicast): multicast receive not allowed (11); the gateway's policy \
             does not allow receiving this group (or it has no multicast support): allow it \
             with --allow-multicast-receive PREFIX"
        );
        let bad = RtspError::MulticastRefused {
            track: 1,
            group,
            refusal: BindingError::BadMulticastAddress,
        }
        .to_string();
        assert!(bad.contains("bad multicast address (14)"), "{bad}");
        let other = RtspError::MulticastRefused {
            track: 1,
            group,
            refusal: BindingError::GeneralFailure,
        }
        .to_string();
        assert!(other.ends_with("(01)"), "{other}");
    }
}
