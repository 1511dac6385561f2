//! `cargo xtask demo` (first form): testbed up, gateway attached in `fw`, unsolicited UDP from
//! `server`, the gateway's counters shown, everything torn down.

use anyhow::{Result, bail};

pub fn run() -> Result<()> {
    bail!("demo: not built yet")
}
