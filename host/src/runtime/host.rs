//! Per-invocation host state: the overlay, the limits and the WASI context,
//! plus the host side of the `state`, `outbox` and `log` imports.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime::{Store, Trap};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::bindings::ordo::handler::{log, outbox, state, types};
use super::bindings::{Handler, HandlerPre};
use super::stdio::{Budget, LogSink, Stream};
use super::{Failure, FailureKind, HandlerError, HandlerLimits, Level, Message};

/// Read access to the committed state of the current message's partition key.
///
/// The runtime layers the handler's own uncommitted writes on top, so an
/// implementation only answers for what is committed (or pending in the
/// caller's batch).
pub trait StateAccess: Send {
    /// The value of `key`, or `None`.
    fn get(&mut self, key: &str) -> anyhow::Result<Option<Vec<u8>>>;

    /// Returns the concrete value, so a caller that handed its own type to
    /// [`HandlerModule::invoke`] can take it back (`downcast`).
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send>;
}

/// A [`StateAccess`] over an in-memory map; for tests, benches and tools.
#[derive(Debug, Default, Clone)]
pub struct MemoryState(pub BTreeMap<String, Vec<u8>>);

impl StateAccess for MemoryState {
    fn get(&mut self, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(self.0.get(key).cloned())
    }

    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send> {
        self
    }
}

impl MemoryState {
    /// Applies an overlay's writes, as a commit would.
    pub fn apply(&mut self, overlay: &Overlay) {
        for (key, value) in &overlay.writes {
            match value {
                Some(v) => self.0.insert(key.clone(), v.clone()),
                None => self.0.remove(key),
            };
        }
    }
}

/// One outbox message emitted by a handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emit {
    /// Target topic.
    pub topic: String,
    /// Partition key on the target topic.
    pub partition_key: String,
    /// Payload bytes.
    pub payload: Vec<u8>,
    /// Headers.
    pub headers: Vec<(String, String)>,
}

/// One line logged through the `log` import.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// Severity.
    pub level: Level,
    /// Text.
    pub message: String,
}

/// Everything one invocation did, buffered until the caller commits it.
#[derive(Debug, Default, Clone)]
pub struct Overlay {
    /// State writes, coalesced per key: `Some` = set, `None` = delete.
    pub writes: BTreeMap<String, Option<Vec<u8>>>,
    /// Outbox emits, in order.
    pub emits: Vec<Emit>,
    /// Log lines, in order, up to the handler's `max_log_lines`.
    pub logs: Vec<LogLine>,
    /// Log lines dropped past the cap.
    pub dropped_log_lines: usize,
    /// Bytes of stdout/stderr dropped past the cap.
    pub dropped_stdio_bytes: usize,
}

/// The result of [`HandlerModule::invoke`].
#[derive(Debug)]
pub struct Invocation {
    /// `Ok` if the handler returned `ok`; otherwise why not.
    pub outcome: Result<(), Failure>,
    /// The buffered effects. On failure, `writes` and `emits` are empty
    /// (nothing of a failed attempt may be committed); logs are kept.
    pub overlay: Overlay,
    /// Wall time of instantiation (if any) plus call.
    pub elapsed: Duration,
    /// Whether an instance was made for the message (false: it ran in one
    /// kept from the message before, see [`Session`], or none could be
    /// made).
    pub fresh_instance: bool,
    /// Whether this message grew the instance's memory past its initial
    /// size (in a kept instance: for the first time). A fresh instance
    /// that grows costs about twice as much (BENCHMARKS.md, item 21): a
    /// handler whose messages routinely grow it can avoid that (the Rust
    /// handler guide says how).
    pub memory_grew: bool,
}

/// Enforces memory and table limits, remembering whether a limit was hit so
/// that the resulting trap is reported as `memory-limit`.
struct Limiter {
    memory_bytes: usize,
    table_elements: usize,
    instances: usize,
    hit: Option<String>,
    /// A memory grew past its initial size: the pool changes the slot's
    /// protection back when it is next instantiated (see `Session::run`).
    grew: bool,
}

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes {
            self.hit = Some(format!(
                "memory growth from {current} to {desired} bytes denied (limit {} bytes)",
                self.memory_bytes
            ));
            return Ok(false);
        }
        // Called with `current == 0` when the memory is created.
        self.grew |= current > 0 && desired > current;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.table_elements {
            self.hit = Some(format!(
                "table growth from {current} to {desired} elements denied (limit {})",
                self.table_elements
            ));
            return Ok(false);
        }
        Ok(true)
    }

    fn instances(&self) -> usize {
        self.instances
    }

    fn tables(&self) -> usize {
        self.instances * 4
    }

    fn memories(&self) -> usize {
        self.instances
    }
}

