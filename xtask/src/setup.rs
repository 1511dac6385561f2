//! `cargo xtask setup`: everything a fresh Debian machine needs to build and test the project,
//! installed only from rustup's components, crates.io and Debian's package archive. Idempotent:
//! when everything is present it prints nothing.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// The bpf-linker release that links against nightly's LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_LINKER_LLVM_FEATURE: &str = "llvm-22";

/// The cargo-deb release `cargo xtask deb` builds the Debian package with.
pub const CARGO_DEB_VERSION: &str = "3.8.0";

/// Debian packages the tests, the demo and the benchmarks use.
const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",
    "ethtool",
    "iputils-ping",
    "curl",
    "python3",
    "python3-socks",
    "dante-server",
    "dnsmasq-base",
    "nftables",
    "tcpdump",
    "bpftool",
    // perf record/script for the bench's flame graphs.
    "linux-perf",
    "iperf3",
    // `promtool check metrics` checks what the --metrics endpoint serves.
    "prometheus",
    // GStreamer's RTSP server, driven from Python, is the real RTSP peer of the interop test.
    "python3-gi",
    "python3-gst-1.0",
    "gir1.2-gst-rtsp-server-1.0",
    "gstreamer1.0-rtsp",
    "gstreamer1.0-tools",
    "gstreamer1.0-plugins-base",
    "gstreamer1.0-plugins-good",
    // Unmodified players of the socksify tests: ffmpeg, and gst-launch-1.0 (gstreamer1.0-tools)
    // with rtspsrc, rtpL16depay and wavenc (-good) and audioconvert (-base).
    "ffmpeg",
    // The bench's PNG plots draw text with this font (ab_glyph, no fontconfig).
    "fonts-dejavu-core",
    // The unit file's test: `systemd-analyze verify`; the daemon under exactly the unit's
    // capabilities: `setpriv` (util-linux) and `capsh --decode`.
    "systemd",
    "util-linux",
    "libcap2-bin",
];

pub fn run() -> Result<()> {
    ensure_nightly_rust_src()?;
    ensure_bpf_linker()?;
    ensure_bpffs()?;
    ensure_debian_packages()?;
    ensure_cargo_deb()?;
    ensure_cargo_fuzz()?;
    Ok(())
}

/// The cargo-fuzz release `cargo xtask fuzz` drives.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// cargo-fuzz, at the pinned version, from crates.io (it runs under the nightly toolchain).
pub fn ensure_cargo_fuzz() -> Result<()> {
    let works = Command::new("cargo")
        .args(["fuzz", "--version"])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|out| {
            out.status.success()
                && String::from_utf8_lossy(&out.stdout).contains(CARGO_FUZZ_VERSION)
        });
    if works {
        return Ok(());
    }
    println!("setup: installing cargo-fuzz {CARGO_FUZZ_VERSION} (`cargo xtask fuzz` uses it)");
    status(
        Command::new("cargo")
            .args([
                "install",
                "--locked",
                "cargo-fuzz",
                "--version",
                CARGO_FUZZ_VERSION,
            ])
            .env_remove("CARGO_TARGET_DIR"),
    )
}

/// cargo-deb, at the pinned version, from crates.io.
fn ensure_cargo_deb() -> Result<()> {
    let works = Command::new("cargo")
        .args(["deb", "--version"])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|out| {
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains(CARGO_DEB_VERSION)
        });
    if works {
        return Ok(());
    }
    println!("setup: installing cargo-deb {CARGO_DEB_VERSION} (`cargo xtask deb` uses it)");
    status(
        Command::new("cargo")
            .args([
                "install",
                "--locked",
                "cargo-deb",
                "--version",
                CARGO_DEB_VERSION,
            ])
            .env_remove("CARGO_TARGET_DIR"),
    )
}

fn output(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("run {program} {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("{program} {} failed with {}", args.join(" "), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn status(cmd: &mut Command) -> Result<()> {
    let what = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("run {what}"))?;
    if !status.success() {
        bail!("{what} failed with {status}");
    }
    Ok(())
}

