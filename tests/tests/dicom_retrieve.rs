//! C-GET and C-MOVE SCP against real peers: DCMTK `getscu` receives a study on its own
//! association, DCMTK `movescu` sends one to a DCMTK `storescp` named in `dicom.peers`; every
//! instance arrives with the data set byte-identical to what the modality sent. An unknown move
//! destination fails with A801 and nothing is sent; a C-CANCEL (pynetdicom) stops a retrieve with
//! status FE00 and its counts, and the association stays usable. An instance is sent only in its
//! stored transfer syntax (a requester not proposing it is told that sub-operation failed). Each
//! retrieve is audited.

mod dicom_common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dicom_common::*;
use hms_edge::config::{DicomConfig, DicomPeer};
use serde_json::Value;

/// A study of `n` CT instances over several series (clones of a pydicom test file, each with
/// its own SOP Instance UID), plus an MR instance of another study, stored with real `storescu`.
struct Fixture {
    scp: Scp,
    /// The CT study's UID.
    study: String,
    /// SOP Instance UID → the file the modality sent, for the CT study.
    sent: BTreeMap<String, PathBuf>,
    /// The SOP Instance UID of the MR instance (another study: never part of a retrieve).
    other: String,
    work: tempfile::TempDir,
}

fn fixture(config: DicomConfig, n: usize) -> Fixture {
    let scp = Scp::start_with(config, None);
    let work = tempfile::tempdir().unwrap();
    let src = testfiles(&["CT_small.dcm", "MR_small.dcm"]);
    let dir = work.path().join("ct");
    std::fs::create_dir(&dir).unwrap();
    let uids =
        peer(&["clone", src[0].to_str().unwrap(), dir.to_str().unwrap(), &n.to_string(), "4"]);
    let files: Vec<PathBuf> = (0..n).map(|i| dir.join(format!("{i:06}.dcm"))).collect();
    let mut all = files.clone();
    all.push(src[1].clone());
    assert_eq!(storescu(scp.port, &all).len(), all.len(), "storescu: every instance acknowledged");
    let facts = info(&all);
    let study = facts[0]["study"].as_str().unwrap().to_owned();
    assert!(facts[..n].iter().all(|f| f["study"] == study.as_str()));
    assert_ne!(facts[n]["study"], study.as_str());
    let sent = uids
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap().to_owned())
        .zip(files)
        .collect();
    Fixture { scp, study, sent, other: facts[n]["sop_instance"].as_str().unwrap().to_owned(), work }
}

/// The received files of a folder by SOP Instance UID.
fn received(dir: &Path) -> BTreeMap<String, PathBuf> {
    let files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    if files.is_empty() {
        return BTreeMap::new();
    }
    info(&files)
        .iter()
        .zip(&files)
        .map(|(f, p)| (f["sop_instance"].as_str().unwrap().to_owned(), p.clone()))
        .collect()
}

/// Every file of the study arrived once, the data set byte for byte as the modality sent it.
fn assert_same_study(fx: &Fixture, got: &BTreeMap<String, PathBuf>) {
    assert_eq!(got.keys().collect::<Vec<_>>(), fx.sent.keys().collect::<Vec<_>>());
    for (sop, file) in got {
        assert!(dataset_of(file) == dataset_of(&fx.sent[sop]), "{sop}: data set differs");
    }
}

