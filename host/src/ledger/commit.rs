//! Group commit: many writers, one flush.
//!
//! Writers apply their transaction (which is fast: it only touches sled's
//! in-memory pages) and get a ticket; a single flusher thread repeatedly
//! takes the highest ticket issued, flushes, and publishes "durable up to
//! ticket". A writer awaits its ticket before it acknowledges anything.
//!
//! Architecture invariant: nothing is reported durable before a flush that
//! started after the write returned. Tickets are issued after the write is
//! applied, and the flusher reads the highest ticket before it flushes.
//!
//! Architecture invariant: after a failed flush (or a batch left
//! half-applied, [`LedgerError::Interrupted`]) the committer is failed for
//! good: every waiter, now and later, gets an error; the host stops
//! acknowledging and must be restarted (recovery replays from the ledger).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::watch;

use super::{CommitBatch, Envelope, LedgerError, Storage};

struct Inner {
    storage: Arc<dyn Storage>,
    issued: AtomicU64,
    wake: (Mutex<()>, Condvar),
    /// `Ok(durable ticket)` or `Err(why the flush failed)`.
    durable: watch::Sender<Result<u64, String>>,
    flushes: AtomicU64,
    commit_seconds: Histogram,
    flush_seconds: Histogram,
}

/// Shared handle; cheap to clone.
#[derive(Clone)]
pub struct GroupCommitter {
    inner: Arc<Inner>,
}

impl GroupCommitter {
    /// Starts the flusher thread for `storage` (usually the [`super::Ledger`]).
    pub fn start(storage: Arc<dyn Storage>) -> Self {
        let inner = Arc::new(Inner {
            storage,
            issued: AtomicU64::new(0),
            wake: (Mutex::new(()), Condvar::new()),
            durable: watch::Sender::new(Ok(0)),
            flushes: AtomicU64::new(0),
            commit_seconds: crate::metrics::seconds_histogram(),
            flush_seconds: crate::metrics::seconds_histogram(),
        });
        let weak = Arc::downgrade(&inner);
        let spawned = std::thread::Builder::new()
            .name("ordo-flusher".into())
            .spawn(move || flusher(weak));
        if let Err(e) = spawned {
            let _ = inner
                .durable
                .send_replace(Err(format!("cannot start flusher thread: {e}")));
        }
        GroupCommitter { inner }
    }

    fn issue(&self) -> u64 {
        let ticket = self.inner.issued.fetch_add(1, Ordering::SeqCst) + 1;
        let (lock, cv) = &self.inner.wake;
        let _g = lock.lock().unwrap_or_else(|p| p.into_inner());
        cv.notify_one();
        ticket
    }

    /// Applies `batch` as one transaction and returns the ticket to await.
    pub fn commit(&self, batch: &CommitBatch) -> Result<u64, LedgerError> {
        self.commit_all(&[batch])
    }

    /// Applies several lanes' batches as ONE transaction and returns the
    /// ticket to await.
    pub fn commit_all(&self, batches: &[&CommitBatch]) -> Result<u64, LedgerError> {
        self.check()?;
        let start = std::time::Instant::now();
        self.inner
            .storage
            .commit(batches)
            .inspect_err(|e| self.fail_if_interrupted(e))?;
        self.inner
            .commit_seconds
            .observe(start.elapsed().as_secs_f64());
        crate::crash::point("after-commit-before-flush");
        Ok(self.issue())
    }

    /// Appends messages to the embedded log and returns their offsets and
    /// the ticket to await.
    pub fn append(
        &self,
        topic: &str,
        items: &[(u32, Envelope)],
    ) -> Result<(Vec<u64>, u64), LedgerError> {
        self.check()?;
        let offsets = self
            .inner
            .storage
            .append(topic, items)
            .inspect_err(|e| self.fail_if_interrupted(e))?;
        crate::crash::point("after-append-before-flush");
        Ok((offsets, self.issue()))
    }

    /// A batch left half-applied fails the committer for good, as a failed
    /// flush does (nothing applied after it may be acknowledged).
    fn fail_if_interrupted(&self, e: &LedgerError) {
        if let LedgerError::Interrupted(_) = e {
            tracing::error!(error = %e, "ledger write FAILED half-way: no further writes will be acknowledged; restart the host");
            let _ = self.inner.durable.send_replace(Err(e.to_string()));
        }
    }

    fn check(&self) -> Result<(), LedgerError> {
        match &*self.inner.durable.borrow() {
            Ok(_) => Ok(()),
            Err(e) => Err(LedgerError::NotDurable(e.clone())),
        }
    }

    /// Waits until `ticket` is durable.
    pub async fn wait_durable(&self, ticket: u64) -> Result<(), LedgerError> {
        let mut rx = self.inner.durable.subscribe();
        let result = rx
            .wait_for(|d| match d {
                Ok(t) => *t >= ticket,
                Err(_) => true,
            })
            .await;
        match result {
            Ok(guard) => match &*guard {
                Ok(_) => Ok(()),
                Err(e) => Err(LedgerError::NotDurable(e.clone())),
            },
            Err(_) => Err(LedgerError::NotDurable("committer stopped".into())),
        }
    }

    /// Waits until everything applied before this call is durable.
    pub async fn barrier(&self) -> Result<(), LedgerError> {
        self.check()?;
        let ticket = self.issue();
        self.wait_durable(ticket).await
    }

    /// Whether a flush has failed (the committer no longer accepts writes).
    pub fn failed(&self) -> bool {
        self.inner.durable.borrow().is_err()
    }

    /// Flushes performed so far.
    pub fn flushes(&self) -> u64 {
        self.inner.flushes.load(Ordering::Relaxed)
    }

    /// Time to apply one transaction (a worker's lane batches; before its
    /// flush).
    pub fn commit_seconds(&self) -> Histogram {
        self.inner.commit_seconds.clone()
    }

    /// Time of one group flush.
    pub fn flush_seconds(&self) -> Histogram {
        self.inner.flush_seconds.clone()
    }

    /// Tickets issued so far (commits + appends).
    pub fn commits(&self) -> u64 {
        self.inner.issued.load(Ordering::Relaxed)
    }
}

fn flusher(weak: Weak<Inner>) {
    let mut durable = 0u64;
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let target = inner.issued.load(Ordering::SeqCst);
        if target == durable {
            let (lock, cv) = &inner.wake;
            let guard = lock.lock().unwrap_or_else(|p| p.into_inner());
            if inner.issued.load(Ordering::SeqCst) == durable {
                let _ = cv.wait_timeout(guard, Duration::from_millis(50));
            }
            continue;
        }
        let start = std::time::Instant::now();
        match inner.storage.flush() {
            Ok(()) => {
                inner.flush_seconds.observe(start.elapsed().as_secs_f64());
                crate::crash::point("after-flush-before-ack");
                durable = target;
                inner.flushes.fetch_add(1, Ordering::Relaxed);
                let _ = inner.durable.send_replace(Ok(target));
            }
            Err(e) => {
                tracing::error!(error = %e, "ledger flush FAILED: no further writes will be acknowledged; restart the host");
                let _ = inner.durable.send_replace(Err(e.to_string()));
                return;
            }
        }
    }
}
