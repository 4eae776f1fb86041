use super::*;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

fn env(key: &str, payload: &str) -> Envelope {
    Envelope {
        key: key.into(),
        idempotency_key: None,
        payload: payload.as_bytes().to_vec(),
        headers: vec![],
        appended_at_ms: 1,
    }
}

fn state_map(entries: &[(&str, &str)]) -> StateMap {
    entries
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect()
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
                ("h".into(), "k".into(), state_map(&[("a", "1")])),
                ("h".into(), "gone".into(), StateMap::new()),
            ],
            dedup: vec![("h".into(), "m1".into(), dedup_record(5))],
            cursors: vec![("h".into(), "log".into(), 3, 6)],
            log_appends: vec![("out".into(), 1, env("x", "emitted"))],
            ..CommitBatch::default()
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
    assert_eq!(ledger.state_record("h", "gone").unwrap(), StateMap::new());
    // A later batch replaces the key's record; an empty one removes it.
    let replace = |map: StateMap| CommitBatch {
        state: vec![("h".into(), "k".into(), map)],
        ..CommitBatch::default()
    };
    ledger
        .commit(&replace(state_map(&[("b", "2"), ("c", "")])))
        .unwrap();
    assert_eq!(
        ledger.state_entries("h", "k").unwrap(),
        vec![("b".into(), b"2".to_vec()), ("c".into(), Vec::new())]
    );
    ledger.commit(&replace(StateMap::new())).unwrap();
    assert!(ledger.state_entries("h", "k").unwrap().is_empty());
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
    let committer = GroupCommitter::start(Arc::new(ledger.clone()));
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

fn dead_letter(key: &str, offset: u64) -> DeadLetter {
    DeadLetter {
        handler: "h".into(),
        version: 1,
        topic: "t".into(),
        partition: 2,
        offset,
        partition_key: key.into(),
        idempotency_key: format!("{key}/{offset}"),
        payload: b"{}".to_vec(),
        headers: vec![],
        error_kind: "permanent".into(),
        error: "no".into(),
        attempts: 1,
        first_failure_ms: 1,
        last_failure_ms: 1,
    }
}

#[test]
fn dead_letters_parking_and_actions_commit_together() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(dir.path()).unwrap();
    let (s1, s2) = (ledger.next_id().unwrap(), ledger.next_id().unwrap());
    assert!(s1 < s2);
    let parked = ParkedKey {
        partition_key: "k".into(),
        since_ms: 7,
        cause_seq: s1,
        paused: false,
    };
    ledger
        .commit(&CommitBatch {
            dlq: vec![
                ("h".into(), s1, Some(dead_letter("k", 10))),
                ("h".into(), s2, Some(dead_letter("k", 11))),
            ],
            parked: vec![("h".into(), 2, "k".into(), Some(parked.clone()))],
            ..CommitBatch::default()
        })
        .unwrap();
    assert_eq!(ledger.parked_keys("h", 2).unwrap(), vec![parked.clone()]);
    assert!(ledger.parked_keys("h", 3).unwrap().is_empty());
    assert_eq!(ledger.parked_list("h").unwrap(), vec![(2, parked)]);
    let list = ledger.dlq_list("h").unwrap();
    assert_eq!(
        list.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![s1, s2]
    );
    assert_eq!(ledger.dlq_get("h", s2).unwrap().unwrap().offset, 11);

    ledger
        .request_dlq_actions("h", &[(2, s2, DlqAction::Drop), (2, s1, DlqAction::Replay)])
        .unwrap();
    assert_eq!(ledger.dlq_actions_pending("h").unwrap(), 2);
    assert_eq!(
        ledger.dlq_actions("h", 2, 10).unwrap(),
        vec![(s1, DlqAction::Replay), (s2, DlqAction::Drop)]
    );
    assert!(ledger.dlq_actions("h", 1, 10).unwrap().is_empty());

    // Carrying out both actions removes them, the dead letters and the
    // parking in one transaction.
    ledger
        .commit(&CommitBatch {
            dlq: vec![("h".into(), s1, None), ("h".into(), s2, None)],
            parked: vec![("h".into(), 2, "k".into(), None)],
            dlq_actions_done: vec![("h".into(), 2, s1), ("h".into(), 2, s2)],
            ..CommitBatch::default()
        })
        .unwrap();
    assert_eq!(ledger.dlq_count("h").unwrap(), 0);
    assert_eq!(ledger.parked_count("h").unwrap(), 0);
    assert_eq!(ledger.dlq_actions_pending("h").unwrap(), 0);

    // A continuation replaces the action it carries on from.
    ledger
        .request_dlq_actions("h", &[(2, s1, DlqAction::ReplayKey)])
        .unwrap();
    ledger
        .commit(&CommitBatch {
            dlq_actions_done: vec![("h".into(), 2, s1), ("h".into(), 2, s2)],
            dlq_actions_new: vec![("h".into(), 2, s2, DlqAction::ReplayKey)],
            ..CommitBatch::default()
        })
        .unwrap();
    assert_eq!(
        ledger.dlq_actions("h", 2, 10).unwrap(),
        vec![(s2, DlqAction::ReplayKey)]
    );

    let rec = AuditRecord {
        at_ms: 1,
        action: "dlq-drop".into(),
        handler: "h".into(),
        detail: "d".into(),
    };
    ledger.append_audit(&rec).unwrap();
    assert_eq!(ledger.audit_list(Some("h")).unwrap()[0].1, rec);
    assert!(ledger.audit_list(Some("other")).unwrap().is_empty());
}

