//! RFC 1928 control-channel messages: greeting, method selection, request, reply.
//!
//! Decoders read from `&mut impl Buf` and return `Ok(None)` ("need more bytes", nothing consumed)
//! until a whole message is there; malformed input is an error as soon as the octet that shows it
//! arrives. Encoders write into `&mut impl BufMut` and validate before writing anything.

use bytes::{Buf, BufMut};

use super::ProtocolError;
use super::addr::Address;
use super::wire::{Reader, byte_enum, decode_with, need};

/// The SOCKS protocol version octet.
pub const SOCKS_VERSION: u8 = 0x05;

/// An authentication method octet of the greeting and the method selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// `00`: no authentication.
    NoAuth,
    /// `01`: GSSAPI. Never selected by the gateway.
    Gssapi,
    /// `02`: username/password (RFC 1929).
    UserPass,
    /// `FF`: no acceptable method; the server closes after sending it.
    NoAcceptable,
    /// Any other octet (IANA-assigned or private methods).
    Other(u8),
}

impl Method {
    /// The method for an octet.
    pub const fn from_u8(value: u8) -> Self {
        match value {
            0x00 => Self::NoAuth,
            0x01 => Self::Gssapi,
            0x02 => Self::UserPass,
            0xFF => Self::NoAcceptable,
            other => Self::Other(other),
        }
    }

    /// The octet on the wire.
    pub const fn to_u8(self) -> u8 {
        match self {
            Self::NoAuth => 0x00,
            Self::Gssapi => 0x01,
            Self::UserPass => 0x02,
            Self::NoAcceptable => 0xFF,
            Self::Other(other) => other,
        }
    }
}

impl From<u8> for Method {
    fn from(value: u8) -> Self {
        Self::from_u8(value)
    }
}

impl From<Method> for u8 {
    fn from(value: Method) -> Self {
        value.to_u8()
    }
}

/// The client's greeting.
///
/// ```text
/// +-----+----------+----------+
/// | VER | NMETHODS | METHODS  |
/// +-----+----------+----------+
/// | 05  |  1..255  | NMETHODS |
/// +-----+----------+----------+
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    /// The methods the client offers, in its order (duplicates kept), 1..255 of them.
    pub methods: Vec<Method>,
}

impl Greeting {
    /// The largest greeting.
    pub const MAX_LEN: usize = 2 + 255;

    /// Whether the client offers `method`.
    pub fn offers(&self, method: Method) -> bool {
        self.methods.contains(&method)
    }

    /// Reads a greeting.
    pub fn decode(buf: &mut impl Buf) -> Result<Option<Self>, ProtocolError> {
        decode_with(buf, Self::MAX_LEN, |r| {
            check_version(need!(r.u8()))?;
            let n = need!(r.u8());
            if n == 0 {
                return Err(ProtocolError::ZeroMethods);
            }
            let methods = need!(r.take(usize::from(n)));
            Ok(Some(Self {
                methods: methods.iter().copied().map(Method::from_u8).collect(),
            }))
        })
    }

    /// Writes the greeting; 1..255 methods.
    pub fn encode(&self, buf: &mut impl BufMut) -> Result<(), ProtocolError> {
        if self.methods.is_empty() {
            return Err(ProtocolError::ZeroMethods);
        }
        let n = u8::try_from(self.methods.len())
            .map_err(|_| ProtocolError::TooManyMethods(self.methods.len()))?;
        buf.put_u8(SOCKS_VERSION);
        buf.put_u8(n);
        for method in &self.methods {
            buf.put_u8(method.to_u8());
        }
        Ok(())
    }
}

/// The server's method selection.
///
/// ```text
/// +-----+--------+
/// | VER | METHOD |
/// +-----+--------+
/// | 05  |   1    |
/// +-----+--------+
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MethodSelection {
    /// The chosen method, or [`Method::NoAcceptable`].
    pub method: Method,
}

impl MethodSelection {
    /// The encoded length.
    pub const LEN: usize = 2;

    /// Reads a method selection.
    pub fn decode(buf: &mut impl Buf) -> Result<Option<Self>, ProtocolError> {
        decode_with(buf, Self::LEN, |r| {
            check_version(need!(r.u8()))?;
            Ok(Some(Self {
                method: Method::from_u8(need!(r.u8())),
            }))
        })
    }

