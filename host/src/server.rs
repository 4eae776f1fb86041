//! `ordo serve`: the host process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;

use crate::api::ingest::IngestLimits;
use crate::api::{router, ApiState};
use crate::config::{ConfigFile, StartFrom};
use crate::host::{DesiredHandler, Host, HostConfig};

/// Options of `ordo serve`. Each overrides the same key of `--config`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Declarative configuration (`ordo.toml`): server settings, topics,
    /// handlers with their components, policies and limits.
    #[arg(long, env = "ORDO_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory of the ledger, topics and compiled artifacts.
    #[arg(long, env = "ORDO_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address of the admin/ingest HTTP API [default: 127.0.0.1:7070].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Partitions of topics created on first use [default: 16].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub partitions: Option<u32>,
    /// Largest message payload accepted, in bytes [default: 1 MiB].
    #[arg(long)]
    pub max_payload_bytes: Option<usize>,
    /// Largest deployable component, in bytes [default: 32 MiB].
    #[arg(long)]
    pub max_component_bytes: Option<usize>,
    /// Messages per lane transaction, at most [default: 256].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_batch: Option<u64>,
    /// Threads that run lane batches (handler calls and ledger commits);
    /// each lane is served by one of them, and a thread commits the
    /// batches it ran together [default: one per core, at least two].
    #[arg(long, env = "ORDO_WORKERS", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub workers: Option<u32>,
    /// Retention of topics created on first use: committed messages older
    /// than this are removed from the embedded log [default: 7 days].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub topic_retention_secs: Option<u64>,
    /// Committed idempotency records older than this are removed; a
    /// duplicate arriving later is processed again. 0 keeps them for ever
    /// [default: 7 days].
    #[arg(long)]
    pub dedup_retention_secs: Option<u64>,
    /// Memory for the ledger's page cache, in MiB: records outside it (old
    /// idempotency keys, cold keys' state) are read from disk [default: 256].
    #[arg(long, value_parser = clap::value_parser!(u64).range(16..))]
    pub ledger_cache_mib: Option<u64>,
    /// How often the retention tasks run [default: 60000].
    #[arg(long, value_parser = clap::value_parser!(u64).range(10..))]
    pub retention_interval_ms: Option<u64>,
    /// Consume this topic from NATS JetStream (stream and subject prefix
    /// named like the topic, partition p = subject `"<topic>.<p>"`, key in
    /// header Ordo-Key, idempotency key in Nats-Msg-Id). Repeatable; the
    /// config file's `[topics.NAME.jetstream]` sets every detail.
    #[arg(long = "jetstream-topic", value_name = "TOPIC")]
    pub jetstream_topics: Vec<String>,
    /// NATS server of `--jetstream-topic` topics [default:
    /// nats://127.0.0.1:4222].
    #[arg(long, value_name = "URL")]
    pub nats_url: Option<String>,
    /// Retry and failure policy of handlers deployed without one.
    #[command(flatten)]
    pub policy: crate::cli::PolicyArgs,
}

/// Runs the host until SIGTERM/SIGINT, then shuts down gracefully: stops
/// accepting requests, lets lanes finish their batch, flushes, returns.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(path) => ConfigFile::load(path)?,
        None => ConfigFile::default(),
    };
    let srv = &file.server;
    let listen = args
        .listen
        .or(srv.listen)
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7070)));
    let admin_token = admin_token(listen)?;
    let data_dir = args.data_dir.clone().or(srv.data_dir.clone()).ok_or_else(|| {
        anyhow::anyhow!("no data directory: pass --data-dir, set ORDO_DATA_DIR or server.data_dir in the config")
    })?;
    let mut config = HostConfig::default();
    let spanned = |v: &Option<toml::Spanned<u64>>| v.as_ref().map(|s| *s.get_ref());
    if let Some(p) = args
        .partitions
        .or(srv.partitions.as_ref().map(|s| *s.get_ref()))
    {
        config.topic_defaults.partitions = p;
    }
    if let Some(b) = args
        .max_batch
        .map(|b| b as usize)
        .or(srv.max_batch.as_ref().map(|s| *s.get_ref()))
    {
        config.max_batch = b.max(1);
    }
    if let Some(w) = args.workers.or(srv.workers.as_ref().map(|s| *s.get_ref())) {
        config.workers = w.max(1) as usize;
    }
    if let Some(r) = args
        .topic_retention_secs
        .or(spanned(&srv.topic_retention_secs))
    {
        config.topic_defaults.retention_ms = r.saturating_mul(1000);
    }
    if let Some(i) = args
        .retention_interval_ms
        .or(spanned(&srv.retention_interval_ms))
    {
        config.retention_interval = std::time::Duration::from_millis(i);
    }
    if let Some(c) = args.ledger_cache_mib.or(spanned(&srv.ledger_cache_mib)) {
        config.ledger_cache_bytes = c.saturating_mul(1 << 20);
    }
    if let Some(d) = args.dedup_retention_secs.or(srv.dedup_retention_secs) {
        config.dedup_retention = (d > 0).then(|| std::time::Duration::from_secs(d));
    }
    if let Some(m) = args.max_component_bytes.or(srv.max_component_bytes) {
        config.runtime.max_component_bytes = m;
    }
    if let Some(r) = &file.defaults.retry {
        config.failure_policy = r
            .get_ref()
            .overrides()
            .apply(&config.failure_policy)
            .map_err(|e| anyhow::anyhow!("invalid defaults.retry: {e}"))?;
    }
    config.failure_policy = args
        .policy
        .overrides()
        .apply(&config.failure_policy)
        .map_err(|e| anyhow::anyhow!("invalid retry/failure policy: {e}"))?;
    if let Some(l) = &file.defaults.limits {
        config.handler_limits = l.get_ref().clone();
    }
    for (name, t) in &file.topics {
        if let Some(js) = &t.get_ref().jetstream {
            config.jetstream.push((name.clone(), js.clone()));
        }
    }
    for name in &args.jetstream_topics {
        crate::source::validate_topic_name(name)
            .map_err(|e| anyhow::anyhow!("--jetstream-topic {name}: {e}"))?;
        if let Some((_, existing)) = config.jetstream.iter_mut().find(|(n, _)| n == name) {
            if let Some(url) = &args.nats_url {
                existing.url = url.clone();
            }
            continue;
        }
        let mut js = crate::source::jetstream::JetStreamConfig {
            partitions: config.topic_defaults.partitions,
            ..Default::default()
        };
        if let Some(url) = &args.nats_url {
            js.url = url.clone();
        }
        config.jetstream.push((name.clone(), js));
    }
    let ingest = IngestLimits {
        max_payload_bytes: args
            .max_payload_bytes
            .or(srv.max_payload_bytes)
            .unwrap_or(IngestLimits::default().max_payload_bytes),
        ..IngestLimits::default()
    };
    let max_component_bytes = config.runtime.max_component_bytes;
    let default_policy = config.failure_policy.clone();
    let default_limits = config.handler_limits.clone();
    let host = Host::open(&data_dir, config)
        .await
        .with_context(|| format!("opening data dir {}", data_dir.display()))?;
    apply_config(&host, &file, &default_policy, &default_limits).await?;
    let app = router(ApiState {
        host: host.clone(),
        ingest: Arc::new(ingest),
        max_component_bytes,
        admin_token,
    });
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    // The bound address: with port 0 the kernel picked it.
    let bound = listener.local_addr().unwrap_or(listen);
    tracing::info!(listen = %bound, data_dir = %data_dir.display(), "ordo serving");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("HTTP server")?;
    tracing::info!("shutting down: finishing in-flight batches");
    host.shutdown().await?;
    tracing::info!("shut down cleanly");
    Ok(())
}

