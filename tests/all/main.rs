//! ordo's integration tests: one test binary (one link) with a module per
//! capability. Guest handlers must have been built first with
//! `scripts/build-guests.sh` (the README test command does that).

mod fixtures;
mod kill;
mod pipeline;
mod runtime;
mod server;
