//! Message sources: where lanes read messages from.

pub mod partition;

pub use partition::partition_for;
