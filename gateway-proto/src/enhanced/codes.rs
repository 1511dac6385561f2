//! The enhanced mode's code points: packet types, UDP commands, reply codes and FLAGS.

use std::fmt;
use std::ops::{BitAnd, BitOr, BitOrAssign, Sub};

use crate::ProtocolError;
use crate::codec::ReplyCode;
use crate::wire::byte_enum;

byte_enum! {
    /// `PKT TYPE`: the first octet of everything on the connection after entering the mode.
    pub enum PacketType (unknown: ProtocolError::UnknownPacketType) {
        /// `01`: control request, client to server.
        Request = 0x01,
        /// `02`: control reply, server to client.
        Reply = 0x02,
        /// `03`: TCP-encapsulated datagram, either way.
        TcpDatagram = 0x03,
    }
}

byte_enum! {
    /// `UDPCMD` of a control request.
    pub enum UdpCommand (unknown: ProtocolError::UnknownUdpCommand) {
        /// `05`: UDP BIND (step 1, step 2, or a one-step Open; protocol.md section 4).
        Bind = 0x05,
        /// `06`: UDP RELEASE of the binding named by AID.
        Release = 0x06,
        /// `07`: SET TTL (multicast send; TTL in RSVD).
        SetTtl = 0x07,
    }
}

byte_enum! {
    /// `REPLY` of a control reply: the RFC 1928 codes, the draft's `10`..`15` and ours `16`, `17`.
    pub enum EnhancedReplyCode (unknown: ProtocolError::UnknownEnhancedReplyCode) {
        /// `00`: succeeded.
        Succeeded = 0x00,
        /// `01`: general failure (also: over a cap, nothing reserved).
        GeneralFailure = 0x01,
        /// `02`: not allowed by ruleset.
        NotAllowed = 0x02,
        /// `03`: network unreachable.
        NetworkUnreachable = 0x03,
        /// `04`: host unreachable.
        HostUnreachable = 0x04,
        /// `05`: connection refused.
        ConnectionRefused = 0x05,
        /// `06`: TTL expired.
        TtlExpired = 0x06,
        /// `07`: command not supported.
        CommandNotSupported = 0x07,
        /// `08`: address type not supported.
        AddressTypeNotSupported = 0x08,
        /// `10`: bad association id.
        BadAssociationId = 0x10,
        /// `11`: multicast receive not allowed.
        MulticastReceiveNotAllowed = 0x11,
        /// `12`: multicast send not allowed.
        MulticastSendNotAllowed = 0x12,
        /// `13`: bad association context.
        BadAssociationContext = 0x13,
        /// `14`: bad multicast address.
        BadMulticastAddress = 0x14,
        /// `15`: TTL not allowed.
        TtlNotAllowed = 0x15,
        /// `16` (ours): no aligned RTP/RTCP port pair is free.
        PortPairUnavailable = 0x16,
        /// `17` (ours): the half-bound binding expired before step 2.
        TwoStepBindingExpired = 0x17,
    }
}

impl From<ReplyCode> for EnhancedReplyCode {
    fn from(code: ReplyCode) -> Self {
        match code {
            ReplyCode::Succeeded => Self::Succeeded,
            ReplyCode::GeneralFailure => Self::GeneralFailure,
            ReplyCode::NotAllowed => Self::NotAllowed,
            ReplyCode::NetworkUnreachable => Self::NetworkUnreachable,
            ReplyCode::HostUnreachable => Self::HostUnreachable,
            ReplyCode::ConnectionRefused => Self::ConnectionRefused,
            ReplyCode::TtlExpired => Self::TtlExpired,
            ReplyCode::CommandNotSupported => Self::CommandNotSupported,
            ReplyCode::AddressTypeNotSupported => Self::AddressTypeNotSupported,
        }
    }
}

/// `FLAGS` of a control packet, a 16-bit set. Unknown bits are kept as they came; whether to
/// refuse them is the state machine's decision ([`Flags::unknown_bits`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Flags(u16);

