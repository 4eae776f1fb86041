//! Offline ledger tools: `check` (every record decodes, cross-references
//! hold), `export` and `import` (a portable, versioned backup).
//!
//! Export format: JSON lines. The first line is a header
//! `{"format": "ordo-ledger-export", "version": 1, "records": N}`; then one
//! line per record `{"tree": NAME, "key": BASE64, "value": BASE64}`, tree by
//! tree. Values are the ledger's own versioned record encodings, so a newer
//! ordo can import an older export. State is listed one line per state key
//! (key: handler, partition key, state key; value: the raw bytes), whatever
//! the ledger layout, and the import gathers each partition key's lines
//! into its record. The log is listed one line per message (key: topic,
//! partition, offset; value: the message's record), whatever the ledger's
//! segments, and the import gathers a partition's consecutive messages
//! into segments again. Idempotency records are listed one line per record
//! (key: handler, idempotency key; value: the record), whatever the
//! ledger's segments, and the import writes each handler's consecutive
//! records as segments again.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::{BufRead, Write};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::keys::{self, KeyReader};
use super::records::{
    cut_segments, decode, decode_dedup_segment, decode_handler_version, decode_segment,
    decode_state, encode, encode_segment, encode_state, StateMap,
};
use super::{
    AuditRecord, DeadLetter, DedupRecord, DlqAction, Envelope, HandlerControl, HandlerVersion,
    Ledger, LedgerError, ParkedKey, Result, TopicConfig,
};

/// Export format name and version.
pub const EXPORT_FORMAT: &str = "ordo-ledger-export";
/// Export format version written (and the newest read).
pub const EXPORT_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Header {
    format: String,
    version: u32,
    records: u64,
}

#[derive(Serialize, Deserialize)]
struct Line {
    tree: String,
    key: String,
    value: String,
}

/// What `check` found.
#[derive(Debug, Default)]
pub struct CheckReport {
    /// Records per tree.
    pub records: Vec<(&'static str, u64)>,
    /// Problems, each naming the tree and key.
    pub problems: Vec<String>,
}

/// (topic, partition, first offset) of a `log` key.
fn parse_log(key: &[u8]) -> Result<(&str, u32, u64)> {
    keys::parse_log(key).ok_or_else(|| {
        LedgerError::Corrupt(format!(
            "log [{}]: key is not (topic, partition, offset)",
            show_key(key)
        ))
    })
}

fn show_key(key: &[u8]) -> String {
    String::from_utf8_lossy(key)
        .chars()
        .map(|c| if c.is_control() { '·' } else { c })
        .collect()
}

/// Receives (tree, key, value) of each export record.
type ExportSink<'a> = dyn FnMut(&'static str, &[u8], &[u8]) -> Result<()> + 'a;

impl Ledger {
    /// Calls `f` with (tree, key, value) of every export record, in export
    /// order: a state record is listed as one entry per state key, a log
    /// segment as one entry per message, an idempotency segment as one
    /// entry per record (in the order it was written).
    fn each_export_record(&self, f: &mut ExportSink<'_>) -> Result<()> {
        for (name, tree) in self.named_trees() {
            for entry in tree.iter() {
                let (k, v) = entry?;
                match name {
                    "state" => {
                        let (handler, partition_key) = keys::parse_state(&k).ok_or_else(|| {
                            LedgerError::Corrupt(format!(
                                "state [{}]: key does not decode",
                                show_key(&k)
                            ))
                        })?;
                        for (state_key, value) in decode_state(&v)? {
                            f(
                                name,
                                &keys::state_entry(handler, partition_key, &state_key),
                                &value,
                            )?;
                        }
                    }
                    "log" => {
                        let (topic, partition, first) = parse_log(&k)?;
                        for (offset, message) in (first..).zip(decode_segment(&v)?) {
                            f(
                                name,
                                &keys::log(topic, partition, offset),
                                &encode(&message)?,
                            )?;
                        }
                    }
                    "dedup_segments" => {
                        let (handler, _) = keys::parse_dedup_segment(&k).ok_or_else(|| {
                            LedgerError::Corrupt(format!(
                                "dedup_segments [{}]: key does not decode",
                                show_key(&k)
                            ))
                        })?;
                        for (key, record) in decode_dedup_segment(&v)? {
                            f("dedup", &keys::dedup(handler, key), &encode(&record)?)?;
                        }
                    }
                    _ => f(name, &k, &v)?,
                }
            }
        }
        Ok(())
    }

