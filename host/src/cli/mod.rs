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
        /// Comment kept with the version.
        #[arg(long)]
        comment: Option<String>,
        /// Run the new version as a canary for this percentage of partition
        /// keys (1-99, by stable hash) beside the running one; then
        /// `ordo canary promote|abort`.
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=99))]
        canary: Option<u8>,
        #[command(flatten)]
        policy: PolicyArgs,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Dead-letter queue: list, replay, drop.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Offline ledger tools (the host must be stopped: the ledger is locked
    /// while it runs).
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
    /// Check an `ordo.toml` and print it normalized (paths resolved); a bad
    /// file is reported with its line.
    ConfigCheck {
        /// The file.
        file: PathBuf,
    },
    /// End a canary: promote it to every key, or abort it.
    Canary {
        #[command(subcommand)]
        command: CanaryCommand,
    },
    /// List a handler's versions and which one is active.
    Versions {
        /// Handler name.
        name: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Make an earlier version active again (instant: components are kept).
    Rollback {
        /// Handler name.
        name: String,
        /// Version to activate (default: the one before the active version).
        #[arg(long)]
        to: Option<u64>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Pause a handler (its lanes hold still, kept across restarts), or with
    /// --key one partition key (its messages are held in order while the
    /// other keys flow).
    Pause {
        /// Handler name.
        name: String,
        /// Only this partition key.
        #[arg(long)]
        key: Option<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Resume a paused handler, or with --key a paused key (its held
    /// messages are processed first, in order).
    Resume {
        /// Handler name.
        name: String,
        /// Only this partition key.
        #[arg(long)]
        key: Option<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Stop a handler; its state stays for a later deploy unless --purge.
    Undeploy {
        /// Handler name.
        name: String,
        /// Also remove its state, idempotency records, dead letters and versions.
        #[arg(long)]
        purge: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// What happened to one message: its idempotency record (version,
    /// offset, outcome) and its dead letters, if any.
    Inspect {
        /// Handler name.
        handler: String,
        /// The message's idempotency key.
        #[arg(required_unless_present = "key", conflicts_with = "key")]
        idempotency_key: Option<String>,
        /// Inspect a partition key instead: parked?, dead letters, state.
        #[arg(long)]
        key: Option<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// List operator actions (deploys, replays, drops), oldest first.
    Audit {
        /// Only this handler's.
        #[arg(long)]
        handler: Option<String>,
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
        /// Refresh every this many seconds until interrupted.
        #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "2")]
        watch: Option<u64>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Run the end-to-end demo: a temporary host, the bank handler, a
    /// workload with duplicates, progress and a checked summary.
    Demo(crate::demo::DemoArgs),
    /// Crash-safety proof: kill the host again and again under load (SIGKILL
    /// and named crash points) and check that nothing is lost, duplicated or
    /// reordered and that the bank's money is conserved.
    Torture(crate::torture::TortureArgs),
    /// Micro-benchmarks.
    Bench(crate::bench::BenchArgs),
}

/// Retry and failure policy of a deployed version; unset fields keep the
/// previous version's values (host defaults for a first version).
#[derive(Debug, Args, Clone, Default)]
pub struct PolicyArgs {
    /// Attempts of a retryable failure before it is dead-lettered (default 10).
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// Backoff ceiling before the second attempt, ms (default 100).
    #[arg(long)]
    pub initial_backoff_ms: Option<u64>,
    /// Growth of the backoff ceiling per attempt (default 2).
    #[arg(long)]
    pub backoff_factor: Option<f64>,
    /// Largest backoff ceiling, ms (default 30000).
    #[arg(long)]
    pub max_backoff_ms: Option<u64>,
    /// After a dead letter: `park-key` holds the key's later messages (default),
    /// `dead-letter` carries on with them.
    #[arg(long, value_parser = ["park-key", "dead-letter"])]
    pub on_failure: Option<String>,
}

impl PolicyArgs {
    /// As changes to a policy.
    pub fn overrides(&self) -> crate::host::PolicyOverrides {
        crate::host::PolicyOverrides {
            max_attempts: self.max_attempts,
            initial_backoff_ms: self.initial_backoff_ms,
            backoff_factor: self.backoff_factor,
            max_backoff_ms: self.max_backoff_ms,
            on_failure: self.on_failure.clone(),
        }
    }

    fn query(&self) -> String {
        let mut q = String::new();
        let mut add = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                q.push_str(&format!("&{k}={}", encode(&v)));
            }
        };
        add("max_attempts", self.max_attempts.map(|v| v.to_string()));
        add(
            "initial_backoff_ms",
            self.initial_backoff_ms.map(|v| v.to_string()),
        );
        add("backoff_factor", self.backoff_factor.map(|v| v.to_string()));
        add("max_backoff_ms", self.max_backoff_ms.map(|v| v.to_string()));
        add("on_failure", self.on_failure.clone());
        q
    }
}

/// Which dead letters a replay or drop applies to.
#[derive(Debug, Args, Clone)]
#[group(required = true, multiple = false)]
pub struct DlqSelection {
    /// One dead letter, by its sequence number (see `ordo dlq list`).
    #[arg(long)]
    pub seq: Option<u64>,
    /// Every dead letter of this partition key, oldest first.
    #[arg(long)]
    pub key: Option<String>,
    /// Every dead letter of the handler, oldest first.
    #[arg(long)]
    pub all: bool,
}

/// `ordo ledger ...`
#[derive(Debug, Subcommand)]
pub enum LedgerCommand {
    /// Verify that every record decodes and cross-references hold; exits 1
    /// on any problem.
    Check {
        /// The host's data directory.
        #[arg(long, env = "ORDO_DATA_DIR")]
        data_dir: PathBuf,
    },
    /// Write a portable, versioned backup (JSON lines).
    Export {
        /// The host's data directory.
        #[arg(long, env = "ORDO_DATA_DIR")]
        data_dir: PathBuf,
        /// The backup file to write.
        #[arg(long)]
        output: PathBuf,
    },
    /// Load a backup into a new, empty data directory.
    Import {
        /// The new data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// The backup file to read.
        #[arg(long)]
        input: PathBuf,
    },
}

/// `ordo canary ...`
#[derive(Debug, Subcommand)]
pub enum CanaryCommand {
    /// Make the canary version active for every key.
    Promote {
        /// Handler name.
        name: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Send every key back to the active version.
    Abort {
        /// Handler name.
        name: String,
        #[command(flatten)]
        server: ServerArgs,
    },
}

/// `ordo dlq ...`
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters (failed and held messages), oldest first.
    List {
        /// Only this handler's.
        #[arg(long)]
        handler: Option<String>,
        /// Only this partition key's.
        #[arg(long)]
        key: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        /// Print the raw JSON (payloads included).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Process dead letters again, in their original order, through the
    /// handler's current version (dedup still applies). Replaying a parked
    /// key's backlog unparks the key once it is drained.
    Replay {
        /// Handler name.
        #[arg(long)]
        handler: String,
        #[command(flatten)]
        selection: DlqSelection,
        /// Return once scheduled instead of waiting for the lanes.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Remove dead letters (an audit record is kept).
    Drop {
        /// Handler name.
        #[arg(long)]
        handler: String,
        #[command(flatten)]
        selection: DlqSelection,
        /// Why (kept in the audit record).
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
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
            comment,
            canary,
            policy,
            server,
        } => {
            let bytes = std::fs::read(&file)
                .with_context(|| format!("reading component {}", file.display()))?;
            let mut path = format!("/v1/handlers/{}?topic={}", encode(&name), encode(&topic));
            if from_latest {
                path.push_str("&from=latest");
            }
            if let Some(c) = comment {
                path.push_str(&format!("&comment={}", encode(&c)));
            }
            path.push_str(&policy.query());
            if let Some(p) = canary {
                path.push_str(&format!("&canary={p}"));
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
        Command::Status {
            json,
            watch,
            server,
        } => {
            let client = server.client()?;
            loop {
                let status = client.get_json("/v1/status").await?;
                if watch.is_some() {
                    // Clear the screen and home the cursor.
                    print!("\x1b[2J\x1b[H");
                    println!(
                        "ordo status at {} (every {}s; Ctrl-C to stop)\n",
                        server.server,
                        watch.unwrap_or(2)
                    );
                }
                if json {
                    println!("{}", serde_json::to_string_pretty(&status)?);
                } else {
                    print_status(&status);
                }
                match watch {
                    Some(secs) => {
                        tokio::time::sleep(std::time::Duration::from_secs(secs.max(1))).await
                    }
                    None => break,
                }
            }
        }
        Command::Dlq { command } => dlq(command).await?,
        Command::Versions { name, server } => {
            let reply = server
                .client()?
                .get_json(&format!("/v1/handlers/{}/versions", encode(&name)))
                .await?;
            let active = reply["active"].as_u64().unwrap_or(0);
            println!(
                "{:>3} {:>7} {:<19} {:>10} {:<14} {:<12} COMMENT",
                "", "VERSION", "DEPLOYED", "BYTES", "SHA256", "ON-FAILURE"
            );
            for v in reply["versions"].as_array().into_iter().flatten() {
                let n = v["version"].as_u64().unwrap_or(0);
                println!(
                    "{:>3} {:>7} {:<19} {:>10} {:<14} {:<12} {}",
                    if n == active { "*" } else { "" },
                    n,
                    format_ms(v["deployed_at_ms"].as_u64().unwrap_or(0)),
                    v["size"],
                    v["content_hash"]
                        .as_str()
                        .unwrap_or("")
                        .get(..12)
                        .unwrap_or(""),
                    v["policy"]["on_failure"].as_str().unwrap_or(""),
                    v["comment"].as_str().unwrap_or("")
                );
            }
            if reply["paused"] == true {
                println!("(paused)");
            }
            if reply["undeployed"] == true {
                println!("(undeployed)");
            }
        }
        Command::Rollback { name, to, server } => {
            let body = match to {
                Some(n) => serde_json::json!({ "to": n }),
                None => serde_json::json!({}),
            };
            let reply = server
                .client()?
                .post_json(&format!("/v1/handlers/{}/rollback", encode(&name)), &body)
                .await?;
            println!("{name}: version {} is active", reply["version"]);
        }
        Command::Canary { command } => {
            let (name, server, verb, done) = match command {
                CanaryCommand::Promote { name, server } => (name, server, "promote", "promoted"),
                CanaryCommand::Abort { name, server } => (name, server, "abort", "aborted"),
            };
            let reply = server
                .client()?
                .post_json(
                    &format!("/v1/handlers/{}/canary/{verb}", encode(&name)),
                    &serde_json::json!({}),
                )
                .await?;
            println!("{name}: canary {done}; version {} active", reply["version"]);
        }
        Command::Pause { name, key, server } => {
            pause_resume(&server, &name, key.as_deref(), "pause").await?
        }
        Command::Resume { name, key, server } => {
            pause_resume(&server, &name, key.as_deref(), "resume").await?
        }
        other => run_more(other).await?,
    }
    Ok(())
}

async fn pause_resume(
    server: &ServerArgs,
    name: &str,
    key: Option<&str>,
    verb: &str,
) -> anyhow::Result<()> {
    let path = match key {
        Some(k) => format!("/v1/handlers/{}/keys/{}/{verb}", encode(name), encode(k)),
        None => format!("/v1/handlers/{}/{verb}", encode(name)),
    };
    server
        .client()?
        .post_json(&path, &serde_json::json!({}))
        .await?;
    match key {
        Some(k) => println!("{name}: key {k:?} {verb}d"),
        None => println!("{name}: {verb}d"),
    }
    Ok(())
}

async fn run_more(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Undeploy {
            name,
            purge,
            server,
        } => {
            let mut path = format!("/v1/handlers/{}", encode(&name));
            if purge {
                path.push_str("?purge=true");
            }
            server.client()?.delete_json(&path).await?;
            println!(
                "{name}: undeployed{}",
                if purge {
                    " and purged"
                } else {
                    " (state kept)"
                }
            );
        }
        Command::Inspect {
            handler,
            key: Some(key),
            server,
            ..
        } => {
            let reply = server
                .client()?
                .get_json(&format!(
                    "/v1/handlers/{}/keys/{}",
                    encode(&handler),
                    encode(&key)
                ))
                .await?;
            println!("{}", serde_json::to_string_pretty(&reply)?);
        }
        Command::Inspect {
            handler,
            idempotency_key,
            server,
            ..
        } => {
            let idempotency_key = idempotency_key.unwrap_or_default();
            let client = server.client()?;
            let path = format!(
                "/v1/handlers/{}/dedup/{}",
                encode(&handler),
                encode(&idempotency_key)
            );
            match client.get_bytes(&path).await? {
                Some(bytes) => {
                    let v: Value = serde_json::from_slice(&bytes).context("server reply")?;
                    println!("{}", serde_json::to_string_pretty(&v)?);
                }
                None => println!("no idempotency record: the message was not handled (yet)"),
            }
            let dead = client
                .get_json(&format!("/v1/dlq?handler={}", encode(&handler)))
                .await?;
            for e in dead["entries"].as_array().into_iter().flatten() {
                if e["idempotency_key"] == idempotency_key.as_str() {
                    println!(
                        "dead letter #{}: {} after {} attempt(s) (version {}): {}",
                        e["seq"], e["error_kind"], e["attempts"], e["version"], e["error"]
                    );
                }
            }
        }
        Command::Audit { handler, server } => {
            let mut path = "/v1/audit".to_string();
            if let Some(h) = handler {
                path.push_str(&format!("?handler={}", encode(&h)));
            }
            let reply = server.client()?.get_json(&path).await?;
            for r in reply
                .get("records")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                println!(
                    "#{:<8} {} {:<11} {:<20} {}",
                    r["seq"],
                    format_ms(r["at_ms"].as_u64().unwrap_or(0)),
                    r["action"].as_str().unwrap_or(""),
                    r["handler"].as_str().unwrap_or(""),
                    r["detail"].as_str().unwrap_or("")
                );
            }
        }
        Command::Ledger { command } => ledger_command(command)?,
        Command::ConfigCheck { file } => {
            let config = crate::config::ConfigFile::load(&file)?;
            print!("{}", config.to_toml()?);
            eprintln!("{}: OK", file.display());
        }
        _ => bail!("not a client command"),
    }
    Ok(())
}

fn open_ledger(
    data_dir: &std::path::Path,
    must_exist: bool,
) -> anyhow::Result<crate::ledger::Ledger> {
    let dir = data_dir.join("ledger");
    if must_exist && !dir.is_dir() {
        bail!(
            "{} holds no ledger (is it an ordo data directory?)",
            data_dir.display()
        );
    }
    // check and export leave an older ordo's layout as it is; import
    // writes a new ledger in this ordo's layout.
    let opened = if must_exist {
        crate::ledger::Ledger::open_existing(&dir)
    } else {
        crate::ledger::Ledger::open(&dir)
    };
    opened.with_context(|| {
        format!(
            "opening the ledger in {} (stop `ordo serve` first: the ledger is locked while it runs)",
            data_dir.display()
        )
    })
}

fn ledger_command(command: LedgerCommand) -> anyhow::Result<()> {
    let bar = |len: u64| {
        let bar = indicatif::ProgressBar::new(len);
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("{msg:10} [{bar:40}] {pos}/{len}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    };
    match command {
        LedgerCommand::Check { data_dir } => {
            let ledger = open_ledger(&data_dir, true)?;
            let report = ledger.check()?;
            for (tree, n) in &report.records {
                println!("{tree:<12} {n:>10} records");
            }
            if report.problems.is_empty() {
                println!("ledger check: OK");
            } else {
                for p in &report.problems {
                    println!("PROBLEM: {p}");
                }
                bail!("ledger check: {} problem(s)", report.problems.len());
            }
        }
        LedgerCommand::Export { data_dir, output } => {
            let ledger = open_ledger(&data_dir, true)?;
            let progress = bar(ledger.record_count()?);
            progress.set_message("exporting");
            let file = std::fs::File::create(&output)
                .with_context(|| format!("creating {}", output.display()))?;
            let mut out = std::io::BufWriter::new(file);
            let n = ledger.export(&mut out, &|n| progress.set_position(n))?;
            out.into_inner()
                .map_err(|e| anyhow::anyhow!("writing {}: {e}", output.display()))?
                .sync_all()?;
            progress.finish_and_clear();
            println!("exported {n} records to {}", output.display());
        }
        LedgerCommand::Import { data_dir, input } => {
            let ledger = open_ledger(&data_dir, false)?;
            let file = std::fs::File::open(&input)
                .with_context(|| format!("opening {}", input.display()))?;
            let mut reader = std::io::BufReader::new(file);
            let progress = bar(0);
            progress.set_message("importing");
            let n = ledger
                .import(&mut reader, &|n, total| {
                    progress.set_length(total);
                    progress.set_position(n);
                })
                .with_context(|| format!("importing {}", input.display()))?;
            progress.finish_and_clear();
            println!("imported {n} records into {}", data_dir.display());
        }
    }
    Ok(())
}

/// Milliseconds since the Unix epoch as `YYYY-MM-DD hh:mm:ss` UTC.
fn format_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

async fn dlq(command: DlqCommand) -> anyhow::Result<()> {
    match command {
        DlqCommand::List {
            handler,
            key,
            limit,
            json,
            server,
        } => {
            let mut path = format!("/v1/dlq?limit={limit}");
            if let Some(h) = handler {
                path.push_str(&format!("&handler={}", encode(&h)));
            }
            if let Some(k) = key {
                path.push_str(&format!("&key={}", encode(&k)));
            }
            let reply = server.client()?.get_json(&path).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&reply)?);
                return Ok(());
            }
            let entries = reply
                .get("entries")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            println!(
                "{:>8} {:<16} {:<16} {:>9} {:<14} {:>8} {:>7} {:<19} ERROR",
                "SEQ", "HANDLER", "KEY", "OFFSET", "KIND", "ATTEMPTS", "VERSION", "LAST FAILURE"
            );
            for e in &entries {
                println!(
                    "{:>8} {:<16} {:<16} {:>9} {:<14} {:>8} {:>7} {:<19} {}",
                    e["seq"],
                    e["handler"].as_str().unwrap_or(""),
                    format!(
                        "{}{}",
                        e["partition_key"].as_str().unwrap_or(""),
                        if e["key_parked"].as_bool() == Some(true) {
                            " (parked)"
                        } else {
                            ""
                        }
                    ),
                    format!("{}/{}", e["partition"], e["offset"]),
                    e["error_kind"].as_str().unwrap_or(""),
                    e["attempts"],
                    e["version"],
                    format_ms(e["last_failure_ms"].as_u64().unwrap_or(0)),
                    e["error"].as_str().unwrap_or("")
                );
            }
            eprintln!("{} dead letter(s)", entries.len());
        }
        DlqCommand::Replay {
            handler,
            selection,
            no_wait,
            server,
        } => {
            let client = server.client()?;
            let body = selection_body(&handler, &selection, None);
            let reply = client.post_json("/v1/dlq/replay", &body).await?;
            let n = reply["scheduled"].as_u64().unwrap_or(0);
            println!("scheduled {n} dead letter(s) of {handler} for replay");
            if !no_wait && n > 0 {
                wait_for_actions(&client, &handler).await?;
                let left = client
                    .get_json(&format!("/v1/dlq?handler={}", encode(&handler)))
                    .await?;
                let left = left["entries"].as_array().map(Vec::len).unwrap_or(0);
                println!("done; {left} dead letter(s) of {handler} remain (see `ordo dlq list`)");
            }
        }
        DlqCommand::Drop {
            handler,
            selection,
            reason,
            server,
        } => {
            let client = server.client()?;
            let body = selection_body(&handler, &selection, reason);
            let reply = client.post_json("/v1/dlq/drop", &body).await?;
            let n = reply["scheduled"].as_u64().unwrap_or(0);
            wait_for_actions(&client, &handler).await?;
            println!("dropped {n} dead letter(s) of {handler} (recorded in `ordo audit`)");
        }
    }
    Ok(())
}

fn selection_body(handler: &str, s: &DlqSelection, reason: Option<String>) -> Value {
    let mut body = serde_json::json!({ "handler": handler });
    if let Some(seq) = s.seq {
        body["seq"] = seq.into();
    } else if let Some(k) = &s.key {
        body["key"] = k.clone().into();
    } else {
        body["all"] = true.into();
    }
    if let Some(r) = reason {
        body["reason"] = r.into();
    }
    body
}

/// Polls the status until the handler's lanes carried out every pending
/// dead-letter action.
async fn wait_for_actions(client: &Client, handler: &str) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    loop {
        let status = client.get_json("/v1/status").await?;
        let pending = status["handlers"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|h| h["name"] == handler)
            .and_then(|h| h["pending_dlq_actions"].as_u64())
            .unwrap_or(0);
        if pending == 0 {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("{pending} action(s) still pending after 10 minutes; is the handler retrying a message? see `ordo status`");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
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
        "{:<20} {:>7} {:<16} {:>10} {:>12} {:>11} {:>9} {:>13} {:>6} {:>11}",
        "HANDLER",
        "VERSION",
        "TOPIC",
        "LAG",
        "PROCESSED",
        "DUPLICATES",
        "RETRIES",
        "DEAD-LETTERED",
        "HELD",
        "PARKED-KEYS"
    );
    for h in handlers {
        let s = |k: &str| {
            h.get(k)
                .map(|v| v.to_string().trim_matches('"').to_string())
                .unwrap_or_default()
        };
        println!(
            "{:<20} {:>7} {:<16} {:>10} {:>12} {:>11} {:>9} {:>13} {:>6} {:>11}",
            s("name"),
            s("version"),
            s("topic"),
            s("lag"),
            s("processed"),
            s("duplicates"),
            s("retries"),
            s("dead_lettered"),
            s("held"),
            s("parked_keys")
        );
    }
}
