//! The socket calls the library shadows. Each one asks the shim's state machine
//! ([`gateway_client::shim::Shim`]) what to do, then calls the C library's own function; the C
//! library's `errno` is what the program sees.

use std::{
    mem::ManuallyDrop,
    net::{SocketAddr, TcpStream},
    os::fd::FromRawFd as _,
};

use gateway_client::{ClientError, Timeouts, blocking::Client, shim::SendPlan};
use gateway_proto::ReplyCode;
use libc::{
    EINPROGRESS, SOCK_DGRAM, SOCK_STREAM, c_int, c_uint, c_void, mmsghdr, msghdr, size_t, sockaddr,
    socklen_t, ssize_t,
};

use super::{
    config::Level,
    real, sockaddr as addr,
    state::{self, inside, passing_through, with},
};

fn errno() -> c_int {
    // SAFETY: the thread's errno.
    unsafe { *libc::__errno_location() }
}

fn set_errno(value: c_int) {
    // SAFETY: the thread's errno.
    unsafe { *libc::__errno_location() = value };
}

/// Keeps the program's `errno` across the shim's own work.
fn keeping_errno<R>(f: impl FnOnce() -> R) -> R {
    let saved = errno();
    let result = f();
    set_errno(saved);
    result
}

/// UDP and TCP sockets of an IP family: `(type, family)`.
fn ip_socket(fd: c_int) -> Option<(c_int, c_int)> {
    addr::kind(fd).filter(|&(_, family)| addr::is_ip(family))
}

/// # Safety
/// The C contract of `connect`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn connect(fd: c_int, address: *const sockaddr, len: socklen_t) -> c_int {
    // SAFETY: the caller's arguments, passed on.
    let pass = || unsafe { real::connect(fd, address, len) };
    if inside() {
        return pass();
    }
    // SAFETY: the caller's address of `len` octets.
    let (Some(destination), Some((kind, family))) =
        (unsafe { addr::read(address, len) }, ip_socket(fd))
    else {
        return pass();
    };
    match kind {
        SOCK_STREAM => {
            let proxy = keeping_errno(|| {
                with(|g| {
                    g.shim
                        .proxies_tcp(destination)
                        .then_some(g.gateway.config.proxy)
                })
            });
            match proxy.flatten() {
                Some(proxy) => proxied_connect(fd, family, proxy, destination),
                None => pass(),
            }
        }
        SOCK_DGRAM => {
            before_udp_send(fd, family, destination);
            pass()
        }
        _ => pass(),
    }
}

/// A TCP `connect` through the gateway: the program's socket connects to the proxy and does the
/// SOCKS handshake and CONNECT right here, blocking even on a non-blocking socket, then reports
/// success (0) or the failure as `errno`.
fn proxied_connect(fd: c_int, family: c_int, proxy: SocketAddr, destination: SocketAddr) -> c_int {
    // SAFETY: fcntl on the program's descriptor.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    let nonblocking = flags >= 0 && flags & libc::O_NONBLOCK != 0;
    if nonblocking {
        // SAFETY: as above.
        unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) };
    }
    let result = passing_through(|| {
        let (storage, len) = addr::encode(proxy, family);
        // SAFETY: a valid address of `len` octets.
        if unsafe { real::connect(fd, (&raw const storage).cast(), len) } != 0 {
            return Err(errno());
        }
        // The program owns the descriptor: the stream must never close it.
        // SAFETY: a connected TCP socket; ManuallyDrop keeps it open.
        let stream = ManuallyDrop::new(unsafe { TcpStream::from_raw_fd(fd) });
        let credentials = with(|g| g.gateway.config.credentials.clone()).flatten();
        let copy = stream
            .try_clone()
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
        let outcome = Client::over(copy, credentials, Timeouts::default())
            .and_then(|client| client.tcp_connect(destination));
        match outcome {
            Ok((relayed, _bound)) => {
                // Our copy of the descriptor goes; the program's stays connected.
                drop(relayed);
                Ok(())
            }
            Err(error) => Err(connect_errno(&error)),
        }
    });
    if nonblocking {
        // SAFETY: restores the program's flags.
        unsafe { libc::fcntl(fd, libc::F_SETFL, flags) };
    }
    match result {
        Ok(()) => {
            keeping_errno(|| {
                with(|g| {
                    g.gateway.log().line(
                        Level::Info,
                        &format!("TCP to {destination} through the gateway"),
                    );
                    g.shim.tcp_connected(fd, destination);
                })
            });
            state::mark_active();
            0
        }
        Err(code) => {
            keeping_errno(|| {
                with(|g| {
                    g.gateway.log().line(
                        Level::Warn,
                        &format!(
                            "TCP to {destination} through the gateway failed: {}",
                            std::io::Error::from_raw_os_error(code)
                        ),
                    );
                })
            });
            set_errno(if code == EINPROGRESS {
                libc::ETIMEDOUT
            } else {
                code
            });
            -1
        }
    }
}

