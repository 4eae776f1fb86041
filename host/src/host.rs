//! The host: ties the ledger, the runtime, the topics and the lanes together.
//! The HTTP API and `ordo serve` drive it; tests can drive it directly.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use crate::api::ingest::IncomingMessage;
use crate::dispatch::{run_lane, ActiveVersion, HandlerStats, LaneContext};
use crate::ledger::{now_ms, Envelope, GroupCommitter, HandlerVersion, Ledger, TopicConfig};
use crate::runtime::{HandlerLimits, LoadError, Runtime, RuntimeConfig};
use crate::source::{partition_for, Topics};

/// Host-wide settings.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Defaults for topics created on first use.
    pub topic_defaults: TopicConfig,
    /// Messages per lane transaction, at most.
    pub max_batch: usize,
    /// Sandbox limits for newly deployed handlers.
    pub handler_limits: HandlerLimits,
    /// Process-wide sandbox settings.
    pub runtime: RuntimeConfig,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            topic_defaults: TopicConfig::default(),
            max_batch: 256,
            handler_limits: HandlerLimits::default(),
            runtime: RuntimeConfig::default(),
        }
    }
}

/// Why a deploy was refused.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// The component failed validation.
    #[error(transparent)]
    Invalid(#[from] LoadError),
    /// The request is inconsistent with what is deployed.
    #[error("{0}")]
    Conflict(String),
    /// Bad name or topic.
    #[error("{0}")]
    BadRequest(String),
    /// The ledger failed.
    #[error("ledger: {0:#}")]
    Internal(anyhow::Error),
}

struct HandlerSlot {
    topic: String,
    active: watch::Sender<Option<Arc<ActiveVersion>>>,
    stats: Arc<HandlerStats>,
    lanes: Vec<JoinHandle<()>>,
}

/// Per-handler status, as served by `GET /v1/status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HandlerStatus {
    /// Handler name.
    pub name: String,
    /// Active version.
    pub version: u64,
    /// Consumed topic.
    pub topic: String,
    /// Messages in the topic not yet committed by this handler.
    pub lag: u64,
    /// Messages committed since the host started.
    pub processed: u64,
    /// Duplicates skipped since the host started.
    pub duplicates: u64,
    /// Duplicates with a different payload since the host started.
    pub conflicts: u64,
    /// Messages in the dead-letter queue.
    pub dead_lettered: u64,
}

/// The running host.
pub struct Host {
    ledger: Ledger,
    committer: GroupCommitter,
    runtime: Runtime,
    topics: Topics,
    config: HostConfig,
    exec_slots: Arc<Semaphore>,
    stop: watch::Sender<bool>,
    handlers: Mutex<HashMap<String, HandlerSlot>>,
    deploy_lock: tokio::sync::Mutex<()>,
}

impl Host {
    /// Opens the ledger in `data_dir`, starts the committer and restores every
    /// deployed handler's active version.
    pub async fn open(data_dir: &Path, mut config: HostConfig) -> anyhow::Result<Arc<Host>> {
        std::fs::create_dir_all(data_dir)?;
        if config.runtime.cache_dir.is_none() {
            config.runtime.cache_dir = Some(data_dir.join("compiled"));
        }
        let ledger = Ledger::open(&data_dir.join("ledger"))?;
        let committer = GroupCommitter::start(ledger.clone());
        let runtime = Runtime::new(config.runtime.clone())?;
        let topics = Topics::new(config.topic_defaults.clone());
        for name in ledger.topics()? {
            topics.ensure(&ledger, &name)?;
        }
        let host = Arc::new(Host {
            exec_slots: Arc::new(Semaphore::new(
                config.runtime.max_concurrent_instances as usize,
            )),
            ledger,
            committer,
            runtime,
            topics,
            config,
            stop: watch::Sender::new(false),
            handlers: Mutex::new(HashMap::new()),
            deploy_lock: tokio::sync::Mutex::new(()),
        });
        host.restore().await?;
        Ok(host)
    }

