//! The host: ties the ledger, the runtime, the topics and the lanes together.
//! The HTTP API and `ordo serve` drive it; tests can drive it directly.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use crate::api::ingest::IncomingMessage;
use crate::dispatch::{
    run_lane, ActiveVersion, Executor, HandlerStats, LaneContext, LanePosition, NativeHandler,
    Runnable, Workers,
};
use crate::ledger::{
    now_ms, AuditRecord, DeadLetter, DlqAction, Envelope, FailurePolicy, GroupCommitter,
    HandlerControl, HandlerVersion, Ledger, OnFailure, TopicConfig,
};
use crate::runtime::{HandlerLimits, LoadError, Runtime, RuntimeConfig};
use crate::source::jetstream::{JetStreamConfig, JetStreams, RelayStats};
use crate::source::{partition_for, Topics};

/// Host-wide settings.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Defaults for topics created on first use.
    pub topic_defaults: TopicConfig,
    /// Messages per lane transaction, at most.
    pub max_batch: usize,
    /// Threads that run lane batches (handler calls and commits); see
    /// [`crate::dispatch::Workers`].
    pub workers: usize,
    /// Sandbox limits for newly deployed handlers.
    pub handler_limits: HandlerLimits,
    /// Process-wide sandbox settings.
    pub runtime: RuntimeConfig,
    /// Retry and failure policy of a handler's first version when the deploy
    /// does not set one (later versions inherit their predecessor's).
    pub failure_policy: FailurePolicy,
    /// How often the retention task looks for removable messages.
    pub retention_interval: std::time::Duration,
    /// Longest a deploy may spend compiling a component.
    pub compile_timeout: std::time::Duration,
    /// Record and check idempotency (effectively-once). `false` gives
    /// at-least-once delivery with no dedup ledger (benchmark baseline).
    pub dedup: bool,
    /// Committed idempotency records older than this are removed (a
    /// duplicate arriving later is processed again); `None` keeps them.
    pub dedup_retention: Option<std::time::Duration>,
    /// Topics on NATS JetStream instead of the embedded log.
    pub jetstream: Vec<(String, JetStreamConfig)>,
    /// Bytes of ledger pages kept in memory.
    pub ledger_cache_bytes: u64,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            topic_defaults: TopicConfig::default(),
            max_batch: 256,
            workers: Workers::default_count(),
            handler_limits: HandlerLimits::default(),
            runtime: RuntimeConfig::default(),
            failure_policy: FailurePolicy::default(),
            retention_interval: std::time::Duration::from_secs(60),
            compile_timeout: std::time::Duration::from_secs(120),
            dedup: true,
            dedup_retention: Some(std::time::Duration::from_secs(7 * 24 * 3600)),
            jetstream: Vec::new(),
            ledger_cache_bytes: crate::ledger::DEFAULT_CACHE_BYTES,
        }
    }
}

/// Why a deploy or an operator action was refused.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The component failed validation.
    #[error(transparent)]
    Invalid(#[from] LoadError),
    /// The request is inconsistent with what is deployed.
    #[error("{0}")]
    Conflict(String),
    /// Bad name, topic or parameter.
    #[error("{0}")]
    BadRequest(String),
    /// No such handler or dead letter.
    #[error("{0}")]
    NotFound(String),
    /// The ledger failed.
    #[error("ledger: {0:#}")]
    Internal(anyhow::Error),
}

/// Deploy parameters besides the component.
#[derive(Debug, Clone, Default)]
pub struct DeployOptions {
    /// A new handler starts at the end of its topic instead of the beginning.
    pub from_latest: bool,
    /// Operator's comment, kept with the version.
    pub comment: Option<String>,
    /// Policy fields to change; the rest come from the previous version (or
    /// the host's defaults for a first version).
    pub policy: PolicyOverrides,
    /// Deploy as a canary for this percentage of partition keys (1–99)
    /// beside the running version, instead of replacing it.
    pub canary: Option<u8>,
    /// Sandbox limits (default: the host's).
    pub limits: Option<HandlerLimits>,
}

/// A handler as a configuration file wants it.
#[derive(Debug, Clone)]
pub struct DesiredHandler {
    /// Consumed topic.
    pub topic: String,
    /// Component bytes.
    pub bytes: Vec<u8>,
    /// Retry and failure policy.
    pub policy: FailurePolicy,
    /// Sandbox limits.
    pub limits: HandlerLimits,
    /// A new handler starts at the end of its topic.
    pub from_latest: bool,
    /// Comment kept with a deployed version.
    pub comment: Option<String>,
}

/// Optional changes to a [`FailurePolicy`].
#[derive(Debug, Clone, Default)]
pub struct PolicyOverrides {
    /// See [`crate::ledger::RetryPolicy::max_attempts`].
    pub max_attempts: Option<u32>,
    /// See [`crate::ledger::RetryPolicy::initial_backoff_ms`].
    pub initial_backoff_ms: Option<u64>,
    /// See [`crate::ledger::RetryPolicy::backoff_factor`].
    pub backoff_factor: Option<f64>,
    /// See [`crate::ledger::RetryPolicy::max_backoff_ms`].
    pub max_backoff_ms: Option<u64>,
    /// `park-key` or `dead-letter`.
    pub on_failure: Option<String>,
}

impl PolicyOverrides {
    /// `base` with these changes, validated.
    pub fn apply(&self, base: &FailurePolicy) -> Result<FailurePolicy, String> {
        let mut p = base.clone();
        if let Some(v) = self.max_attempts {
            p.retry.max_attempts = v;
        }
        if let Some(v) = self.initial_backoff_ms {
            p.retry.initial_backoff_ms = v;
        }
        if let Some(v) = self.backoff_factor {
            p.retry.backoff_factor = v;
        }
        if let Some(v) = self.max_backoff_ms {
            p.retry.max_backoff_ms = v;
        }
        if let Some(v) = &self.on_failure {
            p.on_failure = OnFailure::parse(v)?;
        }
        p.retry.validate()?;
        Ok(p)
    }
}

/// Which dead letters an operator action applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DlqSelector {
    /// One dead letter by sequence.
    Seq(u64),
    /// Every dead letter of one partition key.
    Key(String),
    /// Every dead letter of the handler.
    All,
}

/// A dead letter as listed by the API.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DlqEntry {
    /// Sequence (order of dead-lettering).
    pub seq: u64,
    /// The record.
    #[serde(flatten)]
    pub record: DeadLetter,
    /// Whether its key is parked.
    pub key_parked: bool,
}

struct HandlerSlot {
    topic: String,
    /// What the lanes run: `None` while paused.
    active: watch::Sender<Option<Arc<ActiveVersion>>>,
    /// The active version, also while paused.
    current: Arc<ActiveVersion>,
    paused: bool,
    control: watch::Sender<u64>,
    stats: Arc<HandlerStats>,
    /// Each lane's position, by partition.
    positions: Arc<[watch::Sender<LanePosition>]>,
    /// Stops this handler's lanes (undeploy, shutdown).
    stop: watch::Sender<bool>,
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
    /// The same per partition.
    pub partition_lags: Vec<u64>,
    /// Where the topic lives: `log` (embedded) or `jetstream`.
    pub source: &'static str,
    /// Messages committed since the host started.
    pub processed: u64,
    /// Duplicates skipped since the host started.
    pub duplicates: u64,
    /// Duplicates with a different payload since the host started.
    pub conflicts: u64,
    /// Messages in the dead-letter queue (failed and held).
    pub dead_lettered: u64,
    /// Held messages among them (their key is parked).
    pub held: u64,
    /// Partition keys parked.
    pub parked_keys: u64,
    /// Operator actions on dead letters not yet carried out.
    pub pending_dlq_actions: u64,
    /// Failed attempts retried since the host started.
    pub retries: u64,
    /// Dead letters replayed since the host started.
    pub replayed: u64,
    /// What a dead letter does to its key (`park-key`, `dead-letter`).
    pub on_failure: &'static str,
    /// Attempts before a retryable failure is dead-lettered.
    pub max_attempts: u32,
    /// Paused by an operator.
    pub paused: bool,
    /// A running canary: `{"version", "percent"}`.
    pub canary: Option<serde_json::Value>,
}