fn connect_errno(error: &ClientError) -> c_int {
    match error {
        ClientError::Connect { source, .. } => source.raw_os_error().unwrap_or(libc::ECONNREFUSED),
        ClientError::Timeout { .. } | ClientError::Refused(ReplyCode::TtlExpired) => {
            libc::ETIMEDOUT
        }
        ClientError::Refused(ReplyCode::NetworkUnreachable) => libc::ENETUNREACH,
        ClientError::Refused(ReplyCode::HostUnreachable) => libc::EHOSTUNREACH,
        ClientError::Refused(ReplyCode::NotAllowed) => libc::EACCES,
        _ => libc::ECONNREFUSED,
    }
}

/// Before a UDP datagram to `destination` (or a UDP `connect`): step 2, a one-step Open, or a
/// bind first for a socket that has no port yet.
fn before_udp_send(fd: c_int, family: c_int, destination: SocketAddr) {
    keeping_errno(|| {
        let plan = with(|g| g.shim.before_send(&mut g.gateway, fd, destination));
        if plan == Some(SendPlan::BindFirst) {
            let (storage, len) = addr::encode(addr::wildcard(family), family);
            // SAFETY: a valid wildcard address.
            if unsafe { real::bind(fd, (&raw const storage).cast(), len) } == 0 {
                let local = real_name(fd);
                with(|g| {
                    g.shim.bound(&mut g.gateway, fd, local);
                    g.shim.before_send(&mut g.gateway, fd, destination)
                });
                state::mark_active();
            }
        }
    });
}

fn real_name(fd: c_int) -> Option<SocketAddr> {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = socklen_t::try_from(size_of::<libc::sockaddr_storage>()).unwrap_or(128);
    // SAFETY: a buffer of `len` octets.
    if unsafe { real::getsockname(fd, (&raw mut storage).cast(), &raw mut len) } != 0 {
        return None;
    }
    // SAFETY: the kernel wrote `len` octets.
    unsafe { addr::read((&raw const storage).cast(), len) }
}

/// # Safety
/// The C contract of `bind`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bind(fd: c_int, address: *const sockaddr, len: socklen_t) -> c_int {
    // SAFETY: the caller's arguments, passed on.
    let pass = || unsafe { real::bind(fd, address, len) };
    if inside() {
        return pass();
    }
    // SAFETY: the caller's address of `len` octets.
    let (Some(requested), Some((SOCK_DGRAM, family))) =
        (unsafe { addr::read(address, len) }, ip_socket(fd))
    else {
        return pass();
    };
    let Some(to_bind) = keeping_errno(|| with(|g| g.shim.bind_address(fd, requested))) else {
        return pass();
    };
    state::mark_active();
    let rc = if to_bind == requested {
        pass()
    } else {
        let (storage, real_len) = addr::encode(to_bind, family);
        // SAFETY: a valid address of `real_len` octets.
        unsafe { real::bind(fd, (&raw const storage).cast(), real_len) }
    };
    keeping_errno(|| {
        let local = (rc == 0).then(|| real_name(fd)).flatten();
        with(|g| g.shim.bound(&mut g.gateway, fd, local));
    });
    rc
}

