//! `gateway-rtsp-get` (run as `gateway rtsp-get`): play an RTSP stream through a gateway.

use std::process::ExitCode;

use clap::Parser;
use gateway_rtsp::cli::{RtspGetArgs, rtsp_get};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "gateway rtsp-get",
    bin_name = "gateway rtsp-get",
    version,
    about = "Play an RTSP stream through a gateway: control over SOCKS CONNECT, media over \
             two-step RTP-pair bindings (step 1 before SETUP, step 2 with the reply's source \
             before PLAY), RTCP receiver reports back; print the steps and per-track statistics, \
             write the audio as WAV"
)]
struct Cli {
    #[command(flatten)]
    args: RtspGetArgs,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("GATEWAY_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match rtsp_get(&Cli::parse().args) {
        Ok(_) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("gateway rtsp-get: error: {error}");
            ExitCode::FAILURE
        }
    }
}
