//! Batch workers: the threads that run lane batches and commit them.
//!
//! A lane is a serial, logical unit (one per handler and partition); its
//! blocking work — running the handler on a batch of messages and applying
//! the batch to the ledger — runs on a worker, one of a small pool (one
//! per core by default, `ordo serve --workers`), like Kafka Streams' stream
//! threads. Each lane is assigned one worker when it starts (round robin
//! across all handlers' lanes), so a lane's batches run in order on one
//! thread.
//!
//! A worker takes the jobs that are ready when it looks — at most one per
//! lane, as a lane waits for its batch before it builds the next — builds
//! each one's batch (the handler runs here) and applies them all as ONE
//! ledger transaction with one group-commit ticket. Under light load a
//! producer's request touches every partition with a few messages; with a
//! thread and a commit per lane, each of those small batches paid a thread
//! hand-off, a journal record, its own apply and a wake-up of its own
//! (BENCHMARKS.md, item 17). A job whose build fails or panics is answered
//! on its own and left out of the transaction; the others commit.
//!
//! Architecture invariant: the batches of one worker transaction are of
//! distinct lanes, so their writes are disjoint as every lane's are (see
//! `ledger::journal`); each lane still sees its batch applied before it
//! builds its next one.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;

use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

use super::lane::{BatchOutcome, Built};
use crate::ledger::{CommitBatch, GroupCommitter};

/// Most lane jobs a worker runs into one transaction.
const MAX_GROUP: usize = 16;

/// Builds one lane batch (runs the handler); the worker commits it.
type Build = Box<dyn FnOnce() -> anyhow::Result<Built> + Send>;

/// A job's answer: `Err` with the panic's message when its build panicked.
pub(super) type Answer = Result<anyhow::Result<BatchOutcome>, String>;

struct Job {
    build: Build,
    answer: tokio::sync::oneshot::Sender<Answer>,
}

/// The pool of batch workers, shared by every handler's lanes. Cheap to
/// clone; the threads end once every clone and every lane is gone.
#[derive(Clone)]
pub struct Workers {
    inner: Arc<Inner>,
}

struct Inner {
    queues: Vec<Sender<Job>>,
    next: AtomicUsize,
    /// Lane batches per transaction.
    grouped: Histogram,
}

/// One worker's queue, held by the lanes assigned to it.
#[derive(Clone)]
pub(super) struct Worker {
    jobs: Sender<Job>,
}

impl Workers {
    /// Stack of a worker thread: room for the guest's wasm stack (512 KiB by
    /// default) plus the host's frames around it.
    const STACK: usize = 4 << 20;

    /// The default worker count: one per core the process may use.
    pub fn default_count() -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }

    /// Starts `count` (at least one) worker threads committing through
    /// `committer`.
    pub fn start(count: usize, committer: GroupCommitter) -> std::io::Result<Self> {
        // 1 to 16 (MAX_GROUP) lane batches.
        let grouped = Histogram::new(exponential_buckets(1.0, 2.0, 5));
        let mut queues = Vec::new();
        for i in 0..count.max(1) {
            let (jobs, queue) = std::sync::mpsc::channel::<Job>();
            let (committer, grouped) = (committer.clone(), grouped.clone());
            std::thread::Builder::new()
                .name(format!("ordo-worker-{i}"))
                .stack_size(Self::STACK)
                .spawn(move || work(&queue, &committer, &grouped))?;
            queues.push(jobs);
        }
        Ok(Workers {
            inner: Arc::new(Inner {
                queues,
                next: AtomicUsize::new(0),
                grouped,
            }),
        })
    }

    /// Lane batches per ledger transaction (metric).
    pub fn batches_per_commit(&self) -> Histogram {
        self.inner.grouped.clone()
    }

    /// Number of worker threads.
    pub fn count(&self) -> usize {
        self.inner.queues.len()
    }

    /// The worker of a lane that is starting (round robin).
    pub(super) fn assign(&self) -> Worker {
        let queues = &self.inner.queues;
        let i = self.inner.next.fetch_add(1, Ordering::Relaxed) % queues.len();
        Worker {
            jobs: queues[i].clone(),
        }
    }
}

