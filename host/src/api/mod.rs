//! The HTTP API: producer ingest and admin endpoints.

pub mod ingest;
