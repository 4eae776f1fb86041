//! Key spaces: the ledger's record kinds (`log`, `state`, `dedup`, …) as
//! disjoint ranges of ONE sled tree, each under its own leading byte.
//!
//! A [`Space`] offers the part of sled's tree API the ledger uses, with keys
//! given and returned WITHOUT the leading byte, so the encodings in
//! [`super::keys`] are unchanged. Every write goes through the
//! [`Journal`], which orders them and makes a [`Writes`] batch atomic.

use std::ops::Bound;
use std::sync::Arc;

use sled::{IVec, Tree};

use super::journal::{Journal, Op};

/// One record kind's range of the ledger tree.
#[derive(Clone)]
pub struct Space {
    journal: Arc<Journal>,
    prefix: u8,
}

/// A sled result of one (key, value) pair, key without the space byte.
pub type Entry = sled::Result<(IVec, IVec)>;

impl Space {
    /// The space of the journal's tree under leading byte `prefix` (< 255).
    pub fn new(journal: Arc<Journal>, prefix: u8) -> Space {
        debug_assert!(prefix < u8::MAX);
        Space { journal, prefix }
    }

    fn tree(&self) -> &Tree {
        self.journal.tree()
    }

    /// `key` with this space's leading byte.
    pub fn key(&self, key: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(key.len() + 1);
        out.push(self.prefix);
        out.extend_from_slice(key);
        out
    }

    fn strip(entry: sled::Result<(IVec, IVec)>) -> Entry {
        entry.map(|(k, v)| (IVec::from(&k[1..]), v))
    }

    /// One value.
    pub fn get(&self, key: impl AsRef<[u8]>) -> sled::Result<Option<IVec>> {
        self.tree().get(self.key(key.as_ref()))
    }

    /// Writes one value (atomic on its own; not durable until flushed).
    pub fn insert(&self, key: impl AsRef<[u8]>, value: impl Into<IVec>) -> super::Result<()> {
        let key = self.key(key.as_ref());
        self.journal.single(|t| t.insert(key, value))?;
        Ok(())
    }

    /// Removes one value.
    pub fn remove(&self, key: impl AsRef<[u8]>) -> super::Result<()> {
        let key = self.key(key.as_ref());
        self.journal.single(|t| t.remove(key))?;
        Ok(())
    }

    /// Writes `value` only if `key` holds nothing; whether it did.
    pub fn insert_if_absent(
        &self,
        key: impl AsRef<[u8]>,
        value: impl Into<IVec>,
    ) -> super::Result<bool> {
        let key = self.key(key.as_ref());
        let swapped = self
            .journal
            .single(|t| t.compare_and_swap(key, None as Option<&[u8]>, Some(value)))?;
        Ok(swapped.is_ok())
    }

    /// Every entry whose key starts with `prefix`, in key order.
    pub fn scan_prefix(&self, prefix: &[u8]) -> impl DoubleEndedIterator<Item = Entry> {
        self.tree().scan_prefix(self.key(prefix)).map(Self::strip)
    }

    /// Every entry of the space, in key order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = Entry> {
        self.scan_prefix(&[])
    }

    /// Entries with keys in `start..end` (`end` = `None`: to the end of
    /// the space), in key order.
    pub fn range(
        &self,
        start: Bound<&[u8]>,
        end: Option<Bound<&[u8]>>,
    ) -> impl DoubleEndedIterator<Item = Entry> {
        let map = |b: Bound<&[u8]>| match b {
            Bound::Included(k) => Bound::Included(self.key(k)),
            Bound::Excluded(k) => Bound::Excluded(self.key(k)),
            Bound::Unbounded => Bound::Included(vec![self.prefix]),
        };
        let end = match end {
            Some(b) => map(b),
            None => Bound::Excluded(vec![self.prefix + 1]),
        };
        self.tree().range((map(start), end)).map(Self::strip)
    }

    /// Number of entries (a scan).
    pub fn len(&self) -> usize {
        self.iter().count()
    }
}