#[test]
fn retry_backoff_ceiling_grows_and_caps() {
    let p = RetryPolicy::default();
    assert_eq!(p.ceiling_ms(1), 100);
    assert_eq!(p.ceiling_ms(2), 200);
    assert_eq!(p.ceiling_ms(9), 25_600);
    assert_eq!(p.ceiling_ms(10), 30_000);
    assert_eq!(p.ceiling_ms(u32::MAX), 30_000);
    assert!(p.validate().is_ok());
    let bad = RetryPolicy {
        max_attempts: 0,
        ..RetryPolicy::default()
    };
    assert!(bad.validate().unwrap_err().contains("max_attempts"));
}

/// A storage whose flushes fail from the `fail_from`-th on (EIO).
struct FailingFlush {
    ledger: Ledger,
    flushes: std::sync::atomic::AtomicU32,
    fail_from: u32,
}

impl Storage for FailingFlush {
    fn commit(&self, batches: &[&CommitBatch]) -> Result<()> {
        self.ledger.commit_all(batches)
    }
    fn append(&self, topic: &str, items: &[(u32, Envelope)]) -> Result<Vec<u64>> {
        self.ledger.append_batch(topic, items)
    }
    fn flush(&self) -> Result<()> {
        let n = self
            .flushes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        if n >= self.fail_from {
            return Err(LedgerError::Io(std::io::Error::from_raw_os_error(5)));
        }
        self.ledger.flush()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_flush_is_never_reported_durable_and_stops_the_committer() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(dir.path()).unwrap();
    let committer = GroupCommitter::start(Arc::new(FailingFlush {
        ledger: ledger.clone(),
        flushes: Default::default(),
        fail_from: 2,
    }));
    let c = committer.clone();
    let (offsets, ticket) =
        tokio::task::spawn_blocking(move || c.append("t", &[(0, env("k", "first"))]))
            .await
            .unwrap()
            .unwrap();
    assert_eq!(offsets, vec![0]);
    committer.wait_durable(ticket).await.unwrap();

    // The second flush fails (EIO): its waiter gets an error, not "durable".
    let c = committer.clone();
    let (_, ticket) =
        tokio::task::spawn_blocking(move || c.append("t", &[(0, env("k", "second"))]))
            .await
            .unwrap()
            .unwrap();
    let err = committer.wait_durable(ticket).await.unwrap_err();
    assert!(matches!(err, LedgerError::NotDurable(_)), "{err}");
    assert!(committer.failed());
    // From now on nothing is accepted, and nothing is reported durable.
    let c = committer.clone();
    let refused = tokio::task::spawn_blocking(move || {
        c.commit(&CommitBatch {
            cursors: vec![("h".into(), "log".into(), 0, 1)],
            ..CommitBatch::default()
        })
    })
    .await
    .unwrap();
    assert!(matches!(refused, Err(LedgerError::NotDurable(_))));
    assert!(committer.wait_durable(ticket + 1).await.is_err());
}

/// A storage whose commits fail half-way (the journal refused them).
struct HalfApplied(Ledger);

impl Storage for HalfApplied {
    fn commit(&self, _: &[&CommitBatch]) -> Result<()> {
        Err(LedgerError::Interrupted("test".into()))
    }
    fn append(&self, topic: &str, items: &[(u32, Envelope)]) -> Result<Vec<u64>> {
        self.0.append_batch(topic, items)
    }
    fn flush(&self) -> Result<()> {
        self.0.flush()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_applied_batch_stops_the_committer() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(dir.path()).unwrap();
    let committer = GroupCommitter::start(Arc::new(HalfApplied(ledger)));
    let c = committer.clone();
    let (failed, refused) = tokio::task::spawn_blocking(move || {
        let failed = c.commit(&CommitBatch::default());
        (failed, c.append("t", &[(0, env("k", "after"))]))
    })
    .await
    .unwrap();
    assert!(matches!(failed, Err(LedgerError::Interrupted(_))));
    assert!(committer.failed());
    // Appends would succeed on the storage, but nothing is accepted now.
    assert!(matches!(refused, Err(LedgerError::NotDurable(_))));
}

/// Writes a data directory in the first layout (one sled tree per record
/// kind), as ordo before format 2 did.
fn write_first_layout(dir: &Path, log_messages: u64) {
    let db = open_db(dir).unwrap();
    db.open_tree("state")
        .unwrap()
        .insert(keys::state_entry("h", "k", "a"), b"1".to_vec())
        .unwrap();
    db.open_tree("dedup")
        .unwrap()
        .insert(keys::dedup("h", "m1"), encode(&dedup_record(5)).unwrap())
        .unwrap();
    db.open_tree("cursor")
        .unwrap()
        .insert(keys::cursor("h", "log", 3), &6u64.to_be_bytes())
        .unwrap();
    let log = db.open_tree("log").unwrap();
    for offset in 0..log_messages {
        let e = env("x", &format!("m{offset}"));
        log.insert(keys::log("big", 0, offset), encode(&e).unwrap())
            .unwrap();
    }
    db.flush().unwrap();
}

fn tree_names(dir: &Path) -> Vec<String> {
    let db = open_db(dir).unwrap();
    db.tree_names()
        .iter()
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect()
}

fn assert_first_layout_records(ledger: &Ledger, log_messages: u64) {
    assert_eq!(
        ledger.state_get("h", "k", "a").unwrap(),
        Some(b"1".to_vec())
    );
    assert_eq!(ledger.dedup_get("h", "m1").unwrap(), Some(dedup_record(5)));
    assert_eq!(ledger.dedup_get("h", "m2").unwrap(), None);
    assert_eq!(ledger.cursor("h", "log", 3).unwrap(), 6);
    assert_eq!(ledger.high_watermark("big", 0).unwrap(), log_messages);
    let tail = ledger.read("big", 0, log_messages - 2, 10).unwrap();
    assert_eq!(tail.len(), 2);
    assert_eq!(
        tail[1].1.payload,
        format!("m{}", log_messages - 1).into_bytes()
    );
}

#[test]
fn a_first_layout_ledger_is_copied_into_one_tree() {
    let dir = tempfile::tempdir().unwrap();
    // More records than one copy batch.
    let n = 25_000;
    write_first_layout(dir.path(), n);
    {
        let ledger = Ledger::open(dir.path()).unwrap();
        assert_first_layout_records(&ledger, n);
        assert_eq!(ledger.record_count().unwrap(), n + 3);
    }
    let names = tree_names(dir.path());
    for old in SPACE_NAMES {
        assert!(!names.iter().any(|n| n == old), "{old} left in {names:?}");
    }
    // Reopening reads the new layout (nothing left to copy).
    let ledger = Ledger::open(dir.path()).unwrap();
    assert_first_layout_records(&ledger, n);
}

#[test]
fn an_interrupted_copy_is_redone_and_old_trees_left_after_it_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    write_first_layout(dir.path(), 100);
    {
        // A copy that stopped half-way: some records in the ledger tree, no
        // format key.
        let db = open_db(dir.path()).unwrap();
        let tree = db.open_tree(LEDGER_TREE).unwrap();
        let journal = Journal::open(&db, tree, &|| Ok(())).unwrap();
        let log = Space::new(journal, 1);
        for (k, v) in db.open_tree("log").unwrap().iter().take(40).flatten() {
            log.insert(k, v).unwrap();
        }
        db.flush().unwrap();
    }
    {
        let ledger = Ledger::open(dir.path()).unwrap();
        assert_first_layout_records(&ledger, 100);
    }
    {
        // A copy that finished but stopped before dropping the old trees:
        // what they hold is stale and must not be read or copied again.
        let db = open_db(dir.path()).unwrap();
        db.open_tree("state")
            .unwrap()
            .insert(keys::state_entry("h", "k", "a"), b"stale".to_vec())
            .unwrap();
        db.flush().unwrap();
    }
    let ledger = Ledger::open(dir.path()).unwrap();
    assert_first_layout_records(&ledger, 100);
    drop(ledger);
    assert!(!tree_names(dir.path()).iter().any(|n| n == "state"));
}

/// The ledger tree's format key.
fn format_of(dir: &Path) -> Option<u64> {
    let db = open_db(dir).unwrap();
    let v = db
        .open_tree(LEDGER_TREE)
        .unwrap()
        .get(FORMAT_KEY)
        .unwrap()?;
    Some(u64::from_be_bytes(v.as_ref().try_into().unwrap()))
}

#[test]
fn format_2_state_becomes_one_record_per_partition_key() {
    let dir = tempfile::tempdir().unwrap();
    // Enough keys for several migration batches.
    let keys_n = 12_000;
    {
        // Format 2: one entry per state key. One partition key was already
        // rewritten when the previous migration run was cut short.
        let db = open_db(dir.path()).unwrap();
        let tree = db.open_tree(LEDGER_TREE).unwrap();
        let journal = Journal::open(&db, tree.clone(), &|| Ok(())).unwrap();
        tree.insert(FORMAT_KEY, &2u64.to_be_bytes()).unwrap();
        let state = Space::new(journal, space_byte("state"));
        for i in 0..keys_n {
            let pk = format!("k{i}");
            state
                .insert(
                    keys::state_entry("h", &pk, "count"),
                    i.to_string().into_bytes(),
                )
                .unwrap();
            state
                .insert(keys::state_entry("h", &pk, "seqs"), b"1,2".to_vec())
                .unwrap();
        }
        state
            .insert(keys::state_entry("other", "k1", "x"), b"y".to_vec())
            .unwrap();
        state
            .insert(
                keys::state("h", "done"),
                encode_state(&state_map(&[("count", "7")])),
            )
            .unwrap();
        db.flush().unwrap();
    }
    for _ in 0..2 {
        let ledger = Ledger::open(dir.path()).unwrap();
        for i in (0..keys_n).step_by(1009) {
            assert_eq!(
                ledger.state_entries("h", &format!("k{i}")).unwrap(),
                vec![
                    ("count".into(), i.to_string().into_bytes()),
                    ("seqs".into(), b"1,2".to_vec())
                ]
            );
        }
        assert_eq!(
            ledger.state_get("other", "k1", "x").unwrap(),
            Some(b"y".to_vec())
        );
        assert_eq!(
            ledger.state_get("h", "done", "count").unwrap(),
            Some(b"7".to_vec())
        );
        // One record per partition key, nothing else.
        let t = ledger.trees();
        assert_eq!(t.state.len(), keys_n + 2);
        for entry in t.state.iter() {
            let (k, v) = entry.unwrap();
            assert!(keys::parse_state(&k).is_some());
            decode_state(&v).unwrap();
        }
        assert!(ledger.check().unwrap().problems.is_empty());
        drop(ledger);
        assert_eq!(format_of(dir.path()), Some(FORMAT));
    }
}

#[test]
fn exports_list_state_per_state_key_and_imports_gather_it() {
    let (from, to) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let source = Ledger::open(from.path()).unwrap();
    source
        .commit(&CommitBatch {
            state: vec![
                ("h".into(), "k".into(), state_map(&[("a", "1"), ("b", "2")])),
                ("h".into(), "j".into(), state_map(&[("a", "3")])),
            ],
            ..CommitBatch::default()
        })
        .unwrap();
    let mut out = Vec::new();
    assert_eq!(source.export(&mut out, &|_| {}).unwrap(), 3);
    let text = String::from_utf8(out.clone()).unwrap();
    let b64 = |k: Vec<u8>| B64.encode(k);
    assert!(
        text.contains(&b64(keys::state_entry("h", "k", "b"))),
        "{text}"
    );
    let target = Ledger::open(to.path()).unwrap();
    assert_eq!(target.import(&mut out.as_slice(), &|_, _| {}).unwrap(), 3);
    for pk in ["k", "j"] {
        assert_eq!(
            target.state_entries("h", pk).unwrap(),
            source.state_entries("h", pk).unwrap()
        );
    }
    // A state line must name a state key.
    let bad = format!(
        "{{\"format\":\"ordo-ledger-export\",\"version\":1,\"records\":1}}\n{{\"tree\":\"state\",\"key\":\"{}\",\"value\":\"\"}}\n",
        b64(keys::state("h", "k"))
    );
    let empty = tempfile::tempdir().unwrap();
    let err = Ledger::open(empty.path())
        .unwrap()
        .import(&mut bad.as_bytes(), &|_, _| {})
        .unwrap_err();
    assert!(err.to_string().contains("line 2: state key"), "{err}");
}

#[test]
fn imports_gather_a_keys_state_lines_in_any_order() {
    let b64 = |k: Vec<u8>| B64.encode(k);
    let line = |pk: &str, sk: &str, v: &str| {
        format!(
            "{{\"tree\":\"state\",\"key\":\"{}\",\"value\":\"{}\"}}\n",
            b64(keys::state_entry("h", pk, sk)),
            B64.encode(v)
        )
    };
    // 2,000 entries of one key in a row (one write), then a key whose
    // lines are listed apart, around another key's.
    let mut body: String = (0..2000)
        .map(|i| line("big", &format!("s{i:04}"), &i.to_string()))
        .collect();
    body += &line("apart", "a", "1");
    body += &line("other", "x", "9");
    body += &line("apart", "b", "2");
    let text =
        format!("{{\"format\":\"ordo-ledger-export\",\"version\":1,\"records\":2003}}\n{body}");
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(dir.path()).unwrap();
    assert_eq!(
        ledger.import(&mut text.as_bytes(), &|_, _| {}).unwrap(),
        2003
    );
    let big = ledger.state_entries("h", "big").unwrap();
    assert_eq!(big.len(), 2000);
    assert_eq!(big[1999], ("s1999".to_string(), b"1999".to_vec()));
    assert_eq!(
        ledger.state_entries("h", "apart").unwrap(),
        vec![
            ("a".to_string(), b"1".to_vec()),
            ("b".to_string(), b"2".to_vec())
        ]
    );
    assert_eq!(
        ledger.state_get("h", "other", "x").unwrap(),
        Some(b"9".to_vec())
    );
    assert!(ledger.check().unwrap().problems.is_empty());
}

#[test]
fn a_ledger_of_a_newer_format_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(Ledger::open(dir.path()).unwrap());
    {
        let db = open_db(dir.path()).unwrap();
        db.open_tree(LEDGER_TREE)
            .unwrap()
            .insert(FORMAT_KEY, &(FORMAT + 1).to_be_bytes())
            .unwrap();
        // Whatever that ordo keeps in its journal is not ours to apply.
        db.open_tree("journal")
            .unwrap()
            .insert(b"not ours", b"x".to_vec())
            .unwrap();
        db.flush().unwrap();
    }
    let err = Ledger::open(dir.path())
        .err()
        .expect("a newer format is refused");
    assert!(err.to_string().contains("newer ordo"), "{err}");
    let db = open_db(dir.path()).unwrap();
    assert_eq!(db.open_tree("journal").unwrap().len(), 1);
}

