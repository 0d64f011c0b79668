//! Modality Worklist and MPPS served from the FHIR cache, with no upstream configured (offline):
//! orders written through the FHIR API come back to DCMTK `findscu -W` with the documented
//! mapping and matching; pynetdicom MPPS N-CREATE / N-SET update the order and create a
//! Procedure through the FHIR write path (versioned, so the agent syncs them), with the standard
//! error statuses and nothing changed by a refused request.

mod dicom_common;

use dicom_common::*;
use hms_edge_tests::{DaemonOptions, DaemonProc, fhir_client};
use serde_json::{Value, json};

const SYSTEM: &str = "urn:hms-edge:dev-site:patient-id";
const DCM: &str = "http://dicom.nema.org/resources/ontology/DCM";

fn post(c: &reqwest::blocking::Client, base: &str, rtype: &str, body: Value) -> String {
    let r = c
        .post(format!("{base}/{rtype}"))
        .header("content-type", "application/fhir+json")
        .body(body.to_string())
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    r.json::<Value>().unwrap()["id"].as_str().unwrap().to_owned()
}

fn get(c: &reqwest::blocking::Client, url: &str) -> Value {
    c.get(url).send().unwrap().json().unwrap()
}

/// `findscu -W` with these keys; returns stdout+stderr and the number of pending responses.
fn worklist(port: u16, keys: &[&str]) -> (String, usize) {
    let mut cmd = dcmtk("findscu");
    cmd.args(["-v", "-W", "-aec", AE]);
    for k in keys {
        cmd.args(["-k", k]);
    }
    let out = run(cmd.args(["127.0.0.1", &port.to_string()]));
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert!(text.contains("Final Find Response (Success)"), "{text}");
    let n = text.matches("(Pending)").count();
    (text, n)
}

const RETURN_KEYS: &[&str] = &[
    "0008,0050",
    "0010,0010",
    "0010,0020",
    "0010,0030",
    "0010,0040",
    "0020,000D",
    "0032,1060",
    "0040,1001",
    "0040,0100[0].0040,0001",
    "0040,0100[0].0040,0003",
    "0040,0100[0].0040,0006",
    "0040,0100[0].0040,0009",
];

