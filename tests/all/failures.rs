//! Failure handling on the real binary: retries with backoff, dead letters,
//! poison-key parking, fix-and-replay, drop, audit.

use std::collections::HashMap;

use ordo::cli::client::Client;
use serde_json::{json, Value};

use crate::fixtures::{handler_bytes, handler_path};
use crate::server::{cli, metric, state, wait_drained, wait_for, Server};

fn msg(key: &str, seq: u64, extra: Value) -> Value {
    let mut payload = json!({ "seq": seq });
    if let (Some(p), Some(e)) = (payload.as_object_mut(), extra.as_object()) {
        p.extend(e.clone());
    }
    json!({ "key": key, "idempotency_key": format!("{key}/{seq}"), "payload": payload.to_string() })
}

async fn dlq(client: &Client, handler: &str, key: Option<&str>) -> Vec<Value> {
    let mut path = format!("/v1/dlq?handler={handler}");
    if let Some(k) = key {
        path.push_str(&format!("&key={k}"));
    }
    let reply = client.get_json(&path).await.expect("dlq list");
    reply["entries"].as_array().cloned().unwrap_or_default()
}

fn field<'a>(entries: &'a [Value], name: &str) -> Vec<&'a Value> {
    entries.iter().map(|e| &e[name]).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_failures_are_retried_in_place_then_dead_lettered() {
    let server = Server::start().await;
    let client = server.client();
    let deployed = client
        .put_bytes(
            "/v1/handlers/counter?topic=retry&initial_backoff_ms=20&max_backoff_ms=100&max_attempts=4",
            handler_bytes("counter"),
        )
        .await
        .expect("deploy");
    assert_eq!(deployed["policy"]["retry"]["max_attempts"], 4);

    // Key r: seq 1 fails twice, then succeeds; seq 2 must wait for it.
    // Key x: always fails retryably, so it is dead-lettered after 4 attempts.
    let batch = json!([
        msg("r", 1, json!({"fail": "retryable", "fail_attempts": 2})),
        msg("r", 2, json!({})),
        msg("x", 1, json!({"fail": "retryable"})),
    ]);
    client.produce("retry", &batch).await.expect("produce");
    let status = wait_drained(&client, "counter", 2).await;
    let status = if status["dead_lettered"] == 1 {
        status
    } else {
        wait_for(&client, "counter", "x dead-lettered", |h| {
            h["dead_lettered"] == 1 && h["lag"] == 0
        })
        .await
    };
    assert_eq!(
        state(&client, "counter", "r", "seqs").await.as_deref(),
        Some("1,2")
    );
    assert_eq!(
        state(&client, "counter", "r", "count").await.as_deref(),
        Some("2")
    );
    assert_eq!(state(&client, "counter", "x", "seqs").await, None);
    // 2 retries for r, 3 for x (the 4th attempt dead-letters it).
    assert_eq!(status["retries"], 5, "{status}");
    assert_eq!(status["processed"], 2, "{status}");

    // The retried message itself saw attempt 3.
    client
        .produce(
            "retry",
            &json!([msg(
                "r3",
                1,
                json!({"fail": "retryable", "fail_attempts": 2})
            )]),
        )
        .await
        .expect("produce");
    wait_drained(&client, "counter", 3).await;
    assert_eq!(
        state(&client, "counter", "r3", "attempt").await.as_deref(),
        Some("3")
    );
    assert_eq!(
        state(&client, "counter", "r3", "count").await.as_deref(),
        Some("1")
    );

    let dead = dlq(&client, "counter", Some("x")).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["error_kind"], "retryable");
    assert_eq!(dead[0]["attempts"], 4);
    assert!(dead[0]["error"]
        .as_str()
        .is_some_and(|e| e.contains("gave up after 4 attempts")));
    assert!(dead[0]["first_failure_ms"].as_u64() <= dead[0]["last_failure_ms"].as_u64());
}