/// # Safety
/// The C contract of `getsockname`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn getsockname(
    fd: c_int,
    address: *mut sockaddr,
    len: *mut socklen_t,
) -> c_int {
    // SAFETY: the caller's arguments, passed on.
    let rc = unsafe { real::getsockname(fd, address, len) };
    if rc != 0 || inside() || !state::active() {
        return rc;
    }
    let Some((SOCK_DGRAM, family)) = ip_socket(fd) else {
        return rc;
    };
    let report = keeping_errno(|| with(|g| g.shim.sockname(&mut g.gateway, fd))).flatten();
    if let Some(report) = report {
        // SAFETY: the caller's buffer of `*len` octets.
        unsafe { addr::write(report, family, address, len) };
    }
    rc
}

/// # Safety
/// The C contract of `getpeername`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn getpeername(
    fd: c_int,
    address: *mut sockaddr,
    len: *mut socklen_t,
) -> c_int {
    // SAFETY: the caller's arguments, passed on.
    let rc = unsafe { real::getpeername(fd, address, len) };
    if rc != 0 || inside() || !state::active() {
        return rc;
    }
    let peer = keeping_errno(|| with(|g| g.shim.peer(fd))).flatten();
    if let (Some(peer), Some((_, family))) = (peer, ip_socket(fd)) {
        // SAFETY: the caller's buffer of `*len` octets.
        unsafe { addr::write(peer, family, address, len) };
    }
    rc
}

/// The UDP destination of a send, if it names one.
///
/// # Safety
/// `address` is null or `len` readable octets.
unsafe fn udp_destination(
    fd: c_int,
    address: *const sockaddr,
    len: socklen_t,
) -> Option<(c_int, SocketAddr)> {
    // SAFETY: as the caller promises.
    let destination = unsafe { addr::read(address, len) }?;
    match ip_socket(fd)? {
        (SOCK_DGRAM, family) => Some((family, destination)),
        _ => None,
    }
}

/// # Safety
/// The C contract of `sendto`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sendto(
    fd: c_int,
    buf: *const c_void,
    n: size_t,
    flags: c_int,
    address: *const sockaddr,
    len: socklen_t,
) -> ssize_t {
    if !inside() {
        // SAFETY: the caller's address.
        if let Some((family, destination)) = unsafe { udp_destination(fd, address, len) } {
            before_udp_send(fd, family, destination);
        }
    }
    // SAFETY: the caller's arguments, passed on.
    unsafe { real::sendto(fd, buf, n, flags, address, len) }
}

/// # Safety
/// The C contract of `sendmsg`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sendmsg(fd: c_int, msg: *const msghdr, flags: c_int) -> ssize_t {
    if !inside() && !msg.is_null() {
        // SAFETY: the caller's message header.
        let header = unsafe { &*msg };
        // SAFETY: its name of `msg_namelen` octets.
        if let Some((family, destination)) =
            unsafe { udp_destination(fd, header.msg_name.cast(), header.msg_namelen) }
        {
            before_udp_send(fd, family, destination);
        }
    }
    // SAFETY: the caller's arguments, passed on.
    unsafe { real::sendmsg(fd, msg, flags) }
}

/// # Safety
/// The C contract of `sendmmsg`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sendmmsg(
    fd: c_int,
    msgs: *mut mmsghdr,
    vlen: c_uint,
    flags: c_int,
) -> c_int {
    if !inside() && !msgs.is_null() {
        for i in 0..vlen as usize {
            // SAFETY: the caller's array of `vlen` headers.
            let header = unsafe { &(*msgs.add(i)).msg_hdr };
            // SAFETY: its name of `msg_namelen` octets.
            if let Some((family, destination)) =
                unsafe { udp_destination(fd, header.msg_name.cast(), header.msg_namelen) }
            {
                before_udp_send(fd, family, destination);
            }
        }
    }
    // SAFETY: the caller's arguments, passed on.
    unsafe { real::sendmmsg(fd, msgs, vlen, flags) }
}

