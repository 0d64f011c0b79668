//! Hostile input against the real `hms-edged` (issue 16). Each test sends the bad input over the
//! socket, then shows what a radiographer and a nurse would notice: the process lives, a normal
//! write still succeeds (a Patient POST gets 201, a storescu gets Success) and `/readyz` tells
//! the truth.

mod dicom_common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use dicom_common::{AE, IMPLICIT_LE, RawClient, associate_rq, storescu, testfiles};
use hms_edge::dicom::dimse::{Command, field, tag};
use hms_edge_tests::{DaemonOptions, DaemonProc, fhir_client, http_get};
use reqwest::blocking::Client;
use serde_json::{Value, json};

const FHIR_JSON: &str = "application/fhir+json";
/// A dateTime whose time-zone part holds a two-byte character (the byte-slicing panic).
const BAD_DATE: &str = "2000-01-01T10:00+0\u{e9}00";

struct Box_ {
    d: DaemonProc,
    c: Client,
    base: String,
    _dir: tempfile::TempDir,
}

fn start() -> Box_ {
    let dir = tempfile::tempdir().unwrap();
    let opts = DaemonOptions { explicit_state_dir: true, ..Default::default() };
    let d = DaemonProc::start(dir.path(), &opts);
    let c = fhir_client(&d.state_dir().join("tls/cert.pem"));
    let base = d.fhir_base();
    Box_ { d, c, base, _dir: dir }
}

impl Box_ {
    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .c
            .post(format!("{}/{path}", self.base))
            .header("content-type", FHIR_JSON)
            .body(body.to_string())
            .send()
            .unwrap();
        let s = r.status().as_u16();
        (s, r.json().unwrap_or(Value::Null))
    }

    fn get(&self, path: &str) -> (u16, Value) {
        let r = self.c.get(format!("{}/{path}", self.base)).send().unwrap();
        let s = r.status().as_u16();
        (s, r.json().unwrap_or(Value::Null))
    }

    /// The box still does its job: alive, a Patient write, a C-STORE, and ready.
    fn still_works(&mut self, what: &str) {
        assert!(
            self.d.child.try_wait().unwrap().is_none(),
            "{what}: hms-edged died; log:\n{}",
            self.d.log_text()
        );
        let mrn = format!("OK-{}", rand::random::<u32>());
        let (s, b) = self.post(
            "Patient",
            &json!({"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": mrn}]}),
        );
        assert_eq!(s, 201, "{what}: a normal Patient POST failed: {b}");
        let files = testfiles(&["CT_small.dcm"]);
        let acked = storescu(self.d.dicom.port(), &files);
        assert_eq!(acked.len(), 1, "{what}: a normal C-STORE failed; log:\n{}", self.d.log_text());
        let (code, body) = http_get(self.d.admin, "/readyz");
        assert_eq!(code, 200, "{what}: /readyz: {body}");
    }
}

#[test]
fn a_bad_time_zone_in_a_date_changes_nothing_and_stops_nothing() {
    let mut b = start();
    // In a resource body: indexed dates are checked; the write is refused or stored, never a 5xx.
    for (rtype, body) in [
        ("Patient", json!({"resourceType": "Patient", "birthDate": BAD_DATE})),
        (
            "Observation",
            json!({"resourceType": "Observation", "status": "final",
                   "code": {"text": "x"}, "effectiveDateTime": BAD_DATE}),
        ),
    ] {
        let (s, out) = b.post(rtype, &body);
        assert!(s < 500, "{rtype} with a bad date: {s} {out}");
    }
    // In a search parameter: a 400 OperationOutcome.
    let (s, out) = b.get("Observation?date=2000-01-01T10:00%2B0%C3%A900");
    assert_eq!(s, 400, "{out}");
    assert_eq!(out["resourceType"], "OperationOutcome");
    // In a batch: a GET entry with the bad search and a POST entry with the bad date.
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Observation?date=2000-01-01T10:00%2B0%C3%A900"}},
        {"resource": {"resourceType": "Patient", "birthDate": BAD_DATE},
         "request": {"method": "POST", "url": "Patient"}},
    ]});
    let (s, out) = b.post("", &batch);
    assert!(s < 500, "batch: {s} {out}");
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient", "birthDate": BAD_DATE},
         "request": {"method": "POST", "url": "Patient"}},
    ]});
    let (s, out) = b.post("", &tx);
    assert!(s < 500, "transaction: {s} {out}");
    b.still_works("bad dates");
}

