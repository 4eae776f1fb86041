//! One lane: serial processing of one partition for one handler.

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::{watch, Semaphore};

use super::stats::{BatchCounts, HandlerStats};
use crate::ledger::{
    now_ms, CommitBatch, DeadLetter, DedupOutcome, DedupRecord, Envelope, GroupCommitter, Ledger,
};
use crate::runtime::{FailureKind, HandlerModule, Message, StateAccess};
use crate::source::topics::Topics;

/// The handler version a lane runs; swapped between batches.
#[derive(Clone)]
pub struct ActiveVersion {
    /// Version number (1, 2, ...).
    pub version: u64,
    /// The loaded component.
    pub module: HandlerModule,
}

/// Everything a lane needs, shared by the lanes of one handler.
#[derive(Clone)]
pub struct LaneContext {
    /// Handler name.
    pub handler: Arc<str>,
    /// Topic it consumes.
    pub topic: Arc<str>,
    /// The ledger.
    pub ledger: Ledger,
    /// Group commit.
    pub committer: GroupCommitter,
    /// Topic registry (partition counts, watermarks).
    pub topics: Topics,
    /// The current version; lanes pick it up at batch boundaries.
    pub active: watch::Receiver<Option<Arc<ActiveVersion>>>,
    /// Counters.
    pub stats: Arc<HandlerStats>,
    /// Bounds concurrent invocations to the runtime's instance pool.
    pub exec_slots: Arc<Semaphore>,
    /// Set to `true` to stop the lane after its current batch.
    pub stop: watch::Receiver<bool>,
    /// Messages per transaction, at most.
    pub max_batch: usize,
}

/// Uncommitted state writes of one partition key within a batch.
type PendingWrites = BTreeMap<String, Option<Vec<u8>>>;

/// The source name recorded in cursors and default idempotency keys.
pub const EMBEDDED_SOURCE: &str = "log";

