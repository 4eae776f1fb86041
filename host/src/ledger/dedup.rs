//! Idempotency records: how they are stored and found.
//!
//! **Storage.** A lane's batch writes its messages' idempotency records as
//! ONE `dedup_segments` value, a *segment*: up to [`SEGMENT_MAX`]
//! (idempotency key, record) pairs under the key (handler, segment
//! sequence) with a fresh, increasing sequence from
//! [`super::Ledger::next_id`]. One sled insert at
//! the end of the handler's keys per batch replaces one insert per message
//! at a random place in the tree, which split a leaf every few inserts and
//! was the whole cost of effectively-once over at-least-once (BENCHMARKS.md,
//! items 15 and 16). `dedup_segments` is the last key space of the ledger
//! tree on purpose: segments are appended at its end, and sled rewrites
//! the leaf an insert lands in, so whatever sorts right after the newest
//! segment is rewritten with it (in the `dedup` space's place that was a
//! component in `artifacts`: 5 KB written per message). A ledger written
//! before (format 4 and older) holds one record per key in `dedup` under
//! (handler, idempotency key); those records are read, swept and exported
//! where they are, and new ones are never written that way.
//!
//! **Lookup.** Segments cannot be found by idempotency key, so an in-memory
//! [`DedupIndex`] maps a 64-bit hash of (handler, idempotency key) to the
//! segments that hold it (or to the key's own record, location
//! [`OWN_RECORD`]). A lookup reads only those segments, newest first, and
//! compares the keys, so a hash collision costs a read, never a wrong
//! answer; a hash that is not in the index was never recorded. Each
//! location also holds the record's position in its segment
//! ([`Location`]), which the lookup tries first: in a ledger too large for
//! the CPU caches, scanning a segment's fingerprints was a third of a hit
//! (BENCHMARKS.md, item 26). The index
//! takes about 20–40 bytes per recorded key (a `HashMap<u64, u64>` entry),
//! where the Bloom filter it replaces took about 2 and still needed a sled
//! read for every duplicate.
//!
//! Architecture invariant: every idempotency key written to the ledger is
//! in the index before the write is applied ([`super::Ledger::commit_all`],
//! the import), and the index answers only once its fill (a scan of the
//! `dedup` and `dedup_segments` spaces started when the ledger opens) has
//! finished; until then lookups wait. So "not in the index" proves "never
//! recorded". Removing a record (the sweep, a purge) removes its index
//! entry after the write is applied.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, RwLock};

use super::keys;
use super::records::{cut_runs, decode_dedup_segment, DedupRecord};
use super::{LedgerError, Result};

/// Records per segment at most; a batch with more writes several.
pub const SEGMENT_MAX: usize = 256;
/// Approximate encoded bytes of a segment at most (long idempotency keys
/// make fewer records per segment), so a lookup decodes little.
pub const SEGMENT_MAX_BYTES: usize = 32 << 10;

/// Index location of a record stored under its own key (format 4 and
/// older). Segment sequences come from `Ledger::next_id`, which never
/// returns 0, and sort after it (newer).
pub const OWN_RECORD: u64 = 0;

/// The index's hash of (handler, idempotency key): SipHash-1-3 with fixed
/// keys over the bytes of `keys::dedup(handler, key)`, fed without building
/// that key. In memory only, so it need not be stable across builds. With
/// the keys known, a producer can at best make pairs of its keys collide
/// (about 2^32 hashes per pair), which costs a lookup of either one more
/// segment read.
pub fn key_hash(handler: &str, idempotency_key: &str) -> u64 {
    let mut h = hasher();
    for s in [handler, idempotency_key] {
        h.write(&(s.len() as u32).to_be_bytes());
        h.write(s.as_bytes());
    }
    h.finish()
}

/// [`key_hash`] of an encoded `keys::dedup` key.
pub fn encoded_key_hash(key: &[u8]) -> u64 {
    let mut h = hasher();
    h.write(key);
    h.finish()
}