/// `levels` nested undefined-length sequences in implicit VR (16 bytes a level), never closed.
fn nested_sequences(levels: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(levels * 16);
    for _ in 0..levels {
        // (0040,0275) Request Attributes Sequence, undefined length.
        out.extend_from_slice(&[0x40, 0x00, 0x75, 0x02, 0xFF, 0xFF, 0xFF, 0xFF]);
        // Item, undefined length.
        out.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
    }
    out
}

#[test]
fn deeply_nested_data_sets_are_refused_on_every_dimse_service() {
    let mut b = start();
    let port = b.d.dicom.port();
    let deep = nested_sequences(50_000); // 800 kB
    let cases: [(&str, &str, u16); 5] = [
        ("C-FIND", "1.2.840.10008.5.1.4.1.2.2.1", field::C_FIND_RQ),
        ("worklist", "1.2.840.10008.5.1.4.31", field::C_FIND_RQ),
        ("C-MOVE", "1.2.840.10008.5.1.4.1.2.2.2", field::C_MOVE_RQ),
        ("N-ACTION", "1.2.840.10008.1.20.1", field::N_ACTION_RQ),
        ("N-CREATE", "1.2.840.10008.3.1.2.3.3", 0x0140),
    ];
    for (name, class, command_field) in cases {
        let mut c = RawClient::associate(port, "HOSTILE", &[(class, IMPLICIT_LE)]);
        let mut cmd = Command::new();
        cmd.set_u16(tag::COMMAND_FIELD, command_field)
            .set_u16(tag::MESSAGE_ID, 1)
            .set_u16(tag::COMMAND_DATA_SET_TYPE, 0x0000);
        match command_field {
            field::N_ACTION_RQ => {
                cmd.set_uid(tag::REQUESTED_SOP_CLASS_UID, class)
                    .set_uid(tag::REQUESTED_SOP_INSTANCE_UID, "1.2.840.10008.1.20.1.1")
                    .set_u16(tag::ACTION_TYPE_ID, 1);
            }
            0x0140 => {
                cmd.set_uid(tag::AFFECTED_SOP_CLASS_UID, class)
                    .set_uid(tag::AFFECTED_SOP_INSTANCE_UID, "2.25.1234567");
            }
            _ => {
                cmd.set_u16(tag::PRIORITY, 0).set_uid(tag::AFFECTED_SOP_CLASS_UID, class);
                if command_field == field::C_MOVE_RQ {
                    cmd.set_ae(tag::MOVE_DESTINATION, "HOSTILE");
                }
            }
        }
        c.send_pdata(1, true, &cmd.encode(), 16384);
        c.send_pdata(1, false, &deep, 16384);
        // A failure response or an abort: either way the caller is told, and nothing dies.
        let answer = c.read_command();
        if let Some(rsp) = &answer {
            let status = rsp.u16(tag::STATUS).unwrap_or(0);
            assert!(
                status != 0x0000 && status != 0xFF00,
                "{name}: a nested data set got status {status:#06x}"
            );
        }
        assert!(
            b.d.child.try_wait().unwrap().is_none(),
            "{name}: hms-edged died; log:\n{}",
            b.d.log_text()
        );
    }
    b.still_works("nested sequences");
}

#[test]
fn multiplying_search_clauses_are_bounded() {
    let mut b = start();
    for i in 0..20 {
        let (s, _) = b.post(
            "Patient",
            &json!({"resourceType": "Patient", "name": [{"family": format!("F{i}"), "given": ["G"]}],
                    "birthDate": "1990-01-01", "gender": "female"}),
        );
        assert_eq!(s, 201);
    }
    // The same key 200 times sorts like once.
    let keys = vec!["family"; 200].join(",");
    let (s, out) = b.get(&format!("Patient?_sort={keys}&_count=5"));
    assert_eq!(s, 200, "{out}");
    assert_eq!(out["total"], 20);
    assert_eq!(out["entry"][0]["resource"]["name"][0]["family"], "F0");
    // More distinct sort keys, clauses, values or includes than the limits: a 400 that says so.
    for q in [
        "Patient?_sort=family,given,birthdate,gender,_id,_lastUpdated".to_string(),
        format!("Patient?{}", vec!["family=F"; 40].join("&")),
        format!("Patient?family={}", vec!["F"; 100].join(",")),
        format!("Patient?{}", vec!["_revinclude=Observation:subject"; 20].join("&")),
    ] {
        let (s, out) = b.get(&q);
        assert_eq!(s, 400, "{q}: {out}");
        assert_eq!(out["resourceType"], "OperationOutcome");
    }
    b.still_works("multiplying clauses");
}

