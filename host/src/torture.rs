//! `ordo torture`: the crash-safety proof, run against the real binary.
//!
//! It starts `ordo serve` (this executable) on a temporary data dir, deploys
//! the `counter` handler on one topic, the `bank` handler on another and a
//! hostile `counter` (messages that trap, exhaust memory or spin past the
//! deadline) on a third, and runs two things at once:
//!
//! - a **producer** that sends per-key sequences (`{"seq": n}`) and bank
//!   commands over HTTP, about 10 % of them twice, retrying every batch until
//!   it is acknowledged, plus malformed requests that must be refused;
//! - a **killer** that ends every host process it starts: alternately by
//!   SIGKILL after a random delay, and by arming a named crash point
//!   (`ORDO_CRASH_AT=<point>:<nth>`, see [`crate::crash`]) with a random `nth`.
//!
//! After every restart the [`checker`](classify) reads the ledger's state
//! over HTTP. A counter key's `seqs` must always be a clean prefix `1..=n` of
//! what was produced for it; anything else is classified as lost (prefix,
//! middle, or — after the final drain — suffix), duplicated, reordered,
//! skipped (dead-lettered instead of applied) or foreign (never produced).
//! Every bank account that receives producer commands must hold exactly the
//! result of a prefix of its commands, and money is conserved: deposits −
//! withdrawals = sum of balances + transfers in flight (withdrawn from one
//! account, not yet credited to the other), with nothing in flight after the
//! drain. At the end the host is stopped and `ordo ledger check` runs.
//!
//! ```sh
//! scripts/build-guests.sh && cargo build --release
//! target/release/ordo torture --kills 100                 # CI mode
//! target/release/ordo torture --kills 2000 --record RELIABILITY.md
//! ```
//!
//! A failed run keeps its data dir and host log and prints their paths and
//! the seed. Pitfall: the host's state reads see a commit before its flush,
//! so a value read just before a SIGKILL may be rolled back and redone; the
//! checker counts that (`rolled back reads`) and does not call it a loss —
//! nothing was acknowledged on the strength of it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::cli::client::Client;

/// The crash points a torture run arms, in rotation. `mid-replay` needs a
/// dead-letter replay and `mid-outbox-relay` a JetStream topic; the crash
/// tests cover those two.
pub const TORTURE_POINTS: &[&str] = &[
    "after-commit-before-flush",
    "after-append-before-flush",
    "after-flush-before-ack",
    "mid-batch",
    "mid-deploy",
    "mid-commit",
];

const COUNTER_TOPIC: &str = "torture-counter";
const BANK_TOPIC: &str = "torture-bank";
const HOSTILE_TOPIC: &str = "torture-hostile";
/// Sequence numbers per counter key before the key is retired for a fresh
/// one (keeps each key's `seqs` state small in long runs).
const PER_KEY: u64 = 200;

/// Options of `ordo torture`.
#[derive(Debug, Args, Clone)]
pub struct TortureArgs {
    /// Host processes to end (SIGKILL or crash point) before the final drain.
    #[arg(long, default_value_t = 100)]
    pub kills: u64,
    /// Stop killing after this many seconds even if `--kills` is not reached
    /// (the run then fails: fewer kills than asked).
    #[arg(long, value_name = "SECS")]
    pub duration: Option<u64>,
    /// Seed of every random choice (producer, killer).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Write the figures as a Markdown table into this file (the section
    /// between `<!-- torture:begin -->` and `<!-- torture:end -->`, or a new
    /// file).
    #[arg(long, value_name = "FILE")]
    pub record: Option<PathBuf>,
    /// The counter handler component.
    #[arg(long, default_value = "target/handlers/counter.wasm")]
    pub counter: PathBuf,
    /// The bank handler component.
    #[arg(long, default_value = "target/handlers/bank.wasm")]
    pub bank: PathBuf,
    /// Shortest life of a host before its SIGKILL, ms.
    #[arg(long, default_value_t = 30)]
    pub min_life_ms: u64,
    /// Longest life of a host before its SIGKILL, ms.
    #[arg(long, default_value_t = 400)]
    pub max_life_ms: u64,
    /// How long an armed host may run before the crash point is given up
    /// and the host is SIGKILLed instead, ms.
    #[arg(long, default_value_t = 3_000)]
    pub arm_timeout_ms: u64,
    /// Counter keys produced to at once.
    #[arg(long, default_value_t = 24)]
    pub keys: usize,
    /// Bank accounts that receive commands (plus a quarter as many that
    /// only receive transfers).
    #[arg(long, default_value_t = 12)]
    pub accounts: usize,
    /// Producer pause between rounds (a round: 32 counter messages, 8 bank
    /// commands), ms.
    #[arg(long, default_value_t = 40)]
    pub produce_pause_ms: u64,
    /// Partitions of the host (`ordo serve --partitions`).
    #[arg(long, default_value_t = 4)]
    pub partitions: u32,
    /// Messages one sandbox instance may run within a lane batch (the
    /// handlers' `messages_per_instance`; 1, the default, is a fresh
    /// instance per message).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub messages_per_instance: u32,
    /// Keep the data dir and host log even when the run passes.
    #[arg(long)]
    pub keep: bool,
}

// ---------------------------------------------------------------- checker

/// What the checker found for one key (or summed over keys). Each field
/// counts messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Findings {
    /// Missing before the first applied message of the key.
    pub lost_prefix: u64,
    /// Missing between applied messages.
    pub lost_middle: u64,
    /// Acknowledged, missing after the last applied one once drained.
    pub lost_suffix: u64,
    /// Applied more than once (extra applications).
    pub duplicated: u64,
    /// Applied after a later message of the same key.
    pub reordered: u64,
    /// Missing because the host dead-lettered it instead of applying it.
    pub skipped: u64,
    /// Applied although never produced.
    pub foreign: u64,
}

impl Findings {
    /// Messages lost in any position.
    pub fn lost(&self) -> u64 {
        self.lost_prefix + self.lost_middle + self.lost_suffix
    }

    /// Nothing wrong.
    pub fn is_clean(&self) -> bool {
        *self == Findings::default()
    }

