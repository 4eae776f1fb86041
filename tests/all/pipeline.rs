//! The pipeline end to end, driving the real `ordo` binary over HTTP.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};

use crate::fixtures::handler_bytes;
use crate::server::{state, wait_drained, Server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_skipped_order_kept_and_restart_safe() {
    let mut server = Server::start().await;
    let client = server.client();
    let deployed = client
        .put_bytes(
            "/v1/handlers/counter?topic=events",
            handler_bytes("counter"),
        )
        .await
        .expect("deploy");
    assert_eq!(deployed["version"], 1);

    // 20 keys x 30 messages, every 10th message delivered twice.
    let keys: Vec<String> = (0..20).map(|k| format!("key-{k}")).collect();
    let mut batch = Vec::new();
    let mut duplicates = 0;
    for seq in 1..=30u64 {
        for key in &keys {
            let msg = json!({"key": key, "idempotency_key": format!("{key}/{seq}"),
                             "payload": json!({"seq": seq}).to_string()});
            batch.push(msg.clone());
            if seq % 10 == 0 {
                batch.push(msg);
                duplicates += 1;
            }
        }
    }
    for chunk in batch.chunks(97) {
        client
            .produce("events", &Value::Array(chunk.to_vec()))
            .await
            .expect("produce");
    }
    let status = wait_drained(&client, "counter", 600).await;
    assert_eq!(status["processed"], 600);
    assert_eq!(status["duplicates"], duplicates);
    assert_eq!(status["dead_lettered"], 0);
    let expected: String = (1..=30)
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(",");
    for key in &keys {
        assert_eq!(
            state(&client, "counter", key, "seqs").await.as_deref(),
            Some(expected.as_str())
        );
        assert_eq!(
            state(&client, "counter", key, "count").await.as_deref(),
            Some("30")
        );
    }
    assert_eq!(state(&client, "counter", "nobody", "seqs").await, None);

    // Graceful restart: state and the deployed handler survive; a late
    // duplicate is still skipped; new messages continue the sequence.
    server.restart().await;
    let client = server.client();
    let resend = json!([{"key": "key-0", "idempotency_key": "key-0/30", "payload": "{\"seq\":30}"},
                        {"key": "key-0", "idempotency_key": "key-0/31", "payload": "{\"seq\":31}"}]);
    client.produce("events", &resend).await.expect("produce");
    let status = wait_drained(&client, "counter", 1).await;
    assert_eq!(status["version"], 1);
    assert_eq!(status["duplicates"], 1);
    assert_eq!(
        state(&client, "counter", "key-0", "seqs").await,
        Some(format!("{expected},31"))
    );
    assert_eq!(
        state(&client, "counter", "key-1", "count").await.as_deref(),
        Some("30")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_mid_backlog_loses_and_repeats_nothing() {
    let mut server = Server::start().await;
    let client = server.client();
    let mut batch = Vec::new();
    let mut expected: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for seq in 1..=400u64 {
        for k in 0..10 {
            let key = format!("k{k}");
            batch.push(json!({"key": key, "payload": json!({"seq": seq}).to_string()}));
            expected.entry(key).or_default().push(seq);
        }
    }
    for chunk in batch.chunks(500) {
        client
            .produce("backlog", &Value::Array(chunk.to_vec()))
            .await
            .expect("produce");
    }
    client
        .put_bytes(
            "/v1/handlers/counter?topic=backlog",
            handler_bytes("counter"),
        )
        .await
        .expect("deploy");
    // Stop while the backlog is being worked through.
    tokio::time::sleep(Duration::from_millis(30)).await;
    server.restart().await;
    let client = server.client();
    wait_drained(&client, "counter", 0).await;
    for (key, seqs) in expected {
        let want: Vec<String> = seqs.iter().map(u64::to_string).collect();
        assert_eq!(
            state(&client, "counter", &key, "seqs").await,
            Some(want.join(",")),
            "{key}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_producer_input_is_rejected_and_appends_nothing() {
    let server = Server::start().await;
    let base = server.base_url();
    let http = reqwest::Client::new();
    let url = format!("{base}/v1/topics/bad/messages");
    let long_key = "k".repeat(1025);
    let long_idem = "i".repeat(513);
    let headers: serde_json::Map<String, Value> =
        (0..65).map(|i| (format!("h{i}"), json!("v"))).collect();
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (br#"{"payload":"p"}"#.to_vec(), 400, "key"),
        (br#"{"key":"","payload":"p"}"#.to_vec(), 400, "key"),
        (
            json!({"key": long_key, "payload": "p"})
                .to_string()
                .into_bytes(),
            400,
            "key",
        ),
        (
            json!({"key": "k", "idempotency_key": long_idem, "payload": "p"})
                .to_string()
                .into_bytes(),
            400,
            "idempotency_key",
        ),
        (b"{not json".to_vec(), 400, "body"),
        (
            br#"{"key":"k","payload_base64":"%%%"}"#.to_vec(),
            400,
            "payload_base64",
        ),
        (
            json!({"key": "k", "payload": "p", "headers": headers})
                .to_string()
                .into_bytes(),
            400,
            "headers",
        ),
        (
            json!([{"key": "k", "payload": "ok"}, {"key": "k"}])
                .to_string()
                .into_bytes(),
            400,
            "[1].payload",
        ),
        (
            json!({"key": "k", "payload": "x".repeat((1 << 20) + 1)})
                .to_string()
                .into_bytes(),
            413,
            "payload",
        ),
        (
            {
                let mut b = br#"{"key":"a"#.to_vec();
                b.push(0xfe);
                b.extend_from_slice(br#"","payload":"p"}"#);
                b
            },
            400,
            "key",
        ),
    ];
    for (body, status, field) in cases {
        let resp = http.post(&url).body(body).send().await.expect("request");
        assert_eq!(resp.status().as_u16(), status, "field {field}");
        let err: Value = resp.json().await.expect("json error");
        assert_eq!(err["field"], field, "{err}");
        assert!(err["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    // Nothing was appended: the first good message gets offset 0.
    let client = server.client();
    let offsets = client
        .produce("bad", &json!({"key": "k", "payload": "fine"}))
        .await
        .expect("produce");
    assert_eq!(offsets, vec![0]);
    let health = http
        .get(format!("{base}/healthz"))
        .send()
        .await
        .expect("health");
    assert_eq!(health.status().as_u16(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_deploy_keeps_running_version() {
    let server = Server::start().await;
    let client = server.client();
    client
        .put_bytes("/v1/handlers/counter?topic=t", handler_bytes("counter"))
        .await
        .expect("deploy");
    let err = client
        .put_bytes("/v1/handlers/counter?topic=t", b"not wasm".to_vec())
        .await
        .expect_err("invalid deploy refused");
    assert!(err.to_string().contains("400"), "{err}");
    client
        .produce("t", &json!({"key": "a", "payload": "{\"seq\":1}"}))
        .await
        .expect("produce");
    let status = wait_drained(&client, "counter", 1).await;
    assert_eq!(status["version"], 1);
    assert_eq!(
        state(&client, "counter", "a", "seqs").await.as_deref(),
        Some("1")
    );
}

fn topic_messages(status: &Value, topic: &str) -> Option<u64> {
    status["topics"]
        .as_array()?
        .iter()
        .find(|t| t["name"] == topic)?["messages"]
        .as_u64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_removes_only_old_committed_messages() {
    let mut server = Server::start_with(&[
        "--topic-retention-secs",
        "3",
        "--retention-interval-ms",
        "100",
    ])
    .await;
    let client = server.client();
    client
        .put_bytes("/v1/handlers/counter?topic=kept", handler_bytes("counter"))
        .await
        .expect("deploy");
    // This handler never gets past its first message (retried for minutes).
    client
        .put_bytes(
            "/v1/handlers/stuck?topic=blocked&max_attempts=1000&initial_backoff_ms=60000&max_backoff_ms=60000",
            handler_bytes("counter"),
        )
        .await
        .expect("deploy");
    let produced_at = std::time::Instant::now();
    let batch: Vec<Value> = (0..50u64)
        .map(|i| json!({"key": format!("k{}", i % 5), "payload": json!({"seq": i}).to_string()}))
        .collect();
    client
        .produce("kept", &Value::Array(batch))
        .await
        .expect("produce");
    let blocked: Vec<Value> = (0..5u64)
        .map(|i| {
            let fail = if i == 0 {
                json!("retryable")
            } else {
                Value::Null
            };
            json!({"key": "b", "payload": json!({"seq": i, "fail": fail}).to_string()})
        })
        .collect();
    client
        .produce("blocked", &Value::Array(blocked))
        .await
        .expect("produce");
    wait_drained(&client, "counter", 50).await;

    // Committed but young: kept.
    let status = client.get_json("/v1/status").await.expect("status");
    if produced_at.elapsed() < Duration::from_millis(2500) {
        assert_eq!(topic_messages(&status, "kept"), Some(50), "{status}");
    }
    // Old and committed by every subscriber: removed. Old but not committed
    // by its subscriber: kept.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        let status = client.get_json("/v1/status").await.expect("status");
        if topic_messages(&status, "kept") == Some(0) {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "retention did not run: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(produced_at.elapsed() >= Duration::from_secs(3));
    assert_eq!(topic_messages(&status, "blocked"), Some(5), "{status}");
    assert_eq!(
        crate::server::metric(&server, "ordo_retention_removed_messages_total").await,
        Some(50.0)
    );

    // Offsets continue after the log was emptied, also across a restart.
    let p0 = ordo::source::partition_for("k0", 16);
    let before = 10
        * (0..5)
            .filter(|k| ordo::source::partition_for(&format!("k{k}"), 16) == p0)
            .count() as u64;
    let offsets = client
        .produce("kept", &json!({"key": "k0", "payload": "{\"seq\":50}"}))
        .await
        .expect("produce");
    assert_eq!(offsets, vec![before]);
    server.restart().await;
    let client = server.client();
    let offsets = client
        .produce("kept", &json!({"key": "k0", "payload": "{\"seq\":51}"}))
        .await
        .expect("produce");
    assert_eq!(offsets, vec![before + 1]);
    wait_drained(&client, "counter", 1).await;
    let seqs = state(&client, "counter", "k0", "seqs").await.expect("seqs");
    assert!(seqs.ends_with(",45,50,51"), "{seqs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_window_keeps_young_records_and_sweeps_old_ones() {
    let server = Server::start_with(&[
        "--dedup-retention-secs",
        "2",
        "--retention-interval-ms",
        "100",
    ])
    .await;
    let client = server.client();
    client
        .put_bytes("/v1/handlers/counter?topic=d", handler_bytes("counter"))
        .await
        .expect("deploy");
    let m = json!({"key": "k", "idempotency_key": "x/1", "payload": "{\"seq\":1}"});
    client.produce("d", &m).await.expect("produce");
    wait_drained(&client, "counter", 1).await;
    // Young: kept, so a duplicate is skipped.
    let written = std::time::Instant::now();
    client.produce("d", &m).await.expect("produce");
    let status = crate::server::wait_for(&client, "counter", "duplicate", |h| {
        h["duplicates"] == 1 && h["lag"] == 0
    })
    .await;
    assert_eq!(status["processed"], 1);
    let record = client
        .get_json("/v1/handlers/counter/dedup/x%2F1")
        .await
        .expect("young record kept");
    assert_eq!(record["outcome"], "committed");
    // Old: swept (never before the window has passed).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while client
        .get_json("/v1/handlers/counter/dedup/x%2F1")
        .await
        .is_ok()
    {
        assert!(std::time::Instant::now() < deadline, "not swept");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(written.elapsed() >= Duration::from_millis(1900));
    assert_eq!(
        crate::server::metric(&server, "ordo_dedup_swept_records_total").await,
        Some(1.0)
    );
    // Past the window the same key is new again (the documented trade-off).
    client.produce("d", &m).await.expect("produce");
    wait_drained(&client, "counter", 2).await;
    assert_eq!(
        state(&client, "counter", "k", "seqs").await.as_deref(),
        Some("1,1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_bad_producer_input_and_a_slow_client_leave_the_host_serving() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let server = Server::start().await;
    let client = server.client();
    client
        .put_bytes("/v1/handlers/counter?topic=cat", handler_bytes("counter"))
        .await
        .expect("deploy");
    let http = reqwest::Client::new();
    let url = format!("{}/v1/topics/cat/messages", server.base_url());
    let deep = format!(
        r#"{{"key":"k","payload":"p","headers":{}{}}}"#,
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let huge_batch = Value::Array(
        (0..10_001)
            .map(|i| json!({"key": format!("k{i}"), "payload": "p"}))
            .collect(),
    );
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("deeply nested JSON", deep.into_bytes(), 400),
        (
            "unknown field (a misspelt idempotency key must not be ignored)",
            br#"{"key":"k","idempotencyKey":"x","payload":"p"}"#.to_vec(),
            400,
        ),
        (
            "header value not a string",
            br#"{"key":"k","payload":"p","headers":{"h":1}}"#.to_vec(),
            400,
        ),
        (
            "batch over the message cap",
            huge_batch.to_string().into_bytes(),
            413,
        ),
        ("empty body", Vec::new(), 400),
        ("empty batch", b"[]".to_vec(), 400),
    ];
    for (what, body, status) in cases {
        let resp = http.post(&url).body(body).send().await.expect("request");
        assert_eq!(resp.status().as_u16(), status, "{what}");
        let err: Value = resp.json().await.expect("json error");
        assert!(
            err["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{what}: {err}"
        );
    }

    // Same idempotency key, different payload: skipped and counted as a
    // conflict, never applied.
    client
        .produce(
            "cat",
            &json!([{"key": "c", "idempotency_key": "c/1", "payload": "{\"seq\":1}"},
                    {"key": "c", "idempotency_key": "c/1", "payload": "{\"seq\":99}"}]),
        )
        .await
        .expect("produce");
    let h = wait_drained(&client, "counter", 1).await;
    assert_eq!(h["conflicts"], 1, "{h}");
    assert_eq!(
        state(&client, "counter", "c", "seqs").await.as_deref(),
        Some("1")
    );

    // A slow client trickling its body does not hold up anyone else.
    let body = br#"{"key":"slow","payload":"{\"seq\":1}"}"#;
    let mut slow = tokio::net::TcpStream::connect(("127.0.0.1", server.port()))
        .await
        .expect("connect");
    slow.write_all(
        format!(
            "POST /v1/topics/cat/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .expect("headers");
    slow.write_all(&body[..5]).await.expect("first bytes");
    for i in 0..5 {
        client
            .produce(
                "cat",
                &json!({"key": "fast", "payload": format!("{{\"seq\":{}}}", i + 1)}),
            )
            .await
            .expect("a fast producer is served while a slow one stalls");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    slow.write_all(&body[5..]).await.expect("rest");
    let mut answer = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(10), slow.read(&mut answer))
        .await
        .expect("answer in time")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    wait_drained(&client, "counter", 7).await;
    assert_eq!(
        state(&client, "counter", "fast", "seqs").await.as_deref(),
        Some("1,2,3,4,5")
    );
    assert_eq!(
        state(&client, "counter", "slow", "seqs").await.as_deref(),
        Some("1")
    );
}
