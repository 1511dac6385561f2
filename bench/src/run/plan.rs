//! How much the bench does: full (the figures), quick (fewer runs, shorter windows) or
//! smoke (a few hundred packets per scenario, for `cargo xtask test`).

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Full,
    Quick,
    Smoke,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub mode: Mode,
    /// Runs per figure (each figure is the median over them).
    pub runs: usize,
    /// Traffic before a measurement window starts.
    pub warmup: Duration,
    /// A measurement window.
    pub window: Duration,
    /// Sender rate cap (0: as fast as possible); smoke runs are capped.
    pub rate_cap: u64,
    /// Payload sizes of the media relay scenario.
    pub sizes: Vec<usize>,
    /// Rate of the legitimate stream in the collateral damage scenario.
    pub legit_rate: u64,
    /// Low rate of the latency scenario.
    pub low_rate: u64,
    /// Control plane: concurrent control connections and measuring time.
    pub control_conns: usize,
    pub control_time: Duration,
    /// Bindings the memory scenario tries to hold at once.
    pub memory_target: usize,
    /// Installed entries of the scale scenario.
    pub scale_entries: Vec<u64>,
    /// Bindings the churn scenario makes and ends.
    pub churn_bindings: usize,
    /// Subscriber counts of the multicast scenario (each its own control connection).
    pub multicast_subscribers: Vec<usize>,
    /// Payload octets of the multicast scenario's group stream.
    pub multicast_size: usize,
}

impl Plan {
    pub fn new(mode: Mode) -> Self {
        let full = Self {
            mode,
            runs: 5,
            warmup: Duration::from_millis(500),
            window: Duration::from_secs(2),
            rate_cap: 0,
            sizes: vec![200, 1200],
            legit_rate: 10_000,
            low_rate: 2_000,
            control_conns: 16,
            control_time: Duration::from_secs(2),
            memory_target: 100_000,
            scale_entries: vec![1, 10_000, 1_000_000],
            churn_bindings: 1_000_000,
            multicast_subscribers: vec![1, 8, 64],
            multicast_size: 200,
        };
        match mode {
            Mode::Full => full,
            Mode::Quick => Self {
                runs: 2,
                warmup: Duration::from_millis(300),
                window: Duration::from_secs(1),
                control_time: Duration::from_secs(1),
                churn_bindings: 100_000,
                ..full
            },
            Mode::Smoke => Self {
                runs: 1,
                warmup: Duration::from_millis(100),
                window: Duration::from_millis(200),
                rate_cap: 2_000,
                legit_rate: 2_000,
                low_rate: 1_000,
                control_conns: 4,
                control_time: Duration::from_millis(300),
                memory_target: 200,
                scale_entries: vec![1, 100, 1_000],
                churn_bindings: 2_000,
                ..full
            },
        }
    }

    /// A sender's whole run: warmup, window and a margin for the snapshots.
    pub fn sender_time(&self) -> Duration {
        self.warmup + self.window + Duration::from_millis(400)
    }

    /// The rate to ask a sender for: `wanted` (0 = flat out) under the plan's cap.
    pub fn rate(&self, wanted: u64) -> u64 {
        match (self.rate_cap, wanted) {
            (0, wanted) => wanted,
            (cap, 0) => cap,
            (cap, wanted) => wanted.min(cap),
        }
    }
}
