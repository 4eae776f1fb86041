//! `ordo.toml`: the declarative configuration applied by
//! `ordo serve --config FILE`.
//!
//! ```toml
//! [server]                       # every key also has an `ordo serve` flag,
//! data_dir = "/var/lib/ordo"     # which wins over the file
//! listen = "127.0.0.1:7070"
//! partitions = 16                # of topics created on first use
//! topic_retention_secs = 604800
//! ledger_cache_mib = 256         # ledger pages kept in memory
//! workers = 2                    # threads running lane batches (default:
//!                                # one per core, at least two)
//!
//! [defaults.retry]               # policy of handlers that set none
//! max_attempts = 10
//! on_failure = "park-key"
//!
//! [defaults.limits]              # sandbox limits of handlers that set none
//! memory_bytes = 67108864
//! deadline_ms = 1000
//! messages_per_instance = 1      # >1: an instance runs several messages
//!                                # of a lane batch (opt-in; README)
//!
//! [topics.orders]
//! partitions = 8
//! retention_secs = 86400
//!
//! [topics.payments.jetstream]    # a topic on NATS JetStream: partition p
//! url = "nats://127.0.0.1:4222"  # is the subject "<subject>.<p>"
//! stream = "PAYMENTS"            # default: the topic name
//! subject = "payments"           # default: the topic name
//! partitions = 16
//! key_header = "Ordo-Key"        # partition key (default: the subject)
//! idempotency_header = "Nats-Msg-Id"
//! create_stream = true
//! max_in_flight = 512            # messages a lane buffers ahead
//!
//! [handlers.billing]
//! component = "handlers/billing.wasm"   # relative to this file
//! topic = "orders"
//! from = "earliest"
//! retry = { max_attempts = 5, on_failure = "dead-letter" }
//! limits = { deadline_ms = 500 }
//! ```
//!
//! Unknown keys and values of the wrong type are refused by the parser with
//! the file, line and column; values out of range are refused with the file,
//! line and the key's path.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::host::PolicyOverrides;
use crate::ledger::OnFailure;
use crate::runtime::HandlerLimits;

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Host settings.
    #[serde(default)]
    pub server: ServerSection,
    /// Defaults for handlers.
    #[serde(default)]
    pub defaults: DefaultsSection,
    /// Embedded-log topics, by name.
    #[serde(default)]
    pub topics: BTreeMap<String, Spanned<TopicSection>>,
    /// Handlers, by name.
    #[serde(default)]
    pub handlers: BTreeMap<String, Spanned<HandlerSection>>,
}

/// `[server]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// See `ordo serve --data-dir` (relative to the file).
    pub data_dir: Option<PathBuf>,
    /// See `ordo serve --listen`.
    pub listen: Option<SocketAddr>,
    /// See `ordo serve --partitions`.
    pub partitions: Option<Spanned<u32>>,
    /// See `ordo serve --max-payload-bytes`.
    pub max_payload_bytes: Option<usize>,
    /// See `ordo serve --max-component-bytes`.
    pub max_component_bytes: Option<usize>,
    /// See `ordo serve --max-batch`.
    pub max_batch: Option<Spanned<usize>>,
    /// See `ordo serve --workers`.
    pub workers: Option<Spanned<u32>>,
    /// See `ordo serve --topic-retention-secs`.
    pub topic_retention_secs: Option<Spanned<u64>>,
    /// See `ordo serve --dedup-retention-secs`.
    pub dedup_retention_secs: Option<u64>,
    /// See `ordo serve --retention-interval-ms`.
    pub retention_interval_ms: Option<Spanned<u64>>,
    /// See `ordo serve --ledger-cache-mib`.
    pub ledger_cache_mib: Option<Spanned<u64>>,
}

/// `[defaults]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultsSection {
    /// Retry and failure policy.
    pub retry: Option<Spanned<RetrySection>>,
    /// Sandbox limits.
    pub limits: Option<Spanned<HandlerLimits>>,
}

