//! The daemon's lifecycle as systemd and site IT see it: embedded-default start, READY /
//! WATCHDOG / STOPPING on a real notify socket, SIGHUP reload, refusals at start.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use hms_edge_tests::{DaemonOptions, DaemonProc, bin, http_get, write_key_file};
use nix::sys::signal::Signal;

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn embedded_defaults_start_serve_health_and_stop_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let d = DaemonProc::start(dir.path(), &DaemonOptions::default());
    // READY comes only after the store is open and the listener bound: health answers at once.
    let (status, body) = http_get(d.admin, "/healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, body) = http_get(d.admin, "/readyz");
    assert_eq!(status, 200, "{body}");
    let (status, metrics) = http_get(d.admin, "/metrics");
    assert_eq!(status, 200);
    for name in [
        "hms_uptime_seconds",
        "hms_store_db_bytes",
        "hms_store_writes_total",
        "hms_disk_free_bytes",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics:\n{metrics}");
    }
    // Development defaults: state, key and certificate generated in ./hms-edge-data, private.
    let state = dir.path().join("hms-edge-data");
    assert_eq!(mode(&state.join("master.key")), 0o600);
    assert_eq!(mode(&state.join("tls/key.pem")), 0o600);
    assert_eq!(mode(&state.join("tls/cert.pem")), 0o600);
    assert_eq!(mode(&state.join("index.db")), 0o600);
    assert_eq!(mode(&state), 0o700);
    let started = d.wait_log(
        &["hms-edged started", "master_key", "hms-edge-data/index.db", "admin"],
        Duration::from_secs(1),
    );
    let key_hex = std::fs::read_to_string(state.join("master.key")).unwrap();
    assert!(!started.contains(key_hex.trim()));

    let (status, notify, log) = d.stop();
    assert!(status.success(), "exit {status:?}\n{log}");
    let all = notify.join("\n");
    assert!(all.contains("READY=1") && all.contains("STOPPING=1"), "{all}");
    assert!(log.contains("stopped"), "{log}");
    assert!(!log.contains(key_hex.trim()), "the key must never be logged");
}

#[test]
fn watchdog_is_fed_at_half_the_interval() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = DaemonOptions { explicit_state_dir: true, ..Default::default() };
    opts.env.insert("WATCHDOG_USEC".into(), "400000".into());
    let mut d = DaemonProc::start(dir.path(), &opts);
    d.notify.clear();
    let t0 = std::time::Instant::now();
    d.notify.wait_for("WATCHDOG=1", Duration::from_secs(5));
    d.notify.clear();
    d.notify.wait_for("WATCHDOG=1", Duration::from_secs(5));
    // Two pings within ~2 half-intervals (200 ms each), with slack for a loaded machine.
    assert!(t0.elapsed() < Duration::from_secs(3), "watchdog pings too slow: {:?}", t0.elapsed());
    let (status, _, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn sighup_reloads_what_it_can_and_says_what_needs_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("edge.toml");
    std::fs::write(&cfg, "[log]\nlevel = \"info\"\n").unwrap();
    let opts = DaemonOptions {
        config: Some(cfg.clone()),
        explicit_state_dir: true,
        env: HashMap::new(),
        wrapper: vec![],
    };
    let mut d = DaemonProc::start(dir.path(), &opts);

    std::fs::write(
        &cfg,
        "[log]\nlevel = \"debug\"\n[admin]\nmin_free_disk_mb = 1\n[store]\ndb_readers = 2\n",
    )
    .unwrap();
    d.notify.clear();
    d.signal(Signal::SIGHUP);
    d.notify.wait_for("RELOADING=1", Duration::from_secs(10));
    d.notify.wait_for("READY=1", Duration::from_secs(10));
    d.wait_log(&["setting changed", "log.level", "debug"], Duration::from_secs(5));
    d.wait_log(&["needs a restart", "store.db_readers"], Duration::from_secs(5));
    d.wait_log(&["configuration reloaded"], Duration::from_secs(5));

    // A broken file on reload is refused and the daemon keeps running on the old settings.
    std::fs::write(&cfg, "[log]\nlevle = 1\n").unwrap();
    d.signal(Signal::SIGHUP);
    d.wait_log(&["reload refused", "levle"], Duration::from_secs(5));
    assert_eq!(http_get(d.admin, "/healthz").0, 200);
    let (status, _, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn readyz_reports_low_disk_space() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = DaemonOptions { explicit_state_dir: true, ..Default::default() };
    // More free space than any test machine has.
    opts.env.insert("HMS_EDGE_ADMIN_MIN_FREE_DISK_MB".into(), "999999999999".into());
    let d = DaemonProc::start(dir.path(), &opts);
    let (status, body) = http_get(d.admin, "/readyz");
    assert_eq!(status, 503);
    assert!(body.contains("low disk space"), "{body}");
    assert_eq!(http_get(d.admin, "/healthz").0, 200);
}

#[test]
fn world_readable_key_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = write_key_file(dir.path(), "master.key", 0o644);
    let mut opts = DaemonOptions { explicit_state_dir: true, ..Default::default() };
    opts.env.insert("HMS_EDGE_KEYS_MASTER_KEY_FILE".into(), key.display().to_string());
    let (status, log) = DaemonProc::spawn(dir.path(), &opts).wait_exit();
    assert_eq!(status.code(), Some(78), "{log}");
    assert!(log.contains("readable by group or others"), "{log}");
    assert!(!dir.path().join("state/index.db").exists(), "nothing may be created with a bad key");
}

