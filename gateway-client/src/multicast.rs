//! Multicast through the gateway without I/O (protocol.md section 3, "Multicast"): the UDP BINDs
//! of a receive binding (a subscription to a group) and of a send binding, SET TTL, what their
//! replies mean, and the header check of a datagram delivered in multicast-to-unicast mode. The
//! async layer ([`super::MulticastReceiver`], [`super::MulticastSender`]) and the synchronous core
//! ([`super::blocking::Session::subscribe`]) drive these steps over their sockets.
//!
//! ```text
//! receive bind  FLAGS receive|multicast [+ MU 0020 | MM 0040]  RSVD 0    LOCAL client:port  REMOTE group:port
//!   reply       FLAGS with the chosen mode                               LOCAL internal relay (MU source)
//! send bind     FLAGS send|multicast                           RSVD TTL  LOCAL client:port  REMOTE group:port
//!   reply                                                                LOCAL internal relay (send here)
//! SET TTL       UDPCMD 07, the send binding's TID and AID, RSVD = the new TTL
//! ```
//!
//! It must not open sockets or keep state beyond what one binding is.

use std::{
    net::{IpAddr, SocketAddr},
    num::NonZeroU8,
};

use gateway_proto::{
    Address,
    enhanced::{ControlReply, ControlRequest, DatagramHeader, Flags, UdpCommand},
};

use super::{ClientError, exchange::refusal, reachable};

/// How the gateway delivers a group's datagrams to a subscribed client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MulticastMode {
    /// MU (`0020`), multicast-to-unicast: each group datagram comes to the client's unicast
    /// LOCAL from the internal relay, with the 8-octet header carrying the binding's AID.
    ToUnicast,
    /// MM (`0040`), multicast-to-multicast: the gateway re-sends the group's datagrams on its
    /// internal interface to the same group with TTL 1, without a header; the client joins the
    /// group there itself.
    ToMulticast,
}

impl MulticastMode {
    /// The mode's FLAGS bit.
    pub fn flag(self) -> Flags {
        match self {
            Self::ToUnicast => Flags::MULTICAST_TO_UNICAST,
            Self::ToMulticast => Flags::MULTICAST_TO_MULTICAST,
        }
    }

    /// The mode a reply's FLAGS name: exactly one of MU and MM, else `None`.
    pub fn of_flags(flags: Flags) -> Option<Self> {
        match (
            flags.contains(Flags::MULTICAST_TO_UNICAST),
            flags.contains(Flags::MULTICAST_TO_MULTICAST),
        ) {
            (true, false) => Some(Self::ToUnicast),
            (false, true) => Some(Self::ToMulticast),
            _ => None,
        }
    }
}

impl std::fmt::Display for MulticastMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::ToUnicast => "multicast-to-unicast (MU)",
            Self::ToMulticast => "multicast-to-multicast (MM)",
        })
    }
}

/// Which way a multicast binding carries datagrams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MulticastRole {
    /// A subscription: the group's datagrams come to the client, in this mode.
    Receive(MulticastMode),
    /// The client's datagrams go out to the group with this TTL.
    Send {
        /// The TTL the gateway sends with (SET TTL changes it).
        ttl: NonZeroU8,
    },
}

/// A multicast binding the gateway made: what its reply said.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MulticastBinding {
    /// The association id: in the header of every datagram of the binding.
    pub aid: u32,
    /// The group and port (the request's REMOTE).
    pub group: SocketAddr,
    /// The internal relay address (the reply's LOCAL): where MU datagrams come from, and where
    /// a send binding's datagrams go (with the header).
    pub relay: SocketAddr,
    /// LOCAL: the client's socket the binding was made for.
    pub local: SocketAddr,
    /// Receive (with the chosen mode) or send (with its TTL).
    pub role: MulticastRole,
    /// The binding's TID on its control connection (its SET TTL and RELEASE repeat it).
    pub(crate) tid: u16,
}

impl MulticastBinding {
    /// The chosen delivery mode of a receive binding; `None` for a send binding.
    pub fn mode(&self) -> Option<MulticastMode> {
        match self.role {
            MulticastRole::Receive(mode) => Some(mode),
            MulticastRole::Send { .. } => None,
        }
    }

