//! One lane: serial processing of one partition for one handler.
//!
//! A lane alternates two kinds of work, each committed as ONE transaction:
//! - operator actions on its dead letters (replay, drop), which go first so a
//!   replayed key's backlog drains before newer messages are read;
//! - the next messages of its partition, from its committed cursor.
//!
//! Failure handling, per message: a retryable error stops the batch just
//! before the message (what precedes it is committed), the lane waits a
//! backoff with full jitter and tries again, in place, up to the policy's
//! attempts. Anything else — permanent error, trap, deadline, memory limit,
//! retries exhausted — writes a dead letter in the same transaction as the
//! cursor advance. With `park-key` the message's partition key is parked in
//! that transaction too: the key's later messages are held, in order, in the
//! dead-letter queue while the partition's other keys keep flowing, until
//! the operator replays or drops the key's backlog.

use std::any::Any;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use sha2::{Digest, Sha256};
use tokio::sync::{watch, Semaphore};

use super::stats::{BatchCounts, HandlerStats, LanePosition};
use super::worker::Workers;
use crate::ledger::{
    now_ms, CommitBatch, DeadLetter, DedupOutcome, DedupRecord, DlqAction, Envelope, FailurePolicy,
    GroupCommitter, Ledger, OnFailure, OutboxEntry, ParkedKey, StateMap,
};
use crate::runtime::{
    Failure, FailureKind, HandlerModule, Invocation, Message, Overlay, Session, SpanFactory,
    StateAccess,
};
use crate::source::jetstream::{outbox_msg_id, JetStreams, JsTopic, PartitionReader};
use crate::source::topics::{Tail, Topics};

/// A handler implemented in Rust inside the host, without the sandbox (used
/// by the benchmark to isolate the sandbox's cost, and by embedders).
pub trait NativeHandler: Send + Sync + 'static {
    /// Handles one message: reads state through `state`, buffers writes and
    /// emits in `overlay`. On `Err` the overlay is discarded.
    fn handle(
        &self,
        msg: &Message,
        state: &mut dyn StateAccess,
        overlay: &mut Overlay,
    ) -> Result<(), Failure>;
}

/// What runs a message: a sandboxed component or a native handler.
#[derive(Clone)]
pub enum Executor {
    /// A WebAssembly component in the sandbox.
    Wasm(HandlerModule),
    /// A native handler.
    Native(Arc<dyn NativeHandler>),
}

impl Executor {
    /// Runs `msg`; a sandboxed handler runs it in `session`'s instance
    /// (see [`Session`]), started for this executor if there is none.
    fn invoke<'a>(
        &'a self,
        session: &mut Option<Session<'a>>,
        msg: &Message,
        mut state: Box<dyn StateAccess>,
        log_span: &SpanFactory,
    ) -> (Invocation, Box<dyn StateAccess>) {
        match self {
            Executor::Wasm(module) => session.get_or_insert_with(|| module.session()).invoke_in(
                msg,
                state,
                Some(log_span.clone()),
            ),
            Executor::Native(handler) => {
                let start = std::time::Instant::now();
                let mut overlay = Overlay::default();
                let outcome = handler.handle(msg, state.as_mut(), &mut overlay);
                if outcome.is_err() {
                    overlay.writes.clear();
                    overlay.emits.clear();
                }
                let invocation = Invocation {
                    outcome,
                    overlay,
                    elapsed: start.elapsed(),
                    fresh_instance: false,
                    memory_grew: false,
                };
                (invocation, state)
            }
        }
    }

    /// The most a partition key's whole state may take, for a sandboxed
    /// handler (see [`crate::runtime::HandlerLimits::max_state_bytes_per_key`]).
    fn max_state_bytes_per_key(&self) -> Option<usize> {
        match self {
            Executor::Wasm(module) => Some(module.limits().max_state_bytes_per_key),
            Executor::Native(_) => None,
        }
    }
}

/// One loaded handler version.
#[derive(Clone)]
pub struct Runnable {
    /// Version number (1, 2, ...).
    pub version: u64,
    /// What runs its messages.
    pub module: Executor,
    /// Its retry and failure policy.
    pub policy: FailurePolicy,
}

/// What a handler's lanes run; swapped between batches.
#[derive(Clone)]
pub struct ActiveVersion {
    /// The active version.
    pub stable: Runnable,
    /// A canary and its percentage of partition keys, by
    /// [`crate::source::canary_bucket`].
    pub canary: Option<(Runnable, u8)>,
}

impl ActiveVersion {
    /// The version that handles `partition_key`'s messages.
    pub fn for_key(&self, partition_key: &str) -> &Runnable {
        match &self.canary {
            Some((c, pct)) if crate::source::canary_bucket(partition_key) < u32::from(*pct) => c,
            _ => &self.stable,
        }
    }
}

/// Everything a lane needs, shared by the lanes of one handler.
#[derive(Clone)]
pub struct LaneContext {
    /// Handler name.
    pub handler: Arc<str>,
    /// Topic it consumes.
    pub topic: Arc<str>,
    /// The source name in its cursors ([`EMBEDDED_SOURCE`] or
    /// `nats:<stream>`).
    pub source: Arc<str>,
    /// The topic's JetStream mapping when it is not an embedded-log topic.
    pub jetstream: Option<Arc<JsTopic>>,
    /// Every JetStream topic (emits to them go to the outbox).
    pub jetstreams: JetStreams,
    /// Woken after a batch with outbox entries is durable.
    pub outbox_wake: Arc<tokio::sync::Notify>,
    /// The ledger.
    pub ledger: Ledger,
    /// Group commit.
    pub committer: GroupCommitter,
    /// Topic registry (partition counts, watermarks).
    pub topics: Topics,
    /// The current version; lanes pick it up at batch boundaries.
    pub active: watch::Receiver<Option<Arc<ActiveVersion>>>,
    /// Bumped when operator actions on dead letters were requested.
    pub control: watch::Receiver<u64>,
    /// Counters.
    pub stats: Arc<HandlerStats>,
    /// Each lane's position, by partition (see [`LanePosition`]).
    pub positions: Arc<[watch::Sender<LanePosition>]>,
    /// Bounds concurrent invocations to the runtime's instance pool.
    pub exec_slots: Arc<Semaphore>,
    /// The threads that run and commit lane batches.
    pub workers: Workers,
    /// Set to `true` to stop the lane after its current batch.
    pub stop: watch::Receiver<bool>,
    /// Messages per transaction, at most.
    pub max_batch: usize,
    /// Check and record idempotency keys (`false`: at-least-once).
    pub dedup: bool,
    /// Histograms.
    pub metrics: crate::metrics::Metrics,
    /// This handler's metric labels.
    pub label: crate::metrics::HandlerLabel,
}