    /// The ledger.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The group committer.
    pub fn committer(&self) -> &GroupCommitter {
        &self.committer
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<String, HandlerSlot>> {
        self.handlers.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn restore(self: &Arc<Self>) -> anyhow::Result<()> {
        for record in self.ledger.all_handlers()? {
            let Some(bytes) = self.ledger.get_artifact(&record.content_hash)? else {
                tracing::error!(handler = %record.name, version = record.version, "component bytes missing from the ledger; handler not started");
                continue;
            };
            let runtime = self.runtime.clone();
            let limits = self.config.handler_limits.clone();
            let loaded = tokio::task::spawn_blocking(move || runtime.load(&bytes, limits)).await?;
            match loaded {
                Ok(module) => {
                    self.topics.ensure(&self.ledger, &record.topic)?;
                    self.activate(&record.name, &record.topic, record.version, module);
                    tracing::info!(handler = %record.name, version = record.version, topic = %record.topic, "handler restored");
                }
                Err(e) => {
                    tracing::error!(handler = %record.name, version = record.version, error = %e, "cannot load deployed handler")
                }
            }
        }
        Ok(())
    }

    /// Starts lanes for a new handler, or swaps the version of a running one
    /// (lanes switch at their next batch boundary).
    fn activate(
        self: &Arc<Self>,
        name: &str,
        topic: &str,
        version: u64,
        module: crate::runtime::HandlerModule,
    ) {
        let active = Some(Arc::new(ActiveVersion { version, module }));
        let mut slots = self.slots();
        if let Some(slot) = slots.get(name) {
            slot.active.send_replace(active);
            return;
        }
        let partitions = self.topics.partitions(topic).unwrap_or(1);
        let (active_tx, active_rx) = watch::channel(active);
        let stats = Arc::new(HandlerStats::default());
        let ctx = LaneContext {
            handler: name.into(),
            topic: topic.into(),
            ledger: self.ledger.clone(),
            committer: self.committer.clone(),
            topics: self.topics.clone(),
            active: active_rx,
            stats: stats.clone(),
            exec_slots: self.exec_slots.clone(),
            stop: self.stop.subscribe(),
            max_batch: self.config.max_batch,
        };
        let lanes = (0..partitions)
            .map(|p| tokio::spawn(run_lane(ctx.clone(), p)))
            .collect();
        slots.insert(
            name.to_string(),
            HandlerSlot {
                topic: topic.to_string(),
                active: active_tx,
                stats,
                lanes,
            },
        );
    }

    /// Deploys a new version of `name` consuming `topic`.
    pub async fn deploy(
        self: &Arc<Self>,
        name: &str,
        topic: &str,
        bytes: Vec<u8>,
        from_latest: bool,
        comment: Option<String>,
    ) -> Result<HandlerVersion, DeployError> {
        validate_handler_name(name).map_err(DeployError::BadRequest)?;
        crate::source::validate_topic_name(topic).map_err(DeployError::BadRequest)?;
        let _guard = self.deploy_lock.lock().await;
        let existing = self
            .ledger
            .handler_versions(name)
            .map_err(|e| DeployError::Internal(e.into()))?;
        if let Some(last) = existing.last() {
            if last.topic != topic {
                return Err(DeployError::Conflict(format!(
                    "handler {name:?} consumes topic {:?}; a new version must consume the same topic",
                    last.topic
                )));
            }
        }
        let runtime = self.runtime.clone();
        let limits = self.config.handler_limits.clone();
        let size = bytes.len();
        let (module, bytes) = tokio::task::spawn_blocking(move || {
            let module = runtime.load(&bytes, limits);
            (module, bytes)
        })
        .await
        .map_err(|e| DeployError::Internal(e.into()))?;
        let module = module?;
        let partitions = self
            .topics
            .ensure(&self.ledger, topic)
            .map_err(DeployError::Internal)?;
        let record = HandlerVersion {
            name: name.to_string(),
            version: existing.last().map(|v| v.version + 1).unwrap_or(1),
            content_hash: module.content_hash().to_string(),
            topic: topic.to_string(),
            deployed_at_ms: now_ms(),
            comment,
            size: size as u64,
            from_latest,
        };
        let start_cursors = if existing.is_empty() && from_latest {
            let mut cursors = Vec::new();
            for p in 0..partitions {
                let w = self
                    .ledger
                    .high_watermark(topic, p)
                    .map_err(|e| DeployError::Internal(e.into()))?;
                cursors.push((p, w));
            }
            cursors
        } else {
            Vec::new()
        };
        let ledger = self.ledger.clone();
        let rec = record.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            ledger.put_artifact(&rec.content_hash, &bytes)?;
            for (p, w) in start_cursors {
                ledger.set_cursor(&rec.name, crate::dispatch::EMBEDDED_SOURCE, p, w)?;
            }
            ledger.put_handler_version(&rec)?;
            ledger.flush()?;
            Ok(())
        })
        .await
        .map_err(|e| DeployError::Internal(e.into()))?
        .map_err(DeployError::Internal)?;
        self.activate(name, topic, record.version, module);
        tracing::info!(handler = name, version = record.version, topic, hash = %record.content_hash, "deployed");
        Ok(record)
    }

