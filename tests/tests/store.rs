//! The encrypted store and its durability API, driven the way the DICOM and FHIR layers use it,
//! including a writer process killed with SIGKILL at random moments.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use hms_edge::keys::Key;
use hms_edge::store::{Change, Store, StoreError, StoreOptions};
use rand::Rng;

const TORTURE_DIR_ENV: &str = "HMS_TEST_TORTURE_DIR";
const TORTURE_ROUND_ENV: &str = "HMS_TEST_TORTURE_ROUND";
const KEY: [u8; 32] = [0x5a; 32];

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(data))
}

/// The writer side of the crash test, run in a child process (this test binary re-executed).
/// Eight tasks write (blob + row + outbox entry) through `Store::write` and print `ACK` only after
/// the write resolved, i.e. after commit and fsync.
#[test]
fn torture_writer_child() {
    let Ok(dir) = std::env::var(TORTURE_DIR_ENV) else {
        return;
    };
    let round: u32 = std::env::var(TORTURE_ROUND_ENV).unwrap().parse().unwrap();
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap();
    rt.block_on(async move {
        let store =
            hms_edge::store::open(Path::new(&dir), &Key::from_bytes(KEY), &StoreOptions::default())
                .unwrap();
        let out = Arc::new(std::sync::Mutex::new(std::io::stdout()));
        let mut tasks = Vec::new();
        for t in 0..8u32 {
            let store = store.clone();
            let out = out.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0u32.. {
                    let key = format!("r{round}-t{t}-{i}");
                    let len = rand::rng().random_range(1..200_000usize);
                    let mut data = vec![0u8; len];
                    rand::fill(&mut data[..]);
                    let s2 = store.clone();
                    let meta = tokio::task::spawn_blocking(move || s2.blobs().put(&data))
                        .await
                        .unwrap()
                        .unwrap();
                    let k = key.clone();
                    let sha = meta.sha256.clone();
                    let sha_ack = sha.clone();
                    store
                        .write(move |tx| {
                            tx.insert_blob(&meta)?;
                            tx.kv_put("torture", &k, sha.as_bytes(), Some(&meta.id))?;
                            tx.append_change(&Change {
                                kind: "test".into(),
                                entity: k.clone(),
                                op: "create".into(),
                                version: Some("1".into()),
                                detail: None,
                            })?;
                            Ok(())
                        })
                        .await
                        .unwrap();
                    let mut o = out.lock().unwrap();
                    writeln!(o, "ACK {key} {sha_ack}").unwrap();
                    o.flush().unwrap();
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
}

#[test]
fn acknowledged_writes_survive_sigkill_and_nothing_is_half_present() {
    let dir = tempfile::tempdir().unwrap();
    let mut acked: HashMap<String, String> = HashMap::new();
    let mut verified: HashSet<String> = HashSet::new();
    let rounds = 20;
    for round in 0..rounds {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["torture_writer_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(TORTURE_DIR_ENV, dir.path())
            .env(TORTURE_ROUND_ENV, round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut acks = Vec::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("ACK ") {
                    let (k, sha) = rest.split_once(' ').unwrap();
                    acks.push((k.to_owned(), sha.to_owned()));
                }
            }
            acks
        });
        // Kill at a random moment: sometimes while opening, usually mid-batch.
        let wait_ms = rand::rng().random_range(150..900);
        std::thread::sleep(Duration::from_millis(wait_ms));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let acks = reader.join().unwrap();
        acked.extend(acks);

        let store =
            hms_edge::store::open(dir.path(), &Key::from_bytes(KEY), &StoreOptions::default())
                .unwrap();
        verify_consistent(&store, &acked, &mut verified, round);
        store.close();
    }
    assert!(
        acked.len() > 100,
        "the writer made too little progress to test anything: {}",
        acked.len()
    );
    eprintln!(
        "{} acknowledged writes, {} rows over {rounds} SIGKILL rounds, all consistent",
        acked.len(),
        verified.len()
    );
}

/// Checks the store after a crash. Blob contents are decrypted and hashed once per row (rows
/// already verified in an earlier round only get an existence check).
fn verify_consistent(
    store: &Store,
    acked: &HashMap<String, String>,
    verified: &mut HashSet<String>,
    round: u32,
) {
    store
        .read_blocking(|c| {
            let ok: String = c.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
            assert_eq!(ok, "ok", "round {round}");
            // Every row has its blob, readable and with the recorded content hash.
            let mut stmt = c.prepare("SELECT key, value, blob FROM kv WHERE ns = 'torture'")?;
            let rows: Vec<(String, Vec<u8>, String)> = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<Result<_, _>>()?;
            let keys: HashSet<&str> = rows.iter().map(|r| r.0.as_str()).collect();
            for (k, sha) in acked {
                assert!(keys.contains(k.as_str()), "round {round}: acknowledged {k} lost");
                let row = rows.iter().find(|r| &r.0 == k).unwrap();
                assert_eq!(String::from_utf8_lossy(&row.1), *sha, "round {round}: {k} altered");
            }
            for (k, sha, blob) in &rows {
                let id = hms_edge::store::BlobId::parse(blob).unwrap();
                assert!(store.blobs().path_of(&id).exists(), "round {round}: {k} lost its blob");
                if !verified.insert(k.clone()) {
                    continue;
                }
                let data =
                    store.blobs().get(&id).unwrap_or_else(|e| panic!("round {round}: {k}: {e}"));
                assert_eq!(sha256_hex(&data), String::from_utf8_lossy(sha), "round {round}: {k}");
            }
            // The change log entry exists for exactly the rows that exist.
            let mut stmt = c.prepare("SELECT entity FROM outbox WHERE kind = 'test'")?;
            let entities: HashSet<String> =
                stmt.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
            assert_eq!(entities.len(), rows.len(), "round {round}: outbox and rows differ");
            for (k, _, _) in &rows {
                assert!(entities.contains(k), "round {round}: {k} has no outbox entry");
            }
            // Sequence numbers are unique and increasing (AUTOINCREMENT).
            let seqs: Vec<i64> = c
                .prepare("SELECT seq FROM outbox ORDER BY rowid")?
                .query_map([], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            assert!(seqs.windows(2).all(|w| w[0] < w[1]));
            // No orphan blob files after open's sweep: files on disk == blob rows.
            let count: i64 = c.query_row("SELECT count(*) FROM blobs", [], |r| r.get(0))?;
            let files = count_files(store.blobs().root());
            assert_eq!(files as i64, count, "round {round}: orphan or missing blob files");
            Ok(())
        })
        .unwrap();
}

fn count_files(root: &Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(root).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            n += count_files(&p);
        } else {
            n += 1;
        }
    }
    n
}

#[tokio::test]
async fn nothing_in_clear_at_rest() {
    let dir = tempfile::tempdir().unwrap();
    let marker = "PATIENT-MARKER-Zq7x9-Doe^Jane";
    let store =
        hms_edge::store::open(dir.path(), &Key::random(), &StoreOptions::default()).unwrap();
    let s2 = store.clone();
    let blob_data = format!("{marker} in a blob ").repeat(5000).into_bytes();
    let meta =
        tokio::task::spawn_blocking(move || s2.blobs().put(&blob_data)).await.unwrap().unwrap();
    store
        .write(move |tx| {
            tx.insert_blob(&meta)?;
            tx.kv_put("chart", marker, marker.as_bytes(), Some(&meta.id))?;
            tx.append_change(&Change {
                kind: "test".into(),
                entity: marker.into(),
                op: "create".into(),
                version: None,
                detail: Some(format!("{{\"name\":\"{marker}\"}}")),
            })?;
            Ok(())
        })
        .await
        .unwrap();
    // Check while the WAL still holds the data, and again after a clean close (checkpointed).
    assert_no_marker(dir.path(), marker.as_bytes());
    store.close();
    drop(store);
    assert_no_marker(dir.path(), marker.as_bytes());
    // Plain SQLite cannot read the file.
    let plain = rusqlite::Connection::open(dir.path().join("index.db")).unwrap();
    let err = plain.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get::<_, i64>(0));
    assert!(err.is_err(), "the database must not be readable without the key");
}

fn assert_no_marker(dir: &Path, marker: &[u8]) {
    let mut stack = vec![dir.to_owned()];
    let mut scanned = 0;
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let data = std::fs::read(&p).unwrap();
            scanned += data.len();
            assert!(
                !data.windows(marker.len()).any(|w| w == marker),
                "plaintext found in {}",
                p.display()
            );
        }
    }
    assert!(scanned > 0);
}

