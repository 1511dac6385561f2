//! `gateway socksify`: runs an unmodified program with the preload library, so its TCP goes
//! through the gateway (SOCKS5 CONNECT) and its UDP sockets get two-step bindings with
//! header-less delivery (docs/protocol.md section 10). It execs the program: same pid, and
//! signals reach the program itself.

use std::{
    ffi::OsString,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::Parser;

#[path = "preload/env.rs"]
mod env;

/// The preload library's file name, installed beside this executable.
const LIBRARY: &str = "libgateway_preload.so";

/// Run a program with its TCP and UDP through the gateway: TCP connects to outside addresses
/// become SOCKS5 CONNECTs; UDP sockets get two-step bindings with header-less (RAW) delivery,
/// so RTSP/RTP players (ffmpeg, GStreamer) play over UDP through a firewall that drops all other
/// inbound UDP. The gateway must be this host's next hop to the media servers. Loopback,
/// link-local, multicast, the host's own networks and --direct networks are reached directly.
#[expect(
    clippy::doc_markdown,
    reason = "the doc comments are the --help text, read as plain text"
)]
#[derive(Debug, Parser)]
#[command(name = "gateway socksify", bin_name = "gateway socksify", version)]
struct Cli {
    /// The gateway's SOCKS5 address.
    #[arg(long, value_name = "ADDR:PORT", env = env::PROXY)]
    proxy: std::net::SocketAddr,
    /// User name for username/password authentication (RFC 1929). The password comes from
    /// --password-file or from the GATEWAY_SOCKSIFY_PASSWORD environment variable, never from
    /// the command line.
    #[arg(long, value_name = "NAME", env = env::USER)]
    user: Option<String>,
    /// File whose first line is the password for --user.
    #[arg(long, value_name = "FILE", requires = "user")]
    password_file: Option<PathBuf>,
    /// More networks the program reaches directly, not through the gateway (repeatable).
    #[arg(long, value_name = "CIDR")]
    direct: Vec<String>,
    /// How much the shim tells on stderr (or --log-file): error, warn, info or debug.
    #[arg(long, value_name = "LEVEL", default_value = "warn", value_parser = ["error", "warn", "info", "debug"])]
    log_level: String,
    /// Append the shim's diagnostics to this file instead of stderr (never stdout: the
    /// program's output stays its own).
    #[arg(long, value_name = "FILE")]
    log_file: Option<PathBuf>,
    /// The preload library [default: libgateway_preload.so beside this executable, else in
    /// ../lib/gateway/].
    #[arg(long, value_name = "PATH")]
    library: Option<PathBuf>,
    /// The program and its arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    command: Vec<OsString>,
}

