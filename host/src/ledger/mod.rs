//! The ledger: ordo's single source of truth, an embedded sled database.
//!
//! It holds the embedded log (`log`), every handler's state (`state`), the
//! idempotency records (`dedup_segments`, and `dedup` of older layouts;
//! see `dedup.rs`), the source positions (`cursor`), the outbox
//! (`outbox`), dead letters (`dlq`), parked partition keys (`parked`),
//! pending operator actions on dead letters (`dlq_actions`), deployed
//! versions (`handlers`, `artifacts`), the operator audit trail (`audit`)
//! and settings (`meta`): each a key space of ONE sled tree (`space`).
//! Key encodings are in [`keys`].
//!
//! Lane batches are applied with [`Ledger::commit_all`] (the batches a
//! worker has ready, together) as ONE atomic batch over `state`,
//! `dedup_segments`, `cursor`, `dlq`, `log`, `outbox`, `parked` and
//! `dlq_actions` (all-or-nothing across crashes through the [`journal`]),
//! then made durable by the [`GroupCommitter`]'s shared flush. (sled's own
//! transactions re-read every key they write, and its transactions and
//! atomic batches switch on a global lock that every flush then holds;
//! BENCHMARKS.md has the measurements.)
//!
//! Architecture invariant: everything that must happen once (offset and
//! sequence assignment, guest code) happens before the batch is applied.
//!
//! Durability: sled 0.34's `flush` writes its log with `sync_file_range`,
//! which neither flushes the drive's write cache nor the file's metadata.
//! [`Ledger::flush`] therefore follows it with `fdatasync` of sled's data
//! file (and the data directory is fsynced on open), so a flush that
//! returns means the bytes are on stable storage.

pub mod backup;
pub mod commit;
mod dedup;
mod durable;
pub mod journal;
pub mod keys;
pub mod records;
mod space;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use journal::Journal;
use space::{Space, Writes};

pub use commit::GroupCommitter;
use dedup::DedupIndex;
use durable::Durable;
use records::{
    cut_segments, decode, decode_dedup_segment, decode_handler_version, decode_segment,
    decode_state, encode, encode_dedup_segment, encode_handler_version, encode_segment,
    encode_state, find_in_dedup_segment,
};
pub use records::{
    AuditRecord, DeadLetter, DedupOutcome, DedupRecord, DlqAction, Envelope, FailurePolicy,
    HandlerControl, HandlerVersion, OnFailure, OutboxEntry, ParkedKey, RetryPolicy, StateMap,
    TopicConfig,
};

/// Ledger errors.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// sled failed (I/O, corruption detected by sled).
    #[error("storage: {0}")]
    Storage(#[from] sled::Error),
    /// A file operation outside sled failed.
    #[error("storage I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A record did not decode.
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// A record did not encode.
    #[error("cannot encode record: {0}")]
    Encode(String),
    /// A previous flush failed; nothing more is acknowledged.
    #[error("ledger is not durable (a flush failed: {0}); restart the host")]
    NotDurable(String),
    /// A batch failed half-way; nothing more is written or flushed until a
    /// restart completes it from the journal.
    #[error("a ledger batch was left half-applied ({0}); restart the host (the batch is completed on open)")]
    Interrupted(String),
}

/// Result alias.
pub type Result<T> = std::result::Result<T, LedgerError>;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Everything one lane batch commits, applied in one transaction.
#[derive(Debug, Default, Clone)]
pub struct CommitBatch {
    /// (handler, partition key, the key's whole new state); an empty map
    /// removes the key's record.
    pub state: Vec<(String, String, StateMap)>,
    /// (handler, idempotency key, record).
    pub dedup: Vec<(String, String, DedupRecord)>,
    /// (handler, source, partition, next offset).
    pub cursors: Vec<(String, String, u32, u64)>,
    /// Dead letters written (`Some`) or removed (`None`): (handler,
    /// sequence from [`Ledger::next_id`], record).
    pub dlq: Vec<(String, u64, Option<DeadLetter>)>,
    /// Messages appended to embedded-log topics: (topic, partition, message).
    pub log_appends: Vec<(String, u32, Envelope)>,
    /// Outbox entries for external targets: (sequence from
    /// [`Ledger::next_id`], entry).
    pub outbox: Vec<(u64, OutboxEntry)>,
    /// Keys parked (`Some`) or unparked (`None`): (handler, partition, key).
    pub parked: Vec<(String, u32, String, Option<ParkedKey>)>,
    /// Operator actions carried out: (handler, partition, dead-letter sequence).
    pub dlq_actions_done: Vec<(String, u32, u64)>,
    /// Operator actions to carry on with in a later batch (applied after
    /// `dlq_actions_done`).
    pub dlq_actions_new: Vec<(String, u32, u64, DlqAction)>,
}

/// The storage operations of the write path, behind which the engine can be
/// swapped or wrapped (e.g. with fault injection in tests). [`Ledger`] (sled)
/// is the shipped implementation; the [`GroupCommitter`] drives it.
pub trait Storage: Send + Sync + 'static {
    /// Applies lane batches (of distinct lanes) as one atomic batch. Not
    /// durable until [`Storage::flush`].
    fn commit(&self, batches: &[&CommitBatch]) -> Result<()>;
    /// Appends messages to an embedded-log topic atomically and returns their
    /// offsets. Not durable until [`Storage::flush`].
    fn append(&self, topic: &str, items: &[(u32, Envelope)]) -> Result<Vec<u64>>;
    /// Makes everything applied so far durable (on stable storage).
    fn flush(&self) -> Result<()>;
}

impl Storage for Ledger {
    fn commit(&self, batches: &[&CommitBatch]) -> Result<()> {
        self.commit_all(batches)
    }

    fn append(&self, topic: &str, items: &[(u32, Envelope)]) -> Result<Vec<u64>> {
        self.append_batch(topic, items)
    }

    fn flush(&self) -> Result<()> {
        Ledger::flush(self)
    }
}

/// `meta` key of the id floor (see [`Ledger::next_id`]).
const ID_FLOOR_KEY: &[u8] = b"id_floor";

/// Next offset per (topic, partition).
type NextOffsets = HashMap<(String, u32), u64>;

/// The record kinds, in the order of their leading byte (1, 2, …) in the
/// ledger tree. Also the tree names of the first layout and of exports.
const SPACE_NAMES: [&str; 13] = [
    "log",
    "cursor",
    "state",
    "dedup",
    "outbox",
    "dlq",
    "parked",
    "dlq_actions",
    "audit",
    "handlers",
    "artifacts",
    "meta",
    // Last on purpose (see `dedup`).
    "dedup_segments",
];

/// The sled tree that holds every record (format 2 on).
const LEDGER_TREE: &str = "ledger";
/// Key of the layout version in the ledger tree (leading byte 0: outside
/// every space).
const FORMAT_KEY: &[u8] = b"\0format";
/// Layout version written. 1 (never recorded) was one sled tree per record
/// kind; 2 is one tree with a leading byte per record kind; 3 keeps a
/// partition key's whole state in one `state` record (2 had one entry per
/// state key) and may leave a batch in the `journal` tree after a crash
/// (which an ordo reading format 2 would not finish); 4 stores the log in
/// segments, several consecutive messages of a partition per record (3
/// had one record per message, which 4 still reads); 5 writes idempotency
/// records in segments, a batch's records in one value (4 had one record
/// per key, which 5 still reads; an ordo reading format 4 would not find
/// a segment's keys).
const FORMAT: u64 = 5;
/// The oldest layout this ordo reads without migrating it (format 3's
/// one-message log records are one-message segments; format 3's and 4's
/// own-key idempotency records are read where they are).
const READS_FROM: u64 = 3;