    fn add(&mut self, o: &Findings) {
        self.lost_prefix += o.lost_prefix;
        self.lost_middle += o.lost_middle;
        self.lost_suffix += o.lost_suffix;
        self.duplicated += o.duplicated;
        self.reordered += o.reordered;
        self.skipped += o.skipped;
        self.foreign += o.foreign;
    }
}

impl std::fmt::Display for Findings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "lost {} (prefix {}, middle {}, suffix {}), duplicated {}, reordered {}, skipped {}, foreign {}",
            self.lost(),
            self.lost_prefix,
            self.lost_middle,
            self.lost_suffix,
            self.duplicated,
            self.reordered,
            self.skipped,
            self.foreign
        )
    }
}

/// Classifies the sequence numbers a key's state shows as applied
/// (`observed`, in application order) against what was produced: `sent`
/// (sequence numbers `1..=sent` were sent, in order), `acked` (`1..=acked`
/// were acknowledged), `dead_lettered` (sequence numbers the host reports
/// as dead letters). While the host may still be working (`drained` false)
/// a missing tail is pending, not lost; once drained every acknowledged
/// message must be there.
///
/// A producer sends a key's messages in order and retries a batch until it
/// is acknowledged before the next, so any message below the highest one
/// applied was durably in the log before it: missing it is a loss.
pub fn classify(
    observed: &[u64],
    sent: u64,
    acked: u64,
    dead_lettered: &BTreeSet<u64>,
    drained: bool,
) -> Findings {
    let mut f = Findings::default();
    let mut seen = BTreeSet::new();
    let mut high = 0u64;
    for &v in observed {
        if v == 0 || v > sent {
            f.foreign += 1;
            continue;
        }
        if !seen.insert(v) {
            f.duplicated += 1;
            continue;
        }
        if v < high {
            f.reordered += 1;
        }
        high = high.max(v);
    }
    let low = seen.first().copied().unwrap_or(u64::MAX);
    for v in 1..high {
        if seen.contains(&v) {
            continue;
        }
        if dead_lettered.contains(&v) {
            f.skipped += 1;
        } else if v < low {
            f.lost_prefix += 1;
        } else {
            f.lost_middle += 1;
        }
    }
    if drained {
        for v in high + 1..=acked {
            if dead_lettered.contains(&v) {
                f.skipped += 1;
            } else if high == 0 {
                f.lost_prefix += 1;
            } else {
                f.lost_suffix += 1;
            }
        }
    }
    f
}

/// Parses a counter's `seqs` state (`1,2,3`). Anything unparsable is an
/// error: the checker must not guess.
pub fn parse_seqs(text: &str) -> anyhow::Result<Vec<u64>> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    text.split(',')
        .map(|s| {
            s.parse::<u64>()
                .with_context(|| format!("state `seqs` has a non-number {s:?}: {text:?}"))
        })
        .collect()
}

// ---------------------------------------------------------------- model

#[derive(Debug)]
struct CounterKey {
    name: String,
    sent: u64,
    acked: u64,
    /// Longest clean prefix the checker has seen.
    seen_prefix: u64,
}

#[derive(Debug, Clone, Copy)]
enum BankOp {
    Deposit(i64),
    Withdraw(i64),
    Transfer(i64, usize),
}

/// The result of the first `n` commands of a source account.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct AccountFold {
    balance: i64,
    deposits: u64,
    withdrawals: u64,
    transfers_out: u64,
    deposited: i64,
    withdrawn: i64,
    transferred: i64,
}

#[derive(Debug, Default)]
struct SourceAccount {
    /// `folds[n]` = state after the first `n` commands.
    folds: Vec<AccountFold>,
    sent: usize,
    acked: usize,
}

/// What the producer has sent and had acknowledged: the checker's truth.
#[derive(Debug, Default)]
struct Model {
    keys: Vec<CounterKey>,
    /// Indices into `keys` currently produced to.
    live: Vec<usize>,
    /// Keys retired since the last check (checked once more mid-run).
    retired: Vec<usize>,
    sources: Vec<SourceAccount>,
    sinks: usize,
    hostile_sent: BTreeSet<String>,
    hostile_acked: BTreeSet<String>,
    messages_acked: u64,
    duplicates_sent: u64,
    batches_retried: u64,
    inputs_tried: u64,
    inputs_refused: u64,
    inputs_accepted: Vec<String>,
}

fn lock(model: &Mutex<Model>) -> MutexGuard<'_, Model> {
    // A poisoned lock means a harness task panicked; its data is still the
    // best record there is.
    model.lock().unwrap_or_else(|p| p.into_inner())
}

fn source_name(i: usize) -> String {
    format!("src-{i}")
}

fn sink_name(i: usize) -> String {
    format!("sink-{i}")
}

// ---------------------------------------------------------------- host

struct Host {
    exe: PathBuf,
    data_dir: PathBuf,
    log: PathBuf,
    port: u16,
    partitions: u32,
    /// `ordo.toml` of the host (its handlers' default limits), if any.
    config: Option<PathBuf>,
    child: Option<Child>,
}

