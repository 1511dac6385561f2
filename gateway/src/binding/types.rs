//! Domain types of the binding state machine: requests, reply codes, errors and the decisions
//! (replies, kernel entries, port reservations) it hands back.
//!
//! Owns the vocabulary only. It must not depend on the SOCKS codec (`gateway_proto`): the glue maps
//! between the wire types and these. No I/O, no clock.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

/// Flag bits of a UDP BIND request or reply (protocol.md section 3).
pub mod flags {
    /// `0001`: the client receives datagrams from the remote.
    pub const RECEIVE: u16 = 0x0001;
    /// `0002`: the client sends datagrams to the remote.
    pub const SEND: u16 = 0x0002;
    /// `0004`: UDP unicast.
    pub const UNICAST: u16 = 0x0004;
    /// `0008`: datagrams travel TCP-encapsulated on the control connection.
    pub const TCP_ENCAPSULATED: u16 = 0x0008;
    /// `0010`: multicast: REMOTE is a group and port.
    pub const MULTICAST: u16 = 0x0010;
    /// `0020`: multicast-to-unicast mode (each subscriber gets the group's datagrams as unicast
    /// with its AID in the header).
    pub const MULTICAST_TO_UNICAST: u16 = 0x0020;
    /// `0040`: multicast-to-multicast mode (the group is re-sent inside, TTL 1, no header).
    pub const MULTICAST_TO_MULTICAST: u16 = 0x0040;
    /// Both mode bits.
    pub const MULTICAST_MODES: u16 = MULTICAST_TO_UNICAST | MULTICAST_TO_MULTICAST;
    /// `0080`: set by the server in a step-1 reply; ignored in requests.
    pub const REMOTE_PENDING: u16 = 0x0080;
    /// `0100`: one binding, two flows on aligned port pairs (RTP on P, RTCP on P+1).
    pub const RTP_PAIR: u16 = 0x0100;
    /// `0200`: header-less delivery for an Open binding; kept in a binding's flags (and echoed)
    /// only when granted.
    pub const RAW: u16 = 0x0200;

    /// The direction bits; a step 2 may only narrow these.
    pub const DIRECTIONS: u16 = RECEIVE | SEND;
    /// Every multicast-related bit.
    pub const MULTICAST_ANY: u16 = MULTICAST | MULTICAST_TO_UNICAST | MULTICAST_TO_MULTICAST;
    /// Every bit this gateway knows; a request with any other bit gets `13`.
    pub const KNOWN: u16 = RECEIVE
        | SEND
        | UNICAST
        | TCP_ENCAPSULATED
        | MULTICAST_ANY
        | REMOTE_PENDING
        | RTP_PAIR
        | RAW;
}

/// Identifies one control connection for the lifetime of the gateway (never reused).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

pub use gateway_proto::Family;

/// The REMOTE of a UDP BIND request, after any domain name was resolved by the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Remote {
    /// `0.0.0.0:0` or `[::]:0`: step 1, or step 2 as UDP Listen.
    Unspecified(Family),
    /// A specific address. `Exact` with an unspecified address and port 0 is read as
    /// [`Remote::Unspecified`]; a specific address with port 0 is a host-level match.
    Exact(SocketAddr),
}

/// One UDP BIND request as decoded from the control connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BindRequest {
    /// Transaction id chosen by the client; 0 means "not two-step".
    pub tid: u16,
    /// Association id from an earlier reply, or 0.
    pub aid: u32,
    /// Where the client sends from and receives on; port 0 means "latch from the first datagram".
    pub local: SocketAddr,
    /// The remote peer, or unspecified.
    pub remote: Remote,
    /// Request flags, see [`flags`].
    pub flags: u16,
    /// RSVD: the TTL of a multicast send binding (ignored otherwise).
    pub ttl: u8,
}

/// The reply codes a UDP BIND or UDP RELEASE can get (protocol.md sections 1 and 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ReplyCode {
    /// `00`: succeeded.
    Ok = 0x00,
    /// `01`: general failure (caps, exhausted ports or AIDs).
    GeneralFailure = 0x01,
    /// `02`: not allowed by the ruleset.
    NotAllowed = 0x02,
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
    /// `14`: not a multicast address, or a group outside every allowed prefix.
    BadMulticastAddress = 0x14,
    /// `15`: TTL not allowed (0, or over the configured maximum).
    TtlNotAllowed = 0x15,
    /// `16`: no aligned port pair free.
    PortPairUnavailable = 0x16,
    /// `17`: the two-step binding expired.
    TwoStepBindingExpired = 0x17,
}

