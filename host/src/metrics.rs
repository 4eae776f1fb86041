//! Prometheus metrics (`GET /metrics`), encoded by `prometheus-client`.
//!
//! Histograms are long-lived and observed on the hot path ([`Metrics`]);
//! counters and gauges that already exist elsewhere (lane counters, lag,
//! dead-letter and parked-key totals, ledger size) are read at scrape time
//! into a fresh registry, so there is one source of truth for each figure.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

/// Label set of per-handler metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandlerLabel {
    /// Handler name.
    pub handler: String,
}

/// Label set of per-lane metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LaneLabel {
    /// Handler name.
    pub handler: String,
    /// Partition.
    pub partition: String,
}

/// Label set of per-topic metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicLabel {
    /// Topic name.
    pub topic: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Seconds, from 10 µs to about 10 s.
pub fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_01, 2.0, 21))
}

/// Messages per batch, from 1 to 4096.
fn batch_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 13))
}

/// Histograms observed while running; cheap to clone (shared).
#[derive(Clone)]
pub struct Metrics {
    /// Handler invocation time (instantiate + call), per handler.
    pub handler_seconds: HistogramFamily<HandlerLabel>,
    /// Sandbox instances created, per handler: one per message unless
    /// the handler reuses instances (`messages_per_instance`).
    pub instances: Family<HandlerLabel, Counter>,
    /// Instances whose memory a message grew past its initial size, per
    /// handler: each costs about twice a fresh instance's price.
    pub memory_grown: Family<HandlerLabel, Counter>,
    /// Messages (and replays) per committed lane batch, per handler.
    pub batch_messages: HistogramFamily<HandlerLabel>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            handler_seconds: Family::new_with_constructor(seconds_histogram),
            instances: Family::default(),
            memory_grown: Family::default(),
            batch_messages: Family::new_with_constructor(batch_histogram),
        }
    }
}
