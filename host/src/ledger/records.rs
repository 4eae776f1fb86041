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
    encode_as(FORMAT_V1, value)
}

/// `format` followed by the postcard encoding of `value`.
fn encode_as<T: Serialize + ?Sized>(format: u8, value: &T) -> Result<Vec<u8>, LedgerError> {
    let mut out = vec![format];
    postcard::to_io(value, &mut out).map_err(|e| LedgerError::Encode(e.to_string()))?;
    Ok(out)
}

/// Decodes the postcard body of a record (after its format byte); `what`
/// names it in the error.
fn decode_body<T: DeserializeOwned>(body: &[u8], what: &str) -> Result<T, LedgerError> {
    postcard::from_bytes(body).map_err(|e| LedgerError::Corrupt(format!("{what}: {e}")))
}

/// The body of a record after its format byte; `what` names it in the
/// error.
fn body<'a>(bytes: &'a [u8], what: &str) -> Result<&'a [u8], LedgerError> {
    match bytes.split_first() {
        Some((&FORMAT_V1, body)) => Ok(body),
        Some((v, _)) => Err(LedgerError::Corrupt(format!(
            "{what}: unknown record format {v} (written by a newer ordo?)"
        ))),
        None => Err(LedgerError::Corrupt(format!("{what}: empty record"))),
    }
}

/// Decodes a record; `what` names it in the error.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, LedgerError> {
    decode_body(body(bytes, what)?, what)
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

/// Record format of a log segment: consecutive messages of one partition
/// in one record (format 4 of the ledger on). A one-message segment is
/// written as the plain [`Envelope`] record, as every log record was
/// before.
const FORMAT_SEGMENT: u8 = 2;

/// Messages a log segment holds at most.
pub const SEGMENT_MAX_ENTRIES: usize = 256;
/// Approximate encoded bytes a log segment holds at most (a bigger message
/// is a segment of its own): below sled's blob threshold, and small enough
/// that reading a few messages from the middle of one decodes little.
pub const SEGMENT_MAX_BYTES: usize = 32 << 10;

impl Envelope {
    /// Approximate encoded size, for cutting segments.
    pub fn encoded_len_hint(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.len() + v.len() + 2)
            .sum();
        self.key.len()
            + self.idempotency_key.as_ref().map_or(0, String::len)
            + self.payload.len()
            + headers
            + 16
    }
}

/// Encodes consecutive messages of one partition (at least one) as one
/// log record.
pub fn encode_segment(entries: &[&Envelope]) -> Result<Vec<u8>, LedgerError> {
    if let [one] = entries {
        return encode(*one);
    }
    encode_as(FORMAT_SEGMENT, entries)
}

/// Decodes a log record written by [`encode_segment`] (or a single
/// message's record of an older ledger): its messages, at least one.
pub fn decode_segment(bytes: &[u8]) -> Result<Vec<Envelope>, LedgerError> {
    match bytes.split_first() {
        Some((&FORMAT_SEGMENT, body)) => {
            let entries: Vec<Envelope> = decode_body(body, "log segment")?;
            if entries.is_empty() {
                return Err(LedgerError::Corrupt("log segment: empty".into()));
            }
            Ok(entries)
        }
        _ => Ok(vec![decode(bytes, "log entry")?]),
    }
}

/// Cuts `items` into runs of at most `max_items` and about `max_bytes`
/// (by `len`; an item larger than that is a run of its own): yields each
/// run with the index of its first item. Log and idempotency segments are
/// cut this way.
pub fn cut_runs<T>(
    items: &[T],
    max_items: usize,
    max_bytes: usize,
    len: impl Fn(&T) -> usize,
) -> impl Iterator<Item = (usize, &[T])> {
    let mut start = 0;
    std::iter::from_fn(move || {
        let rest = &items[start..];
        if rest.is_empty() {
            return None;
        }
        let (mut n, mut bytes) = (0, 0);
        while n < rest.len() && n < max_items && (n == 0 || bytes + len(&rest[n]) <= max_bytes) {
            bytes += len(&rest[n]);
            n += 1;
        }
        let run = (start, &rest[..n]);
        start += n;
        Some(run)
    })
}