impl LaneContext {
    /// Updates the position of `partition`'s lane.
    fn position(&self, partition: u32, update: impl FnOnce(&mut LanePosition)) {
        if let Some(tx) = self.positions.get(partition as usize) {
            tx.send_modify(update);
        }
    }
}

/// Uncommitted state writes of one partition key within a batch.
type PendingWrites = BTreeMap<String, Option<Vec<u8>>>;

/// The source name recorded in cursors and default idempotency keys.
pub const EMBEDDED_SOURCE: &str = "log";

/// Error kind recorded for messages held because their key is parked.
pub const HELD_KIND: &str = "held";

/// What a lane is retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ItemId {
    /// A message of the partition, by offset.
    Log(u64),
    /// A dead letter being replayed, by sequence.
    Replay(u64),
}

/// A message waiting for its next attempt.
#[derive(Debug, Clone)]
struct RetryState {
    item: ItemId,
    /// Attempts made so far.
    attempts: u32,
    first_failure_ms: u64,
    /// Backoff ceiling before the next attempt.
    ceiling_ms: u64,
}

impl RetryState {
    /// The attempt number of `item` and when it first failed, if it did.
    fn next_attempt(retry: Option<&RetryState>, item: ItemId) -> (u32, Option<u64>) {
        match retry {
            Some(r) if r.item == item => (r.attempts + 1, Some(r.first_failure_ms)),
            _ => (1, None),
        }
    }
}

/// One unit of lane work.
enum Work {
    /// Pending operator actions, oldest dead letter first.
    Actions(Vec<(u64, DlqAction)>),
    /// Messages from this position on; with the messages when the source
    /// buffers them in memory, else read from the embedded log.
    Log(u64, Option<Vec<(u64, Envelope)>>),
}

/// Where a lane reads its partition from.
enum LaneSource {
    /// The embedded log; the receiver carries the partition's high
    /// watermark (applied appends), the tail its most recent messages.
    Log(watch::Receiver<u64>, Tail),
    /// A JetStream partition subject.
    JetStream(Box<PartitionReader>),
}

impl LaneSource {
    /// Whether messages at or after `cursor` can be read now.
    fn ready(&mut self, cursor: u64) -> bool {
        match self {
            LaneSource::Log(w, _) => *w.borrow() > cursor,
            LaneSource::JetStream(r) => r.ready(),
        }
    }

    /// The next batch's messages when the source holds them in memory.
    fn batch(&mut self, cursor: u64, max: usize) -> Option<Vec<(u64, Envelope)>> {
        match self {
            LaneSource::Log(_, tail) => tail
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read(cursor, max),
            LaneSource::JetStream(r) => Some(r.batch(cursor, max)),
        }
    }

    /// Waits for more messages; `Err` when the source is gone.
    async fn changed(&mut self) -> Result<(), ()> {
        match self {
            LaneSource::Log(w, _) => w.changed().await.map_err(|_| ()),
            LaneSource::JetStream(r) => {
                r.wait().await;
                Ok(())
            }
        }
    }

    /// Everything before `next` is committed.
    fn committed(&mut self, next: u64) {
        if let LaneSource::JetStream(r) = self {
            r.committed(next);
        }
    }
}

