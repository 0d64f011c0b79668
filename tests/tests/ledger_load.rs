//! The ledger under load, on the real store (SQLCipher, group commit, fsync): audit events
//! appended by many concurrent writers each get their leaf in their own transaction, the log stays
//! dense and checkable, and proofs stay small and fast. Prints the numbers the README quotes
//! (`cargo test -p hms-edge-tests --test ledger_load -- --nocapture`).

use std::time::Instant;

use hms_edge::fhir::storage::{self, AuditRecord};
use hms_edge::keys::{Key, KeyPurpose};
use hms_edge::ledger::{Ledger, Subject};
use hms_edge::store::StoreOptions;

const WRITERS: usize = 64;
const PER_WRITER: usize = 150;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_stay_dense_checkable_and_provable() {
    let dir = tempfile::tempdir().unwrap();
    let master = Key::from_bytes([9; 32]);
    let store = hms_edge::store::open(dir.path(), &master, &StoreOptions::default()).unwrap();
    let ledger = Ledger::new(store.ledger_signing_key(), "hms-edge/test/load");

    // A FHIR version first (leaf #0: its proof has the longest path), then the load.
    let written = store
        .write_as(|tx| {
            let p = serde_json::json!({"resourceType": "Patient", "id": "p1"});
            storage::put(tx, "Patient", "p1", p, None, "local")
        })
        .await
        .unwrap();

    // Many writers at once, as the FHIR API's requests would be: each event is one write.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..PER_WRITER {
                let rec = AuditRecord {
                    actor: format!("user-{w}"),
                    source: "127.0.0.1".into(),
                    action: "read".into(),
                    entity: format!("Observation/o-{w}-{i}"),
                    outcome: "success".into(),
                    detail: None,
                };
                store.write(move |tx| storage::audit(tx, &rec)).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let took = started.elapsed();
    let n = (WRITERS * PER_WRITER) as f64;
    println!(
        "ledger load: {n} audit events (each with its leaf) by {WRITERS} concurrent writers in \
         {:.2} s = {:.0} leaves/s (SQLCipher, fsync per group commit, {} commits)",
        took.as_secs_f64(),
        n / took.as_secs_f64(),
        store.stats().commits.load(std::sync::atomic::Ordering::Relaxed)
    );

    // Checkpoint what the writers appended.
    let cp = ledger.checkpoint(&store).await.unwrap().unwrap();
    assert_eq!(cp.size, n as u64 + 1);
    let t = Instant::now();
    let doc = ledger
        .prove(
            &store,
            Subject::Fhir { rtype: "Patient".into(), id: "p1".into(), version: written.version },
        )
        .await
        .unwrap();
    let prove_ms = t.elapsed().as_secs_f64() * 1e3;
    let json = serde_json::to_string(&doc).unwrap();
    let rounds = 2000;
    let t = Instant::now();
    for _ in 0..rounds {
        doc.verify(None).unwrap();
    }
    let verify_us = t.elapsed().as_secs_f64() * 1e6 / rounds as f64;
    println!(
        "ledger proof: leaf #{} of tree size {}, inclusion path {} hashes, document {} bytes; made in {:.1} ms \
         (incl. checkpoint signing), verified offline in {:.0} µs",
        doc.leaf.index,
        doc.tree_size,
        doc.inclusion.len(),
        json.len(),
        prove_ms,
        verify_us
    );
    assert_eq!(doc.tree_size, n as u64 + 1);
    assert_eq!(doc.leaf.index, 0);
    assert_eq!(doc.inclusion.len(), 14, "ceil(log2(9601)) hashes");

    // The whole log recomputed from the store matches its checkpoints.
    let key = master.derive(KeyPurpose::AuditHmac);
    let vkey = ledger.vkey_parsed();
    let t = Instant::now();
    let report = store.read(move |c| hms_edge::ledger::check::run(c, &key, &vkey)).await.unwrap();
    println!(
        "ledger check: {} leaves recomputed and compared with {} checkpoint(s) in {:.2} s",
        report.leaves,
        report.checkpoints,
        t.elapsed().as_secs_f64()
    );
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.leaves, n as u64 + 1);
    store.close();
}

/// A store upgraded from before the ledger: its records are logged once at the first start, in
/// table order, and the check then passes; records added later behind the ledger's back are not
/// adopted but reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_from_before_the_ledger_are_adopted_once() {
    let dir = tempfile::tempdir().unwrap();
    let master = Key::from_bytes([5; 32]);
    let store = hms_edge::store::open(dir.path(), &master, &StoreOptions::default()).unwrap();
    let ledger = Ledger::new(store.ledger_signing_key(), "hms-edge/test/upgrade");
    // Rows as an older build wrote them: no leaves.
    store
        .write(|tx| {
            for i in 0..3 {
                tx.sql().execute(
                    "INSERT INTO audit_events (at, actor, source, action, entity, outcome)
                     VALUES (?1, 'old', '127.0.0.1', 'read', 'Patient/x', 'success')",
                    [i],
                )?;
            }
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(ledger.adopt_existing(&store).await.unwrap(), 3);
    assert_eq!(ledger.adopt_existing(&store).await.unwrap(), 0, "only once");
    ledger.checkpoint(&store).await.unwrap().unwrap();
    let key = master.derive(KeyPurpose::AuditHmac);
    let vkey = ledger.vkey_parsed();
    let (k2, v2) = (key.clone(), vkey.clone());
    let report = store.read(move |c| hms_edge::ledger::check::run(c, &k2, &v2)).await.unwrap();
    assert!(report.ok() && report.leaves == 3, "{:?}", report.problems);
    store
        .write(|tx| {
            tx.sql().execute(
                "INSERT INTO audit_events (at, actor, source, action, entity, outcome)
                 VALUES (9, 'sneaky', '127.0.0.1', 'delete', 'Patient/y', 'success')",
                [],
            )?;
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(ledger.adopt_existing(&store).await.unwrap(), 0);
    let report = store.read(move |c| hms_edge::ledger::check::run(c, &key, &vkey)).await.unwrap();
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert!(
        report.problems[0].contains("(delete Patient/y) is not in the log"),
        "{:?}",
        report.problems
    );
    store.close();
}
