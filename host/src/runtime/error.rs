//! Errors of loading a component and failures of one invocation.

use std::fmt;

/// Why a component could not be loaded. Each message says what was wrong and
/// what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The bytes are not WebAssembly at all.
    #[error(
        "not a WebAssembly binary (no `\\0asm` header); deploy a component built for wasm32-wasip2"
    )]
    NotWasm,
    /// A core module was given where a component is required.
    #[error("this is a core WebAssembly module, not a component; build for wasm32-wasip2, or wrap it with `wasm-tools component new --adapt wasi_snapshot_preview1=<adapter>`")]
    NotAComponent,
    /// A precompiled artifact was given; only portable components are accepted.
    #[error("precompiled (.cwasm) artifacts are not accepted; deploy the component itself")]
    Precompiled,
    /// Larger than the configured cap.
    #[error("component is {size} bytes, over the {limit}-byte limit")]
    TooLarge {
        /// Size of the component.
        size: usize,
        /// Configured cap.
        limit: usize,
    },
    /// The component imports something the sandbox does not provide.
    #[error("component imports `{import}`, which handlers may not use; allowed imports are ordo:handler/{{state,outbox,log}} and the WASI 0.2 cli/clocks/filesystem/io/random interfaces (with nothing granted)")]
    ForbiddenImport {
        /// The fully qualified import name, e.g. `wasi:sockets/tcp@0.2.0`.
        import: String,
    },
    /// The component is valid but does not implement `ordo:handler/handler@0.1.0`.
    #[error("component does not implement the `ordo:handler/handler@0.1.0` world: {0}")]
    WrongWorld(String),
    /// wasmtime rejected the component (malformed, unsupported feature, ...).
    #[error("invalid component: {0}")]
    Invalid(String),
    /// Writing or reading the compiled-artifact cache failed.
    #[error("compiled-artifact cache: {0}")]
    Cache(String),
}

/// The class of an invocation failure; drives retry and dead-letter policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// The handler returned `handler-error::retryable`.
    Retryable,
    /// The handler returned `handler-error::permanent`.
    Permanent,
    /// The guest trapped (panic, unreachable, out-of-bounds access, ...).
    Trap,
    /// The guest exhausted its wasm stack (deep recursion).
    StackOverflow,
    /// The call ran past its deadline and was interrupted.
    Deadline,
    /// The guest tried to grow memory or a table past its limit.
    MemoryLimit,
    /// The guest exceeded a host-side quota (emits, state writes, value size).
    QuotaExceeded,
    /// The host could not run the guest (e.g. instance pool exhausted). Not
    /// the message's fault: retry without counting it against the message.
    Host,
}

impl FailureKind {
    /// Stable lower-case name, as used in status, metrics and dead letters.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Retryable => "retryable",
            FailureKind::Permanent => "permanent",
            FailureKind::Trap => "trap",
            FailureKind::StackOverflow => "stack-overflow",
            FailureKind::Deadline => "deadline",
            FailureKind::MemoryLimit => "memory-limit",
            FailureKind::QuotaExceeded => "quota-exceeded",
            FailureKind::Host => "host",
        }
    }

    /// Whether a later attempt of the same message may succeed.
    pub fn is_retryable(self) -> bool {
        matches!(self, FailureKind::Retryable | FailureKind::Host)
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed invocation: its kind and a human-readable explanation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What class of failure this is.
    pub kind: FailureKind,
    /// The handler's error text, or the trap description.
    pub message: String,
}

impl Failure {
    /// A failure of `kind` explained by `message`.
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Failure {
            kind,
            message: message.into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl std::error::Error for Failure {}
