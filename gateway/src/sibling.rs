//! `gateway NAME ...` runs the sibling executable `gateway-NAME`: the RTSP client and the
//! `socksify` shim live in their own executables, so the daemon binary holds only the daemon,
//! while `gateway` stays the one front door (as `git NAME` runs `git-NAME`).

use std::{
    ffi::OsString,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Result, bail};

/// Where `gateway-NAME` is: beside the running `gateway` first (a build directory or an install
/// prefix's `bin/`), else the first on `PATH`.
pub fn find(name: &str) -> Option<PathBuf> {
    let file = format!("gateway-{name}");
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(&file)));
    let on_path = std::env::var_os("PATH")
        .map(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join(&file))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    beside
        .into_iter()
        .chain(on_path)
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata()
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// Replaces this process with `gateway-NAME ARGS...`; returns only if that fails.
pub fn run(name: &str, args: &[OsString]) -> Result<()> {
    if name.is_empty() || name.contains('/') {
        bail!("{name:?} is not a gateway command");
    }
    let Some(program) = find(name) else {
        bail!(
            "`gateway {name}` needs the executable gateway-{name}, found neither beside {} nor \
             on PATH; see `gateway --help` for the commands",
            std::env::current_exe().map_or_else(|_| "gateway".into(), |p| p.display().to_string())
        );
    };
    let error = Command::new(&program).args(args).exec();
    bail!("run {}: {error}", program.display())
}
