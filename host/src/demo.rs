//! `ordo demo`: the end-to-end demonstration.

use clap::Args;

/// Options of `ordo demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {}

/// Runs the demo.
pub async fn run(_args: DemoArgs) -> anyhow::Result<()> {
    anyhow::bail!("`ordo demo` is not available in this build yet")
}
