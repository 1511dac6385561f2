//! Batched UDP I/O with `sendmmsg`/`recvmmsg` over fixed buffers, the clock the benchmark
//! stamps datagrams with, and the stop flag set by SIGTERM/SIGINT. The only `unsafe` of the
//! traffic tools lives here.

use std::{
    io,
    mem::{size_of, zeroed},
    net::{SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::RawFd,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

/// Set by SIGTERM or SIGINT once [`install_stop_handler`] ran.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_signal: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// SIGTERM and SIGINT set the stop flag instead of killing the process, so a tool can print its
/// report.
pub fn install_stop_handler() {
    let handler = on_stop as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, handler);
        libc::signal(libc::SIGINT, handler);
    }
}

/// Whether a stop was asked for.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::Relaxed)
}

/// `CLOCK_MONOTONIC` in nanoseconds: shared by every namespace of the host, so a sender in one
/// namespace and a receiver in another measure one-way delay on one clock.
pub fn now_ns() -> u64 {
    // SAFETY: timespec is plain data.
    let mut ts: libc::timespec = unsafe { zeroed() };
    // SAFETY: valid out-pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Lets `nanosleep` wake within a microsecond rather than the default 50 µs of slack.
pub fn tight_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes a plain integer.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1u64, 0u64, 0u64, 0u64) };
}

/// Sets a socket's receive and send buffers, forcing past `rmem_max` when root.
pub fn set_buffers(fd: RawFd, bytes: i32) {
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        let value: libc::c_int = bytes;
        for option in [force, plain] {
            // SAFETY: fd is a socket; value is a c_int of the size given.
            let rc = unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    option,
                    (&raw const value).cast(),
                    socklen(size_of::<libc::c_int>()),
                )
            };
            if rc == 0 {
                break;
            }
        }
    }
}

fn socklen(len: usize) -> libc::socklen_t {
    libc::socklen_t::try_from(len).unwrap_or(libc::socklen_t::MAX)
}

/// Waits until `fd` is readable or `timeout` passed.
pub fn wait_readable(fd: RawFd, timeout: Duration) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&raw mut pfd, 1, ms) };
}

/// Waits until any of `fds` is readable or `timeout` passed.
pub fn wait_any_readable(fds: &[RawFd], timeout: Duration) {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    let count = libc::nfds_t::try_from(pfds.len()).unwrap_or(0);
    // SAFETY: `count` valid pollfds owned by `pfds`.
    unsafe { libc::poll(pfds.as_mut_ptr(), count, ms) };
}

/// A socket address in C form.
#[derive(Clone, Copy)]
pub struct RawAddr {
    storage: libc::sockaddr_storage,
    len: libc::socklen_t,
}