/// The `T` of every `Store`: one per instance (see [`Session`]).
pub(crate) struct HostState {
    /// What belongs to the message being run.
    msg: MessageScope,
    limits: Arc<HandlerLimits>,
    limiter: Limiter,
    /// Built on the guest's first WASI call: most handlers never make one,
    /// and building it (clocks, seeded random generators, stdio sinks) is a
    /// measurable part of a fresh instance. An instance that made one does
    /// not run another message.
    wasi: Option<WasiCtx>,
    table: ResourceTable,
}

/// Everything the host reads, counts or buffers for one message: made
/// anew for each message, also in a kept instance.
struct MessageScope {
    state: Box<dyn StateAccess>,
    overlay: Overlay,
    emit_bytes: usize,
    write_count: usize,
    /// Set when the guest exceeded a host quota (the trap's cause).
    quota: Option<String>,
    /// Set when reading committed state failed (not the guest's fault).
    host_error: Option<String>,
    /// Shared by the guest's stdout and stderr.
    stdio_budget: Arc<Budget>,
    /// Builds the span the guest's log lines and output are recorded in,
    /// on the first line that is recorded: a span per message costs more
    /// than most handlers' whole call, and most lines are filtered out.
    log_span: LogSpan,
}

impl MessageScope {
    fn new(
        state: Box<dyn StateAccess>,
        budget: &Arc<Budget>,
        log_span: Option<SpanFactory>,
    ) -> Self {
        MessageScope {
            state,
            overlay: Overlay::default(),
            emit_bytes: 0,
            write_count: 0,
            quota: None,
            host_error: None,
            stdio_budget: budget.clone(),
            log_span: LogSpan {
                factory: log_span,
                span: None,
            },
        }
    }
}

/// Makes the tracing span of one message's guest logs (handler, key,
/// offset, ...); see [`HandlerModule::invoke_in`].
pub type SpanFactory = Arc<dyn Fn() -> tracing::Span + Send + Sync>;

/// The log span, made from its factory when first needed.
struct LogSpan {
    factory: Option<SpanFactory>,
    span: Option<tracing::Span>,
}

impl LogSpan {
    fn get(&mut self) -> &tracing::Span {
        let factory = &self.factory;
        self.span.get_or_insert_with(|| make_span(factory.as_ref()))
    }
}

/// The span `factory` makes (none without one).
pub(crate) fn make_span(factory: Option<&SpanFactory>) -> tracing::Span {
    factory.map_or_else(tracing::Span::none, |make| make())
}

/// The locked-down WASI context of one invocation: no preopens, sockets,
/// environment or arguments; stdout/stderr go to tracing, size-capped.
fn wasi_ctx(budget: &Arc<Budget>, span: Option<&SpanFactory>) -> WasiCtx {
    WasiCtxBuilder::new()
        .stdout(LogSink::new(Stream::Stdout, budget.clone(), span.cloned()))
        .stderr(LogSink::new(Stream::Stderr, budget.clone(), span.cloned()))
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .build()
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        let wasi = match self.wasi.take() {
            Some(wasi) => wasi,
            None => wasi_ctx(&self.msg.stdio_budget, self.msg.log_span.factory.as_ref()),
        };
        WasiCtxView {
            ctx: self.wasi.insert(wasi),
            table: &mut self.table,
        }
    }
}

impl HostState {
    /// Readies a kept instance's state for its next message: everything
    /// the host counts or buffers per message starts afresh.
    fn begin(&mut self, msg: MessageScope) {
        self.msg = msg;
        self.limiter.hit = None;
    }

    fn over_quota(&mut self, what: String) -> wasmtime::Error {
        let err = wasmtime::format_err!("{what}");
        self.msg.quota = Some(what);
        err
    }
}

impl types::Host for HostState {}

impl state::Host for HostState {
    fn get(&mut self, key: String) -> wasmtime::Result<Option<Vec<u8>>> {
        if let Some(pending) = self.msg.overlay.writes.get(&key) {
            return Ok(pending.clone());
        }
        match self.msg.state.get(&key) {
            Ok(value) => Ok(value),
            Err(e) => {
                let text = format!("reading state key {key:?}: {e:#}");
                self.msg.host_error = Some(text.clone());
                Err(wasmtime::format_err!("{text}"))
            }
        }
    }

