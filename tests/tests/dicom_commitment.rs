//! Storage Commitment Push Model SCP against a real requester (pynetdicom): a modality asks
//! whether we hold what it sent, and learns from our N-EVENT-REPORT, on the same association,
//! which instances it may delete locally and which it must send again.

mod dicom_common;

use std::path::Path;
use std::process::Command;

use dicom_common::*;
use serde_json::{Value, json};

const CT_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.2";
const MR_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.4";

fn commit(port: u16, transaction: &str, refs: &[(&str, &str)]) -> Value {
    commit_with_action(port, transaction, refs, 1)
}

fn commit_with_action(port: u16, transaction: &str, refs: &[(&str, &str)], action: u16) -> Value {
    commit_with(port, transaction, refs, action, None)
}

/// `report_port`: the requester releases after the N-ACTION-RSP and listens there for the report.
fn commit_with(
    port: u16,
    transaction: &str,
    refs: &[(&str, &str)],
    action: u16,
    report_port: Option<u16>,
) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("dicom/commit_peer.py");
    let refs: Vec<String> = refs.iter().map(|(c, i)| format!("{c}={i}")).collect();
    // `timeout`: a peer that hangs fails the test instead of stalling the suite.
    let out = run(Command::new("timeout")
        .args(["120", "python3"])
        .env("ACTION_TYPE", action.to_string())
        .envs(report_port.map(|p| ("REPORT_PORT", p.to_string())))
        .arg(script)
        .args(["127.0.0.1", &port.to_string(), AE, transaction])
        .args(&refs));
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!("commit_peer.py: {e}\n{text}\n{}", String::from_utf8_lossy(&out.stderr))
    })
}

fn pairs(v: &Value) -> Vec<(String, String)> {
    let mut p: Vec<(String, String)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r[0].as_str().unwrap().to_owned(), r[1].as_str().unwrap().to_owned()))
        .collect();
    p.sort();
    p
}

