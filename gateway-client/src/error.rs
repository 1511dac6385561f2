//! The client library's errors: one enum for everything a call can fail with, and the typed
//! refusal of an enhanced-mode command (one variant per reply code).

use std::{io, net::SocketAddr, time::Duration};

use thiserror::Error;

use gateway_proto::{Address, ProtocolError, ReplyCode, enhanced::EnhancedReplyCode};

/// Why a call of the client library failed.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The TCP connection to the gateway could not be made.
    #[error("connect to the gateway at {proxy}: {source}")]
    Connect {
        /// The gateway's address.
        proxy: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// A network wait took longer than its bound (see [`super::Timeouts`]).
    #[error("{operation} timed out after {after:?}")]
    Timeout {
        /// What was waited for.
        operation: &'static str,
        /// The bound.
        after: Duration,
    },
    /// The gateway answered the greeting with `FF`: none of the offered methods is acceptable
    /// (anonymous access is off and no credentials were given, for instance).
    #[error("the gateway accepts none of the offered authentication methods")]
    NoAcceptableMethod,
    /// The gateway selected a method the client did not offer.
    #[error("the gateway selected authentication method {0:#04x}, which was not offered")]
    UnexpectedMethod(u8),
    /// RFC 1929: the gateway rejected the username or password (its status octet).
    #[error("the gateway rejected the username or password (status {0:#04x})")]
    BadCredentials(u8),
    /// The credentials cannot be sent (RFC 1929 lengths are 1..255 octets).
    #[error("invalid credentials: {0}")]
    InvalidCredentials(ProtocolError),
    /// The gateway refused a SOCKS5 request (CONNECT, UDP ASSOCIATE, entering the enhanced
    /// mode) with this reply code; it closes the connection.
    #[error("the gateway refused the request: {0:?} ({code:#04x})", code = .0.to_u8())]
    Refused(ReplyCode),
    /// The gateway refused an enhanced-mode command; the session stays usable.
    #[error("the gateway refused the UDP command: {0}")]
    Binding(#[from] BindingError),
    /// The gateway sent bytes that are not valid SOCKS5 / enhanced-mode wire format.
    #[error("malformed message from the gateway: {0}")]
    Protocol(#[from] ProtocolError),
    /// A well-formed reply that does not answer the request (a domain name as a relay address,
    /// another AID than the binding's).
    #[error("unexpected reply from the gateway: {0}")]
    UnexpectedReply(String),
    /// The gateway closed the connection.
    #[error("the gateway closed the connection")]
    Closed,
    /// The enhanced-mode control connection has ended; every binding made on it is gone.
    #[error("the enhanced-mode session is closed: {0}")]
    SessionClosed(String),
    /// The call does not fit the binding's state (`send` on a binding that is not connected,
    /// `bind` twice, anything after `release`).
    #[error("{operation} on a binding that is {state}")]
    WrongState {
        /// The call.
        operation: &'static str,
        /// The binding's state.
        state: &'static str,
    },
    /// `send_to` on a connected binding named another remote; a binding is never widened.
    #[error("the binding is connected to {connected}, not {requested}")]
    OtherRemote {
        /// The binding's remote.
        connected: Address,
        /// The remote asked for.
        requested: Address,
    },
    /// `connect` with an unspecified address; a binding for any remote is made with `listen`.
    #[error("connect needs a specific remote; use listen for any remote")]
    UnspecifiedRemote,
    /// Header-less delivery was asked for ([`super::BindOptions::raw`]) where it cannot work;
    /// nothing was sent. Ask without it: the header works everywhere.
    #[error("header-less (RAW) delivery cannot work here: {0}")]
    RawUnavailable(&'static str),
    /// A multicast binding named a group that is not a multicast address with a port; nothing
    /// was sent (the gateway would answer `14`).
    #[error("{0} is not a multicast group address with a port")]
    NotMulticast(SocketAddr),
    /// A multicast source that is not a unicast address of the group's family; nothing was
    /// sent (the gateway would answer `14`).
    #[error("{0} cannot be a multicast source (a unicast address of the group's family)")]
    BadSource(std::net::IpAddr),
    /// Every transaction id of this control connection is taken.
    #[error("no free transaction id on this control connection")]
    TidsExhausted,
    /// No even/odd pair of local UDP ports could be bound for an RTP pair.
    #[error("no free even/odd pair of local UDP ports on {0}")]
    NoLocalPortPair(std::net::IpAddr),
    /// A local socket operation failed.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
}

macro_rules! binding_errors {
    ($($(#[$doc:meta])* $variant:ident = $code:ident, $text:literal;)*) => {
        /// The gateway's refusal of an enhanced-mode command (UDP BIND, UDP RELEASE, SET TTL), one
        /// variant per non-zero reply code of protocol.md section 3.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Error)]
        pub enum BindingError {
            $($(#[$doc])* #[error($text)] $variant,)*
        }

        impl BindingError {
            /// The error for a reply code; `None` for `00` (success).
            pub fn from_code(code: EnhancedReplyCode) -> Option<Self> {
                match code {
                    EnhancedReplyCode::Succeeded => None,
                    $(EnhancedReplyCode::$code => Some(Self::$variant),)*
                }
            }

            /// The reply code on the wire.
            pub fn code(self) -> EnhancedReplyCode {
                match self {
                    $(Self::$variant => EnhancedReplyCode::$code,)*
                }
            }
        }
    };
}

binding_errors! {
    /// `01`: general failure, or a cap of the gateway was reached (nothing was reserved).
    GeneralFailure = GeneralFailure, "general failure or a gateway cap reached (01)";
    /// `02`: not allowed by the ruleset (a LOCAL that is not this host, a forbidden remote, a
    /// Listen binding where policy does not allow one, a host-level remote with port 0).
    NotAllowed = NotAllowed, "not allowed by the gateway's ruleset (02)";
    /// `03`: network unreachable.
    NetworkUnreachable = NetworkUnreachable, "network unreachable (03)";
    /// `04`: host unreachable (a remote name that does not resolve).
    HostUnreachable = HostUnreachable, "host unreachable (04)";
    /// `05`: connection refused.
    ConnectionRefused = ConnectionRefused, "connection refused (05)";
    /// `06`: TTL expired.
    TtlExpired = TtlExpired, "TTL expired (06)";
    /// `07`: command not supported.
    CommandNotSupported = CommandNotSupported, "command not supported (07)";
    /// `08`: address type not supported (a step-2 remote of the other family than step 1's).
    AddressTypeNotSupported = AddressTypeNotSupported, "address type not supported (08)";
    /// `10`: the AID names no live binding of this control connection.
    BadAssociationId = BadAssociationId, "bad association id (10)";
    /// `11`: multicast receive not allowed (the gateway's policy does not let this client
    /// receive the group, or the gateway has no multicast support).
    MulticastReceiveNotAllowed = MulticastReceiveNotAllowed, "multicast receive not allowed (11)";
    /// `12`: multicast send not allowed by the gateway's policy.
    MulticastSendNotAllowed = MulticastSendNotAllowed, "multicast send not allowed (12)";
    /// `13`: bad association context (another remote on a confirmed binding, a step 2 that
    /// changes LOCAL or widens the flags, TID 0 with an unspecified remote, SET TTL on a binding
    /// that is not a multicast send binding).
    BadAssociationContext = BadAssociationContext, "bad association context (13)";
    /// `14`: bad multicast address (not a multicast group, or a group outside the policy).
    BadMulticastAddress = BadMulticastAddress, "bad multicast address (14)";
    /// `15`: TTL not allowed (over the gateway's configured maximum).
    TtlNotAllowed = TtlNotAllowed, "TTL not allowed (15)";
    /// `16`: no aligned RTP/RTCP relay port pair is free.
    PortPairUnavailable = PortPairUnavailable, "no aligned RTP/RTCP port pair free (16)";
    /// `17`: the half-bound binding expired before its step 2.
    Expired = TwoStepBindingExpired, "two-step binding expired before step 2 (17)";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_code_maps_both_ways() {
        assert_eq!(BindingError::from_code(EnhancedReplyCode::Succeeded), None);
        let mut seen = 0;
        for &code in EnhancedReplyCode::ALL {
            if let Some(error) = BindingError::from_code(code) {
                assert_eq!(error.code(), code);
                seen += 1;
            }
        }
        assert_eq!(seen, EnhancedReplyCode::ALL.len() - 1);
        assert_eq!(
            BindingError::from_code(EnhancedReplyCode::TwoStepBindingExpired),
            Some(BindingError::Expired)
        );
        assert_eq!(
            BindingError::from_code(EnhancedReplyCode::BadAssociationId),
            Some(BindingError::BadAssociationId)
        );
    }

    #[test]
    fn messages_name_the_code() {
        assert_eq!(
            BindingError::PortPairUnavailable.to_string(),
            "no aligned RTP/RTCP port pair free (16)"
        );
        assert_eq!(
            ClientError::Refused(ReplyCode::NotAllowed).to_string(),
            "the gateway refused the request: NotAllowed (0x02)"
        );
    }
}