/// Whether opening a ledger may move its layout forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Upgrade {
    /// Migrate an older layout and record this ordo's format (the host).
    Migrate,
    /// Leave the layout version as it is (the offline tools): a layout
    /// this ordo reads as it is stays readable by the ordo that wrote it;
    /// an older one is refused untouched.
    Never,
}

/// The leading byte of the space `name` (one of [`SPACE_NAMES`]).
fn space_byte(name: &str) -> u8 {
    let i = SPACE_NAMES
        .iter()
        .position(|n| *n == name)
        .expect("a known space");
    i as u8 + 1
}

struct Trees {
    log: Space,
    cursor: Space,
    state: Space,
    dedup: Space,
    outbox: Space,
    dlq: Space,
    parked: Space,
    dlq_actions: Space,
    audit: Space,
    handlers: Space,
    artifacts: Space,
    meta: Space,
    dedup_segments: Space,
}

impl Trees {
    fn new(journal: &Arc<Journal>) -> Trees {
        let s = |name: &str| Space::new(journal.clone(), space_byte(name));
        Trees {
            log: s("log"),
            cursor: s("cursor"),
            state: s("state"),
            dedup: s("dedup"),
            outbox: s("outbox"),
            dlq: s("dlq"),
            parked: s("parked"),
            dlq_actions: s("dlq_actions"),
            audit: s("audit"),
            handlers: s("handlers"),
            artifacts: s("artifacts"),
            meta: s("meta"),
            dedup_segments: s("dedup_segments"),
        }
    }
}

/// The background fill of the idempotency index; stopped and joined when
/// the ledger is dropped.
struct IndexFill {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl IndexFill {
    /// Starts indexing every idempotency key of `dedup`, then marks the
    /// index filled (see [`dedup`]); on this thread if no thread starts.
    fn start(own: Space, segments: Space, index: Arc<DedupIndex>) -> IndexFill {
        let stop = Arc::new(AtomicBool::new(false));
        let fill = {
            let (stop, own, segments, index) =
                (stop.clone(), own.clone(), segments.clone(), index.clone());
            move || Self::fill(&own, &segments, &index, &stop)
        };
        let thread = std::thread::Builder::new()
            .name("ordo-dedup-index".into())
            .spawn(fill)
            .map_err(|e| {
                tracing::warn!(error = %e, "cannot start a thread for the idempotency index; filling it before the ledger opens");
                Self::fill(&own, &segments, &index, &stop);
            })
            .ok();
        IndexFill { stop, thread }
    }