    /// Writes the method selection.
    pub fn encode(&self, buf: &mut impl BufMut) {
        buf.put_u8(SOCKS_VERSION);
        buf.put_u8(self.method.to_u8());
    }
}

byte_enum! {
    /// `CMD` of a request.
    pub enum Command (unknown: ProtocolError::UnknownCommand) {
        /// `01`: TCP CONNECT.
        Connect = 0x01,
        /// `02`: TCP BIND.
        Bind = 0x02,
        /// `03`: UDP ASSOCIATE.
        UdpAssociate = 0x03,
        /// `04`: enter the enhanced UDP mode (protocol.md section 3).
        EnhancedUdp = 0x04,
    }
}

/// A client request.
///
/// ```text
/// +-----+-----+-----+------+----------+----------+
/// | VER | CMD | RSV | ATYP | DST.ADDR | DST.PORT |
/// +-----+-----+-----+------+----------+----------+
/// | 05  |  1  | 00  |  1   | variable |    2     |
/// +-----+-----+-----+------+----------+----------+
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `CMD`.
    pub command: Command,
    /// `DST.ADDR DST.PORT`.
    pub address: Address,
}

impl Request {
    /// The largest request.
    pub const MAX_LEN: usize = 3 + Address::MAX_ENCODED_LEN;

    /// Reads a request. An unknown `CMD` or `ATYP` is reported as soon as its octet arrives; see
    /// [`ProtocolError::reply_code`] for the reply to send.
    pub fn decode(buf: &mut impl Buf) -> Result<Option<Self>, ProtocolError> {
        decode_with(buf, Self::MAX_LEN, |r| {
            check_version(need!(r.u8()))?;
            let command = Command::try_from(need!(r.u8()))?;
            check_reserved(need!(r.u8()))?;
            let address = need!(Address::read(r)?);
            Ok(Some(Self { command, address }))
        })
    }

    /// Writes the request.
    pub fn encode(&self, buf: &mut impl BufMut) -> Result<(), ProtocolError> {
        self.address.validate()?;
        buf.put_u8(SOCKS_VERSION);
        buf.put_u8(self.command.to_u8());
        buf.put_u8(0);
        self.address.put(buf);
        Ok(())
    }
}

byte_enum! {
    /// `REP` of a reply. A plain SOCKS5 reply never carries anything above `08`.
    pub enum ReplyCode (unknown: ProtocolError::UnknownReplyCode) {
        /// `00`: succeeded.
        Succeeded = 0x00,
        /// `01`: general SOCKS server failure.
        GeneralFailure = 0x01,
        /// `02`: connection not allowed by ruleset.
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
    }
}

/// A server reply.
///
/// ```text
/// +-----+-----+-----+------+----------+----------+
/// | VER | REP | RSV | ATYP | BND.ADDR | BND.PORT |
/// +-----+-----+-----+------+----------+----------+
/// | 05  |  1  | 00  |  1   | variable |    2     |
/// +-----+-----+-----+------+----------+----------+
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// `REP`.
    pub code: ReplyCode,
    /// `BND.ADDR BND.PORT`.
    pub address: Address,
}

impl Reply {
    /// The largest reply.
    pub const MAX_LEN: usize = 3 + Address::MAX_ENCODED_LEN;

    /// A failure reply with the address `0.0.0.0:0`.
    pub fn failure(code: ReplyCode) -> Self {
        Self {
            code,
            address: Address::UNSPECIFIED_V4,
        }
    }

    /// Reads a reply.
    pub fn decode(buf: &mut impl Buf) -> Result<Option<Self>, ProtocolError> {
        decode_with(buf, Self::MAX_LEN, |r| {
            check_version(need!(r.u8()))?;
            Self::read_after_version(r)
        })
    }

    /// Parses `REP RSV ATYP ADDR PORT` (the enhanced-mode entry reply shares this layout).
    pub(crate) fn read_after_version(r: &mut Reader<'_>) -> Result<Option<Self>, ProtocolError> {
        let code = ReplyCode::try_from(need!(r.u8()))?;
        check_reserved(need!(r.u8()))?;
        let address = need!(Address::read(r)?);
        Ok(Some(Self { code, address }))
    }

