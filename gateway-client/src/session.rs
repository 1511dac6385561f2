//! The enhanced-mode control connection on the client side: a reader task that matches replies
//! to requests by TID, a writer task that puts whole packets on the wire (so a cancelled caller
//! never leaves half a packet behind), and the TIDs of the connection.
//!
//! Owns the connection, not the bindings: [`super::UdpBinding`] and [`super::RtpPair`] keep a
//! handle on the session and decide what to send. The session ends when the gateway closes the
//! connection, when a packet cannot be written in time, or when the last handle is dropped; the
//! gateway then releases every binding made on it.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};
use tracing::debug;

use super::{BindOptions, ClientError, Family, RtpPair, Timeouts, UdpBinding, exchange::Tids};
use gateway_proto::enhanced::{ControlReply, ControlRequest, EnhancedReplyCode, Packet};

/// Packets waiting for the writer task; callers wait (bounded) when it is full.
const WRITE_QUEUE: usize = 64;

/// One control connection in the enhanced UDP mode. It carries any number of bindings; cloning
/// the value shares the connection.
///
/// Replies are matched to requests by TID, so bindings may be used from several tasks at once.
/// Every control request is bounded by [`Timeouts::control`]. A step 1 that timed out is never
/// sent again (the gateway would read the repeat as a step 2 Listen); its TID is retired and a
/// late success is released.
///
/// # Examples
///
/// ```no_run
/// use gateway_client::{Client, Family};
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let proxy = "198.51.100.1:1080".parse()?;
/// let session = Client::connect(proxy, None).await?.enhanced().await?;
/// // Two bindings on one control connection.
/// let audio = session.udp_socket(Family::V4).await?;
/// let video = session.udp_socket(Family::V4).await?;
/// println!("audio at {}", audio.bind().await?.external);
/// println!("video at {}", video.bind().await?.external);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct EnhancedSession {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    link: Arc<Link>,
    frames: mpsc::Sender<Bytes>,
    reader: JoinHandle<()>,
    local_ip: IpAddr,
    proxy: SocketAddr,
    timeouts: Timeouts,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // The writer flushes what is queued (RELEASEs of dropped bindings), then its end of the
        // stream is shut down when the last sender is gone.
        self.reader.abort();
    }
}

/// What the reader, the writer and the callers share.
#[derive(Debug)]
struct Link {
    state: Mutex<State>,
    closed: watch::Sender<bool>,
}

#[derive(Debug, Default)]
struct State {
    /// Callers waiting for the reply to their TID.
    pending: HashMap<u16, oneshot::Sender<ControlReply>>,
    /// TIDs in use on this connection.
    tids: Tids,
    /// Step-1 TIDs whose caller gave up: a late success is released, the TID never reused.
    abandoned: HashSet<u16>,
    /// Why the session ended.
    closed: Option<String>,
}

impl Link {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Ends the session: waiting callers get [`ClientError::SessionClosed`].
    fn close(&self, reason: String) {
        let mut state = self.lock();
        if state.closed.is_none() {
            debug!(%reason, "enhanced-mode session closed");
            state.closed = Some(reason);
        }
        state.pending.clear();
        drop(state);
        self.closed.send_replace(true);
    }

    fn closed_error(&self) -> ClientError {
        let reason = self.lock().closed.clone();
        ClientError::SessionClosed(reason.unwrap_or_else(|| "the connection ended".to_owned()))
    }
}

impl EnhancedSession {
    /// Takes over a control connection that has just entered the enhanced mode.
    pub(super) fn start(
        stream: TcpStream,
        proxy: SocketAddr,
        timeouts: Timeouts,
    ) -> Result<Self, ClientError> {
        let local_ip = stream.local_addr()?.ip();
        let (read, write) = stream.into_split();
        let link = Arc::new(Link {
            state: Mutex::new(State::default()),
            closed: watch::Sender::new(false),
        });
        let (frames, queue) = mpsc::channel(WRITE_QUEUE);
        tokio::spawn(write_packets(
            write,
            queue,
            Arc::clone(&link),
            timeouts.control,
        ));
        let reader = tokio::spawn(read_packets(read, Arc::clone(&link), frames.clone()));
        Ok(Self {
            shared: Arc::new(Shared {
                link,
                frames,
                reader,
                local_ip,
                proxy,
                timeouts,
            }),
        })
    }

