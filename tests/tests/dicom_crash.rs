//! Crash storm (issue 3 acceptance): DCMTK `storescu` pushes 2,000 instances over four
//! concurrent associations into the real `hms-edged` while the daemon is SIGKILLed at random
//! moments (at least ten times) and restarted on the same state folder. Afterwards every instance
//! for which storescu got Success exports with its data set byte-identical to the one sent, and
//! the store is consistent: blob files on disk = rows in `blobs`, every index row has its blob,
//! no instance was stored twice, `PRAGMA integrity_check` is ok.

mod dicom_common;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dicom_common::*;
use hms_edge::keys::KeyPurpose;
use hms_edge::store::{BLOB_DIR, BlobStore, DB_FILE, db};
use hms_edge_tests::{DaemonOptions, DaemonProc, free_port};
use nix::sys::signal::Signal;

const INSTANCES: usize = 2000;
const SENDERS: usize = 4;
/// Files per storescu run (one association); a kill costs at most the unacknowledged rest.
const CHUNK: usize = 25;
const MIN_KILLS: usize = 10;
const MAX_KILLS: usize = 40;

/// Every finished blob file under `blobs/xx/` (not `tmp/`).
fn blob_files(root: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for i in 0..=255u8 {
        let dir = root.join(format!("{i:02x}"));
        let Ok(rd) = std::fs::read_dir(&dir) else { continue };
        for e in rd {
            out.insert(e.unwrap().file_name().to_string_lossy().into_owned());
        }
    }
    out
}

