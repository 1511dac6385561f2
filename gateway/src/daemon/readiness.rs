//! Tells the service manager (systemd's `Type=notify`, through `NOTIFY_SOCKET`) where the daemon
//! is: ready only once the gate is attached and the SOCKS listeners are up, reloading around a
//! SIGHUP, stopping once a stop began. Without `NOTIFY_SOCKET` nothing is sent. A notification
//! that cannot be delivered is logged, never fatal: the gate matters more than the manager.

use sd_notify::NotifyState;
use tracing::warn;

/// The gate drops and the listeners accept: `READY=1`.
pub fn ready() {
    send(&[NotifyState::Ready, NotifyState::Status("running")]);
}

/// This process serves now, in place of another of the service (an upgrade, or a failed
/// upgrade's old daemon again): `MAINPID=` and `READY=1`, before the other exits, so the
/// service manager (`NotifyAccess=all`) follows the new main process instead of stopping.
pub fn main_pid_ready() {
    send(&[
        NotifyState::MainPid(std::process::id()),
        NotifyState::Ready,
        NotifyState::Status("running"),
    ]);
}

/// A SIGHUP reload begins: `RELOADING=1` with the clock systemd's `notify-reload` asks for.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// A stop began (the gate admits nothing from now on and stays attached): `STOPPING=1`.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

fn send(states: &[NotifyState]) {
    // The variable stays set: reload and stop notify later through the same socket.
    if let Err(error) = sd_notify::notify(false, states) {
        warn!(%error, "cannot notify the service manager (NOTIFY_SOCKET)");
    }
}