/// A retry and failure policy; unset keys keep the default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySection {
    /// Attempts of a retryable failure.
    pub max_attempts: Option<u32>,
    /// Backoff ceiling before the second attempt (ms).
    pub initial_backoff_ms: Option<u64>,
    /// Growth of the ceiling per attempt.
    pub backoff_factor: Option<f64>,
    /// Largest ceiling (ms).
    pub max_backoff_ms: Option<u64>,
    /// After a dead letter.
    pub on_failure: Option<OnFailureName>,
}

/// `on_failure` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnFailureName {
    /// Hold the key's later messages.
    ParkKey,
    /// Carry on with the key.
    DeadLetter,
}

impl RetrySection {
    /// As policy changes.
    pub fn overrides(&self) -> PolicyOverrides {
        PolicyOverrides {
            max_attempts: self.max_attempts,
            initial_backoff_ms: self.initial_backoff_ms,
            backoff_factor: self.backoff_factor,
            max_backoff_ms: self.max_backoff_ms,
            on_failure: self.on_failure.map(|o| {
                match o {
                    OnFailureName::ParkKey => OnFailure::ParkKey,
                    OnFailureName::DeadLetter => OnFailure::DeadLetter,
                }
                .as_str()
                .to_string()
            }),
        }
    }
}

/// `[topics.NAME]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSection {
    /// Partitions (fixed once the topic exists).
    pub partitions: Option<Spanned<u32>>,
    /// Retention of committed messages (seconds).
    pub retention_secs: Option<Spanned<u64>>,
    /// The topic lives on NATS JetStream instead of the embedded log.
    pub jetstream: Option<crate::source::jetstream::JetStreamConfig>,
}

/// Where a new handler starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StartFrom {
    /// The beginning of the topic.
    #[default]
    Earliest,
    /// Its end.
    Latest,
}

/// `[handlers.NAME]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandlerSection {
    /// The component file (relative to the config file).
    pub component: Spanned<PathBuf>,
    /// The topic it consumes.
    pub topic: String,
    /// Where a new handler starts.
    #[serde(default)]
    pub from: StartFrom,
    /// Comment kept with a deployed version.
    pub comment: Option<String>,
    /// Retry and failure policy (over `[defaults.retry]`).
    pub retry: Option<RetrySection>,
    /// Sandbox limits (instead of `[defaults.limits]`).
    pub limits: Option<HandlerLimits>,
}

/// A config file that cannot be used; the message names the place.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// 1-based line of byte offset `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    text.get(..at).map_or(0, |t| t.matches('\n').count()) + 1
}