#[tokio::test]
async fn wrong_key_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store =
        hms_edge::store::open(dir.path(), &Key::from_bytes([1; 32]), &StoreOptions::default())
            .unwrap();
    store
        .write(|tx| {
            tx.kv_put("x", "y", b"z", None)?;
            Ok(())
        })
        .await
        .unwrap();
    // Keep the WAL around (store still open) to make the check harder, then also after close.
    let db = dir.path().join("index.db");
    let read_all = || {
        ["", "-wal", "-shm"]
            .iter()
            .map(|s| std::fs::read(format!("{}{s}", db.display())).ok())
            .collect::<Vec<_>>()
    };
    store.close();
    drop(store);
    let before = read_all();
    let err =
        hms_edge::store::open(dir.path(), &Key::from_bytes([2; 32]), &StoreOptions::default())
            .unwrap_err();
    assert!(matches!(err, StoreError::WrongKey));
    assert_eq!(err.to_string(), "wrong key or not an hms-edge store");
    assert_eq!(before, read_all(), "a wrong key must not modify the store");
    // The right key still opens it with the data intact.
    let store =
        hms_edge::store::open(dir.path(), &Key::from_bytes([1; 32]), &StoreOptions::default())
            .unwrap();
    let v = store.read_blocking(|c| Store::kv_get(c, "x", "y")).unwrap().unwrap();
    assert_eq!(v.0, b"z");
}

#[tokio::test]
async fn a_foreign_sqlite_file_is_not_an_hms_edge_store() {
    let dir = tempfile::tempdir().unwrap();
    let plain = rusqlite::Connection::open(dir.path().join("index.db")).unwrap();
    plain.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);").unwrap();
    drop(plain);
    let err =
        hms_edge::store::open(dir.path(), &Key::random(), &StoreOptions::default()).unwrap_err();
    assert_eq!(err.to_string(), "wrong key or not an hms-edge store");
}

