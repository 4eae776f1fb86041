//! NATS JetStream as a message source and as an outbox target.
//!
//! A JetStream topic maps to a stream whose partition `p` is the subject
//! `<subject>.<p>`; its lane for a handler reads that subject in stream
//! sequence order through an ordered pull consumer (no acks: the server
//! keeps no position for ordo). The position authority is the ledger
//! cursor — the next stream sequence to process, written in the same
//! transaction as the state — so a restart resumes exactly after the last
//! committed message, whatever the broker remembers.
//!
//! Messages a handler emits to a JetStream topic go to the ledger's outbox
//! in the handler's transaction; the relay ([`relay_loop`]) publishes them
//! once durable, with `Nats-Msg-Id` set to the entry's stable id, and deletes
//! an entry only after the broker acknowledged it.
//!
//! Architecture invariant: a lane never moves its cursor past a message it
//! has not committed; the broker's view of delivery is never trusted.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull::OrderedConfig, consumer::DeliverPolicy};
use futures_util::{FutureExt, StreamExt};
use serde::{Deserialize, Serialize};

use crate::ledger::{Envelope, Ledger, OutboxEntry};

/// Header that carries the partition key, unless configured otherwise.
pub const DEFAULT_KEY_HEADER: &str = "Ordo-Key";
/// Header that carries the idempotency key, unless configured otherwise.
pub const DEFAULT_IDEMPOTENCY_HEADER: &str = "Nats-Msg-Id";

/// How one topic maps onto JetStream (`[topics.NAME.jetstream]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JetStreamConfig {
    /// Server URL(s), comma-separated.
    pub url: String,
    /// Stream name (default: the topic name).
    pub stream: Option<String>,
    /// Subject prefix; partition `p` is `<subject>.<p>` (default: the topic
    /// name).
    pub subject: Option<String>,
    /// Partitions (subjects) the stream is split into.
    pub partitions: u32,
    /// Header carrying the partition key; a message without it is keyed by
    /// its subject.
    pub key_header: String,
    /// Header carrying the idempotency key; without it the key is
    /// `nats:<stream>/<partition>/<stream sequence>`.
    pub idempotency_header: String,
    /// Create the stream (file storage, subjects `<subject>.*`) when missing.
    pub create_stream: bool,
    /// Messages a lane buffers ahead of its handler, at most.
    pub max_in_flight: usize,
}

impl Default for JetStreamConfig {
    fn default() -> Self {
        JetStreamConfig {
            url: "nats://127.0.0.1:4222".into(),
            stream: None,
            subject: None,
            partitions: 16,
            key_header: DEFAULT_KEY_HEADER.into(),
            idempotency_header: DEFAULT_IDEMPOTENCY_HEADER.into(),
            create_stream: true,
            max_in_flight: 512,
        }
    }
}

impl JetStreamConfig {
    /// Checks the values that the server would otherwise refuse late.
    pub fn validate(&self) -> Result<(), String> {
        if self.url.trim().is_empty() {
            return Err("url: must not be empty".into());
        }
        if !(1..=4096).contains(&self.partitions) {
            return Err(format!(
                "partitions: must be 1..=4096, got {}",
                self.partitions
            ));
        }
        if self.max_in_flight == 0 {
            return Err("max_in_flight: must be at least 1".into());
        }
        if let Some(s) = &self.stream {
            if s.is_empty() || s.contains(['.', ' ', '*', '>', '/', '\\']) {
                return Err(format!(
                    "stream: {s:?} is not a valid stream name (no '.', ' ', '*', '>', '/')"
                ));
            }
        }
        if let Some(s) = &self.subject {
            if s.is_empty() || s.contains([' ', '*', '>']) || s.ends_with('.') {
                return Err(format!("subject: {s:?} is not a valid subject prefix"));
            }
        }
        for (what, h) in [
            ("key_header", &self.key_header),
            ("idempotency_header", &self.idempotency_header),
        ] {
            if h.is_empty() || h.contains([':', ' ', '\r', '\n']) {
                return Err(format!("{what}: {h:?} is not a valid header name"));
            }
        }
        Ok(())
    }
}

/// A JetStream topic, resolved and connected.
pub struct JsTopic {
    /// ordo topic name.
    pub topic: String,
    /// Its settings.
    pub config: JetStreamConfig,
    /// Stream name.
    pub stream: String,
    /// Subject prefix.
    pub subject: String,
    context: jetstream::Context,
    /// Lag per (handler, partition): what the broker reported pending
    /// after the last message the lane received plus what it buffers.
    lags: Mutex<HashMap<(String, u32), Arc<AtomicU64>>>,
}

impl JsTopic {
    /// The subject of `partition`.
    pub fn partition_subject(&self, partition: u32) -> String {
        format!("{}.{partition}", self.subject)
    }

