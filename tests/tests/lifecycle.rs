//! The storage lifecycle, end to end on a small file system of its own (a tmpfs): DCMTK fills it
//! through the watermarks while hms-edge-agent forwards to a real Orthanc; only studies Orthanc
//! confirmed are evicted, the newest, the pinned and the unconfirmed stay; below the critical
//! floor C-STORE gets A700 and STOW-RS 507, then FHIR writes 507 below the records reserve, reads
//! keep working, and everything resumes by itself when space returns. A kill -9 in the middle of
//! an eviction leaves an intact store.

#[path = "dicom_common/mod.rs"]
mod dicom_common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use dicom_common::{AE, dcmtk, peer, run, storescu_outcomes, testfiles};
use hms_edge::sync::api::StatusResponse;
use hms_edge::sync::client::InternalClient;
use hms_edge_tests::peers::{AgentProc, Peer, try_wait_until};
use hms_edge_tests::{DaemonOptions, DaemonProc, Tmpfs, bin, fhir_client, http_get};
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;

/// (total, free for the service user) of the file system holding `p`.
fn space(p: &Path) -> (u64, u64) {
    let s = nix::sys::statvfs::statvfs(p).unwrap();
    let f = s.fragment_size() as u64;
    (s.blocks() as u64 * f, s.blocks_available() as u64 * f)
}

/// Writes a file of zeros until only `leave` bytes are free (or `grow` more bytes are used).
fn fill_to_free(dir: &Path, name: &str, leave: u64) -> PathBuf {
    let (_, free) = space(dir);
    write_zeros(&dir.join(name), free.saturating_sub(leave))
}

fn write_zeros(path: &Path, mut n: u64) -> PathBuf {
    let mut w = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let chunk = vec![0u8; MIB as usize];
    while n > 0 {
        let k = n.min(MIB) as usize;
        std::io::Write::write_all(&mut w, &chunk[..k]).unwrap();
        n -= k as u64;
    }
    std::io::Write::flush(&mut w).unwrap();
    path.to_owned()
}

/// One study of `n` CT instances (~39 KB each) with fresh UIDs; returns the files, the
/// SOP Instance UIDs and the Study Instance UID.
fn study(dir: &Path, n: usize) -> (Vec<PathBuf>, Vec<String>, String) {
    std::fs::create_dir_all(dir).unwrap();
    let src = testfiles(&["CT_small.dcm"]);
    let uids = peer(&["clone", src[0].to_str().unwrap(), dir.to_str().unwrap(), &n.to_string()]);
    let sops: Vec<String> =
        uids.as_array().unwrap().iter().map(|u| u.as_str().unwrap().to_owned()).collect();
    let files: Vec<PathBuf> = (0..n).map(|i| dir.join(format!("{i:06}.dcm"))).collect();
    let info = peer(&["info", files[0].to_str().unwrap()]);
    let study_uid = info[0]["study"].as_str().unwrap().to_owned();
    (files, sops, study_uid)
}

/// The box under test: hms-edged on its tmpfs, the agent forwarding to Orthanc, mosquitto.
struct Site {
    dir: tempfile::TempDir,
    _fs: Tmpfs,
    orthanc: Peer,
    mqtt: Peer,
    daemon: Option<DaemonProc>,
    agent: Option<AgentProc>,
    daemon_env: Vec<(String, String)>,
}

impl Site {
    fn start(fs_mib: u64, storage: &[(&str, &str)]) -> Site {
        let dir = tempfile::tempdir().unwrap();
        let fs = Tmpfs::mount(&dir.path().join("state"), fs_mib);
        let peers = dir.path().join("peers");
        std::fs::create_dir_all(peers.join("orthanc")).unwrap();
        std::fs::create_dir_all(peers.join("mqtt")).unwrap();
        let orthanc = Peer::orthanc(&peers.join("orthanc"));
        let mqtt = Peer::mosquitto(&peers.join("mqtt"));
        // Floors that fit a small file system (the defaults, 1 GiB and 256 MiB, would refuse
        // everything on it), unless the test sets its own.
        let mut settings: Vec<(&str, &str)> =
            vec![("critical_free", "16MiB"), ("records_reserve", "4MiB")];
        settings.retain(|(k, _)| !storage.iter().any(|(k2, _)| k2 == k));
        settings.extend_from_slice(storage);
        let daemon_env: Vec<(String, String)> = settings
            .iter()
            .map(|(k, v)| (format!("HMS_EDGE_STORAGE_{}", k.to_ascii_uppercase()), (*v).to_owned()))
            .collect();
        let mut s = Site { dir, _fs: fs, orthanc, mqtt, daemon: None, agent: None, daemon_env };
        s.start_daemon();
        s.start_agent();
        s
    }