impl Host {
    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts a host, armed at `crash_at` if given, and waits until it is
    /// healthy. `Ok(false)`: it ended by itself while starting (a crash point).
    async fn start(
        &mut self,
        crash_at: Option<&str>,
        http: &reqwest::Client,
    ) -> anyhow::Result<bool> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening host log {}", self.log.display()))?;
        let mut cmd = Command::new(&self.exe);
        cmd.args(["serve", "--data-dir"])
            .arg(&self.data_dir)
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .args(["--partitions", &self.partitions.to_string()]);
        if let Some(config) = &self.config {
            cmd.arg("--config").arg(config);
        }
        cmd.env(
            "ORDO_LOG",
            std::env::var("ORDO_TORTURE_HOST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .env_remove("ORDO_CRASH_AT")
        .env_remove("ORDO_ADMIN_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
        if let Some(point) = crash_at {
            cmd.env("ORDO_CRASH_AT", point);
        }
        self.child = Some(cmd.spawn().context("starting ordo serve")?);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.exited()? {
                return Ok(false);
            }
            if let Ok(r) = http.get(format!("{}/healthz", self.base())).send().await {
                if r.status().is_success() {
                    return Ok(true);
                }
            }
            if Instant::now() > deadline {
                bail!("the host did not become healthy within 60 s after a restart");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Whether the process has ended by itself.
    fn exited(&mut self) -> anyhow::Result<bool> {
        match self.child.as_mut() {
            None => Ok(true),
            Some(c) => match c.try_wait().context("waiting for ordo serve")? {
                Some(_) => {
                    self.child = None;
                    Ok(true)
                }
                None => Ok(false),
            },
        }
    }

    /// Waits up to `timeout` for the process to end by itself.
    async fn wait_exited(&mut self, timeout: Duration) -> anyhow::Result<bool> {
        let until = Instant::now() + timeout;
        loop {
            if self.exited()? {
                return Ok(true);
            }
            if Instant::now() >= until {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn sigkill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let status = c.wait().context("waiting for ordo serve")?;
            if !status.success() {
                bail!("ordo serve exited with {status} on SIGTERM");
            }
        }
        Ok(())
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.sigkill();
    }
}

// ---------------------------------------------------------------- producer

/// Posts `body` until the host acknowledges it. `Ok(retries)`.
async fn post_until_acked(
    http: &reqwest::Client,
    base: &str,
    topic: &str,
    body: &Value,
    stop_hard: &AtomicBool,
) -> anyhow::Result<u64> {
    let mut retries = 0u64;
    loop {
        let sent = http
            .post(format!("{base}/v1/topics/{topic}/messages"))
            .json(body)
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => return Ok(retries),
            Ok(r) if r.status().is_client_error() => {
                let text = r.text().await.unwrap_or_default();
                bail!("the host refused a valid batch for {topic}: {text}");
            }
            _ => {
                if stop_hard.load(Ordering::SeqCst) {
                    bail!("gave up producing: the run was aborted");
                }
                retries += 1;
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        }
    }
}

/// Malformed producer requests; each must be refused with a 4xx.
fn malformed_inputs() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("not JSON", b"{\"key\": \"k\", \"payload\": ".to_vec()),
        ("a number", b"42".to_vec()),
        ("empty batch", b"[]".to_vec()),
        ("missing key", br#"{"payload": "{}"}"#.to_vec()),
        (
            "key not a string",
            br#"{"key": 7, "payload": "{}"}"#.to_vec(),
        ),
        (
            "bad base64",
            br#"{"key": "k", "payload_base64": "%%%"}"#.to_vec(),
        ),
        ("empty key", br#"{"key": "", "payload": "{}"}"#.to_vec()),
        (
            "headers not strings",
            br#"{"key": "k", "payload": "{}", "headers": {"a": 1}}"#.to_vec(),
        ),
        ("invalid UTF-8", vec![b'{', 0xff, 0xfe, b'}']),
        (
            "oversized",
            format!(r#"{{"key": "k", "payload": "{}"}}"#, "x".repeat(2 << 20)).into_bytes(),
        ),
    ]
}

struct Producer {
    model: Arc<Mutex<Model>>,
    base: String,
    rng: StdRng,
    http: reqwest::Client,
    keys: usize,
    pause: Duration,
    /// Duplicates held back to be sent in a later batch.
    late: Vec<Value>,
    round: u64,
}

impl Producer {
    fn counter_batch(&mut self) -> (Value, Vec<(usize, u64)>) {
        let mut m = lock(&self.model);
        let mut batch: Vec<Value> = std::mem::take(&mut self.late);
        let mut last = Vec::new();
        for _ in 0..32 {
            let slot = self.rng.gen_range(0..self.keys);
            let idx = m.live[slot];
            if m.keys[idx].sent >= PER_KEY {
                let fresh = m.keys.len();
                m.keys.push(CounterKey {
                    name: format!("c{fresh}"),
                    sent: 0,
                    acked: 0,
                    seen_prefix: 0,
                });
                m.live[slot] = fresh;
                m.retired.push(idx);
                continue;
            }
            let key = &mut m.keys[idx];
            key.sent += 1;
            let msg = json!({"key": key.name, "idempotency_key": format!("{}/{}", key.name, key.sent),
                             "payload": json!({"seq": key.sent}).to_string()});
            last.retain(|(i, _)| *i != idx);
            last.push((idx, key.sent));
            if self.rng.gen_bool(0.1) {
                m.duplicates_sent += 1;
                if self.rng.gen_bool(0.5) {
                    batch.push(msg.clone());
                } else {
                    self.late.push(msg.clone());
                }
            }
            batch.push(msg);
        }
        (Value::Array(batch), last)
    }

    fn bank_batch(&mut self) -> (Value, Vec<(usize, usize)>) {
        let mut m = lock(&self.model);
        let sinks = m.sinks;
        let mut batch = Vec::new();
        let mut last = Vec::new();
        for _ in 0..8 {
            let a = self.rng.gen_range(0..m.sources.len());
            let acct = &mut m.sources[a];
            let cur = acct.folds.last().copied().unwrap_or_default();
            let op = if cur.balance < 20 || self.rng.gen_bool(0.3) {
                BankOp::Deposit(self.rng.gen_range(50..500))
            } else if self.rng.gen_bool(0.5) {
                BankOp::Transfer(
                    self.rng.gen_range(1..=cur.balance / 2),
                    self.rng.gen_range(0..sinks),
                )
            } else {
                BankOp::Withdraw(self.rng.gen_range(1..=cur.balance / 2))
            };
            let mut next = cur;
            let command = match op {
                BankOp::Deposit(x) => {
                    next.balance += x;
                    next.deposits += 1;
                    next.deposited += x;
                    json!({"op": "deposit", "amount": x})
                }
                BankOp::Withdraw(x) => {
                    next.balance -= x;
                    next.withdrawals += 1;
                    next.withdrawn += x;
                    json!({"op": "withdraw", "amount": x})
                }
                BankOp::Transfer(x, to) => {
                    next.balance -= x;
                    next.transfers_out += 1;
                    next.transferred += x;
                    json!({"op": "transfer", "amount": x, "to": sink_name(to)})
                }
            };
            acct.folds.push(next);
            acct.sent += 1;
            let msg = json!({"key": source_name(a), "idempotency_key": format!("{}/{}", source_name(a), acct.sent),
                             "payload": command.to_string()});
            last.retain(|(i, _)| *i != a);
            last.push((a, acct.sent));
            if self.rng.gen_bool(0.1) {
                m.duplicates_sent += 1;
                batch.push(msg.clone());
            }
            batch.push(msg);
        }
        (Value::Array(batch), last)
    }

    fn hostile_message(&mut self) -> (Value, String) {
        let n = self.round;
        let kind = match self.rng.gen_range(0..10) {
            0 => "spin",
            1..=4 => "bomb",
            _ => "trap",
        };
        let id = format!("h/{n}");
        (
            json!({"key": format!("h{}", n % 4), "idempotency_key": id,
                   "payload": json!({"seq": n, "fail": kind}).to_string()}),
            id,
        )
    }

    async fn run(mut self, stop: Arc<AtomicBool>, abort: Arc<AtomicBool>) -> anyhow::Result<()> {
        let inputs = malformed_inputs();
        while !stop.load(Ordering::SeqCst) {
            self.round += 1;
            let (body, last) = self.counter_batch();
            let n = body.as_array().map_or(0, Vec::len) as u64;
            let retries =
                post_until_acked(&self.http, &self.base, COUNTER_TOPIC, &body, &abort).await?;
            {
                let mut m = lock(&self.model);
                m.batches_retried += retries;
                m.messages_acked += n;
                for (idx, seq) in last {
                    m.keys[idx].acked = m.keys[idx].acked.max(seq);
                }
            }
            let (body, last) = self.bank_batch();
            let n = body.as_array().map_or(0, Vec::len) as u64;
            let retries =
                post_until_acked(&self.http, &self.base, BANK_TOPIC, &body, &abort).await?;
            {
                let mut m = lock(&self.model);
                m.batches_retried += retries;
                m.messages_acked += n;
                for (a, c) in last {
                    m.sources[a].acked = m.sources[a].acked.max(c);
                }
            }
            if self.round % 25 == 0 {
                let (msg, id) = self.hostile_message();
                lock(&self.model).hostile_sent.insert(id.clone());
                post_until_acked(&self.http, &self.base, HOSTILE_TOPIC, &msg, &abort).await?;
                lock(&self.model).hostile_acked.insert(id);
            }
            if self.round % 10 == 0 {
                let (what, body) = &inputs[(self.round / 10) as usize % inputs.len()];
                let answer = self
                    .http
                    .post(format!("{}/v1/topics/{COUNTER_TOPIC}/messages", self.base))
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await;
                // A host killed meanwhile answers nothing: not a try.
                if let Ok(r) = answer {
                    let mut m = lock(&self.model);
                    m.inputs_tried += 1;
                    if r.status().is_client_error() {
                        m.inputs_refused += 1;
                    } else {
                        m.inputs_accepted.push(format!("{what}: {}", r.status()));
                    }
                }
            }
            tokio::time::sleep(self.pause).await;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- checks

/// Totals over a run.
#[derive(Debug, Default)]
struct Tally {
    kills: u64,
    sigkills: u64,
    crash_points: BTreeMap<&'static str, u64>,
    armed_not_reached: u64,
    restarts: u64,
    crashed_while_starting: u64,
    checks: u64,
    checks_interrupted: u64,
    findings: Findings,
    rolled_back_reads: u64,
    bank_violations: Vec<String>,
    examples: Vec<String>,
}

impl Tally {
    fn note(&mut self, what: String) {
        if self.examples.len() < 20 {
            self.examples.push(what);
        }
    }
}

async fn get_state(
    http: &reqwest::Client,
    base: &str,
    handler: &str,
    key: &str,
    state_key: &str,
) -> anyhow::Result<Option<Vec<u8>>> {
    let r = http
        .get(format!(
            "{base}/v1/handlers/{handler}/state/{key}/{state_key}"
        ))
        .send()
        .await
        .context("reading state")?;
    if r.status() == reqwest::StatusCode::NOT_FOUND {
        return Ok(None);
    }
    if !r.status().is_success() {
        bail!(
            "state {handler}/{key}/{state_key}: host answered {}",
            r.status()
        );
    }
    Ok(Some(r.bytes().await.context("reading state")?.to_vec()))
}

#[derive(serde::Deserialize, Default, Debug, Clone, Copy)]
struct AccountState {
    balance: i64,
    deposits: u64,
    withdrawals: u64,
    transfers_out: u64,
}

async fn account(http: &reqwest::Client, base: &str, name: &str) -> anyhow::Result<AccountState> {
    match get_state(http, base, "bank", name, "account").await? {
        None => Ok(AccountState::default()),
        Some(b) => serde_json::from_slice(&b).with_context(|| {
            format!(
                "account {name}: state is not the bank's JSON: {}",
                String::from_utf8_lossy(&b)
            )
        }),
    }
}

/// Dead-lettered sequence numbers per key of `handler` (from idempotency
/// keys `<key>/<seq>`), and the idempotency keys themselves.
async fn dead_letters(
    http: &reqwest::Client,
    base: &str,
    handler: &str,
) -> anyhow::Result<(BTreeMap<String, BTreeSet<u64>>, Vec<String>)> {
    let v: Value = http
        .get(format!("{base}/v1/dlq?handler={handler}&limit=1000000"))
        .send()
        .await
        .context("listing dead letters")?
        .json()
        .await
        .context("dead-letter list is not JSON")?;
    let mut per_key: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    let mut ids = Vec::new();
    for e in v["entries"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let id = e["idempotency_key"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if let Some((key, seq)) = id.rsplit_once('/') {
            if let Ok(seq) = seq.parse() {
                per_key.entry(key.to_string()).or_default().insert(seq);
            }
        }
        ids.push(id);
    }
    Ok((per_key, ids))
}

/// One pass of the checker over the counter keys and the bank.
async fn check(
    http: &reqwest::Client,
    base: &str,
    model: &Mutex<Model>,
    tally: &mut Tally,
    drained: bool,
) -> anyhow::Result<()> {
    // Which keys to read: mid-run the live ones and those retired since
    // the last pass; after the drain all of them.
    let (targets, no_dl): (Vec<(usize, String)>, BTreeSet<u64>) = {
        let mut m = lock(model);
        let mut idx: Vec<usize> = if drained {
            (0..m.keys.len()).collect()
        } else {
            let mut v = m.live.clone();
            v.append(&mut m.retired);
            v
        };
        idx.sort_unstable();
        idx.dedup();
        (
            idx.into_iter()
                .map(|i| (i, m.keys[i].name.clone()))
                .collect(),
            BTreeSet::new(),
        )
    };
    let dlq = if drained {
        dead_letters(http, base, "counter").await?.0
    } else {
        BTreeMap::new()
    };
    let mut pass = Findings::default();
    for (i, name) in targets {
        let observed = match get_state(http, base, "counter", &name, "seqs").await? {
            None => Vec::new(),
            Some(b) => parse_seqs(&String::from_utf8_lossy(&b))?,
        };
        let mut m = lock(model);
        let key = &mut m.keys[i];
        let dl = dlq.get(&name).unwrap_or(&no_dl);
        let f = classify(&observed, key.sent, key.acked, dl, drained);
        if !f.is_clean() {
            let shown: Vec<String> = observed.iter().take(40).map(u64::to_string).collect();
            tally.note(format!(
                "counter key {name}: {f}; sent {}, acked {}, state seqs [{}{}]",
                key.sent,
                key.acked,
                shown.join(","),
                if observed.len() > 40 { ",…" } else { "" }
            ));
        }
        let prefix = observed.len() as u64;
        if f.is_clean() && prefix < key.seen_prefix {
            tally.rolled_back_reads += 1;
        }
        if f.is_clean() {
            key.seen_prefix = prefix;
        }
        pass.add(&f);
    }
    tally.findings.add(&pass);

    // Bank: read the sinks first, then the sources: a credit seen in a sink
    // comes from a transfer committed earlier, which the later source read
    // includes.
    let sinks = lock(model).sinks;
    let mut credited = 0i64;
    let mut credits = 0u64;
    for s in 0..sinks {
        let a = account(http, base, &sink_name(s)).await?;
        if a.balance < 0 || a.withdrawals != 0 || a.transfers_out != 0 {
            tally
                .bank_violations
                .push(format!("sink {}: {a:?}", sink_name(s)));
        }
        credited += a.balance;
        credits += a.deposits;
    }
    let sources = lock(model).sources.len();
    let mut total = AccountFold::default();
    let mut all_acked = AccountFold::default();
    for i in 0..sources {
        let a = account(http, base, &source_name(i)).await?;
        let applied = (a.deposits + a.withdrawals + a.transfers_out) as usize;
        let m = lock(model);
        let acct = &m.sources[i];
        let acked = acct.folds.get(acct.acked).copied().unwrap_or_default();
        all_acked.deposited += acked.deposited;
        all_acked.withdrawn += acked.withdrawn;
        all_acked.transferred += acked.transferred;
        let Some(fold) = acct.folds.get(applied).copied() else {
            tally.bank_violations.push(format!(
                "account {}: {applied} commands applied, only {} sent (duplicated): {a:?}",
                source_name(i),
                acct.sent
            ));
            continue;
        };
        let matches = fold.balance == a.balance
            && fold.deposits == a.deposits
            && fold.withdrawals == a.withdrawals
            && fold.transfers_out == a.transfers_out;
        if !matches {
            tally.bank_violations.push(format!(
                "account {}: state {a:?} is not the result of its first {applied} commands ({fold:?})",
                source_name(i)
            ));
        } else if drained && applied < acct.acked {
            tally.bank_violations.push(format!(
                "account {}: {applied} of {} acknowledged commands applied after the drain",
                source_name(i),
                acct.acked
            ));
        }
        total.balance += fold.balance;
        total.deposited += fold.deposited;
        total.withdrawn += fold.withdrawn;
        total.transferred += fold.transferred;
        total.transfers_out += fold.transfers_out;
    }
    let in_flight = total.transferred - credited;
    if in_flight < 0 {
        tally.bank_violations.push(format!(
            "money created: sinks hold {credited}, only {} transferred",
            total.transferred
        ));
    }
    if credits > total.transfers_out {
        tally.bank_violations.push(format!(
            "{credits} transfer credits applied for {} transfers",
            total.transfers_out
        ));
    }
    if total.deposited - total.withdrawn != total.balance + credited + in_flight {
        tally.bank_violations.push(format!(
            "money not conserved: deposits {} - withdrawals {} != balances {} + in flight {in_flight}",
            total.deposited,
            total.withdrawn,
            total.balance + credited
        ));
    }
    if drained {
        if in_flight != 0 || credits != total.transfers_out {
            tally.bank_violations.push(format!(
                "after the drain {in_flight} still in flight ({credits} credits for {} transfers)",
                total.transfers_out
            ));
        }
        if total.balance + credited != all_acked.deposited - all_acked.withdrawn {
            tally.bank_violations.push(format!(
                "after the drain balances sum to {}, acknowledged deposits - withdrawals = {}",
                total.balance + credited,
                all_acked.deposited - all_acked.withdrawn
            ));
        }
    }
    tally.checks += 1;
    Ok(())
}

// ---------------------------------------------------------------- run

/// The figures of a finished run.
#[derive(Debug)]
pub struct Report {
    /// Arguments the run was started with.
    pub command: String,
    /// Markdown table.
    pub table: String,
    /// Nothing lost, duplicated, reordered, skipped; the bank balanced.
    pub passed: bool,
    /// What went wrong, first few.
    pub problems: Vec<String>,
}

fn command_line(args: &TortureArgs) -> String {
    let mut c = format!("ordo torture --kills {} --seed {}", args.kills, args.seed);
    // Flags that differ from their defaults.
    for (name, v, default) in [
        ("min-life-ms", args.min_life_ms, 30),
        ("max-life-ms", args.max_life_ms, 400),
        ("arm-timeout-ms", args.arm_timeout_ms, 3_000),
        ("keys", args.keys as u64, 24),
        ("accounts", args.accounts as u64, 12),
        ("produce-pause-ms", args.produce_pause_ms, 40),
        ("partitions", u64::from(args.partitions), 4),
        (
            "messages-per-instance",
            u64::from(args.messages_per_instance),
            1,
        ),
    ] {
        if v != default {
            let _ = write!(c, " --{name} {v}");
        }
    }
    if let Some(s) = args.duration {
        let _ = write!(c, " --duration {s}");
    }
    c
}

/// Runs `ordo torture`.
pub async fn run(args: TortureArgs) -> anyhow::Result<()> {
    let report = torture(&args).await?;
    println!("{}", report.table);
    if let Some(path) = &args.record {
        record(path, &report)?;
        println!("figures written to {}", path.display());
    }
    if !report.passed {
        for p in &report.problems {
            eprintln!("  {p}");
        }
        bail!(
            "torture run FAILED (seed {}): see the problems above",
            args.seed
        );
    }
    println!("torture run passed");
    Ok(())
}

/// Runs a torture run and returns its figures; an `Err` is a harness or
/// host failure that kept the run from finishing.
pub async fn torture(args: &TortureArgs) -> anyhow::Result<Report> {
    if args.kills == 0 || args.keys == 0 || args.accounts == 0 {
        bail!("--kills, --keys and --accounts must be at least 1");
    }
    if args.min_life_ms > args.max_life_ms {
        bail!("--min-life-ms must not exceed --max-life-ms");
    }
    let counter = std::fs::read(&args.counter).with_context(|| {
        format!(
            "reading {} (run scripts/build-guests.sh)",
            args.counter.display()
        )
    })?;
    let bank = std::fs::read(&args.bank).with_context(|| {
        format!(
            "reading {} (run scripts/build-guests.sh)",
            args.bank.display()
        )
    })?;
    let work = tempfile::Builder::new()
        .prefix("ordo-torture-")
        .tempdir()
        .context("creating a temp dir")?;
    let port = crate::ports::free_loopback_port().context("finding a free port")?;
    let config = match args.messages_per_instance {
        1 => None,
        n => {
            let path = work.path().join("ordo.toml");
            std::fs::write(
                &path,
                format!("[defaults.limits]\nmessages_per_instance = {n}\n"),
            )
            .with_context(|| format!("writing {}", path.display()))?;
            Some(path)
        }
    };
    let mut host = Host {
        exe: std::env::current_exe().context("locating the ordo binary")?,
        data_dir: work.path().join("data"),
        log: work.path().join("host.log"),
        port,
        partitions: args.partitions.max(1),
        config,
        child: None,
    };
    let outcome = drive(args, &mut host, counter, bank).await;
    host.sigkill();
    let keep = args.keep || !matches!(&outcome, Ok(r) if r.passed);
    if keep {
        let dir = work.keep();
        eprintln!(
            "torture: data dir {} and host log {} kept (seed {})",
            dir.join("data").display(),
            dir.join("host.log").display(),
            args.seed
        );
    }
    outcome
}

async fn drive(
    args: &TortureArgs,
    host: &mut Host,
    counter: Vec<u8>,
    bank: Vec<u8>,
) -> anyhow::Result<Report> {
    let started = Instant::now();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .context("building HTTP client")?;
    let base = host.base();
    if !host.start(None, &http).await? {
        bail!("the host ended while starting without a crash point armed");
    }
    let client = Client::new(&base, None)?;
    client
        .put_bytes(
            &format!("/v1/handlers/counter?topic={COUNTER_TOPIC}"),
            counter.clone(),
        )
        .await
        .context("deploying counter")?;
    client
        .put_bytes(
            &format!("/v1/handlers/bank?topic={BANK_TOPIC}&on_failure=dead-letter"),
            bank,
        )
        .await
        .context("deploying bank")?;
    client
        .put_bytes(
            &format!(
                "/v1/handlers/hostile?topic={HOSTILE_TOPIC}&on_failure=dead-letter&max_attempts=1"
            ),
            counter.clone(),
        )
        .await
        .context("deploying the hostile counter")?;

    let mut model = Model {
        sinks: (args.accounts / 4).max(1),
        ..Model::default()
    };
    for i in 0..args.keys {
        model.keys.push(CounterKey {
            name: format!("c{i}"),
            sent: 0,
            acked: 0,
            seen_prefix: 0,
        });
        model.live.push(i);
    }
    for _ in 0..args.accounts {
        model.sources.push(SourceAccount {
            folds: vec![AccountFold::default()],
            ..SourceAccount::default()
        });
    }
    let model = Arc::new(Mutex::new(model));
    let stop = Arc::new(AtomicBool::new(false));
    let abort = Arc::new(AtomicBool::new(false));
    let producer = Producer {
        model: model.clone(),
        base: base.clone(),
        rng: StdRng::seed_from_u64(args.seed ^ 0x5eed),
        http: http.clone(),
        keys: args.keys,
        pause: Duration::from_millis(args.produce_pause_ms),
        late: Vec::new(),
        round: 0,
    };
    let producing = tokio::spawn(producer.run(stop.clone(), abort.clone()));

    let result = kill_loop(args, host, &http, &model, &counter, started).await;
    stop.store(true, Ordering::SeqCst);
    let mut tally = match result {
        Ok(t) => t,
        Err(e) => {
            abort.store(true, Ordering::SeqCst);
            let _ = producing.await;
            return Err(e);
        }
    };
    let kill_secs = started.elapsed().as_secs_f64();

    // Final: an unarmed host, the producer's last batch acknowledged, drain.
    if host.exited()? {
        host.start(None, &http).await?;
    }
    let produced = tokio::time::timeout(Duration::from_secs(120), producing).await;
    match produced {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => return Err(e.context("producer")),
        Ok(Err(e)) => bail!("producer task failed: {e}"),
        Err(_) => bail!("producer did not finish within 120 s of the last kill"),
    }
    wait_drained(&client, &base).await?;
    check(&http, &base, &model, &mut tally, true).await?;
    let (_, hostile_dl) = dead_letters(&http, &base, "hostile").await?;
    let bank_dl = dead_letters(&http, &base, "bank").await?.1.len();
    host.stop()?;
    let ledger = Command::new(&host.exe)
        .args(["ledger", "check", "--data-dir"])
        .arg(&host.data_dir)
        .output()
        .context("running ordo ledger check")?;
    let total_secs = started.elapsed().as_secs_f64();

    let m = lock(&model);
    let mut problems = tally.examples.clone();
    problems.extend(tally.bank_violations.iter().take(20).cloned());
    let hostile_ids: BTreeSet<String> = hostile_dl.iter().cloned().collect();
    if hostile_ids.len() != hostile_dl.len() {
        problems.push(format!(
            "hostile: {} dead letters for {} messages",
            hostile_dl.len(),
            hostile_ids.len()
        ));
    }
    if !m.hostile_acked.is_subset(&hostile_ids) || !hostile_ids.is_subset(&m.hostile_sent) {
        problems.push(format!(
            "hostile: {} acknowledged, {} dead-lettered",
            m.hostile_acked.len(),
            hostile_ids.len()
        ));
    }
    if bank_dl != 0 {
        problems.push(format!(
            "bank: {bank_dl} dead letters (every command is valid)"
        ));
    }
    for a in &m.inputs_accepted {
        problems.push(format!("malformed input accepted: {a}"));
    }
    if !ledger.status.success() {
        problems.push(format!(
            "ordo ledger check failed: {}{}",
            String::from_utf8_lossy(&ledger.stdout),
            String::from_utf8_lossy(&ledger.stderr)
        ));
    }
    if tally.kills < args.kills {
        problems.push(format!(
            "only {} of {} kills within --duration",
            tally.kills, args.kills
        ));
    }
    let passed = problems.is_empty() && tally.findings.is_clean();
    if !tally.findings.is_clean() {
        problems.insert(0, format!("counter: {}", tally.findings));
    }

    let counter_msgs: u64 = m.keys.iter().map(|k| k.acked).sum();
    let bank_cmds: usize = m.sources.iter().map(|s| s.acked).sum();
    let points: Vec<String> = TORTURE_POINTS
        .iter()
        .map(|p| format!("{p} {}", tally.crash_points.get(p).copied().unwrap_or(0)))
        .collect();
    let f = &tally.findings;
    let mut t = String::new();
    let mut row = |k: &str, v: String| {
        let _ = writeln!(t, "| {k} | {v} |");
    };
    row(
        "kills issued",
        format!(
            "{} ({} SIGKILL at a random moment, {} at a crash point)",
            tally.kills,
            tally.sigkills,
            tally.kills - tally.sigkills
        ),
    );
    row("kills survived", format!("{} (every kill followed by a healthy restart; {} of them crashed again while starting)", tally.restarts, tally.crashed_while_starting));
    row("crash points", points.join(", "));
    row(
        "armed, not reached in time (SIGKILLed)",
        tally.armed_not_reached.to_string(),
    );
    row(
        "checker passes",
        format!(
            "{} ({} interrupted by a crash point, redone after the restart)",
            tally.checks, tally.checks_interrupted
        ),
    );
    row("messages acknowledged", format!("{} ({} counter over {} keys, {bank_cmds} bank commands, {} duplicate deliveries, {} batch retries)", m.messages_acked, counter_msgs, m.keys.len(), m.duplicates_sent, m.batches_retried));
    row(
        "lost (prefix / middle / suffix)",
        format!(
            "{} ({} / {} / {})",
            f.lost(),
            f.lost_prefix,
            f.lost_middle,
            f.lost_suffix
        ),
    );
    row("duplicated", f.duplicated.to_string());
    row("reordered", f.reordered.to_string());
    row(
        "skipped (dead-lettered) / foreign",
        format!("{} / {}", f.skipped, f.foreign),
    );
    row(
        "state reads later rolled back (read before flush)",
        tally.rolled_back_reads.to_string(),
    );
    row(
        "bank: money conserved",
        if tally.bank_violations.is_empty() {
            format!(
                "yes, at every pass ({} accounts, {} receiving transfers)",
                m.sources.len(),
                m.sinks
            )
        } else {
            format!("NO: {} violations", tally.bank_violations.len())
        },
    );
    row(
        "faults survived",
        format!(
            "{} (host ends: {} SIGKILL + {} crash-point aborts)",
            tally.kills,
            tally.sigkills,
            tally.kills - tally.sigkills
        ),
    );
    row(
        "inputs tried",
        format!(
            "{} malformed producer requests, {} refused with 4xx",
            m.inputs_tried, m.inputs_refused
        ),
    );
    row("handlers contained", format!("{} hostile messages (trap, memory bomb, deadline spin) dead-lettered, host kept running", hostile_ids.len()));
    row(
        "ledger check after the run",
        if ledger.status.success() {
            "ok".into()
        } else {
            "FAILED".into()
        },
    );
    row(
        "duration",
        format!("{kill_secs:.0} s killing, {total_secs:.0} s in all"),
    );
    let table = format!("| figure | value |\n|---|---|\n{t}");
    Ok(Report {
        command: command_line(args),
        table,
        passed,
        problems,
    })
}

async fn kill_loop(
    args: &TortureArgs,
    host: &mut Host,
    http: &reqwest::Client,
    model: &Mutex<Model>,
    counter: &[u8],
    started: Instant,
) -> anyhow::Result<Tally> {
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut tally = Tally::default();
    let base = host.base();
    let deadline = args.duration.map(|s| started + Duration::from_secs(s));
    let mut cycle = 0u64;
    // The first host (started by the caller) is unarmed.
    let mut armed: Option<&'static str> = None;
    loop {
        // This host is up (or just ended by itself while starting).
        if !host.exited()? {
            match check(http, &base, model, &mut tally, false).await {
                Ok(()) => {}
                // A peer sees its connections reset while the kernel is
                // still tearing the process down: give the reaper a moment.
                Err(_) if armed.is_some() && host.wait_exited(Duration::from_secs(5)).await? => {
                    tally.checks_interrupted += 1
                }
                Err(e) => return Err(e.context("checker")),
            }
        }
        match armed {
            None => {
                let life = rng.gen_range(args.min_life_ms..=args.max_life_ms);
                tokio::time::sleep(Duration::from_millis(life)).await;
                if host.exited()? {
                    bail!(
                        "the host ended by itself without a crash point armed (see the host log)"
                    );
                }
                host.sigkill();
                tally.sigkills += 1;
            }
            Some(point) => {
                if point == "mid-deploy" && !host.exited()? {
                    let _ = Client::new(&base, None)?
                        .put_bytes(
                            &format!("/v1/handlers/counter?topic={COUNTER_TOPIC}"),
                            counter.to_vec(),
                        )
                        .await;
                }
                let reached = host
                    .wait_exited(Duration::from_millis(args.arm_timeout_ms))
                    .await?;
                if reached {
                    *tally.crash_points.entry(point).or_default() += 1;
                } else {
                    host.sigkill();
                    tally.sigkills += 1;
                    tally.armed_not_reached += 1;
                }
            }
        }
        tally.kills += 1;
        cycle += 1;
        let more = tally.kills < args.kills && deadline.is_none_or(|d| Instant::now() < d);
        // The next host: every other one armed at the next crash point; the
        // one that drains at the end never.
        armed = (more && cycle % 2 == 1)
            .then(|| TORTURE_POINTS[(cycle / 2) as usize % TORTURE_POINTS.len()]);
        let spec = armed.map(|p| {
            let nth = if p == "mid-deploy" {
                1
            } else {
                rng.gen_range(1..=40)
            };
            format!("{p}:{nth}")
        });
        let up = host.start(spec.as_deref(), http).await?;
        tally.restarts += 1;
        if !up {
            tally.crashed_while_starting += 1;
        }
        if !more {
            break;
        }
        if cycle % 50 == 0 {
            let f = tally.findings;
            eprintln!(
                "torture: {} kills in {:.0} s; {f}; bank violations {}",
                tally.kills,
                started.elapsed().as_secs_f64(),
                tally.bank_violations.len()
            );
        }
    }
    Ok(tally)
}

/// Waits until every handler has no lag (twice in a row: transfers add
/// credits to the bank's topic as they are handled).
async fn wait_drained(client: &Client, base: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut quiet = 0;
    loop {
        let status = client
            .get_json("/v1/status")
            .await
            .with_context(|| format!("status of {base}"))?;
        let handlers = status["handlers"].as_array().cloned().unwrap_or_default();
        let idle = !handlers.is_empty() && handlers.iter().all(|h| h["lag"] == 0);
        quiet = if idle { quiet + 1 } else { 0 };
        if quiet >= 3 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the host did not drain within 600 s: {status}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const BEGIN: &str = "<!-- torture:begin -->";
const END: &str = "<!-- torture:end -->";

/// Writes the figures between the markers of `path` (a new file gets a
/// heading and the markers).
fn record(path: &Path, report: &Report) -> anyhow::Result<()> {
    let section = format!(
        "{BEGIN}\nLatest run ({}):\n\n```sh\nscripts/build-guests.sh && cargo build --release\ntarget/release/{}\n```\n\n{}\n{END}",
        if report.passed { "passed" } else { "FAILED" },
        report.command,
        report.table
    );
    let text = match std::fs::read_to_string(path) {
        Ok(old) => match (old.find(BEGIN), old.find(END)) {
            (Some(b), Some(e)) if b < e => {
                format!("{}{section}{}", &old[..b], &old[e + END.len()..])
            }
            _ => format!("{}\n{section}\n", old.trim_end()),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            format!("# Reliability\n\n{section}\n")
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none() -> BTreeSet<u64> {
        BTreeSet::new()
    }

    #[test]
    fn a_clean_prefix_is_clean_and_a_pending_tail_is_not_lost() {
        assert!(classify(&[1, 2, 3], 5, 5, &none(), false).is_clean());
        assert!(classify(&[], 5, 5, &none(), false).is_clean());
        assert!(classify(&[1, 2, 3, 4, 5], 5, 5, &none(), true).is_clean());
        // Sent but never acknowledged: may be absent after the drain.
        assert!(classify(&[1, 2], 4, 2, &none(), true).is_clean());
    }

    #[test]
    fn each_class_is_detected() {
        let f = classify(&[3, 4], 4, 4, &none(), false);
        assert_eq!((f.lost_prefix, f.lost()), (2, 2), "{f}");
        let f = classify(&[1, 2, 5, 6], 6, 6, &none(), false);
        assert_eq!((f.lost_middle, f.lost()), (2, 2), "{f}");
        let f = classify(&[1, 2], 5, 5, &none(), true);
        assert_eq!((f.lost_suffix, f.lost()), (3, 3), "{f}");
        let f = classify(&[], 3, 3, &none(), true);
        assert_eq!((f.lost_prefix, f.lost()), (3, 3), "{f}");
        let f = classify(&[1, 2, 2, 3, 1], 3, 3, &none(), true);
        assert_eq!(
            f,
            Findings {
                duplicated: 2,
                ..Findings::default()
            }
        );
        let f = classify(&[1, 3, 2, 4], 4, 4, &none(), true);
        assert_eq!(
            f,
            Findings {
                reordered: 1,
                ..Findings::default()
            }
        );
        let dl: BTreeSet<u64> = [2, 5].into();
        let f = classify(&[1, 3, 4], 5, 5, &dl, true);
        assert_eq!(
            f,
            Findings {
                skipped: 2,
                ..Findings::default()
            }
        );
        let f = classify(&[1, 2, 9, 0], 3, 3, &none(), false);
        assert_eq!(
            f,
            Findings {
                foreign: 2,
                ..Findings::default()
            }
        );
    }

    #[test]
    fn mixed_faults_are_all_counted() {
        // 1 lost ahead, 3 duplicated, 5 before 4, 6 missing in the middle,
        // 9..10 missing at the end.
        let f = classify(&[2, 3, 3, 5, 4, 7, 8], 10, 10, &none(), true);
        assert_eq!(
            f,
            Findings {
                lost_prefix: 1,
                lost_middle: 1,
                lost_suffix: 2,
                duplicated: 1,
                reordered: 1,
                ..Findings::default()
            }
        );
    }

    #[test]
    fn seqs_parse_strictly() {
        assert_eq!(parse_seqs("").ok(), Some(vec![]));
        assert_eq!(parse_seqs("1,2,10").ok(), Some(vec![1, 2, 10]));
        assert!(parse_seqs("1,,2").is_err());
        assert!(parse_seqs("1,x").is_err());
    }

    #[test]
    fn torture_points_are_crash_points() {
        for p in TORTURE_POINTS {
            assert!(crate::crash::POINTS.contains(p), "{p}");
        }
    }

    #[test]
    fn record_replaces_its_section_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("R.md");
        std::fs::write(
            &path,
            format!("# R\n\nintro\n\n{BEGIN}\nold\n{END}\n\nafter\n"),
        )
        .expect("write");
        let report = Report {
            command: "ordo torture --kills 1 --seed 1".into(),
            table: "| a | b |".into(),
            passed: true,
            problems: vec![],
        };
        record(&path, &report).expect("record");
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.starts_with("# R\n\nintro\n\n"), "{text}");
        assert!(text.ends_with("\n\nafter\n"), "{text}");
        assert!(
            text.contains("| a | b |") && !text.contains("old"),
            "{text}"
        );
    }
}
