//! Sandbox micro-benchmark: what running one message in a fresh, limited
//! instance costs, separate from the ledger and the network.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;

use crate::runtime::{HandlerLimits, HandlerModule, MemoryState, Message, Runtime, RuntimeConfig};

/// Options of `ordo bench sandbox`.
#[derive(Debug, Args)]
pub struct SandboxArgs {
    /// Directory holding `noop.wasm`, `counter.wasm` and their
    /// `-wasip2` builds (built by scripts/build-guests.sh).
    #[arg(long, default_value = "target/handlers")]
    handlers_dir: PathBuf,
    /// Calls per case.
    #[arg(long, default_value_t = 20_000)]
    iterations: usize,
    /// Markdown file to record the table in.
    #[arg(long, default_value = "BENCHMARKS.md")]
    output: PathBuf,
}

struct Row {
    case: &'static str,
    samples: Vec<Duration>,
    /// Calls whose instance's memory grew past its initial size.
    grew: usize,
}

impl Row {
    fn pct(&self, p: f64) -> f64 {
        let mut s = self.samples.clone();
        s.sort();
        let idx = ((s.len() as f64 - 1.0) * p).round() as usize;
        s.get(idx).map(|d| d.as_secs_f64() * 1e6).unwrap_or(0.0)
    }

    fn mean(&self) -> f64 {
        let total: Duration = self.samples.iter().sum();
        total.as_secs_f64() * 1e6 / self.samples.len().max(1) as f64
    }
}

fn message(payload: Vec<u8>) -> Message {
    Message {
        topic: "bench".into(),
        partition_key: "key".into(),
        idempotency_key: "id".into(),
        offset: 0,
        payload,
        headers: vec![],
        attempt: 1,
    }
}

fn load(runtime: &Runtime, dir: &std::path::Path, name: &str) -> anyhow::Result<HandlerModule> {
    let bytes = super::handler_bytes(dir, name)?;
    Ok(runtime.load(&bytes, HandlerLimits::default())?)
}

/// Runs `warm` and then `n` messages, each in a fresh instance, adding the
/// `n` to `row`. The unrecorded ones let the pool's slots settle on the
/// module after another case's (the reaper holds up to 16 used stores).
fn fresh(
    row: &mut Row,
    module: &HandlerModule,
    msg: &Message,
    warm: usize,
    n: usize,
) -> anyhow::Result<()> {
    let mut state: Box<dyn crate::runtime::StateAccess> = Box::new(MemoryState::default());
    for i in 0..warm + n {
        let start = Instant::now();
        let (inv, s) = module.invoke(msg, state);
        let elapsed = start.elapsed();
        state = s;
        if let Err(f) = inv.outcome {
            anyhow::bail!("benchmark handler failed ({}): {f}", row.case);
        }
        if i >= warm {
            row.samples.push(elapsed);
            row.grew += usize::from(inv.memory_grew);
        }
    }
    Ok(())
}

/// Rounds each case's calls are split into, the cases taking turns, so
/// that a slow spell of a shared machine falls on every case alike.
const ROUNDS: usize = 20;

/// Runs the sandbox benchmark and records it.
pub fn run(args: SandboxArgs) -> anyhow::Result<()> {
    let runtime = Runtime::new(RuntimeConfig::default())?;
    let noop = load(&runtime, &args.handlers_dir, "noop")?;
    let counter = load(&runtime, &args.handlers_dir, "counter")?;
    let noop_wasip2 = load(&runtime, &args.handlers_dir, "noop-wasip2")?;
    let counter_wasip2 = load(&runtime, &args.handlers_dir, "counter-wasip2")?;
    let n = args.iterations.max(ROUNDS * 5);
    let empty = message(b"{}".to_vec());
    let kib = message(vec![b'x'; 1024]);
    let big = message(vec![b'x'; 64 << 10]);
    let counter_msg = message(br#"{"seq":1}"#.to_vec());

    // `None`: warm calls of the no-op (one instance, reused).
    let cases: [(&'static str, Option<&HandlerModule>, &Message); 8] = [
        ("warm call, no-op handler (instance reused)", None, &empty),
        ("fresh instance + call, no-op handler", Some(&noop), &empty),
        (
            "fresh instance + call, no-op, 1 KiB payload",
            Some(&noop),
            &kib,
        ),
        (
            "fresh instance + call, no-op, 64 KiB payload",
            Some(&noop),
            &big,
        ),
        (
            "fresh instance + call, counter handler",
            Some(&counter),
            &counter_msg,
        ),
        (
            "fresh instance + call, no-op built for wasm32-wasip2",
            Some(&noop_wasip2),
            &empty,
        ),
        (
            "fresh instance + call, no-op built for wasm32-wasip2, 64 KiB payload",
            Some(&noop_wasip2),
            &big,
        ),
        (
            "fresh instance + call, counter built for wasm32-wasip2",
            Some(&counter_wasip2),
            &counter_msg,
        ),
    ];
    let mut rows: Vec<Row> = cases
        .iter()
        .map(|(case, _, _)| Row {
            case,
            samples: Vec::with_capacity(n),
            grew: 0,
        })
        .collect();

    // Warm-up: page in code, fill the pool's warm slots.
    for (row, (_, module, msg)) in rows.iter_mut().zip(&cases) {
        if let Some(module) = module {
            fresh(row, module, msg, 500, 0)?;
        }
    }
    let per_round = n / ROUNDS;
    for _ in 0..ROUNDS {
        for (row, (_, module, msg)) in rows.iter_mut().zip(&cases) {
            match module {
                Some(module) => fresh(row, module, msg, 50, per_round)?,
                None => row.samples.extend(noop.bench_warm_calls(msg, per_round)?),
            }
        }
    }

    let mut table = String::from(
        "| case | mean µs | p50 µs | p99 µs | memory grew |\n|---|---:|---:|---:|---:|\n",
    );
    for r in &rows {
        table.push_str(&format!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.0} % |\n",
            r.case,
            r.mean(),
            r.pct(0.5),
            r.pct(0.99),
            100.0 * r.grew as f64 / r.samples.len().max(1) as f64
        ));
    }
    println!("{table}");
    let body = format!(
        "## Sandbox cost per message\n\n{}; {} calls per case in {ROUNDS} rounds (the cases \
         take turns), pooling allocator, \
         1 s epoch deadline, 64 MiB memory limit. The handlers are Rust, built for \
         `wasm32-unknown-unknown` (no WASI imports) unless the case says \
         `wasm32-wasip2`; memory grew: the share of calls whose instance grew \
         its memory past its initial size.\nReproduce: `scripts/build-guests.sh && \
         cargo run --release -- bench sandbox`.\n\n{table}",
        super::machine_summary(),
        per_round * ROUNDS
    );
    super::record_section(&args.output, "sandbox", &body)?;
    println!("recorded in {}", args.output.display());
    Ok(())
}