#[test]
fn worklist_and_mpps_from_the_fhir_cache() {
    let work = tempfile::tempdir().unwrap();
    let d = DaemonProc::start(
        work.path(),
        &DaemonOptions { explicit_state_dir: true, ..Default::default() },
    );
    let c = fhir_client(&d.state_dir().join("tls/cert.pem"));
    let base = d.fhir_base();
    let port = d.dicom.port();

    let pid = post(
        &c,
        &base,
        "Patient",
        json!({"resourceType": "Patient",
            "identifier": [{"system": "urn:other", "value": "NOPE"}, {"system": SYSTEM, "value": "MRN4711"}],
            "name": [{"use": "official", "family": "Doe", "given": ["John"]}],
            "birthDate": "1970-01-02", "gender": "male"}),
    );
    let order = |acc: &str, modality: &str, ae: &str, when: &str, status: &str| {
        json!({"resourceType": "ServiceRequest", "status": status, "intent": "order",
            "identifier": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]}, "value": acc}],
            "category": [{"coding": [{"system": DCM, "code": modality}]}],
            "code": {"text": format!("{modality} examination")},
            "subject": {"reference": format!("Patient/{pid}")},
            "occurrenceDateTime": when,
            "performer": [{"display": "Roe^Jane"}],
            "extension": [{"url": "urn:hms-edge:scheduled-station-ae", "valueString": ae}]})
    };
    let sr = post(
        &c,
        &base,
        "ServiceRequest",
        order("ACC100", "CT", "CT1", "2026-11-30T09:30:00+01:00", "active"),
    );
    post(
        &c,
        &base,
        "ServiceRequest",
        order("ACC200", "MR", "MR1", "2026-12-05T14:00:00+01:00", "active"),
    );
    post(
        &c,
        &base,
        "ServiceRequest",
        order("ACC300", "CT", "CT1", "2026-11-30T11:00:00+01:00", "on-hold"),
    );

    // CT on the 30th/1st at station CT1: exactly the active CT order, every field mapped.
    let mut keys: Vec<&str> = RETURN_KEYS.to_vec();
    keys.extend([
        "0040,0100[0].0008,0060=CT",
        "0040,0100[0].0040,0002=20261130-20261201",
        "0040,0100[0].0040,0001=CT1",
    ]);
    let (text, n) = worklist(port, &keys);
    assert_eq!(n, 1, "{text}");
    for want in [
        "ACC100",
        "Doe^John",
        "MRN4711",
        "19700102",
        "CT examination",
        "CT1",
        "093000",
        "Roe^Jane",
        "20261130",
    ] {
        assert!(text.contains(want), "{want} missing:\n{text}");
    }
    assert!(!text.contains("NOPE") && !text.contains("ACC300"), "{text}");
    let study_uid = text
        .lines()
        .find(|l| l.contains("(0020,000d)") && l.contains(" UI ["))
        .and_then(|l| l.split('[').nth(1))
        .and_then(|v| v.split(']').next())
        .unwrap_or_else(|| panic!("no Study Instance UID:\n{text}"))
        .trim_end_matches(['\0', ' '])
        .to_owned();
    assert!(study_uid.starts_with("2.25."), "{study_uid}");

    // Universal matching: both active orders; open-ended ranges; wildcard names.
    assert_eq!(worklist(port, &["0008,0050", "0040,0100[0].0008,0060"]).1, 2);
    assert_eq!(worklist(port, &["0008,0050", "0040,0100[0].0040,0002=-20261130"]).1, 1);
    assert_eq!(worklist(port, &["0008,0050", "0040,0100[0].0040,0002=20261201-"]).1, 1);
    assert_eq!(worklist(port, &["0008,0050", "0010,0010=doe*", "0010,0020=MRN4711"]).1, 2);
    assert_eq!(worklist(port, &["0008,0050=ACC200", "0040,0100[0].0008,0060"]).1, 1);
    // Non-matching modality, date, station AE, patient: nothing.
    for k in [
        "0040,0100[0].0008,0060=US",
        "0040,0100[0].0040,0002=20261201-20261202",
        "0040,0100[0].0040,0001=CT9",
        "0040,0100[0].0040,0001=MR1",
    ] {
        let mut keys = vec!["0008,0050", k];
        if k.ends_with("MR1") {
            keys.push("0040,0100[0].0008,0060=CT");
        }
        assert_eq!(worklist(port, &keys).1, 0, "{k}");
    }
    assert_eq!(worklist(port, &["0008,0050", "0010,0020=OTHER"]).1, 0);

    // MPPS: N-CREATE IN PROGRESS, then N-SET COMPLETED.
    let p = port.to_string();
    let mpps_uid = "1.2.826.0.1.3680043.8.498.4711";
    let v = peer(&["mpps-create", "127.0.0.1", &p, AE, mpps_uid, "ACC100", &study_uid, "MRN4711"]);
    assert_eq!(v["status"], 0, "{v}\n{}", d.log_text());
    let proc_url = format!("{base}/Procedure/{mpps_uid}");
    let pr = get(&c, &proc_url);
    assert_eq!(pr["status"], "in-progress", "{pr}");
    assert_eq!(pr["basedOn"][0]["reference"], format!("ServiceRequest/{sr}"));
    assert_eq!(pr["subject"]["reference"], format!("Patient/{pid}"));
    assert_eq!(pr["performedPeriod"]["start"], "2026-11-30T09:30:00+01:00");
    assert!(
        pr["identifier"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["value"] == format!("urn:oid:{study_uid}")),
        "{pr}"
    );
    assert_eq!(get(&c, &format!("{base}/ServiceRequest/{sr}"))["status"], "active");
    // A second N-CREATE of the same step is a duplicate.
    let v = peer(&["mpps-create", "127.0.0.1", &p, AE, mpps_uid, "ACC100", &study_uid, "MRN4711"]);
    assert_eq!(v["status"], 0x0111, "{v}");

    let v = peer(&["mpps-set", "127.0.0.1", &p, AE, mpps_uid, "COMPLETED"]);
    assert_eq!(v["status"], 0, "{v}\n{}", d.log_text());
    let pr = get(&c, &proc_url);
    assert_eq!(pr["status"], "completed", "{pr}");
    assert_eq!(pr["performedPeriod"]["end"], "2026-11-30T10:15:00+01:00");
    let order_now = get(&c, &format!("{base}/ServiceRequest/{sr}"));
    assert_eq!(order_now["status"], "completed", "{order_now}");
    let by_order = get(&c, &format!("{base}/Procedure?based-on=ServiceRequest/{sr}"));
    assert_eq!(by_order["total"], 1, "{by_order}");
    // Written as versions (history, hence the outbox the agent drains).
    let h = get(&c, &format!("{base}/Procedure/{mpps_uid}/_history"));
    assert_eq!(h["entry"].as_array().unwrap().len(), 2, "{h}");
    let h = get(&c, &format!("{base}/ServiceRequest/{sr}/_history"));
    assert_eq!(h["entry"].as_array().unwrap().len(), 2, "{h}");
    // The completed order left the worklist.
    assert_eq!(worklist(port, &["0008,0050=ACC100"]).1, 0);

    // Unknown step → 0112; a finished step cannot be updated (0110) and nothing changes.
    let v = peer(&["mpps-set", "127.0.0.1", &p, AE, "1.2.3.999", "COMPLETED"]);
    assert_eq!(v["status"], 0x0112, "{v}");
    let v = peer(&["mpps-set", "127.0.0.1", &p, AE, mpps_uid, "DISCONTINUED"]);
    assert_eq!(v["status"], 0x0110, "{v}");
    assert_eq!(get(&c, &proc_url)["meta"]["versionId"], "2");
    assert_eq!(get(&c, &format!("{base}/ServiceRequest/{sr}"))["meta"]["versionId"], "2");
    let v = peer(&["mpps-set", "127.0.0.1", &p, AE, mpps_uid, "PAUSED"]);
    assert_eq!(v["status"], 0x0110, "{v}");

    // The modality's images (the worklist's Study Instance UID and accession): their
    // ImagingStudy is basedOn the order and points to the MPPS Procedure.
    let file = testfiles(&["CT_small.dcm"]).remove(0);
    let copy = work.path().join("ct.dcm");
    std::fs::copy(&file, &copy).unwrap();
    let out = run(dcmtk("dcmodify")
        .args(["-nb", "-m", &format!("(0020,000D)={study_uid}"), "-m", "(0008,0050)=ACC100"])
        .arg(&copy));
    assert!(out.status.success(), "dcmodify: {}", String::from_utf8_lossy(&out.stderr));
    let out = run(dcmtk("storescu").args(["-aec", AE, "127.0.0.1", &p]).arg(&copy));
    assert!(out.status.success(), "storescu: {}", String::from_utf8_lossy(&out.stderr));
    let url = format!("{base}/ImagingStudy?identifier=urn:dicom:uid|urn:oid:{study_uid}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let study = loop {
        let b = get(&c, &url);
        if b["total"] == 1 || std::time::Instant::now() > deadline {
            break b["entry"][0]["resource"].clone();
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(study["basedOn"][0]["reference"], format!("ServiceRequest/{sr}"), "{study}");
    assert_eq!(
        study["procedureReference"]["reference"],
        format!("Procedure/{mpps_uid}"),
        "{study}"
    );

    // An order without a time of its own is scheduled by its Appointment.
    let mut timeless = order("ACC400", "MR", "MR2", "", "active");
    timeless.as_object_mut().unwrap().remove("occurrenceDateTime");
    let sr2 = post(&c, &base, "ServiceRequest", timeless);
    post(
        &c,
        &base,
        "Appointment",
        json!({"resourceType": "Appointment", "status": "booked",
            "start": "2026-12-07T08:15:00+01:00", "end": "2026-12-07T08:45:00+01:00",
            "basedOn": [{"reference": format!("ServiceRequest/{sr2}")}],
            "participant": [{"status": "accepted", "actor": {"reference": format!("Patient/{pid}")}}]}),
    );
    let (text, n) = worklist(
        port,
        &["0008,0050=ACC400", "0040,0100[0].0040,0002=20261207", "0040,0100[0].0040,0003"],
    );
    assert_eq!(n, 1, "{text}");
    assert!(text.contains("081500"), "{text}");

    // Worklist queries and MPPS updates are in the audit trail.
    let audit = get(&c, &format!("{base}/AuditEvent?_count=500"));
    let text = audit.to_string();
    assert!(text.contains("dicom-worklist?MWL"), "{text}");
    assert!(text.contains(&format!("dicom-mpps:{mpps_uid}")), "{text}");

    let (status, _, log) = d.stop();
    assert!(status.success(), "{log}");
}

/// `dicom.max_find_results` caps the worklist (A700), and a C-CANCEL stops it (FE00).
#[test]
fn worklist_is_capped_and_cancellable() {
    use hms_edge::dicom::dimse::{Command, field, tag};
    const MWL: &str = "1.2.840.10008.5.1.4.31";
    let work = tempfile::tempdir().unwrap();
    let mut opts = DaemonOptions { explicit_state_dir: true, ..Default::default() };
    opts.env.insert("HMS_EDGE_DICOM_MAX_FIND_RESULTS".into(), "4".into());
    let d = DaemonProc::start(work.path(), &opts);
    let c = fhir_client(&d.state_dir().join("tls/cert.pem"));
    let base = d.fhir_base();
    let pid =
        post(&c, &base, "Patient", json!({"resourceType": "Patient", "name": [{"family": "Roe"}]}));
    for (i, m) in ["CT", "CT", "CT", "CT", "MR"].iter().enumerate() {
        post(
            &c,
            &base,
            "ServiceRequest",
            json!({"resourceType": "ServiceRequest", "status": "active", "intent": "order",
                "identifier": [{"system": "urn:hms-edge:accession", "value": format!("A{i}")}],
                "category": [{"coding": [{"system": DCM, "code": m}]}],
                "subject": {"reference": format!("Patient/{pid}")}}),
        );
    }
    // Implicit VR LE identifiers: AccessionNumber universal, and optionally SPS Modality = CT.
    let accession = [0x08, 0x00, 0x50, 0x00, 0, 0, 0, 0];
    let mut ct_only = accession.to_vec();
    ct_only.extend_from_slice(&[0x40, 0x00, 0x00, 0x01, 18, 0, 0, 0]); // (0040,0100) SQ
    ct_only.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 10, 0, 0, 0]); // item
    ct_only.extend_from_slice(&[0x08, 0x00, 0x60, 0x00, 2, 0, 0, 0, b'C', b'T']);
    let ask = |ident: &[u8], cancel: bool| -> (usize, Option<u16>) {
        let mut raw = RawClient::associate(d.dicom.port(), "RAW", &[(MWL, IMPLICIT_LE)]);
        let mut rq = Command::new();
        rq.set_u16(tag::COMMAND_FIELD, field::C_FIND_RQ)
            .set_u16(tag::MESSAGE_ID, 9)
            .set_u16(tag::PRIORITY, 0)
            .set_u16(tag::COMMAND_DATA_SET_TYPE, 0)
            .set_uid(tag::AFFECTED_SOP_CLASS_UID, MWL);
        let mut wire = Vec::new();
        hms_edge::dicom::pdu::encode_pdata(&mut wire, 1, true, &rq.encode(), 0);
        hms_edge::dicom::pdu::encode_pdata(&mut wire, 1, false, ident, 0);
        if cancel {
            let mut cn = Command::new();
            cn.set_u16(tag::COMMAND_FIELD, field::C_CANCEL_RQ)
                .set_u16(tag::MESSAGE_ID_BEING_RESPONDED_TO, 9)
                .set_u16(tag::COMMAND_DATA_SET_TYPE, 0x0101);
            hms_edge::dicom::pdu::encode_pdata(&mut wire, 1, true, &cn.encode(), 0);
        }
        raw.send(&wire);
        let mut pending = 0;
        loop {
            let rsp = raw.read_command().expect("C-FIND-RSP");
            match rsp.u16(tag::STATUS) {
                Some(0xFF00) => pending += 1,
                other => return (pending, other),
            }
        }
    };
    assert_eq!(ask(&ct_only, false), (4, Some(0x0000)));
    assert_eq!(ask(&accession, false), (0, Some(0xA700)));
    let (pending, st) = ask(&ct_only, true);
    assert_eq!(st, Some(0xFE00));
    assert!(pending < 4, "{pending} items sent despite the cancel");
    let (status, _, log) = d.stop();
    assert!(status.success(), "{log}");
}