fn hasher() -> impl Hasher {
    BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().build_hasher()
}

/// Passes an already well-mixed `u64` through (the index's keys are
/// [`key_hash`]es).
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed; this path exists for completeness.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

type Map<V> = HashMap<u64, V, BuildHasherDefault<PassThrough>>;

/// Where an idempotency key's record is: the segment's sequence (or
/// [`OWN_RECORD`]) and the record's position in that segment. The
/// position is a hint the lookup checks before it scans the segment
/// ([`super::records::find_in_dedup_segment`]): a sweep that rewrites a
/// segment moves its records, and only the low [`SLOT_BITS`] bits of it
/// are kept; a wrong hint costs the scan, never a wrong answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// Segment sequence, or [`OWN_RECORD`].
    pub at: u64,
    /// Position of the record in the segment (a hint).
    pub slot: usize,
}

impl Location {
    /// A record at position `slot` of segment `at`.
    pub fn new(at: u64, slot: usize) -> Location {
        Location { at, slot }
    }
}

/// Bits of a [`Location`]'s slot the index keeps: the index stores a
/// location as ONE `u64`, the sequence above these bits (so a segment
/// takes no more memory per key than it did without the hint).
pub const SLOT_BITS: u32 = 8;
/// Segment sequences the index can hold (2^56; at a million ids a second
/// [`super::Ledger::next_id`] reaches it in two thousand years). The index
/// refuses a larger one with an error rather than cut it.
pub const SEQUENCE_LIMIT: u64 = 1 << (64 - SLOT_BITS);
const SLOT_MASK: u64 = (1 << SLOT_BITS) - 1;

fn pack(l: Location) -> Result<u64> {
    if l.at >= SEQUENCE_LIMIT {
        return Err(LedgerError::Corrupt(format!(
            "idempotency segment sequence {} is beyond the index's limit {SEQUENCE_LIMIT}",
            l.at
        )));
    }
    Ok(l.at << SLOT_BITS | (l.slot as u64 & SLOT_MASK))
}

fn unpack(v: u64) -> Location {
    Location {
        at: v >> SLOT_BITS,
        slot: (v & SLOT_MASK) as usize,
    }
}

fn sequence(v: u64) -> u64 {
    v >> SLOT_BITS
}

/// One shard: a hash with one location in `one`, with several (a key
/// recorded again, or two keys whose hashes collide) in `many`; never in
/// both. Locations are [`pack`]ed; a hash has at most one per sequence.
#[derive(Default)]
struct Shard {
    one: Map<u64>,
    many: Map<Vec<u64>>,
}

impl Shard {
    /// Adds `packed`; a location in the same segment is replaced (the
    /// later record of a key written twice in one segment is its answer).
    fn insert(&mut self, hash: u64, packed: u64) {
        let at = sequence(packed);
        if let Some(list) = self.many.get_mut(&hash) {
            match list.iter_mut().find(|l| sequence(**l) == at) {
                Some(l) => *l = packed,
                None => list.push(packed),
            }
            return;
        }
        match self.one.insert(hash, packed) {
            Some(before) if sequence(before) != at => {
                self.one.remove(&hash);
                self.many.insert(hash, vec![before, packed]);
            }
            _ => {}
        }
    }

    fn remove(&mut self, hash: u64, at: u64) {
        if self.one.get(&hash).is_some_and(|l| sequence(*l) == at) {
            self.one.remove(&hash);
            return;
        }
        if let Some(list) = self.many.get_mut(&hash) {
            list.retain(|l| sequence(*l) != at);
            if list.len() == 1 {
                let last = list[0];
                self.many.remove(&hash);
                self.one.insert(hash, last);
            } else if list.is_empty() {
                self.many.remove(&hash);
            }
        }
    }

