//! The sandbox on its own: handler behaviour through the real runtime, and
//! hostile components contained.

use std::time::{Duration, Instant};

use ordo::runtime::{
    FailureKind, HandlerLimits, HandlerModule, LoadError, MemoryState, Message, Overlay, Runtime,
    RuntimeConfig,
};

use crate::fixtures::{component_from_core, handler_bytes, HANDLE_SIG};

fn runtime() -> Runtime {
    Runtime::new(RuntimeConfig::default()).expect("runtime starts")
}

fn message(key: &str, seq: u64, payload: &str) -> Message {
    Message {
        topic: "t".into(),
        partition_key: key.into(),
        idempotency_key: format!("{key}-{seq}"),
        offset: seq,
        payload: payload.as_bytes().to_vec(),
        headers: vec![("h".into(), "v".into())],
        attempt: 1,
    }
}

/// Runs one message against `state`, applying the overlay on success.
fn run(
    module: &HandlerModule,
    state: &mut MemoryState,
    msg: &Message,
) -> ordo::runtime::Invocation {
    let (invocation, _) = module.invoke(msg, Box::new(state.clone()));
    if invocation.outcome.is_ok() {
        state.apply(&invocation.overlay);
    }
    invocation
}

fn text(overlay: &Overlay, key: &str) -> Option<String> {
    overlay
        .writes
        .get(key)
        .cloned()
        .flatten()
        .map(|v| String::from_utf8(v).expect("utf-8 state"))
}

/// A built handler (`target/handlers/<name>.wasm`), with the default limits.
fn load(runtime: &Runtime, name: &str) -> HandlerModule {
    runtime
        .load(&handler_bytes(name), HandlerLimits::default())
        .unwrap_or_else(|e| panic!("{name} loads: {e}"))
}

fn counter(runtime: &Runtime) -> HandlerModule {
    load(runtime, "counter")
}