/// Audit events of one action: (outcome, entity, detail).
fn audit_events(scp: &Scp, action: &str, want: usize) -> Vec<(String, String, Value)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let a = action.to_owned();
        let rows: Vec<(String, String, Option<String>)> = scp
            .store
            .read_blocking(move |c| {
                let mut s = c.prepare(
                    "SELECT outcome, entity, detail FROM audit_events WHERE action = ?1 ORDER BY seq",
                )?;
                let rows = s.query_map([&a], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .unwrap();
        if rows.len() >= want || Instant::now() > deadline {
            return rows
                .into_iter()
                .map(|(o, e, d)| {
                    (o, e, d.map(|d| serde_json::from_str(&d).unwrap()).unwrap_or(Value::Null))
                })
                .collect();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A real DCMTK storescp writing into `dir`, as AE `DEST`.
fn storescp(dir: &Path) -> (ChildGuard, u16) {
    let port = hms_edge_tests::free_port();
    let child = dcmtk("storescp")
        .args(["+B", "-aet", "DEST", "-od"])
        .arg(dir)
        .arg(port.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let guard = ChildGuard(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "storescp did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    (guard, port)
}

fn config_with_dest(port: u16) -> DicomConfig {
    let mut c = DicomConfig::default();
    let mut dest = DicomPeer::new("DEST", "127.0.0.1");
    dest.port = Some(port);
    c.peers.push(dest);
    c
}

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn getscu_receives_the_study_byte_identical_and_the_retrieve_is_audited() {
    let fx = fixture(DicomConfig::default(), 6);
    let out_dir = fx.work.path().join("get");
    std::fs::create_dir(&out_dir).unwrap();
    let out = run(dcmtk("getscu")
        .args(["-v", "-S", "+B", "-to", "20", "-aec", AE, "-od"])
        .arg(&out_dir)
        .args(["127.0.0.1", &fx.scp.port.to_string()])
        .args(["-k", "QueryRetrieveLevel=STUDY", "-k"])
        .arg(format!("StudyInstanceUID={}", fx.study)));
    let log = text(&out);
    assert!(out.status.success(), "getscu failed:\n{log}");
    assert_same_study(&fx, &received(&out_dir));
    assert!(!received(&out_dir).contains_key(&fx.other), "another study was sent");

    // Series level: only that series (the clones put 4 instances in each series).
    let series =
        info(&[fx.sent.values().next().unwrap().clone()])[0]["series"].as_str().unwrap().to_owned();
    let series_dir = fx.work.path().join("get-series");
    std::fs::create_dir(&series_dir).unwrap();
    let out = run(dcmtk("getscu")
        .args(["-S", "+B", "-to", "20", "-aec", AE, "-od"])
        .arg(&series_dir)
        .args(["127.0.0.1", &fx.scp.port.to_string()])
        .args(["-k", "QueryRetrieveLevel=SERIES", "-k"])
        .arg(format!("SeriesInstanceUID={series}")));
    assert!(out.status.success(), "{}", text(&out));
    let got = received(&series_dir);
    let in_series: BTreeSet<String> = info(&fx.sent.values().cloned().collect::<Vec<_>>())
        .iter()
        .filter(|f| f["series"] == series.as_str())
        .map(|f| f["sop_instance"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(got.keys().cloned().collect::<BTreeSet<_>>(), in_series);
    assert_eq!(in_series.len(), 4);

    // Audited: who, what was asked, and every instance sent.
    let ev = audit_events(&fx.scp, "dicom-get", 2);
    assert_eq!(ev.len(), 2, "{ev:?}");
    let (outcome, entity, detail) = &ev[0];
    assert_eq!(outcome, "success: 6 sent");
    assert!(entity.contains(&fx.study), "{entity}");
    let sent: BTreeSet<&str> =
        detail["instances"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(sent, fx.sent.keys().map(String::as_str).collect());
    assert_eq!(detail["studies"], serde_json::json!([fx.study]));
    assert_eq!(ev[1].0, "success: 4 sent");
}

#[test]
fn movescu_sends_the_study_to_a_configured_storescp() {
    let dest_dir = tempfile::tempdir().unwrap();
    let (_storescp, port) = storescp(dest_dir.path());
    let fx = fixture(config_with_dest(port), 5);
    let out = run(dcmtk("movescu")
        .args(["-v", "-S", "-to", "20", "-aec", AE, "-aem", "DEST"])
        .args(["127.0.0.1", &fx.scp.port.to_string()])
        .args(["-k", "QueryRetrieveLevel=STUDY", "-k"])
        .arg(format!("StudyInstanceUID={}", fx.study)));
    let log = text(&out);
    assert!(out.status.success(), "movescu failed:\n{log}");
    assert_same_study(&fx, &received(dest_dir.path()));

    let ev = audit_events(&fx.scp, "dicom-move", 1);
    let (outcome, _, detail) = &ev[0];
    assert_eq!(outcome, "success: 5 sent");
    assert_eq!(detail["destination"], "DEST");
    assert_eq!(detail["address"], format!("127.0.0.1:{port}"));
    assert_eq!(detail["instances"].as_array().unwrap().len(), 5);
}

#[test]
fn move_to_an_unknown_destination_fails_with_a801_and_sends_nothing() {
    let dest_dir = tempfile::tempdir().unwrap();
    let (_storescp, port) = storescp(dest_dir.path());
    let fx = fixture(config_with_dest(port), 2);
    let out = run(dcmtk("movescu")
        .args(["-v", "-S", "-to", "20", "-aec", AE, "-aem", "NOBODY"])
        .args(["127.0.0.1", &fx.scp.port.to_string()])
        .args(["-k", "QueryRetrieveLevel=STUDY", "-k"])
        .arg(format!("StudyInstanceUID={}", fx.study)));
    let log = text(&out);
    assert!(log.contains("Refused: MoveDestinationUnknown"), "{log}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(received(dest_dir.path()).is_empty(), "something was sent");
    let ev = audit_events(&fx.scp, "dicom-move", 1);
    assert_eq!(ev[0].0, "refused: A801 move destination unknown");
    assert_eq!(ev[0].2["destination"], "NOBODY");
}

#[test]
fn cancel_stops_a_get_and_a_move_with_counts_and_the_association_goes_on() {
    let dest_dir = tempfile::tempdir().unwrap();
    let (_storescp, port) = storescp(dest_dir.path());
    let n = 40;
    let fx = fixture(config_with_dest(port), n);
    let scp_port = fx.scp.port.to_string();
    for op in ["get", "move"] {
        let mut args = vec!["retrieve-cancel", "127.0.0.1", &scp_port, AE, op, &fx.study, "2"];
        if op == "move" {
            args.push("DEST");
        }
        let r = peer(&args);
        assert_eq!(r["final"], 0xFE00, "{op}: {r}");
        let completed = r["completed"].as_i64().unwrap();
        let remaining = r["remaining"].as_i64().unwrap();
        assert!(completed >= 2 && remaining > 0, "{op}: {r}");
        assert_eq!(completed + remaining + r["failed"].as_i64().unwrap(), n as i64, "{op}: {r}");
        assert_eq!(r["echo"], 0, "{op}: association unusable after the cancel: {r}");
        if op == "get" {
            assert_eq!(r["received"].as_i64().unwrap(), completed, "{r}");
        } else {
            assert_eq!(received(dest_dir.path()).len() as i64, completed, "{r}");
        }
        let action = format!("dicom-{op}");
        let ev = audit_events(&fx.scp, &action, 1);
        assert!(ev[0].0.starts_with("cancelled: "), "{ev:?}");
        assert_eq!(ev[0].2["instances"].as_array().unwrap().len() as i64, completed);
    }
}

#[test]
fn get_sends_the_stored_transfer_syntax_only_and_reports_what_failed() {
    let scp = Scp::start();
    let work = tempfile::tempdir().unwrap();
    let files = testfiles(&["JPEG-LL.dcm"]);
    assert_eq!(storescu_jpeg(scp.port, &files), 1);
    let f = &info(&files)[0];
    let getscu = |dir: &Path, extra: &[&str]| {
        std::fs::create_dir(dir).unwrap();
        run(dcmtk("getscu")
            .args(["-v", "+B", "-to", "20", "-aec", AE, "-od"])
            .arg(dir)
            .args(extra)
            .args(["127.0.0.1", &scp.port.to_string()])
            .args(["-k", "QueryRetrieveLevel=PATIENT", "-k"])
            .arg(format!("PatientID={}", f["patient_id"].as_str().unwrap())))
    };
    // Patient Root, uncompressed syntaxes only: the JPEG Lossless instance is not transcoded;
    // its sub-operation fails and the requester is told which instance.
    let plain = work.path().join("plain");
    let out = getscu(&plain, &[]);
    let log = text(&out);
    assert!(log.contains("Refused: OutOfResourcesSubOperations"), "{log}");
    assert!(log.contains("Number of Failed Suboperations    : 1"), "{log}");
    assert!(!log.contains("Release Failed"), "{log}");
    assert!(received(&plain).is_empty());
    // Proposing JPEG Lossless: sent as stored, byte for byte.
    let jpeg = work.path().join("jpeg");
    let out = getscu(&jpeg, &["+xs"]);
    assert!(out.status.success(), "{}", text(&out));
    let got = received(&jpeg);
    assert_eq!(got.len(), 1, "{}", text(&out));
    let sop = f["sop_instance"].as_str().unwrap();
    // Compared with what the SCP received (storescu loads the file and may re-encode it).
    assert!(dataset_of(&got[sop]) == dataset_of(&scp.export(sop)), "data set differs");
    let ev = audit_events(&scp, "dicom-get", 2);
    assert!(ev[0].0.starts_with("partial: 0 sent, 1 failed"), "{ev:?}");
    assert_eq!(ev[0].2["failed"], serde_json::json!([sop]));
    assert_eq!(ev[1].0, "success: 1 sent");
}

/// storescu proposing the file's own (compressed) transfer syntax.
fn storescu_jpeg(port: u16, files: &[PathBuf]) -> usize {
    let out = run(dcmtk("storescu")
        .args(["-v", "-xs", "-to", "10", "-aec", AE, "127.0.0.1"])
        .arg(port.to_string())
        .args(files));
    text(&out).matches("Received Store Response (Success)").count()
}