#[test]
fn recorded_keys_are_found_right_after_an_open_and_once_the_index_filled() {
    let dir = tempfile::tempdir().unwrap();
    let n = 50_000u64;
    {
        let ledger = Ledger::open(dir.path()).unwrap();
        let batch = CommitBatch {
            dedup: (0..n)
                .map(|i| ("h".into(), format!("m{i}"), dedup_record(i)))
                .collect(),
            ..CommitBatch::default()
        };
        ledger.commit(&batch).unwrap();
        ledger.flush().unwrap();
    }
    let ledger = Ledger::open(dir.path()).unwrap();
    // Right after opening (the lookup waits for the fill).
    assert_eq!(
        ledger.dedup_get("h", "m49999").unwrap(),
        Some(dedup_record(49_999))
    );
    wait_index_filled(&ledger);
    for i in (0..n).step_by(997) {
        assert_eq!(
            ledger.dedup_get("h", &format!("m{i}")).unwrap(),
            Some(dedup_record(i))
        );
    }
    assert_eq!(ledger.dedup_get("h", "never").unwrap(), None);
    drop(ledger);
    // Dropping a ledger whose fill is still running stops the fill and
    // releases the data directory.
    drop(Ledger::open(dir.path()).unwrap());
    drop(Ledger::open(dir.path()).unwrap());
}

