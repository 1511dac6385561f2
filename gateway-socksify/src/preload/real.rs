//! The C library's own socket calls, found with `dlsym(RTLD_NEXT)` once each: the shim's
//! functions shadow them in the program and call through to them.

use std::sync::OnceLock;

use libc::{c_int, c_uint, c_void, mmsghdr, msghdr, size_t, sockaddr, socklen_t, ssize_t};

/// The next definition of `name` (NUL-terminated) after this library; aborts the program with a
/// message when the C library has none (it always has these).
fn next(name: &'static str, slot: &OnceLock<usize>) -> usize {
    *slot.get_or_init(|| {
        // SAFETY: RTLD_NEXT with a NUL-terminated symbol name.
        let found = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr().cast()) } as usize;
        if found == 0 {
            let text = b"gateway socksify: the C library lacks a socket call the shim wraps\n";
            // SAFETY: writing a static buffer to stderr, then ending the process.
            unsafe {
                libc::write(2, text.as_ptr().cast(), text.len());
                libc::abort();
            }
        }
        found
    })
}

macro_rules! next_fn {
    ($name:ident: fn($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        /// Calls the C library's own function of this name.
        ///
        /// # Safety
        /// The C function's own contract.
        pub unsafe fn $name($($arg: $ty),*) -> $ret {
            static SLOT: OnceLock<usize> = OnceLock::new();
            let address = next(concat!(stringify!($name), "\0"), &SLOT);
            // SAFETY: the address dlsym found for this name, which has this C signature.
            let function: unsafe extern "C" fn($($ty),*) -> $ret =
                unsafe { std::mem::transmute::<usize, unsafe extern "C" fn($($ty),*) -> $ret>(address) };
            // SAFETY: the caller keeps the C function's contract.
            unsafe { function($($arg),*) }
        }
    };
}

next_fn!(connect: fn(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int);
next_fn!(bind: fn(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int);
next_fn!(getsockname: fn(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int);
next_fn!(getpeername: fn(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int);
next_fn!(sendto: fn(fd: c_int, buf: *const c_void, n: size_t, flags: c_int, addr: *const sockaddr, len: socklen_t) -> ssize_t);
next_fn!(sendmsg: fn(fd: c_int, msg: *const msghdr, flags: c_int) -> ssize_t);
next_fn!(sendmmsg: fn(fd: c_int, msgs: *mut mmsghdr, vlen: c_uint, flags: c_int) -> c_int);
next_fn!(close: fn(fd: c_int) -> c_int);
next_fn!(read: fn(fd: c_int, buf: *mut c_void, n: size_t) -> ssize_t);
next_fn!(recv: fn(fd: c_int, buf: *mut c_void, n: size_t, flags: c_int) -> ssize_t);
next_fn!(recvfrom: fn(fd: c_int, buf: *mut c_void, n: size_t, flags: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> ssize_t);
next_fn!(recvmsg: fn(fd: c_int, msg: *mut msghdr, flags: c_int) -> ssize_t);
