//! Write [ordo](https://example.invalid/ordo) message handlers in Rust.
//!
//! A handler is a type implementing [`Handler`] plus one call of
//! [`export_handler!`]. The host calls [`Handler::handle`] once per message,
//! in partition-key order. Everything the handler does through [`state`] and
//! [`outbox`] is buffered by the host and committed atomically with the
//! message's idempotency record and source position — or not at all, if the
//! handler returns an error or traps.
//!
//! Build for `wasm32-unknown-unknown`, linked by `wasm-component-ld` (the
//! output is then a component that imports nothing but ordo's own
//! interfaces), or for `wasm32-wasip2`, and deploy the `.wasm` with `ordo
//! deploy`. `scripts/build-guests.sh` does the former: a fresh instance of
//! such a component costs about a fifth less than a `wasm32-wasip2` one,
//! and less than half when the message would have grown the
//! `wasm32-wasip2` one's heap (`ordo bench sandbox`; BENCHMARKS.md, item
//! 22). Build for `wasm32-wasip2` if the handler needs
//! what std takes from WASI there: clocks, randomness, `print!` to the host
//! log. On `wasm32-unknown-unknown`, `std::time::Instant::now()` panics and
//! `print!` writes nowhere; log with [`info!`] and the other macros.
//!
//! On `wasm32-unknown-unknown` this crate sets the global allocator: Rust's
//! own one there grows the memory on the first allocation of every fresh
//! instance, and the host changes the memory's protection to grow it and
//! back again for the next instance. This one serves the heap from the
//! initial memory first: what the module's data, stack and `.bss` leave of
//! it (more with `-C link-arg=--initial-memory=<bytes>`), then a 512 KiB
//! arena in `.bss`. Either way a panic is logged
//! at error level, with its message and location, before the trap.
//!
//! Keep everything a message needs in [`state`]: each message runs in a
//! fresh instance, so statics start from their initial values every time.
//! A deployment may let an instance run several messages of a batch
//! (`messages_per_instance`) to save instantiating one per message; a
//! handler that reads nothing but its message and state behaves the same
//! either way.
//!
//! # Example
//!
//! ```no_run
//! use ordo_guest::{export_handler, info, outbox, state, Handler, HandlerError, Message};
//! use serde::Deserialize;
//!
//! #[derive(Deserialize)]
//! struct Order {
//!     amount: u64,
//! }
//!
//! struct Totals;
//!
//! impl Handler for Totals {
//!     fn handle(msg: Message) -> Result<(), HandlerError> {
//!         // A malformed payload is a permanent error: the message is dead-lettered.
//!         let order: Order = msg.payload_json()?;
//!         let total: u64 = state::get_json("total")?.unwrap_or(0) + order.amount;
//!         state::set_json("total", &total)?;
//!         if total > 1_000 {
//!             // Published only once this message's commit is durable.
//!             outbox::emit_json("alerts", &msg.partition_key, &total, &[])?;
//!         }
//!         info!("{}: total {total}", msg.partition_key);
//!         Ok(())
//!     }
//! }
//!
//! export_handler!(Totals);
//! ```
//!
//! # Errors
//!
//! Return [`HandlerError::retryable`] for a failure that may pass on a later
//! attempt (the host retries in place, with backoff, keeping the key's order)
//! and [`HandlerError::permanent`] for one that never will (the message is
//! dead-lettered). A panic is a trap: also dead-lettered.

#![warn(missing_docs)]

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
mod heap;

#[doc(hidden)]
pub mod bindings {
    #![allow(missing_docs, clippy::too_many_arguments)]
    wit_bindgen::generate!({
        path: "../wit",
        world: "handler",
        pub_export_macro: true,
        export_macro_name: "__export_handler_world",
        default_bindings_module: "ordo_guest::bindings",
    });
}

pub use bindings::ordo::handler::types::{HandlerError, Message};
pub use serde;
pub use serde_json;

/// A message handler. Implement it on a unit struct and export it with
/// [`export_handler!`].
pub trait Handler {
    /// Handles one message. `Ok` commits everything the handler wrote and
    /// emitted; `Err` discards it.
    fn handle(msg: Message) -> Result<(), HandlerError>;
}

/// Exports a [`Handler`] implementation as the component's `handle` function.
///
/// Call it exactly once per handler crate, at the crate root.
#[macro_export]
macro_rules! export_handler {
    ($ty:ty) => {
        const _: () = {
            struct __OrdoHandlerExport;
            impl $crate::bindings::Guest for __OrdoHandlerExport {
                fn handle(
                    msg: $crate::Message,
                ) -> ::core::result::Result<(), $crate::HandlerError> {
                    $crate::__log_panics();
                    <$ty as $crate::Handler>::handle(msg)
                }
            }
            $crate::bindings::__export_handler_world!(__OrdoHandlerExport with_types_in $crate::bindings);
        };
    };
}

/// Makes a panic log its message and location through [`log`] before it
/// traps (once per instance: a reused instance keeps the hook). On
/// `wasm32-unknown-unknown` std prints a panic nowhere, and on
/// `wasm32-wasip2` to stderr, which the host caps with the rest of stdio.
#[doc(hidden)]
pub fn __log_panics() {
    use std::sync::atomic::{AtomicBool, Ordering};
    static HOOKED: AtomicBool = AtomicBool::new(false);
    if !HOOKED.swap(true, Ordering::Relaxed) {
        std::panic::set_hook(Box::new(|info| {
            log::write(log::Level::Error, &format!("handler {info}"));
        }));
    }
}

