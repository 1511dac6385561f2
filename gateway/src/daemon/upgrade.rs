//! Both halves of `gateway upgrade` in the daemon (the protocol is in `gateway::handover`):
//! the old daemon starts the new binary and hands over ([`start_new`], [`hand_over`]); the new
//! daemon takes over ([`receive`], [`announce`]). Blocking channel work runs in
//! `block_in_place`, so the relay's tasks go on meanwhile.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use gateway::handover::{
    CHANNEL_FD_ENV, Format,
    state::{self, DaemonState, Incoming},
    wire::{Channel, Message, WireError},
};
use tracing::{info, warn};

/// How long the new binary may take to load and attach its programs before it answers the
/// offer (the verifier takes seconds on the fan-out program).
const ATTACH_WITHIN: Duration = Duration::from_mins(2);
/// How long each later step may take.
const STEP_WITHIN: Duration = Duration::from_secs(30);

/// What this build does in an upgrade, set by the binary (a test build may write another
/// state version, or stop after receiving the state).
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub format: Format,
    /// Test builds only: after the state arrives, wait forever (to be killed mid-handover).
    pub stall_after_state: bool,
}

/// What the daemon was started as: the next binary gets the same arguments.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// The binary's path as started (after a package upgrade the new file is there).
    pub binary: PathBuf,
    pub args: Vec<OsString>,
}

impl Invocation {
    pub fn current() -> Self {
        let binary = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("gateway"));
        // `/proc/self/exe` of a replaced file ends in " (deleted)": the path is what counts.
        let binary = binary
            .to_str()
            .and_then(|path| path.strip_suffix(" (deleted)"))
            .map_or(binary.clone(), PathBuf::from);
        Self {
            binary,
            args: std::env::args_os().skip(1).collect(),
        }
    }
}

/// The new daemon, started with its end of the channel, and our end.
pub struct NewDaemon {
    pub child: Child,
    pub channel: Channel,
}

impl NewDaemon {
    /// Kills the new daemon (we started it: its pid is ours to signal) and reaps it.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `binary` with this daemon's arguments and one end of a fresh channel, and waits until
/// it accepts the state format we write (it has attached to the gate by then).
pub fn start_new(
    binary: &Path,
    invocation: &Invocation,
    format: &Format,
) -> Result<NewDaemon, String> {
    let (ours, theirs) = Channel::pair().map_err(|e| e.to_string())?;
    let fd = theirs.inheritable().map_err(|e| e.to_string())?;
    let child = Command::new(binary)
        .args(&invocation.args)
        .env(CHANNEL_FD_ENV, fd.to_string())
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("start {}: {e}", binary.display()))?;
    drop(theirs);
    let mut new = NewDaemon {
        child,
        channel: ours,
    };
    info!(pid = new.child.id(), binary = %binary.display(), "upgrade: new daemon started; offering state version {}", format.writes);
    let offer = Message::Offer {
        version: format.writes,
        pid: std::process::id(),
        gateway_version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let answer = tokio::task::block_in_place(|| {
        new.channel.send(&offer)?;
        new.channel.recv(ATTACH_WITHIN)
    });
    match answer {
        Ok(Message::Accept { .. }) => Ok(new),
        Ok(Message::Refuse { reason }) => {
            let _ = new.child.wait();
            Err(format!("the new binary refused the upgrade: {reason}"))
        }
        Ok(other) => {
            new.kill();
            Err(format!("the new binary answered {other:?} to the offer"))
        }
        Err(WireError::Closed) => {
            let status = new
                .child
                .wait()
                .map_or_else(|e| e.to_string(), |s| s.to_string());
            Err(format!(
                "the new binary exited before taking over ({status}); see its log lines above"
            ))
        }
        Err(error) => {
            new.kill();
            Err(format!("the new binary did not answer the offer: {error}"))
        }
    }
}

/// Sends the state and its descriptors and waits for the new daemon's `Ready`; then tells it
/// `Done`. Any other outcome kills the new daemon (the caller resumes).
pub fn hand_over(
    new: NewDaemon,
    document: &[u8],
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> Result<u32, String> {
    let outcome = tokio::task::block_in_place(|| {
        new.channel.send_state(document, fds)?;
        new.channel.recv(STEP_WITHIN)
    });
    match outcome {
        Ok(Message::Ready { pid }) => {
            let _ = new.channel.send(&Message::Done);
            Ok(pid)
        }
        Ok(Message::Failed { reason }) => {
            new.kill();
            Err(format!("the new daemon could not take over: {reason}"))
        }
        Ok(other) => {
            new.kill();
            Err(format!("the new daemon answered {other:?} to the state"))
        }
        Err(WireError::Closed) => {
            new.kill();
            Err("the new daemon died during the handover".to_owned())
        }
        Err(error) => {
            new.kill();
            Err(format!("the handover failed: {error}"))
        }
    }
}

/// The new daemon's side, before anything is served: answers the offer and receives the state.
/// A refusal or failure is told to the old daemon, which keeps serving.
pub fn receive(channel: &Channel, options: &Options) -> Result<(DaemonState, Incoming), String> {
    let offer = channel
        .recv(STEP_WITHIN)
        .map_err(|e| format!("no offer from the running daemon: {e}"))?;
    let Message::Offer {
        version,
        pid,
        gateway_version,
    } = offer
    else {
        return Err(format!("expected an offer, got {offer:?}"));
    };
    let format = &options.format;
    if !format.can_read(version) {
        let reason = format!(
            "this build reads state versions {}..={}; the running daemon (pid {pid}, {gateway_version}) writes {version}",
            format.reads.start(),
            format.reads.end()
        );
        let _ = channel.send(&Message::Refuse {
            reason: reason.clone(),
        });
        return Err(reason);
    }
    channel
        .send(&Message::Accept {
            pid: std::process::id(),
        })
        .map_err(|e| e.to_string())?;
    let (document, fds) = channel
        .recv_state(STEP_WITHIN)
        .map_err(|e| format!("receive the state: {e}"))?;
    info!(
        from_pid = pid,
        version,
        octets = document.len(),
        descriptors = fds.len(),
        "upgrade: state received"
    );
    if options.stall_after_state {
        warn!("upgrade: stalling after the state (test build)");
        loop {
            std::thread::park();
        }
    }
    let state = state::parse(&document).inspect_err(|e| {
        let _ = channel.send(&Message::Failed { reason: e.clone() });
    })?;
    if state.version != version {
        let reason = format!(
            "the state says version {}, the offer {version}",
            state.version
        );
        let _ = channel.send(&Message::Failed {
            reason: reason.clone(),
        });
        return Err(reason);
    }
    Ok((state, Incoming::new(fds)))
}

/// Tells the old daemon that taking over failed (it resumes), with `reason`.
pub fn fail(channel: &Channel, reason: &str) {
    let _ = channel.send(&Message::Failed {
        reason: reason.to_owned(),
    });
}

/// Everything is taken over: `Ready` to the old daemon, then its `Done` (or its exit).
pub fn announce(channel: &Channel) -> Result<(), String> {
    tokio::task::block_in_place(|| {
        channel
            .send(&Message::Ready {
                pid: std::process::id(),
            })
            .map_err(|e| e.to_string())?;
        match channel.recv(STEP_WITHIN) {
            Ok(Message::Done) | Err(WireError::Closed) => Ok(()),
            Ok(other) => Err(format!("expected done, got {other:?}")),
            Err(error) => Err(format!("no word from the old daemon after ready: {error}")),
        }
    })
}
