//! An in-memory Bloom filter over every idempotency key in the ledger, so
//! that the common case — a message never seen before — is answered without
//! a ledger read.
//!
//! Why: a sled read walks the tree (and, while sled's atomic batches were
//! used, took a process-wide lock a committing batch held exclusively);
//! with many lanes the per-message idempotency lookup was the main place
//! lanes queued behind each other (measured: BENCHMARKS.md). A negative
//! answer from the filter is exact; a positive one (a duplicate, or about
//! 0.1 % false positives) falls through to the ledger.
//!
//! Architecture invariant: every idempotency key written to the ledger is
//! inserted here before the write is applied (by [`super::Ledger::commit`]
//! and the import), and the filter answers "absent" only once it has been
//! filled with every key already in the ledger. A write that bypassed the
//! filter would make a duplicate look new.
//!
//! Filling means a scan of every idempotency record (15 s at 10^7 keys on
//! the benchmark machine), so the ledger fills it on a background thread
//! after it opens; until [`KeyFilter::mark_filled`] every key "may" be
//! present and lookups read the ledger, as they would without a filter.
//!
//! The filter grows by adding layers of twice the previous capacity; keys
//! removed from the ledger (retention) stay in the filter until the next
//! start, which only costs a ledger read for them.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::RwLock;

/// Filter bits per key at a layer's capacity (≈ 0.1 % false positives with
/// power-of-two rounding up, at most ≈ 0.8 %).
const BITS_PER_KEY: usize = 10;
/// Bit positions per key.
const HASHES: u64 = 7;
/// Capacity of the first layer.
const FIRST_CAPACITY: usize = 1 << 20;

struct Layer {
    bits: Box<[AtomicU64]>,
    mask: u64,
    capacity: usize,
    len: AtomicUsize,
}

impl Layer {
    fn new(capacity: usize) -> Layer {
        let nbits = (capacity * BITS_PER_KEY).next_power_of_two().max(64);
        Layer {
            bits: (0..nbits / 64).map(|_| AtomicU64::new(0)).collect(),
            mask: nbits as u64 - 1,
            capacity,
            len: AtomicUsize::new(0),
        }
    }

    fn positions(&self, (h1, h2): (u64, u64)) -> impl Iterator<Item = (usize, u64)> + '_ {
        (0..HASHES).map(move |i| {
            let bit = h1.wrapping_add(i.wrapping_mul(h2)) & self.mask;
            ((bit / 64) as usize, 1u64 << (bit % 64))
        })
    }

    fn insert(&self, h: (u64, u64)) {
        for (word, bit) in self.positions(h) {
            self.bits[word].fetch_or(bit, Ordering::Release);
        }
        self.len.fetch_add(1, Ordering::Relaxed);
    }

    fn contains(&self, h: (u64, u64)) -> bool {
        self.positions(h)
            .all(|(word, bit)| self.bits[word].load(Ordering::Acquire) & bit != 0)
    }
}

/// See the module docs. Shared by reference; all methods take `&self`.
pub(crate) struct KeyFilter {
    layers: RwLock<Vec<Layer>>,
    /// Every key of the ledger has been inserted (see the module docs).
    filled: AtomicBool,
}

/// Two 64-bit hashes of `key` (double hashing gives the bit positions).
fn hash(key: &[u8]) -> (u64, u64) {
    // Fixed keys: the filter lives in memory only, so stability across
    // builds does not matter, only speed and spread.
    let state =
        std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default();
    let mut a = state.build_hasher();
    a.write(key);
    let h1 = a.finish();
    let mut b = state.build_hasher();
    b.write_u64(h1 ^ 0x9e37_79b9_7f4a_7c15);
    b.write(key);
    (h1, b.finish() | 1)
}

impl KeyFilter {
    pub(crate) fn new() -> KeyFilter {
        KeyFilter {
            layers: RwLock::new(vec![Layer::new(FIRST_CAPACITY)]),
            filled: AtomicBool::new(false),
        }
    }

    /// Declares that every key already in the ledger has been inserted:
    /// from now on a negative answer is exact.
    pub(crate) fn mark_filled(&self) {
        self.filled.store(true, Ordering::Release);
    }

    /// Whether [`KeyFilter::mark_filled`] was called.
    pub(crate) fn is_filled(&self) -> bool {
        self.filled.load(Ordering::Acquire)
    }

    /// Records `key`.
    pub(crate) fn insert(&self, key: &[u8]) {
        let h = hash(key);
        let full = {
            let layers = self.layers.read().unwrap_or_else(|p| p.into_inner());
            let last = layers.last().expect("a filter has a layer");
            last.insert(h);
            last.len.load(Ordering::Relaxed) >= last.capacity
        };
        if full {
            let mut layers = self.layers.write().unwrap_or_else(|p| p.into_inner());
            let last = layers.last().expect("a filter has a layer");
            if last.len.load(Ordering::Relaxed) >= last.capacity {
                let capacity = last.capacity * 2;
                layers.push(Layer::new(capacity));
            }
        }
    }

    /// `false` only if `key` was never inserted and the filter is filled.
    pub(crate) fn may_contain(&self, key: &[u8]) -> bool {
        if !self.is_filled() {
            return true;
        }
        let h = hash(key);
        let layers = self.layers.read().unwrap_or_else(|p| p.into_inner());
        layers.iter().any(|l| l.contains(h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_forgets_a_key_across_growth() {
        let f = KeyFilter::new();
        f.mark_filled();
        let n = FIRST_CAPACITY * 3 + 17; // forces two more layers
        for i in 0..n {
            f.insert(format!("handler/order-{i}").as_bytes());
        }
        assert!(f.layers.read().unwrap().len() >= 3, "the filter grew");
        for i in 0..n {
            assert!(
                f.may_contain(format!("handler/order-{i}").as_bytes()),
                "key {i} forgotten"
            );
        }
    }

    #[test]
    fn false_positives_are_rare() {
        let f = KeyFilter::new();
        f.mark_filled();
        for i in 0..FIRST_CAPACITY {
            f.insert(format!("k-{i}").as_bytes());
        }
        let probes = 200_000;
        let fp = (0..probes)
            .filter(|i| f.may_contain(format!("other-{i}").as_bytes()))
            .count();
        let rate = fp as f64 / probes as f64;
        assert!(rate < 0.01, "false-positive rate {rate}");
    }

    #[test]
    fn says_maybe_until_filled() {
        let f = KeyFilter::new();
        f.insert(b"seen");
        assert!(
            f.may_contain(b"never-seen"),
            "unfilled: everything may be there"
        );
        f.mark_filled();
        assert!(f.may_contain(b"seen"));
        assert!(!f.may_contain(b"never-seen"));
    }
}
