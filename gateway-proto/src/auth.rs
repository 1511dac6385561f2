//! RFC 1929 username/password sub-negotiation: the client's request and the server's status.
//!
//! Credentials are raw octets (RFC 1929 names no character set); comparing them, in constant
//! time, is the server's business, not the codec's.

use std::fmt;

use bytes::{Buf, BufMut};

use super::ProtocolError;
use super::wire::{decode_with, need};

/// The sub-negotiation version octet.
pub const AUTH_VERSION: u8 = 0x01;

/// The client's username/password request.
///
/// ```text
/// +-----+------+----------+------+----------+
/// | VER | ULEN |  UNAME   | PLEN |  PASSWD  |
/// +-----+------+----------+------+----------+
/// | 01  |  1   | 1 to 255 |  1   | 1 to 255 |
/// +-----+------+----------+------+----------+
/// ```
///
/// `Debug` does not print the password.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthRequest {
    /// `UNAME`, 1..255 octets.
    pub username: Vec<u8>,
    /// `PASSWD`, 1..255 octets.
    pub password: Vec<u8>,
}

impl AuthRequest {
    /// The largest request.
    pub const MAX_LEN: usize = 1 + 1 + 255 + 1 + 255;

    /// A request from anything that converts to octets.
    pub fn new(username: impl Into<Vec<u8>>, password: impl Into<Vec<u8>>) -> Self {
        Self {
            username: username.into(),
            password: password.into(),
        }
    }

    /// Reads a request. Empty fields are errors (RFC 1929 lengths are 1..255).
    pub fn decode(buf: &mut impl Buf) -> Result<Option<Self>, ProtocolError> {
        decode_with(buf, Self::MAX_LEN, |r| {
            let version = need!(r.u8());
            if version != AUTH_VERSION {
                return Err(ProtocolError::WrongAuthVersion(version));
            }
            let ulen = need!(r.u8());
            if ulen == 0 {
                return Err(ProtocolError::EmptyUsername);
            }
            let username = need!(r.take(usize::from(ulen)));
            let plen = need!(r.u8());
            if plen == 0 {
                return Err(ProtocolError::EmptyPassword);
            }
            let password = need!(r.take(usize::from(plen)));
            Ok(Some(Self::new(username, password)))
        })
    }

    /// Writes the request; both fields must be 1..255 octets.
    pub fn encode(&self, buf: &mut impl BufMut) -> Result<(), ProtocolError> {
        let ulen = field_len("username", &self.username, ProtocolError::EmptyUsername)?;
        let plen = field_len("password", &self.password, ProtocolError::EmptyPassword)?;
        buf.put_u8(AUTH_VERSION);
        buf.put_u8(ulen);
        buf.put_slice(&self.username);
        buf.put_u8(plen);
        buf.put_slice(&self.password);
        Ok(())
    }
}

fn field_len(field: &'static str, value: &[u8], empty: ProtocolError) -> Result<u8, ProtocolError> {
    if value.is_empty() {
        return Err(empty);
    }
    u8::try_from(value.len()).map_err(|_| ProtocolError::CredentialTooLong {
        field,
        len: value.len(),
    })
}

impl fmt::Debug for AuthRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthRequest")
            .field("username", &String::from_utf8_lossy(&self.username))
            .field("password", &"<redacted>")
            .finish()
    }
}

/// The server's status.
///
/// ```text
/// +-----+--------+
/// | VER | STATUS |
/// +-----+--------+
/// | 01  |   1    |
/// +-----+--------+
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthReply {
    /// `STATUS`: `00` success, anything else failure.
    pub status: u8,
}

impl AuthReply {
    /// The encoded length.
    pub const LEN: usize = 2;
    /// `01 00`: success.
    pub const SUCCESS: Self = Self { status: 0x00 };
    /// `01 01`: failure; the server closes the connection after sending it.
    pub const FAILURE: Self = Self { status: 0x01 };

    /// Whether the status is `00`.
    pub const fn is_success(self) -> bool {
        self.status == 0
    }

    /// Reads a status.
    pub fn decode(buf: &mut impl Buf) -> Result<Option<Self>, ProtocolError> {
        decode_with(buf, Self::LEN, |r| {
            let version = need!(r.u8());
            if version != AUTH_VERSION {
                return Err(ProtocolError::WrongAuthVersion(version));
            }
            Ok(Some(Self {
                status: need!(r.u8()),
            }))
        })
    }

