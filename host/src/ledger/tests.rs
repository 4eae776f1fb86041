use super::*;

fn env(key: &str, payload: &str) -> Envelope {
    Envelope {
        key: key.into(),
        idempotency_key: None,
        payload: payload.as_bytes().to_vec(),
        headers: vec![],
        appended_at_ms: 1,
    }
}

fn dedup_record(offset: u64) -> DedupRecord {
    DedupRecord {
        offset,
        partition: 0,
        version: 1,
        payload_hash: [7; 16],
        committed_at_ms: 2,
        outcome: DedupOutcome::Committed,
    }
}

#[test]
fn commit_is_visible_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let ledger = Ledger::open(dir.path()).unwrap();
        let batch = CommitBatch {
            state: vec![
                ("h".into(), "k".into(), "a".into(), Some(b"1".to_vec())),
                ("h".into(), "k".into(), "b".into(), None),
            ],
            dedup: vec![("h".into(), "m1".into(), dedup_record(5))],
            cursors: vec![("h".into(), "log".into(), 3, 6)],
            dlq: vec![],
            log_appends: vec![("out".into(), 1, env("x", "emitted"))],
        };
        ledger.commit(&batch).unwrap();
        ledger.flush().unwrap();
        assert_eq!(
            ledger.state_get("h", "k", "a").unwrap(),
            Some(b"1".to_vec())
        );
    }
    let ledger = Ledger::open(dir.path()).unwrap();
    assert_eq!(
        ledger.state_get("h", "k", "a").unwrap(),
        Some(b"1".to_vec())
    );
    assert_eq!(ledger.state_get("h", "k", "b").unwrap(), None);
    assert_eq!(ledger.dedup_get("h", "m1").unwrap(), Some(dedup_record(5)));
    assert_eq!(ledger.cursor("h", "log", 3).unwrap(), 6);
    assert_eq!(ledger.cursor("h", "log", 4).unwrap(), 0);
    assert_eq!(ledger.high_watermark("out", 1).unwrap(), 1);
    assert_eq!(
        ledger.read("out", 1, 0, 10).unwrap()[0].1.payload,
        b"emitted"
    );
}

#[test]
fn offsets_are_consecutive_across_threads_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    {
        let ledger = Ledger::open(dir.path()).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let l = ledger.clone();
                std::thread::spawn(move || {
                    let mut got = Vec::new();
                    for i in 0..50 {
                        got.extend(
                            l.append_batch(
                                "t",
                                &[(0, env("k", &i.to_string())), (1, env("j", "x"))],
                            )
                            .unwrap(),
                        );
                    }
                    got
                })
            })
            .collect();
        let mut p0: Vec<u64> = Vec::new();
        for t in threads {
            let got = t.join().unwrap();
            p0.extend(got.iter().step_by(2));
        }
        p0.sort_unstable();
        assert_eq!(p0, (0..200).collect::<Vec<u64>>());
        ledger.flush().unwrap();
    }
    let ledger = Ledger::open(dir.path()).unwrap();
    assert_eq!(ledger.high_watermark("t", 0).unwrap(), 200);
    assert_eq!(
        ledger.append_batch("t", &[(0, env("k", "y"))]).unwrap(),
        vec![200]
    );
    assert_eq!(ledger.read("t", 0, 195, 100).unwrap().len(), 6);
    assert_eq!(ledger.remove_before("t", 0, 201).unwrap(), 201);
    assert_eq!(ledger.high_watermark("t", 0).unwrap(), 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_shares_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(dir.path()).unwrap();
    let committer = GroupCommitter::start(ledger.clone());
    let mut tasks = Vec::new();
    for i in 0..64u32 {
        let c = committer.clone();
        tasks.push(tokio::spawn(async move {
            let batch = CommitBatch {
                cursors: vec![("h".into(), "log".into(), i, 1)],
                ..CommitBatch::default()
            };
            let ticket = tokio::task::spawn_blocking(move || c.commit(&batch).map(|t| (t, c)))
                .await
                .unwrap()
                .unwrap();
            ticket.1.wait_durable(ticket.0).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(committer.commits(), 64);
    assert!(committer.flushes() < 64, "flushes {}", committer.flushes());
    assert!(committer.flushes() >= 1);
    assert!(!committer.failed());
}
