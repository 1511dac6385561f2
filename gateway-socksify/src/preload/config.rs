//! The library's configuration, from the environment `gateway socksify` set ([`super::env`]),
//! and its diagnostics: one line each, to stderr or the log file, never to stdout.

use std::net::{IpAddr, SocketAddr};

use super::env;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error,
    Warn,
    Info,
    Debug,
}

impl Level {
    fn parse(text: &str) -> Option<Self> {
        match text.to_ascii_lowercase().as_str() {
            "error" => Some(Self::Error),
            "warn" | "warning" => Some(Self::Warn),
            "info" => Some(Self::Info),
            "debug" => Some(Self::Debug),
            _ => None,
        }
    }
}

/// Where diagnostics go.
#[derive(Debug, Clone, Copy)]
pub struct Log {
    level: Level,
    fd: libc::c_int,
}

impl Log {
    fn from_env() -> Self {
        let level = std::env::var(env::LOG_LEVEL)
            .ok()
            .and_then(|text| Level::parse(&text))
            .unwrap_or(Level::Warn);
        let fd = std::env::var_os(env::LOG_FILE)
            .and_then(|path| {
                use std::os::unix::ffi::OsStrExt as _;
                let mut bytes = path.as_bytes().to_vec();
                bytes.push(0);
                // SAFETY: a NUL-terminated path; the descriptor lives as long as the process.
                let fd = unsafe {
                    libc::open(
                        bytes.as_ptr().cast(),
                        libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT | libc::O_CLOEXEC,
                        0o600,
                    )
                };
                (fd >= 0).then_some(fd)
            })
            .unwrap_or(2);
        Self { level, fd }
    }

    pub fn enabled(self, level: Level) -> bool {
        level <= self.level
    }

    /// One line, `gateway socksify[PID]: TEXT`.
    pub fn line(self, level: Level, text: &str) {
        if !self.enabled(level) {
            return;
        }
        // SAFETY: no preconditions.
        let pid = unsafe { libc::getpid() };
        let line = format!("gateway socksify[{pid}]: {text}\n");
        // SAFETY: a valid buffer; a short or failed write of a diagnostic is not an error.
        unsafe { libc::write(self.fd, line.as_ptr().cast(), line.len()) };
    }
}

/// Everything the library was told.
#[derive(Debug, Clone)]
pub struct Config {
    pub proxy: SocketAddr,
    pub credentials: Option<(String, String)>,
    /// Networks reached directly: the host's own links and `--direct`.
    pub direct: Vec<(IpAddr, u8)>,
    pub log: Log,
}

impl Config {
    /// `Ok(None)` when no proxy is set (the library then does nothing); `Err` with what is wrong.
    pub fn from_env() -> Result<Option<Self>, (Log, String)> {
        let log = Log::from_env();
        let Some(proxy) = std::env::var_os(env::PROXY) else {
            return Ok(None);
        };
        let proxy = proxy
            .to_str()
            .and_then(|text| text.parse::<SocketAddr>().ok())
            .ok_or_else(|| (log, format!("{} is not an IP:PORT", env::PROXY)))?;
        let credentials = match std::env::var(env::USER) {
            Ok(user) => Some((user, password().map_err(|text| (log, text))?)),
            Err(_) => None,
        };
        let mut direct = host_networks();
        if let Ok(list) = std::env::var(env::DIRECT) {
            for item in list.split(',').filter(|item| !item.trim().is_empty()) {
                direct
                    .push(parse_cidr(item.trim()).ok_or_else(|| {
                        (log, format!("{}: {item:?} is not a CIDR", env::DIRECT))
                    })?);
            }
        }
        Ok(Some(Self {
            proxy,
            credentials,
            direct,
            log,
        }))
    }
}

fn password() -> Result<String, String> {
    if let Ok(password) = std::env::var(env::PASSWORD) {
        return Ok(password);
    }
    let path = std::env::var_os(env::PASSWORD_FILE).ok_or_else(|| {
        format!(
            "a user name without a password: set {} or {}",
            env::PASSWORD,
            env::PASSWORD_FILE
        )
    })?;
    let text = std::fs::read_to_string(&path)
        .map_err(|error| format!("read the password file {}: {error}", path.to_string_lossy()))?;
    Ok(text.lines().next().unwrap_or_default().to_owned())
}

/// `ADDR/PREFIX` (or a bare address: one host).
pub fn parse_cidr(text: &str) -> Option<(IpAddr, u8)> {
    let (addr, prefix) = text.split_once('/').unwrap_or((text, ""));
    let ip: IpAddr = addr.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix = if prefix.is_empty() {
        max
    } else {
        prefix.parse().ok().filter(|p| *p <= max)?
    };
    Some((ip, prefix))
}

/// The networks of the host's own interfaces (`getifaddrs`): reached without the firewall.
fn host_networks() -> Vec<(IpAddr, u8)> {
    let mut found = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: an out-parameter; freed below.
    if unsafe { libc::getifaddrs(&raw mut list) } != 0 {
        return found;
    }
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: a node of the list getifaddrs returned.
        let item = unsafe { &*entry };
        // SAFETY: the entry's address and netmask are null or valid sockaddrs of their family.
        let (addr, mask) = unsafe {
            (
                super::sockaddr::read(item.ifa_addr, 128),
                super::sockaddr::read(item.ifa_netmask, 128),
            )
        };
        if let (Some(addr), Some(mask)) = (addr, mask) {
            let prefix = match mask.ip() {
                IpAddr::V4(v4) => u32::from(v4).count_ones(),
                IpAddr::V6(v6) => u128::from(v6).count_ones(),
            };
            found.push((addr.ip(), u8::try_from(prefix).unwrap_or(0)));
        }
        entry = item.ifa_next;
    }
    // SAFETY: the list getifaddrs allocated.
    unsafe { libc::freeifaddrs(list) };
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        assert_eq!(
            parse_cidr("198.51.100.0/24"),
            Some(("198.51.100.0".parse().unwrap(), 24))
        );
        assert_eq!(
            parse_cidr("2001:db8::1"),
            Some(("2001:db8::1".parse().unwrap(), 128))
        );
        assert_eq!(parse_cidr("198.51.100.0/33"), None);
        assert_eq!(parse_cidr("example.org/8"), None);
    }

    #[test]
    fn levels() {
        assert_eq!(Level::parse("DEBUG"), Some(Level::Debug));
        assert!(Level::Warn > Level::Error);
        assert_eq!(Level::parse("loud"), None);
    }
}