    /// The source name recorded in this topic's cursors.
    pub fn source_name(&self) -> String {
        format!("nats:{}", self.stream)
    }

    fn lag_counter(&self, handler: &str, partition: u32) -> Arc<AtomicU64> {
        let mut map = self.lags.lock().unwrap_or_else(|p| p.into_inner());
        map.entry((handler.to_string(), partition))
            .or_default()
            .clone()
    }

    /// Messages of `partition` not yet committed by `handler`: what the
    /// broker reported pending after the last message the lane received,
    /// plus what the lane holds uncommitted. 0 before the lane received
    /// anything.
    pub fn lag(&self, handler: &str, partition: u32) -> u64 {
        self.lag_counter(handler, partition).load(Ordering::Relaxed)
    }

    /// The stream, created when missing if configured so.
    async fn stream(&self) -> anyhow::Result<jetstream::stream::Stream> {
        if self.config.create_stream {
            Ok(self
                .context
                .get_or_create_stream(jetstream::stream::Config {
                    name: self.stream.clone(),
                    subjects: vec![format!("{}.*", self.subject)],
                    storage: jetstream::stream::StorageType::File,
                    ..Default::default()
                })
                .await?)
        } else {
            Ok(self.context.get_stream(&self.stream).await?)
        }
    }

    /// Publishes without waiting for the ack; await the returned future.
    pub async fn publish_nowait(
        &self,
        partition: u32,
        key: &str,
        msg_id: Option<&str>,
        headers: &[(String, String)],
        payload: Vec<u8>,
    ) -> anyhow::Result<jetstream::context::PublishAckFuture> {
        let mut map = async_nats::HeaderMap::new();
        for (k, v) in headers {
            map.insert(k.as_str(), v.as_str());
        }
        map.insert(self.config.key_header.as_str(), key);
        if let Some(id) = msg_id {
            map.insert(self.config.idempotency_header.as_str(), id);
            if !self
                .config
                .idempotency_header
                .eq_ignore_ascii_case(DEFAULT_IDEMPOTENCY_HEADER)
            {
                // Let the broker drop retries of the same publish too.
                map.insert(DEFAULT_IDEMPOTENCY_HEADER, id);
            }
        }
        Ok(self
            .context
            .publish_with_headers(self.partition_subject(partition), map, payload.into())
            .await?)
    }
}

/// The JetStream topics of a host, by ordo topic name.
#[derive(Clone, Default)]
pub struct JetStreams {
    topics: Arc<HashMap<String, Arc<JsTopic>>>,
}

impl JetStreams {
    /// Connects to every configured server. Connection happens in the
    /// background: a broker that is down delays messages, not the host.
    pub async fn connect(configs: &[(String, JetStreamConfig)]) -> anyhow::Result<JetStreams> {
        let mut clients: HashMap<String, async_nats::Client> = HashMap::new();
        let mut topics = HashMap::new();
        for (topic, config) in configs {
            config
                .validate()
                .map_err(|e| anyhow::anyhow!("topic {topic}: jetstream.{e}"))?;
            let client = match clients.get(&config.url) {
                Some(c) => c.clone(),
                None => {
                    let url = config.url.clone();
                    let c = async_nats::ConnectOptions::new()
                        .name("ordo")
                        .retry_on_initial_connect()
                        .event_callback(move |event| {
                            let url = url.clone();
                            async move { tracing::info!(%url, %event, "nats connection event") }
                        })
                        .connect(config.url.as_str())
                        .await
                        .map_err(|e| anyhow::anyhow!("topic {topic}: nats {}: {e}", config.url))?;
                    clients.insert(config.url.clone(), c.clone());
                    c
                }
            };
            topics.insert(
                topic.clone(),
                Arc::new(JsTopic {
                    topic: topic.clone(),
                    stream: config.stream.clone().unwrap_or_else(|| topic.clone()),
                    subject: config.subject.clone().unwrap_or_else(|| topic.clone()),
                    config: config.clone(),
                    context: jetstream::new(client),
                    lags: Mutex::new(HashMap::new()),
                }),
            );
        }
        Ok(JetStreams {
            topics: Arc::new(topics),
        })
    }

    /// The JetStream topic `name`, if it is one.
    pub fn get(&self, name: &str) -> Option<Arc<JsTopic>> {
        self.topics.get(name).cloned()
    }

    /// Every JetStream topic.
    pub fn all(&self) -> impl Iterator<Item = &Arc<JsTopic>> {
        self.topics.values()
    }
}

/// One lane's reader of one partition subject: a bounded buffer filled from
/// an ordered consumer that starts at the lane's committed cursor.
pub struct PartitionReader {
    topic: Arc<JsTopic>,
    partition: u32,
    handler: String,
    buf: VecDeque<(u64, Envelope)>,
    messages: Option<jetstream::consumer::pull::Ordered>,
    /// The next stream sequence to ask for when (re)creating the consumer.
    next_seq: u64,
    /// Pending count of the last message received.
    last_pending: u64,
    lag: Arc<AtomicU64>,
    failures: u32,
}