#[test]
fn acknowledged_instances_survive_a_sigkill_storm() {
    let started = Instant::now();
    let work = tempfile::tempdir().unwrap();
    let src = testfiles(&["CT_small.dcm"]).remove(0);
    let dir = work.path().join("send");
    let uids: Vec<String> = serde_json::from_value(peer(&[
        "clone",
        &src.display().to_string(),
        &dir.display().to_string(),
        &INSTANCES.to_string(),
    ]))
    .unwrap();
    assert_eq!(uids.len(), INSTANCES);
    let files: Vec<PathBuf> = (0..INSTANCES).map(|i| dir.join(format!("{i:06}.dcm"))).collect();
    let uid_of: HashMap<PathBuf, String> =
        files.iter().cloned().zip(uids.iter().cloned()).collect();

    // The same DICOM port across restarts, so the senders just retry.
    let port = free_port();
    let mut opts = DaemonOptions { explicit_state_dir: true, ..Default::default() };
    opts.env.insert("HMS_EDGE_DICOM_LISTEN".into(), format!("127.0.0.1:{port}"));

    let acked: Arc<Mutex<BTreeSet<PathBuf>>> = Arc::default();
    let attempts = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = (0..SENDERS)
        .map(|s| {
            let mut queue: VecDeque<PathBuf> =
                files.iter().skip(s).step_by(SENDERS).cloned().collect();
            let (acked, attempts, stop) = (acked.clone(), attempts.clone(), stop.clone());
            std::thread::spawn(move || {
                while !queue.is_empty() && !stop.load(Ordering::Relaxed) {
                    let chunk: Vec<PathBuf> = queue.drain(..CHUNK.min(queue.len())).collect();
                    attempts.fetch_add(1, Ordering::Relaxed);
                    let ok: BTreeSet<PathBuf> = storescu(port, &chunk).into_iter().collect();
                    // Unacknowledged files go back to the front: sent again after the restart
                    // (a resend of an instance that was stored but not acknowledged is a
                    // duplicate with identical content, which must succeed without a copy).
                    for f in chunk.iter().rev().filter(|f| !ok.contains(*f)) {
                        queue.push_front(f.clone());
                    }
                    let progressed = !ok.is_empty();
                    acked.lock().unwrap().extend(ok);
                    if !progressed {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            })
        })
        .collect();

    // Kill at random moments until at least MIN_KILLS kills happened and most of the storm has
    // been acknowledged under fire.
    let mut kills = 0;
    let mut acked_at_kill = Vec::new();
    let daemon = loop {
        let d = DaemonProc::start(work.path(), &opts);
        let n = acked.lock().unwrap().len();
        if kills >= MAX_KILLS || (kills >= MIN_KILLS && n >= INSTANCES * 8 / 10) {
            break d;
        }
        std::thread::sleep(Duration::from_millis(rand::random_range(150..1200)));
        d.signal(Signal::SIGKILL);
        drop(d); // reaps the process
        kills += 1;
        acked_at_kill.push(acked.lock().unwrap().len());
    };
    eprintln!("{kills} SIGKILLs; acknowledged at each kill: {acked_at_kill:?}");
    assert!(kills >= MIN_KILLS);

    // The last restart serves the rest of the storm.
    let deadline = Instant::now() + Duration::from_secs(120);
    while acked.lock().unwrap().len() < INSTANCES && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    for s in senders {
        s.join().unwrap();
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    eprintln!(
        "{} acknowledged of {INSTANCES} in {} storescu associations, {:?}",
        acked.len(),
        attempts.load(Ordering::Relaxed),
        started.elapsed()
    );
    assert_eq!(acked.len(), INSTANCES, "the last daemon did not take the rest of the storm");
    let (status, _, log) = daemon.stop();
    assert!(status.success(), "{log}");

    // The daemon is stopped: open its store read-only with its development key.
    let state = work.path().join("state");
    let master = hms_edge::keys::load_key_file(&state.join("master.key")).unwrap();
    let conn =
        db::open(&state.join(DB_FILE), &master.derive(KeyPurpose::Database), true, 2048).unwrap();
    let integrity: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(integrity, "ok");

    let blob_root = state.join(BLOB_DIR);
    let on_disk = blob_files(&blob_root);
    let rows: BTreeSet<String> = conn
        .prepare("SELECT id FROM blobs")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(on_disk, rows, "blob files on disk differ from the `blobs` rows (orphans or lost)");
    assert_eq!(std::fs::read_dir(blob_root.join("tmp")).unwrap().count(), 0, "blobs/tmp not empty");

    let instances: Vec<(String, i64, String)> = conn
        .prepare("SELECT sop_uid, version, blob FROM dicom_instances")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let sent: BTreeSet<&String> = uids.iter().collect();
    let mut seen = BTreeSet::new();
    for (sop, version, blob) in &instances {
        assert!(rows.contains(blob), "index row {sop} without its blob row");
        assert!(on_disk.contains(blob), "index row {sop} without its blob file");
        assert!(sent.contains(sop), "unknown instance {sop}");
        assert_eq!(*version, 1, "{sop} stored twice (a resent identical instance must not copy)");
        assert!(seen.insert(sop.clone()), "{sop} indexed twice");
    }
    assert!(instances.len() <= INSTANCES);

    // Every acknowledged instance exports intact: the data set is byte-identical to the sent one.
    let blobs = BlobStore::open(&blob_root, master.derive(KeyPurpose::Blobs)).unwrap();
    for file in &acked {
        let sop = &uid_of[file];
        let inst =
            hms_edge::dicom::index::find_instance(&conn, sop, None).unwrap().unwrap_or_else(|| {
                panic!("acknowledged instance {sop} ({file:?}) is not in the index")
            });
        let mut part10 = Vec::new();
        blobs.open_reader(&inst.blob).unwrap().read_to_end(&mut part10).unwrap();
        let off = hms_edge::dicom::dataset::part10_dataset_offset(&part10).expect("Part 10 file");
        assert!(part10[off..] == dataset_of(file)[..], "{sop}: exported data set differs");
    }
    // And through the export helper of `hms-edge dicom export` (read-only, no orphan sweep).
    for file in acked.iter().step_by(200) {
        let dest = work.path().join("export.dcm");
        hms_edge::dicom::export::export_offline(&state, &master, &uid_of[file], None, &dest)
            .unwrap();
        assert_eq!(dataset_of(&dest), dataset_of(file));
    }
    // Nothing above wrote: the files are as the daemon left them.
    assert_eq!(blob_files(&blob_root), on_disk);
    eprintln!("verified in {:?}", started.elapsed());
}