    fn get(&self, hash: u64) -> Vec<Location> {
        if let Some(l) = self.one.get(&hash) {
            return vec![unpack(*l)];
        }
        let mut list: Vec<Location> = self
            .many
            .get(&hash)
            .map(|l| l.iter().map(|l| unpack(*l)).collect())
            .unwrap_or_default();
        list.sort_unstable_by_key(|l| std::cmp::Reverse(l.at));
        list
    }

    fn bytes(&self) -> usize {
        // hashbrown: one control byte per bucket besides the entry.
        self.one.capacity() * 17
            + self.many.capacity() * 33
            + self.many.values().map(|l| l.capacity() * 8).sum::<usize>()
    }
}

/// Where the index's fill is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fill {
    Running,
    Done,
    Failed(String),
}

/// See the module docs. Shared by reference; all methods take `&self`.
pub struct DedupIndex {
    shards: Box<[RwLock<Shard>]>,
    fill: Mutex<Fill>,
    filled: Condvar,
    /// `fill` is `Done`: read on every lookup without the mutex.
    done: AtomicBool,
}

/// Shards, by the hash's top [`SHARD_BITS`] bits: lanes inserting a
/// batch's keys rarely wait for each other, and a shard that grows moves
/// few entries. A hash map grows by rehashing itself whole, under its
/// shard's lock and inside the commit that inserted the key: with 64
/// shards of 10 million keys that was a pause of up to 3 ms for the
/// commit and for lookups in the shard (BENCHMARKS.md, item 24).
const SHARD_BITS: u32 = 10;

/// Whether `hash` is in the upper half of the shards (the index's fill
/// splits them between two threads).
pub fn upper_half(hash: u64) -> bool {
    hash >> 63 == 1
}
const SHARDS: usize = 1 << SHARD_BITS;

impl DedupIndex {
    /// An empty index whose fill is running.
    pub fn new() -> DedupIndex {
        DedupIndex {
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
            fill: Mutex::new(Fill::Running),
            filled: Condvar::new(),
            done: AtomicBool::new(false),
        }
    }

    fn shard(&self, hash: u64) -> &RwLock<Shard> {
        &self.shards[(hash >> (64 - SHARD_BITS)) as usize]
    }

    /// Records that the key of `hash` is at `location` (replacing the
    /// slot of a location in the same segment). `Err` for a sequence at or
    /// beyond [`SEQUENCE_LIMIT`].
    pub fn insert(&self, hash: u64, location: Location) -> Result<()> {
        let packed = pack(location)?;
        self.shard(hash)
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(hash, packed);
        Ok(())
    }

    /// Forgets that the key of `hash` is in segment `at` (or at
    /// [`OWN_RECORD`]).
    pub fn remove(&self, hash: u64, at: u64) {
        self.shard(hash)
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(hash, at);
    }

    /// Where keys of `hash` may be, newest first; empty when no such key
    /// was recorded. Waits for the fill.
    pub fn locations(&self, hash: u64) -> Result<Vec<Location>> {
        self.wait_filled()?;
        Ok(self
            .shard(hash)
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(hash))
    }

    /// Marks the fill finished: `Err` with why it failed (every lookup then
    /// fails with it).
    pub fn finish_fill(&self, outcome: std::result::Result<(), String>) {
        let mut fill = self.fill.lock().unwrap_or_else(|p| p.into_inner());
        *fill = match outcome {
            Ok(()) => Fill::Done,
            Err(e) => Fill::Failed(e),
        };
        self.done.store(*fill == Fill::Done, Ordering::Release);
        self.filled.notify_all();
    }

    /// Whether the fill has finished (successfully or not).
    pub fn is_filled(&self) -> bool {
        *self.fill.lock().unwrap_or_else(|p| p.into_inner()) != Fill::Running
    }

