//! End-to-end pipeline benchmark: the host in-process (no HTTP), the counter
//! handler, durable commits. Measures drain throughput of a preloaded
//! backlog with duplicates, and produce→committed latency of single messages.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;

use crate::api::ingest::IncomingMessage;
use crate::host::{Host, HostConfig};

/// Options of `ordo bench pipeline`.
#[derive(Debug, Args)]
pub struct PipelineArgs {
    /// Directory holding `counter.wasm`.
    #[arg(long, default_value = "target/handlers")]
    handlers_dir: PathBuf,
    /// Unique messages in the backlog.
    #[arg(long, default_value_t = 200_000)]
    messages: usize,
    /// Partition keys.
    #[arg(long, default_value_t = 1_000)]
    keys: usize,
    /// Single-message latency samples.
    #[arg(long, default_value_t = 500)]
    latency_samples: usize,
    /// Markdown file to record the table in.
    #[arg(long, default_value = "BENCHMARKS.md")]
    output: PathBuf,
}

fn msg(key: usize, seq: u64) -> IncomingMessage {
    IncomingMessage {
        key: format!("key-{key}"),
        idempotency_key: Some(format!("key-{key}/{seq}")),
        payload: format!("{{\"seq\":{seq}}}").into_bytes(),
        headers: vec![],
    }
}

async fn processed(host: &Host) -> anyhow::Result<(u64, u64, u64)> {
    let s = host.status()?;
    let h = s.first().ok_or_else(|| anyhow::anyhow!("no handler"))?;
    Ok((h.processed, h.duplicates, h.lag))
}

/// Runs the pipeline benchmark.
pub async fn run(args: PipelineArgs) -> anyhow::Result<()> {
    let bytes = std::fs::read(args.handlers_dir.join("counter.wasm"))
        .map_err(|e| anyhow::anyhow!("reading counter.wasm: {e} (run scripts/build-guests.sh)"))?;
    let dir = tempfile::tempdir_in(".")?;
    let host = Host::open(dir.path(), HostConfig::default()).await?;

    // Backlog: every 10th message delivered twice.
    let keys = args.keys.max(1);
    let mut batch = Vec::with_capacity(1_000);
    let mut total = 0usize;
    let bar = indicatif::ProgressBar::new(args.messages as u64);
    for i in 0..args.messages {
        let (key, seq) = (i % keys, (i / keys) as u64 + 1);
        batch.push(msg(key, seq));
        if i % 10 == 0 {
            batch.push(msg(key, seq));
        }
        if batch.len() >= 1_000 {
            total += batch.len();
            host.ingest("bench", std::mem::take(&mut batch)).await?;
            bar.set_position(i as u64);
        }
    }
    total += batch.len();
    host.ingest("bench", batch).await?;
    bar.finish_and_clear();

    let t0 = Instant::now();
    host.deploy("counter", "bench", bytes, Default::default())
        .await?;
    let flushes0 = host.committer().flushes();
    loop {
        let (p, d, lag) = processed(&host).await?;
        if lag == 0 && (p + d) as usize >= total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drain = t0.elapsed();
    let flushes = host.committer().flushes() - flushes0;
    let (p, d, _) = processed(&host).await?;
    let rate = total as f64 / drain.as_secs_f64();

    // Latency: one message at a time, produce → committed.
    let mut samples = Vec::with_capacity(args.latency_samples);
    for i in 0..args.latency_samples {
        let before = processed(&host).await?.0;
        let start = Instant::now();
        host.ingest("bench", vec![msg(i % keys, 1_000_000 + i as u64)])
            .await?;
        while processed(&host).await?.0 <= before {
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
        samples.push(start.elapsed());
    }
    samples.sort();
    let pct = |p: f64| samples[((samples.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e3;

    // Latency at about half of the measured drain rate: an open-loop load
    // (a batch every 10 ms) plus probe messages on their own key, each timed
    // from produce to its state being committed (applied and durable).
    let per_tick = ((rate * 0.5) / 100.0).max(1.0) as usize;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (host, stop) = (host.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut n = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tick.tick().await;
                let batch: Vec<IncomingMessage> = (0..per_tick)
                    .map(|j| msg((n + j) % keys, 2_000_000 + ((n + j) / keys) as u64))
                    .collect();
                n += per_tick;
                if host.ingest("bench", batch).await.is_err() {
                    break;
                }
            }
            n
        })
    };
    let (load_flushes0, load_t0) = (host.committer().flushes(), Instant::now());
    let load_meter = super::compare::Meter::start();
    let mut probes = Vec::with_capacity(args.latency_samples);
    // Of each probe's latency: until the producer's ingest returned (the
    // message durable in the log).
    let mut ingested = Vec::with_capacity(args.latency_samples);
    for i in 0..args.latency_samples {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let want = (i + 1).to_string();
        let start = Instant::now();
        host.ingest(
            "bench",
            vec![IncomingMessage {
                key: "probe".into(),
                idempotency_key: Some(format!("probe/{i}")),
                payload: format!("{{\"seq\":{}}}", i + 1).into_bytes(),
                headers: vec![],
            }],
        )
        .await?;
        ingested.push(start.elapsed());
        while host.state_get("counter", "probe", "count")?.as_deref() != Some(want.as_bytes()) {
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
        // The state read is applied; committed means durable (a flush that
        // started after it was seen, so never less than the real figure).
        host.committer().barrier().await?;
        probes.push(start.elapsed());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let load_flush_rate = (host.committer().flushes() - load_flushes0) as f64
        / load_t0.elapsed().as_secs_f64().max(0.001);
    let (_, load_cpu, _) = load_meter.finish();
    let loaded = load.await?;
    let load_secs = probes.iter().map(|d| d.as_secs_f64() + 0.02).sum::<f64>();
    probes.sort();
    ingested.sort();
    let ppct = |p: f64| probes[((probes.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e3;
    let ipct = |p: f64| ingested[((ingested.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e3;
    host.shutdown().await?;

    let table = format!(
        "| measure | value |\n|---|---:|\n\
         | messages drained (incl. {d} duplicates) | {total} |\n\
         | committed | {p} |\n\
         | drain throughput, effectively-once, durable | {rate:.0} msg/s |\n\
         | flushes during drain | {flushes} ({:.1} messages per flush) |\n\
         | produce→committed p50, one message in flight | {:.2} ms |\n\
         | produce→committed p99, one message in flight | {:.2} ms |\n\
         | offered load for the next two rows (≈ half the drain rate) | {:.0} msg/s |\n\
         | produce→committed p50 at that load | {:.2} ms |\n\
         | produce→committed p99 at that load | {:.2} ms |\n\
         | of which produce→durable in the log (ingest returned) p50 / p99 | {:.2} / {:.2} ms |\n\
         | group flushes at that load | {load_flush_rate:.0} per second |\n\
         | CPU at that load (of all cores) | {load_cpu:.0} % |\n",
        total as f64 / flushes.max(1) as f64,
        pct(0.5),
        pct(0.99),
        loaded as f64 / load_secs.max(0.001),
        ppct(0.5),
        ppct(0.99),
        ipct(0.5),
        ipct(0.99)
    );
    println!("{table}");
    let body = format!(
        "## Pipeline, end to end (in-process host, counter handler)\n\n{}; {} keys, 16 partitions.\n\
         Reproduce: `scripts/build-guests.sh && cargo run --release -- bench pipeline`.\n\n{table}",
        super::machine_summary(),
        keys
    );
    super::record_section(&args.output, "pipeline", &body)?;
    Ok(())
}