/// Opens `n` TCP connections to `target` from the loopback address `from` and keeps them silent.
fn idle_connections(
    rt: &tokio::runtime::Runtime,
    from: &str,
    target: SocketAddr,
    n: usize,
) -> Vec<tokio::net::TcpStream> {
    rt.block_on(async {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.bind(format!("{from}:0").parse().unwrap()).unwrap();
            if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_secs(2), s.connect(target)).await
            {
                out.push(c);
            }
        }
        out
    })
}

#[test]
fn six_hundred_idle_connections_per_listener_lock_nobody_out() {
    let mut b = start();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    // 600 silent connections on each listener from another address (127.0.0.2).
    let mut held = Vec::new();
    for target in [b.d.dicom, b.d.dicom_tls, b.d.fhir] {
        held.push(idle_connections(&rt, "127.0.0.2", target, 600));
    }
    // A normal modality and a normal ward client, from 127.0.0.1, still get through.
    b.still_works("600 idle connections per listener");
    // Most of the silent sockets were closed by the box at once (limits per address).
    let closed: Vec<usize> = rt.block_on(async {
        let mut out = Vec::new();
        for set in &held {
            let mut closed = 0;
            for c in set {
                let mut buf = [0u8; 1];
                if let Ok(Ok(0)) =
                    tokio::time::timeout(Duration::from_millis(5), c.peek(&mut buf)).await
                {
                    closed += 1;
                }
            }
            out.push(closed);
        }
        out
    });
    for (name, (set, shut)) in ["dicom", "dicom-tls", "https"].iter().zip(held.iter().zip(&closed))
    {
        println!(
            "IDLE|{name}|{} silent connections opened|{shut} closed by the box at once|normal storescu Success, Patient POST 201, /readyz 200",
            set.len()
        );
    }
    assert!(
        closed.iter().sum::<usize>() > 1000,
        "only {closed:?} of 1800 silent connections turned away"
    );
    drop(held);
}

#[test]
fn slow_headers_on_the_https_port_are_cut_off() {
    use std::io::{Read, Write};
    let b = start();
    let mut tls = hms_edge_tests::raw_tls(&b.d.state_dir(), b.d.fhir, Duration::from_secs(60));
    // Half a request, then silence (slow-loris).
    tls.write_all(b"GET /fhir/metadata HTTP/1.1\r\nHost: localhost\r\n").unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    let mut got = Vec::new();
    loop {
        match tls.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    // The server ended the connection (a 408 or a close) instead of waiting forever; the read
    // timeout of 60 s would have ended the loop with nothing otherwise.
    assert!(
        started.elapsed() < Duration::from_secs(55),
        "the half request was held for {:?}",
        started.elapsed()
    );
    let text = String::from_utf8_lossy(&got);
    assert!(text.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
}

#[test]
fn association_request_with_a_silent_body_does_not_take_a_slot() {
    // A few dozen callers that open the DICOM port and send half an A-ASSOCIATE-RQ from one
    // address hold no association slot: a real modality from another address associates.
    let mut b = start();
    let port = b.d.dicom.port();
    let rq = associate_rq("SLOW", AE, &[("1.2.840.10008.1.1", IMPLICIT_LE)]);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut held = idle_connections(&rt, "127.0.0.3", b.d.dicom, 64);
    rt.block_on(async {
        use tokio::io::AsyncWriteExt;
        for c in held.iter_mut() {
            let _ = c.write_all(&rq[..rq.len() / 2]).await;
        }
    });
    let mut c = RawClient::connect(port);
    c.send(&rq);
    let (ty, _) = c.read_pdu().expect("an answer");
    assert_eq!(ty, 0x02, "a normal association request was not accepted");
    drop(c);
    b.still_works("half association requests");
    drop(held);
}

#[test]
fn the_schema_driven_api_fuzzer_finds_no_5xx_hang_or_death() {
    let mut b = start();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("api/fuzz_api.py");
    let examples = std::env::var("HMS_API_FUZZ_EXAMPLES").unwrap_or_else(|_| "150".into());
    let out = std::process::Command::new("python3")
        .arg(script)
        .args(["--base", &format!("https://localhost:{}", b.d.fhir.port())])
        .arg("--ca")
        .arg(b.d.state_dir().join("tls/ca.pem"))
        .args(["--examples", &examples])
        .output()
        .unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{text}");
    assert!(out.status.success(), "API fuzzer: {text}\nlog:\n{}", b.d.log_text());
    b.still_works("the API fuzzer");
}