impl RawAddr {
    pub fn new(addr: SocketAddr) -> Self {
        // SAFETY: sockaddr_storage is plain data; zero is a valid value.
        let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
        let len = match addr {
            SocketAddr::V4(v4) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::sa_family_t::try_from(libc::AF_INET).unwrap_or(2),
                    sin_port: v4.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(v4.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
                unsafe { (&raw mut storage).cast::<libc::sockaddr_in>().write(sin) };
                size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(v6) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::sa_family_t::try_from(libc::AF_INET6).unwrap_or(10),
                    sin6_port: v6.port().to_be(),
                    sin6_flowinfo: v6.flowinfo(),
                    sin6_addr: libc::in6_addr {
                        s6_addr: v6.ip().octets(),
                    },
                    sin6_scope_id: v6.scope_id(),
                };
                // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
                unsafe { (&raw mut storage).cast::<libc::sockaddr_in6>().write(sin6) };
                size_of::<libc::sockaddr_in6>()
            }
        };
        Self {
            storage,
            len: socklen(len),
        }
    }

    /// The Rust form, when the family is IPv4 or IPv6.
    pub fn to_socket_addr(&self) -> Option<SocketAddr> {
        match i32::from(self.storage.ss_family) {
            libc::AF_INET => {
                // SAFETY: the family says the storage holds a sockaddr_in.
                let sin = unsafe { (&raw const self.storage).cast::<libc::sockaddr_in>().read() };
                Some(SocketAddr::V4(SocketAddrV4::new(
                    sin.sin_addr.s_addr.to_ne_bytes().into(),
                    u16::from_be(sin.sin_port),
                )))
            }
            libc::AF_INET6 => {
                // SAFETY: the family says the storage holds a sockaddr_in6.
                let sin6 = unsafe {
                    (&raw const self.storage)
                        .cast::<libc::sockaddr_in6>()
                        .read()
                };
                Some(SocketAddr::V6(SocketAddrV6::new(
                    sin6.sin6_addr.s6_addr.into(),
                    u16::from_be(sin6.sin6_port),
                    sin6.sin6_flowinfo,
                    sin6.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }
}

/// `batch` buffers of `size` octets with their iovecs, names and message headers, for one
/// `sendmmsg` or `recvmmsg` call at a time.
pub struct Batch {
    buffers: Vec<Vec<u8>>,
    iovecs: Vec<libc::iovec>,
    names: Vec<RawAddr>,
    headers: Vec<libc::mmsghdr>,
}

impl Batch {
    pub fn new(batch: usize, size: usize) -> Self {
        let batch = batch.max(1);
        let mut buffers: Vec<Vec<u8>> = (0..batch).map(|_| vec![0u8; size.max(1)]).collect();
        let iovecs = buffers
            .iter_mut()
            .map(|buf| libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            })
            .collect();
        let unspecified = RawAddr::new(SocketAddr::from(([0, 0, 0, 0], 0)));
        // SAFETY: mmsghdr is plain data; the pointers are filled in before every call.
        let headers = (0..batch).map(|_| unsafe { zeroed() }).collect();
        Self {
            buffers,
            iovecs,
            names: vec![unspecified; batch],
            headers,
        }
    }

    pub fn capacity(&self) -> usize {
        self.buffers.len()
    }

    /// Buffer `i` (its full capacity).
    pub fn buffer_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.buffers[i]
    }

    /// The first `len` octets of buffer `i`.
    pub fn data(&self, i: usize, len: usize) -> &[u8] {
        &self.buffers[i][..len.min(self.buffers[i].len())]
    }

    /// Length received into message `i` by the last [`Batch::recv`].
    pub fn received_len(&self, i: usize) -> usize {
        self.headers[i].msg_len as usize
    }

    /// The sender of message `i` of the last [`Batch::recv`].
    pub fn name(&self, i: usize) -> RawAddr {
        let mut name = self.names[i];
        name.len = self.headers[i].msg_hdr.msg_namelen;
        name
    }

    /// Sets the destination of message `i` (for unconnected sends).
    pub fn set_name(&mut self, i: usize, name: RawAddr) {
        self.names[i] = name;
    }

    fn prepare(&mut self, count: usize, lens: Option<&[usize]>, with_names: bool) {
        for i in 0..count {
            let len = lens.map_or(self.buffers[i].len(), |lens| {
                lens[i].min(self.buffers[i].len())
            });
            self.iovecs[i] = libc::iovec {
                iov_base: self.buffers[i].as_mut_ptr().cast(),
                iov_len: len,
            };
            let header = &mut self.headers[i].msg_hdr;
            header.msg_iov = &raw mut self.iovecs[i];
            header.msg_iovlen = 1;
            header.msg_control = std::ptr::null_mut();
            header.msg_controllen = 0;
            header.msg_flags = 0;
            if with_names {
                header.msg_name = (&raw mut self.names[i].storage).cast();
                header.msg_namelen = if lens.is_some() {
                    self.names[i].len
                } else {
                    socklen(size_of::<libc::sockaddr_storage>())
                };
            } else {
                header.msg_name = std::ptr::null_mut();
                header.msg_namelen = 0;
            }
            self.headers[i].msg_len = 0;
        }
    }

    /// Sends the first `count` buffers, message `i` with `lens[i]` octets, to the connected peer
    /// (`with_names` false) or to each message's name. Returns how many were sent.
    pub fn send(
        &mut self,
        fd: RawFd,
        count: usize,
        lens: &[usize],
        with_names: bool,
    ) -> io::Result<usize> {
        let count = count.min(self.capacity()).min(lens.len());
        self.prepare(count, Some(lens), with_names);
        let vlen = libc::c_uint::try_from(count).unwrap_or(0);
        // SAFETY: headers[..count] point at live iovecs, buffers and names owned by self.
        let rc = unsafe { libc::sendmmsg(fd, self.headers.as_mut_ptr(), vlen, 0) };
        usize::try_from(rc).map_err(|_| io::Error::last_os_error())
    }

    /// Receives up to the batch's capacity without blocking (`Ok(0)` when nothing is queued).
    pub fn recv(&mut self, fd: RawFd, with_names: bool) -> io::Result<usize> {
        let count = self.capacity();
        self.prepare(count, None, with_names);
        let vlen = libc::c_uint::try_from(count).unwrap_or(0);
        // SAFETY: headers point at live iovecs, buffers and names owned by self.
        let rc = unsafe {
            libc::recvmmsg(
                fd,
                self.headers.as_mut_ptr(),
                vlen,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if let Ok(n) = usize::try_from(rc) {
            return Ok(n);
        }
        let error = io::Error::last_os_error();
        if matches!(
            error.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
        ) {
            Ok(0)
        } else {
            Err(error)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_addresses_round_trip() {
        for text in ["203.0.113.1:6000", "[2001:db8:2::1]:30000"] {
            let addr: SocketAddr = text.parse().unwrap();
            assert_eq!(RawAddr::new(addr).to_socket_addr(), Some(addr));
        }
    }

    #[test]
    fn a_batch_crosses_loopback() {
        use std::os::fd::AsRawFd as _;

        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.connect(rx.local_addr().unwrap()).unwrap();
        let mut out = Batch::new(4, 64);
        for i in 0..4 {
            out.buffer_mut(i)[0] = u8::try_from(i).unwrap();
        }
        assert_eq!(
            out.send(tx.as_raw_fd(), 4, &[10, 20, 30, 40], false)
                .unwrap(),
            4
        );
        let mut input = Batch::new(8, 2048);
        let mut got = Vec::new();
        for _ in 0..100 {
            let n = input.recv(rx.as_raw_fd(), true).unwrap();
            for i in 0..n {
                got.push((input.received_len(i), input.data(i, 1)[0]));
                assert_eq!(
                    input.name(i).to_socket_addr(),
                    Some(tx.local_addr().unwrap())
                );
            }
            if got.len() == 4 {
                break;
            }
            wait_readable(rx.as_raw_fd(), Duration::from_millis(10));
        }
        assert_eq!(got, vec![(10, 0), (20, 1), (30, 2), (40, 3)]);
    }
}