impl Worker {
    /// Builds a batch on the worker's thread and commits it (with whatever
    /// other lanes' batches are ready); the outcome carries the ticket.
    pub(super) async fn run(
        &self,
        build: impl FnOnce() -> anyhow::Result<Built> + Send + 'static,
    ) -> Answer {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let job = Job {
            build: Box::new(build),
            answer,
        };
        if self.jobs.send(job).is_err() {
            return Err("the lane's worker thread has ended".into());
        }
        answered
            .await
            .unwrap_or_else(|_| Err("the lane's worker thread has ended".into()))
    }
}

/// A worker thread: runs the ready jobs, commits them together, answers.
fn work(queue: &Receiver<Job>, committer: &GroupCommitter, grouped: &Histogram) {
    while let Ok(first) = queue.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let mut built = Vec::with_capacity(jobs.len());
        for job in jobs {
            match catch(job.build) {
                Ok(Ok(b)) => built.push((b, job.answer)),
                Ok(Err(e)) => {
                    let _ = job.answer.send(Ok(Err(e)));
                }
                Err(panic) => {
                    let _ = job.answer.send(Err(panic));
                }
            }
        }
        let batches: Vec<&CommitBatch> = built.iter().filter_map(|(b, _)| b.batch()).collect();
        let ticket = match batches.is_empty() {
            true => Ok(Ok(None)),
            false => {
                grouped.observe(batches.len() as f64);
                catch(|| committer.commit_all(&batches).map(Some))
            }
        };
        match ticket {
            Ok(Ok(ticket)) => {
                for (b, answer) in built {
                    let _ = answer.send(Ok(Ok(b.applied(ticket))));
                }
            }
            Ok(Err(e)) => {
                let why = e.to_string();
                for (_, answer) in built {
                    let _ = answer.send(Ok(Err(anyhow::anyhow!("commit failed: {why}"))));
                }
            }
            Err(panic) => {
                for (_, answer) in built {
                    let _ = answer.send(Err(panic.clone()));
                }
            }
        }
    }
}