impl ReplyCode {
    /// The octet on the wire.
    pub fn as_u8(self) -> u8 {
        self as u8
    }
}

/// Why a UDP BIND or UDP RELEASE was refused. Every variant maps to exactly one [`ReplyCode`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BindError {
    /// Too many half-bound bindings on this control connection.
    #[error("too many half-bound bindings on this connection")]
    ConnectionCap,
    /// Too many half-bound bindings for this user.
    #[error("too many half-bound bindings for this user")]
    UserCap,
    /// Too many bindings on the gateway.
    #[error("too many bindings on the gateway")]
    TotalCap,
    /// No relay port free on the internal or the external side.
    #[error("no relay port free")]
    PortsExhausted,
    /// No unused association id found within a bounded number of draws.
    #[error("no unused association id found")]
    AidsExhausted,
    /// LOCAL's address is not the control connection's peer address.
    #[error("LOCAL address is not the control connection's peer address")]
    LocalNotPeer,
    /// A specific REMOTE with port 0 and host-level matching not allowed.
    #[error("REMOTE port 0 (host-level match) not allowed")]
    RemotePortZero,
    /// REMOTE is one of the forbidden networks.
    #[error("REMOTE is in a forbidden network")]
    RemoteForbidden,
    /// UDP Listen is not allowed by policy.
    #[error("UDP Listen not allowed")]
    ListenNotAllowed,
    /// No relay address configured for this family.
    #[error("no relay address of this family")]
    FamilyNotSupported,
    /// A step-2 REMOTE of another family than step 1's.
    #[error("step-2 REMOTE of another family than step 1")]
    FamilyMismatch,
    /// The AID is not a live binding of this connection.
    #[error("unknown association id")]
    UnknownAid,
    /// The AID and the TID name different bindings.
    #[error("AID and TID name different bindings")]
    AidTidMismatch,
    /// A multicast receive the policy does not allow (none allowed, or not in this mode).
    #[error("multicast receive not allowed")]
    MulticastReceive,
    /// A multicast send the policy does not allow.
    #[error("multicast send not allowed")]
    MulticastSend,
    /// The source named for a multicast receive is not a unicast address of the group's
    /// family with port 0.
    #[error("a multicast source must be a unicast address of the group's family, port 0")]
    BadMulticastSource,
    /// The source named for a multicast receive is not on the group's source list.
    #[error("the source is not on the group's source list")]
    MulticastSourceNotAllowed,
    /// A multicast REMOTE that is not a group and port, or a group outside every allowed
    /// prefix.
    #[error("not a multicast group, or a group outside the allowed prefixes")]
    BadMulticastAddress,
    /// A multicast send TTL of 0 or over the configured maximum.
    #[error("multicast TTL not allowed")]
    TtlNotAllowed,
    /// SET TTL on a binding that is not a multicast send binding.
    #[error("not a multicast send binding")]
    NotMulticastSend,
    /// TID 0 with an unspecified REMOTE: a step 1 needs a TID.
    #[error("TID 0 with an unspecified REMOTE")]
    TidZeroUnspecified,
    /// A confirmed binding named with another REMOTE, LOCAL or flags.
    #[error("confirmed binding named with another REMOTE, LOCAL or flags")]
    ConfirmedMismatch,
    /// A step 2 that does not repeat step 1's LOCAL.
    #[error("step 2 does not repeat step 1's LOCAL")]
    LocalChanged,
    /// A step 2 that widens the direction flags or changes any other flag.
    #[error("step 2 widens or changes the flags")]
    FlagsChanged,
    /// Neither receive nor send, or a flag bit the gateway does not know.
    #[error("bad flags")]
    BadFlags,
    /// RTP-PAIR with a port 65535 that has no successor.
    #[error("RTP-PAIR with port 65535")]
    PairPortOverflow,
    /// No aligned relay port pair free.
    #[error("no aligned relay port pair free")]
    PairUnavailable,
    /// The TID or AID names a binding that expired (a tombstone).
    #[error("two-step binding {aid} expired")]
    Expired {
        /// The AID the expired binding had.
        aid: u32,
    },
}