    /// The TTL of a send binding; `None` for a receive binding.
    pub fn ttl(&self) -> Option<NonZeroU8> {
        match self.role {
            MulticastRole::Send { ttl } => Some(ttl),
            MulticastRole::Receive(_) => None,
        }
    }
}

/// Whether `ip` is a multicast address (an IPv4-mapped IPv6 address counting as IPv4).
fn is_multicast(ip: IpAddr) -> bool {
    ip.to_canonical().is_multicast()
}

/// The group must be a multicast address with a port: checked before anything is sent (the
/// gateway would answer `14`).
pub(crate) fn check_group(group: SocketAddr) -> Result<(), ClientError> {
    if is_multicast(group.ip()) && group.port() != 0 {
        Ok(())
    } else {
        Err(ClientError::NotMulticast(group))
    }
}

/// The FLAGS of a receive bind: receive|multicast, plus the preferred mode (none: the gateway
/// picks by its policy).
pub(crate) fn receive_flags(preference: Option<MulticastMode>) -> Flags {
    let mut flags = Flags::RECEIVE | Flags::MULTICAST;
    if let Some(mode) = preference {
        flags.insert(mode.flag());
    }
    flags
}

/// A receive bind (a subscription to `group`) with a fresh `tid`, delivering to `local`.
pub(crate) fn receive_request(
    tid: u16,
    local: SocketAddr,
    group: SocketAddr,
    preference: Option<MulticastMode>,
) -> ControlRequest {
    ControlRequest {
        command: UdpCommand::Bind,
        flags: receive_flags(preference),
        ttl: 0,
        tid,
        aid: 0,
        local: local.into(),
        remote: group.into(),
    }
}

/// The bind that makes the multicast-to-unicast receive `binding` source-specific: its TID,
/// LOCAL and FLAGS again, REMOTE = `source` with port 0 (protocol.md section 6.7).
pub(crate) fn source_request(binding: &MulticastBinding, source: IpAddr) -> ControlRequest {
    let mut flags = Flags::RECEIVE | Flags::MULTICAST;
    if let Some(mode) = binding.mode() {
        flags.insert(mode.flag());
    }
    ControlRequest {
        command: UdpCommand::Bind,
        flags,
        ttl: 0,
        tid: binding.tid,
        aid: 0,
        local: binding.local.into(),
        remote: SocketAddr::new(source, 0).into(),
    }
}

/// The source must be a unicast address of the group's family: checked before anything is
/// sent (the gateway would answer `14`), and the binding a multicast-to-unicast receive (`13`).
pub(crate) fn check_source(binding: &MulticastBinding, source: IpAddr) -> Result<(), ClientError> {
    if binding.mode() != Some(MulticastMode::ToUnicast) {
        return Err(ClientError::WrongState {
            operation: "only_from",
            state: "not a multicast-to-unicast receive binding",
        });
    }
    let source = source.to_canonical();
    if is_multicast(source)
        || source.is_unspecified()
        || source.is_ipv6() != binding.group.ip().to_canonical().is_ipv6()
    {
        return Err(ClientError::BadSource(source));
    }
    Ok(())
}

/// A send bind to `group` with `ttl` (in RSVD) and a fresh `tid`, sending from `local`.
pub(crate) fn send_request(
    tid: u16,
    local: SocketAddr,
    group: SocketAddr,
    ttl: NonZeroU8,
) -> ControlRequest {
    ControlRequest {
        command: UdpCommand::Bind,
        flags: Flags::SEND | Flags::MULTICAST,
        ttl: ttl.get(),
        tid,
        aid: 0,
        local: local.into(),
        remote: group.into(),
    }
}

/// SET TTL of `binding` (its TID and AID; LOCAL and REMOTE are zeros: unused).
pub(crate) fn set_ttl_request(binding: &MulticastBinding, ttl: NonZeroU8) -> ControlRequest {
    ControlRequest {
        command: UdpCommand::SetTtl,
        flags: Flags::empty(),
        ttl: ttl.get(),
        tid: binding.tid,
        aid: binding.aid,
        local: Address::UNSPECIFIED_V4,
        remote: Address::UNSPECIFIED_V4,
    }
}