/// Creates the file's topics and deploys its handlers where the running
/// version differs (component, topic, policy or limits).
async fn apply_config(
    host: &Arc<Host>,
    file: &ConfigFile,
    default_policy: &crate::ledger::FailurePolicy,
    default_limits: &crate::runtime::HandlerLimits,
) -> anyhow::Result<()> {
    for (name, topic) in &file.topics {
        let t = topic.get_ref();
        if t.jetstream.is_some() {
            continue;
        }
        host.configure_topic(
            name,
            t.partitions.as_ref().map(|p| *p.get_ref()),
            t.retention_secs
                .as_ref()
                .map(|s| s.get_ref().saturating_mul(1000)),
        )
        .with_context(|| format!("config: topics.{name}"))?;
    }
    for (name, section) in &file.handlers {
        let h = section.get_ref();
        let path = h.component.get_ref();
        let bytes = std::fs::read(path)
            .with_context(|| format!("config: handlers.{name}: reading {}", path.display()))?;
        let policy = match &h.retry {
            Some(r) => r
                .overrides()
                .apply(default_policy)
                .map_err(|e| anyhow::anyhow!("config: handlers.{name}.retry: {e}"))?,
            None => default_policy.clone(),
        };
        let limits = h.limits.clone().unwrap_or_else(|| default_limits.clone());
        let deployed = host
            .apply_handler(
                name,
                DesiredHandler {
                    topic: h.topic.clone(),
                    bytes,
                    policy,
                    limits,
                    from_latest: h.from == StartFrom::Latest,
                    comment: h.comment.clone(),
                },
            )
            .await
            .map_err(|e| anyhow::anyhow!("config: handlers.{name}: {e}"))?;
        match deployed {
            Some(v) => tracing::info!(handler = %name, version = v.version, "config: deployed"),
            None => tracing::info!(handler = %name, "config: already running this version"),
        }
    }
    Ok(())
}

/// The admin token from `ORDO_ADMIN_TOKEN`; refuses to serve a non-loopback
/// address without one.
fn admin_token(listen: SocketAddr) -> anyhow::Result<Option<Arc<str>>> {
    let token = match std::env::var("ORDO_ADMIN_TOKEN") {
        Ok(t) if t.trim().is_empty() => {
            anyhow::bail!("ORDO_ADMIN_TOKEN is set but empty; set a real token or unset it")
        }
        Ok(t) => Some(Arc::<str>::from(t)),
        Err(std::env::VarError::NotPresent) => None,
        Err(std::env::VarError::NotUnicode(_)) => {
            anyhow::bail!("ORDO_ADMIN_TOKEN is not valid UTF-8")
        }
    };
    if token.is_none() && !listen.ip().is_loopback() {
        anyhow::bail!(
            "refusing to listen on {} without an admin token: anyone who can reach it could deploy code. \
             Set ORDO_ADMIN_TOKEN, or listen on a loopback address (e.g. 127.0.0.1:{})",
            listen,
            listen.port()
        );
    }
    Ok(token)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install SIGTERM handler");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
