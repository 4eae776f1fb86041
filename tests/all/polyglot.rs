//! Conformance of the counter handler across languages: every language's
//! counter (`handlers/<lang>/counter`, built by `scripts/build-polyglot.sh`;
//! the Rust reference by `scripts/build-guests.sh`) runs through the same
//! scenarios on the real binary: order, duplicates, state, outbox emit,
//! retryable and permanent errors, bad input, traps, logging and a restart
//! that must load the compiled component from the artifact cache.
//!
//! One server per language; each component is compiled once per test (the
//! restart reuses the cached artifact). A missing component fails the test.
//! Run with `--nocapture` to see each language's size and timings.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use ordo::cli::client::Client;
use serde_json::{json, Value};

use crate::fixtures::{component_from_core, handler_bytes, HANDLE_SIG};
use crate::server::{state, wait_drained, wait_for, Server};

/// Retry policy of the counter under test: quick retries, and a dead letter
/// does not park the key (the scenarios carry on with later messages).
const POLICY: &str =
    "initial_backoff_ms=10&max_backoff_ms=50&max_attempts=3&on_failure=dead-letter";

/// The keys of the order scenario and how many messages each gets.
const ORDER_KEYS: [&str; 3] = ["a", "b", "c"];
const PER_KEY: u64 = 20;

/// What the sink sees of an emit: the Rust counter's exact bytes
/// (`serde_json` without `preserve_order`: keys sorted, compact).
const EMITTED: &str = r#"{"n":1.5,"seq":1,"x":{"a":[true,null,"q\"uote","é"],"b":-2}}"#;

fn msg(key: &str, seq: u64, extra: Value) -> Value {
    let mut payload = json!({ "seq": seq });
    if let (Some(p), Some(e)) = (payload.as_object_mut(), extra.as_object()) {
        p.extend(e.clone());
    }
    json!({ "key": key, "idempotency_key": format!("{key}/{seq}"), "payload": payload.to_string() })
}

/// A handler that dead-letters every message (a permanent error), so the
/// dead-letter queue shows exactly what the counter emitted.
fn sink() -> Vec<u8> {
    component_from_core(&format!(
        r#"(data (i32.const 16) "\01\00\00\00\01\00\00\00\20\00\00\00\04\00\00\00sink")
  (func {HANDLE_SIG} (i32.const 16))"#
    ))
}

async fn dlq(client: &Client, handler: &str, key: &str) -> Vec<Value> {
    let reply = client
        .get_json(&format!("/v1/dlq?handler={handler}&key={key}"))
        .await
        .expect("dlq list");
    reply["entries"].as_array().cloned().unwrap_or_default()
}