    /// Waits until the fill has finished; `Err` when it failed.
    pub fn wait_filled(&self) -> Result<()> {
        if self.done.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut fill = self.fill.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match &*fill {
                Fill::Done => return Ok(()),
                Fill::Failed(e) => {
                    return Err(LedgerError::Corrupt(format!(
                        "the idempotency index could not be built ({e}); restart the host"
                    )))
                }
                Fill::Running => {
                    fill = self.filled.wait(fill).unwrap_or_else(|p| p.into_inner());
                }
            }
        }
    }

    /// Approximate memory the index takes, in bytes.
    pub fn bytes(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(|p| p.into_inner()).bytes())
            .sum()
    }
}

/// Calls `f` with (hash, location) of every idempotency key of one
/// `dedup_segments` entry, in the segment's order; returns how many.
pub fn segment_locations(
    key: &[u8],
    value: &[u8],
    mut f: impl FnMut(u64, Location) -> Result<()>,
) -> Result<usize> {
    let (handler, sequence) = keys::parse_dedup_segment(key).ok_or_else(|| {
        LedgerError::Corrupt("dedup_segments: key is not (handler, sequence)".into())
    })?;
    let records = decode_dedup_segment(value)?;
    for (slot, (k, _)) in records.iter().enumerate() {
        f(key_hash(handler, k), Location::new(sequence, slot))?;
    }
    Ok(records.len())
}

