//! The LD_PRELOAD shim's socket-call state machine, fed a sequence of a program's socket calls
//! (bind, getsockname, send, connect, close, TCP bytes from a proxied RTSP connection, fork)
//! against a gateway that may refuse: it never panics, never holds more bindings than the
//! gateway granted, and once every socket is closed it holds none and has released every one
//! it was granted.
#![no_main]

use std::{collections::BTreeSet, net::SocketAddr};

use arbitrary::Arbitrary;
use gateway_client::shim::{Control, Direct, Fd, Reserved, SendPlan, Shim};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Call {
    Bind { fd: u8, port: u16, loopback: bool },
    Bound { fd: u8, ok: bool },
    Sockname { fd: u8 },
    Send { fd: u8, outside: bool, port: u16 },
    TcpConnect { fd: u8, port: u16 },
    TcpReceived { fd: u8, data: Vec<u8> },
    Close { fd: u8 },
    Fork,
}

/// A gateway that grants unless told to refuse, and tracks what is granted and not released.
struct Gateway {
    refuse: bool,
    next: u16,
    live: BTreeSet<u16>,
    granted: usize,
}

impl Control for Gateway {
    type Binding = u16;

    fn reserve(&mut self, _local_port: u16, pair: bool) -> Result<Reserved<u16>, String> {
        self.grant(pair)
    }

    fn confirm(&mut self, binding: &mut u16, _remote: SocketAddr) -> Result<bool, String> {
        assert!(self.live.contains(binding), "confirm of a binding not held");
        Ok(true)
    }

    fn open(&mut self, _local_port: u16, _remote: SocketAddr) -> Result<Reserved<u16>, String> {
        self.grant(false)
    }

    fn release(&mut self, binding: u16) {
        assert!(
            self.live.remove(&binding),
            "release of a binding not held: {binding}"
        );
    }

    fn forget_connection(&mut self) {
        // The child's inherited connection is the parent's: its bindings are not the child's.
        self.live.clear();
    }

    fn notice(&mut self, _text: &str) {}
}

impl Gateway {
    fn grant(&mut self, pair: bool) -> Result<Reserved<u16>, String> {
        if self.refuse {
            return Err("refused".into());
        }
        let port = 16_400 + self.next;
        self.next = self.next.wrapping_add(if pair { 2 } else { 1 }) % 20_000;
        self.live.insert(port);
        self.granted += 1;
        Ok(Reserved {
            binding: port,
            external: SocketAddr::from(([203, 0, 113, 1], port)),
            raw: true,
        })
    }
}

fuzz_target!(|input: (bool, Vec<Call>)| {
    let (refuse, calls) = input;
    let mut gateway = Gateway {
        refuse,
        next: 0,
        live: BTreeSet::new(),
        granted: 0,
    };
    let mut shim: Shim<u16> = Shim::new(Direct::new(
        SocketAddr::from(([198, 51, 100, 1], 1080)),
        vec![("198.51.100.0".parse().unwrap(), 24)],
    ));
    let mut fds: BTreeSet<Fd> = BTreeSet::new();
    for call in calls.into_iter().take(200) {
        match call {
            Call::Bind { fd, port, loopback } => {
                let fd = Fd::from(fd);
                fds.insert(fd);
                let ip = if loopback {
                    [127, 0, 0, 1]
                } else {
                    [0, 0, 0, 0]
                };
                let _ = shim.bind_address(fd, SocketAddr::from((ip, port)));
            }
            Call::Bound { fd, ok } => {
                let fd = Fd::from(fd);
                fds.insert(fd);
                let local =
                    ok.then(|| SocketAddr::from(([0, 0, 0, 0], 40_000 + u16::from(fd as u8))));
                shim.bound(&mut gateway, fd, local);
            }
            Call::Sockname { fd } => {
                fds.insert(Fd::from(fd));
                let _ = shim.sockname(&mut gateway, Fd::from(fd));
            }
            Call::Send { fd, outside, port } => {
                let fd = Fd::from(fd);
                fds.insert(fd);
                let to = if outside {
                    [203, 0, 113, 2]
                } else {
                    [198, 51, 100, 7]
                };
                if shim.before_send(&mut gateway, fd, SocketAddr::from((to, port)))
                    == SendPlan::BindFirst
                {
                    shim.bound(
                        &mut gateway,
                        fd,
                        Some(SocketAddr::from((
                            [0, 0, 0, 0],
                            41_000 + u16::from(fd as u8),
                        ))),
                    );
                    let _ = shim.before_send(&mut gateway, fd, SocketAddr::from((to, port)));
                }
            }
            Call::TcpConnect { fd, port } => {
                let fd = Fd::from(fd);
                fds.insert(fd);
                let to = SocketAddr::from(([203, 0, 113, 2], port));
                if shim.proxies_tcp(to) {
                    shim.tcp_connected(fd, to);
                }
            }
            Call::TcpReceived { fd, data } => {
                fds.insert(Fd::from(fd));
                shim.tcp_received(&mut gateway, Fd::from(fd), &data);
            }
            Call::Close { fd } => {
                let fd = Fd::from(fd);
                shim.closing(&mut gateway, fd);
                fds.remove(&fd);
            }
            Call::Fork => shim.forked_child(&mut gateway),
        }
        assert!(
            shim.bindings() <= gateway.granted,
            "more bindings than granted"
        );
    }
    for fd in std::mem::take(&mut fds) {
        shim.closing(&mut gateway, fd);
    }
    assert_eq!(
        shim.bindings(),
        0,
        "bindings left after every socket closed"
    );
    assert!(
        gateway.live.is_empty(),
        "granted and never released: {:?}",
        gateway.live
    );
});
