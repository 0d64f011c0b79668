//! The integrity ledger end to end, against the real daemon and CLI: `$verify` proofs for a FHIR
//! version and a DICOM instance verify offline with `hms-edge verify`; `hms-edge audit check`
//! passes on an untouched store and names the record after each tamper made directly in
//! SQLCipher (with the key): one byte of a stored resource changed, an audit row deleted, two
//! audit rows swapped. `$verify` of the changed version then fails too.

mod dicom_common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use dicom_common::*;
use hms_edge::keys::KeyPurpose;
use hms_edge_tests::{DaemonOptions, DaemonProc, bin, fhir_client};
use serde_json::{Value, json};

fn opts() -> DaemonOptions {
    let mut o = DaemonOptions { explicit_state_dir: true, ..Default::default() };
    o.env.insert("HMS_EDGE_LEDGER_CHECKPOINT_INTERVAL_SECS".into(), "1".into());
    o
}

/// Runs the admin CLI against a state folder.
fn cli(state: &Path, args: &[&str]) -> Output {
    Command::new(bin("hms-edge"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HMS_EDGE_PATHS_STATE_DIR", state)
        .output()
        .expect("run hms-edge")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn open_db(state: &Path) -> rusqlite::Connection {
    let master = hms_edge::keys::load_key_file(&state.join("master.key")).unwrap();
    hms_edge::store::db::open(
        &state.join("index.db"),
        &master.derive(KeyPurpose::Database),
        false,
        2048,
    )
    .unwrap()
}

fn copy_state(from: &Path, to: &Path) -> PathBuf {
    let st = Command::new("cp").arg("-a").arg(from).arg(to).status().unwrap();
    assert!(st.success());
    to.to_owned()
}

fn wait_checkpoint_covering(state: &Path, size: i64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let conn = open_db(state);
        let max: i64 = conn
            .query_row("SELECT coalesce(max(size), 0) FROM ledger_checkpoints", [], |r| r.get(0))
            .unwrap();
        if max >= size {
            return;
        }
        assert!(Instant::now() < deadline, "no checkpoint of size {size} in 20 s (newest {max})");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn proofs_verify_offline_and_tampering_is_named() {
    let work = tempfile::tempdir().unwrap();
    let d = DaemonProc::start(work.path(), &opts());
    let state = d.state_dir();
    let c = fhir_client(&state.join("tls/cert.pem"));
    let base = d.fhir_base();

    // A patient, updated once (two versions), read back (audit events).
    let family = "Ledgerwood";
    let p = json!({"resourceType": "Patient", "name": [{"family": family, "given": ["Ada"]}],
                   "birthDate": "1961-07-14"});
    let r = c
        .post(format!("{base}/Patient"))
        .header("content-type", "application/fhir+json")
        .body(p.to_string())
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    let pid = r.json::<Value>().unwrap()["id"].as_str().unwrap().to_owned();
    let mut p2 = p.clone();
    p2["id"] = json!(pid);
    p2["gender"] = json!("female");
    let r = c
        .put(format!("{base}/Patient/{pid}"))
        .header("content-type", "application/fhir+json")
        .body(p2.to_string())
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(c.get(format!("{base}/Patient/{pid}")).send().unwrap().status(), 200);

    // A DICOM instance from a modality.
    let files = testfiles(&["CT_small.dcm"]);
    let facts = &info(&files)[0];
    let sop = facts["sop_instance"].as_str().unwrap().to_owned();
    let port = d.dicom.port().to_string();
    let out = run(dcmtk("storescu").args(["-aec", AE, "127.0.0.1", &port]).arg(&files[0]));
    assert!(out.status.success(), "storescu: {}", String::from_utf8_lossy(&out.stderr));

    // $verify of the FHIR version: a proof document that verifies offline.
    let r = c.get(format!("{base}/Patient/{pid}/_history/2/$verify")).send().unwrap();
    assert_eq!(r.status(), 200);
    let proof: Value = r.json().unwrap();
    assert_eq!(proof["format"], "hms-edge-proof/v1");
    assert_eq!(proof["subject"], format!("Patient/{pid}/_history/2"));
    assert_eq!(proof["leaf"]["kind"], "fhir");
    assert_eq!(proof["anchor"], "pending");
    assert!(proof["checkpoint"].as_str().unwrap().starts_with("hms-edge/dev-tenant/dev-site\n"));
    let doc = proof.to_string();
    for phi in [family, "Ada", "1961-07-14", "female"] {
        assert!(!doc.contains(phi), "proof document carries {phi:?}: {doc}");
    }
    let fhir_proof = work.path().join("fhir-proof.json");
    std::fs::write(&fhir_proof, &doc).unwrap();
    let o = cli(&state, &["verify", fhir_proof.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).starts_with(&format!("OK: Patient/{pid}/_history/2 is leaf #")),
        "{}",
        text(&o)
    );

    // Pinned to the box's key (what an auditor does), and refused under another key.
    let o = cli(&state, &["audit", "key"]);
    assert!(o.status.success(), "{}", text(&o));
    let vkey = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    assert!(vkey.starts_with("hms-edge/dev-tenant/dev-site+"), "{vkey}");
    let o = cli(&state, &["verify", "--key", &vkey, fhir_proof.to_str().unwrap()]);
    assert!(o.status.success() && text(&o).contains("(pinned key)"), "{}", text(&o));
    let other = tempfile::tempdir().unwrap();
    hms_edge_tests::write_key_file(other.path(), "master.key", 0o600);
    let o = cli(other.path(), &["audit", "key"]);
    let foreign = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    let o = cli(&state, &["verify", "--key", &foreign, fhir_proof.to_str().unwrap()]);
    assert!(!o.status.success(), "{}", text(&o));

    // A forged proof (one bit of the leaf, or of the path) does not verify.
    for field in ["leaf", "path"] {
        let mut forged = proof.clone();
        let target =
            if field == "leaf" { &mut forged["leaf"]["data"] } else { &mut forged["inclusion"][0] };
        let mut s = target.as_str().unwrap().to_owned();
        let last = s.pop().unwrap();
        s.push(if last == '0' { '1' } else { '0' });
        *target = json!(s);
        let f = work.path().join(format!("forged-{field}.json"));
        std::fs::write(&f, forged.to_string()).unwrap();
        let o = cli(&state, &["verify", f.to_str().unwrap()]);
        assert!(!o.status.success(), "forged {field} verified: {}", text(&o));
        assert!(text(&o).contains("does NOT verify"), "{}", text(&o));
    }

    // The DICOM instance, by SOP Instance UID.
    let r = c.get(format!("{base}/$verify-dicom?sop={sop}")).send().unwrap();
    assert_eq!(r.status(), 200);
    let dproof: Value = r.json().unwrap();
    assert_eq!(dproof["leaf"]["kind"], "dicom");
    let ddoc = dproof.to_string();
    for phi in [facts["patient_name"].as_str().unwrap(), facts["patient_id"].as_str().unwrap()] {
        assert!(phi.is_empty() || !ddoc.contains(phi), "DICOM proof carries {phi:?}");
    }
    let dicom_proof = work.path().join("dicom-proof.json");
    std::fs::write(&dicom_proof, &ddoc).unwrap();
    let o = cli(&state, &["verify", dicom_proof.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let r = c.get(format!("{base}/$verify-dicom?sop=1.2.3.4.404")).send().unwrap();
    assert_eq!(r.status(), 404);

    // The untouched store passes the check, also while the daemon runs.
    let o = cli(&state, &["audit", "check"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).starts_with("OK: "), "{}", text(&o));

    // Stop with everything checkpointed; then tamper with copies of the store.
    let leaves: i64 =
        open_db(&state).query_row("SELECT count(*) FROM ledger_leaves", [], |r| r.get(0)).unwrap();
    wait_checkpoint_covering(&state, leaves);
    drop(c);
    let (status, _, log) = d.stop();
    assert!(status.success(), "{log}");
    let o = cli(&state, &["audit", "check"]);
    assert!(o.status.success(), "{}", text(&o));

    // 1. One byte of the stored Patient version 1 changed.
    let s1 = copy_state(&state, &work.path().join("tamper-byte"));
    {
        let db = open_db(&s1);
        let json: String = db
            .query_row(
                "SELECT json FROM fhir_history WHERE rtype = 'Patient' AND id = ?1 AND version = 1",
                [&pid],
                |r| r.get(0),
            )
            .unwrap();
        let changed = json.replacen("1961-07-14", "1961-07-15", 1);
        assert_eq!(changed.len(), json.len());
        assert_ne!(changed, json);
        db.execute(
            "UPDATE fhir_history SET json = ?2 WHERE rtype = 'Patient' AND id = ?1 AND version = 1",
            rusqlite::params![pid, changed],
        )
        .unwrap();
    }
    let o = cli(&s1, &["audit", "check"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains(&format!("Patient/{pid}/_history/1 was modified")), "{t}");
    assert!(t.contains("TAMPERED"), "{t}");
    assert!(!t.contains(&format!("Patient/{pid}/_history/2 was")), "only v1 changed: {t}");
    // … and $verify of that version refuses, naming it; the untouched version still verifies.
    let wd = work.path().join("run-tampered");
    std::fs::create_dir(&wd).unwrap();
    std::fs::rename(&s1, wd.join("state")).unwrap();
    let d = DaemonProc::start(&wd, &opts());
    let c = fhir_client(&d.state_dir().join("tls/cert.pem"));
    let r = c.get(format!("{}/Patient/{pid}/_history/1/$verify", d.fhir_base())).send().unwrap();
    assert_eq!(r.status(), 409);
    let body = r.text().unwrap();
    assert!(body.contains(&format!("Patient/{pid}/_history/1 does not match")), "{body}");
    let r = c.get(format!("{}/Patient/{pid}/_history/2/$verify", d.fhir_base())).send().unwrap();
    assert_eq!(r.status(), 200);
    drop(c);
    d.stop();

    // 2. An audit row deleted.
    let s2 = copy_state(&state, &work.path().join("tamper-delete"));
    let victim: i64 = {
        let db = open_db(&s2);
        let seq: i64 = db
            .query_row("SELECT min(seq) FROM audit_events WHERE action = 'update'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(db.execute("DELETE FROM audit_events WHERE seq = ?1", [seq]).unwrap(), 1);
        seq
    };
    let o = cli(&s2, &["audit", "check"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains(&format!("audit event row {victim} was deleted")), "{}", text(&o));

    // 3. Two audit rows swapped (their contents exchanged, positions kept).
    let s3 = copy_state(&state, &work.path().join("tamper-swap"));
    let (a, b) = {
        let db = open_db(&s3);
        let mut stmt = db.prepare("SELECT seq FROM audit_events ORDER BY seq LIMIT 2").unwrap();
        let seqs: Vec<i64> =
            stmt.query_map([], |r| r.get(0)).unwrap().collect::<Result<_, _>>().unwrap();
        let (a, b) = (seqs[0], seqs[1]);
        db.execute_batch(&format!(
            "UPDATE audit_events SET seq = -1 WHERE seq = {a};
             UPDATE audit_events SET seq = {a} WHERE seq = {b};
             UPDATE audit_events SET seq = {b} WHERE seq = -1;"
        ))
        .unwrap();
        (a, b)
    };
    let o = cli(&s3, &["audit", "check"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains(&format!("audit event #{a} (")) && t.contains(&format!("audit event #{b} (")),
        "{t}"
    );
    assert!(t.contains("was modified"), "{t}");

    // 4. The log itself edited to hide a record: its leaf row removed together with the row.
    let s4 = copy_state(&state, &work.path().join("tamper-log"));
    let hidden: i64 = {
        let db = open_db(&s4);
        let (idx, seq): (i64, i64) = db
            .query_row(
                "SELECT idx, ref FROM ledger_leaves WHERE kind = 'audit' ORDER BY idx LIMIT 1 OFFSET 2",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        db.execute("DELETE FROM audit_events WHERE seq = ?1", [seq]).unwrap();
        db.execute("DELETE FROM ledger_leaves WHERE idx = ?1", [idx]).unwrap();
        idx
    };
    let o = cli(&s4, &["audit", "check"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains(&format!("leaf #{hidden}: missing from the log")), "{t}");
    assert!(t.contains("does not match its signed root"), "{t}");
}