/// Cuts a partition's messages (consecutive offsets from `first`) into
/// segments of at most [`SEGMENT_MAX_ENTRIES`] messages and about
/// [`SEGMENT_MAX_BYTES`]; calls `f` with each segment's first offset and
/// messages.
pub fn cut_segments<'a>(
    first: u64,
    entries: &[&'a Envelope],
    mut f: impl FnMut(u64, &[&'a Envelope]) -> Result<(), LedgerError>,
) -> Result<(), LedgerError> {
    let runs = cut_runs(entries, SEGMENT_MAX_ENTRIES, SEGMENT_MAX_BYTES, |e| {
        e.encoded_len_hint()
    });
    for (start, segment) in runs {
        f(first + start as u64, segment)?;
    }
    Ok(())
}

/// What happened to a message whose idempotency key is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DedupOutcome {
    /// Its effects were committed.
    Committed,
    /// It was dead-lettered.
    DeadLettered,
    /// It was held in the dead-letter queue unprocessed because its
    /// partition key was parked.
    Parked,
}

impl DedupOutcome {
    /// Name used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            DedupOutcome::Committed => "committed",
            DedupOutcome::DeadLettered => "dead-lettered",
            DedupOutcome::Parked => "held",
        }
    }
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

/// Record format of an idempotency segment: the records of one batch's
/// messages, (idempotency key, record) in commit order (format 5 of the
/// ledger on; see `ledger::dedup`). Laid out so that a lookup decodes one
/// record, not the segment: the format byte, the count (u32), then per
/// record its key's FNV-1a 32 fingerprint and the end of its entry (u32
/// each, big-endian), then the entries (postcard of (key, record)).
const FORMAT_DEDUP_SEGMENT: u8 = 3;

/// Encodes an idempotency segment.
pub fn encode_dedup_segment(records: &[(&str, &DedupRecord)]) -> Result<Vec<u8>, LedgerError> {
    let mut entries = Vec::new();
    let mut index = Vec::with_capacity(records.len() * 8);
    for record in records {
        postcard::to_io(record, &mut entries).map_err(|e| LedgerError::Encode(e.to_string()))?;
        let end = u32::try_from(entries.len())
            .map_err(|_| LedgerError::Encode("idempotency segment over 4 GiB".into()))?;
        index.extend_from_slice(&crate::source::fnv1a_32(record.0.as_bytes()).to_be_bytes());
        index.extend_from_slice(&end.to_be_bytes());
    }
    let mut out = Vec::with_capacity(5 + index.len() + entries.len());
    out.push(FORMAT_DEDUP_SEGMENT);
    out.extend_from_slice(&(records.len() as u32).to_be_bytes());
    out.extend_from_slice(&index);
    out.extend_from_slice(&entries);
    Ok(out)
}

/// An idempotency segment's parts, checked for length.
struct DedupSegmentView<'a> {
    /// (fingerprint, entry end) per record, 8 bytes each.
    index: &'a [u8],
    entries: &'a [u8],
}

const SEGMENT_WHAT: &str = "idempotency segment";

fn corrupt_segment(why: impl std::fmt::Display) -> LedgerError {
    LedgerError::Corrupt(format!("{SEGMENT_WHAT}: {why}"))
}

impl<'a> DedupSegmentView<'a> {
    fn new(bytes: &'a [u8]) -> Result<Self, LedgerError> {
        let body = match bytes.split_first() {
            Some((&FORMAT_DEDUP_SEGMENT, body)) => body,
            Some((v, _)) => {
                return Err(corrupt_segment(format_args!(
                    "unknown record format {v} (written by a newer ordo?)"
                )))
            }
            None => return Err(corrupt_segment("empty record")),
        };
        let truncated = || corrupt_segment("truncated");
        let count = body
            .get(..4)
            .and_then(|c| c.try_into().ok())
            .map(u32::from_be_bytes)
            .ok_or_else(truncated)? as usize;
        let index = body.get(4..4 + count * 8).ok_or_else(truncated)?;
        let view = DedupSegmentView {
            index,
            entries: &body[4 + count * 8..],
        };
        if view.len() > 0 && view.end(view.len() - 1) != view.entries.len() {
            return Err(truncated());
        }
        Ok(view)
    }

    fn len(&self) -> usize {
        self.index.len() / 8
    }

    fn word(&self, i: usize, at: usize) -> u32 {
        let w = &self.index[i * 8 + at..i * 8 + at + 4];
        u32::from_be_bytes([w[0], w[1], w[2], w[3]])
    }

    fn end(&self, i: usize) -> usize {
        self.word(i, 4) as usize
    }