fn ensure_nightly_rust_src() -> Result<()> {
    let installed = output(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )
    .context("list the nightly toolchain's components (is the nightly toolchain installed?)")?;
    if installed.lines().any(|line| line.starts_with("rust-src")) {
        return Ok(());
    }
    println!("setup: adding rust-src to the nightly toolchain (the eBPF build uses -Z build-std)");
    status(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// bpf-linker counts as working when it runs and reports the pinned version.
fn bpf_linker_works() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|out| {
            out.status.success()
                && String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION)
        })
}

fn ensure_bpf_linker() -> Result<()> {
    if bpf_linker_works() {
        return Ok(());
    }
    println!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against nightly's own libLLVM \
         (about a minute)"
    );
    let sysroot =
        PathBuf::from(output("rustup", &["run", "nightly", "rustc", "--print", "sysroot"])?.trim());
    let sysroot_lib = sysroot.join("lib");
    let libllvm = fs::read_dir(&sysroot_lib)
        .with_context(|| format!("read {}", sysroot_lib.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("libLLVM.so.") || name.starts_with("libLLVM-"))
        .with_context(|| format!("no libLLVM.so.* in {}", sysroot_lib.display()))?;

    // bpf-linker's build looks for $LLVM_PREFIX/lib/libLLVM.so; point it at nightly's copy.
    let prefix = std::env::temp_dir().join(format!("gateway-llvm-prefix-{}", std::process::id()));
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib).with_context(|| format!("create {}", prefix_lib.display()))?;
    let target = sysroot_lib.join(&libllvm);
    for link in ["libLLVM.so".to_owned(), libllvm.clone()] {
        let link = prefix_lib.join(link);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&target, &link)
            .with_context(|| format!("symlink {} -> {}", link.display(), target.display()))?;
    }
    let result = status(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--force",
                "--no-default-features",
                "--features",
                BPF_LINKER_LLVM_FEATURE,
            ])
            .env("LLVM_PREFIX", &prefix)
            // The rpath keeps bpf-linker working after the prefix folder is gone.
            .env(
                "RUSTFLAGS",
                format!("-C link-arg=-Wl,-rpath,{}", sysroot_lib.display()),
            )
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_BUILD_TARGET"),
    );
    let _ = fs::remove_dir_all(&prefix);
    result.context("cargo install bpf-linker")?;
    if !bpf_linker_works() {
        bail!(
            "bpf-linker was installed but `bpf-linker --version` still fails; is ~/.cargo/bin on PATH?"
        );
    }
    Ok(())
}

fn bpffs_mounted(mounts: &str) -> bool {
    mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let _device = fields.next();
        fields.next() == Some("/sys/fs/bpf") && fields.next() == Some("bpf")
    })
}

fn ensure_bpffs() -> Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").context("read /proc/mounts")?;
    if bpffs_mounted(&mounts) {
        return Ok(());
    }
    println!("setup: mounting bpffs at /sys/fs/bpf (pinned maps and links live there)");
    fs::create_dir_all("/sys/fs/bpf").context("create /sys/fs/bpf")?;
    status(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

fn package_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "install ok installed")
}

fn ensure_debian_packages() -> Result<()> {
    ensure_packages(DEBIAN_PACKAGES, "the project")
}

/// Installs those of `packages` that are missing (apt-get update first), saying what for.
pub fn ensure_packages(packages: &[&str], what_for: &str) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|package| !package_installed(package))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!(
        "setup: installing Debian packages for {what_for}: {}",
        missing.join(" ")
    );
    status(
        Command::new("apt-get")
            .args(["-qq", "update"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    status(
        Command::new("apt-get")
            .args(["-qq", "install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null()),
    )
}

/// Path of the workspace root (xtask lives one level below it).
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or_else(|| Path::new("."))
}

#[cfg(test)]
mod tests {
    use super::bpffs_mounted;

    #[test]
    fn recognises_bpffs_mount() {
        let mounts = "sysfs /sys sysfs rw 0 0\nbpf /sys/fs/bpf bpf rw,relatime 0 0\n";
        assert!(bpffs_mounted(mounts));
        assert!(!bpffs_mounted(
            "sysfs /sys sysfs rw 0 0\nnone /sys/fs/bpf tmpfs rw 0 0\n"
        ));
    }
}
