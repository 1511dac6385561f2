//! The handover channel: one `SOCK_SEQPACKET` Unix socket pair (message boundaries kept,
//! descriptors travel with the message they belong to). Three kinds of frames, told apart by
//! their first octet: `M` a control message (JSON of [`Message`]), `C` a chunk of the state
//! document, `F` a batch of descriptors. Blocking, with a timeout per receive: both daemons run
//! it on a blocking thread.
//!
//! The control messages are the envelope every build understands; only the state document
//! (`C` frames) carries a version.

use std::{
    io::{self, IoSlice, IoSliceMut},
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
    time::Duration,
};

use nix::{
    cmsg_space,
    sys::{
        socket::{
            AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
            recvmsg, sendmsg, setsockopt, socketpair, sockopt,
        },
        time::TimeVal,
    },
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Largest state chunk per frame (the socket's send buffer must hold one frame).
const CHUNK: usize = 32 * 1024;
/// Most descriptors per frame (the kernel's limit is 253).
const FDS_PER_FRAME: usize = 200;
/// Largest frame a receiver accepts.
const MAX_FRAME: usize = CHUNK + 1;
/// Largest state document a receiver accepts (100,000 bindings are about 40 MB of JSON).
const MAX_STATE: usize = 512 << 20;
/// Most descriptors a receiver accepts in one handover.
const MAX_FDS: usize = 1 << 20;

/// The control messages of the handover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "message", rename_all = "snake_case")]
pub enum Message {
    /// O to N: the state format O writes.
    Offer {
        version: u32,
        pid: u32,
        gateway_version: String,
    },
    /// N to O: N reads that format; O may quiesce.
    Accept { pid: u32 },
    /// N to O: N cannot take over (`reason` says why); O keeps serving.
    Refuse { reason: String },
    /// O to N: the whole state and every descriptor were sent.
    StateEnd { bytes: u64, fds: u64 },
    /// N to O: N holds everything and the service manager knows N; O may go.
    Ready { pid: u32 },
    /// N to O: N could not take over (`reason`); N exits, O resumes.
    Failed { reason: String },
    /// O to N: O stops now; N serves.
    Done,
}

#[derive(Debug, Error)]
pub enum WireError {
    #[error("handover channel: {0}")]
    Io(#[from] io::Error),
    #[error("the other daemon closed the handover channel")]
    Closed,
    #[error("no answer from the other daemon within {0:?}")]
    Timeout(Duration),
    #[error("malformed handover frame: {0}")]
    Malformed(String),
    #[error("expected {expected}, got {got:?}")]
    Unexpected {
        expected: &'static str,
        got: Message,
    },
}

fn io(error: nix::Error) -> WireError {
    WireError::Io(io::Error::from(error))
}

/// One end of the handover socket pair.
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
}

/// One received frame.
enum Frame {
    Message(Message),
    Chunk(Vec<u8>),
    Fds(Vec<OwnedFd>),
}

impl Channel {
    /// A connected pair (both ends close on exec; [`Channel::inheritable`] clears that for the
    /// end a child gets).
    pub fn pair() -> Result<(Channel, Channel), WireError> {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(io)?;
        Ok((Channel { fd: a }, Channel { fd: b }))
    }

    /// The end whose number is in [`super::CHANNEL_FD_ENV`], if the variable is set (the
    /// variable is removed, so nothing started later inherits the meaning). Call it while the
    /// process has one thread: it changes the environment.
    pub fn from_env() -> Option<Result<Channel, WireError>> {
        let value = std::env::var(super::CHANNEL_FD_ENV).ok()?;
        // SAFETY: the daemon calls this before it starts the runtime, while it has one thread.
        unsafe { std::env::remove_var(super::CHANNEL_FD_ENV) };
        let fd: RawFd = match value.parse() {
            Ok(fd) if fd > 2 => fd,
            _ => {
                return Some(Err(WireError::Malformed(format!(
                    "{} = {value:?} is not a descriptor",
                    super::CHANNEL_FD_ENV
                ))));
            }
        };
        // The descriptor must be an open Unix socket; anything else is refused, not adopted.
        if nix::sys::socket::getsockopt(
            // SAFETY: only borrowed for the check; owned below once it is known to be a socket.
            &unsafe { BorrowedFd::borrow_raw(fd) },
            sockopt::SockType,
        ) != Ok(SockType::SeqPacket)
        {
            return Some(Err(WireError::Malformed(format!(
                "descriptor {fd} is not a handover socket"
            ))));
        }
        // SAFETY: the parent passed this descriptor for us alone; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let _ = nix::fcntl::fcntl(
            &fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
        Some(Ok(Channel { fd }))
    }

    /// Makes this end survive `exec` (for the child) and returns its number.
    pub fn inheritable(&self) -> Result<RawFd, WireError> {
        nix::fcntl::fcntl(
            &self.fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )
        .map_err(io)?;
        Ok(self.fd.as_raw_fd())
    }

    fn send_frame(&self, tag: u8, payload: &[u8], fds: &[RawFd]) -> Result<(), WireError> {
        let tag = [tag];
        let iov = [IoSlice::new(&tag), IoSlice::new(payload)];
        let rights = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
        loop {
            match sendmsg::<()>(
                self.fd.as_raw_fd(),
                &iov,
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(_) => return Ok(()),
                Err(nix::Error::EINTR) => {}
                Err(nix::Error::EPIPE | nix::Error::ECONNRESET) => return Err(WireError::Closed),
                Err(error) => return Err(io(error)),
            }
        }
    }

    fn recv_frame(&self, timeout: Duration) -> Result<Frame, WireError> {
        let micros = i64::try_from(timeout.as_micros())
            .unwrap_or(i64::MAX)
            .max(1);
        setsockopt(
            &self.fd,
            sockopt::ReceiveTimeout,
            &TimeVal::new(micros / 1_000_000, micros % 1_000_000),
        )
        .map_err(io)?;
        let mut buf = vec![0u8; MAX_FRAME];
        let mut space = cmsg_space!([RawFd; FDS_PER_FRAME]);
        let (len, fds, truncated) = loop {
            let mut iov = [IoSliceMut::new(&mut buf)];
            match recvmsg::<()>(
                self.fd.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(msg) => {
                    let mut fds = Vec::new();
                    for cmsg in msg.cmsgs().map_err(io)? {
                        if let ControlMessageOwned::ScmRights(raw) = cmsg {
                            // SAFETY: the kernel just installed these descriptors for us.
                            fds.extend(
                                raw.into_iter()
                                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                            );
                        }
                    }
                    let truncated = msg
                        .flags
                        .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
                    break (msg.bytes, fds, truncated);
                }
                Err(nix::Error::EINTR) => {}
                Err(nix::Error::EAGAIN) => return Err(WireError::Timeout(timeout)),
                Err(error) => return Err(io(error)),
            }
        };
        if truncated {
            return Err(WireError::Malformed(
                "frame or descriptors truncated".into(),
            ));
        }
        if len == 0 {
            return Err(WireError::Closed);
        }
        let payload = &buf[1..len];
        match buf[0] {
            b'M' => serde_json::from_slice(payload)
                .map(Frame::Message)
                .map_err(|e| WireError::Malformed(e.to_string())),
            b'C' => Ok(Frame::Chunk(payload.to_vec())),
            b'F' if !fds.is_empty() => Ok(Frame::Fds(fds)),
            other => Err(WireError::Malformed(format!("frame kind {other:#04x}"))),
        }
    }

    /// Sends one control message.
    pub fn send(&self, message: &Message) -> Result<(), WireError> {
        let json = serde_json::to_vec(message).map_err(|e| WireError::Malformed(e.to_string()))?;
        self.send_frame(b'M', &json, &[])
    }

    /// The next control message, within `timeout`.
    pub fn recv(&self, timeout: Duration) -> Result<Message, WireError> {
        match self.recv_frame(timeout)? {
            Frame::Message(message) => Ok(message),
            Frame::Chunk(_) | Frame::Fds(_) => Err(WireError::Malformed(
                "state where a message was expected".into(),
            )),
        }
    }

    /// Sends the descriptors `fds` (in order), the state document `state`, then `StateEnd`.
    pub fn send_state(&self, state: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), WireError> {
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        for batch in raw.chunks(FDS_PER_FRAME) {
            self.send_frame(b'F', &[], batch)?;
        }
        for chunk in state.chunks(CHUNK) {
            self.send_frame(b'C', chunk, &[])?;
        }
        self.send(&Message::StateEnd {
            bytes: state.len() as u64,
            fds: raw.len() as u64,
        })
    }

    /// Receives what [`Channel::send_state`] sent, each frame within `timeout`.
    pub fn recv_state(&self, timeout: Duration) -> Result<(Vec<u8>, Vec<OwnedFd>), WireError> {
        let mut state = Vec::new();
        let mut fds = Vec::new();
        loop {
            match self.recv_frame(timeout)? {
                Frame::Fds(batch) => {
                    fds.extend(batch);
                    if fds.len() > MAX_FDS {
                        return Err(WireError::Malformed("too many descriptors".into()));
                    }
                }
                Frame::Chunk(chunk) => {
                    state.extend_from_slice(&chunk);
                    if state.len() > MAX_STATE {
                        return Err(WireError::Malformed("state document too large".into()));
                    }
                }
                Frame::Message(Message::StateEnd { bytes, fds: count }) => {
                    if bytes != state.len() as u64 || count != fds.len() as u64 {
                        return Err(WireError::Malformed(format!(
                            "state end announced {bytes} octets and {count} descriptors, got {} \
                             and {}",
                            state.len(),
                            fds.len()
                        )));
                    }
                    return Ok((state, fds));
                }
                Frame::Message(got) => {
                    return Err(WireError::Unexpected {
                        expected: "the state",
                        got,
                    });
                }
            }
        }
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};

    #[test]
    fn messages_state_and_descriptors_arrive_in_order() {
        let (old, new) = Channel::pair().unwrap();
        let (mut keep, give) = std::os::unix::net::UnixStream::pair().unwrap();
        let state: Vec<u8> = (0..100_000u32).flat_map(u32::to_le_bytes).collect();
        let sender = std::thread::spawn({
            let state = state.clone();
            move || {
                old.send(&Message::Offer {
                    version: 1,
                    pid: 7,
                    gateway_version: "x".into(),
                })
                .unwrap();
                let many: Vec<BorrowedFd<'_>> = std::iter::repeat_n(give.as_fd(), 450).collect();
                old.send_state(&state, &many).unwrap();
                old.recv(Duration::from_secs(5)).unwrap()
            }
        });
        let offer = new.recv(Duration::from_secs(5)).unwrap();
        assert!(matches!(
            offer,
            Message::Offer {
                version: 1,
                pid: 7,
                ..
            }
        ));
        let (got, fds) = new.recv_state(Duration::from_secs(5)).unwrap();
        assert_eq!(got, state);
        assert_eq!(fds.len(), 450);
        // Each received descriptor is the same socket: what is written there arrives here.
        let mut stream = std::os::unix::net::UnixStream::from(fds.into_iter().last().unwrap());
        stream.write_all(b"hi").unwrap();
        let mut two = [0u8; 2];
        keep.read_exact(&mut two).unwrap();
        assert_eq!(&two, b"hi");
        new.send(&Message::Done).unwrap();
        assert_eq!(sender.join().unwrap(), Message::Done);
    }

    #[test]
    fn a_silent_or_gone_peer_is_an_error_not_a_hang() {
        let (a, b) = Channel::pair().unwrap();
        assert!(matches!(
            a.recv(Duration::from_millis(20)),
            Err(WireError::Timeout(_))
        ));
        drop(b);
        assert!(matches!(
            a.recv(Duration::from_millis(20)),
            Err(WireError::Closed)
        ));
        assert!(matches!(a.send(&Message::Done), Err(WireError::Closed)));
    }

    #[test]
    fn a_lying_state_end_is_refused() {
        let (a, b) = Channel::pair().unwrap();
        a.send_frame(b'C', b"abc", &[]).unwrap();
        a.send(&Message::StateEnd { bytes: 4, fds: 0 }).unwrap();
        assert!(matches!(
            b.recv_state(Duration::from_secs(1)),
            Err(WireError::Malformed(_))
        ));
        a.send_frame(b'Z', b"", &[]).unwrap();
        assert!(matches!(
            b.recv(Duration::from_secs(1)),
            Err(WireError::Malformed(_))
        ));
    }
}
