//! The client's side of the SOCKS5 conversation without I/O: what to write, how many octets the
//! answer has, and what the answer means. The async layer ([`super::handshake`]) and the
//! synchronous core ([`super::blocking`]) drive the same steps over their sockets, so both speak
//! exactly the same protocol.

use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
};

use bytes::BytesMut;
use gateway_proto::{
    Address, AddressType, AuthReply, AuthRequest, Command, Family, Greeting, Method,
    MethodSelection, ProtocolError, Reply, ReplyCode, Request,
    enhanced::{ControlReply, ControlRequest, EntryReply, Flags, UdpCommand, entry_request},
};

use super::{BindOptions, BindingError, ClientError, RelayAddrs, reachable};

/// The RFC 1929 request for `credentials`, checked before anything is sent.
pub(crate) fn auth_request(
    credentials: Option<&(String, String)>,
) -> Result<Option<AuthRequest>, ClientError> {
    let Some((user, password)) = credentials else {
        return Ok(None);
    };
    let request = AuthRequest::new(user.as_bytes(), password.as_bytes());
    let mut scratch = Vec::new();
    request
        .encode(&mut scratch)
        .map_err(ClientError::InvalidCredentials)?;
    Ok(Some(request))
}

/// The greeting and the methods it offers: no authentication without credentials,
/// username/password first (then none) with them.
pub(crate) fn greeting(auth: Option<&AuthRequest>) -> Result<(BytesMut, Vec<Method>), ClientError> {
    let methods = if auth.is_some() {
        vec![Method::UserPass, Method::NoAuth]
    } else {
        vec![Method::NoAuth]
    };
    let mut out = BytesMut::new();
    Greeting {
        methods: methods.clone(),
    }
    .encode(&mut out)?;
    Ok((out, methods))
}

/// The method the gateway selected, if it is one we offered.
pub(crate) fn selected_method(
    octets: [u8; MethodSelection::LEN],
    offered: &[Method],
) -> Result<Method, ClientError> {
    let method = MethodSelection::decode(&mut &octets[..])?
        .ok_or(ProtocolError::Truncated)?
        .method;
    if method == Method::NoAcceptable {
        return Err(ClientError::NoAcceptableMethod);
    }
    if !offered.contains(&method) {
        return Err(ClientError::UnexpectedMethod(method.to_u8()));
    }
    Ok(method)
}

/// The RFC 1929 request on the wire.
pub(crate) fn auth_octets(auth: &AuthRequest) -> Result<BytesMut, ClientError> {
    let mut out = BytesMut::new();
    auth.encode(&mut out)
        .map_err(ClientError::InvalidCredentials)?;
    Ok(out)
}

/// Whether the RFC 1929 status says yes.
pub(crate) fn check_auth_reply(octets: [u8; AuthReply::LEN]) -> Result<(), ClientError> {
    let reply = AuthReply::decode(&mut &octets[..])?.ok_or(ProtocolError::Truncated)?;
    if reply.is_success() {
        Ok(())
    } else {
        Err(ClientError::BadCredentials(reply.status))
    }
}

/// A request on the wire.
pub(crate) fn request_octets(command: Command, address: Address) -> Result<BytesMut, ClientError> {
    let mut out = BytesMut::new();
    Request { command, address }.encode(&mut out)?;
    Ok(out)
}

/// The enhanced-mode entry request on the wire (`05 04 00 01 00000000 0000`).
pub(crate) fn entry_octets() -> Result<BytesMut, ClientError> {
    let mut out = BytesMut::new();
    entry_request().encode(&mut out)?;
    Ok(out)
}

/// A reply is read in two parts: this many octets first (`VER REP RSV ATYP` and the first octet
/// of the address, a domain name's length) ...
pub(crate) const REPLY_PREFIX: usize = 5;

/// ... then this many, so not one octet after the reply (which belongs to a relayed stream) is
/// taken from the socket.
pub(crate) fn reply_rest(prefix: [u8; REPLY_PREFIX]) -> usize {
    match AddressType::try_from(prefix[3]) {
        Ok(AddressType::Ipv4) => 4 + 2 - 1,
        Ok(AddressType::Ipv6) => 16 + 2 - 1,
        Ok(AddressType::Domain) => usize::from(prefix[4]) + 2,
        // The decoder reports the unknown type.
        Err(_) => 0,
    }
}

