//! The journal: how a batch of writes is applied all-or-nothing WITHOUT
//! sled's atomic batches.
//!
//! sled 0.34 makes `apply_batch` (and transactions) atomic with a
//! process-wide reader-writer lock that it switches on the first time one
//! is used; from then on every `flush` holds that lock shared for the
//! whole log write, so every batch waits for the flush in progress and
//! every reader queues behind the waiting batch (BENCHMARKS.md, item 8).
//! The ledger therefore never uses them: every write is a single-key sled
//! operation (atomic on its own), and a batch of several is made atomic
//! here:
//!
//! 1. the whole batch is written as ONE record to the `journal` tree
//!    (in chunks of at most [`CHUNK`] bytes, so sled keeps it and the
//!    leaves that hold it in its log and not in blob files);
//! 2. its writes are applied one by one to the ledger tree;
//! 3. the record is removed.
//!
//! A batch runs its three steps in one thread, so sled's log holds them
//! in that order. Batches that may write a common key are ordered whole:
//! a batch (or single write) takes the journal's ordering lock
//! exclusively, so nothing else is written between its steps. A batch
//! declared *disjoint* ([`Journal::apply_disjoint`]: a lane's commit, an
//! append of fresh offsets) writes only keys no other batch writes while
//! it runs; disjoint batches share the lock and interleave with each
//! other, never with an exclusive one. sled recovers a prefix of its log
//! (recovery stops at the first torn message), hence after a crash:
//!
//! - no record, or an incomplete one (a chunk missing): none of the
//!   batch's writes survived either (they come after every chunk);
//! - a complete record: the crash fell between steps 1 and 3, and no
//!   write made after the batch to one of its keys survived (it would
//!   come after step 3), so applying the record again finishes the
//!   batch without overwriting anything newer. Several complete records
//!   can survive only from disjoint batches, so their order is moot.
//!
//! Disjoint batches never share a key: a lane's idempotency records go to
//! a segment under a fresh sequence (see `ledger::dedup`), even when two
//! lanes of a handler record one key (a producer gave it to messages of
//! different partition keys).
//!
//! [`Journal::open`] does exactly that before anything reads the ledger.
//!
//! A batch that fails half-way in a running process (a sled error after
//! its record was started) leaves part of it in sled's memory, so from
//! then on every write and every [`super::Ledger::flush`] is refused: the
//! group committer stops acknowledging, and a restart completes the batch
//! from its record (if it reached the disk) or drops it whole (if not).
//!
//! Architecture invariant: every write to the ledger tree goes through
//! [`Journal::single`] or [`Journal::apply`] (the `space` types
//! are the only callers), and no sled batch, transaction or checksum is
//! ever used on the database.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use sled::{IVec, Tree};

use super::{LedgerError, Result};

/// Largest chunk of a journal record. sled writes a log message over a
/// quarter of its 512 KiB segment to a blob file of its own, which it
/// syncs twice (the file and its directory: `third_party/sled`, patch 4)
/// on the committing thread; a leaf holds up to 17 entries whatever their
/// size, so a leaf of 32 KiB chunks made one at nearly every large
/// commit, and 4 KiB chunks keep every journal leaf under that
/// (BENCHMARKS.md, item 23).
pub const CHUNK: usize = 4 << 10;

/// One write: the full key (space byte included) and the value to store,
/// or `None` to remove it.
pub type Op = (IVec, Option<IVec>);

/// Orders every write to the ledger tree and makes batches atomic.
pub struct Journal {
    tree: Tree,
    records: Tree,
    /// Held exclusively by a batch or single write that may share a key
    /// with another, shared by disjoint batches (see the module docs).
    /// std's lock on Linux queues new shared holders behind a waiting
    /// exclusive one, so a steady stream of lane commits does not starve
    /// the other writes.
    order: RwLock<()>,
    /// Next record number (records live only while their batch is being
    /// applied, so numbering restarts at every open).
    seq: AtomicU64,
    /// Set when a batch failed after its record was started: the tree may
    /// hold part of it, so every later write and flush is refused (only
    /// reopening, which completes it, is safe).
    failed: AtomicBool,
}

