//! The registry of embedded-log topics: partition counts and, per partition,
//! a watch of the high watermark that lanes wait on, plus a small
//! in-memory copy of the most recently produced messages (the "tail") so
//! that lanes keeping up with producers need not read them back from the
//! ledger.
//!
//! Both move as soon as an append is APPLIED to the ledger, before the
//! flush that makes it durable: a lane may process a message while its
//! append flushes (the producer is answered only after that flush). This
//! is safe because a lane's commit starts only after the appends it read
//! were applied whole, so it follows them in sled's log, and sled
//! recovers a prefix of its log after a crash: the commit never survives
//! a crash without them, and nothing the lane did is
//! acknowledged before a flush that covers both. It saves a message one
//! flush of latency (its append's and its commit's flush may be one).
//!
//! Architecture invariant: the tail holds only messages applied to the
//! ledger, with the offsets the ledger gave them, as one contiguous run of
//! offsets; a lane that finds its cursor outside that run reads the ledger
//! instead.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use crate::ledger::Envelope;

use tokio::sync::watch;

use crate::ledger::{Ledger, TopicConfig};

/// Names of topics and handlers: 1 to `max` bytes of `[A-Za-z0-9._-]`;
/// `kind` ("topic", "handler") names the thing in the error.
pub fn validate_name(kind: &str, name: &str, max: usize) -> Result<(), String> {
    if name.is_empty() || name.len() > max {
        return Err(format!(
            "{kind} name must be 1 to {max} bytes, got {}",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{kind} name {name:?} contains {c:?}; use letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// Topic names: 1–255 bytes of `[A-Za-z0-9._-]`.
pub fn validate_topic_name(name: &str) -> Result<(), String> {
    validate_name("topic", name, 255)
}

struct TopicEntry {
    partitions: u32,
    watermarks: Vec<watch::Sender<u64>>,
    tails: Vec<Tail>,
}

/// Most recent messages of one partition (see the module docs).
pub type Tail = Arc<Mutex<TailBuffer>>;

/// Entries a tail keeps at most.
const TAIL_MAX_ENTRIES: usize = 2048;
/// Payload bytes a tail keeps at most.
const TAIL_MAX_BYTES: usize = 2 << 20;

/// A contiguous run of applied messages, oldest first.
#[derive(Default)]
pub struct TailBuffer {
    entries: VecDeque<(u64, Envelope)>,
    bytes: usize,
}

impl TailBuffer {
    /// Offset after the last entry, if any.
    fn end(&self) -> Option<u64> {
        self.entries.back().map(|(o, _)| o + 1)
    }

    /// Appends applied messages with consecutive offsets. A run that does
    /// not continue the buffer (concurrent producers finishing out of
    /// order) replaces it, so the buffer stays contiguous; a run entirely
    /// before the buffer is ignored.
    pub fn extend(&mut self, run: impl IntoIterator<Item = (u64, Envelope)>) {
        for (offset, envelope) in run {
            match self.end() {
                Some(end) if offset == end => {}
                Some(end) if offset < end => continue,
                _ => {
                    self.entries.clear();
                    self.bytes = 0;
                }
            }
            self.bytes += envelope.payload.len();
            self.entries.push_back((offset, envelope));
            while self.entries.len() > TAIL_MAX_ENTRIES || self.bytes > TAIL_MAX_BYTES {
                match self.entries.pop_front() {
                    Some((_, e)) => self.bytes -= e.payload.len(),
                    None => break,
                }
            }
        }
    }

    /// Copies of up to `max` messages from `from` on, or `None` when `from`
    /// is not in the buffer.
    pub fn read(&self, from: u64, max: usize) -> Option<Vec<(u64, Envelope)>> {
        let first = self.entries.front()?.0;
        if from < first || from >= self.end()? {
            return None;
        }
        let skip = (from - first) as usize;
        Some(self.entries.iter().skip(skip).take(max).cloned().collect())
    }
}

/// Shared, cheap to clone.
#[derive(Clone)]
pub struct Topics {
    inner: Arc<Mutex<HashMap<String, TopicEntry>>>,
    defaults: TopicConfig,
}

impl Topics {
    /// A registry creating new topics with `defaults`.
    pub fn new(defaults: TopicConfig) -> Self {
        Topics {
            inner: Arc::new(Mutex::new(HashMap::new())),
            defaults,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, TopicEntry>> {
        // A panic while holding this lock leaves only plain data behind.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes sure `name` exists (creating it with the defaults on first use)
    /// and returns its partition count.
    pub fn ensure(&self, ledger: &Ledger, name: &str) -> anyhow::Result<u32> {
        if let Some(t) = self.lock().get(name) {
            return Ok(t.partitions);
        }
        validate_topic_name(name).map_err(|e| anyhow::anyhow!(e))?;
        let config = match ledger.topic_config(name)? {
            Some(c) => c,
            None => {
                ledger.create_topic(name, &self.defaults)?;
                self.defaults.clone()
            }
        };
        let mut watermarks = Vec::with_capacity(config.partitions as usize);
        for p in 0..config.partitions {
            watermarks.push(watch::Sender::new(ledger.high_watermark(name, p)?));
        }
        let mut map = self.lock();
        let entry = map.entry(name.to_string()).or_insert(TopicEntry {
            partitions: config.partitions,
            watermarks,
            tails: (0..config.partitions).map(|_| Tail::default()).collect(),
        });
        Ok(entry.partitions)
    }

    /// Partition count of a known topic.
    pub fn partitions(&self, name: &str) -> Option<u32> {
        self.lock().get(name).map(|t| t.partitions)
    }

    /// Known topic names.
    pub fn names(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// A receiver of the high watermark of one partition. The topic
    /// must have been [`ensure`](Self::ensure)d; otherwise the receiver
    /// stays at 0 forever.
    pub fn watch(&self, name: &str, partition: u32) -> watch::Receiver<u64> {
        match self
            .lock()
            .get(name)
            .and_then(|t| t.watermarks.get(partition as usize))
        {
            Some(tx) => tx.subscribe(),
            None => watch::Sender::new(0).subscribe(),
        }
    }

    /// The in-memory tail of one partition (an empty, unshared one for an
    /// unknown topic).
    pub fn tail(&self, name: &str, partition: u32) -> Tail {
        self.lock()
            .get(name)
            .and_then(|t| t.tails.get(partition as usize).cloned())
            .unwrap_or_default()
    }

    /// Publishes a new high watermark (only ever moves forward): every
    /// message below it is applied to the ledger.
    pub fn publish(&self, name: &str, partition: u32, watermark: u64) {
        if let Some(tx) = self
            .lock()
            .get(name)
            .and_then(|t| t.watermarks.get(partition as usize))
        {
            tx.send_if_modified(|w| {
                let moved = watermark > *w;
                if moved {
                    *w = watermark;
                }
                moved
            });
        }
    }

    /// Re-reads a partition's high watermark from the ledger and publishes it.
    pub fn refresh(&self, ledger: &Ledger, name: &str, partition: u32) {
        match ledger.high_watermark(name, partition) {
            Ok(w) => self.publish(name, partition, w),
            Err(e) => {
                tracing::warn!(topic = name, partition, error = %e, "cannot read high watermark")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(n: u64) -> Envelope {
        Envelope {
            key: format!("k{n}"),
            idempotency_key: None,
            payload: vec![0; 10],
            headers: vec![],
            appended_at_ms: 0,
        }
    }

    fn run(from: u64, to: u64) -> Vec<(u64, Envelope)> {
        (from..to).map(|o| (o, env(o))).collect()
    }

    fn offsets(v: Option<Vec<(u64, Envelope)>>) -> Option<Vec<u64>> {
        v.map(|v| v.into_iter().map(|(o, _)| o).collect())
    }

    #[test]
    fn tail_serves_only_a_contiguous_run() {
        let mut t = TailBuffer::default();
        assert_eq!(offsets(t.read(0, 10)), None, "empty");
        t.extend(run(10, 20));
        assert_eq!(offsets(t.read(9, 10)), None, "before the run");
        assert_eq!(offsets(t.read(20, 10)), None, "after the run");
        assert_eq!(offsets(t.read(18, 10)), Some(vec![18, 19]));
        assert_eq!(offsets(t.read(10, 3)), Some(vec![10, 11, 12]));
        // A later producer finishing first: the gap 20..25 is never served.
        t.extend(run(25, 30));
        assert_eq!(offsets(t.read(19, 10)), None);
        assert_eq!(offsets(t.read(25, 2)), Some(vec![25, 26]));
        // The earlier one finishing afterwards is ignored.
        t.extend(run(20, 25));
        assert_eq!(offsets(t.read(20, 10)), None);
        assert_eq!(offsets(t.read(27, 10)), Some(vec![27, 28, 29]));
        // Continuing the run extends it.
        t.extend(run(30, 32));
        assert_eq!(offsets(t.read(29, 10)), Some(vec![29, 30, 31]));
    }

    #[test]
    fn tail_is_bounded() {
        let mut t = TailBuffer::default();
        t.extend(run(0, TAIL_MAX_ENTRIES as u64 + 100));
        assert_eq!(t.entries.len(), TAIL_MAX_ENTRIES);
        assert_eq!(offsets(t.read(0, 1)), None, "oldest evicted");
        assert_eq!(offsets(t.read(100, 1)), Some(vec![100]));
    }
}
