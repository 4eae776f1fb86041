//! Per-handler sandbox limits.

use std::time::Duration;

/// Limits applied to every invocation of one handler version.
///
/// The defaults follow DESIGN.md: a 1 s deadline and 64 MiB of linear memory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HandlerLimits {
    /// Wall-clock budget for one `handle` call, in milliseconds.
    pub deadline_ms: u64,
    /// Maximum linear memory per instance, in bytes (all memories together).
    pub memory_bytes: usize,
    /// Maximum number of elements in any one table.
    pub table_elements: usize,
    /// Maximum number of core instances one component may create.
    pub instances: usize,
    /// Maximum size of one state value written by the handler, in bytes.
    pub max_state_value_bytes: usize,
    /// Maximum number of state writes (set or delete) per message.
    pub max_state_writes: usize,
    /// Maximum number of outbox emits per message.
    pub max_emits: usize,
    /// Maximum total payload bytes emitted per message.
    pub max_emit_bytes: usize,
    /// Log lines kept per message (`log` import); more are counted and dropped.
    pub max_log_lines: usize,
    /// Bytes of guest stdout/stderr forwarded to the host log per message.
    pub max_stdio_bytes: usize,
    /// Maximum size of one partition key's whole state (every state key
    /// and value), in bytes. A message whose writes would take its key
    /// past it fails (`quota-exceeded`) with none of its writes applied:
    /// the key's state is one ledger record, rewritten whole by every
    /// batch that changes it, so an unbounded record is a cliff.
    pub max_state_bytes_per_key: usize,
}

impl Default for HandlerLimits {
    fn default() -> Self {
        HandlerLimits {
            deadline_ms: 1_000,
            memory_bytes: 64 << 20,
            table_elements: 100_000,
            // A componentize-py (Python) handler instantiates 38 core modules.
            instances: 64,
            max_state_value_bytes: 1 << 20,
            max_state_writes: 1_000,
            max_emits: 1_000,
            max_emit_bytes: 4 << 20,
            max_log_lines: 100,
            max_stdio_bytes: 16 << 10,
            max_state_bytes_per_key: 4 << 20,
        }
    }
}

impl HandlerLimits {
    /// The deadline as a [`Duration`].
    pub fn deadline(&self) -> Duration {
        Duration::from_millis(self.deadline_ms)
    }
}