/// Name of the sled tree that holds journal records.
const JOURNAL_TREE: &str = "journal";

impl Journal {
    /// Opens the journal of `db` for `tree`, finishing any batch a crash
    /// interrupted (see the module docs); `durable` flushes `db` to stable
    /// storage.
    pub fn open(
        db: &sled::Db,
        tree: Tree,
        durable: &dyn Fn() -> Result<()>,
    ) -> Result<Arc<Journal>> {
        let records = db.open_tree(JOURNAL_TREE)?;
        let journal = Journal {
            tree,
            records,
            order: RwLock::new(()),
            seq: AtomicU64::new(0),
            failed: AtomicBool::new(false),
        };
        journal.recover(durable)?;
        Ok(Arc::new(journal))
    }

    /// The ledger tree (for reads).
    pub fn tree(&self) -> &Tree {
        &self.tree
    }

    fn order(&self, disjoint: bool) -> Order<'_> {
        if disjoint {
            Order::Shared(self.order.read().unwrap_or_else(|p| p.into_inner()))
        } else {
            Order::Exclusive(self.order.write().unwrap_or_else(|p| p.into_inner()))
        }
    }

    /// Refuses when a batch was left half-applied (see [`Journal::apply`]).
    pub fn check(&self) -> Result<()> {
        if self.failed.load(Ordering::SeqCst) {
            return Err(LedgerError::Interrupted(
                "a write of the batch failed".into(),
            ));
        }
        Ok(())
    }

    /// Runs one single-key operation on the ledger tree, in order with
    /// every other write.
    pub fn single<R>(&self, op: impl FnOnce(&Tree) -> sled::Result<R>) -> Result<R> {
        self.single_ordered(false, op)
    }

    /// One single-key operation under the ordering lock, shared or not.
    fn single_ordered<R>(
        &self,
        disjoint: bool,
        op: impl FnOnce(&Tree) -> sled::Result<R>,
    ) -> Result<R> {
        let _order = self.order(disjoint);
        self.check()?;
        Ok(op(&self.tree)?)
    }

    /// Applies `ops` to the ledger tree all-or-nothing (across crashes),
    /// after every write before it and before every write after it.
    /// Not durable until the database is flushed. `point`: a crash point
    /// ([`crate::crash`]) that, when armed, flushes the record and all but
    /// the last two writes and aborts.
    pub fn apply(&self, ops: Vec<Op>, point: Option<&str>) -> Result<()> {
        self.apply_ordered(ops, point, false)
    }

    /// As [`Journal::apply`], for a batch whose keys no other batch writes
    /// while it runs (a lane's commit, an append of fresh offsets; see the
    /// module docs): it runs beside other such batches.
    pub fn apply_disjoint(&self, ops: Vec<Op>, point: Option<&str>) -> Result<()> {
        self.apply_ordered(ops, point, true)
    }

    fn apply_ordered(&self, ops: Vec<Op>, point: Option<&str>, disjoint: bool) -> Result<()> {
        match ops.len() {
            0 => return Ok(()),
            1 => {
                return self.single_ordered(disjoint, |t| {
                    ops.into_iter().try_for_each(|op| apply_op(t, op))
                })
            }
            _ => {}
        }
        let record = encode(&ops);
        let chunks: Vec<&[u8]> = record.chunks(CHUNK).collect();
        let count = u32::try_from(chunks.len())
            .map_err(|_| LedgerError::Encode("batch too large for the journal".into()))?;
        let order = self.order(disjoint);
        self.check()?;
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let result = self.write_batch(seq, &chunks, count, ops, point);
        if result.is_err() {
            self.failed.store(true, Ordering::SeqCst);
        }
        drop(order);
        result
    }

    /// Steps 1–3 of a batch (under the ordering lock, shared or not).
    fn write_batch(
        &self,
        seq: u64,
        chunks: &[&[u8]],
        count: u32,
        ops: Vec<Op>,
        point: Option<&str>,
    ) -> Result<()> {
        for (i, chunk) in chunks.iter().enumerate() {
            let mut value = Vec::with_capacity(4 + chunk.len());
            value.extend_from_slice(&count.to_be_bytes());
            value.extend_from_slice(chunk);
            self.records.insert(record_key(seq, i as u32), value)?;
        }
        // Where an armed `point` stops: before the last two writes (for a
        // lane batch: its last idempotency segment and the cursor, which is
        // what makes the loss of the rest visible).
        let stop = ops.len().saturating_sub(2).max(1);
        for (i, op) in ops.into_iter().enumerate() {
            apply_op(&self.tree, op)?;
            if let (true, Some(point)) = (i + 1 == stop, point) {
                crate::crash::point_then(point, || {
                    let _ = self.tree.flush();
                });
            }
        }
        for i in 0..count {
            self.records.remove(record_key(seq, i))?;
        }
        Ok(())
    }

    /// Finishes the batches whose records survived a crash, then removes
    /// every record.
    fn recover(&self, durable: &dyn Fn() -> Result<()>) -> Result<()> {
        // seq -> (announced chunk count, chunks by index)
        let mut found: BTreeMap<u64, (u32, BTreeMap<u32, IVec>)> = BTreeMap::new();
        let mut keys = Vec::new();
        for entry in self.records.iter() {
            let (k, v) = entry?;
            let (seq, index) = parse_record_key(&k)
                .ok_or_else(|| LedgerError::Corrupt("journal record key".into()))?;
            let count = v
                .get(..4)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map(u32::from_be_bytes)
                .ok_or_else(|| LedgerError::Corrupt("journal record chunk".into()))?;
            found
                .entry(seq)
                .or_insert_with(|| (count, BTreeMap::new()))
                .1
                .insert(index, v);
            keys.push(k);
        }
        if keys.is_empty() {
            return Ok(());
        }
        let (mut finished, mut incomplete) = (0usize, 0usize);
        for (seq, (count, chunks)) in found {
            let complete = chunks.len() == count as usize && chunks.keys().copied().eq(0..count);
            if !complete {
                // Torn while being written: none of its writes survived.
                incomplete += 1;
                continue;
            }
            let mut record = Vec::new();
            for chunk in chunks.values() {
                record.extend_from_slice(&chunk[4..]);
            }
            let ops = decode(&record)
                .ok_or_else(|| LedgerError::Corrupt(format!("journal record {seq}")))?;
            for op in ops {
                apply_op(&self.tree, op)?;
            }
            finished += 1;
        }
        durable()?;
        for k in keys {
            self.records.remove(k)?;
        }
        durable()?;
        tracing::info!(
            finished,
            incomplete,
            "ledger: finished the batch a crash interrupted (journal)"
        );
        Ok(())
    }

    /// Journal records present (0 except while a batch is being applied).
    #[cfg(test)]
    pub fn pending(&self) -> usize {
        self.records.len()
    }
}