impl Flags {
    /// `0001`: receive.
    pub const RECEIVE: Self = Self(0x0001);
    /// `0002`: send.
    pub const SEND: Self = Self(0x0002);
    /// `0004`: UDP unicast.
    pub const UNICAST: Self = Self(0x0004);
    /// `0008`: datagrams TCP-encapsulated on the control connection.
    pub const TCP_ENCAPSULATED: Self = Self(0x0008);
    /// `0010`: multicast.
    pub const MULTICAST: Self = Self(0x0010);
    /// `0020`: multicast-to-unicast mode.
    pub const MULTICAST_TO_UNICAST: Self = Self(0x0020);
    /// `0040`: multicast-to-multicast mode.
    pub const MULTICAST_TO_MULTICAST: Self = Self(0x0040);
    /// `0080` (ours): set by the server in a step-1 reply; the binding awaits its REMOTE.
    pub const REMOTE_PENDING: Self = Self(0x0080);
    /// `0100` (ours): one binding, two flows (RTP on the even port, RTCP on the next).
    pub const RTP_PAIR: Self = Self(0x0100);
    /// `0200` (ours): header-less delivery for an Open binding; echoed in the reply only when
    /// granted (a client not granted it uses the header).
    pub const RAW: Self = Self(0x0200);
    /// Every flag defined above.
    pub const KNOWN: Self = Self(0x03FF);

    const NAMES: [(Self, &'static str); 10] = [
        (Self::RECEIVE, "RECEIVE"),
        (Self::SEND, "SEND"),
        (Self::UNICAST, "UNICAST"),
        (Self::TCP_ENCAPSULATED, "TCP_ENCAPSULATED"),
        (Self::MULTICAST, "MULTICAST"),
        (Self::MULTICAST_TO_UNICAST, "MULTICAST_TO_UNICAST"),
        (Self::MULTICAST_TO_MULTICAST, "MULTICAST_TO_MULTICAST"),
        (Self::REMOTE_PENDING, "REMOTE_PENDING"),
        (Self::RTP_PAIR, "RTP_PAIR"),
        (Self::RAW, "RAW"),
    ];

    /// No flag.
    pub const fn empty() -> Self {
        Self(0)
    }

    /// The flags of a 16-bit field, unknown bits included.
    pub const fn from_bits_retain(bits: u16) -> Self {
        Self(bits)
    }

    /// The 16-bit field.
    pub const fn bits(self) -> u16 {
        self.0
    }

    /// Whether every flag of `other` is set.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether any flag of `other` is set.
    pub const fn intersects(self, other: Self) -> bool {
        self.0 & other.0 != 0
    }

    /// Whether no flag is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The bits that are not in [`Flags::KNOWN`].
    pub const fn unknown_bits(self) -> u16 {
        self.0 & !Self::KNOWN.0
    }

    /// Sets the flags of `other`.
    pub fn insert(&mut self, other: Self) {
        self.0 |= other.0;
    }

    /// Clears the flags of `other`.
    pub fn remove(&mut self, other: Self) {
        self.0 &= !other.0;
    }
}

impl BitOr for Flags {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

impl BitOrAssign for Flags {
    fn bitor_assign(&mut self, rhs: Self) {
        self.0 |= rhs.0;
    }
}

impl BitAnd for Flags {
    type Output = Self;
    fn bitand(self, rhs: Self) -> Self {
        Self(self.0 & rhs.0)
    }
}

impl Sub for Flags {
    type Output = Self;
    /// The flags of `self` that are not in `rhs`.
    fn sub(self, rhs: Self) -> Self {
        Self(self.0 & !rhs.0)
    }
}

impl fmt::Debug for Flags {
    /// `Flags(RECEIVE | SEND | 0x8000)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Flags(")?;
        let mut first = true;
        let mut sep = |f: &mut fmt::Formatter<'_>| {
            if !std::mem::take(&mut first) {
                f.write_str(" | ")?;
            }
            Ok(())
        };
        for (flag, name) in Self::NAMES {
            if self.contains(flag) {
                sep(f)?;
                f.write_str(name)?;
            }
        }
        if self.unknown_bits() != 0 {
            sep(f)?;
            write!(f, "{:#06x}", self.unknown_bits())?;
        }
        f.write_str(")")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_packet_type_and_command() {
        for (&kind, octet) in PacketType::ALL.iter().zip(1..) {
            assert_eq!(kind.to_u8(), octet);
            assert_eq!(PacketType::try_from(octet), Ok(kind));
        }
        for (&command, octet) in UdpCommand::ALL.iter().zip(5..) {
            assert_eq!(u8::from(command), octet);
            assert_eq!(UdpCommand::try_from(octet), Ok(command));
        }
        for octet in [0x00, 0x04, 0xFF] {
            assert_eq!(
                PacketType::try_from(octet),
                Err(ProtocolError::UnknownPacketType(octet))
            );
        }
        for octet in [0x00, 0x01, 0x04, 0x08] {
            assert_eq!(
                UdpCommand::try_from(octet),
                Err(ProtocolError::UnknownUdpCommand(octet))
            );
        }
    }

