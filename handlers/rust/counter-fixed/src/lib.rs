//! The counter handler with its `fail` field ignored: the "fixed version"
//! deployed in the fix-and-replay workflow (see the `counter` handler).

#[path = "../../counter/src/counter.rs"]
mod counter;

ordo_guest::export_handler!(counter::Counter<false>);
