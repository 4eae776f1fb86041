//! The registry of embedded-log topics: partition counts and, per partition,
//! a watch of the durable high watermark that lanes wait on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

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

    /// A receiver of the durable high watermark of one partition. The topic
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

    /// Publishes a new durable high watermark (only ever moves forward).
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
