//! C-ECHO and C-STORE against real peers: every sample object is stored, found by C-FIND and
//! exported with its data set unchanged; duplicates follow the configured policy.

mod dicom_common;

use dicom_common::*;
use hms_edge::config::{DicomConfig, DuplicatePolicy};

/// One sample per kind the issue names, with distinct SOP Instance UIDs.
const CORPUS: &[&str] = &[
    "CT_small.dcm",                  // CT, explicit VR LE
    "eCT_Supplemental.dcm",          // Enhanced CT, multi-frame
    "emri_small.dcm",                // Enhanced MR, multi-frame
    "US1_UNCR.dcm",                  // US
    "OBXXXX1A_rle_2frame.dcm",       // US multi-frame, RLE
    "examples_ybr_color.dcm",        // US multi-frame, JPEG baseline
    "JPEG-LL.dcm",                   // JPEG lossless SV1
    "JPGExtended.dcm",               // JPEG extended
    "MR_small_jpeg_ls_lossless.dcm", // JPEG-LS lossless
    "US1_J2KR.dcm",                  // JPEG 2000 lossless
    "MR2_J2KI.dcm",                  // JPEG 2000
    "liver.dcm",                     // SEG
    "test-SR.dcm",                   // Comprehensive SR
    "reportsi.dcm",                  // Basic Text SR
    "rtdose_rle.dcm",                // RT Dose, RLE, multi-frame
    "gdcm-US-ALOKA-16.dcm",          // US, implicit VR LE
    "SC_rgb_jpeg_dcmd.dcm",          // secondary capture, implicit VR LE
    "image_dfl.dcm",                 // deflated explicit VR LE
    "waveform_ecg.dcm",              // 12-lead ECG waveform
];

#[test]
fn echo_answers_dcmtk_and_the_right_message_id() {
    let scp = Scp::start();
    let out = run(dcmtk("echoscu").args(["-aec", AE, "127.0.0.1", &scp.port.to_string()]));
    assert!(out.status.success(), "echoscu failed: {}", String::from_utf8_lossy(&out.stderr));
    let v = peer(&["echo", "127.0.0.1", &scp.port.to_string(), AE, "4242"]);
    assert_eq!(v["status"], 0, "{v}");

    // The exact response, read off the wire.
    use hms_edge::dicom::dimse::{Command, field, tag};
    let mut c = RawClient::associate(scp.port, "RAW", &[(VERIFICATION, IMPLICIT_LE)]);
    let mut rq = Command::new();
    rq.set_u16(tag::COMMAND_FIELD, field::C_ECHO_RQ)
        .set_u16(tag::MESSAGE_ID, 4242)
        .set_u16(tag::COMMAND_DATA_SET_TYPE, 0x0101)
        .set_uid(tag::AFFECTED_SOP_CLASS_UID, VERIFICATION);
    c.send_pdata(1, true, &rq.encode(), 0);
    let rsp = c.read_command().expect("C-ECHO-RSP");
    assert_eq!(rsp.command_field(), field::C_ECHO_RSP);
    assert_eq!(rsp.u16(tag::MESSAGE_ID_BEING_RESPONDED_TO), Some(4242));
    assert_eq!(rsp.u16(tag::STATUS), Some(0));
    assert_eq!(rsp.str(tag::AFFECTED_SOP_CLASS_UID), Some(VERIFICATION));
}

#[test]
fn every_sample_is_stored_found_and_exported_unchanged_pynetdicom() {
    let scp = Scp::start();
    let files = testfiles(CORPUS);
    let facts = info(&files);
    let port = scp.port.to_string();
    let mut args = vec!["store", "127.0.0.1", &port, AE];
    let paths: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    args.extend(paths.iter().map(String::as_str));
    let results = peer(&args);
    for r in results.as_array().expect("store results") {
        assert_eq!(r["status"], 0, "{r}");
    }
    assert_eq!(scp.counts().2, CORPUS.len() as u64);

    for (file, fact) in files.iter().zip(&facts) {
        let sop = fact["sop_instance"].as_str().unwrap();
        // Found by C-FIND at IMAGE level under its study and series.
        let found = peer(&[
            "find",
            "127.0.0.1",
            &port,
            AE,
            "IMAGE",
            &format!("StudyInstanceUID={}", fact["study"].as_str().unwrap()),
            &format!("SeriesInstanceUID={}", fact["series"].as_str().unwrap()),
            "SOPInstanceUID=",
            "SOPClassUID=",
        ]);
        assert_eq!(found["status"], 0, "{found}");
        let sops: Vec<&str> = found["matches"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["SOPInstanceUID"].as_str().unwrap())
            .collect();
        assert!(sops.contains(&sop), "{file:?} not found: {found}");

        // Exported: our File Meta, the data set byte for byte as sent.
        let exported = scp.export(sop);
        let cmp = peer(&["compare", &file.display().to_string(), &exported.display().to_string()]);
        assert_eq!(cmp["same_bytes"], true, "{file:?}: {cmp}");
        assert_eq!(cmp["same_dataset"], true, "{file:?}: {cmp}");
        assert_eq!(cmp["meta_ts"], cmp["original_ts"], "{file:?}: {cmp}");
        assert_eq!(cmp["meta_sop_instance"], sop);
        assert_eq!(cmp["implementation_class"], hms_edge::dicom::uids::IMPLEMENTATION_CLASS_UID);
        assert_eq!(dataset_of(&exported), dataset_of(file), "{file:?}");
    }
    // One blob and one outbox change per instance; no temp files left.
    assert_eq!(scp.rows(), (CORPUS.len() as i64, CORPUS.len() as i64));
    assert_eq!(scp.blob_files(), (CORPUS.len(), 0));
}