/// Runs the lane for `partition` until stopped.
pub async fn run_lane(ctx: LaneContext, partition: u32) {
    let handler = ctx.handler.clone();
    let mut stop = ctx.stop.clone();
    let mut active_rx = ctx.active.clone();
    let mut watermark = ctx.topics.watch(&ctx.topic, partition);
    let mut cursor = match ctx.ledger.cursor(&handler, EMBEDDED_SOURCE, partition) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(%handler, partition, error = %e, "cannot read cursor; lane not started");
            return;
        }
    };
    let mut backoff = Duration::from_millis(50);
    loop {
        if *stop.borrow() {
            break;
        }
        let active = active_rx.borrow().clone();
        let Some(active) = active else {
            // Paused/undeployed: wait for a version or a stop.
            tokio::select! {
                _ = active_rx.changed() => {}
                _ = stop.changed() => {}
            }
            continue;
        };
        if *watermark.borrow() <= cursor {
            tokio::select! {
                r = watermark.changed() => if r.is_err() { break },
                _ = stop.changed() => {}
                _ = active_rx.changed() => {}
            }
            continue;
        }
        let Ok(permit) = ctx.exec_slots.clone().acquire_owned().await else {
            break;
        };
        let job_ctx = ctx.clone();
        let result = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            process_batch(&job_ctx, &active, partition, cursor)
        })
        .await;
        let outcome = match result {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(e)) => {
                tracing::error!(%handler, partition, error = %format!("{e:#}"), "batch failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
            Err(e) => {
                tracing::error!(%handler, partition, error = %e, "batch task panicked; retrying");
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        if let Err(e) = ctx.committer.wait_durable(outcome.ticket).await {
            // Not durable: never count or move on. The committer is now
            // failed; the host stops acknowledging and must be restarted.
            tracing::error!(%handler, partition, error = %e, "commit not durable; lane stopped");
            break;
        }
        backoff = Duration::from_millis(50);
        cursor = outcome.next_cursor;
        ctx.stats.add(&outcome.counts);
        for (topic, partition) in outcome.appended {
            ctx.topics.refresh(&ctx.ledger, &topic, partition);
        }
    }
}

struct BatchOutcome {
    ticket: u64,
    next_cursor: u64,
    counts: BatchCounts,
    /// Embedded-log partitions that received emitted messages.
    appended: Vec<(String, u32)>,
}

/// Committed state of one partition key, with the batch's uncommitted writes
/// layered on top (earlier messages of the same batch must be visible).
struct BatchState {
    ledger: Ledger,
    handler: Arc<str>,
    partition_key: String,
    pending: BTreeMap<String, Option<Vec<u8>>>,
}

impl StateAccess for BatchState {
    fn get(&mut self, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        if let Some(v) = self.pending.get(key) {
            return Ok(v.clone());
        }
        Ok(self
            .ledger
            .state_get(&self.handler, &self.partition_key, key)?)
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

/// Processes up to `max_batch` messages from `from` and commits them as one
/// transaction. Blocking (runs guest code and ledger I/O).
fn process_batch(
    ctx: &LaneContext,
    active: &ActiveVersion,
    partition: u32,
    from: u64,
) -> anyhow::Result<BatchOutcome> {
    let handler = &*ctx.handler;
    let topic = &*ctx.topic;
    let entries = ctx.ledger.read(topic, partition, from, ctx.max_batch)?;
    let mut batch = CommitBatch::default();
    let mut counts = BatchCounts::default();
    let mut pending: HashMap<String, BTreeMap<String, Option<Vec<u8>>>> = HashMap::new();
    let mut seen: HashMap<String, [u8; 16]> = HashMap::new();
    let mut appended: Vec<(String, u32)> = Vec::new();
    let mut next_cursor = from;

    for (offset, envelope) in entries {
        next_cursor = offset + 1;
        let idempotency_key = envelope
            .idempotency_key
            .clone()
            .unwrap_or_else(|| format!("{EMBEDDED_SOURCE}:{topic}/{partition}/{offset}"));
        let hash = payload_hash(&envelope.payload);

        let earlier = match seen.get(&idempotency_key) {
            Some(h) => Some(*h),
            None => ctx
                .ledger
                .dedup_get(handler, &idempotency_key)?
                .map(|r| r.payload_hash),
        };
        if let Some(earlier_hash) = earlier {
            counts.duplicates += 1;
            if earlier_hash != hash {
                counts.conflicts += 1;
                tracing::warn!(
                    handler, partition, offset, idempotency_key = %idempotency_key,
                    "duplicate idempotency key with a different payload: skipped (conflict)"
                );
            }
            continue;
        }
        seen.insert(idempotency_key.clone(), hash);

        let msg = Message {
            topic: topic.to_string(),
            partition_key: envelope.key.clone(),
            idempotency_key: idempotency_key.clone(),
            offset,
            payload: envelope.payload,
            headers: envelope.headers,
            attempt: 1,
        };
        let (invocation, state) =
            invoke_with_host_retries(ctx, active, &msg, &mut pending, &mut counts)?;
        let state_back = state;
        pending.insert(msg.partition_key.clone(), state_back);

        let now = now_ms();
        let outcome = match invocation.outcome {
            Ok(()) => {
                let key_pending = pending.entry(msg.partition_key.clone()).or_default();
                for (k, v) in invocation.overlay.writes {
                    key_pending.insert(k, v);
                }
                for (i, emit) in invocation.overlay.emits.into_iter().enumerate() {
                    let partitions = ctx.topics.ensure(&ctx.ledger, &emit.topic)?;
                    let target = crate::source::partition_for(&emit.partition_key, partitions);
                    batch.log_appends.push((
                        emit.topic.clone(),
                        target,
                        Envelope {
                            key: emit.partition_key,
                            idempotency_key: Some(format!("{handler}/{idempotency_key}/{i}")),
                            payload: emit.payload,
                            headers: emit.headers,
                            appended_at_ms: now,
                        },
                    ));
                    appended.push((emit.topic, target));
                }
                counts.processed += 1;
                DedupOutcome::Committed
            }
            Err(failure) => {
                tracing::warn!(
                    handler, partition, offset, idempotency_key = %idempotency_key,
                    kind = %failure.kind, error = %failure.message, "message dead-lettered"
                );
                batch.dlq.push(DeadLetter {
                    handler: handler.to_string(),
                    version: active.version,
                    topic: topic.to_string(),
                    partition,
                    offset,
                    partition_key: msg.partition_key,
                    idempotency_key: idempotency_key.clone(),
                    payload: msg.payload,
                    headers: msg.headers,
                    error_kind: failure.kind.as_str().to_string(),
                    error: failure.message,
                    attempts: msg.attempt,
                    first_failure_ms: now,
                    last_failure_ms: now,
                });
                counts.dead_lettered += 1;
                DedupOutcome::DeadLettered
            }
        };
        batch.dedup.push((
            handler.to_string(),
            idempotency_key,
            DedupRecord {
                offset,
                partition,
                version: active.version,
                payload_hash: hash,
                committed_at_ms: now,
                outcome,
            },
        ));
    }

    for (partition_key, writes) in pending {
        for (state_key, value) in writes {
            batch
                .state
                .push((handler.to_string(), partition_key.clone(), state_key, value));
        }
    }
    batch.cursors.push((
        handler.to_string(),
        EMBEDDED_SOURCE.to_string(),
        partition,
        next_cursor,
    ));
    let ticket = ctx.committer.commit(&batch)?;
    Ok(BatchOutcome {
        ticket,
        next_cursor,
        counts,
        appended,
    })
}

/// Invokes the handler, retrying in place while the failure is the host's
/// (e.g. instance pool exhausted), never the message's.
fn invoke_with_host_retries(
    ctx: &LaneContext,
    active: &ActiveVersion,
    msg: &Message,
    pending: &mut HashMap<String, PendingWrites>,
    counts: &mut BatchCounts,
) -> anyhow::Result<(crate::runtime::Invocation, PendingWrites)> {
    let mut key_pending = pending.remove(&msg.partition_key).unwrap_or_default();
    let mut delay = Duration::from_millis(10);
    for _ in 0..20 {
        let view = BatchState {
            ledger: ctx.ledger.clone(),
            handler: ctx.handler.clone(),
            partition_key: msg.partition_key.clone(),
            pending: key_pending,
        };
        let (invocation, state) = active.module.invoke(msg, Box::new(view));
        key_pending = state
            .into_any()
            .downcast::<BatchState>()
            .map(|s| s.pending)
            .map_err(|_| anyhow::anyhow!("state view of another type returned"))?;
        match &invocation.outcome {
            Err(f) if f.kind == FailureKind::Host => {
                counts.retries += 1;
                tracing::warn!(handler = %ctx.handler, error = %f.message, "host could not run handler; retrying");
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            _ => return Ok((invocation, key_pending)),
        }
    }
    anyhow::bail!(
        "host could not run handler {} after repeated attempts",
        ctx.handler
    )
}
