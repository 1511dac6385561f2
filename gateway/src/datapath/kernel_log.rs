//! The eBPF programs' log: the rare data-path events they write with aya-log (a stale heartbeat
//! turning the gate closed, a packet shape a program cannot handle), each rate-limited in the
//! kernel. The daemon drains the ring buffer on the tokio runtime, woken by its fd, into
//! `tracing` under the target [`TARGET`].

use std::panic::AssertUnwindSafe;

use aya::Ebpf;
use aya_log::EbpfLogger;
use tokio::{
    io::{Interest, unix::AsyncFd},
    task::JoinHandle,
};
use tracing::{debug, error, info, trace, warn};

/// The `tracing` target of every kernel event.
pub const TARGET: &str = "gateway::datapath::kernel";

/// Forwards aya-log's `log` records to `tracing` under [`TARGET`].
struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _metadata: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args();
        match record.level() {
            log::Level::Error => error!(target: TARGET, "{message}"),
            log::Level::Warn => warn!(target: TARGET, "{message}"),
            log::Level::Info => info!(target: TARGET, "{message}"),
            log::Level::Debug => debug!(target: TARGET, "{message}"),
            log::Level::Trace => trace!(target: TARGET, "{message}"),
        }
    }

    fn flush(&self) {}
}

/// The programs' log ring buffer, taken from the loaded object.
pub struct KernelLog(EbpfLogger<ToTracing>);

impl KernelLog {
    /// Takes the `AYA_LOGS` ring buffer out of `ebpf`.
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, aya_log::Error> {
        EbpfLogger::init_with_logger(ebpf, ToTracing).map(Self)
    }

    /// Drains the ring buffer into `tracing` whenever it has records, until the runtime ends.
    /// Needs the tokio runtime.
    pub fn spawn_drain(self) -> std::io::Result<JoinHandle<()>> {
        // SAFETY: the AsyncFd owns the logger and with it the ring buffer's map fd, which stays
        // open and the same for the AsyncFd's whole life (`as_raw_fd` returns the map's fd).
        let mut fd = unsafe { AsyncFd::register_with_interest(self.0, Interest::READABLE) }
            .map_err(std::io::Error::from)?;
        Ok(tokio::spawn(async move {
            loop {
                let mut guard = match fd.readable_mut().await {
                    Ok(guard) => guard,
                    Err(error) => {
                        warn!(%error, "kernel log: cannot wait for records; no longer drained");
                        return;
                    }
                };
                // aya-log panics on a record it cannot parse; one bad record must not end the
                // drain.
                let logger = guard.get_inner_mut();
                if std::panic::catch_unwind(AssertUnwindSafe(|| logger.flush())).is_err() {
                    error!(
                        "kernel log: a record could not be parsed; the rest of the batch is lost"
                    );
                }
                guard.clear_ready();
            }
        }))
    }
}