fn main() {
    if let Err(error) = run(Cli::parse()) {
        eprintln!("gateway socksify: {error:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let library = match cli.library {
        Some(path) => path,
        None => find_library()?,
    };
    let library = library
        .canonicalize()
        .with_context(|| format!("the preload library {}", library.display()))?;
    let (program, args) = cli.command.split_first().context("no program to run")?;
    if let Some(path) = which::which(program).ok()
        && is_static(&path)
    {
        eprintln!(
            "gateway socksify: warning: {} is statically linked (no dynamic loader), so the shim \
             cannot be loaded into it: it runs without the gateway",
            path.display()
        );
    }
    for cidr in &cli.direct {
        if cidr.parse::<std::net::IpAddr>().is_err()
            && cidr.split_once('/').is_none_or(|(ip, len)| {
                ip.parse::<std::net::IpAddr>().is_err() || len.parse::<u8>().is_err()
            })
        {
            bail!("--direct {cidr:?} is not a CIDR");
        }
    }
    let preload = match std::env::var_os("LD_PRELOAD") {
        Some(existing) if !existing.is_empty() => {
            let mut joined = library.clone().into_os_string();
            joined.push(":");
            joined.push(existing);
            joined
        }
        _ => library.into_os_string(),
    };
    let mut command = Command::new(program);
    command
        .args(args)
        .env("LD_PRELOAD", preload)
        .env(env::PROXY, cli.proxy.to_string())
        .env(env::LOG_LEVEL, &cli.log_level);
    if let Some(user) = &cli.user {
        command.env(env::USER, user);
        if let Some(file) = &cli.password_file {
            command.env(env::PASSWORD_FILE, file);
        } else if std::env::var_os(env::PASSWORD).is_none() {
            bail!(
                "--user needs a password: --password-file FILE or the {} environment variable",
                env::PASSWORD
            );
        }
    }
    if !cli.direct.is_empty() {
        command.env(env::DIRECT, cli.direct.join(","));
    }
    if let Some(file) = &cli.log_file {
        command.env(env::LOG_FILE, file);
    }
    let error = command.exec();
    bail!("run {}: {error}", Path::new(program).display())
}

/// `libgateway_preload.so` beside this executable (a build directory, an install's `bin/`
/// next to `lib/gateway/`).
fn find_library() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("where is this executable")?;
    let dir = exe.parent().context("this executable's directory")?;
    let candidates = [dir.join(LIBRARY), dir.join("../lib/gateway").join(LIBRARY)];
    candidates
        .iter()
        .find(|path| path.is_file())
        .cloned()
        .with_context(|| {
            format!(
                "the preload library {LIBRARY} is neither beside {} nor in ../lib/gateway/ \
                 (build it with `cargo build --release -p gateway-socksify`, or give --library)",
                exe.display()
            )
        })
}

/// Whether `path` is an ELF executable without a program interpreter (`PT_INTERP`): linked
/// statically, so no dynamic loader reads `LD_PRELOAD`. Scripts and unreadable files are not.
fn is_static(path: &Path) -> bool {
    use object::read::elf::{FileHeader as _, ProgramHeader as _};
    let Ok(data) = std::fs::read(path) else {
        return false;
    };
    let Ok(header) = object::elf::FileHeader64::<object::Endianness>::parse(&*data) else {
        return false;
    };
    let Ok(endian) = header.endian() else {
        return false;
    };
    header.program_headers(endian, &*data).is_ok_and(|headers| {
        !headers
            .iter()
            .any(|segment| segment.p_type(endian) == object::elf::PT_INTERP)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal little-endian ELF64 executable with one program header of type `p_type`.
    fn elf_with_segment(p_type: u32) -> Vec<u8> {
        let mut elf = vec![0u8; 64 + 56];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2; // 64-bit
        elf[5] = 1; // little-endian
        elf[6] = 1; // version
        elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        elf[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
        elf[20..24].copy_from_slice(&1u32.to_le_bytes());
        elf[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        elf[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        elf[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        elf[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        elf[64..68].copy_from_slice(&p_type.to_le_bytes());
        elf
    }

    #[test]
    fn a_program_without_an_interpreter_is_static() {
        let dir = std::env::temp_dir().join(format!("socksify-elf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (static_one, dynamic_one) = (dir.join("static"), dir.join("dynamic"));
        std::fs::write(&static_one, elf_with_segment(object::elf::PT_LOAD)).unwrap();
        std::fs::write(&dynamic_one, elf_with_segment(object::elf::PT_INTERP)).unwrap();
        let verdicts = (is_static(&static_one), is_static(&dynamic_one));
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(verdicts, (true, false));
    }

    #[test]
    fn a_dynamic_program_is_not_static() {
        assert!(!is_static(&which::which("sh").unwrap()));
        assert!(!is_static(Path::new("/nonexistent")));
    }

    #[test]
    fn the_command_keeps_its_own_flags() {
        let cli = Cli::try_parse_from([
            "gateway socksify",
            "--proxy",
            "198.51.100.1:1080",
            "ffmpeg",
            "-rtsp_transport",
            "udp",
            "-i",
            "rtsp://203.0.113.2/x",
        ])
        .unwrap();
        assert_eq!(cli.command.len(), 5);
        assert_eq!(cli.command[1], "-rtsp_transport");
        assert!(Cli::try_parse_from(["gateway socksify", "--proxy", "198.51.100.1:1080"]).is_err());
    }
}