    fn entry(&self, i: usize) -> Result<(&'a str, DedupRecord), LedgerError> {
        let start = if i == 0 { 0 } else { self.end(i - 1) };
        let bytes = self
            .entries
            .get(start..self.end(i))
            .ok_or_else(|| corrupt_segment("entry out of bounds"))?;
        postcard::from_bytes(bytes).map_err(corrupt_segment)
    }
}

/// Decodes an idempotency segment (its keys borrowed from `bytes`).
pub fn decode_dedup_segment(bytes: &[u8]) -> Result<Vec<(&str, DedupRecord)>, LedgerError> {
    let view = DedupSegmentView::new(bytes)?;
    (0..view.len()).map(|i| view.entry(i)).collect()
}

/// The last record of `idempotency_key` in an idempotency segment: only
/// the entries whose fingerprint matches are decoded. `hint` is where the
/// index last saw the key ([`super::dedup::Location`]); it is tried first,
/// and the fingerprints are scanned only when it is wrong. A right hint
/// is the last record of its key: the index keeps a segment's later
/// position, and a sweep that drops records moves the others only towards
/// the front, so whatever now sits at a stale hint is not an earlier
/// record of the key. In a segment longer than the index's slots, whose
/// hints wrap, only the scan answers.
pub fn find_in_dedup_segment(
    bytes: &[u8],
    idempotency_key: &str,
    hint: usize,
) -> Result<Option<DedupRecord>, LedgerError> {
    let view = DedupSegmentView::new(bytes)?;
    let fingerprint = crate::source::fnv1a_32(idempotency_key.as_bytes());
    if hint < view.len()
        && view.len() <= 1 << super::dedup::SLOT_BITS
        && view.word(hint, 0) == fingerprint
    {
        let (key, record) = view.entry(hint)?;
        if key == idempotency_key {
            return Ok(Some(record));
        }
    }
    for i in (0..view.len()).rev() {
        if view.word(i, 0) == fingerprint {
            let (key, record) = view.entry(i)?;
            if key == idempotency_key {
                return Ok(Some(record));
            }
        }
    }
    Ok(None)
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// Retry and failure policy of this version.
    pub policy: FailurePolicy,
    /// Sandbox limits of this version.
    pub limits: crate::runtime::HandlerLimits,
}

/// Record format of a [`HandlerVersion`] whose limits include
/// `max_state_bytes_per_key` (format 1 had no such field).
const HANDLER_VERSION_V2: u8 = 2;

/// Record format of a [`HandlerVersion`] whose limits also include
/// `messages_per_instance`.
const HANDLER_VERSION_V3: u8 = 3;

/// Encodes a [`HandlerVersion`] (format 3).
pub fn encode_handler_version(v: &HandlerVersion) -> Result<Vec<u8>, LedgerError> {
    encode_as(HANDLER_VERSION_V3, v)
}

/// Decodes a [`HandlerVersion`] of format 3, 2 or 1; the limits an older
/// format lacks get their defaults.
pub fn decode_handler_version(bytes: &[u8]) -> Result<HandlerVersion, LedgerError> {
    let what = "handler version";
    match bytes.split_first() {
        Some((&HANDLER_VERSION_V3, body)) => decode_body(body, what),
        Some((&HANDLER_VERSION_V2, body)) => {
            decode_body::<OldHandlerVersion<LimitsV2>>(body, what).map(HandlerVersion::from)
        }
        _ => decode::<OldHandlerVersion<LimitsV1>>(bytes, what).map(HandlerVersion::from),
    }
}

/// A [`HandlerVersion`] as an older format stored it: the same fields,
/// with fewer limits `L`.
#[derive(Deserialize)]
struct OldHandlerVersion<L> {
    name: String,
    version: u64,
    content_hash: String,
    topic: String,
    deployed_at_ms: u64,
    comment: Option<String>,
    size: u64,
    from_latest: bool,
    policy: FailurePolicy,
    limits: L,
}

/// [`crate::runtime::HandlerLimits`] as format 1 stored them.
#[derive(Deserialize)]
struct LimitsV1 {
    deadline_ms: u64,
    memory_bytes: usize,
    table_elements: usize,
    instances: usize,
    max_state_value_bytes: usize,
    max_state_writes: usize,
    max_emits: usize,
    max_emit_bytes: usize,
    max_log_lines: usize,
    max_stdio_bytes: usize,
}

