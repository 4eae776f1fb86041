//! Disk faults and power loss on the real binary, through the `faultfs`
//! LD_PRELOAD shim (tests/faults/faultfs.c, compiled here with `cc`).
//!
//! - Power loss: the shim copies a file of the data dir into a shadow tree
//!   each time it is fsynced/fdatasynced, so the shadow is exactly what a
//!   power cut leaves (sled's own `sync_file_range` does not count). The test
//!   SIGKILLs the host, replaces the data dir with the shadow and restarts:
//!   nothing acknowledged may be lost, nothing applied twice.
//! - Disk faults: from the n-th sync or write on, every call fails with EIO
//!   or ENOSPC. The host must stop acknowledging at once and for good; after
//!   a restart on a healthy disk nothing acknowledged is lost.
//! - A slow disk (every sync delayed): lanes process messages while their
//!   append is still being flushed, and acknowledge nothing before it is.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::fixtures::handler_bytes;
use crate::server::{state, wait_drained, wait_for, Server};

const KEYS: u64 = 20;

/// The compiled shim (built once per test run).
fn faultfs() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/faults/faultfs.c");
            let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("faultfs.so");
            let status = std::process::Command::new("cc")
                .args(["-shared", "-fPIC", "-O2", "-o"])
                .arg(&out)
                .arg(&src)
                .arg("-ldl")
                .status()
                .unwrap_or_else(|e| {
                    panic!("cannot run cc to build the faultfs shim ({e}): install a C compiler (Debian: gcc)")
                });
            assert!(status.success(), "building {} failed", src.display());
            out
        })
        .clone()
}

/// Makes the next spawns of `server` run under the shim, scoped to its data
/// dir; returns the data dir's canonical path.
fn preload_faultfs(server: &mut Server) -> PathBuf {
    let shim = faultfs();
    let data = server
        .data_dir
        .path()
        .canonicalize()
        .expect("data dir path");
    server.set_env("LD_PRELOAD", Some(shim.to_str().expect("utf-8")));
    server.set_env("FAULTFS_DIR", Some(data.to_str().expect("utf-8")));
    data
}

/// Stops `server` and makes its next spawns run under the shim on an
/// empty data dir whose synced files are copied to `shadow`: from then on
/// `shadow` is the disk a power cut leaves behind. Returns the data dir.
fn power_cuts_from_now(server: &mut Server, shadow: &Path) -> PathBuf {
    server.kill();
    let data = preload_faultfs(server);
    restore(shadow, &data);
    server.set_env("FAULTFS_SHADOW", shadow.to_str());
    data
}

fn batch(seq: u64) -> Value {
    Value::Array(
        (0..KEYS)
            .map(|k| {
                json!({"key": format!("k{k}"), "idempotency_key": format!("k{k}/{seq}"),
                       "payload": json!({"seq": seq}).to_string()})
            })
            .collect(),
    )
}

fn prefix(n: u64) -> String {
    (1..=n).map(|s| s.to_string()).collect::<Vec<_>>().join(",")
}

/// Every key's `seqs` must be exactly `1..=n` for one `n >= acked`
/// (a clean prefix: nothing lost, duplicated or reordered); returns `n`.
async fn check_prefixes(server: &Server, acked: u64, what: &str) -> u64 {
    let client = server.client();
    wait_for(&client, "counter", "drained", |h| h["lag"] == 0).await;
    let mut n_all = None;
    for k in 0..KEYS {
        let got = state(&client, "counter", &format!("k{k}"), "seqs")
            .await
            .unwrap_or_default();
        let n = if got.is_empty() {
            0
        } else {
            got.split(',').count() as u64
        };
        assert_eq!(got, prefix(n), "{what}: key k{k} is not a clean prefix");
        assert!(
            n >= acked,
            "{what}: key k{k} lost acknowledged messages: has 1..={n}, {acked} were acknowledged"
        );
        n_all.get_or_insert(n);
    }
    n_all.unwrap_or(0)
}

