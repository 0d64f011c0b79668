//! Every study the DICOM receiver stores appears as a FHIR ImagingStudy, linked to the Patient
//! with the DICOM PatientID as identifier (or to a placeholder Patient made for it), updated as
//! instances arrive, and searchable by the ward workstations.

mod dicom_common;

use std::time::{Duration, Instant};

use dicom_common::*;
use hms_edge_tests::{DaemonOptions, DaemonProc, fhir_client};
use serde_json::{Value, json};

const SYSTEM: &str = "urn:hms-edge:dev-site:patient-id";

fn wait_for(c: &reqwest::blocking::Client, url: &str, want: usize) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let b: Value = c.get(url).send().unwrap().json().unwrap();
        if b["total"].as_u64() == Some(want as u64) || Instant::now() > deadline {
            return b;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn stored_studies_become_imaging_studies_linked_to_patients() {
    let work = tempfile::tempdir().unwrap();
    let d = DaemonProc::start(
        work.path(),
        &DaemonOptions { explicit_state_dir: true, ..Default::default() },
    );
    let c = fhir_client(&d.state_dir().join("tls/cert.pem"));
    let base = d.fhir_base();
    let files = testfiles(&["CT_small.dcm", "MR_small.dcm"]);
    let facts = info(&files);
    let (ct, mr) = (&facts[0], &facts[1]);
    assert_ne!(ct["patient_id"], mr["patient_id"]);

    // The CT's patient is already known to the ward (e.g. synced from the HIS).
    let known = json!({"resourceType": "Patient", "identifier": [{"system": SYSTEM, "value": ct["patient_id"]}], "name": [{"family": "Known"}]});
    let r = c
        .post(format!("{base}/Patient"))
        .header("content-type", "application/fhir+json")
        .body(known.to_string())
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    let pid = r.json::<Value>().unwrap()["id"].as_str().unwrap().to_owned();

    let port = d.dicom.port().to_string();
    for f in &files {
        let out = run(dcmtk("storescu").args(["-R", "-aec", AE, "127.0.0.1", &port]).arg(f));
        assert!(out.status.success(), "storescu: {}", String::from_utf8_lossy(&out.stderr));
    }

    let b = wait_for(&c, &format!("{base}/ImagingStudy?patient={pid}"), 1);
    assert_eq!(b["total"], 1, "{b}");
    let study = &b["entry"][0]["resource"];
    assert_eq!(study["numberOfInstances"], 1);
    assert_eq!(study["numberOfSeries"], 1);
    assert_eq!(study["modality"][0]["code"], "CT");
    assert_eq!(study["series"][0]["instance"][0]["uid"], ct["sop_instance"]);
    assert_eq!(
        study["identifier"][0]["value"],
        format!("urn:oid:{}", ct["study"].as_str().unwrap_or_default())
    );
    // The endpoint points at this box's DICOMweb base.
    let ep = study["endpoint"][0]["reference"].as_str().unwrap();
    let ep: Value = c.get(format!("{base}/{ep}")).send().unwrap().json().unwrap();
    assert!(ep["address"].as_str().unwrap().ends_with("/dicom-web"), "{ep}");

    // The MR's patient was unknown: a placeholder Patient carries the DICOM identity.
    let q = format!(
        "{base}/ImagingStudy?subject:Patient.identifier={SYSTEM}|{}",
        mr["patient_id"].as_str().unwrap()
    );
    let b = wait_for(&c, &q, 1);
    assert_eq!(b["total"], 1, "{b}");
    let subject = b["entry"][0]["resource"]["subject"]["reference"].as_str().unwrap().to_owned();
    let p: Value = c.get(format!("{base}/{subject}")).send().unwrap().json().unwrap();
    assert_eq!(p["meta"]["tag"][0]["code"], "placeholder-from-dicom");
    assert_eq!(p["identifier"][0]["value"], mr["patient_id"]);

    // Searchable like any resource (by date too), and changes reach the outbox for the agent.
    let all: Value =
        c.get(format!("{base}/ImagingStudy?started=ge1900-01-01")).send().unwrap().json().unwrap();
    assert_eq!(all["total"], 2, "{all}");
    let (status, _, log) = d.stop();
    assert!(status.success(), "{log}");
}
