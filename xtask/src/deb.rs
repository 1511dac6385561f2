//! `cargo xtask deb`, `install` and `run`: the Debian package (built with cargo-deb from
//! `[package.metadata.deb]` in gateway/Cargo.toml, after the binaries, the preload library and
//! the files `gateway-generate-docs` writes), installing it, and running the daemon on this
//! host. Each says what it did and how to undo it.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{cargo::cargo, setup::workspace_root};

/// Which build goes into the package.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// What `cargo xtask deb` and `install` ship.
    Release,
    /// The test build `cargo xtask test` already made (cargo-deb strips it; it warns that dev
    /// profiles are meant for tests only, which is all this is for).
    Dev,
}

impl Profile {
    fn dir(self) -> &'static str {
        match self {
            Self::Release => "release",
            Self::Dev => "debug",
        }
    }
}

/// Builds everything the package holds and the package itself; its path.
pub fn build(profile: Profile) -> Result<PathBuf> {
    let release = profile == Profile::Release;
    let with_profile = |args: &[&'static str]| -> Vec<&'static str> {
        let mut all = args.to_vec();
        if release {
            all.push("--release");
        }
        all
    };
    cargo(&with_profile(&[
        "build",
        "--locked",
        "--bins",
        "-p",
        "gateway",
        "-p",
        "gateway-rtsp",
        "-p",
        "gateway-socksify",
    ]))?;
    // The preload library is a cdylib, which `--bins` does not build.
    cargo(&with_profile(&[
        "build",
        "--locked",
        "-p",
        "gateway-socksify",
        "--lib",
    ]))?;
    let built = workspace_root().join("target").join(profile.dir());
    // Where [package.metadata.deb]'s assets expect them (`target/release/` means this
    // profile's directory to cargo-deb).
    let assets = built.join("deb-assets");
    let _ = std::fs::remove_dir_all(&assets);
    let status = Command::new(built.join("gateway-generate-docs"))
        .arg(&assets)
        .status()
        .context("run gateway-generate-docs")?;
    if !status.success() {
        bail!("gateway-generate-docs failed with {status}");
    }
    let out_dir = workspace_root().join(if release {
        "target/debian"
    } else {
        "target/debian-test"
    });
    let out_dir_text = out_dir.display().to_string();
    let mut args = vec![
        "deb",
        "-p",
        "gateway",
        "--no-build",
        "--locked",
        "-o",
        &out_dir_text,
    ];
    if !release {
        args.extend(["--profile", "dev", "--fast"]);
    }
    cargo(&args)?;
    let version = env!("CARGO_PKG_VERSION");
    let deb = out_dir.join(format!("gateway_{version}-1_amd64.deb"));
    if !deb.is_file() {
        bail!("cargo deb wrote no {}", deb.display());
    }
    Ok(deb)
}

/// `cargo xtask deb`.
pub fn deb() -> Result<()> {
    let deb = build(Profile::Release)?;
    println!("deb: built {}", deb.display());
    println!(
        "deb: install it with `dpkg -i {}` (or `cargo xtask install`)",
        deb.display()
    );
    Ok(())
}

/// Whether systemd runs this host (its own test: /run/systemd/system exists).
fn systemd_is_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

fn run_checked(program: &str, args: &[&str]) -> Result<()> {
    let status = Command::new(program)
        .args(args)
        .status()
        .with_context(|| format!("run {program} {}", args.join(" ")))?;
    if !status.success() {
        bail!("{program} {} failed with {status}", args.join(" "));
    }
    Ok(())
}

/// `cargo xtask install [--enable]`.
pub fn install(enable: bool) -> Result<()> {
    let deb = build(Profile::Release)?;
    let deb_text = deb.display().to_string();
    run_checked("dpkg", &["-i", &deb_text])?;
    println!(
        "install: installed {deb_text}: /usr/bin/gateway, gateway-rtsp-get, gateway-socksify, \
         the unit gateway.service (not enabled), /etc/gateway/gateway.toml, man pages \
         (`man gateway-run`), completions"
    );
    println!("install: undo with `dpkg -r gateway` (it detaches every instance's gate first)");
    if !enable {
        println!(
            "install: the unit is not enabled; edit /etc/gateway/gateway.toml, then \
             `systemctl enable --now gateway` (or `cargo xtask install --enable`)"
        );
        return Ok(());
    }
    if !systemd_is_running() {
        println!(
            "install: --enable: systemd is not PID 1 on this host, so there is no unit to \
             enable or start; start the daemon with `gateway run --config \
             /etc/gateway/gateway.toml`"
        );
        return Ok(());
    }
    run_checked("gateway", &["check-config", "/etc/gateway/gateway.toml"]).context(
        "/etc/gateway/gateway.toml does not hold a working configuration; edit it first",
    )?;
    run_checked("systemctl", &["enable", "--now", "gateway.service"])?;
    println!(
        "install: enabled and started gateway.service; `systemctl status gateway` shows it; \
         undo with `systemctl disable --now gateway` (the gate stays attached and dropping \
         until `gateway detach` or `dpkg -r gateway`)"
    );
    Ok(())
}

/// `cargo xtask run -- ARGS`: the release daemon on this host's interfaces, in the foreground.
pub fn run(args: &[String]) -> Result<()> {
    cargo(&["build", "--release", "--locked", "-p", "gateway", "--bins"])?;
    let gateway = workspace_root().join("target/release/gateway");
    println!("run: {} run {}", gateway.display(), args.join(" "));
    println!(
        "run: stop it with Ctrl-C or SIGTERM; the gate stays attached and dropping; `{} \
         detach` (with the same --instance) removes it",
        gateway.display()
    );
    let status = Command::new(&gateway)
        .arg("run")
        .args(args)
        .status()
        .with_context(|| format!("run {}", gateway.display()))?;
    if !status.success() {
        bail!("gateway run exited with {status}");
    }
    Ok(())
}