/// Writes to one or several spaces of one tree, applied all-or-nothing by
/// [`Writes::apply`].
#[derive(Default)]
pub struct Writes {
    ops: Vec<Op>,
    crash_point: Option<&'static str>,
    disjoint: bool,
}

impl Writes {
    /// Adds a write of `key` in `space`.
    pub fn insert(&mut self, space: &Space, key: &[u8], value: impl Into<IVec>) {
        self.ops.push((space.key(key).into(), Some(value.into())));
    }

    /// Adds a removal of `key` in `space`.
    pub fn remove(&mut self, space: &Space, key: &[u8]) {
        self.ops.push((space.key(key).into(), None));
    }

    /// Adds a write (`Some`) or removal (`None`) of `key` in `space`.
    pub fn put(&mut self, space: &Space, key: &[u8], value: Option<&[u8]>) {
        match value {
            Some(v) => self.insert(space, key, v),
            None => self.remove(space, key),
        }
    }

    /// Number of writes added.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Names the crash point that, when armed, leaves this batch half
    /// applied on disk (see [`Journal::apply`]).
    pub fn crash_point(&mut self, name: &'static str) {
        self.crash_point = Some(name);
    }

    /// Declares that no other batch writes any of these keys while this
    /// one is applied (a lane's own partition, fresh offsets or sequence
    /// numbers), so it may be applied beside other such batches
    /// ([`Journal::apply_disjoint`]) rather than after every other write.
    pub fn disjoint(&mut self) {
        self.disjoint = true;
    }

    /// Applies every write, all-or-nothing across crashes (see
    /// [`Journal`]). Not durable until flushed.
    pub fn apply(self, journal: &Journal) -> super::Result<()> {
        if self.disjoint {
            journal.apply_disjoint(self.ops, self.crash_point)
        } else {
            journal.apply(self.ops, self.crash_point)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spaces_are_disjoint_and_keys_come_back_without_their_byte() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let tree = db.open_tree("t").unwrap();
        let journal = Journal::open(&db, tree, &|| Ok(())).unwrap();
        let (a, b, c) = (
            Space::new(journal.clone(), 1),
            Space::new(journal.clone(), 2),
            Space::new(journal.clone(), 3),
        );
        let mut w = Writes::default();
        for k in [&b"x"[..], b"y", b"z"] {
            w.insert(&a, k, b"a".to_vec());
            w.insert(&b, k, b"b".to_vec());
            w.insert(&c, k, b"c".to_vec());
        }
        w.remove(&b, b"z");
        assert_eq!(w.len(), 10);
        w.apply(&journal).unwrap();

        let keys = |it: &mut dyn Iterator<Item = Entry>| -> Vec<Vec<u8>> {
            it.map(|e| e.unwrap().0.to_vec()).collect()
        };
        assert_eq!(keys(&mut b.iter()), vec![b"x".to_vec(), b"y".to_vec()]);
        assert_eq!(b.len(), 2);
        assert_eq!(b.get(b"x").unwrap().as_deref(), Some(&b"b"[..]));
        assert_eq!(b.get(b"z").unwrap(), None);
        // Open-ended ranges stop at the end of the space.
        assert_eq!(
            keys(&mut b.range(Bound::Included(&b"y"[..]), None)),
            vec![b"y".to_vec()]
        );
        assert_eq!(
            keys(&mut a.range(Bound::Unbounded, Some(Bound::Excluded(&b"z"[..])))),
            vec![b"x".to_vec(), b"y".to_vec()]
        );
        assert_eq!(
            keys(&mut c.scan_prefix(b"").rev()),
            vec![b"z".to_vec(), b"y".to_vec(), b"x".to_vec()]
        );
        assert!(a.insert_if_absent(b"w", b"new".to_vec()).unwrap());
        assert!(!a.insert_if_absent(b"w", b"other".to_vec()).unwrap());
        assert_eq!(a.get(b"w").unwrap().as_deref(), Some(&b"new"[..]));
    }
}