/// Copies the tree at `from` over `to` (which is emptied first).
fn restore(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(to).expect("read data dir") {
        let p = entry.expect("entry").path();
        if p.is_dir() {
            std::fs::remove_dir_all(&p).expect("remove");
        } else {
            std::fs::remove_file(&p).expect("remove");
        }
    }
    copy_tree(from, to);
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read shadow") {
        let p = entry.expect("entry").path();
        let dest = to.join(p.file_name().expect("name"));
        if p.is_dir() {
            copy_tree(&p, &dest);
        } else if !p.to_string_lossy().ends_with(".faultfs-tmp") {
            std::fs::copy(&p, &dest).expect("copy");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_loss_keeps_everything_acknowledged() {
    const CYCLES: usize = 8;
    const BATCHES: u64 = 1_000;
    let shadow = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start().await;
    let data = power_cuts_from_now(&mut server, shadow.path());
    // A slow disk widens the window in which lanes commit messages whose
    // append is not yet synced (both must then be lost together).
    server.set_env("FAULTFS_SYNC_DELAY_MS", Some("3"));
    server.respawn().await;
    server
        .client()
        .put_bytes("/v1/handlers/counter?topic=pl", handler_bytes("counter"))
        .await
        .expect("deploy");

    // Producer: batch `seq` carries sequence number `seq` for every key; a
    // batch is resent until acknowledged, then the next one goes.
    let acked = Arc::new(AtomicU64::new(0));
    let base = server.base_url();
    let producer = {
        let acked = acked.clone();
        tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("client");
            for seq in 1..=BATCHES {
                loop {
                    let r = http
                        .post(format!("{base}/v1/topics/pl/messages"))
                        .json(&batch(seq))
                        .send()
                        .await;
                    if matches!(&r, Ok(r) if r.status().is_success()) {
                        acked.store(seq, Ordering::SeqCst);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    for cycle in 0..CYCLES {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(200..700))).await;
        server.kill();
        let acked_before_cut = acked.load(Ordering::SeqCst);
        restore(shadow.path(), &data);
        server.respawn().await;
        // Everything acknowledged before the cut survived it.
        let n = check_prefixes(&server, acked_before_cut, &format!("cycle {cycle}")).await;
        eprintln!("power cut {cycle}: {acked_before_cut} batches acknowledged, {n} on disk");
    }
    tokio::time::timeout(Duration::from_secs(120), producer)
        .await
        .expect("producer finished")
        .expect("producer");
    let n = check_prefixes(&server, BATCHES, "final").await;
    assert_eq!(n, BATCHES);
}

/// sled stores a log message over 128 KiB (here: a log segment holding one
/// large message) in a blob file of its own, and its log only points to
/// it. Acknowledged large messages survive a power cut: the blob files are
/// synced before the log that points to them (`third_party/sled`, patch 4)
/// and the handler, deployed only after the cut, reads every one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_keeps_large_messages_stored_as_blob_files() {
    const MESSAGES: u64 = 4;
    let shadow = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start().await;
    let data = power_cuts_from_now(&mut server, shadow.path());
    server.respawn().await;
    let pad = "x".repeat(300 << 10);
    for seq in 1..=MESSAGES {
        let one = json!([{"key": "k", "idempotency_key": format!("k/{seq}"),
                          "payload": json!({"seq": seq, "pad": pad}).to_string()}]);
        server.client().produce("big", &one).await.expect("produce");
    }
    let blobs = std::fs::read_dir(data.join("ledger/blobs")).map_or(0, |d| d.count());
    assert!(blobs >= 1, "sled wrote no blob file: the test needs one");

    server.kill();
    restore(shadow.path(), &data);
    server.respawn().await;
    let client = server.client();
    client
        .put_bytes("/v1/handlers/counter?topic=big", handler_bytes("counter"))
        .await
        .expect("deploy");
    wait_drained(&client, "counter", MESSAGES).await;
    assert_eq!(
        state(&client, "counter", "k", "seqs").await.as_deref(),
        Some(prefix(MESSAGES).as_str())
    );
}

/// Runs the counter under `fault` until the host refuses a produce; checks
/// it never acknowledges again, then restarts it on a healthy disk and
/// checks that nothing acknowledged was lost.
async fn disk_fault(fault: &str) {
    let mut server = Server::start().await;
    server
        .client()
        .put_bytes("/v1/handlers/counter?topic=df", handler_bytes("counter"))
        .await
        .expect("deploy");
    server.kill();
    preload_faultfs(&mut server);
    server.set_env("FAULTFS_FAIL", Some(fault));
    server.respawn().await;
    let client = server.client();
    let mut acked = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    for seq in 1.. {
        assert!(
            Instant::now() < deadline,
            "{fault}: the fault was never reached"
        );
        match client.produce("df", &batch(seq)).await {
            Ok(_) => acked = seq,
            Err(_) => break,
        }
    }
    // The disk stays broken: the host must not acknowledge anything again,
    // and must say it is unhealthy (or be gone).
    for seq in acked + 2..acked + 7 {
        assert!(
            client.produce("df", &batch(seq)).await.is_err(),
            "{fault}: a produce was acknowledged after a failed write/flush"
        );
    }
    if !server.exited() {
        let health = reqwest::get(format!("{}/healthz", server.base_url())).await;
        assert!(
            !matches!(health, Ok(r) if r.status().is_success()),
            "{fault}: /healthz still reports healthy"
        );
    }
    server.kill();
    server.set_env("LD_PRELOAD", None);
    server.set_env("FAULTFS_FAIL", None);
    server.respawn().await;
    let n = check_prefixes(&server, acked, fault).await;
    eprintln!("{fault}: {acked} batches acknowledged, {n} on disk after restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eio_on_flush_stops_acknowledging_and_loses_nothing() {
    disk_fault("sync:EIO:300").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enospc_on_write_stops_acknowledging_and_loses_nothing() {
    disk_fault("write:ENOSPC:300").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eio_on_write_stops_acknowledging_and_loses_nothing() {
    disk_fault("write:EIO:300").await;
}

/// A lane processes a message while the flush of its append runs (the
/// commit that follows it in the ledger's log cannot survive a crash
/// without it), and nothing is acknowledged before a flush covers both:
/// on a disk whose every sync takes 500 ms, the message's state is applied
/// while the producer still waits for its `200` and while the handler's
/// `processed` count is still 0; both come once the flushes end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_is_processed_while_its_append_flushes() {
    let mut server = Server::start().await;
    server
        .client()
        .put_bytes("/v1/handlers/counter?topic=slow", handler_bytes("counter"))
        .await
        .expect("deploy");
    server.kill();
    preload_faultfs(&mut server);
    server.set_env("FAULTFS_SYNC_DELAY_MS", Some("500"));
    server.respawn().await;
    let client = server.client();
    wait_for(&client, "counter", "lanes running", |h| h["lag"] == 0).await;

    let produced = {
        let client = server.client();
        tokio::spawn(async move {
            let one = json!([{"key": "k", "idempotency_key": "k/1",
                              "payload": json!({"seq": 1}).to_string()}]);
            client.produce("slow", &one).await
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while state(&client, "counter", "k", "seqs").await.as_deref() != Some("1") {
        assert!(
            !produced.is_finished(),
            "the producer was answered before the lane applied the message"
        );
        assert!(Instant::now() < deadline, "the message was never applied");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Applied: the append (and the lane's commit) are still being flushed.
    assert!(
        !produced.is_finished(),
        "the lane applied the message only after the producer's 200"
    );
    let status = wait_for(&client, "counter", "status", |_| true).await;
    assert_eq!(
        status["processed"], 0,
        "the lane counted a message before its commit was durable: {status}"
    );
    let offsets = produced.await.expect("producer task").expect("produce");
    assert_eq!(offsets.len(), 1);
    wait_drained(&client, "counter", 1).await;
    assert_eq!(
        state(&client, "counter", "k", "seqs").await.as_deref(),
        Some("1")
    );
}