#[test]
fn credentials_directory_key_is_used_and_wrong_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("creds");
    std::fs::create_dir(&creds).unwrap();
    write_key_file(&creds, "master-key", 0o400);
    let mut opts = DaemonOptions { explicit_state_dir: true, ..Default::default() };
    opts.env.insert("CREDENTIALS_DIRECTORY".into(), creds.display().to_string());
    let d = DaemonProc::start(dir.path(), &opts);
    d.wait_log(&["systemd credential"], Duration::from_secs(2));
    assert!(!dir.path().join("state/master.key").exists(), "no key may be generated");
    let (status, _, _) = d.stop();
    assert!(status.success());

    // Another key for the same store: refused with a clear message, store untouched.
    let before = snapshot(&dir.path().join("state"));
    std::fs::remove_file(creds.join("master-key")).unwrap();
    write_key_file(&creds, "master-key", 0o400);
    let (status, log) = DaemonProc::spawn(dir.path(), &opts).wait_exit();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("wrong key or not an hms-edge store"), "{log}");
    assert_eq!(
        before,
        snapshot(&dir.path().join("state")),
        "a wrong key must not modify the store"
    );
}

#[test]
fn unknown_config_key_stops_start_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("edge.toml");
    std::fs::write(&cfg, "[admin]\nlisten_addr = \"127.0.0.1:1\"\n").unwrap();
    let opts = DaemonOptions {
        config: Some(cfg),
        explicit_state_dir: true,
        env: HashMap::new(),
        wrapper: vec![],
    };
    let (status, log) = DaemonProc::spawn(dir.path(), &opts).wait_exit();
    assert_eq!(status.code(), Some(78), "{log}");
    assert!(log.contains("listen_addr") && log.contains("unknown field"), "{log}");
    assert!(status.signal().is_none());
}

#[test]
fn check_config_prints_effective_config_and_fails_on_errors() {
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/edge.toml");
    let out = std::process::Command::new(bin("hms-edge"))
        .args(["check-config"])
        .arg(&example)
        .env("HMS_EDGE_SITE_TENANT_ID", "st-marys")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("tenant_id = \"st-marys\""), "{text}");
    assert!(text.contains("[store]") && text.contains("group_commit_max_batch = 512"), "{text}");

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[store]\ndb_readers = \"four\"\n").unwrap();
    let out =
        std::process::Command::new(bin("hms-edge")).arg("check-config").arg(&bad).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("db_readers"), "{err}");
}

/// Every file's path, size and content hash under `dir`.
fn snapshot(dir: &std::path::Path) -> Vec<(String, u64, u64)> {
    use std::hash::{Hash, Hasher};
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let kind = e.file_type().unwrap();
            if kind.is_dir() {
                stack.push(p);
            } else if kind.is_file() {
                let data = std::fs::read(&p).unwrap();
                let mut h = std::collections::hash_map::DefaultHasher::new();
                data.hash(&mut h);
                out.push((p.display().to_string(), data.len() as u64, h.finish()));
            }
        }
    }
    out.sort();
    out
}