impl BindError {
    /// The reply code this error is answered with.
    pub fn code(self) -> ReplyCode {
        match self {
            BindError::ConnectionCap
            | BindError::UserCap
            | BindError::TotalCap
            | BindError::PortsExhausted
            | BindError::AidsExhausted => ReplyCode::GeneralFailure,
            BindError::LocalNotPeer
            | BindError::RemotePortZero
            | BindError::RemoteForbidden
            | BindError::ListenNotAllowed => ReplyCode::NotAllowed,
            BindError::FamilyNotSupported | BindError::FamilyMismatch => {
                ReplyCode::AddressTypeNotSupported
            }
            BindError::UnknownAid | BindError::AidTidMismatch => ReplyCode::BadAssociationId,
            BindError::MulticastReceive | BindError::MulticastSourceNotAllowed => {
                ReplyCode::MulticastReceiveNotAllowed
            }
            BindError::MulticastSend => ReplyCode::MulticastSendNotAllowed,
            BindError::BadMulticastAddress | BindError::BadMulticastSource => {
                ReplyCode::BadMulticastAddress
            }
            BindError::TtlNotAllowed => ReplyCode::TtlNotAllowed,
            BindError::TidZeroUnspecified
            | BindError::ConfirmedMismatch
            | BindError::LocalChanged
            | BindError::FlagsChanged
            | BindError::BadFlags
            | BindError::PairPortOverflow
            | BindError::NotMulticastSend => ReplyCode::BadAssociationContext,
            BindError::PairUnavailable => ReplyCode::PortPairUnavailable,
            BindError::Expired { .. } => ReplyCode::TwoStepBindingExpired,
        }
    }
}

/// The relay ports of one binding. For an RTP pair both ports are even and `port + 1` belongs to
/// the binding too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RelayPorts {
    /// Internal (client-side) relay address Q.
    pub internal: SocketAddr,
    /// External (remote-side) relay address P.
    pub external: SocketAddr,
    /// Whether Q+1 and P+1 belong to the binding as well.
    pub pair: bool,
}

/// Which remote senders a kernel entry admits on its external relay port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RemoteMatch {
    /// Exactly this remote ip:port (UDP Open).
    Exact(SocketAddr),
    /// Any port of this host (port-0 REMOTE, only where the configuration allows it).
    Host(IpAddr),
    /// Any remote: a relay-port-only entry (UDP Listen).
    Any,
}

/// One kernel admission entry: datagrams from `remote` to `external` belong to binding `aid`
/// and go to the client `client` via the internal relay address `internal`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelEntry {
    /// Which remote senders are admitted.
    pub remote: RemoteMatch,
    /// The external relay ip:port they send to (the map key with `remote`).
    pub external: SocketAddr,
    /// The internal relay ip:port the datagram leaves from towards the client.
    pub internal: SocketAddr,
    /// The client's address; port 0 until the relay latches it.
    pub client: SocketAddr,
    /// The binding's association id.
    pub aid: u32,
    /// The binding's confirmed flags (direction bits, TCP-encapsulated, RTP-PAIR).
    pub flags: u16,
}

/// How a group's datagrams reach a receiving client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MulticastMode {
    /// Multicast-to-unicast: to the client's LOCAL with its AID in the header.
    ToUnicast,
    /// Multicast-to-multicast: re-sent inside to the group, TTL 1, no header.
    ToMulticast,
}

impl MulticastMode {
    /// The mode's flag bit.
    pub fn flag(self) -> u16 {
        match self {
            MulticastMode::ToUnicast => flags::MULTICAST_TO_UNICAST,
            MulticastMode::ToMulticast => flags::MULTICAST_TO_MULTICAST,
        }
    }

    /// Short name for logs and reports.
    pub fn name(self) -> &'static str {
        match self {
            MulticastMode::ToUnicast => "mu",
            MulticastMode::ToMulticast => "mm",
        }
    }
}

