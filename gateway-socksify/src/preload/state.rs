//! The process's one shim state behind one lock, and the gateway's control connection as the
//! state machine's [`Control`].
//!
//! The lock is a plain `pthread` mutex taken around `fork()` (`pthread_atfork`), so a child
//! never inherits it locked by a thread it does not have. While the library works (its own
//! control connection, a SOCKS handshake on a program's socket), a thread-local flag sends the
//! socket calls it makes itself straight to the C library.

use std::{
    cell::{Cell, UnsafeCell},
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd as _,
    sync::atomic::{AtomicBool, Ordering},
};

use gateway_client::{
    BindOptions, Family, Timeouts,
    blocking::{Binding, Client, Session},
    shim::{Control, Direct, Reserved, Shim},
};

use super::config::{Config, Level, Log};

thread_local! {
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

/// Whether this thread is inside the library (its own calls pass straight through).
pub fn inside() -> bool {
    INSIDE.with(Cell::get)
}

/// Runs `f` with this thread's own socket calls passing straight through.
pub fn passing_through<R>(f: impl FnOnce() -> R) -> R {
    let before = INSIDE.with(|inside| inside.replace(true));
    let result = f();
    INSIDE.with(|inside| inside.set(before));
    result
}

/// Set once a socket is tracked: until then `read`, `recv` and `close` skip the lock.
static ACTIVE: AtomicBool = AtomicBool::new(false);

pub fn active() -> bool {
    ACTIVE.load(Ordering::Relaxed)
}

pub fn mark_active() {
    ACTIVE.store(true, Ordering::Relaxed);
}

/// The gateway as the shim's [`Control`]: one enhanced-mode session, opened when first needed.
pub struct Gateway {
    pub config: Config,
    session: Option<Session>,
    /// The control connection's local address: every binding's LOCAL.
    local_ip: Option<IpAddr>,
}

impl Gateway {
    fn new(config: Config) -> Self {
        Self {
            config,
            session: None,
            local_ip: None,
        }
    }

    pub fn log(&self) -> Log {
        self.config.log
    }

    fn session(&mut self) -> Result<(&mut Session, IpAddr), String> {
        if self.session.as_ref().is_none_or(Session::is_closed) {
            let log = self.config.log;
            let client = Client::connect(
                self.config.proxy,
                self.config.credentials.clone(),
                Timeouts::default(),
            )
            .map_err(|error| format!("the gateway at {}: {error}", self.config.proxy))?;
            let local = client.local_addr().map_err(|error| error.to_string())?;
            let session = client.enhanced().map_err(|error| error.to_string())?;
            log.line(
                Level::Info,
                &format!("control connection to {} from {local}", self.config.proxy),
            );
            self.local_ip = Some(local.ip().to_canonical());
            self.session = Some(session);
        }
        match (self.session.as_mut(), self.local_ip) {
            (Some(session), Some(ip)) => Ok((session, ip)),
            _ => Err("no control connection".into()),
        }
    }

    /// The program closes `fd`: if that is the control connection's number (a program closing
    /// every descriptor), the session is abandoned without closing the number again.
    pub fn program_closes(&mut self, fd: i32) {
        if self.session.as_ref().is_some_and(|s| s.as_raw_fd() == fd)
            && let Some(session) = self.session.take()
        {
            std::mem::forget(session);
        }
    }
}

const RAW: BindOptions = BindOptions { raw: true };

impl Control for Gateway {
    type Binding = Binding;

    fn reserve(&mut self, local_port: u16, pair: bool) -> Result<Reserved<Binding>, String> {
        let log = self.config.log;
        let (session, ip) = self.session()?;
        let local = SocketAddr::new(ip, local_port);
        let family = Family::of(ip);
        let binding = if pair {
            session.bind_pair_with(local, family, RAW)
        } else {
            session.bind_with(local, family, RAW)
        }
        .map_err(|error| error.to_string())?;
        let relays = binding.relays();
        log.line(
            Level::Info,
            &format!(
                "step 1 for {local}{}: external relay {} (the program is told this address)",
                if pair {
                    " and the next port (RTP pair)"
                } else {
                    ""
                },
                relays.external
            ),
        );
        Ok(Reserved {
            raw: binding
                .reply_flags()
                .contains(gateway_proto::enhanced::Flags::RAW),
            external: relays.external,
            binding,
        })
    }

    fn confirm(&mut self, binding: &mut Binding, remote: SocketAddr) -> Result<bool, String> {
        let log = self.config.log;
        let (session, _) = self.session()?;
        session
            .connect(binding, remote)
            .map_err(|error| error.to_string())?;
        log.line(
            Level::Info,
            &format!(
                "step 2: {} confirmed with the source {remote}{}",
                binding.relays().external,
                if binding.is_raw() {
                    ", header-less"
                } else {
                    ""
                }
            ),
        );
        Ok(binding.is_raw())
    }

    fn open(&mut self, local_port: u16, remote: SocketAddr) -> Result<Reserved<Binding>, String> {
        let log = self.config.log;
        let (session, ip) = self.session()?;
        let binding = session
            .open_with(SocketAddr::new(ip, local_port), remote, RAW)
            .map_err(|error| error.to_string())?;
        log.line(
            Level::Info,
            &format!("one-step open {local_port} -> {remote}"),
        );
        Ok(Reserved {
            raw: binding.is_raw(),
            external: binding.relays().external,
            binding,
        })
    }

    fn release(&mut self, binding: Binding) {
        if let Some(session) = self.session.as_mut() {
            let external = binding.relays().external;
            if let Err(error) = session.release(binding) {
                self.config
                    .log
                    .line(Level::Debug, &format!("release {external}: {error}"));
            }
        }
    }

    fn forget_connection(&mut self) {
        // The parent's connection: dropping the child's copy of the descriptor closes nothing
        // the parent uses and says nothing on it.
        self.session = None;
        self.local_ip = None;
    }

    fn notice(&mut self, text: &str) {
        self.config.log.line(Level::Warn, text);
    }
}

/// The state of this process.
pub struct Global {
    pub shim: Shim<Binding>,
    pub gateway: Gateway,
    pid: i32,
}

enum Slot {
    Unread,
    /// No proxy configured, or a bad configuration (already said): nothing is intercepted.
    Inert,
    Ready(Box<Global>),
}

struct Locked {
    mutex: UnsafeCell<libc::pthread_mutex_t>,
    slot: UnsafeCell<Slot>,
}

// SAFETY: `slot` is only touched with `mutex` held.
unsafe impl Sync for Locked {}

static STATE: Locked = Locked {
    mutex: UnsafeCell::new(libc::PTHREAD_MUTEX_INITIALIZER),
    slot: UnsafeCell::new(Slot::Unread),
};

fn lock() {
    // SAFETY: a statically initialised mutex.
    unsafe { libc::pthread_mutex_lock(STATE.mutex.get()) };
}

fn unlock() {
    // SAFETY: held by this thread.
    unsafe { libc::pthread_mutex_unlock(STATE.mutex.get()) };
}

/// `pthread_atfork` handlers: the lock is held across `fork()`, so both sides get it unlocked.
pub extern "C" fn before_fork() {
    lock();
}

pub extern "C" fn after_fork() {
    unlock();
}

/// Runs `f` on the process's state under the lock, with the thread's own socket calls passing
/// through; `None` when the library is inert. A child after `fork()` first forgets what was the
/// parent's.
pub fn with<R>(f: impl FnOnce(&mut Global) -> R) -> Option<R> {
    passing_through(|| {
        lock();
        // SAFETY: the lock is held until `unlock` below; nothing else touches the slot.
        let slot = unsafe { &mut *STATE.slot.get() };
        if matches!(slot, Slot::Unread) {
            *slot = match Config::from_env() {
                Ok(Some(config)) => {
                    let direct = Direct::new(config.proxy, config.direct.clone());
                    Slot::Ready(Box::new(Global {
                        shim: Shim::new(direct),
                        gateway: Gateway::new(config),
                        // SAFETY: no preconditions.
                        pid: unsafe { libc::getpid() },
                    }))
                }
                Ok(None) => Slot::Inert,
                Err((log, text)) => {
                    log.line(Level::Error, &format!("{text}; nothing is proxied"));
                    Slot::Inert
                }
            };
        }
        let result = match slot {
            Slot::Ready(global) => {
                // SAFETY: no preconditions.
                let pid = unsafe { libc::getpid() };
                if global.pid != pid {
                    global.pid = pid;
                    let Global { shim, gateway, .. } = &mut **global;
                    shim.forked_child(gateway);
                }
                Some(f(global))
            }
            Slot::Unread | Slot::Inert => None,
        };
        unlock();
        result
    })
}