/// Runs `f`, turning a panic into its message.
fn catch<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|panic| {
        panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".into())
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::Mutex;

    use super::*;
    use crate::ledger::{Envelope, Ledger, LedgerError, Storage};

    /// The ledger, recording how many batches each commit carried; commits
    /// fail while `refuse` is set.
    struct Counting {
        ledger: Ledger,
        commits: Mutex<Vec<usize>>,
        refuse: AtomicBool,
    }

    impl Storage for Counting {
        fn commit(&self, batches: &[&CommitBatch]) -> crate::ledger::Result<()> {
            if self.refuse.load(Ordering::SeqCst) {
                return Err(LedgerError::Corrupt("refused by the test".into()));
            }
            self.commits.lock().expect("lock").push(batches.len());
            self.ledger.commit_all(batches)
        }
        fn append(
            &self,
            topic: &str,
            items: &[(u32, Envelope)],
        ) -> crate::ledger::Result<Vec<u64>> {
            self.ledger.append_batch(topic, items)
        }
        fn flush(&self) -> crate::ledger::Result<()> {
            self.ledger.flush()
        }
    }

    fn setup(workers: usize) -> (tempfile::TempDir, Arc<Counting>, Workers) {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Arc::new(Counting {
            ledger: Ledger::open(dir.path()).expect("ledger"),
            commits: Mutex::new(Vec::new()),
            refuse: AtomicBool::new(false),
        });
        let committer = GroupCommitter::start(storage.clone());
        let pool = Workers::start(workers, committer).expect("workers");
        (dir, storage, pool)
    }

    /// A batch that moves partition `p`'s cursor of handler `h` to `next`.
    fn cursor(p: u32, next: u64) -> Built {
        Built::of(CommitBatch {
            cursors: vec![("h".into(), "log".into(), p, next)],
            ..CommitBatch::default()
        })
    }

    /// Runs `build` on `worker` in a task of its own; returns once the job
    /// is queued (the test runtime has one thread: the task sends its job
    /// before the test goes on).
    async fn submit(
        worker: &Worker,
        build: impl FnOnce() -> anyhow::Result<Built> + Send + 'static,
    ) -> tokio::task::JoinHandle<Answer> {
        let worker = worker.clone();
        let task = tokio::spawn(async move { worker.run(build).await });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        task
    }

    #[tokio::test]
    async fn a_worker_commits_the_ready_batches_of_several_lanes_as_one_transaction() {
        let (_dir, storage, pool) = setup(1);
        let worker = pool.assign();
        // The first job holds the worker while the others queue up.
        let (started_tx, started) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let first = submit(&worker, move || {
            started_tx.send(()).expect("started");
            released.recv().expect("released");
            Ok(cursor(0, 1))
        })
        .await;
        started.recv().expect("the first job started");
        let lanes: Vec<_> = submit_all(&worker, (1..=3).map(|p| move || Ok(cursor(p, 7)))).await;
        let failed = submit(&worker, || {
            Err(anyhow::anyhow!("the handler's batch failed"))
        })
        .await;
        let panicked = submit(&worker, || -> anyhow::Result<Built> {
            panic!("asked to panic")
        })
        .await;
        let empty = submit(&worker, || Ok(Built::of(CommitBatch::default()))).await;
        release.send(()).expect("release");

        let first = first
            .await
            .expect("task")
            .expect("no panic")
            .expect("committed");
        let mut tickets = Vec::new();
        for lane in lanes {
            let outcome = lane
                .await
                .expect("task")
                .expect("no panic")
                .expect("committed");
            tickets.push(outcome.ticket.expect("a ticket"));
        }
        let failed = failed.await.expect("task").expect("no panic");
        let panicked = panicked.await.expect("task");
        let empty = empty.await.expect("task").expect("no panic").expect("ok");

        // The first batch alone, then the three lanes' batches in ONE
        // commit with one ticket; the failed, panicked and empty jobs are
        // answered on their own and left out.
        assert_eq!(*storage.commits.lock().expect("lock"), vec![1, 3]);
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("grouped", "test", pool.batches_per_commit());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(
            text.contains("grouped_sum 4.0") && text.contains("grouped_count 2"),
            "{text}"
        );
        assert!(tickets.iter().all(|t| *t == tickets[0]), "{tickets:?}");
        assert!(tickets[0] > first.ticket.expect("a ticket"));
        let failed = failed.err().expect("the build's error").to_string();
        assert!(failed.contains("the handler's batch failed"), "{failed}");
        assert_eq!(panicked.err(), Some("asked to panic".to_string()));
        assert_eq!(empty.ticket, None);
        for p in 1..=3 {
            assert_eq!(storage.ledger.cursor("h", "log", p).expect("cursor"), 7);
        }
        assert_eq!(storage.ledger.cursor("h", "log", 0).expect("cursor"), 1);
    }

    /// Queues one job per closure, in order.
    async fn submit_all<F>(
        worker: &Worker,
        builds: impl Iterator<Item = F>,
    ) -> Vec<tokio::task::JoinHandle<Answer>>
    where
        F: FnOnce() -> anyhow::Result<Built> + Send + 'static,
    {
        let mut tasks = Vec::new();
        for build in builds {
            tasks.push(submit(worker, build).await);
        }
        tasks
    }

    #[tokio::test]
    async fn a_failed_commit_answers_every_lane_of_it_and_the_worker_carries_on() {
        let (_dir, storage, pool) = setup(2);
        let (a, b) = (pool.assign(), pool.assign());
        // Lanes are spread over the threads.
        let name = || Ok::<_, String>(std::thread::current().name().map(str::to_string));
        let names = (name_of(&a, name).await, name_of(&b, name).await);
        assert_ne!(names.0, names.1);
        assert_eq!(pool.count(), 2);

        storage.refuse.store(true, Ordering::SeqCst);
        let refused = a.run(|| Ok(cursor(0, 5))).await.expect("no panic");
        let why = refused.err().expect("refused").to_string();
        assert!(
            why.contains("commit failed") && why.contains("refused by the test"),
            "{why}"
        );
        storage.refuse.store(false, Ordering::SeqCst);
        let outcome = a
            .run(|| Ok(cursor(0, 5)))
            .await
            .expect("no panic")
            .expect("committed");
        assert!(outcome.ticket.is_some());
        assert_eq!(storage.ledger.cursor("h", "log", 0).expect("cursor"), 5);
    }

    /// The name of the thread a job of `worker` runs on.
    async fn name_of(
        worker: &Worker,
        name: impl FnOnce() -> Result<Option<String>, String> + Send + 'static,
    ) -> Option<String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        worker
            .run(move || {
                let _ = tx.send(name());
                Ok(Built::of(CommitBatch::default()))
            })
            .await
            .expect("no panic")
            .expect("ok");
        rx.await.expect("sent").expect("named")
    }
}
