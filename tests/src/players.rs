//! Unmodified programs under test (players such as ffmpeg and gst-launch-1.0, curl): started in a
//! namespace with their output in files, waited for within bounds, interrupted by pid, and the
//! check that one is installed, which fails saying what to install. Nothing here knows a
//! program's flags.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use nix::sys::signal::Signal;

use crate::{ChildGuard, wait_until};

/// Variables that would send a program to another proxy, or preload something else, than the
/// test means.
const ENVIRONMENT_LEFT_OUT: [&str; 9] = [
    "LD_PRELOAD",
    "http_proxy",
    "HTTP_PROXY",
    "https_proxy",
    "HTTPS_PROXY",
    "all_proxy",
    "ALL_PROXY",
    "no_proxy",
    "NO_PROXY",
];

/// Fails with what to install unless `program ARGS...` runs and succeeds (`ffmpeg -version`,
/// `gst-inspect-1.0 --exists rtspsrc`).
pub fn require(program: &str, args: &[&str], package: &str) -> Result<()> {
    let works = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !works {
        bail!(
            "`{program} {}` fails: {program} is missing here; it comes from the Debian package \
             {package} (`cargo xtask setup` installs it)",
            args.join(" ")
        );
    }
    Ok(())
}

/// A program under test, running; stopped by pid (SIGTERM, then SIGKILL) on drop.
pub struct Player {
    child: ChildGuard,
    name: String,
    stdout: PathBuf,
    stderr: PathBuf,
    logs: Vec<PathBuf>,
    status: Option<ExitStatus>,
}

impl Player {
    /// Starts `cmd` (stdin closed, proxy variables and `LD_PRELOAD` removed) with its stdout and
    /// stderr in `DIR/NAME.stdout` and `DIR/NAME.stderr`.
    pub fn spawn(cmd: &mut Command, name: &str, dir: &Path) -> Result<Self> {
        let stdout = dir.join(format!("{name}.stdout"));
        let stderr = dir.join(format!("{name}.stderr"));
        let create = |path: &Path| {
            fs::File::create(path).with_context(|| format!("create {}", path.display()))
        };
        for variable in ENVIRONMENT_LEFT_OUT {
            cmd.env_remove(variable);
        }
        cmd.stdin(Stdio::null())
            .stdout(create(&stdout)?)
            .stderr(create(&stderr)?);
        Ok(Self {
            child: ChildGuard::spawn(cmd, name)?,
            name: name.to_owned(),
            stdout,
            stderr,
            logs: Vec::new(),
            status: None,
        })
    }

    /// Another file the player's report shows (a log it writes, say).
    #[must_use]
    pub fn with_log(mut self, path: PathBuf) -> Self {
        self.logs.push(path);
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> i32 {
        self.child.pid()
    }

    /// Whether it has exited (its status is kept).
    pub fn has_exited(&mut self) -> bool {
        if self.status.is_none() {
            self.status = self
                .child
                .child_mut()
                .and_then(|child| child.try_wait().ok().flatten());
        }
        self.status.is_some()
    }

    /// Waits (bounded by `timeout`, stretched by the time scale) for it to exit by itself.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_until(timeout, || self.has_exited());
        self.status
    }

    /// Sends SIGINT to its pid and waits (bounded by `grace`) for it to exit; killed otherwise.
    pub fn interrupt(&mut self, grace: Duration) -> Option<ExitStatus> {
        if self.has_exited() {
            return self.status;
        }
        self.status = self.child.stop_with(Signal::SIGINT, grace);
        self.status
    }

    /// Waits for it to exit by itself and succeed; the error carries its report.
    pub fn succeeds(&mut self, timeout: Duration) -> Result<()> {
        match self.wait(timeout) {
            Some(status) if status.success() => Ok(()),
            Some(status) => bail!("{} failed with {status}\n{}", self.name, self.report()),
            None => bail!(
                "{} did not exit within {timeout:?}\n{}",
                self.name,
                self.report()
            ),
        }
    }

    /// What it wrote to stdout.
    pub fn stdout(&self) -> Vec<u8> {
        fs::read(&self.stdout).unwrap_or_default()
    }