/// Runs the lane for `partition` until stopped.
pub async fn run_lane(ctx: LaneContext, partition: u32) {
    let handler = ctx.handler.clone();
    let mut stop = ctx.stop.clone();
    let mut active_rx = ctx.active.clone();
    let mut control = ctx.control.clone();
    let loaded = ctx
        .ledger
        .cursor(&handler, &ctx.source, partition)
        .and_then(|c| Ok((c, ctx.ledger.parked_keys(&handler, partition)?)));
    let (mut cursor, parked) = match loaded {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(%handler, partition, error = %e, "cannot read cursor or parked keys; lane not started");
            return;
        }
    };
    let mut parked: HashSet<String> = parked.into_iter().map(|p| p.partition_key).collect();
    ctx.position(partition, |p| {
        *p = LanePosition {
            applied: cursor,
            committed: cursor,
        }
    });
    let mut source = match &ctx.jetstream {
        Some(js) => LaneSource::JetStream(Box::new(PartitionReader::new(
            js.clone(),
            &handler,
            partition,
            cursor,
        ))),
        None => LaneSource::Log(
            ctx.topics.watch(&ctx.topic, partition),
            ctx.topics.tail(&ctx.topic, partition),
        ),
    };
    let cache = StateCache::shared(4096);
    let mut retry: Option<RetryState> = None;
    // The last batch applied, not yet known durable (see publish_pending).
    let mut pending: Option<BatchOutcome> = None;
    // Actions may have been requested before a restart.
    let mut actions_pending = true;
    let mut backoff = Duration::from_millis(50);
    loop {
        if *stop.borrow() {
            break;
        }
        if control.has_changed().unwrap_or(false) {
            control.borrow_and_update();
            actions_pending = true;
        }
        let active = active_rx.borrow().clone();
        let Some(active) = active else {
            // Paused/undeployed: wait for a version or a stop.
            if !publish_pending(&ctx, partition, &mut pending).await {
                break;
            }
            tokio::select! {
                _ = active_rx.changed() => {}
                _ = stop.changed() => {}
            }
            continue;
        };
        let mut work = None;
        if actions_pending {
            match ctx.ledger.dlq_actions(&handler, partition, ctx.max_batch) {
                Ok(actions) if actions.is_empty() => actions_pending = false,
                Ok(actions) => work = Some(Work::Actions(actions)),
                Err(e) => {
                    tracing::error!(%handler, partition, error = %e, "cannot read dead-letter actions");
                    actions_pending = false;
                }
            }
        }
        let work = match work {
            Some(w) => w,
            None if source.ready(cursor) => Work::Log(cursor, source.batch(cursor, ctx.max_batch)),
            None => {
                // Idle: make what was applied durable and visible first.
                if !publish_pending(&ctx, partition, &mut pending).await {
                    break;
                }
                tokio::select! {
                    r = source.changed() => if r.is_err() { break },
                    _ = stop.changed() => {}
                    _ = active_rx.changed() => {}
                    _ = control.changed() => actions_pending = true,
                }
                continue;
            }
        };
        let Ok(permit) = ctx.exec_slots.clone().acquire_owned().await else {
            break;
        };
        let job_ctx = ctx.clone();
        let job_active = active.clone();
        let job_parked = parked.clone();
        let job_retry = retry.clone();
        let job_cache = cache.clone();
        let result = ctx
            .workers
            .run(move || {
                let _permit = permit;
                let lane = LaneView {
                    ctx: &job_ctx,
                    active: &job_active,
                    partition,
                    parked: &job_parked,
                    cache: &job_cache,
                    retry: job_retry.as_ref(),
                };
                match work {
                    Work::Log(from, entries) => lane.process_log(from, entries),
                    Work::Actions(actions) => lane.process_actions(&actions),
                }
            })
            .await;
        let outcome = match result {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(e)) => {
                tracing::error!(%handler, partition, error = %format!("{e:#}"), "batch failed; retrying");
                if !publish_pending(&ctx, partition, &mut pending).await {
                    break;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
            Err(e) => {
                tracing::error!(%handler, partition, error = %e, "batch task panicked; retrying");
                if !publish_pending(&ctx, partition, &mut pending).await {
                    break;
                }
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        // The lane's own view moves on at once: the next batch reads the
        // ledger as this one left it (applied; a failed flush fails every
        // later commit too, and recovery restarts from the durable prefix).
        if let Some(next) = outcome.next_cursor {
            cursor = next;
            source.committed(next);
            ctx.position(partition, |p| p.applied = next);
        }
        for key in &outcome.unparked {
            parked.remove(key);
        }
        parked.extend(outcome.parked.iter().cloned());
        retry = outcome.retry.clone();
        // What others see (counts, emitted messages, the outbox) waits for
        // durability. The previous batch's flush ran while this one was
        // built; this one's runs while the next is built.
        if !publish_pending(&ctx, partition, &mut pending).await {
            break;
        }
        pending = Some(outcome);
        if retry.is_some() && !publish_pending(&ctx, partition, &mut pending).await {
            break;
        }
        if let Some(r) = &retry {
            let ceiling = r.ceiling_ms;
            let wait = Duration::from_millis(rand::thread_rng().gen_range(0..=ceiling));
            tracing::info!(%handler, partition, item = ?r.item, attempt = r.attempts, wait_ms = wait.as_millis() as u64, "retryable failure; waiting before the next attempt");
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => {}
                // A new version may be the fix: try it at once.
                _ = active_rx.changed() => {}
            }
        }
    }
    // Stopping (or failed): publish what became durable.
    publish_pending(&ctx, partition, &mut pending).await;
}

/// Waits until the pending batch (if any) is durable, then makes its effects
/// visible: counters, emitted log messages, the outbox relay. `false` when
/// it can never become durable (the lane must stop).
async fn publish_pending(
    ctx: &LaneContext,
    partition: u32,
    pending: &mut Option<BatchOutcome>,
) -> bool {
    let Some(outcome) = pending.take() else {
        return true;
    };
    if let Some(ticket) = outcome.ticket {
        if let Err(e) = ctx.committer.wait_durable(ticket).await {
            // Not durable: never count or move on. The committer is now
            // failed; the host stops acknowledging and must be restarted.
            tracing::error!(handler = %ctx.handler, error = %e, "commit not durable; lane stopped");
            return false;
        }
    }
    if outcome.outboxed {
        ctx.outbox_wake.notify_one();
    }
    ctx.stats.add(&outcome.counts);
    let c = &outcome.counts;
    let messages = c.processed + c.duplicates + c.dead_lettered + c.held;
    if messages > 0 {
        ctx.metrics
            .batch_messages
            .get_or_create(&ctx.label)
            .observe(messages as f64);
    }
    for (topic, partition) in outcome.appended {
        ctx.topics.refresh(&ctx.ledger, &topic, partition);
    }
    // Last: whoever waits for the position sees the batch counted.
    if let Some(next) = outcome.next_cursor {
        ctx.position(partition, |p| p.committed = next);
    }
    true
}

/// What one batch did, applied to the lane once it is durable.
#[derive(Default)]
pub(super) struct BatchOutcome {
    /// Group-commit ticket to wait for; `None` when nothing was written.
    pub(super) ticket: Option<u64>,
    next_cursor: Option<u64>,
    counts: BatchCounts,
    /// Embedded-log partitions that received emitted messages.
    appended: Vec<(String, u32)>,
    /// Whether the batch wrote outbox entries.
    outboxed: bool,
    parked: Vec<String>,
    unparked: Vec<String>,
    /// Set when the batch stopped at a retryable failure.
    retry: Option<RetryState>,
}

/// A lane's cache of its keys' committed state (each key's whole record).
/// Coherent because the lane is the only writer of its partition keys'
/// state: it is filled on reads and updated with every transaction the lane
/// applies. Bounded: cleared when it holds more than `max_keys` partition
/// keys.
pub(crate) struct StateCache {
    keys: HashMap<String, StateMap>,
    max_keys: usize,
}

type SharedCache = Arc<std::sync::Mutex<StateCache>>;

impl StateCache {
    fn shared(max_keys: usize) -> SharedCache {
        Arc::new(std::sync::Mutex::new(StateCache {
            keys: HashMap::new(),
            max_keys,
        }))
    }

    /// One state value, if the key's record is cached.
    fn get(&self, partition_key: &str, state_key: &str) -> Option<Option<Vec<u8>>> {
        Some(self.keys.get(partition_key)?.get(state_key).cloned())
    }

    /// The key's record, taken out of the cache (read from the ledger when
    /// not cached).
    fn take(
        &mut self,
        ledger: &Ledger,
        handler: &str,
        partition_key: &str,
    ) -> anyhow::Result<StateMap> {
        match self.keys.remove(partition_key) {
            Some(map) => Ok(map),
            None => Ok(ledger.state_record(handler, partition_key)?),
        }
    }

    /// `f` of the key's committed record, which is cached afterwards (read
    /// from the ledger when not cached).
    fn with_record<R>(
        &mut self,
        ledger: &Ledger,
        handler: &str,
        partition_key: &str,
        f: impl FnOnce(&StateMap) -> R,
    ) -> anyhow::Result<R> {
        let record = self.take(ledger, handler, partition_key)?;
        let result = f(&record);
        self.put(partition_key.to_string(), record);
        Ok(result)
    }

    /// Bytes of a key's whole state (state keys and values) once the
    /// batch's uncommitted writes and then one message's are applied to
    /// its committed record.
    fn state_bytes_after(
        &mut self,
        ledger: &Ledger,
        handler: &str,
        partition_key: &str,
        pending: &PendingWrites,
        writes: &PendingWrites,
    ) -> anyhow::Result<usize> {
        self.with_record(ledger, handler, partition_key, |record| {
            let entry = |k: &String, v: &Vec<u8>| k.len() + v.len();
            let mut size: usize = record.iter().map(|(k, v)| entry(k, v)).sum();
            let changed = writes
                .iter()
                .chain(pending.iter().filter(|(k, _)| !writes.contains_key(*k)));
            for (k, v) in changed {
                if let Some(old) = record.get(k) {
                    size -= entry(k, old);
                }
                if let Some(v) = v {
                    size += entry(k, v);
                }
            }
            size
        })
    }

    fn put(&mut self, partition_key: String, record: StateMap) {
        if !self.keys.contains_key(&partition_key) && self.keys.len() >= self.max_keys {
            self.keys.clear();
        }
        self.keys.insert(partition_key, record);
    }
}

fn lock(cache: &SharedCache) -> std::sync::MutexGuard<'_, StateCache> {
    cache.lock().unwrap_or_else(|p| p.into_inner())
}