    fn set(&mut self, key: String, value: Vec<u8>) -> wasmtime::Result<()> {
        if value.len() > self.limits.max_state_value_bytes {
            return Err(self.over_quota(format!(
                "state value for key {key:?} is {} bytes, over the {}-byte limit",
                value.len(),
                self.limits.max_state_value_bytes
            )));
        }
        self.count_write()?;
        self.msg.overlay.writes.insert(key, Some(value));
        Ok(())
    }

    fn delete(&mut self, key: String) -> wasmtime::Result<()> {
        self.count_write()?;
        self.msg.overlay.writes.insert(key, None);
        Ok(())
    }
}

impl HostState {
    fn count_write(&mut self) -> wasmtime::Result<()> {
        self.msg.write_count += 1;
        if self.msg.write_count > self.limits.max_state_writes {
            return Err(self.over_quota(format!(
                "more than {} state writes in one message",
                self.limits.max_state_writes
            )));
        }
        Ok(())
    }
}

impl outbox::Host for HostState {
    fn emit(
        &mut self,
        topic: String,
        partition_key: String,
        payload: Vec<u8>,
        headers: Vec<(String, String)>,
    ) -> wasmtime::Result<()> {
        self.msg.emit_bytes += payload.len();
        if self.msg.overlay.emits.len() >= self.limits.max_emits {
            return Err(self.over_quota(format!(
                "more than {} outbox emits in one message",
                self.limits.max_emits
            )));
        }
        if self.msg.emit_bytes > self.limits.max_emit_bytes {
            return Err(self.over_quota(format!(
                "more than {} bytes emitted in one message",
                self.limits.max_emit_bytes
            )));
        }
        if topic.is_empty() || partition_key.is_empty() {
            return Err(
                self.over_quota("outbox emit with an empty topic or partition key".to_string())
            );
        }
        self.msg.overlay.emits.push(Emit {
            topic,
            partition_key,
            payload,
            headers,
        });
        Ok(())
    }
}

impl log::Host for HostState {
    fn log(&mut self, level: Level, message: String) -> wasmtime::Result<()> {
        if self.msg.overlay.logs.len() >= self.limits.max_log_lines {
            self.msg.overlay.dropped_log_lines += 1;
            return Ok(());
        }
        // The message's span is made only for a line that is recorded.
        macro_rules! record {
            ($level:expr) => {
                if tracing::enabled!(target: "ordo::guest", $level) {
                    let _span = self.msg.log_span.get().enter();
                    tracing::event!(target: "ordo::guest", $level, "{message}");
                }
            };
        }
        match level {
            Level::Trace => record!(tracing::Level::TRACE),
            Level::Debug => record!(tracing::Level::DEBUG),
            Level::Info => record!(tracing::Level::INFO),
            Level::Warn => record!(tracing::Level::WARN),
            Level::Error => record!(tracing::Level::ERROR),
        }
        self.msg.overlay.logs.push(LogLine { level, message });
        Ok(())
    }
}

/// A loaded handler version: a pre-linked component ready to instantiate.
///
/// Cheap to clone; share it between lanes.
#[derive(Clone)]
pub struct HandlerModule {
    pre: HandlerPre<HostState>,
    /// Keeps the runtime, and with it the epoch ticker that enforces
    /// deadlines, alive as long as a module of it can run; its reaper
    /// drops used instances.
    runtime: super::Runtime,
    content_hash: Arc<str>,
    size: usize,
    limits: Arc<HandlerLimits>,
    deadline_ticks: u64,
}