    fn fill(own: &Space, segments: &Space, index: &DedupIndex, stop: &AtomicBool) {
        let started = std::time::Instant::now();
        let mut keys = 0usize;
        let mut scan = || -> Result<bool> {
            // A format-4 ledger's own-key records (needing no decode), then
            // the segments.
            for entry in own.iter() {
                if stop.load(Ordering::Relaxed) {
                    return Ok(false);
                }
                let (k, _) = entry?;
                index.insert(
                    dedup::encoded_key_hash(&k),
                    dedup::Location::new(dedup::OWN_RECORD, 0),
                )?;
                keys += 1;
            }
            Self::fill_segments(segments, index, stop, &mut keys)
        };
        match scan() {
            Ok(false) => {}
            Ok(true) => {
                index.finish_fill(Ok(()));
                tracing::debug!(
                    keys,
                    ms = started.elapsed().as_millis() as u64,
                    "idempotency index filled"
                );
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot build the idempotency index; messages are not processed until a restart builds it");
                index.finish_fill(Err(e.to_string()));
            }
        }
    }
}

/// Locations a fill hands to its helper at once.
const FILL_BATCH: usize = 16 << 10;

impl IndexFill {
    /// Indexes the keys of every segment. This thread reads and decodes
    /// the segments and indexes the keys of the lower half of the shards; a
    /// helper thread indexes the upper half's. Each shard gets its keys
    /// from one thread, in the segments' order, as a fill on one thread
    /// would give them (the later slot of a key recorded twice in a segment
    /// wins). Inserting into a large index is a cache miss per key, most of
    /// a fill's time (BENCHMARKS.md, item 27), so two threads fill it in
    /// about two thirds of the time. `Ok(false)` when stopped.
    fn fill_segments(
        segments: &Space,
        index: &DedupIndex,
        stop: &AtomicBool,
        keys: &mut usize,
    ) -> Result<bool> {
        std::thread::scope(|scope| {
            let (to_helper, batches) =
                std::sync::mpsc::sync_channel::<Vec<(u64, dedup::Location)>>(4);
            let helper = std::thread::Builder::new()
                .name("ordo-dedup-fill".into())
                .spawn_scoped(scope, move || -> Result<()> {
                    for batch in batches {
                        for (hash, at) in batch {
                            index.insert(hash, at)?;
                        }
                    }
                    Ok(())
                })
                .map_err(|e| tracing::warn!(error = %e, "cannot start a helper for the idempotency index's fill; filling it on one thread"))
                .ok();
            // Without a helper (it did not start, or it failed and hung up)
            // this thread indexes every key.
            let mut to_helper = helper.as_ref().map(|_| to_helper);
            let mut upper: Vec<(u64, dedup::Location)> = Vec::new();
            let send = |upper: &mut Vec<(u64, dedup::Location)>,
                        to_helper: &mut Option<std::sync::mpsc::SyncSender<_>>|
             -> Result<()> {
                let mut batch = std::mem::take(upper);
                if let Some(tx) = to_helper.as_ref() {
                    match tx.send(batch) {
                        Ok(()) => return Ok(()),
                        // The helper hung up: this thread takes over.
                        Err(std::sync::mpsc::SendError(unsent)) => {
                            *to_helper = None;
                            batch = unsent;
                        }
                    }
                }
                for (hash, at) in batch {
                    index.insert(hash, at)?;
                }
                Ok(())
            };
            let mut read = || -> Result<bool> {
                for entry in segments.iter() {
                    if stop.load(Ordering::Relaxed) {
                        return Ok(false);
                    }
                    let (k, v) = entry?;
                    *keys += dedup::segment_locations(&k, &v, |hash, at| {
                        if to_helper.is_some() && dedup::upper_half(hash) {
                            upper.push((hash, at));
                            Ok(())
                        } else {
                            index.insert(hash, at)
                        }
                    })?;
                    if upper.len() >= FILL_BATCH {
                        send(&mut upper, &mut to_helper)?;
                    }
                }
                send(&mut upper, &mut to_helper)?;
                Ok(true)
            };
            let read = read();
            drop(to_helper);
            let helped = match helper.map(|h| h.join()) {
                Some(Ok(helped)) => helped,
                // A failed fill, not a panic of the fill's thread: lookups
                // would wait for it forever.
                Some(Err(_)) => Err(LedgerError::Io(std::io::Error::other(
                    "the helper filling the idempotency index panicked",
                ))),
                None => Ok(()),
            };
            // The reader's error first: a helper that failed made it stop.
            let filled = read?;
            helped?;
            Ok(filled)
        })
    }
}

impl Drop for IndexFill {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Inner {
    /// First, so the fill stops before the database closes.
    _fill: IndexFill,
    db: sled::Db,
    /// Orders and applies every write to the one tree every record is in
    /// (see [`space`], [`journal`]).
    journal: Arc<Journal>,
    trees: Trees,
    /// Syncs what sled's flush leaves out (see [`durable`]).
    durable: Durable,
    /// Next offset per (topic, partition); held while appending so offsets
    /// are assigned without gaps or races.
    next_offsets: Mutex<HashMap<(String, u32), u64>>,
    /// Ids from [`Ledger::next_id`] are above this (raised by an import).
    id_floor: std::sync::atomic::AtomicU64,
    /// Where every idempotency key in `dedup` is (see [`dedup`]).
    dedup_index: Arc<DedupIndex>,
}

/// Handle to the ledger; cheap to clone.
#[derive(Clone)]
pub struct Ledger {
    inner: Arc<Inner>,
}

/// The ledger tree of `db`, in the current layout: a data directory of the
/// first layout (one sled tree per record kind) is copied into it first.
/// `durable` flushes `db` to stable storage.
///
/// Crash-safe: the copy is only taken as done once the format key is
/// durable after it; a copy interrupted before that is redone from the
/// untouched old trees, which are dropped only afterwards.
fn open_layout(
    db: &sled::Db,
    durable: &dyn Fn() -> Result<()>,
    upgrade: Upgrade,
) -> Result<Arc<Journal>> {
    let has_tree = |name: &str| {
        db.tree_names()
            .iter()
            .any(|n| n.as_ref() == name.as_bytes())
    };
    let tree = db.open_tree(LEDGER_TREE)?;
    // The format key is never part of a batch, so it is read before the
    // journal touches anything: a newer ordo's directory is left as it is.
    let format = match tree.get(FORMAT_KEY)? {
        Some(v) => Some(
            <[u8; 8]>::try_from(v.as_ref())
                .map(u64::from_be_bytes)
                .map_err(|_| LedgerError::Corrupt("ledger format key".into()))?,
        ),
        None => None,
    };
    if let Some(format) = format.filter(|f| *f > FORMAT) {
        return Err(LedgerError::Corrupt(format!(
            "ledger format {format} was written by a newer ordo (this one reads up to {FORMAT})"
        )));
    }
    if upgrade == Upgrade::Never {
        return match format {
            // Finishing a batch a crash interrupted is part of reading any
            // layout that has the journal (format 3 on).
            Some(f) if f >= READS_FROM => Journal::open(db, tree, durable),
            None if tree.is_empty() && !SPACE_NAMES.iter().any(|n| has_tree(n)) => Err(
                LedgerError::Corrupt("the directory holds no ledger (nothing was written to it)".into()),
            ),
            older => Err(LedgerError::Corrupt(format!(
                "ledger format {} is older than this ordo reads without migrating it (it reads {READS_FROM} to {FORMAT}); \
                 `ordo serve` of this version migrates it on start (an older ordo then refuses it), \
                 or use the ordo that wrote it",
                older.unwrap_or(1)
            ))),
        };
    }
    // Before anything else reads the tree: finish a batch a crash
    // interrupted.
    let journal = Journal::open(db, tree.clone(), durable)?;
    if format.is_none() {
        let mut copied = 0u64;
        for (i, name) in SPACE_NAMES.iter().enumerate() {
            if !has_tree(name) {
                continue;
            }
            let space = Space::new(journal.clone(), i as u8 + 1);
            let mut writes = Writes::default();
            for entry in db.open_tree(name)?.iter() {
                let (k, v) = entry?;
                writes.insert(&space, &k, v);
                if writes.len() == 10_000 {
                    copied += writes.len() as u64;
                    std::mem::take(&mut writes).apply(&journal)?;
                }
            }
            copied += writes.len() as u64;
            writes.apply(&journal)?;
        }
        if copied > 0 {
            tracing::info!(
                records = copied,
                "ledger copied into the single-tree layout"
            );
        }
    }
    if format != Some(FORMAT) {
        let state = Space::new(journal.clone(), space_byte("state"));
        // Format 3's state needs nothing; nor its log (one message per
        // record is a one-message segment).
        let keys = match format {
            Some(f) if f >= READS_FROM => 0,
            _ => migrate_state(&state, &journal)?,
        };
        if keys > 0 {
            tracing::info!(
                partition_keys = keys,
                "state stored as one record per partition key (format {FORMAT})"
            );
        }
        durable()?;
        journal.single(|t| t.insert(FORMAT_KEY, &FORMAT.to_be_bytes()))?;
        durable()?;
    }
    let mut dropped = false;
    for name in SPACE_NAMES {
        if has_tree(name) {
            db.drop_tree(name)?;
            dropped = true;
        }
    }
    if dropped {
        durable()?;
    }
    Ok(journal)
}

/// Rewrites format 2's state (one entry per state key) as one record per
/// partition key; returns the partition keys rewritten. Each key's entries
/// are replaced by its record in one journaled batch, so after a crash every
/// key is either all entries or one record, and a rerun finishes the rest.
fn migrate_state(state: &Space, journal: &Journal) -> Result<u64> {
    let mut writes = Writes::default();
    let mut group: Option<(Vec<u8>, StateMap)> = None;
    let mut migrated = 0u64;
    let mut close = |writes: &mut Writes, group: Option<(Vec<u8>, StateMap)>| -> Result<()> {
        if let Some((record_key, map)) = group {
            writes.insert(state, &record_key, encode_state(&map));
            migrated += 1;
            if writes.len() >= 10_000 {
                std::mem::take(writes).apply(journal)?;
            }
        }
        Ok(())
    };
    for entry in state.iter() {
        let (k, v) = entry?;
        let Some((handler, partition_key, state_key)) = keys::parse_state_entry(&k) else {
            continue;
        };
        let record_key = keys::state(handler, partition_key);
        if group.as_ref().is_none_or(|(g, _)| *g != record_key) {
            close(&mut writes, group.take())?;
            group = Some((record_key, StateMap::new()));
        }
        if let Some((_, map)) = group.as_mut() {
            map.insert(state_key.to_string(), v.to_vec());
        }
        writes.remove(state, &k);
    }
    close(&mut writes, group.take())?;
    writes.apply(journal)?;
    Ok(migrated)
}

/// The offset in a `log` key (the first offset of its segment).
fn log_offset(key: &[u8]) -> Result<u64> {
    keys::parse_log(key)
        .map(|(_, _, offset)| offset)
        .ok_or_else(|| LedgerError::Corrupt("log key".into()))
}

/// Default size of the ledger's page cache (see [`Ledger::open_with_cache`]).
pub const DEFAULT_CACHE_BYTES: u64 = 256 << 20;

/// Opens the sled database in `dir` with the default cache.
#[cfg(test)]
fn open_db(dir: &Path) -> sled::Result<sled::Db> {
    open_db_cached(dir, DEFAULT_CACHE_BYTES)
}

/// Opens the sled database in `dir` with a page cache of `cache_bytes`.
/// sled locks its data file; a ledger closed just before in this process
/// may keep the lock for a moment (sled's background threads drop their
/// file handles asynchronously), so a held lock is retried for up to 5 s
/// before it is reported.
fn open_db_cached(dir: &Path, cache_bytes: u64) -> sled::Result<sled::Db> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .open()
        {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

impl Ledger {
    /// Opens (or creates) the ledger in `dir`, with the default cache.
    pub fn open(dir: &Path) -> Result<Ledger> {
        Self::open_with_cache(dir, DEFAULT_CACHE_BYTES)
    }

    /// Opens (or creates) the ledger in `dir`, keeping up to about
    /// `cache_bytes` of its pages in memory. Lookups of records outside the
    /// cache (old idempotency keys, cold partition keys' state) read the
    /// disk; a cache as large as the ledger keeps every lookup in memory.
    pub fn open_with_cache(dir: &Path, cache_bytes: u64) -> Result<Ledger> {
        Self::open_as(dir, cache_bytes, Upgrade::Migrate)
    }

    /// Opens an existing ledger for the offline tools (`check`, `export`)
    /// without moving its layout version forward: a ledger written by an
    /// older ordo that this one reads as it is (format 3 on) stays as it
    /// was, so the older ordo can still open it afterwards; one that would
    /// need a migration is refused untouched.
    pub fn open_existing(dir: &Path) -> Result<Ledger> {
        Self::open_as(dir, DEFAULT_CACHE_BYTES, Upgrade::Never)
    }

    fn open_as(dir: &Path, cache_bytes: u64, upgrade: Upgrade) -> Result<Ledger> {
        if upgrade == Upgrade::Never && !dir.is_dir() {
            return Err(LedgerError::Corrupt(format!(
                "{} holds no ledger (no such directory)",
                dir.display()
            )));
        }
        std::fs::create_dir_all(dir)?;
        let db = open_db_cached(dir, cache_bytes)?;
        let durable_files = Durable::new(dir);
        if let Some(parent) = dir.parent() {
            if let Ok(d) = File::open(parent) {
                let _ = d.sync_all();
            }
        }
        if let Ok(d) = File::open(dir) {
            d.sync_all()?;
        }
        let durable = || durable_files.flush(&db);
        let journal = open_layout(&db, &durable, upgrade)?;
        let trees = Trees::new(&journal);
        let id_floor = match trees.meta.get(ID_FLOOR_KEY)? {
            Some(v) => u64::from_be_bytes(
                v.as_ref()
                    .try_into()
                    .map_err(|_| LedgerError::Corrupt("id floor".into()))?,
            ),
            None => 0,
        };
        let dedup_index = Arc::new(DedupIndex::new());
        let fill = IndexFill::start(
            trees.dedup.clone(),
            trees.dedup_segments.clone(),
            dedup_index.clone(),
        );
        Ok(Ledger {
            inner: Arc::new(Inner {
                _fill: fill,
                db,
                journal,
                trees,
                durable: durable_files,
                next_offsets: Mutex::new(HashMap::new()),
                id_floor: std::sync::atomic::AtomicU64::new(id_floor),
                dedup_index,
            }),
        })
    }

    fn trees(&self) -> &Trees {
        &self.inner.trees
    }

    /// Applies `writes` atomically. Not durable until flushed.
    fn apply(&self, writes: Writes) -> Result<()> {
        writes.apply(&self.inner.journal)
    }

    /// Makes every write so far durable: sled flush, then fdatasync of the
    /// data file and of sled's new blob files (see `ledger/durable.rs`).
    pub fn flush(&self) -> Result<()> {
        // Never make a half-applied batch durable as if it were whole.
        self.inner.journal.check()?;
        self.inner.durable.flush(&self.inner.db)
    }

    /// Bytes used on disk.
    pub fn size_on_disk(&self) -> Result<u64> {
        Ok(self.inner.db.size_on_disk()?)
    }

    // ---- embedded log ----------------------------------------------------

    fn next_offset_locked(
        &self,
        map: &mut HashMap<(String, u32), u64>,
        topic: &str,
        partition: u32,
    ) -> Result<u64> {
        if let Some(n) = map.get(&(topic.to_string(), partition)) {
            return Ok(*n);
        }
        let prefix = keys::log_partition(topic, partition);
        let next = match self.trees().log.scan_prefix(&prefix).next_back() {
            Some(entry) => {
                let (k, v) = entry?;
                log_offset(&k)? + decode_segment(&v)?.len() as u64
            }
            None => self
                .meta_u64(&keys::low_watermark(topic, partition))?
                .unwrap_or(0),
        };
        map.insert((topic.to_string(), partition), next);
        Ok(next)
    }

    fn lock_offsets(&self) -> std::sync::MutexGuard<'_, HashMap<(String, u32), u64>> {
        self.inner
            .next_offsets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Assigns consecutive offsets to `items` (under the offsets lock).
    fn assign_offsets(
        &self,
        map: &mut HashMap<(String, u32), u64>,
        items: &[(&str, u32)],
    ) -> Result<(Vec<u64>, NextOffsets)> {
        let mut next: HashMap<(String, u32), u64> = HashMap::new();
        let mut offsets = Vec::with_capacity(items.len());
        for (topic, partition) in items {
            let k = (topic.to_string(), *partition);
            let n = match next.get(&k) {
                Some(n) => *n,
                None => self.next_offset_locked(map, topic, *partition)?,
            };
            offsets.push(n);
            next.insert(k, n + 1);
        }
        Ok((offsets, next))
    }

    /// Appends messages to `topic` atomically (all or nothing) and returns
    /// their offsets, in order. Not durable until flushed.
    pub fn append_batch(&self, topic: &str, items: &[(u32, Envelope)]) -> Result<Vec<u64>> {
        let appends: Vec<(&str, u32, &Envelope)> =
            items.iter().map(|(p, env)| (topic, *p, env)).collect();
        // Fresh offsets: no other batch writes them.
        let mut writes = Writes::default();
        writes.disjoint();
        self.apply_appending(writes, &appends)
    }

    /// Applies `writes` and appends (topic, partition, message) to the
    /// embedded log as ONE atomic batch; returns the appended messages'
    /// offsets, in order. Offsets are assigned and the batch applied under
    /// the offsets lock, so appends land in offset order without gaps.
    fn apply_appending(
        &self,
        mut writes: Writes,
        appends: &[(&str, u32, &Envelope)],
    ) -> Result<Vec<u64>> {
        if appends.is_empty() {
            self.apply(writes)?;
            return Ok(Vec::new());
        }
        let mut map = self.lock_offsets();
        let targets: Vec<(&str, u32)> = appends.iter().map(|(t, p, _)| (*t, *p)).collect();
        let (offsets, next) = self.assign_offsets(&mut map, &targets)?;
        // Each partition's messages have consecutive offsets: they are
        // written as segments (a few records instead of one per message).
        // (topic, partition) -> (first offset, messages).
        let mut runs: BTreeMap<(&str, u32), (u64, Vec<&Envelope>)> = BTreeMap::new();
        for ((topic, partition, env), offset) in appends.iter().zip(&offsets) {
            runs.entry((*topic, *partition))
                .or_insert_with(|| (*offset, Vec::new()))
                .1
                .push(*env);
        }
        let log = &self.trees().log;
        for ((topic, partition), (first, run)) in &runs {
            cut_segments(*first, run, |offset, segment| {
                writes.insert(
                    log,
                    &keys::log(topic, *partition, offset),
                    encode_segment(segment)?,
                );
                Ok(())
            })?;
        }
        self.apply(writes)?;
        map.extend(next);
        Ok(offsets)
    }

    /// The segments of a partition (first offset and messages) from the
    /// one holding `from` on (or the first after it), oldest first, up to
    /// those starting before offset `before`.
    fn segments(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        before: u64,
    ) -> Result<impl Iterator<Item = Result<(u64, Vec<Envelope>)>>> {
        let log = &self.trees().log;
        let (lowest, from_key) = (
            keys::log(topic, partition, 0),
            keys::log(topic, partition, from),
        );
        // The segment holding `from` starts at or before it.
        let start = match log
            .range(Bound::Included(&lowest), Some(Bound::Included(&from_key)))
            .next_back()
            .transpose()?
        {
            Some((k, _)) => k.to_vec(),
            None => from_key,
        };
        let end = keys::log(topic, partition, before);
        Ok(log
            .range(Bound::Included(&start), Some(Bound::Excluded(&end)))
            .map(|entry| {
                let (k, v) = entry?;
                Ok((log_offset(&k)?, decode_segment(&v)?))
            }))
    }

    /// Reads up to `max` messages of a partition from `from` on.
    pub fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<(u64, Envelope)>> {
        let mut out = Vec::new();
        for segment in self.segments(topic, partition, from, u64::MAX)? {
            if out.len() >= max {
                break;
            }
            let (first, entries) = segment?;
            out.extend(
                (first..)
                    .zip(entries)
                    .filter(|(offset, _)| *offset >= from)
                    .take(max - out.len()),
            );
        }
        Ok(out)
    }

    /// The next offset to be assigned in a partition.
    pub fn high_watermark(&self, topic: &str, partition: u32) -> Result<u64> {
        let mut map = self.lock_offsets();
        self.next_offset_locked(&mut map, topic, partition)
    }

    /// The offset below which a partition's messages may be removed under
    /// retention: every message below it is below `keep_from` (committed by
    /// every subscriber) and was appended before `cutoff_ms`, and it is the
    /// end of a segment. Stops at the first segment that reaches
    /// `max_scan` messages in all; `None` when nothing may be removed.
    pub fn retention_bound(
        &self,
        topic: &str,
        partition: u32,
        keep_from: u64,
        cutoff_ms: u64,
        max_scan: usize,
    ) -> Result<Option<u64>> {
        let mut bound = None;
        let mut scanned = 0;
        for segment in self.segments(topic, partition, 0, keep_from)? {
            let (first, entries) = segment?;
            let end = first + entries.len() as u64;
            // Whole segments only.
            if end > keep_from || entries.iter().any(|e| e.appended_at_ms >= cutoff_ms) {
                break;
            }
            bound = Some(end);
            scanned += entries.len();
            if scanned >= max_scan {
                break;
            }
        }
        Ok(bound)
    }

    /// The oldest offset still in a partition (its high watermark if empty).
    pub fn low_watermark(&self, topic: &str, partition: u32) -> Result<u64> {
        let first = self
            .trees()
            .log
            .scan_prefix(&keys::log_partition(topic, partition))
            .next()
            .transpose()?;
        match first {
            Some((k, _)) => log_offset(&k),
            None => self.high_watermark(topic, partition),
        }
    }

    /// Removes a partition's messages below `offset` (retention), in whole
    /// segments: a segment that also holds `offset` or later stays
    /// ([`retention_bound`](Self::retention_bound) never cuts one). Returns
    /// the number of messages removed.
    pub fn remove_before(&self, topic: &str, partition: u32, offset: u64) -> Result<usize> {
        let log = &self.trees().log;
        let mut writes = Writes::default();
        let (mut removed, mut low) = (0, None);
        for segment in self.segments(topic, partition, 0, offset)? {
            let (first, entries) = segment?;
            let end = first + entries.len() as u64;
            if end > offset {
                break;
            }
            writes.remove(log, &keys::log(topic, partition, first));
            removed += entries.len();
            low = Some(end);
        }
        let Some(low) = low else {
            return Ok(0);
        };
        // Remember where the log starts, so offsets never restart at 0 when
        // a partition is emptied by retention (in the same atomic batch).
        writes.insert(
            &self.trees().meta,
            &keys::low_watermark(topic, partition),
            &low.to_be_bytes(),
        );
        self.apply(writes)?;
        Ok(removed)
    }

    /// Replaces a topic's configuration. Not durable until flushed.
    pub fn set_topic_config(&self, topic: &str, config: &TopicConfig) -> Result<()> {
        self.trees()
            .meta
            .insert(keys::topic_meta(topic), encode(config)?)?;
        Ok(())
    }

    /// Creates a topic (no-op if it exists with any configuration).
    pub fn create_topic(&self, topic: &str, config: &TopicConfig) -> Result<()> {
        let key = keys::topic_meta(topic);
        let value = encode(config)?;
        self.trees().meta.insert_if_absent(key, value)?;
        Ok(())
    }

    /// A topic's configuration.
    pub fn topic_config(&self, topic: &str) -> Result<Option<TopicConfig>> {
        match self.trees().meta.get(keys::topic_meta(topic))? {
            Some(v) => Ok(Some(decode(&v, "topic config")?)),
            None => Ok(None),
        }
    }

    /// Names of all topics.
    pub fn topics(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for entry in self.trees().meta.scan_prefix(keys::TOPIC_META_PREFIX) {
            let (k, _) = entry?;
            out.push(String::from_utf8_lossy(&k[keys::TOPIC_META_PREFIX.len()..]).into_owned());
        }
        Ok(out)
    }

    fn meta_u64(&self, key: &[u8]) -> Result<Option<u64>> {
        match self.trees().meta.get(key)? {
            Some(v) => {
                let bytes: [u8; 8] = v
                    .as_ref()
                    .try_into()
                    .map_err(|_| LedgerError::Corrupt("meta u64".into()))?;
                Ok(Some(u64::from_be_bytes(bytes)))
            }
            None => Ok(None),
        }
    }

    // ---- handler progress -------------------------------------------------

    /// Next offset a handler processes in a partition (0 if never).
    pub fn cursor(&self, handler: &str, source: &str, partition: u32) -> Result<u64> {
        match self
            .trees()
            .cursor
            .get(keys::cursor(handler, source, partition))?
        {
            Some(v) => {
                let bytes: [u8; 8] = v
                    .as_ref()
                    .try_into()
                    .map_err(|_| LedgerError::Corrupt("cursor".into()))?;
                Ok(u64::from_be_bytes(bytes))
            }
            None => Ok(0),
        }
    }

    /// Sets a cursor outside a commit (deploying with `from=latest`).
    pub fn set_cursor(&self, handler: &str, source: &str, partition: u32, next: u64) -> Result<()> {
        self.trees().cursor.insert(
            keys::cursor(handler, source, partition),
            &next.to_be_bytes(),
        )?;
        Ok(())
    }

    /// One committed state value.
    pub fn state_get(
        &self,
        handler: &str,
        partition_key: &str,
        state_key: &str,
    ) -> Result<Option<Vec<u8>>> {
        Ok(self.state_record(handler, partition_key)?.remove(state_key))
    }

    /// The whole committed state of one partition key of a handler (empty
    /// when it has none).
    pub fn state_record(&self, handler: &str, partition_key: &str) -> Result<StateMap> {
        match self
            .trees()
            .state
            .get(keys::state(handler, partition_key))?
        {
            Some(v) => decode_state(&v),
            None => Ok(StateMap::new()),
        }
    }

    /// The idempotency record of a key, if any (the newest, if it was
    /// recorded more than once). Waits for the index's fill after an open.
    pub fn dedup_get(&self, handler: &str, idempotency_key: &str) -> Result<Option<DedupRecord>> {
        Ok(self
            .newest_dedup_record(handler, idempotency_key)?
            .map(|(_, record)| record))
    }

    /// The newest record of a key with its location (a segment sequence or
    /// [`dedup::OWN_RECORD`]): the index's locations are read newest first.
    fn newest_dedup_record(
        &self,
        handler: &str,
        idempotency_key: &str,
    ) -> Result<Option<(u64, DedupRecord)>> {
        let hash = dedup::key_hash(handler, idempotency_key);
        for dedup::Location { at, slot } in self.inner.dedup_index.locations(hash)? {
            let record = if at == dedup::OWN_RECORD {
                let key = keys::dedup(handler, idempotency_key);
                match self.trees().dedup.get(key)? {
                    Some(v) => Some(decode(&v, "dedup record")?),
                    None => None,
                }
            } else {
                match self
                    .trees()
                    .dedup_segments
                    .get(keys::dedup_segment(handler, at))?
                {
                    Some(v) => find_in_dedup_segment(&v, idempotency_key, slot)?,
                    None => None,
                }
            };
            if let Some(record) = record {
                return Ok(Some((at, record)));
            }
        }
        Ok(None)
    }

    /// Whether the idempotency index holds every recorded key yet (it is
    /// filled in the background after the ledger opens; lookups wait for
    /// it).
    pub fn dedup_index_filled(&self) -> bool {
        self.inner.dedup_index.is_filled()
    }

    /// Approximate memory the idempotency index takes, in bytes.
    pub fn dedup_index_bytes(&self) -> usize {
        self.inner.dedup_index.bytes()
    }

    /// Whether `idempotency_key` was recorded again in a segment after
    /// location `after` (a segment sequence or [`dedup::OWN_RECORD`]).
    fn recorded_after(&self, handler: &str, idempotency_key: &str, after: u64) -> Result<bool> {
        Ok(self
            .newest_dedup_record(handler, idempotency_key)?
            .is_some_and(|(at, _)| at > after))
    }

    /// Adds one handler's idempotency records to `writes` as segments
    /// under fresh sequences, indexing their keys first (see [`dedup`]).
    fn dedup_writes(
        &self,
        writes: &mut Writes,
        handler: &str,
        records: &[(&str, &DedupRecord)],
    ) -> Result<()> {
        for segment in dedup::cut(records) {
            let sequence = self.next_id()?;
            for (slot, (k, _)) in segment.iter().enumerate() {
                // Before the write: a key must never be in the ledger and
                // not in the index (a failed write leaves an entry whose
                // segment is missing, which a lookup skips).
                self.inner.dedup_index.insert(
                    dedup::key_hash(handler, k),
                    dedup::Location::new(sequence, slot),
                )?;
            }
            writes.insert(
                &self.trees().dedup_segments,
                &keys::dedup_segment(handler, sequence),
                encode_dedup_segment(segment)?,
            );
        }
        Ok(())
    }

    /// Writes one idempotency record under its own key, as format 4 did
    /// (the import of a record that does not decode), indexing it first.
    pub(crate) fn put_dedup_own_record(&self, key: &[u8], value: &[u8]) -> Result<()> {
        self.inner.dedup_index.insert(
            dedup::encoded_key_hash(key),
            dedup::Location::new(dedup::OWN_RECORD, 0),
        )?;
        self.trees().dedup.insert(key, value)
    }

    /// Writes one handler's idempotency records as segments (the import).
    pub(crate) fn put_dedup_records(
        &self,
        handler: &str,
        records: &[(String, DedupRecord)],
    ) -> Result<()> {
        let refs: Vec<(&str, &DedupRecord)> =
            records.iter().map(|(k, r)| (k.as_str(), r)).collect();
        let mut writes = Writes::default();
        self.dedup_writes(&mut writes, handler, &refs)?;
        self.apply(writes)
    }

    /// A new unique, increasing id (dead-letter and audit sequences).
    pub fn next_id(&self) -> Result<u64> {
        let floor = self
            .inner
            .id_floor
            .load(std::sync::atomic::Ordering::SeqCst);
        Ok(floor + self.inner.db.generate_id()? + 1)
    }

    /// Makes every later [`Ledger::next_id`] exceed `max` (after an import).
    pub(crate) fn raise_id_floor(&self, max: u64) -> Result<()> {
        self.inner
            .id_floor
            .fetch_max(max, std::sync::atomic::Ordering::SeqCst);
        let floor = self
            .inner
            .id_floor
            .load(std::sync::atomic::Ordering::SeqCst);
        self.trees()
            .meta
            .insert(ID_FLOOR_KEY, &floor.to_be_bytes())?;
        Ok(())
    }

    /// Every tree with its name.
    pub(crate) fn named_trees(&self) -> Vec<(&'static str, &Space)> {
        let t = self.trees();
        vec![
            ("log", &t.log),
            ("cursor", &t.cursor),
            ("state", &t.state),
            ("dedup", &t.dedup),
            ("outbox", &t.outbox),
            ("dlq", &t.dlq),
            ("parked", &t.parked),
            ("dlq_actions", &t.dlq_actions),
            ("audit", &t.audit),
            ("handlers", &t.handlers),
            ("artifacts", &t.artifacts),
            ("meta", &t.meta),
            ("dedup_segments", &t.dedup_segments),
        ]
    }

    /// Every state value of one partition key of a handler, in state key
    /// order.
    pub fn state_entries(
        &self,
        handler: &str,
        partition_key: &str,
    ) -> Result<Vec<(String, Vec<u8>)>> {
        Ok(self
            .state_record(handler, partition_key)?
            .into_iter()
            .collect())
    }

    /// Removes committed idempotency records older than `cutoff_ms`,
    /// looking at most at about `max_scan` records from `from` (where an
    /// earlier pass stopped; empty = the start). Records of dead-lettered
    /// or held messages are kept until their key is recorded again (a
    /// replay); a segment that keeps some is rewritten with them only.
    /// Returns (removed, where to continue; `None` after the last record).
    pub fn sweep_dedup(
        &self,
        from: &[u8],
        cutoff_ms: u64,
        max_scan: usize,
    ) -> Result<(usize, Option<Vec<u8>>)> {
        let t = self.trees();
        // A committed record goes once it is old; a dead-lettered or held
        // one once it is old and its key was recorded again later (the
        // newer record tells what happened).
        let expired = |handler: &str, key: &str, at: u64, r: &DedupRecord| -> Result<bool> {
            Ok(r.committed_at_ms < cutoff_ms
                && (r.outcome == DedupOutcome::Committed
                    || self.recorded_after(handler, key, at)?))
        };
        let mut writes = Writes::default();
        // Index entries to remove once the removals are applied, and the
        // new positions of the records kept in a rewritten segment.
        let mut unindex: Vec<(u64, u64)> = Vec::new();
        let mut reindex: Vec<(u64, dedup::Location)> = Vec::new();
        let (mut removed, mut scanned) = (0, 0);
        let mut next = None;
        // A position is a phase byte (0: the own-key records of `dedup`, 1:
        // `dedup_segments`) and the key to continue from.
        let (phase, at) = from.split_first().map_or((0, &[][..]), |(p, k)| (*p, k));
        let resume = |phase: u8, key: &[u8]| [&[phase][..], key].concat();
        if phase == 0 {
            for entry in t.dedup.range(Bound::Included(at), None) {
                let (k, v) = entry?;
                if scanned >= max_scan {
                    next = Some(resume(0, &k));
                    break;
                }
                scanned += 1;
                let (handler, key) = keys::parse_dedup(&k).ok_or_else(|| {
                    LedgerError::Corrupt("dedup: key is not (handler, idempotency key)".into())
                })?;
                if expired(
                    handler,
                    key,
                    dedup::OWN_RECORD,
                    &decode(&v, "dedup record")?,
                )? {
                    writes.remove(&t.dedup, &k);
                    unindex.push((dedup::encoded_key_hash(&k), dedup::OWN_RECORD));
                    removed += 1;
                }
            }
        }
        let at = if phase == 0 { &[][..] } else { at };
        let segments = &t.dedup_segments;
        for entry in segments.range(Bound::Included(at), None) {
            if next.is_some() {
                break;
            }
            let (k, v) = entry?;
            if scanned >= max_scan {
                next = Some(resume(1, &k));
                break;
            }
            let (handler, sequence) = keys::parse_dedup_segment(&k).ok_or_else(|| {
                LedgerError::Corrupt("dedup_segments: key is not (handler, sequence)".into())
            })?;
            let records = decode_dedup_segment(&v)?;
            scanned += records.len();
            let (mut gone, mut kept) = (Vec::new(), Vec::new());
            for record in &records {
                if expired(handler, record.0, sequence, &record.1)? {
                    gone.push(record);
                } else {
                    kept.push(record);
                }
            }
            if gone.is_empty() {
                continue;
            }
            removed += gone.len();
            for (key, _) in &gone {
                if !kept.iter().any(|(k, _)| k == key) {
                    unindex.push((dedup::key_hash(handler, key), sequence));
                }
            }
            if kept.is_empty() {
                writes.remove(segments, &k);
            } else {
                let kept: Vec<(&str, &DedupRecord)> = kept.iter().map(|(k, r)| (*k, r)).collect();
                writes.insert(segments, &k, encode_dedup_segment(&kept)?);
                for (slot, (key, _)) in kept.iter().enumerate() {
                    reindex.push((
                        dedup::key_hash(handler, key),
                        dedup::Location::new(sequence, slot),
                    ));
                }
            }
        }
        self.apply(writes)?;
        for (hash, at) in unindex {
            self.inner.dedup_index.remove(hash, at);
        }
        // Until here a lookup of a kept record misses its hint and scans.
        for (hash, location) in reindex {
            self.inner.dedup_index.insert(hash, location)?;
        }
        Ok((removed, next))
    }

    /// Applies a batch atomically (one journaled batch over the state,
    /// dedup_segments, cursor, dlq, log, outbox, parked and dlq_actions
    /// spaces). Not durable until flushed.
    pub fn commit(&self, batch: &CommitBatch) -> Result<()> {
        self.commit_all(&[batch])
    }

    /// Applies several lanes' batches as ONE atomic batch (a worker's
    /// transaction, `dispatch::worker`): all of them or none survive a
    /// crash. The batches must be of distinct lanes. Not durable until
    /// flushed.
    pub fn commit_all(&self, batches: &[&CommitBatch]) -> Result<()> {
        let t = self.trees();
        let mut writes = Writes::default();
        writes.crash_point("mid-commit");
        // Lanes' own partition keys, cursors, dead letters and parked
        // keys, fresh sequence numbers (idempotency segments, outbox) and
        // offsets: no other batch writes them while it runs.
        writes.disjoint();
        for (h, pk, map) in batches.iter().flat_map(|b| &b.state) {
            let key = keys::state(h, pk);
            if map.is_empty() {
                writes.remove(&t.state, &key);
            } else {
                writes.insert(&t.state, &key, encode_state(map));
            }
        }
        // Each lane's records as segments of their own (a lane's batch is
        // one handler's): one insert per batch, not one per message.
        for batch in batches {
            let mut records = batch.dedup.as_slice();
            while let Some((h, _, _)) = records.first() {
                let n = records
                    .iter()
                    .take_while(|(other, _, _)| other == h)
                    .count();
                let (run, rest) = records.split_at(n);
                let refs: Vec<(&str, &DedupRecord)> =
                    run.iter().map(|(_, k, r)| (k.as_str(), r)).collect();
                self.dedup_writes(&mut writes, h, &refs)?;
                records = rest;
            }
        }
        for (h, s, p, n) in batches.iter().flat_map(|b| &b.cursors) {
            writes.insert(&t.cursor, &keys::cursor(h, s, *p), &n.to_be_bytes());
        }
        for (h, seq, d) in batches.iter().flat_map(|b| &b.dlq) {
            let value = d.as_ref().map(encode).transpose()?;
            writes.put(&t.dlq, &keys::dlq(h, *seq), value.as_deref());
        }
        for (h, p, k, v) in batches.iter().flat_map(|b| &b.parked) {
            let value = v.as_ref().map(encode).transpose()?;
            writes.put(&t.parked, &keys::parked(h, *p, k), value.as_deref());
        }
        for (h, p, seq) in batches.iter().flat_map(|b| &b.dlq_actions_done) {
            writes.remove(&t.dlq_actions, &keys::dlq_action(h, *p, *seq));
        }
        for (h, p, seq, action) in batches.iter().flat_map(|b| &b.dlq_actions_new) {
            writes.insert(
                &t.dlq_actions,
                &keys::dlq_action(h, *p, *seq),
                encode(action)?,
            );
        }
        for (seq, e) in batches.iter().flat_map(|b| &b.outbox) {
            writes.insert(&t.outbox, &keys::outbox(*seq), encode(e)?);
        }
        let appends: Vec<(&str, u32, &Envelope)> = batches
            .iter()
            .flat_map(|b| &b.log_appends)
            .map(|(topic, p, env)| (topic.as_str(), *p, env))
            .collect();
        self.apply_appending(writes, &appends)?;
        Ok(())
    }

    // ---- dead letters, parked keys, operator actions ------------------------

    /// Number of dead letters of a handler (held messages of parked keys
    /// included).
    pub fn dlq_count(&self, handler: &str) -> Result<u64> {
        Ok(self
            .trees()
            .dlq
            .scan_prefix(&keys::handler_prefix(handler))
            .count() as u64)
    }

    /// Dead letters of a handler, oldest first.
    pub fn dlq_list(&self, handler: &str) -> Result<Vec<(u64, DeadLetter)>> {
        let mut out = Vec::new();
        for entry in self.trees().dlq.scan_prefix(&keys::handler_prefix(handler)) {
            let (k, v) = entry?;
            let mut r = keys::KeyReader::new(&k);
            let seq = r
                .str()
                .and(r.u64())
                .ok_or_else(|| LedgerError::Corrupt("dlq key".into()))?;
            out.push((seq, decode(&v, "dead letter")?));
        }
        Ok(out)
    }

    /// One dead letter.
    pub fn dlq_get(&self, handler: &str, seq: u64) -> Result<Option<DeadLetter>> {
        match self.trees().dlq.get(keys::dlq(handler, seq))? {
            Some(v) => Ok(Some(decode(&v, "dead letter")?)),
            None => Ok(None),
        }
    }

    /// Parked keys of one lane.
    pub fn parked_keys(&self, handler: &str, partition: u32) -> Result<Vec<ParkedKey>> {
        let mut out = Vec::new();
        for entry in self
            .trees()
            .parked
            .scan_prefix(&keys::handler_partition(handler, partition))
        {
            let (_, v) = entry?;
            out.push(decode(&v, "parked key")?);
        }
        Ok(out)
    }

    /// Parked keys of a handler, with their partitions.
    pub fn parked_list(&self, handler: &str) -> Result<Vec<(u32, ParkedKey)>> {
        let mut out = Vec::new();
        for entry in self
            .trees()
            .parked
            .scan_prefix(&keys::handler_prefix(handler))
        {
            let (k, v) = entry?;
            let mut r = keys::KeyReader::new(&k);
            let partition = r
                .str()
                .and(r.u32())
                .ok_or_else(|| LedgerError::Corrupt("parked key".into()))?;
            out.push((partition, decode(&v, "parked key")?));
        }
        Ok(out)
    }

    /// Number of parked keys of a handler.
    pub fn parked_count(&self, handler: &str) -> Result<u64> {
        Ok(self
            .trees()
            .parked
            .scan_prefix(&keys::handler_prefix(handler))
            .count() as u64)
    }

    /// Records operator actions on dead letters for their lanes to carry
    /// out; (partition, sequence, action). Not durable until flushed.
    pub fn request_dlq_actions(
        &self,
        handler: &str,
        actions: &[(u32, u64, DlqAction)],
    ) -> Result<()> {
        let space = &self.trees().dlq_actions;
        let mut writes = Writes::default();
        for (p, seq, action) in actions {
            writes.insert(space, &keys::dlq_action(handler, *p, *seq), encode(action)?);
        }
        self.apply(writes)?;
        Ok(())
    }

    /// Pending operator actions of one lane, oldest dead letter first.
    pub fn dlq_actions(
        &self,
        handler: &str,
        partition: u32,
        max: usize,
    ) -> Result<Vec<(u64, DlqAction)>> {
        let mut out = Vec::new();
        for entry in self
            .trees()
            .dlq_actions
            .scan_prefix(&keys::handler_partition(handler, partition))
            .take(max)
        {
            let (k, v) = entry?;
            let mut r = keys::KeyReader::new(&k);
            let seq = r
                .str()
                .and(r.u32())
                .and(r.u64())
                .ok_or_else(|| LedgerError::Corrupt("dlq action key".into()))?;
            out.push((seq, decode(&v, "dlq action")?));
        }
        Ok(out)
    }

    /// Number of pending operator actions of a handler.
    pub fn dlq_actions_pending(&self, handler: &str) -> Result<u64> {
        Ok(self
            .trees()
            .dlq_actions
            .scan_prefix(&keys::handler_prefix(handler))
            .count() as u64)
    }

    // ---- audit --------------------------------------------------------------

    /// Appends an audit record. Not durable until flushed.
    pub fn append_audit(&self, record: &AuditRecord) -> Result<u64> {
        let seq = self.next_id()?;
        self.trees()
            .audit
            .insert(keys::audit(seq), encode(record)?)?;
        Ok(seq)
    }

    /// The audit trail, oldest first, optionally of one handler.
    pub fn audit_list(&self, handler: Option<&str>) -> Result<Vec<(u64, AuditRecord)>> {
        let mut out = Vec::new();
        for entry in self.trees().audit.iter() {
            let (k, v) = entry?;
            let seq = keys::KeyReader::new(&k)
                .u64()
                .ok_or_else(|| LedgerError::Corrupt("audit key".into()))?;
            let record: AuditRecord = decode(&v, "audit record")?;
            if handler.is_none_or(|h| h == record.handler) {
                out.push((seq, record));
            }
        }
        Ok(out)
    }

    // ---- deployed handlers ------------------------------------------------

    /// Records a deployed version.
    pub fn put_handler_version(&self, v: &HandlerVersion) -> Result<()> {
        self.trees().handlers.insert(
            keys::handler_version(&v.name, v.version),
            encode_handler_version(v)?,
        )?;
        Ok(())
    }

    /// All versions of a handler, oldest first.
    pub fn handler_versions(&self, name: &str) -> Result<Vec<HandlerVersion>> {
        let mut out = Vec::new();
        for entry in self
            .trees()
            .handlers
            .scan_prefix(&keys::handler_prefix(name))
        {
            let (_, v) = entry?;
            out.push(decode_handler_version(&v)?);
        }
        Ok(out)
    }

    /// The latest version of every handler.
    pub fn all_handlers(&self) -> Result<Vec<HandlerVersion>> {
        let mut latest: Vec<HandlerVersion> = Vec::new();
        for entry in self.trees().handlers.iter() {
            let (_, v) = entry?;
            let v = decode_handler_version(&v)?;
            match latest.last_mut() {
                Some(last) if last.name == v.name => *last = v,
                _ => latest.push(v),
            }
        }
        Ok(latest)
    }

    /// Which version of a handler runs (`None` for handlers deployed before
    /// this record existed: their latest version runs).
    pub fn handler_control(&self, name: &str) -> Result<Option<HandlerControl>> {
        match self.trees().meta.get(keys::handler_control(name))? {
            Some(v) => Ok(Some(decode(&v, "handler control")?)),
            None => Ok(None),
        }
    }

    /// Records which version of a handler runs. Not durable until flushed.
    pub fn put_handler_control(&self, name: &str, control: &HandlerControl) -> Result<()> {
        self.trees()
            .meta
            .insert(keys::handler_control(name), encode(control)?)?;
        Ok(())
    }

    /// Removes everything of a handler: state, idempotency records, cursors,
    /// dead letters, parked keys, pending actions, versions and control.
    /// Artifacts stay (shared by content hash). Returns the records removed.
    pub fn purge_handler(&self, name: &str) -> Result<usize> {
        let prefix = keys::handler_prefix(name);
        let t = self.trees();
        let mut removed = 0;
        for tree in [
            &t.state,
            &t.dedup,
            &t.dedup_segments,
            &t.cursor,
            &t.dlq,
            &t.parked,
            &t.dlq_actions,
            &t.handlers,
        ] {
            let mut writes = Writes::default();
            let mut unindex: Vec<(u64, u64)> = Vec::new();
            for entry in tree.scan_prefix(&prefix) {
                let (k, v) = entry?;
                if std::ptr::eq(tree, &t.dedup) {
                    unindex.push((dedup::encoded_key_hash(&k), dedup::OWN_RECORD));
                } else if std::ptr::eq(tree, &t.dedup_segments) {
                    dedup::segment_locations(&k, &v, |hash, l| {
                        unindex.push((hash, l.at));
                        Ok(())
                    })?;
                }
                writes.remove(tree, &k);
                removed += 1;
            }
            self.apply(writes)?;
            for (hash, at) in unindex {
                self.inner.dedup_index.remove(hash, at);
            }
        }
        t.meta.remove(keys::handler_control(name))?;
        Ok(removed)
    }

    /// Stores component bytes by content hash.
    pub fn put_artifact(&self, content_hash: &str, bytes: &[u8]) -> Result<()> {
        self.trees()
            .artifacts
            .insert(content_hash.as_bytes(), bytes)?;
        Ok(())
    }

    /// Component bytes by content hash.
    pub fn get_artifact(&self, content_hash: &str) -> Result<Option<Vec<u8>>> {
        Ok(self
            .trees()
            .artifacts
            .get(content_hash.as_bytes())?
            .map(|v| v.to_vec()))
    }

    /// Outbox entries waiting for the relay.
    pub fn outbox_len(&self) -> usize {
        self.trees().outbox.len()
    }

    /// The oldest `max` outbox entries, in commit order. Entries are visible
    /// once applied: a reader must wait for durability before relaying them.
    pub fn outbox_scan(&self, max: usize) -> Result<Vec<(u64, OutboxEntry)>> {
        let mut out = Vec::new();
        for item in self.trees().outbox.iter().take(max) {
            let (k, v) = item?;
            let seq = keys::parse_outbox(&k)
                .ok_or_else(|| LedgerError::Corrupt("outbox: bad key".into()))?;
            out.push((seq, decode(&v, "outbox entry")?));
        }
        Ok(out)
    }

    /// Removes relayed outbox entries.
    pub fn outbox_remove(&self, sequences: &[u64]) -> Result<()> {
        let outbox = &self.trees().outbox;
        let mut writes = Writes::default();
        for seq in sequences {
            writes.remove(outbox, &keys::outbox(*seq));
        }
        self.apply(writes)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