/// One multicast binding as the relay serves it: a subscription to `group` (receive), a
/// sender to it (send), or both.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Membership {
    /// The binding's association id.
    pub aid: u32,
    /// The group address and port.
    pub group: SocketAddr,
    /// The client's LOCAL: where multicast-to-unicast delivers, where sends come from.
    pub client: SocketAddr,
    /// The internal relay address: the source of deliveries, where the client sends to.
    pub internal: SocketAddr,
    /// The external relay address: the source of the client's datagrams to the group.
    pub external: SocketAddr,
    /// How received datagrams are delivered (`None`: a send-only binding).
    pub receive: Option<MulticastMode>,
    /// The TTL of the client's datagrams to the group (`None`: a receive-only binding).
    pub send_ttl: Option<u8>,
    /// The one source a source-specific receive takes the group's datagrams from (`None`:
    /// any source the policy admits).
    pub source: Option<IpAddr>,
}

/// One effect for the caller to apply, in order, before it sends the reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Relay ports were reserved: the relay starts serving them.
    Reserve(RelayPorts),
    /// Install this kernel entry.
    Install(KernelEntry),
    /// Remove this kernel entry (it was installed by an earlier [`Action::Install`]).
    Remove(KernelEntry),
    /// Relay ports went back to the pool: the relay stops serving them.
    Free(RelayPorts),
    /// A multicast binding starts, or its TTL changed: the relay joins or updates the group.
    Subscribe(Membership),
    /// A multicast binding ends: the relay drops it (and leaves the group after the last).
    Unsubscribe(Membership),
}

/// The reply to one UDP BIND or UDP RELEASE. The caller echoes the request's TID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The reply code.
    pub code: ReplyCode,
    /// The association id (of the binding; on a refusal the request's, or the expired one's).
    pub aid: u32,
    /// Reply flags: the binding's flags, plus REMOTE-PENDING on a step 1.
    pub flags: u16,
    /// The internal relay address (reply LOCAL); `None` on a refusal or a release.
    pub internal: Option<SocketAddr>,
    /// The external relay address (reply REMOTE); `None` on a refusal or a release.
    pub external: Option<SocketAddr>,
    /// Why it was refused, if it was.
    pub error: Option<BindError>,
}

impl Reply {
    /// A refusal carrying `error`'s code.
    pub(crate) fn refused(error: BindError, aid: u32, flags: u16) -> Self {
        let aid = if let BindError::Expired { aid: expired } = error {
            expired
        } else {
            aid
        };
        Reply {
            code: error.code(),
            aid,
            flags,
            internal: None,
            external: None,
            error: Some(error),
        }
    }
}

/// What the caller must do for one input: apply `actions` in order, then send `reply`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The reply to send.
    pub reply: Reply,
    /// Effects to apply before the reply, in order.
    pub actions: Vec<Action>,
}

/// Why a binding expired.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExpiryReason {
    /// A half-bound binding got no step 2 within `pending_timeout`.
    Pending,
    /// A confirmed binding saw no datagram within `idle_timeout`.
    Idle,
}

/// A binding that expired in [`on_timeout`](super::Bindings::on_timeout). Nothing is sent to the
/// client; a tombstone answers later requests naming it with `17`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expired {
    /// The binding's control connection.
    pub conn: ConnId,
    /// The binding's association id.
    pub aid: u32,
    /// The binding's TID (0 if it was made with TID 0).
    pub tid: u16,
    /// Why it expired.
    pub reason: ExpiryReason,
    /// Effects to apply (kernel entries to remove, ports to free).
    pub actions: Vec<Action>,
}

/// The state of a live binding, as seen by the relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BindingState {
    /// Step 1 done: ports reserved, nothing admitted; expires at the given instant.
    HalfBound {
        /// When the binding expires without a step 2.
        expires: Instant,
    },
    /// Confirmed: admits what `remote` says.
    Confirmed {
        /// The admitted remote senders.
        remote: RemoteMatch,
        /// Last activity (confirmation or traffic).
        last_activity: Instant,
    },
}

/// A read-only view of one live binding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BindingInfo {
    /// The control connection that made it.
    pub conn: ConnId,
    /// Its TID (0 if made with TID 0).
    pub tid: u16,
    /// Its association id.
    pub aid: u32,
    /// The client's LOCAL (port 0 until latched).
    pub local: SocketAddr,
    /// Its flags (without REMOTE-PENDING).
    pub flags: u16,
    /// Its relay ports.
    pub ports: RelayPorts,
    /// Half-bound or confirmed.
    pub state: BindingState,
    /// The TTL of a multicast send binding (0 otherwise).
    pub ttl: u8,
}