/// A held ordering lock (the guard is only held, never read).
enum Order<'a> {
    Exclusive(#[allow(dead_code)] RwLockWriteGuard<'a, ()>),
    Shared(#[allow(dead_code)] RwLockReadGuard<'a, ()>),
}

fn apply_op(tree: &Tree, (key, value): Op) -> sled::Result<()> {
    match value {
        Some(v) => tree.insert(key, v)?,
        None => tree.remove(key)?,
    };
    Ok(())
}

fn record_key(seq: u64, index: u32) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&seq.to_be_bytes());
    k[8..].copy_from_slice(&index.to_be_bytes());
    k
}

fn parse_record_key(k: &[u8]) -> Option<(u64, u32)> {
    let seq = u64::from_be_bytes(k.get(..8)?.try_into().ok()?);
    let index = u32::from_be_bytes(k.get(8..12)?.try_into().ok()?);
    (k.len() == 12).then_some((seq, index))
}

/// `[tag: 0 remove | 1 insert][key len u32][key]([value len u32][value])`…
fn encode(ops: &[Op]) -> Vec<u8> {
    let size: usize = ops
        .iter()
        .map(|(k, v)| 9 + k.len() + v.as_ref().map_or(0, |v| v.len()))
        .sum();
    let mut out = Vec::with_capacity(size);
    for (k, v) in ops {
        out.push(u8::from(v.is_some()));
        out.extend_from_slice(&(k.len() as u32).to_be_bytes());
        out.extend_from_slice(k);
        if let Some(v) = v {
            out.extend_from_slice(&(v.len() as u32).to_be_bytes());
            out.extend_from_slice(v);
        }
    }
    out
}

