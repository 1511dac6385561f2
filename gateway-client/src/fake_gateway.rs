//! A scripted gateway for the unit tests of both layers, on loopback: SOCKS5 without
//! authentication, the enhanced-mode entry, then every control request answered by the test's
//! function and recorded, so a test can check what the client sent. It relays no datagrams: a
//! test plays the internal relay (or, for header-less delivery, the remote) with its own UDP
//! sockets. Runs on a plain thread, so async and blocking clients alike can talk to it.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::mpsc,
    thread,
    time::Duration,
};

use bytes::BytesMut;
use gateway_proto::enhanced::{
    ControlReply, ControlRequest, EnhancedReplyCode, Flags, Packet, UdpCommand,
};

use super::RelayAddrs;

/// How long a test waits for the client's next request.
const WAIT: Duration = Duration::from_secs(5);

/// A fake gateway serving one control connection.
pub(crate) struct FakeGateway {
    /// Its control address.
    pub(crate) addr: SocketAddr,
    requests: mpsc::Receiver<ControlRequest>,
}

impl FakeGateway {
    /// Starts a gateway answering every control request with `answer`.
    pub(crate) fn start(
        answer: impl FnMut(&ControlRequest) -> ControlReply + Send + 'static,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (record, requests) = mpsc::channel();
        thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            serve(stream, answer, &record);
        });
        Self { addr, requests }
    }

    /// The client's next control request.
    pub(crate) fn request(&self) -> ControlRequest {
        self.requests
            .recv_timeout(WAIT)
            .expect("a control request from the client")
    }

    /// Whether the client sends no control request for `wait`.
    pub(crate) fn quiet(&self, wait: Duration) -> bool {
        self.requests.recv_timeout(wait).is_err()
    }
}

fn serve(
    mut stream: TcpStream,
    mut answer: impl FnMut(&ControlRequest) -> ControlReply,
    record: &mpsc::Sender<ControlRequest>,
) {
    let mut greeting = [0u8; 3];
    stream.read_exact(&mut greeting).unwrap();
    assert_eq!(greeting, [5, 1, 0], "an anonymous greeting");
    stream.write_all(&[5, 0]).unwrap();
    let mut entry = [0u8; 10];
    stream.read_exact(&mut entry).unwrap();
    assert_eq!(
        entry,
        [5, 4, 0, 1, 0, 0, 0, 0, 0, 0],
        "the enhanced-mode entry"
    );
    stream.write_all(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]).unwrap();
    let mut buffer = BytesMut::new();
    let mut chunk = [0u8; 1024];
    loop {
        match Packet::decode(&mut buffer).unwrap() {
            Some(Packet::Request(request)) => {
                let reply = answer(&request);
                // Recorded before the reply is sent: the client's call returns after it.
                let _ = record.send(request);
                let mut out = BytesMut::new();
                Packet::Reply(reply).encode(&mut out).unwrap();
                if stream.write_all(&out).is_err() {
                    return;
                }
            }
            Some(other) => panic!("the client sent {other:?}"),
            None => match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            },
        }
    }
}

/// How the fake answers a request's RAW flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Raw {
    /// As the gateway does: echoed when asked in a step 1 (provisionally) or an Open with an
    /// exact remote; never for Listen.
    Grant,
    /// Never echoed: a gateway that cannot grant it.
    Refuse,
    /// Echoed in every BIND reply, asked or not, Listen too: a broken or hostile gateway.
    Always,
    /// Echoed only in step-1 replies: provisional, then not granted at step 2.
    StepOneOnly,
}

/// The answer of a gateway that makes every binding with `relays`, treating RAW per `raw`, and
/// releases whatever it is asked to.
pub(crate) fn bindings(
    relays: RelayAddrs,
    raw: Raw,
) -> impl FnMut(&ControlRequest) -> ControlReply + Send + 'static {
    move |request| {
        if request.command != UdpCommand::Bind {
            return ControlReply::echo(request, EnhancedReplyCode::Succeeded);
        }
        let step_one = request.aid == 0 && request.remote.is_unspecified();
        let exact_remote = !request.remote.is_unspecified();
        let asked = request.flags.contains(Flags::RAW);
        let echo = match raw {
            Raw::Grant => asked && (step_one || exact_remote),
            Raw::Refuse => false,
            Raw::Always => true,
            Raw::StepOneOnly => asked && step_one,
        };
        let mut flags = request.flags - Flags::RAW;
        if echo {
            flags.insert(Flags::RAW);
        }
        if step_one {
            flags.insert(Flags::REMOTE_PENDING);
        }
        ControlReply {
            code: EnhancedReplyCode::Succeeded,
            flags,
            ttl: 0,
            tid: request.tid,
            aid: relays.aid,
            local: relays.internal.into(),
            remote: relays.external.into(),
        }
    }
}

/// The answer of a gateway with multicast: a receive bind gets `aid` with the mode asked for (MU
/// when none), LOCAL = `relay`; a send bind gets `aid + 1`; SET TTL and RELEASE succeed unless
/// `refuse` names the command and the code to answer it with.
pub(crate) fn multicast(
    relay: std::net::SocketAddr,
    aid: u32,
    refuse: Option<(UdpCommand, EnhancedReplyCode)>,
) -> impl FnMut(&ControlRequest) -> ControlReply + Send + 'static {
    move |request| {
        if let Some((command, code)) = refuse
            && command == request.command
        {
            return ControlReply::echo(request, code);
        }
        if request.command != UdpCommand::Bind {
            return ControlReply::echo(request, EnhancedReplyCode::Succeeded);
        }
        let mut flags = request.flags;
        let send = flags.contains(Flags::SEND);
        if !send && !flags.intersects(Flags::MULTICAST_TO_UNICAST | Flags::MULTICAST_TO_MULTICAST) {
            flags.insert(Flags::MULTICAST_TO_UNICAST);
        }
        ControlReply {
            code: EnhancedReplyCode::Succeeded,
            flags,
            ttl: request.ttl,
            tid: request.tid,
            aid: if send { aid + 1 } else { aid },
            local: relay.into(),
            remote: request.remote.clone(),
        }
    }
}
