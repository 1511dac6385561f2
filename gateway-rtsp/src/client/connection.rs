//! The RTSP control connection of the client: requests with increasing `CSeq`, the session id
//! once the server has given one, and responses matched by `CSeq`, every exchange bounded by a
//! timeout. The stream is the TCP stream the gateway relays after a SOCKS CONNECT.

use std::time::Duration;

use bytes::BytesMut;
use rtsp_types::{
    Message, Method, Response, StatusCode, Url,
    headers::{self, HeaderName},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use crate::{ParseError, RtspError, message};

/// The name of a method for messages.
pub(crate) fn method_name(method: &Method) -> &'static str {
    match method {
        Method::Options => "OPTIONS",
        Method::Describe => "DESCRIBE",
        Method::Setup => "SETUP",
        Method::Play => "PLAY",
        Method::Teardown => "TEARDOWN",
        Method::GetParameter => "GET_PARAMETER",
        _ => "request",
    }
}

/// One RTSP control connection.
#[derive(Debug)]
pub(crate) struct Control {
    stream: TcpStream,
    buffer: BytesMut,
    cseq: u32,
    timeout: Duration,
    /// The session id from the first SETUP reply; sent with every later request.
    pub(crate) session: Option<String>,
}

impl Control {
    pub(crate) fn new(stream: TcpStream, timeout: Duration) -> Self {
        Self {
            stream,
            buffer: BytesMut::with_capacity(4096),
            cseq: 0,
            timeout,
            session: None,
        }
    }

    /// Sends a request and waits for its response (any status), within the timeout.
    pub(crate) async fn request(
        &mut self,
        method: Method,
        url: &Url,
        mut extra: Vec<(HeaderName, String)>,
    ) -> Result<Response<Vec<u8>>, RtspError> {
        let name = method_name(&method);
        self.cseq += 1;
        if let Some(session) = &self.session {
            extra.push((headers::SESSION, session.clone()));
        }
        let bytes = message::request(method, url, self.cseq, &extra);
        let after = self.timeout;
        tokio::time::timeout(after, self.exchange(&bytes, name))
            .await
            .map_err(|_| RtspError::Timeout {
                method: name,
                after,
            })?
    }

    /// Like [`Control::request`], then fails with [`RtspError::Refused`] unless the status is 2xx.
    pub(crate) async fn expect_success(
        &mut self,
        method: Method,
        url: &Url,
        extra: Vec<(HeaderName, String)>,
    ) -> Result<Response<Vec<u8>>, RtspError> {
        let name = method_name(&method);
        let response = self.request(method, url, extra).await?;
        check(name, &response)?;
        Ok(response)
    }

    async fn exchange(
        &mut self,
        bytes: &[u8],
        name: &'static str,
    ) -> Result<Response<Vec<u8>>, RtspError> {
        self.stream.write_all(bytes).await?;
        loop {
            match message::decode(&mut self.buffer)? {
                Some(Message::Response(response)) => match message::cseq(&response) {
                    Some(cseq) if cseq == self.cseq => return Ok(response),
                    // An answer to an earlier request that timed out: skip it.
                    Some(_) => {}
                    None => {
                        return Err(ParseError::header(
                            "CSeq",
                            "",
                            format!("missing or not a number in the answer to {name}"),
                        )
                        .into());
                    }
                },
                Some(Message::Request(request)) => {
                    // A server's own request (GET_PARAMETER keepalive, ANNOUNCE): not supported.
                    let cseq = request
                        .header(&headers::CSEQ)
                        .map(|value| value.as_str().to_owned());
                    let answer =
                        message::response(StatusCode::NotImplemented, cseq.as_deref(), &[], b"");
                    self.stream.write_all(&answer).await?;
                }
                Some(Message::Data(_)) => {}
                None => {
                    if self.stream.read_buf(&mut self.buffer).await? == 0 {
                        return Err(RtspError::Closed(name));
                    }
                }
            }
        }
    }
}

/// [`RtspError::Refused`] unless `response` is 2xx.
pub(crate) fn check(method: &'static str, response: &Response<Vec<u8>>) -> Result<(), RtspError> {
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(RtspError::Refused {
            method,
            status: u16::from(status),
            reason: response.reason_phrase().chars().take(120).collect(),
        })
    }
}
