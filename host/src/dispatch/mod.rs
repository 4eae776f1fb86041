//! The dispatcher: one lane per (handler, partition).
//!
//! A lane reads its partition in offset order from its committed cursor,
//! skips duplicates, runs the handler on each new message, and hands the
//! batch's effects to the ledger as ONE transaction; it counts the batch
//! only after the group flush made it durable (building the next one
//! meanwhile), then moves its committed position ([`LanePosition`]).
//! Lanes run concurrently on a few worker threads (`worker`), which apply
//! the batches that are ready together; within a lane everything is
//! serial, which is what gives per-key order.
//!
//! Architecture invariant: guest code never runs inside a ledger
//! transaction; the transaction only applies the buffered overlay.
//!
//! Architecture invariant: a message's effects, its dedup record and the
//! cursor advance past it are in the same transaction; a failed message's
//! dead letter (and its key's parking) likewise; a replayed dead letter's
//! effects, its removal from the queue and its key's unparking likewise.
//!
//! Architecture invariant: only a lane writes its partition's dead letters
//! and parked keys; operator actions are requests (`dlq_actions`) the lane
//! carries out in order.

mod lane;
mod stats;
mod worker;

pub use lane::{
    run_lane, ActiveVersion, Executor, LaneContext, NativeHandler, Runnable, EMBEDDED_SOURCE,
    HELD_KIND,
};
pub use stats::{BatchCounts, HandlerStats, LanePosition};
pub use worker::Workers;
