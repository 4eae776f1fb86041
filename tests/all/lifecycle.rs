//! Deployment lifecycle on the real binary: hot swap mid-stream, refused
//! deploys, versions, rollback, pause/resume, undeploy.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};

use crate::fixtures::{component_from_core, handler_bytes, HANDLE_SIG};
use crate::server::{cli, state, wait_drained, wait_for, Server};

fn msg(key: &str, seq: u64) -> Value {
    json!({"key": key, "idempotency_key": format!("{key}/{seq}"),
           "payload": json!({"seq": seq}).to_string()})
}

/// Produces `chunks` to `topic` in the background, pausing between them.
fn paced_producer(
    server: &Server,
    topic: &'static str,
    chunks: Vec<Vec<Value>>,
    pause_ms: u64,
) -> tokio::task::JoinHandle<()> {
    let client = server.client();
    tokio::spawn(async move {
        for chunk in chunks {
            client
                .produce(topic, &Value::Array(chunk))
                .await
                .expect("produce");
            tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_swap_mid_stream_records_each_message_version() {
    let server = Server::start().await;
    let client = server.client();
    client
        .put_bytes("/v1/handlers/counter?topic=swap", handler_bytes("counter"))
        .await
        .expect("deploy v1");
    let keys: Vec<String> = (0..20).map(|k| format!("key-{k}")).collect();
    let all: Vec<Value> = (1..=100)
        .flat_map(|seq| keys.iter().map(move |k| msg(k, seq)))
        .collect();
    let chunks: Vec<Vec<Value>> = all.chunks(50).map(<[Value]>::to_vec).collect();
    let producer = paced_producer(&server, "swap", chunks.clone(), 15);
    // v1 has handled something before the first swap.
    wait_for(&client, "counter", "first messages", |h| {
        h["processed"].as_u64().unwrap_or(0) > 0
    })
    .await;
    let v2 = client
        .put_bytes(
            "/v1/handlers/counter?topic=swap",
            handler_bytes("counter-fixed"),
        )
        .await
        .expect("deploy v2");
    assert_eq!(v2["version"], 2);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let v3 = client
        .put_bytes("/v1/handlers/counter?topic=swap", handler_bytes("counter"))
        .await
        .expect("deploy v3");
    assert_eq!(v3["version"], 3);
    producer.await.expect("producer");
    // Appended after v3 was active: must be v3's.
    let tail: Vec<Value> = keys.iter().map(|k| msg(k, 101)).collect();
    client
        .produce("swap", &Value::Array(tail))
        .await
        .expect("produce");
    wait_drained(&client, "counter", 2020).await;

    // The oracle: every key has every message exactly once, in order.
    let want: String = (1..=101)
        .map(|s: u64| s.to_string())
        .collect::<Vec<_>>()
        .join(",");
    for k in &keys {
        assert_eq!(
            state(&client, "counter", k, "seqs").await,
            Some(want.clone()),
            "{k}"
        );
    }
    // Every message's version is recorded; per partition, versions never go
    // back in offset order (no message handled by an older version after a
    // newer one), and the tail is v3's.
    let mut by_partition: BTreeMap<u64, Vec<(u64, u64)>> = BTreeMap::new();
    let mut seen_versions = std::collections::BTreeSet::new();
    for k in &keys {
        for seq in 1..=101u64 {
            let r = client
                .get_json(&format!("/v1/handlers/counter/dedup/{k}%2F{seq}"))
                .await
                .expect("dedup record");
            assert_eq!(r["outcome"], "committed", "{r}");
            let version = r["version"].as_u64().expect("version");
            if seq == 101 {
                assert_eq!(version, 3, "{r}");
            }
            seen_versions.insert(version);
            by_partition
                .entry(r["partition"].as_u64().expect("partition"))
                .or_default()
                .push((r["offset"].as_u64().expect("offset"), version));
        }
    }
    assert!(
        seen_versions.contains(&1) && seen_versions.contains(&3),
        "{seen_versions:?}"
    );
    for (p, mut list) in by_partition {
        list.sort();
        assert!(
            list.windows(2).all(|w| w[0].1 <= w[1].1),
            "partition {p}: versions go back: {list:?}"
        );
    }
    let out = cli(&server, &["inspect", "counter", "key-3/101"]);
    assert!(
        out.contains("\"version\": 3") && out.contains("committed"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_deploys_name_the_reason_and_the_old_version_keeps_running() {
    let server = Server::start_with(&["--max-component-bytes", "200000"]).await;
    let client = server.client();
    client
        .put_bytes("/v1/handlers/counter?topic=t", handler_bytes("counter"))
        .await
        .expect("deploy");
    let forbidden =
        wat::parse_str(r#"(component (import "wasi:sockets/tcp@0.2.0" (instance)))"#).expect("wat");
    let wrong_world = wat::parse_str("(component)").expect("wat");
    let core = wat::parse_str("(module)").expect("wat");
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "garbage",
            b"definitely not wasm".to_vec(),
            400,
            "WebAssembly",
        ),
        ("core module", core, 400, "not a component"),
        ("forbidden import", forbidden, 400, "wasi:sockets/tcp@0.2.0"),
        ("wrong world", wrong_world, 400, "handle"),
        ("oversize", vec![0u8; 300_000], 413, "limit"),
    ];
    for (n, (what, bytes, status, needle)) in cases.into_iter().enumerate() {
        let resp = reqwest::Client::new()
            .put(format!("{}/v1/handlers/counter?topic=t", server.base_url()))
            .body(bytes)
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status().as_u16(), status, "{what}");
        let body: Value = resp.json().await.expect("json error");
        let text = body["error"].as_str().unwrap_or_default();
        assert!(text.contains(needle), "{what}: {text}");
        // The running version keeps processing.
        client
            .produce("t", &Value::Array(vec![msg("k", n as u64 + 1)]))
            .await
            .expect("produce");
        let status = wait_drained(&client, "counter", n as u64 + 1).await;
        assert_eq!(status["version"], 1, "{what}");
    }
    assert_eq!(
        state(&client, "counter", "k", "seqs").await.as_deref(),
        Some("1,2,3,4,5")
    );
    let versions = client
        .get_json("/v1/handlers/counter/versions")
        .await
        .expect("versions");
    assert_eq!(
        versions["versions"].as_array().map(Vec::len),
        Some(1),
        "{versions}"
    );

    // A valid component (whose `handle` traps) does deploy: validation is
    // not simply refusing everything.
    let probe = component_from_core(&format!("(func {HANDLE_SIG} unreachable)"));
    let v = client
        .put_bytes("/v1/handlers/probe?topic=t", probe)
        .await
        .expect("a valid component deploys");
    assert_eq!(v["version"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_pause_resume_and_undeploy() {
    let mut server = Server::start().await;
    let client = server.client();
    let fail = |key: &str, seq: u64| json!({"key": key, "payload": json!({"seq": seq, "fail": "permanent"}).to_string()});
    client
        .put_bytes(
            "/v1/handlers/counter?topic=t&on_failure=dead-letter",
            handler_bytes("counter"),
        )
        .await
        .expect("deploy v1");
    client
        .put_bytes(
            "/v1/handlers/counter?topic=t",
            handler_bytes("counter-fixed"),
        )
        .await
        .expect("deploy v2");
    client
        .produce("t", &json!([fail("a", 1)]))
        .await
        .expect("produce");
    wait_drained(&client, "counter", 1).await;
    assert_eq!(
        state(&client, "counter", "a", "seqs").await.as_deref(),
        Some("1")
    );

    // Rollback: v1 honours `fail` again, and its policy (dead-letter) comes back.
    let out = cli(&server, &["rollback", "counter"]);
    assert!(out.contains("version 1 is active"), "{out}");
    client
        .produce("t", &json!([fail("b", 2)]))
        .await
        .expect("produce");
    let status = wait_for(&client, "counter", "dead letter", |h| {
        h["dead_lettered"] == 1
    })
    .await;
    assert_eq!(status["version"], 1);
    let out = cli(&server, &["versions", "counter"]);
    let active: Vec<&str> = out
        .lines()
        .filter(|l| l.trim_start().starts_with('*'))
        .collect();
    assert_eq!(active.len(), 1, "{out}");
    assert!(active[0].contains(" 1 "), "{out}");
    let err = client
        .post_json("/v1/handlers/counter/rollback", &json!({"to": 9}))
        .await
        .expect_err("no such version");
    assert!(err.to_string().contains("404"), "{err}");
    client
        .post_json("/v1/handlers/counter/rollback", &json!({"to": 2}))
        .await
        .expect("roll forward");

    // Pause: nothing is processed, also across a restart; resume catches up.
    cli(&server, &["pause", "counter"]);
    client
        .produce("t", &json!([msg("c", 1)]))
        .await
        .expect("produce");
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.restart().await;
    let client = server.client();
    let status = wait_for(&client, "counter", "restored", |h| h["paused"] == true).await;
    assert_eq!(status["lag"], 1, "{status}");
    assert_eq!(state(&client, "counter", "c", "seqs").await, None);
    cli(&server, &["resume", "counter"]);
    wait_for(&client, "counter", "resumed", |h| h["lag"] == 0).await;
    assert_eq!(
        state(&client, "counter", "c", "seqs").await.as_deref(),
        Some("1")
    );

    // Undeploy keeps state; a later deploy continues from the cursor.
    cli(&server, &["undeploy", "counter"]);
    let status = client.get_json("/v1/status").await.expect("status");
    assert_eq!(
        status["handlers"].as_array().map(Vec::len),
        Some(0),
        "{status}"
    );
    client
        .produce("t", &json!([msg("a", 3)]))
        .await
        .expect("produce");
    assert_eq!(
        state(&client, "counter", "a", "seqs").await.as_deref(),
        Some("1")
    );
    let v = client
        .put_bytes(
            "/v1/handlers/counter?topic=t",
            handler_bytes("counter-fixed"),
        )
        .await
        .expect("redeploy");
    assert_eq!(v["version"], 3);
    wait_for(&client, "counter", "caught up", |h| h["lag"] == 0).await;
    assert_eq!(
        state(&client, "counter", "a", "seqs").await.as_deref(),
        Some("1,3")
    );

    // Undeploy with purge forgets everything: a new deploy starts afresh at
    // the beginning of the topic, as version 1.
    cli(&server, &["undeploy", "counter", "--purge"]);
    let err = client
        .get_json("/v1/handlers/counter/versions")
        .await
        .expect_err("purged");
    assert!(err.to_string().contains("404"), "{err}");
    assert_eq!(state(&client, "counter", "a", "seqs").await, None);
    let v = client
        .put_bytes(
            "/v1/handlers/counter?topic=t",
            handler_bytes("counter-fixed"),
        )
        .await
        .expect("deploy after purge");
    assert_eq!(v["version"], 1);
    wait_for(&client, "counter", "reprocessed", |h| h["lag"] == 0).await;
    assert_eq!(
        state(&client, "counter", "a", "seqs").await.as_deref(),
        Some("1,3")
    );
    assert_eq!(
        state(&client, "counter", "b", "seqs").await.as_deref(),
        Some("2")
    );

    let audit = cli(&server, &["audit", "--handler", "counter"]);
    for action in ["rollback", "pause", "resume", "undeploy"] {
        assert!(audit.contains(action), "{action}: {audit}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_key_is_held_in_order_while_other_keys_flow() {
    let server = Server::start().await;
    let client = server.client();
    client
        .put_bytes("/v1/handlers/counter?topic=pk", handler_bytes("counter"))
        .await
        .expect("deploy");
    let k = "held-key";
    let j = crate::failures::same_partition_key(k);

    // Pausing and resuming a key with nothing held is immediate.
    cli(&server, &["pause", "counter", "--key", "idle"]);
    wait_for(&client, "counter", "idle paused", |h| h["parked_keys"] == 1).await;
    cli(&server, &["resume", "counter", "--key", "idle"]);
    wait_for(&client, "counter", "idle resumed", |h| {
        h["parked_keys"] == 0
    })
    .await;

    cli(&server, &["pause", "counter", "--key", k]);
    wait_for(&client, "counter", "paused", |h| {
        h["parked_keys"] == 1 && h["pending_dlq_actions"] == 0
    })
    .await;
    let batch: Vec<Value> = (1..=5).flat_map(|s| [msg(k, s), msg(&j, s)]).collect();
    client
        .produce("pk", &Value::Array(batch))
        .await
        .expect("produce");
    let status = wait_drained(&client, "counter", 5).await;
    assert_eq!(status["held"], 5, "{status}");
    assert_eq!(
        state(&client, "counter", &j, "seqs").await.as_deref(),
        Some("1,2,3,4,5")
    );
    assert_eq!(state(&client, "counter", k, "seqs").await, None);

    cli(&server, &["resume", "counter", "--key", k]);
    let status = wait_for(&client, "counter", "resumed", |h| {
        h["parked_keys"] == 0 && h["pending_dlq_actions"] == 0
    })
    .await;
    assert_eq!(status["dead_lettered"], 0, "{status}");
    assert_eq!(
        state(&client, "counter", k, "seqs").await.as_deref(),
        Some("1,2,3,4,5")
    );
    client
        .produce("pk", &json!([msg(k, 6)]))
        .await
        .expect("produce");
    wait_drained(&client, "counter", 11).await;
    assert_eq!(
        state(&client, "counter", k, "seqs").await.as_deref(),
        Some("1,2,3,4,5,6")
    );
    let audit = cli(&server, &["audit"]);
    assert!(
        audit.contains("pause-key") && audit.contains("resume-key"),
        "{audit}"
    );
}

async fn versions_by_key(
    client: &ordo::cli::client::Client,
    keys: &[String],
    seq: u64,
) -> Vec<u64> {
    let mut out = Vec::new();
    for k in keys {
        let r = client
            .get_json(&format!("/v1/handlers/counter/dedup/{k}%2F{seq}"))
            .await
            .expect("dedup record");
        out.push(r["version"].as_u64().expect("version"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_routes_keys_by_hash_then_promote_and_abort() {
    let mut server = Server::start().await;
    let client = server.client();
    client
        .put_bytes("/v1/handlers/counter?topic=cn", handler_bytes("counter"))
        .await
        .expect("deploy v1");
    let fixed = crate::fixtures::handler_path("counter-fixed");
    let fixed = fixed.to_str().expect("path");
    let out = cli(
        &server,
        &[
            "deploy", "counter", fixed, "--topic", "cn", "--canary", "30",
        ],
    );
    assert!(out.contains("\"version\": 2"), "{out}");
    let status = wait_for(&client, "counter", "canary", |h| !h["canary"].is_null()).await;
    assert_eq!(status["canary"], json!({"version": 2, "percent": 30}));
    assert_eq!(status["version"], 1);

    let keys: Vec<String> = (0..200).map(|k| format!("key-{k}")).collect();
    let expected: Vec<u64> = keys
        .iter()
        .map(|k| {
            if ordo::source::canary_bucket(k) < 30 {
                2
            } else {
                1
            }
        })
        .collect();
    assert!(expected.contains(&1) && expected.contains(&2));
    for seq in 1..=2u64 {
        let batch: Vec<Value> = keys.iter().map(|k| msg(k, seq)).collect();
        client
            .produce("cn", &Value::Array(batch))
            .await
            .expect("produce");
        wait_drained(&client, "counter", 200 * seq).await;
        // The split follows the hash rule, and no key flips.
        assert_eq!(
            versions_by_key(&client, &keys, seq).await,
            expected,
            "seq {seq}"
        );
    }

    // The canary survives a restart, with the same split.
    server.restart().await;
    let client = server.client();
    let status = wait_for(&client, "counter", "restored", |h| !h["canary"].is_null()).await;
    assert_eq!(status["canary"], json!({"version": 2, "percent": 30}));
    let batch: Vec<Value> = keys.iter().map(|k| msg(k, 99)).collect();
    client
        .produce("cn", &Value::Array(batch))
        .await
        .expect("produce");
    wait_drained(&client, "counter", 200).await;
    assert_eq!(versions_by_key(&client, &keys, 99).await, expected);

    // While a canary runs, a plain deploy or a rollback is refused.
    let err = client
        .put_bytes("/v1/handlers/counter?topic=cn", handler_bytes("counter"))
        .await
        .expect_err("deploy during canary");
    assert!(
        err.to_string().contains("409") && err.to_string().contains("canary"),
        "{err}"
    );
    let err = client
        .post_json("/v1/handlers/counter/rollback", &json!({}))
        .await
        .expect_err("rollback during canary");
    assert!(err.to_string().contains("409"), "{err}");

    // Promote: every key on version 2.
    let out = cli(&server, &["canary", "promote", "counter"]);
    assert!(out.contains("promoted; version 2 active"), "{out}");
    let batch: Vec<Value> = keys.iter().map(|k| msg(k, 3)).collect();
    client
        .produce("cn", &Value::Array(batch))
        .await
        .expect("produce");
    let status = wait_drained(&client, "counter", 400).await;
    assert!(status["canary"].is_null(), "{status}");
    assert!(versions_by_key(&client, &keys, 3)
        .await
        .iter()
        .all(|v| *v == 2));

    // Abort: a new canary's keys go back to the active version.
    let out = cli(
        &server,
        &[
            "deploy", "counter", fixed, "--topic", "cn", "--canary", "50",
        ],
    );
    assert!(out.contains("\"version\": 3"), "{out}");
    cli(&server, &["canary", "abort", "counter"]);
    let batch: Vec<Value> = keys.iter().map(|k| msg(k, 4)).collect();
    client
        .produce("cn", &Value::Array(batch))
        .await
        .expect("produce");
    wait_drained(&client, "counter", 600).await;
    assert!(versions_by_key(&client, &keys, 4)
        .await
        .iter()
        .all(|v| *v == 2));
    let audit = cli(&server, &["audit"]);
    assert!(
        audit.contains("canary-promote") && audit.contains("canary-abort"),
        "{audit}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_under_load_keeps_the_oracle_clean() {
    let server = Server::start().await;
    let client = server.client();
    client
        .put_bytes("/v1/handlers/counter?topic=rb", handler_bytes("counter"))
        .await
        .expect("deploy v1");
    client
        .put_bytes(
            "/v1/handlers/counter?topic=rb",
            handler_bytes("counter-fixed"),
        )
        .await
        .expect("deploy v2");
    let keys: Vec<String> = (0..10).map(|k| format!("key-{k}")).collect();
    let all: Vec<Value> = (1..=200)
        .flat_map(|seq| keys.iter().map(move |k| msg(k, seq)))
        .collect();
    let chunks: Vec<Vec<Value>> = all.chunks(40).map(<[Value]>::to_vec).collect();
    let producer = paced_producer(&server, "rb", chunks, 10);
    wait_for(&client, "counter", "flowing", |h| {
        h["processed"].as_u64().unwrap_or(0) > 100
    })
    .await;
    client
        .post_json("/v1/handlers/counter/rollback", &json!({}))
        .await
        .expect("rollback under load");
    producer.await.expect("producer");
    let tail: Vec<Value> = keys.iter().map(|k| msg(k, 201)).collect();
    client
        .produce("rb", &Value::Array(tail))
        .await
        .expect("produce");
    let status = wait_drained(&client, "counter", 2010).await;
    assert_eq!(status["version"], 1);
    assert_eq!(status["dead_lettered"], 0);
    let want: String = (1..=201)
        .map(|s: u64| s.to_string())
        .collect::<Vec<_>>()
        .join(",");
    for k in &keys {
        assert_eq!(
            state(&client, "counter", k, "seqs").await,
            Some(want.clone()),
            "{k}"
        );
        // Appended after the rollback: handled by version 1.
        let r = client
            .get_json(&format!("/v1/handlers/counter/dedup/{k}%2F201"))
            .await
            .expect("dedup record");
        assert_eq!(r["version"], 1, "{r}");
        let first = client
            .get_json(&format!("/v1/handlers/counter/dedup/{k}%2F1"))
            .await
            .expect("dedup record");
        assert_eq!(first["version"], 2, "{first}");
    }
}
