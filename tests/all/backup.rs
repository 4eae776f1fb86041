//! `ordo ledger check|export|import` on real data dirs.

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};

use crate::fixtures::handler_bytes;
use crate::server::{state, wait_drained, wait_for, Server};

fn ordo(args: &[&str], data_dir: &Path) -> (bool, String) {
    let out = Command::new(Server::binary())
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .expect("run ordo");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_import_reproduces_state_and_dedup_and_check_finds_corruption() {
    let mut a = Server::start().await;
    let client = a.client();
    client
        .put_bytes("/v1/handlers/counter?topic=t", handler_bytes("counter"))
        .await
        .expect("deploy");
    let mut batch = Vec::new();
    for seq in 1..=10u64 {
        for k in 0..5 {
            let m = json!({"key": format!("k{k}"), "idempotency_key": format!("k{k}/{seq}"),
                           "payload": json!({"seq": seq}).to_string()});
            if seq % 3 == 0 {
                batch.push(m.clone());
            }
            batch.push(m);
        }
    }
    batch
        .push(json!({"key": "bad", "payload": json!({"seq": 1, "fail": "permanent"}).to_string()}));
    client
        .produce("t", &Value::Array(batch))
        .await
        .expect("produce");
    wait_drained(&client, "counter", 50).await;
    wait_for(&client, "counter", "dead letter", |h| {
        h["dead_lettered"] == 1
    })
    .await;
    a.terminate();

    let (ok, out) = ordo(&["ledger", "check"], a.data_dir.path());
    assert!(ok && out.contains("ledger check: OK"), "{out}");
    let export = a.data_dir.path().join("backup.jsonl");
    let export_arg = export.to_str().expect("path");
    let (ok, out) = ordo(
        &["ledger", "export", "--output", export_arg],
        a.data_dir.path(),
    );
    assert!(ok, "{out}");

    // Import into a fresh host's data dir, then run it.
    let mut b = Server::start().await;
    b.terminate();
    let (ok, out) = ordo(
        &["ledger", "import", "--input", export_arg],
        b.data_dir.path(),
    );
    assert!(ok, "{out}");
    let (ok, out) = ordo(&["ledger", "check"], b.data_dir.path());
    assert!(ok && out.contains("ledger check: OK"), "{out}");
    // A second import into a non-empty ledger is refused.
    let (ok, out) = ordo(
        &["ledger", "import", "--input", export_arg],
        b.data_dir.path(),
    );
    assert!(!ok && out.contains("empty"), "{out}");
    b.respawn().await;
    let client = b.client();
    let want: String = (1..=10)
        .map(|s: u64| s.to_string())
        .collect::<Vec<_>>()
        .join(",");
    for k in 0..5 {
        assert_eq!(
            state(&client, "counter", &format!("k{k}"), "seqs").await,
            Some(want.clone())
        );
    }
    // Dedup came along: a late duplicate is skipped; the dead letter too, and
    // a new dead letter gets a new sequence.
    client
        .produce(
            "t",
            &json!([
                {"key": "k0", "idempotency_key": "k0/10", "payload": "{\"seq\":10}"},
                {"key": "bad2", "payload": json!({"seq": 1, "fail": "permanent"}).to_string()}
            ]),
        )
        .await
        .expect("produce");
    wait_for(&client, "counter", "dup + dead letter", |h| {
        h["duplicates"] == 1 && h["dead_lettered"] == 2 && h["lag"] == 0
    })
    .await;
    assert_eq!(
        state(&client, "counter", "k0", "seqs").await,
        Some(want.clone())
    );
    let dlq = client
        .get_json("/v1/dlq?handler=counter")
        .await
        .expect("dlq");
    let seqs: Vec<u64> = dlq["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["seq"].as_u64())
        .collect();
    assert_eq!(seqs.len(), 2);
    assert_ne!(seqs[0], seqs[1]);

    // A corrupted record is reported, naming its tree.
    let text = std::fs::read_to_string(&export).expect("read export");
    let mut corrupted = 0;
    let lines: Vec<String> = text
        .lines()
        .map(|l| {
            if corrupted == 0 && l.contains("\"tree\":\"dedup\"") {
                corrupted += 1;
                let mut v: Value = serde_json::from_str(l).expect("line");
                v["value"] = json!("AQID"); // format 1, then garbage
                v.to_string()
            } else {
                l.to_string()
            }
        })
        .collect();
    assert_eq!(corrupted, 1);
    let bad = a.data_dir.path().join("corrupt.jsonl");
    std::fs::write(&bad, lines.join("\n") + "\n").expect("write");
    let c = tempfile::tempdir().expect("tempdir");
    let (ok, out) = ordo(
        &["ledger", "import", "--input", bad.to_str().expect("path")],
        c.path(),
    );
    assert!(ok, "{out}");
    let (ok, out) = ordo(&["ledger", "check"], c.path());
    assert!(!ok, "{out}");
    assert!(
        out.contains("PROBLEM: dedup") && out.contains("1 problem"),
        "{out}"
    );
}
