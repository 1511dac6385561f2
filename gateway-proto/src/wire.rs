//! Byte-level plumbing shared by the codecs: a non-consuming view of a `Buf`, a bounds-checked
//! reader over it, and the helpers that turn "parsed N octets" into "advance the buffer by N".
//!
//! Parsers read from a [`Reader`] whose accessors return `None` when the input ends; the
//! [`need!`] macro turns that into `Ok(None)` ("need more bytes"). Nothing here consumes from the
//! caller's buffer unless a whole message was parsed.

use std::borrow::Cow;
use std::io::IoSlice;

use bytes::Buf;

use super::ProtocolError;

/// How many `IoSlice`s a non-contiguous buffer is gathered from.
const MAX_SLICES: usize = 64;

/// Unwraps an `Option` from a [`Reader`] accessor, returning `Ok(None)` when input ran out.
macro_rules! need {
    ($e:expr) => {
        match $e {
            Some(v) => v,
            None => return Ok(None),
        }
    };
}
pub(crate) use need;

/// Defines a `#[repr(u8)]` enum of wire codes with `TryFrom<u8>` (unknown octets give the named
/// `ProtocolError` variant), `From<Self> for u8` and an `ALL` list.
macro_rules! byte_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident (unknown: $err:path) {
            $( $(#[$vmeta:meta])* $variant:ident = $value:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum $name {
            $( $(#[$vmeta])* $variant = $value, )+
        }

        impl $name {
            /// Every variant, in wire order.
            pub const ALL: &[Self] = &[$(Self::$variant),+];

            /// The octet on the wire.
            pub const fn to_u8(self) -> u8 {
                self as u8
            }
        }

        impl From<$name> for u8 {
            fn from(value: $name) -> u8 {
                value as u8
            }
        }

        impl TryFrom<u8> for $name {
            type Error = ProtocolError;

            fn try_from(value: u8) -> Result<Self, ProtocolError> {
                match value {
                    $( $value => Ok(Self::$variant), )+
                    other => Err($err(other)),
                }
            }
        }
    };
}
pub(crate) use byte_enum;

/// A cursor over a byte slice whose accessors return `None` past the end instead of panicking.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    /// Octets read so far.
    pub(crate) fn consumed(&self) -> usize {
        self.pos
    }

    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let out = self.bytes.get(self.pos..end)?;
        self.pos = end;
        Some(out)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    pub(crate) fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|[b]| b)
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }
}

/// The first `min(max_len, remaining)` octets of `buf` without consuming them: borrowed when the
/// buffer is contiguous there (`BytesMut`, `Bytes`, `&[u8]`), gathered through
/// `Buf::chunks_vectored` otherwise (`Chain`, `VecDeque<u8>`).
pub(crate) fn view<B: Buf>(buf: &B, max_len: usize) -> Cow<'_, [u8]> {
    let want = buf.remaining().min(max_len);
    let chunk = buf.chunk();
    if chunk.len() >= want {
        return Cow::Borrowed(chunk);
    }
    let mut slices = [IoSlice::new(&[]); MAX_SLICES];
    let n = buf.chunks_vectored(&mut slices);
    let mut out = Vec::with_capacity(want);
    for slice in &slices[..n] {
        let take = (want - out.len()).min(slice.len());
        out.extend_from_slice(&slice[..take]);
        if out.len() == want {
            break;
        }
    }
    Cow::Owned(out)
}

/// Runs `parse` over a view of at most `max_len` octets of `buf` and, when it yields a message,
/// advances `buf` past the octets it read. `Ok(None)` and errors leave `buf` untouched.
pub(crate) fn decode_with<B: Buf, T>(
    buf: &mut B,
    max_len: usize,
    parse: impl FnOnce(&mut Reader<'_>) -> Result<Option<T>, ProtocolError>,
) -> Result<Option<T>, ProtocolError> {
    let (msg, used) = {
        let bytes = view(buf, max_len);
        let mut reader = Reader::new(&bytes);
        match parse(&mut reader)? {
            Some(msg) => (msg, reader.consumed()),
            None => return Ok(None),
        }
    };
    buf.advance(used);
    Ok(Some(msg))
}

/// Like [`decode_with`] for a header at the start of a datagram: the datagram is complete, so
/// running out of input is [`ProtocolError::Truncated`]. On success `buf` is left at the payload.
pub(crate) fn decode_datagram_with<B: Buf, T>(
    buf: &mut B,
    max_len: usize,
    parse: impl FnOnce(&mut Reader<'_>) -> Result<Option<T>, ProtocolError>,
) -> Result<T, ProtocolError> {
    decode_with(buf, max_len, parse)?.ok_or(ProtocolError::Truncated)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_stops_at_the_end() {
        let mut r = Reader::new(&[1, 2, 3]);
        assert_eq!(r.u16(), Some(0x0102));
        assert_eq!(r.u16(), None);
        assert_eq!(r.u8(), Some(3));
        assert_eq!(r.u8(), None);
        assert_eq!(r.take(usize::MAX), None);
        assert_eq!(r.consumed(), 3);
    }

    #[test]
    fn view_gathers_a_chain() {
        let a: &[u8] = &[1, 2];
        let b: &[u8] = &[3, 4, 5];
        let chain = a.chain(b);
        assert_eq!(&*view(&chain, 4), &[1, 2, 3, 4]);
        assert_eq!(&*view(&chain, 100), &[1, 2, 3, 4, 5]);
        assert_eq!(&*view(&chain, 1), &[1, 2]);
    }
}