/// Records in the log space of a partition, as (first offset, messages).
fn log_records(ledger: &Ledger, topic: &str, partition: u32) -> Vec<(u64, usize)> {
    ledger
        .segments(topic, partition, 0, u64::MAX)
        .unwrap()
        .map(|s| s.map(|(first, entries)| (first, entries.len())).unwrap())
        .collect()
}

#[test]
fn log_segments_serve_any_offset_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    // 700 messages per partition in one append, interleaved over two
    // partitions, one of them too big to share a segment.
    let mut items = Vec::new();
    for i in 0..1400u32 {
        let payload = if i == 601 {
            "x".repeat(40 << 10)
        } else {
            i.to_string()
        };
        items.push((i % 2, env(&format!("k{i}"), &payload)));
    }
    let expect = |partition: u32, from: u64, max: usize| -> Vec<(u64, Envelope)> {
        items
            .iter()
            .filter(|(p, _)| *p == partition)
            .map(|(_, e)| e.clone())
            .enumerate()
            .map(|(o, e)| (o as u64, e))
            .skip(from as usize)
            .take(max)
            .collect()
    };
    {
        let ledger = Ledger::open(dir.path()).unwrap();
        let offsets = ledger.append_batch("t", &items).unwrap();
        assert_eq!(offsets[..4], [0, 0, 1, 1]);
        // Partition 1 holds the big message (its offset 300).
        assert_eq!(
            log_records(&ledger, "t", 0),
            [(0, 256), (256, 256), (512, 188)]
        );
        assert_eq!(
            log_records(&ledger, "t", 1),
            [(0, 256), (256, 44), (300, 1), (301, 256), (557, 143)]
        );
        for partition in 0..2 {
            for (from, max) in [
                (0, 1),
                (0, 700),
                (255, 2),
                (299, 3),
                (300, 1),
                (650, 100),
                (699, 5),
                (700, 5),
                (9999, 1),
            ] {
                assert_eq!(
                    ledger.read("t", partition, from, max).unwrap(),
                    expect(partition, from, max),
                    "partition {partition}, from {from}, max {max}"
                );
            }
        }
        ledger.flush().unwrap();
    }
    let ledger = Ledger::open(dir.path()).unwrap();
    assert_eq!(ledger.high_watermark("t", 1).unwrap(), 700);
    assert_eq!(
        ledger.append_batch("t", &[(1, env("k", "y"))]).unwrap(),
        vec![700]
    );
    assert_eq!(ledger.read("t", 1, 699, 10).unwrap().len(), 2);
    assert!(ledger.check().unwrap().problems.is_empty());
}

