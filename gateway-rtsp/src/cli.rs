//! `gateway rtsp-get`: the command line of [`super::client::play`]. It prints each step as a line
//! on stdout (the two binding steps with the addresses exchanged, with `--raw` whether the gateway
//! granted header-less delivery, with `--multicast` the group and the subscriptions instead, then
//! per-track statistics) and writes the received audio as WAV.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use super::{
    RtspError,
    client::{PlayOptions, PlayReport, play},
};

fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !(seconds > 0.0 && seconds <= 86_400.0) {
        return Err(format!("{text} s is not within 0..=86400 s"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// The arguments of `gateway rtsp-get`.
#[derive(Debug, Clone, clap::Args)]
pub struct RtspGetArgs {
    /// The stream to play.
    #[arg(
        value_name = "URL",
        help = "The stream to play: rtsp://HOST[:PORT]/PATH (port 554 by default)"
    )]
    pub url: String,
    /// The gateway's SOCKS5 address.
    #[arg(long, value_name = "ADDR:PORT")]
    pub proxy: SocketAddr,
    /// User name for username/password authentication (RFC 1929); needs --password-file.
    #[arg(long, value_name = "NAME", requires = "password_file")]
    pub user: Option<String>,
    /// File whose first line is the password for --user.
    #[arg(long, value_name = "FILE", requires = "user")]
    pub password_file: Option<PathBuf>,
    /// WAV file for the received audio (16-bit PCM; PCMU is decoded). A second track goes to
    /// FILE-1.wav, a third to FILE-2.wav, and so on.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Seconds to receive after PLAY (less if the server ends the stream with RTCP BYE).
    #[arg(long, value_name = "N", default_value = "5", value_parser = parse_seconds)]
    pub seconds: Duration,
    /// SDP track index to play (the m= line's position, from 0); repeat for more. Default:
    /// every L16 and PCMU audio track.
    #[arg(long = "track", value_name = "INDEX")]
    pub tracks: Vec<usize>,
    /// Seconds to wait for the first RTP packet after PLAY before giving up.
    #[arg(long, value_name = "N", default_value = "5", value_parser = parse_seconds)]
    pub start_timeout: Duration,
    /// Ask the gateway for header-less (RAW) delivery of the RTP/RTCP pairs: when granted, RTP
    /// and RTCP arrive as plain datagrams on sockets connected to the media source, and receiver
    /// reports go plain to its RTCP port. The gateway must be this host's next hop to the source
    /// (route to it through the gateway). When not granted, a line says so and the 8-octet header
    /// is used as without --raw.
    #[arg(long, conflicts_with = "multicast")]
    pub raw: bool,
    /// Ask the RTSP server for multicast delivery (SETUP with `Transport: RTP/AVP;multicast`).
    /// When the reply names a group (destination=G;port=P-Q), subscribe to G:P and G:Q through
    /// the gateway in multicast-to-unicast (MU) mode, so the group's datagrams arrive here as
    /// unicast; then PLAY and write the audio as without it. Fails with a clear message when the
    /// server answers unicast, or when the gateway refuses the subscription (its reply code and
    /// meaning, e.g. 11: multicast receive not allowed by the gateway's policy). No RTCP
    /// receiver reports are sent.
    #[arg(long)]
    pub multicast: bool,
}

impl RtspGetArgs {
    /// The [`PlayOptions`] these arguments ask for, printing progress lines on stdout. Reads the
    /// password file.
    pub fn options(&self) -> Result<PlayOptions, RtspError> {
        let mut options = PlayOptions::new(self.url.clone(), self.proxy);
        if let (Some(user), Some(path)) = (&self.user, &self.password_file) {
            let text = std::fs::read_to_string(path).map_err(|error| RtspError::PasswordFile {
                path: path.clone(),
                error,
            })?;
            let password = text.lines().next().unwrap_or_default().to_owned();
            options.credentials = Some((user.clone(), password));
        }
        options.out = Some(self.out.clone());
        options.duration = self.seconds;
        options.tracks.clone_from(&self.tracks);
        options.start_timeout = self.start_timeout;
        options.raw = self.raw;
        options.multicast = self.multicast;
        options.progress = Some(Arc::new(|event| println!("{event}")));
        Ok(options)
    }
}

/// Runs `gateway rtsp-get` on its own runtime: prints the steps and the per-track statistics.
pub fn rtsp_get(args: &RtspGetArgs) -> Result<PlayReport, RtspError> {
    let options = args.options()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(play(options))?;
    for track in &report.tracks {
        println!("{track}");
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: RtspGetArgs,
    }

    #[test]
    fn flags_parse_and_credentials_need_both() {
        let cli = Cli::try_parse_from([
            "rtsp-get",
            "rtsp://203.0.113.2:8554/rtsp.wav",
            "--proxy",
            "198.51.100.1:1080",
            "--out",
            "a.wav",
            "--seconds",
            "2.5",
            "--track",
            "1",
        ])
        .unwrap();
        assert_eq!(cli.args.seconds, Duration::from_millis(2500));
        assert_eq!(cli.args.tracks, [1]);
        let options = cli.args.options().unwrap();
        assert_eq!(options.credentials, None);
        assert!(
            Cli::try_parse_from([
                "rtsp-get",
                "rtsp://h/x",
                "--proxy",
                "1.2.3.4:1080",
                "--out",
                "a.wav",
                "--user",
                "alice"
            ])
            .is_err()
        );
        assert!(
            Cli::try_parse_from([
                "rtsp-get",
                "rtsp://h/x",
                "--proxy",
                "1.2.3.4:1080",
                "--out",
                "a.wav",
                "--seconds",
                "-1"
            ])
            .is_err()
        );
    }

    #[test]
    fn raw_is_off_unless_asked_and_its_help_names_the_next_hop() {
        let base = [
            "rtsp-get",
            "rtsp://203.0.113.2:8554/rtsp.wav",
            "--proxy",
            "198.51.100.1:1080",
            "--out",
            "a.wav",
        ];
        let plain = Cli::try_parse_from(base).unwrap();
        assert!(!plain.args.raw && !plain.args.options().unwrap().raw);
        let raw = Cli::try_parse_from(base.iter().chain(&["--raw"])).unwrap();
        assert!(raw.args.raw && raw.args.options().unwrap().raw);
        let help = <Cli as clap::CommandFactory>::command()
            .render_help()
            .to_string();
        let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(help.contains("--raw"), "{help}");
        assert!(
            help.contains("The gateway must be this host's next hop to the source"),
            "{help}"
        );
    }

    #[test]
    fn multicast_is_off_unless_asked_excludes_raw_and_is_in_the_help() {
        let base = [
            "rtsp-get",
            "rtsp://203.0.113.2:8554/rtsp.wav",
            "--proxy",
            "198.51.100.1:1080",
            "--out",
            "a.wav",
        ];
        let plain = Cli::try_parse_from(base).unwrap();
        assert!(!plain.args.multicast && !plain.args.options().unwrap().multicast);
        let multicast = Cli::try_parse_from(base.iter().chain(&["--multicast"])).unwrap();
        assert!(multicast.args.multicast && multicast.args.options().unwrap().multicast);
        assert!(Cli::try_parse_from(base.iter().chain(&["--multicast", "--raw"])).is_err());
        let help = <Cli as clap::CommandFactory>::command()
            .render_help()
            .to_string();
        let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
        for says in [
            "--multicast",
            "Transport: RTP/AVP;multicast",
            "multicast-to-unicast (MU) mode",
            "11: multicast receive not allowed",
        ] {
            assert!(help.contains(says), "{says}: {help}");
        }
    }

    #[test]
    fn the_password_is_the_first_line_of_the_file() {
        let path = std::env::temp_dir().join(format!("rtsp-cli-{}.pw", std::process::id()));
        std::fs::write(&path, "s3cret\nignored\n").unwrap();
        let cli = Cli::try_parse_from([
            "rtsp-get",
            "rtsp://h/x",
            "--proxy",
            "1.2.3.4:1080",
            "--out",
            "a.wav",
            "--user",
            "alice",
            "--password-file",
            path.to_str().unwrap(),
        ])
        .unwrap();
        let options = cli.args.options().unwrap();
        assert_eq!(
            options.credentials,
            Some(("alice".to_owned(), "s3cret".to_owned()))
        );
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            cli.args.options(),
            Err(RtspError::PasswordFile { .. })
        ));
    }
}
