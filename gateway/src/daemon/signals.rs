//! The daemon's signals, installed before anything is attached or bound: SIGTERM and SIGINT
//! stop it, SIGHUP reloads the users file and the policy, SIGUSR2 upgrades (`gateway upgrade`). A signal that arrives during start-up
//! waits here until start-up looks ([`Signals::stop_pending`]), so it never takes the default
//! action (which would kill the daemon mid-attach without a word).

use std::task::{Context, Poll, Waker};

use anyhow::{Context as _, Result};
use tokio::signal::unix::{Signal, SignalKind, signal};

/// What a signal asks of the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// SIGTERM or SIGINT (named).
    Stop(&'static str),
    /// SIGHUP.
    Reload,
    /// SIGUSR2: hand over to the binary the daemon was started from (`gateway upgrade`).
    Upgrade,
}

pub struct Signals {
    terminate: Signal,
    interrupt: Signal,
    hangup: Signal,
    user2: Signal,
}

impl Signals {
    /// Installs the handlers; needs the tokio runtime.
    pub fn install() -> Result<Self> {
        Ok(Self {
            terminate: signal(SignalKind::terminate()).context("install the SIGTERM handler")?,
            interrupt: signal(SignalKind::interrupt()).context("install the SIGINT handler")?,
            hangup: signal(SignalKind::hangup()).context("install the SIGHUP handler")?,
            user2: signal(SignalKind::user_defined2()).context("install the SIGUSR2 handler")?,
        })
    }

    /// The next signal.
    pub async fn next(&mut self) -> Event {
        tokio::select! {
            _ = self.terminate.recv() => Event::Stop("SIGTERM"),
            _ = self.interrupt.recv() => Event::Stop("SIGINT"),
            _ = self.hangup.recv() => Event::Reload,
            _ = self.user2.recv() => Event::Upgrade,
        }
    }

    /// A SIGTERM or SIGINT received and not yet handled, without waiting. A pending SIGHUP stays
    /// pending for [`Signals::next`].
    pub fn stop_pending(&mut self) -> Option<&'static str> {
        let mut cx = Context::from_waker(Waker::noop());
        if matches!(self.terminate.poll_recv(&mut cx), Poll::Ready(Some(()))) {
            return Some("SIGTERM");
        }
        if matches!(self.interrupt.poll_recv(&mut cx), Poll::Ready(Some(()))) {
            return Some("SIGINT");
        }
        None
    }
}
