//! `ordo serve`: the host process.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

/// Options of `ordo serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Directory of the ledger, topics and compiled artifacts.
    #[arg(long, env = "ORDO_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Address of the admin/ingest HTTP API.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
}

/// Runs the host until SIGTERM/SIGINT.
pub async fn run(_args: ServeArgs) -> anyhow::Result<()> {
    anyhow::bail!("`ordo serve` is not available in this build yet")
}