#[test]
fn commitment_is_reported_only_for_durable_instances() {
    let scp = Scp::start();
    let files = testfiles(&["CT_small.dcm", "MR_small.dcm"]);
    assert_eq!(storescu(scp.port, &files).len(), 2);
    let meta = info(&files);
    let (ct, mr) =
        (meta[0]["sop_instance"].as_str().unwrap(), meta[1]["sop_instance"].as_str().unwrap());
    assert_eq!(meta[0]["sop_class"], CT_IMAGE_STORAGE);

    // An unknown action type is refused in the N-ACTION-RSP and no report follows.
    let r = commit_with_action(scp.port, "2.25.1000", &[(CT_IMAGE_STORAGE, ct)], 2);
    assert_eq!(r["action_status"], 0x0123, "{r}");
    assert_eq!(r["event_type"], Value::Null, "{r}");

    // Everything stored: event type 1, both committed, our AE to retrieve them from.
    let r = commit(scp.port, "2.25.1001", &[(CT_IMAGE_STORAGE, ct), (MR_IMAGE_STORAGE, mr)]);
    assert_eq!(r["action_status"], 0, "{r}");
    assert_eq!(r["event_type"], 1, "{r}");
    assert_eq!(r["transaction_uid"], "2.25.1001");
    assert_eq!(r["retrieve_ae"], AE);
    assert_eq!(r["same_association"], true, "{r}");
    let mut want = vec![
        (CT_IMAGE_STORAGE.to_owned(), ct.to_owned()),
        (MR_IMAGE_STORAGE.to_owned(), mr.to_owned()),
    ];
    want.sort();
    assert_eq!(pairs(&r["committed"]), want);
    assert_eq!(r["failed"], json!([]));

    // Never received, and stored under another class: event type 2 with the standard reasons;
    // the instance we do hold is still committed.
    let r = commit(
        scp.port,
        "2.25.1002",
        &[
            (CT_IMAGE_STORAGE, ct),
            (CT_IMAGE_STORAGE, "1.2.3.4.5.6.7.8.9.never.sent"),
            (CT_IMAGE_STORAGE, mr),
        ],
    );
    assert_eq!(r["action_status"], 0, "{r}");
    assert_eq!(r["event_type"], 2, "{r}");
    assert_eq!(pairs(&r["committed"]), vec![(CT_IMAGE_STORAGE.to_owned(), ct.to_owned())]);
    let mut failed: Vec<(String, u64)> = r["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f[1].as_str().unwrap().to_owned(), f[2].as_u64().unwrap()))
        .collect();
    failed.sort();
    let mut want_failed =
        vec![("1.2.3.4.5.6.7.8.9.never.sent".to_owned(), 0x0112), (mr.to_owned(), 0x0119)];
    want_failed.sort();
    assert_eq!(failed, want_failed);

    // An instance whose encrypted file is gone from disk is not committed (processing failure),
    // even though its index row is there: the modality must keep its copy.
    let blob = scp
        .store
        .read_blocking(|c| hms_edge::dicom::index::find_instance(c, ct, None))
        .unwrap()
        .unwrap()
        .blob;
    std::fs::remove_file(scp.store.blobs().path_of(&blob)).unwrap();
    let r = commit(scp.port, "2.25.1003", &[(CT_IMAGE_STORAGE, ct), (MR_IMAGE_STORAGE, mr)]);
    assert_eq!(r["event_type"], 2, "{r}");
    assert_eq!(pairs(&r["committed"]), vec![(MR_IMAGE_STORAGE.to_owned(), mr.to_owned())]);
    assert_eq!(r["failed"][0][1], ct);
    assert_eq!(r["failed"][0][2], 0x0110);

    // Each request is an audit event naming the transaction and the outcome (queued right after
    // the answer, like query events: poll briefly).
    let events = || -> Vec<(String, String)> {
        scp.store
            .read_blocking(|c| {
                let mut s = c.prepare(
                    "SELECT entity, outcome FROM audit_events WHERE action = 'dicom-commit'
                     ORDER BY seq",
                )?;
                let rows = s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .unwrap()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while events().len() < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let events = events();
    assert_eq!(events.len(), 3, "{events:?}");
    assert!(events[1].0.contains("2.25.1002") && events[1].1.contains("1 committed, 2 failed"));
}

/// A requester whose `dicom.peers` entry asks for reports on a new association releases right
/// after the N-ACTION-RSP; we open an association to its address and port (proposing the SCP role
/// of Storage Commitment) and deliver the N-EVENT-REPORT there.
#[test]
fn commitment_report_on_a_new_association_when_the_peer_asks_for_it() {
    let report_port = hms_edge_tests::free_port();
    let mut peer = hms_edge::config::DicomPeer::new("COMMIT_SCU", "127.0.0.1");
    peer.port = Some(report_port);
    peer.commitment_new_association = true;
    let config = hms_edge::config::DicomConfig { peers: vec![peer], ..Default::default() };
    let scp = Scp::start_with(config, None);
    let files = testfiles(&["CT_small.dcm"]);
    assert_eq!(storescu(scp.port, &files).len(), 1);
    let ct = info(&files)[0]["sop_instance"].as_str().unwrap().to_owned();
    let r = commit_with(
        scp.port,
        "2.25.2001",
        &[(CT_IMAGE_STORAGE, &ct), (CT_IMAGE_STORAGE, "1.2.3.999")],
        1,
        Some(report_port),
    );
    assert_eq!(r["action_status"], 0, "{r}");
    assert_eq!(r["event_type"], 2, "{r}");
    assert_eq!(r["same_association"], false, "{r}");
    assert_eq!(r["transaction_uid"], "2.25.2001");
    assert_eq!(pairs(&r["committed"]), vec![(CT_IMAGE_STORAGE.to_owned(), ct)]);
    assert_eq!(r["failed"][0][2], 0x0112, "{r}");
}