#[test]
fn retention_removes_whole_segments_only() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(dir.path()).unwrap();
    for _ in 0..3 {
        let batch: Vec<(u32, Envelope)> = (0..100).map(|i| (0, env("k", &i.to_string()))).collect();
        ledger.append_batch("t", &batch).unwrap();
    }
    let now = now_ms();
    // Committed up to 150: the second segment (100..200) must stay whole.
    assert_eq!(
        ledger.retention_bound("t", 0, 150, now, 10_000).unwrap(),
        Some(100)
    );
    // A scan limit stops at a segment's end.
    assert_eq!(
        ledger.retention_bound("t", 0, 300, now, 1).unwrap(),
        Some(100)
    );
    // Too young: nothing.
    assert_eq!(
        ledger.retention_bound("t", 0, 300, 1, 10_000).unwrap(),
        None
    );
    assert_eq!(ledger.remove_before("t", 0, 150).unwrap(), 100);
    assert_eq!(ledger.low_watermark("t", 0).unwrap(), 100);
    assert_eq!(ledger.read("t", 0, 0, 1).unwrap()[0].0, 100);
    assert_eq!(
        ledger.remove_before("t", 0, 150).unwrap(),
        0,
        "segment 100..200 stays"
    );
    assert_eq!(ledger.remove_before("t", 0, 300).unwrap(), 200);
    ledger.flush().unwrap();
    drop(ledger);
    // Emptied: offsets go on from where the log ended.
    let ledger = Ledger::open(dir.path()).unwrap();
    assert_eq!(ledger.low_watermark("t", 0).unwrap(), 300);
    assert_eq!(
        ledger.append_batch("t", &[(0, env("k", "y"))]).unwrap(),
        vec![300]
    );
}

#[test]
fn a_format_3_log_of_one_record_per_message_is_read_and_continued() {
    let dir = tempfile::tempdir().unwrap();
    {
        let ledger = Ledger::open(dir.path()).unwrap();
        // Format 3 wrote each message as its own record: as one-message
        // appends do.
        for i in 0..5 {
            ledger
                .append_batch("t", &[(0, env("k", &i.to_string()))])
                .unwrap();
        }
        ledger.flush().unwrap();
    }
    {
        let db = open_db(dir.path()).unwrap();
        let tree = db.open_tree(LEDGER_TREE).unwrap();
        tree.insert(FORMAT_KEY, &3u64.to_be_bytes()).unwrap();
        db.flush().unwrap();
    }
    assert_eq!(format_of(dir.path()), Some(3));
    let ledger = Ledger::open(dir.path()).unwrap();
    assert_eq!(
        log_records(&ledger, "t", 0),
        [(0, 1), (1, 1), (2, 1), (3, 1), (4, 1)]
    );
    let batch: Vec<(u32, Envelope)> = (5..10).map(|i| (0, env("k", &i.to_string()))).collect();
    assert_eq!(
        ledger.append_batch("t", &batch).unwrap(),
        (5..10).collect::<Vec<u64>>()
    );
    let read: Vec<String> = ledger
        .read("t", 0, 3, 100)
        .unwrap()
        .into_iter()
        .map(|(o, e)| format!("{o}:{}", String::from_utf8_lossy(&e.payload)))
        .collect();
    assert_eq!(read, ["3:3", "4:4", "5:5", "6:6", "7:7", "8:8", "9:9"]);
    drop(ledger);
    assert_eq!(format_of(dir.path()), Some(FORMAT));
}

