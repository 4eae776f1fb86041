//! `ordo bench compare`: in one run, on one machine and disk, the same
//! counter logic as
//! 1. ordo effectively-once (WASM handler, embedded log, 16 partitions),
//! 2. ordo at-least-once (dedup ledger off),
//! 3. ordo effectively-once with a native (in-host Rust) handler,
//! 4. ordo effectively-once, WASM, with an instance running up to 64
//!    messages of a lane batch (`messages_per_instance`, opt-in; what the
//!    sandbox costs without a fresh instance per message),
//! 5. the hand-written baseline: one PostgreSQL transaction per message
//!    (insert into `processed_messages` with a conflict check, `SELECT …
//!    FOR UPDATE` of the state row, update, commit), 16 workers,
//! 6. the disk's limit: `fdatasync` calls per second.
//!
//! Every run gets the same messages: per-key sequences over `keys` keys
//! with 10 % duplicate deliveries.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;

use super::latency;

use crate::api::ingest::IncomingMessage;
use crate::dispatch::NativeHandler;
use crate::host::{Host, HostConfig};
use crate::runtime::{Failure, FailureKind, Message, Overlay, StateAccess};

/// Options of `ordo bench compare`.
#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Where the built handlers are.
    #[arg(long, default_value = "target/handlers")]
    handlers_dir: PathBuf,
    /// Unique messages per ordo run (plus 10 % duplicates).
    #[arg(long, default_value_t = 1_000_000)]
    messages: usize,
    /// Unique messages of the PostgreSQL baseline (it is slower; its rate
    /// is what is compared).
    #[arg(long, default_value_t = 50_000)]
    postgres_messages: usize,
    /// Partition keys.
    #[arg(long, default_value_t = 10_000)]
    keys: usize,
    /// Probes timed in each ordo run's latency phase, one every 20 ms,
    /// under half the effectively-once drain rate (the PostgreSQL pattern
    /// takes half its own rate for as long); 0 leaves the phase out.
    #[arg(long, default_value_t = 500)]
    latency_samples: usize,
    /// PostgreSQL connection string of the baseline.
    #[arg(long, default_value = "host=127.0.0.1 user=postgres dbname=test")]
    postgres: String,
    /// The markdown file the table is recorded in.
    #[arg(long, default_value = "BENCHMARKS.md")]
    output: PathBuf,
}

/// One run's figures.
struct RunResult {
    name: String,
    messages: u64,
    secs: f64,
    cpu_pct: f64,
    peak_rss_mib: f64,
    commits_per_flush: Option<f64>,
    messages_per_flush: Option<f64>,
    /// Bytes written to storage per message while draining.
    bytes_per_message: Option<f64>,
    /// The latency phase: messages offered per second, and produce→committed
    /// p50 and p99 (ms) at that load.
    latency: Option<Latency>,
}

impl RunResult {
    fn rate(&self) -> f64 {
        self.messages as f64 / self.secs.max(1e-9)
    }
}

/// What a latency phase measured.
#[derive(Clone, Copy)]
struct Latency {
    offered: f64,
    /// NaN when the phase failed.
    p50_ms: f64,
    p99_ms: f64,
}

impl Latency {
    /// A phase that failed (a probe not committed in time, a producer
    /// request refused): the table says so and the other runs go on.
    fn not_sustained(run: &str, offered: f64, error: &anyhow::Error) -> Latency {
        tracing::warn!(run, offered, error = %format!("{error:#}"), "latency phase failed");
        Latency {
            offered,
            p50_ms: f64::NAN,
            p99_ms: f64::NAN,
        }
    }

    /// A table cell of `ms`.
    fn cell(ms: f64) -> String {
        if ms.is_nan() {
            "not sustained".into()
        } else {
            format!("{ms:.2} ms")
        }
    }
}

/// (key, seq) of message `i`, and whether it is delivered twice.
fn nth(i: usize, keys: usize) -> (usize, u64, bool) {
    (i % keys, (i / keys) as u64 + 1, i % 10 == 0)
}

fn workload(messages: usize, keys: usize) -> Vec<IncomingMessage> {
    let mut out = Vec::with_capacity(messages * 11 / 10);
    for i in 0..messages {
        let (key, seq, dup) = nth(i, keys);
        let m = latency::msg(key, seq);
        if dup {
            out.push(m.clone());
        }
        out.push(m);
    }
    out
}

