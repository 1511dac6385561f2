//! `libgateway_preload.so`: loaded into an unmodified program by `gateway socksify`
//! (`LD_PRELOAD`), it makes the program's TCP connections to outside addresses SOCKS5 CONNECTs
//! through the gateway and gives its UDP sockets two-step bindings with header-less delivery,
//! so an RTSP player's RTP/RTCP over UDP passes a firewall that drops all other inbound UDP.
//!
//! The decisions are the state machine's in `gateway_client::shim` (unit-tested without
//! sockets); this library is the thin layer of C functions over it (`hooks`), the C library's
//! own functions (`real`), address conversions (`sockaddr`), the environment it is configured
//! by (`env`, `config`) and the one locked state of the process (`state`).

mod config;
mod env;
mod hooks;
mod real;
mod sockaddr;
mod state;

/// Runs when the library is loaded: keeps the shim's lock consistent across `fork()`.
extern "C" fn on_load() {
    // SAFETY: handlers with no preconditions; registration cannot be undone, nor need it be.
    unsafe {
        libc::pthread_atfork(
            Some(state::before_fork),
            Some(state::after_fork),
            Some(state::after_fork),
        );
    }
}

#[used]
#[unsafe(link_section = ".init_array")]
static ON_LOAD: extern "C" fn() = on_load;
