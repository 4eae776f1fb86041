//! Message sources: where lanes read messages from.
//!
//! The embedded log lives in the ledger (`log` tree); [`topics::Topics`]
//! tracks its topics and wakes lanes when a partition's durable high
//! watermark moves.

pub mod jetstream;
pub mod partition;
pub mod topics;

pub use partition::{canary_bucket, partition_for};
pub use topics::{validate_topic_name, Topics};
