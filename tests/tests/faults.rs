//! Fault injection against the real `hms-edged` (issue 16): the disk filling up in the middle of
//! a C-STORE and FHIR write storm (a small tmpfs), fsync and pwrite failing with EIO (libfiu's
//! `fiu-run`/`fiu-ctrl` from Debian), the wall clock jumping back and forth (libfaketime), and
//! SIGKILL during a backup. Each checks what a user would notice: the callers got a clear
//! failure, every acknowledged record is there after recovery and nothing unacknowledged is,
//! `PRAGMA integrity_check` and `hms-edge audit check` pass, and the box recovers by itself.
//!
//! Every test prints one line `FAULT|fault|what the caller saw|acknowledged|found|checks`, the
//! rows of README's "Faults tried" table.

mod dicom_common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dicom_common::{peer, storescu, testfiles};
use hms_edge::keys::load_key_file;
use hms_edge::store::StoreOptions;
use hms_edge_tests::{DaemonOptions, DaemonProc, Tmpfs, bin, fhir_client, http_get};
use serde_json::{Value, json};

/// `n` clones of CT_small.dcm (own SOP Instance UIDs) in `dir`: (file, SOP Instance UID).
fn ct_clones(dir: &Path, n: usize) -> Vec<(PathBuf, String)> {
    std::fs::create_dir_all(dir).unwrap();
    let src = testfiles(&["CT_small.dcm"]);
    let uids =
        peer(&["clone", src[0].to_str().unwrap(), dir.to_str().unwrap(), &n.to_string(), "50"]);
    uids.as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, u)| (dir.join(format!("{i:06}.dcm")), u.as_str().unwrap().to_owned()))
        .collect()
}

/// A C-STORE storm (storescu, one association per `per_assoc` files) and a FHIR write storm
/// (Patient POSTs) at once; returns the acknowledged SOP Instance UIDs and Patient ids, and the
/// failures the callers saw.
struct Storm {
    acked_sops: BTreeSet<String>,
    acked_patients: BTreeSet<String>,
    dicom_failures: Vec<String>,
    fhir_failures: Vec<u16>,
}

fn storm(d: &DaemonProc, files: &[(PathBuf, String)], patients: usize) -> Storm {
    let port = d.dicom.port();
    let by_file: std::collections::HashMap<PathBuf, String> = files.iter().cloned().collect();
    let dicom_failures = Arc::new(Mutex::new(Vec::new()));
    let chunks: Vec<Vec<PathBuf>> =
        files.chunks(25).map(|c| c.iter().map(|(f, _)| f.clone()).collect()).collect();
    let fails = dicom_failures.clone();
    // The FHIR storm starts once the first association is done, so that a disk about to fill
    // up takes some instances before the Patients use the space up (else the test is flaky).
    let (first_done, wait_first) = std::sync::mpsc::channel();
    let stores = std::thread::spawn(move || {
        let mut acked = Vec::new();
        for chunk in chunks {
            let (ok, failed) = dicom_common::storescu_outcomes(port, &chunk);
            acked.extend(ok);
            fails.lock().unwrap().extend(failed);
            let _ = first_done.send(());
        }
        acked
    });
    let _ = wait_first.recv();
    let c = fhir_client(&d.state_dir().join("tls/cert.pem"));
    let base = d.fhir_base();
    let mut acked_patients = BTreeSet::new();
    let mut fhir_failures = Vec::new();
    for i in 0..patients {
        let body = json!({"resourceType": "Patient",
            "identifier": [{"system": "urn:fault-test", "value": format!("P{i}")}],
            "name": [{"family": format!("Storm{i}"), "given": ["A"]}], "birthDate": "1970-01-01"});
        match c
            .post(format!("{base}/Patient"))
            .header("content-type", "application/fhir+json")
            .body(body.to_string())
            .send()
        {
            Ok(r) if r.status() == 201 => {
                let v: Value = r.json().unwrap();
                acked_patients.insert(v["id"].as_str().unwrap().to_owned());
            }
            Ok(r) => fhir_failures.push(r.status().as_u16()),
            Err(_) => fhir_failures.push(0),
        }
    }
    let acked_files = stores.join().unwrap();
    let acked_sops = acked_files.iter().map(|f| by_file[f].clone()).collect();
    let dicom_failures = dicom_failures.lock().unwrap().clone();
    Storm { acked_sops, acked_patients, dicom_failures, fhir_failures }
}