impl ConfigFile {
    /// Parses and checks `text` (read from `path`, used in messages and to
    /// resolve relative paths).
    pub fn parse(text: &str, path: &Path) -> Result<ConfigFile, ConfigError> {
        let mut file: ConfigFile = toml::from_str(text).map_err(|e| {
            ConfigError(format!("{}: {}", path.display(), e.to_string().trim_end()))
        })?;
        let at = |span: std::ops::Range<usize>, what: &str, msg: String| {
            ConfigError(format!(
                "{}:{}: {what}: {msg}",
                path.display(),
                line_of(text, span.start)
            ))
        };
        let s = &file.server;
        if let Some(p) = &s.partitions {
            if !(1..=4096).contains(p.get_ref()) {
                return Err(at(
                    p.span(),
                    "server.partitions",
                    format!("must be 1..=4096, got {}", p.get_ref()),
                ));
            }
        }
        if let Some(c) = &s.ledger_cache_mib {
            if *c.get_ref() < 16 {
                return Err(at(
                    c.span(),
                    "server.ledger_cache_mib",
                    format!("must be at least 16, got {}", c.get_ref()),
                ));
            }
        }
        if let Some(b) = &s.max_batch {
            if *b.get_ref() == 0 {
                return Err(at(
                    b.span(),
                    "server.max_batch",
                    "must be at least 1".into(),
                ));
            }
        }
        if let Some(w) = &s.workers {
            if !(1..=1024).contains(w.get_ref()) {
                return Err(at(
                    w.span(),
                    "server.workers",
                    format!("must be from 1 to 1024, got {}", w.get_ref()),
                ));
            }
        }
        if let Some(r) = &s.topic_retention_secs {
            if *r.get_ref() == 0 {
                return Err(at(
                    r.span(),
                    "server.topic_retention_secs",
                    "must be at least 1".into(),
                ));
            }
        }
        if let Some(r) = &s.retention_interval_ms {
            if *r.get_ref() < 10 {
                return Err(at(
                    r.span(),
                    "server.retention_interval_ms",
                    "must be at least 10".into(),
                ));
            }
        }
        if let Some(r) = &file.defaults.retry {
            r.get_ref()
                .overrides()
                .apply(&Default::default())
                .map_err(|e| at(r.span(), "defaults.retry", e))?;
        }
        if let Some(l) = &file.defaults.limits {
            l.get_ref()
                .check()
                .map_err(|e| at(l.span(), "defaults.limits", e))?;
        }
        for (name, t) in &file.topics {
            let what = format!("topics.{name}");
            crate::source::validate_topic_name(name).map_err(|e| at(t.span(), &what, e))?;
            if let Some(p) = &t.get_ref().partitions {
                if !(1..=4096).contains(p.get_ref()) {
                    return Err(at(
                        p.span(),
                        &format!("{what}.partitions"),
                        format!("must be 1..=4096, got {}", p.get_ref()),
                    ));
                }
            }
            if let Some(js) = &t.get_ref().jetstream {
                if t.get_ref().partitions.is_some() || t.get_ref().retention_secs.is_some() {
                    return Err(at(
                        t.span(),
                        &what,
                        "a JetStream topic takes its partitions from its jetstream section and its retention from the stream".into(),
                    ));
                }
                js.validate()
                    .map_err(|e| at(t.span(), &format!("{what}.jetstream"), e))?;
            }
            if let Some(r) = &t.get_ref().retention_secs {
                if *r.get_ref() == 0 {
                    return Err(at(
                        r.span(),
                        &format!("{what}.retention_secs"),
                        "must be at least 1".into(),
                    ));
                }
            }
        }
        let base = path.parent().unwrap_or(Path::new("."));
        for (name, h) in file.handlers.iter_mut() {
            let span = h.span();
            let what = format!("handlers.{name}");
            crate::host::validate_handler_name(name).map_err(|e| at(span.clone(), &what, e))?;
            let section = h.get_mut();
            crate::source::validate_topic_name(&section.topic)
                .map_err(|e| at(span.clone(), &what, e))?;
            if let Some(l) = &section.limits {
                l.check()
                    .map_err(|e| at(span.clone(), &format!("{what}.limits"), e))?;
            }
            if let Some(r) = &section.retry {
                r.overrides()
                    .apply(&Default::default())
                    .map_err(|e| at(span.clone(), &format!("{what}.retry"), e))?;
            }
            let component_span = section.component.span();
            let component = section.component.get_mut();
            if component.is_relative() {
                *component = base.join(&*component);
            }
            if !component.is_file() {
                return Err(at(
                    component_span,
                    &format!("{what}.component"),
                    format!("no such file: {}", component.display()),
                ));
            }
        }
        if let Some(d) = &file.server.data_dir {
            if d.is_relative() {
                file.server.data_dir = Some(base.join(d));
            }
        }
        Ok(file)
    }

    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: cannot read: {e}", path.display())))?;
        Self::parse(&text, path)
    }

    /// The configuration as TOML (paths resolved).
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string(self).map_err(|e| ConfigError(format!("cannot write TOML: {e}")))
    }
}