/// The binding a successful reply to `request` (a receive or send bind) made; a refusal is
/// [`ClientError::Binding`]. A receive reply must name exactly one mode, the preferred one if
/// the request named one; an unspecified internal relay is the gateway's control address.
pub(crate) fn binding_of(
    request: &ControlRequest,
    reply: &ControlReply,
    proxy: IpAddr,
) -> Result<MulticastBinding, ClientError> {
    refusal(reply)?;
    let unexpected = |what: String| Err(ClientError::UnexpectedReply(what));
    if reply.aid == 0 {
        return unexpected("AID 0 in a successful multicast UDP BIND reply".to_owned());
    }
    let (Address::Ip(local), Address::Ip(group)) = (&request.local, &request.remote) else {
        return unexpected("a multicast bind without IP addresses".to_owned());
    };
    let role = if request.flags.contains(Flags::SEND) {
        let Some(ttl) = NonZeroU8::new(request.ttl) else {
            return unexpected("a send binding with TTL 0".to_owned());
        };
        MulticastRole::Send { ttl }
    } else {
        let Some(chosen) = MulticastMode::of_flags(reply.flags) else {
            return unexpected(format!(
                "a multicast receive reply naming no single mode ({:?})",
                reply.flags
            ));
        };
        if let Some(asked) = MulticastMode::of_flags(request.flags)
            && asked != chosen
        {
            return unexpected(format!("{chosen} granted, {asked} asked for"));
        }
        MulticastRole::Receive(chosen)
    };
    Ok(MulticastBinding {
        aid: reply.aid,
        group: *group,
        relay: reachable(&reply.local, proxy)?,
        local: *local,
        role,
        tid: request.tid,
    })
}

/// `binding` after a successful SET TTL to `ttl`; a refusal is [`ClientError::Binding`].
pub(crate) fn after_set_ttl(
    binding: &MulticastBinding,
    reply: &ControlReply,
    ttl: NonZeroU8,
) -> Result<MulticastBinding, ClientError> {
    refusal(reply)?;
    let mut changed = *binding;
    if let MulticastRole::Send { .. } = binding.role {
        changed.role = MulticastRole::Send { ttl };
    }
    Ok(changed)
}

/// The payload of a datagram that came to a multicast-to-unicast receive binding: it must come
/// from the binding's internal relay and carry the whole-datagram header with the binding's AID
/// (anything else is `None`: skip it, as a socket would never have seen it).
pub fn mu_payload<'a>(
    binding: &MulticastBinding,
    from: SocketAddr,
    datagram: &'a [u8],
) -> Option<&'a [u8]> {
    let relay = binding.relay;
    if from.ip().to_canonical() != relay.ip().to_canonical() || from.port() != relay.port() {
        return None;
    }
    let mut rest = datagram;
    let header = DatagramHeader::decode(&mut rest).ok()?;
    (header.aid == binding.aid && header.is_whole()).then_some(rest)
}

#[cfg(test)]
mod tests {
    use gateway_proto::enhanced::{EnhancedReplyCode, Packet};

    use super::*;
    use crate::BindingError;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    const TTL: NonZeroU8 = NonZeroU8::new(16).unwrap();