impl PartitionReader {
    /// A reader of `partition` for `handler`, starting at stream sequence
    /// `cursor` (0 and 1 both mean the beginning).
    pub fn new(topic: Arc<JsTopic>, handler: &str, partition: u32, cursor: u64) -> Self {
        let lag = topic.lag_counter(handler, partition);
        PartitionReader {
            topic,
            partition,
            handler: handler.to_string(),
            buf: VecDeque::new(),
            messages: None,
            next_seq: cursor.max(1),
            last_pending: 0,
            lag,
            failures: 0,
        }
    }

    /// Forgets buffered messages before `next` (committed or skipped).
    pub fn committed(&mut self, next: u64) {
        while self.buf.front().is_some_and(|(seq, _)| *seq < next) {
            self.buf.pop_front();
        }
        self.update_lag();
    }

    fn update_lag(&self) {
        self.lag
            .store(self.last_pending + self.buf.len() as u64, Ordering::Relaxed);
    }

    /// Whether messages are buffered (pulls what already arrived first).
    pub fn ready(&mut self) -> bool {
        self.pull_arrived();
        !self.buf.is_empty()
    }

    /// Up to `max` buffered messages from `from` on, in order.
    pub fn batch(&mut self, from: u64, max: usize) -> Vec<(u64, Envelope)> {
        self.committed(from);
        self.pull_arrived();
        self.buf.iter().take(max).cloned().collect()
    }

    /// Takes messages that already arrived, without waiting, up to the
    /// in-flight bound.
    fn pull_arrived(&mut self) {
        while self.buf.len() < self.topic.config.max_in_flight {
            let Some(stream) = self.messages.as_mut() else {
                return;
            };
            match stream.next().now_or_never() {
                Some(item) => self.take(item),
                None => return,
            }
        }
    }

    /// Waits until at least one message is buffered. Cancel-safe: a message
    /// that arrived is buffered before this returns or is dropped.
    pub async fn wait(&mut self) {
        while self.buf.is_empty() {
            if self.messages.is_none() {
                if self.failures > 0 {
                    let ms = (100u64 << self.failures.min(6)).min(5_000);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                let opened = open_consumer(self.topic.clone(), self.partition, self.next_seq).await;
                match opened {
                    Ok(m) => {
                        self.messages = Some(m);
                    }
                    Err(e) => {
                        self.failures += 1;
                        tracing::warn!(
                            handler = %self.handler, topic = %self.topic.topic, partition = self.partition,
                            error = %format!("{e:#}"), attempt = self.failures,
                            "cannot open the JetStream consumer; retrying"
                        );
                        continue;
                    }
                }
            }
            let Some(stream) = self.messages.as_mut() else {
                continue;
            };
            let item = stream.next().await;
            self.take(item);
        }
    }

    fn take(
        &mut self,
        item: Option<Result<jetstream::Message, jetstream::consumer::pull::OrderedError>>,
    ) {
        match item {
            Some(Ok(m)) => match self.envelope(&m) {
                Ok((seq, env)) => {
                    self.failures = 0;
                    if seq >= self.next_seq {
                        self.next_seq = seq + 1;
                        self.buf.push_back((seq, env));
                    }
                    self.update_lag();
                }
                Err(e) => {
                    tracing::warn!(handler = %self.handler, topic = %self.topic.topic, partition = self.partition, error = %e, "unreadable JetStream message metadata; reopening the consumer");
                    self.reopen();
                }
            },
            Some(Err(e)) => {
                tracing::warn!(handler = %self.handler, topic = %self.topic.topic, partition = self.partition, error = %e, "JetStream consumer failed; reopening it");
                self.reopen();
            }
            None => self.reopen(),
        }
    }

    fn reopen(&mut self) {
        self.messages = None;
        self.failures += 1;
    }

    fn envelope(&mut self, m: &jetstream::Message) -> anyhow::Result<(u64, Envelope)> {
        let info = m.info().map_err(|e| anyhow::anyhow!("{e}"))?;
        let seq = info.stream_sequence;
        self.last_pending = info.pending;
        let published_ms = (info.published.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
        let cfg = &self.topic.config;
        let mut key = None;
        let mut idempotency_key = None;
        let mut headers = Vec::new();
        if let Some(h) = &m.headers {
            for (name, values) in h.iter() {
                let name = name.to_string();
                for v in values {
                    let v = v.as_str();
                    if name.eq_ignore_ascii_case(&cfg.key_header) {
                        key = Some(v.to_string());
                    } else if name.eq_ignore_ascii_case(&cfg.idempotency_header) {
                        idempotency_key = Some(v.to_string());
                    } else {
                        headers.push((name.clone(), v.to_string()));
                    }
                }
            }
        }
        headers.sort();
        Ok((
            seq,
            Envelope {
                key: key
                    .filter(|k| !k.is_empty())
                    .unwrap_or_else(|| m.subject.to_string()),
                idempotency_key: idempotency_key.filter(|k| !k.is_empty() && k.len() <= 512),
                payload: m.payload.to_vec(),
                headers,
                appended_at_ms: published_ms,
            },
        ))
    }
}

/// Waits for the broker's acks of pipelined publishes, in order; returns
/// their stream sequences.
pub async fn await_acks(
    acks: Vec<jetstream::context::PublishAckFuture>,
) -> anyhow::Result<Vec<u64>> {
    let mut sequences = Vec::with_capacity(acks.len());
    for ack in acks {
        let ack = tokio::time::timeout(Duration::from_secs(10), ack)
            .await
            .map_err(|_| {
                anyhow::anyhow!("JetStream did not acknowledge a publish within 10 s")
            })??;
        sequences.push(ack.sequence);
    }
    Ok(sequences)
}

/// An ordered consumer of `partition`'s subject from `start` on.
async fn open_consumer(
    topic: Arc<JsTopic>,
    partition: u32,
    start: u64,
) -> anyhow::Result<jetstream::consumer::pull::Ordered> {
    let stream = topic.stream().await?;
    let consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject: topic.partition_subject(partition),
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
            max_batch: topic.config.max_in_flight.min(500) as i64,
            ..Default::default()
        })
        .await?;
    Ok(consumer.messages().await?)
}