impl std::fmt::Debug for HandlerModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandlerModule")
            .field("content_hash", &self.content_hash)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl HandlerModule {
    pub(crate) fn new(
        runtime: super::Runtime,
        pre: HandlerPre<HostState>,
        content_hash: String,
        size: usize,
        limits: HandlerLimits,
        tick: Duration,
    ) -> Self {
        let tick_ns = tick.as_nanos().max(1);
        let deadline_ticks = limits.deadline().as_nanos().div_ceil(tick_ns).max(1) as u64;
        HandlerModule {
            pre,
            runtime,
            content_hash: content_hash.into(),
            size,
            limits: Arc::new(limits),
            deadline_ticks,
        }
    }

    /// SHA-256 of the component bytes, lower-case hex.
    pub fn content_hash(&self) -> &str {
        &self.content_hash
    }

    /// Size of the component in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The limits applied to each invocation.
    pub fn limits(&self) -> &HandlerLimits {
        &self.limits
    }

    fn new_store(&self, msg: MessageScope) -> Store<HostState> {
        let limits = &self.limits;
        let host = HostState {
            msg,
            limits: limits.clone(),
            limiter: Limiter {
                memory_bytes: limits.memory_bytes,
                table_elements: limits.table_elements,
                instances: limits.instances,
                hit: None,
                grew: false,
            },
            wasi: None,
            table: ResourceTable::new(),
        };
        let mut store = Store::new(self.pre.engine(), host);
        store.limiter(|s| &mut s.limiter);
        store.set_epoch_deadline(self.deadline_ticks);
        store
    }

    /// A [`Session`] of this version: runs messages one after another,
    /// reusing an instance as [`HandlerLimits::messages_per_instance`]
    /// allows.
    pub fn session(&self) -> Session<'_> {
        Session {
            module: self,
            live: None,
        }
    }

    /// Benchmark helper: instantiates once and times `n` calls of `handle`
    /// on the same instance (no isolation between calls: never use this for
    /// real messages).
    #[doc(hidden)]
    pub fn bench_warm_calls(&self, msg: &Message, n: usize) -> anyhow::Result<Vec<Duration>> {
        let budget = Budget::new(self.limits.max_stdio_bytes);
        let mut store = self.new_store(MessageScope::new(
            Box::new(MemoryState::default()),
            &budget,
            None,
        ));
        let handler = self.pre.instantiate(&mut store)?;
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            store.set_epoch_deadline(self.deadline_ticks);
            let start = Instant::now();
            let result = handler.call_handle(&mut store, msg)?;
            samples.push(start.elapsed());
            if let Err(e) = result {
                anyhow::bail!("handler failed: {e:?}");
            }
        }
        Ok(samples)
    }

    /// Runs `handle(msg)` in a fresh instance, reading committed state through
    /// `state`, and returns what it did together with `state` (so a caller can
    /// keep a cache across invocations without sharing it).
    ///
    /// Blocking; call it from a thread that may block (not an async task).
    pub fn invoke(
        &self,
        msg: &Message,
        state: Box<dyn StateAccess>,
    ) -> (Invocation, Box<dyn StateAccess>) {
        self.invoke_in(msg, state, None)
    }

    /// [`invoke`](Self::invoke), recording the guest's log lines and
    /// output in the span `log_span` makes (made only for a line that the
    /// log filter keeps).
    pub fn invoke_in(
        &self,
        msg: &Message,
        state: Box<dyn StateAccess>,
        log_span: Option<SpanFactory>,
    ) -> (Invocation, Box<dyn StateAccess>) {
        self.session().invoke_in(msg, state, log_span)
    }
}

/// Runs one version's messages one after another (the messages of one lane
/// batch), each in a fresh instance unless the version's
/// [`HandlerLimits::messages_per_instance`] lets an instance run several.
///
/// An instance runs the next message only if the message before it
/// succeeded and the guest made no WASI call (whose resources and output
/// sinks belong to one message); its linear memory, globals and tables
/// carry over, while everything the host keeps per message (overlay,
/// quotas, deadline, output budget, log span) starts afresh. Dropping the
/// session drops its instance.
pub struct Session<'m> {
    module: &'m HandlerModule,
    live: Option<Live>,
}

/// An instance kept for the session's next message.
struct Live {
    store: Store<HostState>,
    handler: Handler,
    /// Messages it has run.
    messages: u32,
}

/// Stands in for the state access of an instance between two messages.
struct NoState;

impl StateAccess for NoState {
    fn get(&mut self, _key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(None)
    }

    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send> {
        self
    }
}

impl std::fmt::Debug for Session<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("module", &self.module)
            .field("live_messages", &self.live.as_ref().map(|l| l.messages))
            .finish()
    }
}

