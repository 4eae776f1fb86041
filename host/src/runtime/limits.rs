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
    /// Messages one instance may run, one after another, within one lane
    /// batch. 1 (the default) gives every message a fresh instance. More
    /// saves instantiating and tearing down an instance per message (most
    /// of what the sandbox costs, BENCHMARKS.md) at a price: what a message
    /// leaves in the guest's memory and globals (a cache, a counter, a
    /// leaked allocation) is there for the next, so a handler may opt in
    /// only if its result depends on nothing but its message and state.
    /// An instance is never kept after a message that failed or made a
    /// WASI call.
    pub messages_per_instance: u32,
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
            messages_per_instance: 1,
        }
    }
}

impl HandlerLimits {
    /// The deadline as a [`Duration`].
    pub fn deadline(&self) -> Duration {
        Duration::from_millis(self.deadline_ms)
    }

    /// Refuses limits under which no handler could ever run a message
    /// (each would dead-letter everything). A zero count of writes, emits,
    /// log lines or output bytes is a legitimate "none allowed".
    /// `ordo.toml`'s limits are checked with it; a version already in the
    /// ledger keeps the limits it was deployed with.
    pub fn check(&self) -> Result<(), String> {
        let must_be_positive = [
            ("deadline_ms", self.deadline_ms == 0),
            ("memory_bytes", self.memory_bytes == 0),
            ("instances", self.instances == 0),
            ("max_state_bytes_per_key", self.max_state_bytes_per_key == 0),
            ("messages_per_instance", self.messages_per_instance == 0),
        ];
        match must_be_positive.iter().find(|(_, zero)| *zero) {
            Some(("max_state_bytes_per_key", _)) => Err(
                "max_state_bytes_per_key must be at least 1 (a handler that must not write state: max_state_writes = 0)"
                    .into(),
            ),
            Some((name, _)) => Err(format!("{name} must be at least 1")),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_no_message_could_run_under_are_refused() {
        assert_eq!(HandlerLimits::default().check(), Ok(()));
        let none_allowed = HandlerLimits {
            max_state_writes: 0,
            max_emits: 0,
            max_log_lines: 0,
            max_stdio_bytes: 0,
            ..Default::default()
        };
        assert_eq!(none_allowed.check(), Ok(()));
        let with = |set: fn(&mut HandlerLimits)| {
            let mut limits = HandlerLimits::default();
            set(&mut limits);
            limits
        };
        for (limits, name) in [
            (with(|l| l.deadline_ms = 0), "deadline_ms"),
            (with(|l| l.memory_bytes = 0), "memory_bytes"),
            (with(|l| l.instances = 0), "instances"),
            (
                with(|l| l.max_state_bytes_per_key = 0),
                "max_state_bytes_per_key",
            ),
            (
                with(|l| l.messages_per_instance = 0),
                "messages_per_instance",
            ),
        ] {
            let e = limits.check().expect_err(name);
            assert!(e.starts_with(&format!("{name} must be at least 1")), "{e}");
        }
    }
}