/// Committed state of one partition key, with the batch's uncommitted writes
/// layered on top (earlier messages of the same batch must be visible).
struct BatchState {
    ledger: Ledger,
    handler: Arc<str>,
    partition_key: String,
    pending: PendingWrites,
    cache: SharedCache,
}

impl StateAccess for BatchState {
    fn get(&mut self, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        if let Some(v) = self.pending.get(key) {
            return Ok(v.clone());
        }
        let mut cache = lock(&self.cache);
        if let Some(v) = cache.get(&self.partition_key, key) {
            return Ok(v);
        }
        cache.with_record(&self.ledger, &self.handler, &self.partition_key, |record| {
            record.get(key).cloned()
        })
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}

/// 128-bit prefix of SHA-256 of a payload, for conflict detection.
fn payload_hash(payload: &[u8]) -> [u8; 16] {
    let digest = Sha256::digest(payload);
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    out
}

/// A lane's view for one batch (runs on the lane's worker thread).
struct LaneView<'a> {
    ctx: &'a LaneContext,
    active: &'a ActiveVersion,
    partition: u32,
    /// Parked keys as of the batch start.
    parked: &'a HashSet<String>,
    /// The lane's state cache.
    cache: &'a SharedCache,
    retry: Option<&'a RetryState>,
}

/// The transaction being assembled, with the batch's uncommitted writes.
struct Builder<'a> {
    lane: &'a LaneView<'a>,
    batch: CommitBatch,
    outcome: BatchOutcome,
    pending: HashMap<String, PendingWrites>,
    /// The session the batch's messages run in (see [`Session`]), and
    /// the version it is of: a canary's messages and the stable version's
    /// do not share one.
    session: Option<Session<'a>>,
    session_version: u64,
    /// The handler's invocation metrics, looked up once per batch (a
    /// lookup hashes the label under a lock).
    handler_seconds: prometheus_client::metrics::histogram::Histogram,
    instances: prometheus_client::metrics::counter::Counter,
}

/// How a failed attempt ends.
enum Verdict {
    /// Try again later; the batch stops before this message.
    Retry(RetryState),
    /// Dead-letter it: (kind, error text, attempts made, first failure).
    DeadLetter(String, String, u32, u64),
}

impl<'a> Builder<'a> {
    fn new(lane: &'a LaneView<'a>) -> Self {
        let ctx = lane.ctx;
        Builder {
            lane,
            batch: CommitBatch::default(),
            outcome: BatchOutcome::default(),
            pending: HashMap::new(),
            session: None,
            session_version: 0,
            handler_seconds: ctx
                .metrics
                .handler_seconds
                .get_or_create(&ctx.label)
                .clone(),
            instances: ctx.metrics.instances.get_or_create(&ctx.label).clone(),
        }
    }

    fn handler(&self) -> &str {
        &self.lane.ctx.handler
    }