/// [`crate::runtime::HandlerLimits`] as format 2 stored them: format 1's
/// and one more (postcard writes a nested struct's fields in line).
#[derive(Deserialize)]
struct LimitsV2 {
    v1: LimitsV1,
    max_state_bytes_per_key: usize,
}

impl From<LimitsV1> for crate::runtime::HandlerLimits {
    fn from(l: LimitsV1) -> Self {
        crate::runtime::HandlerLimits {
            deadline_ms: l.deadline_ms,
            memory_bytes: l.memory_bytes,
            table_elements: l.table_elements,
            instances: l.instances,
            max_state_value_bytes: l.max_state_value_bytes,
            max_state_writes: l.max_state_writes,
            max_emits: l.max_emits,
            max_emit_bytes: l.max_emit_bytes,
            max_log_lines: l.max_log_lines,
            max_stdio_bytes: l.max_stdio_bytes,
            ..Default::default()
        }
    }
}

impl From<LimitsV2> for crate::runtime::HandlerLimits {
    fn from(l: LimitsV2) -> Self {
        crate::runtime::HandlerLimits {
            max_state_bytes_per_key: l.max_state_bytes_per_key,
            ..l.v1.into()
        }
    }
}

impl<L: Into<crate::runtime::HandlerLimits>> From<OldHandlerVersion<L>> for HandlerVersion {
    fn from(v: OldHandlerVersion<L>) -> Self {
        HandlerVersion {
            name: v.name,
            version: v.version,
            content_hash: v.content_hash,
            topic: v.topic,
            deployed_at_ms: v.deployed_at_ms,
            comment: v.comment,
            size: v.size,
            from_latest: v.from_latest,
            policy: v.policy,
            limits: v.limits.into(),
        }
    }
}

/// Which version of a handler runs, and whether it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HandlerControl {
    /// The version the lanes run (deploy and rollback set it).
    pub active_version: u64,
    /// Paused by an operator: lanes hold still until resumed.
    pub paused: bool,
    /// Undeployed: no lanes; state kept for a later deploy.
    pub undeployed: bool,
    /// A canary: (version, percentage of partition keys it handles).
    pub canary: Option<(u64, u8)>,
}

/// When and how often a retryable failure is retried.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 = no retry).
    pub max_attempts: u32,
    /// Backoff ceiling before the second attempt (ms).
    pub initial_backoff_ms: u64,
    /// Growth of the ceiling per attempt.
    pub backoff_factor: f64,
    /// Largest ceiling (ms).
    pub max_backoff_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 10,
            initial_backoff_ms: 100,
            backoff_factor: 2.0,
            max_backoff_ms: 30_000,
        }
    }
}

impl RetryPolicy {
    /// The backoff ceiling after failed attempt `attempt` (from 1); the
    /// actual wait is drawn uniformly from `0..=ceiling` ("full jitter").
    pub fn ceiling_ms(&self, attempt: u32) -> u64 {
        let exp = self
            .backoff_factor
            .max(1.0)
            .powi(attempt.saturating_sub(1).min(64) as i32);
        let ceiling = self.initial_backoff_ms as f64 * exp;
        if ceiling.is_finite() {
            (ceiling as u64).min(self.max_backoff_ms)
        } else {
            self.max_backoff_ms
        }
    }

    /// Checks the values are usable; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=1000).contains(&self.max_attempts) {
            return Err(format!(
                "max_attempts must be 1..=1000, got {}",
                self.max_attempts
            ));
        }
        if !(1.0..=100.0).contains(&self.backoff_factor) {
            return Err(format!(
                "backoff_factor must be 1..=100, got {}",
                self.backoff_factor
            ));
        }
        if self.max_backoff_ms > 24 * 3600 * 1000 {
            return Err(format!(
                "max_backoff_ms must be at most one day, got {}",
                self.max_backoff_ms
            ));
        }
        if self.initial_backoff_ms > self.max_backoff_ms {
            return Err(format!(
                "initial_backoff_ms ({}) must not exceed max_backoff_ms ({})",
                self.initial_backoff_ms, self.max_backoff_ms
            ));
        }
        Ok(())
    }
}

/// What happens to a partition key after one of its messages is
/// dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum OnFailure {
    /// Park the key: its later messages are held in the dead-letter queue,
    /// in order, until an operator replays or drops its backlog.
    #[default]
    ParkKey,
    /// Skip the message; the key's later messages are processed.
    DeadLetter,
}