/// The counter still behaves after whatever the caller did to the runtime.
fn assert_counter_works(runtime: &Runtime) {
    let module = counter(runtime);
    let mut state = MemoryState::default();
    for seq in 1..=3 {
        let inv = run(
            &module,
            &mut state,
            &message("k", seq, &format!(r#"{{"seq":{seq}}}"#)),
        );
        assert_eq!(inv.outcome, Ok(()));
    }
    assert_eq!(
        state.0.get("seqs").map(|v| v.as_slice()),
        Some(&b"1,2,3"[..])
    );
    assert_eq!(state.0.get("count").map(|v| v.as_slice()), Some(&b"3"[..]));
}

#[test]
fn counter_appends_seq_and_counts() {
    let runtime = runtime();
    let module = counter(&runtime);
    let mut state = MemoryState::default();

    let first = run(&module, &mut state, &message("k", 1, r#"{"seq":1}"#));
    assert_eq!(first.outcome, Ok(()));
    assert_eq!(text(&first.overlay, "seqs").as_deref(), Some("1"));
    assert_eq!(text(&first.overlay, "count").as_deref(), Some("1"));
    assert!(first.overlay.emits.is_empty());
    assert!(
        !first.overlay.logs.is_empty(),
        "counter logs one line per message"
    );

    let second = run(
        &module,
        &mut state,
        &message("k", 7, r#"{"seq":7,"other":true}"#),
    );
    assert_eq!(second.outcome, Ok(()));
    assert_eq!(text(&second.overlay, "seqs").as_deref(), Some("1,7"));
    assert_eq!(text(&second.overlay, "count").as_deref(), Some("2"));
}

#[test]
fn counter_errors_leave_state_untouched() {
    let runtime = runtime();
    let module = counter(&runtime);
    let mut state = MemoryState::default();
    run(&module, &mut state, &message("k", 1, r#"{"seq":1}"#));

    let retry = run(
        &module,
        &mut state,
        &message("k", 2, r#"{"seq":2,"fail":"retryable"}"#),
    );
    let failure = retry.outcome.expect_err("retryable fails");
    assert_eq!(failure.kind, FailureKind::Retryable);
    assert!(retry.overlay.writes.is_empty());

    let perm = run(
        &module,
        &mut state,
        &message("k", 3, r#"{"seq":3,"fail":"permanent"}"#),
    );
    assert_eq!(
        perm.outcome.expect_err("permanent fails").kind,
        FailureKind::Permanent
    );
    assert!(perm.overlay.writes.is_empty());

    let garbage = run(&module, &mut state, &message("k", 4, "not json"));
    assert_eq!(
        garbage.outcome.expect_err("garbage fails").kind,
        FailureKind::Permanent
    );

    let trap = run(
        &module,
        &mut state,
        &message("k", 5, r#"{"seq":5,"fail":"trap"}"#),
    );
    assert_eq!(
        trap.outcome.expect_err("trap fails").kind,
        FailureKind::Trap
    );

    assert_eq!(state.0.get("seqs").map(|v| v.as_slice()), Some(&b"1"[..]));
    assert_eq!(state.0.get("count").map(|v| v.as_slice()), Some(&b"1"[..]));
}

#[test]
fn counter_emits_payload_without_emit_field() {
    let runtime = runtime();
    let module = counter(&runtime);
    let mut state = MemoryState::default();
    let inv = run(
        &module,
        &mut state,
        &message(
            "k",
            1,
            r#"{"seq":1,"emit":{"topic":"out","key":"other"},"x":5}"#,
        ),
    );
    assert_eq!(inv.outcome, Ok(()));
    assert_eq!(inv.overlay.emits.len(), 1);
    let emit = &inv.overlay.emits[0];
    assert_eq!(emit.topic, "out");
    assert_eq!(emit.partition_key, "other");
    let payload: serde_json::Value = serde_json::from_slice(&emit.payload).expect("json payload");
    assert_eq!(payload, serde_json::json!({"seq": 1, "x": 5}));
    assert_eq!(emit.headers, vec![("h".to_string(), "v".to_string())]);
    assert_eq!(text(&inv.overlay, "seqs").as_deref(), Some("1"));
}

fn account_balance(state: &MemoryState) -> i64 {
    let raw = state.0.get("account").expect("account state");
    let value: serde_json::Value = serde_json::from_slice(raw).expect("account json");
    value["balance"].as_i64().expect("balance")
}

#[test]
fn bank_deposit_withdraw_transfer() {
    let runtime = runtime();
    let module = load(&runtime, "bank");
    let mut alice = MemoryState::default();

    let dep = run(
        &module,
        &mut alice,
        &message("alice", 1, r#"{"op":"deposit","amount":100}"#),
    );
    assert_eq!(dep.outcome, Ok(()));
    assert_eq!(account_balance(&alice), 100);

    let wd = run(
        &module,
        &mut alice,
        &message("alice", 2, r#"{"op":"withdraw","amount":30}"#),
    );
    assert_eq!(wd.outcome, Ok(()));
    assert_eq!(account_balance(&alice), 70);

    let over = run(
        &module,
        &mut alice,
        &message("alice", 3, r#"{"op":"withdraw","amount":71}"#),
    );
    assert_eq!(
        over.outcome.expect_err("overdraft").kind,
        FailureKind::Permanent
    );
    assert!(over.overlay.writes.is_empty());
    assert_eq!(account_balance(&alice), 70);

    let xfer = run(
        &module,
        &mut alice,
        &message("alice", 4, r#"{"op":"transfer","amount":20,"to":"bob"}"#),
    );
    assert_eq!(xfer.outcome, Ok(()));
    assert_eq!(account_balance(&alice), 50);
    assert_eq!(xfer.overlay.emits.len(), 1);
    let emit = &xfer.overlay.emits[0];
    assert_eq!(emit.partition_key, "bob");
    assert_eq!(emit.topic, "t");
    let deposit: serde_json::Value = serde_json::from_slice(&emit.payload).expect("json");
    assert_eq!(deposit["op"], "deposit");
    assert_eq!(deposit["amount"], 20);

    let mut bob = MemoryState::default();
    let credit = Message {
        payload: emit.payload.clone(),
        ..message("bob", 1, "")
    };
    assert_eq!(run(&module, &mut bob, &credit).outcome, Ok(()));
    assert_eq!(account_balance(&bob), 20);

    let bad = run(
        &module,
        &mut bob,
        &message("bob", 2, r#"{"op":"steal","amount":5}"#),
    );
    assert_eq!(
        bad.outcome.expect_err("bad op").kind,
        FailureKind::Permanent
    );
    let negative = run(
        &module,
        &mut bob,
        &message("bob", 3, r#"{"op":"deposit","amount":-5}"#),
    );
    assert_eq!(
        negative.outcome.expect_err("negative").kind,
        FailureKind::Permanent
    );
}

fn load_core(runtime: &Runtime, body: &str, limits: HandlerLimits) -> HandlerModule {
    runtime
        .load(&component_from_core(body), limits)
        .expect("fixture component loads")
}

fn invoke_once(module: &HandlerModule) -> ordo::runtime::Invocation {
    module
        .invoke(&message("k", 1, "{}"), Box::new(MemoryState::default()))
        .0
}

#[test]
fn wat_fixture_ok_handler_runs() {
    let runtime = runtime();
    let module = load_core(
        &runtime,
        &format!("(func {HANDLE_SIG} (i32.const 0))"),
        HandlerLimits::default(),
    );
    assert_eq!(invoke_once(&module).outcome, Ok(()));
}

/// Every message gets a fresh instance: memory written by one invocation
/// (below and beyond the part of a pool slot kept resident between
/// instances), grown memory and globals are back to their initial values in
/// the next one. The handler traps if it sees anything left over.
#[test]
fn no_state_survives_between_invocations() {
    let runtime = runtime();
    let module = load_core(
        &runtime,
        &format!(
            r#"(global $seen (mut i32) (i32.const 0))
  (func {HANDLE_SIG}
    (if (i32.ne (memory.size) (i32.const 1)) (then unreachable))
    (if (i32.ne (global.get $seen) (i32.const 0)) (then unreachable))
    (if (i32.ne (i32.load (i32.const 2048)) (i32.const 0)) (then unreachable))
    (global.set $seen (i32.const 1))
    (i32.store (i32.const 2048) (i32.const 0x5eed))
    ;; grow to 3 MiB and dirty a page past the 2 MiB kept resident
    (drop (memory.grow (i32.const 47)))
    (i32.store (i32.const 2900000) (i32.const 0x5eed))
    (i32.const 0))"#
        ),
        HandlerLimits::default(),
    );
    for i in 0..50 {
        let inv = invoke_once(&module);
        assert_eq!(
            inv.outcome,
            Ok(()),
            "invocation {i} saw a previous one's memory"
        );
    }
}

#[test]
fn infinite_loop_hits_deadline() {
    let runtime = runtime();
    let limits = HandlerLimits {
        deadline_ms: 200,
        ..HandlerLimits::default()
    };
    let module = load_core(
        &runtime,
        &format!("(func {HANDLE_SIG} (loop $l (br $l)) (i32.const 0))"),
        limits,
    );
    let start = Instant::now();
    let inv = invoke_once(&module);
    let elapsed = start.elapsed();
    assert_eq!(
        inv.outcome.expect_err("loop stopped").kind,
        FailureKind::Deadline
    );
    assert!(
        elapsed < Duration::from_millis(400),
        "deadline 200 ms, stopped after {elapsed:?}"
    );
    assert_counter_works(&runtime);
}

#[test]
fn memory_growth_past_limit_is_stopped() {
    let runtime = runtime();
    let limits = HandlerLimits {
        memory_bytes: 8 << 20,
        ..HandlerLimits::default()
    };
    // Grows 1 MiB at a time until refused, then traps.
    let module = load_core(
        &runtime,
        &format!(
            "(func {HANDLE_SIG} (loop $l (br_if $l (i32.ne (memory.grow (i32.const 16)) (i32.const -1)))) unreachable)"
        ),
        limits,
    );
    let failure = invoke_once(&module).outcome.expect_err("bomb stopped");
    assert_eq!(failure.kind, FailureKind::MemoryLimit, "{failure}");
    assert_counter_works(&runtime);
}

#[test]
fn table_growth_past_limit_is_stopped() {
    let runtime = runtime();
    let limits = HandlerLimits {
        table_elements: 10_000,
        ..HandlerLimits::default()
    };
    // Grows its table 1,000 elements at a time until refused, then traps.
    let module = load_core(
        &runtime,
        &format!(
            "(table $t 1 funcref)
             (func {HANDLE_SIG}
               (loop $l (br_if $l (i32.ne (table.grow $t (ref.null func) (i32.const 1000)) (i32.const -1))))
               unreachable)"
        ),
        limits,
    );
    let failure = invoke_once(&module)
        .outcome
        .expect_err("table bomb stopped");
    assert_eq!(failure.kind, FailureKind::MemoryLimit, "{failure}");
    assert!(failure.message.contains("table growth"), "{failure}");
    assert_counter_works(&runtime);
}

#[test]
fn deep_recursion_is_stopped() {
    let runtime = runtime();
    let module = load_core(
        &runtime,
        &format!(
            "(func $r (param i32) (result i32) (call $r (i32.add (local.get 0) (i32.const 1))))
             (func {HANDLE_SIG} (call $r (i32.const 0)))"
        ),
        HandlerLimits::default(),
    );
    let failure = invoke_once(&module).outcome.expect_err("recursion stopped");
    assert_eq!(failure.kind, FailureKind::StackOverflow, "{failure}");
    assert_counter_works(&runtime);
}

#[test]
fn trap_is_reported() {
    let runtime = runtime();
    let module = load_core(
        &runtime,
        &format!("(func {HANDLE_SIG} unreachable)"),
        HandlerLimits::default(),
    );
    let failure = invoke_once(&module).outcome.expect_err("trap");
    assert_eq!(failure.kind, FailureKind::Trap);
    assert!(failure.message.contains("unreachable"), "{failure}");
    assert_counter_works(&runtime);
}

/// The SDK logs a Rust handler's panic, message and location, before the
/// trap, whichever target it was built for.
#[test]
fn a_rust_handlers_panic_is_logged_with_its_message() {
    let runtime = runtime();
    for name in ["counter", "counter-wasip2"] {
        let module = load(&runtime, name);
        let mut state = MemoryState::default();
        let inv = run(
            &module,
            &mut state,
            &message("k", 7, r#"{"seq":7,"fail":"trap"}"#),
        );
        let failure = inv.outcome.expect_err("a trap");
        assert_eq!(failure.kind, FailureKind::Trap, "{name}: {failure}");
        let line = inv
            .overlay
            .logs
            .iter()
            .find(|l| l.message.contains("seq 7: asked to trap"))
            .unwrap_or_else(|| panic!("{name}: no panic line in {:?}", inv.overlay.logs));
        assert_eq!(line.level, ordo::runtime::Level::Error, "{name}");
        assert!(
            line.message.contains("panicked at") && line.message.contains(".rs:"),
            "{name}: {}",
            line.message
        );
    }
}

/// Rust handlers are built for `wasm32-unknown-unknown`: they import no
/// WASI, and the SDK's allocator serves a message from the initial memory,
/// so that a fresh instance does not grow it (which costs about as much
/// again). The `wasm32-wasip2` build of the no-op shows what that avoids.
/// Past the SDK's 512 KiB arena a message grows the memory, unless the
/// handler was linked with a larger initial memory, whose tail the SDK's
/// allocator hands out first (`noop-initial-memory`: 4 MiB).
#[test]
fn rust_handlers_import_no_wasi_and_fit_their_initial_memory() {
    let runtime = runtime();
    for name in ["noop", "counter", "counter-fixed", "bank"] {
        let bytes = handler_bytes(name);
        assert!(
            !bytes.windows(5).any(|w| w == b"wasi:"),
            "{name} imports WASI"
        );
    }
    assert!(handler_bytes("noop-wasip2")
        .windows(5)
        .any(|w| w == b"wasi:"));

    let big = "x".repeat(256 << 10);
    let bigger = "x".repeat(2 << 20);
    let cases = [
        ("noop", big.as_str(), false),
        ("counter", r#"{"seq":1}"#, false),
        ("noop-wasip2", big.as_str(), true),
        ("noop", bigger.as_str(), true),
        ("noop-initial-memory", big.as_str(), false),
        ("noop-initial-memory", bigger.as_str(), false),
    ];
    for (name, payload, grows) in cases {
        let module = load(&runtime, name);
        let (inv, _) = module.invoke(&message("k", 1, payload), Box::new(MemoryState::default()));
        assert_eq!(inv.outcome, Ok(()), "{name}, {} bytes", payload.len());
        assert_eq!(inv.memory_grew, grows, "{name}, {} bytes", payload.len());
    }
}

#[test]
fn forbidden_import_is_rejected_by_name() {
    let runtime = runtime();
    let component =
        wat::parse_str(r#"(component (import "wasi:sockets/tcp@0.2.0" (instance)))"#).expect("wat");
    let err = runtime
        .load(&component, HandlerLimits::default())
        .expect_err("forbidden import");
    assert!(
        matches!(&err, LoadError::ForbiddenImport { import } if import == "wasi:sockets/tcp@0.2.0"),
        "{err}"
    );
    assert!(err.to_string().contains("wasi:sockets/tcp@0.2.0"));
    assert_counter_works(&runtime);
}

#[test]
fn core_module_and_garbage_are_rejected_clearly() {
    let runtime = runtime();
    let core = wat::parse_str("(module)").expect("wat");
    let err = runtime
        .load(&core, HandlerLimits::default())
        .expect_err("core module");
    assert!(matches!(err, LoadError::NotAComponent), "{err}");
    assert!(err.to_string().contains("not a component"));

    let err = runtime
        .load(b"definitely not wasm", HandlerLimits::default())
        .expect_err("garbage");
    assert!(matches!(err, LoadError::NotWasm), "{err}");

    let empty = wat::parse_str("(component)").expect("wat");
    let err = runtime
        .load(&empty, HandlerLimits::default())
        .expect_err("no export");
    assert!(matches!(err, LoadError::WrongWorld(_)), "{err}");
    assert!(err.to_string().contains("handle"), "{err}");

    let small = Runtime::new(RuntimeConfig {
        max_component_bytes: 1024,
        ..RuntimeConfig::default()
    })
    .expect("runtime");
    let err = small
        .load(&handler_bytes("counter"), HandlerLimits::default())
        .expect_err("oversize");
    assert!(matches!(err, LoadError::TooLarge { .. }), "{err}");
    assert_counter_works(&runtime);
}

/// Used instances are dropped by the reaper when it gets a core; the ones
/// it holds keep their pool slots until then, and must never leave a
/// message without an instance. As many threads as the runtime runs at
/// once (more than the cores, so the idle-priority reaper rarely runs)
/// each run fresh messages back to back: every one succeeds.
#[test]
fn used_instances_waiting_to_be_dropped_never_take_a_message_slot() {
    const AT_ONCE: u32 = 4;
    let runtime = Runtime::new(RuntimeConfig {
        max_concurrent_instances: AT_ONCE,
        ..RuntimeConfig::default()
    })
    .expect("runtime");
    let module = counter(&runtime);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..AT_ONCE)
            .map(|t| {
                let module = module.clone();
                scope.spawn(move || {
                    let key = format!("k{t}");
                    for seq in 1..=300u64 {
                        let msg = message(&key, seq, &format!(r#"{{"seq":{seq}}}"#));
                        let (inv, _) = module.invoke(&msg, Box::new(MemoryState::default()));
                        assert_eq!(inv.outcome, Ok(()), "thread {t}, message {seq}");
                        assert!(inv.fresh_instance);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().expect("worker thread");
        }
    });
    assert_counter_works(&runtime);
}

#[test]
fn compiled_artifacts_are_cached_on_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = RuntimeConfig {
        cache_dir: Some(dir.path().to_path_buf()),
        ..RuntimeConfig::default()
    };
    let first = Runtime::new(config.clone()).expect("runtime");
    let module = counter(&first);
    let files: Vec<_> = std::fs::read_dir(dir.path())
        .expect("cache dir")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(files.len(), 1, "one artifact: {files:?}");
    let name = files[0]
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    assert!(name.starts_with(module.content_hash()), "{name}");

    // A second runtime loads from the cache; a corrupt artifact is replaced.
    let second = Runtime::new(config.clone()).expect("runtime");
    assert_counter_works(&second);
    // Replaced, not rewritten in place: the second runtime still maps the
    // file (instances it ran may be waiting for the reaper), and a mapped
    // file cut short faults its readers, which is why the cache itself
    // only ever renames new files into place.
    let corrupt = files[0].with_extension("corrupt");
    std::fs::write(&corrupt, b"corrupt").expect("corrupt artifact");
    std::fs::rename(&corrupt, &files[0]).expect("corrupt artifact in place");
    let third = Runtime::new(config).expect("runtime");
    assert_counter_works(&third);
    assert!(std::fs::read(&files[0]).expect("artifact").len() > 1000);
}

/// Runs `payloads` one after another in one session of the counter under
/// `limits`, each against the state the ones before it committed; returns
/// each message's outcome kind and the `instance_messages` it reported.
fn in_one_session(
    limits: HandlerLimits,
    payloads: &[&str],
) -> Vec<(Option<FailureKind>, Option<u64>)> {
    let module = runtime()
        .load(&handler_bytes("counter"), limits)
        .expect("counter loads");
    let mut session = module.session();
    let mut state = MemoryState::default();
    let mut seen = Vec::new();
    for (i, payload) in payloads.iter().enumerate() {
        let msg = message("k", i as u64, payload);
        let (inv, back) = session.invoke_in(&msg, Box::new(state.clone()), None);
        // The state handed in is handed back, whether the instance is kept.
        assert!(back.into_any().downcast::<MemoryState>().is_ok());
        if inv.outcome.is_ok() {
            state.apply(&inv.overlay);
        }
        seen.push((
            inv.outcome.err().map(|f| f.kind),
            text(&inv.overlay, "instance_messages").map(|n| n.parse().expect("a number")),
        ));
    }
    seen
}

fn ok(n: u64) -> (Option<FailureKind>, Option<u64>) {
    (None, Some(n))
}

/// By default every message of a session gets a fresh instance; with
/// `messages_per_instance = 3` an instance runs three, then a fresh one
/// takes over.
#[test]
fn a_session_reuses_an_instance_only_as_far_as_its_limit() {
    let report = r#"{"seq": 1, "report_instance": true}"#;
    assert_eq!(
        in_one_session(HandlerLimits::default(), &[report; 4]),
        vec![ok(1); 4]
    );
    let reuse = HandlerLimits {
        messages_per_instance: 3,
        ..HandlerLimits::default()
    };
    assert_eq!(
        in_one_session(reuse, &[report; 7]),
        [1, 2, 3, 1, 2, 3, 1].map(ok).to_vec()
    );
}

/// A message that fails in any way (an error returned, a trap, the
/// deadline) leaves its instance behind: the next message starts fresh.
#[test]
fn a_kept_instance_is_dropped_after_a_failed_message() {
    let limits = HandlerLimits {
        messages_per_instance: 100,
        deadline_ms: 100,
        ..HandlerLimits::default()
    };
    let report = r#"{"seq": 1, "report_instance": true}"#;
    let seen = in_one_session(
        limits,
        &[
            report,
            report,
            r#"{"seq": 2, "fail": "retryable"}"#,
            report,
            r#"{"seq": 3, "fail": "trap"}"#,
            report,
            report,
            r#"{"seq": 4, "fail": "spin"}"#,
            report,
            r#"{"seq": 5, "fail": "permanent"}"#,
            report,
        ],
    );
    assert_eq!(
        seen,
        vec![
            ok(1),
            ok(2),
            (Some(FailureKind::Retryable), None),
            ok(1),
            (Some(FailureKind::Trap), None),
            ok(1),
            ok(2),
            (Some(FailureKind::Deadline), None),
            ok(1),
            (Some(FailureKind::Permanent), None),
            ok(1),
        ]
    );
}

/// A kept instance that leaked memory hits the memory limit on a later
/// message; that message runs again in a fresh instance and succeeds, so
/// no message fails for what the ones before it left behind.
#[test]
fn a_message_that_fails_for_its_instance_history_runs_again_fresh() {
    let limits = limits_with_reuse();
    let leak = r#"{"seq": 1, "report_instance": true, "leak_kib": 1024}"#;
    let seen = in_one_session(limits, &[leak; 16]);
    assert!(
        seen.iter().all(|(failed, _)| failed.is_none()),
        "every message succeeds: {seen:?}"
    );
    let counts: Vec<u64> = seen.iter().filter_map(|(_, n)| *n).collect();
    assert_eq!(counts.len(), 16, "{seen:?}");
    // 1 MiB a message in 8 MiB: an instance runs a few, then the message
    // that found its memory full ran in a fresh one.
    let restarts = counts.windows(2).filter(|w| w[1] == 1).count();
    assert!(restarts >= 2, "fresh instances took over: {counts:?}");
    assert!(counts.iter().all(|&n| n < 8), "{counts:?}");
    // A message that fails in a fresh instance too is reported as such.
    let bomb = r#"{"seq": 2, "fail": "bomb"}"#;
    let report = r#"{"seq": 1, "report_instance": true}"#;
    let seen = in_one_session(limits_with_reuse(), &[report, bomb, report]);
    assert_eq!(
        seen,
        vec![ok(1), (Some(FailureKind::MemoryLimit), None), ok(1)]
    );
}

fn limits_with_reuse() -> HandlerLimits {
    HandlerLimits {
        messages_per_instance: 100,
        memory_bytes: 8 << 20,
        ..HandlerLimits::default()
    }
}

/// What the host counts per message starts afresh in a kept instance: a
/// quota of one emit per message lets every message emit once, and each
/// overlay holds that message's effects only.
#[test]
fn per_message_quotas_and_effects_start_afresh_in_a_kept_instance() {
    let module = runtime()
        .load(
            &handler_bytes("counter"),
            HandlerLimits {
                messages_per_instance: 10,
                max_emits: 1,
                ..HandlerLimits::default()
            },
        )
        .expect("counter loads");
    let mut session = module.session();
    let mut state = MemoryState::default();
    for seq in 1..=5u64 {
        let msg = message(
            "k",
            seq,
            &format!(
                r#"{{"seq": {seq}, "report_instance": true, "emit": {{"topic": "out", "key": "k{seq}"}}}}"#
            ),
        );
        let (inv, _) = session.invoke_in(&msg, Box::new(state.clone()), None);
        assert_eq!(inv.outcome, Ok(()), "message {seq}");
        assert_eq!(inv.overlay.emits.len(), 1, "message {seq}");
        assert_eq!(inv.overlay.emits[0].partition_key, format!("k{seq}"));
        assert_eq!(
            text(&inv.overlay, "instance_messages"),
            Some(seq.to_string())
        );
        state.apply(&inv.overlay);
    }
    let seqs = state
        .0
        .get("seqs")
        .map(|v| String::from_utf8_lossy(v).into_owned());
    assert_eq!(seqs.as_deref(), Some("1,2,3,4,5"));
}