    /// Records an export holds (state: one per state key).
    pub fn record_count(&self) -> Result<u64> {
        let mut n = 0u64;
        self.each_export_record(&mut |_, _, _| {
            n += 1;
            Ok(())
        })?;
        Ok(n)
    }

    /// Writes every record to `out` (see the module docs); `progress` gets
    /// the number of records written so far. Returns the count.
    pub fn export(&self, out: &mut dyn Write, progress: &dyn Fn(u64)) -> Result<u64> {
        let header = Header {
            format: EXPORT_FORMAT.into(),
            version: EXPORT_VERSION,
            records: self.record_count()?,
        };
        let json = |v: &dyn erased_line::Line| v.line();
        writeln!(out, "{}", json(&header)?)?;
        let mut n = 0u64;
        self.each_export_record(&mut |name, k, v| {
            let line = Line {
                tree: name.to_string(),
                key: B64.encode(k),
                value: B64.encode(v),
            };
            writeln!(out, "{}", json(&line)?)?;
            n += 1;
            if n % 1000 == 0 {
                progress(n);
            }
            Ok(())
        })?;
        out.flush()?;
        progress(n);
        Ok(n)
    }

    /// Loads an export into this ledger, which must be empty. Flushes at
    /// the end. Returns the number of records imported.
    pub fn import(&self, input: &mut dyn BufRead, progress: &dyn Fn(u64, u64)) -> Result<u64> {
        if self
            .named_trees()
            .iter()
            .any(|(_, t)| t.iter().next().is_some())
        {
            return Err(LedgerError::Corrupt(
                "import needs an empty data directory".into(),
            ));
        }
        let mut first = String::new();
        input.read_line(&mut first)?;
        let header: Header = serde_json::from_str(first.trim())
            .map_err(|e| LedgerError::Corrupt(format!("line 1: not an ordo export header: {e}")))?;
        if header.format != EXPORT_FORMAT || header.version > EXPORT_VERSION {
            return Err(LedgerError::Corrupt(format!(
                "line 1: {} version {} is not an export this ordo reads ({EXPORT_FORMAT} up to version {EXPORT_VERSION})",
                header.format, header.version
            )));
        }
        let trees: HashMap<&str, &super::Space> = self.named_trees().into_iter().collect();
        let mut n = 0u64;
        let mut max_seq = 0u64;
        // State lines of one partition key (consecutive in an export) are
        // gathered here and written as its record once the key changes.
        let mut gathering = StateGather::default();
        // Likewise a partition's consecutive log messages, written as
        // segments, and a handler's idempotency records.
        let mut run = LogRun::default();
        let mut records = DedupRun::default();
        for (i, line) in input.lines().enumerate() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            let at = i + 2;
            let rec: Line = serde_json::from_str(&line)
                .map_err(|e| LedgerError::Corrupt(format!("line {at}: {e}")))?;
            let tree = trees.get(rec.tree.as_str()).ok_or_else(|| {
                LedgerError::Corrupt(format!("line {at}: unknown tree {:?}", rec.tree))
            })?;
            let key = B64
                .decode(&rec.key)
                .map_err(|e| LedgerError::Corrupt(format!("line {at}: key: {e}")))?;
            let value = B64
                .decode(&rec.value)
                .map_err(|e| LedgerError::Corrupt(format!("line {at}: value: {e}")))?;
            // Sequences (dead letters, audit) must stay unique after import.
            let seq = match rec.tree.as_str() {
                "dlq" => {
                    let mut r = KeyReader::new(&key);
                    r.str().and(r.u64())
                }
                "audit" => KeyReader::new(&key).u64(),
                _ => None,
            };
            max_seq = max_seq.max(seq.unwrap_or(0));
            if rec.tree == "dedup" {
                let Some((handler, idempotency_key)) = keys::parse_dedup(&key) else {
                    return Err(LedgerError::Corrupt(format!(
                        "line {at}: dedup key is not (handler, idempotency key)"
                    )));
                };
                match decode::<DedupRecord>(&value, "dedup record") {
                    Ok(record) => {
                        if records.handler.as_deref() != Some(handler)
                            || records.records.len() >= LOG_RUN_MAX
                        {
                            self.write_dedup_run(&mut records)?;
                            records.handler = Some(handler.to_string());
                        }
                        records.records.push((idempotency_key.to_string(), record));
                    }
                    // Kept as it is, under its own key, for `check` to
                    // report (as a bad record of any other kind is).
                    Err(_) => self.put_dedup_own_record(&key, &value)?,
                }
            } else if rec.tree == "state" {
                // One line per state key: gathered into the key's record.
                let (handler, partition_key, state_key) = keys::parse_state_entry(&key)
                    .ok_or_else(|| {
                        LedgerError::Corrupt(format!(
                            "line {at}: state key is not (handler, partition key, state key)"
                        ))
                    })?;
                if !gathering.holds(handler, partition_key) {
                    self.write_gathered(&mut gathering)?;
                    gathering.key = Some((handler.to_string(), partition_key.to_string()));
                }
                gathering.entries.insert(state_key.to_string(), value);
            } else if rec.tree == "log" {
                let (topic, partition, offset) =
                    parse_log(&key).map_err(|e| LedgerError::Corrupt(format!("line {at}: {e}")))?;
                let messages = decode_segment(&value)
                    .map_err(|e| LedgerError::Corrupt(format!("line {at}: {e}")))?;
                if !run.continues(topic, partition, offset) {
                    self.write_log_run(&mut run)?;
                    run.at = Some((topic.to_string(), partition, offset));
                }
                run.messages.extend(messages);
                if run.messages.len() >= LOG_RUN_MAX {
                    self.write_log_run(&mut run)?;
                }
            } else {
                tree.insert(key, value)?;
            }
            n += 1;
            if n % 1000 == 0 {
                progress(n, header.records);
            }
        }
        self.write_gathered(&mut gathering)?;
        self.write_log_run(&mut run)?;
        self.write_dedup_run(&mut records)?;
        self.raise_id_floor(max_seq)?;
        self.flush()?;
        progress(n, header.records);
        if n != header.records {
            return Err(LedgerError::Corrupt(format!(
                "the export announces {} records but holds {n} (truncated?)",
                header.records
            )));
        }
        Ok(n)
    }

    /// Writes the log messages gathered for one partition as segments.
    fn write_log_run(&self, run: &mut LogRun) -> Result<()> {
        let Some((topic, partition, first)) = run.at.take() else {
            return Ok(());
        };
        let messages = std::mem::take(&mut run.messages);
        let refs: Vec<&Envelope> = messages.iter().collect();
        cut_segments(first, &refs, |offset, segment| {
            self.trees().log.insert(
                keys::log(&topic, partition, offset),
                encode_segment(segment)?,
            )
        })
    }

    /// Writes the idempotency records gathered for one handler as
    /// segments.
    fn write_dedup_run(&self, run: &mut DedupRun) -> Result<()> {
        let Some(handler) = run.handler.take() else {
            return Ok(());
        };
        self.put_dedup_records(&handler, &std::mem::take(&mut run.records))
    }

    /// Writes the state entries gathered for one partition key as its
    /// record, merged into the record already written when the export
    /// listed that key's lines apart (any order imports correctly; export
    /// order costs one write per key).
    fn write_gathered(&self, gathering: &mut StateGather) -> Result<()> {
        let Some((handler, partition_key)) = gathering.key.take() else {
            return Ok(());
        };
        let entries = std::mem::take(&mut gathering.entries);
        let mut record = self.state_record(&handler, &partition_key)?;
        record.extend(entries);
        self.trees()
            .state
            .insert(keys::state(&handler, &partition_key), encode_state(&record))?;
        Ok(())
    }

    /// Verifies that every record decodes and that cross-references hold.
    pub fn check(&self) -> Result<CheckReport> {
        let mut report = CheckReport::default();
        for (name, tree) in self.named_trees() {
            report.records.push((name, tree.len() as u64));
        }
        let p = &mut report.problems;
        let t = self.trees();

        // Decode everything.
        fn each<T>(
            tree: &super::Space,
            name: &str,
            problems: &mut Vec<String>,
            decode: impl Fn(&[u8]) -> Result<T>,
        ) -> Result<Vec<(Vec<u8>, T)>> {
            let mut out = Vec::new();
            for entry in tree.iter() {
                let (k, v) = entry?;
                match decode(&v) {
                    Ok(r) => out.push((k.to_vec(), r)),
                    Err(e) => problems.push(format!("{name} [{}]: {e}", show_key(&k))),
                }
            }
            Ok(out)
        }
        // Log segments: each decodes, and a partition's do not overlap.
        let mut log_end: Option<(String, u32, u64)> = None;
        for entry in t.log.iter() {
            let (k, v) = entry?;
            let at = || format!("log [{}]", show_key(&k));
            let (topic, partition, first) = match parse_log(&k) {
                Ok(key) => key,
                Err(e) => {
                    p.push(e.to_string());
                    continue;
                }
            };
            let entries = match decode_segment(&v) {
                Ok(entries) => entries,
                Err(e) => {
                    p.push(format!("{}: {e}", at()));
                    continue;
                }
            };
            if let Some((t, part, end)) = &log_end {
                if t == topic && *part == partition && first < *end {
                    p.push(format!(
                        "{}: starts at offset {first}, inside the segment before it (which ends at {end})",
                        at()
                    ));
                }
            }
            log_end = Some((topic.to_string(), partition, first + entries.len() as u64));
        }
        for entry in t.state.iter() {
            let (k, v) = entry?;
            if keys::parse_state(&k).is_none() {
                p.push(format!("state [{}]: key does not decode", show_key(&k)));
            }
            if let Err(e) = decode_state(&v) {
                p.push(format!("state [{}]: {e}", show_key(&k)));
            }
        }
        // Idempotency records: own-key records (format 4) and segments.
        let mut dedup_records = 0u64;
        for entry in t.dedup.iter() {
            let (k, v) = entry?;
            let decoded = match keys::parse_dedup(&k) {
                Some(_) => decode::<DedupRecord>(&v, "dedup record").map(|_| ()),
                None => Err(LedgerError::Corrupt(
                    "key is not (handler, idempotency key)".into(),
                )),
            };
            match decoded {
                Ok(()) => dedup_records += 1,
                Err(e) => p.push(format!("dedup [{}]: {e}", show_key(&k))),
            }
        }
        for entry in t.dedup_segments.iter() {
            let (k, v) = entry?;
            let decoded = match keys::parse_dedup_segment(&k) {
                Some(_) => match decode_dedup_segment(&v) {
                    Ok(records) if records.is_empty() => {
                        Err(LedgerError::Corrupt("idempotency segment: empty".into()))
                    }
                    other => other.map(|records| records.len() as u64),
                },
                None => Err(LedgerError::Corrupt(
                    "key is not (handler, sequence)".into(),
                )),
            };
            match decoded {
                Ok(n) => dedup_records += n,
                Err(e) => p.push(format!("dedup_segments [{}]: {e}", show_key(&k))),
            }
        }
        // One count of idempotency records, whatever their layout.
        report.records.retain(|(name, _)| *name != "dedup_segments");
        for (name, n) in report.records.iter_mut() {
            if *name == "dedup" {
                *n = dedup_records;
            }
        }
        let dlq: Vec<(Vec<u8>, DeadLetter)> = each(&t.dlq, "dlq", p, |v| decode(v, "dead letter"))?;
        let parked: Vec<(Vec<u8>, ParkedKey)> =
            each(&t.parked, "parked", p, |v| decode(v, "parked key"))?;
        let actions: Vec<(Vec<u8>, DlqAction)> = each(&t.dlq_actions, "dlq_actions", p, |v| {
            decode(v, "dlq action")
        })?;
        let _audit: Vec<(Vec<u8>, AuditRecord)> =
            each(&t.audit, "audit", p, |v| decode(v, "audit record"))?;
        let versions: Vec<(Vec<u8>, HandlerVersion)> =
            each(&t.handlers, "handlers", p, decode_handler_version)?;
        for entry in t.cursor.iter() {
            let (k, v) = entry?;
            if v.len() != 8 {
                p.push(format!("cursor [{}]: not an 8-byte offset", show_key(&k)));
            }
        }
        for entry in t.meta.iter() {
            let (k, v) = entry?;
            if k.starts_with(keys::TOPIC_META_PREFIX) {
                if let Err(e) = decode::<TopicConfig>(&v, "topic config") {
                    p.push(format!("meta [{}]: {e}", show_key(&k)));
                }
            } else if k.starts_with(b"control/") {
                if let Err(e) = decode::<HandlerControl>(&v, "handler control") {
                    p.push(format!("meta [{}]: {e}", show_key(&k)));
                }
            }
        }

        // Cross-references.
        let mut handler_versions: HashMap<String, BTreeSet<u64>> = HashMap::new();
        for (_, v) in &versions {
            handler_versions
                .entry(v.name.clone())
                .or_default()
                .insert(v.version);
            if t.artifacts.get(v.content_hash.as_bytes())?.is_none() {
                p.push(format!(
                    "handlers [{} v{}]: component {} missing from artifacts",
                    v.name, v.version, v.content_hash
                ));
            }
        }
        let mut dlq_seqs: HashSet<(String, u64)> = HashSet::new();
        for (k, d) in &dlq {
            let mut r = KeyReader::new(k);
            match (r.str(), r.u64()) {
                (Some(h), Some(seq)) => {
                    dlq_seqs.insert((h.to_string(), seq));
                    if h != d.handler {
                        p.push(format!(
                            "dlq [{h} #{seq}]: record names handler {:?}",
                            d.handler
                        ));
                    }
                }
                _ => p.push(format!("dlq [{}]: key does not decode", show_key(k))),
            }
        }
        for (k, pk) in &parked {
            let mut r = KeyReader::new(k);
            let handler = r.str().unwrap_or_default().to_string();
            if !pk.paused && !dlq_seqs.contains(&(handler.clone(), pk.cause_seq)) {
                p.push(format!(
                    "parked [{handler} {:?}]: its dead letter #{} is gone (the key can only be resumed by an operator)",
                    pk.partition_key, pk.cause_seq
                ));
            }
        }
        for (k, a) in &actions {
            let mut r = KeyReader::new(k);
            let (h, _, seq) = (r.str(), r.u32(), r.u64());
            let (Some(h), Some(seq)) = (h, seq) else {
                p.push(format!(
                    "dlq_actions [{}]: key does not decode",
                    show_key(k)
                ));
                continue;
            };
            let needs_entry = matches!(
                a,
                DlqAction::Replay | DlqAction::ReplayKey | DlqAction::Drop
            );
            if needs_entry && !dlq_seqs.contains(&(h.to_string(), seq)) {
                p.push(format!(
                    "dlq_actions [{h} #{seq}]: no such dead letter (harmless: the lane skips it)"
                ));
            }
        }
        for entry in t.meta.scan_prefix(b"control/") {
            let (k, v) = entry?;
            let Ok(c) = decode::<HandlerControl>(&v, "handler control") else {
                continue;
            };
            let name = KeyReader::new(&k[b"control/".len()..])
                .str()
                .unwrap_or_default()
                .to_string();
            let known = handler_versions.get(&name);
            for (what, v) in [
                ("active version", Some(c.active_version)),
                ("canary", c.canary.map(|c| c.0)),
            ] {
                if let Some(v) = v {
                    if !known.is_some_and(|s| s.contains(&v)) {
                        p.push(format!(
                            "meta [control/{name}]: {what} {v} has no version record"
                        ));
                    }
                }
            }
        }
        Ok(report)
    }
}