#[tokio::test]
async fn tampered_blob_is_detected_on_read() {
    let dir = tempfile::tempdir().unwrap();
    let store =
        hms_edge::store::open(dir.path(), &Key::random(), &StoreOptions::default()).unwrap();
    let meta = store.blobs().put(&vec![7u8; 300_000]).unwrap();
    let path = store.blobs().path_of(&meta.id);
    let mut raw = std::fs::read(&path).unwrap();
    let mid = raw.len() / 2;
    raw[mid] ^= 0x80;
    std::fs::write(&path, raw).unwrap();
    let err = store.blobs().get(&meta.id).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    assert!(err.to_string().contains("integrity"), "{err}");
}

#[tokio::test]
async fn a_failing_write_rolls_back_alone_and_others_in_the_batch_commit() {
    let dir = tempfile::tempdir().unwrap();
    let store =
        hms_edge::store::open(dir.path(), &Key::random(), &StoreOptions::default()).unwrap();
    let mut handles = Vec::new();
    for i in 0..64 {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            store
                .write(move |tx| {
                    tx.kv_put("batch", &i.to_string(), b"v", None)?;
                    tx.append_change(&Change {
                        kind: "test".into(),
                        entity: i.to_string(),
                        op: "create".into(),
                        version: None,
                        detail: None,
                    })?;
                    if i % 8 == 0 {
                        return Err(StoreError::Rejected(format!("write {i} refused")));
                    }
                    Ok(i)
                })
                .await
        }));
    }
    let mut ok = 0;
    for h in handles {
        match h.await.unwrap() {
            Ok(_) => ok += 1,
            Err(StoreError::Rejected(m)) => assert!(m.contains("refused")),
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(ok, 56);
    let (rows, changes): (i64, i64) = store
        .read_blocking(|c| {
            Ok((
                c.query_row("SELECT count(*) FROM kv WHERE ns='batch'", [], |r| r.get(0))?,
                c.query_row("SELECT count(*) FROM outbox", [], |r| r.get(0))?,
            ))
        })
        .unwrap();
    assert_eq!((rows, changes), (56, 56), "failed writes must leave no row and no change");
    // Concurrent writers shared fsyncs: fewer commits than writes.
    let commits = store.stats().commits.load(std::sync::atomic::Ordering::Relaxed);
    assert!(commits < 64, "group commit did not group: {commits} commits for 64 writes");
}

/// Issue 16: a write whose code panics fails alone, rolled back; writes before and after it in
/// the same batch commit, the writer keeps serving, and the health probe stays green.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_write_fails_alone_and_the_writer_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let store =
        hms_edge::store::open(dir.path(), &Key::from_bytes(KEY), &StoreOptions::default()).unwrap();
    let put = |key: &'static str| {
        let store = store.clone();
        async move {
            store
                .write(move |tx| {
                    tx.sql().execute(
                        "INSERT INTO kv (ns, key, value) VALUES ('t', ?1, x'01')",
                        [key],
                    )?;
                    Ok(())
                })
                .await
        }
    };
    let boom = {
        let store = store.clone();
        async move {
            store
                .write(|tx| -> Result<(), StoreError> {
                    tx.sql().execute(
                        "INSERT INTO kv (ns, key, value) VALUES ('t', 'boom', x'01')",
                        [],
                    )?;
                    let s = "2000-01-01T10:00+0\u{e9}00";
                    let _ = &s[..19]; // slicing inside a character: panics like the old date parser
                    Ok(())
                })
                .await
        }
    };
    let (a, b, c) = tokio::join!(put("before"), boom, put("after"));
    a.unwrap();
    assert!(matches!(b, Err(StoreError::Panicked)), "{b:?}");
    c.unwrap();
    put("later").await.unwrap();
    assert!(store.writer_alive());
    store.probe().await.unwrap();
    let keys: Vec<String> = store
        .read(|c| {
            let mut st = c.prepare("SELECT key FROM kv WHERE ns = 't' ORDER BY key")?;
            let v = st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
            Ok(v)
        })
        .await
        .unwrap();
    assert_eq!(keys, ["after", "before", "later"]);
}

/// Issue 16: SQL that runs past the read deadline is interrupted with a clear error, and the
/// reader thread then serves the next read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runaway_query_is_stopped_at_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions { db_readers: 1, ..StoreOptions::default() };
    let store = hms_edge::store::open(dir.path(), &Key::from_bytes(KEY), &opts).unwrap();
    let runaway = store
        .read(|c| {
            Ok(c.query_row(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n)
                 SELECT count(*) FROM n",
                [],
                |r| r.get::<_, i64>(0),
            )?)
        })
        .await;
    let err = runaway.unwrap_err();
    assert!(err.is_deadline(), "{err}");
    let one: i64 = store.read(|c| Ok(c.query_row("SELECT 1", [], |r| r.get(0))?)).await.unwrap();
    assert_eq!(one, 1);
}