/// An embedded-log topic, as listed in the status.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TopicInfo {
    /// Topic name.
    pub name: String,
    /// Partitions.
    pub partitions: u32,
    /// Retention of committed messages (ms).
    pub retention_ms: u64,
    /// Messages currently stored.
    pub messages: u64,
    /// Messages ever appended (the sum of the high watermarks).
    pub appended: u64,
}

/// The running host.
pub struct Host {
    ledger: Ledger,
    committer: GroupCommitter,
    runtime: Runtime,
    topics: Topics,
    config: HostConfig,
    exec_slots: Arc<Semaphore>,
    workers: Workers,
    stop: watch::Sender<bool>,
    metrics: crate::metrics::Metrics,
    retention_removed: std::sync::atomic::AtomicU64,
    dedup_swept: std::sync::atomic::AtomicU64,
    /// Where the dedup sweeper continues (it scans in chunks).
    dedup_sweep_from: Mutex<Vec<u8>>,
    handlers: Mutex<HashMap<String, HandlerSlot>>,
    deploy_lock: tokio::sync::Mutex<()>,
    jetstreams: JetStreams,
    outbox_wake: Arc<tokio::sync::Notify>,
    relay: Arc<RelayStats>,
}

impl Host {
    /// Opens the ledger in `data_dir`, starts the committer and restores every
    /// deployed handler's active version.
    pub async fn open(data_dir: &Path, mut config: HostConfig) -> anyhow::Result<Arc<Host>> {
        std::fs::create_dir_all(data_dir)?;
        if config.runtime.cache_dir.is_none() {
            config.runtime.cache_dir = Some(data_dir.join("compiled"));
        }
        let ledger = Ledger::open_with_cache(&data_dir.join("ledger"), config.ledger_cache_bytes)?;
        let committer = GroupCommitter::start(Arc::new(ledger.clone()));
        let runtime = Runtime::new(config.runtime.clone())?;
        let topics = Topics::new(config.topic_defaults.clone());
        for name in ledger.topics()? {
            topics.ensure(&ledger, &name)?;
        }
        let jetstreams = JetStreams::connect(&config.jetstream).await?;
        for js in jetstreams.all() {
            if ledger.topic_config(&js.topic)?.is_some() {
                anyhow::bail!(
                    "topic {} is configured on JetStream but exists in the embedded log of this data dir",
                    js.topic
                );
            }
        }
        let workers = Workers::start(config.workers, committer.clone())
            .map_err(|e| anyhow::anyhow!("cannot start the worker threads: {e}"))?;
        let host = Arc::new(Host {
            exec_slots: Arc::new(Semaphore::new(
                config.runtime.max_concurrent_instances as usize,
            )),
            workers,
            ledger,
            committer,
            runtime,
            topics,
            config,
            stop: watch::Sender::new(false),
            metrics: crate::metrics::Metrics::default(),
            retention_removed: std::sync::atomic::AtomicU64::new(0),
            dedup_swept: std::sync::atomic::AtomicU64::new(0),
            dedup_sweep_from: Mutex::new(Vec::new()),
            handlers: Mutex::new(HashMap::new()),
            deploy_lock: tokio::sync::Mutex::new(()),
            jetstreams,
            outbox_wake: Arc::new(tokio::sync::Notify::new()),
            relay: Arc::new(RelayStats::default()),
        });
        host.restore().await?;
        // Entries committed before a restart are relayed too.
        tokio::spawn(crate::source::jetstream::relay_loop(
            host.ledger.clone(),
            host.committer.clone(),
            host.jetstreams.clone(),
            host.outbox_wake.clone(),
            host.relay.clone(),
            host.stop.subscribe(),
        ));
        tokio::spawn(host.clone().retention_loop());
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

    /// The partitions of `topic`, creating it in the embedded log unless it
    /// is a JetStream topic.
    fn ensure_topic(&self, topic: &str) -> anyhow::Result<u32> {
        match self.jetstreams.get(topic) {
            Some(js) => Ok(js.config.partitions),
            None => self.topics.ensure(&self.ledger, topic),
        }
    }

    /// The JetStream topics.
    pub fn jetstreams(&self) -> &JetStreams {
        &self.jetstreams
    }

    /// Outbox relay figures: (backlog, published, failed attempts).
    pub fn outbox_status(&self) -> (u64, u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.ledger.outbox_len() as u64,
            self.relay.published.load(Relaxed),
            self.relay.failures.load(Relaxed),
        )
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<String, HandlerSlot>> {
        self.handlers.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn restore(self: &Arc<Self>) -> anyhow::Result<()> {
        for latest in self.ledger.all_handlers()? {
            let name = latest.name.clone();
            let control = self
                .ledger
                .handler_control(&name)?
                .unwrap_or(HandlerControl {
                    active_version: latest.version,
                    ..HandlerControl::default()
                });
            if control.undeployed {
                continue;
            }
            let stable = match self.load_runnable(&name, control.active_version).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(handler = %name, version = control.active_version, error = %e, "cannot load the active version; handler not started");
                    continue;
                }
            };
            let canary = match control.canary {
                Some((version, pct)) => match self.load_runnable(&name, version).await {
                    Ok(r) => Some((r, pct)),
                    Err(e) => {
                        tracing::error!(handler = %name, version, error = %e, "cannot load the canary version; running without it");
                        None
                    }
                },
                None => None,
            };
            self.ensure_topic(&latest.topic)?;
            tracing::info!(handler = %name, version = stable.version, canary = ?control.canary, topic = %latest.topic, paused = control.paused, "handler restored");
            self.activate(
                &name,
                &latest.topic,
                ActiveVersion { stable, canary },
                control.paused,
            );
        }
        Ok(())
    }

    /// Loads a deployed version from its kept component (usually compiled in
    /// the artifact cache).
    async fn load_runnable(&self, name: &str, version: u64) -> Result<Runnable, AdminError> {
        let internal = |e: crate::ledger::LedgerError| AdminError::Internal(e.into());
        let record = self
            .ledger
            .handler_versions(name)
            .map_err(internal)?
            .into_iter()
            .find(|v| v.version == version)
            .ok_or_else(|| {
                AdminError::NotFound(format!("handler {name:?} has no version {version}"))
            })?;
        let bytes = self
            .ledger
            .get_artifact(&record.content_hash)
            .map_err(internal)?
            .ok_or_else(|| {
                AdminError::Internal(anyhow::anyhow!(
                    "component {} of version {version} is missing from the ledger",
                    record.content_hash
                ))
            })?;
        let runtime = self.runtime.clone();
        let limits = record.limits.clone();
        let module = tokio::task::spawn_blocking(move || runtime.load(&bytes, limits))
            .await
            .map_err(|e| AdminError::Internal(e.into()))??;
        Ok(Runnable {
            version,
            module: Executor::Wasm(module),
            policy: record.policy,
        })
    }