    /// Runs the handler on `msg`. On success its state writes and emits join
    /// the batch; on failure nothing of the attempt does.
    fn invoke(&mut self, msg: &Message) -> anyhow::Result<Result<(), Failure>> {
        let ctx = self.lane.ctx;
        let runnable = self.lane.active.for_key(&msg.partition_key);
        // The span of the guest's log lines, made only for a line that is
        // recorded. Its target is the guest's and its level the highest,
        // so it is there whenever a guest line is.
        let log_span: SpanFactory = {
            let (handler, version, partition) =
                (ctx.handler.clone(), runnable.version, self.lane.partition);
            let (key, offset, attempt) = (msg.partition_key.clone(), msg.offset, msg.attempt);
            Arc::new(move || {
                tracing::error_span!(
                    target: "ordo::guest",
                    "message",
                    handler = %handler,
                    version,
                    partition,
                    key = %key,
                    offset,
                    attempt,
                )
            })
        };
        let start = std::time::Instant::now();
        let (invocation, mut key_pending) =
            self.invoke_with_host_retries(runnable, msg, &log_span)?;
        self.handler_seconds.observe(start.elapsed().as_secs_f64());
        if invocation.fresh_instance {
            self.instances.inc();
        }
        if invocation.memory_grew {
            ctx.metrics.memory_grown.get_or_create(&ctx.label).inc();
        }
        let outcome = match (
            invocation.outcome,
            runnable.module.max_state_bytes_per_key(),
        ) {
            (Ok(()), Some(limit)) if !invocation.overlay.writes.is_empty() => {
                let size = lock(self.lane.cache).state_bytes_after(
                    &ctx.ledger,
                    &ctx.handler,
                    &msg.partition_key,
                    &key_pending,
                    &invocation.overlay.writes,
                )?;
                if size > limit {
                    Err(Failure::new(
                        FailureKind::QuotaExceeded,
                        format!(
                            "the state of partition key {:?} would take {size} bytes, over the handler's {limit}-byte limit (max_state_bytes_per_key)",
                            msg.partition_key
                        ),
                    ))
                } else {
                    Ok(())
                }
            }
            (outcome, _) => outcome,
        };
        let result = match outcome {
            Ok(()) => {
                for (k, v) in invocation.overlay.writes {
                    key_pending.insert(k, v);
                }
                let now = now_ms();
                for (i, emit) in invocation.overlay.emits.into_iter().enumerate() {
                    if ctx.jetstreams.get(&emit.topic).is_some() {
                        let id = ctx.ledger.next_id()?;
                        self.batch.outbox.push((
                            id,
                            OutboxEntry {
                                topic: emit.topic,
                                key: emit.partition_key,
                                msg_id: outbox_msg_id(&ctx.handler, &msg.idempotency_key, i),
                                payload: emit.payload,
                                headers: emit.headers,
                                created_ms: now,
                            },
                        ));
                        self.outcome.outboxed = true;
                        continue;
                    }
                    let partitions = ctx.topics.ensure(&ctx.ledger, &emit.topic)?;
                    let target = crate::source::partition_for(&emit.partition_key, partitions);
                    self.batch.log_appends.push((
                        emit.topic.clone(),
                        target,
                        Envelope {
                            key: emit.partition_key,
                            idempotency_key: Some(format!(
                                "{}/{}/{i}",
                                ctx.handler, msg.idempotency_key
                            )),
                            payload: emit.payload,
                            headers: emit.headers,
                            appended_at_ms: now,
                        },
                    ));
                    self.outcome.appended.push((emit.topic, target));
                }
                Ok(())
            }
            Err(failure) => Err(failure),
        };
        self.pending.insert(msg.partition_key.clone(), key_pending);
        Ok(result)
    }