/// BND of a successful reply; a refusal is [`ClientError::Refused`].
pub(crate) fn reply_address(octets: &[u8]) -> Result<Address, ClientError> {
    let reply = Reply::decode(&mut &octets[..])?.ok_or(ProtocolError::Truncated)?;
    if reply.code != ReplyCode::Succeeded {
        return Err(ClientError::Refused(reply.code));
    }
    Ok(reply.address)
}

/// The address of a successful enhanced-mode entry reply.
pub(crate) fn entry_address(octets: &[u8]) -> Result<Address, ClientError> {
    match EntryReply::decode(&mut &octets[..])?.ok_or(ProtocolError::Truncated)? {
        EntryReply::Entered(address) => Ok(address),
        EntryReply::Refused(reply) => Err(ClientError::Refused(reply.code)),
    }
}

/// More buffered octets than this on an enhanced-mode control connection without a whole packet
/// means the gateway is not speaking the protocol (a control packet is at most a few hundred
/// octets, a TCP-encapsulated datagram 64 KiB).
pub(crate) const MAX_BUFFERED: usize = 128 * 1024;

/// The flags of a binding's UDP BINDs: receive, send and unicast, and RAW when `options` ask for
/// it. Step 2 repeats step 1's flags, so they are fixed when the binding is made.
pub(crate) fn bind_flags(options: BindOptions) -> Flags {
    let mut flags = Flags::RECEIVE | Flags::SEND | Flags::UNICAST;
    if options.raw {
        flags.insert(Flags::RAW);
    }
    flags
}

/// Checks, before a UDP BIND with `flags` from `local` naming `remote` (a step 1's unspecified
/// REMOTE, or the exact remote of a step 2 or one-step Open) is sent, that header-less delivery
/// could work if it asks for it: the local socket talks to the remote's own address, so that
/// must be an IP address (a name is resolved by the gateway alone) of LOCAL's family, and the
/// gateway steers the remote's datagrams to LOCAL's port, so that must not be 0 ("latch").
pub(crate) fn check_raw(
    flags: Flags,
    local: SocketAddr,
    remote: &Address,
) -> Result<(), ClientError> {
    if !flags.contains(Flags::RAW) {
        return Ok(());
    }
    if local.port() == 0 {
        return Err(ClientError::RawUnavailable(
            "LOCAL port 0: the gateway needs the port it delivers to",
        ));
    }
    let Address::Ip(remote) = remote else {
        return Err(ClientError::RawUnavailable(
            "a domain-name remote: its address, the datagrams' source, is known to the gateway only",
        ));
    };
    if Family::of(remote.ip()) != Family::of(local.ip()) {
        return Err(ClientError::RawUnavailable(
            "the remote's address family is not LOCAL's: the local socket cannot reach it",
        ));
    }
    Ok(())
}

/// The remote a binding exchanges plain datagrams with, when the reply confirming it (step 2
/// Open or a one-step Open, naming `remote`) puts header-less delivery in effect: the request
/// asked for RAW (`asked`) and the reply echoes it. A step-1 echo is only provisional and a
/// Listen binding is never raw, so neither comes here. A RAW the client did not ask for is
/// ignored: the application was promised the header.
pub(crate) fn raw_remote(
    asked: Flags,
    reply: &ControlReply,
    remote: &Address,
) -> Option<SocketAddr> {
    match remote {
        Address::Ip(remote)
            if asked.contains(Flags::RAW)
                && reply.flags.contains(Flags::RAW)
                && !remote.ip().is_unspecified() =>
        {
            Some(*remote)
        }
        _ => None,
    }
}

/// A UDP BIND: step 1 (`aid` 0, REMOTE unspecified), step 2 (step 1's TID and AID) or a
/// one-step Open (`aid` 0, an exact REMOTE).
pub(crate) fn bind_request(
    flags: Flags,
    tid: u16,
    aid: u32,
    local: Address,
    remote: Address,
) -> ControlRequest {
    ControlRequest {
        command: UdpCommand::Bind,
        flags,
        ttl: 0,
        tid,
        aid,
        local,
        remote,
    }
}