/// The stable message id of an outbox entry: the producing handler, the
/// idempotency key of the message that emitted it and the emit's index.
pub fn outbox_msg_id(handler: &str, idempotency_key: &str, index: usize) -> String {
    format!("{handler}/{idempotency_key}/{index}")
}

/// Relay statistics.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Entries published and acknowledged.
    pub published: AtomicU64,
    /// Publish attempts that failed (the entries stay).
    pub failures: AtomicU64,
    /// Entries waiting.
    pub backlog: AtomicU64,
}

/// Publishes committed outbox entries until `stop`. Each round takes the
/// oldest entries, waits until they are durable (a group-commit barrier),
/// publishes them, and deletes them once the broker acknowledged each.
pub async fn relay_loop(
    ledger: Ledger,
    committer: crate::ledger::GroupCommitter,
    streams: JetStreams,
    wake: Arc<tokio::sync::Notify>,
    stats: Arc<RelayStats>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if *stop.borrow() {
            return;
        }
        let entries = match ledger.outbox_scan(256) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the outbox");
                Vec::new()
            }
        };
        stats
            .backlog
            .store(ledger.outbox_len() as u64, Ordering::Relaxed);
        if entries.is_empty() {
            tokio::select! {
                _ = wake.notified() => {}
                _ = stop.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        }
        match relay_round(&committer, &streams, &entries).await {
            Ok(ids) if ids.is_empty() => {
                // Only entries for topics that are not (or no longer) on
                // JetStream: kept, and reported until configured again.
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    _ = stop.changed() => {}
                }
            }
            Ok(ids) => {
                crate::crash::point("mid-outbox-relay");
                if let Err(e) = ledger.outbox_remove(&ids) {
                    tracing::error!(error = %e, "cannot remove relayed outbox entries");
                }
                stats
                    .published
                    .fetch_add(ids.len() as u64, Ordering::Relaxed);
                backoff = Duration::from_millis(100);
            }
            Err(e) => {
                stats.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %format!("{e:#}"), backlog = ledger.outbox_len(), wait_ms = backoff.as_millis() as u64, "outbox relay failed; entries kept, retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Publishes `entries` once durable; returns the ids the broker acknowledged.
async fn relay_round(
    committer: &crate::ledger::GroupCommitter,
    streams: &JetStreams,
    entries: &[(u64, OutboxEntry)],
) -> anyhow::Result<Vec<u64>> {
    // Entries become visible when applied; only durable ones may leave.
    committer.barrier().await?;
    let mut ids = Vec::with_capacity(entries.len());
    let mut acks = Vec::with_capacity(entries.len());
    for (id, e) in entries {
        let Some(topic) = streams.get(&e.topic) else {
            tracing::error!(
                id, topic = %e.topic,
                "outbox entry for a topic that is not on JetStream; kept until it is configured"
            );
            continue;
        };
        let partition = crate::source::partition_for(&e.key, topic.config.partitions);
        let ack = topic
            .publish_nowait(
                partition,
                &e.key,
                Some(&e.msg_id),
                &e.headers,
                e.payload.clone(),
            )
            .await?;
        ids.push(*id);
        acks.push(ack);
    }
    await_acks(acks).await?;
    Ok(ids)
}