    /// Invokes the handler, retrying in place while the failure is the
    /// host's (e.g. instance pool exhausted), never the message's. Returns
    /// the invocation and the key's pending writes (taken out of
    /// `pending`).
    fn invoke_with_host_retries(
        &mut self,
        runnable: &'a Runnable,
        msg: &Message,
        log_span: &SpanFactory,
    ) -> anyhow::Result<(Invocation, PendingWrites)> {
        let ctx = self.lane.ctx;
        if self.session_version != runnable.version {
            self.session = None;
            self.session_version = runnable.version;
        }
        let mut key_pending = self.pending.remove(&msg.partition_key).unwrap_or_default();
        let mut delay = Duration::from_millis(10);
        for _ in 0..20 {
            let view = BatchState {
                ledger: ctx.ledger.clone(),
                handler: ctx.handler.clone(),
                partition_key: msg.partition_key.clone(),
                pending: key_pending,
                cache: self.lane.cache.clone(),
            };
            let (invocation, state) =
                runnable
                    .module
                    .invoke(&mut self.session, msg, Box::new(view), log_span);
            key_pending = state
                .into_any()
                .downcast::<BatchState>()
                .map(|s| s.pending)
                .map_err(|_| anyhow::anyhow!("state view of another type returned"))?;
            match &invocation.outcome {
                Err(f) if f.kind == FailureKind::Host => {
                    self.outcome.counts.host_retries += 1;
                    tracing::warn!(handler = %ctx.handler, key = %msg.partition_key, offset = msg.offset, error = %f.message, "host could not run handler; retrying");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                _ => return Ok((invocation, key_pending)),
            }
        }
        self.pending.insert(msg.partition_key.clone(), key_pending);
        anyhow::bail!(
            "host could not run handler {} after repeated attempts",
            ctx.handler
        )
    }

    /// Decides what a failed attempt leads to under the version's policy.
    fn verdict(
        &mut self,
        key: &str,
        item: ItemId,
        attempt: u32,
        first: Option<u64>,
        f: Failure,
    ) -> Verdict {
        let policy = &self.lane.active.for_key(key).policy.retry;
        let first = first.unwrap_or_else(now_ms);
        if f.kind == FailureKind::Retryable && attempt < policy.max_attempts {
            self.outcome.counts.retries += 1;
            return Verdict::Retry(RetryState {
                item,
                attempts: attempt,
                first_failure_ms: first,
                ceiling_ms: policy.ceiling_ms(attempt),
            });
        }
        let error = if f.kind == FailureKind::Retryable && attempt > 1 {
            format!("gave up after {attempt} attempts: {}", f.message)
        } else {
            f.message
        };
        Verdict::DeadLetter(f.kind.as_str().to_string(), error, attempt, first)
    }

    fn dedup(
        &mut self,
        partition_key: &str,
        idempotency_key: String,
        offset: u64,
        partition: u32,
        hash: [u8; 16],
        outcome: DedupOutcome,
    ) {
        let record = DedupRecord {
            offset,
            partition,
            version: self.lane.active.for_key(partition_key).version,
            payload_hash: hash,
            committed_at_ms: now_ms(),
            outcome,
        };
        self.batch
            .dedup
            .push((self.handler().to_string(), idempotency_key, record));
    }

    fn put_dead_letter(&mut self, seq: u64, dead_letter: Option<DeadLetter>) {
        self.batch
            .dlq
            .push((self.handler().to_string(), seq, dead_letter));
    }

    fn set_parked(&mut self, key: &str, parked: Option<ParkedKey>) {
        let (handler, partition) = (self.handler().to_string(), self.lane.partition);
        if parked.is_some() {
            self.outcome.parked.push(key.to_string());
        } else {
            self.outcome.unparked.push(key.to_string());
        }
        self.batch
            .parked
            .push((handler, partition, key.to_string(), parked));
    }

    /// The batch, ready for its worker to commit.
    fn finish(mut self, next_cursor: Option<u64>) -> anyhow::Result<Built> {
        let ctx = self.lane.ctx;
        let handler = ctx.handler.to_string();
        {
            // Each written key's new record: its committed one (taken out of
            // the cache, put back once applied) with the writes on top.
            let mut cache = lock(self.lane.cache);
            for (partition_key, writes) in std::mem::take(&mut self.pending) {
                if writes.is_empty() {
                    continue;
                }
                let mut record = cache.take(&ctx.ledger, &handler, &partition_key)?;
                for (state_key, value) in writes {
                    match value {
                        Some(v) => record.insert(state_key, v),
                        None => record.remove(&state_key),
                    };
                }
                self.batch
                    .state
                    .push((handler.clone(), partition_key, record));
            }
        }
        if let Some(next) = next_cursor {
            self.batch
                .cursors
                .push((handler, ctx.source.to_string(), self.lane.partition, next));
        }
        self.outcome.next_cursor = next_cursor;
        Ok(Built {
            batch: self.batch,
            outcome: self.outcome,
            cache: self.lane.cache.clone(),
        })
    }
}

/// A lane batch built (its handler calls made), for its worker to commit.
pub(super) struct Built {
    batch: CommitBatch,
    outcome: BatchOutcome,
    /// The lane's cache, which takes the batch's state records once applied.
    cache: SharedCache,
}

impl Built {
    /// The transaction to apply; `None` when the batch wrote nothing.
    pub(super) fn batch(&self) -> Option<&CommitBatch> {
        let b = &self.batch;
        let empty = b.state.is_empty()
            && b.dedup.is_empty()
            && b.cursors.is_empty()
            && b.dlq.is_empty()
            && b.log_appends.is_empty()
            && b.outbox.is_empty()
            && b.parked.is_empty()
            && b.dlq_actions_done.is_empty()
            && b.dlq_actions_new.is_empty();
        (!empty).then_some(b)
    }

    /// The batch's outcome once its transaction is applied under `ticket`
    /// (`None`: it wrote nothing). The lane's cache follows the applied
    /// records (if the flush fails, the committer refuses everything and
    /// the lane stops).
    pub(super) fn applied(mut self, ticket: Option<u64>) -> BatchOutcome {
        if self.batch().is_some() {
            self.outcome.ticket = ticket;
            let mut cache = lock(&self.cache);
            for (_, partition_key, record) in std::mem::take(&mut self.batch.state) {
                cache.put(partition_key, record);
            }
        }
        self.outcome
    }

