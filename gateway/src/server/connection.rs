//! A control connection: the TCP stream and its read buffer. Reads whole messages with the
//! sans-IO decoders; writes encoded messages. Knows no SOCKS semantics.

use bytes::BytesMut;
use thiserror::Error;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use gateway_proto::ProtocolError;

/// Largest message we buffer before deciding it is malformed (a request is at most 262 octets,
/// an enhanced control packet at most a few hundred).
const MAX_BUFFERED: usize = 64 * 1024;

#[derive(Debug, Error)]
pub enum ConnectionError {
    #[error("peer closed the connection")]
    Closed,
    #[error("malformed message: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("message larger than {MAX_BUFFERED} octets")]
    TooLarge,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug)]
pub struct Connection {
    pub stream: TcpStream,
    buffer: BytesMut,
}

impl Connection {
    pub fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            buffer: BytesMut::with_capacity(512),
        }
    }

    /// A connection handed over with the octets already read from it.
    pub fn with_buffer(stream: TcpStream, buffer: BytesMut) -> Self {
        Self { stream, buffer }
    }

    /// Reads until `decode` yields a whole message. `decode` must consume nothing when it returns
    /// `Ok(None)`.
    pub async fn read_message<T>(
        &mut self,
        mut decode: impl FnMut(&mut BytesMut) -> Result<Option<T>, ProtocolError>,
    ) -> Result<T, ConnectionError> {
        loop {
            if let Some(message) = decode(&mut self.buffer)? {
                return Ok(message);
            }
            if self.buffer.len() >= MAX_BUFFERED {
                return Err(ConnectionError::TooLarge);
            }
            if self.stream.read_buf(&mut self.buffer).await? == 0 {
                return Err(ConnectionError::Closed);
            }
        }
    }

    /// A whole message already buffered, without reading; `Ok(None)` when none is.
    pub fn buffered_message<T>(
        &mut self,
        decode: impl FnOnce(&mut BytesMut) -> Result<Option<T>, ProtocolError>,
    ) -> Result<Option<T>, ConnectionError> {
        Ok(decode(&mut self.buffer)?)
    }

    /// Waits until the peer closes the connection (EOF or error), discarding anything it sends.
    pub async fn wait_closed(&mut self) {
        loop {
            self.buffer.clear();
            match self.stream.read_buf(&mut self.buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    pub async fn write_all(&mut self, bytes: &[u8]) -> Result<(), ConnectionError> {
        self.stream.write_all(bytes).await?;
        Ok(())
    }

    /// The stream and the bytes the client already sent beyond the last message (before our
    /// reply); those belong to the relayed stream.
    pub fn into_parts(self) -> (TcpStream, BytesMut) {
        (self.stream, self.buffer)
    }
}
