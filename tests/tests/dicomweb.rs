//! DICOMweb on the FHIR listener of the real daemon: instances stored with DCMTK `storescu` come
//! back through WADO-RS with their data set byte-identical to what was sent; QIDO-RS matches like
//! C-FIND; STOW-RS round-trips and refuses non-DICOM parts without storing anything; frames,
//! metadata and bulk data; scopes and audit. A real client (`dicomweb-client`, PyPI) talks to it
//! too (`tests/dicom/dicomweb_peer.py`).

mod dicom_common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use dicom_common::*;
use hms_edge::keys::Key;
use hms_edge::store::StoreOptions;
use hms_edge_tests::{DaemonOptions, DaemonProc, fhir_client};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use reqwest::blocking::{Client, Response};
use serde_json::{Value, json};

/// Samples of the kinds that matter for retrieval: native single and multi-frame, implicit VR,
/// deflated, RLE, JPEG family, JPEG 2000, SEG, SR.
const CORPUS: &[&str] = &[
    "CT_small.dcm",                  // explicit VR LE
    "emri_small.dcm",                // Enhanced MR, native multi-frame
    "OBXXXX1A_rle_2frame.dcm",       // RLE, 2 frames
    "JPEG-LL.dcm",                   // JPEG lossless SV1
    "MR_small_jpeg_ls_lossless.dcm", // JPEG-LS lossless
    "US1_J2KR.dcm",                  // JPEG 2000 lossless
    "liver.dcm",                     // SEG
    "test-SR.dcm",                   // Comprehensive SR (no pixels)
    "gdcm-US-ALOKA-16.dcm",          // implicit VR LE
    "image_dfl.dcm",                 // deflated explicit VR LE
];

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("dicom/dicomweb_peer.py")
}

/// Runs `dicomweb_peer.py` and parses its JSON output.
fn py(args: &[String]) -> Value {
    let out = run(Command::new("python3").arg(script()).args(args));
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "dicomweb_peer.py {args:?}: {e}\nstdout: {text}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

struct Env {
    d: DaemonProc,
    c: Client,
    base: String,
    ca: PathBuf,
    _dir: tempfile::TempDir,
}

fn start(env: &[(&str, &str)]) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = DaemonOptions { explicit_state_dir: true, ..Default::default() };
    for (k, v) in env {
        opts.env.insert((*k).into(), (*v).into());
    }
    let d = DaemonProc::start(dir.path(), &opts);
    let c = fhir_client(&d.state_dir().join("tls/cert.pem"));
    let base = format!("https://localhost:{}/dicom-web", d.fhir.port());
    let ca = d.state_dir().join("tls/ca.pem");
    Env { d, c, base, ca, _dir: dir }
}

impl Env {
    fn client_args(&self, token: Option<&str>, cmd: &[&str]) -> Vec<String> {
        let mut a = vec![
            "client".to_string(),
            self.base.clone(),
            self.ca.display().to_string(),
            token.unwrap_or("-").to_string(),
        ];
        a.extend(cmd.iter().map(|s| s.to_string()));
        a
    }

    fn get(&self, path: &str) -> Response {
        self.c.get(format!("{}{path}", self.base)).send().unwrap()
    }

    fn qido(&self, path: &str) -> Vec<Value> {
        let r = self.get(path);
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.headers()["content-type"], "application/dicom+json");
        r.json::<Vec<Value>>().unwrap()
    }

    /// Blob files on disk (not counting temp files).
    fn blob_files(&self) -> usize {
        let root = self.d.state_dir().join("blobs");
        let mut n = 0;
        for e in std::fs::read_dir(&root).unwrap() {
            let e = e.unwrap();
            if e.file_name() != "tmp" && e.file_type().unwrap().is_dir() {
                n += std::fs::read_dir(e.path()).unwrap().count();
            }
        }
        n
    }
}