#[test]
fn every_sample_is_stored_and_exported_with_dcmtk_storescu() {
    let scp = Scp::start();
    // DCMTK cannot read rtdose_rle.dcm (odd-length OW pixel data); pynetdicom sends it above.
    let corpus: Vec<&str> = CORPUS.iter().copied().filter(|f| *f != "rtdose_rle.dcm").collect();
    let files = testfiles(&corpus);
    let facts = info(&files);
    // storescu sends what it parsed, not the file's bytes (it drops trailing padding, may pad
    // odd JPEG-LS fragments). The reference for "what was sent" is DCMTK's own storescp in
    // bit-preserving mode receiving the same sends.
    let ref_dir = scp.dir.path().join("reference");
    std::fs::create_dir(&ref_dir).unwrap();
    let ref_port = hms_edge_tests::free_port();
    let _reference = ChildGuard(
        dcmtk("storescp")
            .args(["+B", "+xa", "-aet", AE, "-od"])
            .arg(&ref_dir)
            .arg(ref_port.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(std::time::Duration::from_millis(500));

    // storescu proposes uncompressed syntaxes unless told which compressed one to offer: send
    // each file with the option that proposes its own transfer syntax.
    for (file, fact) in files.iter().zip(&facts) {
        let propose = match fact["ts"].as_str().unwrap() {
            "1.2.840.10008.1.2.5" => "-xr",
            "1.2.840.10008.1.2.4.50" => "-xy",
            "1.2.840.10008.1.2.4.51" => "-xx",
            "1.2.840.10008.1.2.4.70" => "-xs",
            "1.2.840.10008.1.2.4.80" => "-xt",
            "1.2.840.10008.1.2.4.81" => "-xu",
            "1.2.840.10008.1.2.4.90" => "-xv",
            "1.2.840.10008.1.2.4.91" => "-xw",
            "1.2.840.10008.1.2.1.99" => "-xd",
            "1.2.840.10008.1.2" => "-xi",
            _ => "-xe",
        };
        for port in [scp.port, ref_port] {
            let out = run(dcmtk("storescu")
                .args(["-R", propose, "-aec", AE, "-aet", "MODALITY1", "127.0.0.1"])
                .arg(port.to_string())
                .arg(file));
            assert!(
                out.status.success(),
                "storescu {file:?} to {port}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    assert_eq!(scp.counts().2, corpus.len() as u64);
    for (file, fact) in files.iter().zip(&facts) {
        let sop = fact["sop_instance"].as_str().unwrap();
        let exported = scp.export(sop);
        let received = std::fs::read_dir(&ref_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.to_string_lossy().ends_with(sop))
            .unwrap_or_else(|| panic!("storescp did not receive {file:?}"));
        assert_eq!(
            dataset_of(&exported),
            dataset_of(&received),
            "{file:?}: data set differs from what storescu sent"
        );
        let cmp = peer(&["compare", &file.display().to_string(), &exported.display().to_string()]);
        assert_eq!(cmp["meta_sop_instance"], sop);
        let ts = fact["ts"].as_str().unwrap();
        if ts.starts_with("1.2.840.10008.1.2.4") || ts == "1.2.840.10008.1.2.5" {
            assert_eq!(cmp["meta_ts"], ts, "{file:?}: {cmp}");
        }
    }
}

#[test]
fn storing_the_same_instance_twice_keeps_one_copy() {
    let scp = Scp::start();
    let files = testfiles(&["CT_small.dcm"]);
    let port = scp.port.to_string();
    let f = files[0].display().to_string();
    for _ in 0..2 {
        let r = peer(&["store", "127.0.0.1", &port, AE, &f]);
        assert_eq!(r[0]["status"], 0, "{r}");
    }
    // Also via DCMTK (which may re-encode, i.e. different bytes → a conflict, or the same bytes).
    assert_eq!(scp.counts().2, 1);
    assert_eq!(scp.rows(), (1, 1));
    assert_eq!(scp.blob_files(), (1, 0));
}

/// CT_small with one pixel changed: same SOP Instance UID, different content.
fn altered_copy(dir: &std::path::Path, original: &std::path::Path) -> std::path::PathBuf {
    let mut bytes = std::fs::read(original).unwrap();
    let n = bytes.len();
    bytes[n - 2] ^= 0xFF;
    let p = dir.join("altered.dcm");
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn different_content_under_a_stored_uid_is_refused_by_keep_first() {
    let scp = Scp::start();
    let files = testfiles(&["CT_small.dcm"]);
    let facts = info(&files);
    let sop = facts[0]["sop_instance"].as_str().unwrap();
    let port = scp.port.to_string();
    let altered = altered_copy(scp.dir.path(), &files[0]);
    let r = peer(&["store", "127.0.0.1", &port, AE, &files[0].display().to_string()]);
    assert_eq!(r[0]["status"], 0);
    let r = peer(&["store", "127.0.0.1", &port, AE, &altered.display().to_string()]);
    assert_eq!(r[0]["status"], 0x0111, "{r}");
    assert_eq!(scp.counts().2, 1);
    assert_eq!(scp.blob_files(), (1, 0));
    assert_eq!(dataset_of(&scp.export(sop)), dataset_of(&files[0]), "first copy kept");
}

#[test]
fn different_content_under_a_stored_uid_becomes_a_new_version_with_keep_both() {
    let config =
        DicomConfig { duplicate_policy: DuplicatePolicy::KeepBoth, ..DicomConfig::default() };
    let scp = Scp::start_with(config, None);
    let files = testfiles(&["CT_small.dcm"]);
    let sop = info(&files)[0]["sop_instance"].as_str().unwrap().to_owned();
    let port = scp.port.to_string();
    let altered = altered_copy(scp.dir.path(), &files[0]);
    for f in [&files[0], &altered, &files[0]] {
        let r = peer(&["store", "127.0.0.1", &port, AE, &f.display().to_string()]);
        assert_eq!(r[0]["status"], 0, "{r}");
    }
    // Two versions (the third send was identical to version 1); export gives the newest.
    assert_eq!(scp.counts().2, 2);
    assert_eq!(dataset_of(&scp.export(&sop)), dataset_of(&altered));
    let v1 = scp.dir.path().join("v1.dcm");
    hms_edge::dicom::export::export_to_file(&scp.store, &sop, Some(1), &v1).unwrap();
    assert_eq!(dataset_of(&v1), dataset_of(&files[0]));
    // C-FIND lists the instance once.
    let found = peer(&["find", "127.0.0.1", &port, AE, "IMAGE", &format!("SOPInstanceUID={sop}")]);
    assert_eq!(found["matches"].as_array().unwrap().len(), 1, "{found}");
}

#[test]
fn cli_exports_while_the_server_runs() {
    let scp = Scp::start();
    let files = testfiles(&["CT_small.dcm"]);
    let sop = info(&files)[0]["sop_instance"].as_str().unwrap().to_owned();
    let r =
        peer(&["store", "127.0.0.1", &scp.port.to_string(), AE, &files[0].display().to_string()]);
    assert_eq!(r[0]["status"], 0);
    let dest = scp.dir.path().join("cli-export.dcm");
    let out = run(std::process::Command::new(hms_edge_tests::bin("hms-edge"))
        .args(["dicom", "export", "--config"])
        .arg(scp.cli_config())
        .arg(&sop)
        .arg(&dest)
        .env_remove("HMS_EDGE_CONFIG"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(dataset_of(&dest), dataset_of(&files[0]));
    // Unknown instance: a clear error, no file.
    let missing = scp.dir.path().join("missing.dcm");
    let out = run(std::process::Command::new(hms_edge_tests::bin("hms-edge"))
        .args(["dicom", "export", "--config"])
        .arg(scp.cli_config())
        .arg("1.2.3.999")
        .arg(&missing));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no stored instance"));
    assert!(!missing.exists());
    // The running server still has its instance and nothing was swept.
    assert_eq!(scp.counts().2, 1);
    assert_eq!(scp.blob_files(), (1, 0));
}

/// Manual debugging aid: `cargo test --test dicom_store serve_for_manual_testing -- --ignored`
/// serves on a printed port for a minute.
#[test]
#[ignore]
fn serve_for_manual_testing() {
    let scp = Scp::start();
    eprintln!("DICOM SCP on 127.0.0.1:{}", scp.port);
    std::thread::sleep(std::time::Duration::from_secs(60));
}
