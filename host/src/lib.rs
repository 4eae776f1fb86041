//! ordo: an effectively-once message consumer runtime with sandboxed
//! WebAssembly handlers.
//!
//! See ARCHITECTURE.md at the repository root for the code map and the
//! invariants each module keeps.

pub mod api;
pub mod bench;
pub mod cli;
pub mod config;
pub mod crash;
pub mod demo;
pub mod dispatch;
pub mod host;
pub mod ledger;
pub mod metrics;
pub mod ports;
pub mod runtime;
pub mod server;
pub mod source;
pub mod torture;