impl HandlerError {
    /// A failure that may pass on a later attempt; the host retries.
    pub fn retryable(message: impl Into<String>) -> Self {
        HandlerError::Retryable(message.into())
    }

    /// A failure that never will; the message is dead-lettered.
    pub fn permanent(message: impl Into<String>) -> Self {
        HandlerError::Permanent(message.into())
    }
}

impl Message {
    /// Decodes the payload as JSON; a malformed payload is a permanent error.
    pub fn payload_json<T: serde::de::DeserializeOwned>(&self) -> Result<T, HandlerError> {
        serde_json::from_slice(&self.payload)
            .map_err(|e| HandlerError::permanent(format!("payload is not the expected JSON: {e}")))
    }

    /// The payload as UTF-8 text; invalid UTF-8 is a permanent error.
    pub fn payload_str(&self) -> Result<&str, HandlerError> {
        std::str::from_utf8(&self.payload)
            .map_err(|e| HandlerError::permanent(format!("payload is not UTF-8: {e}")))
    }

    /// The value of the first header called `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// State of the current message's partition key. Reads see this message's
/// own earlier writes; nothing is committed unless `handle` returns `Ok`.
pub mod state {
    use super::bindings::ordo::handler::state as raw;
    use super::HandlerError;

    /// Raw bytes of `key`, or `None`.
    pub fn get(key: &str) -> Option<Vec<u8>> {
        raw::get(key)
    }

    /// Sets `key` to `value`.
    pub fn set(key: &str, value: &[u8]) {
        raw::set(key, value)
    }

    /// Deletes `key`.
    pub fn delete(key: &str) {
        raw::delete(key)
    }

    /// `key` as UTF-8 text; stored bytes that are not UTF-8 are a permanent error.
    pub fn get_str(key: &str) -> Result<Option<String>, HandlerError> {
        raw::get(key)
            .map(|bytes| {
                String::from_utf8(bytes).map_err(|_| {
                    HandlerError::permanent(format!("state {key:?} is not UTF-8 text"))
                })
            })
            .transpose()
    }

    /// Sets `key` to UTF-8 text.
    pub fn set_str(key: &str, value: &str) {
        raw::set(key, value.as_bytes())
    }

    /// `key` decoded from JSON; a value that does not decode is a permanent error.
    pub fn get_json<T: serde::de::DeserializeOwned>(key: &str) -> Result<Option<T>, HandlerError> {
        raw::get(key)
            .map(|bytes| {
                serde_json::from_slice(&bytes).map_err(|e| {
                    HandlerError::permanent(format!("state {key:?} is not the expected JSON: {e}"))
                })
            })
            .transpose()
    }

    /// Sets `key` to `value` encoded as JSON.
    pub fn set_json<T: serde::Serialize>(key: &str, value: &T) -> Result<(), HandlerError> {
        let bytes = serde_json::to_vec(value)
            .map_err(|e| HandlerError::permanent(format!("cannot encode state {key:?}: {e}")))?;
        raw::set(key, &bytes);
        Ok(())
    }
}

/// Outgoing messages, published only after this message's commit is durable.
pub mod outbox {
    use super::bindings::ordo::handler::outbox as raw;
    use super::HandlerError;

    /// Emits `payload` to `topic` under `partition_key`.
    pub fn emit(topic: &str, partition_key: &str, payload: &[u8], headers: &[(String, String)]) {
        raw::emit(topic, partition_key, payload, headers)
    }

    /// Emits `value` encoded as JSON.
    pub fn emit_json<T: serde::Serialize>(
        topic: &str,
        partition_key: &str,
        value: &T,
        headers: &[(String, String)],
    ) -> Result<(), HandlerError> {
        let bytes = serde_json::to_vec(value)
            .map_err(|e| HandlerError::permanent(format!("cannot encode outbox payload: {e}")))?;
        raw::emit(topic, partition_key, &bytes, headers);
        Ok(())
    }
}

/// Logging into the host's log (with the handler, partition and offset
/// attached by the host). Use the [`trace!`], [`debug!`], [`info!`],
/// [`warn!`] and [`error!`] macros.
pub mod log {
    pub use super::bindings::ordo::handler::log::Level;

    /// Writes one line at `level`.
    pub fn write(level: Level, message: &str) {
        super::bindings::ordo::handler::log::log(level, message)
    }
}

/// Logs at trace level, `format!` style.
#[macro_export]
macro_rules! trace { ($($t:tt)*) => { $crate::log::write($crate::log::Level::Trace, &::std::format!($($t)*)) }; }
/// Logs at debug level, `format!` style.
#[macro_export]
macro_rules! debug { ($($t:tt)*) => { $crate::log::write($crate::log::Level::Debug, &::std::format!($($t)*)) }; }
/// Logs at info level, `format!` style.
#[macro_export]
macro_rules! info { ($($t:tt)*) => { $crate::log::write($crate::log::Level::Info, &::std::format!($($t)*)) }; }
/// Logs at warn level, `format!` style.
#[macro_export]
macro_rules! warn { ($($t:tt)*) => { $crate::log::write($crate::log::Level::Warn, &::std::format!($($t)*)) }; }
/// Logs at error level, `format!` style.
#[macro_export]
macro_rules! error { ($($t:tt)*) => { $crate::log::write($crate::log::Level::Error, &::std::format!($($t)*)) }; }