    /// The local IP of the control connection: every binding's LOCAL, since the gateway accepts
    /// no other (protocol.md section 3).
    pub fn local_ip(&self) -> IpAddr {
        self.shared.local_ip
    }

    /// The gateway's control address.
    pub fn proxy_addr(&self) -> SocketAddr {
        self.shared.proxy
    }

    /// The timeouts of this session.
    pub fn timeouts(&self) -> Timeouts {
        self.shared.timeouts
    }

    /// Whether the control connection has ended.
    pub fn is_closed(&self) -> bool {
        self.shared.link.lock().closed.is_some()
    }

    /// Resolves when the control connection ends (the gateway closed it, or it failed).
    pub async fn closed(&self) {
        let mut closed = self.shared.link.closed.subscribe();
        let _ = closed.wait_for(|closed| *closed).await;
    }

    /// Closes the control connection now; the gateway releases every binding made on it, and
    /// calls on them fail with [`ClientError::SessionClosed`]. Dropping every handle (the session
    /// and its bindings) closes it too.
    pub fn close(&self) {
        self.shared.link.close("closed by the client".to_owned());
        self.shared.reader.abort();
    }

    /// A new binding, like `socket(family, SOCK_DGRAM)`: a local UDP socket on
    /// [`EnhancedSession::local_ip`], nothing sent yet. `family` is the family of the remote
    /// side (and so of the external relay address). Its datagrams carry the 8-octet header.
    pub async fn udp_socket(&self, family: Family) -> Result<UdpBinding, ClientError> {
        self.udp_socket_with(family, BindOptions::default()).await
    }

    /// [`EnhancedSession::udp_socket`] asking for `options` in each of its UDP BINDs; with
    /// [`BindOptions::raw`], see [`UdpBinding::is_raw`] for whether the gateway granted it.
    pub async fn udp_socket_with(
        &self,
        family: Family,
        options: BindOptions,
    ) -> Result<UdpBinding, ClientError> {
        UdpBinding::new(self.clone(), family, options).await
    }

    /// A bound RTP pair: local sockets on an even/odd pair L, L+1 and a step 1 with RTP-PAIR, so
    /// the gateway reserves external relay ports P, P+1 (advertise P in the SETUP request).
    pub async fn bind_rtp_pair(&self, family: Family) -> Result<RtpPair, ClientError> {
        self.bind_rtp_pair_with(family, BindOptions::default())
            .await
    }

    /// [`EnhancedSession::bind_rtp_pair`] asking for `options` in step 1 and step 2; with
    /// [`BindOptions::raw`], see [`RtpPair::is_raw`] for whether the gateway granted it.
    pub async fn bind_rtp_pair_with(
        &self,
        family: Family,
        options: BindOptions,
    ) -> Result<RtpPair, ClientError> {
        RtpPair::bind(self.clone(), family, options).await
    }

    /// A fresh TID for a new binding.
    pub(super) fn allocate_tid(&self) -> Result<u16, ClientError> {
        self.shared
            .link
            .lock()
            .tids
            .allocate()
            .ok_or(ClientError::TidsExhausted)
    }

    /// Returns a TID whose binding is gone (released, or never made).
    pub(super) fn free_tid(&self, tid: u16) {
        self.shared.link.lock().tids.free(tid);
    }

    /// Retires the TID of a step 1 that got no answer: it stays taken, and if the gateway's
    /// success arrives after all, the binding is released.
    pub(super) fn abandon(&self, tid: u16) {
        self.shared.link.lock().abandoned.insert(tid);
    }