impl OnFailure {
    /// Name used in the API and CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            OnFailure::ParkKey => "park-key",
            OnFailure::DeadLetter => "dead-letter",
        }
    }

    /// Parses the API/CLI name.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "park-key" => Ok(OnFailure::ParkKey),
            "dead-letter" => Ok(OnFailure::DeadLetter),
            other => Err(format!(
                "on_failure must be `park-key` or `dead-letter`, got {other:?}"
            )),
        }
    }
}

/// A handler version's failure handling.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct FailurePolicy {
    /// Retries of retryable failures.
    pub retry: RetryPolicy,
    /// What a dead letter does to its key.
    pub on_failure: OnFailure,
}

/// A parked partition key: its messages are held until its dead-letter
/// backlog is replayed or dropped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParkedKey {
    /// The partition key.
    pub partition_key: String,
    /// When it was parked (ms since the Unix epoch).
    pub since_ms: u64,
    /// The dead letter that parked it (0 when paused by an operator).
    pub cause_seq: u64,
    /// Paused by an operator rather than parked by a failure.
    pub paused: bool,
}

/// An operator action carried out by a lane: on one dead letter (keyed by
/// its sequence), or on one partition key (keyed by a fresh sequence).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DlqAction {
    /// Process it again through the current handler version.
    Replay,
    /// Remove it (an audit record is kept).
    Drop,
    /// Replay its key's whole backlog, oldest first, following messages
    /// held meanwhile, until it is drained (then the key is unparked).
    ReplayKey,
    /// Hold this partition key's messages, in order, like a parked key.
    PauseKey(String),
    /// Replay this key's held backlog, oldest first, then unpark it.
    ResumeKey(String),
}

/// An operator action, kept in the `audit` tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// When (ms since the Unix epoch).
    pub at_ms: u64,
    /// What (`deploy`, `dlq-replay`, `dlq-drop`, ...).
    pub action: String,
    /// Which handler.
    pub handler: String,
    /// Details (selection, reason, affected messages).
    pub detail: String,
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

/// A message a handler emitted to an external target (a JetStream topic),
/// committed with the handler's transaction and relayed after the flush.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    /// Target topic.
    pub topic: String,
    /// Partition key.
    pub key: String,
    /// Stable id, sent as `Nats-Msg-Id`: the broker drops relay retries and
    /// the consuming side dedups on it.
    pub msg_id: String,
    /// Payload bytes.
    pub payload: Vec<u8>,
    /// Headers.
    pub headers: Vec<(String, String)>,
    /// When it was committed (ms since the Unix epoch).
    pub created_ms: u64,
}

/// The whole state of one partition key of a handler: state key → value.
/// Stored as ONE ledger record (format 3 on), so a batch that changes a key
/// writes it once however many of its state keys changed.
pub type StateMap = std::collections::BTreeMap<String, Vec<u8>>;

/// Encodes a [`StateMap`]: the format byte, the number of entries (u32
/// big-endian), then per entry in key order a u32 big-endian length and the
/// UTF-8 state key, a u32 big-endian length and the value.
pub fn encode_state(map: &StateMap) -> Vec<u8> {
    let size: usize = map.iter().map(|(k, v)| 8 + k.len() + v.len()).sum();
    let mut out = Vec::with_capacity(5 + size);
    out.push(FORMAT_V1);
    out.extend_from_slice(&(map.len() as u32).to_be_bytes());
    for (k, v) in map {
        out.extend_from_slice(&(k.len() as u32).to_be_bytes());
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(&(v.len() as u32).to_be_bytes());
        out.extend_from_slice(v);
    }
    out
}

