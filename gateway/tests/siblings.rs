//! `gateway NAME` runs the sibling executable `gateway-NAME`: from the build directory, from an
//! install directory holding both, and with a clear error when the sibling is missing. The
//! daemon binary itself carries no RTSP code. Needs `cargo build --bins` first (as
//! `cargo xtask test` does), for `gateway-rtsp-get` of the `gateway-rtsp` crate.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

fn build_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_gateway"))
        .parent()
        .unwrap()
        .to_owned()
}

fn sibling() -> PathBuf {
    let path = build_dir().join("gateway-rtsp-get");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --bins` first",
        path.display()
    );
    path
}

fn run(gateway: &Path, args: &[&str]) -> Output {
    // PATH without the build directory: only "beside gateway" can find the sibling.
    Command::new(gateway)
        .args(args)
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap()
}

fn install_dir(name: &str, with_sibling: bool) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gateway-{name}-{}", std::process::id()));
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_gateway"), bin.join("gateway")).unwrap();
    if with_sibling {
        std::fs::copy(sibling(), bin.join("gateway-rtsp-get")).unwrap();
    }
    dir
}

#[test]
fn rtsp_get_help_from_the_build_and_an_install_directory() {
    let listed = run(Path::new(env!("CARGO_BIN_EXE_gateway")), &["--help"]);
    assert!(String::from_utf8_lossy(&listed.stdout).contains("rtsp-get"));
    let from_build = run(
        Path::new(env!("CARGO_BIN_EXE_gateway")),
        &["rtsp-get", "--help"],
    );
    let installed = install_dir("installed", true);
    let from_install = run(&installed.join("bin/gateway"), &["rtsp-get", "--help"]);
    for (what, out) in [
        ("build directory", from_build),
        ("install directory", from_install),
    ] {
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            help.contains("Usage: gateway rtsp-get") && help.contains("--proxy"),
            "{what}: {help}"
        );
    }
    let _ = std::fs::remove_dir_all(installed);
}

#[test]
fn a_missing_sibling_is_a_clear_error() {
    let lonely = install_dir("lonely", false);
    let out = run(&lonely.join("bin/gateway"), &["rtsp-get", "--help"]);
    assert!(!out.status.success());
    let error = String::from_utf8_lossy(&out.stderr);
    assert!(
        error.contains("needs the executable gateway-rtsp-get"),
        "{error}"
    );
    let _ = std::fs::remove_dir_all(lonely);
}

#[test]
fn the_daemon_binary_carries_no_rtsp_code() {
    let symbols_of = |path: &Path| {
        let binary = std::fs::read(path).unwrap();
        let needle = b"gateway_rtsp";
        binary.windows(needle.len()).filter(|w| w == needle).count()
    };
    assert!(
        symbols_of(&sibling()) > 0,
        "the check finds the RTSP crate where it is"
    );
    assert_eq!(
        symbols_of(Path::new(env!("CARGO_BIN_EXE_gateway"))),
        0,
        "no code of gateway-rtsp in the gateway binary"
    );
}