/// JSON encoding of export lines (one line, no pretty printing).
mod erased_line {
    use super::LedgerError;

    pub trait Line {
        fn line(&self) -> Result<String, LedgerError>;
    }

    impl<T: serde::Serialize> Line for T {
        fn line(&self) -> Result<String, LedgerError> {
            serde_json::to_string(self).map_err(|e| LedgerError::Encode(e.to_string()))
        }
    }
}

/// Messages an import gathers at most before writing them (a whole number
/// of full segments).
const LOG_RUN_MAX: usize = 16 * super::records::SEGMENT_MAX_ENTRIES;

/// An import's consecutive log messages of one partition, not yet written.
#[derive(Default)]
struct LogRun {
    /// (topic, partition, first offset) of the messages.
    at: Option<(String, u32, u64)>,
    messages: Vec<Envelope>,
}

impl LogRun {
    /// Whether the message at `offset` of (`topic`, `partition`) comes
    /// right after the run.
    fn continues(&self, topic: &str, partition: u32, offset: u64) -> bool {
        matches!(&self.at, Some((t, p, first))
            if t == topic && *p == partition && first + self.messages.len() as u64 == offset)
    }
}

/// An import's consecutive idempotency records of one handler, not yet
/// written.
#[derive(Default)]
struct DedupRun {
    handler: Option<String>,
    /// (idempotency key, record).
    records: Vec<(String, DedupRecord)>,
}

/// An import's state entries of one partition key, not yet written.
#[derive(Default)]
struct StateGather {
    /// (handler, partition key) of the entries.
    key: Option<(String, String)>,
    entries: StateMap,
}

impl StateGather {
    fn holds(&self, handler: &str, partition_key: &str) -> bool {
        matches!(&self.key, Some((h, k)) if h == handler && k == partition_key)
    }
}
