//! The conformance handler every ordo test uses.
//!
//! Payload: JSON `{"seq": <u64>, ...}`. Per message it appends `seq` to the
//! key's state `seqs` (comma-separated decimals, e.g. `1,2,3`), increments
//! `count` (decimal text) and sets `attempt` to the attempt that succeeded.
//! Optional fields:
//! - `"fail": "retryable" | "permanent"`: return that error, touching
//!   nothing; `"trap"`: panic (a trap); `"spin"`: loop until the deadline;
//!   `"bomb"`: allocate until the memory limit.
//! - `"fail_attempts": N`: fail only on attempts 1..=N (then succeed).
//! - `"fail": "log-flood" | "emit-flood" | "state-flood" | "write-flood"`:
//!   100k log lines, 100k emits, an 8 MiB state value, 100k state writes
//!   (the host's quotas must contain them).
//! - `"leak_kib": N`: allocate N KiB and never free them (a leak that a
//!   reused instance carries into its next message).
//! - `"report_instance": true`: set `instance_messages` to the number of
//!   messages the instance running this one has handled, this one included
//!   (1 in a fresh instance; more where the host reuses instances).
//! - `"emit": {"topic": T, "key": K}`: emit the payload minus `emit` to topic
//!   T under key K, with the message's headers.
//!
//! The `counter-fixed` handler is the same logic with `fail` ignored: the
//! "fixed version" of the fix-and-replay workflow.

mod counter;

ordo_guest::export_handler!(counter::Counter<true>);
