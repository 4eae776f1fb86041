//! End-to-end pipeline benchmark: the host in-process (no HTTP), the counter
//! handler, durable commits. Measures drain throughput of a preloaded
//! backlog with duplicates, and produce→committed latency of single messages,
//! alone and under an open-loop load.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;

use super::latency::{self, msg};
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
    /// Partition keys. The default spreads messages so that, as in the
    /// latency phase, a batch rarely holds two messages of one key; with few
    /// keys the drain writes each key's state once for several messages
    /// while the latency phase writes it for every message, so a fraction
    /// of the drain rate is far more than that fraction of what the latency
    /// phase can take.
    #[arg(long, default_value_t = 100_000)]
    keys: usize,
    /// Single-message latency samples.
    #[arg(long, default_value_t = 500)]
    latency_samples: usize,
    /// Offered load of the latency phase, as a fraction of the measured
    /// drain rate.
    #[arg(long, default_value_t = 0.5, value_parser = fraction)]
    load_fraction: f64,
    /// Offered load of the latency phase in messages per second, instead of
    /// a fraction of the drain rate (to compare builds at the same load).
    #[arg(long, conflicts_with = "load_fraction")]
    load_rate: Option<u32>,
    /// Interval between the producer requests of the latency phase, in
    /// milliseconds (each request carries that interval's share of the
    /// load and is sent whether or not earlier ones were answered).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=1000))]
    load_interval_ms: u64,
    /// Messages one sandbox instance may run within a lane batch (the
    /// handler's `messages_per_instance`; 1 is a fresh instance each).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    messages_per_instance: u32,
    /// Markdown file to record the table in.
    #[arg(long, default_value = "BENCHMARKS.md")]
    output: PathBuf,
}

fn fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if f > 0.0 && f <= 1.0 => Ok(f),
        _ => Err(format!("{s:?} is not a fraction in (0, 1]")),
    }
}

async fn processed(host: &Host) -> anyhow::Result<(u64, u64, u64)> {
    let s = host.status()?;
    let h = s.first().ok_or_else(|| anyhow::anyhow!("no handler"))?;
    Ok((h.processed, h.duplicates, h.lag))
}

/// Runs the pipeline benchmark.
pub async fn run(args: PipelineArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.latency_samples > 0,
        "--latency-samples must be at least 1"
    );
    let bytes = super::handler_bytes(&args.handlers_dir, "counter")?;
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
    super::deploy_counter(&host, bytes, args.messages_per_instance).await?;
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
        let m = msg(i % keys, 1_000_000 + i as u64);
        let mut position = host.lane_position("counter", &m.key)?;
        let start = Instant::now();
        let offset = latency::ingest_one(&host, m).await?;
        latency::reached(&mut position, |p| p.committed > offset, start).await?;
        samples.push(start.elapsed());
    }
    samples.sort();
    let pct = |p: f64| latency::quantile_ms(&samples, p);

    // Latency at a fraction (half, by default) of the measured drain rate.
    let load = latency::Load {
        per_second: args
            .load_rate
            .map_or(rate * args.load_fraction, |r| f64::from(r.max(1))),
        interval: Duration::from_millis(args.load_interval_ms),
        keys,
        samples: args.latency_samples,
        progress: None,
    };
    let loaded = match latency::under_load(&host, &load).await {
        Ok(loaded) => loaded,
        Err(e) => {
            host.shutdown().await?;
            anyhow::bail!(
                "latency phase at {:.0} msg/s offered: {e:#}; try a lower --load-fraction",
                load.per_second
            );
        }
    };
    let load_cpu = loaded.cpu_pct;
    host.shutdown().await?;

    let table = format!(
        "| measure | value |\n|---|---:|\n\
         | messages drained (incl. {d} duplicates) | {total} |\n\
         | committed | {p} |\n\
         | drain throughput, effectively-once, durable | {rate:.0} msg/s |\n\
         | flushes during drain | {flushes} ({:.1} messages per flush) |\n\
         | produce→committed p50, one message in flight | {:.2} ms |\n\
         | produce→committed p99, one message in flight | {:.2} ms |\n\
         | offered load for the next rows ({}; a request every {} ms, open loop) | {:.0} msg/s |\n\
         | produce→committed p50 at that load | {:.2} ms |\n\
         | produce→committed p99 at that load | {:.2} ms |\n\
         | of which produce→durable in the log (ingest returned) p50 / p99 | {:.2} / {:.2} ms |\n\
         | of which produce→applied by the lane p50 / p99 | {:.2} / {:.2} ms |\n\
         | group flushes at that load | {:.0} per second |\n\
         | CPU at that load (of all cores) | {load_cpu:.0} % |\n",
        total as f64 / flushes.max(1) as f64,
        pct(0.5),
        pct(0.99),
        match args.load_rate {
            Some(_) => "set by --load-rate".to_string(),
            None => format!("{:.0} % of the drain rate", args.load_fraction * 100.0),
        },
        args.load_interval_ms,
        loaded.sent as f64 / loaded.secs,
        loaded.ms(0, 0.5),
        loaded.ms(0, 0.99),
        loaded.ms(1, 0.5),
        loaded.ms(1, 0.99),
        loaded.ms(2, 0.5),
        loaded.ms(2, 0.99),
        loaded.flushes as f64 / loaded.secs,
    );
    println!("{table}");
    let body = format!(
        "## Pipeline, end to end (in-process host, counter handler)\n\n{}; {} keys, 16 partitions{}.\n\
         Reproduce: `scripts/build-guests.sh && cargo run --release -- bench pipeline{}`.\n\n{table}",
        super::machine_summary(),
        keys,
        match args.messages_per_instance {
            1 => String::new(),
            n => format!(", up to {n} messages per instance"),
        },
        match args.messages_per_instance {
            1 => String::new(),
            n => format!(" --messages-per-instance {n}"),
        },
    );
    super::record_section(&args.output, "pipeline", &body)?;
    Ok(())
}