/// Stops the daemon, then opens the store offline: the SOP Instance UIDs and Patient ids it
/// holds, after `PRAGMA integrity_check` passed; and `hms-edge audit check` passes.
fn recover_and_check(d: DaemonProc) -> (BTreeSet<String>, BTreeSet<String>) {
    let state = d.state_dir();
    let (status, _, log) = d.stop();
    if let Ok(path) = std::env::var("HMS_FAULT_LOG") {
        std::fs::write(path, &log).unwrap();
    }
    assert!(status.success(), "hms-edged did not stop cleanly: {status}; log:\n{log}");
    let key = load_key_file(&state.join("master.key")).unwrap();
    let store = hms_edge::store::open(&state, &key, &StoreOptions::default()).unwrap();
    let (integrity, sops, patients) = store
        .read_blocking(|c| {
            let integrity: String = c.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
            let mut st = c.prepare("SELECT DISTINCT sop_uid FROM dicom_instances")?;
            let sops: BTreeSet<String> =
                st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
            let mut st =
                // The Patients the test wrote (not the placeholders made from DICOM headers).
                c.prepare(
                    "SELECT c.id FROM fhir_current c WHERE c.rtype = 'Patient' AND c.deleted = 0
                       AND EXISTS (SELECT 1 FROM fhir_idx_token t WHERE t.rtype = 'Patient'
                         AND t.id = c.id AND t.param = 'identifier'
                         AND t.system = 'urn:fault-test')",
                )?;
            let patients: BTreeSet<String> =
                st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
            Ok((integrity, sops, patients))
        })
        .unwrap();
    assert_eq!(integrity, "ok");
    if std::env::var_os("HMS_FAULT_LOG").is_some() {
        let dump: Vec<String> = store
            .read_blocking(|c| {
                let mut st = c.prepare(
                    "SELECT h.json FROM fhir_history h JOIN fhir_current c ON c.seq = h.seq
                     WHERE c.rtype = 'Patient'",
                )?;
                let v = st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
                Ok(v)
            })
            .unwrap();
        eprintln!("PATIENTS:\n{}", dump.join("\n"));
    }
    // Every index row's blob is on disk and reads back whole.
    let missing = store
        .read_blocking(|c| {
            let mut st = c.prepare("SELECT blob FROM dicom_instances")?;
            let ids: Vec<String> = st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
            Ok(ids)
        })
        .unwrap()
        .into_iter()
        .filter(|id| {
            let id = hms_edge::store::BlobId::parse(id).unwrap();
            store.blobs().get(&id).is_err()
        })
        .count();
    assert_eq!(missing, 0, "index rows whose blob is missing or broken");
    drop(store);
    hms_edge_tests::assert_audit_check(&state);
    (sops, patients)
}

/// After a fault cleared: `n` more instances store without a restart and `/readyz` is 200; then
/// the daemon stops and the store is checked ([`recover_and_check`]). Returns the instances and
/// Patients found, and the SOP Instance UIDs stored after the fault.
fn after_fault(
    d: DaemonProc,
    work: &Path,
    n: usize,
) -> (BTreeSet<String>, BTreeSet<String>, BTreeSet<String>) {
    let more = ct_clones(&work.join("after"), n);
    let again: Vec<PathBuf> = more.iter().map(|(f, _)| f.clone()).collect();
    assert_eq!(storescu(d.dicom.port(), &again).len(), n, "log:\n{}", d.log_text());
    let (code, body) = http_get(d.admin, "/readyz");
    assert_eq!(code, 200, "{body}");
    let (sops, patients) = recover_and_check(d);
    (sops, patients, more.into_iter().map(|(_, u)| u).collect())
}

fn free_bytes(p: &Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(p).unwrap();
    s.blocks_available() as u64 * s.fragment_size() as u64
}

/// Fills `dir`'s file system until `leave` bytes are free; returns the filler file.
fn fill(dir: &Path, leave: u64) -> PathBuf {
    let filler = dir.join("filler");
    let free = free_bytes(dir);
    let f = std::fs::File::create(&filler).unwrap();
    f.set_len(0).unwrap();
    let mut w = std::io::BufWriter::new(f);
    let chunk = vec![0u8; 1 << 20];
    let mut left = free.saturating_sub(leave);
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        std::io::Write::write_all(&mut w, &chunk[..n]).unwrap();
        left -= n as u64;
    }
    std::io::Write::flush(&mut w).unwrap();
    filler
}

