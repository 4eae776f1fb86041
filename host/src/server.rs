//! `ordo serve`: the host process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;

use crate::api::ingest::IngestLimits;
use crate::api::{router, ApiState};
use crate::host::{Host, HostConfig};

/// Options of `ordo serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Directory of the ledger, topics and compiled artifacts.
    #[arg(long, env = "ORDO_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Address of the admin/ingest HTTP API.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Partitions of topics created on first use.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub partitions: u32,
    /// Largest message payload accepted, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_payload_bytes: usize,
    /// Messages per lane transaction, at most.
    #[arg(long, default_value_t = 256)]
    pub max_batch: usize,
}

/// Runs the host until SIGTERM/SIGINT, then shuts down gracefully: stops
/// accepting requests, lets lanes finish their batch, flushes, returns.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = HostConfig::default();
    config.topic_defaults.partitions = args.partitions;
    config.max_batch = args.max_batch.max(1);
    let ingest = IngestLimits {
        max_payload_bytes: args.max_payload_bytes,
        ..IngestLimits::default()
    };
    let max_component_bytes = config.runtime.max_component_bytes;
    let host = Host::open(&args.data_dir, config)
        .await
        .with_context(|| format!("opening data dir {}", args.data_dir.display()))?;
    let app = router(ApiState {
        host: host.clone(),
        ingest: Arc::new(ingest),
        max_component_bytes,
    });
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(listen = %args.listen, data_dir = %args.data_dir.display(), "ordo serving");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("HTTP server")?;
    tracing::info!("shutting down: finishing in-flight batches");
    host.shutdown().await?;
    tracing::info!("shut down cleanly");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install SIGTERM handler");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