/// Cuts one handler's records into segments of at most [`SEGMENT_MAX`]
/// records and about [`SEGMENT_MAX_BYTES`].
pub fn cut<'a, 'r>(
    records: &'a [(&'r str, &'r DedupRecord)],
) -> impl Iterator<Item = &'a [(&'r str, &'r DedupRecord)]> {
    cut_runs(records, SEGMENT_MAX, SEGMENT_MAX_BYTES, |(k, _)| {
        k.len() + 48
    })
    .map(|(_, run)| run)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_of_parts_is_the_hash_of_the_encoded_key() {
        let key = super::super::keys::dedup("handler", "order-1/payment");
        assert_eq!(
            key_hash("handler", "order-1/payment"),
            encoded_key_hash(&key)
        );
        assert_ne!(key_hash("a", "b"), key_hash("ab", ""));
    }

    fn at(index: &DedupIndex, hash: u64) -> Vec<u64> {
        index
            .locations(hash)
            .unwrap()
            .iter()
            .map(|l| l.at)
            .collect()
    }

    fn put(index: &DedupIndex, hash: u64, at: u64) {
        index.insert(hash, Location::new(at, 0)).unwrap();
    }

    #[test]
    fn colliding_and_rerecorded_keys_keep_every_location_until_removed() {
        let index = DedupIndex::new();
        index.finish_fill(Ok(()));
        put(&index, 7, 10);
        assert_eq!(at(&index, 7), vec![10]);
        put(&index, 7, 10);
        assert_eq!(at(&index, 7), vec![10], "no duplicate entry");
        put(&index, 7, OWN_RECORD);
        put(&index, 7, 30);
        assert_eq!(at(&index, 7), vec![30, 10, OWN_RECORD], "newest first");
        index.remove(7, 10);
        assert_eq!(at(&index, 7), vec![30, OWN_RECORD]);
        index.remove(7, OWN_RECORD);
        assert_eq!(at(&index, 7), vec![30]);
        index.remove(7, 99);
        assert_eq!(at(&index, 7), vec![30], "unknown location");
        index.remove(7, 30);
        assert!(index.locations(7).unwrap().is_empty());
        assert!(index.locations(8).unwrap().is_empty());
    }

    #[test]
    fn a_location_keeps_its_slot_and_the_later_one_in_a_segment_wins() {
        let index = DedupIndex::new();
        index.finish_fill(Ok(()));
        index.insert(7, Location::new(10, 3)).unwrap();
        assert_eq!(index.locations(7).unwrap(), vec![Location::new(10, 3)]);
        index.insert(7, Location::new(10, 200)).unwrap();
        assert_eq!(
            index.locations(7).unwrap(),
            vec![Location::new(10, 200)],
            "one location per segment, the later slot"
        );
        index.insert(7, Location::new(20, 255)).unwrap();
        index.insert(7, Location::new(10, 5)).unwrap();
        assert_eq!(
            index.locations(7).unwrap(),
            vec![Location::new(20, 255), Location::new(10, 5)],
            "replaced among several too"
        );
        // The index keeps SLOT_BITS of a slot: a larger one is a wrong
        // hint the lookup corrects, not a lost location.
        index.insert(8, Location::new(10, 256 + 4)).unwrap();
        assert_eq!(index.locations(8).unwrap(), vec![Location::new(10, 4)]);
        let top = Location::new(SEQUENCE_LIMIT - 1, 255);
        index.insert(9, top).unwrap();
        assert_eq!(index.locations(9).unwrap(), vec![top]);
        let e = index
            .insert(9, Location::new(SEQUENCE_LIMIT, 0))
            .unwrap_err()
            .to_string();
        assert!(e.contains("beyond the index's limit"), "{e}");
        assert_eq!(index.locations(9).unwrap(), vec![top], "nothing stored");
    }

    #[test]
    fn hashes_at_either_end_find_their_own_shard() {
        let index = DedupIndex::new();
        index.finish_fill(Ok(()));
        let ends = [0, u64::MAX, 1 << 63, (1 << 63) - 1, 1 << (64 - SHARD_BITS)];
        for (i, hash) in ends.into_iter().enumerate() {
            put(&index, hash, i as u64 + 1);
        }
        for (i, hash) in ends.into_iter().enumerate() {
            assert_eq!(at(&index, hash), vec![i as u64 + 1]);
        }
        let used = index
            .shards
            .iter()
            .filter(|s| !s.read().unwrap().one.is_empty())
            .count();
        // Shards 0, 1023, 512, 511 and 1: the top bits pick the shard.
        assert_eq!(used, ends.len(), "each in a shard of its own");
    }

    #[test]
    fn segments_are_cut_by_count_and_by_bytes() {
        let record = DedupRecord {
            offset: 1,
            partition: 0,
            version: 1,
            payload_hash: [0; 16],
            committed_at_ms: 0,
            outcome: super::super::DedupOutcome::Committed,
        };
        let short: Vec<String> = (0..600).map(|i| format!("k{i}")).collect();
        let refs: Vec<(&str, &DedupRecord)> = short.iter().map(|k| (k.as_str(), &record)).collect();
        let sizes: Vec<usize> = cut(&refs).map(<[_]>::len).collect();
        assert_eq!(sizes, vec![SEGMENT_MAX, SEGMENT_MAX, 600 - 2 * SEGMENT_MAX]);
        let long: Vec<String> = (0..10)
            .map(|i| format!("{i}{}", "x".repeat(10_000)))
            .collect();
        let refs: Vec<(&str, &DedupRecord)> = long.iter().map(|k| (k.as_str(), &record)).collect();
        let sizes: Vec<usize> = cut(&refs).map(<[_]>::len).collect();
        assert_eq!(sizes, vec![3, 3, 3, 1]);
        let huge = "y".repeat(SEGMENT_MAX_BYTES * 2);
        let refs = [(huge.as_str(), &record)];
        assert_eq!(
            cut(&refs).count(),
            1,
            "a record larger than a segment is one of its own"
        );
        assert_eq!(cut(&[]).count(), 0);
    }

    #[test]
    fn lookups_wait_for_the_fill_and_fail_with_it() {
        let index = std::sync::Arc::new(DedupIndex::new());
        put(&index, 1, 5);
        assert!(!index.is_filled());
        let waiting = {
            let index = index.clone();
            std::thread::spawn(move || index.locations(1))
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!waiting.is_finished(), "a lookup answered before the fill");
        index.finish_fill(Ok(()));
        assert_eq!(waiting.join().unwrap().unwrap(), vec![Location::new(5, 0)]);

        let failed = DedupIndex::new();
        failed.finish_fill(Err("disk gone".into()));
        let e = failed.locations(1).unwrap_err().to_string();
        assert!(e.contains("disk gone"), "{e}");
    }
}