    /// Sends `request` and waits for the reply with its TID, within [`Timeouts::control`].
    pub(super) async fn request(
        &self,
        request: &ControlRequest,
        operation: &'static str,
    ) -> Result<ControlReply, ClientError> {
        let mut frame = BytesMut::with_capacity(request.encoded_len());
        request.encode(&mut frame)?;
        let link = &self.shared.link;
        let (tx, rx) = oneshot::channel();
        {
            let mut state = link.lock();
            if state.closed.is_some() {
                drop(state);
                return Err(link.closed_error());
            }
            state.pending.insert(request.tid, tx);
        }
        let after = self.shared.timeouts.control;
        let exchange = async {
            self.shared
                .frames
                .send(frame.freeze())
                .await
                .map_err(|_| link.closed_error())?;
            rx.await.map_err(|_| link.closed_error())
        };
        if let Ok(result) = tokio::time::timeout(after, exchange).await {
            result
        } else {
            link.lock().pending.remove(&request.tid);
            Err(ClientError::Timeout { operation, after })
        }
    }

    /// Queues `request` without waiting for room or for the reply (a RELEASE from `Drop`).
    pub(super) fn send_unanswered(&self, request: &ControlRequest) {
        let mut frame = BytesMut::with_capacity(request.encoded_len());
        if request.encode(&mut frame).is_ok() {
            let _ = self.shared.frames.try_send(frame.freeze());
        }
    }
}

/// The writer task: whole packets, each within `after`; a failure ends the session.
async fn write_packets(
    mut write: OwnedWriteHalf,
    mut queue: mpsc::Receiver<Bytes>,
    link: Arc<Link>,
    after: Duration,
) {
    let mut closed = link.closed.subscribe();
    loop {
        let frame = tokio::select! {
            frame = queue.recv() => frame,
            // Closed by the client or by the reader: stop writing, drop the write half.
            _ = closed.wait_for(|closed| *closed) => return,
        };
        let Some(frame) = frame else { break };
        let reason = match tokio::time::timeout(after, write.write_all(&frame)).await {
            Ok(Ok(())) => continue,
            Ok(Err(error)) => format!("write to the gateway: {error}"),
            Err(_) => format!("write to the gateway timed out after {after:?}"),
        };
        link.close(reason);
        return;
    }
    // Every handle is gone: dropping the write half sends FIN, and the gateway releases the
    // bindings of this connection.
}

/// The reader task: replies to their callers, until the connection ends.
async fn read_packets(mut read: OwnedReadHalf, link: Arc<Link>, frames: mpsc::Sender<Bytes>) {
    let mut buffer = BytesMut::with_capacity(4096);
    let reason = loop {
        match Packet::decode(&mut buffer) {
            Ok(Some(Packet::Reply(reply))) => on_reply(&link, &frames, reply),
            Ok(Some(Packet::Datagram(datagram))) => {
                // No binding of this library asks for TCP encapsulation.
                debug!(aid = datagram.aid, "TCP-encapsulated datagram dropped");
            }
            Ok(Some(Packet::Request(_))) => break "the gateway sent a control request".to_owned(),
            Ok(None) if buffer.len() > super::exchange::MAX_BUFFERED => {
                break "the gateway sent an oversized packet".to_owned();
            }
            Ok(None) => match read.read_buf(&mut buffer).await {
                Ok(0) => break "the gateway closed the control connection".to_owned(),
                Ok(_) => {}
                Err(error) => break format!("read from the gateway: {error}"),
            },
            Err(error) => break format!("malformed packet from the gateway: {error}"),
        }
    };
    link.close(reason);
}

fn on_reply(link: &Link, frames: &mpsc::Sender<Bytes>, reply: ControlReply) {
    let mut state = link.lock();
    if let Some(waiter) = state.pending.remove(&reply.tid) {
        let _ = waiter.send(reply);
        return;
    }
    if state.abandoned.remove(&reply.tid)
        && reply.code == EnhancedReplyCode::Succeeded
        && reply.aid != 0
    {
        // A step 1 answered after its caller gave up: nobody knows its relay addresses, so
        // release it now rather than leave it half-bound until it expires.
        let request = super::exchange::release_request(reply.tid, reply.aid);
        let mut frame = BytesMut::with_capacity(request.encoded_len());
        if request.encode(&mut frame).is_ok() {
            let _ = frames.try_send(frame.freeze());
        }
        debug!(
            tid = reply.tid,
            aid = reply.aid,
            "late step-1 reply: released"
        );
        return;
    }
    debug!(tid = reply.tid, code = ?reply.code, "reply for no outstanding request dropped");
}
