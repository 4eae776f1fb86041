//! Dedup lookup cost as the ledger grows: p50/p99 of an idempotency-key
//! lookup (hit and miss) at 10^4 … 10^7 recorded keys, and ledger bytes per
//! key. Records are written through the real commit path.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use rand::{Rng, SeedableRng};

use crate::ledger::{CommitBatch, DedupOutcome, DedupRecord, Ledger};

/// Options of `ordo bench dedup`.
#[derive(Debug, Args)]
pub struct DedupArgs {
    /// Largest ledger size, in recorded idempotency keys (measured at each
    /// power of ten from 10^4 up to this).
    #[arg(long, default_value_t = 10_000_000)]
    max_keys: u64,
    /// Lookups per ledger size: half of them hits on any key, and as
    /// many misses and recent hits. Enough that a p99 is not made by a
    /// few stalls of a shared machine (with 20,000, the p99 at 10^7 keys
    /// ranged from 6 to 100 µs between runs).
    #[arg(long, default_value_t = 300_000)]
    lookups: usize,
    /// The ledger's page cache, in MiB (`ordo serve --ledger-cache-mib`).
    #[arg(long, default_value_t = 256)]
    cache_mib: u64,
    /// Markdown file to record the table in.
    #[arg(long, default_value = "BENCHMARKS.md")]
    output: PathBuf,
}

/// Flushes timed per ledger size.
const FLUSHES: usize = 50;

fn record(i: u64) -> DedupRecord {
    DedupRecord {
        offset: i,
        partition: (i % 16) as u32,
        version: 1,
        payload_hash: [(i % 251) as u8; 16],
        committed_at_ms: 1_700_000_000_000 + i,
        outcome: DedupOutcome::Committed,
    }
}

fn idem(i: u64) -> String {
    format!("order-{i:012}/payment")
}

/// One ledger size's measurements (times in µs unless named otherwise).
struct Row {
    size: u64,
    /// Hit on any recorded key: (p50, p99).
    hit: (f64, f64),
    /// Miss: (p50, p99).
    miss: (f64, f64),
    /// Hit on one of the last 10,000 keys recorded: p99.
    recent_p99: f64,
    bytes_per_key: f64,
    open_secs: f64,
    fill_secs: f64,
    index_bytes_per_key: f64,
    flush_p50_ms: f64,
}

fn pct(samples: &mut [Duration], p: f64) -> f64 {
    samples.sort_unstable();
    let i = ((samples.len().saturating_sub(1)) as f64 * p) as usize;
    samples.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
}