#[test]
fn exports_list_the_log_per_message_and_check_finds_overlapping_segments() {
    let (from, to) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let source = Ledger::open(from.path()).unwrap();
    let batch: Vec<(u32, Envelope)> = (0..10).map(|i| (0, env("k", &i.to_string()))).collect();
    source.append_batch("t", &batch).unwrap();
    let mut out = Vec::new();
    assert_eq!(source.export(&mut out, &|_| {}).unwrap(), 10);
    let target = Ledger::open(to.path()).unwrap();
    assert_eq!(target.import(&mut out.as_slice(), &|_, _| {}).unwrap(), 10);
    assert_eq!(
        target.read("t", 0, 0, 100).unwrap(),
        source.read("t", 0, 0, 100).unwrap()
    );
    assert_eq!(target.high_watermark("t", 0).unwrap(), 10);
    assert_eq!(log_records(&target, "t", 0), [(0, 10)], "gathered again");
    // A one-message record inside the segment 0..10.
    source
        .trees()
        .log
        .insert(keys::log("t", 0, 4), encode(&env("k", "x")).unwrap())
        .unwrap();
    let problems = source.check().unwrap().problems;
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("inside the segment before it"),
        "{problems:?}"
    );
}

#[test]
fn imports_gather_long_logs_into_full_segments() {
    let (from, to) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let source = Ledger::open(from.path()).unwrap();
    // Appended one message at a time (one record each); partition 0 longer
    // than an import gathers at once, with one message far bigger than a
    // segment.
    for i in 0..5000u32 {
        let payload = if i == 2500 {
            "x".repeat(40 << 10)
        } else {
            i.to_string()
        };
        let partition = if i < 4600 { 0 } else { 1 };
        source
            .append_batch("t", &[(partition, env("k", &payload))])
            .unwrap();
    }
    let mut out = Vec::new();
    assert_eq!(source.export(&mut out, &|_| {}).unwrap(), 5000);
    let target = Ledger::open(to.path()).unwrap();
    assert_eq!(
        target.import(&mut out.as_slice(), &|_, _| {}).unwrap(),
        5000
    );
    for p in 0..2 {
        assert_eq!(
            target.read("t", p, 0, 5000).unwrap(),
            source.read("t", p, 0, 5000).unwrap()
        );
    }
    let full = |from: u64, n: u64| (0..n).map(move |i| (from + 256 * i, 256));
    let mut p0: Vec<(u64, usize)> = full(0, 9).collect();
    // Cut before and after the big message, and after 4096 gathered.
    p0.extend([(2304, 196), (2500, 1)]);
    p0.extend(full(2501, 6));
    p0.extend([(4037, 59), (4096, 256), (4352, 248)]);
    assert_eq!(log_records(&target, "t", 0), p0);
    assert_eq!(log_records(&target, "t", 1), [(0, 256), (256, 144)]);
    assert!(target.check().unwrap().problems.is_empty());
}

#[test]
fn the_tools_leave_an_older_layout_as_it_is_or_refuse_it_untouched() {
    // Format 3 (read as it is): opened, read, and still format 3 after.
    let dir = tempfile::tempdir().unwrap();
    {
        let ledger = Ledger::open(dir.path()).unwrap();
        ledger.append_batch("t", &[(0, env("k", "a"))]).unwrap();
        ledger.flush().unwrap();
    }
    {
        let db = open_db(dir.path()).unwrap();
        let tree = db.open_tree(LEDGER_TREE).unwrap();
        tree.insert(FORMAT_KEY, &3u64.to_be_bytes()).unwrap();
        db.flush().unwrap();
    }
    {
        let ledger = Ledger::open_existing(dir.path()).unwrap();
        assert_eq!(ledger.read("t", 0, 0, 10).unwrap().len(), 1);
        assert!(ledger.check().unwrap().problems.is_empty());
    }
    assert_eq!(format_of(dir.path()), Some(3));
    // Format 2 (would need its state migrated): refused, left as it was.
    let old = tempfile::tempdir().unwrap();
    {
        let db = open_db(old.path()).unwrap();
        let tree = db.open_tree(LEDGER_TREE).unwrap();
        tree.insert(FORMAT_KEY, &2u64.to_be_bytes()).unwrap();
        db.flush().unwrap();
    }
    let err = Ledger::open_existing(old.path()).err().unwrap().to_string();
    assert!(err.contains("ledger format 2 is older"), "{err}");
    assert_eq!(format_of(old.path()), Some(2));
    // Nothing ever written: said so, not called an old layout.
    let empty = tempfile::tempdir().unwrap();
    let err = Ledger::open_existing(empty.path())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("holds no ledger"), "{err}");
    let missing = empty.path().join("missing");
    let err = Ledger::open_existing(&missing).err().unwrap().to_string();
    assert!(err.contains("no such directory"), "{err}");
    assert!(!missing.exists(), "not created");
    // The host's open migrates.
    drop(Ledger::open(old.path()).unwrap());
    assert_eq!(format_of(old.path()), Some(FORMAT));
}

