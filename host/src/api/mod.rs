//! The HTTP API: producer ingest and admin endpoints (pinned in DESIGN.md).

pub mod ingest;
pub mod routes;

pub use routes::{router, ApiState};