    /// Its stderr and the other logs, for a failure message.
    pub fn report(&self) -> String {
        let mut out = String::new();
        for path in std::iter::once(&self.stderr).chain(&self.logs) {
            let text = fs::read_to_string(path).unwrap_or_else(|error| format!("({error})"));
            let _ = writeln!(out, "--- {}:\n{}", path.display(), text.trim_end());
        }
        out
    }
}

/// Fails with what to install unless ffmpeg runs.
pub fn require_ffmpeg() -> Result<()> {
    require("ffmpeg", &["-version"], "ffmpeg")
}

/// The `GStreamer` elements of [`gst_launch_rtsp`] and their packages.
const GST_ELEMENTS: [(&str, &str); 4] = [
    ("rtspsrc", "gstreamer1.0-plugins-good"),
    ("rtpL16depay", "gstreamer1.0-plugins-good"),
    ("audioconvert", "gstreamer1.0-plugins-base"),
    ("wavenc", "gstreamer1.0-plugins-good"),
];

/// Fails with what to install unless gst-launch-1.0 and every element of [`gst_launch_rtsp`]
/// are there.
pub fn require_gst_launch() -> Result<()> {
    require("gst-launch-1.0", &["--version"], "gstreamer1.0-tools")?;
    for (element, package) in GST_ELEMENTS {
        require("gst-inspect-1.0", &["--exists", element], package)?;
    }
    Ok(())
}

/// ffmpeg's arguments to record `seconds` of an RTSP stream's audio into a 16-bit WAV file:
/// `-rtsp_transport TRANSPORT -i URL -t SECONDS -c:a pcm_s16le -f wav OUT`, quiet, overwriting,
/// not reading stdin.
pub fn ffmpeg_rtsp(url: &str, transport: &str, seconds: &str, out: &Path) -> Vec<String> {
    [
        "-nostdin",
        "-y",
        "-loglevel",
        "warning",
        "-rtsp_transport",
        transport,
        "-i",
        url,
        "-t",
        seconds,
        "-c:a",
        "pcm_s16le",
        "-f",
        "wav",
    ]
    .iter()
    .map(ToString::to_string)
    .chain(std::iter::once(out.display().to_string()))
    .collect()
}

/// gst-launch-1.0's arguments to write an RTSP stream's L16 audio (RTP over UDP) into a WAV
/// file: `-e rtspsrc location=URL protocols=udp ! rtpL16depay ! audioconvert !
/// audio/x-raw,format=S16LE ! wavenc ! filesink location=OUT`. `-e`: SIGINT becomes an end of
/// stream, so wavenc writes its header before the program exits.
pub fn gst_launch_rtsp(url: &str, out: &Path) -> Vec<String> {
    let mut args = vec![
        "-e".to_owned(),
        "rtspsrc".to_owned(),
        format!("location={url}"),
        "protocols=udp".to_owned(),
    ];
    for element in [
        "rtpL16depay",
        "audioconvert",
        "audio/x-raw,format=S16LE",
        "wavenc",
        "filesink",
    ] {
        args.extend(["!".to_owned(), element.to_owned()]);
    }
    args.push(format!("location={}", out.display()));
    args
}

impl Player {
    /// Waits (bounded by `timeout`) until `file` holds at least `bytes` octets, then sends
    /// SIGINT to its pid; requires a successful exit (within `grace`), also when it ended by
    /// itself first.
    pub fn interrupt_once_written(
        &mut self,
        file: &Path,
        bytes: u64,
        timeout: Duration,
        grace: Duration,
    ) -> Result<()> {
        let written = || fs::metadata(file).is_ok_and(|meta| meta.len() >= bytes);
        wait_until(timeout, || self.has_exited() || written());
        let interrupted = !self.has_exited();
        if interrupted {
            if !written() {
                bail!(
                    "{} wrote no {bytes} octets to {} within {timeout:?}\n{}",
                    self.name,
                    file.display(),
                    self.report()
                );
            }
            self.interrupt(grace);
        }
        match self.status {
            Some(status) if status.success() => Ok(()),
            status => bail!(
                "{} {}: {status:?}\n{}",
                self.name,
                if interrupted {
                    "after SIGINT"
                } else {
                    "ended by itself"
                },
                self.report()
            ),
        }
    }
}
