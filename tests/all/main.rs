//! ordo's integration tests: one test binary (one link) with a module per
//! capability. Guest handlers must have been built first with
//! `scripts/build-guests.sh` (the README test command does that).

mod auth;
mod backup;
mod config;
mod crash;
mod failures;
mod faults;
mod fixtures;
mod jetstream;
mod kill;
mod lifecycle;
mod pipeline;
mod polyglot;
mod runtime;
mod server;
mod torture;
mod ui;
