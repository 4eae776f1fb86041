//! NATS JetStream source and outbox relay on the real binary, against a
//! `nats-server -js` each test starts on a free port with its own store.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::fixtures::handler_bytes;
use crate::server::{state, wait_for, Server};

/// A `nats-server -js` on a free loopback port with a temporary store.
pub struct Nats {
    child: Option<Child>,
    port: u16,
    store: tempfile::TempDir,
}

fn nats_binary() -> PathBuf {
    let candidates = [
        std::env::var_os("ORDO_NATS_SERVER").map(PathBuf::from),
        Some(PathBuf::from("/usr/sbin/nats-server")),
        Some(PathBuf::from("/usr/bin/nats-server")),
        Some(PathBuf::from("/usr/local/bin/nats-server")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "nats-server not found (looked at $ORDO_NATS_SERVER, /usr/sbin, /usr/bin, \
                 /usr/local/bin): install it (Debian: apt-get install nats-server) — the \
                 JetStream tests need a real broker"
            )
        })
}

impl Nats {
    pub async fn start() -> Nats {
        let port = ordo::ports::free_loopback_port().expect("free port");
        let mut nats = Nats {
            child: None,
            port,
            store: tempfile::tempdir().expect("tempdir"),
        };
        nats.spawn().await;
        nats
    }

