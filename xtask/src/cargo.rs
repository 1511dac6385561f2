//! Running cargo from xtask: the one helper every command uses, so none imports another.

use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::setup::workspace_root;

/// Runs the cargo that runs us (`$CARGO`) with `args` in the workspace root.
pub fn cargo(args: &[&str]) -> Result<()> {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()))
        .args(args)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("run cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed with {status}", args.join(" "));
    }
    Ok(())
}
