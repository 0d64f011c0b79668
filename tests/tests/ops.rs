//! Operations CLI (issue 6, item 4), end to end with the real binaries: `hms-edge backup` during
//! a DCMTK `storescu` storm into the real `hms-edged`, `hms-edge restore` (wrong key, corrupt
//! file, running daemon: refused and nothing changed) and `hms-edge rotate-key` (nothing lost,
//! old key refused, an interrupted rotation diagnosed by the daemon and finished by the CLI).

mod dicom_common;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dicom_common::*;
use hms_edge_tests::{DaemonOptions, DaemonProc, bin, fhir_client, free_port};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// `hms-edge ARGS` on the state folder `<work>/state` (as the daemon of `DaemonProc` uses).
fn cli(work: &Path, args: &[&str], extra_env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(bin("hms-edge"));
    cmd.current_dir(work)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HMS_EDGE_PATHS_STATE_DIR", work.join("state"))
        .args(args);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    cmd.output().expect("run hms-edge")
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn daemon_opts(port: u16) -> DaemonOptions {
    let mut opts = DaemonOptions { explicit_state_dir: true, ..Default::default() };
    opts.env.insert("HMS_EDGE_DICOM_LISTEN".into(), format!("127.0.0.1:{port}"));
    opts
}

/// `n` clones of CT_small with fresh SOP Instance UIDs: (files, file → SOP Instance UID).
fn instances(dir: &Path, n: usize) -> (Vec<PathBuf>, HashMap<PathBuf, String>) {
    let src = testfiles(&["CT_small.dcm"]).remove(0);
    let uids: Vec<String> = serde_json::from_value(peer(&[
        "clone",
        &src.display().to_string(),
        &dir.display().to_string(),
        &n.to_string(),
    ]))
    .unwrap();
    let files: Vec<PathBuf> = (0..n).map(|i| dir.join(format!("{i:06}.dcm"))).collect();
    let uid_of = files.iter().cloned().zip(uids).collect();
    (files, uid_of)
}

/// Sends every file (25 per association, `senders` associations at once), all must succeed.
fn send_all(port: u16, files: &[PathBuf], senders: usize) {
    let threads: Vec<_> = (0..senders)
        .map(|s| {
            let mine: Vec<PathBuf> = files.iter().skip(s).step_by(senders).cloned().collect();
            std::thread::spawn(move || {
                for chunk in mine.chunks(25) {
                    assert_eq!(storescu(port, chunk).len(), chunk.len(), "storescu failures");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// Every listed instance exports (`hms-edge dicom export`) with the data set sent, byte for byte.
fn assert_exports_identical(work: &Path, files: &[&PathBuf], uid_of: &HashMap<PathBuf, String>) {
    let dest = work.join("export.dcm");
    for file in files {
        let uid = &uid_of[*file];
        let out = cli(work, &["dicom", "export", uid, dest.to_str().unwrap()], &[]);
        assert!(out.status.success(), "export of {uid} ({file:?}): {}", text(&out));
        assert!(dataset_of(&dest) == dataset_of(file), "{uid}: exported data set differs");
    }
}

/// Creates `n` Patients through the FHIR API; returns their ids.
fn create_patients(d: &DaemonProc, n: usize, tag: &str) -> Vec<String> {
    let c = fhir_client(&d.state_dir().join("tls/cert.pem"));
    (0..n)
        .map(|i| {
            let body = json!({"resourceType": "Patient", "name": [{"family": tag, "given": [format!("P{i}")]}]});
            let r = c
                .post(format!("{}/Patient", d.fhir_base()))
                .header("content-type", "application/fhir+json")
                .body(body.to_string())
                .send()
                .unwrap();
            assert_eq!(r.status(), 201);
            r.json::<Value>().unwrap()["id"].as_str().unwrap().to_owned()
        })
        .collect()
}

fn assert_patients(d: &DaemonProc, ids: &[String], expect: u16) {
    let c = fhir_client(&d.state_dir().join("tls/cert.pem"));
    for id in ids {
        let r = c.get(format!("{}/Patient/{id}", d.fhir_base())).send().unwrap();
        assert_eq!(r.status().as_u16(), expect, "Patient/{id}");
    }
}

/// Every file under `dir` with its SHA-256 (to prove that nothing changed).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.is_dir() {
                stack.push(p);
            } else if meta.is_file() {
                let h = hex::encode(Sha256::digest(std::fs::read(&p).unwrap()));
                out.insert(p.strip_prefix(dir).unwrap().to_owned(), h);
            }
        }
    }
    out
}

fn manifest(backup: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(backup.join("manifest.json")).unwrap()).unwrap()
}

#[test]
fn a_backup_during_a_cstore_storm_restores_everything_acknowledged_before_it() {
    const N: usize = 600;
    const FIRST: usize = 200;
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let (files, uid_of) = instances(&w.join("send"), N);
    let port = free_port();
    let opts = daemon_opts(port);
    let d = DaemonProc::start(w, &opts);
    let patients = create_patients(&d, 20, "Before");
    send_all(port, &files[..FIRST], 4);

    // The storm: the other 400 instances from four concurrent associations.
    let acked: Arc<Mutex<BTreeSet<PathBuf>>> =
        Arc::new(Mutex::new(files[..FIRST].iter().cloned().collect()));
    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = (0..4)
        .map(|s| {
            let mut queue: VecDeque<PathBuf> =
                files[FIRST..].iter().skip(s).step_by(4).cloned().collect();
            let (acked, stop) = (acked.clone(), stop.clone());
            std::thread::spawn(move || {
                while !queue.is_empty() && !stop.load(Ordering::Relaxed) {
                    let chunk: Vec<PathBuf> = queue.drain(..10.min(queue.len())).collect();
                    let ok = storescu(port, &chunk);
                    assert_eq!(ok.len(), chunk.len(), "the daemon refused instances");
                    acked.lock().unwrap().extend(ok);
                }
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().len() < FIRST + 40 {
        assert!(Instant::now() < deadline, "the storm does not start");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Acknowledged before the backup starts: these must all come back.
    let before: BTreeSet<PathBuf> = acked.lock().unwrap().clone();
    let backup = w.join("backup-1");
    let out = cli(w, &["backup", backup.to_str().unwrap()], &[]);
    let during = acked.lock().unwrap().len();
    assert!(out.status.success(), "backup during the storm: {}", text(&out));
    eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim());
    for s in senders {
        s.join().unwrap();
    }
    assert_eq!(acked.lock().unwrap().len(), N);
    let m = manifest(&backup);
    let in_backup = m["counts"]["dicom_instances"].as_u64().unwrap() as usize;
    eprintln!(
        "acknowledged before the backup {}, when it ended {during}, in the backup {in_backup}",
        before.len()
    );
    assert!(in_backup >= before.len() && in_backup < N, "the backup was not taken mid-storm");
    assert!(m["counts"]["fhir_resources"].as_u64().unwrap() >= 20);
    assert!(!m["key_fingerprint"].as_str().unwrap().is_empty());

    // Restore refuses while hms-edged runs, and changes nothing.
    let out = cli(w, &["restore", backup.to_str().unwrap()], &[]);
    assert!(!out.status.success(), "restore while the daemon runs: {}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("stop it first"), "{}", text(&out));
    let after_storm = create_patients(&d, 3, "After");
    let (status, _, log) = d.stop();
    assert!(status.success(), "{log}");

    // Restore over the newer store, start a daemon on it.
    let out = cli(w, &["restore", backup.to_str().unwrap()], &[]);
    assert!(out.status.success(), "restore: {}", text(&out));
    eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim());
    let d = DaemonProc::start(w, &opts);
    let before: Vec<&PathBuf> = before.iter().collect();
    assert_exports_identical(w, &before, &uid_of);
    assert_patients(&d, &patients, 200);
    // Written after the backup: not in it (the restore really replaced the store).
    assert_patients(&d, &after_storm, 404);
    let (status, _, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn a_restore_with_another_master_key_is_refused_and_changes_nothing() {
    let work = tempfile::tempdir().unwrap();
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let (files, _) = instances(&work.path().join("send"), 5);

    // Box A (its own generated key): data and a backup.
    let port = free_port();
    let d = DaemonProc::start(&a, &daemon_opts(port));
    create_patients(&d, 3, "BoxA");
    send_all(port, &files, 1);
    let backup = work.path().join("backup-a");
    let out = cli(&a, &["backup", backup.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", text(&out));
    d.stop();

    // Box B, another key, its own data.
    let port = free_port();
    let d = DaemonProc::start(&b, &daemon_opts(port));
    let mine = create_patients(&d, 2, "BoxB");
    d.stop();
    let before = snapshot(&b);

    let out = cli(&b, &["restore", backup.to_str().unwrap()], &[]);
    assert!(!out.status.success(), "a backup under another key was restored: {}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("another master key") && err.contains("nothing was restored"),
        "{}",
        text(&out)
    );
    assert_eq!(snapshot(&b), before, "a refused restore changed the state folder");

    // Box B still serves its own data.
    let d = DaemonProc::start(&b, &daemon_opts(free_port()));
    assert_patients(&d, &mine, 200);
    d.stop();
}

#[test]
fn a_corrupt_backup_file_is_refused_by_name_and_changes_nothing() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let (files, uid_of) = instances(&w.join("send"), 10);
    let port = free_port();
    let d = DaemonProc::start(w, &daemon_opts(port));
    send_all(port, &files, 1);
    let backup = w.join("backup");
    let out = cli(w, &["backup", backup.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", text(&out));
    d.stop();
    let before = snapshot(&w.join("state"));
    let m = manifest(&backup);
    let listed: Vec<String> = m["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap().to_owned())
        .collect();
    let blob = listed.iter().find(|p| p.starts_with("blobs/")).unwrap().clone();

    for victim in [blob.as_str(), "index.db"] {
        let path = backup.join(victim);
        let orig = std::fs::read(&path).unwrap();
        let mut bad = orig.clone();
        let at = bad.len() / 2;
        bad[at] ^= 0x01;
        std::fs::write(&path, &bad).unwrap();
        let out = cli(w, &["restore", backup.to_str().unwrap()], &[]);
        assert!(!out.status.success(), "corrupt {victim} restored: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("backup file {victim} ")) && err.contains("nothing was restored"),
            "{}",
            text(&out)
        );
        assert_eq!(snapshot(&w.join("state")), before, "{victim}: the state folder changed");
        std::fs::write(&path, &orig).unwrap();
    }
    // The intact backup restores.
    let out = cli(w, &["restore", backup.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let files: Vec<&PathBuf> = files.iter().collect();
    assert_exports_identical(w, &files, &uid_of);
}

#[test]
fn key_rotation_loses_nothing_and_the_old_key_no_longer_opens_the_store() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let (files, uid_of) = instances(&w.join("send"), 200);
    let port = free_port();
    let opts = daemon_opts(port);
    let key_file = w.join("state/master.key");

    // Load 1, and a backup under the first key.
    let d = DaemonProc::start(w, &opts);
    let patients = create_patients(&d, 10, "Rot");
    send_all(port, &files[..100], 2);
    let old_backup = w.join("backup-old-key");
    assert!(cli(w, &["backup", old_backup.to_str().unwrap()], &[]).status.success());
    // Not while the daemon runs.
    let key_before = std::fs::read(&key_file).unwrap();
    let out = cli(w, &["rotate-key"], &[]);
    assert!(!out.status.success(), "rotate-key with the daemon running: {}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("stop it first"), "{}", text(&out));
    assert_eq!(std::fs::read(&key_file).unwrap(), key_before);
    d.stop();

    let old_key =
        hms_edge_tests::write_secret(w, "old.key", &String::from_utf8(key_before.clone()).unwrap());
    let out = cli(w, &["rotate-key"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("master key rotated") && said.contains("100 blobs verified"), "{said}");
    assert_ne!(std::fs::read(&key_file).unwrap(), key_before, "the key file did not change");
    assert!(!w.join("state/master.key.next").exists() && !w.join("state/master.key.old").exists());
    // The integrity ledger survives the rotation: leaves and checkpoints made under the old key
    // still verify (the audit HMAC key and the checkpoint-signing key are data keys).
    let out = cli(w, &["audit", "check"], &[]);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).starts_with("OK"),
        "audit check after rotation: {}",
        text(&out)
    );

    // The old key no longer opens the store: the daemon refuses to start with it.
    let mut with_old = opts.clone();
    with_old.env.insert("HMS_EDGE_KEYS_MASTER_KEY_FILE".into(), old_key.display().to_string());
    let (status, log) = DaemonProc::spawn(w, &with_old).wait_exit();
    assert!(!status.success() && log.contains("wrong key"), "{status}: {log}");
    // A backup made under the old key is refused by name of the cause.
    let out = cli(w, &["restore", old_backup.to_str().unwrap()], &[]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("another master key"), "{}", text(&out));

    // Under the new key: everything is there; load 2 goes on.
    let d = DaemonProc::start(w, &opts);
    assert_patients(&d, &patients, 200);
    let first: Vec<&PathBuf> = files[..100].iter().collect();
    assert_exports_identical(w, &first, &uid_of);
    send_all(port, &files[100..], 2);
    d.stop();

    // A rotation interrupted after the database switched to the new key (a crash simulated by
    // the library's step hook): the daemon refuses to start and says which key the store is
    // under; `rotate-key` finishes the job.
    let loc = hms_edge::ops::rotate::KeyLocation::File(key_file.clone());
    hms_edge::ops::rotate::rotate(
        &w.join("state"),
        &loc,
        Some(hms_edge::ops::rotate::Step::DatabaseSwitched),
    )
    .unwrap();
    let (status, log) = DaemonProc::spawn(w, &opts).wait_exit();
    assert_eq!(status.code(), Some(78), "{log}");
    assert!(
        log.contains("master.key.next") && log.contains("run `hms-edge rotate-key` to finish it"),
        "{log}"
    );
    let out = cli(w, &["rotate-key"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("finished an interrupted rotation"),
        "{}",
        text(&out)
    );
    let d = DaemonProc::start(w, &opts);
    assert_patients(&d, &patients, 200);
    let all: Vec<&PathBuf> = files.iter().collect();
    assert_exports_identical(w, &all, &uid_of);

    // A backup under the rotated key (blob keys now re-wrapped in the database) restores.
    let new_backup = w.join("backup-new-key");
    let out = cli(w, &["backup", new_backup.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let (status, _, log) = d.stop();
    assert!(status.success(), "{log}");
    let out = cli(w, &["restore", new_backup.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let d = DaemonProc::start(w, &opts);
    assert_exports_identical(w, &all, &uid_of);
    assert_patients(&d, &patients, 200);
    let (status, _, log) = d.stop();
    assert!(status.success(), "{log}");
}

/// Key rotation on a box under load: two modalities keep sending (retrying whatever was not
/// acknowledged, as modalities do) while site IT stops hms-edged, runs `rotate-key` and starts
/// it again. Every instance ends up acknowledged and exports byte-identical under the new key,
/// and the integrity ledger still checks.
#[test]
fn key_rotation_while_modalities_keep_sending_loses_nothing() {
    const N: usize = 200;
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let (files, uid_of) = instances(&w.join("send"), N);
    let port = free_port();
    let opts = daemon_opts(port);
    let key_file = w.join("state/master.key");

    let d = DaemonProc::start(w, &opts);
    let acked: Arc<Mutex<BTreeSet<PathBuf>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = (0..2)
        .map(|s| {
            let mut queue: VecDeque<PathBuf> = files.iter().skip(s).step_by(2).cloned().collect();
            let (acked, stop) = (acked.clone(), stop.clone());
            std::thread::spawn(move || {
                while !queue.is_empty() && !stop.load(Ordering::Relaxed) {
                    let chunk: Vec<PathBuf> = queue.drain(..10.min(queue.len())).collect();
                    let ok: BTreeSet<PathBuf> = storescu(port, &chunk).into_iter().collect();
                    for f in chunk.iter().rev().filter(|f| !ok.contains(*f)) {
                        queue.push_front(f.clone());
                    }
                    if ok.is_empty() {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    acked.lock().unwrap().extend(ok);
                }
            })
        })
        .collect();

    let wait_for = |n: usize, secs: u64| {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while acked.lock().unwrap().len() < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        acked.lock().unwrap().len()
    };
    let before = wait_for(N / 4, 60);
    assert!(before >= N / 4, "only {before} acknowledged before the rotation");
    let key_before = std::fs::read(&key_file).unwrap();
    d.stop();
    let during = acked.lock().unwrap().len();
    let out = cli(w, &["rotate-key"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("master key rotated"), "{}", text(&out));
    assert_ne!(std::fs::read(&key_file).unwrap(), key_before, "the key file did not change");
    let d = DaemonProc::start(w, &opts);
    let total = wait_for(N, 120);
    stop.store(true, Ordering::Relaxed);
    for t in senders {
        t.join().unwrap();
    }
    eprintln!("acknowledged: {before} before the stop, {during} at the rotation, {total} in all");
    assert_eq!(total, N, "not every instance was acknowledged after the rotation");
    assert!(during < N, "the load ended before the rotation; the test proves nothing");
    let all: Vec<&PathBuf> = files.iter().collect();
    assert_exports_identical(w, &all, &uid_of);
    let out = cli(w, &["audit", "check"], &[]);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).starts_with("OK"),
        "audit check after rotation under load: {}",
        text(&out)
    );
    d.stop();
}