#[test]
fn disk_full_during_storms_loses_nothing_and_recovers_by_itself() {
    let work = tempfile::tempdir().unwrap();
    let _fs = Tmpfs::mount(&work.path().join("state"), 64);
    let mut opts = DaemonOptions { explicit_state_dir: true, ..Default::default() };
    opts.env.insert("HMS_EDGE_ADMIN_MIN_FREE_DISK_MB".into(), "2".into());
    let d = DaemonProc::start(work.path(), &opts);
    let files = ct_clones(&work.path().join("ct"), 300); // ~12 MB of instances
    let filler = fill(&d.state_dir(), 5 << 20);
    let s = storm(&d, &files, 300);
    assert!(
        s.acked_sops.len() < files.len(),
        "the disk never filled: {} of {} stored",
        s.acked_sops.len(),
        files.len()
    );
    assert!(!s.acked_sops.is_empty());
    assert!(
        s.dicom_failures.iter().all(|l| l.contains("OutOfResources")),
        "C-STORE failures other than Out of Resources: {:?}",
        s.dicom_failures
    );
    assert!(s.fhir_failures.iter().all(|&c| c == 503 || c == 507), "{:?}", s.fhir_failures);
    let (code, body) = http_get(d.admin, "/readyz");
    assert_eq!(code, 503, "/readyz with a full disk: {body}");
    assert!(body.contains("disk"), "{body}");
    // Space returns: the box takes images and charts again without an operator.
    std::fs::remove_file(filler).unwrap();
    let (sops, patients, more) = after_fault(d, work.path(), 3);
    let mut expected = s.acked_sops.clone();
    expected.extend(more);
    assert_eq!(sops, expected, "instances found after recovery != instances acknowledged");
    assert!(s.acked_patients.is_subset(&patients));
    // Patients found = acknowledged (+ none that were refused).
    assert_eq!(patients.len(), s.acked_patients.len());
    println!(
        "FAULT|disk full (64 MiB tmpfs, 5 MiB left) during a C-STORE + FHIR storm|C-STORE: {} × Out of Resources (A700); FHIR: {} × {:?}|{} instances, {} Patients|{} instances (+3 after space returned), {} Patients|integrity ok, audit check ok",
        s.dicom_failures.len(),
        s.fhir_failures.len(),
        s.fhir_failures.iter().collect::<BTreeSet<_>>(),
        s.acked_sops.len(),
        s.acked_patients.len(),
        sops.len() - 3,
        patients.len()
    );
}

