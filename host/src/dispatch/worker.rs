//! Batch workers: the threads that run lane batches and commit them.
//!
//! A lane is a serial, logical unit (one per handler and partition); its
//! blocking work — running the handler on a batch of messages and applying
//! the batch to the ledger — runs on a worker, one of a small pool (one
//! per core by default, at least two; `ordo serve --workers`), like Kafka
//! Streams' stream threads. Lanes queue their jobs in one queue that every
//! worker takes from, so a job never waits behind a long one (a handler
//! running to its deadline) while another worker is free; a lane has at
//! most one job in flight, so its batches still run one after the other,
//! in order.
//!
//! A worker takes a job, runs it, and goes on taking the jobs that are
//! ready — each lane's batch built in turn (the handler runs here), 16 at
//! most and for 20 ms at most — then applies them all as ONE ledger
//! transaction with one group-commit ticket. Under light load a producer's request touches
//! every partition with a few messages; with a thread and a commit per
//! lane, each of those small batches paid a thread hand-off, a journal
//! record, its own apply and a wake-up of its own (BENCHMARKS.md, item
//! 17). A job whose build fails or panics is answered on its own and left
//! out of the transaction; the others commit.
//!
//! Architecture invariant: the batches of one worker transaction are of
//! distinct lanes, so their writes are disjoint as every lane's are (see
//! `ledger::journal`); each lane sees its batch applied before it builds
//! its next one.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

use super::lane::{BatchOutcome, Built};
use crate::ledger::{CommitBatch, GroupCommitter};

/// Most lane jobs a worker runs into one transaction.
const MAX_GROUP: usize = 16;

/// A worker stops taking more jobs into its transaction once it has spent
/// this long building it: the batches built first wait for the rest.
const GROUP_BUDGET: std::time::Duration = std::time::Duration::from_millis(20);

/// Builds one lane batch (runs the handler); the worker commits it.
type Build = Box<dyn FnOnce() -> anyhow::Result<Built> + Send>;

/// A job's answer: `Err` with the panic's message when its build panicked.
pub(super) type Answer = Result<anyhow::Result<BatchOutcome>, String>;

struct Job {
    build: Build,
    answer: tokio::sync::oneshot::Sender<Answer>,
}

/// The pool of batch workers, shared by every handler's lanes. Cheap to
/// clone; the threads end once every clone is gone.
#[derive(Clone)]
pub struct Workers {
    inner: Arc<Inner>,
}

struct Inner {
    queue: Arc<Queue>,
    threads: usize,
    /// Lane batches per transaction.
    grouped: Histogram,
}

/// The jobs waiting for a worker.
#[derive(Default)]
struct Queue {
    state: Mutex<QueueState>,
    ready: Condvar,
}