/// A UDP RELEASE of `aid` (LOCAL and REMOTE are zeros: unused).
pub(crate) fn release_request(tid: u16, aid: u32) -> ControlRequest {
    ControlRequest {
        command: UdpCommand::Release,
        flags: Flags::empty(),
        ttl: 0,
        tid,
        aid,
        local: Address::UNSPECIFIED_V4,
        remote: Address::UNSPECIFIED_V4,
    }
}

/// The typed refusal in a reply, if any.
pub(crate) fn refusal(reply: &ControlReply) -> Result<(), BindingError> {
    BindingError::from_code(reply.code).map_or(Ok(()), Err)
}

/// The relay addresses of a successful UDP BIND reply (an unspecified internal relay is the
/// gateway's control address).
pub(crate) fn relays_of(reply: &ControlReply, proxy: IpAddr) -> Result<RelayAddrs, ClientError> {
    refusal(reply)?;
    if reply.aid == 0 {
        return Err(ClientError::UnexpectedReply(
            "AID 0 in a successful UDP BIND reply".to_owned(),
        ));
    }
    let internal = reachable(&reply.local, proxy)?;
    let Address::Ip(external) = reply.remote else {
        return Err(ClientError::UnexpectedReply(format!(
            "a domain name ({}) as the external relay address",
            reply.remote
        )));
    };
    Ok(RelayAddrs {
        aid: reply.aid,
        internal,
        external,
    })
}

/// The relay addresses of a successful step-2 reply, which must answer for step 1's binding.
pub(crate) fn step_two_relays(
    reply: &ControlReply,
    proxy: IpAddr,
    step_one: &RelayAddrs,
) -> Result<RelayAddrs, ClientError> {
    let confirmed = relays_of(reply, proxy)?;
    if confirmed.aid != step_one.aid {
        return Err(ClientError::UnexpectedReply(format!(
            "step 2 answered for AID {:#x}, the binding is {:#x}",
            confirmed.aid, step_one.aid
        )));
    }
    Ok(confirmed)
}

/// The TIDs of one control connection. They are handed out in order and come back only after
/// the counter wraps, so a late reply for a gone binding never reaches another binding; 0 (not
/// two-step) is never handed out.
#[derive(Debug, Default)]
pub(crate) struct Tids {
    taken: HashSet<u16>,
    last: u16,
}

impl Tids {
    /// The next free TID, taken; `None` when all 65,535 are in use.
    pub(crate) fn allocate(&mut self) -> Option<u16> {
        for _ in 0..=u16::MAX {
            self.last = self.last.wrapping_add(1);
            let tid = self.last;
            if tid != 0 && self.taken.insert(tid) {
                return Some(tid);
            }
        }
        None
    }

