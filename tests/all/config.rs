//! `ordo.toml`: applied by `ordo serve --config`, round trip through
//! `ordo config-check`, bad files refused with the place.

use std::path::Path;
use std::process::Command;

use serde_json::json;

use crate::fixtures::handler_path;
use crate::server::{metric, state, wait_drained, Server};

fn write_config(dir: &Path, max_attempts: u32) -> std::path::PathBuf {
    let path = dir.join("ordo.toml");
    let text = format!(
        r#"# test configuration
[server]
partitions = 4
ledger_cache_mib = 64
workers = 3

[defaults.retry]
initial_backoff_ms = 10

[topics.orders]
partitions = 8
retention_secs = 3600

[handlers.counter]
component = "{}"
topic = "orders"
comment = "from ordo.toml"
retry = {{ max_attempts = {max_attempts}, on_failure = "dead-letter" }}
limits = {{ deadline_ms = 500 }}
"#,
        handler_path("counter").display()
    );
    std::fs::write(&path, text).expect("write config");
    path
}

fn config_check(path: &Path) -> std::process::Output {
    Command::new(Server::binary())
        .arg("config-check")
        .arg(path)
        .output()
        .expect("run ordo config-check")
}

#[test]
fn config_round_trips_through_config_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(dir.path(), 3);
    let first = config_check(&path);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let normalized = dir.path().join("normalized.toml");
    std::fs::write(&normalized, &first.stdout).expect("write");
    let second = config_check(&normalized);
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert_eq!(first.stdout, second.stdout);
    let text = String::from_utf8_lossy(&first.stdout);
    assert!(
        text.contains("max_attempts = 3") && text.contains("deadline_ms = 500"),
        "{text}"
    );
}

#[test]
fn bad_config_files_name_the_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let counter = handler_path("counter").display().to_string();
    let cases: Vec<(&str, String, &str)> = vec![
        ("unknown key", "[server]\nlisten = \"127.0.0.1:1\"\nbogus = 1\n".into(), "line 3"),
        ("wrong type", "[server]\npartitions = \"many\"\n".into(), "line 2"),
        ("bad enum", format!("[handlers.h]\ncomponent = \"{counter}\"\ntopic = \"t\"\nretry = {{ on_failure = \"skip\" }}\n"), "line 4"),
        ("out of range", "[topics.orders]\nretention_secs = 5\npartitions = 0\n".into(), ":3: topics.orders.partitions"),
        ("bad policy", "[defaults.retry]\nmax_attempts = 0\n".into(), ":1: defaults.retry: max_attempts"),
        ("tiny ledger cache", "[server]\n\nledger_cache_mib = 1\n".into(), ":3: server.ledger_cache_mib: must be at least 16"),
        ("no workers", "[server]\nworkers = 0\n".into(), ":2: server.workers: must be from 1 to 1024, got 0"),
        ("missing component", "\n[handlers.h]\ncomponent = \"missing.wasm\"\ntopic = \"t\"\n".into(), ":3: handlers.h.component: no such file"),
        ("bad handler name", format!("[handlers.\"a b\"]\ncomponent = \"{counter}\"\ntopic = \"t\"\n"), ":1: handlers.a b"),
        ("unknown section", "[sources.nats]\nurl = \"x\"\n".into(), "unknown field `sources`"),
        ("jetstream partitions", "[topics.js.jetstream]\npartitions = 0\n".into(), "topics.js.jetstream: partitions: must be 1..=4096"),
        ("jetstream stream name", "\n[topics.js.jetstream]\nstream = \"a.b\"\n".into(), ":2: topics.js.jetstream: stream"),
        ("jetstream unknown key", "[topics.js.jetstream]\nurll = \"x\"\n".into(), "unknown field `urll`"),
        ("zero deadline", "[defaults.limits]\ndeadline_ms = 0\n".into(), ":1: defaults.limits: deadline_ms must be at least 1"),
        ("no messages per instance", "[defaults.limits]\nmessages_per_instance = 0\n".into(), ":1: defaults.limits: messages_per_instance must be at least 1"),
        ("zero state per key", format!("[handlers.h]\ncomponent = \"{counter}\"\ntopic = \"t\"\nlimits = {{ max_state_bytes_per_key = 0 }}\n"), ":1: handlers.h.limits: max_state_bytes_per_key must be at least 1"),
        ("jetstream and partitions", "[topics.js]\npartitions = 4\n[topics.js.jetstream]\n".into(), "topics.js: a JetStream topic takes its partitions"),
    ];
    for (what, text, needle) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).expect("write");
        for args in [vec!["config-check"], vec!["serve", "--config"]] {
            let out = Command::new(Server::binary())
                .args(&args)
                .arg(&path)
                .args(["--data-dir"].iter().filter(|_| args[0] == "serve"))
                .args(
                    [dir.path().join("data")]
                        .iter()
                        .filter(|_| args[0] == "serve"),
                )
                .output()
                .expect("run ordo");
            assert!(!out.status.success(), "{what}: accepted");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains("bad.toml"), "{what}: {stderr}");
            assert!(
                stderr.contains(needle),
                "{what}: expected {needle:?} in {stderr}"
            );
        }
    }
}

