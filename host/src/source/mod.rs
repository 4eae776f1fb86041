//! Message sources: where lanes read messages from.
//!
//! The embedded log lives in the ledger (`log` tree); [`topics::Topics`]
//! tracks its topics and wakes lanes when a partition's high watermark
//! moves (once an append is applied; see [`topics`] for why a lane need
//! not wait for its flush).

pub mod jetstream;
pub mod partition;
pub mod topics;

pub use partition::{canary_bucket, fnv1a_32, partition_for};
pub use topics::{validate_topic_name, Topics};
