//! Per-handler counters shown by status and metrics.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Counters of one handler since the host started (plus what the
        /// ledger reports on top: lag, dead-letter and parked-key totals are
        /// read from it).
        #[derive(Debug, Default)]
        pub struct HandlerStats {
            $($(#[$doc])* pub $name: AtomicU64,)*
            /// Batches committed.
            pub batches: AtomicU64,
        }

        /// What one batch did, added to [`HandlerStats`] once it is durable.
        #[derive(Debug, Default, Clone, Copy)]
        pub struct BatchCounts {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl HandlerStats {
            /// Adds a durable batch's counts.
            pub fn add(&self, c: &BatchCounts) {
                $(self.$name.fetch_add(c.$name, Ordering::Relaxed);)*
                self.batches.fetch_add(1, Ordering::Relaxed);
            }
        }
    };
}

counters! {
    /// Messages whose effects were committed (replays included).
    processed,
    /// Messages skipped because their idempotency key was already recorded.
    duplicates,
    /// Duplicates whose payload differed from the recorded one.
    conflicts,
    /// Messages dead-lettered (by failure, not held).
    dead_lettered,
    /// Messages held in the dead-letter queue because their key is parked.
    held,
    /// Failed attempts that will be retried.
    retries,
    /// Invocations the host could not start and retried at once.
    host_retries,
    /// Dead letters replayed successfully.
    replayed,
    /// Dead letters dropped by an operator.
    dropped,
}

/// How far one lane (handler, partition) has got, as offsets of its
/// partition: every message before `applied` is applied to the ledger (its
/// effects readable, not yet known durable: a crash may still undo it, and
/// the message is then delivered again); every message before `committed`
/// is durable and counted. `committed <= applied`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LanePosition {
    /// The next offset the lane will apply.
    pub applied: u64,
    /// The next offset whose batch is not known durable yet.
    pub committed: u64,
}