    fn start_daemon(&mut self) {
        let mut opts = DaemonOptions { explicit_state_dir: true, ..Default::default() };
        opts.env.extend(self.daemon_env.iter().cloned());
        self.daemon = Some(DaemonProc::start(self.dir.path(), &opts));
    }

    fn start_agent(&mut self) {
        let env: Vec<(String, String)> = [
            ("HMS_EDGE_PATHS_STATE_DIR", self.state().display().to_string()),
            ("HMS_EDGE_UPSTREAM_INTERVAL_SECS", "1".into()),
            ("HMS_EDGE_UPSTREAM_MAX_BACKOFF_SECS", "2".into()),
            ("HMS_EDGE_PACS_DICOMWEB_URL", self.orthanc.str("dicomweb_url")),
            ("HMS_EDGE_MQTT_URL", format!("mqtt://127.0.0.1:{}", self.mqtt.str("port"))),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        self.agent = Some(AgentProc::start(self.dir.path(), &env));
    }

    fn d(&self) -> &DaemonProc {
        self.daemon.as_ref().unwrap()
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn status(&self) -> StatusResponse {
        let c = InternalClient::new(self.state().join("agent.sock"));
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(async { c.get("/v1/status").await.unwrap() })
    }

    /// Waits until the agent has forwarded and Orthanc confirmed every instance.
    fn wait_confirmed(&self) {
        let done = try_wait_until(Duration::from_secs(120), || {
            let s = self.status();
            let c = s.channels.iter().find(|c| c.kind == "dicom")?;
            (c.pending == 0 && c.leased == 0 && c.parked == 0).then_some(())
        });
        assert!(done.is_some(), "the agent did not forward everything:\n{}", self.logs());
    }

    fn storescu(&self, files: &[PathBuf]) -> (Vec<PathBuf>, Vec<String>) {
        storescu_outcomes(self.d().dicom.port(), files)
    }

    fn cli(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(bin("hms-edge"))
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HMS_EDGE_PATHS_STATE_DIR", self.state())
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// Exports an instance offline-safe through `hms-edge dicom export`: `None` if it fails.
    fn export(&self, sop: &str) -> Option<Vec<u8>> {
        let dest = self.dir.path().join(format!("export-{sop}.dcm"));
        let (ok, _) = self.cli(&["dicom", "export", sop, dest.to_str().unwrap()]);
        ok.then(|| std::fs::read(&dest).unwrap())
    }

    fn wado(&self, study: &str) -> u16 {
        let c = fhir_client(&self.state().join("tls/cert.pem"));
        let url = format!("https://localhost:{}/dicom-web/studies/{study}", self.d().fhir.port());
        c.get(url)
            .header("accept", "multipart/related; type=\"application/dicom\"")
            .send()
            .unwrap()
            .status()
            .as_u16()
    }

    fn logs(&self) -> String {
        format!(
            "--- daemon\n{}\n--- agent\n{}",
            self.daemon.as_ref().map(|d| d.log_text()).unwrap_or_default(),
            self.agent.as_ref().map(|a| a.log_text()).unwrap_or_default()
        )
    }
}

/// The data set part of a Part 10 file (after the File Meta): what must come back unchanged.
fn dataset(part10: &[u8]) -> Vec<u8> {
    let off = hms_edge::dicom::dataset::part10_dataset_offset(part10).expect("a Part 10 file");
    part10[off..].to_vec()
}

fn assert_held_identical(site: &Site, files: &[PathBuf], sops: &[String], what: &str) {
    for (f, sop) in files.iter().zip(sops) {
        let got = site.export(sop).unwrap_or_else(|| panic!("{what}: {sop} cannot be exported"));
        assert_eq!(dataset(&got), dataset(&std::fs::read(f).unwrap()), "{what}: {sop} changed");
    }
}

/// `PRAGMA integrity_check` of the stopped store, every instance row counted as held reads back
/// whole, then `hms-edge audit check`. Returns the instance rows counted as held.
fn integrity_and_audit_check(state: &Path) -> usize {
    let key = hms_edge::keys::load_key_file(&state.join("master.key")).unwrap();
    let store =
        hms_edge::store::open(state, &key, &hms_edge::store::StoreOptions::default()).unwrap();
    let (integrity, held): (String, Vec<String>) = store
        .read_blocking(|c| {
            let integrity = c.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
            let mut st = c.prepare(
                "SELECT i.blob FROM dicom_instances i JOIN blobs b ON b.id = i.blob
                 WHERE b.offloaded_at IS NULL",
            )?;
            let held = st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
            Ok((integrity, held))
        })
        .unwrap();
    assert_eq!(integrity, "ok");
    for id in &held {
        let id = hms_edge::store::BlobId::parse(id).unwrap();
        assert!(
            store.blobs().get(&id).is_ok(),
            "a row counted as held has no readable blob {id:?}"
        );
    }
    store.close();
    drop(store);
    hms_edge_tests::assert_audit_check(state);
    held.len()
}

fn metric(site: &Site, name: &str) -> f64 {
    let (_, text) = http_get(site.d().admin, "/metrics");
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn post_patient(site: &Site, n: u32) -> u16 {
    let c = fhir_client(&site.state().join("tls/cert.pem"));
    let p = json!({"resourceType": "Patient", "active": true,
        "identifier": [{"system": "urn:lifecycle-test", "value": format!("p{n}")}],
        "name": [{"family": "Lifecycle", "given": [format!("P{n}")]}]});
    c.post(format!("{}/Patient", site.d().fhir_base()))
        .header("content-type", "application/fhir+json")
        .body(p.to_string())
        .send()
        .unwrap()
        .status()
        .as_u16()
}

fn stow(site: &Site, file: &Path) -> (u16, String) {
    let boundary = "lifecycle-boundary";
    let mut body = format!("--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").into_bytes();
    body.extend_from_slice(&std::fs::read(file).unwrap());
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let c = fhir_client(&site.state().join("tls/cert.pem"));
    let r = c
        .post(format!("https://localhost:{}/dicom-web/studies", site.d().fhir.port()))
        .header(
            "content-type",
            format!("multipart/related; type=\"application/dicom\"; boundary={boundary}"),
        )
        .body(body)
        .send()
        .unwrap();
    (r.status().as_u16(), r.text().unwrap_or_default())
}

/// A subscriber that writes every event message (`topic payload`) into a file.
fn subscribe(site: &Site) -> (std::process::Child, PathBuf) {
    let out = site.dir.path().join("mqtt-messages.txt");
    let f = std::fs::File::create(&out).unwrap();
    let child = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &site.mqtt.str("port"), "-v", "-q", "1", "-t", "hms/#"])
        .stdout(Stdio::from(f))
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto_sub (apt-get install mosquitto-clients)");
    (child, out)
}

/// C-FIND at study level for one Study Instance UID: whether the index still finds it.
fn cfind_finds_study(site: &Site, study: &str) -> bool {
    let port = site.d().dicom.port().to_string();
    let out = run(dcmtk("findscu")
        .args(["-v", "-S", "-aec", AE, "-k", "QueryRetrieveLevel=STUDY"])
        .args(["-k", &format!("StudyInstanceUID={study}"), "127.0.0.1", &port]));
    String::from_utf8_lossy(&out.stdout).contains(study)
        || String::from_utf8_lossy(&out.stderr).contains(study)
}

#[test]
fn watermarks_evict_only_confirmed_studies_and_the_floors_answer_clearly() {
    // 96 MiB: eviction above 40 % used down to 30 %; images refused below 10 MiB free, FHIR
    // writes below 4 MiB; a study is protected for 4 s after its last use.
    let mut site = Site::start(
        96,
        &[
            ("high_watermark", "40%"),
            ("low_watermark", "30%"),
            ("critical_free", "10MiB"),
            ("records_reserve", "4MiB"),
            ("protect_secs", "4"),
            ("check_interval_secs", "1"),
        ],
    );
    let (mut sub, messages) = subscribe(&site);
    let work = site.dir.path().join("studies");
    let (old_files, old_sops, old_study) = study(&work.join("old"), 80);
    let (pinned_files, pinned_sops, pinned_study) = study(&work.join("pinned"), 80);
    for files in [&old_files, &pinned_files] {
        let (acked, failed) = site.storescu(files);
        assert_eq!((acked.len(), failed.len()), (files.len(), 0), "{failed:?}");
    }
    site.wait_confirmed();
    let (ok, out) = site.cli(&["dicom", "pin", &pinned_study]);
    assert!(ok, "{out}");
    // A study Orthanc has not confirmed: sent while the agent is down.
    site.agent.as_mut().unwrap().kill9();
    let (unconf_files, unconf_sops, unconf_study) = study(&work.join("unconfirmed"), 80);
    assert_eq!(site.storescu(&unconf_files).0.len(), unconf_files.len());
    std::thread::sleep(Duration::from_secs(5)); // all three are now outside the protection window
    let (new_files, new_sops, _) = study(&work.join("newest"), 40);
    assert_eq!(site.storescu(&new_files).0.len(), new_files.len());

    // A dry run names what would go and changes nothing.
    let (ok, out) = site.cli(&["dicom", "evict", "--study", &old_study, "--dry-run"]);
    assert!(ok && out.contains("would be evicted") && out.contains(&old_study), "{out}");
    assert!(site.export(&old_sops[0]).is_some(), "a dry run evicted");

    // Above the high watermark: the task evicts the one study that may go.
    let (total, _) = space(&site.state());
    let used_now = total - space(&site.state()).1;
    let filler =
        write_zeros(&site.state().join("filler"), (total * 45 / 100).saturating_sub(used_now));
    // (Looked at with the offline export: a retrieve would count as a use of the study.)
    let evicted = try_wait_until(Duration::from_secs(30), || {
        site.export(&old_sops[0]).is_none().then_some(())
    });
    if evicted.is_none() {
        let tomorrow = hms_edge::fhir::date::format_instant(hms_edge::store::now_ms() + 86_400_000);
        let (_, out) = site.cli(&["dicom", "evict", "--before", &tomorrow[..10], "--dry-run"]);
        panic!("the confirmed old study was not evicted:\n{out}\n{}", site.logs());
    }
    std::thread::sleep(Duration::from_secs(3)); // more rounds: nothing else may go
    for sop in &old_sops {
        assert!(site.export(sop).is_none(), "an evicted instance still exports");
    }
    assert_held_identical(&site, &pinned_files, &pinned_sops, "pinned study");
    assert_held_identical(&site, &unconf_files, &unconf_sops, "unconfirmed study");
    assert_held_identical(&site, &new_files, &new_sops, "newest study");
    assert!(cfind_finds_study(&site, &old_study), "C-FIND no longer finds the evicted study");
    assert_eq!(site.wado(&pinned_study), 200);
    assert_eq!(metric(&site, "hms_dicom_evicted_studies_total"), 1.0);
    let (ok, out) = site.cli(&["dicom", "evict", "--study", &pinned_study]);
    assert!(ok && out.contains("kept: pinned"), "{out}");
    let (ok, out) = site.cli(&["dicom", "evict", "--study", &unconf_study]);
    assert!(ok && out.contains("kept: not-confirmed-upstream"), "{out}");
    // Every eviction is in the audit trail, and the event reached the broker.
    site.start_agent();
    let published = try_wait_until(Duration::from_secs(30), || {
        let text = std::fs::read_to_string(&messages).unwrap_or_default();
        text.lines().any(|l| l.contains("study.evicted") && l.contains(&old_study)).then_some(())
    });
    let _ = sub.kill();
    assert!(published.is_some(), "no study.evicted event on the broker:\n{}", site.logs());

    // Below the critical floor: A700 for C-STORE, 507 for STOW-RS; FHIR writes still work.
    let (more_files, more_sops, _) = study(&work.join("more"), 5);
    let floor = fill_to_free(&site.state(), "floor", 7 * MIB);
    let (acked, failed) = site.storescu(&more_files);
    assert!(acked.is_empty(), "stored below the critical floor: {acked:?}");
    assert!(
        !failed.is_empty() && failed.iter().all(|l| l.contains("OutOfResources")),
        "{failed:?}"
    );
    let refused = failed.len();
    let (code, body) = stow(&site, &more_files[0]);
    assert_eq!(code, 507, "STOW-RS below the floor: {body}");
    assert!(body.contains("disk space"), "{body}");
    assert_eq!(post_patient(&site, 1), 201, "FHIR writes stop only below the records reserve");
    let (code, body) = http_get(site.d().admin, "/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("disk"), "{body}");
    // Below the records reserve: FHIR writes get 507 with an OperationOutcome; reads work.
    let reserve = fill_to_free(&site.state(), "reserve", 2 * MIB);
    assert_eq!(post_patient(&site, 2), 507);
    let c = fhir_client(&site.state().join("tls/cert.pem"));
    let r = c.get(format!("{}/Patient?identifier=urn:lifecycle-test|p1", site.d().fhir_base()));
    let bundle: Value = r.send().unwrap().json().unwrap();
    assert_eq!(bundle["total"], 1, "{bundle}");

    // Space returns: everything resumes without an operator.
    for f in [reserve, floor, filler] {
        std::fs::remove_file(f).unwrap();
    }
    let (acked, failed) = site.storescu(&more_files);
    assert_eq!((acked.len(), failed.len()), (more_files.len(), 0), "{failed:?}");
    assert_eq!(post_patient(&site, 3), 201);
    assert_held_identical(&site, &more_files, &more_sops, "after recovery");
    let (code, body) = http_get(site.d().admin, "/readyz");
    assert_eq!(code, 200, "{body}");
    let state = site.state();
    site.agent = None;
    let (status, _, log) = site.daemon.take().unwrap().stop();
    assert!(status.success(), "{log}");
    integrity_and_audit_check(&state);
    println!(
        "LIFECYCLE|96 MiB tmpfs, 4 studies|evicted: the confirmed old study ({} instances); kept: pinned, unconfirmed, newest|A700 × {}, STOW 507, FHIR 507 below the reserve|resumed by itself",
        old_sops.len(),
        refused
    );
}

#[test]
fn kill9_during_eviction_leaves_every_held_instance_intact() {
    let mut site = Site::start(256, &[("check_interval_secs", "3600")]);
    let work = site.dir.path().join("studies");
    let mut all: Vec<(Vec<PathBuf>, Vec<String>, String)> = Vec::new();
    for i in 0..40 {
        let s = study(&work.join(format!("s{i}")), 12);
        assert_eq!(site.storescu(&s.0).0.len(), s.0.len());
        all.push(s);
    }
    site.wait_confirmed();
    // Evict everything received before tomorrow, and kill -9 the daemon while it works.
    let tomorrow = hms_edge::fhir::date::format_instant(hms_edge::store::now_ms() + 86_400_000);
    let mut evict = Command::new(bin("hms-edge"))
        .args(["dicom", "evict", "--before", &tomorrow[..10]])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HMS_EDGE_PATHS_STATE_DIR", site.state())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The kill comes as soon as the first file of an evicted study is gone.
    let blobs = site.state().join("blobs");
    let before = walk_files(&blobs);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while walk_files(&blobs) >= before {
        assert!(
            std::time::Instant::now() < deadline,
            "the eviction never started:\n{}",
            site.logs()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    site.agent = None;
    let mut d = site.daemon.take().unwrap();
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    let _ = evict.wait();
    drop(d);
    // After the restart: integrity, the audit trail, and each instance either whole or evicted
    // (its file gone, no row counting it as held).
    site.start_daemon();
    let blob_files = walk_files(&site.state().join("blobs"));
    let (mut held, mut gone) = (0, 0);
    for (files, sops, _) in &all {
        for (f, sop) in files.iter().zip(sops) {
            match site.export(sop) {
                Some(got) => {
                    assert_eq!(dataset(&got), dataset(&std::fs::read(f).unwrap()), "{sop}");
                    held += 1;
                }
                None => gone += 1,
            }
        }
    }
    assert_eq!(blob_files, held, "blob files on disk != instances held (an orphan or a hole)");
    let state = site.state();
    let (status, _, log) = site.daemon.take().unwrap().stop();
    assert!(status.success(), "{log}");
    let held_rows = integrity_and_audit_check(&state);
    assert_eq!(held_rows, held, "rows counted as held != instances that export");
    println!(
        "LIFECYCLE|kill -9 during `hms-edge dicom evict`|{held} instances held and byte-identical, {gone} evicted, no orphan file|integrity ok, audit check ok"
    );
}

fn walk_files(dir: &Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            if e.file_name() != "tmp" {
                n += walk_files(&e.path());
            }
        } else {
            n += 1;
        }
    }
    n
}

/// DCMTK getscu for a study into `dir`; returns (success, log).
fn getscu(site: &Site, study: &str, dir: &Path) -> (bool, String) {
    std::fs::create_dir_all(dir).unwrap();
    let out = run(dcmtk("getscu")
        .args(["-d", "-S", "+B", "-to", "60", "-aec", AE, "-od"])
        .arg(dir)
        .args(["127.0.0.1", &site.d().dicom.port().to_string()])
        .args(["-k", "QueryRetrieveLevel=STUDY", "-k"])
        .arg(format!("StudyInstanceUID={study}")));
    (
        out.status.success(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

/// The data sets of the files in `dir`, by SOP Instance UID.
fn received(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    if files.is_empty() {
        return Default::default();
    }
    dicom_common::info(&files)
        .iter()
        .zip(&files)
        .map(|(f, p)| (f["sop_instance"].as_str().unwrap().to_owned(), dicom_common::dataset_of(p)))
        .collect()
}

#[test]
fn recall_brings_an_evicted_study_back_verified_or_says_why() {
    let mut site =
        Site::start(256, &[("check_interval_secs", "3600"), ("recall_timeout_secs", "60")]);
    let work = site.dir.path().join("studies");
    let (files, sops, study_uid) = study(&work.join("s"), 8);
    assert_eq!(site.storescu(&files).0.len(), files.len());
    site.wait_confirmed();
    let sent: std::collections::BTreeMap<String, Vec<u8>> =
        sops.iter().zip(&files).map(|(s, f)| (s.clone(), dicom_common::dataset_of(f))).collect();
    let evict = |site: &Site| {
        let (ok, out) = site.cli(&["dicom", "evict", "--study", &study_uid]);
        assert!(ok && out.contains("evicted 1 studies"), "{out}");
        assert!(site.export(&sops[0]).is_none(), "still held after eviction");
    };

    // C-GET of the evicted study: recalled from Orthanc, verified, then sent byte-identical.
    evict(&site);
    let dir = site.dir.path().join("get");
    let (ok, log) = getscu(&site, &study_uid, &dir);
    assert!(ok, "getscu of an evicted study:\n{log}\n{}", site.logs());
    assert_eq!(received(&dir), sent, "C-GET after a recall");
    assert_held_identical(&site, &files, &sops, "recalled by C-GET");

    // WADO-RS of the evicted study: the same.
    evict(&site);
    assert_eq!(site.wado(&study_uid), 200, "{}", site.logs());
    assert_held_identical(&site, &files, &sops, "recalled by WADO-RS");

    // The WAN is down (Orthanc stopped): a clear failure, nothing half-stored.
    evict(&site);
    let _ = site.orthanc.child.kill();
    let _ = site.orthanc.child.wait();
    let c = fhir_client(&site.state().join("tls/cert.pem"));
    let r = c
        .get(format!("https://localhost:{}/dicom-web/studies/{study_uid}", site.d().fhir.port()))
        .header("accept", "multipart/related; type=\"application/dicom\"")
        .send()
        .unwrap();
    let code = r.status().as_u16();
    let body = r.text().unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("could not be brought back from the cloud PACS"), "{body}");
    let dir = site.dir.path().join("get-down");
    let (ok, log) = getscu(&site, &study_uid, &dir);
    assert!(received(&dir).is_empty(), "instances sent while the PACS is down");
    // A702 with the count and an Error Comment that says why.
    assert!(log.contains("Refused: OutOfResourcesSubOperations"), "(ok={ok}):\n{log}");
    assert!(log.contains("Number of Failed Suboperations    : 8"), "{log}");
    assert!(log.contains("8 evicted, "), "getscu's answer does not say why:\n{log}");
    assert!(site.export(&sops[0]).is_none(), "a failed recall left a blob");
    let state = site.state();
    site.agent = None;
    let (status, _, l) = site.daemon.take().unwrap().stop();
    assert!(status.success(), "{l}");
    let held = integrity_and_audit_check(&state);
    assert_eq!(held, 0, "rows counted as held after the failed recall");
    println!(
        "LIFECYCLE|recall|C-GET and WADO-RS of an evicted study: {} instances back from Orthanc, byte-identical (SHA-256 checked)|PACS down: WADO-RS 503 with the reason, C-GET failed sub-operations with the Error Comment|audit check ok",
        sops.len()
    );
}

#[test]
fn prefetch_brings_a_scheduled_patients_priors_back_before_the_exam() {
    // (The test file's study is from 2004: a look-back of a century.)
    let site = Site::start(
        256,
        &[
            ("check_interval_secs", "1"),
            ("prefetch_lead_secs", "3600"),
            ("prefetch_lookback_days", "36500"),
        ],
    );
    let work = site.dir.path().join("studies");
    let (files, sops, prior) = study(&work.join("prior"), 6);
    let patient_id =
        peer(&["info", files[0].to_str().unwrap()])[0]["patient_id"].as_str().unwrap().to_owned();
    assert_eq!(site.storescu(&files).0.len(), files.len());
    site.wait_confirmed();
    let (ok, out) = site.cli(&["dicom", "evict", "--study", &prior]);
    assert!(ok && out.contains("evicted 1 studies"), "{out}");
    assert!(site.export(&sops[0]).is_none());
    // An order for the same patient, scheduled in 20 minutes.
    let c = fhir_client(&site.state().join("tls/cert.pem"));
    let base = site.d().fhir_base();
    let put = |path: &str, body: Value| {
        let r = c
            .put(format!("{base}/{path}"))
            .header("content-type", "application/fhir+json")
            .body(body.to_string())
            .send()
            .unwrap();
        assert!(r.status().is_success(), "PUT {path}: {}", r.text().unwrap_or_default());
    };
    put(
        "Patient/prefetch-p",
        json!({"resourceType": "Patient", "id": "prefetch-p",
               "identifier": [{"system": "urn:hms-edge:dev-site:patient-id", "value": patient_id}],
               "name": [{"family": "Prior", "given": ["Pat"]}]}),
    );
    let when = hms_edge::fhir::date::format_instant(hms_edge::store::now_ms() + 20 * 60_000);
    put(
        "ServiceRequest/prefetch-sr",
        json!({"resourceType": "ServiceRequest", "id": "prefetch-sr", "status": "active",
               "intent": "order", "subject": {"reference": "Patient/prefetch-p"},
               "code": {"text": "CT head"},
               "identifier": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]}, "value": "ACC-PREFETCH"}],
               "occurrenceDateTime": when}),
    );
    let back = try_wait_until(Duration::from_secs(60), || site.export(&sops[0]).map(|_| ()));
    assert!(back.is_some(), "the prior was not prefetched:\n{}", site.logs());
    assert_held_identical(&site, &files, &sops, "prefetched prior");
    println!(
        "LIFECYCLE|prefetch|an order scheduled in 20 min: the patient's evicted prior ({} instances) back from Orthanc before the exam, byte-identical",
        sops.len()
    );
}