/// CPU seconds used by this process so far (user + system).
fn cpu_secs() -> f64 {
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may hold spaces).
            let rest = s.rsplit_once(')')?.1.split_whitespace().collect::<Vec<_>>();
            let utime: f64 = rest.get(11)?.parse().ok()?;
            let stime: f64 = rest.get(12)?.parse().ok()?;
            Some(utime + stime)
        })
        .unwrap_or(0.0);
    ticks / 100.0
}

/// The number after `field` (e.g. `VmRSS:`) on its line of the `/proc`
/// file `path`; `None` where the file or the field cannot be read.
fn proc_number(path: &str, field: &str) -> Option<f64> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Resident set size now (MiB).
fn rss_mib() -> f64 {
    proc_number("/proc/self/status", "VmRSS:").map_or(0.0, |kb| kb / 1024.0)
}

/// Bytes this process has caused to be written to storage so far
/// (`write_bytes` of `/proc/self/io`; NaN where it cannot be read).
fn written_bytes() -> f64 {
    proc_number("/proc/self/io", "write_bytes:").unwrap_or(f64::NAN)
}

/// Samples CPU, peak RSS and bytes written while a run is going.
pub(super) struct Meter {
    start: Instant,
    cpu0: f64,
    peak_rss: f64,
    written0: f64,
}

impl Meter {
    pub(super) fn start() -> Self {
        Meter {
            start: Instant::now(),
            cpu0: cpu_secs(),
            peak_rss: rss_mib(),
            written0: written_bytes(),
        }
    }

    /// Bytes written to storage since `start`.
    fn written(&self) -> f64 {
        written_bytes() - self.written0
    }

    fn sample(&mut self) {
        self.peak_rss = self.peak_rss.max(rss_mib());
    }

    /// Seconds, CPU % of all cores and peak RSS (MiB) since `start`.
    pub(super) fn finish(mut self) -> (f64, f64, f64) {
        self.sample();
        let secs = self.start.elapsed().as_secs_f64();
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1) as f64;
        let cpu = (cpu_secs() - self.cpu0) / secs.max(1e-9) / cores * 100.0;
        (secs, cpu, self.peak_rss)
    }
}

/// The counter handler's logic in Rust, without the sandbox.
struct NativeCounter;

impl NativeHandler for NativeCounter {
    fn handle(
        &self,
        msg: &Message,
        state: &mut dyn StateAccess,
        overlay: &mut Overlay,
    ) -> Result<(), Failure> {
        let payload: serde_json::Value = serde_json::from_slice(&msg.payload)
            .map_err(|e| Failure::new(FailureKind::Permanent, e.to_string()))?;
        let seq = payload["seq"]
            .as_u64()
            .ok_or_else(|| Failure::new(FailureKind::Permanent, "no seq"))?;
        let host = |e: anyhow::Error| Failure::new(FailureKind::Host, e.to_string());
        let seqs = match state.get("seqs").map_err(host)? {
            Some(old) if !old.is_empty() => format!("{},{seq}", String::from_utf8_lossy(&old)),
            _ => seq.to_string(),
        };
        let count = state
            .get("count")
            .map_err(host)?
            .and_then(|c| String::from_utf8_lossy(&c).parse::<u64>().ok())
            .unwrap_or(0)
            + 1;
        overlay
            .writes
            .insert("seqs".into(), Some(seqs.into_bytes()));
        overlay
            .writes
            .insert("count".into(), Some(count.to_string().into_bytes()));
        overlay
            .writes
            .insert("attempt".into(), Some(msg.attempt.to_string().into_bytes()));
        Ok(())
    }
}

enum Mode {
    /// The counter component, with this many messages per instance.
    Wasm(Vec<u8>, u32),
    Native,
}

/// Messages per instance of the opt-in row (a lane batch holds up to 256).
const REUSE: u32 = 64;

/// Time between two producer requests of a latency phase.
const LOAD_INTERVAL: Duration = Duration::from_millis(10);

/// The latency phase every run ends with: an open-loop load of new
/// messages (half the effectively-once drain rate for the ordo runs, half
/// its own rate for the PostgreSQL pattern).
struct LatencyPhase {
    /// Probes to time (none: no latency phase).
    samples: usize,
    /// Partition keys of the load.
    keys: usize,
}

