//! The `ordo` command line: the host (`serve`) and client commands that talk
//! to a running host over its HTTP API.

pub mod client;

use std::io::BufRead;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use serde_json::Value;

use client::{encode, Client};

/// ordo: effectively-once message consumer with sandboxed WebAssembly handlers.
#[derive(Debug, Parser)]
#[command(name = "ordo", version, about)]
pub struct Cli {
    /// Log format for this process.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "human",
        env = "ORDO_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// Where a client command finds the server.
#[derive(Debug, Args, Clone)]
pub struct ServerArgs {
    /// Base URL of the ordo host.
    #[arg(long, env = "ORDO_SERVER", default_value = "http://127.0.0.1:7070")]
    pub server: String,
    /// Admin token (sent as `Authorization: Bearer`).
    #[arg(long, env = "ORDO_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl ServerArgs {
    fn client(&self) -> anyhow::Result<Client> {
        Client::new(&self.server, self.token.clone())
    }
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the host: ingest API, handlers, ledger.
    Serve(crate::server::ServeArgs),
    /// Deploy a handler component (a new version) for a topic.
    Deploy {
        /// Handler name.
        name: String,
        /// Component file (.wasm).
        file: PathBuf,
        /// Topic the handler consumes.
        #[arg(long)]
        topic: String,
        /// Start a new handler at the end of the topic instead of its beginning.
        #[arg(long)]
        from_latest: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Produce messages: JSON lines on stdin, one message object per line
    /// (`{"key":..,"payload":..,"idempotency_key":..}`), sent in batches.
    Produce {
        /// Topic to append to.
        topic: String,
        /// Messages per request.
        #[arg(long, default_value_t = 500)]
        batch: usize,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Read handler state.
    State {
        #[command(subcommand)]
        command: StateCommand,
    },
    /// Show handlers, versions, lag and counters.
    Status {
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Run the end-to-end demo: a temporary host, the bank handler, a
    /// workload with duplicates, progress and a checked summary.
    Demo(crate::demo::DemoArgs),
    /// Micro-benchmarks.
    Bench(crate::bench::BenchArgs),
}

/// `ordo state ...`
#[derive(Debug, Subcommand)]
pub enum StateCommand {
    /// Print one state value (raw bytes) of a handler's partition key.
    Get {
        /// Handler name.
        handler: String,
        /// Partition key.
        partition_key: String,
        /// State key.
        state_key: String,
        #[command(flatten)]
        server: ServerArgs,
    },
}

/// Runs a client command (everything except `serve`, `demo` and `bench`).
pub async fn run_client(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Deploy {
            name,
            file,
            topic,
            from_latest,
            server,
        } => {
            let bytes = std::fs::read(&file)
                .with_context(|| format!("reading component {}", file.display()))?;
            let mut path = format!("/v1/handlers/{}?topic={}", encode(&name), encode(&topic));
            if from_latest {
                path.push_str("&from=latest");
            }
            let reply = server.client()?.put_bytes(&path, bytes).await?;
            println!("{}", serde_json::to_string_pretty(&reply)?);
        }
        Command::Produce {
            topic,
            batch,
            server,
        } => produce(&server.client()?, &topic, batch.max(1)).await?,
        Command::State {
            command:
                StateCommand::Get {
                    handler,
                    partition_key,
                    state_key,
                    server,
                },
        } => {
            let path = format!(
                "/v1/handlers/{}/state/{}/{}",
                encode(&handler),
                encode(&partition_key),
                encode(&state_key)
            );
            match server.client()?.get_bytes(&path).await? {
                Some(bytes) => {
                    use std::io::Write;
                    let mut out = std::io::stdout().lock();
                    out.write_all(&bytes)?;
                    out.write_all(b"\n")?;
                }
                None => {
                    bail!("no state {state_key:?} for key {partition_key:?} of handler {handler:?}")
                }
            }
        }
        Command::Status { json, server } => {
            let status = server.client()?.get_json("/v1/status").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
            }
        }
        Command::Serve(_) | Command::Demo(_) | Command::Bench(_) => {
            bail!("not a client command")
        }
    }
    Ok(())
}

async fn produce(client: &Client, topic: &str, batch: usize) -> anyhow::Result<()> {
    let stdin = std::io::stdin();
    let mut pending: Vec<Value> = Vec::with_capacity(batch);
    let mut sent = 0usize;
    for (n, line) in stdin.lock().lines().enumerate() {
        let line = line.context("reading stdin")?;
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(&line)
            .with_context(|| format!("stdin line {}: not a JSON object", n + 1))?;
        pending.push(value);
        if pending.len() >= batch {
            sent += client
                .produce(topic, &Value::Array(std::mem::take(&mut pending)))
                .await?
                .len();
        }
    }
    if !pending.is_empty() {
        sent += client.produce(topic, &Value::Array(pending)).await?.len();
    }
    eprintln!("produced {sent} messages to {topic}");
    Ok(())
}

fn print_status(status: &Value) {
    let handlers = status
        .get("handlers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    println!(
        "{:<20} {:>7} {:<16} {:>10} {:>12} {:>11} {:>13}",
        "HANDLER", "VERSION", "TOPIC", "LAG", "PROCESSED", "DUPLICATES", "DEAD-LETTERED"
    );
    for h in handlers {
        let s = |k: &str| {
            h.get(k)
                .map(|v| v.to_string().trim_matches('"').to_string())
                .unwrap_or_default()
        };
        println!(
            "{:<20} {:>7} {:<16} {:>10} {:>12} {:>11} {:>13}",
            s("name"),
            s("version"),
            s("topic"),
            s("lag"),
            s("processed"),
            s("duplicates"),
            s("dead_lettered")
        );
    }
}
