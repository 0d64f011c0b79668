//! Study Root C-FIND against real SCUs: STUDY / SERIES / IMAGE levels, wildcards, date ranges,
//! UID lists, universal matching, case-insensitive names, C-CANCEL.

mod dicom_common;

use std::collections::BTreeSet;

use dicom_common::*;
use serde_json::Value;

const FILES: &[&str] = &[
    "CT_small.dcm",
    "US1_UNCR.dcm",
    "liver.dcm",
    "test-SR.dcm",
    "JPEG-LL.dcm",
    "emri_small.dcm",
    "MR2_J2KI.dcm",
];

struct Fixture {
    scp: Scp,
    facts: Vec<Value>,
}

fn fixture() -> Fixture {
    let scp = Scp::start();
    let files = testfiles(FILES);
    let facts = info(&files);
    let port = scp.port.to_string();
    let mut args = vec!["store", "127.0.0.1", &port, AE];
    let paths: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    args.extend(paths.iter().map(String::as_str));
    for r in peer(&args).as_array().unwrap() {
        assert_eq!(r["status"], 0, "{r}");
    }
    Fixture { scp, facts }
}

impl Fixture {
    fn find(&self, level: &str, keys: &[&str]) -> Vec<Value> {
        let port = self.scp.port.to_string();
        let mut args = vec!["find", "127.0.0.1", &port, AE, level];
        args.extend_from_slice(keys);
        let v = peer(&args);
        assert_eq!(v["status"], 0, "{v}");
        v["matches"].as_array().unwrap().clone()
    }

    fn studies_where(&self, pred: impl Fn(&Value) -> bool) -> BTreeSet<String> {
        self.facts
            .iter()
            .filter(|f| pred(f))
            .map(|f| f["study"].as_str().unwrap().to_owned())
            .collect()
    }
}

fn set_of(matches: &[Value], key: &str) -> BTreeSet<String> {
    matches.iter().map(|m| m[key].as_str().unwrap_or_default().to_owned()).collect()
}

#[test]
fn study_level_matching() {
    let fx = fixture();
    let all = fx.studies_where(|_| true);

    // Universal matching: every study once, with the requested attributes filled in.
    let m = fx.find(
        "STUDY",
        &[
            "StudyInstanceUID=",
            "PatientName=",
            "ModalitiesInStudy=",
            "NumberOfStudyRelatedInstances=",
        ],
    );
    assert_eq!(set_of(&m, "StudyInstanceUID"), all);
    assert_eq!(m.len(), all.len(), "each study once");
    let ct = fx.facts.iter().find(|f| f["modality"] == "CT").unwrap();
    let ct_row = m.iter().find(|r| r["StudyInstanceUID"] == ct["study"]).unwrap();
    assert!(
        ct_row["ModalitiesInStudy"].as_str().unwrap().split('\\').any(|x| x == "CT"),
        "{ct_row}"
    );
    assert_eq!(ct_row["PatientName"], ct["patient_name"]);

    // Wildcards, case-insensitive Patient's Name.
    let m = fx.find("STUDY", &["PatientName=compressedsamples*", "StudyInstanceUID="]);
    let expected = fx.studies_where(|f| {
        f["patient_name"].as_str().unwrap().to_lowercase().starts_with("compressedsamples")
    });
    assert!(!expected.is_empty());
    assert_eq!(set_of(&m, "StudyInstanceUID"), expected);
    let m = fx.find("STUDY", &["PatientName=COMPRESSEDSAMPLES^C?1", "StudyInstanceUID="]);
    assert_eq!(
        set_of(&m, "StudyInstanceUID"),
        BTreeSet::from([ct["study"].as_str().unwrap().to_owned()])
    );

    // Date range, open ranges, single date.
    let in_2004 = |f: &Value| f["study_date"].as_str().unwrap().starts_with("2004");
    let m = fx.find("STUDY", &["StudyDate=20040101-20041231", "StudyInstanceUID="]);
    assert_eq!(set_of(&m, "StudyInstanceUID"), fx.studies_where(in_2004));
    let m = fx.find("STUDY", &["StudyDate=-20031231", "StudyInstanceUID="]);
    assert_eq!(
        set_of(&m, "StudyInstanceUID"),
        fx.studies_where(|f| {
            let d = f["study_date"].as_str().unwrap();
            !d.is_empty() && d <= "20031231"
        })
    );
    let m = fx.find("STUDY", &["StudyDate=20040119", "StudyInstanceUID="]);
    assert_eq!(set_of(&m, "StudyInstanceUID"), fx.studies_where(|f| f["study_date"] == "20040119"));

    // List of UIDs.
    let two: Vec<&String> = all.iter().take(2).collect();
    let list = format!("StudyInstanceUID={}\\{}", two[0], two[1]);
    let m = fx.find("STUDY", &[&list]);
    assert_eq!(set_of(&m, "StudyInstanceUID"), two.into_iter().cloned().collect());

    // Single value on Patient ID; no match.
    let m = fx.find("STUDY", &["PatientID=1CT1", "StudyInstanceUID="]);
    assert_eq!(set_of(&m, "StudyInstanceUID"), fx.studies_where(|f| f["patient_id"] == "1CT1"));
    assert!(fx.find("STUDY", &["PatientID=NOBODY", "StudyInstanceUID="]).is_empty());
}