    async fn spawn(&mut self) {
        let child = Command::new(nats_binary())
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while async_nats::connect(self.url()).await.is_err() {
            assert!(Instant::now() < deadline, "nats-server did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops the broker abruptly and starts it again on the same port and
    /// store.
    pub async fn restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.spawn().await;
    }

    pub async fn jetstream(&self) -> jetstream::Context {
        jetstream::new(async_nats::connect(self.url()).await.expect("connect"))
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `ordo serve` with `topic` on the broker (`partitions` subjects).
async fn ordo_on(nats: &Nats, topic: &str, partitions: u32, env: &[(&str, &str)]) -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ordo.toml");
    std::fs::write(
        &path,
        format!(
            "[topics.{topic}.jetstream]\nurl = \"{}\"\npartitions = {partitions}\n",
            nats.url()
        ),
    )
    .expect("write config");
    let config = path.to_str().expect("utf-8 path").to_string();
    // The config file must outlive the server's restarts.
    std::mem::forget(dir);
    Server::start_with_env(&["--config", &config, "--max-batch", "64"], env).await
}

async fn create_stream(js: &jetstream::Context, name: &str, window: Duration) {
    js.create_stream(jetstream::stream::Config {
        name: name.into(),
        subjects: vec![format!("{name}.*")],
        storage: jetstream::stream::StorageType::File,
        duplicate_window: window,
        ..Default::default()
    })
    .await
    .expect("create stream");
}

/// Publishes one message as a producer would: to the key's partition
/// subject, with the key and the idempotency key in headers. Retries until
/// the broker acknowledges it.
async fn publish(
    js: &jetstream::Context,
    topic: &str,
    partitions: u32,
    key: &str,
    id: &str,
    payload: String,
) {
    let p = ordo::source::partition_for(key, partitions);
    loop {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Ordo-Key", key);
        headers.insert("Nats-Msg-Id", id);
        let sent = js
            .publish_with_headers(format!("{topic}.{p}"), headers, payload.clone().into())
            .await;
        if let Ok(ack) = sent {
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(5), ack).await {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn stream_messages(js: &jetstream::Context, name: &str) -> u64 {
    let mut s = js.get_stream(name).await.expect("stream");
    s.info().await.expect("info").state.messages
}

fn seqs(n: u64) -> String {
    (1..=n).map(|s| s.to_string()).collect::<Vec<_>>().join(",")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counter_oracle_over_jetstream_with_broker_accepted_duplicates() {
    let nats = Nats::start().await;
    let js = nats.jetstream().await;
    // A short duplicate window: re-publishing an id after it lets the
    // duplicate through the broker, as a producer retrying late would.
    create_stream(&js, "orders", Duration::from_millis(200)).await;
    const KEYS: u64 = 40;
    const PER_KEY: u64 = 30;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut dups = Vec::new();
    for seq in 1..=PER_KEY {
        for k in 0..KEYS {
            let (key, id) = (format!("k{k}"), format!("k{k}/{seq}"));
            let payload = json!({ "seq": seq }).to_string();
            publish(&js, "orders", 4, &key, &id, payload.clone()).await;
            if rng.gen_bool(0.1) {
                dups.push((key, id, payload));
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    for (key, id, payload) in &dups {
        publish(&js, "orders", 4, key, id, payload.clone()).await;
    }
    let total = KEYS * PER_KEY + dups.len() as u64;
    assert_eq!(
        stream_messages(&js, "orders").await,
        total,
        "the broker must have kept the late duplicates"
    );

    let server = ordo_on(&nats, "orders", 4, &[]).await;
    let client = server.client();
    client
        .put_bytes(
            "/v1/handlers/counter?topic=orders",
            handler_bytes("counter"),
        )
        .await
        .expect("deploy");
    // The counts are published once a batch is durable, a flush after the
    // lane's position (and so the lag) moved: wait for all three.
    let h = wait_for(&client, "counter", "drained", |h| {
        h["processed"].as_u64() == Some(KEYS * PER_KEY)
            && h["duplicates"].as_u64() == Some(dups.len() as u64)
            && h["lag"] == 0
    })
    .await;
    assert_eq!(h["duplicates"].as_u64(), Some(dups.len() as u64), "{h}");
    for k in 0..KEYS {
        assert_eq!(
            state(&client, "counter", &format!("k{k}"), "seqs").await,
            Some(seqs(PER_KEY)),
            "key k{k}"
        );
    }
    // Status shows the topic's partitions with their lag.
    let status = client.get_json("/v1/status").await.expect("status");
    let lags = &status["handlers"][0]["partition_lags"];
    assert_eq!(lags.as_array().map(Vec::len), Some(4), "{status}");

    // Producing through ordo publishes to the stream: the answer carries the
    // stream sequence, and the message flows back to the handler.
    let next = PER_KEY + 1;
    let offsets = client
        .produce(
            "orders",
            &json!({"key": "k0", "idempotency_key": format!("k0/{next}"),
                    "payload": json!({"seq": next}).to_string()}),
        )
        .await
        .expect("produce through ordo");
    assert_eq!(offsets, vec![total + 1]);
    wait_for(&client, "counter", "the produced message", |h| {
        h["processed"].as_u64() == Some(KEYS * PER_KEY + 1)
    })
    .await;
    assert_eq!(
        state(&client, "counter", "k0", "seqs").await,
        Some(seqs(next))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_and_broker_restart_mid_stream_lose_and_repeat_nothing() {
    let mut nats = Nats::start().await;
    let js = nats.jetstream().await;
    create_stream(&js, "events", Duration::from_millis(200)).await;
    const KEYS: u64 = 100;
    const PER_KEY: u64 = 60;
    const KILLS: usize = 20;
    let mut server = ordo_on(&nats, "events", 8, &[]).await;
    server
        .client()
        .put_bytes(
            "/v1/handlers/counter?topic=events",
            handler_bytes("counter"),
        )
        .await
        .expect("deploy");

    let url = nats.url();
    let producer = tokio::spawn(async move {
        let js = jetstream::new(async_nats::connect(url).await.expect("connect"));
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut dups = 0u64;
        let mut late = Vec::new();
        let mut sent = 0u64;
        for seq in 1..=PER_KEY {
            for k in 0..KEYS {
                let (key, id) = (format!("k{k}"), format!("k{k}/{seq}"));
                let payload = json!({ "seq": seq }).to_string();
                publish(&js, "events", 8, &key, &id, payload.clone()).await;
                if rng.gen_bool(0.05) {
                    late.push((key, id, payload));
                }
                sent += 1;
                // Spread the stream over the kill loop.
                if sent % 8 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                if sent % 500 == 0 {
                    // Re-published after the broker's duplicate window.
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    for (key, id, payload) in late.drain(..) {
                        publish(&js, "events", 8, &key, &id, payload).await;
                        dups += 1;
                    }
                }
            }
        }
        dups
    });

    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    for i in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(150..450))).await;
        server.kill();
        if i == KILLS / 2 {
            nats.restart().await;
        }
        server.respawn().await;
    }
    let dups = producer.await.expect("producer");
    let client = server.client();
    wait_for(&client, "counter", "drained", |h| {
        h["lag"] == 0 && h["partition_lags"].as_array().is_some()
    })
    .await;
    // Counters restart with the process; the ledger is the oracle.
    let deadline = Instant::now() + Duration::from_secs(120);
    for k in 0..KEYS {
        loop {
            let got = state(&client, "counter", &format!("k{k}"), "seqs").await;
            if got.as_deref() == Some(seqs(PER_KEY).as_str()) {
                break;
            }
            let done = got
                .as_deref()
                .map(|s| s.split(',').count() as u64)
                .unwrap_or(0);
            // Anything other than a clean prefix is lost/duplicated/reordered.
            assert_eq!(
                got,
                (done > 0).then(|| seqs(done)),
                "key k{k} (dups sent: {dups})"
            );
            assert!(
                Instant::now() < deadline,
                "key k{k} did not complete: {got:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            state(&client, "counter", &format!("k{k}"), "count").await,
            Some(PER_KEY.to_string()),
            "key k{k}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bank_transfers_flow_through_the_outbox_and_back_exactly_once() {
    let nats = Nats::start().await;
    let js = nats.jetstream().await;
    create_stream(&js, "bank", Duration::from_secs(120)).await;
    const ACCOUNTS: usize = 12;
    const TRANSFERS: usize = 300;
    const OPENING: i64 = 1_000;
    // The relay crashes between the broker's ack and the outbox delete a
    // few times: the re-published entries must be dropped by the broker
    // (same Nats-Msg-Id) and, failing that, by the consumer's dedup.
    let mut server = ordo_on(&nats, "bank", 4, &[("ORDO_CRASH_AT", "mid-outbox-relay:2")]).await;
    let mut crashes = 0;
    server
        .client()
        .put_bytes("/v1/handlers/bank?topic=bank", handler_bytes("bank"))
        .await
        .expect("deploy");
    for a in 0..ACCOUNTS {
        let payload = json!({"op": "deposit", "amount": OPENING}).to_string();
        publish(
            &js,
            "bank",
            4,
            &format!("acct{a}"),
            &format!("open/{a}"),
            payload,
        )
        .await;
    }
    // Random transfers; amounts small enough that no account runs dry, so
    // the expected balances follow from the list alone.
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut expected: BTreeMap<String, i64> = (0..ACCOUNTS)
        .map(|a| (format!("acct{a}"), OPENING))
        .collect();
    let mut sends = Vec::new();
    for t in 0..TRANSFERS {
        let from = rng.gen_range(0..ACCOUNTS);
        let to = (from + rng.gen_range(1..ACCOUNTS)) % ACCOUNTS;
        let amount = rng.gen_range(1..=10i64);
        let (from, to) = (format!("acct{from}"), format!("acct{to}"));
        *expected.entry(from.clone()).or_default() -= amount;
        *expected.entry(to.clone()).or_default() += amount;
        sends.push((
            from,
            format!("t/{t}"),
            json!({"op": "transfer", "amount": amount, "to": to}).to_string(),
        ));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    for (i, (from, id, payload)) in sends.into_iter().enumerate() {
        publish(&js, "bank", 4, &from, &id, payload).await;
        if server.exited() {
            crashes += 1;
            if crashes >= 3 {
                server.set_env("ORDO_CRASH_AT", None);
            }
            server.respawn().await;
        }
        // A few kills while transfers and their deposits are in flight,
        // including between a relay publish and the outbox delete.
        if i % 60 == 59 {
            tokio::time::sleep(Duration::from_millis(rng.gen_range(0..100))).await;
            server.kill();
            server.respawn().await;
        }
    }
    let client = server.client();
    let deadline = Instant::now() + Duration::from_secs(120);
    let balances: HashMap<String, i64>;
    loop {
        if server.exited() {
            crashes += 1;
            server.set_env("ORDO_CRASH_AT", None);
            server.respawn().await;
            continue;
        }
        // The host may abort at the crash point at any moment: a failed
        // request is retried after the respawn above.
        let mut read = HashMap::new();
        for a in expected.keys() {
            let got = client
                .get_bytes(&format!("/v1/handlers/bank/state/{a}/account"))
                .await;
            let Ok(got) = got else { break };
            let acct: Option<Value> = got.and_then(|b| serde_json::from_slice(&b).ok());
            read.insert(
                a.clone(),
                acct.and_then(|v| v["balance"].as_i64()).unwrap_or(0),
            );
        }
        let status = client.get_json("/v1/status").await.unwrap_or(Value::Null);
        let settled = read.len() == expected.len()
            && read.iter().all(|(a, b)| expected.get(a) == Some(b))
            && status["outbox"]["backlog"] == 0;
        if settled {
            balances = read;
            break;
        }
        assert!(
            Instant::now() < deadline,
            "bank did not settle: got {read:?}, want {expected:?}, status {status}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(crashes >= 1, "the relay crash point was never reached");
    let total: i64 = balances.values().sum();
    assert_eq!(total, OPENING * ACCOUNTS as i64, "money must be conserved");
    // Every transfer's deposit was relayed through the broker: the stream
    // holds the openings, the transfers and one deposit per transfer (the
    // broker dropped relay retries by Nats-Msg-Id).
    assert_eq!(
        stream_messages(&js, "bank").await,
        (ACCOUNTS + 2 * TRANSFERS) as u64
    );
}