    /// Writes the reply.
    pub fn encode(&self, buf: &mut impl BufMut) -> Result<(), ProtocolError> {
        self.put_with_version(SOCKS_VERSION, buf)
    }

    /// Writes the reply layout with another first octet (the enhanced-mode entry reply).
    pub(crate) fn put_with_version(
        &self,
        version: u8,
        buf: &mut impl BufMut,
    ) -> Result<(), ProtocolError> {
        self.address.validate()?;
        buf.put_u8(version);
        buf.put_u8(self.code.to_u8());
        buf.put_u8(0);
        self.address.put(buf);
        Ok(())
    }
}

fn check_version(version: u8) -> Result<(), ProtocolError> {
    if version == SOCKS_VERSION {
        Ok(())
    } else {
        Err(ProtocolError::WrongVersion(version))
    }
}

fn check_reserved(rsv: u8) -> Result<(), ProtocolError> {
    if rsv == 0 {
        Ok(())
    } else {
        Err(ProtocolError::BadReserved(u16::from(rsv)))
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use bytes::BytesMut;
    use proptest::prelude::*;

    use super::*;
    use crate::strategies::{address, assert_prefixes_need_more, check_consumption};

    fn ip(s: &str) -> Address {
        s.parse::<SocketAddr>().unwrap().into()
    }

    fn encoded(f: impl FnOnce(&mut BytesMut)) -> Vec<u8> {
        let mut out = BytesMut::new();
        f(&mut out);
        out.to_vec()
    }

    #[test]
    fn greeting() {
        let wire = [0x05, 0x02, 0x00, 0x02];
        let g = Greeting {
            methods: vec![Method::NoAuth, Method::UserPass],
        };
        assert_eq!(Greeting::decode(&mut &wire[..]), Ok(Some(g.clone())));
        assert_eq!(encoded(|b| g.encode(b).unwrap()), wire);
        assert!(g.offers(Method::UserPass) && !g.offers(Method::Gssapi));
        assert_prefixes_need_more(&wire, |b| Greeting::decode(b).map(|m| m.is_some()));
    }

    #[test]
    fn greeting_malformed() {
        assert_eq!(
            Greeting::decode(&mut &[0x04, 0x01, 0x00][..]),
            Err(ProtocolError::WrongVersion(4))
        );
        // The wrong version shows at the first octet.
        assert_eq!(
            Greeting::decode(&mut &[0x04][..]),
            Err(ProtocolError::WrongVersion(4))
        );
        assert_eq!(
            Greeting::decode(&mut &[0x05, 0x00][..]),
            Err(ProtocolError::ZeroMethods)
        );
        let mut out = Vec::new();
        let empty = Greeting { methods: vec![] };
        assert_eq!(empty.encode(&mut out), Err(ProtocolError::ZeroMethods));
        let many = Greeting {
            methods: vec![Method::NoAuth; 256],
        };
        assert_eq!(
            many.encode(&mut out),
            Err(ProtocolError::TooManyMethods(256))
        );
        assert!(out.is_empty());
    }

    #[test]
    fn methods() {
        for (octet, method) in [
            (0x00, Method::NoAuth),
            (0x01, Method::Gssapi),
            (0x02, Method::UserPass),
            (0xFF, Method::NoAcceptable),
            (0x80, Method::Other(0x80)),
        ] {
            assert_eq!(Method::from(octet), method);
            assert_eq!(u8::from(method), octet);
            let wire = [0x05, octet];
            let sel = MethodSelection { method };
            assert_eq!(MethodSelection::decode(&mut &wire[..]), Ok(Some(sel)));
            assert_eq!(encoded(|b| sel.encode(b)), wire);
            assert_prefixes_need_more(&wire, |b| MethodSelection::decode(b).map(|m| m.is_some()));
        }
        assert_eq!(
            MethodSelection::decode(&mut &[0x01, 0x00][..]),
            Err(ProtocolError::WrongVersion(1))
        );
    }

    #[test]
    fn every_command() {
        for &command in Command::ALL {
            let cmd = command.to_u8();
            let wire = [0x05, cmd, 0x00, 0x01, 10, 0, 0, 1, 0x1F, 0x90];
            let req = Request {
                command,
                address: ip("10.0.0.1:8080"),
            };
            assert_eq!(Request::decode(&mut &wire[..]), Ok(Some(req.clone())));
            assert_eq!(encoded(|b| req.encode(b).unwrap()), wire);
            assert_prefixes_need_more(&wire, |b| Request::decode(b).map(|m| m.is_some()));
        }
        assert_eq!(Command::ALL.len(), 4);
    }

    #[test]
    fn request_every_atyp() {
        let v6 = [
            0x05, 0x01, 0x00, 0x04, 0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0,
            80,
        ];
        let domain = [
            0x05, 0x01, 0x00, 0x03, 0x08, b'w', b'e', b'b', b'.', b't', b'e', b's', b't', 0, 80,
        ];
        let cases: [(&[u8], Address); 2] = [
            (&v6, ip("[2001:db8::2]:80")),
            (&domain, Address::Domain("web.test".into(), 80)),
        ];
        for (wire, address) in cases {
            let req = Request {
                command: Command::Connect,
                address,
            };
            assert_eq!(Request::decode(&mut &wire[..]), Ok(Some(req.clone())));
            assert_eq!(encoded(|b| req.encode(b).unwrap()), wire);
        }
    }

    #[test]
    fn pysocks_udp_associate_with_domain_zero() {
        // PySocks with rdns=True: UDP ASSOCIATE to ("0", local port 40000).
        let wire = [0x05, 0x03, 0x00, 0x03, 0x01, b'0', 0x9C, 0x40];
        let req = Request::decode(&mut &wire[..]).unwrap().unwrap();
        assert_eq!(req.command, Command::UdpAssociate);
        assert_eq!(req.address, Address::Domain("0".into(), 40000));
        assert!(req.address.is_unspecified_host());
    }

    #[test]
    fn request_malformed() {
        let cases: [(&[u8], ProtocolError); 6] = [
            (&[0x04, 0x01], ProtocolError::WrongVersion(4)),
            (&[0x05, 0x00], ProtocolError::UnknownCommand(0)),
            (&[0x05, 0x05, 0x00], ProtocolError::UnknownCommand(5)),
            (&[0x05, 0x01, 0x01, 0x01], ProtocolError::BadReserved(1)),
            (
                &[0x05, 0x01, 0x00, 0x02],
                ProtocolError::UnknownAddressType(2),
            ),
            (&[0x05, 0x01, 0x00, 0x03, 0x00], ProtocolError::EmptyDomain),
        ];
        for (wire, err) in cases {
            let mut buf = wire;
            assert_eq!(Request::decode(&mut buf), Err(err.clone()), "{wire:02x?}");
            assert_eq!(buf, wire, "an error consumes nothing");
        }
        assert_eq!(
            Request::decode(&mut &[0x05, 0x09][..])
                .unwrap_err()
                .reply_code(),
            Some(ReplyCode::CommandNotSupported)
        );
        assert_eq!(
            Request::decode(&mut &[0x05, 0x01, 0x00, 0x05][..])
                .unwrap_err()
                .reply_code(),
            Some(ReplyCode::AddressTypeNotSupported)
        );
    }

    #[test]
    fn every_reply_code() {
        for (octet, &code) in ReplyCode::ALL.iter().enumerate() {
            let octet = u8::try_from(octet).unwrap();
            assert_eq!(code.to_u8(), octet);
            let wire = [0x05, octet, 0x00, 0x01, 192, 0, 2, 1, 0x04, 0x38];
            let reply = Reply {
                code,
                address: ip("192.0.2.1:1080"),
            };
            assert_eq!(Reply::decode(&mut &wire[..]), Ok(Some(reply.clone())));
            assert_eq!(encoded(|b| reply.encode(b).unwrap()), wire);
            assert_prefixes_need_more(&wire, |b| Reply::decode(b).map(|m| m.is_some()));
        }
        assert_eq!(ReplyCode::ALL.len(), 9);
        assert_eq!(
            Reply::decode(&mut &[0x05, 0x09][..]),
            Err(ProtocolError::UnknownReplyCode(9))
        );
        assert_eq!(
            encoded(|b| Reply::failure(ReplyCode::NotAllowed).encode(b).unwrap()),
            [0x05, 0x02, 0x00, 0x01, 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn decodes_from_a_non_contiguous_buffer() {
        let wire = [0x05, 0x01, 0x00, 0x03, 0x01, b'a', 0x00, 0x50, 0xAA];
        for split in 0..wire.len() {
            let (a, b) = wire.split_at(split);
            let mut chain = a.chain(b);
            let req = Request::decode(&mut chain).unwrap().unwrap();
            assert_eq!(req.address, Address::Domain("a".into(), 80));
            assert_eq!(chain.remaining(), 1);
        }
    }

    #[test]
    fn decodes_from_a_wrapped_vec_deque() {
        let wire = [0x05, 0x03, 0x00, 0x01, 0, 0, 0, 0, 0x13, 0x88];
        let mut deque = std::collections::VecDeque::with_capacity(12);
        deque.extend([0xEE; 8]);
        for _ in 0..8 {
            deque.pop_front();
        }
        deque.extend(wire);
        assert!(!deque.as_slices().1.is_empty(), "the deque wraps around");
        let req = Request::decode(&mut deque).unwrap().unwrap();
        assert_eq!(req.address, ip("0.0.0.0:5000"));
        assert!(deque.is_empty());
    }

    #[test]
    fn decodes_back_to_back_messages() {
        let mut buf = BytesMut::from(&[0x05, 0x01, 0x00, 0x05, 0x02, 0x00, 0x02][..]);
        assert_eq!(
            Greeting::decode(&mut buf),
            Ok(Some(Greeting {
                methods: vec![Method::NoAuth]
            }))
        );
        assert_eq!(
            Greeting::decode(&mut buf),
            Ok(Some(Greeting {
                methods: vec![Method::NoAuth, Method::UserPass]
            }))
        );
        assert!(buf.is_empty());
    }

    fn command() -> impl Strategy<Value = Command> {
        proptest::sample::select(Command::ALL)
    }

    fn reply_code() -> impl Strategy<Value = ReplyCode> {
        proptest::sample::select(ReplyCode::ALL)
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            check_consumption(&bytes, |b| Greeting::decode(b).map(|m| m.is_some()))?;
            check_consumption(&bytes, |b| MethodSelection::decode(b).map(|m| m.is_some()))?;
            check_consumption(&bytes, |b| Request::decode(b).map(|m| m.is_some()))?;
            check_consumption(&bytes, |b| Reply::decode(b).map(|m| m.is_some()))?;
        }

        /// Requests with arbitrary address octets: whatever decodes re-encodes to its own octets.
        #[test]
        fn decoded_requests_are_canonical(
            command in 0u8..=5,
            atyp in prop_oneof![Just(1u8), Just(3), Just(4), any::<u8>()],
            rest in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let mut wire = vec![0x05, command, 0x00, atyp];
            wire.extend_from_slice(&rest);
            let mut buf = &wire[..];
            if let Ok(Some(req)) = Request::decode(&mut buf) {
                let used = wire.len() - buf.len();
                prop_assert_eq!(encoded(|b| req.encode(b).unwrap()), &wire[..used]);
            }
        }

        #[test]
        fn greeting_round_trip(methods in proptest::collection::vec(any::<u8>(), 1..=255)) {
            let g = Greeting { methods: methods.into_iter().map(Method::from).collect() };
            let wire = encoded(|b| g.encode(b).unwrap());
            prop_assert_eq!(Greeting::decode(&mut &wire[..]), Ok(Some(g)));
            assert_prefixes_need_more(&wire, |b| Greeting::decode(b).map(|m| m.is_some()));
        }

        #[test]
        fn request_round_trip(command in command(), address in address()) {
            let req = Request { command, address };
            let wire = encoded(|b| req.encode(b).unwrap());
            prop_assert_eq!(Request::decode(&mut &wire[..]), Ok(Some(req)));
            assert_prefixes_need_more(&wire, |b| Request::decode(b).map(|m| m.is_some()));
        }

        #[test]
        fn reply_round_trip(code in reply_code(), address in address()) {
            let reply = Reply { code, address };
            let wire = encoded(|b| reply.encode(b).unwrap());
            prop_assert_eq!(Reply::decode(&mut &wire[..]), Ok(Some(reply)));
            assert_prefixes_need_more(&wire, |b| Reply::decode(b).map(|m| m.is_some()));
        }
    }
}