/// # Safety
/// The C contract of `close`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    if !inside() && state::active() {
        keeping_errno(|| {
            with(|g| {
                g.gateway.program_closes(fd);
                g.shim.closing(&mut g.gateway, fd);
            })
        });
    }
    // SAFETY: the caller's descriptor.
    unsafe { real::close(fd) }
}

/// Shows the bytes the program just read from `fd` to the shim (SETUP replies on a proxied RTSP
/// connection), unless only peeked at.
///
/// # Safety
/// `buf` holds `n` readable octets when `n > 0`.
unsafe fn seen(fd: c_int, buf: *const c_void, n: ssize_t, flags: c_int) {
    if n <= 0 || inside() || !state::active() || flags & libc::MSG_PEEK != 0 {
        return;
    }
    keeping_errno(|| {
        with(|g| {
            if g.shim.scans(fd) {
                // SAFETY: as the caller promises.
                let data =
                    unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), n.unsigned_abs()) };
                g.shim.tcp_received(&mut g.gateway, fd, data);
            }
        })
    });
}

/// # Safety
/// The C contract of `read`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn read(fd: c_int, buf: *mut c_void, n: size_t) -> ssize_t {
    // SAFETY: the caller's arguments, passed on.
    let got = unsafe { real::read(fd, buf, n) };
    // SAFETY: `got` octets were written to `buf`.
    unsafe { seen(fd, buf, got, 0) };
    got
}

/// # Safety
/// The C contract of `recv`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn recv(fd: c_int, buf: *mut c_void, n: size_t, flags: c_int) -> ssize_t {
    // SAFETY: the caller's arguments, passed on.
    let got = unsafe { real::recv(fd, buf, n, flags) };
    // SAFETY: `got` octets were written to `buf`.
    unsafe { seen(fd, buf, got, flags) };
    got
}

/// # Safety
/// The C contract of `recvfrom`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn recvfrom(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    flags: c_int,
    address: *mut sockaddr,
    len: *mut socklen_t,
) -> ssize_t {
    // SAFETY: the caller's arguments, passed on.
    let got = unsafe { real::recvfrom(fd, buf, n, flags, address, len) };
    // SAFETY: `got` octets were written to `buf`.
    unsafe { seen(fd, buf, got, flags) };
    got
}

/// # Safety
/// The C contract of `recvmsg`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn recvmsg(fd: c_int, msg: *mut msghdr, flags: c_int) -> ssize_t {
    // SAFETY: the caller's arguments, passed on.
    let got = unsafe { real::recvmsg(fd, msg, flags) };
    if got > 0 && !msg.is_null() {
        // SAFETY: the caller's header; the kernel filled its buffers with `got` octets in order.
        let header = unsafe { &*msg };
        let mut left = got.unsigned_abs();
        for i in 0..header.msg_iovlen {
            if left == 0 || header.msg_iov.is_null() {
                break;
            }
            // SAFETY: one of the header's `msg_iovlen` buffers.
            let iov = unsafe { &*header.msg_iov.add(i) };
            let take = left.min(iov.iov_len);
            // SAFETY: `take` octets of this buffer were written.
            unsafe {
                seen(
                    fd,
                    iov.iov_base,
                    ssize_t::try_from(take).unwrap_or(0),
                    flags,
                );
            }
            left -= take;
        }
    }
    got
}

// Not shadowed: `write`/`send` (the shim never holds a write back: step 2 is confirmed while the
// program reads the SETUP reply, before it can write PLAY), `accept` (nothing is proxied
// inbound), `dup` (a duplicate of a tracked socket is the program's business).
