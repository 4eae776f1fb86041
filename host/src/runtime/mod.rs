//! The sandbox: runs one handler component on one message.
//!
//! A [`Runtime`] owns the process-wide wasmtime [`Engine`](wasmtime::Engine)
//! (component model, pooling allocator, epoch interruption) and the
//! [`Linker`](wasmtime::component::Linker) that provides the handler imports
//! (`ordo:handler/{state,outbox,log}`) plus a locked-down WASI p2. Loading a
//! component ([`Runtime::load`]) validates it (is it a component, are its
//! imports on the allow-list, does it export `handle`), compiles it once
//! (cached on disk by content hash and engine version) and returns a
//! [`HandlerModule`]: a pre-linked instance template.
//!
//! [`HandlerModule::invoke`] runs one message in a fresh `Store` with memory
//! and table limits and an epoch deadline; a [`Session`] runs a batch's
//! messages one after another, in one instance for up to
//! [`HandlerLimits::messages_per_instance`] of them (1 by default). The
//! handler's state writes, outbox emits and log lines are buffered in an
//! [`Overlay`] that is returned to the caller, who commits it (or throws it
//! away) — guest code never runs inside a ledger transaction.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use ordo::runtime::{Runtime, RuntimeConfig, HandlerLimits, Message, MemoryState};
//! let runtime = Runtime::new(RuntimeConfig::default())?;
//! let bytes = std::fs::read("target/handlers/counter.wasm")?;
//! let module = runtime.load(&bytes, HandlerLimits::default())?;
//! let msg = Message {
//!     topic: "orders".into(), partition_key: "k1".into(), idempotency_key: "m1".into(),
//!     offset: 0, payload: br#"{"seq":1}"#.to_vec(), headers: vec![], attempt: 1,
//! };
//! let (invocation, _state) = module.invoke(&msg, Box::new(MemoryState::default()));
//! assert!(invocation.outcome.is_ok());
//! # Ok(()) }
//! ```

mod bindings;
mod cache;
mod engine;
mod error;
mod host;
mod imports;
mod limits;
mod reaper;
mod stdio;

pub use bindings::ordo::handler::log::Level;
pub use bindings::ordo::handler::types::{HandlerError, Message};
pub use engine::{Runtime, RuntimeConfig};
pub use error::{Failure, FailureKind, LoadError};
pub use host::{
    Emit, HandlerModule, Invocation, LogLine, MemoryState, Overlay, Session, SpanFactory,
    StateAccess,
};
pub use imports::ALLOWED_IMPORTS;
pub use limits::HandlerLimits;