    fn hex(text: &str) -> Vec<u8> {
        let digits: String = text.split_whitespace().collect();
        (0..digits.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).unwrap())
            .collect()
    }

    fn wire(request: &ControlRequest) -> Vec<u8> {
        let mut out = Vec::new();
        request.encode(&mut out).unwrap();
        out
    }

    fn reply(request: &ControlRequest, flags: Flags, aid: u32) -> ControlReply {
        ControlReply {
            code: EnhancedReplyCode::Succeeded,
            flags,
            ttl: request.ttl,
            tid: request.tid,
            aid,
            local: addr("198.51.100.1:40000").into(),
            remote: request.remote.clone(),
        }
    }

    #[test]
    fn receive_binds_on_the_wire() {
        let local = addr("198.51.100.2:5000");
        let group = addr("233.252.0.10:5004");
        // 01 SIZE 05 FLAGS 00 TID 00000000 LOCAL REMOTE; 0x1388 = 5000, 0x138C = 5004.
        for (preference, flags) in [
            (Some(MulticastMode::ToUnicast), "0031"),
            (Some(MulticastMode::ToMulticast), "0051"),
            (None, "0011"),
        ] {
            let request = receive_request(0x0102, local, group, preference);
            assert_eq!(
                wire(&request),
                hex(&format!(
                    "01 001B 05 {flags} 00 0102 00000000 01 C6336402 1388 01 E9FC000A 138C"
                )),
                "{preference:?}"
            );
        }
        let v6 = receive_request(
            7,
            addr("[2001:db8:1::2]:5000"),
            addr("[ff0e::db8:0:1]:5004"),
            Some(MulticastMode::ToUnicast),
        );
        let bytes = wire(&v6);
        assert_eq!(&bytes[..13], &hex("01 0033 05 0031 00 0007 00000000")[..]);
        assert_eq!(
            Packet::decode(&mut &bytes[..]).unwrap(),
            Some(Packet::Request(v6))
        );
    }

    #[test]
    fn send_binds_and_set_ttl_on_the_wire() {
        let local = addr("198.51.100.2:5000");
        let group = addr("233.252.0.10:5004");
        let request = send_request(0x0103, local, group, TTL);
        assert_eq!(
            wire(&request),
            hex("01 001B 05 0012 10 0103 00000000 01 C6336402 1388 01 E9FC000A 138C")
        );
        let binding = binding_of(
            &request,
            &reply(&request, request.flags, 0x2A),
            [0; 4].into(),
        )
        .unwrap();
        assert_eq!(binding.ttl(), Some(TTL));
        assert_eq!(binding.mode(), None);
        let set = set_ttl_request(&binding, NonZeroU8::new(200).unwrap());
        assert_eq!(
            wire(&set),
            hex("01 001B 07 0000 C8 0103 0000002A 01 00000000 0000 01 00000000 0000")
        );
        let answered = ControlReply::echo(&set, EnhancedReplyCode::Succeeded);
        let changed = after_set_ttl(&binding, &answered, NonZeroU8::new(200).unwrap()).unwrap();
        assert_eq!(changed.ttl(), NonZeroU8::new(200));
        for (code, error) in [
            (
                EnhancedReplyCode::BadAssociationId,
                BindingError::BadAssociationId,
            ),
            (
                EnhancedReplyCode::BadAssociationContext,
                BindingError::BadAssociationContext,
            ),
            (
                EnhancedReplyCode::TtlNotAllowed,
                BindingError::TtlNotAllowed,
            ),
        ] {
            let refused = ControlReply::echo(&set, code);
            assert!(
                matches!(
                    after_set_ttl(&binding, &refused, TTL),
                    Err(ClientError::Binding(e)) if e == error
                ),
                "{code:?}"
            );
        }
    }

    #[test]
    fn the_reply_names_the_mode_and_the_relay() {
        let proxy: IpAddr = "198.51.100.1".parse().unwrap();
        let local = addr("198.51.100.2:5000");
        let group = addr("233.252.0.10:5004");
        let mu = Flags::RECEIVE | Flags::MULTICAST | Flags::MULTICAST_TO_UNICAST;
        let mm = Flags::RECEIVE | Flags::MULTICAST | Flags::MULTICAST_TO_MULTICAST;
        let any = receive_request(1, local, group, None);
        let chosen = binding_of(&any, &reply(&any, mm, 9), proxy).unwrap();
        assert_eq!(chosen.mode(), Some(MulticastMode::ToMulticast));
        assert_eq!(
            (chosen.aid, chosen.group, chosen.local, chosen.tid),
            (9, group, local, 1)
        );
        assert_eq!(chosen.relay, addr("198.51.100.1:40000"));
        // An unspecified relay is the gateway's control address.
        let mut zero = reply(&any, mu, 9);
        zero.local = addr("0.0.0.0:41000").into();
        assert_eq!(
            binding_of(&any, &zero, proxy).unwrap().relay,
            addr("198.51.100.1:41000")
        );
        // No single mode, another mode than asked, AID 0: not an answer.
        let asked_mu = receive_request(2, local, group, Some(MulticastMode::ToUnicast));
        for (request, flags, aid) in [
            (&any, Flags::RECEIVE | Flags::MULTICAST, 9),
            (&any, mu | mm, 9),
            (&asked_mu, mm, 9),
            (&asked_mu, mu, 0),
        ] {
            assert!(
                matches!(
                    binding_of(request, &reply(request, flags, aid), proxy),
                    Err(ClientError::UnexpectedReply(_))
                ),
                "{flags:?} {aid}"
            );
        }
    }

    #[test]
    fn refusals_are_typed() {
        let request = receive_request(
            3,
            addr("198.51.100.2:5000"),
            addr("233.252.0.10:5004"),
            None,
        );
        for (code, error) in [
            (
                EnhancedReplyCode::MulticastReceiveNotAllowed,
                BindingError::MulticastReceiveNotAllowed,
            ),
            (
                EnhancedReplyCode::MulticastSendNotAllowed,
                BindingError::MulticastSendNotAllowed,
            ),
            (
                EnhancedReplyCode::BadAssociationContext,
                BindingError::BadAssociationContext,
            ),
            (
                EnhancedReplyCode::BadMulticastAddress,
                BindingError::BadMulticastAddress,
            ),
            (
                EnhancedReplyCode::TtlNotAllowed,
                BindingError::TtlNotAllowed,
            ),
        ] {
            let refused = ControlReply::echo(&request, code);
            assert!(
                matches!(
                    binding_of(&request, &refused, [0; 4].into()),
                    Err(ClientError::Binding(e)) if e == error && e.code() == code
                ),
                "{code:?}"
            );
        }
    }

    #[test]
    fn groups_are_checked_before_sending() {
        for good in [
            "233.252.0.10:5004",
            "[ff0e::db8:0:1]:5004",
            "[::ffff:233.252.0.1]:1",
        ] {
            assert!(check_group(addr(good)).is_ok(), "{good}");
        }
        for bad in ["233.252.0.10:0", "203.0.113.2:5004", "[2001:db8::1]:5004"] {
            assert!(
                matches!(check_group(addr(bad)), Err(ClientError::NotMulticast(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn mu_datagrams_are_checked_and_stripped() {
        let binding = MulticastBinding {
            aid: 0x2A,
            group: addr("233.252.0.10:5004"),
            relay: addr("198.51.100.1:40000"),
            local: addr("198.51.100.2:5000"),
            role: MulticastRole::Receive(MulticastMode::ToUnicast),
            tid: 1,
        };
        let relay = binding.relay;
        let good = hex("00 00 0000 0000002A CAFE");
        assert_eq!(mu_payload(&binding, relay, &good), Some(&[0xCA, 0xFE][..]));
        let mapped = addr("[::ffff:198.51.100.1]:40000");
        assert_eq!(mu_payload(&binding, mapped, &good), Some(&[0xCA, 0xFE][..]));
        assert_eq!(
            mu_payload(&binding, relay, &hex("00 00 0000 0000002A")),
            Some(&[][..])
        );
        for (from, datagram) in [
            (relay, hex("00 00 0000 0000002B CAFE")),   // another AID
            (relay, hex("00 01 0001 0000002A CAFE")),   // a fragment
            (relay, hex("01 00 0000 0000002A CAFE")),   // RSV not 0
            (relay, hex("00 00 0000 0000")),            // short
            (addr("198.51.100.1:40001"), good.clone()), // another port
            (addr("203.0.113.9:40000"), good.clone()),  // another host
        ] {
            assert_eq!(
                mu_payload(&binding, from, &datagram),
                None,
                "{from} {datagram:02x?}"
            );
        }
    }
}