    /// Writes the status.
    pub fn encode(&self, buf: &mut impl BufMut) {
        buf.put_u8(AUTH_VERSION);
        buf.put_u8(self.status);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::strategies::{assert_prefixes_need_more, check_consumption};

    #[test]
    fn request() {
        let wire = [0x01, 0x03, b'b', b'o', b'b', 0x02, b'p', b'w'];
        let req = AuthRequest::new("bob", "pw");
        assert_eq!(AuthRequest::decode(&mut &wire[..]), Ok(Some(req.clone())));
        let mut out = Vec::new();
        req.encode(&mut out).unwrap();
        assert_eq!(out, wire);
        assert_prefixes_need_more(&wire, |b| AuthRequest::decode(b).map(|m| m.is_some()));
    }

    #[test]
    fn request_malformed() {
        let cases: [(&[u8], ProtocolError); 3] = [
            (&[0x05, 0x01], ProtocolError::WrongAuthVersion(5)),
            (&[0x01, 0x00], ProtocolError::EmptyUsername),
            (&[0x01, 0x01, b'a', 0x00], ProtocolError::EmptyPassword),
        ];
        for (wire, err) in cases {
            assert_eq!(AuthRequest::decode(&mut &wire[..]), Err(err));
        }
        let mut out = Vec::new();
        assert_eq!(
            AuthRequest::new("", "pw").encode(&mut out),
            Err(ProtocolError::EmptyUsername)
        );
        assert_eq!(
            AuthRequest::new("bob", "").encode(&mut out),
            Err(ProtocolError::EmptyPassword)
        );
        assert_eq!(
            AuthRequest::new("bob", vec![b'x'; 256]).encode(&mut out),
            Err(ProtocolError::CredentialTooLong {
                field: "password",
                len: 256
            })
        );
        assert!(out.is_empty());
    }

    #[test]
    fn longest_credentials() {
        let req = AuthRequest::new(vec![0xFF; 255], vec![0x00; 255]);
        let mut out = Vec::new();
        req.encode(&mut out).unwrap();
        assert_eq!(out.len(), AuthRequest::MAX_LEN);
        assert_eq!(AuthRequest::decode(&mut &out[..]), Ok(Some(req)));
    }

    #[test]
    fn debug_hides_the_password() {
        let shown = format!("{:?}", AuthRequest::new("bob", "hunter2"));
        assert!(
            shown.contains("bob") && !shown.contains("hunter2"),
            "{shown}"
        );
    }

    #[test]
    fn replies() {
        for (reply, wire, ok) in [
            (AuthReply::SUCCESS, [0x01, 0x00], true),
            (AuthReply::FAILURE, [0x01, 0x01], false),
            (AuthReply { status: 0x7F }, [0x01, 0x7F], false),
        ] {
            assert_eq!(AuthReply::decode(&mut &wire[..]), Ok(Some(reply)));
            assert_eq!(reply.is_success(), ok);
            let mut out = Vec::new();
            reply.encode(&mut out);
            assert_eq!(out, wire);
            assert_prefixes_need_more(&wire, |b| AuthReply::decode(b).map(|m| m.is_some()));
        }
        assert_eq!(
            AuthReply::decode(&mut &[0x05, 0x00][..]),
            Err(ProtocolError::WrongAuthVersion(5))
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            check_consumption(&bytes, |b| AuthRequest::decode(b).map(|m| m.is_some()))?;
            check_consumption(&bytes, |b| AuthReply::decode(b).map(|m| m.is_some()))?;
        }

        #[test]
        fn round_trip(
            username in proptest::collection::vec(any::<u8>(), 1..=255),
            password in proptest::collection::vec(any::<u8>(), 1..=255),
        ) {
            let req = AuthRequest { username, password };
            let mut wire = Vec::new();
            req.encode(&mut wire).unwrap();
            prop_assert_eq!(AuthRequest::decode(&mut &wire[..]), Ok(Some(req)));
            assert_prefixes_need_more(&wire, |b| AuthRequest::decode(b).map(|m| m.is_some()));
        }
    }
}