    /// Runs [`Host::retention_pass`] every `retention_interval` until stopped.
    async fn retention_loop(self: Arc<Self>) {
        let mut stop = self.stop.subscribe();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.config.retention_interval) => {}
                _ = stop.changed() => {}
            }
            if *stop.borrow() {
                return;
            }
            let host = self.clone();
            match tokio::task::spawn_blocking(move || host.dedup_sweep_pass()).await {
                Ok(Ok(0)) => {}
                Ok(Ok(n)) => tracing::info!(
                    removed = n,
                    "dedup retention: removed idempotency records older than the window"
                ),
                Ok(Err(e)) => {
                    tracing::error!(error = %format!("{e:#}"), "dedup sweep failed; will try again")
                }
                Err(e) => tracing::error!(error = %e, "dedup sweep panicked; will try again"),
            }
            let host = self.clone();
            match tokio::task::spawn_blocking(move || host.retention_pass()).await {
                Ok(Ok(0)) => {}
                Ok(Ok(n)) => tracing::info!(
                    removed = n,
                    "retention: removed committed messages past their topic's retention"
                ),
                Ok(Err(e)) => {
                    tracing::error!(error = %format!("{e:#}"), "retention pass failed; will try again")
                }
                Err(e) => tracing::error!(error = %e, "retention pass panicked; will try again"),
            }
        }
    }

    /// Removes the embedded-log messages that are older than their topic's
    /// retention AND committed by every handler subscribed to the topic.
    /// Dead letters keep their own copy of a message, so replay does not
    /// depend on the log. Returns how many messages were removed.
    pub fn retention_pass(&self) -> anyhow::Result<usize> {
        const CHUNK: usize = 10_000;
        let now = now_ms();
        let handlers = self.ledger.all_handlers()?;
        let mut removed = 0;
        for topic in self.ledger.topics()? {
            let Some(config) = self.ledger.topic_config(&topic)? else {
                continue;
            };
            let cutoff = now.saturating_sub(config.retention_ms);
            let subscribers: Vec<&str> = handlers
                .iter()
                .filter(|h| h.topic == topic)
                .map(|h| h.name.as_str())
                .collect();
            for p in 0..config.partitions {
                let mut keep_from = self.ledger.high_watermark(&topic, p)?;
                for h in &subscribers {
                    keep_from = keep_from.min(self.ledger.cursor(
                        h,
                        crate::dispatch::EMBEDDED_SOURCE,
                        p,
                    )?);
                }
                while let Some(bound) = self
                    .ledger
                    .retention_bound(&topic, p, keep_from, cutoff, CHUNK)?
                {
                    let n = self.ledger.remove_before(&topic, p, bound)?;
                    removed += n;
                    if n < CHUNK {
                        break;
                    }
                }
            }
        }
        self.retention_removed
            .fetch_add(removed as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(removed)
    }

    /// Removes committed idempotency records older than the dedup window,
    /// scanning at most 100k records per pass (continuing where the last
    /// pass stopped). Never removes a record younger than the window.
    pub fn dedup_sweep_pass(&self) -> anyhow::Result<usize> {
        let Some(window) = self.config.dedup_retention else {
            return Ok(0);
        };
        let cutoff = now_ms().saturating_sub(window.as_millis() as u64);
        let mut from = self
            .dedup_sweep_from
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let (removed, next) = self.ledger.sweep_dedup(&from, cutoff, 100_000)?;
        *from = next.unwrap_or_default();
        self.dedup_swept
            .fetch_add(removed as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(removed)
    }

    /// Every embedded-log topic with its settings and size.
    pub fn topics_info(&self) -> anyhow::Result<Vec<TopicInfo>> {
        let mut out = Vec::new();
        for name in self.ledger.topics()? {
            let Some(config) = self.ledger.topic_config(&name)? else {
                continue;
            };
            let mut messages = 0;
            let mut appended = 0;
            for p in 0..config.partitions {
                let high = self.ledger.high_watermark(&name, p)?;
                messages += high.saturating_sub(self.ledger.low_watermark(&name, p)?);
                appended += high;
            }
            out.push(TopicInfo {
                name,
                partitions: config.partitions,
                retention_ms: config.retention_ms,
                messages,
                appended,
            });
        }
        Ok(out)
    }

    /// Starts lanes for a new handler, or swaps the version of a running one
    /// (lanes switch at their next batch boundary).
    fn activate(self: &Arc<Self>, name: &str, topic: &str, current: ActiveVersion, paused: bool) {
        let current = Arc::new(current);
        let active = (!paused).then(|| current.clone());
        let mut slots = self.slots();
        if let Some(slot) = slots.get_mut(name) {
            slot.current = current;
            slot.paused = paused;
            slot.active.send_replace(active);
            return;
        }
        let jetstream = self.jetstreams.get(topic);
        let partitions = match &jetstream {
            Some(js) => js.config.partitions,
            None => self.topics.partitions(topic).unwrap_or(1),
        };
        let source: Arc<str> = match &jetstream {
            Some(js) => js.source_name().into(),
            None => crate::dispatch::EMBEDDED_SOURCE.into(),
        };
        let (active_tx, active_rx) = watch::channel(active);
        let (stop_tx, stop_rx) = watch::channel(*self.stop.borrow());
        let (control_tx, control_rx) = watch::channel(0u64);
        let stats = Arc::new(HandlerStats::default());
        let positions: Arc<[watch::Sender<LanePosition>]> = (0..partitions)
            .map(|_| watch::Sender::new(LanePosition::default()))
            .collect();
        let ctx = LaneContext {
            handler: name.into(),
            topic: topic.into(),
            source,
            jetstream,
            jetstreams: self.jetstreams.clone(),
            outbox_wake: self.outbox_wake.clone(),
            ledger: self.ledger.clone(),
            committer: self.committer.clone(),
            topics: self.topics.clone(),
            active: active_rx,
            control: control_rx,
            stats: stats.clone(),
            positions: positions.clone(),
            exec_slots: self.exec_slots.clone(),
            workers: self.workers.clone(),
            stop: stop_rx,
            max_batch: self.config.max_batch,
            dedup: self.config.dedup,
            metrics: self.metrics.clone(),
            label: crate::metrics::HandlerLabel {
                handler: name.to_string(),
            },
        };
        let lanes = (0..partitions)
            .map(|p| tokio::spawn(run_lane(ctx.clone(), p)))
            .collect();
        slots.insert(
            name.to_string(),
            HandlerSlot {
                topic: topic.to_string(),
                active: active_tx,
                current,
                paused,
                control: control_tx,
                stats,
                positions,
                stop: stop_tx,
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
        options: DeployOptions,
    ) -> Result<HandlerVersion, AdminError> {
        let DeployOptions {
            from_latest,
            comment,
            policy,
            canary,
            limits: options_limits,
        } = options;
        if canary.is_some_and(|p| !(1..=99).contains(&p)) {
            return Err(AdminError::BadRequest(
                "canary must be a percentage of keys from 1 to 99".into(),
            ));
        }
        validate_handler_name(name).map_err(AdminError::BadRequest)?;
        crate::source::validate_topic_name(topic).map_err(AdminError::BadRequest)?;
        let _guard = self.deploy_lock.lock().await;
        let existing = self
            .ledger
            .handler_versions(name)
            .map_err(|e| AdminError::Internal(e.into()))?;
        if let Some(last) = existing.last() {
            if last.topic != topic {
                return Err(AdminError::Conflict(format!(
                    "handler {name:?} consumes topic {:?}; a new version must consume the same topic",
                    last.topic
                )));
            }
        }
        let prior = self
            .ledger
            .handler_control(name)
            .map_err(|e| AdminError::Internal(e.into()))?;
        let paused = prior.is_some_and(|c| c.paused && !c.undeployed);
        if let Some((v, _)) = prior
            .and_then(|c| c.canary)
            .filter(|_| !prior.is_some_and(|c| c.undeployed))
        {
            return Err(AdminError::Conflict(format!(
                "a canary of version {v} is running: promote or abort it first"
            )));
        }
        // A canary runs beside the running version.
        let stable = match canary {
            Some(_) => match self.slots().get(name) {
                Some(slot) => Some(slot.current.stable.clone()),
                None => {
                    return Err(AdminError::Conflict(format!(
                        "handler {name:?} is not running: deploy it normally first"
                    )))
                }
            },
            None => None,
        };
        let base_policy = existing
            .last()
            .map(|v| v.policy.clone())
            .unwrap_or_else(|| self.config.failure_policy.clone());
        let policy = policy.apply(&base_policy).map_err(AdminError::BadRequest)?;
        let runtime = self.runtime.clone();
        let limits = options_limits
            .clone()
            .unwrap_or_else(|| self.config.handler_limits.clone());
        let record_limits = limits.clone();
        let size = bytes.len();
        let compile = tokio::task::spawn_blocking(move || {
            let module = runtime.load(&bytes, limits);
            (module, bytes)
        });
        // Bounded: a pathological component must not hold the deploy lock
        // for ever (the compile thread finishes in the background).
        let (module, bytes) = tokio::time::timeout(self.config.compile_timeout, compile)
            .await
            .map_err(|_| {
                AdminError::BadRequest(format!(
                    "component did not compile within {} s; refused",
                    self.config.compile_timeout.as_secs()
                ))
            })?
            .map_err(|e| AdminError::Internal(e.into()))?;
        let module = module?;
        let partitions = self.ensure_topic(topic).map_err(AdminError::Internal)?;
        let record = HandlerVersion {
            name: name.to_string(),
            version: existing.last().map(|v| v.version + 1).unwrap_or(1),
            content_hash: module.content_hash().to_string(),
            topic: topic.to_string(),
            deployed_at_ms: now_ms(),
            comment,
            size: size as u64,
            from_latest,
            policy,
            limits: record_limits,
        };
        let start_cursors = if existing.is_empty() && from_latest {
            if let Some(js) = self.jetstreams.get(topic) {
                return Err(AdminError::BadRequest(format!(
                    "from=latest is not supported on JetStream topic {} (stream {}); start from the earliest message or purge the stream",
                    topic, js.stream
                )));
            }
            let mut cursors = Vec::new();
            for p in 0..partitions {
                let w = self
                    .ledger
                    .high_watermark(topic, p)
                    .map_err(|e| AdminError::Internal(e.into()))?;
                cursors.push((p, w));
            }
            cursors
        } else {
            Vec::new()
        };
        let ledger = self.ledger.clone();
        let rec = record.clone();
        let canary_pct = canary;
        let control = match canary_pct {
            Some(pct) => HandlerControl {
                canary: Some((record.version, pct)),
                ..prior.unwrap_or_default()
            },
            None => HandlerControl {
                active_version: record.version,
                paused,
                undeployed: false,
                canary: None,
            },
        };
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            // Ordered so that any prefix is a consistent ledger (sled flushes
            // in the background too): component, start cursors, version
            // record, then the control record that activates it.
            ledger.put_artifact(&rec.content_hash, &bytes)?;
            for (p, w) in start_cursors {
                ledger.set_cursor(&rec.name, crate::dispatch::EMBEDDED_SOURCE, p, w)?;
            }
            ledger.put_handler_version(&rec)?;
            crate::crash::point("mid-deploy");
            ledger.put_handler_control(&rec.name, &control)?;
            ledger.append_audit(&AuditRecord {
                at_ms: rec.deployed_at_ms,
                action: "deploy".into(),
                handler: rec.name.clone(),
                detail: format!(
                    "version {}{} ({} bytes, sha256 {}), topic {}, on_failure {}, max_attempts {}{}",
                    rec.version,
                    canary_pct
                        .map(|p| format!(" as canary for {p}% of keys"))
                        .unwrap_or_default(),
                    rec.size,
                    rec.content_hash,
                    rec.topic,
                    rec.policy.on_failure.as_str(),
                    rec.policy.retry.max_attempts,
                    rec.comment
                        .as_deref()
                        .map(|c| format!(", comment {c:?}"))
                        .unwrap_or_default()
                ),
            })?;
            ledger.flush()?;
            Ok(())
        })
        .await
        .map_err(|e| AdminError::Internal(e.into()))?
        .map_err(AdminError::Internal)?;
        let new = Runnable {
            version: record.version,
            module: Executor::Wasm(module),
            policy: record.policy.clone(),
        };
        let current = match canary_pct {
            Some(pct) => ActiveVersion {
                stable: stable.ok_or_else(|| {
                    AdminError::Internal(anyhow::anyhow!("no running version for the canary"))
                })?,
                canary: Some((new, pct)),
            },
            None => ActiveVersion {
                stable: new,
                canary: None,
            },
        };
        self.activate(name, topic, current, paused);
        tracing::info!(handler = name, version = record.version, topic, hash = %record.content_hash, paused, canary = ?canary_pct, "deployed");
        Ok(record)
    }

    /// Makes a topic exist with these settings (from `ordo.toml`). The
    /// partition count of an existing topic cannot change.
    pub fn configure_topic(
        &self,
        name: &str,
        partitions: Option<u32>,
        retention_ms: Option<u64>,
    ) -> anyhow::Result<()> {
        crate::source::validate_topic_name(name).map_err(|e| anyhow::anyhow!(e))?;
        if self.jetstreams.get(name).is_some() {
            anyhow::bail!(
                "topic {name} is on JetStream: its partitions and retention are the stream's"
            );
        }
        let mut config = match self.ledger.topic_config(name)? {
            Some(existing) => {
                if let Some(p) = partitions.filter(|p| *p != existing.partitions) {
                    anyhow::bail!(
                        "topic {name:?} exists with {} partitions; the configuration asks for {p} (a topic's partition count cannot change)",
                        existing.partitions
                    );
                }
                existing
            }
            None => TopicConfig {
                partitions: partitions.unwrap_or(self.config.topic_defaults.partitions),
                ..self.config.topic_defaults.clone()
            },
        };
        if let Some(r) = retention_ms {
            config.retention_ms = r;
        }
        self.ledger.set_topic_config(name, &config)?;
        self.topics.ensure(&self.ledger, name)?;
        Ok(())
    }

    /// Deploys `bytes` as handler `name` unless the active version already
    /// is exactly this component, topic, policy and limits (from
    /// `ordo.toml`). Returns the version deployed, if any.
    pub async fn apply_handler(
        self: &Arc<Self>,
        name: &str,
        desired: DesiredHandler,
    ) -> Result<Option<HandlerVersion>, AdminError> {
        use sha2::{Digest, Sha256};
        let DesiredHandler {
            topic,
            bytes,
            policy,
            limits,
            from_latest,
            comment,
        } = desired;
        let topic = topic.as_str();
        let hash = hex::encode(Sha256::digest(&bytes));
        if let Ok((versions, control)) = self.versions(name) {
            let active = versions
                .iter()
                .find(|v| v.version == control.active_version);
            if let Some(v) = active {
                if !control.undeployed
                    && control.canary.is_none()
                    && v.content_hash == hash
                    && v.topic == topic
                    && v.policy == policy
                    && v.limits == limits
                {
                    return Ok(None);
                }
            }
        }
        let overrides = PolicyOverrides {
            max_attempts: Some(policy.retry.max_attempts),
            initial_backoff_ms: Some(policy.retry.initial_backoff_ms),
            backoff_factor: Some(policy.retry.backoff_factor),
            max_backoff_ms: Some(policy.retry.max_backoff_ms),
            on_failure: Some(policy.on_failure.as_str().to_string()),
        };
        let options = DeployOptions {
            from_latest,
            comment,
            policy: overrides,
            canary: None,
            limits: Some(limits),
        };
        self.deploy(name, topic, bytes, options).await.map(Some)
    }

    /// Runs a native (in-host, unsandboxed) handler on `topic` as version 0,
    /// not recorded in the ledger: for benchmarks and embedders.
    pub fn run_native(
        self: &Arc<Self>,
        name: &str,
        topic: &str,
        handler: Arc<dyn NativeHandler>,
    ) -> anyhow::Result<()> {
        validate_handler_name(name).map_err(|e| anyhow::anyhow!(e))?;
        self.ensure_topic(topic)?;
        let stable = Runnable {
            version: 0,
            module: Executor::Native(handler),
            policy: self.config.failure_policy.clone(),
        };
        self.activate(
            name,
            topic,
            ActiveVersion {
                stable,
                canary: None,
            },
            false,
        );
        Ok(())
    }

    /// Every version of a handler, oldest first, and which one is active.
    pub fn versions(
        &self,
        name: &str,
    ) -> Result<(Vec<HandlerVersion>, HandlerControl), AdminError> {
        let internal = |e: crate::ledger::LedgerError| AdminError::Internal(e.into());
        let versions = self.ledger.handler_versions(name).map_err(internal)?;
        let Some(latest) = versions.last() else {
            return Err(AdminError::NotFound(format!(
                "no handler {name:?} was deployed"
            )));
        };
        let control = self
            .ledger
            .handler_control(name)
            .map_err(internal)?
            .unwrap_or(HandlerControl {
                active_version: latest.version,
                ..HandlerControl::default()
            });
        Ok((versions, control))
    }

    /// Persists a handler's control record (if given) with an audit
    /// record, durably.
    async fn persist_control(
        &self,
        name: &str,
        control: Option<HandlerControl>,
        action: &str,
        detail: String,
    ) -> Result<(), AdminError> {
        let ledger = self.ledger.clone();
        let name = name.to_string();
        let action = action.to_string();
        tokio::task::spawn_blocking(move || -> Result<(), crate::ledger::LedgerError> {
            if let Some(control) = control {
                ledger.put_handler_control(&name, &control)?;
            }
            ledger.append_audit(&AuditRecord {
                at_ms: now_ms(),
                action,
                handler: name,
                detail,
            })?;
            ledger.flush()
        })
        .await
        .map_err(|e| AdminError::Internal(e.into()))?
        .map_err(|e| AdminError::Internal(e.into()))
    }

    /// Makes an earlier version active again (`to`, or the one before the
    /// active version). Its component is kept in the ledger and usually
    /// compiled in the artifact cache, so this is quick. Lanes switch at
    /// their next batch boundary.
    pub async fn rollback(
        self: &Arc<Self>,
        name: &str,
        to: Option<u64>,
    ) -> Result<HandlerVersion, AdminError> {
        let _guard = self.deploy_lock.lock().await;
        let (versions, control) = self.versions(name)?;
        if control.undeployed {
            return Err(AdminError::Conflict(format!(
                "handler {name:?} is undeployed; deploy it again first"
            )));
        }
        let target = match to {
            Some(n) => versions.iter().find(|v| v.version == n).ok_or_else(|| {
                AdminError::NotFound(format!("handler {name:?} has no version {n}"))
            })?,
            None => versions
                .iter()
                .rev()
                .find(|v| v.version < control.active_version)
                .ok_or_else(|| {
                    AdminError::Conflict(format!(
                        "handler {name:?} has no version before {}",
                        control.active_version
                    ))
                })?,
        }
        .clone();
        if target.version == control.active_version {
            return Err(AdminError::Conflict(format!(
                "version {} of {name:?} is already active",
                target.version
            )));
        }
        if let Some((v, _)) = control.canary {
            return Err(AdminError::Conflict(format!(
                "a canary of version {v} is running: promote or abort it first"
            )));
        }
        let stable = self.load_runnable(name, target.version).await?;
        let from = control.active_version;
        let control = HandlerControl {
            active_version: target.version,
            ..control
        };
        self.persist_control(
            name,
            Some(control),
            "rollback",
            format!("version {from} -> {}", target.version),
        )
        .await?;
        self.activate(
            name,
            &target.topic,
            ActiveVersion {
                stable,
                canary: None,
            },
            control.paused,
        );
        tracing::info!(handler = name, from, to = target.version, "rolled back");
        Ok(target)
    }

    /// Ends a canary: `promote` makes the canary version the active one for
    /// every key; otherwise (abort) every key goes back to the active
    /// version. Lanes switch at their next batch boundary.
    pub async fn end_canary(&self, name: &str, promote: bool) -> Result<u64, AdminError> {
        let _guard = self.deploy_lock.lock().await;
        let (_, control) = self.versions(name)?;
        let Some((canary_version, pct)) = control.canary else {
            return Err(AdminError::Conflict(format!(
                "handler {name:?} has no canary"
            )));
        };
        let current = match self.slots().get(name) {
            Some(slot) => slot.current.clone(),
            None => {
                return Err(AdminError::Conflict(format!(
                    "handler {name:?} is not running"
                )))
            }
        };
        let Some((canary, _)) = current.canary.clone() else {
            return Err(AdminError::Internal(anyhow::anyhow!("canary not loaded")));
        };
        let (next, stable, action) = if promote {
            (
                HandlerControl {
                    active_version: canary_version,
                    canary: None,
                    ..control
                },
                canary,
                "canary-promote",
            )
        } else {
            (
                HandlerControl {
                    canary: None,
                    ..control
                },
                current.stable.clone(),
                "canary-abort",
            )
        };
        let active = stable.version;
        self.persist_control(
            name,
            Some(next),
            action,
            format!(
                "canary version {canary_version} ({pct}% of keys) {}; version {active} active",
                if promote { "promoted" } else { "aborted" }
            ),
        )
        .await?;
        let mut slots = self.slots();
        if let Some(slot) = slots.get_mut(name) {
            slot.current = Arc::new(ActiveVersion {
                stable,
                canary: None,
            });
            slot.active
                .send_replace((!slot.paused).then(|| slot.current.clone()));
        }
        tracing::info!(handler = name, canary_version, promote, "canary ended");
        Ok(active)
    }

    /// Pauses (lanes hold still after their current batch) or resumes a
    /// handler. Kept across restarts.
    pub async fn set_paused(&self, name: &str, paused: bool) -> Result<(), AdminError> {
        let _guard = self.deploy_lock.lock().await;
        let (_, control) = self.versions(name)?;
        if control.undeployed {
            return Err(AdminError::Conflict(format!(
                "handler {name:?} is undeployed"
            )));
        }
        let action = if paused { "pause" } else { "resume" };
        self.persist_control(
            name,
            Some(HandlerControl { paused, ..control }),
            action,
            format!("{action} handler"),
        )
        .await?;
        let mut slots = self.slots();
        if let Some(slot) = slots.get_mut(name) {
            slot.paused = paused;
            slot.active
                .send_replace((!paused).then(|| slot.current.clone()));
        }
        tracing::info!(handler = name, paused, "handler {action}d");
        Ok(())
    }

    /// Stops a handler's lanes (after their current batch). Its state,
    /// idempotency records and cursors stay for a later deploy, unless
    /// `purge`, which removes everything of it.
    pub async fn undeploy(&self, name: &str, purge: bool) -> Result<(), AdminError> {
        let _guard = self.deploy_lock.lock().await;
        let (_, control) = self.versions(name)?;
        let slot = self.slots().remove(name);
        if let Some(mut slot) = slot {
            slot.stop.send_replace(true);
            for lane in std::mem::take(&mut slot.lanes) {
                let _ = lane.await;
            }
        }
        let detail = if purge {
            let ledger = self.ledger.clone();
            let n = name.to_string();
            let removed = tokio::task::spawn_blocking(move || ledger.purge_handler(&n))
                .await
                .map_err(|e| AdminError::Internal(e.into()))?
                .map_err(|e| AdminError::Internal(e.into()))?;
            format!("undeploy with purge: {removed} records removed")
        } else {
            "undeploy (state kept)".to_string()
        };
        // After a purge nothing of the handler is left, not even its control.
        let control = (!purge).then_some(HandlerControl {
            undeployed: true,
            ..control
        });
        self.persist_control(name, control, "undeploy", detail)
            .await?;
        tracing::info!(handler = name, purge, "undeployed");
        Ok(())
    }

    /// Appends validated messages to `topic` and returns their offsets (in
    /// request order) once they are durable.
    pub async fn ingest(
        &self,
        topic: &str,
        messages: Vec<IncomingMessage>,
    ) -> anyhow::Result<Vec<u64>> {
        if let Some(js) = self.jetstreams.get(topic) {
            // Producing to a JetStream topic through ordo publishes to the
            // stream; the answer carries the stream sequences.
            let mut acks = Vec::with_capacity(messages.len());
            for m in messages {
                let partition = partition_for(&m.key, js.config.partitions);
                acks.push(
                    js.publish_nowait(
                        partition,
                        &m.key,
                        m.idempotency_key.as_deref(),
                        &m.headers,
                        m.payload,
                    )
                    .await?,
                );
            }
            return crate::source::jetstream::await_acks(acks).await;
        }
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
        let committer = self.committer.clone();
        let topics = self.topics.clone();
        let topic_owned = topic.to_string();
        let (offsets, ticket) = tokio::task::spawn_blocking(move || {
            let (offsets, ticket) = committer.append(&topic_owned, &items)?;
            // Applied, not yet durable: lanes may process them while the
            // flush runs (see `source::topics`: a lane's commit follows the
            // append in the ledger's log, so it never survives a crash
            // without it). The producer is answered only once durable.
            let mut runs: HashMap<u32, Vec<(u64, Envelope)>> = HashMap::new();
            for ((p, envelope), offset) in items.into_iter().zip(offsets.iter().copied()) {
                runs.entry(p).or_default().push((offset, envelope));
            }
            for (p, run) in runs {
                let next = run.last().map(|(o, _)| o + 1);
                topics
                    .tail(&topic_owned, p)
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend(run);
                // After the tail: a lane woken by the watermark finds them
                // there.
                if let Some(next) = next {
                    topics.publish(&topic_owned, p, next);
                }
            }
            Ok::<_, crate::ledger::LedgerError>((offsets, ticket))
        })
        .await??;
        self.committer.wait_durable(ticket).await?;
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

    /// The position of the lane of `handler` that consumes `partition_key`'s
    /// messages, watched: a producer that got offset `o` for a message with
    /// that key waits for `committed > o` to know the handler's effects of
    /// it are durable (or that it was skipped as a duplicate or
    /// dead-lettered). Follows the handler across hot deploys; ends (a
    /// wait on it fails) when the handler is undeployed, and stops moving
    /// once the host shuts down.
    pub fn lane_position(
        &self,
        handler: &str,
        partition_key: &str,
    ) -> anyhow::Result<watch::Receiver<LanePosition>> {
        let slots = self.slots();
        let slot = slots
            .get(handler)
            .ok_or_else(|| anyhow::anyhow!("no handler named {handler:?} is deployed"))?;
        let partition = partition_for(partition_key, slot.positions.len() as u32);
        slot.positions
            .get(partition as usize)
            .map(watch::Sender::subscribe)
            .ok_or_else(|| anyhow::anyhow!("handler {handler:?} has no lanes"))
    }

    /// Everything the host counts, in the Prometheus text format.
    pub fn metrics_text(&self) -> anyhow::Result<String> {
        use crate::metrics::{HandlerLabel, LaneLabel};
        use prometheus_client::metrics::counter::Counter;
        use prometheus_client::metrics::family::Family;
        use prometheus_client::metrics::gauge::Gauge;
        use std::sync::atomic::Ordering::Relaxed;

        type Read = fn(&HandlerStats) -> u64;
        let counters: [(&str, &str, Read); 9] = [
            (
                "messages_processed",
                "Messages whose effects were committed (replays included)",
                |s| s.processed.load(Relaxed),
            ),
            (
                "duplicates",
                "Messages skipped as duplicates of a recorded idempotency key",
                |s| s.duplicates.load(Relaxed),
            ),
            (
                "conflicts",
                "Duplicates whose payload differed from the recorded one",
                |s| s.conflicts.load(Relaxed),
            ),
            (
                "dead_lettered",
                "Messages dead-lettered by a failure",
                |s| s.dead_lettered.load(Relaxed),
            ),
            (
                "held",
                "Messages held in the dead-letter queue behind a parked key",
                |s| s.held.load(Relaxed),
            ),
            ("retries", "Failed attempts retried after a backoff", |s| {
                s.retries.load(Relaxed)
            }),
            ("replayed", "Dead letters replayed successfully", |s| {
                s.replayed.load(Relaxed)
            }),
            ("dropped", "Dead letters dropped by an operator", |s| {
                s.dropped.load(Relaxed)
            }),
            ("batches", "Lane transactions committed", |s| {
                s.batches.load(Relaxed)
            }),
        ];
        let counter_families: Vec<Family<HandlerLabel, Counter>> =
            counters.iter().map(|_| Family::default()).collect();
        let dlq_size = Family::<HandlerLabel, Gauge>::default();
        let parked = Family::<HandlerLabel, Gauge>::default();
        let pending = Family::<HandlerLabel, Gauge>::default();
        let version = Family::<HandlerLabel, Gauge>::default();
        let lag = Family::<LaneLabel, Gauge>::default();
        {
            let slots = self.slots();
            for (name, slot) in slots.iter() {
                let label = HandlerLabel {
                    handler: name.clone(),
                };
                for ((_, _, read), family) in counters.iter().zip(&counter_families) {
                    family.get_or_create(&label).inc_by(read(&slot.stats));
                }
                dlq_size
                    .get_or_create(&label)
                    .set(self.ledger.dlq_count(name)? as i64);
                parked
                    .get_or_create(&label)
                    .set(self.ledger.parked_count(name)? as i64);
                pending
                    .get_or_create(&label)
                    .set(self.ledger.dlq_actions_pending(name)? as i64);
                let v = slot.current.stable.version;
                version.get_or_create(&label).set(v as i64);
                for (p, l) in self.lane_lags(name, &slot.topic)?.into_iter().enumerate() {
                    lag.get_or_create(&LaneLabel {
                        handler: name.clone(),
                        partition: p.to_string(),
                    })
                    .set(l as i64);
                }
            }
        }
        let mut reg = prometheus_client::registry::Registry::with_prefix("ordo");
        for ((name, help, _), family) in counters.iter().zip(counter_families) {
            reg.register(*name, *help, family);
        }
        reg.register(
            "dlq_size",
            "Dead letters in the queue (failed and held)",
            dlq_size,
        );
        reg.register(
            "parked_keys",
            "Partition keys parked behind a dead letter",
            parked,
        );
        reg.register(
            "dlq_actions_pending",
            "Operator replays/drops not yet carried out",
            pending,
        );
        reg.register("handler_version", "Active handler version", version);
        reg.register(
            "lag_messages",
            "Messages of the partition not yet committed by the handler",
            lag,
        );
        reg.register(
            "handler_seconds",
            "Handler invocation time (instantiation, unless an instance is reused, + call)",
            self.metrics.handler_seconds.clone(),
        );
        reg.register(
            "handler_instances",
            "Sandbox instances created: one per message unless the handler reuses instances (messages_per_instance)",
            self.metrics.instances.clone(),
        );
        reg.register(
            "handler_memory_grown",
            "Instances whose memory a message grew past its initial size (each costs about twice a fresh instance's price)",
            self.metrics.memory_grown.clone(),
        );
        reg.register(
            "batch_messages",
            "Messages per committed lane transaction",
            self.metrics.batch_messages.clone(),
        );
        reg.register(
            "commit_batches",
            "Lane batches per ledger transaction (a worker applies the ones ready together)",
            self.workers.batches_per_commit(),
        );
        reg.register(
            "commit_seconds",
            "Time to apply one ledger transaction, before its flush",
            self.committer.commit_seconds(),
        );
        reg.register(
            "flush_seconds",
            "Time of one group flush (sled flush + fdatasync)",
            self.committer.flush_seconds(),
        );
        let flushes: Counter = Counter::default();
        flushes.inc_by(self.committer.flushes());
        reg.register("flushes", "Group flushes performed", flushes);
        let gauge = |v: u64| {
            let g: Gauge = Gauge::default();
            g.set(v as i64);
            g
        };
        reg.register(
            "outbox_backlog",
            "Outbox entries not yet relayed",
            gauge(self.ledger.outbox_len() as u64),
        );
        let (_, published, failures) = self.outbox_status();
        let relayed: Counter = Counter::default();
        relayed.inc_by(published);
        reg.register(
            "outbox_relayed",
            "Outbox entries published and acknowledged by the broker",
            relayed,
        );
        let relay_failures: Counter = Counter::default();
        relay_failures.inc_by(failures);
        reg.register(
            "outbox_relay_failures",
            "Outbox relay rounds that failed (entries kept and retried)",
            relay_failures,
        );
        reg.register(
            "ledger_bytes",
            "Ledger size on disk",
            gauge(self.ledger.size_on_disk()?),
        );
        reg.register(
            "dedup_index_bytes",
            "Memory of the in-memory index of idempotency keys (grows with the dedup window)",
            gauge(self.ledger.dedup_index_bytes() as u64),
        );
        let swept: Counter = Counter::default();
        swept.inc_by(self.dedup_swept.load(Relaxed));
        reg.register(
            "dedup_swept_records",
            "Idempotency records removed by the dedup retention window",
            swept,
        );
        let retention: Counter = Counter::default();
        retention.inc_by(self.retention_removed.load(Relaxed));
        reg.register(
            "retention_removed_messages",
            "Embedded-log messages removed by retention",
            retention,
        );
        reg.register(
            "healthy",
            "1 while the ledger accepts durable writes",
            gauge(u64::from(self.healthy())),
        );
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg)?;
        Ok(out)
    }

    /// Messages of each partition of `topic` not yet committed by `handler`.
    fn lane_lags(&self, handler: &str, topic: &str) -> anyhow::Result<Vec<u64>> {
        if let Some(js) = self.jetstreams.get(topic) {
            // What the broker reported pending after the last message each
            // lane received, plus what the lane holds uncommitted.
            return Ok((0..js.config.partitions)
                .map(|p| js.lag(handler, p))
                .collect());
        }
        let mut lags = Vec::new();
        for p in 0..self.topics.partitions(topic).unwrap_or(0) {
            let hwm = self.ledger.high_watermark(topic, p)?;
            let cursor = self
                .ledger
                .cursor(handler, crate::dispatch::EMBEDDED_SOURCE, p)?;
            lags.push(hwm.saturating_sub(cursor));
        }
        Ok(lags)
    }

    /// Status of every handler.
    pub fn status(&self) -> anyhow::Result<Vec<HandlerStatus>> {
        use std::sync::atomic::Ordering::Relaxed;
        let slots = self.slots();
        let mut out = Vec::new();
        for (name, slot) in slots.iter() {
            let (version, policy) = (
                slot.current.stable.version,
                slot.current.stable.policy.clone(),
            );
            let partition_lags = self.lane_lags(name, &slot.topic)?;
            let lag = partition_lags.iter().sum();
            let dead_letters = self.ledger.dlq_list(name)?;
            out.push(HandlerStatus {
                source: if self.jetstreams.get(&slot.topic).is_some() {
                    "jetstream"
                } else {
                    "log"
                },
                partition_lags,
                name: name.clone(),
                version,
                topic: slot.topic.clone(),
                lag,
                processed: slot.stats.processed.load(Relaxed),
                duplicates: slot.stats.duplicates.load(Relaxed),
                conflicts: slot.stats.conflicts.load(Relaxed),
                dead_lettered: dead_letters.len() as u64,
                held: dead_letters
                    .iter()
                    .filter(|(_, d)| d.error_kind == crate::dispatch::HELD_KIND)
                    .count() as u64,
                parked_keys: self.ledger.parked_count(name)?,
                pending_dlq_actions: self.ledger.dlq_actions_pending(name)?,
                retries: slot.stats.retries.load(Relaxed),
                replayed: slot.stats.replayed.load(Relaxed),
                on_failure: policy.on_failure.as_str(),
                max_attempts: policy.retry.max_attempts,
                paused: slot.paused,
                canary: slot
                    .current
                    .canary
                    .as_ref()
                    .map(|(c, pct)| serde_json::json!({ "version": c.version, "percent": pct })),
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Dead letters of `handler` (optionally of one partition key), oldest
    /// first, at most `limit`.
    pub fn dlq_list(
        &self,
        handler: &str,
        key: Option<&str>,
        limit: usize,
    ) -> anyhow::Result<Vec<DlqEntry>> {
        let parked: std::collections::HashSet<String> = self
            .ledger
            .parked_list(handler)?
            .into_iter()
            .map(|(_, p)| p.partition_key)
            .collect();
        Ok(self
            .ledger
            .dlq_list(handler)?
            .into_iter()
            .filter(|(_, d)| key.is_none_or(|k| d.partition_key == k))
            .take(limit)
            .map(|(seq, record)| DlqEntry {
                seq,
                key_parked: parked.contains(&record.partition_key),
                record,
            })
            .collect())
    }

    /// Names of the running handlers.
    pub fn handler_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.slots().keys().cloned().collect();
        names.sort();
        names
    }

    /// Asks the lanes of `handler` to replay or drop the selected dead
    /// letters, in their original order, and records the action in the
    /// audit trail. Returns how many were selected; the lanes carry them out
    /// asynchronously (see `pending_dlq_actions` in the status).
    pub async fn dlq_request(
        &self,
        handler: &str,
        selector: DlqSelector,
        action: DlqAction,
        reason: Option<String>,
    ) -> Result<usize, AdminError> {
        let internal = |e: crate::ledger::LedgerError| AdminError::Internal(e.into());
        let control = match self.slots().get(handler) {
            Some(slot) => slot.control.clone(),
            None => {
                return Err(AdminError::NotFound(format!(
                    "no handler {handler:?} is deployed"
                )))
            }
        };
        let selected: Vec<(u64, DeadLetter)> = self
            .ledger
            .dlq_list(handler)
            .map_err(internal)?
            .into_iter()
            .filter(|(seq, d)| match &selector {
                DlqSelector::Seq(s) => seq == s,
                DlqSelector::Key(k) => &d.partition_key == k,
                DlqSelector::All => true,
            })
            .collect();
        if let (DlqSelector::Seq(seq), true) = (&selector, selected.is_empty()) {
            return Err(AdminError::NotFound(format!(
                "handler {handler:?} has no dead letter {seq}"
            )));
        }
        let (verb, name) = match action {
            DlqAction::Replay | DlqAction::ReplayKey => ("replay", "dlq-replay"),
            DlqAction::Drop => ("drop", "dlq-drop"),
            DlqAction::PauseKey(_) | DlqAction::ResumeKey(_) => {
                return Err(AdminError::BadRequest(
                    "pausing and resuming keys is not a dead-letter action".into(),
                ))
            }
        };
        let what = match &selector {
            DlqSelector::Seq(s) => format!("dead letter {s}"),
            DlqSelector::Key(k) => format!("key {k:?}"),
            DlqSelector::All => "all dead letters".to_string(),
        };
        let mut detail = format!("{verb} {what}: {} message(s)", selected.len());
        if let Some(r) = &reason {
            detail.push_str(&format!(", reason {r:?}"));
        }
        for (seq, d) in selected.iter().take(1000) {
            detail.push_str(&format!(
                "; #{seq} key={:?} idempotency_key={:?} {}/{}@{} kind={}",
                d.partition_key, d.idempotency_key, d.topic, d.partition, d.offset, d.error_kind
            ));
        }
        // Replaying keys follows each key's backlog from its oldest entry
        // (messages held after this request included); single messages and
        // drops are per entry.
        let mut requests: Vec<(u32, u64, DlqAction)> = Vec::new();
        let mut keys_seen = std::collections::HashSet::new();
        for (seq, d) in &selected {
            match (&action, &selector) {
                (DlqAction::Replay, DlqSelector::Key(_) | DlqSelector::All) => {
                    if keys_seen.insert((d.partition, d.partition_key.as_str())) {
                        requests.push((d.partition, *seq, DlqAction::ReplayKey));
                    }
                }
                _ => requests.push((d.partition, *seq, action.clone())),
            }
        }
        self.submit_actions(handler, &control, requests, name, detail)
            .await?;
        tracing::info!(handler, action = verb, selection = %what, count = selected.len(), "dead-letter action requested");
        Ok(selected.len())
    }

    /// What the host knows of one partition key of a handler: its lane,
    /// whether it is parked or paused, its dead letters and its state.
    pub fn key_info(&self, handler: &str, key: &str) -> anyhow::Result<Option<serde_json::Value>> {
        let topic = match self.slots().get(handler) {
            Some(slot) => slot.topic.clone(),
            None => return Ok(None),
        };
        let partition = partition_for(key, self.topics.partitions(&topic).unwrap_or(1));
        let parked = self
            .ledger
            .parked_keys(handler, partition)?
            .into_iter()
            .find(|p| p.partition_key == key);
        let dead_letters: Vec<DlqEntry> = self.dlq_list(handler, Some(key), 1000)?;
        let dead_letters: Vec<serde_json::Value> = dead_letters
            .iter()
            .map(|e| {
                serde_json::json!({
                    "seq": e.seq, "offset": e.record.offset, "idempotency_key": e.record.idempotency_key,
                    "kind": e.record.error_kind, "error": e.record.error, "attempts": e.record.attempts,
                    "version": e.record.version,
                })
            })
            .collect();
        let state: serde_json::Map<String, serde_json::Value> = self
            .ledger
            .state_entries(handler, key)?
            .into_iter()
            .map(|(k, v)| {
                let text = String::from_utf8_lossy(&v);
                let shown: String = text.chars().take(512).collect();
                (k, serde_json::Value::String(shown))
            })
            .collect();
        Ok(Some(serde_json::json!({
            "handler": handler,
            "key": key,
            "topic": topic,
            "partition": partition,
            "parked": parked.as_ref().map(|p| serde_json::json!({
                "since_ms": p.since_ms, "paused_by_operator": p.paused, "cause_seq": p.cause_seq,
            })),
            "dead_letters": dead_letters,
            "state": state,
        })))
    }

    /// The idempotency record of one message of a handler.
    pub fn dedup_record(
        &self,
        handler: &str,
        idempotency_key: &str,
    ) -> anyhow::Result<Option<crate::ledger::DedupRecord>> {
        Ok(self.ledger.dedup_get(handler, idempotency_key)?)
    }

    /// Records lane actions and their audit record durably, then wakes the
    /// handler's lanes.
    async fn submit_actions(
        &self,
        handler: &str,
        control: &watch::Sender<u64>,
        requests: Vec<(u32, u64, DlqAction)>,
        action: &str,
        detail: String,
    ) -> Result<(), AdminError> {
        let ledger = self.ledger.clone();
        let audit = AuditRecord {
            at_ms: now_ms(),
            action: action.to_string(),
            handler: handler.to_string(),
            detail,
        };
        let handler_owned = handler.to_string();
        tokio::task::spawn_blocking(move || -> Result<(), crate::ledger::LedgerError> {
            ledger.request_dlq_actions(&handler_owned, &requests)?;
            ledger.append_audit(&audit)?;
            ledger.flush()
        })
        .await
        .map_err(|e| AdminError::Internal(e.into()))?
        .map_err(|e| AdminError::Internal(e.into()))?;
        control.send_modify(|g| *g += 1);
        Ok(())
    }

    /// Pauses one partition key of a handler (its messages are held, in
    /// order, like a parked key's, while other keys flow) or resumes it (its
    /// held backlog is replayed oldest first, then it flows again). Carried
    /// out by the key's lane; see `pending_dlq_actions` in the status.
    pub async fn pause_key(&self, handler: &str, key: &str, pause: bool) -> Result<(), AdminError> {
        if key.is_empty() || key.len() > 1024 {
            return Err(AdminError::BadRequest(
                "a partition key is 1 to 1024 bytes".into(),
            ));
        }
        let (control, topic) = match self.slots().get(handler) {
            Some(slot) => (slot.control.clone(), slot.topic.clone()),
            None => {
                return Err(AdminError::NotFound(format!(
                    "no handler {handler:?} is deployed"
                )))
            }
        };
        let partitions = self.topics.partitions(&topic).unwrap_or(1);
        let partition = partition_for(key, partitions);
        let seq = self
            .ledger
            .next_id()
            .map_err(|e| AdminError::Internal(e.into()))?;
        let (action, name) = if pause {
            (DlqAction::PauseKey(key.to_string()), "pause-key")
        } else {
            (DlqAction::ResumeKey(key.to_string()), "resume-key")
        };
        self.submit_actions(
            handler,
            &control,
            vec![(partition, seq, action)],
            name,
            format!("{name} {key:?} (partition {partition})"),
        )
        .await
    }

    /// The audit trail, oldest first, optionally of one handler.
    pub fn audit(&self, handler: Option<&str>) -> anyhow::Result<Vec<(u64, AuditRecord)>> {
        Ok(self.ledger.audit_list(handler)?)
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
            .flat_map(|s| {
                s.stop.send_replace(true);
                std::mem::take(&mut s.lanes)
            })
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::runtime::{Failure, FailureKind, Message, Overlay, StateAccess};

    /// Counts each key's messages; a payload of `bad` fails for good.
    struct Count;

    impl NativeHandler for Count {
        fn handle(
            &self,
            msg: &Message,
            state: &mut dyn StateAccess,
            overlay: &mut Overlay,
        ) -> Result<(), Failure> {
            if msg.payload == b"bad" {
                return Err(Failure::new(FailureKind::Permanent, "bad"));
            }
            let host = |e: anyhow::Error| Failure::new(FailureKind::Host, e.to_string());
            let count = state
                .get("count")
                .map_err(host)?
                .map_or(0, |c| c.first().copied().unwrap_or(0))
                + 1;
            overlay.writes.insert("count".into(), Some(vec![count]));
            Ok(())
        }
    }

    fn message(key: &str, idempotency_key: &str, payload: &[u8]) -> IncomingMessage {
        IncomingMessage {
            key: key.into(),
            idempotency_key: Some(idempotency_key.into()),
            payload: payload.to_vec(),
            headers: vec![],
        }
    }

    async fn committed_past(host: &Host, key: &str, offset: u64) -> LanePosition {
        let mut position = host.lane_position("count", key).expect("position");
        let reached = position.wait_for(|p| p.committed > offset);
        let at = *tokio::time::timeout(Duration::from_secs(10), reached)
            .await
            .expect("committed in time")
            .expect("lane running");
        at
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lane_position_says_when_a_produced_message_is_committed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let host = Host::open(dir.path(), HostConfig::default())
            .await
            .expect("open");
        host.run_native("count", "t", Arc::new(Count)).expect("run");
        let err = host.lane_position("nobody", "k").expect_err("no handler");
        assert!(err.to_string().contains("nobody"), "{err}");

        // Processed, duplicate, dead-lettered and held messages all move it
        // (the default policy parks the key of a message that failed).
        let offsets = host
            .ingest(
                "t",
                vec![
                    message("k", "a", b"1"),
                    message("k", "a", b"1"),
                    message("k", "b", b"bad"),
                    message("k", "c", b"2"),
                ],
            )
            .await
            .expect("ingest");
        let last = *offsets.last().expect("offsets");
        let at = committed_past(&host, "k", last).await;
        assert_eq!(at.committed, last + 1, "{at:?}");
        assert!(at.applied >= at.committed, "{at:?}");
        // Committed means counted and readable.
        let count = host.state_get("count", "k", "count").expect("state");
        assert_eq!(count, Some(vec![1]));
        let status = host.status().expect("status");
        let s = status.first().expect("one handler");
        assert_eq!((s.processed, s.duplicates, s.held, s.lag), (1, 1, 1, 0));
        host.shutdown().await.expect("shutdown");
        drop(host);

        // After a restart the lane starts where it had committed.
        let host = Host::open(dir.path(), HostConfig::default())
            .await
            .expect("reopen");
        host.run_native("count", "t", Arc::new(Count)).expect("run");
        let at = committed_past(&host, "k", last).await;
        assert_eq!(at.committed, last + 1, "{at:?}");
        assert_eq!(host.status().expect("status")[0].processed, 0);
        host.shutdown().await.expect("shutdown");
    }
}