fn fiu_ctrl(pid: u32, command: &str) {
    let out = Command::new("fiu-ctrl").args(["-c", command]).arg(pid.to_string()).output().unwrap();
    assert!(out.status.success(), "fiu-ctrl {command}: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn fsync_and_write_errors_during_storms_lose_nothing_acknowledged() {
    assert!(
        Path::new("/usr/bin/fiu-run").exists(),
        "fiu-run missing: apt-get install fiu-utils libfiu0"
    );
    let work = tempfile::tempdir().unwrap();
    let opts = DaemonOptions {
        explicit_state_dir: true,
        wrapper: vec!["fiu-run".into(), "-x".into()],
        ..Default::default()
    };
    let d = DaemonProc::start(work.path(), &opts);
    let pid = d.child.id();
    let files = ct_clones(&work.path().join("ct"), 200);
    // EIO from fsync/fdatasync (blobs and WAL) and from pwrite (SQLite's pages), at random.
    for point in ["posix/io/sync/*", "posix/io/rw/pwrite"] {
        fiu_ctrl(pid, &format!("enable_random name={point},probability=0.01,failinfo=5"));
    }
    let s = storm(&d, &files, 200);
    for point in ["posix/io/sync/*", "posix/io/rw/pwrite"] {
        fiu_ctrl(pid, &format!("disable name={point}"));
    }
    let failures = s.dicom_failures.len() + s.fhir_failures.len();
    assert!(failures > 0, "no injected fault reached a caller");
    assert!(
        s.dicom_failures
            .iter()
            .all(|l| l.contains("OutOfResources") || l.contains("ProcessingFailure")),
        "{:?}",
        s.dicom_failures
    );
    assert!(s.fhir_failures.iter().all(|&c| c == 503), "{:?}", s.fhir_failures);
    // The faults cleared: the box works again, by itself.
    let (sops, patients, more) = after_fault(d, work.path(), 2);
    let mut expected = s.acked_sops.clone();
    expected.extend(more);
    assert_eq!(sops, expected, "instances found after recovery != instances acknowledged");
    assert_eq!(patients, s.acked_patients, "Patients found != Patients acknowledged");
    println!(
        "FAULT|EIO from fsync/fdatasync and pwrite (libfiu, p = 0.01 per call) during a C-STORE + FHIR storm|C-STORE: {} failures ({:?}); FHIR: {} × {:?}|{} instances, {} Patients|{} instances (+2 after the fault cleared), {} Patients|integrity ok, audit check ok",
        s.dicom_failures.len(),
        s.dicom_failures
            .iter()
            .map(|l| l.trim_start_matches("I: Received Store Response "))
            .collect::<BTreeSet<_>>(),
        s.fhir_failures.len(),
        s.fhir_failures.iter().collect::<BTreeSet<_>>(),
        s.acked_sops.len(),
        s.acked_patients.len(),
        sops.len() - 2,
        patients.len()
    );
}

#[test]
fn the_wall_clock_jumping_back_and_forward_breaks_nothing() {
    assert!(Path::new("/usr/bin/faketime").exists(), "faketime missing: apt-get install faketime");
    let work = tempfile::tempdir().unwrap();
    let clock = work.path().join("clock");
    std::fs::write(&clock, "+0\n").unwrap();
    let mut opts = DaemonOptions { explicit_state_dir: true, ..Default::default() };
    // libfaketime reads the offset from the file at every clock read (no cache).
    let lib = ["/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("libfaketime.so.1");
    opts.env.insert("LD_PRELOAD".into(), lib.into());
    opts.env.insert("FAKETIME_TIMESTAMP_FILE".into(), clock.display().to_string());
    opts.env.insert("FAKETIME_NO_CACHE".into(), "1".into());
    opts.env.insert("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into());
    let d = DaemonProc::start(work.path(), &opts);
    let files = ct_clones(&work.path().join("ct"), 30);
    let mut acked_sops = BTreeSet::new();
    let mut acked_patients = BTreeSet::new();
    let c = fhir_client(&d.state_dir().join("tls/cert.pem"));
    let base = d.fhir_base();
    for (i, (offset, part)) in
        [("+0", 0..10), ("-1h", 10..20), ("+1d", 20..30)].into_iter().enumerate()
    {
        std::fs::write(&clock, format!("{offset}\n")).unwrap();
        let batch: Vec<PathBuf> = files[part.clone()].iter().map(|(f, _)| f.clone()).collect();
        let acked = storescu(d.dicom.port(), &batch);
        assert_eq!(acked.len(), batch.len(), "C-STORE with the clock at {offset}");
        acked_sops.extend(files[part].iter().map(|(_, u)| u.clone()));
        let r = c
            .post(format!("{base}/Patient"))
            .header("content-type", "application/fhir+json")
            .body(
                json!({"resourceType": "Patient", "name": [{"family": format!("Clock{i}")}],
                       "identifier": [{"system": "urn:fault-test", "value": format!("C{i}")}]})
                .to_string(),
            )
            .send()
            .unwrap();
        assert_eq!(r.status(), 201, "FHIR write with the clock at {offset}");
        let v: Value = r.json().unwrap();
        acked_patients.insert(v["id"].as_str().unwrap().to_owned());
        // The history of the system stays in write order, and search still pages.
        let page: Value =
            c.get(format!("{base}/Patient?family=Clock&_count=1")).send().unwrap().json().unwrap();
        assert_eq!(page["total"], i + 1);
        let (code, body) = http_get(d.admin, "/readyz");
        assert_eq!(code, 200, "/readyz with the clock at {offset}: {body}");
    }
    // The outbox sequence only grows, whatever the clock said.
    let state = d.state_dir();
    std::fs::write(&clock, "+0\n").unwrap();
    let (sops, patients) = recover_and_check(d);
    assert_eq!(sops, acked_sops);
    assert_eq!(patients, acked_patients);
    let key = load_key_file(&state.join("master.key")).unwrap();
    let store = hms_edge::store::open(&state, &key, &StoreOptions::default()).unwrap();
    let seqs: Vec<i64> = store
        .read_blocking(|c| {
            let mut st = c.prepare("SELECT seq FROM outbox ORDER BY rowid")?;
            let v = st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
            Ok(v)
        })
        .unwrap();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    println!(
        "FAULT|wall clock jumped back 1 h, then forward 1 day (libfaketime) while storing|nothing: every C-STORE Success, every POST 201, /readyz 200|{} instances, {} Patients|{} instances, {} Patients|integrity ok, audit check ok, outbox order kept",
        acked_sops.len(),
        acked_patients.len(),
        sops.len(),
        patients.len()
    );
}

#[test]
fn sigkill_during_backups_checkpoints_and_storms_loses_nothing() {
    let work = tempfile::tempdir().unwrap();
    let mut opts = DaemonOptions { explicit_state_dir: true, ..Default::default() };
    // A signed ledger checkpoint every second, so that the kills land in checkpoints too.
    opts.env.insert("HMS_EDGE_LEDGER_CHECKPOINT_INTERVAL_SECS".into(), "1".into());
    const ROUNDS: usize = 4;
    const PER_ROUND: usize = 40;
    let files = ct_clones(&work.path().join("ct"), ROUNDS * PER_ROUND);
    let by_file: std::collections::HashMap<PathBuf, String> = files.iter().cloned().collect();
    let mut acked: BTreeSet<String> = BTreeSet::new();
    let mut d = DaemonProc::start(work.path(), &opts);
    let state = d.state_dir();
    let mut backups_complete = 0;
    for round in 0..ROUNDS {
        // Each round: a storm and an online backup, and a SIGKILL in the middle of both.
        let backup_dir = work.path().join(format!("backup-{round}"));
        let mut backup = Command::new(bin("hms-edge"))
            .current_dir(work.path())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HMS_EDGE_PATHS_STATE_DIR", &state)
            .arg("backup")
            .arg(&backup_dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let port = d.dicom.port();
        let part: Vec<PathBuf> = files[round * PER_ROUND..(round + 1) * PER_ROUND]
            .iter()
            .map(|(f, _)| f.clone())
            .collect();
        let storming = std::thread::spawn(move || storescu(port, &part));
        if round % 2 == 1 {
            // The backup process itself killed in the middle of its copy.
            std::thread::sleep(Duration::from_millis(20 * round as u64));
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(backup.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(Duration::from_millis(150 + 150 * round as u64));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(d.child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();

        let _ = d.child.wait();
        acked.extend(storming.join().unwrap().iter().map(|f| by_file[f].clone()));
        let backup_status = backup.wait().unwrap();
        // A backup is complete or absent, never half there.
        assert_eq!(backup_status.success(), backup_dir.exists(), "backup {round}: {backup_status}");
        backups_complete += usize::from(backup_status.success());
        d = DaemonProc::start(work.path(), &opts);
    }
    // A backup run again to a destination whose earlier run was killed succeeds, and removes
    // the killed run's hidden partial folder.
    for round in 0..ROUNDS {
        let dest = work.path().join(format!("backup-{round}"));
        if dest.exists() {
            continue;
        }
        let out = Command::new(bin("hms-edge"))
            .current_dir(work.path())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HMS_EDGE_PATHS_STATE_DIR", &state)
            .arg("backup")
            .arg(&dest)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let partials: Vec<String> = std::fs::read_dir(work.path())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.contains(".partial-"))
        .collect();
    assert!(partials.is_empty(), "partial backups left behind: {partials:?}");
    let (sops, _) = recover_and_check(d);
    assert!(acked.is_subset(&sops), "acknowledged instances lost after SIGKILL");
    // An instance whose response the kill cut off may be there (stored, not yet answered): that
    // is DICOM's at-least-once, and the modality's resend is a duplicate, not a loss.
    let extra = sops.difference(&acked).count();
    assert!(extra <= ROUNDS, "{extra} instances present that were never answered");
    println!(
        "FAULT|SIGKILL of hms-edged ×{ROUNDS} during a C-STORE storm, 1 s ledger checkpoints and an online backup (the backup process SIGKILLed too in 2 rounds)|storescu: association lost at the kill; a killed backup leaves no folder ({backups_complete} of {ROUNDS} backups complete)|{} instances|{} instances ({extra} stored but unanswered when killed)|integrity ok, audit check ok after restart",
        acked.len(),
        sops.len()
    );
}