/// Restarts the server (same config) and checks that the counter still
/// has one version; returns its versions.
async fn restarted_with_one_version(server: &mut Server) -> serde_json::Value {
    server.restart().await;
    let versions = server
        .client()
        .get_json("/v1/handlers/counter/versions")
        .await
        .expect("versions");
    assert_eq!(versions["versions"].as_array().map(Vec::len), Some(1));
    versions
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_applies_the_config_and_redeploys_only_on_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(dir.path(), 3);
    let path_arg = path.to_str().expect("path").to_string();
    let mut server = Server::start_with(&["--config", &path_arg]).await;
    let client = server.client();
    let status = client.get_json("/v1/status").await.expect("status");
    let h = &status["handlers"][0];
    assert_eq!(h["name"], "counter");
    assert_eq!(h["version"], 1);
    assert_eq!(h["max_attempts"], 3);
    assert_eq!(h["on_failure"], "dead-letter");
    let orders = status["topics"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["name"] == "orders"))
        .cloned()
        .expect("topic orders");
    assert_eq!(orders["partitions"], 8);
    assert_eq!(orders["retention_ms"], 3_600_000);
    client
        .produce("orders", &json!({"key": "k", "payload": "{\"seq\":1}"}))
        .await
        .expect("produce");
    wait_drained(&client, "counter", 1).await;
    assert_eq!(
        state(&client, "counter", "k", "seqs").await.as_deref(),
        Some("1")
    );
    // A topic created on first use gets the file's default partitions.
    client
        .produce("other", &json!({"key": "k", "payload": "x"}))
        .await
        .expect("produce");
    let status = client.get_json("/v1/status").await.expect("status");
    let other = status["topics"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["name"] == "other"))
        .cloned()
        .expect("topic other");
    assert_eq!(other["partitions"], 4);

    // Same file: nothing redeployed.
    restarted_with_one_version(&mut server).await;

    // Changed policy: a new version, with the file's comment.
    write_config(dir.path(), 4);
    server.restart().await;
    let client = server.client();
    let versions = client
        .get_json("/v1/handlers/counter/versions")
        .await
        .expect("versions");
    assert_eq!(versions["active"], 2, "{versions}");
    assert_eq!(
        versions["versions"][1]["policy"]["retry"]["max_attempts"],
        4
    );
    assert_eq!(versions["versions"][1]["comment"], "from ordo.toml");
    assert_eq!(versions["versions"][1]["limits"]["deadline_ms"], 500);
}

/// Serves the counter on topic `orders` (dead-lettering failures) with
/// `limits`, from an `ordo.toml` written in `dir`.
async fn serve_counter_with_limits(dir: &Path, limits: &str) -> Server {
    let path = dir.join("ordo.toml");
    let text = format!(
        "[handlers.counter]\ncomponent = \"{}\"\ntopic = \"orders\"\n\
         retry = {{ on_failure = \"dead-letter\" }}\n\
         limits = {{ {limits} }}\n",
        handler_path("counter").display()
    );
    std::fs::write(&path, text).expect("write config");
    let path_arg = path.to_str().expect("path").to_string();
    Server::start_with(&["--config", &path_arg]).await
}