/// A key in the same partition (of 16) as `key`, and different from it.
pub fn same_partition_key(key: &str) -> String {
    let p = ordo::source::partition_for(key, 16);
    (0..)
        .map(|i| format!("neighbour-{i}"))
        .find(|k| ordo::source::partition_for(k, 16) == p)
        .expect("a colliding key")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_key_is_parked_in_order_then_fixed_and_replayed() {
    let server = Server::start().await;
    let client = server.client();
    client
        .put_bytes(
            "/v1/handlers/counter?topic=orders",
            handler_bytes("counter"),
        )
        .await
        .expect("deploy");
    let k = "poison";
    let j = same_partition_key(k);

    // K's seq 2 is poison; J shares K's partition and must keep flowing.
    let mut batch = Vec::new();
    for seq in 1..=5 {
        let extra = if seq == 2 {
            json!({"fail": "permanent"})
        } else {
            json!({})
        };
        batch.push(msg(k, seq, extra));
        batch.push(msg(&j, seq, json!({})));
    }
    // A producer retry of a held message: a duplicate, not a second copy.
    batch.push(msg(k, 3, json!({})));
    client
        .produce("orders", &Value::Array(batch))
        .await
        .expect("produce");
    let status = wait_drained(&client, "counter", 6).await;
    assert_eq!(
        state(&client, "counter", &j, "seqs").await.as_deref(),
        Some("1,2,3,4,5")
    );
    assert_eq!(
        state(&client, "counter", k, "seqs").await.as_deref(),
        Some("1")
    );
    assert_eq!(status["parked_keys"], 1, "{status}");
    assert_eq!(status["dead_lettered"], 4, "{status}");
    assert_eq!(status["held"], 3, "{status}");
    assert_eq!(status["duplicates"], 1, "{status}");

    let entries = dlq(&client, "counter", Some(k)).await;
    let kinds: Vec<&Value> = field(&entries, "error_kind");
    assert_eq!(kinds, ["permanent", "held", "held", "held"]);
    let offsets: Vec<u64> = entries
        .iter()
        .map(|e| e["offset"].as_u64().expect("offset"))
        .collect();
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
    assert!(entries.iter().all(|e| e["key_parked"] == true));

    let inspected: Value =
        serde_json::from_str(&cli(&server, &["inspect", "counter", "--key", k])).expect("json");
    assert_eq!(
        inspected["parked"]["paused_by_operator"], false,
        "{inspected}"
    );
    assert_eq!(inspected["dead_letters"].as_array().map(Vec::len), Some(4));
    assert_eq!(inspected["state"]["seqs"], "1");

    // More messages for K while it is parked are held behind the rest.
    client
        .produce("orders", &json!([msg(k, 6, json!({}))]))
        .await
        .expect("produce");
    wait_for(&client, "counter", "seq 6 held", |h| h["held"] == 4).await;

    // Replaying a held message ahead of the poison one is refused (order).
    let third = entries[2]["seq"].as_u64().expect("seq");
    client
        .post_json(
            "/v1/dlq/replay",
            &json!({"handler": "counter", "seq": third}),
        )
        .await
        .expect("replay request");
    wait_for(&client, "counter", "actions done", |h| {
        h["pending_dlq_actions"] == 0
    })
    .await;
    assert_eq!(dlq(&client, "counter", Some(k)).await.len(), 5);
    assert_eq!(
        state(&client, "counter", k, "seqs").await.as_deref(),
        Some("1")
    );

    // Replaying the key through the unfixed version fails again: the poison
    // message's attempts grow, nothing behind it runs, the key stays parked.
    let out = cli(
        &server,
        &["dlq", "replay", "--handler", "counter", "--key", k],
    );
    assert!(out.contains("scheduled 5"), "{out}");
    let entries = dlq(&client, "counter", Some(k)).await;
    assert_eq!(entries.len(), 5);
    assert_eq!(entries[0]["attempts"], 2);
    assert_eq!(entries[0]["error_kind"], "permanent");
    assert_eq!(
        state(&client, "counter", k, "seqs").await.as_deref(),
        Some("1")
    );

    // Fix: deploy a version that ignores the poison, replay the key.
    let fixed = handler_path("counter-fixed");
    let out = cli(
        &server,
        &[
            "deploy",
            "counter",
            fixed.to_str().expect("path"),
            "--topic",
            "orders",
            "--comment",
            "ignore fail flags",
        ],
    );
    assert!(out.contains("\"version\": 2"), "{out}");
    let out = cli(
        &server,
        &["dlq", "replay", "--handler", "counter", "--key", k],
    );
    assert!(out.contains("0 dead letter(s) of counter remain"), "{out}");
    assert_eq!(
        state(&client, "counter", k, "seqs").await.as_deref(),
        Some("1,2,3,4,5,6")
    );
    assert_eq!(
        state(&client, "counter", k, "count").await.as_deref(),
        Some("6")
    );
    // Counters move once the replay's flush returned, a moment after the
    // ledger shows the key unparked: wait for both.
    let status = wait_for(&client, "counter", "unparked, 5 replayed", |h| {
        h["parked_keys"] == 0 && h["replayed"] == 5
    })
    .await;
    assert_eq!(status["dead_lettered"], 0, "{status}");
    assert_eq!(status["replayed"], 5, "{status}");

    // The key flows again, in order; a late duplicate is still skipped.
    client
        .produce(
            "orders",
            &json!([msg(k, 7, json!({})), msg(k, 4, json!({}))]),
        )
        .await
        .expect("produce");
    wait_drained(&client, "counter", 6 + 5 + 1).await;
    wait_for(&client, "counter", "late duplicate", |h| {
        h["lag"] == 0 && h["duplicates"] == 2
    })
    .await;
    assert_eq!(
        state(&client, "counter", k, "seqs").await.as_deref(),
        Some("1,2,3,4,5,6,7")
    );
    assert_eq!(
        state(&client, "counter", &j, "seqs").await.as_deref(),
        Some("1,2,3,4,5")
    );

    let h = r#"{handler="counter"}"#;
    assert_eq!(
        metric(&server, &format!("ordo_parked_keys{h}")).await,
        Some(0.0)
    );
    assert_eq!(
        metric(&server, &format!("ordo_dlq_size{h}")).await,
        Some(0.0)
    );
    assert_eq!(
        metric(&server, &format!("ordo_replayed_total{h}")).await,
        Some(5.0)
    );
    assert_eq!(
        metric(&server, &format!("ordo_held_total{h}")).await,
        Some(4.0)
    );
    assert_eq!(
        metric(&server, &format!("ordo_duplicates_total{h}")).await,
        Some(2.0)
    );
    assert_eq!(
        metric(&server, &format!("ordo_handler_version{h}")).await,
        Some(2.0)
    );

    let audit = cli(&server, &["audit", "--handler", "counter"]);
    assert_eq!(audit.matches("dlq-replay").count(), 3, "{audit}");
    assert!(audit.contains("ignore fail flags"), "{audit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traps_deadlines_and_memory_bombs_are_dead_lettered_and_droppable() {
    let server = Server::start().await;
    let client = server.client();
    client
        .put_bytes(
            "/v1/handlers/counter?topic=hostile&on_failure=dead-letter",
            handler_bytes("counter"),
        )
        .await
        .expect("deploy");
    let batch = json!([
        msg("trap", 1, json!({"fail": "trap"})),
        msg("spin", 1, json!({"fail": "spin"})),
        msg("bomb", 1, json!({"fail": "bomb"})),
        msg("emits", 1, json!({"fail": "emit-flood"})),
        msg("value", 1, json!({"fail": "state-flood"})),
        msg("writes", 1, json!({"fail": "write-flood"})),
        msg("logs", 1, json!({"fail": "log-flood"})),
        msg("trap", 2, json!({})),
        msg("fine", 1, json!({})),
    ]);
    client.produce("hostile", &batch).await.expect("produce");
    let status = wait_drained(&client, "counter", 3).await;
    assert_eq!(status["dead_lettered"], 6, "{status}");
    // A log flood is cut at the handler's line quota; the message succeeds.
    assert_eq!(
        state(&client, "counter", "logs", "seqs").await.as_deref(),
        Some("1")
    );
    // Floods leave no partial state behind.
    for key in ["emits", "value", "writes"] {
        assert_eq!(state(&client, "counter", key, "seqs").await, None, "{key}");
        assert_eq!(state(&client, "counter", key, "flood").await, None, "{key}");
    }
    assert_eq!(status["parked_keys"], 0, "{status}");
    assert_eq!(status["on_failure"], "dead-letter");
    // dead-letter policy: the trapping key carries on.
    assert_eq!(
        state(&client, "counter", "trap", "seqs").await.as_deref(),
        Some("2")
    );
    assert_eq!(
        state(&client, "counter", "fine", "seqs").await.as_deref(),
        Some("1")
    );

    let kinds: HashMap<String, String> = dlq(&client, "counter", None)
        .await
        .iter()
        .map(|e| {
            (
                e["partition_key"].as_str().unwrap_or_default().to_string(),
                e["error_kind"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(
        kinds.get("trap").map(String::as_str),
        Some("trap"),
        "{kinds:?}"
    );
    assert_eq!(
        kinds.get("spin").map(String::as_str),
        Some("deadline"),
        "{kinds:?}"
    );
    assert_eq!(
        kinds.get("bomb").map(String::as_str),
        Some("memory-limit"),
        "{kinds:?}"
    );
    for key in ["emits", "value", "writes"] {
        assert_eq!(
            kinds.get(key).map(String::as_str),
            Some("quota-exceeded"),
            "{key}: {kinds:?}"
        );
    }

    // The host is still up and takes work.
    client
        .produce("hostile", &json!([msg("fine", 2, json!({}))]))
        .await
        .expect("produce");
    wait_drained(&client, "counter", 4).await;
    assert_eq!(
        state(&client, "counter", "fine", "seqs").await.as_deref(),
        Some("1,2")
    );

    let h = r#"{handler="counter"}"#;
    assert_eq!(
        metric(&server, &format!("ordo_dlq_size{h}")).await,
        Some(6.0)
    );
    assert_eq!(
        metric(&server, &format!("ordo_dead_lettered_total{h}")).await,
        Some(6.0)
    );
    assert_eq!(
        metric(&server, &format!("ordo_messages_processed_total{h}")).await,
        Some(4.0)
    );
    let calls = metric(&server, &format!("ordo_handler_seconds_count{h}")).await;
    assert_eq!(calls, Some(10.0), "6 failed + 4 committed invocations");
    assert_eq!(
        metric(&server, &format!("ordo_handler_instances_total{h}")).await,
        Some(10.0),
        "a fresh instance per invocation by default"
    );
    assert_eq!(metric(&server, "ordo_healthy").await, Some(1.0));
    assert!(
        metric(&server, "ordo_flush_seconds_count")
            .await
            .unwrap_or(0.0)
            >= 1.0
    );
    let grouped = (
        metric(&server, "ordo_commit_batches_sum").await,
        metric(&server, "ordo_commit_batches_count").await,
    );
    assert!(
        matches!(grouped, (Some(sum), Some(count)) if count >= 1.0 && sum >= count),
        "lane batches per transaction: {grouped:?}"
    );
    assert!(metric(&server, "ordo_ledger_bytes").await.unwrap_or(0.0) > 0.0);
    assert!(
        metric(&server, "ordo_dedup_index_bytes")
            .await
            .unwrap_or(0.0)
            > 0.0,
        "the processed messages' idempotency keys are indexed"
    );

    // Dropping leaves an audit record naming what was dropped.
    let listed = cli(&server, &["dlq", "list", "--handler", "counter"]);
    assert!(
        listed.contains("memory-limit") && listed.contains("deadline"),
        "{listed}"
    );
    let out = cli(
        &server,
        &[
            "dlq",
            "drop",
            "--handler",
            "counter",
            "--all",
            "--reason",
            "hostile test input",
        ],
    );
    assert!(out.contains("dropped 6"), "{out}");
    assert!(dlq(&client, "counter", None).await.is_empty());
    let audit = cli(&server, &["audit"]);
    assert!(
        audit.contains("dlq-drop")
            && audit.contains("hostile test input")
            && audit.contains("key=\"bomb\""),
        "{audit}"
    );

    // Bad operator input: a clear error, nothing changes.
    let err = client
        .post_json(
            "/v1/dlq/replay",
            &json!({"handler": "counter", "seq": 1, "all": true}),
        )
        .await
        .expect_err("ambiguous selection refused");
    assert!(err.to_string().contains("400"), "{err}");
    let err = client
        .post_json("/v1/dlq/replay", &json!({"handler": "nobody", "all": true}))
        .await
        .expect_err("unknown handler refused");
    assert!(err.to_string().contains("404"), "{err}");
    let err = client
        .put_bytes(
            "/v1/handlers/counter?topic=hostile&max_attempts=0",
            handler_bytes("counter"),
        )
        .await
        .expect_err("bad policy refused");
    assert!(err.to_string().contains("max_attempts"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_replay_spans_batches_and_survives_sigkill() {
    // Two messages per transaction: a 31-message backlog takes many batches.
    let mut server = Server::start_with(&["--max-batch", "2"]).await;
    let client = server.client();
    client
        .put_bytes("/v1/handlers/counter?topic=t", handler_bytes("counter"))
        .await
        .expect("deploy");
    let batch: Vec<Value> = (1..=31)
        .map(|seq| {
            let extra = if seq == 1 {
                json!({"fail": "permanent"})
            } else {
                json!({})
            };
            msg("k", seq, extra)
        })
        .collect();
    client
        .produce("t", &Value::Array(batch))
        .await
        .expect("produce");
    wait_for(&client, "counter", "backlog held", |h| {
        h["held"] == 30 && h["lag"] == 0
    })
    .await;
    client
        .put_bytes(
            "/v1/handlers/counter?topic=t",
            handler_bytes("counter-fixed"),
        )
        .await
        .expect("deploy fix");

    for round in 0..3 {
        let reply = client
            .post_json("/v1/dlq/replay", &json!({"handler": "counter", "key": "k"}))
            .await
            .expect("replay");
        assert!(
            reply["scheduled"].as_u64().unwrap_or(0) > 0 || round > 0,
            "{reply}"
        );
        // Kill at once or after a moment: mid-replay either way.
        tokio::time::sleep(std::time::Duration::from_millis(5 * round)).await;
        server.kill();
        server.respawn().await;
    }
    let client = server.client();
    // Whatever was left is carried on by the lane after the restart.
    let status = wait_for(&client, "counter", "replay done", |h| {
        h["pending_dlq_actions"] == 0 && h["parked_keys"] == 0
    })
    .await;
    assert_eq!(status["dead_lettered"], 0, "{status}");
    let want: Vec<String> = (1..=31).map(|s: u64| s.to_string()).collect();
    assert_eq!(
        state(&client, "counter", "k", "seqs").await,
        Some(want.join(","))
    );
    assert_eq!(
        state(&client, "counter", "k", "count").await.as_deref(),
        Some("31")
    );
}

/// The workers share one queue: a handler running to its deadline holds
/// one of them, and the other lanes' messages are processed meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_spinning_to_its_deadline_holds_up_one_worker_not_the_other_lanes() {
    let server = Server::start_with(&["--workers", "2", "--partitions", "16"]).await;
    let client = server.client();
    client
        .put_bytes(
            "/v1/handlers/counter?topic=busy&on_failure=dead-letter",
            handler_bytes("counter"),
        )
        .await
        .expect("deploy");
    client
        .produce("busy", &json!([msg("warm", 1, json!({}))]))
        .await
        .expect("produce");
    wait_drained(&client, "counter", 1).await;

    // Spins for the default 1 s deadline on one worker.
    client
        .produce("busy", &json!([msg("spin", 1, json!({"fail": "spin"}))]))
        .await
        .expect("produce");
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    let spinning = ordo::source::partition_for("spin", 16);
    let others: Vec<Value> = (0..)
        .map(|i| format!("other-{i}"))
        .filter(|k| ordo::source::partition_for(k, 16) != spinning)
        .take(30)
        .map(|k| msg(&k, 1, json!({})))
        .collect();
    client
        .produce("busy", &Value::Array(others))
        .await
        .expect("produce");
    let status = wait_for(&client, "counter", "the other lanes' messages", |h| {
        h["processed"].as_u64().unwrap_or(0) >= 31
    })
    .await;
    assert_eq!(
        status["dead_lettered"], 0,
        "the 30 messages of other partitions were processed while the spin ran: {status}"
    );
    let status = wait_for(&client, "counter", "the spin's dead letter", |h| {
        h["dead_lettered"] == 1
    })
    .await;
    assert_eq!(status["processed"], 31, "{status}");
    let kinds: Vec<String> = dlq(&client, "counter", Some("spin"))
        .await
        .iter()
        .map(|e| e["error_kind"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(kinds, vec!["deadline".to_string()]);
}
