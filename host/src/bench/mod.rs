//! `ordo bench`: benchmark commands that print a table and record it in
//! BENCHMARKS.md. Figures are measured, never asserted in tests.

mod compare;
mod dedup;
mod jetstream;
mod latency;
mod pipeline;
mod report;
mod sandbox;

use clap::{Args, Subcommand};

pub use report::{machine_summary, record_section};

/// `ordo bench ...`
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Sandbox cost per message: warm call, fresh instance + call, 1 KiB payload.
    Sandbox(sandbox::SandboxArgs),
    /// End-to-end: drain throughput and produce→committed latency.
    Pipeline(pipeline::PipelineArgs),
    /// Side by side: effectively-once, at-least-once, native handler, the
    /// PostgreSQL processed_messages pattern, and the disk's fsync rate.
    Compare(compare::CompareArgs),
    /// Dedup lookup p50/p99 at 10^4 … 10^7 recorded keys; bytes per key.
    Dedup(dedup::DedupArgs),
    /// JetStream source throughput beside a plain async-nats consumer.
    Jetstream(jetstream::JetStreamArgs),
}

/// Runs a bench command.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.command {
        BenchCommand::Sandbox(a) => tokio::task::spawn_blocking(move || sandbox::run(a)).await?,
        BenchCommand::Pipeline(a) => pipeline::run(a).await,
        BenchCommand::Compare(a) => compare::run(a).await,
        BenchCommand::Jetstream(a) => jetstream::run(a).await,
        BenchCommand::Dedup(a) => tokio::task::spawn_blocking(move || dedup::run(a)).await?,
    }
}

/// Deploys the counter component as handler `counter` on topic `bench`,
/// with the default limits but `messages_per_instance`.
async fn deploy_counter(
    host: &std::sync::Arc<crate::host::Host>,
    bytes: Vec<u8>,
    messages_per_instance: u32,
) -> anyhow::Result<()> {
    let options = crate::host::DeployOptions {
        limits: Some(crate::runtime::HandlerLimits {
            messages_per_instance,
            ..Default::default()
        }),
        ..Default::default()
    };
    host.deploy("counter", "bench", bytes, options).await?;
    Ok(())
}

/// The bytes of `<dir>/<name>.wasm`, a handler built by
/// `scripts/build-guests.sh`.
fn handler_bytes(dir: &std::path::Path, name: &str) -> anyhow::Result<Vec<u8>> {
    let path = dir.join(format!("{name}.wasm"));
    std::fs::read(&path).map_err(|e| {
        anyhow::anyhow!(
            "reading {}: {e} (run scripts/build-guests.sh first)",
            path.display()
        )
    })
}
