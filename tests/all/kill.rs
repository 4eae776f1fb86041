//! Crash safety: SIGKILL the real binary at random moments while a producer
//! keeps producing (retrying unacknowledged batches); the per-key sequence
//! oracle must find nothing lost, duplicated or reordered.

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::fixtures::handler_bytes;
use crate::server::Server;

const KEYS: usize = 200;
const PER_KEY: u64 = 100;
const KILLS: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loop_loses_and_duplicates_nothing() {
    let mut server = Server::start().await;
    server
        .client()
        .put_bytes("/v1/handlers/counter?topic=kill", handler_bytes("counter"))
        .await
        .expect("deploy");
    let base = server.base_url();

    // The producer: 20k messages, 10% delivered twice, batches retried until
    // acknowledged, in order.
    let producer = tokio::spawn(async move {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("client");
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        let mut messages = Vec::new();
        for seq in 1..=PER_KEY {
            for k in 0..KEYS {
                let m = json!({"key": format!("k{k}"), "idempotency_key": format!("k{k}/{seq}"),
                               "payload": json!({"seq": seq}).to_string()});
                messages.push(m.clone());
                if rng.gen_bool(0.1) {
                    messages.push(m);
                }
            }
        }
        let mut retries = 0u64;
        for chunk in messages.chunks(250) {
            let body = Value::Array(chunk.to_vec());
            loop {
                let sent = http
                    .post(format!("{base}/v1/topics/kill/messages"))
                    .json(&body)
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status().is_success() => break,
                    _ => {
                        retries += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }
        retries
    });

    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut kills = 0;
    while kills < KILLS || !producer.is_finished() {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(20..300))).await;
        server.kill();
        server.respawn().await;
        kills += 1;
        assert!(kills < 500, "producer never finished");
    }
    let retries = producer.await.expect("producer");
    eprintln!("kills: {kills}, producer retries: {retries}");

    let client = server.client();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = client.get_json("/v1/status").await.expect("status");
        if status["handlers"][0]["lag"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "did not drain: {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let expected: String = (1..=PER_KEY)
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let mut bad = Vec::new();
    for k in 0..KEYS {
        let got = client
            .get_bytes(&format!("/v1/handlers/counter/state/k{k}/seqs"))
            .await
            .expect("state")
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        if got != expected {
            bad.push(format!("k{k}: {got}"));
        }
    }
    assert!(
        bad.is_empty(),
        "{} keys wrong after {kills} kills, e.g. {:?}",
        bad.len(),
        &bad[..bad.len().min(3)]
    );
    assert!(kills >= KILLS);
}