/// The idempotency entries of a ledger: (own-key records, segments).
fn dedup_entries(ledger: &Ledger) -> (usize, usize) {
    let t = ledger.trees();
    (t.dedup.iter().count(), t.dedup_segments.iter().count())
}

fn record_at(offset: u64, committed_at_ms: u64, outcome: DedupOutcome) -> DedupRecord {
    DedupRecord {
        committed_at_ms,
        outcome,
        ..dedup_record(offset)
    }
}

fn dedup_batch(records: &[(String, DedupRecord)]) -> CommitBatch {
    CommitBatch {
        dedup: records
            .iter()
            .map(|(k, r)| ("h".to_string(), k.clone(), r.clone()))
            .collect(),
        ..CommitBatch::default()
    }
}

/// Waits until the ledger's idempotency index is filled.
fn wait_index_filled(ledger: &Ledger) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !ledger.dedup_index_filled() {
        assert!(
            std::time::Instant::now() < deadline,
            "the index never filled"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// The positions the index holds for handler `h`'s `key`, newest first.
fn index_slots(ledger: &Ledger, key: &str) -> Vec<usize> {
    let hash = dedup::key_hash("h", key);
    let at = ledger.inner.dedup_index.locations(hash).unwrap();
    at.iter().map(|l| l.slot).collect()
}

#[test]
fn a_batchs_idempotency_records_are_segments_and_the_newest_record_wins() {
    let dir = tempfile::tempdir().unwrap();
    {
        let ledger = Ledger::open(dir.path()).unwrap();
        let first: Vec<(String, DedupRecord)> = (0..600)
            .map(|i| (format!("m{i}"), dedup_record(i)))
            .collect();
        ledger.commit(&dedup_batch(&first)).unwrap();
        assert_eq!(
            dedup_entries(&ledger),
            (0, 3),
            "600 records: three segments of at most {}",
            dedup::SEGMENT_MAX
        );
        // Recorded again in later batches (held, then replayed).
        let again =
            |offset, outcome| dedup_batch(&[("m5".to_string(), record_at(offset, 3, outcome))]);
        ledger.commit(&again(900, DedupOutcome::Parked)).unwrap();
        assert_eq!(
            ledger.dedup_get("h", "m5").unwrap(),
            Some(record_at(900, 3, DedupOutcome::Parked))
        );
        ledger.commit(&again(901, DedupOutcome::Committed)).unwrap();
        ledger.flush().unwrap();
        assert_eq!(dedup_entries(&ledger), (0, 5));
        assert!(ledger.dedup_index_bytes() >= 600 * 16);
    }
    // After a reopen the index is rebuilt from the segments.
    let ledger = Ledger::open(dir.path()).unwrap();
    assert_eq!(
        ledger.dedup_get("h", "m5").unwrap(),
        Some(record_at(901, 3, DedupOutcome::Committed)),
        "the newest of a key's records"
    );
    for i in (0..600).filter(|i| *i != 5) {
        assert_eq!(
            ledger.dedup_get("h", &format!("m{i}")).unwrap(),
            Some(dedup_record(i)),
            "m{i}"
        );
    }
    // The fill gave every key its position in its segment.
    let slot = |key: &str| index_slots(&ledger, key);
    assert_eq!(slot("m0"), vec![0]);
    assert_eq!(slot("m300"), vec![300 - dedup::SEGMENT_MAX]);
    assert_eq!(
        slot("m5"),
        vec![0, 0, 5],
        "newest first: its own segments, then the first"
    );
    assert_eq!(ledger.dedup_get("h", "m600").unwrap(), None);
    assert_eq!(
        ledger.dedup_get("other", "m1").unwrap(),
        None,
        "per handler"
    );
    let report = ledger.check().unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert!(
        report.records.contains(&("dedup", 602)),
        "check counts records, not segments: {:?}",
        report.records
    );
}

#[test]
fn a_key_twice_in_one_segment_answers_with_the_later_record_after_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    // Keys in both halves of the index's shards, which two threads fill.
    let keys: Vec<String> = (0..64).map(|i| format!("k{i}")).collect();
    assert!(keys
        .iter()
        .any(|k| dedup::upper_half(dedup::key_hash("h", k))));
    assert!(keys
        .iter()
        .any(|k| !dedup::upper_half(dedup::key_hash("h", k))));
    let later = |i: usize| dedup_record(1_000 + i as u64);
    let check = |ledger: &Ledger| {
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(ledger.dedup_get("h", k).unwrap(), Some(later(i)), "{k}");
        }
    };
    {
        let ledger = Ledger::open(dir.path()).unwrap();
        let batch: Vec<(String, DedupRecord)> = (0..2)
            .flat_map(|round| {
                keys.iter().enumerate().map(move |(i, k)| {
                    let record = if round == 0 {
                        dedup_record(i as u64)
                    } else {
                        later(i)
                    };
                    (k.clone(), record)
                })
            })
            .collect();
        ledger.commit(&dedup_batch(&batch)).unwrap();
        ledger.flush().unwrap();
        assert_eq!(dedup_entries(&ledger), (0, 1), "one segment");
        check(&ledger);
    }
    let ledger = Ledger::open(dir.path()).unwrap();
    check(&ledger);
}