    /// Returns a TID whose binding is gone (released, or never made).
    pub(crate) fn free(&mut self, tid: u16) {
        self.taken.remove(&tid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tids_are_non_zero_in_order_and_skip_taken_ones() {
        let mut tids = Tids::default();
        assert_eq!(tids.allocate(), Some(1));
        assert_eq!(tids.allocate(), Some(2));
        tids.taken.insert(3);
        assert_eq!(tids.allocate(), Some(4));
        // A freed TID comes back only after the counter wraps, and 0 is never handed out.
        tids.free(1);
        tids.last = u16::MAX - 1;
        assert_eq!(tids.allocate(), Some(u16::MAX));
        assert_eq!(tids.allocate(), Some(1));
        // All taken: exhausted.
        tids.taken = (1..=u16::MAX).collect();
        assert_eq!(tids.allocate(), None);
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn bind_reply(flags: Flags, aid: u32) -> ControlReply {
        ControlReply {
            code: gateway_proto::enhanced::EnhancedReplyCode::Succeeded,
            flags,
            ttl: 0,
            tid: 7,
            aid,
            local: addr("198.51.100.1:40000").into(),
            remote: addr("203.0.113.1:30000").into(),
        }
    }

    #[test]
    fn raw_is_in_the_flags_only_when_asked() {
        let header = bind_flags(BindOptions::default());
        assert_eq!(header, Flags::RECEIVE | Flags::SEND | Flags::UNICAST);
        assert_eq!(bind_flags(BindOptions { raw: true }), header | Flags::RAW);
    }

    #[test]
    fn raw_is_checked_before_it_is_asked() {
        let raw = bind_flags(BindOptions { raw: true });
        let header = bind_flags(BindOptions::default());
        let v4 = addr("198.51.100.2:5000");
        let v6 = addr("[2001:db8:1::2]:5000");
        let mapped = addr("[::ffff:198.51.100.2]:5000");
        let unbound_port = addr("198.51.100.2:0");
        let source: Address = addr("203.0.113.2:6000").into();
        let source6: Address = addr("[2001:db8:2::2]:6000").into();
        let named = Address::Domain("media.test".into(), 6000);
        let possible = [
            (v4, Family::V4.unspecified()),
            (v4, source.clone()),
            (mapped, source.clone()),
            (v6, Family::V6.unspecified()),
            (v6, source6.clone()),
        ];
        for (local, remote) in &possible {
            assert!(check_raw(raw, *local, remote).is_ok(), "{local} {remote}");
        }
        let impossible = [
            (unbound_port, source.clone()),
            (v4, named.clone()),
            (v4, Family::V6.unspecified()),
            (v4, source6),
            (v6, Family::V4.unspecified()),
            (v6, source),
        ];
        for (local, remote) in &impossible {
            assert!(
                matches!(
                    check_raw(raw, *local, remote),
                    Err(ClientError::RawUnavailable(_))
                ),
                "{local} {remote}"
            );
            // Without RAW the gateway decides, as before.
            assert!(check_raw(header, *local, remote).is_ok());
        }
    }

    #[test]
    fn raw_is_in_effect_only_when_asked_echoed_and_open() {
        let asked = bind_flags(BindOptions { raw: true });
        let not_asked = bind_flags(BindOptions::default());
        let source = addr("203.0.113.2:6000");
        let named = Address::Domain("media.test".into(), 6000);
        for (flags, echoed, remote, expected) in [
            (asked, true, source.into(), Some(source)),
            (asked, false, source.into(), None),
            (not_asked, true, source.into(), None),
            (not_asked, false, source.into(), None),
            // Listen: never raw, whatever the reply says.
            (asked, true, Family::V4.unspecified(), None),
            (asked, true, named, None),
        ] {
            let mut reply_flags = not_asked;
            if echoed {
                reply_flags.insert(Flags::RAW);
            }
            let reply = bind_reply(reply_flags, 42);
            assert_eq!(
                raw_remote(flags, &reply, &remote),
                expected,
                "{flags:?} {reply_flags:?} {remote}"
            );
        }
    }

    #[test]
    fn a_step_two_reply_must_answer_for_step_one() {
        let proxy: IpAddr = "198.51.100.1".parse().unwrap();
        let step_one = relays_of(&bind_reply(Flags::REMOTE_PENDING, 42), proxy).unwrap();
        let confirmed = step_two_relays(&bind_reply(Flags::empty(), 42), proxy, &step_one);
        assert_eq!(confirmed.unwrap(), step_one);
        assert!(matches!(
            step_two_relays(&bind_reply(Flags::empty(), 43), proxy, &step_one),
            Err(ClientError::UnexpectedReply(_))
        ));
        let mut refused = bind_reply(Flags::empty(), 42);
        refused.code = gateway_proto::enhanced::EnhancedReplyCode::BadAssociationContext;
        assert!(matches!(
            step_two_relays(&refused, proxy, &step_one),
            Err(ClientError::Binding(BindingError::BadAssociationContext))
        ));
    }

    #[test]
    fn a_reply_is_read_to_its_exact_length() {
        assert_eq!(reply_rest([5, 0, 0, 1, 0]), 5, "IPv4: 4 + 2 - 1 more");
        assert_eq!(reply_rest([5, 0, 0, 4, 0]), 17, "IPv6: 16 + 2 - 1 more");
        assert_eq!(
            reply_rest([5, 0, 0, 3, 9]),
            11,
            "a 9-octet name and the port"
        );
        assert_eq!(
            reply_rest([5, 0, 0, 7, 0]),
            0,
            "unknown: the decoder says so"
        );
    }
}