impl Session<'_> {
    /// Runs `handle(msg)` as [`HandlerModule::invoke_in`] does, in the
    /// session's instance if it may run another message, else in a fresh
    /// one.
    ///
    /// A message that traps, hits the memory limit or overflows the stack
    /// in a kept instance runs again in a fresh one, whose outcome counts:
    /// what an instance's history left behind (memory it leaked, data it
    /// broke) is not the message's failure. A fresh instance's failure, a
    /// deadline (which would cost a second deadline) and an error the
    /// handler returned are the message's own.
    pub fn invoke_in(
        &mut self,
        msg: &Message,
        state: Box<dyn StateAccess>,
        log_span: Option<SpanFactory>,
    ) -> (Invocation, Box<dyn StateAccess>) {
        let (first, state, kept) = self.run(msg, state, log_span.clone());
        let history = matches!(
            &first.outcome,
            Err(f) if matches!(
                f.kind,
                FailureKind::Trap | FailureKind::MemoryLimit | FailureKind::StackOverflow
            )
        );
        if !(kept && history) {
            return (first, state);
        }
        // The failed instance was dropped: this one is fresh.
        let (mut again, state, _) = self.run(msg, state, log_span);
        again.elapsed += first.elapsed;
        (again, state)
    }

    /// Runs `handle(msg)` once, in the kept instance if there is one; also
    /// says whether it was a kept one.
    fn run(
        &mut self,
        msg: &Message,
        state: Box<dyn StateAccess>,
        log_span: Option<SpanFactory>,
    ) -> (Invocation, Box<dyn StateAccess>, bool) {
        let start = Instant::now();
        let module = self.module;
        let limits = &module.limits;
        let budget = Budget::new(limits.max_stdio_bytes);
        let msg_scope = MessageScope::new(state, &budget, log_span);
        let kept = self.live.is_some();
        let grew_before = self
            .live
            .as_ref()
            .is_some_and(|live| live.store.data().limiter.grew);
        let (mut store, instance) = match self.live.take() {
            Some(mut live) => {
                live.store.data_mut().begin(msg_scope);
                live.store.set_epoch_deadline(module.deadline_ticks);
                (live.store, Ok((live.handler, live.messages)))
            }
            None => {
                let mut store = module.new_store(msg_scope);
                let handler = module.pre.instantiate(&mut store);
                (store, handler.map(|h| (h, 0)))
            }
        };
        let (handler, messages, result) = match instance {
            Ok((handler, messages)) => {
                let result = handler.call_handle(&mut store, msg);
                (Some(handler), messages, result)
            }
            Err(e) => (None, 0, Err(e)),
        };
        let fresh_instance = !kept && handler.is_some();
        let host = store.data_mut();
        let outcome = match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(HandlerError::Retryable(text))) => {
                Err(Failure::new(FailureKind::Retryable, text))
            }
            Ok(Err(HandlerError::Permanent(text))) => {
                Err(Failure::new(FailureKind::Permanent, text))
            }
            Err(err) => Err(classify_error(host, handler.is_some(), err, limits)),
        };
        let mut overlay = std::mem::take(&mut host.msg.overlay);
        let state = std::mem::replace(&mut host.msg.state, Box::new(NoState));
        overlay.dropped_stdio_bytes = budget.dropped();
        if outcome.is_err() {
            overlay.writes.clear();
            overlay.emits.clear();
        }
        let grown = host.limiter.grew;
        let messages = messages + 1;
        let keep = outcome.is_ok()
            && host.wasi.is_none()
            && messages < limits.messages_per_instance.max(1);
        match handler {
            Some(handler) if keep => {
                self.live = Some(Live {
                    store,
                    handler,
                    messages,
                })
            }
            // Dropped here: its output sinks may still hold a line to log
            // (in order with the message's other lines); or its memory
            // grew, and the next instantiation in its slot changes the
            // slot's protection back, which would then interrupt the
            // reaper's core as well (a TLB shootdown; measured, it doubled
            // the cost of such messages).
            _ if host.wasi.is_some() || grown => drop(store),
            _ => module.runtime.reaper().reap(store),
        }
        let invocation = Invocation {
            outcome,
            overlay,
            elapsed: start.elapsed(),
            fresh_instance,
            memory_grew: grown && !grew_before,
        };
        (invocation, state, kept)
    }
}

/// Maps a wasmtime error of one invocation to a [`Failure`].
fn classify_error(
    host: &mut HostState,
    instantiated: bool,
    err: wasmtime::Error,
    limits: &HandlerLimits,
) -> Failure {
    if let Some(text) = host.msg.host_error.take() {
        return Failure::new(FailureKind::Host, text);
    }
    if let Some(text) = host.msg.quota.take() {
        return Failure::new(FailureKind::QuotaExceeded, text);
    }
    if let Some(text) = host.limiter.hit.take() {
        return Failure::new(FailureKind::MemoryLimit, text);
    }
    if let Some(exit) = err.downcast_ref::<wasmtime_wasi::I32Exit>() {
        return Failure::new(FailureKind::Trap, format!("guest called exit({})", exit.0));
    }
    match err.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => Failure::new(
            FailureKind::Deadline,
            format!("handler ran past its {} ms deadline", limits.deadline_ms),
        ),
        Some(Trap::StackOverflow) => Failure::new(
            FailureKind::StackOverflow,
            format!("wasm stack exhausted (deep recursion): {err:#}"),
        ),
        Some(_) => Failure::new(FailureKind::Trap, format!("{err:#}")),
        // Instantiation failing for reasons other than the guest's own
        // limits (e.g. the instance pool is exhausted) is the host's problem.
        None if !instantiated => {
            Failure::new(FailureKind::Host, format!("instantiation failed: {err:#}"))
        }
        None => Failure::new(FailureKind::Trap, format!("{err:#}")),
    }
}
