//! Per-handler counters shown by status and metrics.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one handler since the host started (plus what the ledger
/// reports on top: lag and dead-letter totals are read from it).
#[derive(Debug, Default)]
pub struct HandlerStats {
    /// Messages whose effects were committed.
    pub processed: AtomicU64,
    /// Messages skipped because their idempotency key was already committed.
    pub duplicates: AtomicU64,
    /// Duplicates whose payload differed from the committed one.
    pub conflicts: AtomicU64,
    /// Messages dead-lettered.
    pub dead_lettered: AtomicU64,
    /// Failed attempts that were retried.
    pub retries: AtomicU64,
    /// Batches committed.
    pub batches: AtomicU64,
}

/// What one batch did, added to [`HandlerStats`] once it is durable.
#[derive(Debug, Default, Clone, Copy)]
pub struct BatchCounts {
    /// See [`HandlerStats::processed`].
    pub processed: u64,
    /// See [`HandlerStats::duplicates`].
    pub duplicates: u64,
    /// See [`HandlerStats::conflicts`].
    pub conflicts: u64,
    /// See [`HandlerStats::dead_lettered`].
    pub dead_lettered: u64,
    /// See [`HandlerStats::retries`].
    pub retries: u64,
}

impl HandlerStats {
    /// Adds a durable batch's counts.
    pub fn add(&self, c: &BatchCounts) {
        self.processed.fetch_add(c.processed, Ordering::Relaxed);
        self.duplicates.fetch_add(c.duplicates, Ordering::Relaxed);
        self.conflicts.fetch_add(c.conflicts, Ordering::Relaxed);
        self.dead_lettered
            .fetch_add(c.dead_lettered, Ordering::Relaxed);
        self.retries.fetch_add(c.retries, Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
    }
}