/// Decodes a [`StateMap`] written by [`encode_state`].
pub fn decode_state(bytes: &[u8]) -> Result<StateMap, LedgerError> {
    let corrupt = |what: &str| LedgerError::Corrupt(format!("state record: {what}"));
    let mut r = super::keys::KeyReader::new(body(bytes, "state record")?);
    let count = r.u32().ok_or_else(|| corrupt("truncated"))?;
    let mut map = StateMap::new();
    for _ in 0..count {
        let key = r
            .str()
            .ok_or_else(|| corrupt("truncated or non-UTF-8 key"))?;
        let value = r.bytes().ok_or_else(|| corrupt("truncated value"))?;
        map.insert(key.to_string(), value.to_vec());
    }
    if !r.is_empty() || map.len() != count as usize {
        return Err(corrupt("trailing bytes or repeated keys"));
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(payload_len: usize) -> Envelope {
        Envelope {
            key: "k".into(),
            idempotency_key: Some("id".into()),
            payload: vec![7; payload_len],
            headers: vec![("h".into(), "v".into())],
            appended_at_ms: 5,
        }
    }

    fn committed(offset: u64) -> DedupRecord {
        DedupRecord {
            offset,
            partition: 3,
            version: 2,
            payload_hash: [9; 16],
            committed_at_ms: 1_700_000_000_000,
            outcome: DedupOutcome::Committed,
        }
    }

    #[test]
    fn an_idempotency_segment_is_searched_as_it_decodes() {
        let (a, b, c) = (committed(1), committed(300), committed(70_000));
        let bytes = encode_dedup_segment(&[("k1", &a), ("k2", &b), ("k1", &c)]).unwrap();
        assert_eq!(
            decode_dedup_segment(&bytes).unwrap(),
            vec![("k1", a), ("k2", b.clone()), ("k1", c.clone())]
        );
        // Every hint the index can hold, right, wrong or out of range, gives
        // the same answer (never the position of an earlier record of the
        // key: 0 for "k1").
        for hint in [1, 2, 3, 1000] {
            assert_eq!(
                find_in_dedup_segment(&bytes, "k1", hint).unwrap(),
                Some(c.clone()),
                "the last one, hint {hint}"
            );
            assert_eq!(
                find_in_dedup_segment(&bytes, "k2", hint).unwrap(),
                Some(b.clone())
            );
            assert_eq!(find_in_dedup_segment(&bytes, "k", hint).unwrap(), None);
        }
        for cut in 1..bytes.len() {
            assert!(
                find_in_dedup_segment(&bytes[..cut], "zz", 0).is_err(),
                "cut at {cut}"
            );
        }
        assert!(
            find_in_dedup_segment(&[7, 1], "k1", 0).is_err(),
            "unknown format"
        );
    }

    #[test]
    fn a_hint_into_a_segment_longer_than_the_slots_is_not_trusted() {
        let slots = 1usize << super::super::dedup::SLOT_BITS;
        let keys: Vec<String> = (0..slots + 3).map(|i| format!("k{i}")).collect();
        let records: Vec<DedupRecord> = (0..keys.len() as u64).map(committed).collect();
        let mut entries: Vec<(&str, &DedupRecord)> = keys
            .iter()
            .zip(&records)
            .map(|(k, r)| (k.as_str(), r))
            .collect();
        // "k3" again past the slots: its wrapped hint is the first "k3".
        let newer = committed(99_999);
        entries.push(("k3", &newer));
        let bytes = encode_dedup_segment(&entries).unwrap();
        let wrapped = (entries.len() - 1) % slots;
        assert_eq!(
            wrapped, 3,
            "the hint the index keeps points at the older k3"
        );
        assert_eq!(
            find_in_dedup_segment(&bytes, "k3", wrapped).unwrap(),
            Some(newer),
            "the newer record, not the one at the wrapped hint"
        );
    }

    #[test]
    fn segments_round_trip_and_older_single_records_read_as_one() {
        let (a, b) = (envelope(3), envelope(4));
        let both = encode_segment(&[&a, &b]).unwrap();
        assert_eq!(decode_segment(&both).unwrap(), vec![a.clone(), b.clone()]);
        // One message: the plain record, as an older ledger wrote it.
        let one = encode_segment(&[&a]).unwrap();
        assert_eq!(one, encode(&a).unwrap());
        assert_eq!(decode_segment(&one).unwrap(), vec![a]);
        for cut in 0..both.len() {
            assert!(decode_segment(&both[..cut]).is_err(), "cut at {cut}");
        }
        assert!(
            decode_segment(&[FORMAT_SEGMENT, 0]).is_err(),
            "empty segment"
        );
        assert!(decode_segment(&[9, 0])
            .unwrap_err()
            .to_string()
            .contains("newer ordo"));
    }

    #[test]
    fn handler_versions_of_older_formats_read_with_the_default_new_limits() {
        use crate::runtime::HandlerLimits;
        let mut v = HandlerVersion {
            name: "h".into(),
            version: 3,
            content_hash: "abc".into(),
            topic: "t".into(),
            deployed_at_ms: 9,
            comment: Some("c".into()),
            size: 100,
            from_latest: true,
            policy: FailurePolicy::default(),
            limits: HandlerLimits {
                deadline_ms: 250,
                max_stdio_bytes: 7,
                ..HandlerLimits::default()
            },
        };
        // Formats 1 and 2: the same fields, with fewer limits.
        #[derive(Serialize)]
        struct Old<'a, L> {
            name: &'a str,
            version: u64,
            content_hash: &'a str,
            topic: &'a str,
            deployed_at_ms: u64,
            comment: &'a Option<String>,
            size: u64,
            from_latest: bool,
            policy: &'a FailurePolicy,
            limits: L,
        }
        fn record<L>(v: &HandlerVersion, limits: L) -> Old<'_, L> {
            Old {
                name: &v.name,
                version: v.version,
                content_hash: &v.content_hash,
                topic: &v.topic,
                deployed_at_ms: v.deployed_at_ms,
                comment: &v.comment,
                size: v.size,
                from_latest: v.from_latest,
                policy: &v.policy,
                limits,
            }
        }
        let old = |v: &HandlerVersion| {
            let l = &v.limits;
            let v1 = [
                l.deadline_ms as usize,
                l.memory_bytes,
                l.table_elements,
                l.instances,
                l.max_state_value_bytes,
                l.max_state_writes,
                l.max_emits,
                l.max_emit_bytes,
                l.max_log_lines,
                l.max_stdio_bytes,
            ];
            let format_1 = encode(&record(v, v1)).unwrap();
            let v2 = (v1, l.max_state_bytes_per_key);
            let format_2 = encode_as(HANDLER_VERSION_V2, &record(v, v2)).unwrap();
            (format_1, format_2)
        };
        let (format_1, _) = old(&v);
        assert_eq!(decode_handler_version(&format_1).unwrap(), v);
        v.limits.max_state_bytes_per_key = 1234;
        let (_, format_2) = old(&v);
        assert_eq!(decode_handler_version(&format_2).unwrap(), v);
        v.limits.messages_per_instance = 32;
        let new = encode_handler_version(&v).unwrap();
        assert_eq!(new[0], HANDLER_VERSION_V3);
        assert_eq!(decode_handler_version(&new).unwrap(), v);
        assert!(decode_handler_version(&new[..new.len() - 1]).is_err());
        assert!(decode_handler_version(&[9, 0])
            .unwrap_err()
            .to_string()
            .contains("newer ordo"));
    }

    #[test]
    fn segments_are_cut_by_count_and_size() {
        let cut = |entries: &[Envelope]| {
            let refs: Vec<&Envelope> = entries.iter().collect();
            let mut out = Vec::new();
            cut_segments(100, &refs, |first, seg| {
                out.push((first, seg.len()));
                Ok(())
            })
            .unwrap();
            out
        };
        let small: Vec<Envelope> = (0..600).map(|_| envelope(10)).collect();
        assert_eq!(cut(&small), vec![(100, 256), (356, 256), (612, 88)]);
        // 10 KiB messages: three fit in 32 KiB.
        let big: Vec<Envelope> = (0..7).map(|_| envelope(10 << 10)).collect();
        assert_eq!(cut(&big), vec![(100, 3), (103, 3), (106, 1)]);
        // A message over the limit is a segment of its own.
        let huge = vec![envelope(10), envelope(100 << 10), envelope(10)];
        assert_eq!(cut(&huge), vec![(100, 1), (101, 1), (102, 1)]);
        assert_eq!(cut(&[]), vec![]);
    }

    #[test]
    fn state_records_round_trip_and_damage_is_reported() {
        let mut map = StateMap::new();
        map.insert("count".into(), b"3".to_vec());
        map.insert("empty".into(), Vec::new());
        map.insert("seqs".into(), b"1,2,3".to_vec());
        let bytes = encode_state(&map);
        assert_eq!(decode_state(&bytes).unwrap(), map);
        assert_eq!(
            decode_state(&encode_state(&StateMap::new())).unwrap(),
            StateMap::new()
        );
        for cut in 0..bytes.len() {
            assert!(decode_state(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode_state(&longer).is_err());
        assert!(decode_state(&[]).is_err());
        assert!(decode_state(&[9, 0])
            .unwrap_err()
            .to_string()
            .contains("newer ordo"));
    }
}