/// Runs the dedup benchmark.
pub fn run(args: DedupArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir_in(".")?;
    let cache_mib = args.cache_mib.max(16);
    let cache_bytes = cache_mib << 20;
    let mut ledger = Ledger::open_with_cache(dir.path(), cache_bytes)?;
    let mut sizes = Vec::new();
    let mut n = 10_000u64;
    while n <= args.max_keys.max(10_000) {
        sizes.push(n);
        n *= 10;
    }
    let total = *sizes.last().unwrap_or(&10_000);
    let bar = indicatif::ProgressBar::new(total);
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut rows = Vec::new();
    let mut written = 0u64;
    for &size in &sizes {
        while written < size {
            let upto = (written + 10_000).min(size);
            let batch = CommitBatch {
                dedup: (written..upto)
                    .map(|i| ("counter".to_string(), idem(i), record(i)))
                    .collect(),
                ..CommitBatch::default()
            };
            ledger.commit(&batch)?;
            written = upto;
            bar.set_position(written);
        }
        ledger.flush()?;
        // Reopening fills the idempotency index from the ledger in the
        // background: how long until lookups are answered.
        drop(ledger);
        let t = Instant::now();
        ledger = Ledger::open_with_cache(dir.path(), cache_bytes)?;
        let open_secs = t.elapsed().as_secs_f64();
        while !ledger.dedup_index_filled() {
            std::thread::sleep(Duration::from_millis(1));
        }
        let fill_secs = t.elapsed().as_secs_f64();
        let mut hits = Vec::with_capacity(args.lookups / 2);
        let mut misses = Vec::with_capacity(args.lookups / 2);
        let mut recent = Vec::with_capacity(args.lookups / 2);
        for _ in 0..args.lookups / 2 {
            // A producer's retry: one of the last 10,000 keys recorded.
            let k = idem(size - 1 - rng.gen_range(0..size.min(10_000)));
            let t = Instant::now();
            let found = ledger.dedup_get("counter", &k)?;
            recent.push(t.elapsed());
            anyhow::ensure!(found.is_some(), "recorded key {k} not found");
            let k = idem(rng.gen_range(0..size));
            let t = Instant::now();
            let found = ledger.dedup_get("counter", &k)?;
            hits.push(t.elapsed());
            anyhow::ensure!(found.is_some(), "recorded key {k} not found");
            let k = idem(size + rng.gen_range(0..size));
            let t = Instant::now();
            let found = ledger.dedup_get("counter", &k)?;
            misses.push(t.elapsed());
            anyhow::ensure!(found.is_none(), "unrecorded key {k} found");
        }
        let bytes = ledger.size_on_disk()?;
        let index_bytes = ledger.dedup_index_bytes();
        // What a group flush costs at this size: one record committed,
        // then flushed (sled's flush and the data file's sync). Measured
        // after the sizes above, so its records do not count in them.
        let mut flushes = Vec::with_capacity(FLUSHES);
        for i in 0..FLUSHES as u64 {
            let batch = CommitBatch {
                dedup: vec![(
                    "counter".to_string(),
                    format!("flush-{size}-{i}"),
                    record(i),
                )],
                ..CommitBatch::default()
            };
            ledger.commit(&batch)?;
            let t = Instant::now();
            ledger.flush()?;
            flushes.push(t.elapsed());
        }
        rows.push(Row {
            size,
            hit: (pct(&mut hits, 0.5), pct(&mut hits, 0.99)),
            miss: (pct(&mut misses, 0.5), pct(&mut misses, 0.99)),
            recent_p99: pct(&mut recent, 0.99),
            bytes_per_key: bytes as f64 / size as f64,
            open_secs,
            fill_secs,
            index_bytes_per_key: index_bytes as f64 / size as f64,
            flush_p50_ms: pct(&mut flushes, 0.5) / 1e3,
        });
    }
    bar.finish_and_clear();
    let mut table = String::from(
        "| recorded keys | hit p50 | hit p99 | miss p50 | miss p99 | recent hit p99 | ledger bytes per key | index bytes per key (memory) | ledger open | index filled after | flush p50 |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in &rows {
        table.push_str(&format!(
            "| {} | {:.1} µs | {:.1} µs | {:.1} µs | {:.1} µs | {:.1} µs | {:.0} | {:.0} | {:.2} s | {:.2} s | {:.2} ms |\n",
            r.size,
            r.hit.0,
            r.hit.1,
            r.miss.0,
            r.miss.1,
            r.recent_p99,
            r.bytes_per_key,
            r.index_bytes_per_key,
            r.open_secs,
            r.fill_secs,
            r.flush_p50_ms,
        ));
    }
    if let (Some(first), Some(last)) = (rows.first(), rows.last()) {
        table.push_str(&format!(
            "\nHit p99 grows {:.2}× from {} to {} keys (a hit on one of the last 10,000 keys: {:.2}×).\n",
            last.hit.1 / first.hit.1.max(0.001),
            first.size,
            last.size,
            last.recent_p99 / first.recent_p99.max(0.001),
        ));
    }
    println!("{table}");
    let body = format!(
        "## Dedup lookup as the ledger grows\n\n{}; sled with a {} MiB cache; keys like `order-000000123456/payment`, \
         records written through `Ledger::commit` in batches of 10,000 (segments of 256) and flushed; each lookup is one \
         `Ledger::dedup_get` (decode included), {} of each kind per size, taking turns: a hit on any recorded key, a miss, and a recent hit (one of the \
         last 10,000 keys recorded, as a producer's retry is), after the ledger was closed, reopened and its idempotency index \
         filled (in the background; lookups wait for it). Ledger bytes per key is the whole \
         ledger's size on disk over the key count; index bytes per key is the in-memory index's. \
         Flush p50: {FLUSHES} flushes of one committed record each (sled's flush and the data file's sync).\n\
         Reproduce: `cargo run --release -- bench dedup --cache-mib {}`.\n\n{table}",
        super::machine_summary(),
        cache_mib,
        args.lookups / 2,
        cache_mib,
    );
    super::record_section(&args.output, "dedup", &body)?;
    Ok(())
}
