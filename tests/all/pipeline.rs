//! The pipeline end to end, driving the real `ordo` binary over HTTP.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ordo::cli::client::Client;
use serde_json::{json, Value};

use crate::fixtures::handler_bytes;
use crate::server::Server;

async fn wait_drained(client: &Client, handler: &str, processed_at_least: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = client.get_json("/v1/status").await.expect("status");
        let h = status["handlers"]
            .as_array()
            .and_then(|a| a.iter().find(|h| h["name"] == handler).cloned());
        if let Some(h) = h {
            if h["lag"] == 0 && h["processed"].as_u64().unwrap_or(0) >= processed_at_least {
                return h;
            }
        }
        assert!(
            Instant::now() < deadline,
            "handler {handler} did not drain: {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn state(client: &Client, handler: &str, key: &str, state_key: &str) -> Option<String> {
    client
        .get_bytes(&format!("/v1/handlers/{handler}/state/{key}/{state_key}"))
        .await
        .expect("state get")
        .map(|b| String::from_utf8(b).expect("utf-8"))
}

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