    /// Appends validated messages to `topic` and returns their offsets (in
    /// request order) once they are durable.
    pub async fn ingest(
        &self,
        topic: &str,
        messages: Vec<IncomingMessage>,
    ) -> anyhow::Result<Vec<u64>> {
        let partitions = self.topics.ensure(&self.ledger, topic)?;
        let now = now_ms();
        let items: Vec<(u32, Envelope)> = messages
            .into_iter()
            .map(|m| {
                (
                    partition_for(&m.key, partitions),
                    Envelope {
                        key: m.key,
                        idempotency_key: m.idempotency_key,
                        payload: m.payload,
                        headers: m.headers,
                        appended_at_ms: now,
                    },
                )
            })
            .collect();
        let touched: Vec<u32> = {
            let mut t: Vec<u32> = items.iter().map(|(p, _)| *p).collect();
            t.sort_unstable();
            t.dedup();
            t
        };
        let ledger = self.ledger.clone();
        let committer = self.committer.clone();
        let topic_owned = topic.to_string();
        let (offsets, ticket) =
            tokio::task::spawn_blocking(move || committer.append(&ledger, &topic_owned, &items))
                .await??;
        self.committer.wait_durable(ticket).await?;
        for p in touched {
            self.topics.refresh(&self.ledger, topic, p);
        }
        Ok(offsets)
    }

    /// A handler's committed state value.
    pub fn state_get(
        &self,
        handler: &str,
        partition_key: &str,
        state_key: &str,
    ) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(self.ledger.state_get(handler, partition_key, state_key)?)
    }

    /// Status of every handler.
    pub fn status(&self) -> anyhow::Result<Vec<HandlerStatus>> {
        use std::sync::atomic::Ordering::Relaxed;
        let slots = self.slots();
        let mut out = Vec::new();
        for (name, slot) in slots.iter() {
            let version = slot
                .active
                .borrow()
                .as_ref()
                .map(|a| a.version)
                .unwrap_or(0);
            let mut lag = 0;
            for p in 0..self.topics.partitions(&slot.topic).unwrap_or(0) {
                let hwm = self.ledger.high_watermark(&slot.topic, p)?;
                let cursor = self
                    .ledger
                    .cursor(name, crate::dispatch::EMBEDDED_SOURCE, p)?;
                lag += hwm.saturating_sub(cursor);
            }
            out.push(HandlerStatus {
                name: name.clone(),
                version,
                topic: slot.topic.clone(),
                lag,
                processed: slot.stats.processed.load(Relaxed),
                duplicates: slot.stats.duplicates.load(Relaxed),
                conflicts: slot.stats.conflicts.load(Relaxed),
                dead_lettered: self.ledger.dlq_count(name)?,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Whether the host can still make things durable.
    pub fn healthy(&self) -> bool {
        !self.committer.failed()
    }

    /// Stops every lane after its current batch, waits for them, flushes.
    pub async fn shutdown(&self) -> anyhow::Result<()> {
        self.stop.send_replace(true);
        let lanes: Vec<JoinHandle<()>> = self
            .slots()
            .values_mut()
            .flat_map(|s| std::mem::take(&mut s.lanes))
            .collect();
        for lane in lanes {
            let _ = lane.await;
        }
        let ledger = self.ledger.clone();
        tokio::task::spawn_blocking(move || ledger.flush()).await??;
        Ok(())
    }
}

/// Handler names: 1–128 bytes of `[A-Za-z0-9._-]`.
pub fn validate_handler_name(name: &str) -> Result<(), String> {
    crate::source::topics::validate_name("handler", name, 128)
}