async fn run_ordo(
    name: &str,
    mode: Mode,
    dedup: bool,
    messages: &[IncomingMessage],
    phase: &LatencyPhase,
    load_rate: Option<f64>,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<RunResult> {
    let dir = tempfile::tempdir_in(".")?;
    let config = HostConfig {
        dedup,
        ..HostConfig::default()
    };
    let host = Host::open(dir.path(), config).await?;
    bar.set_message(format!("{name}: loading the log"));
    bar.set_length(messages.len() as u64);
    bar.set_position(0);
    for chunk in messages.chunks(5_000) {
        host.ingest("bench", chunk.to_vec()).await?;
        bar.inc(chunk.len() as u64);
    }
    let total = messages.len() as u64;
    let (flushes0, commits0) = (host.committer().flushes(), host.committer().commits());
    let mut meter = Meter::start();
    match mode {
        Mode::Wasm(bytes, messages_per_instance) => {
            super::deploy_counter(&host, bytes, messages_per_instance).await?;
        }
        Mode::Native => host.run_native("counter", "bench", Arc::new(NativeCounter))?,
    }
    bar.set_message(format!("{name}: draining"));
    bar.set_position(0);
    loop {
        let s = host.status()?;
        let h = s
            .first()
            .ok_or_else(|| anyhow::anyhow!("no handler running"))?;
        let done = h.processed + h.duplicates + h.dead_lettered;
        bar.set_position(done);
        meter.sample();
        if h.lag == 0 && done >= total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let written = meter.written();
    let (secs, cpu_pct, peak_rss_mib) = meter.finish();
    let flushes = host.committer().flushes() - flushes0;
    let commits = host.committer().commits() - commits0;
    let latency = match phase.samples {
        0 => None,
        samples => {
            bar.set_message(format!("{name}: latency at half load"));
            bar.set_length(samples as u64);
            bar.set_position(0);
            let load = latency::Load {
                per_second: load_rate.unwrap_or(total as f64 / secs.max(1e-9) / 2.0),
                interval: LOAD_INTERVAL,
                keys: phase.keys,
                samples,
                progress: Some(bar.clone()),
            };
            match latency::under_load(&host, &load).await {
                Ok(loaded) => Some(Latency {
                    offered: loaded.sent as f64 / loaded.secs,
                    p50_ms: loaded.ms(0, 0.5),
                    p99_ms: loaded.ms(0, 0.99),
                }),
                Err(e) => Some(Latency::not_sustained(name, load.per_second, &e)),
            }
        }
    };
    host.shutdown().await?;
    Ok(RunResult {
        name: name.to_string(),
        messages: total,
        secs,
        cpu_pct,
        peak_rss_mib,
        commits_per_flush: Some(commits as f64 / flushes.max(1) as f64),
        messages_per_flush: Some(total as f64 / flushes.max(1) as f64),
        bytes_per_message: Some(written / total.max(1) as f64),
        latency,
    })
}

/// One worker of the hand-written pattern: a connection and its prepared
/// statements.
struct PgWorker {
    client: tokio_postgres::Client,
    insert: tokio_postgres::Statement,
    select: tokio_postgres::Statement,
    update: tokio_postgres::Statement,
    create: tokio_postgres::Statement,
}

impl PgWorker {
    async fn connect(conn: &str) -> anyhow::Result<PgWorker> {
        let (client, connection) = tokio_postgres::connect(conn, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        let insert = client
            .prepare(
                "INSERT INTO ordo_bench_processed VALUES ('counter', $1) ON CONFLICT DO NOTHING",
            )
            .await?;
        let select = client
            .prepare("SELECT seqs, count FROM ordo_bench_state WHERE key = $1 FOR UPDATE")
            .await?;
        let update = client
            .prepare("UPDATE ordo_bench_state SET seqs = $2, count = $3 WHERE key = $1")
            .await?;
        let create = client
            .prepare("INSERT INTO ordo_bench_state VALUES ($1, $2, 1)")
            .await?;
        Ok(PgWorker {
            client,
            insert,
            select,
            update,
            create,
        })
    }

    /// One message, one transaction: record its id (a duplicate stops
    /// there), lock and update the key's state row, commit.
    async fn process(&mut self, key: &str, id: &str, seq: u64) -> anyhow::Result<()> {
        let tx = self.client.transaction().await?;
        if tx.execute(&self.insert, &[&id]).await? == 1 {
            match tx.query_opt(&self.select, &[&key]).await? {
                Some(row) => {
                    let seqs: String = row.get(0);
                    let count: i64 = row.get(1);
                    tx.execute(
                        &self.update,
                        &[&key, &format!("{seqs},{seq}"), &(count + 1)],
                    )
                    .await?;
                }
                None => {
                    tx.execute(&self.create, &[&key, &seq.to_string()]).await?;
                }
            }
        }
        tx.commit().await?;
        Ok(())
    }
}

/// The hand-written pattern: per message one PostgreSQL transaction.
async fn run_postgres(
    conn: &str,
    messages: &[IncomingMessage],
    workers: usize,
    phase: &LatencyPhase,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<RunResult> {
    let (setup, connection) = tokio_postgres::connect(conn, tokio_postgres::NoTls)
        .await
        .map_err(|e| anyhow::anyhow!("PostgreSQL at {conn:?}: {e}"))?;
    let driver = tokio::spawn(connection);
    setup
        .batch_execute(
            "DROP TABLE IF EXISTS ordo_bench_processed, ordo_bench_state;
             CREATE TABLE ordo_bench_processed (consumer text NOT NULL, message_id text NOT NULL,
                                                PRIMARY KEY (consumer, message_id));
             CREATE TABLE ordo_bench_state (key text PRIMARY KEY, seqs text NOT NULL, count bigint NOT NULL);",
        )
        .await?;
    // Per-key order: a key always goes to the same worker.
    let mut queues: Vec<Vec<(String, String, u64)>> = vec![Vec::new(); workers];
    for m in messages {
        let seq = String::from_utf8_lossy(&m.payload)
            .trim_start_matches("{\"seq\":")
            .trim_end_matches('}')
            .parse::<u64>()
            .unwrap_or(0);
        let w = crate::source::partition_for(&m.key, workers as u32) as usize;
        queues[w].push((
            m.key.clone(),
            m.idempotency_key.clone().unwrap_or_default(),
            seq,
        ));
    }
    bar.set_message("postgres baseline");
    bar.set_length(messages.len() as u64);
    bar.set_position(0);
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut meter = Meter::start();
    let mut tasks = Vec::new();
    for queue in queues {
        let conn = conn.to_string();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let mut worker = PgWorker::connect(&conn).await?;
            for (key, id, seq) in queue {
                worker.process(&key, &id, seq).await?;
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    let all = futures_join(tasks);
    tokio::pin!(all);
    loop {
        tokio::select! {
            r = &mut all => { r?; break; }
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                bar.set_position(done.load(std::sync::atomic::Ordering::Relaxed));
                meter.sample();
            }
        }
    }
    let (secs, _, _) = meter.finish();
    let latency = match phase.samples {
        0 => None,
        samples => {
            bar.set_message("postgres baseline: latency at half load (ms)");
            // As long as an ordo run's probes take at the least.
            let duration = latency::PROBE_GAP * samples as u32;
            bar.set_length(duration.as_millis() as u64);
            bar.set_position(0);
            let per_second = messages.len() as f64 / secs.max(1e-9) / 2.0;
            let load = postgres_under_load(conn, workers, per_second, phase.keys, duration, bar);
            match load.await {
                Ok(mut took) => {
                    took.sort();
                    Some(Latency {
                        offered: per_second,
                        p50_ms: latency::quantile_ms(&took, 0.5),
                        p99_ms: latency::quantile_ms(&took, 0.99),
                    })
                }
                Err(e) => Some(Latency::not_sustained("PostgreSQL", per_second, &e)),
            }
        }
    };
    // The work happens in the PostgreSQL server, not in this process: report
    // the machine's CPU use instead.
    setup
        .batch_execute("DROP TABLE ordo_bench_processed, ordo_bench_state")
        .await?;
    drop(setup);
    let _ = driver.await;
    Ok(RunResult {
        name: format!("PostgreSQL processed_messages pattern, {workers} workers"),
        messages: messages.len() as u64,
        secs,
        cpu_pct: f64::NAN,
        peak_rss_mib: f64::NAN,
        commits_per_flush: None,
        messages_per_flush: None,
        bytes_per_message: None,
        latency,
    })
}

/// The hand-written pattern under an open-loop load of `per_second` new
/// messages for `duration` (a request every 10 ms, as ordo's latency phase
/// sends them): each message timed from being queued to its key's worker
/// to its transaction's commit. The source is an in-memory queue, so
/// nothing of a broker's own latency is counted.
async fn postgres_under_load(
    conn: &str,
    workers: usize,
    per_second: f64,
    keys: usize,
    duration: Duration,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<Vec<Duration>> {
    type Queued = (String, String, u64, Instant);
    let mut senders = Vec::with_capacity(workers);
    let mut tasks = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Queued>();
        senders.push(tx);
        let mut worker = PgWorker::connect(conn).await?;
        tasks.push(tokio::spawn(async move {
            let mut took = Vec::new();
            while let Some((key, id, seq, queued)) = rx.recv().await {
                worker.process(&key, &id, seq).await?;
                took.push(queued.elapsed());
            }
            anyhow::Ok(took)
        }));
    }
    let keys = keys.max(1);
    let mut pacer = latency::Pacer::new(per_second, LOAD_INTERVAL);
    while pacer.elapsed() < duration {
        let due = pacer.next().await;
        let now = Instant::now();
        for j in due {
            let (key, seq) = latency::load_seq(j, keys);
            let m = latency::msg(key, seq);
            let w = crate::source::partition_for(&m.key, workers as u32) as usize;
            let id = m.idempotency_key.unwrap_or_default();
            // A worker that failed has dropped its queue; its error is
            // returned below.
            let _ = senders[w].send((m.key, id, seq, now));
        }
        bar.set_position(pacer.elapsed().as_millis() as u64);
    }
    drop(senders);
    let mut took = Vec::with_capacity(pacer.sent());
    for t in tasks {
        took.extend(t.await??);
    }
    Ok(took)
}

async fn futures_join(
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
) -> anyhow::Result<()> {
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// `fdatasync` calls per second on the filesystem of the current directory.
fn fsync_rate() -> anyhow::Result<f64> {
    use std::io::Write;
    let mut file = tempfile::NamedTempFile::new_in(".")?;
    let block = [7u8; 4096];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(2) {
        file.write_all(&block)?;
        file.as_file().sync_data()?;
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

fn fmt(v: f64, digits: usize) -> String {
    if v.is_nan() {
        "–".into()
    } else {
        format!("{v:.digits$}")
    }
}

/// Runs the comparison, prints the table and records it.
pub async fn run(args: CompareArgs) -> anyhow::Result<()> {
    let wasm = super::handler_bytes(&args.handlers_dir, "counter")?;
    let wasm_wasip2 = super::handler_bytes(&args.handlers_dir, "counter-wasip2")?;
    let keys = args.keys.max(1);
    let messages = workload(args.messages, keys);
    let phase = LatencyPhase {
        samples: args.latency_samples,
        keys,
    };
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{msg:32} [{bar:30}] {pos}/{len} {per_sec}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    let eo = run_ordo(
        "ordo effectively-once, WASM",
        Mode::Wasm(wasm.clone(), 1),
        true,
        &messages,
        &phase,
        None,
        &bar,
    )
    .await?;
    // Every ordo run takes the same load: half the effectively-once drain.
    let load_rate = eo.latency.map(|l| l.offered);
    let alo = run_ordo(
        "ordo at-least-once (no dedup), WASM",
        Mode::Wasm(wasm.clone(), 1),
        false,
        &messages,
        &phase,
        load_rate,
        &bar,
    )
    .await?;
    let native = run_ordo(
        "ordo effectively-once, native handler",
        Mode::Native,
        true,
        &messages,
        &phase,
        load_rate,
        &bar,
    )
    .await?;
    let reuse = run_ordo(
        &format!("ordo effectively-once, WASM, {REUSE} messages per instance (opt-in)"),
        Mode::Wasm(wasm, REUSE),
        true,
        &messages,
        &phase,
        load_rate,
        &bar,
    )
    .await?;
    let wasip2 = run_ordo(
        "ordo effectively-once, WASM built for wasm32-wasip2",
        Mode::Wasm(wasm_wasip2, 1),
        true,
        &messages,
        &phase,
        load_rate,
        &bar,
    )
    .await?;
    let pg_messages = workload(args.postgres_messages.min(args.messages), keys);
    let postgres = run_postgres(&args.postgres, &pg_messages, 16, &phase, &bar).await?;
    bar.set_message("disk: fdatasync/s");
    let fsyncs = tokio::task::spawn_blocking(fsync_rate).await??;
    bar.finish_and_clear();

    let mut table = String::from(
        "| run | messages | msg/s | latency phase: load offered, msg/s | produce→committed p50 | produce→committed p99 | CPU % (of all cores) | peak RSS MiB | commits per flush | messages per flush | bytes written per message |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in [&eo, &alo, &native, &reuse, &wasip2, &postgres] {
        table.push_str(&format!(
            "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.name,
            r.messages,
            r.rate(),
            r.latency
                .map(|l| format!("{:.0}", l.offered))
                .unwrap_or_else(|| "–".into()),
            r.latency
                .map(|l| Latency::cell(l.p50_ms))
                .unwrap_or_else(|| "–".into()),
            r.latency
                .map(|l| Latency::cell(l.p99_ms))
                .unwrap_or_else(|| "–".into()),
            fmt(r.cpu_pct, 0),
            fmt(r.peak_rss_mib, 0),
            r.commits_per_flush
                .map(|c| format!("{c:.1}"))
                .unwrap_or_else(|| "–".into()),
            r.messages_per_flush
                .map(|c| format!("{c:.0}"))
                .unwrap_or_else(|| "–".into()),
            r.bytes_per_message
                .map(|b| fmt(b, 0))
                .unwrap_or_else(|| "–".into())
        ));
    }
    table.push_str(&format!(
        "| disk: 4 KiB write + fdatasync | – | {fsyncs:.0} fsync/s | – | – | – | – | – | – | – | – |\n"
    ));
    let ratio = |a: &RunResult, b: &RunResult| a.rate() / b.rate().max(1e-9);
    table.push_str(&format!(
        "\n| ratio | value |\n|---|---:|\n\
         | effectively-once / at-least-once | {:.2} |\n\
         | WASM / native handler | {:.2} |\n\
         | WASM, {REUSE} messages per instance / native handler | {:.2} |\n\
         | WASM built for wasm32-wasip2 / native handler | {:.2} |\n\
         | ordo effectively-once / PostgreSQL pattern | {:.1}× |\n\
         | ordo effectively-once, {REUSE} messages per instance / PostgreSQL pattern | {:.1}× |\n",
        ratio(&eo, &alo),
        ratio(&eo, &native),
        ratio(&reuse, &native),
        ratio(&wasip2, &native),
        ratio(&eo, &postgres),
        ratio(&reuse, &postgres),
    ));
    println!("{table}");
    let body = format!(
        "## Side by side: effectively-once vs at-least-once vs native vs the PostgreSQL pattern\n\n\
         {}; counter logic, {} keys, 10 % duplicate deliveries, 16 partitions / workers; \
         ordo drains a pre-loaded embedded log in-process. WASM: the Rust counter built for \
         `wasm32-unknown-unknown` (no WASI imports), unless the row says `wasm32-wasip2`. \
         Latency phase: after its drain, each run takes an open-loop load of new messages \
         (a producer request every 10 ms over the same keys). Every ordo run is offered half \
         the effectively-once WASM drain rate, so that its rows compare at one load (what the \
         host then also spends on ingesting the load is not in the drain rate), while {} probes \
         on a key of their own are each timed from produce to committed (durable, through the \
         embedded log). The PostgreSQL pattern is offered half its own rate and each of its \
         messages is timed from being queued to its worker (an in-memory source: no broker's \
         latency) to its commit.\n\
         Reproduce: `scripts/build-guests.sh && cargo run --release -- bench compare` \
         (PostgreSQL on 127.0.0.1, database `test`).\n\n{table}",
        super::machine_summary(),
        keys,
        args.latency_samples,
    );
    super::record_section(&args.output, "compare", &body)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_latency_phase_reads_not_sustained_in_the_table() {
        assert_eq!(Latency::cell(1.234), "1.23 ms");
        let failed = Latency::not_sustained("run", 100.0, &anyhow::anyhow!("probe late"));
        assert_eq!(Latency::cell(failed.p50_ms), "not sustained");
        assert_eq!(Latency::cell(failed.p99_ms), "not sustained");
        assert_eq!(failed.offered, 100.0);
    }
}
