//! Values stored in the ledger trees. Each is encoded as one format-version
//! byte followed by the postcard encoding of the struct, so records can
//! evolve: a new version byte, and a decoder that accepts both.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::LedgerError;

/// Current record format.
const FORMAT_V1: u8 = 1;

/// Encodes a record.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, LedgerError> {
    let mut out = vec![FORMAT_V1];
    postcard::to_io(value, &mut out).map_err(|e| LedgerError::Encode(e.to_string()))?;
    Ok(out)
}

/// Decodes a record; `what` names it in the error.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, LedgerError> {
    match bytes.split_first() {
        Some((&FORMAT_V1, body)) => {
            postcard::from_bytes(body).map_err(|e| LedgerError::Corrupt(format!("{what}: {e}")))
        }
        Some((v, _)) => Err(LedgerError::Corrupt(format!(
            "{what}: unknown record format {v} (written by a newer ordo?)"
        ))),
        None => Err(LedgerError::Corrupt(format!("{what}: empty record"))),
    }
}

/// A message in the embedded log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Partition key.
    pub key: String,
    /// Producer's idempotency key, if given.
    pub idempotency_key: Option<String>,
    /// Payload bytes.
    pub payload: Vec<u8>,
    /// Headers.
    pub headers: Vec<(String, String)>,
    /// When it was appended (ms since the Unix epoch).
    pub appended_at_ms: u64,
}

/// What happened to a message whose idempotency key is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DedupOutcome {
    /// Its effects were committed.
    Committed,
    /// It was dead-lettered.
    DeadLettered,
}

/// The idempotency record of one message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupRecord {
    /// Source offset of the message.
    pub offset: u64,
    /// Source partition.
    pub partition: u32,
    /// Handler version that produced the outcome.
    pub version: u64,
    /// First 16 bytes of SHA-256 of the payload (conflict detection).
    pub payload_hash: [u8; 16],
    /// Commit time (ms since the Unix epoch).
    pub committed_at_ms: u64,
    /// Outcome.
    pub outcome: DedupOutcome,
}

/// A dead-lettered message with why it failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Handler name.
    pub handler: String,
    /// Handler version that failed it.
    pub version: u64,
    /// Source topic.
    pub topic: String,
    /// Source partition.
    pub partition: u32,
    /// Source offset.
    pub offset: u64,
    /// Partition key.
    pub partition_key: String,
    /// Idempotency key.
    pub idempotency_key: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// Headers.
    pub headers: Vec<(String, String)>,
    /// Failure kind (`permanent`, `trap`, `deadline`, ...).
    pub error_kind: String,
    /// Error text.
    pub error: String,
    /// Attempts made.
    pub attempts: u32,
    /// First failure (ms since the Unix epoch).
    pub first_failure_ms: u64,
    /// Last failure (ms since the Unix epoch).
    pub last_failure_ms: u64,
}

/// One deployed version of a handler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandlerVersion {
    /// Handler name.
    pub name: String,
    /// Version number, from 1.
    pub version: u64,
    /// SHA-256 of the component (hex); the bytes are in `artifacts`.
    pub content_hash: String,
    /// Consumed topic.
    pub topic: String,
    /// Deploy time (ms since the Unix epoch).
    pub deployed_at_ms: u64,
    /// Operator's comment.
    pub comment: Option<String>,
    /// Component size in bytes.
    pub size: u64,
    /// Whether the first version started at the end of the topic.
    pub from_latest: bool,
}

/// Configuration of an embedded-log topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicConfig {
    /// Number of partitions (fixed at creation).
    pub partitions: u32,
    /// Committed messages older than this are removed (ms).
    pub retention_ms: u64,
}

impl Default for TopicConfig {
    fn default() -> Self {
        TopicConfig {
            partitions: 16,
            retention_ms: 7 * 24 * 3600 * 1000,
        }
    }
}