    #[test]
    fn every_reply_code() {
        let defined: Vec<u8> = (0x00..=0x08).chain(0x10..=0x17).collect();
        assert_eq!(EnhancedReplyCode::ALL.len(), defined.len());
        for (&code, &octet) in EnhancedReplyCode::ALL.iter().zip(&defined) {
            assert_eq!(code.to_u8(), octet);
            assert_eq!(EnhancedReplyCode::try_from(octet), Ok(code));
        }
        for octet in (0x09..=0x0F).chain(0x18..=0xFF) {
            assert_eq!(
                EnhancedReplyCode::try_from(octet),
                Err(ProtocolError::UnknownEnhancedReplyCode(octet))
            );
        }
        assert_eq!(EnhancedReplyCode::PortPairUnavailable.to_u8(), 0x16);
        assert_eq!(EnhancedReplyCode::TwoStepBindingExpired.to_u8(), 0x17);
        assert_eq!(EnhancedReplyCode::BadAssociationContext.to_u8(), 0x13);
    }

    #[test]
    fn plain_reply_codes_keep_their_octet() {
        for &code in ReplyCode::ALL {
            assert_eq!(EnhancedReplyCode::from(code).to_u8(), code.to_u8());
        }
    }

    #[test]
    fn flag_values() {
        let values = [
            (Flags::RECEIVE, 0x0001),
            (Flags::SEND, 0x0002),
            (Flags::UNICAST, 0x0004),
            (Flags::TCP_ENCAPSULATED, 0x0008),
            (Flags::MULTICAST, 0x0010),
            (Flags::MULTICAST_TO_UNICAST, 0x0020),
            (Flags::MULTICAST_TO_MULTICAST, 0x0040),
            (Flags::REMOTE_PENDING, 0x0080),
            (Flags::RTP_PAIR, 0x0100),
            (Flags::RAW, 0x0200),
        ];
        let mut all = Flags::empty();
        for (flag, bits) in values {
            assert_eq!(flag.bits(), bits);
            all |= flag;
        }
        assert_eq!(all, Flags::KNOWN);
        assert_eq!(Flags::KNOWN.unknown_bits(), 0);
    }

    #[test]
    fn flag_operations() {
        let mut f = Flags::RECEIVE | Flags::SEND | Flags::UNICAST;
        assert_eq!(f.bits(), 0x0007);
        assert!(f.contains(Flags::RECEIVE | Flags::SEND));
        assert!(!f.contains(Flags::RECEIVE | Flags::RTP_PAIR));
        assert!(f.intersects(Flags::SEND | Flags::RTP_PAIR));
        f.insert(Flags::REMOTE_PENDING);
        assert_eq!(f.bits(), 0x0087);
        f.remove(Flags::REMOTE_PENDING);
        assert_eq!(f - Flags::SEND, Flags::RECEIVE | Flags::UNICAST);
        assert_eq!(f & Flags::SEND, Flags::SEND);
        assert!(Flags::default().is_empty());
        let odd = Flags::from_bits_retain(0x8001);
        assert_eq!(odd.unknown_bits(), 0x8000);
        assert_eq!(odd.bits(), 0x8001);
    }

    #[test]
    fn flags_debug() {
        assert_eq!(format!("{:?}", Flags::empty()), "Flags()");
        assert_eq!(
            format!("{:?}", Flags::from_bits_retain(0x8083)),
            "Flags(RECEIVE | SEND | REMOTE_PENDING | 0x8000)"
        );
    }
}
