//! The `ordo` binary: the host (`ordo serve`) and the operator CLI.

use std::process::ExitCode;

use clap::Parser;
use ordo::cli::{Cli, Command, LogFormat};
use tracing_subscriber::EnvFilter;

/// mimalloc instead of glibc's malloc: with a lane per partition, sled's
/// deferred frees and wasmtime's per-instance allocations crossing threads,
/// glibc's arenas were a top cost in profiles (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_env("ORDO_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ordo")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => ordo::server::run(args).await,
            Command::Demo(args) => ordo::demo::run(args).await,
            Command::Torture(args) => ordo::torture::run(args).await,
            Command::Bench(args) => ordo::bench::run(args).await,
            other => ordo::cli::run_client(other).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
