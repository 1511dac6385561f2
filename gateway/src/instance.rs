//! A gateway instance: its name, where its pinned objects live (`/sys/fs/bpf/gateway/NAME/`) and
//! the lock file (`/run/gateway/NAME/lock`) that shows whether its owner lives. Owns no eBPF.

use std::{
    fs::{self, File, OpenOptions},
    io::{Read as _, Seek as _, Write as _},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use thiserror::Error;

/// Default instance name.
pub const DEFAULT_INSTANCE: &str = "gateway";
const BPFFS_ROOT: &str = "/sys/fs/bpf/gateway";
const RUN_ROOT: &str = "/run/gateway";

#[derive(Debug, Error)]
pub enum InstanceError {
    #[error("invalid instance name {0:?}: use 1 to 32 characters from [A-Za-z0-9_-]")]
    InvalidName(String),
    #[error(
        "gateway instance {name:?} is already running (pid {pid}); stop it first or pick another --instance"
    )]
    AlreadyRunning { name: String, pid: String },
    #[error("no gateway instance {0:?} is running")]
    NotRunning(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The paths of one named instance.
#[derive(Debug, Clone)]
pub struct Instance {
    name: String,
}

impl Instance {
    pub fn new(name: &str) -> Result<Self, InstanceError> {
        let valid = !name.is_empty()
            && name.len() <= 32
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid {
            return Err(InstanceError::InvalidName(name.to_owned()));
        }
        Ok(Self {
            name: name.to_owned(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Directory of pinned maps and links.
    pub fn pin_dir(&self) -> PathBuf {
        Path::new(BPFFS_ROOT).join(&self.name)
    }

    /// Directory of the lock file and runtime state.
    pub fn run_dir(&self) -> PathBuf {
        Path::new(RUN_ROOT).join(&self.name)
    }

    fn lock_path(&self) -> PathBuf {
        self.run_dir().join("lock")
    }

    fn open_lock_file(&self) -> Result<File, InstanceError> {
        let dir = self.run_dir();
        fs::create_dir_all(&dir).map_err(|source| InstanceError::Io {
            what: "create",
            path: dir.clone(),
            source,
        })?;
        let path = self.lock_path();
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|source| InstanceError::Io {
                what: "open",
                path,
                source,
            })
    }

    /// Takes ownership of the instance. Fails only when a live process holds it.
    pub fn lock(&self) -> Result<InstanceLock, InstanceError> {
        let mut file = self.open_lock_file()?;
        // A `gateway stats` probing the lock holds it shared for a moment: retry briefly.
        for attempt in 0..20 {
            if flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
                let pid = std::process::id().to_string();
                let path = self.lock_path();
                let io = |source| InstanceError::Io {
                    what: "write",
                    path: path.clone(),
                    source,
                };
                file.set_len(0).map_err(io)?;
                file.rewind().map_err(io)?;
                file.write_all(pid.as_bytes()).map_err(io)?;
                return Ok(InstanceLock {
                    file,
                    path: self.lock_path(),
                });
            }
            if attempt < 19 {
                thread::sleep(Duration::from_millis(25));
            }
        }
        let mut pid = String::new();
        let _ = file.read_to_string(&mut pid);
        Err(InstanceError::AlreadyRunning {
            name: self.name.clone(),
            pid: pid.trim().to_owned(),
        })
    }

    /// Whether a live daemon owns the instance (its lock is held).
    pub fn is_running(&self) -> bool {
        if !self.lock_path().exists() {
            return false;
        }
        let Ok(file) = self.open_lock_file() else {
            return false;
        };
        if flock(&file, libc::LOCK_SH | libc::LOCK_NB) {
            flock(&file, libc::LOCK_UN);
            false
        } else {
            true
        }
    }

    /// Errors with [`InstanceError::NotRunning`] unless a live daemon owns the instance.
    pub fn require_running(&self) -> Result<(), InstanceError> {
        if self.is_running() {
            Ok(())
        } else {
            Err(InstanceError::NotRunning(self.name.clone()))
        }
    }
}

fn flock(file: &File, operation: libc::c_int) -> bool {
    // SAFETY: the fd is open for the lifetime of `file`; flock has no memory effects.
    unsafe { libc::flock(file.as_raw_fd(), operation) == 0 }
}

/// Held for the daemon's lifetime; the kernel releases the lock when the process dies, however
/// it dies.
#[derive(Debug)]
pub struct InstanceLock {
    file: File,
    path: PathBuf,
}

impl InstanceLock {
    /// The lock a previous daemon handed over (its open file holds the `flock`): this process's
    /// pid goes in.
    pub fn adopt(instance: &Instance, fd: std::os::fd::OwnedFd) -> Result<Self, InstanceError> {
        let mut file = File::from(fd);
        let path = instance.lock_path();
        let io = |source| InstanceError::Io {
            what: "write",
            path: path.clone(),
            source,
        };
        // Still ours: a shared-lock probe from here would succeed on our own exclusive lock,
        // so take the exclusive one again (a no-op on the open file that holds it).
        if !flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
            return Err(InstanceError::AlreadyRunning {
                name: instance.name.clone(),
                pid: "another".to_owned(),
            });
        }
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        file.write_all(std::process::id().to_string().as_bytes())
            .map_err(io)?;
        Ok(Self { file, path })
    }

    /// Clean exit: remove the lock file and its directory, then release.
    pub fn release(self) {
        let _ = fs::remove_file(&self.path);
        if let Some(dir) = self.path.parent() {
            let _ = fs::remove_dir(dir);
        }
        drop(self.file);
    }
}

/// The open lock file, to hand over.
impl std::os::fd::AsFd for InstanceLock {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_names_are_validated() {
        assert!(Instance::new("gateway").is_ok());
        assert!(Instance::new("t-1_a").is_ok());
        for bad in ["", "../x", "a/b", "with space", &"x".repeat(33)] {
            assert!(matches!(
                Instance::new(bad),
                Err(InstanceError::InvalidName(_))
            ));
        }
    }

    #[test]
    fn paths() {
        let instance = Instance::new("t1").unwrap();
        assert_eq!(instance.pin_dir(), Path::new("/sys/fs/bpf/gateway/t1"));
        assert_eq!(instance.run_dir(), Path::new("/run/gateway/t1"));
    }
}
