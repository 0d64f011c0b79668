//! The first connections a process opens, opened by many threads at once.
//!
//! SQLite marks itself initialised *before* SQLCipher's own set-up has run, and a thread that
//! keyed a connection in that window got "An error occurred with PRAGMA key or rekey" (seen in
//! CI: two DICOM TLS tests each opening a store at the same moment). The window exists only for
//! the very first opens of a process, so the test runs its probe in fresh child processes, many
//! times: before the fix about one child in a hundred failed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use hms_edge::keys::Key;

const CHILD_ENV: &str = "HMS_EDGE_FIRST_OPEN_PROBE";
const CHILDREN: usize = 150;
const THREADS: usize = 8;

/// In a fresh process: THREADS threads open their own new store at the same instant.
fn probe() -> Vec<String> {
    let dirs: Vec<tempfile::TempDir> = (0..THREADS).map(|_| tempfile::tempdir().unwrap()).collect();
    // All threads spin until the last one is ready, so they reach SQLite together (a Barrier
    // wakes them one by one, too slowly to meet the window).
    let ready = Arc::new(AtomicUsize::new(0));
    let go = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = dirs
        .iter()
        .map(|d| {
            let path = d.path().join("index.db");
            let (ready, go) = (ready.clone(), go.clone());
            std::thread::spawn(move || {
                let key = Key::random();
                ready.fetch_add(1, Ordering::SeqCst);
                while !go.load(Ordering::Acquire) {
                    std::hint::spin_loop();
                }
                // The store's own open path (Store::open adds directories, locks and migrations
                // around it, which only make each probe slower).
                hms_edge::store::db::open(&path, &key, false, 1024)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
        })
        .collect();
    while ready.load(Ordering::SeqCst) < THREADS {
        std::thread::yield_now();
    }
    go.store(true, Ordering::Release);
    handles.into_iter().filter_map(|h| h.join().unwrap().err()).collect()
}

#[test]
fn many_threads_opening_the_first_stores_of_a_process_all_succeed() {
    if std::env::var_os(CHILD_ENV).is_some() {
        let failures = probe();
        assert!(
            failures.is_empty(),
            "{} of {THREADS} first opens failed: {failures:?}",
            failures.len()
        );
        return;
    }
    let me = std::env::current_exe().unwrap();
    let mut failed = Vec::new();
    for _ in 0..CHILDREN {
        let out = std::process::Command::new(&me)
            .args(["--exact", "many_threads_opening_the_first_stores_of_a_process_all_succeed"])
            .args(["--test-threads", "1", "--nocapture"])
            .env(CHILD_ENV, "1")
            .output()
            .unwrap();
        if !out.status.success() {
            failed.push(String::from_utf8_lossy(&out.stderr).into_owned());
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {CHILDREN} fresh processes failed to open their first stores: {}",
        failed.len(),
        failed[0]
    );
}