/// The counter keeps `count`, `seqs` ("1,2,…") and `attempt`: 17 + 2n bytes
/// of state keys and values after message n ≤ 9, 39 after the 10th, 42
/// after the 11th.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_taking_its_keys_state_past_the_limit_is_dead_lettered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = serve_counter_with_limits(dir.path(), "max_state_bytes_per_key = 40").await;
    let client = server.client();
    let batch: Vec<serde_json::Value> = (1..=11)
        .map(|seq| json!({"key": "k", "idempotency_key": format!("k/{seq}"), "payload": format!("{{\"seq\":{seq}}}")}))
        .collect();
    client
        .produce("orders", &json!(batch))
        .await
        .expect("produce");
    // Dead letters are counted from the ledger, the processed messages once
    // their batch is durable: wait for both.
    crate::server::wait_for(
        &client,
        "counter",
        "10 processed, the 11th dead-lettered",
        |h| h["processed"] == 10 && h["dead_lettered"] == 1 && h["lag"] == 0,
    )
    .await;
    assert_eq!(
        state(&client, "counter", "k", "count").await.as_deref(),
        Some("10"),
        "nothing of the 11th applied"
    );
    let dead = client
        .get_json("/v1/dlq?handler=counter&key=k")
        .await
        .expect("dlq");
    let entry = &dead["entries"][0];
    assert_eq!(entry["error_kind"], "quota-exceeded", "{dead}");
    let error = entry["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("42 bytes") && error.contains("max_state_bytes_per_key"),
        "{error}"
    );
    // The limit is part of the version, read back after a restart.
    let versions = restarted_with_one_version(&mut server).await;
    assert_eq!(
        versions["versions"][0]["limits"]["max_state_bytes_per_key"],
        40
    );
}

/// `messages_per_instance` lets an instance run several messages of a lane
/// batch: the counter reports instances that ran more than one message,
/// every key's state is what one instance per message would have left, a
/// failed message is dead-lettered as before, an instance whose memory a
/// message grew is counted once, and the setting is part of the version,
/// read back after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_per_instance_reuses_instances_within_a_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = serve_counter_with_limits(dir.path(), "messages_per_instance = 64").await;
    let client = server.client();
    let keys = 8;
    let per_key = 40u64;
    let mut batch = Vec::new();
    for seq in 1..=per_key {
        for k in 0..keys {
            let fail = k == 0 && seq == 20;
            let payload = if fail {
                json!({"seq": seq, "fail": "permanent"})
            } else if k == 1 && seq == 10 {
                // 1 MiB kept allocated: more than the SDK's heap arena,
                // so the instance's memory grows, once.
                json!({"seq": seq, "report_instance": true, "leak_kib": 1024})
            } else {
                json!({"seq": seq, "report_instance": true})
            };
            batch.push(
                json!({"key": format!("k{k}"), "idempotency_key": format!("k{k}/{seq}"),
                              "payload": payload.to_string()}),
            );
        }
    }
    client
        .produce("orders", &json!(batch))
        .await
        .expect("produce");
    let total = keys * per_key;
    crate::server::wait_for(
        &client,
        "counter",
        "all processed, one dead-lettered",
        |h| h["processed"] == total - 1 && h["dead_lettered"] == 1 && h["lag"] == 0,
    )
    .await;
    let mut most = 0u64;
    for k in 0..keys {
        let key = format!("k{k}");
        let seqs: Vec<String> = (1..=per_key)
            .filter(|&seq| !(k == 0 && seq == 20))
            .map(|seq| seq.to_string())
            .collect();
        assert_eq!(
            state(&client, "counter", &key, "seqs").await,
            Some(seqs.join(",")),
            "{key}"
        );
        let ran = state(&client, "counter", &key, "instance_messages")
            .await
            .and_then(|n| n.parse::<u64>().ok())
            .expect("instance_messages reported");
        assert!((1..=64).contains(&ran), "{key}: {ran}");
        most = most.max(ran);
    }
    assert!(most > 1, "no instance ran more than one message");
    let h = r#"{handler="counter"}"#;
    let instances = metric(&server, &format!("ordo_handler_instances_total{h}"))
        .await
        .expect("instances counted");
    let calls = metric(&server, &format!("ordo_handler_seconds_count{h}"))
        .await
        .expect("calls counted");
    assert!(
        instances >= 1.0 && instances < calls,
        "{instances} instances for {calls} calls"
    );
    assert_eq!(
        metric(&server, &format!("ordo_handler_memory_grown_total{h}")).await,
        Some(1.0),
        "the one message that outgrew the heap"
    );
    let versions = restarted_with_one_version(&mut server).await;
    assert_eq!(
        versions["versions"][0]["limits"]["messages_per_instance"],
        64
    );
}