    /// A built batch of `batch` whose outcome is empty (worker tests).
    #[cfg(test)]
    pub(super) fn of(batch: CommitBatch) -> Built {
        Built {
            batch,
            outcome: BatchOutcome::default(),
            cache: StateCache::shared(16),
        }
    }
}

impl LaneView<'_> {
    /// Processes up to `max_batch` messages from `from` into one
    /// transaction (which the lane's worker commits).
    fn process_log(
        &self,
        from: u64,
        entries: Option<Vec<(u64, Envelope)>>,
    ) -> anyhow::Result<Built> {
        let ctx = self.ctx;
        let handler = &*ctx.handler;
        let topic = &*ctx.topic;
        let partition = self.partition;
        let entries = match entries {
            Some(e) => e,
            None => ctx.ledger.read(topic, partition, from, ctx.max_batch)?,
        };
        let mut b = Builder::new(self);
        let mut seen: HashMap<String, [u8; 16]> = HashMap::new();
        let mut parked_now: HashSet<String> = HashSet::new();
        let mut next_cursor = from;

        for (offset, envelope) in entries {
            let idempotency_key = envelope
                .idempotency_key
                .clone()
                .unwrap_or_else(|| format!("{}:{topic}/{partition}/{offset}", ctx.source));
            let hash = payload_hash(&envelope.payload);

            let earlier = match seen.get(&idempotency_key) {
                _ if !ctx.dedup => None,
                Some(h) => Some(*h),
                None => ctx
                    .ledger
                    .dedup_get(handler, &idempotency_key)?
                    .map(|r| r.payload_hash),
            };
            if let Some(earlier_hash) = earlier {
                b.outcome.counts.duplicates += 1;
                if earlier_hash != hash {
                    b.outcome.counts.conflicts += 1;
                    tracing::warn!(
                        handler, partition, offset, idempotency_key = %idempotency_key,
                        "duplicate idempotency key with a different payload: skipped (conflict)"
                    );
                }
                next_cursor = offset + 1;
                continue;
            }

            let mut msg = Message {
                topic: topic.to_string(),
                partition_key: envelope.key,
                idempotency_key,
                offset,
                payload: envelope.payload,
                headers: envelope.headers,
                attempt: 1,
            };
            let key_parked =
                self.parked.contains(&msg.partition_key) || parked_now.contains(&msg.partition_key);
            let outcome = if key_parked {
                let seq = ctx.ledger.next_id()?;
                let now = now_ms();
                b.put_dead_letter(
                    seq,
                    Some(self.dead_letter(
                        &msg,
                        HELD_KIND,
                        "held: an earlier message of this key is dead-lettered and the key is parked".into(),
                        0,
                        now,
                    )),
                );
                b.outcome.counts.held += 1;
                DedupOutcome::Parked
            } else {
                let item = ItemId::Log(offset);
                let (attempt, first) = RetryState::next_attempt(self.retry, item);
                msg.attempt = attempt;
                match b.invoke(&msg)? {
                    Ok(()) => {
                        b.outcome.counts.processed += 1;
                        crate::crash::point("mid-batch");
                        DedupOutcome::Committed
                    }
                    Err(f) => match b.verdict(&msg.partition_key, item, attempt, first, f) {
                        Verdict::Retry(r) => {
                            b.outcome.retry = Some(r);
                            break;
                        }
                        Verdict::DeadLetter(kind, error, attempts, first) => {
                            let seq = ctx.ledger.next_id()?;
                            tracing::warn!(
                                handler, partition, offset, key = %msg.partition_key,
                                idempotency_key = %msg.idempotency_key, kind = %kind,
                                error = %error, attempts, "message dead-lettered"
                            );
                            let mut dl = self.dead_letter(&msg, &kind, error, attempts, first);
                            dl.last_failure_ms = now_ms();
                            b.put_dead_letter(seq, Some(dl));
                            b.outcome.counts.dead_lettered += 1;
                            if self.active.for_key(&msg.partition_key).policy.on_failure
                                == OnFailure::ParkKey
                            {
                                tracing::warn!(handler, partition, key = %msg.partition_key, seq, "partition key parked");
                                parked_now.insert(msg.partition_key.clone());
                                b.set_parked(
                                    &msg.partition_key,
                                    Some(ParkedKey {
                                        partition_key: msg.partition_key.clone(),
                                        since_ms: now_ms(),
                                        cause_seq: seq,
                                        paused: false,
                                    }),
                                );
                            }
                            DedupOutcome::DeadLettered
                        }
                    },
                }
            };
            if !ctx.dedup {
                next_cursor = offset + 1;
                continue;
            }
            seen.insert(msg.idempotency_key.clone(), hash);
            b.dedup(
                &msg.partition_key,
                msg.idempotency_key,
                offset,
                partition,
                hash,
                outcome,
            );
            next_cursor = offset + 1;
        }
        b.finish((next_cursor != from).then_some(next_cursor))
    }

    /// Carries out pending operator actions on dead letters, in sequence
    /// order, as one transaction. A parked key is unparked in the
    /// transaction that empties its backlog.
    fn process_actions(&self, actions: &[(u64, DlqAction)]) -> anyhow::Result<Built> {
        let ctx = self.ctx;
        let handler = &*ctx.handler;
        let partition = self.partition;
        // This lane's dead-letter sequences per partition key, oldest first.
        let mut backlog: HashMap<String, VecDeque<u64>> = HashMap::new();
        for (seq, dl) in ctx.ledger.dlq_list(handler)? {
            if dl.partition == partition {
                backlog.entry(dl.partition_key).or_default().push_back(seq);
            }
        }
        let mut run = ActionRun {
            b: Builder::new(self),
            backlog,
            blocked: HashSet::new(),
            committed: HashSet::new(),
            invocations: 0,
        };
        for (seq, action) in actions {
            let seq = *seq;
            if run.invocations >= ctx.max_batch || run.b.outcome.retry.is_some() {
                break;
            }
            run.b
                .batch
                .dlq_actions_done
                .push((handler.to_string(), partition, seq));
            match action {
                DlqAction::PauseKey(key) => {
                    if !run.is_parked(key) {
                        tracing::info!(handler, partition, key = %key, "key paused by operator");
                        run.b.set_parked(
                            key,
                            Some(ParkedKey {
                                partition_key: key.clone(),
                                since_ms: now_ms(),
                                cause_seq: 0,
                                paused: true,
                            }),
                        );
                    }
                    continue;
                }
                DlqAction::ResumeKey(key) => {
                    let drained = run.backlog.get(key).is_none_or(VecDeque::is_empty);
                    if drained {
                        if run.is_parked(key) {
                            tracing::info!(handler, partition, key = %key, "key resumed");
                            run.b.set_parked(key, None);
                        }
                    } else {
                        run.replay_key(key)?;
                    }
                    continue;
                }
                _ => {}
            }
            let Some(dl) = ctx.ledger.dlq_get(handler, seq)? else {
                continue;
            };
            let key = dl.partition_key.clone();
            let is_head = run.backlog.get(&key).and_then(|q| q.front()) == Some(&seq);
            match action {
                DlqAction::Drop => {
                    tracing::info!(handler, partition, seq, key = %key, "dead letter dropped");
                    run.b.outcome.counts.dropped += 1;
                    run.remove(seq, &key);
                }
                DlqAction::Replay
                    if run.blocked.contains(&key) || (run.is_parked(&key) && !is_head) =>
                {
                    tracing::warn!(
                        handler, partition, seq, key = %key,
                        "replay cancelled: an older dead letter of this parked key is still in the queue (replay the key)"
                    );
                }
                DlqAction::Replay => {
                    if let Replayed::Retry = run.replay(seq, dl)? {
                        // Not done: the lane retries it after its backoff.
                        run.b.batch.dlq_actions_done.pop();
                    }
                }
                DlqAction::ReplayKey => run.replay_key(&key)?,
                DlqAction::PauseKey(_) | DlqAction::ResumeKey(_) => {}
            }
        }
        run.b.finish(None)
    }