#[derive(Default)]
struct QueueState {
    jobs: VecDeque<Job>,
    /// Set when the pool is dropped: the workers end.
    closed: bool,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, job: Job) {
        self.lock().jobs.push_back(job);
        self.ready.notify_one();
    }

    /// The next job, waiting for one; `None` once the pool is dropped.
    fn next(&self) -> Option<Job> {
        let mut state = self.lock();
        loop {
            if let Some(job) = state.jobs.pop_front() {
                return Some(job);
            }
            if state.closed {
                return None;
            }
            state = self.ready.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The next job if one is waiting.
    fn try_next(&self) -> Option<Job> {
        self.lock().jobs.pop_front()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.queue.lock().closed = true;
        self.queue.ready.notify_all();
    }
}

impl Workers {
    /// Stack of a worker thread: room for the guest's wasm stack (512 KiB by
    /// default) plus the host's frames around it.
    const STACK: usize = 4 << 20;

    /// The default worker count: one per core the process may use, and at
    /// least two, so that a handler running to its deadline never holds
    /// up every lane.
    pub fn default_count() -> usize {
        std::thread::available_parallelism().map_or(2, |n| n.get().max(2))
    }

    /// Starts `count` (at least one) worker threads committing through
    /// `committer`.
    pub fn start(count: usize, committer: GroupCommitter) -> std::io::Result<Self> {
        Self::start_with(count, committer, GROUP_BUDGET)
    }

    /// [`Workers::start`] with a building budget per transaction.
    fn start_with(
        count: usize,
        committer: GroupCommitter,
        budget: std::time::Duration,
    ) -> std::io::Result<Self> {
        // 1 to 16 (MAX_GROUP) lane batches.
        let grouped = Histogram::new(exponential_buckets(1.0, 2.0, 5));
        let queue = Arc::new(Queue::default());
        let threads = count.max(1);
        for i in 0..threads {
            let (shared, committer, grouped) = (queue.clone(), committer.clone(), grouped.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("ordo-worker-{i}"))
                .stack_size(Self::STACK)
                .spawn(move || work(&shared, &committer, &grouped, budget));
            if let Err(e) = spawned {
                // The threads already started end with the queue.
                queue.lock().closed = true;
                queue.ready.notify_all();
                return Err(e);
            }
        }
        Ok(Workers {
            inner: Arc::new(Inner {
                queue,
                threads,
                grouped,
            }),
        })
    }

    /// Number of worker threads.
    pub fn count(&self) -> usize {
        self.inner.threads
    }

    /// Lane batches per ledger transaction (metric).
    pub fn batches_per_commit(&self) -> Histogram {
        self.inner.grouped.clone()
    }

    /// Builds a batch on a worker thread and commits it (with whatever
    /// other lanes' batches are ready); the outcome carries the ticket.
    pub(super) async fn run(
        &self,
        build: impl FnOnce() -> anyhow::Result<Built> + Send + 'static,
    ) -> Answer {
        let (answer, answered) = tokio::sync::oneshot::channel();
        self.inner.queue.push(Job {
            build: Box::new(build),
            answer,
        });
        answered
            .await
            .unwrap_or_else(|_| Err("the worker threads have ended".into()))
    }
}

/// A worker thread: runs the ready jobs, commits them together, answers.
fn work(
    queue: &Queue,
    committer: &GroupCommitter,
    grouped: &Histogram,
    budget: std::time::Duration,
) {
    while let Some(first) = queue.next() {
        let started = std::time::Instant::now();
        let mut built = Vec::new();
        let mut taken = 0;
        let mut next = Some(first);
        while let Some(job) = next.take() {
            taken += 1;
            match catch(job.build) {
                Ok(Ok(b)) => built.push((b, job.answer)),
                Ok(Err(e)) => {
                    let _ = job.answer.send(Ok(Err(e)));
                }
                Err(panic) => {
                    let _ = job.answer.send(Err(panic));
                }
            }
            if taken < MAX_GROUP && started.elapsed() < budget {
                next = queue.try_next();
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
    use std::sync::atomic::{AtomicBool, Ordering};

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
        setup_with(workers, GROUP_BUDGET)
    }

    fn setup_with(
        workers: usize,
        budget: std::time::Duration,
    ) -> (tempfile::TempDir, Arc<Counting>, Workers) {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Arc::new(Counting {
            ledger: Ledger::open(dir.path()).expect("ledger"),
            commits: Mutex::new(Vec::new()),
            refuse: AtomicBool::new(false),
        });
        let committer = GroupCommitter::start(storage.clone());
        let pool = Workers::start_with(workers, committer, budget).expect("workers");
        (dir, storage, pool)
    }

    /// A batch that moves partition `p`'s cursor of handler `h` to `next`.
    fn cursor(p: u32, next: u64) -> Built {
        Built::of(CommitBatch {
            cursors: vec![("h".into(), "log".into(), p, next)],
            ..CommitBatch::default()
        })
    }

    /// Runs `build` on the pool in a task of its own; returns once the job
    /// is queued (the test runtime has one thread: the task queues its job
    /// before the test goes on).
    async fn submit(
        pool: &Workers,
        build: impl FnOnce() -> anyhow::Result<Built> + Send + 'static,
    ) -> tokio::task::JoinHandle<Answer> {
        let pool = pool.clone();
        let task = tokio::spawn(async move { pool.run(build).await });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        task
    }

    /// A job that reports when it started and then waits for a release.
    fn held(
        then: Built,
    ) -> (
        impl FnOnce() -> anyhow::Result<Built> + Send + 'static,
        std::sync::mpsc::Receiver<()>,
        std::sync::mpsc::Sender<()>,
    ) {
        let (started_tx, started) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let job = move || {
            started_tx.send(()).expect("started");
            released.recv().expect("released");
            Ok(then)
        };
        (job, started, release)
    }

    #[tokio::test]
    async fn a_worker_commits_the_ready_batches_of_several_lanes_as_one_transaction() {
        // A budget no build here reaches.
        let (_dir, storage, pool) = setup_with(1, std::time::Duration::from_secs(600));
        // The first job holds the worker while the others queue up.
        let (job, started, release) = held(cursor(0, 1));
        let first = submit(&pool, job).await;
        started.recv().expect("the first job started");
        let mut lanes = Vec::new();
        for p in 1..=3 {
            lanes.push(submit(&pool, move || Ok(cursor(p, 7))).await);
        }
        let failed = submit(&pool, || Err(anyhow::anyhow!("the handler's batch failed"))).await;
        let panicked = submit(&pool, || -> anyhow::Result<Built> {
            panic!("asked to panic")
        })
        .await;
        let empty = submit(&pool, || Ok(Built::of(CommitBatch::default()))).await;
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

        // The four lanes' batches in ONE commit with one ticket (the worker
        // took the others once the first was built); the failed, panicked
        // and empty jobs are answered on their own and left out.
        assert_eq!(*storage.commits.lock().expect("lock"), vec![4]);
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("grouped", "test", pool.batches_per_commit());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(
            text.contains("grouped_sum 4.0") && text.contains("grouped_count 1"),
            "{text}"
        );
        assert!(tickets.iter().all(|t| *t == tickets[0]), "{tickets:?}");
        assert_eq!(first.ticket, Some(tickets[0]));
        let failed = failed.err().expect("the build's error").to_string();
        assert!(failed.contains("the handler's batch failed"), "{failed}");
        assert_eq!(panicked.err(), Some("asked to panic".to_string()));
        assert_eq!(empty.ticket, None);
        for p in 1..=3 {
            assert_eq!(storage.ledger.cursor("h", "log", p).expect("cursor"), 7);
        }
        assert_eq!(storage.ledger.cursor("h", "log", 0).expect("cursor"), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_long_job_holds_one_worker_and_the_others_go_on() {
        let (_dir, storage, pool) = setup(2);
        assert_eq!(pool.count(), 2);
        // A handler running to its deadline, say.
        let (job, started, release) = held(cursor(0, 1));
        let long = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.run(job).await })
        };
        tokio::task::spawn_blocking(move || started.recv())
            .await
            .expect("task")
            .expect("the long job started");
        // Other lanes' jobs run and commit on the other worker meanwhile.
        for p in 1..=5 {
            let done = tokio::time::timeout(
                std::time::Duration::from_secs(30),
                pool.run(move || Ok(cursor(p, 3))),
            )
            .await
            .expect("not held up by the long job")
            .expect("no panic")
            .expect("committed");
            assert!(done.ticket.is_some());
        }
        assert_eq!(storage.ledger.cursor("h", "log", 0).expect("cursor"), 0);
        release.send(()).expect("release");
        long.await
            .expect("task")
            .expect("no panic")
            .expect("committed");
        assert_eq!(storage.ledger.cursor("h", "log", 0).expect("cursor"), 1);
    }

    #[tokio::test]
    async fn a_failed_commit_answers_every_lane_of_it_and_the_workers_carry_on() {
        let (_dir, storage, pool) = setup(2);
        storage.refuse.store(true, Ordering::SeqCst);
        let refused = pool.run(|| Ok(cursor(0, 5))).await.expect("no panic");
        let why = refused.err().expect("refused").to_string();
        assert!(
            why.contains("commit failed") && why.contains("refused by the test"),
            "{why}"
        );
        storage.refuse.store(false, Ordering::SeqCst);
        let outcome = pool
            .run(|| Ok(cursor(0, 5)))
            .await
            .expect("no panic")
            .expect("committed");
        assert!(outcome.ticket.is_some());
        assert_eq!(storage.ledger.cursor("h", "log", 0).expect("cursor"), 5);
    }

    #[tokio::test]
    async fn past_its_budget_a_worker_commits_what_it_built() {
        // A budget every build reaches: each batch is its own transaction.
        let (_dir, storage, pool) = setup_with(1, std::time::Duration::ZERO);
        let (job, started, release) = held(cursor(0, 1));
        let first = submit(&pool, job).await;
        started.recv().expect("the first job started");
        let mut lanes = vec![first];
        for p in 1..=2 {
            lanes.push(submit(&pool, move || Ok(cursor(p, 7))).await);
        }
        release.send(()).expect("release");
        for lane in lanes {
            lane.await
                .expect("task")
                .expect("no panic")
                .expect("committed");
        }
        assert_eq!(*storage.commits.lock().expect("lock"), vec![1, 1, 1]);
    }
}