fn decode(mut bytes: &[u8]) -> Option<Vec<Op>> {
    fn take<'a>(bytes: &mut &'a [u8]) -> Option<&'a [u8]> {
        let len = u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
        let out = bytes.get(4..4 + len)?;
        *bytes = &bytes[4 + len..];
        Some(out)
    }
    let mut ops = Vec::new();
    while let Some((&tag, rest)) = bytes.split_first() {
        bytes = rest;
        let key = IVec::from(take(&mut bytes)?);
        let value = match tag {
            0 => None,
            1 => Some(IVec::from(take(&mut bytes)?)),
            _ => return None,
        };
        ops.push((key, value));
    }
    Some(ops)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(k: &str, v: Option<&str>) -> Op {
        (
            IVec::from(k.as_bytes()),
            v.map(|v| IVec::from(v.as_bytes())),
        )
    }

    #[test]
    fn records_round_trip() {
        let ops = vec![op("a", Some("1")), op("b", None), op("", Some(""))];
        assert_eq!(decode(&encode(&ops)), Some(ops));
        assert_eq!(decode(&[]), Some(vec![]));
        // Truncated or unknown tags are refused, not misread.
        let bytes = encode(&[op("key", Some("value"))]);
        assert_eq!(decode(&bytes[..bytes.len() - 1]), None);
        assert_eq!(decode(&[7, 0, 0, 0, 0]), None);
        assert_eq!(parse_record_key(&record_key(9, 3)), Some((9, 3)));
        assert_eq!(parse_record_key(&[0; 11]), None);
    }

    fn fresh() -> (sled::Db, Tree) {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let tree = db.open_tree("t").unwrap();
        (db, tree)
    }

    #[test]
    fn a_batch_is_applied_and_leaves_no_record() {
        let (db, tree) = fresh();
        let j = Journal::open(&db, tree.clone(), &|| Ok(())).unwrap();
        tree.insert("gone", "x").unwrap();
        let big = "v".repeat(3 * CHUNK);
        let ops = vec![op("a", Some("1")), op("gone", None), op("big", Some(&big))];
        j.apply(ops, None).unwrap();
        assert_eq!(tree.get("a").unwrap().as_deref(), Some(&b"1"[..]));
        assert_eq!(tree.get("gone").unwrap(), None);
        assert_eq!(tree.get("big").unwrap().map(|v| v.len()), Some(big.len()));
        assert_eq!(j.pending(), 0);
    }

    /// Writes the record of `ops` (its first `chunks` chunks) as a crash
    /// after step 1 would leave it.
    fn leave_record(db: &sled::Db, seq: u64, ops: &[Op], chunks: usize) {
        let records = db.open_tree(JOURNAL_TREE).unwrap();
        let record = encode(ops);
        let all: Vec<&[u8]> = record.chunks(CHUNK).collect();
        for (i, c) in all.iter().enumerate().take(chunks) {
            let mut v = (all.len() as u32).to_be_bytes().to_vec();
            v.extend_from_slice(c);
            records.insert(record_key(seq, i as u32), v).unwrap();
        }
    }

    #[test]
    fn a_complete_record_is_finished_on_open_and_a_torn_one_dropped() {
        let (db, tree) = fresh();
        // Batch 0 was half applied when the crash came.
        tree.insert("a", "1").unwrap();
        leave_record(
            &db,
            0,
            &[op("a", Some("1")), op("b", Some("2")), op("c", None)],
            1,
        );
        tree.insert("c", "old").unwrap();
        // Batch 1's record was torn: two of its three chunks.
        let big = "w".repeat(2 * CHUNK + 1);
        leave_record(&db, 1, &[op("d", Some(&big)), op("e", Some("5"))], 2);

        let flushes = std::cell::Cell::new(0);
        let j = Journal::open(&db, tree.clone(), &|| {
            flushes.set(flushes.get() + 1);
            Ok(())
        })
        .unwrap();
        assert_eq!(tree.get("b").unwrap().as_deref(), Some(&b"2"[..]));
        assert_eq!(tree.get("c").unwrap(), None);
        assert_eq!(tree.get("d").unwrap(), None);
        assert_eq!(tree.get("e").unwrap(), None);
        assert_eq!(j.pending(), 0);
        // Finished writes are durable before the records go, and the
        // removal is durable too.
        assert_eq!(flushes.get(), 2);
    }

    #[test]
    fn disjoint_batches_interleave_but_never_around_an_exclusive_write() {
        let (db, tree) = fresh();
        let j = Journal::open(&db, tree.clone(), &|| Ok(())).unwrap();
        let (threads, batches) = (4, 300);
        let exclusive_saw_a_record = AtomicBool::new(false);
        std::thread::scope(|s| {
            for t in 0..threads {
                let j = &j;
                s.spawn(move || {
                    for i in 0..batches {
                        let k = |part: &str| format!("t{t}/{i}/{part}");
                        let ops = vec![op(&k("a"), Some("1")), op(&k("b"), Some("2"))];
                        j.apply_disjoint(ops, None).unwrap();
                    }
                });
            }
            // An exclusive write runs while no disjoint batch is between
            // its record and the record's removal.
            for i in 0..batches {
                j.single(|t| {
                    if !j.records.is_empty() {
                        exclusive_saw_a_record.store(true, Ordering::SeqCst);
                    }
                    t.insert(format!("x/{i}"), "x").map(|_| ())
                })
                .unwrap();
                j.apply(vec![op(&format!("y/{i}"), Some("y")), op("z", None)], None)
                    .unwrap();
            }
        });
        assert!(!exclusive_saw_a_record.load(Ordering::SeqCst));
        assert_eq!(tree.len(), threads * batches * 2 + 2 * batches);
        assert_eq!(j.pending(), 0);
    }

    #[test]
    fn complete_records_of_disjoint_batches_are_all_finished_on_open() {
        let (db, tree) = fresh();
        // Two lanes' batches were both between their steps 1 and 3.
        leave_record(
            &db,
            4,
            &[op("lane0/a", Some("1")), op("lane0/b", Some("2"))],
            1,
        );
        tree.insert("lane1/a", "1").unwrap();
        leave_record(&db, 5, &[op("lane1/a", Some("1")), op("lane1/b", None)], 1);
        tree.insert("lane1/b", "old").unwrap();
        let j = Journal::open(&db, tree.clone(), &|| Ok(())).unwrap();
        let get = |k: &str| tree.get(k).unwrap().map(|v| v.to_vec());
        assert_eq!(get("lane0/a"), Some(b"1".to_vec()));
        assert_eq!(get("lane0/b"), Some(b"2".to_vec()));
        assert_eq!(get("lane1/a"), Some(b"1".to_vec()));
        assert_eq!(get("lane1/b"), None);
        assert_eq!(j.pending(), 0);
    }

    #[test]
    fn after_a_batch_failed_half_way_every_write_and_check_is_refused() {
        let (db, tree) = fresh();
        let j = Journal::open(&db, tree.clone(), &|| Ok(())).unwrap();
        assert!(j.check().is_ok());
        // What a failed write inside `write_batch` leaves behind.
        j.failed.store(true, Ordering::SeqCst);
        let refused = |r: Result<()>| matches!(r, Err(LedgerError::Interrupted(_)));
        assert!(refused(j.check()));
        assert!(refused(j.single(|t| t.insert("a", "1").map(|_| ()))));
        assert!(refused(
            j.apply(vec![op("b", Some("2")), op("c", None)], None)
        ));
        assert!(refused(j.apply(vec![op("d", Some("4"))], None)));
        assert_eq!(tree.len(), 0);
    }

    #[test]
    fn a_corrupt_complete_record_refuses_the_open() {
        let (db, tree) = fresh();
        let records = db.open_tree(JOURNAL_TREE).unwrap();
        records
            .insert(record_key(0, 0), &[0, 0, 0, 1, 9, 9][..])
            .unwrap();
        let err = Journal::open(&db, tree, &|| Ok(())).err().unwrap();
        assert!(err.to_string().contains("journal record 0"), "{err}");
    }
}