/// The parts of a multipart/related response: (part headers text, body).
fn parts(r: Response) -> (String, Vec<(String, Vec<u8>)>) {
    let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
    let boundary = ct
        .split(';')
        .find_map(|p| p.trim().strip_prefix("boundary="))
        .unwrap_or_else(|| panic!("no boundary in {ct}"))
        .trim_matches('"')
        .to_owned();
    let body = r.bytes().unwrap().to_vec();
    let delim = format!("--{boundary}").into_bytes();
    let mut out = Vec::new();
    let mut rest = &body[..];
    let first = find(rest, &delim).expect("first delimiter");
    rest = &rest[first + delim.len()..];
    loop {
        if rest.starts_with(b"--") {
            break;
        }
        rest = &rest[2..]; // CRLF after the delimiter
        let h = find(rest, b"\r\n\r\n").expect("part headers");
        let headers = String::from_utf8_lossy(&rest[..h]).into_owned();
        rest = &rest[h + 4..];
        let mut next = Vec::from(&b"\r\n"[..]);
        next.extend_from_slice(&delim);
        let end = find(rest, &next).expect("next delimiter");
        out.push((headers, rest[..end].to_vec()));
        rest = &rest[end + next.len()..];
    }
    (ct, out)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn dataset_of_bytes(bytes: &[u8]) -> Vec<u8> {
    let off = hms_edge::dicom::dataset::part10_dataset_offset(bytes).expect("Part 10 file");
    bytes[off..].to_vec()
}

fn sha256(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

/// Sends each file with storescu (proposing its own transfer syntax) to the daemon and to a
/// bit-preserving DCMTK storescp; returns what storescp received per file ("what was sent").
fn store_with_storescu(e: &Env, files: &[PathBuf], facts: &[Value]) -> Vec<PathBuf> {
    let ref_dir = e._dir.path().join("reference");
    std::fs::create_dir_all(&ref_dir).unwrap();
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
    std::thread::sleep(Duration::from_millis(500));
    for (file, fact) in files.iter().zip(facts) {
        let propose = match fact["ts"].as_str().unwrap() {
            "1.2.840.10008.1.2.5" => "-xr",
            "1.2.840.10008.1.2.4.70" => "-xs",
            "1.2.840.10008.1.2.4.80" => "-xt",
            "1.2.840.10008.1.2.4.90" => "-xv",
            "1.2.840.10008.1.2.1.99" => "-xd",
            "1.2.840.10008.1.2" => "-xi",
            _ => "-xe",
        };
        for port in [e.d.dicom.port(), ref_port] {
            let out = run(dcmtk("storescu")
                .args(["-R", propose, "-aec", AE, "-aet", "MODALITY1", "127.0.0.1"])
                .arg(port.to_string())
                .arg(file));
            assert!(
                out.status.success(),
                "storescu {file:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    facts
        .iter()
        .map(|f| {
            let sop = f["sop_instance"].as_str().unwrap();
            std::fs::read_dir(&ref_dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .find(|p| p.to_string_lossy().ends_with(sop))
                .unwrap_or_else(|| panic!("storescp did not receive {sop}"))
        })
        .collect()
}

#[test]
fn every_instance_stored_with_storescu_comes_back_byte_identical_through_wado_rs() {
    let e = start(&[]);
    let files = testfiles(CORPUS);
    let facts = info(&files);
    let sent = store_with_storescu(&e, &files, &facts);

    for ((file, fact), sent) in files.iter().zip(&facts).zip(&sent) {
        let (st, se, sop) = (
            fact["study"].as_str().unwrap(),
            fact["series"].as_str().unwrap(),
            fact["sop_instance"].as_str().unwrap(),
        );
        let expected = dataset_of(sent);
        for path in [
            format!("/studies/{st}"),
            format!("/studies/{st}/series/{se}"),
            format!("/studies/{st}/series/{se}/instances/{sop}"),
        ] {
            let r = e.get(&path);
            assert_eq!(r.status(), 200, "{path}");
            let (ct, ps) = parts(r);
            assert!(ct.starts_with("multipart/related; type=\"application/dicom\""), "{ct}");
            let mine: Vec<_> =
                ps.iter().filter(|(_, b)| find(b, sop.as_bytes()).is_some()).collect();
            assert_eq!(mine.len(), 1, "{file:?} {path}");
            let (h, body) = mine[0];
            assert!(
                h.contains(&format!("transfer-syntax={}", fact["ts"].as_str().unwrap())),
                "{h}"
            );
            assert!(
                dataset_of_bytes(body) == expected,
                "{file:?} via {path}: data set differs from what storescu sent"
            );
        }

        // Metadata: DICOM JSON with the Pixel Data as bulk data.
        let r = e.get(&format!("/studies/{st}/series/{se}/instances/{sop}/metadata"));
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "application/dicom+json");
        let m: Vec<Value> = r.json().unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m[0]["00080018"]["Value"][0], sop);
        assert_eq!(m[0]["0020000D"]["Value"][0], st);
        let px = &m[0]["7FE00010"];
        if !px.is_null() {
            let uri = px["BulkDataURI"].as_str().unwrap_or_else(|| panic!("{file:?}: {px}"));
            let rel = uri.strip_prefix(&e.base).unwrap();
            let expected = py(&["pixels".into(), sent.display().to_string()]);
            // Bulk data of the Pixel Data: the native value, or every frame as stored.
            let (_, b) = parts(e.get(rel));
            if expected["compressed"] == false {
                assert_eq!(b.len(), 1);
                assert_eq!(sha256(&b[0].1), expected["pixel_data"], "{file:?}");
            }
            // Frames: each one as sent (native) or as stored (compressed).
            let n = expected["frames"].as_array().unwrap().len();
            let list: Vec<String> = (1..=n).rev().map(|i| i.to_string()).collect();
            let r = e.get(&format!(
                "/studies/{st}/series/{se}/instances/{sop}/frames/{}",
                list.join(",")
            ));
            assert_eq!(r.status(), 200, "{file:?} frames");
            let (ct, frames) = parts(r);
            assert_eq!(frames.len(), n, "{file:?}");
            for (i, (h, f)) in frames.iter().enumerate() {
                let want = &expected["frames"][n - 1 - i];
                if expected["compressed"] == true {
                    assert!(!ct.contains("octet-stream"), "{file:?}: {ct}");
                    assert!(h.contains("transfer-syntax="), "{h}");
                    // Fragments may carry one byte of padding (even length).
                    let exact = sha256(f) == *want;
                    let padded = f.last() == Some(&0) && sha256(&f[..f.len() - 1]) == *want;
                    assert!(exact || padded, "{file:?} frame {}", n - i);
                } else {
                    assert!(ct.contains("application/octet-stream"), "{ct}");
                    assert_eq!(sha256(f), *want, "{file:?} frame {}", n - i);
                }
            }
        }
    }

    // A real client reads what we serve.
    let ct = &facts[0];
    let st = ct["study"].as_str().unwrap();
    let v = py(&e.client_args(None, &["retrieve-study", st]));
    assert_eq!(v, json!([ct["sop_instance"]]));
    let v = py(&e.client_args(None, &["metadata", st]));
    assert_eq!(v[0]["sop"], ct["sop_instance"]);
    assert_eq!(v[0]["patient_id"], ct["patient_id"]);
    assert!(v[0]["bulk"].as_u64().unwrap() >= 1);
    let v = py(&e.client_args(
        None,
        &[
            "retrieve-instance",
            st,
            ct["series"].as_str().unwrap(),
            ct["sop_instance"].as_str().unwrap(),
        ],
    ));
    assert_eq!(v["rows"], 128);

    // The ImagingStudy made for the study points at this WADO-RS base.
    let fhir = e.d.fhir_base();
    let deadline = Instant::now() + Duration::from_secs(20);
    let study = loop {
        let b: Value =
            e.c.get(format!("{fhir}/ImagingStudy?identifier=urn:oid:{st}"))
                .send()
                .unwrap()
                .json()
                .unwrap();
        if b["total"] == 1 || Instant::now() > deadline {
            break b["entry"][0]["resource"].clone();
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let ep = study["endpoint"][0]["reference"].as_str().unwrap_or_else(|| panic!("{study}"));
    let ep: Value = e.c.get(format!("{fhir}/{ep}")).send().unwrap().json().unwrap();
    let address = ep["address"].as_str().unwrap();
    assert_eq!(address, format!("https://127.0.0.1:{}/dicom-web", e.d.fhir.port()));
    let r = e.c.get(format!("{address}/studies/{st}/series")).send().unwrap();
    assert_eq!(r.status(), 200, "the endpoint address serves QIDO-RS");
    assert_eq!(r.json::<Vec<Value>>().unwrap().len(), 1);

    let (status, _, log) = e.d.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn qido_matches_like_c_find_and_bad_requests_get_clean_errors() {
    let e = start(&[]);
    let names = ["CT_small.dcm", "MR_small.dcm", "emri_small.dcm", "US1_UNCR.dcm"];
    let files = testfiles(&names);
    let facts = info(&files);
    assert_eq!(storescu(e.d.dicom.port(), &files).len(), files.len());
    let ct = &facts[0];
    let st = ct["study"].as_str().unwrap();

    let all = e.qido("/studies");
    let studies: std::collections::BTreeSet<&str> =
        facts.iter().map(|f| f["study"].as_str().unwrap()).collect();
    assert_eq!(all.len(), studies.len());
    // Default attributes and the Retrieve URL.
    let one = e.qido(&format!("/studies?StudyInstanceUID={st}"));
    assert_eq!(one.len(), 1);
    assert_eq!(one[0]["0020000D"]["Value"][0], st);
    assert_eq!(one[0]["00100020"]["Value"][0], ct["patient_id"]);
    assert_eq!(one[0]["00201208"]["Value"][0], 1);
    assert_eq!(one[0]["00081190"]["Value"][0], format!("{}/studies/{st}", e.base));
    // Keyword and tag forms, wildcards (case-insensitive names), ranges, UID lists.
    let pid = ct["patient_id"].as_str().unwrap();
    assert_eq!(e.qido(&format!("/studies?PatientID={pid}")).len(), 1);
    assert_eq!(e.qido(&format!("/studies?00100020={pid}")).len(), 1);
    let name = ct["patient_name"].as_str().unwrap_or("");
    if name.len() >= 3 {
        let pat = format!("{}*", name[..3].to_lowercase());
        let got = e.qido(&format!("/studies?PatientName={}", urlencode(&pat)));
        assert!(got.iter().any(|s| s["0020000D"]["Value"][0] == st), "{pat}: {got:?}");
    }
    assert_eq!(e.qido("/studies?StudyDate=19000101-19000102").len(), 0);
    assert_eq!(e.qido("/studies?StudyDate=19000101-").len(), all.len() - count_without_date(&all));
    let two: Vec<&str> = studies.iter().take(2).copied().collect();
    assert_eq!(e.qido(&format!("/studies?StudyInstanceUID={}", two.join(","))).len(), 2);
    assert_eq!(
        e.qido("/series?Modality=CT").len(),
        facts.iter().filter(|f| f["modality"] == "CT").count()
    );
    assert_eq!(e.qido(&format!("/studies/{st}/series")).len(), 1);
    let inst = e.qido(&format!("/studies/{st}/instances"));
    assert_eq!(inst.len(), 1);
    assert_eq!(inst[0]["00080018"]["Value"][0], ct["sop_instance"]);
    assert_eq!(
        e.qido(&format!("/instances?SOPInstanceUID={}", ct["sop_instance"].as_str().unwrap()))
            .len(),
        1
    );
    assert_eq!(e.qido("/instances").len(), files.len());
    // includefield, limit, offset: pages cover everything once.
    let r =
        e.qido(&format!("/studies?StudyInstanceUID={st}&includefield=StudyDescription,00100030"));
    assert!(r[0].get("00081030").is_some() && r[0].get("00100030").is_some(), "{:?}", r[0]);
    let mut seen = Vec::new();
    for off in 0..all.len() {
        let p = e.qido(&format!("/studies?limit=1&offset={off}"));
        assert_eq!(p.len(), 1);
        seen.push(p[0]["0020000D"]["Value"][0].as_str().unwrap().to_owned());
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), all.len());
    assert_eq!(e.qido(&format!("/studies?offset={}", all.len())).len(), 0);
    // A real client finds the same.
    let v = py(&e.client_args(None, &["search-studies", &format!("PatientID={pid}")]));
    assert_eq!(v, json!([st]));
    let v = py(&e.client_args(None, &["search-instances", st]));
    assert_eq!(v, json!([ct["sop_instance"]]));

    // Malformed parameters: 400 with a message naming the problem.
    for (q, word) in [
        ("limit=ten", "limit"),
        ("offset=-2", "offset"),
        ("StudyDate=2024-01-01", "StudyDate"),
        ("NoSuchAttribute=1", "NoSuchAttribute"),
        ("includefield=Bogus", "Bogus"),
        ("StudyInstanceUID=1.2.abc", "StudyInstanceUID"),
        ("ReferencedStudySequence.ReferencedSOPInstanceUID=1.2", "sequence"),
    ] {
        let r = e.get(&format!("/studies?{q}"));
        assert_eq!(r.status(), 400, "{q}");
        let text = r.text().unwrap();
        assert!(text.contains(word), "{q}: {text}");
    }
    // Unknown UIDs: 404 on every retrieval path; a malformed UID: 400.
    let se = ct["series"].as_str().unwrap();
    let sop = ct["sop_instance"].as_str().unwrap();
    for path in [
        "/studies/1.2.3.999".to_string(),
        "/studies/1.2.3.999/metadata".into(),
        format!("/studies/{st}/series/1.2.3.999"),
        format!("/studies/{st}/series/{se}/instances/1.2.3.999"),
        format!("/studies/{st}/series/{se}/instances/1.2.3.999/metadata"),
        format!("/studies/{st}/series/{se}/instances/1.2.3.999/frames/1"),
        format!("/studies/1.2.3.999/series/{se}/instances/{sop}"),
    ] {
        assert_eq!(e.get(&path).status(), 404, "{path}");
    }
    assert_eq!(e.get("/studies/not-a-uid").status(), 400);
    assert_eq!(e.get(&format!("/studies/{st}/series/{se}/instances/{sop}/frames/0")).status(), 400);
    assert_eq!(e.get(&format!("/studies/{st}/series/{se}/instances/{sop}/frames/9")).status(), 404);
    let r =
        e.c.get(format!("{}/studies/{st}", e.base))
            .header("accept", "application/pdf")
            .send()
            .unwrap();
    assert_eq!(r.status(), 406);
    let (status, _, log) = e.d.stop();
    assert!(status.success(), "{log}");
}

fn count_without_date(studies: &[Value]) -> usize {
    studies.iter().filter(|s| s["00080020"]["Value"][0].as_str().unwrap_or("").is_empty()).count()
}

fn urlencode(s: &str) -> String {
    serde_urlencoded::to_string([("x", s)]).unwrap()[2..].to_owned()
}

/// A multipart/related STOW-RS body of (content type, bytes) parts.
fn stow_body(parts: &[(&str, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "stow-boundary-7f3a";
    let mut body = Vec::new();
    for (ct, data) in parts {
        body.extend_from_slice(format!("--{boundary}\r\nContent-Type: {ct}\r\n\r\n").as_bytes());
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/related; type=\"application/dicom\"; boundary={boundary}"), body)
}

fn stow(e: &Env, path: &str, parts: &[(&str, &[u8])], token: Option<&str>) -> (u16, Value) {
    let (ct, body) = stow_body(parts);
    let mut rb = e.c.post(format!("{}{path}", e.base)).header("content-type", ct).body(body);
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    let r = rb.send().unwrap();
    let s = r.status().as_u16();
    (s, r.json().unwrap_or(Value::Null))
}

#[test]
fn stow_rs_stores_durably_and_refuses_bad_parts_storing_nothing() {
    let e = start(&[]);
    let files = testfiles(&["CT_small.dcm", "JPEG-LL.dcm", "image_dfl.dcm", "MR_small.dcm"]);
    let facts = info(&files);
    let bytes: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();

    // Two instances in one request: both referenced, each retrievable byte-identical.
    let (s, b) = stow(
        &e,
        "/studies",
        &[("application/dicom", &bytes[0]), ("application/dicom", &bytes[1])],
        None,
    );
    assert_eq!(s, 200, "{b}");
    let refs = b["00081199"]["Value"].as_array().unwrap();
    assert_eq!(refs.len(), 2);
    assert!(b.get("00081198").is_none(), "{b}");
    for (i, r) in refs.iter().enumerate() {
        assert_eq!(r["00081155"]["Value"][0], facts[i]["sop_instance"]);
        let url = r["00081190"]["Value"][0].as_str().unwrap();
        let (_, ps) = parts(e.c.get(url).send().unwrap());
        assert_eq!(ps.len(), 1);
        assert!(dataset_of_bytes(&ps[0].1) == dataset_of(&files[i]), "{:?}", files[i]);
    }
    // Sending the same instance again is a success without a copy.
    let before = e.blob_files();
    let (s, _) = stow(&e, "/studies", &[("application/dicom", &bytes[0])], None);
    assert_eq!(s, 200);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(e.blob_files(), before);

    // Bad parts: a text part, a truncated instance, garbage called DICOM, an instance posted to
    // another study's URL. Each is listed as failed; nothing is stored.
    let half = &bytes[2][..bytes[2].len() / 2];
    let cut = &bytes[3][..bytes[3].len() - 7];
    for (path, ct, data) in [
        ("/studies".to_string(), "text/plain", &b"hello, not DICOM"[..]),
        ("/studies".to_string(), "application/dicom", half),
        ("/studies".to_string(), "application/dicom", cut),
        ("/studies".to_string(), "application/dicom", &[0u8; 300][..]),
        (
            format!("/studies/{}", facts[0]["study"].as_str().unwrap()),
            "application/dicom",
            &bytes[3][..],
        ),
    ] {
        let (s, b) = stow(&e, &path, &[(ct, data)], None);
        assert_eq!(s, 409, "{ct} to {path}: {b}");
        assert_eq!(b["00081198"]["Value"].as_array().map(Vec::len), Some(1), "{b}");
        assert!(b["00081198"]["Value"][0]["00081197"]["Value"][0].as_u64().unwrap() > 0);
        assert!(b.get("00081199").is_none());
    }
    // One good and one bad part: 202, the good one stored.
    let (s, b) =
        stow(&e, "/studies", &[("application/dicom", &bytes[2]), ("text/plain", b"x")], None);
    assert_eq!(s, 202, "{b}");
    assert_eq!(b["00081199"]["Value"].as_array().unwrap().len(), 1);
    assert_eq!(b["00081198"]["Value"].as_array().unwrap().len(), 1);
    // Not multipart at all, or a body cut before its closing boundary: clean 4xx.
    let r =
        e.c.post(format!("{}/studies", e.base))
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .unwrap();
    assert_eq!(r.status(), 415);
    let (ct, body) = stow_body(&[("application/dicom", &bytes[3])]);
    let r =
        e.c.post(format!("{}/studies", e.base))
            .header("content-type", ct)
            .body(body[..body.len() / 2].to_vec())
            .send()
            .unwrap();
    assert_eq!(r.status(), 400);
    std::thread::sleep(Duration::from_millis(300));
    // MR_small was never stored whole: not in the index, no blob for it.
    let mr = facts[3]["sop_instance"].as_str().unwrap();
    assert_eq!(e.qido(&format!("/instances?SOPInstanceUID={mr}")).len(), 0);
    assert_eq!(e.qido("/instances").len(), 3);
    assert_eq!(e.blob_files(), 3);

    // A real client's STOW-RS is stored and found.
    let v = py(&e.client_args(None, &["store", &files[3].display().to_string()]));
    assert_eq!(v["00081199"]["Value"][0]["00081155"]["Value"][0], mr, "{v}");
    assert_eq!(e.qido(&format!("/instances?SOPInstanceUID={mr}")).len(), 1);
    let (status, _, log) = e.d.stop();
    assert!(status.success(), "{log}");
}

// ---- auth -----------------------------------------------------------------------------------

const ISS: &str = "https://idp.cloud.example/realms/hms";
const AUD: &str = "hms-edge";
const TENANT: &str = "st-marys";

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

#[test]
fn scopes_are_enforced_and_every_access_audited() {
    let dir = tempfile::tempdir().unwrap();
    let kp = rcgen::KeyPair::generate().unwrap();
    let raw = kp.public_key_raw();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwk = json!({"kty": "EC", "crv": "P-256", "x": b64(&raw[1..33]), "y": b64(&raw[33..]),
                     "kid": "k1", "alg": "ES256", "use": "sig"});
    let key = EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, json!({"keys": [jwk]}).to_string()).unwrap();
    let token = |scope: &str| {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some("k1".into());
        let c = json!({"iss": ISS, "aud": AUD, "sub": "radiologist-3", "exp": now() + 600,
                       "iat": now(), "tenant": TENANT, "scope": scope});
        encode(&h, &c, &key).unwrap()
    };
    let jwks_s = jwks.display().to_string();
    let e = start(&[
        ("HMS_EDGE_FHIR_AUTH", "jwt"),
        ("HMS_EDGE_FHIR_JWT_ISSUER", ISS),
        ("HMS_EDGE_FHIR_JWT_AUDIENCE", AUD),
        ("HMS_EDGE_SITE_TENANT_ID", TENANT),
        ("HMS_EDGE_FHIR_JWKS_FILE", &jwks_s),
    ]);
    let files = testfiles(&["CT_small.dcm"]);
    let facts = info(&files);
    let bytes = std::fs::read(&files[0]).unwrap();
    let st = facts[0]["study"].as_str().unwrap();
    let get = |path: &str, tok: Option<&str>| {
        let mut rb = e.c.get(format!("{}{path}", e.base));
        if let Some(t) = tok {
            rb = rb.bearer_auth(t);
        }
        rb.send().unwrap().status().as_u16()
    };
    let patients_only = token("user/Patient.rs");
    let reader = token("user/ImagingStudy.rs");
    let writer = token("user/ImagingStudy.crs");

    assert_eq!(get("/studies", None), 401);
    assert_eq!(get("/studies", Some("not.a.jwt")), 401);
    assert_eq!(stow(&e, "/studies", &[("application/dicom", &bytes)], None).0, 401);
    assert_eq!(stow(&e, "/studies", &[("application/dicom", &bytes)], Some(&patients_only)).0, 403);
    assert_eq!(stow(&e, "/studies", &[("application/dicom", &bytes)], Some(&reader)).0, 403);
    assert_eq!(e.qido_count_with(&reader), 0, "a refused STOW stores nothing");
    let (s, b) = stow(&e, "/studies", &[("application/dicom", &bytes)], Some(&writer));
    assert_eq!(s, 200, "{b}");
    assert_eq!(get("/studies", Some(&patients_only)), 403);
    assert_eq!(get(&format!("/studies/{st}"), Some(&patients_only)), 403);
    assert_eq!(get(&format!("/studies/{st}/metadata"), Some(&patients_only)), 403);
    assert_eq!(get("/studies", Some(&reader)), 200);
    assert_eq!(get(&format!("/studies/{st}"), Some(&reader)), 200);
    assert_eq!(get("/studies/1.2.3.999", Some(&reader)), 404);
    // The real client with a token.
    let v = py(&e.client_args(Some(&reader), &["search-instances", st]));
    assert_eq!(v, json!([facts[0]["sop_instance"]]));

    std::thread::sleep(Duration::from_millis(500));
    let state = e.d.state_dir();
    let (status, _, log) = e.d.stop();
    assert!(status.success(), "{log}");
    assert!(!log.contains(&writer), "tokens must never be logged");
    let key = hms_edge::keys::load_key_file(&state.join("master.key")).unwrap();
    let store =
        hms_edge::store::open(&state, &Key::from_bytes(*key.expose()), &StoreOptions::default())
            .unwrap();
    let rows: Vec<(String, String, String, String)> = store
        .read_blocking(|c| {
            let mut s = c.prepare("SELECT action, actor, entity, outcome FROM audit_events")?;
            let rows = s
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
        .unwrap();
    let has = |action: &str, outcome: &str| {
        rows.iter().any(|r| r.0 == action && r.1 == "radiologist-3" && r.3.starts_with(outcome))
    };
    assert!(has("authorize", "403"), "{rows:?}");
    assert!(has("dicom-store", "success"), "{rows:?}");
    assert!(has("dicomweb-search", "success"), "{rows:?}");
    assert!(has("dicomweb-retrieve", "success"), "{rows:?}");
    assert!(has("dicomweb-retrieve", "404"), "{rows:?}");
    assert!(rows.iter().any(|r| r.0 == "authenticate" && r.3.starts_with("401")), "{rows:?}");
}

impl Env {
    fn qido_count_with(&self, token: &str) -> usize {
        let r = self.c.get(format!("{}/instances", self.base)).bearer_auth(token).send().unwrap();
        assert_eq!(r.status(), 200);
        r.json::<Vec<Value>>().unwrap().len()
    }
}
