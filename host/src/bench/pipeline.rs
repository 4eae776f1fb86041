//! End-to-end pipeline benchmark: the host in-process (no HTTP), the counter
//! handler, durable commits. Measures drain throughput of a preloaded
//! backlog with duplicates, and produce→committed latency of single messages,
//! alone and under an open-loop load.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;

use crate::api::ingest::IncomingMessage;
use crate::dispatch::LanePosition;
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

/// How long a probe may wait for its message to be committed before the
/// offered load is declared not sustained.
const PROBE_DEADLINE: Duration = Duration::from_secs(10);

fn fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if f > 0.0 && f <= 1.0 => Ok(f),
        _ => Err(format!("{s:?} is not a fraction in (0, 1]")),
    }
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
        let offset = ingest_one(&host, m).await?;
        reached(&mut position, |p| p.committed > offset, start).await?;
        samples.push(start.elapsed());
    }
    samples.sort();
    let pct = |p: f64| samples[((samples.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e3;

    // Latency at a fraction (half, by default) of the measured drain rate:
    // an open-loop load (a producer request every `load_interval_ms`, each
    // on its own task whether or not the earlier ones were answered, as
    // independent producers would send them) plus probe messages on their
    // own key, each timed from produce to its lane's committed position
    // passing it (applied, durable and counted).
    let per_second = args
        .load_rate
        .map_or(rate * args.load_fraction, |r| f64::from(r.max(1)));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (host, stop) = (host.clone(), stop.clone());
        let interval = Duration::from_millis(args.load_interval_ms);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            let mut requests = tokio::task::JoinSet::new();
            let started = Instant::now();
            let mut sent = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tick.tick().await;
                // Every message due by now, so a late tick does not lower
                // the offered rate.
                let due = ((started.elapsed().as_secs_f64() * per_second) as usize).max(sent);
                let batch: Vec<IncomingMessage> = (sent..due)
                    .map(|j| msg(j % keys, 2_000_000 + (j / keys) as u64))
                    .collect();
                sent = due;
                if !batch.is_empty() {
                    let host = host.clone();
                    requests.spawn(async move { host.ingest("bench", batch).await });
                }
                while let Some(done) = requests.try_join_next() {
                    done??;
                }
            }
            while let Some(done) = requests.join_next().await {
                done??;
            }
            anyhow::Ok((sent, started.elapsed()))
        })
    };
    let load_flushes0 = host.committer().flushes();
    let load_meter = super::compare::Meter::start();
    let probed = probe(&host, args.latency_samples).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (_, load_cpu, _) = load_meter.finish();
    let load_flushes = host.committer().flushes() - load_flushes0;
    let loaded = load.await?;
    let (mut stages, (sent, load_time)) = match (probed, loaded) {
        (Ok(stages), Ok(loaded)) => (stages, loaded),
        (Err(e), _) | (_, Err(e)) => {
            host.shutdown().await?;
            anyhow::bail!(
                "latency phase at {per_second:.0} msg/s offered: {e:#}; \
                 try a lower --load-fraction"
            );
        }
    };
    let load_secs = load_time.as_secs_f64().max(0.001);
    let mut pcts = |i: usize| {
        stages[i].sort();
        let v = &stages[i];
        let at = |p: f64| v[((v.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e3;
        (at(0.5), at(0.99))
    };
    let (committed, ingested, applied) = (pcts(0), pcts(1), pcts(2));
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
        sent as f64 / load_secs,
        committed.0,
        committed.1,
        ingested.0,
        ingested.1,
        applied.0,
        applied.1,
        load_flushes as f64 / load_secs,
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

/// Sends `samples` probe messages on their own key, 20 ms apart, and times
/// each: `[produce→committed, produce→ingest returned (durable in the log),
/// produce→applied by the lane]`, read from the lane's position (committed:
/// the batch holding it is durable and counted), then checks the state the
/// probe left.
async fn probe(host: &Host, samples: usize) -> anyhow::Result<[Vec<Duration>; 3]> {
    let mut stages: [Vec<Duration>; 3] = Default::default();
    let mut position = host.lane_position("counter", "probe")?;
    for i in 0..samples {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let start = Instant::now();
        let offset = ingest_one(
            host,
            IncomingMessage {
                key: "probe".into(),
                idempotency_key: Some(format!("probe/{i}")),
                payload: format!("{{\"seq\":{}}}", i + 1).into_bytes(),
                headers: vec![],
            },
        )
        .await?;
        let ingested = start.elapsed();
        reached(&mut position, |p| p.applied > offset, start).await?;
        let applied = start.elapsed();
        reached(&mut position, |p| p.committed > offset, start).await?;
        stages[0].push(start.elapsed());
        stages[1].push(ingested);
        stages[2].push(applied);
        let want = (i + 1).to_string();
        let count = host.state_get("counter", "probe", "count")?;
        anyhow::ensure!(
            count.as_deref() == Some(want.as_bytes()),
            "probe {i} committed but the count is {:?}, not {want}",
            count.map(|c| String::from_utf8_lossy(&c).into_owned())
        );
    }
    Ok(stages)
}

/// Produces one message; its offset.
async fn ingest_one(host: &Host, m: IncomingMessage) -> anyhow::Result<u64> {
    host.ingest("bench", vec![m])
        .await?
        .first()
        .copied()
        .ok_or_else(|| anyhow::anyhow!("ingest returned no offset"))
}

/// Waits until the lane's position satisfies `done`, at most
/// [`PROBE_DEADLINE`] after `start`.
async fn reached(
    position: &mut tokio::sync::watch::Receiver<LanePosition>,
    done: impl FnMut(&LanePosition) -> bool,
    start: Instant,
) -> anyhow::Result<()> {
    let left = PROBE_DEADLINE.saturating_sub(start.elapsed());
    match tokio::time::timeout(left, position.wait_for(done)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(_)) => anyhow::bail!("the handler's lane stopped"),
        Err(_) => anyhow::bail!(
            "not sustained: a probe was not committed within {} s",
            PROBE_DEADLINE.as_secs()
        ),
    }
}
