//! Username/password authentication (RFC 1929) against a users file of `name:argon2id-hash`
//! lines, and a per-source-address limiter for failed attempts. Verification is constant-time
//! (argon2's hash comparison) and takes the same work for unknown users.

use std::{
    collections::HashMap,
    net::IpAddr,
    path::Path,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use argon2::{
    Argon2, PasswordHash, PasswordHasher as _, PasswordVerifier as _, password_hash::SaltString,
};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum UsersError {
    #[error("read users file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("users file {path}, line {line}: {reason}")]
    Line {
        path: String,
        line: usize,
        reason: String,
    },
}

/// The users file: name -> argon2id PHC hash.
#[derive(Debug, Default, Clone)]
pub struct Users {
    hashes: HashMap<String, String>,
}

/// A hash verified against when the user is unknown, so timing does not reveal which names exist.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$1M4bxkqXrNAaXnHGtkOpFZtTMWY3c1qqpGLXpe4PUDE";

impl Users {
    pub fn load(path: &Path) -> Result<Self, UsersError> {
        let text = std::fs::read_to_string(path).map_err(|source| UsersError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|(line, reason)| UsersError::Line {
            path: path.display().to_string(),
            line,
            reason,
        })
    }

    /// Parses `name:hash` lines; blank lines and `#` comments are skipped.
    pub fn parse(text: &str) -> Result<Self, (usize, String)> {
        let mut hashes = HashMap::new();
        for (index, line) in text.lines().enumerate() {
            let line_no = index + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, hash) = line
                .split_once(':')
                .ok_or_else(|| (line_no, "expected NAME:HASH".to_owned()))?;
            if name.is_empty() || name.len() > 255 {
                return Err((line_no, "user name must be 1..255 octets".to_owned()));
            }
            let parsed = PasswordHash::new(hash)
                .map_err(|error| (line_no, format!("not a PHC hash string: {error}")))?;
            if parsed.algorithm.as_str() != "argon2id" {
                return Err((
                    line_no,
                    format!("hash algorithm {} is not argon2id", parsed.algorithm),
                ));
            }
            if hashes.insert(name.to_owned(), hash.to_owned()).is_some() {
                return Err((line_no, format!("user {name:?} listed twice")));
            }
        }
        Ok(Self { hashes })
    }

    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// Whether `name` is listed.
    pub fn contains(&self, name: &str) -> bool {
        self.hashes.contains_key(name)
    }

    /// Whether `password` is `name`'s password. Costs one argon2 verification either way.
    pub fn verify(&self, name: &str, password: &[u8]) -> bool {
        let (hash, known) = match self.hashes.get(name) {
            Some(hash) => (hash.as_str(), true),
            None => (DUMMY_HASH, false),
        };
        let Ok(parsed) = PasswordHash::new(hash) else {
            return false;
        };
        let matches = Argon2::default().verify_password(password, &parsed).is_ok();
        matches && known
    }
}

/// A users-file line for `name` with a fresh salt: `name:$argon2id$...`.
pub fn hash_line(name: &str, password: &[u8]) -> Result<String, String> {
    if name.is_empty() || name.len() > 255 || name.contains(':') || name.contains('\n') {
        return Err("user name must be 1..255 octets without ':' or newlines".to_owned());
    }
    if password.is_empty() || password.len() > 255 {
        return Err("password must be 1..255 octets (RFC 1929)".to_owned());
    }
    let mut salt_bytes = [0u8; 16];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom")
            .map_err(|error| format!("open /dev/urandom: {error}"))?,
        &mut salt_bytes,
    )
    .map_err(|error| format!("read /dev/urandom: {error}"))?;
    let salt =
        SaltString::encode_b64(&salt_bytes).map_err(|error| format!("encode salt: {error}"))?;
    let hash = Argon2::default()
        .hash_password(password, &salt)
        .map_err(|error| format!("hash the password: {error}"))?;
    Ok(format!("{name}:{hash}"))
}

/// Limits failed authentications per source address: after `max_failures` within `window`,
/// further attempts from that address are refused without checking until the window passes.
#[derive(Debug)]
pub struct FailureLimiter {
    max_failures: u32,
    window: Duration,
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl FailureLimiter {
    pub fn new(max_failures: u32, window: Duration) -> Self {
        Self {
            max_failures,
            window,
            failures: Mutex::default(),
        }
    }

    /// Whether `ip` may try now.
    pub fn may_try(&self, ip: IpAddr, now: Instant) -> bool {
        let mut failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        match failures.get(&ip) {
            Some(&(count, since)) if now.duration_since(since) < self.window => {
                count < self.max_failures
            }
            Some(_) => {
                failures.remove(&ip);
                true
            }
            None => true,
        }
    }

    pub fn record_failure(&self, ip: IpAddr, now: Instant) {
        let mut failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        // Bound memory under a spray of sources: forget expired entries when the table grows.
        if failures.len() > 65_536 {
            let window = self.window;
            failures.retain(|_, (_, since)| now.duration_since(*since) < window);
        }
        let entry = failures.entry(ip).or_insert((0, now));
        if now.duration_since(entry.1) >= self.window {
            *entry = (0, now);
        }
        entry.0 += 1;
    }

    pub fn record_success(&self, ip: IpAddr) {
        self.failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_line_round_trips_through_the_users_file() {
        let line = hash_line("alice", b"s3cret").unwrap();
        assert!(line.starts_with("alice:$argon2id$"));
        let users = Users::parse(&format!("# users\n\n{line}\n")).unwrap();
        assert_eq!(users.len(), 1);
        assert!(users.verify("alice", b"s3cret"));
        assert!(!users.verify("alice", b"wrong"));
        assert!(!users.verify("bob", b"s3cret"));
    }

    #[test]
    fn users_file_errors_name_the_line() {
        assert_eq!(Users::parse("alice").unwrap_err().0, 1);
        assert_eq!(Users::parse("# c\nalice:notahash").unwrap_err().0, 2);
        let line = hash_line("alice", b"x").unwrap();
        let twice = format!("{line}\n{line}");
        assert!(Users::parse(&twice).unwrap_err().1.contains("twice"));
        let bcrypt = "bob:$2b$12$abcdefghijklmnopqrstuu5.xJ6HqB1xYy5mcyN9g1fG3Ho1o1tSK";
        assert!(Users::parse(bcrypt).is_err());
    }

    #[test]
    fn hash_line_rejects_bad_input() {
        assert!(hash_line("", b"x").is_err());
        assert!(hash_line("a:b", b"x").is_err());
        assert!(hash_line("a", b"").is_err());
        assert!(hash_line("a", &[b'x'; 256]).is_err());
    }

    #[test]
    fn limiter_blocks_after_failures_until_the_window_passes() {
        let limiter = FailureLimiter::new(3, Duration::from_mins(1));
        let ip: IpAddr = "198.51.100.2".parse().unwrap();
        let other: IpAddr = "198.51.100.3".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.may_try(ip, t0));
            limiter.record_failure(ip, t0);
        }
        assert!(!limiter.may_try(ip, t0 + Duration::from_secs(10)));
        assert!(limiter.may_try(other, t0));
        assert!(limiter.may_try(ip, t0 + Duration::from_secs(61)));
        limiter.record_failure(ip, t0 + Duration::from_secs(61));
        limiter.record_success(ip);
        assert!(limiter.may_try(ip, t0 + Duration::from_secs(62)));
    }
}
