//! The audit trail as auditors see it (issue 7, item 1), end to end with the real binaries:
//! DICOM store (DCMTK storescu), find (findscu) and export (`hms-edge dicom export`), FHIR reads
//! and writes, and admin actions are each an audit event; `/fhir/AuditEvent` serves them as IHE
//! BALP-style AuditEvent resources (search by patient, type, date; stable paging; read-only);
//! `hms-edge audit export` writes them as NDJSON and is audited itself; `hms-edge audit check`
//! still verifies the integrity log with events appended by the command-line tools.

mod dicom_common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use dicom_common::*;
use hms_edge_tests::{DaemonOptions, DaemonProc, bin, fhir_client, free_port};
use serde_json::{Value, json};

fn cli(work: &Path, args: &[&str]) -> Output {
    Command::new(bin("hms-edge"))
        .current_dir(work)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HMS_EDGE_PATHS_STATE_DIR", work.join("state"))
        .args(args)
        .output()
        .expect("run hms-edge")
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

struct Fx {
    d: DaemonProc,
    c: reqwest::blocking::Client,
    base: String,
}

impl Fx {
    fn get(&self, path: &str) -> (u16, Value) {
        let r = self.c.get(format!("{}/{path}", self.base)).send().unwrap();
        let status = r.status().as_u16();
        (status, r.json().unwrap_or(Value::Null))
    }

    fn search(&self, query: &str) -> Vec<Value> {
        let (s, b) = self.get(&format!("AuditEvent?{query}"));
        assert_eq!(s, 200, "{b}");
        b["entry"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|e| e["resource"].clone())
            .collect()
    }

    /// Audit events of reads are written shortly after the answer: wait until `query` finds
    /// at least `n`.
    fn wait_for(&self, query: &str, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let found = self.search(query);
            if found.len() >= n || Instant::now() > deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn start(work: &Path) -> (Fx, u16) {
    let port = free_port();
    let mut opts = DaemonOptions { explicit_state_dir: true, ..Default::default() };
    opts.env.insert("HMS_EDGE_DICOM_LISTEN".into(), format!("127.0.0.1:{port}"));
    let d = DaemonProc::start(work, &opts);
    let c = fhir_client(&d.state_dir().join("tls/cert.pem"));
    let base = d.fhir_base();
    (Fx { d, c, base }, port)
}

fn extension<'a>(ev: &'a Value, url: &str) -> Option<&'a Value> {
    ev["extension"].as_array()?.iter().find(|e| e["url"] == url)
}

fn action_of(ev: &Value) -> &str {
    extension(ev, "urn:hms-edge:audit-action").and_then(|e| e["valueCode"].as_str()).unwrap_or("")
}

#[test]
fn dicom_fhir_and_admin_accesses_are_audit_events() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    let (fx, port) = start(work);

    // DICOM: two instances stored by a real modality, one sent twice (identical: still audited).
    let files = testfiles(&["CT_small.dcm", "MR_small.dcm"]);
    let facts = info(&files);
    assert_eq!(storescu(port, &files).len(), 2);
    assert_eq!(storescu(port, &files[..1]).len(), 1);
    let ct_sop = facts[0]["sop_instance"].as_str().unwrap().to_owned();
    let stores = fx.search("subtype=dicom-store&_count=100");
    assert_eq!(stores.len(), 3, "{stores:#?}");
    let ct_events: Vec<&Value> = stores
        .iter()
        .filter(|e| e["entity"][0]["what"]["identifier"]["value"] == format!("urn:oid:{ct_sop}"))
        .collect();
    assert_eq!(ct_events.len(), 2, "{stores:#?}");
    for e in &stores {
        assert_eq!(e["resourceType"], "AuditEvent");
        assert_eq!(e["type"]["code"], "110104", "DICOM Instances Transferred");
        assert_eq!(e["action"], "C");
        assert_eq!(e["outcome"], "0");
        assert_eq!(e["agent"][0]["who"]["display"], format!("dicom:{}", "STORESCU"));
        assert_eq!(e["agent"][0]["network"]["address"], "127.0.0.1");
        assert_eq!(e["agent"][0]["requestor"], true);
    }
    assert!(
        ct_events.iter().any(|e| e["outcomeDesc"].as_str().unwrap().contains("identical")),
        "{ct_events:#?}"
    );

    // DICOM query by a real findscu.
    let out = run(dcmtk("findscu").args([
        "-S",
        "-aet",
        "WARD-VIEWER",
        "-aec",
        AE,
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        &format!("PatientID={}", facts[0]["patient_id"].as_str().unwrap()),
        "-k",
        "StudyInstanceUID",
        "127.0.0.1",
        &port.to_string(),
    ]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let finds = fx.wait_for("subtype=dicom-find", 1);
    assert_eq!(finds.len(), 1, "{finds:#?}");
    assert_eq!(finds[0]["type"]["code"], "110112", "Query");
    assert_eq!(finds[0]["agent"][0]["who"]["display"], "dicom:WARD-VIEWER");
    let q = finds[0]["entity"][0]["description"].as_str().unwrap();
    assert!(q.contains(facts[0]["patient_id"].as_str().unwrap()), "{q}");
    assert!(finds[0]["outcomeDesc"].as_str().unwrap().contains("1 match"), "{}", finds[0]);

    // DICOM export by site IT with the command-line tool, while the daemon runs.
    let dest = work.join("out.dcm");
    let out = cli(work, &["dicom", "export", &ct_sop, dest.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    // (Byte identity of exports is dicom_store's subject; here: the export happened.)
    assert!(std::fs::metadata(&dest).unwrap().len() > 1000);
    let exports = fx.search("subtype=dicom-export");
    assert_eq!(exports.len(), 1, "{exports:#?}");
    assert!(exports[0]["agent"][0]["who"]["display"].as_str().unwrap().starts_with("os-user:"));
    assert_eq!(exports[0]["action"], "R");

    // FHIR: a write and a read of one patient, then a read of someone unknown.
    let r =
        fx.c.put(format!("{}/Patient/aud1", fx.base))
            .header("content-type", "application/fhir+json")
            .body(
                json!({"resourceType": "Patient", "id": "aud1", "name": [{"family": "Audit"}]})
                    .to_string(),
            )
            .send()
            .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(fx.get("Patient/aud1").0, 200);
    assert_eq!(fx.get("Patient/nobody").0, 404);
    let about = fx.wait_for("patient=Patient/aud1", 2);
    let kinds: BTreeSet<&str> = about.iter().map(action_of).collect();
    assert_eq!(kinds, BTreeSet::from(["create", "read"]), "{about:#?}");
    for e in &about {
        let patient = e["entity"].as_array().unwrap().iter().find(|x| x["role"]["code"] == "1");
        assert_eq!(patient.unwrap()["what"]["reference"], "Patient/aud1", "{e}");
        assert_eq!(e["type"]["code"], "rest");
    }
    let refused = fx.wait_for("entity=Patient/nobody", 1);
    assert_eq!(refused[0]["outcome"], "4", "a 404 is a minor failure: {}", refused[0]);
    // Reads (R) only, by date: today is in range, last year is not.
    let today = &about[0]["recorded"].as_str().unwrap()[..10];
    assert!(fx.search(&format!("action=R&date={today}")).iter().all(|e| e["action"] == "R"));
    assert!(!fx.search(&format!("action=R&date={today}")).is_empty());
    assert!(fx.search("date=lt2020-01-01").is_empty());

    // Read and vread by id; the resource is the same one search returned.
    let id = about[0]["id"].as_str().unwrap();
    let (s, one) = fx.get(&format!("AuditEvent/{id}"));
    assert_eq!(s, 200);
    assert_eq!(one, about[0]);
    assert_eq!(fx.get(&format!("AuditEvent/{id}/_history/1")).0, 200);
    assert_eq!(fx.get(&format!("AuditEvent/{id}/_history/2")).0, 404);
    assert_eq!(fx.get("AuditEvent/999999999").0, 404);
    assert_eq!(fx.get("AuditEvent/not-a-number").0, 404);

    // Read-only: nobody writes the trail through the API.
    let r =
        fx.c.post(format!("{}/AuditEvent", fx.base))
            .header("content-type", "application/fhir+json")
            .body(json!({"resourceType": "AuditEvent"}).to_string())
            .send()
            .unwrap();
    assert_eq!(r.status(), 405);
    let r = fx.c.delete(format!("{}/AuditEvent/{id}", fx.base)).send().unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(fx.get(&format!("AuditEvent/{id}")).0, 200);
    // Unknown parameters: refused under strict handling, ignored otherwise.
    let r =
        fx.c.get(format!("{}/AuditEvent?colour=blue", fx.base))
            .header("Prefer", "handling=strict")
            .send()
            .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(fx.get("AuditEvent?colour=blue&_count=1").0, 200);
    assert_eq!(fx.get("AuditEvent?date=yesterday").0, 400);

    // Paging newest first by sequence: new events appended between pages do not shift them.
    let (_, first) = fx.get("AuditEvent?_count=3");
    let mut seen: Vec<i64> = Vec::new();
    let mut page = first;
    let mut pages = 0;
    loop {
        for e in page["entry"].as_array().unwrap() {
            seen.push(e["resource"]["id"].as_str().unwrap().parse().unwrap());
        }
        pages += 1;
        // Each page fetch is itself audited: the trail grows while we page.
        let next = page["link"].as_array().unwrap().iter().find(|l| l["relation"] == "next");
        let Some(next) = next else { break };
        let url = next["url"].as_str().unwrap();
        let path = &url[url.find("/fhir/").unwrap() + 6..];
        page = fx.get(path).1;
    }
    assert!(pages > 3, "{pages} pages");
    assert!(seen.windows(2).all(|w| w[0] > w[1]), "not strictly newest first: {seen:?}");
    assert_eq!(seen.last(), Some(&1), "paging reaches the first event");
    let (_, counted) = fx.get("AuditEvent?_summary=count");
    assert!(counted["total"].as_u64().unwrap() as usize >= seen.len());

    // Export as NDJSON by site IT; the export is an audit event too.
    let nd = work.join("audit.ndjson");
    let out = cli(work, &["audit", "export", "--out", nd.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let lines: Vec<Value> = std::fs::read_to_string(&nd)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() >= seen.len(), "{} lines, {} seen", lines.len(), seen.len());
    assert!(lines.iter().all(|e| e["resourceType"] == "AuditEvent"));
    assert!(lines.iter().any(|e| action_of(e) == "dicom-export"));
    let ids: Vec<i64> = lines.iter().map(|e| e["id"].as_str().unwrap().parse().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "export is oldest first");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&nd).unwrap().permissions().mode() & 0o777, 0o600);
    let exported = fx.search("subtype=audit-export");
    assert_eq!(exported.len(), 1, "{exported:#?}");
    assert_eq!(exported[0]["type"]["code"], "110100", "Application Activity");

    // The events appended by the command-line tools are in the integrity log like the others.
    let (status, _, log) = fx.d.stop();
    assert!(status.success(), "{log}");
    let out = cli(work, &["audit", "check"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("OK"), "{}", text(&out));

    // Admin actions while stopped: backup then restore, each recorded.
    let bk = work.join("backup");
    let out = cli(work, &["backup", bk.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let out = cli(work, &["restore", bk.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let nd2 = work.join("audit2.ndjson");
    let out = cli(work, &["audit", "export", "--since", "2020", "--out", nd2.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let actions: Vec<String> = std::fs::read_to_string(&nd2)
        .unwrap()
        .lines()
        .map(|l| action_of(&serde_json::from_str::<Value>(l).unwrap()).to_owned())
        .collect();
    // The restored store holds every event up to the backup's snapshot, then the restore.
    assert!(actions.iter().any(|a| a == "restore"), "{actions:?}");
    let out = cli(work, &["audit", "check"]);
    assert!(out.status.success(), "{}", text(&out));

    // Rotating the master key is recorded too, and the trail still verifies under the new key.
    let out = cli(work, &["rotate-key"]);
    assert!(out.status.success(), "{}", text(&out));
    let nd3 = work.join("audit3.ndjson");
    let out = cli(work, &["audit", "export", "--out", nd3.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let events: Vec<Value> = std::fs::read_to_string(&nd3)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let rotated: Vec<&Value> = events.iter().filter(|e| action_of(e) == "rotate-key").collect();
    assert_eq!(rotated.len(), 1, "{events:#?}");
    let who = rotated[0]["agent"][0]["who"]["display"].as_str().unwrap_or_default();
    assert!(who.starts_with("os-user:"), "{:#}", rotated[0]);
    let out = cli(work, &["audit", "check"]);
    assert!(out.status.success(), "{}", text(&out));
}