#[test]
fn series_and_image_levels() {
    let fx = fixture();
    for f in &fx.facts {
        let study = format!("StudyInstanceUID={}", f["study"].as_str().unwrap());
        let m = fx.find("SERIES", &[&study, "SeriesInstanceUID=", "Modality="]);
        let row = m
            .iter()
            .find(|r| r["SeriesInstanceUID"] == f["series"])
            .unwrap_or_else(|| panic!("{f}: {m:?}"));
        assert_eq!(row["Modality"], f["modality"]);
        let series = format!("SeriesInstanceUID={}", f["series"].as_str().unwrap());
        let m = fx.find("IMAGE", &[&study, &series, "SOPInstanceUID=", "SOPClassUID="]);
        let row = m.iter().find(|r| r["SOPInstanceUID"] == f["sop_instance"]).unwrap();
        assert_eq!(row["SOPClassUID"], f["sop_class"]);
    }
    // Modality with a list of values at SERIES level.
    let m = fx.find("SERIES", &["Modality=CT\\SEG", "SeriesInstanceUID="]);
    let expected: BTreeSet<String> = fx
        .facts
        .iter()
        .filter(|f| f["modality"] == "CT" || f["modality"] == "SEG")
        .map(|f| f["series"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(set_of(&m, "SeriesInstanceUID"), expected);
    // IMAGE level by SOP Instance UID alone.
    let sop = fx.facts[0]["sop_instance"].as_str().unwrap();
    let m = fx.find("IMAGE", &[&format!("SOPInstanceUID={sop}")]);
    assert_eq!(m.len(), 1);
}

#[test]
fn dcmtk_findscu_gets_matches() {
    let fx = fixture();
    let ct = fx.facts.iter().find(|f| f["modality"] == "CT").unwrap();
    let out = run(dcmtk("findscu").args([
        "-v",
        "-S",
        "-aec",
        AE,
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        "PatientID=1CT1",
        "-k",
        "StudyInstanceUID",
        "-k",
        "PatientName",
        "127.0.0.1",
        &fx.scp.port.to_string(),
    ]));
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert!(text.contains(ct["study"].as_str().unwrap()), "{text}");
    assert!(text.contains("CompressedSamples^CT1"), "{text}");
    assert!(text.contains("Find Response: 1 (Pending)"), "{text}");
    assert!(!text.contains("Find Response: 2"), "exactly one match: {text}");
    assert!(text.contains("Final Find Response (Success)"), "{text}");
}

#[test]
fn unsupported_level_and_cancel() {
    let fx = fixture();
    let port = fx.scp.port.to_string();
    let v = peer(&["find", "127.0.0.1", &port, AE, "PATIENT", "PatientID="]);
    assert_eq!(v["status"], 0xA900, "{v}");
    // C-CANCEL sent right behind the C-FIND (one write): the SCP stops and answers Cancel.
    use hms_edge::dicom::dimse::{Command, field, tag};
    const FIND: &str = "1.2.840.10008.5.1.4.1.2.2.1";
    let mut c = RawClient::associate(fx.scp.port, "RAW", &[(FIND, IMPLICIT_LE)]);
    let mut rq = Command::new();
    rq.set_u16(tag::COMMAND_FIELD, field::C_FIND_RQ)
        .set_u16(tag::MESSAGE_ID, 77)
        .set_u16(tag::PRIORITY, 0)
        .set_u16(tag::COMMAND_DATA_SET_TYPE, 0)
        .set_uid(tag::AFFECTED_SOP_CLASS_UID, FIND);
    // Identifier, implicit VR LE: QueryRetrieveLevel=IMAGE, SOPInstanceUID universal.
    let mut ident = vec![0x08, 0x00, 0x52, 0x00, 6, 0, 0, 0];
    ident.extend_from_slice(b"IMAGE ");
    ident.extend_from_slice(&[0x08, 0x00, 0x18, 0x00, 0, 0, 0, 0]);
    let mut cancel = Command::new();
    cancel
        .set_u16(tag::COMMAND_FIELD, field::C_CANCEL_RQ)
        .set_u16(tag::MESSAGE_ID_BEING_RESPONDED_TO, 77)
        .set_u16(tag::COMMAND_DATA_SET_TYPE, 0x0101);
    let mut wire = Vec::new();
    hms_edge::dicom::pdu::encode_pdata(&mut wire, 1, true, &rq.encode(), 0);
    hms_edge::dicom::pdu::encode_pdata(&mut wire, 1, false, &ident, 0);
    hms_edge::dicom::pdu::encode_pdata(&mut wire, 1, true, &cancel.encode(), 0);
    c.send(&wire);
    let mut pending = 0;
    let final_status = loop {
        let rsp = c.read_command().expect("C-FIND-RSP");
        assert_eq!(rsp.u16(tag::MESSAGE_ID_BEING_RESPONDED_TO), Some(77));
        match rsp.u16(tag::STATUS) {
            Some(0xFF00) => pending += 1,
            other => break other,
        }
    };
    assert_eq!(final_status, Some(0xFE00));
    assert!(pending < FILES.len(), "{pending} matches sent despite the cancel");
}