#[test]
fn the_sweep_removes_expired_records_and_keeps_a_segments_others() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(dir.path()).unwrap();
    // One old segment with a dead-lettered record among committed ones,
    // one young segment.
    let mut old: Vec<(String, DedupRecord)> = (0..10)
        .map(|i| {
            (
                format!("old{i}"),
                record_at(i, 100, DedupOutcome::Committed),
            )
        })
        .collect();
    old[3].1.outcome = DedupOutcome::DeadLettered;
    ledger.commit(&dedup_batch(&old)).unwrap();
    let young: Vec<(String, DedupRecord)> = (0..10)
        .map(|i| {
            (
                format!("young{i}"),
                record_at(i, 5_000, DedupOutcome::Committed),
            )
        })
        .collect();
    ledger.commit(&dedup_batch(&young)).unwrap();
    // An own-key record of an older layout, expired.
    ledger
        .trees()
        .dedup
        .insert(
            keys::dedup("h", "legacy"),
            encode(&record_at(1, 100, DedupOutcome::Committed)).unwrap(),
        )
        .unwrap();
    drop(ledger);
    let ledger = Ledger::open(dir.path()).unwrap();
    wait_index_filled(&ledger);
    assert!(
        ledger.dedup_get("h", "legacy").unwrap().is_some(),
        "indexed by the fill"
    );
    // In two passes of a few records each.
    let (removed, next) = ledger.sweep_dedup(&[], 1_000, 5).unwrap();
    assert_eq!(
        removed, 10,
        "the legacy record and nine of the old segment's"
    );
    let (more, next) = ledger.sweep_dedup(&next.unwrap(), 1_000, 5).unwrap();
    assert_eq!((more, next), (0, None));
    assert_eq!(ledger.dedup_get("h", "legacy").unwrap(), None);
    for i in 0..10 {
        let old = ledger.dedup_get("h", &format!("old{i}")).unwrap();
        assert_eq!(old.is_some(), i == 3, "old{i}: {old:?}");
        assert!(ledger
            .dedup_get("h", &format!("young{i}"))
            .unwrap()
            .is_some());
    }
    assert_eq!(dedup_entries(&ledger), (0, 2), "the old segment rewritten");
    assert_eq!(
        index_slots(&ledger, "old3"),
        vec![0],
        "old3 is first in its rewritten segment, and the index says so"
    );
    // Sweeping everything committed leaves the dead-lettered record only.
    let (removed, _) = ledger.sweep_dedup(&[], u64::MAX, 1_000).unwrap();
    assert_eq!(removed, 10);
    assert_eq!(dedup_entries(&ledger), (0, 1));
    assert_eq!(
        ledger.dedup_get("h", "old3").unwrap().map(|r| r.outcome),
        Some(DedupOutcome::DeadLettered)
    );
    // Recorded again (replayed): the old dead-lettered record goes, the
    // new one stays until it is old itself.
    let replayed = vec![(
        "old3".to_string(),
        record_at(3, 5_000, DedupOutcome::Committed),
    )];
    ledger.commit(&dedup_batch(&replayed)).unwrap();
    assert_eq!(ledger.sweep_dedup(&[], 1_000, 1_000).unwrap().0, 1);
    assert_eq!(dedup_entries(&ledger), (0, 1));
    assert_eq!(
        ledger.dedup_get("h", "old3").unwrap(),
        Some(replayed[0].1.clone())
    );
    // Purging the handler forgets it.
    ledger.purge_handler("h").unwrap();
    assert_eq!(ledger.dedup_get("h", "old3").unwrap(), None);
}

#[test]
fn idempotency_records_export_per_record_and_import_as_segments() {
    let (from, to) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let source = Ledger::open(from.path()).unwrap();
    let records: Vec<(String, DedupRecord)> = (0..300)
        .map(|i| (format!("m{i}"), dedup_record(i)))
        .collect();
    source.commit(&dedup_batch(&records)).unwrap();
    // An own-key record of an older layout is exported alike.
    source
        .trees()
        .dedup
        .insert(
            keys::dedup("h", "legacy"),
            encode(&dedup_record(7)).unwrap(),
        )
        .unwrap();
    let mut out = Vec::new();
    assert_eq!(source.export(&mut out, &|_| {}).unwrap(), 301);
    let text = String::from_utf8(out.clone()).unwrap();
    let dedup_lines: Vec<serde_json::Value> = text
        .lines()
        .skip(1)
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|l| l["tree"] == "dedup")
        .collect();
    assert_eq!(dedup_lines.len(), 301, "one line per record");
    for line in &dedup_lines {
        let key = B64.decode(line["key"].as_str().unwrap()).unwrap();
        assert!(matches!(keys::parse_dedup(&key), Some(("h", _))));
    }
    let target = Ledger::open(to.path()).unwrap();
    assert_eq!(target.import(&mut out.as_slice(), &|_, _| {}).unwrap(), 301);
    assert_eq!(dedup_entries(&target), (0, 2), "301 records: two segments");
    assert_eq!(
        target.dedup_get("h", "legacy").unwrap(),
        Some(dedup_record(7))
    );
    for i in (0..300).step_by(7) {
        assert_eq!(
            target.dedup_get("h", &format!("m{i}")).unwrap(),
            Some(dedup_record(i))
        );
    }
    // A line whose key is a segment's is refused with its line number.
    let bad = format!(
        "{}\n{}\n",
        text.lines().next().unwrap(),
        serde_json::json!({
            "tree": "dedup",
            "key": B64.encode(keys::dedup_segment("h", 1)),
            "value": B64.encode(encode(&dedup_record(1)).unwrap()),
        })
    );
    let empty = tempfile::tempdir().unwrap();
    let e = Ledger::open(empty.path())
        .unwrap()
        .import(&mut bad.as_bytes(), &|_, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 2") && e.contains("dedup key"), "{e}");
}