    fn dead_letter(
        &self,
        msg: &Message,
        kind: &str,
        error: String,
        attempts: u32,
        first: u64,
    ) -> DeadLetter {
        DeadLetter {
            handler: self.ctx.handler.to_string(),
            version: self.active.for_key(&msg.partition_key).version,
            topic: msg.topic.clone(),
            partition: self.partition,
            offset: msg.offset,
            partition_key: msg.partition_key.clone(),
            idempotency_key: msg.idempotency_key.clone(),
            payload: msg.payload.clone(),
            headers: msg.headers.clone(),
            error_kind: kind.to_string(),
            error,
            attempts,
            first_failure_ms: first,
            last_failure_ms: first,
        }
    }
}

/// How one replay went.
enum Replayed {
    /// Committed (or found already committed): removed from the queue.
    Done,
    /// Failed for good again: stays in the queue, updated; its key is blocked.
    Failed,
    /// Not done yet: failed retryably (the lane retries after a backoff) or
    /// the batch is full.
    Retry,
}

/// One batch of operator actions being carried out.
struct ActionRun<'a> {
    b: Builder<'a>,
    /// Dead-letter sequences per partition key, oldest first, as of now.
    backlog: HashMap<String, VecDeque<u64>>,
    /// Keys whose replay failed in this batch: their later replays wait.
    blocked: HashSet<String>,
    /// Idempotency keys committed in this batch.
    committed: HashSet<String>,
    /// Handler invocations so far (bounded by the batch size).
    invocations: usize,
}

impl ActionRun<'_> {
    /// Whether `key` is parked, counting this batch's changes.
    fn is_parked(&self, key: &str) -> bool {
        let o = &self.b.outcome;
        if o.unparked.iter().any(|k| k == key) {
            return false;
        }
        self.b.lane.parked.contains(key) || o.parked.iter().any(|k| k == key)
    }

    /// Replays the key's backlog, oldest first (messages held since the
    /// request included), until it is drained, a replay fails, or the batch
    /// is full (then a continuation request is written).
    fn replay_key(&mut self, key: &str) -> anyhow::Result<()> {
        if self.blocked.contains(key) {
            return Ok(());
        }
        let lane = self.b.lane;
        let (handler, partition) = (&*lane.ctx.handler, lane.partition);
        while let Some(head) = self.backlog.get(key).and_then(|q| q.front().copied()) {
            let Some(dl) = lane.ctx.ledger.dlq_get(handler, head)? else {
                self.remove(head, key);
                continue;
            };
            let outcome = if self.invocations >= lane.ctx.max_batch {
                Replayed::Retry
            } else {
                self.replay(head, dl)?
            };
            match outcome {
                Replayed::Done => {}
                Replayed::Failed => break,
                Replayed::Retry => {
                    // Carry on from here in a later batch.
                    self.b.batch.dlq_actions_new.push((
                        handler.to_string(),
                        partition,
                        head,
                        DlqAction::ReplayKey,
                    ));
                    break;
                }
            }
        }
        Ok(())
    }

    /// Removes a dead letter; unparks its key when that drains the backlog.
    fn remove(&mut self, seq: u64, key: &str) {
        self.b.put_dead_letter(seq, None);
        if let Some(q) = self.backlog.get_mut(key) {
            q.retain(|s| *s != seq);
        }
        let drained = self.backlog.get(key).is_none_or(VecDeque::is_empty);
        if self.is_parked(key) && drained && !self.blocked.contains(key) {
            tracing::info!(handler = %self.b.lane.ctx.handler, partition = self.b.lane.partition, key, "backlog drained; key unparked");
            self.b.set_parked(key, None);
        }
    }

    /// Runs a dead letter through the current version (dedup applies).
    fn replay(&mut self, seq: u64, dl: DeadLetter) -> anyhow::Result<Replayed> {
        let lane = self.b.lane;
        let (handler, partition) = (&*lane.ctx.handler, lane.partition);
        let key = dl.partition_key.clone();
        let done_before = self.committed.contains(&dl.idempotency_key)
            || lane
                .ctx
                .ledger
                .dedup_get(handler, &dl.idempotency_key)?
                .is_some_and(|r| r.outcome == DedupOutcome::Committed);
        if done_before {
            self.b.outcome.counts.duplicates += 1;
            self.remove(seq, &key);
            return Ok(Replayed::Done);
        }
        let item = ItemId::Replay(seq);
        let (attempt, first) = RetryState::next_attempt(lane.retry, item);
        let hash = payload_hash(&dl.payload);
        let msg = Message {
            topic: dl.topic.clone(),
            partition_key: key.clone(),
            idempotency_key: dl.idempotency_key.clone(),
            offset: dl.offset,
            payload: dl.payload.clone(),
            headers: dl.headers.clone(),
            attempt,
        };
        self.invocations += 1;
        match self.b.invoke(&msg)? {
            Ok(()) => {
                tracing::info!(handler, partition, seq, key = %key, "dead letter replayed");
                crate::crash::point("mid-replay");
                self.committed.insert(dl.idempotency_key.clone());
                self.b.dedup(
                    &key,
                    dl.idempotency_key,
                    dl.offset,
                    partition,
                    hash,
                    DedupOutcome::Committed,
                );
                self.b.outcome.counts.processed += 1;
                self.b.outcome.counts.replayed += 1;
                self.remove(seq, &key);
                Ok(Replayed::Done)
            }
            Err(f) => match self.b.verdict(&key, item, attempt, first, f) {
                Verdict::Retry(r) => {
                    self.b.outcome.retry = Some(r);
                    Ok(Replayed::Retry)
                }
                Verdict::DeadLetter(kind, error, attempts, _) => {
                    tracing::warn!(handler, partition, seq, key = %key, kind = %kind, error = %error, "replayed dead letter failed again");
                    let mut again = dl;
                    again.version = lane.active.for_key(&key).version;
                    again.error_kind = kind;
                    again.error = error;
                    again.attempts = again.attempts.saturating_add(attempts);
                    again.last_failure_ms = now_ms();
                    self.b.put_dead_letter(seq, Some(again));
                    self.blocked.insert(key);
                    Ok(Replayed::Failed)
                }
            },
        }
    }
}
