//! The one error type of the SOCKS codecs: malformed or unencodable messages.

use super::codec::ReplyCode;

/// A message that is not valid SOCKS5 / RFC 1929 / enhanced-mode wire format.
///
/// Decoders return it for malformed input (the connection should then be closed, after the reply
/// given by [`ProtocolError::reply_code`] where there is one). Encoders return it for messages that
/// cannot be put on the wire (a domain name longer than 255 octets, ...). A decoder that fails
/// consumes nothing from its buffer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The version octet is not the one this message must carry (`05` for SOCKS5, `01` for the
    /// enhanced-mode entry reply).
    #[error("unexpected protocol version {0:#04x}")]
    WrongVersion(u8),
    /// The RFC 1929 sub-negotiation version is not `01`.
    #[error("unexpected username/password sub-negotiation version {0:#04x} (expected 0x01)")]
    WrongAuthVersion(u8),
    /// A greeting with `NMETHODS = 0`.
    #[error("greeting offers no authentication method")]
    ZeroMethods,
    /// A greeting to encode lists more than 255 methods.
    #[error("greeting lists {0} methods, at most 255 fit")]
    TooManyMethods(usize),
    /// A request `CMD` other than `01`..`04` (reply `07`).
    #[error("unknown command {0:#04x}")]
    UnknownCommand(u8),
    /// An `ATYP` other than `01`, `03`, `04` (reply `08`).
    #[error("unknown address type {0:#04x}")]
    UnknownAddressType(u8),
    /// A reserved field that must be zero is not.
    #[error("reserved field is {0:#06x}, must be zero")]
    BadReserved(u16),
    /// A domain name of length 0.
    #[error("empty domain name")]
    EmptyDomain,
    /// A domain name to encode is longer than 255 octets.
    #[error("domain name of {0} octets, at most 255 fit")]
    DomainTooLong(usize),
    /// A domain name that is not UTF-8 or contains control characters.
    #[error("domain name is not UTF-8 text without control characters")]
    InvalidDomain,
    /// An RFC 1929 request with `ULEN = 0`.
    #[error("empty username")]
    EmptyUsername,
    /// An RFC 1929 request with `PLEN = 0`.
    #[error("empty password")]
    EmptyPassword,
    /// A username or password to encode is longer than 255 octets.
    #[error("{field} of {len} octets, at most 255 fit")]
    CredentialTooLong {
        /// `"username"` or `"password"`.
        field: &'static str,
        /// The length that did not fit.
        len: usize,
    },
    /// A SOCKS5 reply with a `REP` above `08`.
    #[error("unknown reply code {0:#04x}")]
    UnknownReplyCode(u8),
    /// A datagram too short for the header it must carry.
    #[error("datagram too short for its header")]
    Truncated,
    /// An enhanced-mode entry reply that is neither `01 00 ...` (entered) nor `05 REP ...` with a
    /// non-zero `REP` (refused).
    #[error("invalid enhanced-mode entry reply: version {version:#04x}, reply code {code:#04x}")]
    BadEntryReply {
        /// The first octet.
        version: u8,
        /// The second octet.
        code: u8,
    },
    /// An enhanced-mode `PKT TYPE` other than `01`, `02`, `03`.
    #[error("unknown packet type {0:#04x}")]
    UnknownPacketType(u8),
    /// An enhanced-mode `UDPCMD` other than `05`, `06`, `07`.
    #[error("unknown UDP command {0:#04x}")]
    UnknownUdpCommand(u8),
    /// An enhanced-mode reply code that is not defined.
    #[error("unknown enhanced-mode reply code {0:#04x}")]
    UnknownEnhancedReplyCode(u8),
    /// A `SIZE` that no packet of this type can have (too small or too large).
    #[error("packet SIZE {size} outside {min}..={max}")]
    SizeOutOfRange {
        /// The declared size.
        size: u16,
        /// The smallest valid size.
        min: u16,
        /// The largest valid size.
        max: u16,
    },
    /// A control packet whose fields do not end exactly at `SIZE`.
    #[error("packet SIZE {0} does not match its contents")]
    SizeMismatch(u16),
    /// A datagram payload too large for its 16-bit `SIZE` field.
    #[error("payload of {0} octets does not fit the SIZE field")]
    PayloadTooLarge(usize),
}

impl ProtocolError {
    /// The RFC 1928 reply to send when this error came from decoding a request, if one applies.
    ///
    /// `None` means "close without a reply": the peer does not speak SOCKS5 (wrong version), the
    /// error belongs to another phase (greeting, authentication, enhanced mode), or it can only
    /// come from an encoder.
    pub fn reply_code(&self) -> Option<ReplyCode> {
        match self {
            Self::UnknownCommand(_) => Some(ReplyCode::CommandNotSupported),
            Self::UnknownAddressType(_) => Some(ReplyCode::AddressTypeNotSupported),
            Self::BadReserved(_) | Self::EmptyDomain | Self::InvalidDomain => {
                Some(ReplyCode::GeneralFailure)
            }
            Self::WrongVersion(_)
            | Self::WrongAuthVersion(_)
            | Self::ZeroMethods
            | Self::TooManyMethods(_)
            | Self::DomainTooLong(_)
            | Self::EmptyUsername
            | Self::EmptyPassword
            | Self::CredentialTooLong { .. }
            | Self::UnknownReplyCode(_)
            | Self::Truncated
            | Self::BadEntryReply { .. }
            | Self::UnknownPacketType(_)
            | Self::UnknownUdpCommand(_)
            | Self::UnknownEnhancedReplyCode(_)
            | Self::SizeOutOfRange { .. }
            | Self::SizeMismatch(_)
            | Self::PayloadTooLarge(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_codes_for_request_errors() {
        assert_eq!(
            ProtocolError::UnknownCommand(9).reply_code(),
            Some(ReplyCode::CommandNotSupported)
        );
        assert_eq!(
            ProtocolError::UnknownAddressType(2).reply_code(),
            Some(ReplyCode::AddressTypeNotSupported)
        );
        for e in [
            ProtocolError::BadReserved(1),
            ProtocolError::EmptyDomain,
            ProtocolError::InvalidDomain,
        ] {
            assert_eq!(e.reply_code(), Some(ReplyCode::GeneralFailure), "{e}");
        }
        assert_eq!(ProtocolError::WrongVersion(4).reply_code(), None);
        assert_eq!(ProtocolError::ZeroMethods.reply_code(), None);
        assert_eq!(ProtocolError::SizeMismatch(27).reply_code(), None);
    }

    #[test]
    fn messages_name_the_octet() {
        assert_eq!(
            ProtocolError::UnknownCommand(0x09).to_string(),
            "unknown command 0x09"
        );
        assert_eq!(
            ProtocolError::BadReserved(1).to_string(),
            "reserved field is 0x0001, must be zero"
        );
    }
}