/// Waits until `key` of `handler` has `n` dead letters; returns them.
async fn dead_letters(client: &Client, handler: &str, key: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let entries = dlq(client, handler, key).await;
        if entries.len() >= n {
            return entries;
        }
        assert!(
            Instant::now() < deadline,
            "{handler}: waited for {n} dead letters of key {key}, have {entries:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Names and modification times of the compiled artifacts.
fn artifacts(data_dir: &Path) -> BTreeMap<String, SystemTime> {
    let dir = data_dir.join("compiled");
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading artifact cache {}: {e}", dir.display()));
    entries
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
        .map(|e| {
            let modified = e
                .metadata()
                .and_then(|m| m.modified())
                .expect("artifact mtime");
            (e.file_name().to_string_lossy().into_owned(), modified)
        })
        .collect()
}

/// The value of the sample `name{..}` whose labels mention `handler`.
async fn handler_sample(server: &Server, name: &str, handler: &str) -> Option<f64> {
    let text = reqwest::get(format!("{}/metrics", server.base_url()))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let label = format!("\"{handler}\"");
    text.lines().find_map(|line| {
        let (sample, value) = line.rsplit_once(' ')?;
        let labels = sample.strip_prefix(name)?.strip_prefix('{')?;
        labels
            .contains(&label)
            .then(|| value.parse().ok())
            .flatten()
    })
}

/// `text` without its terminal colour codes (ESC `[` ... `m`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

async fn counter_state(client: &Client, key: &str, state_key: &str) -> Option<String> {
    state(client, "counter", key, state_key).await
}

fn expected_seqs(from: u64, to: u64) -> String {
    (from..=to)
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Runs every scenario against one language's counter component.
async fn conformance(lang: &str, component: &str) {
    let bytes = handler_bytes(component);
    let log_dir = tempfile::tempdir().expect("tempdir");
    let log = log_dir.path().join("ordo.log");
    let mut server = Server::start_logging(&[], "warn,ordo::guest=debug", &log).await;
    let client = server.client();

    // Deploy: the first deploy compiles the component.
    let started = Instant::now();
    let deployed = client
        .put_bytes(
            &format!("/v1/handlers/counter?topic=in&{POLICY}"),
            bytes.clone(),
        )
        .await
        .unwrap_or_else(|e| panic!("{lang}: deploying {component} failed: {e:#}"));
    let deploy_time = started.elapsed();
    assert_eq!(deployed["version"], 1, "{lang}: {deployed}");
    client
        .put_bytes("/v1/handlers/sink?topic=out&on_failure=dead-letter", sink())
        .await
        .expect("deploy sink");

    // Order and state: three keys interleaved in one batch.
    let batch: Vec<Value> = (1..=PER_KEY)
        .flat_map(|seq| ORDER_KEYS.map(|k| msg(k, seq, json!({}))))
        .collect();
    client
        .produce("in", &Value::Array(batch))
        .await
        .expect("produce");
    let mut processed = PER_KEY * ORDER_KEYS.len() as u64;
    wait_drained(&client, "counter", processed).await;
    for key in ORDER_KEYS {
        assert_eq!(
            counter_state(&client, key, "seqs").await.as_deref(),
            Some(expected_seqs(1, PER_KEY).as_str()),
            "{lang}: per-key order of {key}"
        );
        assert_eq!(
            counter_state(&client, key, "count").await,
            Some(PER_KEY.to_string()),
            "{lang}: count of {key}"
        );
        assert_eq!(
            counter_state(&client, key, "attempt").await.as_deref(),
            Some("1"),
            "{lang}: attempt of {key}"
        );
    }

    // Duplicates: the same idempotency keys again change nothing.
    let again: Vec<Value> = (1..=5).map(|seq| msg("a", seq, json!({}))).collect();
    client
        .produce("in", &Value::Array(again))
        .await
        .expect("produce");
    wait_for(&client, "counter", "5 duplicates", |h| {
        h["duplicates"] == 5 && h["lag"] == 0
    })
    .await;
    assert_eq!(
        counter_state(&client, "a", "count").await,
        Some(PER_KEY.to_string()),
        "{lang}: duplicates must not count"
    );

    // Outbox emit: the payload minus `emit`, byte for byte, with the headers.
    let mut emitting = msg(
        "e",
        1,
        json!({"emit": {"topic": "out", "key": "o"}, "x": {"b": -2, "a": [true, null, "q\"uote", "é"]}, "n": 1.5}),
    );
    emitting["headers"] = json!({"h": "v"});
    client
        .produce("in", &json!([emitting]))
        .await
        .expect("produce");
    let emitted = dead_letters(&client, "sink", "o", 1).await;
    let payload: Vec<u8> = serde_json::from_value(emitted[0]["payload"].clone()).expect("bytes");
    assert_eq!(
        String::from_utf8_lossy(&payload),
        EMITTED,
        "{lang}: emitted payload"
    );
    assert_eq!(
        emitted[0]["headers"],
        json!([["h", "v"]]),
        "{lang}: headers"
    );
    processed += 1;
    assert_eq!(
        counter_state(&client, "e", "seqs").await.as_deref(),
        Some("1")
    );

    // Retryable: fails twice, succeeds on attempt 3.
    client
        .produce(
            "in",
            &json!([msg(
                "r",
                1,
                json!({"fail": "retryable", "fail_attempts": 2})
            )]),
        )
        .await
        .expect("produce");
    processed += 1;
    wait_drained(&client, "counter", processed).await;
    assert_eq!(
        counter_state(&client, "r", "attempt").await.as_deref(),
        Some("3"),
        "{lang}: retried in place"
    );
    assert_eq!(
        counter_state(&client, "r", "count").await.as_deref(),
        Some("1")
    );

    // Retryable for ever: dead-lettered after max_attempts.
    client
        .produce("in", &json!([msg("x", 1, json!({"fail": "retryable"}))]))
        .await
        .expect("produce");
    let dead = dead_letters(&client, "counter", "x", 1).await;
    assert_eq!(dead[0]["error_kind"], "retryable", "{lang}: {dead:?}");
    assert_eq!(dead[0]["attempts"], 3, "{lang}: {dead:?}");
    assert!(
        dead[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("seq 1: asked to fail (retryable), attempt 3")),
        "{lang}: {dead:?}"
    );

    // Permanent: dead-lettered at once, touching nothing; the key goes on.
    client
        .produce(
            "in",
            &json!([
                msg("p", 1, json!({"fail": "permanent"})),
                msg("p", 2, json!({}))
            ]),
        )
        .await
        .expect("produce");
    let dead = dead_letters(&client, "counter", "p", 1).await;
    assert_eq!(dead[0]["error_kind"], "permanent", "{lang}: {dead:?}");
    assert_eq!(dead[0]["attempts"], 1, "{lang}: {dead:?}");
    assert!(
        dead[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("seq 1: asked to fail (permanent)")),
        "{lang}: {dead:?}"
    );
    processed += 1;
    wait_drained(&client, "counter", processed).await;
    assert_eq!(
        counter_state(&client, "p", "seqs").await.as_deref(),
        Some("2")
    );

    // Bad input: not JSON, no `seq`, a bad `emit`: permanent errors.
    let bad = json!([
        {"key": "bad", "idempotency_key": "bad/1", "payload": "not json"},
        {"key": "bad", "idempotency_key": "bad/2", "payload": "{\"seq\": -1}"},
        msg("bad", 3, json!({"emit": {"topic": 7}})),
    ]);
    client.produce("in", &bad).await.expect("produce");
    let dead = dead_letters(&client, "counter", "bad", 3).await;
    let errors: Vec<&str> = dead.iter().filter_map(|d| d["error"].as_str()).collect();
    assert!(
        dead.iter().all(|d| d["error_kind"] == "permanent"),
        "{lang}: {dead:?}"
    );
    assert!(
        errors[0].contains("payload is not the expected JSON"),
        "{lang}: {errors:?}"
    );
    assert!(
        errors[1].contains("payload has no unsigned integer `seq`"),
        "{lang}: {errors:?}"
    );
    assert!(
        errors[2].contains("`emit` needs string `topic` and `key`"),
        "{lang}: {errors:?}"
    );
    assert_eq!(counter_state(&client, "bad", "seqs").await, None);

    // A trap dead-letters the message and the lane carries on.
    client
        .produce(
            "in",
            &json!([msg("t", 1, json!({"fail": "trap"})), msg("t", 2, json!({}))]),
        )
        .await
        .expect("produce");
    let dead = dead_letters(&client, "counter", "t", 1).await;
    assert_eq!(dead[0]["error_kind"], "trap", "{lang}: {dead:?}");
    processed += 1;
    wait_drained(&client, "counter", processed).await;
    assert_eq!(
        counter_state(&client, "t", "seqs").await.as_deref(),
        Some("2")
    );

    // Logging: one debug line per handled message, through the host log,
    // in the span of the message it was logged for.
    let text = strip_ansi(&std::fs::read_to_string(&log).expect("server log"));
    let line = format!("key a seq {PER_KEY} count {PER_KEY}");
    let logged = text
        .lines()
        .find(|l| l.contains(&line))
        .unwrap_or_else(|| panic!("{lang}: the host log has no `{line}`"));
    for field in [
        "message{handler=counter",
        " key=a ",
        " offset=",
        " attempt=1}",
    ] {
        assert!(
            logged.contains(field),
            "{lang}: the guest's log line lacks its message's `{field}`: {logged}"
        );
    }

    let per_message = match (
        handler_sample(&server, "ordo_handler_seconds_sum", "counter").await,
        handler_sample(&server, "ordo_handler_seconds_count", "counter").await,
    ) {
        (Some(sum), Some(n)) if n > 0.0 => Some(Duration::from_secs_f64(sum / n)),
        _ => None,
    };

    // Restart: the same compiled artifact is loaded, not recompiled.
    let compiled = artifacts(server.data_dir.path());
    assert!(!compiled.is_empty(), "{lang}: no compiled artifact cached");
    let started = Instant::now();
    server.restart().await;
    client
        .produce("in", &json!([msg("a", PER_KEY + 1, json!({}))]))
        .await
        .expect("produce after restart");
    wait_for(&client, "counter", "first message after restart", |h| {
        h["lag"] == 0 && h["processed"].as_u64().unwrap_or(0) >= 1
    })
    .await;
    let restart_time = started.elapsed();
    assert_eq!(
        counter_state(&client, "a", "seqs").await,
        Some(expected_seqs(1, PER_KEY + 1)),
        "{lang}: state survives the restart"
    );
    assert_eq!(
        artifacts(server.data_dir.path()),
        compiled,
        "{lang}: the restart recompiled the component"
    );

    eprintln!(
        "polyglot: {lang:<6} {:>10} bytes  deploy (compile) {:>7.0?}  restart to first message {:>7.0?}  per message {}",
        bytes.len(),
        deploy_time,
        restart_time,
        per_message.map_or("?".into(), |d| format!("{d:.0?}")),
    );
}

/// Runs the bank scenarios against one language's bank component: the
/// account JSON, the transfer through the outbox (a deposit on the same
/// topic with the transfer-id header) and the permanent errors.
async fn bank_conformance(lang: &str, component: &str) {
    let bytes = handler_bytes(component);
    let server = Server::start().await;
    let client = server.client();
    client
        .put_bytes("/v1/handlers/bank?topic=bank&on_failure=dead-letter", bytes)
        .await
        .unwrap_or_else(|e| panic!("{lang}: deploying {component} failed: {e:#}"));

    let command = |key: &str, n: u32, body: Value| json!({"key": key, "idempotency_key": format!("{key}/{n}"), "payload": body.to_string()});
    let batch = json!([
        command("alice", 1, json!({"op": "deposit", "amount": 100})),
        command("alice", 2, json!({"op": "withdraw", "amount": 30})),
        command(
            "alice",
            3,
            json!({"op": "transfer", "amount": 50, "to": "bob"})
        ),
        command("alice", 4, json!({"op": "withdraw", "amount": 1000})),
        command("alice", 5, json!({"op": "deposit", "amount": -5})),
        command(
            "alice",
            6,
            json!({"op": "transfer", "amount": 1, "to": "alice"})
        ),
        command("alice", 7, json!({"op": "steal", "amount": 1})),
    ]);
    client.produce("bank", &batch).await.expect("produce");
    // alice: 3 commands done, 4 dead-lettered; bob: the transfer's deposit.
    wait_for(&client, "bank", "bank drained", |h| {
        h["lag"] == 0 && h["processed"] == 4 && h["dead_lettered"] == 4
    })
    .await;
    assert_eq!(
        state(&client, "bank", "alice", "account").await.as_deref(),
        Some(r#"{"balance":20,"deposits":1,"withdrawals":1,"transfers_out":1}"#),
        "{lang}: alice's account"
    );
    assert_eq!(
        state(&client, "bank", "bob", "account").await.as_deref(),
        Some(r#"{"balance":50,"deposits":1,"withdrawals":0,"transfers_out":0}"#),
        "{lang}: bob's account"
    );
    let dead = dlq(&client, "bank", "alice").await;
    let errors: Vec<&str> = dead.iter().filter_map(|d| d["error"].as_str()).collect();
    assert!(
        dead.iter().all(|d| d["error_kind"] == "permanent"),
        "{lang}: {dead:?}"
    );
    for (error, expected) in errors.iter().zip([
        "insufficient funds: balance 20, asked 1000",
        "amount must be positive, got -5",
        "transfer needs another account in `to`",
        "payload is not the expected JSON",
    ]) {
        assert!(
            error.contains(expected),
            "{lang}: {error:?} lacks {expected:?}"
        );
    }
    assert_eq!(errors.len(), 4, "{lang}: {errors:?}");
}

macro_rules! languages {
    ($($test:ident: $lang:literal => $component:literal,)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $test() {
            conformance($lang, $component).await;
        }
    )*};
}

languages! {
    rust_counter_conforms: "rust" => "counter",
    rust_wasip2_counter_conforms: "rust (wasm32-wasip2)" => "counter-wasip2",
    c_counter_conforms: "c" => "c-counter",
    python_counter_conforms: "python" => "python-counter",
    js_counter_conforms: "js" => "js-counter",
    zig_counter_conforms: "zig" => "zig-counter",
    go_counter_conforms: "go" => "go-counter",
}

macro_rules! banks {
    ($($test:ident: $lang:literal => $component:literal,)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $test() {
            bank_conformance($lang, $component).await;
        }
    )*};
}

banks! {
    rust_bank_conforms: "rust" => "bank",
    python_bank_conforms: "python" => "python-bank",
    js_bank_conforms: "js" => "js-bank",
}

/// Every language's counter leaves the same state when an instance runs up
/// to 64 messages (`messages_per_instance`) as with a fresh instance per
/// message, failures and traps in between included: language runtimes
/// (Python's and JavaScript's interpreters, Go's scheduler) take a second
/// call in one instance. With `--nocapture` it prints each language's time
/// per message both ways (in-process, sandbox only).
#[test]
fn every_language_leaves_the_same_state_in_reused_instances() {
    use ordo::runtime::{HandlerLimits, HandlerModule, MemoryState, Message, Runtime};

    let runtime = Runtime::new(Default::default()).expect("runtime");
    let messages: Vec<Message> = (1..=15u64)
        .flat_map(|seq| {
            ORDER_KEYS.iter().map(move |key| {
                let payload = match (seq, *key) {
                    (5, "a") => json!({"seq": seq, "fail": "permanent"}),
                    (9, "b") => json!({"seq": seq, "fail": "trap"}),
                    _ => json!({"seq": seq}),
                };
                Message {
                    topic: "orders".into(),
                    partition_key: key.to_string(),
                    idempotency_key: format!("{key}/{seq}"),
                    offset: seq,
                    payload: payload.to_string().into_bytes(),
                    headers: vec![],
                    attempt: 1,
                }
            })
        })
        .collect();
    // Runs every message against the state of its key; returns the states
    // and the mean time per message.
    let run = |invoke: &mut dyn FnMut(&Message, MemoryState) -> ordo::runtime::Invocation| {
        let mut states: BTreeMap<String, MemoryState> = BTreeMap::new();
        let start = Instant::now();
        let mut failed = 0;
        for msg in &messages {
            let state = states.entry(msg.partition_key.clone()).or_default();
            let inv = invoke(msg, state.clone());
            match inv.outcome {
                Ok(()) => state.apply(&inv.overlay),
                Err(_) => failed += 1,
            }
        }
        let per_message = start.elapsed() / messages.len() as u32;
        assert_eq!(failed, 2, "the permanent failure and the trap");
        let states: BTreeMap<String, BTreeMap<String, Vec<u8>>> =
            states.into_iter().map(|(k, s)| (k, s.0)).collect();
        (states, per_message)
    };
    for component in [
        "counter",
        "counter-wasip2",
        "c-counter",
        "zig-counter",
        "go-counter",
        "js-counter",
        "python-counter",
    ] {
        let limits = HandlerLimits {
            messages_per_instance: 64,
            ..HandlerLimits::default()
        };
        let module: HandlerModule = runtime
            .load(&handler_bytes(component), limits)
            .unwrap_or_else(|e| panic!("{component} loads: {e}"));
        let (fresh, fresh_time) = run(&mut |msg, state| module.invoke(msg, Box::new(state)).0);
        let mut session = module.session();
        let (reused, reused_time) =
            run(&mut |msg, state| session.invoke_in(msg, Box::new(state), None).0);
        assert_eq!(reused, fresh, "{component}");
        assert_eq!(
            fresh["a"].get("count").map(Vec::as_slice),
            Some(&b"14"[..]),
            "{component}"
        );
        println!(
            "{component}: {:.0} µs per message in a fresh instance, {:.0} µs with up to 64 per instance",
            fresh_time.as_secs_f64() * 1e6,
            reused_time.as_secs_f64() * 1e6
        );
    }
}
